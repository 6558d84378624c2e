#if canImport(Glibc)
import Glibc
#endif

extension Sys {
    /// Runs a program (PATH lookup), waits, and returns its exit status (negative: killed by
    /// that signal) and its combined stdout and stderr.
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
