import FSShareAgentChannel
import FSShareSystem
import Synchronization
import SystemPackage

/// The error every public fsshare operation throws: a code to branch on, a human sentence,
/// and, when the kernel refused something, the syscall, path and errno.
public struct FSShareError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of failure this is: compare with `==` (`error.code == .conflict`). A struct of
    /// static codes rather than an enum, so new kinds of failure can be added without breaking a
    /// caller's exhaustive `switch`; `rawValue` is the stable name printed under `--json`.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name (printed under `--json`).
        public let rawValue: String
        /// A code named `rawValue` (the static members are the ones fsshare throws).
        ///
        /// - Parameter rawValue: the code's name.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The code's name.
        public var description: String { rawValue }

        /// An argument was malformed (an id with `/`, an empty path, ...). Nothing was changed.
        public static let invalidArgument = Code(rawValue: "invalidArgument")
        /// The source must never be shared (under /proc or /sys, a device, socket or FIFO).
        public static let refused = Code(rawValue: "refused")
        /// The sandbox has not been prepared.
        public static let notPrepared = Code(rawValue: "notPrepared")
        /// The same container mount point is already shared with different parameters.
        public static let conflict = Code(rawValue: "conflict")
        /// The kernel lacks something this operation needs.
        public static let unsupported = Code(rawValue: "unsupported")
        /// The sandbox manifest is unreadable or corrupt.
        public static let manifest = Code(rawValue: "manifest")
        /// A system call failed; ``FSShareError/systemCall`` says which.
        public static let systemCall = Code(rawValue: "systemCall")
        /// Cleanup could not remove everything; the message lists what is left.
        public static let incompleteCleanup = Code(rawValue: "incompleteCleanup")
        /// The guest agent could not be reached or refused a request (copy mode).
        public static let agent = Code(rawValue: "agent")
        /// A configured limit or a kernel limit (inotify watches) was reached.
        public static let limitExceeded = Code(rawValue: "limitExceeded")
        /// The calling task was cancelled; what the operation had begun was rolled back.
        public static let cancelled = Code(rawValue: "cancelled")
    }

    /// What kind of failure this is.
    public var code: Code
    /// A sentence saying what failed and why.
    public var message: String
    /// The failing system call, its path and errno, when there is one.
    public var systemCall: SystemCallError?
    /// The agent channel's error, for ``Code/agent``.
    public var agentError: AgentError?

    /// An error of kind `code` saying `message`, with the system call that failed if one did.
    ///
    /// - Parameters:
    ///   - code: the kind of failure.
    ///   - message: the sentence.
    ///   - systemCall: the failed system call, if one did.
    public init(_ code: Code, _ message: String, systemCall: SystemCallError? = nil) {
        self.code = code
        self.message = message
        self.systemCall = systemCall
    }

    /// Wraps a syscall failure with a sentence about the operation it broke.
    ///
    /// - Parameters:
    ///   - what: the operation that broke (`cannot mount ...`).
    ///   - error: the system call's failure.
    /// - Returns: a `systemCall` error.
    public static func system(_ what: String, _ error: SystemCallError) -> FSShareError {
        FSShareError(.systemCall, "\(what): \(error)", systemCall: error)
    }

    /// The sentence (``message``).
    public var description: String { message }

    /// Wraps an agent failure with a sentence about the operation it broke.
    ///
    /// - Parameters:
    ///   - what: the operation that broke.
    ///   - error: the agent channel's error.
    /// - Returns: an `agent` error.
    public static func agent(_ what: String, _ error: AgentError) -> FSShareError {
        var e = FSShareError(.agent, "\(what): \(error.message)")
        e.agentError = error
        return e
    }
}

/// Runs `body`, turning a ``SystemCallError`` into an ``FSShareError`` that says `what` failed.
/// Inlinable: specialised in every caller's module, not run as generic code per syscall.
@inlinable @inline(__always)
package func sys<T>(_ what: @autoclosure () -> String, _ body: () throws(SystemCallError) -> T) throws(FSShareError) -> T {
    do {
        return try body()
    } catch {
        throw FSShareError.system(what(), error)
    }
}

/// Set when the task that started a blocking operation is cancelled; the operation polls it
/// between steps (copy mode: between chunks and entries) and stops with ``FSShareError/Code/cancelled``.
package final class CancellationFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    package init() {}
    package func cancel() { flag.store(true, ordering: .releasing) }
    package var isCancelled: Bool { flag.load(ordering: .acquiring) }

    /// Throws `cancelled` if set, naming what was being done.
    package func check(_ what: @autoclosure () -> String) throws(FSShareError) {
        if isCancelled { throw FSShareError(.cancelled, "cancelled while \(what()); rolled back") }
    }
}
