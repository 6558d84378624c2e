#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SwiftProtobuf
import Synchronization
import SystemPackage

/// A ttrpc client for the guest agent: Kata's `grpc.AgentService/CopyFile` and fsshare's
/// `fsshare.GuestFiles`.
///
/// Calls are serialised on one connection, opened on first use. A call that fails on the
/// transport (EOF, reset, timeout) drops the connection; the next call reconnects, and a call
/// whose request may not have reached the agent is retried once on a fresh connection (every
/// fsshare request is idempotent: a chunk at an offset, a mkdir, a rename that already happened
/// fails harmlessly).
///
/// ```swift
/// let agent = AgentClient(address: try AgentAddress(parsing: "unix:/run/vm/agent.sock"))
/// try agent.copyFile(request)
/// ```
public final class AgentClient: Sendable {
    /// Where the agent listens.
    public let address: AgentAddress
    /// Per-call timeout (Kata's default for CopyFile is 60 s).
    public let callTimeout: Duration
    /// Time allowed to connect (and to finish the hybrid-vsock handshake).
    public let connectTimeout: Duration

    private struct State: ~Copyable {
        var stream: FrameStream?
        var nextStreamID: UInt32 = 1
        var reconnects = 0
        /// The agent's GetInfo features, learnt once per connection (nil: not asked yet).
        var features: Set<String>?
    }
    private let state: Mutex<State>

    /// A client for `address`; nothing is opened until the first call.
    ///
    /// - Parameters:
    ///   - address: where the agent listens.
    ///   - callTimeout: how long one call may take.
    ///   - connectTimeout: how long connecting (and the hybrid-vsock handshake) may take.
    public init(address: AgentAddress, callTimeout: Duration = .seconds(60), connectTimeout: Duration = .seconds(5)) {
        self.address = address
        self.callTimeout = callTimeout
        self.connectTimeout = connectTimeout
        self.state = Mutex(State())
        self.adopted = false
    }

    /// A client over an already-open byte stream (for example a pty master); it cannot reconnect.
    ///
    /// - Parameters:
    ///   - fd: the open stream; the client owns it from now on.
    ///   - name: how it is shown in messages.
    ///   - callTimeout: how long one call may take.
    public init(adopting fd: FileDescriptor, name: String, callTimeout: Duration = .seconds(60)) {
        self.address = .serial(FilePath(name))
        self.callTimeout = callTimeout
        self.connectTimeout = .seconds(5)
        var s = State()
        s.stream = FrameStream(fd: fd, name: name)
        self.state = Mutex(s)
        self.adopted = true
    }
    private let adopted: Bool

    /// How many times the client had to reconnect (for logs and tests).
    public var reconnectCount: Int { state.withLock { $0.reconnects } }

    /// Drops the connection (the next call reconnects).
    public func disconnect() {
        state.withLock { s in
            s.stream?.close()
            s.stream = nil
        }
    }

    // MARK: - Calls

    /// `grpc.AgentService/CopyFile`.
    ///
    /// - Parameter request: one file, directory, link or chunk.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func copyFile(_ request: Grpc_CopyFileRequest) throws(AgentError) {
        _ = try call(TTRPC.agentService, TTRPC.copyFileMethod, request)
    }

    /// `fsshare.GuestFiles/GetInfo`. Throws with ``AgentError/isUnimplemented`` on a Kata agent.
    ///
    /// - Returns: the agent's name, version and features.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func info() throws(AgentError) -> Fsshare_InfoResponse {
        let bytes = try call(TTRPC.guestFilesService, "GetInfo", Fsshare_InfoRequest())
        do {
            return try Fsshare_InfoResponse(serializedBytes: bytes)
        } catch {
            throw AgentError(.protocolError, "the agent at \(address) sent an undecodable GetInfo reply: \(error)")
        }
    }

    /// The operations the agent serves (GetInfo's `features`, asked once per connection): a Kata
    /// agent, which lacks `fsshare.GuestFiles`, serves only `CopyFile`.
    ///
    /// - Returns: the method names it serves.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func features() throws(AgentError) -> Set<String> {
        if let known = state.withLock({ $0.features }) { return known }
        var found: Set<String>
        do {
            found = Set(try info().features)
        } catch {
            guard error.isUnimplemented else { throw error }
            found = [TTRPC.copyFileMethod]
        }
        state.withLock { $0.features = found }
        return found
    }

    /// `fsshare.GuestFiles/RemovePath`.
    ///
    /// - Parameters:
    ///   - path: the guest path (inside the agent's share directory).
    ///   - recursive: remove a directory with its contents.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func removePath(_ path: String, recursive: Bool) throws(AgentError) {
        var r = Fsshare_RemovePathRequest()
        r.path = path
        r.recursive = recursive
        _ = try call(TTRPC.guestFilesService, "RemovePath", r)
    }

    /// `fsshare.GuestFiles/RenamePath`.
    ///
    /// - Parameters:
    ///   - from: the guest path to move.
    ///   - to: where it goes (replaced atomically if it exists).
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func renamePath(from: String, to: String) throws(AgentError) {
        var r = Fsshare_RenamePathRequest()
        r.from = from
        r.to = to
        _ = try call(TTRPC.guestFilesService, "RenamePath", r)
    }

    /// `fsshare.GuestFiles/PruneDirectory`.
    ///
    /// - Parameters:
    ///   - path: the guest directory.
    ///   - keep: the entries to keep; every other entry is removed.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func pruneDirectory(_ path: String, keep: [String]) throws(AgentError) {
        var r = Fsshare_PruneDirectoryRequest()
        r.path = path
        r.keep = keep
        _ = try call(TTRPC.guestFilesService, "PruneDirectory", r)
    }

    /// Kata's `CreateSandbox` with the sandbox-level storages (the shared filesystem, shm): the
    /// agent mounts them before any container is created.
    ///
    /// - Parameters:
    ///   - id: the sandbox id.
    ///   - storages: what the agent mounts for the sandbox.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func createSandbox(id: String, storages: [Grpc_Storage]) throws(AgentError) {
        var r = Grpc_CreateSandboxRequest()
        r.sandboxID = id
        r.storages = storages
        _ = try call(TTRPC.agentService, TTRPC.createSandboxMethod, r)
    }

    /// Kata's `CreateContainer`, carrying only the container's storages (what fsshare's
    /// descriptors feed; a runtime sends its OCI spec too).
    ///
    /// - Parameters:
    ///   - id: the container id.
    ///   - storages: what the agent mounts for the container.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func createContainer(id: String, storages: [Grpc_Storage]) throws(AgentError) {
        var r = Grpc_CreateContainerRequest()
        r.containerID = id
        r.storages = storages
        _ = try call(TTRPC.agentService, TTRPC.createContainerMethod, r)
    }

    /// Kata's `RemoveContainer`: the agent drops what the container's storages made.
    ///
    /// - Parameter id: the container id.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func removeContainer(id: String) throws(AgentError) {
        var r = Grpc_RemoveContainerRequest()
        r.containerID = id
        _ = try call(TTRPC.agentService, TTRPC.removeContainerMethod, r)
    }

    /// Kata's `DestroySandbox`: the agent unmounts what `CreateSandbox` mounted.
    ///
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func destroySandbox() throws(AgentError) {
        _ = try call(TTRPC.agentService, TTRPC.destroySandboxMethod, Grpc_DestroySandboxRequest())
    }

    /// One unary call: sends `message` to `service/method`, returns the reply payload.
    ///
    /// - Parameters:
    ///   - service: the ttrpc service (`grpc.AgentService`, ...).
    ///   - method: the method name.
    ///   - message: the request.
    /// - Returns: the encoded reply.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func call(_ service: String, _ method: String, _ message: some SwiftProtobuf.Message) throws(AgentError) -> [UInt8] {
        let payload: [UInt8]
        do {
            payload = try message.serializedBytes()
        } catch {
            throw AgentError(.protocolError, "cannot encode \(service)/\(method): \(error)")
        }
        return try call(service, method, payload: payload)
    }

    /// One unary call with an already-encoded request.
    ///
    /// - Parameters:
    ///   - service: the ttrpc service.
    ///   - method: the method name.
    ///   - payload: the encoded request.
    /// - Returns: the encoded reply.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
    public func call(_ service: String, _ method: String, payload: [UInt8]) throws(AgentError) -> [UInt8] {
        try state.withLock { (s: inout State) throws(AgentError) -> [UInt8] in
            var attempt = 0
            while true {
                attempt += 1
                let fresh = s.stream == nil
                let stream = try connected(&s)
                do throws(AgentError) {
                    return try exchange(stream, &s, service, method, payload)
                } catch {
                    // A remote status is an answer read whole: the stream is in step and stays
                    // (closing it would make a Kata agent's UNIMPLEMENTED GetInfo cost a
                    // reconnect and a new GetInfo on every pipeline).
                    if error.code == .remote { throw error }
                    stream.close()
                    s.stream = nil
                    // A timeout may mean the agent is busy applying the request, so do not
                    // resend it.
                    if error.code == .protocolError || error.code == .timeout || adopted { throw error }
                    if fresh || attempt > 1 { throw error }
                    s.reconnects += 1
                }
            }
        }
    }

    private func connected(_ s: inout State) throws(AgentError) -> FrameStream {
        if let stream = s.stream { return stream }
        if adopted { throw AgentError(.disconnected, "the stream to \(address) is closed") }
        let stream = try AgentClient.open(address, timeout: connectTimeout)
        s.stream = stream
        s.nextStreamID = 1
        s.features = nil
        return stream
    }

    private func exchange(_ stream: FrameStream, _ s: inout State, _ service: String, _ method: String, _ payload: [UInt8]) throws(AgentError) -> [UInt8] {
        let bytes = try envelope(service, method, Data(payload))
        let id = s.nextStreamID
        s.nextStreamID &+= 2
        try stream.write(TTRPCFrame(streamID: id, type: TTRPC.typeRequest, payload: bytes), deadline: deadline())
        return try readReply(stream, id: id, what: "\(service)/\(method)")
    }

    /// The `ttrpc.Request` bytes for one call.
    func envelope(_ service: String, _ method: String, _ payload: Data, batch: String? = nil) throws(AgentError) -> [UInt8] {
        var (request, after) = envelopeFields(service, method, batch: batch)
        request.payload = payload
        request.timeoutNano = after.timeoutNano
        request.metadata = after.metadata
        return try encode(request, service, method)
    }

    /// The envelope without its payload, split where the payload goes: the fields before it
    /// (service, method) and after it (timeout, batch metadata), each encoded by swift-protobuf.
    /// With the payload field between them, the bytes are exactly ``envelope(_:_:_:batch:)``'s
    /// (swift-protobuf writes fields in number order; the payload is field 3 of 5).
    func envelopeParts(_ service: String, _ method: String, batch: String?) throws(AgentError) -> (head: [UInt8], tail: [UInt8]) {
        let (head, tail) = envelopeFields(service, method, batch: batch)
        return (try encode(head, service, method), try encode(tail, service, method))
    }

    /// The envelope's fields other than the payload: those before it and those after it.
    private func envelopeFields(_ service: String, _ method: String, batch: String?) -> (before: Ttrpc_Request, after: Ttrpc_Request) {
        var before = Ttrpc_Request()
        before.service = service
        before.method = method
        var after = Ttrpc_Request()
        after.timeoutNano = callTimeoutNanos
        if let batch {
            var kv = Ttrpc_KeyValue()
            kv.key = TTRPC.batchMetadataKey
            kv.value = batch
            after.metadata = [kv]
        }
        return (before, after)
    }

    private func encode(_ request: Ttrpc_Request, _ service: String, _ method: String) throws(AgentError) -> [UInt8] {
        do {
            return try request.serializedBytes()
        } catch {
            throw AgentError(.protocolError, "cannot encode \(service)/\(method): \(error)")
        }
    }

    var callTimeoutNanos: Int64 {
        Int64(callTimeout.nanoseconds)
    }

    /// The monotonic deadline of a call starting now.
    func deadline() -> UInt64 { Sys.monotonicNanoseconds() + UInt64(max(callTimeoutNanos, 0)) }

    /// Reads the reply to stream `id`, the only request in flight (a unary call); a non-OK
    /// status becomes a ``AgentError/Code/remote`` error.
    func readReply(_ stream: FrameStream, id: UInt32, what: String) throws(AgentError) -> [UInt8] {
        let frame = try readResponseFrame(stream, what: what)
        // One request is in flight and a timed-out call drops the connection, so a reply to
        // any other stream is a protocol error.
        guard frame.streamID == id else {
            throw AgentError(.protocolError, "the agent at \(address) answered stream \(frame.streamID), expected \(id)")
        }
        return try decodeReply(frame, what: what)
    }

    /// The next response frame on the connection, whichever stream it answers.
    func readResponseFrame(_ stream: FrameStream, what: String) throws(AgentError) -> TTRPCFrame {
        guard let frame = try stream.readFrame(deadline: deadline()) else {
            throw AgentError(.disconnected, "the agent at \(address) closed the connection during \(what)")
        }
        guard frame.type == TTRPC.typeResponse else {
            throw AgentError(.protocolError, "the agent at \(address) sent frame type \(frame.type) for a unary call")
        }
        return frame
    }

    /// The payload of a response frame; a non-OK status becomes a ``AgentError/Code/remote`` error.
    func decodeReply(_ frame: TTRPCFrame, what: String) throws(AgentError) -> [UInt8] {
        let response: Ttrpc_Response
        do {
            response = try Ttrpc_Response(serializedBytes: frame.payload)
        } catch {
            throw AgentError(.protocolError, "the agent at \(address) sent an undecodable ttrpc response: \(error)")
        }
        if response.hasStatus && response.status.code != GRPCStatus.ok {
            let msg = response.status.message
            throw AgentError(
                .remote, "the agent at \(address) refused \(what): \(msg.isEmpty ? "status \(response.status.code)" : msg)",
                status: response.status.code)
        }
        return Array(response.payload)
    }

    // MARK: - Transports

    /// Opens a byte stream to `address` (connect, handshake, or open + raw mode).
    ///
    /// - Parameters:
    ///   - address: where the agent listens.
    ///   - timeout: how long connecting may take.
    /// - Returns: the connected stream.
    /// - Throws: `unreachable` or `timeout`.
    public static func open(_ address: AgentAddress, timeout: Duration) throws(AgentError) -> FrameStream {
        let name = address.description
        do {
            switch address {
            case .unix(let path):
                return FrameStream(fd: try Sys.connectUnix(path), name: name)
            case .vsock(let cid, let port):
                return FrameStream(fd: try Sys.connectVsock(cid: cid, port: port), name: name)
            case .serial(let path):
                let fd = try Sys.openat(nil, path, flags: O_RDWR | O_NOCTTY)
                do {
                    try Sys.makeRaw(fd, path: path)
                } catch {
                    Sys.close(fd)
                    throw error
                }
                return FrameStream(fd: fd, name: name)
            case .hybridVsock(let path, let port):
                let stream = FrameStream(fd: try Sys.connectUnix(path), name: name)
                let deadline = Sys.deadline(after: timeout)
                try stream.write(Array("CONNECT \(port)\n".utf8), deadline: deadline)
                let line = try stream.readLine(deadline: deadline)
                guard line.hasPrefix("OK") else {
                    throw AgentError(.unreachable, "the hybrid-vsock muxer at \(path) refused port \(port): \"\(line.prefix(80))\"")
                }
                return stream
            }
        } catch let e as AgentError {
            throw e
        } catch {
            throw AgentError(.unreachable, "cannot reach the agent at \(name): \(error)")
        }
    }
}

extension AgentClient {
    /// A window of requests in flight on the client's connection: requests are written
    /// back to back and their replies read later, so a copy of many small entries pays one
    /// round trip per ``Pipeline/flush()`` rather than one per entry. Replies are matched to requests
    /// by stream id, in whatever order they come (Kata's agent and containerd's ttrpc server
    /// serve each request concurrently). Bounded: at most `maxInFlight` requests or `maxBytes`
    /// of request data are outstanding before the window waits for replies.
    ///
    /// Whether the agent *applies* requests in the order they were sent is learnt once per
    /// connection (fsshare-agent says so with the ``TTRPC/orderedFeature`` feature; a Kata agent
    /// does not): ``Pipeline/isOrdered``. Senders mark dependent steps with
    /// ``Pipeline/barrier()`` and ``Pipeline/claim(_:)``, which wait for replies only when the
    /// agent does not keep the order.
    ///
    /// The window holds the client's lock for its whole lifetime (`withPipeline`).
    ///
    /// - Parameter body: sends requests through the pipeline; what it returns is returned.
    /// - Returns: what `body` returned, once every reply has arrived.
    /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status). The first refusal not tolerated is thrown after every reply has arrived.
    public func withPipeline<T>(_ body: (inout Pipeline) throws(AgentError) -> T) throws(AgentError) -> T {
        // Asked before the lock is taken (it is a call of its own); cached per connection.
        let ordered = try features().contains(TTRPC.orderedFeature)
        return try state.withLock { (s: inout State) throws(AgentError) -> T in
            let stream = try connected(&s)
            var pipeline = Pipeline(client: self, stream: stream, nextStreamID: s.nextStreamID, ordered: ordered)
            do throws(AgentError) {
                let result = try body(&pipeline)
                try pipeline.flush()
                s.nextStreamID = pipeline.nextStreamID
                return result
            } catch {
                // A refusal, or the caller's own error (a cancelled copy): the stream is sound.
                // Wait for the replies still pending, so nothing sent in this window is applied
                // after the caller's next step (a rollback's removal would otherwise be overtaken
                // by a CopyFile still in flight, which recreates what it removed).
                var settled = false
                if error.code == .remote {
                    do throws(AgentError) {
                        try pipeline.flush()
                        settled = true
                    } catch let drained {
                        settled = drained.code == .remote
                    }
                }
                if settled {
                    s.nextStreamID = pipeline.nextStreamID
                } else {
                    // A transport failure: the stream's state is unknown. Start over next time.
                    stream.close()
                    s.stream = nil
                }
                throw error
            }
        }
    }

    /// See ``AgentClient/withPipeline(_:)``.
    public struct Pipeline: ~Copyable {
        let client: AgentClient
        let stream: FrameStream
        var nextStreamID: UInt32
        /// The agent applies the requests of one connection in the order they were sent.
        public let isOrdered: Bool
        private var pending: [(id: UInt32, bytes: Int, onError: ((AgentError) -> AgentError?)?)] = []
        private var pendingBytes = 0
        /// Guest paths that requests in flight since the last barrier may touch (``claim(_:)``).
        private var claimed: Set<String> = []
        /// Requests in flight at most before the next send waits for a reply.
        public var maxInFlight = 128
        /// Request bytes in flight at most (ttrpc's 4 MiB message limit) before the next send waits.
        public var maxBytes = 4 << 20
        /// Requests are queued and written in bursts of up to this many bytes (and before the
        /// window waits for a reply): one write and one wakeup of the agent per burst.
        static let burstBytes = 64 << 10
        /// The batch every request sent from now on belongs to (see ``beginBatch()``).
        public private(set) var batch: String?
        /// Remote refusals that a request's handler chose to tolerate.
        public private(set) var tolerated: [AgentError] = []

        init(client: AgentClient, stream: FrameStream, nextStreamID: UInt32, ordered: Bool) {
            self.client = client
            self.stream = stream
            self.nextStreamID = nextStreamID
            self.isOrdered = ordered
        }

        /// Marks a dependency: what is sent after this must be applied after what was sent
        /// before it. With an agent that keeps the order this costs nothing; with one that
        /// does not, it waits for every outstanding reply.
        ///
        /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
        public mutating func barrier() throws(AgentError) {
            if isOrdered { return }
            try flush()
        }

        /// Declares the guest paths the next request touches (its target and any temp file the
        /// agent makes beside it). With an agent that does not keep the order, a request that
        /// touches a path another request in flight touches first waits for the replies.
        ///
        /// - Parameter paths: guest paths the next request touches.
        /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
        public mutating func claim(_ paths: [String]) throws(AgentError) {
            if isOrdered { return }
            if paths.contains(where: claimed.contains) { try flush() }
            claimed.formUnion(paths)
        }

        /// Makes the requests sent from now on one batch: if one of them fails, the agent
        /// refuses the rest (they fail with ABORTED) instead of applying them, so a later step
        /// never runs on a failed earlier one and no round trip is needed between them. Needs
        /// an agent that honours ``TTRPC/batchMetadataKey`` (fsshare-agent); check with
        /// ``AgentClient/info()`` first.
        public mutating func beginBatch() {
            batch = String(nextStreamID)
        }

        /// Sends one request. `onError` sees a remote refusal of this request and returns nil
        /// to tolerate it (it is collected in ``tolerated``) or an error to fail the window.
        ///
        /// - Parameters:
        ///   - service: the ttrpc service.
        ///   - method: the method name.
        ///   - message: the request.
        ///   - onError: sees this request's refusal; nil tolerates it.
        /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
        public mutating func send(
            _ service: String, _ method: String, _ message: some SwiftProtobuf.Message,
            onError: ((AgentError) -> AgentError?)? = nil
        ) throws(AgentError) {
            let body: Data
            do {
                body = try message.serializedBytes()
            } catch {
                throw AgentError(.protocolError, "cannot encode \(service)/\(method): \(error)")
            }
            let payload = try client.envelope(service, method, body, batch: batch)
            while pending.count >= maxInFlight || (pendingBytes + payload.count > maxBytes && !pending.isEmpty) {
                try receiveOne()
            }
            let id = nextStreamID
            nextStreamID &+= 2
            try stream.queue(TTRPCFrame(streamID: id, type: TTRPC.typeRequest, payload: payload))
            if stream.queuedBytes >= Pipeline.burstBytes { try stream.flushOutput(deadline: client.deadline()) }
            pending.append((id, payload.count, onError))
            pendingBytes += payload.count
        }

        /// Sends one request whose last field, length-delimited field `field` (a CopyFile
        /// chunk's `data`), holds the first `count` bytes of `buffer`'s ``BulkFrame/data``,
        /// already in place: `message` (its other fields, `field` unset) and the envelope are
        /// written around them and the frame goes out in one write, with no copy of the content.
        /// The bytes on the wire are those ``send(_:_:_:onError:)`` would write with the field set.
        ///
        /// - Parameters:
        ///   - service: the ttrpc service.
        ///   - method: the method name.
        ///   - message: the request without `field`.
        ///   - field: the number of the request's last field, a `bytes` field.
        ///   - buffer: holds the field's content.
        ///   - count: bytes of content.
        ///   - onError: sees this request's refusal; nil tolerates it.
        /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
        public mutating func sendBulk(
            _ service: String, _ method: String, _ message: some SwiftProtobuf.Message, field: UInt32,
            in buffer: BulkFrame, count: Int, onError: ((AgentError) -> AgentError?)? = nil
        ) throws(AgentError) {
            guard count >= 0, count <= buffer.capacity else {
                throw AgentError(.protocolError, "\(count) bytes of content in a \(buffer.capacity)-byte buffer")
            }
            var inner: [UInt8]
            do {
                inner = try message.serializedBytes()
            } catch {
                throw AgentError(.protocolError, "cannot encode \(service)/\(method): \(error)")
            }
            // proto3 leaves an empty field out (as swift-protobuf does): same bytes either way.
            if count > 0 { ProtoWire.appendBytesHeader(field: field, length: count, to: &inner) }
            let (head, tail) = try client.envelopeParts(service, method, batch: batch)
            // The frame header (length and stream id filled in below), the envelope up to its
            // payload, the request up to the content.
            var prefix = [UInt8](repeating: 0, count: TTRPC.headerLength)
            prefix.reserveCapacity(TTRPC.headerLength + head.count + 16 + inner.count)
            prefix[8] = TTRPC.typeRequest
            prefix += head
            if inner.count + count > 0 { ProtoWire.appendBytesHeader(field: TTRPC.requestPayloadField, length: inner.count + count, to: &prefix) }
            prefix += inner
            let length = prefix.count - TTRPC.headerLength + count + tail.count
            guard length <= TTRPC.maxMessageLength else {
                throw AgentError(.protocolError, "a \(length)-byte message exceeds ttrpc's \(TTRPC.maxMessageLength)-byte limit")
            }
            while pending.count >= maxInFlight || (pendingBytes + length > maxBytes && !pending.isEmpty) {
                try receiveOne()
            }
            let id = nextStreamID
            nextStreamID &+= 2
            for i in 0..<4 {
                prefix[i] = UInt8(truncatingIfNeeded: UInt32(length) >> (24 - 8 * i))
                prefix[4 + i] = UInt8(truncatingIfNeeded: id >> (24 - 8 * i))
            }
            if let frame = buffer.frame(prefix: prefix, count: count, suffix: tail) {
                try stream.writeEncodedFrame(frame, deadline: client.deadline())
            } else {
                // Fields too large for the buffer's room (a very long path): copied, as send does.
                var payload = Array(prefix[TTRPC.headerLength...])
                payload += UnsafeRawBufferPointer(rebasing: buffer.data[0..<count])
                payload += tail
                try stream.queue(TTRPCFrame(streamID: id, type: TTRPC.typeRequest, payload: payload))
            }
            pending.append((id, length, onError))
            pendingBytes += length
        }

        /// Waits for every outstanding reply; throws the first refusal not tolerated.
        ///
        /// - Throws: `AgentError`: a transport failure (`unreachable`, `timeout`, `disconnected`, `protocol`) or the agent's refusal (`remote`, with its gRPC status).
        public mutating func flush() throws(AgentError) {
            try stream.flushOutput(deadline: client.deadline())
            claimed.removeAll(keepingCapacity: true)
            var first: AgentError?
            while !pending.isEmpty {
                do throws(AgentError) {
                    try receiveOne()
                } catch {
                    // Keep reading replies after a refusal so the stream stays in step.
                    if error.code != .remote { throw error }
                    if first == nil { first = error }
                }
            }
            if let first { throw first }
        }

        /// Reads one reply, whichever request it answers.
        private mutating func receiveOne() throws(AgentError) {
            try stream.flushOutput(deadline: client.deadline())
            let frame = try client.readResponseFrame(stream, what: "a pipelined request")
            guard let index = pending.firstIndex(where: { $0.id == frame.streamID }) else {
                throw AgentError(.protocolError, "the agent at \(client.address) answered stream \(frame.streamID), which no request in flight has")
            }
            let (_, bytes, onError) = pending.remove(at: index)
            pendingBytes -= bytes
            do throws(AgentError) {
                _ = try client.decodeReply(frame, what: "a pipelined request")
            } catch {
                guard error.code == .remote, let onError else { throw error }
                if let failure = onError(error) { throw failure }
                tolerated.append(error)
            }
        }
    }
}
