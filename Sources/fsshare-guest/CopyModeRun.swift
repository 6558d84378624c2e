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

/// Copy mode over virtio-serial: a guest with no shared filesystem, a configmap volume copied in
/// through the agent channel, then kubelet-style atomic updates mirrored by the watcher while a
/// reader loop inside the guest checks that `..data` never dangles and no read is torn.
struct CopyModeRun {
    let dir: String
    let image: GuestImage
    let checks: Checks
    let narrate: Bool
    let updates: Int

    func run() {
        let n = Narrator(on: narrate)
        let config = SharerConfiguration(root: FilePath(dir + "/sandboxes"), sharedFilesystem: .none, shmSize: 64 << 20)
        n.step("copy mode: a guest with no shared filesystem, the agent channel on virtio-serial")
        guard let guest = checks.must("copy: start QEMU", { try QEMUGuest(image: image, share: .none, workDir: FilePath(dir + "/vm")) }) else { return }
        defer { guest.stop() }
        guard let boot = checks.must("copy: the guest agent answers", { try guest.waitForAgent(timeout: .seconds(120)) }) else {
            print(QEMUGuest.tail(guest.consoleLog))
            return
        }
        figure("copy.boot", ms(boot))
        n.say("guest up in \(ms(boot))")
        let agent = AgentClient(address: guest.agentAddress, callTimeout: .seconds(30))
        let probe = GuestCheckClient(address: guest.checkAddress, callTimeout: .seconds(60))
        let watcher = VolumeWatcher()
        guard checks.must("copy: start the watcher", { try watcher.start() }) != nil else { return }
        defer { watcher.stop() }
        let sandbox = "pod-copy"
        guard let sharer = checks.must("copy: create the sharer", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config, agent: agent, watcher: watcher) }) else { return }
        guard checks.must("copy: prepare", { try sharer.prepareSync() }) != nil else { return }
        _ = checks.must("copy: CreateSandbox (shm only: no shared filesystem)") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }

        // Round trip of the check channel, to read the latency figures against.
        var rtts: [UInt64] = []
        for _ in 0..<20 {
            let t0 = Sys.monotonicNanoseconds()
            _ = try? probe.probe(.stat, "/")
            rtts.append(Sys.monotonicNanoseconds() - t0)
        }
        let rtt = percentile(rtts, 50)
        figure("copy.check-rtt.median", ms(rtt))

        // A configmap volume, kubelet layout, shared after boot.
        let kubelet = KubeletEmulator(root: dir + "/kubelet", plugin: "configmap", name: "app-config")
        func payload(_ version: Int) -> [String: String] {
            ["app.conf": "version=\(version)\nlog_level=info\n", "feature-flags": "flags-\(version)\n", "db.url": "postgres://db-\(version)/app\n"]
        }
        kubelet.write(payload(0))
        let web = Container(id: "web", rootfs: .guestPull(image: "registry.example/web:1"))
        let mount = Mount(source: FilePath(kubelet.volume), destination: "/etc/app", options: ["ro"])
        n.step("Share a configmap volume: copied into the guest over the agent channel")
        guard let shared = checks.must("copy: share the configmap volume", { try sharer.shareFileSync(container: web, mount: mount) }), let shared else { return }
        let guestDir = shared.guestPath
        n.say("  \(kubelet.volume) -> guest \(guestDir) (\(shared.copyReport.map { "\($0.files) files, \($0.bytes) bytes" } ?? "no report"))")
        for (key, content) in payload(0).sorted(by: { $0.key < $1.key }) {
            let seen = try? probe.read(guestDir + "/" + key)
            checks.check(seen == content, "copy: the guest reads \(key) through its ..data link")
            n.say("  guest \(guestDir)/\(key): \(seen?.trimmingNewline.replacingNewlines ?? "missing")")
        }
        let link = try? probe.probe(.stat, guestDir + "/..data")
        checks.check(link.map { ($0.mode & UInt32(S_IFMT)) == UInt32(S_IFLNK) } == true, "copy: ..data is a symlink in the guest, as kubelet made it")

        // Updates: a reader loop in the guest, the atomic-writer swap on the host.
        n.step("Update the configmap \(updates) times (kubelet's atomic ..data swap); a reader loop runs in the guest")
        var latencies: [UInt64] = []
        var estimates: [UInt64] = []
        var dangling: UInt64 = 0, torn: UInt64 = 0, passes: UInt64 = 0, missed = 0
        for version in 1...updates {
            let expect = payload(version)
            let reply = Mutex<(Fsshare_WatchContentResponse?, UInt64)>((nil, 0))
            let sent = Sys.monotonicNanoseconds()
            guard let thread = try? OSThread({
                let r = try? probe.watchContent(dir: guestDir, expect: expect, timeout: .seconds(20))
                let at = Sys.monotonicNanoseconds()
                reply.withLock { $0 = (r, at) }
            }) else { checks.check(false, "copy: start a reader thread"); return }
            // Let the request reach the guest and its loop start before the update.
            usleep(UInt32(max(30_000, 3 * rtt / 1000)))
            let published = kubelet.write(expect)
            thread.join()
            let (response, arrived) = reply.withLock { $0 }
            guard let response, response.matched else {
                missed += 1
                checks.check(false, "copy: update \(version) reached the guest (\(response?.detail ?? "no reply"))")
                continue
            }
            dangling += response.dangling
            torn += response.torn
            passes += response.passes
            // Upper bound: from the rename to the reply's arrival (includes the reply's trip).
            latencies.append(arrived - published)
            // Estimate: the guest's own match time, placed on the host clock by the request's
            // send time plus half a round trip.
            let matchedAt = sent + rtt / 2 + response.elapsedNs
            estimates.append(matchedAt > published ? matchedAt - published : 0)
        }
        checks.check(missed == 0, "copy: every one of \(updates) updates reached the guest")
        checks.check(dangling == 0, "copy: the guest reader never saw a dangling ..data or a missing key (\(passes) passes)")
        checks.check(torn == 0, "copy: the guest reader never saw old and new keys through one ..data")
        if !latencies.isEmpty {
            figure("copy.update-latency.median", ms(percentile(latencies, 50)))
            figure("copy.update-latency.p99", ms(percentile(latencies, 99)))
            figure("copy.update-latency-estimate.median", ms(percentile(estimates, 50)))
            figure("copy.reader-passes", "\(passes)")
            n.say("  rename on the host -> new content in the guest: median \(ms(percentile(latencies, 50))), p99 \(ms(percentile(latencies, 99))) (upper bound, incl. the reply's trip; estimate without it: median \(ms(percentile(estimates, 50))))")
            n.say("  the guest reader made \(passes) passes: \(dangling) saw a dangling ..data, \(torn) saw a torn update")
        }

        // Unshare removes the copy from the guest; cleanup leaves nothing.
        _ = checks.must("copy: unshare the volume") { try sharer.unshareFileSync(container: web, mount: mount) }
        let gone = try? probe.await(.stat, guestDir, timeout: .seconds(10)) { $0.errno == ENOENT }
        checks.check(gone?.0.errno == ENOENT, "copy: after unshare the guest copy is gone (\(gone?.0.description ?? "no answer"))")
        _ = checks.must("copy: cleanup") { try sharer.cleanupSync() }
        let left = (try? Sys.listDirectory(nil, config.root).map(\.name)) ?? []
        checks.check(left.isEmpty, "copy: nothing left in the root (\(left))")
    }
}

/// Nearest-rank percentile (p in 1...100).
func percentile(_ values: [UInt64], _ p: Int) -> UInt64 {
    guard !values.isEmpty else { return 0 }
    let sorted = values.sorted()
    let rank = max(1, (sorted.count * p + 99) / 100)
    return sorted[min(sorted.count, rank) - 1]
}

extension String {
    var replacingNewlines: String { split(separator: "\n").joined(separator: " | ") }
}
