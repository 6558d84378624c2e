/// A failure talking to the guest agent, with a sentence a person can act on.
public struct AgentError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What kind of failure: compare with `==`. Static members of a struct rather than enum
    /// cases, so new kinds can be added without breaking a caller's exhaustive `switch`.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
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

    public var code: Code
    public var message: String
    /// For ``Code/remote``: the gRPC status code the agent returned (12 = UNIMPLEMENTED).
    public var status: Int32?

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

    public var description: String { message }
}

/// The gRPC status codes ttrpc carries (google.rpc.Code).
public enum GRPCStatus {
    public static let ok: Int32 = 0
    public static let invalidArgument: Int32 = 3
    public static let notFound: Int32 = 5
    public static let alreadyExists: Int32 = 6
    public static let permissionDenied: Int32 = 7
    public static let resourceExhausted: Int32 = 8
    public static let failedPrecondition: Int32 = 9
    public static let aborted: Int32 = 10
    public static let unimplemented: Int32 = 12
    public static let `internal`: Int32 = 13
}
