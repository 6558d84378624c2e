#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareProto
import SystemPackage

/// A small sandbox runtime, written the way a runtime links `FSShare`: only the async API,
/// from many tasks at once. It prepares `--sandboxes` virtio-fs sandboxes and, concurrently,
/// shares three volumes (one read-only) and a rootfs into each of two containers per sandbox,
/// checks each share from the host side of the export, then unshares and cleans everything up.
/// With `--agent`, one more sandbox in copy mode streams a `--large-mib` file into that agent
/// meanwhile. A heartbeat task sleeps 10 ms at a time throughout and records how late it wakes:
/// if any library call blocked a thread of Swift's cooperative pool (two on a 2-core node), the
/// heartbeat would stall behind it.
///
/// Needs root and a private mount namespace (`unshare -m --propagation private`). Prints
/// `figure:` lines and `ok:`/`FAIL:` checks; exits 1 on any failure or when the heartbeat's worst
/// delay exceeds `--max-delay-ms`.
///
/// `--blocking` runs the same work through the blocking calls inside the tasks (what the
/// library's async API did before it ran on its own threads), to show what the heartbeat then sees.
@main
struct ExampleRuntime {
    struct Options {
        var work = ""
        var sandboxes = 20
        var agent: String?
        var agentShareDir: String?
        var largeMiB = 256
        var maxDelayMs = 250.0
        var blocking = false
    }

    static func parse() -> Options? {
        var o = Options()
        var args = CommandLine.arguments.dropFirst()
        while let a = args.popFirst() {
            switch a {
            case "--sandboxes": o.sandboxes = args.popFirst().flatMap { Int($0) } ?? -1
            case "--agent": o.agent = args.popFirst()
            case "--agent-share-dir": o.agentShareDir = args.popFirst()
            case "--large-mib": o.largeMiB = args.popFirst().flatMap { Int($0) } ?? -1
            case "--max-delay-ms": o.maxDelayMs = args.popFirst().flatMap { Double($0) } ?? -1
            case "--blocking": o.blocking = true
            default:
                if a.hasPrefix("-") || !o.work.isEmpty { return nil }
                o.work = a
            }
        }
        guard o.work.hasPrefix("/"), o.sandboxes > 0, o.largeMiB > 0, o.maxDelayMs > 0, (o.agent == nil) == (o.agentShareDir == nil) else { return nil }
        return o
    }

    static func main() async {
        guard let o = parse() else {
            print("usage: fsshare-example-runtime WORKDIR [--sandboxes N] [--agent unix:PATH --agent-share-dir DIR] [--large-mib N] [--max-delay-ms MS] [--blocking]")
            exit(2)
        }
        let checks = Tally()
        let heartbeat = Heartbeat()
        let beating = Task { await heartbeat.run() }
        let start = ContinuousClock.now
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<o.sandboxes {
                group.addTask { await runSandbox(i, o, checks) }
            }
            if let agent = o.agent, let dir = o.agentShareDir {
                group.addTask { await runCopyMode(agent: agent, shareDir: dir, o, checks) }
            }
        }
        let wall = ContinuousClock.now - start
        beating.cancel()
        let beat = await beating.value
        let left = (try? FileManagerLite.list(o.work + "/root")) ?? []
        checks.check(left.isEmpty, "nothing left under the root (\(left))")
        let mode = o.blocking ? "blocking calls in tasks" : "async API"
        print("figure: example runtime (\(mode)): \(o.sandboxes) sandboxes × 2 containers (\(o.sandboxes * 8) shares)\(o.agent != nil ? " + a \(o.largeMiB) MiB copy-mode share" : "") in \(ms(wall)) ms")
        print("figure: heartbeat (\(mode)): \(beat.ticks) ticks of 10 ms, worst delay \(ms(beat.worst)) ms, p99 \(ms(beat.p99)) ms, median \(ms(beat.median)) ms")
        checks.check(beat.worst <= .milliseconds(o.maxDelayMs), "the heartbeat's worst delay \(ms(beat.worst)) ms is within \(o.maxDelayMs) ms")
        print("\(checks.passed) checks passed, \(checks.failed) failed")
        exit(checks.failed == 0 ? 0 : 1)
    }

    static func ms(_ d: Duration) -> String {
        let v = Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
        return String(Double(Int(v * 10)) / 10)
    }

    /// One sandbox: prepare, two containers' volumes and rootfs shared at once, checked,
    /// unshared at once, cleaned up.
    static func runSandbox(_ i: Int, _ o: Options, _ checks: Tally) async {
        let sid = "pod\(i)"
        let src = o.work + "/src/" + sid
        for dir in ["data", "config", "logs", "rootfs-a", "rootfs-b"] {
            FileManagerLite.write(src + "/" + dir + "/hello", "\(sid) \(dir)\n")
        }
        let config = SharerConfiguration(root: FilePath(o.work + "/root"), sharedFilesystem: .virtioFS())
        do {
            let sharer = try LinuxFilesystemSharer(sandboxID: sid, configuration: config)
            let storages: [Storage]
            if o.blocking { try sharer.prepareSync(); storages = sharer.sandboxStorages } else { storages = try await sharer.prepare() }
            checks.check(storages.contains { $0.driver == "virtio-fs" }, "\(sid): prepare returns the virtio-fs storage")
            let containers = [
                Container(id: "a", rootfs: .hostMounted(FilePath(src + "/rootfs-a"))),
                Container(id: "b", rootfs: .hostMounted(FilePath(src + "/rootfs-b"))),
            ]
            let mounts = [
                Mount(source: FilePath(src + "/data"), destination: "/data"),
                Mount(source: FilePath(src + "/config"), destination: "/etc/app", options: ["ro"]),
                Mount(source: FilePath(src + "/logs"), destination: "/var/log/app"),
            ]
            // Every share of the sandbox at once, from tasks of their own.
            let shared = try await withThrowingTaskGroup(of: (String, String).self) { group in
                for c in containers {
                    group.addTask {
                        let r = o.blocking ? try sharer.shareRootFilesystemSync(container: c) : try await sharer.shareRootFilesystem(container: c)
                        return (r.guestPath, "rootfs-" + c.id)
                    }
                    for m in mounts {
                        group.addTask {
                            let r = o.blocking ? try sharer.shareFileSync(container: c, mount: m) : try await sharer.shareFile(container: c, mount: m)
                            return (r?.guestPath ?? "", m.source.lastComponent?.string ?? "")
                        }
                    }
                }
                var all: [(String, String)] = []
                for try await r in group { all.append(r) }
                return all
            }
            // The guest's view is the export: <shared>/<name> for <guest dir>/<name>.
            var seen = 0
            for (guestPath, dir) in shared {
                let name = String(guestPath.dropFirst(config.guestSharedDir.count))
                let hostView = sharer.layout.sharedDirectory.string + "/" + name
                if FileManagerLite.read(hostView + "/hello") == "\(sid) \(dir)\n" { seen += 1 }
            }
            checks.check(seen == 8, "\(sid): 8 shares made concurrently, each visible through the export (\(seen))")
            let ro = FileManagerLite.canCreate(sharer.layout.sharedDirectory.string + "/" + String((shared.first { $0.1 == "config" }?.0 ?? "").dropFirst(config.guestSharedDir.count)) + "/x")
            checks.check(!ro, "\(sid): the read-only volume refuses writes through the export")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for c in containers {
                    group.addTask { o.blocking ? try sharer.unshareRootFilesystemSync(container: c) : try await sharer.unshareRootFilesystem(container: c) }
                    for m in mounts {
                        group.addTask { o.blocking ? _ = try sharer.unshareFileSync(container: c, mount: m) : try await sharer.unshareFile(container: c, mount: m) }
                    }
                }
                try await group.waitForAll()
            }
            let remaining = o.blocking ? try sharer.sharesSync() : try await sharer.shares()
            checks.check(remaining.isEmpty, "\(sid): every share unshared (\(remaining.count) left)")
            if o.blocking { _ = try sharer.cleanupSync() } else { try await sharer.cleanup() }
        } catch {
            checks.check(false, "\(sid): \(error)")
        }
    }

    /// Copy mode: a large file streamed into a local agent while everything else runs.
    static func runCopyMode(agent: String, shareDir: String, _ o: Options, _ checks: Tally) async {
        let sid = "copy"
        let src = o.work + "/src/copy/big"
        do {
            let address = try AgentAddress(parsing: agent)
            guard FileManagerLite.makeFile(src + "/blob", size: o.largeMiB << 20) else {
                checks.check(false, "copy: cannot make the \(o.largeMiB) MiB source")
                return
            }
            let config = SharerConfiguration(root: FilePath(o.work + "/root"), sharedFilesystem: .none, guestSharedDir: shareDir + "/")
            let sharer = try LinuxFilesystemSharer(sandboxID: sid, configuration: config, agent: AgentClient(address: address, callTimeout: .seconds(60)))
            if o.blocking { try sharer.prepareSync() } else { try await sharer.prepare() }
            let c = Container(id: "c", rootfs: .guestPull(image: "registry.example/app:1"))
            let m = Mount(source: FilePath(src), destination: "/big", options: ["ro"])
            let shared = o.blocking ? try sharer.shareFileSync(container: c, mount: m) : try await sharer.shareFile(container: c, mount: m)
            let copied = shared?.copyReport?.bytes ?? 0
            checks.check(copied == Int64(o.largeMiB) << 20 && FileManagerLite.size(shared.map { $0.guestPath + "/blob" } ?? "") == o.largeMiB << 20,
                         "copy: the \(o.largeMiB) MiB file reached the agent's guest directory (\(copied) bytes)")
            if o.blocking { _ = try sharer.unshareFileSync(container: c, mount: m) } else { try await sharer.unshareFile(container: c, mount: m) }
            if o.blocking { _ = try sharer.cleanupSync() } else { try await sharer.cleanup() }
        } catch {
            checks.check(false, "copy: \(error)")
        }
    }
}
