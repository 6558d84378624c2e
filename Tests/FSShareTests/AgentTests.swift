#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareGuestAgent
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SwiftProtobuf
import SystemPackage
import Testing

/// The guest agent, run for real, over real sockets.
@Suite struct AgentTests {
    func request(_ path: String, mode: UInt32, data: String = "", size: Int64? = nil) -> Grpc_CopyFileRequest {
        var r = Grpc_CopyFileRequest()
        r.path = path
        r.fileMode = mode
        r.dirMode = 0o750
        r.data = Data(data.utf8)
        r.fileSize = size ?? Int64(data.utf8.count)
        return r
    }

    @Test func copyFileSemanticsAndOwnService() throws {
        let base = TestEnvironment.scratch("agent-basic")
        let agent = try AgentUnderTest(base)
        let client = agent.client()
        let g = agent.shareDir
        let info = try client.info()
        #expect(info.features.contains("RenamePath"))
        #expect(info.shareDir == g)
        // Implicit parents, a file in two chunks (renamed into place only when complete), a link.
        try client.copyFile(request(g + "/vol/sub/dir", mode: UInt32(S_IFDIR) | 0o755))
        var first = request(g + "/vol/sub/file", mode: UInt32(S_IFREG) | 0o640, data: "hello ", size: 11)
        try client.copyFile(first)
        #expect(snapshot(g + "/vol/sub")?["file"] == nil, "a file must not appear before its last chunk")
        first.offset = 6
        first.data = Data("world".utf8)
        try client.copyFile(first)
        try client.copyFile(request(g + "/vol/link", mode: UInt32(S_IFLNK) | 0o777, data: "sub/file"))
        let snap = try #require(snapshot(g + "/vol"))
        #expect(snap["sub/file"] == "f:hello world")
        #expect(snap["link"] == "l:sub/file")
        #expect(snap["sub/dir"] == "d")
        var st = stat()
        #expect(stat(g + "/vol/sub/file", &st) == 0 && st.st_mode & 0o7777 == 0o640)
        // Implicit parents get the request's dir_mode exactly, whatever the agent's umask (077).
        for dir in ["/vol", "/vol/sub"] {
            #expect(stat(g + dir, &st) == 0 && st.st_mode & 0o7777 == 0o750, "\(dir) has mode \(String(st.st_mode & 0o7777, radix: 8)), not dir_mode 750")
        }
        var wide = request(g + "/wide/a/b/f", mode: UInt32(S_IFREG) | 0o644, data: "x")
        wide.dirMode = 0o755
        try client.copyFile(wide)
        for dir in ["/wide", "/wide/a", "/wide/a/b"] {
            #expect(stat(g + dir, &st) == 0 && st.st_mode & 0o7777 == 0o755, "\(dir) has mode \(String(st.st_mode & 0o7777, radix: 8)), not dir_mode 755")
        }
        try client.removePath(g + "/wide", recursive: true)
        // Rename replaces atomically; prune keeps what it is told; remove is idempotent.
        try client.copyFile(request(g + "/vol/link2", mode: UInt32(S_IFLNK) | 0o777, data: "sub/dir"))
        try client.renamePath(from: g + "/vol/link2", to: g + "/vol/link")
        #expect(snapshot(g + "/vol")?["link"] == "l:sub/dir")
        try client.pruneDirectory(g + "/vol", keep: ["sub"])
        #expect(snapshot(g + "/vol")?.keys.sorted() == ["sub", "sub/dir", "sub/file"])
        try client.removePath(g + "/vol", recursive: true)
        try client.removePath(g + "/vol", recursive: true)
        #expect(snapshot(g + "/vol") == nil)
        // An unknown method is UNIMPLEMENTED, as a Kata agent answers fsshare's own service.
        do {
            _ = try client.call("grpc.AgentService", "NoSuchMethod", payload: [])
            Issue.record("an unknown method was accepted")
        } catch {
            #expect(error.isUnimplemented)
        }
    }

    @Test func failedBatchStopsTheRestButNothingElse() throws {
        let base = TestEnvironment.scratch("agent-batch")
        let agent = try AgentUnderTest(base)
        let client = agent.client()
        let g = agent.shareDir
        #expect(try client.features().contains("Batches"))
        // One pipelined window: a batch whose second request fails (a symlinked parent), then
        // a request of the same batch that would succeed, then one outside any batch.
        #expect(symlink("/", g + "/escape") == 0)
        var aborted: [Int32] = []
        let outcome: AgentError? = {
            do throws(AgentError) {
                try client.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
                    p.beginBatch()
                    try p.send(TTRPC.agentService, TTRPC.copyFileMethod, request(g + "/vol/a", mode: UInt32(S_IFREG) | 0o644, data: "a"))
                    try p.send(TTRPC.agentService, TTRPC.copyFileMethod, request(g + "/escape/fsshare-batch-escape", mode: UInt32(S_IFREG) | 0o644, data: "b"))
                    try p.send(TTRPC.agentService, TTRPC.copyFileMethod, request(g + "/vol/c", mode: UInt32(S_IFREG) | 0o644, data: "c")) { error in
                        aborted.append(error.status ?? -1)
                        return nil
                    }
                }
                return nil
            } catch {
                return error
            }
        }()
        // The real failure is reported, the dependent request was refused, not applied.
        #expect(outcome?.status == GRPCStatus.permissionDenied, "\(String(describing: outcome))")
        #expect(aborted == [GRPCStatus.aborted])
        #expect(snapshot(g + "/vol") == ["a": "f:a"])
        #expect(access("/fsshare-batch-escape", F_OK) != 0)
        // Requests outside the failed batch (and a new batch) are applied as usual.
        try client.copyFile(request(g + "/vol/d", mode: UInt32(S_IFREG) | 0o644, data: "d"))
        try client.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
            p.beginBatch()
            try p.send(TTRPC.agentService, TTRPC.copyFileMethod, request(g + "/vol/e", mode: UInt32(S_IFREG) | 0o644, data: "e"))
        }
        #expect(snapshot(g + "/vol") == ["a": "f:a", "d": "f:d", "e": "f:e"])
        #expect(snapshot(g)?["vol/c"] == nil)
    }

    @Test func plantedTempFilesAreReplacedNotReused() throws {
        let base = TestEnvironment.scratch("agent-planted")
        let agent = try AgentUnderTest(base)
        let client = agent.client()
        let g = agent.shareDir
        try client.copyFile(request(g + "/vol/old", mode: UInt32(S_IFREG) | 0o644, data: "old"))
        // A guest process plants the agent's temp names: a file it keeps open, and a directory.
        let planted = open(g + "/vol/" + GuestAgent.temporaryName(for: "key").string, O_RDWR | O_CREAT, 0o666)
        #expect(planted >= 0)
        defer { close(planted) }
        #expect(mkdir(g + "/vol/" + GuestAgent.temporaryName(for: "link").string, 0o755) == 0)
        try client.copyFile(request(g + "/vol/key", mode: UInt32(S_IFREG) | 0o600, data: "secret"))
        try client.copyFile(request(g + "/vol/link", mode: UInt32(S_IFLNK) | 0o777, data: "key"))
        #expect(snapshot(g + "/vol") == ["old": "f:old", "key": "f:secret", "link": "l:key"])
        // The planted file was not the one published: writing through it changes nothing.
        #expect(write(planted, "evil", 4) == 4)
        #expect(snapshot(g + "/vol")?["key"] == "f:secret")
        // A file where a directory is (a type change) replaces it.
        try client.copyFile(request(g + "/vol/dir/x", mode: UInt32(S_IFREG) | 0o644, data: "x"))
        try client.copyFile(request(g + "/vol/dir", mode: UInt32(S_IFREG) | 0o644, data: "now a file"))
        #expect(snapshot(g + "/vol")?["dir"] == "f:now a file")
    }

    func entry(_ path: String, _ mode: UInt32, _ data: String = "") -> Fsshare_TreeEntry {
        var e = Fsshare_TreeEntry()
        e.path = path
        e.mode = mode
        e.data = Data(data.utf8)
        return e
    }

    func tree(_ path: String, _ entries: [Fsshare_TreeEntry]) -> Fsshare_WriteTreeRequest {
        var r = Fsshare_WriteTreeRequest()
        r.path = path
        r.mode = 0o755
        r.dirMode = 0o750
        r.entries = entries
        return r
    }

    func links(_ dir: String, _ pairs: [(String, String)]) -> Fsshare_SetLinksRequest {
        var r = Fsshare_SetLinksRequest()
        r.dir = dir
        r.links = pairs.map { name, target in
            var l = Fsshare_Link()
            l.name = name
            l.target = target
            return l
        }
        return r
    }

    /// WriteTree makes a directory whole or not at all; SetLinks makes or replaces links in
    /// order. Both refuse what CopyFile refuses, before making anything.
    @Test func writeTreeAndSetLinks() throws {
        let base = TestEnvironment.scratch("agent-tree")
        let agent = try AgentUnderTest(base)
        let client = agent.client()
        let g = agent.shareDir
        #expect(try client.features().isSuperset(of: ["WriteTree", "SetLinks"]))
        func call(_ method: String, _ m: some SwiftProtobuf.Message) throws { _ = try client.call(TTRPC.guestFilesService, method, m) }
        let good = [
            entry("a", UInt32(S_IFREG) | 0o640, "alpha"), entry("sub", UInt32(S_IFDIR) | 0o700),
            entry("sub/b", UInt32(S_IFREG) | 0o644, "beta"), entry("sub/l", UInt32(S_IFLNK) | 0o777, "b"),
        ]
        try call("WriteTree", tree(g + "/vol/..ts1", good))
        let snap = try #require(snapshot(g + "/vol"))
        #expect(snap["..ts1/a"] == "f:alpha" && snap["..ts1/sub/b"] == "f:beta" && snap["..ts1/sub/l"] == "l:b")
        var st = stat()
        #expect(stat(g + "/vol/..ts1/a", &st) == 0 && st.st_mode & 0o7777 == 0o640)
        #expect(stat(g + "/vol/..ts1/sub", &st) == 0 && st.st_mode & 0o7777 == 0o700)
        #expect(stat(g + "/vol", &st) == 0 && st.st_mode & 0o7777 == 0o750, "a missing parent gets dir_mode")
        // An existing path is never replaced: ALREADY_EXISTS, and the old tree is untouched.
        do {
            try call("WriteTree", tree(g + "/vol/..ts1", [entry("x", UInt32(S_IFREG) | 0o644, "x")]))
            Issue.record("WriteTree replaced an existing directory")
        } catch let e as AgentError {
            #expect(e.status == GRPCStatus.alreadyExists, "\(e)")
        }
        #expect(snapshot(g + "/vol") == snap)
        // Refused whole: nothing of the tree appears, no temp is left.
        for (what, bad) in [
            ("dot-dot entry", [entry("a", UInt32(S_IFREG) | 0o644, "a"), entry("../esc", UInt32(S_IFREG) | 0o644, "x")]),
            ("escaping link", [entry("a", UInt32(S_IFREG) | 0o644, "a"), entry("l", UInt32(S_IFLNK) | 0o777, "../../../outside")]),
            ("absolute link", [entry("l", UInt32(S_IFLNK) | 0o777, "/etc/shadow")]),
            ("device", [entry("d", UInt32(S_IFCHR) | 0o644)]),
            ("child before its parent", [entry("missing/f", UInt32(S_IFREG) | 0o644, "f")]),
            ("listed twice", [entry("d", UInt32(S_IFDIR) | 0o755), entry("d", UInt32(S_IFDIR) | 0o755)]),
        ] as [(String, [Fsshare_TreeEntry])] {
            #expect(throws: AgentError.self, "\(what)") { try call("WriteTree", tree(g + "/vol/..ts2", bad)) }
            #expect(snapshot(g + "/vol") == snap, "\(what): nothing was left behind")
        }
        // SetLinks: ..data first, then keys; new links in place, old ones replaced.
        try call("SetLinks", links(g + "/vol", [("..data", "..ts1"), ("a", "..data/a")]))
        try call("WriteTree", tree(g + "/vol/..ts2", [entry("a", UInt32(S_IFREG) | 0o644, "alpha2")]))
        try call("SetLinks", links(g + "/vol", [("..data", "..ts2"), ("a", "..data/a")]))
        #expect(readFile(g + "/vol/a") == "alpha2")
        #expect(snapshot(g + "/vol")?["..data"] == "l:..ts2")
        for (what, bad) in [
            ("a name with a slash", links(g + "/vol", [("x/y", "a")])),
            ("an escaping target", links(g + "/vol", [("x", "../../outside")])),
            ("a link at the top of the share", links(g, [("x", "vol")])),
        ] {
            #expect(throws: AgentError.self, "\(what)") { try call("SetLinks", bad) }
        }
        #expect(snapshot(g + "/vol")?.keys.contains("x") == false)
    }

    @Test func pathEscapesAreRefused() throws {
        let base = TestEnvironment.scratch("agent-escape")
        let agent = try AgentUnderTest(base)
        let client = agent.client()
        let g = agent.shareDir
        let outside = base + "/outside"
        _ = Sys.run(["mkdir", "-p", outside])
        try client.copyFile(request(g + "/vol", mode: UInt32(S_IFDIR) | 0o755))
        // A symlink planted in the guest (by a container) pointing outside the share.
        #expect(symlink(outside, g + "/vol/planted") == 0)
        #expect(symlink("/", g + "/rootlink") == 0)
        let attempts: [(String, Grpc_CopyFileRequest)] = [
            ("dot-dot", request(g + "/vol/../../outside/x", mode: UInt32(S_IFREG) | 0o644, data: "x")),
            ("outside the share dir", request(outside + "/x", mode: UInt32(S_IFREG) | 0o644, data: "x")),
            ("relative path", request("vol/x", mode: UInt32(S_IFREG) | 0o644, data: "x")),
            ("not canonical", request(g + "//vol/x", mode: UInt32(S_IFREG) | 0o644, data: "x")),
            ("absolute symlink target", request(g + "/vol/abs", mode: UInt32(S_IFLNK) | 0o777, data: "/etc/shadow")),
            ("escaping symlink target", request(g + "/vol/esc", mode: UInt32(S_IFLNK) | 0o777, data: "../../outside")),
            ("symlink at the top of the share", request(g + "/top", mode: UInt32(S_IFLNK) | 0o777, data: "vol")),
            ("file through a symlinked parent", request(g + "/vol/planted/x", mode: UInt32(S_IFREG) | 0o644, data: "x")),
            ("dir through a symlinked parent", request(g + "/rootlink/tmp/fsshare-escape", mode: UInt32(S_IFDIR) | 0o755)),
            ("device node", request(g + "/vol/dev", mode: UInt32(S_IFCHR) | 0o644)),
            ("chunk beyond the size", request(g + "/vol/big", mode: UInt32(S_IFREG) | 0o644, data: "xxxx", size: 2)),
        ]
        for (what, r) in attempts {
            do {
                try client.copyFile(r)
                Issue.record("the agent accepted: \(what)")
            } catch {
                #expect(error.code == .remote, "\(what): \(error)")
            }
        }
        for (what, call) in [
            ("remove through a symlinked parent", { try client.removePath(g + "/vol/planted/x", recursive: true) }),
            ("rename out of the share", { try client.renamePath(from: g + "/vol", to: outside + "/stolen") }),
            ("prune through a symlink", { try client.pruneDirectory(g + "/rootlink/tmp", keep: []) }),
            ("remove the share dir itself", { try client.removePath(g, recursive: true) }),
        ] as [(String, () throws -> Void)] {
            #expect(throws: AgentError.self, "\(what)") { try call() }
        }
        #expect(Sys.run(["find", outside, "-mindepth", "1"]).output.isEmpty, "nothing may land outside the share")
        #expect(access("/tmp/fsshare-escape", F_OK) != 0)
        #expect(snapshot(g + "/vol")?.keys.sorted() == ["planted"])
        // Still serving after all that.
        try client.copyFile(request(g + "/vol/ok", mode: UInt32(S_IFREG) | 0o644, data: "ok"))
    }

    @Test func hybridVsockHandshakeAndReconnect() throws {
        let base = TestEnvironment.scratch("agent-hvsock")
        let agent = try AgentUnderTest(base, listen: "hvsock:\(base)/agent.sock:1024")
        let client = AgentClient(address: try AgentAddress(parsing: "hvsock://\(base)/agent.sock:1024"), callTimeout: .seconds(10))
        #expect(try client.info().version.hasPrefix("fsshare-agent"))
        // The wrong port is refused by the muxer's handshake.
        let wrong = AgentClient(address: .hybridVsock(FilePath(base + "/agent.sock"), port: 9), callTimeout: .seconds(2))
        #expect(throws: AgentError.self) { _ = try wrong.info() }
        // The agent restarts: the next call reconnects on its own.
        agent.kill()
        try agent.start(listen: "hvsock:\(base)/agent.sock:1024")
        #expect(try client.info().version.hasPrefix("fsshare-agent"))
        #expect(client.reconnectCount == 1)
    }

    @Test func serialPortTransport() throws {
        // A pty stands in for a virtio-serial port: the agent opens the device path, puts it in
        // raw mode and serves it; the client holds the other end.
        let (master, slavePath) = try Sys.openPty()
        let slave = slavePath.string
        // Raw before anything is written (the agent sets it too, but bytes sent before it opens
        // the device would meet the cooked line discipline); held open so the tty lives on.
        let holder = try Sys.openat(nil, slavePath, flags: O_RDWR | O_NOCTTY)
        defer { Sys.close(holder) }
        try Sys.makeRaw(holder, path: slavePath)
        let base = TestEnvironment.scratch("agent-serial")
        _ = Sys.run(["mkdir", "-p", base])
        let agent = try ChildProcess(
            [TestEnvironment.product("fsshare-agent"), "--share-dir", base + "/guest", "--listen", "serial:" + slave], logPath: base + "/agent.log")
        defer { agent.stop(signal: SIGKILL) }
        let client = AgentClient(adopting: master, name: "pty", callTimeout: .seconds(10))
        var r = Grpc_CopyFileRequest()
        r.path = base + "/guest/over-serial"
        r.fileMode = UInt32(S_IFREG) | 0o644
        // Bytes a tty line discipline would mangle unless raw: CR, ^C, ^D, ^S, DEL.
        r.data = Data([0x0d, 0x03, 0x04, 0x13, 0x7f, 0x0a] + Array("payload".utf8))
        r.fileSize = Int64(r.data.count)
        do {
            try client.copyFile(r)
        } catch {
            Issue.record("no reply over the pty: \(error); \(Sys.run(["cat", base + "/agent.log"]).output)")
            return
        }
        let fd = try Sys.openat(nil, FilePath(base + "/guest/over-serial"), flags: O_RDONLY)
        defer { Sys.close(fd) }
        #expect(try Sys.readAll(fd, path: "") == [UInt8](r.data))
    }

    @Test func addressParsing() throws {
        #expect(try AgentAddress(parsing: "/run/a.sock") == .unix("/run/a.sock"))
        #expect(try AgentAddress(parsing: "unix:///run/a.sock") == .unix("/run/a.sock"))
        #expect(try AgentAddress(parsing: "hvsock:/run/vm.sock:1024") == .hybridVsock("/run/vm.sock", port: 1024))
        #expect(try AgentAddress(parsing: "vsock://3:1024") == .vsock(cid: 3, port: 1024))
        #expect(try AgentAddress(parsing: "serial:/dev/vport0p1") == .serial("/dev/vport0p1"))
        for bad in ["", "tcp:1.2.3.4:5", "unix:relative", "vsock:x:1", "hvsock:/a.sock"] {
            #expect(throws: AgentError.self, "\(bad)") { _ = try AgentAddress(parsing: bad) }
        }
    }

    @Test func ttrpcFrameMatchesTheWireFormat() throws {
        var req = Ttrpc_Request()
        req.service = "grpc.AgentService"
        req.method = "CopyFile"
        req.payload = Data([1, 2, 3])
        let payload: [UInt8] = try req.serializedBytes()
        let frame = TTRPCFrame(streamID: 3, type: TTRPC.typeRequest, payload: payload).encoded
        // 10-byte header: big-endian length, big-endian stream id, type, flags.
        #expect(Array(frame[0..<10]) == [0, 0, 0, UInt8(payload.count), 0, 0, 0, 3, 1, 0])
        // Field 1 (service) is the first thing in the envelope, as ttrpc's Go code writes it.
        #expect(frame[10] == 0x0a && frame[11] == 17)
        #expect(Array(frame[12..<29]) == Array("grpc.AgentService".utf8))
    }
}
