#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import SwiftProtobuf
import SystemPackage

/// The host side of `fsshare.GuestCheck` (fsshare-agent `--checks`): file operations and reader
/// loops run by the guest, answered by the guest kernel.
public final class GuestCheckClient: Sendable {
    public let client: AgentClient

    public init(address: AgentAddress, callTimeout: Duration = .seconds(30)) {
        client = AgentClient(address: address, callTimeout: callTimeout)
    }

    /// What one probe saw: the errno (0 on success) and what it read.
    public struct Result: Sendable, CustomStringConvertible {
        public var errno: Int32
        public var data: [UInt8]
        public var names: [String]
        public var mode: UInt32
        public var text: String { String(decoding: data, as: UTF8.self) }
        public var description: String {
            errno == 0 ? "ok" : "\(Errno(rawValue: errno)) (\(errno))"
        }
    }

    public func probe(_ op: Fsshare_ProbeRequest.Op, _ path: String, data: [UInt8] = []) throws(AgentError) -> Result {
        var r = Fsshare_ProbeRequest()
        r.op = op
        r.path = path
        r.data = Data(data)
        let bytes = try client.call(TTRPC.guestCheckService, "Probe", r)
        let out: Fsshare_ProbeResponse
        do { out = try Fsshare_ProbeResponse(serializedBytes: bytes) } catch { throw AgentError(.protocolError, "undecodable Probe reply: \(error)") }
        return Result(errno: out.errno, data: Array(out.data), names: out.names, mode: out.mode)
    }

    /// Reads a file in the guest; nil with the errno when it cannot.
    public func read(_ path: String) throws(AgentError) -> String? {
        let r = try probe(.read, path)
        return r.errno == 0 ? r.text : nil
    }

    /// Polls `probe` in the guest until `accept` holds or `timeout` passes; returns the last result
    /// and how long it took.
    public func await(_ op: Fsshare_ProbeRequest.Op, _ path: String, timeout: Duration, until accept: (Result) -> Bool) throws(AgentError) -> (Result, Duration) {
        let start = Sys.monotonicNanoseconds()
        let deadline = start + timeout.nanoseconds
        while true {
            let r = try probe(op, path)
            let now = Sys.monotonicNanoseconds()
            if accept(r) || now >= deadline { return (r, .nanoseconds(Int64(now - start))) }
            usleep(20_000)
        }
    }

    /// Runs the guest's reader loop over an atomic-writer volume (see `GuestChecks`).
    public func watchContent(dir: String, expect: [String: String], timeout: Duration, inotify: Bool = false) throws(AgentError) -> Fsshare_WatchContentResponse {
        var r = Fsshare_WatchContentRequest()
        r.dir = dir
        r.inotify = inotify
        r.expect = expect.mapValues { Data($0.utf8) }
        r.timeoutMs = UInt32(clamping: timeout.nanoseconds / 1_000_000)
        let bytes = try client.call(TTRPC.guestCheckService, "WatchContent", r)
        do { return try Fsshare_WatchContentResponse(serializedBytes: bytes) } catch { throw AgentError(.protocolError, "undecodable WatchContent reply: \(error)") }
    }
}
