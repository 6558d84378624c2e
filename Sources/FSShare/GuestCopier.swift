#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import SystemPackage

/// What one copy into the guest did.
public struct CopyReport: Sendable, Equatable {
    public var files = 0
    public var directories = 0
    public var symlinks = 0
    public var bytes: Int64 = 0
    /// Entries not copied, each with the reason (sockets, devices, refused symlinks, ...).
    public var skipped: [Skipped] = []
    /// Entries looked at below the top directory (copied or skipped), for the limits.
    var entriesSeen = 0

    public struct Skipped: Sendable, Equatable {
        public var path: String
        public var reason: String
    }

    public init() {}
}

/// Streams a host tree into the guest through `CopyFile`, in bounded chunks: a file is read
/// `chunkSize` bytes at a time and each chunk is sent before the next is read, so memory does
/// not grow with file size. Requests are pipelined; the agent applies them in order.
///
/// Never follows a symlink inside the tree: links are copied as links.
struct GuestCopier {
    /// Kata's `grpcMaxDataSize`: 1 MiB per CopyFile chunk.
    static let defaultChunkSize = 1 << 20
    var chunkSize = GuestCopier.defaultChunkSize
    /// Mode for directories the agent creates implicitly (Kata sends 0750).
    var dirMode: UInt32 = 0o750
    /// Entries and bytes allowed below the top directory (the watcher's per-volume limits),
    /// checked as the tree is read: copying stops at the limit, no separate walk is needed.
    var limits: WatchLimits?

    /// Copies the object open at `fd` (a file or directory; `O_PATH` is fine) to `guestPath`.
    func copy(_ fd: FileDescriptor, shownAs path: FilePath, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
        let st = try sys("cannot stat \(path)") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
        switch st.kind {
        case .directory:
            try copyDirectory(DirFD(fd: fd, path: path), status: st, to: guestPath, pipeline: &pipeline, report: &report)
        case .regular:
            try copyFile(fd, status: st, shownAs: path, to: guestPath, pipeline: &pipeline, report: &report)
        default:
            throw FSShareError(.refused, "\(path) is a \(st.kind); copy mode copies files, directories and symlinks")
        }
    }

    /// Copies the directory `dir` and everything below it to `guestPath` (lexical order).
    func copyDirectory(_ dir: DirFD, status st: FileStatus, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
        try send(&pipeline, request(guestPath, st, mode: UInt32(S_IFDIR)), path: dir.path)
        report.directories += 1
        let entries = try sys("cannot list \(dir.path)") { () throws(SystemCallError) in try Sys.listDirectory(dir, ".") }
        for entry in entries.sorted(by: { $0.name < $1.name }) {
            try copyEntry(dir, entry.name, to: guestPath + "/" + entry.name, pipeline: &pipeline, report: &report)
        }
    }

    /// Copies `dir/name` (any kind) to `guestPath`.
    func copyEntry(_ dir: DirFD, _ name: String, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
        let n = FilePath(name)
        let shown = dir.display(n)
        report.entriesSeen += 1
        if let limits, report.entriesSeen > limits.maxEntries {
            throw FSShareError(.limitExceeded, "more than \(limits.maxEntries) entries")
        }
        let st: FileStatus
        do {
            st = try Sys.statx(dir, n)
        } catch {
            // Removed between the listing and now: not an error for a live tree.
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot stat \(shown)", error)
        }
        switch st.kind {
        case .directory:
            let fd = try sys("cannot open \(shown)") { () throws(SystemCallError) in
                try Sys.openat(dir, n, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
            }
            defer { Sys.close(fd) }
            try copyDirectory(DirFD(fd: fd, path: shown), status: st, to: guestPath, pipeline: &pipeline, report: &report)
        case .regular:
            let fd = try sys("cannot open \(shown)") { () throws(SystemCallError) in try Sys.openat(dir, n, flags: O_RDONLY | Sys.oNoFollow) }
            defer { Sys.close(fd) }
            try copyFile(fd, status: st, shownAs: shown, to: guestPath, pipeline: &pipeline, report: &report)
        case .symlink:
            let target = try sys("cannot read the link \(shown)") { () throws(SystemCallError) in try Sys.readlinkat(dir, n) }
            if target.hasPrefix("/") {
                report.skipped.append(.init(path: shown.string, reason: "symlink to the absolute path \(target): the guest agent refuses absolute targets"))
                return
            }
            var r = request(guestPath, st, mode: UInt32(S_IFLNK))
            r.data = Data(target.utf8)
            try send(&pipeline, r, path: shown) { error in
                // The agent refuses links that escape the share: tolerate (skip) those only.
                error.status == GRPCStatus.permissionDenied ? nil : error
            }
            report.symlinks += 1
        default:
            report.skipped.append(.init(path: shown.string, reason: "a \(st.kind) cannot be copied into the guest"))
        }
    }

    /// Streams one regular file: one CopyFile per chunk, the last one makes the agent rename
    /// the file into place. Restarts once if the file changes size under it.
    func copyFile(_ fd: FileDescriptor, status: FileStatus, shownAs path: FilePath, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
        var st = status
        if let limits, report.bytes + Int64(st.size) > limits.maxBytes {
            throw FSShareError(.limitExceeded, "more than \(limits.maxBytes) bytes")
        }
        var buffer = [UInt8](repeating: 0, count: max(1, min(chunkSize, Int(st.size))))
        for attempt in 0..<2 {
            let size = Int64(st.size)
            var offset: Int64 = 0
            var shrank = false
            repeat {
                let want = Int(min(Int64(buffer.count), size - offset))
                var got = 0
                if want > 0 {
                    var failure: SystemCallError?
                    got = buffer.withUnsafeMutableBytes { b in
                        do throws(SystemCallError) {
                            return try Sys.pread(fd, into: UnsafeMutableRawBufferPointer(rebasing: b[0..<want]), offset: offset, path: path)
                        } catch {
                            failure = error
                            return 0
                        }
                    }
                    if let failure { throw FSShareError.system("cannot read \(path)", failure) }
                    if got == 0 {
                        shrank = true
                        break
                    }
                }
                var r = request(guestPath, st, mode: UInt32(S_IFREG))
                r.fileSize = size
                r.offset = offset
                r.data = Data(buffer[0..<got])
                try send(&pipeline, r, path: path)
                offset += Int64(got)
            } while offset < size
            if !shrank {
                report.files += 1
                report.bytes += size
                return
            }
            st = try sys("cannot stat \(path)") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
            if attempt == 0 { buffer = [UInt8](repeating: 0, count: max(1, min(chunkSize, Int(st.size)))) }
        }
        throw FSShareError(.conflict, "\(path) kept changing size while it was copied into the guest")
    }

    func request(_ guestPath: String, _ st: FileStatus, mode type: UInt32) -> Grpc_CopyFileRequest {
        var r = Grpc_CopyFileRequest()
        r.path = guestPath
        r.fileMode = type | (st.mode & 0o7777)
        r.dirMode = dirMode
        r.uid = Int32(bitPattern: st.uid)
        r.gid = Int32(bitPattern: st.gid)
        return r
    }

    func send(_ pipeline: inout AgentClient.Pipeline, _ r: Grpc_CopyFileRequest, path: FilePath, onError: ((AgentError) -> AgentError?)? = nil) throws(FSShareError) {
        do {
            try pipeline.send(TTRPC.agentService, TTRPC.copyFileMethod, r, onError: onError)
        } catch {
            throw FSShareError.agent("cannot copy \(path) into the guest", error)
        }
    }
}

extension FSShareError {
    /// Carries this error through an agent-error callback unchanged in meaning.
    var asAgentError: AgentError { AgentError(.remote, message) }
}
