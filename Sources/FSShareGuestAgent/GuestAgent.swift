#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import SwiftProtobuf
import Synchronization
import SystemPackage

/// `fsshare-agent`: the guest side of fsshare. Serves, over ttrpc, Kata's
/// `grpc.AgentService/CreateSandbox` and `DestroySandbox` (it mounts the sandbox storages:
/// virtio-fs, 9p, shm), `grpc.AgentService/CopyFile` and fsshare's `fsshare.GuestFiles` (copy
/// mode, confined below one share directory), and with `checks` fsshare's `fsshare.GuestCheck`.
///
/// It is small on purpose: the host is its only client, and every request is checked as if
/// it were hostile anyway (canonical paths below the share directory, no symlink traversal,
/// bounded chunks).
public final class GuestAgent: Sendable {
    public static let version = "fsshare-agent 0.3"
    /// "Batches": requests carrying ``TTRPC/batchMetadataKey`` are refused once one of their
    /// batch failed (TTRPCServer does this for every connection). "Ordered": the requests of
    /// one connection are applied in the order they were sent (TTRPCServer serves a
    /// connection's requests one after the other), so a client may pipeline dependent steps.
    public static let features = [
        "CopyFile", "GetInfo", "RemovePath", "RenamePath", "PruneDirectory", "WriteTree", "SetLinks", "Batches", TTRPC.orderedFeature,
        "CreateSandbox", "DestroySandbox", "CreateContainer", "RemoveContainer", "WatchableBind", "Health",
    ]
    /// The name an entry is written under before it is renamed into place. It starts with
    /// `..`, kubelet's prefix for a volume's internal entries (`..data`, `..data_tmp`), which
    /// readers and reloaders of a configmap directory already pass over.
    public static func temporaryName(for leaf: String) -> FilePath { FilePath("..\(leaf).fsshare-tmp") }

    /// At most this many connections are served at once; more wait in the listen backlog.
    public static let maxConnections = 32

    let files: GuestFilesBox
    let mounter: Mutex<MounterHolder>
    let checks: Bool
    let log: @Sendable (String) -> Void
    private let active = Atomic<Int>(0)

    struct MounterHolder: @unchecked Sendable {
        // Only touched with the mutex held.
        let mounter: StorageMounter
    }

    /// An agent confined to `shareDir` (created if missing). With `checks` it also serves
    /// `fsshare.GuestCheck` (for tests and demos: those probes follow symlinks anywhere).
    public init(shareDir: String, checks: Bool = false, log: @escaping @Sendable (String) -> Void) throws(SystemCallError) {
        let files = GuestFilesBox(try GuestFiles(shareDir: shareDir))
        self.files = files
        self.mounter = Mutex(MounterHolder(mounter: StorageMounter(files: files, log: log)))
        self.checks = checks
        self.log = log
    }

    /// Handles one request (`body`: the encoded request, valid during the call).
    public func handle(_ service: String, _ method: String, _ body: UnsafeRawBufferPointer) -> TTRPCServer.Reply {
        do {
            if service == TTRPC.agentService && method == TTRPC.copyFileMethod {
                // A chunk's data (up to 4 MiB) is written from where it was read; swift-protobuf
                // decodes (and checks) the other fields.
                let (fields, dataRange) = try ProtoWire.separate(body, field: TTRPC.copyFileDataField)
                let r = try Grpc_CopyFileRequest(serializedBytes: fields)
                let data = dataRange.map { UnsafeRawBufferPointer(rebasing: body[$0]) } ?? UnsafeRawBufferPointer(start: nil, count: 0)
                try files.locked(r.path) { (f) throws(GuestAgentError) in try f.copyFile(r, data: data) }
                return .ok([])
            }
            let payload = [UInt8](body)
            switch (service, method) {
            case (TTRPC.agentService, TTRPC.createSandboxMethod):
                let r = try Grpc_CreateSandboxRequest(serializedBytes: payload)
                try mounter.withLock { (h) throws(GuestAgentError) in try h.mounter.createSandbox(r) }
                return .ok([])
            case (TTRPC.agentService, TTRPC.createContainerMethod):
                let r = try Grpc_CreateContainerRequest(serializedBytes: payload)
                try mounter.withLock { (h) throws(GuestAgentError) in try h.mounter.createContainer(r) }
                return .ok([])
            case (TTRPC.agentService, TTRPC.removeContainerMethod):
                let r = try Grpc_RemoveContainerRequest(serializedBytes: payload)
                try mounter.withLock { (h) throws(GuestAgentError) in try h.mounter.removeContainer(r) }
                return .ok([])
            case (TTRPC.agentService, TTRPC.destroySandboxMethod):
                _ = try Grpc_DestroySandboxRequest(serializedBytes: payload)
                try mounter.withLock { (h) throws(GuestAgentError) in try h.mounter.destroySandbox() }
                return .ok([])
            case (TTRPC.guestCheckService, "Probe") where checks:
                return .ok(try GuestChecks.probe(Fsshare_ProbeRequest(serializedBytes: payload)).serializedBytes())
            case (TTRPC.guestCheckService, "WatchContent") where checks:
                return .ok(try GuestChecks.watchContent(Fsshare_WatchContentRequest(serializedBytes: payload)).serializedBytes())
            case (TTRPC.healthService, "Check"):
                // Kata's runtime asks this before anything else.
                _ = try Grpc_CheckRequest(serializedBytes: payload)
                var health = Grpc_HealthCheckResponse()
                health.status = .serving
                return .ok(try health.serializedBytes())
            case (TTRPC.healthService, "Version"):
                _ = try Grpc_CheckRequest(serializedBytes: payload)
                var version = Grpc_VersionCheckResponse()
                version.agentVersion = GuestAgent.version
                version.grpcVersion = "ttrpc"
                return .ok(try version.serializedBytes())
            case (TTRPC.guestFilesService, "GetInfo"):
                var info = Fsshare_InfoResponse()
                info.version = GuestAgent.version
                info.shareDir = files.shareDir
                info.features = GuestAgent.features + (checks ? ["GuestCheck"] : [])
                return .ok(try info.serializedBytes())
            case (TTRPC.guestFilesService, "RemovePath"):
                let r = try Fsshare_RemovePathRequest(serializedBytes: payload)
                try files.locked(r.path) { (f) throws(GuestAgentError) in try f.removePath(r.path, recursive: r.recursive) }
                return .ok([])
            case (TTRPC.guestFilesService, "RenamePath"):
                let r = try Fsshare_RenamePathRequest(serializedBytes: payload)
                try files.locked(r.from, r.to) { (f) throws(GuestAgentError) in try f.renamePath(from: r.from, to: r.to) }
                return .ok([])
            case (TTRPC.guestFilesService, "WriteTree"):
                let r = try Fsshare_WriteTreeRequest(serializedBytes: payload)
                try files.locked(r.path) { (f) throws(GuestAgentError) in try f.writeTree(r) }
                return .ok([])
            case (TTRPC.guestFilesService, "SetLinks"):
                let r = try Fsshare_SetLinksRequest(serializedBytes: payload)
                try files.locked(r.dir) { (f) throws(GuestAgentError) in try f.setLinks(r) }
                return .ok([])
            case (TTRPC.guestFilesService, "PruneDirectory"):
                let r = try Fsshare_PruneDirectoryRequest(serializedBytes: payload)
                try files.locked(r.path) { (f) throws(GuestAgentError) in try f.pruneDirectory(r.path, keep: r.keep) }
                return .ok([])
            default:
                return .failure(GRPCStatus.unimplemented, "\(service)/\(method) is not implemented by \(GuestAgent.version)")
            }
        } catch let e as GuestAgentError {
            log("refused \(service)/\(method): \(e.message)")
            switch e.kind {
            case .invalid: return .failure(GRPCStatus.invalidArgument, e.message)
            case .denied: return .failure(GRPCStatus.permissionDenied, e.message)
            case .notFound: return .failure(GRPCStatus.notFound, e.message)
            case .exists: return .failure(GRPCStatus.alreadyExists, e.message)
            // A read-only place: in a shared-filesystem sandbox, a watchable mirror whose tmpfs
            // is not mounted yet (the request reached the read-only share under it).
            case .readOnly: return .failure(GRPCStatus.failedPrecondition, e.message)
            case .failed: return .failure(GRPCStatus.internal, e.message)
            }
        } catch {
            return .failure(GRPCStatus.invalidArgument, "undecodable \(method) request: \(error)")
        }
    }

    /// Serves one connection on the calling thread until it closes.
    public func serve(_ stream: FrameStream) {
        if let error = TTRPCServer.serve(stream, handler: handle) {
            log("connection \(stream.name) ended: \(error)")
        }
        stream.close()
    }

    /// Listens on `address` and serves forever (returns only on a listen error).
    public func run(listening address: AgentAddress) throws(AgentError) {
        switch address {
        case .serial(let path):
            // A character device has no connections. A virtio-serial port reads EOF while no
            // host end is connected; keep it open and read on: closing and reopening it would
            // make the guest kernel discard what a host that connects meanwhile already sent.
            let stream = try AgentClient.open(address, timeout: .seconds(5))
            log("serving \(path)")
            while true {
                if let error = TTRPCServer.serve(stream, handler: handle) {
                    log("\(path): \(error)")
                }
                stream.discardBuffers()
                var pause = timespec(tv_sec: 0, tv_nsec: 20_000_000)
                nanosleep(&pause, nil)
            }
        case .unix(let path), .hybridVsock(let path, _):
            try? Sys.unlinkat(nil, path, directory: false)
            let listener: FileDescriptor
            do { listener = try Sys.listenUnix(path) } catch { throw AgentError(.unreachable, "cannot listen on \(address): \(error)") }
            log("listening on \(address)")
            var muxPort: UInt32?
            if case .hybridVsock(_, let port) = address { muxPort = port }
            try acceptLoop(listener, name: address.description, muxPort: muxPort)
        case .vsock(_, let port):
            let listener: FileDescriptor
            do { listener = try Sys.listenVsock(port: port) } catch { throw AgentError(.unreachable, "cannot listen on \(address): \(error)") }
            log("listening on \(address)")
            try acceptLoop(listener, name: address.description, muxPort: nil)
        }
    }

    /// The device of the virtio-serial port QEMU named `name` (`-device virtserialport,name=`),
    /// from `/sys/class/virtio-ports/*/name`; waits up to `timeout` for it to appear (the
    /// module may still be probing).
    public static func virtioPort(named name: String, timeout: Duration) -> FilePath? {
        let classDir: FilePath = "/sys/class/virtio-ports"
        let deadline = Sys.deadline(after: timeout)
        while true {
            for entry in (try? Sys.listDirectory(nil, classDir)) ?? [] {
                let file = classDir.appending(entry.name).appending("name")
                guard let fd = try? Sys.openat(nil, file, flags: O_RDONLY | O_CLOEXEC) else { continue }
                let bytes = (try? Sys.readAll(fd, path: file)) ?? []
                Sys.close(fd)
                if String(decoding: bytes, as: UTF8.self).trimmingSuffix("\n") == name {
                    return FilePath("/dev").appending(entry.name)
                }
            }
            if Sys.monotonicNanoseconds() >= deadline { return nil }
            var pause = timespec(tv_sec: 0, tv_nsec: 50_000_000)
            nanosleep(&pause, nil)
        }
    }

    /// Accepts connections, each served on its own thread. With `muxPort`, each connection
    /// first does the hybrid-vsock handshake (the role Firecracker's muxer plays).
    private func acceptLoop(_ listener: FileDescriptor, name: String, muxPort: UInt32?) throws(AgentError) {
        while true {
            let conn: FileDescriptor
            do { conn = try Sys.accept(listener, path: FilePath(name)) } catch { throw AgentError(.unreachable, "accept on \(name) failed: \(error)") }
            guard active.add(1, ordering: .relaxed).newValue <= GuestAgent.maxConnections else {
                active.subtract(1, ordering: .relaxed)
                log("refused a connection on \(name): \(GuestAgent.maxConnections) already open")
                Sys.close(conn)
                continue
            }
            let stream = FrameStream(fd: conn, name: name)
            do {
                try OSThread.detach { [self] in
                    defer { active.subtract(1, ordering: .relaxed) }
                    if let muxPort {
                        let deadline = Sys.monotonicNanoseconds() + 5_000_000_000
                        guard let line = try? stream.readLine(deadline: deadline), line == "CONNECT \(muxPort)" else {
                            log("hybrid-vsock handshake on \(name) failed")
                            stream.close()
                            return
                        }
                        do { try stream.write(Array("OK \(muxPort)\n".utf8), deadline: deadline) } catch { return }
                    }
                    serve(stream)
                }
            } catch {
                active.subtract(1, ordering: .relaxed)
                log("cannot start a connection thread: \(error)")
            }
        }
    }
}

/// The file operations, locked per volume: requests from several connections (the watcher's
/// syncs of many volumes, a `share`) run in parallel when they touch different top-level
/// entries of the share directory, and one at a time when they touch the same one, so each
/// request still applies as a unit (a file's temp name, a link's replace, a prune). One lock for
/// everything made ten sandboxes' first syncs spin on it (a sixth of the agent's CPU).
final class GuestFilesBox: Sendable {
    private let files: GuestFilesHolder
    private let stripes: [Stripe]
    let shareDir: String

    struct GuestFilesHolder: @unchecked Sendable {
        // Its methods keep their state in locals; `root` changes only with every stripe held.
        let files: GuestFiles
    }

    final class Stripe: Sendable {
        let mutex = Mutex(())
    }

    init(_ files: GuestFiles) {
        self.shareDir = files.shareDir
        self.files = GuestFilesHolder(files: files)
        self.stripes = (0..<64).map { _ in Stripe() }
    }

    /// The entry of the share directory `path` lies in: its first component, or through
    /// `passthrough/` and `watchable/` to the first other one (a volume, a mirror).
    func volumeKey(_ path: String) -> Substring {
        var rest = path.hasPrefix(shareDir + "/") ? path.dropFirst(shareDir.count + 1) : Substring(path)
        var end = rest.startIndex
        while true {
            let slash = rest[end...].firstIndex(of: "/") ?? rest.endIndex
            let component = rest[end..<slash]
            end = slash
            guard component == "passthrough" || component == "watchable", slash < rest.endIndex else { break }
            end = rest.index(after: slash)
        }
        rest = rest[..<end]
        return rest
    }

    private func stripe(_ path: String) -> Int {
        var h = Hasher()
        h.combine(volumeKey(path))
        return Int(UInt(bitPattern: h.finalize()) % UInt(stripes.count))
    }

    /// Runs `body` holding the locks of the volumes `paths` lie in (in a fixed order).
    func locked(_ paths: String..., body: (GuestFiles) throws(GuestAgentError) -> Void) throws(GuestAgentError) {
        let indices = Array(Set(paths.map(stripe))).sorted()
        try hold(indices[...], body)
    }

    /// Runs `body` with every lock held (the share directory's descriptor changes).
    func lockedAll(_ body: (GuestFiles) throws(GuestAgentError) -> Void) throws(GuestAgentError) {
        try hold(Array(stripes.indices)[...], body)
    }

    private func hold(_ indices: ArraySlice<Int>, _ body: (GuestFiles) throws(GuestAgentError) -> Void) throws(GuestAgentError) {
        guard let first = indices.first else { return try body(files.files) }
        try stripes[first].mutex.withLock { (_) throws(GuestAgentError) in try hold(indices.dropFirst(), body) }
    }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) : self
    }
}
