#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import FSShareVM
import Synchronization
import SystemPackage

/// Watched volumes with a shared filesystem (virtio-fs, Kata's default `cache=auto`): a configmap
/// shared with its `watchable-bind` storage, mirrored by the agent into a guest tmpfs, then
/// kubelet updates pushed by the watcher. Inside the guest an inotify listener and a reader loop
/// run on the mirror and, side by side, on the plain share: the mirror must raise
/// `IN_MOVED_TO ..data` for every update with nothing dangling or torn; the plain share shows why
/// the mirror exists.
struct WatchableRun {
    let dir: String
    let image: GuestImage
    let checks: Checks
    let narrate: Bool
    let updates: Int

    func run() {
        let n = Narrator(on: narrate)
        let root = dir + "/sandboxes"
        let config = SharerConfiguration(root: FilePath(root), sharedFilesystem: .virtioFS(), shmSize: 64 << 20)
        let sandbox = "pod-watchable"
        n.step("watchable: a virtio-fs guest; a configmap gets Kata's watchable-bind mirror, kept by the host's watcher")
        let watcher = VolumeWatcher()
        guard checks.must("watchable: start the watcher", { try watcher.start() }) != nil else { return }
        defer { watcher.stop() }
        // The sharer learns the agent once the VM is up; prepare first (the export must exist).
        guard let preparer = checks.must("watchable: create the sharer", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config) }) else { return }
        guard checks.must("watchable: prepare", { try preparer.prepareSync() }) != nil else { return }
        guard let guest = checks.must("watchable: start QEMU with virtio-fs", {
            try QEMUGuest(image: image, share: .virtioFS(source: preparer.layout.sharedDirectory, tag: config.mountTag), workDir: FilePath(dir + "/vm"))
        }) else {
            _ = try? preparer.cleanupSync()
            return
        }
        var stopped = false
        defer { if !stopped { guest.stop() } }
        guard let boot = checks.must("watchable: the guest agent answers", { try guest.waitForAgent(timeout: .seconds(120)) }) else {
            print(QEMUGuest.tail(guest.consoleLog))
            _ = try? preparer.cleanupSync()
            return
        }
        figure("watchable.boot", ms(boot))
        let agent = AgentClient(address: guest.agentAddress, callTimeout: .seconds(30))
        let probe = GuestCheckClient(address: guest.checkAddress, callTimeout: .seconds(60))
        guard let sharer = checks.must("watchable: a sharer with the agent and the watcher", {
            try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config, agent: agent, watcher: watcher)
        }) else { return }
        _ = checks.must("watchable: CreateSandbox") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }

        var rtts: [UInt64] = []
        for _ in 0..<20 {
            let t0 = Sys.monotonicNanoseconds()
            _ = try? probe.probe(.stat, "/")
            rtts.append(Sys.monotonicNanoseconds() - t0)
        }
        let rtt = percentile(rtts, 50)

        let kubelet = KubeletEmulator(root: dir + "/kubelet", plugin: "configmap", name: "proxy-config")
        func payload(_ version: Int) -> [String: String] {
            ["envoy.yaml": "version: \(version)\nlisteners: []\n", "routes": "route-\(version)\n", "tls.mode": "strict-\(version)\n"]
        }
        kubelet.write(payload(0))
        let web = Container(id: "web", rootfs: .guestPull(image: "registry.example/envoy:1"))
        let mount = Mount(source: FilePath(kubelet.volume), destination: "/etc/envoy", options: ["ro"])
        n.step("Share the configmap: the plain share plus a watchable-bind storage")
        guard let shared = checks.must("watchable: share the configmap", { try sharer.shareFileSync(container: web, mount: mount) }), let shared else { return }
        let name = String(shared.guestPath.split(separator: "/").last ?? "")
        let plain = sharer.layout.guestPath(name)
        let mirror = shared.guestPath
        checks.check(mirror == Storages.joinGuest(config.guestSharedDir, "watchable", name), "watchable: the container's path is the mirror under containers/watchable/ (\(mirror))")
        let storage = shared.volumeStorages.first
        checks.check(shared.volumeStorages.count == 1 && storage?.driver == "watchable-bind" && storage?.fstype == "bind"
                     && storage?.source == plain && storage?.mountPoint == mirror && storage?.options == ["ro"],
                     "watchable: one Storage{watchable-bind, source: the plain share, fstype: bind, the OCI options, mount_point: the mirror} (\(shared.volumeStorages))")
        for s in shared.volumeStorages { n.say("  Storage{driver: \(s.driver), source: \(s.source), fstype: \(s.fstype), options: \(s.options), mount_point: \(s.mountPoint)}") }
        checks.check(LinuxFilesystemSharer.recorded(root: config.root, sandboxID: sandbox)?.agent == guest.agentAddress.description,
                     "watchable: the manifest records the agent for the node's watcher")
        _ = checks.must("watchable: CreateContainer with the storage") { try agent.createContainer(id: web.id, storages: shared.volumeStorages) }
        let rootMount = (try? probe.probe(.mounts, Storages.joinGuest(config.guestSharedDir, "watchable")).names) ?? []
        checks.check(rootMount.first?.contains(" tmpfs ") == true, "watchable: the agent mounted a tmpfs at containers/watchable (\(rootMount))")
        for (key, content) in payload(0) {
            let seen = try? probe.await(.read, mirror + "/" + key, timeout: .seconds(10)) { $0.errno == 0 && $0.text == content }
            checks.check(seen?.0.text == content, "watchable: the mirror has \(key) at once")
        }
        let fstype = try? probe.probe(.fstype, mirror + "/routes").text
        checks.check(fstype == "tmpfs", "watchable: the mirror's keys are on the tmpfs (\(fstype ?? "?"))")
        checks.mustFail("watchable: a second CreateContainer of the same container is refused") {
            try agent.createContainer(id: web.id, storages: shared.volumeStorages)
        }

        n.step("Update the configmap \(updates) times per view; in the guest, inotify and a reader on the mirror, then on the plain share")
        struct Tally {
            var latencies: [UInt64] = [], eventLatencies: [UInt64] = []
            var events: UInt64 = 0, dataEvents: UInt64 = 0, missedEvents = 0
            var dangling: UInt64 = 0, torn: UInt64 = 0, passes: UInt64 = 0, missing = 0, late = 0
        }
        // One view at a time: the check channel is one virtio-serial port, served one request
        // after the other.
        var version = 0
        // An update whose request reached the guest after the change (TCG under load) cannot
        // show its event: it is counted as late and another update is made in its place.
        func measure(_ path: String) -> Tally {
            var t = Tally()
            var conclusive = 0
            var attempts = 0
            while conclusive < updates && attempts < updates * 2 {
                attempts += 1
                version += 1
                let expect = payload(version)
                let reply = Mutex<Fsshare_WatchContentResponse?>(nil)
                let sent = Sys.monotonicNanoseconds()
                guard let thread = try? OSThread({
                    let r = try? probe.watchContent(dir: path, expect: expect, timeout: .seconds(20), inotify: true)
                    reply.withLock { $0 = r }
                }) else { continue }
                usleep(UInt32(max(100_000, 3 * rtt / 1000)))
                let published = kubelet.write(expect)
                thread.join()
                guard let r = reply.withLock({ $0 }), r.matched else {
                    t.missing += 1
                    conclusive += 1
                    continue
                }
                if r.late {
                    t.late += 1
                    continue
                }
                conclusive += 1
                let at = { (ns: UInt64) -> UInt64 in
                    let when = sent + rtt / 2 + ns
                    return when > published ? when - published : 0
                }
                t.dangling += r.dangling
                t.torn += r.torn
                t.passes += r.passes
                t.events += r.events
                t.dataEvents += r.dataMovedEvents
                if r.dataMovedEvents == 0 {
                    t.missedEvents += 1
                    if path == mirror { print("watchable: update \(version) on the mirror: \(r.detail) (pass \(r.passes))") }
                }
                t.latencies.append(at(r.elapsedNs))
                if r.firstDataMovedNs > 0 { t.eventLatencies.append(at(r.firstDataMovedNs)) }
            }
            return t
        }
        let m = measure(mirror)
        checks.check(m.missing == 0, "watchable: every one of \(updates) updates reached the mirror (\(updates - m.missing))")
        checks.check(m.missedEvents == 0 && m.missing == 0, "watchable: guest inotify saw IN_MOVED_TO ..data on the mirror for every update (\(updates - m.missedEvents - m.missing) of \(updates))")
        checks.check(m.dangling == 0, "watchable: the mirror's reader never saw a dangling ..data or a missing key (\(m.passes) passes)")
        checks.check(m.torn == 0, "watchable: the mirror's reader never saw old and new keys through one ..data")
        let p = measure(plain)
        figure("watchable.mirror.inotify", "IN_MOVED_TO ..data for \(updates - m.missedEvents - m.missing) of \(updates) updates (\(m.events) events in all); reader: \(m.passes) passes, \(m.dangling) dangling, \(m.torn) torn; \(m.late) updates beat the listener and were redone")
        figure("watchable.plain.inotify", "IN_MOVED_TO ..data for \(updates - p.missedEvents - p.missing) of \(updates) updates (\(p.events) events in all); reader: \(p.passes) passes, \(p.dangling) dangling, \(p.torn) torn, \(p.missing) never seen within 20 s")
        for (label, t) in [("mirror", m), ("plain", p)] {
            if !t.eventLatencies.isEmpty {
                figure("watchable.\(label).event-latency.median", ms(percentile(t.eventLatencies, 50)))
                figure("watchable.\(label).event-latency.p99", ms(percentile(t.eventLatencies, 99)))
            }
            if !t.latencies.isEmpty {
                figure("watchable.\(label).content-latency.median", ms(percentile(t.latencies, 50)))
                figure("watchable.\(label).content-latency.p99", ms(percentile(t.latencies, 99)))
            }
        }
        n.say("  mirror: IN_MOVED_TO ..data for \(updates - m.missedEvents - m.missing) of \(updates) updates; plain share: \(p.events) events")

        n.step("RemoveContainer drops the mirror; unshare, DestroySandbox, cleanup")
        _ = checks.must("watchable: RemoveContainer") { try agent.removeContainer(id: web.id) }
        let gone = try? probe.await(.stat, mirror, timeout: .seconds(10)) { $0.errno == ENOENT }
        checks.check(gone?.0.errno == ENOENT, "watchable: after RemoveContainer the mirror is gone (\(gone?.0.description ?? "no answer"))")
        _ = checks.must("watchable: unshare") { try sharer.unshareFileSync(container: web, mount: mount) }
        checks.check(!watcher.watchedVolumes.contains { $0.hasPrefix(sandbox + "/") }, "watchable: unshare stopped the watcher mirroring it")
        _ = checks.must("watchable: DestroySandbox") { try agent.destroySandbox() }
        agent.disconnect()
        probe.client.disconnect()
        guest.stop()
        stopped = true
        _ = checks.must("watchable: cleanup") { try sharer.cleanupSync() }
        let left = (try? Sys.listDirectory(nil, FilePath(root)).map(\.name)) ?? []
        checks.check(left.isEmpty, "watchable: nothing left in the root (\(left))")
    }
}
