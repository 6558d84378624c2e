#if canImport(Glibc)
import Glibc
#endif
import CFSShareShim
import Synchronization
import SystemPackage

extension Sys {
    /// Makes stdout line-buffered, so progress shows as it happens even through a pipe.
    public static func lineBufferStdout() { fsshare_line_buffer_stdout() }

    /// Runs a program (PATH lookup), waits, and returns its exit status (negative: killed by
    /// that signal) and its combined stdout and stderr.
    ///
    /// It reports no peak memory on purpose: `posix_spawn` shares this process's memory until
    /// `exec`, so the child's `ru_maxrss` starts at *this* process's high-water mark (a test
    /// runner's ~40 MiB). Measure a program's peak from a small parent (GNU `time -f %M`).
    ///
    /// - Parameters:
    ///   - argv: the program and its arguments.
    ///   - environment: variables to add to the environment.
    /// - Returns: the exit status and everything written to standard output and error.
    public static func run(_ argv: [String], environment: [String: String] = [:]) -> (status: Int32, output: String) {
        var pipeFDs: [Int32] = [0, 0]
        guard Glibc.pipe(&pipeFDs) == 0 else { return (-1, "pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
        posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 2)
        posix_spawn_file_actions_addclose(&actions, pipeFDs[0])
        var env = environment
        var i = 0
        while let entry = environ[i] {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "="), env[String(s[..<eq])] == nil { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            i += 1
        }
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            cArgs.forEach { free($0) }
            cEnv.forEach { free($0) }
            posix_spawn_file_actions_destroy(&actions)
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, cArgs, cEnv)
        Glibc.close(pipeFDs[1])
        if rc != 0 {
            Glibc.close(pipeFDs[0])
            return (-1, "spawn \(argv[0]) failed: \(rc)")
        }
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = Glibc.read(pipeFDs[0], &buffer, buffer.count)
            if n > 0 { output += buffer[0..<n] } else if n < 0 && errno == EINTR { continue } else { break }
        }
        Glibc.close(pipeFDs[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : -(status & 0x7f)
        return (code, String(decoding: output, as: UTF8.self))
    }
}

/// A child process left running (an agent, a watcher) until ``stop(signal:)``.
public final class ChildProcess: Sendable {
    /// The child's process id.
    public let pid: pid_t
    private let reaped = Mutex<Int32?>(nil)

    /// Starts `argv` (PATH lookup) with stdout and stderr appended to `logPath`.
    ///
    /// - Parameters:
    ///   - argv: the program and its arguments.
    ///   - logPath: the file standard output and error go to.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public init(_ argv: [String], logPath: String) throws(SystemCallError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let cArgs = argv.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, nil, cArgs, environ)
        if rc != 0 { throw SystemCallError(syscall: "posix_spawn", path: FilePath(argv[0]), errno: Errno(rawValue: rc)) }
        self.pid = pid
    }

    /// Sends `signal` and waits for the child; returns its exit status (negative: the signal).
    ///
    /// - Parameter signal: the signal to send first.
    /// - Returns: the exit status (128 + signal when killed).
    @discardableResult
    public func stop(signal: Int32 = SIGTERM) -> Int32 {
        if let done = reaped.withLock({ $0 }) { return done }
        kill(pid, signal)
        return wait()
    }

    /// Sends `signal`, waits up to `grace` for the child to exit, then kills it.
    ///
    /// - Parameters:
    ///   - signal: the signal to send first.
    ///   - grace: how long to wait before `SIGKILL`.
    /// - Returns: the exit status (128 + signal when killed).
    @discardableResult
    public func stop(signal: Int32, grace: Duration) -> Int32 {
        if let done = exitStatus() { return done }
        kill(pid, signal)
        let deadline = Sys.deadline(after: grace)
        while Sys.monotonicNanoseconds() < deadline {
            if let done = exitStatus() { return done }
            usleep(10_000)
        }
        return stop(signal: SIGKILL)
    }

    /// Waits for the child to exit.
    public func wait() -> Int32 {
        if let done = reaped.withLock({ $0 }) { return done }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code = ChildProcess.decode(status)
        reaped.withLock { $0 = code }
        return code
    }

    /// The exit status if the child has exited (reaping it), nil while it runs.
    public func exitStatus() -> Int32? {
        reaped.withLock { (done: inout Int32?) -> Int32? in
            if let done { return done }
            var status: Int32 = 0
            guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
            done = ChildProcess.decode(status)
            return done
        }
    }

    static func decode(_ status: Int32) -> Int32 {
        (status & 0x7f) == 0 ? (status >> 8) & 0xff : -(status & 0x7f)
    }
}
