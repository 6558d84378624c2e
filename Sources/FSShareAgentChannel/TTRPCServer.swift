#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
import FSShareProto
import FSShareSystem
import SwiftProtobuf
import SystemPackage

/// The server half of a ttrpc connection: reads requests, hands each to `handler`, writes the
/// reply on the request's stream. Requests are served in order, one at a time. Replies to a
/// burst of requests that arrived together are written together, when no whole request is left
/// in the input buffer. Requests of a failed batch (``TTRPC/batchMetadataKey``) are refused.
public enum TTRPCServer {
    /// What a handler returns: the reply payload, or a gRPC status code and message.
    public enum Reply: Sendable {
        case ok([UInt8])
        case failure(Int32, String)
    }

    /// Serves `stream` until the peer closes it, a protocol error, or `wake` becomes readable.
    /// Returns why it stopped (nil: the peer closed the connection cleanly).
    ///
    /// - Parameters:
    ///   - stream: the connection.
    ///   - wake: a descriptor whose readability ends serving.
    ///   - handler: answers one request (service, method, encoded request). The payload points
    ///     into the stream's buffer and is valid only during the call.
    public static func serve(
        _ stream: FrameStream, wake: FileDescriptor? = nil,
        handler: (_ service: String, _ method: String, _ payload: UnsafeRawBufferPointer) -> Reply
    ) -> AgentError? {
        // The batch whose requests are refused from now on (one of its requests failed).
        var abortedBatch: String?
        while true {
            let frame: TTRPCFrameView
            do {
                guard let f = try stream.readFrameView(deadline: nil, wake: wake) else { return nil }
                frame = f
            } catch {
                return error
            }
            // Only requests on odd (client-initiated) streams are valid from a client.
            guard frame.type == TTRPC.typeRequest, frame.streamID % 2 == 1 else {
                return AgentError(.protocolError, "unexpected frame type \(frame.type) on stream \(frame.streamID)")
            }
            let reply: Reply
            do {
                // The payload (up to 4 MiB) stays where it was read; the rest of the envelope is
                // decoded by swift-protobuf.
                let (envelope, payloadRange) = try ProtoWire.separate(frame.payload, field: TTRPC.requestPayloadField)
                let request = try Ttrpc_Request(serializedBytes: envelope)
                let payload = payloadRange.map { UnsafeRawBufferPointer(rebasing: frame.payload[$0]) } ?? UnsafeRawBufferPointer(start: nil, count: 0)
                let batch = request.metadata.first { $0.key == TTRPC.batchMetadataKey }?.value
                if let batch, batch == abortedBatch {
                    reply = .failure(GRPCStatus.aborted, "not applied: an earlier request of batch \(batch) failed")
                } else {
                    reply = handler(request.service, request.method, payload)
                    if case .failure = reply, let batch { abortedBatch = batch }
                }
            } catch {
                reply = .failure(GRPCStatus.invalidArgument, "undecodable ttrpc request: \(error)")
            }
            var response = Ttrpc_Response()
            switch reply {
            case .ok(let payload):
                response.payload = Data(payload)
            case .failure(let code, let message):
                response.status.code = code
                response.status.message = message
            }
            do {
                let bytes: [UInt8] = try response.serializedBytes()
                try stream.queue(TTRPCFrame(streamID: frame.streamID, type: TTRPC.typeResponse, payload: bytes))
                if !stream.hasBufferedFrame || stream.queuedBytes >= 64 << 10 { try stream.flushOutput(deadline: nil) }
            } catch let e as AgentError {
                return e
            } catch {
                return AgentError(.protocolError, "cannot encode a reply: \(error)")
            }
        }
    }
}
