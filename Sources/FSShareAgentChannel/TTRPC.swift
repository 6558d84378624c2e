#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// The ttrpc wire format (github.com/containerd/ttrpc): each message is a 10-byte header —
/// payload length (u32 big-endian), stream id (u32 big-endian), type (u8), flags (u8) — then
/// the payload, a protobuf `ttrpc.Request` or `ttrpc.Response`. Clients use odd stream ids.
public enum TTRPC {
    /// Bytes of a frame header: length (4), stream id (4), type (1), flags (1).
    public static let headerLength = 10
    /// ttrpc's default `messageLengthMax` (4 MiB); larger frames are refused both ways.
    public static let maxMessageLength = 4 << 20
    /// A request frame.
    public static let typeRequest: UInt8 = 1
    /// A response frame.
    public static let typeResponse: UInt8 = 2
    /// A streaming data frame (not used by the agent's unary methods).
    public static let typeData: UInt8 = 3
    /// `ttrpc.Request.payload`'s field number.
    public static let requestPayloadField: UInt32 = 3

    /// Kata's agent service and the one method of it fsshare calls.
    public static let agentService = "grpc.AgentService"
    /// `grpc.AgentService/CopyFile`.
    public static let copyFileMethod = "CopyFile"
    /// `CopyFileRequest.data`'s field number (its last field).
    public static let copyFileDataField: UInt32 = 8
    /// `grpc.AgentService/CreateSandbox`.
    public static let createSandboxMethod = "CreateSandbox"
    /// `grpc.AgentService/DestroySandbox`.
    public static let destroySandboxMethod = "DestroySandbox"
    /// `grpc.AgentService/CreateContainer`.
    public static let createContainerMethod = "CreateContainer"
    /// `grpc.AgentService/RemoveContainer`.
    public static let removeContainerMethod = "RemoveContainer"
    /// fsshare's in-guest checks (`fsshare-agent --checks`).
    public static let guestCheckService = "fsshare.GuestCheck"
    /// fsshare's own guest service (Proto/fsshare_agent.proto).
    public static let guestFilesService = "fsshare.GuestFiles"
    /// Request metadata naming a batch: once one request of a batch fails, the server refuses
    /// the rest of that batch on the connection (ABORTED) instead of applying them. A pipelined
    /// sequence whose later steps depend on the earlier ones (copy a directory, then publish it)
    /// then needs one round trip, not one per step. A server that ignores metadata (Kata's
    /// agent) applies every request, as before.
    public static let batchMetadataKey = "fsshare-batch"
    /// The GetInfo feature of an agent that applies the requests of one connection in the
    /// order they were sent (fsshare-agent). Without it the client waits for replies between
    /// dependent steps.
    public static let orderedFeature = "Ordered"
    /// Kata's health service, which Kata's runtime calls first.
    public static let healthService = "grpc.Health"
}

/// One ttrpc frame.
public struct TTRPCFrame: Sendable, Equatable {
    /// The stream: odd for client requests; a reply carries its request's.
    public var streamID: UInt32
    /// ``TTRPC/typeRequest``, ``TTRPC/typeResponse`` or ``TTRPC/typeData``.
    public var type: UInt8
    /// Frame flags (0 for unary calls).
    public var flags: UInt8
    /// The protobuf-encoded `Request` or `Response`.
    public var payload: [UInt8]

    /// A frame of `type` on `streamID` carrying `payload`.
    ///
    /// - Parameters:
    ///   - streamID: the stream.
    ///   - type: the frame type.
    ///   - flags: frame flags.
    ///   - payload: the encoded message.
    public init(streamID: UInt32, type: UInt8, flags: UInt8 = 0, payload: [UInt8]) {
        self.streamID = streamID
        self.type = type
        self.flags = flags
        self.payload = payload
    }

    /// Header and payload as one buffer (one write per frame).
    public var encoded: [UInt8] {
        var out = [UInt8]()
        append(to: &out)
        return out
    }

    /// Appends header and payload to `out`.
    ///
    /// - Parameter out: the buffer the header and payload are appended to.
    public func append(to out: inout [UInt8]) {
        out.reserveCapacity(out.count + TTRPC.headerLength + payload.count)
        let n = UInt32(payload.count)
        out += [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)]
        out += [UInt8(streamID >> 24), UInt8(streamID >> 16 & 0xff), UInt8(streamID >> 8 & 0xff), UInt8(streamID & 0xff)]
        out += [type, flags]
        out += payload
    }
}

/// One frame read by ``FrameStream/readFrameView(deadline:wake:)``: its payload points into the
/// stream's buffer and is valid only until the next read from that stream.
public struct TTRPCFrameView {
    /// The stream: odd for client requests; a reply carries its request's.
    public let streamID: UInt32
    /// ``TTRPC/typeRequest``, ``TTRPC/typeResponse`` or ``TTRPC/typeData``.
    public let type: UInt8
    /// Frame flags (0 for unary calls).
    public let flags: UInt8
    /// The protobuf-encoded `Request` or `Response`, in the stream's buffer.
    public let payload: UnsafeRawBufferPointer
}

/// A byte stream (socket or character device) carrying ttrpc frames, with deadlines.
/// Not thread-safe: it is owned by one thread at a time (a client holds it under its lock; the
/// agent hands each accepted connection to the thread that serves it), hence `@unchecked`.
public final class FrameStream: @unchecked Sendable {
    /// The connected socket or serial port.
    public let fd: FileDescriptor
    /// Shown in errors: the address or path.
    public let name: String
    private let isSocket: Bool
    /// Bytes read and not yet consumed are `input[start..<end]`. A frame is always read into one
    /// contiguous run (the buffer grows to the largest frame seen, at most ttrpc's limit, and is
    /// freed with the stream), so a large request's payload is handed on without a copy.
    private var input = UnsafeMutableRawBufferPointer.allocate(byteCount: FrameStream.initialInput, alignment: 8)
    private var start = 0
    private var end = 0
    static let initialInput = 64 << 10

    /// Takes ownership of `fd` (closed by ``close()`` or deinit).
    ///
    /// - Parameters:
    ///   - fd: the connected descriptor (the stream owns it).
    ///   - name: how it is shown in messages.
    public init(fd: FileDescriptor, name: String) {
        self.fd = fd
        self.name = name
        self.isSocket = Sys.isSocket(fd)
    }

    private var closed = false
    /// Closes the descriptor; later reads and writes fail with `disconnected`.
    public func close() {
        guard !closed else { return }
        closed = true
        Sys.close(fd)
    }

    deinit {
        close()
        input.deallocate()
    }

    /// Forgets buffered input and unsent output: the peer behind a character device went away
    /// and a new one starts with a fresh ttrpc stream (a half frame of the old one must not
    /// prefix it).
    public func discardBuffers() {
        start = 0
        end = 0
        output.removeAll(keepingCapacity: true)
    }

    private var shown: FilePath { FilePath(name) }

    /// Milliseconds left until `deadline` (nanoseconds on the monotonic clock; nil: forever).
    private func remaining(_ deadline: UInt64?) -> Int32 {
        guard let deadline else { return -1 }
        let now = Sys.monotonicNanoseconds()
        if now >= deadline { return 0 }
        return Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
    }

    /// Frames queued by ``queue(_:)`` and not yet written.
    private var output: [UInt8] = []
    /// Bytes queued but not written.
    public var queuedBytes: Int { output.count }

    /// Writes all of `bytes` before `deadline`.
    ///
    /// - Parameters:
    ///   - bytes: what to write, all of it.
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Throws: `timeout` or `disconnected`.
    public func write(_ bytes: [UInt8], deadline: UInt64?) throws(AgentError) {
        var failure: AgentError?
        bytes.withUnsafeBytes { all in
            do throws(AgentError) { try write(raw: all, deadline: deadline) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Writes all of `bytes` before `deadline`.
    ///
    /// - Parameters:
    ///   - bytes: what to write, all of it.
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Throws: `timeout` or `disconnected`.
    public func write(raw bytes: UnsafeRawBufferPointer, deadline: UInt64?) throws(AgentError) {
        var done = 0
        while done < bytes.count {
            var timedOut = false
            do throws(SystemCallError) {
                let rest = UnsafeRawBufferPointer(rebasing: bytes[done...])
                // Sockets: try first, wait only when the buffer is full (one syscall, not two).
                if isSocket, let n = try Sys.sendNoWait(fd, rest, path: shown) {
                    done += n
                    continue
                }
                if deadline != nil || isSocket {
                    if try !Sys.pollOut(fd, timeoutMilliseconds: remaining(deadline), path: shown) {
                        timedOut = true
                    } else if isSocket {
                        continue
                    }
                }
                if !timedOut { done += try Sys.send(fd, rest, isSocket: isSocket, path: shown) }
            } catch {
                throw AgentError(.disconnected, "lost the connection to the agent at \(name): \(error)")
            }
            if timedOut { throw AgentError(.timeout, "timed out writing to the agent at \(name)") }
        }
    }

    /// Writes one frame already encoded in `bytes` (header and payload), after any queued ones:
    /// a large request assembled in place (``BulkFrame``) goes out without another copy.
    ///
    /// - Parameters:
    ///   - bytes: the whole frame.
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Throws: `timeout` or `disconnected`.
    public func writeEncodedFrame(_ bytes: UnsafeRawBufferPointer, deadline: UInt64?) throws(AgentError) {
        try flushOutput(deadline: deadline)
        try write(raw: bytes, deadline: deadline)
    }

    /// Writes one frame (after any queued ones).
    ///
    /// - Parameters:
    ///   - frame: the frame.
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Throws: `timeout` or `disconnected`.
    public func write(_ frame: TTRPCFrame, deadline: UInt64?) throws(AgentError) {
        try queue(frame)
        try flushOutput(deadline: deadline)
    }

    /// Queues one frame to be written by the next ``flushOutput(deadline:)``: a burst of small
    /// requests (or replies) then costs one write and one wakeup of the peer, not one each.
    ///
    /// - Parameter frame: the frame to write with the next flush.
    /// - Throws: `protocol` for a frame over ttrpc's size limit.
    public func queue(_ frame: TTRPCFrame) throws(AgentError) {
        guard frame.payload.count <= TTRPC.maxMessageLength else {
            throw AgentError(.protocolError, "a \(frame.payload.count)-byte message exceeds ttrpc's \(TTRPC.maxMessageLength)-byte limit")
        }
        frame.append(to: &output)
    }

    /// Writes every queued frame.
    ///
    /// - Parameter deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Throws: `timeout` or `disconnected`.
    public func flushOutput(deadline: UInt64?) throws(AgentError) {
        guard !output.isEmpty else { return }
        defer { output.removeAll(keepingCapacity: output.capacity <= 1 << 20) }
        try write(output, deadline: deadline)
    }

    /// Whether a whole frame is already buffered (reading it will not block).
    public var hasBufferedFrame: Bool {
        let available = end - start
        guard available >= TTRPC.headerLength else { return false }
        return available - TTRPC.headerLength >= bigEndian32(at: start)
    }

    private func bigEndian32(at offset: Int) -> Int {
        Int(input[offset]) << 24 | Int(input[offset + 1]) << 16 | Int(input[offset + 2]) << 8 | Int(input[offset + 3])
    }

    /// Reads more bytes, making room first so that `need` bytes from `start` fit in one run.
    /// False at end of stream.
    private func fill(need: Int, deadline: UInt64?, wake: FileDescriptor?) throws(AgentError) -> Bool {
        do {
            if start == end {
                start = 0
                end = 0
            }
            if input.count - start < need || end == input.count {
                let unread = end - start
                let wanted = max(need, unread + 1)
                if input.count < wanted {
                    let grown = UnsafeMutableRawBufferPointer.allocate(byteCount: max(wanted, min(input.count * 2, TTRPC.maxMessageLength + TTRPC.headerLength)), alignment: 8)
                    grown.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[start..<end]))
                    input.deallocate()
                    input = grown
                } else if start > 0, let base = input.baseAddress {
                    memmove(base, base + start, unread)
                }
                start = 0
                end = unread
            }
            if deadline != nil || wake != nil {
                let ready = try Sys.pollIn(fd, wake: wake, timeoutMilliseconds: remaining(deadline), path: shown)
                if ready & 2 != 0 { throw AgentError(.disconnected, "stopped") }
                if ready == 0 { throw AgentError(.timeout, "timed out waiting for the agent at \(name)") }
            }
            let n = try Sys.read(fd, into: UnsafeMutableRawBufferPointer(rebasing: input[end...]), path: shown)
            end += n
            return n > 0
        } catch let e as SystemCallError {
            throw AgentError(.disconnected, "lost the connection to the agent at \(name): \(e)")
        } catch let e as AgentError {
            throw e
        } catch {
            throw AgentError(.disconnected, "\(error)")
        }
    }

    /// Buffers `count` contiguous bytes from `start`. False if the stream ends cleanly before
    /// the first byte (only allowed `atBoundary`).
    private func ensure(_ count: Int, deadline: UInt64?, wake: FileDescriptor?, atBoundary: Bool) throws(AgentError) -> Bool {
        while end - start < count {
            if try !fill(need: count, deadline: deadline, wake: wake) {
                if atBoundary && end == start { return false }
                throw AgentError(.disconnected, "the agent at \(name) closed the connection mid-message")
            }
        }
        return true
    }

    /// Reads one frame; nil when the peer closed the stream between frames.
    ///
    /// - Parameters:
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    ///   - wake: a descriptor whose readability ends the wait.
    /// - Returns: the next frame; nil when the peer closed the stream cleanly.
    /// - Throws: `timeout`, `disconnected`, or `protocol` for a malformed frame.
    public func readFrame(deadline: UInt64?, wake: FileDescriptor? = nil) throws(AgentError) -> TTRPCFrame? {
        guard let view = try readFrameView(deadline: deadline, wake: wake) else { return nil }
        return TTRPCFrame(streamID: view.streamID, type: view.type, flags: view.flags, payload: Array(view.payload))
    }

    /// Reads one frame without copying its payload out of the stream's buffer: the view is
    /// valid until the next read from this stream (the agent decodes a request in place and
    /// writes a CopyFile chunk straight from it). Nil when the peer closed between frames.
    ///
    /// - Parameters:
    ///   - deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    ///   - wake: a descriptor whose readability ends the wait.
    /// - Returns: the next frame; nil when the peer closed the stream cleanly.
    /// - Throws: `timeout`, `disconnected`, or `protocol` for a malformed frame.
    public func readFrameView(deadline: UInt64?, wake: FileDescriptor? = nil) throws(AgentError) -> TTRPCFrameView? {
        guard try ensure(TTRPC.headerLength, deadline: deadline, wake: wake, atBoundary: true) else { return nil }
        let length = bigEndian32(at: start)
        guard length <= TTRPC.maxMessageLength else {
            throw AgentError(.protocolError, "\(name) sent a \(length)-byte ttrpc message (limit \(TTRPC.maxMessageLength))")
        }
        _ = try ensure(TTRPC.headerLength + length, deadline: deadline, wake: wake, atBoundary: false)
        let h = start
        start += TTRPC.headerLength + length
        return TTRPCFrameView(
            streamID: UInt32(bigEndian32(at: h + 4)), type: input[h + 8], flags: input[h + 9],
            payload: UnsafeRawBufferPointer(rebasing: input[(h + TTRPC.headerLength)..<start]))
    }

    /// Reads one `\n`-terminated line (the hybrid-vsock handshake), at most 512 bytes.
    ///
    /// - Parameter deadline: a `CLOCK_MONOTONIC` deadline in ns; nil waits forever.
    /// - Returns: the line, without its newline.
    /// - Throws: `timeout` or `disconnected`.
    public func readLine(deadline: UInt64?) throws(AgentError) -> String {
        while true {
            if let nl = input[start..<end].firstIndex(of: 0x0A) {
                let line = String(decoding: UnsafeRawBufferPointer(rebasing: input[start..<nl]), as: UTF8.self)
                start = nl + 1
                return line
            }
            guard end - start < 512 else { throw AgentError(.protocolError, "\(name) sent an over-long handshake line") }
            if try !fill(need: end - start + 1, deadline: deadline, wake: nil) {
                throw AgentError(.unreachable, "\(name) closed the connection during the handshake")
            }
        }
    }
}
