#if canImport(Glibc)
import Glibc
#endif
@_spi(Testing) import FSShare
import FSShareAgentChannel
import FSShareSystem
import FSShareTestSupport
import Synchronization
import SystemPackage
import Testing

/// The volume watcher against a real agent, with a kubelet emulator writing real files. No
/// test changes a host setting (the overflow is provoked by not reading the queue).
@Suite(.serialized) struct WatcherTests {
    final class Lines: Sendable {
        let lines = Mutex<[String]>([])
        func add(_ s: String) { lines.withLock { $0.append(s) } }
        var all: [String] { lines.withLock { $0 } }
    }

    func rig(_ name: String, limits: WatchLimits = WatchLimits(), plugin: String = "configmap", lines: Lines = Lines()) throws -> (AgentUnderTest, KubeletEmulator, VolumeWatcher, String) {
        let base = TestEnvironment.scratch(name)
        let agent = try AgentUnderTest(base)
        let kubelet = KubeletEmulator(root: base + "/kubelet", plugin: plugin)
        let watcher = VolumeWatcher(limits: limits, logger: .lines { lines.add($0) })
        return (agent, kubelet, watcher, agent.shareDir + "/c1-0123456789abcdef-cfg")
    }

    @Test func updatesKeysNestedPathsAndDeletion() throws {
        let lines = Lines()
        let (agent, kubelet, watcher, guest) = try rig("watch-updates", plugin: "projected", lines: lines)
        kubelet.write(["a": "1", "b": "2"])
        try watcher.start()
        try watcher.start()  // idempotent
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "c1-0123456789abcdef-cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client())
        #expect(waitForMirror(host: kubelet.volume, guest: guest) == nil)
        let steps: [[String: String]] = [
            ["a": "1b", "b": "2"],                          // content change
            ["a": "1b", "b": "2", "c": "3"],                // key added
            ["a": "1b", "c": "3"],                          // key removed
            ["a": "x", "dir/nested/deep": "n1", "dir/other": "n2"],  // projected items with a/b paths
            ["dir/nested/deep": "n2"],                      // nested change, keys removed
            [:],                                            // empty volume
            ["z": "back"],
        ]
        for (i, payload) in steps.enumerated() {
            kubelet.write(payload)
            let diff = waitForMirror(host: kubelet.volume, guest: guest)
            #expect(diff == nil, "step \(i): \(diff ?? "")")
        }
        // The guest keeps the timestamped dir ..data names and the one it named before (for a
        // reader that resolved ..data just before the switch); older ones and deleted keys are
        // pruned (the sync's last step, after the new content is visible: wait for it).
        func timestampDirs() -> Int { snapshot(guest)?.keys.filter { $0.hasPrefix("..2026") && !$0.contains("/") }.count ?? -1 }
        for _ in 0..<500 where timestampDirs() > 2 { usleep(10_000) }
        #expect((1...2).contains(timestampDirs()), "\(timestampDirs()) timestamped directories in the guest")
        #expect(watcher.statistics.inotifyInstances == 1)
        // A key link gone while its data is still behind ..data (rm -rf of the volume is under
        // way): not a removed key, the guest keeps it.
        let syncsBefore = watcher.statistics.syncs
        #expect(unlink(kubelet.volume + "/z") == 0)
        for _ in 0..<400 where watcher.statistics.syncs == syncsBefore { usleep(5_000) }
        #expect(watcher.statistics.syncs > syncsBefore)
        #expect(snapshot(guest)?["z"] == "l:..data/z")
        // The volume is deleted: mirroring stops with a reason, the guest copy stays.
        _ = Sys.run(["rm", "-rf", kubelet.volume])
        for _ in 0..<200 where watcher.statistics.watchedVolumes > 0 { usleep(10_000) }
        #expect(watcher.statistics.watchedVolumes == 0)
        #expect(watcher.statistics.stopped["s1/c1-0123456789abcdef-cfg"]?.contains("went away") == true)
        #expect(snapshot(guest)?["z"] == "l:..data/z")
        watcher.stop()
        watcher.stop()  // idempotent
        #expect(watcher.statistics.inotifyInstances == 0)
        #expect(lines.all.contains { $0.contains("synced") })
    }

    /// One configmap mounted into two containers: the same directory under two keys, each with
    /// its own guest copy, both kept in sync; unwatching one leaves the other mirrored. (Before,
    /// the second registration was refused and its guest copy went stale.)
    @Test func oneDirectoryUnderTwoKeys() throws {
        let (agent, kubelet, watcher, guest) = try rig("watch-two-keys")
        let second = guest + "-second"
        kubelet.write(["a": "1"])
        try watcher.start()
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "web-cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client())
        try watcher.watch(sandboxID: "s1", name: "sidecar-cfg", volume: FilePath(kubelet.volume), guestPath: second, agent: agent.client())
        #expect(watcher.watchedVolumes(in: "s1") == ["sidecar-cfg", "web-cfg"])
        kubelet.write(["a": "2", "b": "3"])
        #expect(waitForMirror(host: kubelet.volume, guest: guest) == nil, "the first copy")
        #expect(waitForMirror(host: kubelet.volume, guest: second) == nil, "the second copy")
        watcher.unwatch(sandboxID: "s1", name: "web-cfg")
        kubelet.write(["a": "4"])
        #expect(waitForMirror(host: kubelet.volume, guest: second) == nil, "the second copy after the first was unwatched")
        #expect(readFile(guest + "/a") == "2", "the unwatched copy is left as it was")
        watcher.unwatch(sandboxID: "s1", name: "sidecar-cfg")
        #expect(watcher.watchedVolumes.isEmpty)
    }

    /// 1,000 rapid kubelet updates while a reader in the guest dir checks, continuously, that
    /// `..data` never dangles, no key is ever missing, and no file is ever torn.
    @Test func readerNeverSeesAnInconsistentGuest() throws {
        let lines = Lines()
        let (agent, kubelet, watcher, guest) = try rig("watch-rapid", lines: lines)
        let keys = (0..<5).map { "key\($0)" }
        func payload(_ v: Int) -> [String: String] {
            Dictionary(uniqueKeysWithValues: keys.map { ($0, "v\(v)-" + String(repeating: "x", count: 2000 + v % 7) + "-END") })
        }
        kubelet.write(payload(0))
        try watcher.start()
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client())
        try #require(waitForMirror(host: kubelet.volume, guest: guest) == nil)

        let reader = try VolumeReader(dir: guest, keys: keys) { $0.hasPrefix("v") && $0.hasSuffix("-END") }
        for v in 1...1000 { kubelet.write(payload(v)) }
        let diff = waitForMirror(host: kubelet.volume, guest: guest, seconds: 20)
        let seen = reader.finish()
        #expect(diff == nil, "\(diff ?? "")")
        #expect(seen.missing.isEmpty && seen.torn.isEmpty, "\(seen.missing.count) missing, \(seen.torn.count) torn, first: \(seen.missing.prefix(3)) \(seen.torn.prefix(3))")
        #expect(seen.passes > 100, "the reader must actually have raced the updates")
        print("watcher: 1000 updates, \(watcher.statistics.syncs) syncs (coalesced), \(watcher.statistics.failedSyncs) failed, \(seen.passes) guest reads, 0 inconsistent")
    }

    /// The reader the tests rely on does fail: a dangling `..data` and a torn key are seen.
    @Test func volumeReaderCatchesDanglingAndTorn() throws {
        let dir = TestEnvironment.scratch("volume-reader")
        mkdirs(dir + "/..ts")
        writeFile(dir + "/..ts/k", "v1-partial")
        #expect(symlink("..gone", dir + "/..data") == 0)
        #expect(symlink("..ts/k", dir + "/k") == 0)
        let reader = try VolumeReader(dir: dir, keys: ["k"]) { $0.hasPrefix("v") && $0.hasSuffix("-END") }
        for _ in 0..<200 { usleep(1_000) }
        let seen = reader.finish()
        #expect(seen.passes > 0 && !seen.missing.isEmpty && !seen.torn.isEmpty, "\(seen)")
    }

    @Test func queueOverflowTriggersFullResync() throws {
        let lines = Lines()
        let (agent, kubelet, watcher, guest) = try rig("watch-overflow", lines: lines)
        kubelet.write(["a": "1"])
        try watcher.start()
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client())
        try #require(waitForMirror(host: kubelet.volume, guest: guest) == nil)
        // A real IN_Q_OVERFLOW, with no host setting touched: the reader stops reading, the
        // volume gets more events than the kernel queues (fs.inotify.max_queued_events), and a
        // real update is hidden among them.
        let limit = Int(Sys.run(["cat", "/proc/sys/fs/inotify/max_queued_events"]).output.filter(\.isNumber)) ?? 16384
        watcher.pauseReadingForTesting(true)
        kubelet.write(["a": "hidden", "b": "2"])
        // The reader may take one more read (64 KiB, ~2,000 events) before it sees the pause:
        // 8,192 events of margin past the queue's limit.
        for i in 0...(limit / 2 + 4096) {
            let path = kubelet.volume + "/flood\(i)"
            close(open(path, O_CREAT | O_WRONLY, 0o644))
            unlink(path)
        }
        watcher.pauseReadingForTesting(false)
        for _ in 0..<500 where watcher.statistics.overflows == 0 { usleep(10_000) }
        #expect(watcher.statistics.overflows > 0, "no overflow after \(limit / 2 + 4097) create/unlink pairs (queue limit \(limit))")
        #expect(waitForMirror(host: kubelet.volume, guest: guest) == nil, "the update lost in the overflow was resynced")
        // The log line follows the count (written after the watcher's lock is released).
        for _ in 0..<500 where !lines.all.contains(where: { $0.contains("overflowed") }) { usleep(10_000) }
        #expect(lines.all.contains { $0.contains("overflowed") })
    }

    @Test func agentRestartedMidSync() throws {
        let (agent, kubelet, watcher, guest) = try rig("watch-restart")
        kubelet.write(["a": "1", "b": "1"])
        try watcher.start()
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client(timeout: .seconds(2)))
        try #require(waitForMirror(host: kubelet.volume, guest: guest) == nil)
        // Updates stream in; the agent dies in the middle of them and comes back.
        for v in 2..<40 {
            kubelet.write(["a": "\(v)", "b": "\(v)", "c\(v % 3)": "x"])
            if v == 10 { agent.kill() }
            if v == 25 { try agent.start() }
        }
        // The last update may have failed while the agent was down: the watcher retries on its own.
        #expect(waitForMirror(host: kubelet.volume, guest: guest, seconds: 15) == nil)
        #expect(watcher.statistics.failedSyncs > 0, "the outage must have been seen")
    }

    @Test func volumeOverTheLimitStopsWithAReason() throws {
        let (agent, kubelet, watcher, guest) = try rig("watch-limit", limits: WatchLimits(maxEntries: 5, maxBytes: 1 << 20))
        kubelet.write(["a": "1"])
        try watcher.start()
        defer { watcher.stop() }
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: agent.client())
        try #require(waitForMirror(host: kubelet.volume, guest: guest) == nil)
        let before = snapshot(guest)
        kubelet.write(Dictionary(uniqueKeysWithValues: (0..<10).map { ("k\($0)", "v") }))
        for _ in 0..<300 where watcher.statistics.stopped.isEmpty { usleep(10_000) }
        let reason = watcher.statistics.stopped["s1/cfg"] ?? ""
        #expect(reason.contains("over the watch limits"), "\(reason)")
        // The fallback keeps the last complete content in the guest.
        #expect(snapshot(guest) == before)
    }

    @Test func kubeletVolumePathsAreRecognised() {
        #expect(KubeletVolume.match("/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/cfg")?.name == "cfg")
        #expect(KubeletVolume.match("/k0s/kubelet/pods/u/volumes/kubernetes.io~downward-api/info")?.plugin == "kubernetes.io~downward-api")
        #expect(KubeletVolume.match("/x/volumes/kubernetes.io~projected/kube-api-access-1/")?.name == "kube-api-access-1")
        #expect(KubeletVolume.match("/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/scratch") == nil)
        #expect(KubeletVolume.match("/srv/data") == nil)
    }

    /// The share path's quick pre-check finds the plugin marker wherever it is, exactly when a
    /// plain substring search does (at the start, at the end, after a near miss, in non-ASCII).
    @Test func kubeletMarkerPreCheckAgreesWithSubstringSearch() {
        let cases = [
            "kubernetes.io~", "kubernetes.io", "/v/kubernetes.io~configmap/x", "/v/kubernetes.io~", "kubernetes.io~x",
            "/kubernetes.io/kubernetes.io~secret", "/kkubernetes.io~", "/kubernetes.iokubernetes.io~", "", "/", "k",
            "/übernetes/kubernetes.io~projected/é", "/übernetes.io~", String(repeating: "kubernetes.io", count: 40) + "~",
            String(repeating: "kubernetes.i", count: 40),
        ]
        for path in cases {
            #expect(KubeletVolume.mayName(path) == path.contains("kubernetes.io~"), "\(path)")
        }
    }
}
