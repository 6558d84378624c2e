#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import FSShareTestSupport
import SystemPackage
import Testing

/// Copy mode end to end through the `fsshare` CLI and a real agent: `share --agent`, `unshare`,
/// and the long-running `fsshare watch` (restart, manifest follow, clean SIGTERM).
@Suite struct CopyModeCLITests {
    let fsshare = TestEnvironment.product("fsshare")

    /// Runs fsshare commands in a private mount namespace (prepare makes mounts).
    func inNamespace(_ script: String) -> (status: Int32, output: String) {
        Sys.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-ec", script])
    }

    /// Peak RSS (KiB) of one command of a namespace script, measured by GNU time forked from
    /// the shell: a child of this test runner would inherit the runner's high-water mark.
    func peakRSS(_ command: String, file: String) -> (status: Int32, output: String, kib: Int) {
        let r = inNamespace("/usr/bin/time -f %M -o \(file) \(command)")
        let kib = Int(Sys.run(["cat", file]).output.split(separator: "\n").last.map(String.init) ?? "") ?? -1
        return (r.status, r.output, kib)
    }

    @Test func shareCopiesStreamingAndUnshareRemoves() throws {
        guard TestEnvironment.canMount else { return }
        let base = TestEnvironment.scratch("cli-copy")
        let agent = try AgentUnderTest(base)
        let root = base + "/root"
        let big = base + "/big.bin"
        // 100 MiB of non-zero data.
        #expect(Sys.run(["sh", "-c", "head -c 104857600 /dev/urandom > \(big)"]).status == 0)
        let common = "--root \(root) --sandbox s1 --agent unix:\(agent.socket) --guest-shared-dir \(agent.shareDir)"
        let small = base + "/small.bin"
        #expect(Sys.run(["sh", "-c", "head -c 1048576 /dev/urandom > \(small)"]).status == 0)
        // The baseline: the same command copying one chunk, measured in this run.
        let prepared = inNamespace("\(fsshare) prepare --root \(root) --sandbox s1 --shared-fs none")
        try #require(prepared.status == 0, "\(prepared.output)")
        let baseline = peakRSS("\(fsshare) share \(common) --container c1 --source \(small) --destination /data/small.bin", file: base + "/rss-small")
        try #require(baseline.status == 0 && baseline.kib > 0, "\(baseline.output)")
        let r = peakRSS("\(fsshare) share \(common) --container c1 --source \(big) --destination /data/big.bin", file: base + "/rss-big")
        try #require(r.status == 0 && r.kib > 0, "\(r.output)")
        let guestPath = String(r.output.split(separator: "\n")[0])
        #expect(guestPath.hasPrefix(agent.shareDir + "/c1-"))
        #expect(Sys.run(["cmp", big, guestPath]).status == 0, "the guest copy must equal the source")
        // Streaming: peak memory grows far less than the file (chunks of 1 MiB, one in flight);
        // holding the file would add at least 100 MiB over the one-chunk baseline.
        let growth = r.kib - baseline.kib
        print("copy mode: 100 MiB file copied with a peak RSS of \(r.kib / 1024) MiB (1 MiB file: \(baseline.kib / 1024) MiB)")
        #expect(growth < 16 * 1024, "peak RSS \(r.kib) KiB, \(growth) KiB over the 1 MiB copy")

        // Sharing again copies nothing; a directory with a socket and an absolute link skips both with reasons.
        let tree = base + "/tree"
        _ = Sys.run(["sh", "-c", "mkdir -p \(tree)/sub && echo hi > \(tree)/sub/f && ln -s /etc/passwd \(tree)/abs && ln -s sub/f \(tree)/rel && python3 -c \"import socket;s=socket.socket(socket.AF_UNIX);s.bind('\(tree)/sock')\""])
        let again = inNamespace("""
            \(fsshare) share \(common) --container c1 --source \(big) --destination /data/big.bin
            \(fsshare) share \(common) --container c1 --source \(tree) --destination /tree
            """)
        try #require(again.status == 0, "\(again.output)")
        let lines = again.output.split(separator: "\n").map(String.init)
        #expect(lines[0] == guestPath && !lines[1].hasPrefix("copied"), "a second share must not copy again: \(again.output)")
        #expect(again.output.contains("copied 1 files, 2 directories, 1 symlinks"), "\(again.output)")
        #expect(again.output.contains("skipped \(tree)/abs: symlink to the absolute path /etc/passwd"))
        #expect(again.output.contains("skipped \(tree)/sock: a socket cannot be copied"))
        let treeGuest = lines.first { $0.hasSuffix("-tree") } ?? ""
        #expect(snapshot(treeGuest) == ["sub": "d", "sub/f": "f:hi\n", "rel": "l:sub/f"])

        // The sandbox recorded its agent and guest directory: status says copy mode, and unshare
        // needs no flags to remove the copy from the guest.
        let status = inNamespace("\(fsshare) status --root \(root)")
        #expect(status.output.contains("sandbox s1: prepared (copy mode, agent unix:\(agent.socket))"), "\(status.output)")
        let bare = inNamespace("\(fsshare) unshare --root \(root) --sandbox s1 --container c1 --destination /tree")
        #expect(bare.status == 0 && bare.output.contains("unshared"), "\(bare.output)")
        #expect(access(treeGuest, F_OK) != 0, "unshare without --agent removed the guest copy")

        // Unshare removes the guest copy; so does cleanup of what is left on the host.
        let un = inNamespace("""
            \(fsshare) unshare \(common) --container c1 --destination /data/big.bin
            \(fsshare) unshare \(common) --container c1 --destination /data/small.bin
            \(fsshare) unshare \(common) --container c1 --destination /tree
            \(fsshare) unshare \(common) --container c1 --destination /tree
            \(fsshare) cleanup --root \(root) --sandbox s1
            """)
        #expect(un.status == 0, "\(un.output)")
        #expect(access(guestPath, F_OK) != 0 && access(treeGuest, F_OK) != 0)
        #expect(Sys.run(["find", root, "-mindepth", "1"]).output.isEmpty)
    }

    @Test func watchCommandFollowsTheManifestAndResyncsAfterRestart() throws {
        guard TestEnvironment.canMount else { return }
        let base = TestEnvironment.scratch("cli-watch")
        let agent = try AgentUnderTest(base)
        let root = base + "/root"
        let kubelet = KubeletEmulator(root: base + "/var/lib/kubelet", plugin: "secret", name: "token")
        kubelet.write(["token": "t1", "ca.crt": "ca1"])
        let common = "--root \(root) --sandbox s1 --agent unix:\(agent.socket) --guest-shared-dir \(agent.shareDir)"
        let shared = inNamespace("""
            \(fsshare) prepare --root \(root) --sandbox s1 --shared-fs none >/dev/null
            \(fsshare) share \(common) --container c1 --source \(kubelet.volume) --destination /var/run/secrets/token
            """)
        try #require(shared.status == 0, "\(shared.output)")
        let guest = String(shared.output.split(separator: "\n")[0])
        #expect(waitForMirror(host: kubelet.volume, guest: guest, seconds: 1) == nil, "the share itself copies the volume")

        let log = base + "/watch.log"
        var watch = try ChildProcess([fsshare, "watch", "--root", root, "--sandbox", "s1", "--agent", "unix:\(agent.socket)"], logPath: log)
        kubelet.write(["token": "t2", "ca.crt": "ca1"])
        #expect(waitForMirror(host: kubelet.volume, guest: guest) == nil, Comment(rawValue: Sys.run(["cat", log]).output))

        // A volume shared while the watcher runs is picked up from the manifest.
        let second = KubeletEmulator(root: base + "/var/lib/kubelet", plugin: "configmap", name: "app")
        second.write(["app.yaml": "a: 1"])
        let s2 = inNamespace("\(fsshare) share \(common) --container c1 --source \(second.volume) --destination /etc/app")
        try #require(s2.status == 0, "\(s2.output)")
        let guest2 = String(s2.output.split(separator: "\n")[0])
        for _ in 0..<300 where !Sys.run(["cat", log]).output.contains("watching \(second.volume)") { usleep(10_000) }
        second.write(["app.yaml": "a: 2", "extra": "e"])
        #expect(waitForMirror(host: second.volume, guest: guest2) == nil)

        // SIGTERM: a clean stop, with a closing line.
        #expect(watch.stop(signal: SIGTERM) == 0)
        #expect(Sys.run(["cat", log]).output.contains("stopping after"))
        // Updates while nobody watches; a new watcher resyncs from the manifest.
        kubelet.write(["token": "t3"])
        kubelet.write(["token": "t4", "new": "n"])
        #expect(snapshot(guest) != snapshot(kubelet.volume))
        watch = try ChildProcess([fsshare, "watch", "--root", root, "--sandbox", "s1", "--agent", "unix:\(agent.socket)"], logPath: log)
        #expect(waitForMirror(host: kubelet.volume, guest: guest) == nil, Comment(rawValue: Sys.run(["cat", log]).output))
        #expect(watch.stop(signal: SIGINT) == 0)
        _ = inNamespace("\(fsshare) cleanup --root \(root) --sandbox s1")
    }

    /// Shared-filesystem mode through the CLI: `prepare --shared-fs virtio-fs --agent` records the
    /// agent; a configmap share prints the mirror path and its `watchable-bind` storage; the node's
    /// `fsshare watch` (no flags) pushes updates into the mirror through that agent. The mirror's
    /// guest directory is the agent's share dir here (a real guest's agent mounts a tmpfs there:
    /// the guest check "watchable").
    @Test func nodeWatchPushesIntoWatchableMirrors() throws {
        guard TestEnvironment.canMount else { return }
        let base = TestEnvironment.scratch("cli-watchable")
        let agent = try AgentUnderTest(base)
        let root = base + "/root"
        let kubelet = KubeletEmulator(root: base + "/var/lib/kubelet", plugin: "configmap", name: "proxy")
        kubelet.write(["envoy.yaml": "v: 1\n"])
        let common = "--root \(root) --sandbox s1 --guest-shared-dir \(agent.shareDir)"
        let shared = inNamespace("""
            \(fsshare) prepare \(common) --shared-fs virtio-fs --agent unix:\(agent.socket) >/dev/null
            \(fsshare) share \(common) --container c1 --source \(kubelet.volume) --destination /etc/envoy --ro
            \(fsshare) status --root \(root)
            """)
        try #require(shared.status == 0, "\(shared.output)")
        let lines = shared.output.split(separator: "\n").map(String.init)
        let mirror = lines[0]
        #expect(mirror.hasPrefix(agent.shareDir + "/watchable/c1-"), "\(shared.output)")
        #expect(lines.contains { $0.contains("watchable-bind") && $0.contains(mirror) }, "the storage is printed: \(shared.output)")
        #expect(shared.output.contains("agent unix:\(agent.socket) for watchable mirrors") && shared.output.contains("watchable mirror"), "\(shared.output)")

        let log = base + "/watch.log"
        let metrics = base + "/fsshare.prom"
        let watch = try ChildProcess([fsshare, "watch", "--root", root, "--json", "--metrics-textfile", metrics, "--metrics-interval", "1"], logPath: log)
        // The first sync brings the mirror in line (no guest agent made it here), then updates follow.
        #expect(waitForMirror(host: kubelet.volume, guest: mirror) == nil, Comment(rawValue: Sys.run(["cat", log]).output))
        kubelet.write(["envoy.yaml": "v: 2\n", "routes": "r\n"])
        #expect(waitForMirror(host: kubelet.volume, guest: mirror) == nil, Comment(rawValue: Sys.run(["cat", log]).output))
        #expect(watch.stop(signal: SIGTERM) == 0)
        // --json: one object per line, each with time, level and message; syncs name their volume.
        let records = Sys.run(["cat", log]).output.split(separator: "\n")
        #expect(!records.isEmpty && records.allSatisfy { $0.hasPrefix("{\"time\":") && $0.contains("\"level\":") && $0.contains("\"message\":") }, "\(records.prefix(3))")
        #expect(records.contains { $0.contains("\"message\":\"synced ") && $0.contains("\"volume\":\"\(kubelet.volume)\"") && $0.contains("\"sandbox\":\"s1\"") })
        // The Prometheus textfile, written whole on stop: two syncs, their latency histogram.
        let text = readFile(metrics) ?? ""
        func value(_ series: String) -> Double? {
            text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last ?? "") }
        }
        #expect((value("fsshare_watch_syncs_total{result=\"synced\"}") ?? 0) >= 2, "\(text)")
        #expect(value("fsshare_watch_volumes") == 1, "\(text)")
        #expect(text.contains("# TYPE fsshare_watch_sync_duration_seconds histogram"), "\(text)")
        #expect((value("fsshare_watch_sync_duration_seconds_count") ?? 0) >= 2, "\(text)")
        let un = inNamespace("\(fsshare) cleanup --root \(root) --sandbox s1")
        #expect(un.status == 0, "\(un.output)")
    }
}
