#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
@_spi(Testing) import FSShareWatch
import FSShareAgentChannel
import FSShareSystem
import FSShareTestSupport
import Logging
import SystemPackage
import Testing

/// One `fsshare watch` for the whole node: 300 copy-mode sandboxes × 3 kubelet volumes, each
/// sandbox found through its manifest (agent address and guest directory recorded by its first
/// share), served by one process on one inotify instance; a sandbox prepared later is picked up,
/// one cleaned up is dropped. (Kata's design holds one inotify instance per sandbox, and the
/// default `fs.inotify.max_user_instances` of 128 stops it short of such a node.)
@Suite("One watcher for the node", .serialized)
struct NodeWatchTests {
    let fsshare = TestEnvironment.product("fsshare")

    /// The inotify instances a process holds (from /proc/PID/fdinfo).
    static func inotifyInstances(_ pid: pid_t) -> Int {
        let dir = "/proc/\(pid)/fdinfo"
        return ((try? Sys.listDirectory(nil, FilePath(dir))) ?? []).filter { entry in
            (readFile(dir + "/" + entry.name) ?? "").contains("inotify wd:")
        }.count
    }

    @Test("300 sandboxes × 3 volumes, one fsshare watch, one inotify instance, every pod updated")
    func nodeWideWatch() throws {
        let base = TestEnvironment.scratch("node-watch")
        let agent = try AgentUnderTest(base)
        let root = base + "/root"
        let sandboxes = 300, perSandbox = 3
        var volumes: [(sid: String, kubelet: KubeletEmulator, guest: String)] = []
        func share(_ sid: String) throws {
            let sharer = try LinuxFilesystemSharer(
                sandboxID: sid,
                configuration: SharerConfiguration(root: FilePath(root), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/" + sid + "/"),
                agent: agent.client())
            try sharer.prepareSync()
            for j in 0..<perSandbox {
                let kubelet = KubeletEmulator(root: base + "/kubelet/" + sid, plugin: "configmap", name: "v\(j)")
                kubelet.write(["key": "\(sid)-v\(j)-0", "other": "o"])
                let shared = try #require(try sharer.shareFileSync(
                    container: Container(id: "c", rootfs: .hostMounted("/")), mount: Mount(source: FilePath(kubelet.volume), destination: FilePath("/etc/v\(j)"))))
                volumes.append((sid, kubelet, shared.guestPath))
            }
        }
        let t0 = Sys.monotonicNanoseconds()
        for i in 0..<sandboxes { try share("pod\(i)") }
        let shareSeconds = Double(Sys.monotonicNanoseconds() - t0) / 1e9

        // The node's watcher: no --sandbox, no --agent.
        let log = base + "/watch.log"
        let t1 = Sys.monotonicNanoseconds()
        let watch = try ChildProcess([fsshare, "watch", "--root", root], logPath: log)
        defer { watch.stop(signal: SIGKILL) }
        func watching() -> Int { Sys.run(["grep", "-c", "^fsshare watch: watching ", log]).output.split(separator: "\n").first.flatMap { Int($0) } ?? 0 }
        _ = waitUntil(60) { watching() >= sandboxes * perSandbox }
        let registerSeconds = Double(Sys.monotonicNanoseconds() - t1) / 1e9
        #expect(watching() == sandboxes * perSandbox, "\(watching()) volumes watched:\n\(Sys.run(["tail", "-5", log]).output)")
        #expect(Self.inotifyInstances(watch.pid) == 1, "the node's watcher holds one inotify instance")

        // Every pod's volumes updated at once: every guest copy follows.
        func current(_ v: (sid: String, kubelet: KubeletEmulator, guest: String), _ n: Int) -> Bool {
            readFile(v.guest + "/key") == "\(v.sid)-\(v.kubelet.volume.split(separator: "/").last ?? "")-\(n)"
        }
        let t2 = Sys.monotonicNanoseconds()
        for v in volumes { v.kubelet.write(["key": "\(v.sid)-\(v.kubelet.volume.split(separator: "/").last ?? "")-1", "other": "o"]) }
        _ = waitUntil(120) { volumes.allSatisfy { current($0, 1) } }
        let updateSeconds = Double(Sys.monotonicNanoseconds() - t2) / 1e9
        let stale = volumes.filter { !current($0, 1) }
        #expect(stale.isEmpty, "\(stale.count) of \(volumes.count) guest copies are stale, first \(stale.first?.guest ?? "")")

        // A sandbox prepared while the watcher runs is picked up.
        try share("late")
        let late = try #require(volumes.last)
        _ = waitUntil(30) { Sys.run(["cat", log]).output.contains("watching \(late.kubelet.volume)") }
        late.kubelet.write(["key": "late-v2-1", "other": "o"])
        _ = waitUntil(30) { current(late, 1) }
        #expect(current(late, 1), "the sandbox prepared later is mirrored")

        // A sandbox cleaned up is dropped, the others go on.
        try LinuxFilesystemSharer(sandboxID: "pod0", configuration: SharerConfiguration(root: FilePath(root), sharedFilesystem: .none)).cleanupSync()
        _ = waitUntil(30) { Sys.run(["cat", log]).output.contains("sandbox pod0 is gone") }
        #expect(Sys.run(["cat", log]).output.contains("sandbox pod0 is gone"))
        let survivor = volumes[perSandbox]
        survivor.kubelet.write(["key": "\(survivor.sid)-v0-2", "other": "o"])
        _ = waitUntil(30) { current(survivor, 2) }
        #expect(current(survivor, 2))
        #expect(watch.stop(signal: SIGTERM) == 0)
        func r(_ x: Double) -> Double { (x * 100).rounded() / 100 }
        print("figure: node watch: \(sandboxes) sandboxes × \(perSandbox) volumes shared in \(r(shareSeconds)) s; the watcher registered them in \(r(registerSeconds)) s; an update of every volume reached every guest copy in \(r(updateSeconds)) s; 1 inotify instance")
    }

    /// The follower rides the watcher's one inotify instance (``VolumeWatcher/observe(_:mask:_:)``):
    /// when that instance's queue overflows, sandboxes prepared and cleaned up in the lost events
    /// are found by listing the root again; dropping the follower ends its observations.
    @Test("a root follower that lost its events looks at the root again")
    func followerRecoversFromOverflow() throws {
        let base = TestEnvironment.scratch("node-watch-overflow")
        let agent = try AgentUnderTest(base)
        let root = base + "/root"
        func share(_ sid: String) throws -> (KubeletEmulator, String) {
            let sharer = try LinuxFilesystemSharer(
                sandboxID: sid,
                configuration: SharerConfiguration(root: FilePath(root), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/" + sid + "/"),
                agent: agent.client())
            try sharer.prepareSync()
            let kubelet = KubeletEmulator(root: base + "/kubelet/" + sid, plugin: "configmap", name: "cfg")
            kubelet.write(["key": "\(sid)-0"])
            let shared = try #require(try sharer.shareFileSync(
                container: Container(id: "c", rootfs: .hostMounted("/")), mount: Mount(source: FilePath(kubelet.volume), destination: "/etc/cfg")))
            return (kubelet, shared.guestPath)
        }
        _ = try share("early")
        let lines = WatcherTests.Lines()
        let watcher = VolumeWatcher(logger: Logger.lines { lines.add($0) })
        try watcher.start()
        defer { watcher.stop() }
        var follower: SandboxFollower? = SandboxFollower(watcher: watcher)
        try #require(follower).followRoot(FilePath(root))
        #expect(watcher.watchedVolumes(in: "early").count == 1)
        #expect(follower?.followedSandboxes == [root + "/early"])

        // Lose the events: the reader pauses, more events than the kernel queues arrive on the
        // root, then a sandbox is prepared and another cleaned up.
        let limit = Int(Sys.run(["cat", "/proc/sys/fs/inotify/max_queued_events"]).output.filter(\.isNumber)) ?? 16384
        watcher.pauseReadingForTesting(true)
        // The queue fills first, so what follows is lost (the kernel keeps the oldest events).
        // The reader may take one more read (64 KiB, ~2,000 events) before it sees the pause:
        // 8,192 events of margin past the queue's limit.
        for i in 0...(limit / 2 + 4096) {
            let path = root + "/.flood\(i)"
            close(open(path, O_CREAT | O_WRONLY, 0o644))
            unlink(path)
        }
        let (late, lateGuest) = try share("late")
        try LinuxFilesystemSharer(sandboxID: "early", configuration: SharerConfiguration(root: FilePath(root), sharedFilesystem: .none)).cleanupSync()
        watcher.pauseReadingForTesting(false)
        #expect(waitUntil(10) { watcher.statistics.overflows > 0 }, "no overflow (queue limit \(limit))")
        #expect(waitUntil(10) { follower?.followedSandboxes == [root + "/late"] }, "followed: \(follower?.followedSandboxes ?? [])")
        #expect(watcher.watchedVolumes(in: "early").isEmpty, "the sandbox cleaned up during the overflow is dropped")
        #expect(waitUntil(10) { watcher.watchedVolumes(in: "late").count == 1 }, "the sandbox prepared during the overflow is followed")
        late.write(["key": "late-1"])
        #expect(waitUntil(20) { readFile(lateGuest + "/key") == "late-1" }, "the late sandbox's update reached the guest")

        // Dropping the follower ends its observations: a sandbox prepared now is not followed.
        follower = nil
        _ = try share("after")
        usleep(300_000)
        #expect(watcher.watchedVolumes(in: "after").isEmpty, "a dropped follower still followed the root")
    }
}
