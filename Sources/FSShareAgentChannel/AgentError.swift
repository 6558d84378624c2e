/// A failure talking to the guest agent, with a sentence a person can act on.
public struct AgentError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of failure: compare with `==`. Static members of a struct rather than enum
    /// cases, so new kinds can be added without breaking a caller's exhaustive `switch`.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name.
        public let rawValue: String
        /// A code named `rawValue` (the static members are the ones the channel throws).
        ///
        /// - Parameter rawValue: the code's name.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The code's name.
        public var description: String { rawValue }

        /// The address cannot be parsed.
        public static let invalidAddress = Code(rawValue: "invalid-address")
        /// The agent cannot be reached (connect, handshake or open failed).
        public static let unreachable = Code(rawValue: "unreachable")
        /// No reply within the call's timeout; the connection is dropped.
        public static let timeout = Code(rawValue: "timeout")
        /// The connection broke mid-call (reset, EOF, write error).
        public static let disconnected = Code(rawValue: "disconnected")
        /// The peer sent something that is not valid ttrpc.
        public static let protocolError = Code(rawValue: "protocol")
        /// The agent answered with a non-OK status (see ``AgentError/status``).
        public static let remote = Code(rawValue: "remote")
    }

    /// What kind of failure: transport (`unreachable`, `timeout`, `disconnected`, `protocol`) or a refusal (`remote`).
    public var code: Code
    /// A sentence saying what failed, with the agent's own message for refusals.
    public var message: String
    /// For ``Code/remote``: the gRPC status code the agent returned (12 = UNIMPLEMENTED).
    public var status: Int32?

    /// An error of kind `code` saying `message`; `status` is the gRPC status of a refusal.
    ///
    /// - Parameters:
    ///   - code: the kind of failure.
    ///   - message: the sentence.
    ///   - status: the gRPC status of a refusal.
    public init(_ code: Code, _ message: String, status: Int32? = nil) {
        self.code = code
        self.message = message
        self.status = status
    }

    /// The agent does not serve the method: `UNIMPLEMENTED` (containerd's Go ttrpc,
    /// fsshare-agent) or Kata's agent's answer for a service it lacks, `INVALID_ARGUMENT`
    /// "… does not exist" (ttrpc-rust's server).
    public var isUnimplemented: Bool {
        guard code == .remote else { return false }
        if status == GRPCStatus.unimplemented { return true }
        return status == GRPCStatus.invalidArgument && message.hasSuffix("does not exist")
    }

    /// The sentence (``message``).
    public var description: String { message }
}

/// The gRPC status codes ttrpc carries (google.rpc.Code).
public enum GRPCStatus {
    /// Success.
    public static let ok: Int32 = 0
    /// A malformed request (Kata's agent also answers it for a service it does not have).
    public static let invalidArgument: Int32 = 3
    /// The path or object does not exist.
    public static let notFound: Int32 = 5
    /// The path or object exists already.
    public static let alreadyExists: Int32 = 6
    /// Refused: the request would leave the share (an escaping link or path).
    public static let permissionDenied: Int32 = 7
    /// The agent is out of something (connections, space).
    public static let resourceExhausted: Int32 = 8
    /// The guest is not ready for it (a read-only or not yet mounted target).
    public static let failedPrecondition: Int32 = 9
    /// Not applied because an earlier request of its batch failed.
    public static let aborted: Int32 = 10
    /// The agent does not have this method.
    public static let unimplemented: Int32 = 12
    /// The agent failed for a reason of its own.
    public static let `internal`: Int32 = 13
}
