#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SwiftProtobuf
import Synchronization
import SystemPackage
import Testing

/// fsshare against ttrpc stacks nobody on the team wrote, both from Debian's packages and built
/// by `hack/peers/build` with Kata's message and service names: containerd's Go ttrpc (a client
/// and a concurrent server) and ttrpc-rust's async server, the stack Kata's agent runs. The
/// servers run each request in its own goroutine or task and, with jitter, answer and apply
/// requests out of order; they apply CopyFile as Kata's agent does.
@Suite("Kata protocol peers (containerd Go ttrpc, ttrpc-rust)", .serialized)
struct KataPeerTests {
    static let peersDirectory = ProcessInfoShim.environment("FSSHARE_PEERS_DIR") ?? (TestEnvironment.packageRoot + "/.build/peers")

    /// A peer binary, or nil.
    static func peer(_ name: String) -> String? {
        let path = peersDirectory + "/" + name
        return access(path, X_OK) == 0 ? path : nil
    }

    static var goPeer: String? { peer("kata-go-peer") }

    static var haveGoPeer: Bool {
        if goPeer == nil { print("SKIP: kata-go-peer is not built (hack/test builds it with hack/peers/build, from Debian's golang-go and golang-github-containerd-ttrpc-dev)") }
        return goPeer != nil
    }

    /// The servers to test against; each one missing is said.
    static var servers: [String] {
        ["go", "rust"].filter { kind in
            let built = peer("kata-\(kind)-peer") != nil
            if !built { print("SKIP: kata-\(kind)-peer is not built (hack/peers/build builds it from Debian's packages: hack/deps --peers)") }
            return built
        }
    }

    /// A running peer server: `kata-go-peer server` or `kata-rust-peer`.
    final class PeerServer {
        let shareDir: String
        let socket: String
        let process: ChildProcess

        init(_ kind: String, _ base: String, jitterMs: Int) throws {
            shareDir = base + "/guest"
            socket = base + "/peer.sock"
            _ = Sys.run(["mkdir", "-p", shareDir])
            let binary = KataPeerTests.peer("kata-\(kind)-peer") ?? ""
            let mode = kind == "go" ? ["server"] : []
            process = try ChildProcess(
                [binary] + mode + ["--socket", socket, "--share-dir", shareDir, "--jitter-ms", "\(jitterMs)"], logPath: base + "/peer.log")
            for _ in 0..<500 {
                if let fd = try? Sys.connectUnix(FilePath(socket)) {
                    Sys.close(fd)
                    return
                }
                usleep(10_000)
            }
            throw AgentError(.unreachable, "kata-\(kind)-peer did not start")
        }

        func client() -> AgentClient { AgentClient(address: .unix(FilePath(socket)), callTimeout: .seconds(20)) }

        /// (requests that finished after a later one, requests) so far.
        func reordering() throws -> (Int, Int) {
            let bytes = try client().call(TTRPC.healthService, "Version", Grpc_CheckRequest())
            let version = try Grpc_VersionCheckResponse(serializedBytes: bytes).agentVersion
            let numbers = version.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
            return numbers.count == 2 ? (numbers[0], numbers[1]) : (-1, -1)
        }

        deinit { _ = process.stop(signal: SIGKILL) }
    }

    @Test("a Go ttrpc client with Kata's messages: health, concurrent CopyFile, chunks, refusals against fsshare-agent",
          .enabled(if: KataPeerTests.haveGoPeer))
    func goClientAgainstFsshareAgent() throws {
        let base = TestEnvironment.scratch("peer-go-client")
        let agent = try AgentUnderTest(base)
        let r = Sys.run([Self.goPeer ?? "", "client", "--socket", agent.socket, "--share-dir", agent.shareDir, "--files", "200"])
        #expect(r.status == 0, "\(r.output)\n--- agent log ---\n\(agent.readLog().suffix(2000))")
        #expect(r.output.contains("ok: health SERVING"))
        // And fsshare's own client asks the same health question first, as Kata's runtime does.
        let bytes = try agent.client().call(TTRPC.healthService, "Check", Grpc_CheckRequest())
        #expect(try Grpc_HealthCheckResponse(serializedBytes: bytes).status == .serving)
    }

    @Test("fsshare copies a tree into a concurrent Kata-semantics server that answers out of order",
          arguments: KataPeerTests.servers)
    func copyIntoConcurrentServer(_ kind: String) throws {
        let base = TestEnvironment.scratch("peer-\(kind)-copy")
        let server = try PeerServer(kind, base, jitterMs: 3)
        // A tree that needs ordering: nested directories, many files, names whose Kata temp
        // files collide (a.conf, a.txt and a all write a.tmp), a file of several chunks, links.
        let src = base + "/src/tree"
        mkdirs(src + "/d1/d2/d3")
        for i in 0..<60 {
            writeFile(src + "/k\(i).conf", "conf \(i)")
            writeFile(src + "/k\(i).txt", "text \(i)")
            writeFile(src + "/k\(i)", "bare \(i)")
        }
        writeFile(src + "/d1/d2/d3/deep", "deep")
        var big = ""
        for i in 0..<120_000 { big += "line \(i)\n" }
        writeFile(src + "/big", big)
        symlink("d1/d2/d3/deep", src + "/link")
        let sharer = try LinuxFilesystemSharer(
            sandboxID: "peer",
            configuration: SharerConfiguration(root: FilePath(base + "/root"), sharedFilesystem: .none, guestSharedDir: server.shareDir + "/"),
            agent: server.client())
        try sharer.prepareSync()
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        let mount = Mount(source: FilePath(src), destination: "/tree")
        let shared = try #require(try sharer.shareFileSync(container: c, mount: mount))
        #expect(snapshot(shared.guestPath) == snapshot(src), "the guest copy differs from the host tree")
        #expect(shared.copyReport?.files == 182)
        let (reordered, total) = try server.reordering()
        #expect(reordered > 0, "the server must really have answered out of order (\(reordered) of \(total))")
        // Kata has no removal RPC: unshare says the copy stays, status shows it.
        let outcome = try sharer.unshareFileSync(container: c, mount: mount)
        #expect(outcome == .leftInGuest(guestPath: shared.guestPath))
        #expect(try sharer.sharesSync().first?.record.leftInGuest == true)
        #expect(snapshot(shared.guestPath) == snapshot(src))
        // Sharing it again copies it again (the guest copy may be stale).
        let again = try #require(try sharer.shareFileSync(container: c, mount: mount))
        #expect(again.copyReport?.files == 182)
        print("figure: kata-\(kind)-peer copy: 182 files + 4 dirs + 1 link, \(reordered) of \(total) requests finished out of order")
        try sharer.cleanupSync()
    }

    /// kubelet's atomic writer on the host, fsshare's watcher, a Kata-semantics agent: every
    /// update arrives and no reader ever sees a torn file or a key without its data. Kata's
    /// A watchable mirror behind a Kata agent is the agent's own (it polls the share every 2 s):
    /// the watcher writes nothing into it and says why.
    @Test("the watcher leaves a Kata agent's watchable mirror alone, with the reason", arguments: KataPeerTests.servers)
    func watchableMirrorIsLeftToKata(_ kind: String) throws {
        let base = TestEnvironment.scratch("peer-\(kind)-watchable")
        let server = try PeerServer(kind, base, jitterMs: 0)
        let kubelet = KubeletEmulator(root: base + "/kubelet", plugin: "configmap")
        kubelet.write(["a": "1\n"])
        let watcher = VolumeWatcher()
        try watcher.start()
        defer { watcher.stop() }
        let mirror = server.shareDir + "/watchable/c1-0123456789abcdef-cfg"
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: mirror, agent: server.client(), watchable: true)
        var reason: String?
        let deadline = Sys.monotonicNanoseconds() + 10_000_000_000
        while reason == nil && Sys.monotonicNanoseconds() < deadline {
            reason = watcher.statistics.stopped["s1/cfg"]
            usleep(10_000)
        }
        #expect(reason?.contains("is not fsshare-agent") == true, "\(reason ?? "no reason")")
        #expect(watcher.watchedVolumes.isEmpty)
        kubelet.write(["a": "2\n"])
        usleep(200_000)
        #expect(access(server.shareDir + "/watchable", F_OK) != 0, "nothing was written into the Kata agent's mirror")
    }

    /// CopyFile replaces the `..data` link by unlink + symlink, so a reader can find `..data`
    /// missing for that instant; the count is printed, not hidden.
    @Test("the watcher keeps a Kata-semantics server in sync under rapid kubelet updates",
          arguments: KataPeerTests.servers)
    func watcherAgainstConcurrentServer(_ kind: String) throws {
        let base = TestEnvironment.scratch("peer-\(kind)-watch")
        let server = try PeerServer(kind, base, jitterMs: 1)
        let kubelet = KubeletEmulator(root: base + "/kubelet", plugin: "configmap")
        let keys = (0..<5).map { "key\($0)" }
        func payload(_ v: Int) -> [String: String] {
            Dictionary(uniqueKeysWithValues: keys.map { ($0, "v\(v)-" + String(repeating: "x", count: 1500 + v % 7) + "-END") })
        }
        kubelet.write(payload(0))
        let lines = Mutex<[String]>([])
        let watcher = VolumeWatcher(logger: .lines { line in lines.withLock { $0.append(line) } })
        try watcher.start()
        defer { watcher.stop() }
        let guest = server.shareDir + "/c1-0123456789abcdef-cfg"
        try watcher.watch(sandboxID: "s1", name: "cfg", volume: FilePath(kubelet.volume), guestPath: guest, agent: server.client())
        func current(_ v: Int) -> Bool { keys.allSatisfy { readFile(guest + "/" + $0) == payload(v)[$0] } }
        for _ in 0..<1000 where !current(0) { usleep(10_000) }
        try #require(current(0), "the first copy did not arrive")

        let reader = try VolumeReader(dir: guest, keys: keys) { $0.hasPrefix("v") && $0.hasSuffix("-END") }
        let updates = 200
        for v in 1...updates {
            kubelet.write(payload(v))
            usleep(2_000)
        }
        for _ in 0..<2000 where !current(updates) { usleep(10_000) }
        let seen = reader.finish()
        #expect(current(updates), "the last update did not arrive")
        #expect(seen.torn.isEmpty, "\(seen.torn.count) torn reads, first: \(seen.torn.prefix(3))")
        #expect(seen.passes > 100, "the reader must have raced the updates")
        #expect(lines.withLock { $0 }.contains { $0.contains("has no removal RPC") }, "the skipped removal is logged")
        let (reordered, total) = try server.reordering()
        if ProcessInfoShim.environment("FSSHARE_TEST_VERBOSE") != nil { print(lines.withLock { $0 }.joined(separator: "\n")) }
        print("figure: kata-\(kind)-peer watch: \(updates) updates, \(watcher.statistics.syncs) syncs, \(seen.passes) reader passes, 0 torn, \(seen.missing.count) reads found ..data mid-replace (Kata's unlink + symlink), \(reordered) of \(total) requests out of order")
    }
}

/// `getenv` as an optional String.
enum ProcessInfoShim {
    static func environment(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
}
