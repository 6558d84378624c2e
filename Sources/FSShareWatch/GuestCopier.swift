#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareProto
import FSShareSystem
import SystemPackage

/// What one copy into the guest did.
public struct CopyReport: Sendable, Equatable {
    /// Regular files copied.
    public var files = 0
    /// Directories created.
    public var directories = 0
    /// Symbolic links created (as links: never followed).
    public var symlinks = 0
    /// Bytes of file content sent.
    public var bytes: Int64 = 0
    /// Entries not copied, each with the reason (sockets, devices, refused symlinks, ...).
    public var skipped: [Skipped] = []
    /// Entries looked at below the top directory (copied or skipped), for the limits.
    var entriesSeen = 0

    /// An entry that was not copied.
    public struct Skipped: Sendable, Equatable {
        /// Its host path.
        public var path: String
        /// Why it was skipped.
        public var reason: String
        /// `path` was skipped for `reason`.
        ///
        /// - Parameters:
        ///   - path: the entry's host path.
        ///   - reason: why it was skipped.
        public init(path: String, reason: String) {
            self.path = path
            self.reason = reason
        }
    }

    /// An empty report.
    public init() {}
}

/// Streams a host tree into the guest through `CopyFile`, in bounded chunks: a file is read
/// `chunkSize` bytes at a time and each chunk is sent before the next is read, so memory does
/// not grow with file size. Requests are pipelined. With an agent that applies them in order
/// (fsshare-agent) nothing waits; with one that serves each request concurrently (Kata's) a
/// directory is created before anything inside it is sent, a file's chunks go one after the
/// other, and two requests that touch the same guest path (Kata writes `<stem>.tmp` beside a
/// file, so `a.conf` and `a.txt` share `a.tmp`) are never in flight together.
///
/// Never follows a symlink inside the tree: links are copied as links.
package struct GuestCopier {
    /// Kata's `grpcMaxDataSize`: 1 MiB per CopyFile chunk.
    static let defaultChunkSize = 1 << 20
    var chunkSize = GuestCopier.defaultChunkSize
    /// Mode for directories the agent creates implicitly (Kata sends 0750).
    var dirMode: UInt32 = 0o750
    /// Entries and bytes allowed below the top directory (the watcher's per-volume limits),
    /// checked as the tree is read: copying stops at the limit, no separate walk is needed.
    var limits: WatchLimits?
    /// Polled before every entry and chunk: a cancelled caller's copy stops there (and the
    /// sharer rolls it back).
    package var cancellation: CancellationFlag?

    package init() {}

    /// Copies the object open at `fd` (a file or directory; `O_PATH` is fine) to `guestPath`.
    package func copy(_ fd: FileDescriptor, shownAs path: FilePath, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
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
        try barrier(&pipeline, path: dir.path)
        report.directories += 1
        let entries = try sys("cannot list \(dir.path)") { () throws(SystemCallError) in try Sys.listDirectory(dir, ".") }
        for entry in entries.sorted(by: { $0.name < $1.name }) {
            try copyEntry(dir, entry.name, to: guestPath + "/" + entry.name, pipeline: &pipeline, report: &report)
        }
    }

    /// At most this much file content goes into one WriteTree (Kata's CopyFile chunk size:
    /// well inside ttrpc's 4 MiB message limit).
    static let treeBytes = 1 << 20

    /// The whole of `dir` (directories and regular files only) as one `WriteTree` request, or
    /// nil when it holds anything else (a symlink, a special file) or more than ``treeBytes``:
    /// the caller then copies entry by entry. Counts toward `report` (and the limits) as a copy
    /// would.
    func treeRequest(_ dir: DirFD, status st: FileStatus, to guestPath: String, report: inout CopyReport) throws(FSShareError) -> Fsshare_WriteTreeRequest? {
        var r = Fsshare_WriteTreeRequest()
        r.path = guestPath
        r.mode = st.mode & 0o7777
        r.uid = Int32(bitPattern: st.uid)
        r.gid = Int32(bitPattern: st.gid)
        r.dirMode = dirMode
        var counted = report
        counted.directories += 1
        var bytes = 0
        // Depth first, each directory listed before what is inside it.
        var pending: [(fd: FileDescriptor?, dir: DirFD, rel: String)] = [(nil, dir, "")]
        defer { for p in pending { if let fd = p.fd { Sys.close(fd) } } }
        while let (owned, current, rel) = pending.popLast() {
            defer { if let owned { Sys.close(owned) } }
            let listed = try sys("cannot list \(current.path)") { () throws(SystemCallError) in try Sys.listDirectory(current, ".") }
            for entry in listed.sorted(by: { $0.name < $1.name }) {
                let n = FilePath(entry.name)
                let shown = current.display(n)
                counted.entriesSeen += 1
                if let limits, counted.entriesSeen > limits.maxEntries {
                    throw FSShareError(.limitExceeded, "more than \(limits.maxEntries) entries")
                }
                let est: FileStatus
                do {
                    est = try Sys.statx(current, n)
                } catch {
                    if error.errno == .noSuchFileOrDirectory { continue }
                    throw FSShareError.system("cannot stat \(shown)", error)
                }
                var e = Fsshare_TreeEntry()
                e.path = rel.isEmpty ? entry.name : rel + "/" + entry.name
                e.uid = Int32(bitPattern: est.uid)
                e.gid = Int32(bitPattern: est.gid)
                switch est.kind {
                case .directory:
                    e.mode = UInt32(S_IFDIR) | (est.mode & 0o7777)
                    let fd = try sys("cannot open \(shown)") { () throws(SystemCallError) in
                        try Sys.openat(current, n, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
                    }
                    pending.append((fd, DirFD(fd: fd, path: shown), e.path))
                    counted.directories += 1
                case .regular:
                    bytes += Int(est.size)
                    if bytes > GuestCopier.treeBytes { return nil }
                    if let limits, counted.bytes + Int64(est.size) > limits.maxBytes {
                        throw FSShareError(.limitExceeded, "more than \(limits.maxBytes) bytes")
                    }
                    let fd = try sys("cannot open \(shown)") { () throws(SystemCallError) in try Sys.openat(current, n, flags: O_RDONLY | Sys.oNoFollow) }
                    defer { Sys.close(fd) }
                    let content = try sys("cannot read \(shown)") { () throws(SystemCallError) in try Sys.readAll(fd, path: shown) }
                    // Changed size while read: leave it to the entry-by-entry copy, which retries.
                    guard content.count == Int(est.size) else { return nil }
                    e.mode = UInt32(S_IFREG) | (est.mode & 0o7777)
                    e.data = Data(content)
                    counted.files += 1
                    counted.bytes += Int64(content.count)
                default:
                    return nil
                }
                r.entries.append(e)
            }
        }
        report = counted
        return r
    }

    /// Copies `dir/name` (any kind) to `guestPath`.
    func copyEntry(_ dir: DirFD, _ name: String, to guestPath: String, pipeline: inout AgentClient.Pipeline, report: inout CopyReport) throws(FSShareError) {
        let n = FilePath(name)
        let shown = dir.display(n)
        try cancellation?.check("copying \(shown) into the guest")
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
            try claim(&pipeline, [guestPath], path: shown)
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
        // The chunk is read straight into the frame that carries it (no copy in user space).
        var buffer = BulkFrame(capacity: max(1, min(chunkSize, Int(st.size))))
        try claim(&pipeline, [guestPath, GuestCopier.kataTemporaryPath(guestPath)], path: path)
        for attempt in 0..<2 {
            let size = Int64(st.size)
            var offset: Int64 = 0
            var shrank = false
            repeat {
                try cancellation?.check("copying \(path) into the guest")
                let want = Int(min(Int64(buffer.capacity), size - offset))
                var got = 0
                if want > 0 {
                    got = try sys("cannot read \(path)") { () throws(SystemCallError) in
                        try Sys.pread(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer.data[0..<want]), offset: offset, path: path)
                    }
                    if got == 0 {
                        shrank = true
                        break
                    }
                }
                var r = request(guestPath, st, mode: UInt32(S_IFREG))
                r.fileSize = size
                r.offset = offset
                do {
                    try pipeline.sendBulk(TTRPC.agentService, TTRPC.copyFileMethod, r, field: TTRPC.copyFileDataField, in: buffer, count: got)
                } catch {
                    throw FSShareError.agent("cannot copy \(path) into the guest", error)
                }
                offset += Int64(got)
                // A chunk must land before the next: the agent renames the file into place
                // once it has its full size.
                if offset < size { try barrier(&pipeline, path: path) }
            } while offset < size
            if !shrank {
                report.files += 1
                report.bytes += size
                return
            }
            try barrier(&pipeline, path: path)
            st = try sys("cannot stat \(path)") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
            if attempt == 0 { buffer = BulkFrame(capacity: max(1, min(chunkSize, Int(st.size)))) }
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

    /// The temp file Kata's agent writes a file through: the target with its extension
    /// replaced by `tmp` (Rust's `Path::set_extension`: `a.conf` and `a` → `a.tmp`; a name
    /// whose only dot leads it, `.env`, → `.env.tmp`).
    static func kataTemporaryPath(_ guestPath: String) -> String {
        let slash = guestPath.lastIndex(of: "/").map { guestPath.index(after: $0) } ?? guestPath.startIndex
        let name = guestPath[slash...]
        if let dot = name.lastIndex(of: "."), dot != name.startIndex {
            return String(guestPath[..<dot]) + ".tmp"
        }
        return guestPath + ".tmp"
    }

    func barrier(_ pipeline: inout AgentClient.Pipeline, path: FilePath) throws(FSShareError) {
        do {
            try pipeline.barrier()
        } catch {
            throw FSShareError.agent("cannot copy \(path) into the guest", error)
        }
    }

    func claim(_ pipeline: inout AgentClient.Pipeline, _ paths: [String], path: FilePath) throws(FSShareError) {
        do {
            try pipeline.claim(paths)
        } catch {
            throw FSShareError.agent("cannot copy \(path) into the guest", error)
        }
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
    package var asAgentError: AgentError { AgentError(.remote, message) }
}
