#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareSystem
import SystemPackage

/// A real `fsshare-agent` process serving a temp dir ("the guest") on a unix socket.
final class AgentUnderTest {
    let shareDir: String
    let socket: String
    let log: String
    private(set) var process: ChildProcess?

    /// `wrapper` runs the agent through another program (`unshare -m ...`); `extra` adds
    /// agent arguments (`--checks`).
    let wrapper: [String]
    let extra: [String]

    init(_ base: String, listen: String? = nil, wrapper: [String] = [], extra: [String] = []) throws {
        shareDir = base + "/guest"
        socket = base + "/agent.sock"
        log = base + "/agent.log"
        self.wrapper = wrapper
        self.extra = extra
        _ = Sys.run(["mkdir", "-p", base])
        try start(listen: listen)
    }

    var address: AgentAddress { .unix(FilePath(socket)) }

    func client(timeout: Duration = .seconds(10)) -> AgentClient { AgentClient(address: address, callTimeout: timeout) }

    func start(listen: String? = nil) throws {
        process = try ChildProcess(
            wrapper + [TestEnvironment.product("fsshare-agent"), "--share-dir", shareDir, "--listen", listen ?? "unix:\(socket)"] + extra, logPath: log)
        // Ready when the socket accepts.
        for _ in 0..<500 {
            if let fd = try? Sys.connectUnix(FilePath(socket)) {
                Sys.close(fd)
                return
            }
            usleep(10_000)
        }
        throw AgentError(.unreachable, "fsshare-agent did not start: \(readLog())")
    }

    func kill() {
        process?.stop(signal: SIGKILL)
        process = nil
    }

    func readLog() -> String { Sys.run(["cat", log]).output }

    deinit { process?.stop(signal: SIGKILL) }
}
