#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import SystemPackage

/// Fault injection for the syscall layer: make the Nth call of a named syscall fail with an
/// errno, or kill the process with SIGKILL just before it (a real `kill -9` at a chosen point).
///
/// Rules come from the `FSSHARE_FAULTS` environment variable, read once, or from ``install(_:)``.
/// Syntax: comma-separated `syscall[#n]=ERRNO|kill`, e.g. `move_mount#2=kill,mkdirat=EACCES`.
/// `#n` (1-based) picks the nth call; without it every call matches. A malformed spec is an
/// error: the process says why and exits with status 2. `FSSHARE_FAULT_TRACE=FILE` appends the
/// name of every checked call to FILE, one per line (how a test enumerates every kill point).
///
/// Compiled only into debug (test) builds, where `FSSHARE_FAULT_INJECTION` is defined: a
/// release binary has no way to be killed or failed from its environment, and its check is empty.
public enum FaultInjection {
    /// Whether this build can inject faults at all (false in release builds).
    public static var isCompiledIn: Bool {
        #if FSSHARE_FAULT_INJECTION
        true
        #else
        false
        #endif
    }

    /// What an injected fault does.
    public enum Action: Sendable, Equatable {
        case fail(Errno)
        case kill
    }

    /// One rule: the `occurrence`th call (1-based; nil = every call) of `syscall` does `action`.
    public struct Rule: Sendable, Equatable {
        /// The wrapped call's name (`mount_setattr`, `renameat2`, ...).
        public var syscall: String
        /// Which call to hit (1 = the first); nil: every one.
        public var occurrence: Int?
        /// What happens then.
        public var action: Action
        /// A fault: `action` on the `occurrence`-th call of `syscall` (every call when nil).
        ///
        /// - Parameters:
        ///   - syscall: the call's name.
        ///   - occurrence: which call (1 = the first); nil: every one.
        ///   - action: what happens then.
        public init(syscall: String, occurrence: Int? = nil, action: Action) {
            self.syscall = syscall
            self.occurrence = occurrence
            self.action = action
        }
    }

    private struct State: ~Copyable {
        var rules: [Rule] = []
        var counts: [String: Int] = [:]
        var loadedEnvironment = false
        var trace: Int32 = -1
    }

    private static let enabled = Atomic<Int>(-1)  // -1 = not yet read from the environment
    private static let state = Mutex(State())

    /// Replaces the installed rules (and resets the call counters).
    ///
    /// - Parameter rules: the faults to inject.
    public static func install(_ rules: [Rule]) {
        state.withLock { s in
            s.rules = rules
            s.counts = [:]
            s.loadedEnvironment = true
        }
        enabled.store(rules.isEmpty ? 0 : 1, ordering: .releasing)
    }

    /// Parses the `FSSHARE_FAULTS` syntax. Returns nil on a malformed spec.
    ///
    /// - Parameter spec: `FSSHARE_FAULTS` text: `syscall[#n]=action` separated by commas.
    /// - Returns: the rules, or nil for a malformed specification.
    public static func parse(_ spec: String) -> [Rule]? {
        var rules: [Rule] = []
        for item in spec.split(separator: ",") where !item.isEmpty {
            let parts = item.split(separator: "=", maxSplits: 1)
            guard parts.count == 2 else { return nil }
            let lhs = parts[0].split(separator: "#", maxSplits: 1)
            let name = String(lhs[0])
            var occurrence: Int?
            if lhs.count == 2 {
                guard let n = Int(lhs[1]), n > 0 else { return nil }
                occurrence = n
            }
            let rhs = String(parts[1])
            let action: Action
            if rhs == "kill" {
                action = .kill
            } else if let code = errnoNames[rhs] {
                action = .fail(Errno(rawValue: code))
            } else if let code = Int32(rhs) {
                action = .fail(Errno(rawValue: code))
            } else {
                return nil
            }
            rules.append(Rule(syscall: name, occurrence: occurrence, action: action))
        }
        return rules
    }

    private static let errnoNames: [String: Int32] = [
        "EPERM": EPERM, "ENOENT": ENOENT, "EIO": EIO, "EACCES": EACCES, "EBUSY": EBUSY,
        "EEXIST": EEXIST, "EINVAL": EINVAL, "ENOSPC": ENOSPC, "ENOSYS": ENOSYS, "EMFILE": EMFILE,
        "ENOMEM": ENOMEM, "EROFS": EROFS, "ENOTDIR": ENOTDIR, "ELOOP": ELOOP, "EXDEV": EXDEV,
    ]

    /// Called by every wrapper before the real call. Throws the injected error, kills the
    /// process, or returns to let the real call run.
    @inline(__always)
    static func check(_ syscall: StaticString, _ path: @autoclosure () -> FilePath?) throws(SystemCallError) {
        #if FSSHARE_FAULT_INJECTION
        let flag = enabled.load(ordering: .relaxed)
        if flag == 0 { return }
        try slowCheck(syscall, path(), flag)
        #endif
    }

    @inline(never)
    private static func slowCheck(_ syscall: StaticString, _ path: FilePath?, _ flag: Int) throws(SystemCallError) {
        if flag < 0 { loadEnvironment() }
        let name = syscall.description
        let action: Action? = state.withLock { s in
            if s.trace >= 0 {
                let line = Array((name + "\n").utf8)
                _ = line.withUnsafeBytes { Glibc.write(s.trace, $0.baseAddress, $0.count) }
            }
            guard !s.rules.isEmpty else { return nil }
            let n = (s.counts[name] ?? 0) + 1
            s.counts[name] = n
            return s.rules.first { $0.syscall == name && ($0.occurrence == nil || $0.occurrence == n) }?.action
        }
        switch action {
        case nil: return
        case .fail(let errno): throw SystemCallError(syscall: name, path: path, errno: errno)
        case .kill:
            // A real SIGKILL: no cleanup handlers, no atexit, exactly like `kill -9`.
            _ = Glibc.kill(getpid(), SIGKILL)
            while true { pause() }
        }
    }

    private static func loadEnvironment() {
        let active: Bool = state.withLock { s in
            if s.loadedEnvironment { return !s.rules.isEmpty || s.trace >= 0 }
            s.loadedEnvironment = true
            if let raw = getenv("FSSHARE_FAULTS") {
                let spec = String(cString: raw)
                guard let parsed = parse(spec) else {
                    // A test that asked for a fault and silently got none would pass by accident.
                    let message = Array("fsshare: FSSHARE_FAULTS=\"\(spec)\" is malformed (expected syscall[#n]=ERRNO|kill, comma-separated)\n".utf8)
                    _ = message.withUnsafeBytes { Glibc.write(2, $0.baseAddress, $0.count) }
                    Glibc._exit(2)
                }
                s.rules = parsed
            }
            if let raw = getenv("FSSHARE_FAULT_TRACE") {
                s.trace = Glibc.open(raw, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            }
            return !s.rules.isEmpty || s.trace >= 0
        }
        enabled.store(active ? 1 : 0, ordering: .releasing)
    }
}
