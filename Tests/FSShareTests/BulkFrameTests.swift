#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import CProtobufCCheck
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import SwiftProtobuf
import Synchronization
import SystemPackage
import Testing

/// Copy mode's zero-copy path: a CopyFile chunk assembled around content already in place
/// (`BulkFrame`, `Pipeline.sendBulk`) and taken apart in place by the agent
/// (`ProtoWire.separate`), checked against swift-protobuf's ordinary encoding and decoding and
/// against protobuf-c.
@Suite struct BulkFrameTests {
    /// Deterministic bytes (xorshift) so a failure can be reproduced.
    struct Bytes {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return state
        }
        mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    func randomRequest(_ g: inout Bytes, dataSize: Int) -> Grpc_CopyFileRequest {
        var r = Grpc_CopyFileRequest()
        // Each field set or left at its default (then not encoded at all).
        if g.below(4) > 0 { r.path = "/run/kata-containers/shared/containers/" + String(repeating: "p", count: g.below(300)) }
        if g.below(2) > 0 { r.fileSize = Int64(g.below(1 << 30)) }
        if g.below(2) > 0 { r.fileMode = 0o100000 | UInt32(g.below(0o7777)) }
        if g.below(2) > 0 { r.dirMode = 0o750 }
        if g.below(2) > 0 { r.uid = Int32(truncatingIfNeeded: g.next()) }
        if g.below(2) > 0 { r.gid = -1 }
        if g.below(2) > 0 { r.offset = Int64(g.below(1 << 40)) }
        r.data = Data(g.bytes(dataSize))
        return r
    }

    func separate(_ bytes: [UInt8], field: UInt32) throws(AgentError) -> (rest: [UInt8], field: [UInt8]?) {
        var result: Result<(rest: [UInt8], field: [UInt8]?), AgentError> = .failure(AgentError(.protocolError, "unset"))
        bytes.withUnsafeBytes { b in
            do throws(AgentError) {
                let (rest, range) = try ProtoWire.separate(b, field: field)
                result = .success((rest, range.map { Array(b[$0]) }))
            } catch {
                result = .failure(error)
            }
        }
        return try result.get()
    }

    @Test("ProtoWire.separate agrees with swift-protobuf on random requests, unknown fields and repeats")
    func separateAgreesWithSwiftProtobuf() throws {
        var g = Bytes(state: 0x1234_5678_9abc_def1)
        for round in 0..<300 {
            let r = randomRequest(&g, dataSize: [0, 1, 127, 128, 300, 20_000][round % 6])
            var bytes: [UInt8] = try r.serializedBytes()
            // Unknown fields of every wire type, and now and then a second, earlier data field
            // (proto3: the last one counts).
            if round % 3 == 0 { bytes += [0x78, 0x96, 0x01] }  // field 15, varint 150
            if round % 4 == 0 { bytes = [0xa5, 0x01, 1, 2, 3, 4] + bytes }  // field 20, fixed32
            if round % 5 == 0 { bytes += [0x99, 0x01] + [UInt8](repeating: 7, count: 8) }  // field 19, fixed64
            if round % 7 == 0 { bytes = [0x42, 0x02, 0xee, 0xee] + bytes }  // an earlier data field
            let whole = try Grpc_CopyFileRequest(serializedBytes: bytes)
            let (rest, data) = try separate(bytes, field: TTRPC.copyFileDataField)
            var withoutData = whole
            withoutData.data = Data()
            #expect(try Grpc_CopyFileRequest(serializedBytes: rest) == withoutData, "round \(round)")
            #expect((data ?? []) == [UInt8](whole.data), "round \(round)")
            #expect(data != nil || whole.data.isEmpty)
        }
        // The ttrpc envelope: the payload taken out, the rest decoded as before.
        var envelope = Ttrpc_Request()
        envelope.service = TTRPC.agentService
        envelope.method = TTRPC.copyFileMethod
        envelope.payload = Data(g.bytes(5000))
        envelope.timeoutNano = 60_000_000_000
        var kv = Ttrpc_KeyValue()
        kv.key = TTRPC.batchMetadataKey
        kv.value = "17"
        envelope.metadata = [kv]
        let (rest, payload) = try separate(try envelope.serializedBytes(), field: TTRPC.requestPayloadField)
        var bare = envelope
        bare.payload = Data()
        #expect(try Ttrpc_Request(serializedBytes: rest) == bare)
        #expect(payload == [UInt8](envelope.payload))
    }

    @Test("ProtoWire.separate refuses malformed messages with a protocol error")
    func separateRefusesMalformed() {
        let malformed: [(String, [UInt8])] = [
            ("truncated varint", [0x08, 0x80]),
            ("over-long varint", [0x08] + [UInt8](repeating: 0xff, count: 10) + [0x01]),
            ("field longer than the message", [0x42, 0x05, 1, 2]),
            ("length beyond any buffer", [0x42, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            ("wire type 3 (group)", [0x43]),
            ("wire type 6", [0x46]),
            ("field number 0", [0x02, 0x00]),
            ("the data field as a varint", [0x40, 0x01]),
            ("truncated fixed64", [0x09, 1, 2, 3]),
            ("truncated fixed32", [0x0d, 1]),
        ]
        for (what, bytes) in malformed {
            #expect(throws: AgentError.self, "\(what)") { try separate(bytes, field: TTRPC.copyFileDataField) }
            do {
                _ = try separate(bytes, field: TTRPC.copyFileDataField)
            } catch {
                #expect(error.code == .protocolError && error.message.contains("malformed"), "\(what): \(error)")
            }
        }
    }

    /// A ttrpc server on one end of a socketpair that records every request payload and
    /// answers OK (GetInfo: UNIMPLEMENTED, as Kata's agent, so the client sends plain CopyFile).
    final class Recorder: Sendable {
        final class Log: Sendable {
            let payloads = Mutex<[[UInt8]]>([])
        }
        let log = Log()
        let thread: OSThread

        init(fd: FileDescriptor) throws {
            let stream = FrameStream(fd: fd, name: "recorder")
            let log = self.log
            thread = try OSThread {
                while let frame = try? stream.readFrame(deadline: nil) {
                    var response = Ttrpc_Response()
                    if let request = try? Ttrpc_Request(serializedBytes: frame.payload), request.method == "GetInfo" {
                        response.status.code = GRPCStatus.unimplemented
                        response.status.message = "no"
                    } else {
                        log.payloads.withLock { $0.append(frame.payload) }
                    }
                    guard let bytes: [UInt8] = try? response.serializedBytes(),
                          (try? stream.write(TTRPCFrame(streamID: frame.streamID, type: TTRPC.typeResponse, payload: bytes), deadline: nil)) != nil else { return }
                }
            }
        }
    }

    @Test("a chunk sent in place is byte for byte the ordinary request, and protobuf-c decodes it")
    func bulkChunkEqualsTheOrdinaryEncoding() throws {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        let recorder = try Recorder(fd: FileDescriptor(rawValue: fds[1]))
        let client = AgentClient(adopting: FileDescriptor(rawValue: fds[0]), name: "pair", callTimeout: .seconds(7))
        var g = Bytes(state: 99)
        // Sizes around varint boundaries, an empty chunk, 1 MiB; a path too long for the
        // buffer's room takes the copying fallback and must produce the same bytes.
        let cases: [(size: Int, pathLength: Int, batch: Bool)] = [
            (0, 40, false), (1, 40, false), (127, 40, true), (128, 40, false), (16_383, 200, false),
            (16_384, 200, true), (1 << 20, 60, false), (1 << 20, 60, true), (4096, 9000, false), (4096, 9000, true),
        ]
        for c in cases {
            var r = Grpc_CopyFileRequest()
            r.path = "/" + String(repeating: "d", count: c.pathLength)
            r.fileSize = Int64(c.size) * 3
            r.fileMode = 0o100640
            r.dirMode = 0o750
            r.uid = 1000
            r.gid = -1
            r.offset = Int64(c.size)
            let content = g.bytes(c.size)
            let buffer = BulkFrame(capacity: c.size)
            buffer.data.copyBytes(from: content)
            var batch: String?
            try client.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
                if c.batch {
                    p.beginBatch()
                    batch = p.batch
                }
                try p.sendBulk(TTRPC.agentService, TTRPC.copyFileMethod, r, field: TTRPC.copyFileDataField, in: buffer, count: c.size)
            }
            var whole = r
            whole.data = Data(content)
            var expected = Ttrpc_Request()
            expected.service = TTRPC.agentService
            expected.method = TTRPC.copyFileMethod
            expected.payload = try whole.serializedBytes()
            expected.timeoutNano = 7_000_000_000
            if let batch {
                var kv = Ttrpc_KeyValue()
                kv.key = TTRPC.batchMetadataKey
                kv.value = batch
                expected.metadata = [kv]
            }
            let sent = recorder.log.payloads.withLock { $0.last } ?? []
            #expect(sent == (try expected.serializedBytes() as [UInt8]), "size \(c.size), path \(c.pathLength), batch \(c.batch)")
            // protobuf-c, an independent decoder, reads the same request out of the envelope.
            let inner = [UInt8](try Ttrpc_Request(serializedBytes: sent).payload)
            var out = [CChar](repeating: 0, count: 2 * c.size + c.pathLength + 4096)
            let n = inner.withUnsafeBufferPointer { fsshare_pbc_dump_copy_file($0.baseAddress, $0.count, &out, out.count) }
            try #require(n >= 0, "protobuf-c rejected the request")
            let dump = String(decoding: out[0..<Int(n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            #expect(dump.hasPrefix("path=\(r.path)\nfile_size=\(r.fileSize)\nfile_mode=\(r.fileMode)\ndir_mode=488\nuid=1000\ngid=-1\noffset=\(r.offset)\n"))
            if c.size <= 16_384 {
                #expect(dump.hasSuffix("data=" + content.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() + "\n"))
            }
        }
        #expect(recorder.log.payloads.withLock { $0.count } == cases.count)
        // More content than the buffer holds is refused before anything is sent.
        let small = BulkFrame(capacity: 4)
        #expect(throws: AgentError.self) {
            try client.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
                try p.sendBulk(TTRPC.agentService, TTRPC.copyFileMethod, Grpc_CopyFileRequest(), field: TTRPC.copyFileDataField, in: small, count: 5)
            }
        }
        #expect(recorder.log.payloads.withLock { $0.count } == cases.count)
        client.disconnect()
        recorder.thread.join()
    }
}
