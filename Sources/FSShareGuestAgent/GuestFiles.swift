#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SystemPackage

/// The agent's filesystem operations, confined below the share directory.
///
/// Every path is resolved from a descriptor of the share directory with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: a symlink anywhere
/// in a parent, planted by a container or by an earlier request, stops the request instead of
/// redirecting it. Final components are created, replaced and removed with `*at` calls that do
/// not follow links either. Files arrive in a temp file and are renamed into place, so a reader
/// sees the old content or the new, never a torn file.
final class GuestFiles {
    let shareDir: String
    private(set) var root: DirFD
    private let isRoot = geteuid() == 0
    private let euid = geteuid()
    private let egid = getegid()
    static let resolve = Sys.resolveBeneath | Sys.resolveNoSymlinks | Sys.resolveNoMagicLinks

    init(shareDir: String) throws(SystemCallError) {
        var dir = shareDir
        while dir.count > 1 && dir.hasSuffix("/") { dir.removeLast() }
        self.shareDir = dir
        let path = FilePath(dir)
        try Sys.makeDirectories(path, mode: 0o755)
        root = DirFD(fd: try Sys.openat(nil, path, flags: Sys.oPath | Sys.oDirectory), path: path)
    }

    /// Opens the share directory again: after a mount on it (the shared filesystem) or above
    /// it, the old descriptor points at the directory underneath.
    func reopenRoot() {
        guard let fd = try? Sys.openat(nil, root.path, flags: Sys.oPath | Sys.oDirectory) else { return }
        Sys.close(root.fd)
        root = DirFD(fd: fd, path: root.path)
    }

    // MARK: - Resolution

    /// Opens the parent directory of `p` (O_PATH), creating missing directories when asked.
    /// Every directory it creates gets exactly `dirMode` (set with fchmod, so the agent's umask
    /// does not narrow it) and the request's owner, as Kata's agent applies `dir_mode`: a
    /// non-root container user must be able to traverse what the copy created.
    private func openParent(_ p: GuestPath, create dirMode: mode_t?, uid: UInt32 = 0, gid: UInt32 = 0) throws(GuestAgentError) -> DirFD {
        let parent = p.parent
        if parent.isEmpty { return DirFD(fd: try dup(root.fd), path: root.path) }
        let rel = FilePath(parent.joined(separator: "/"))
        do {
            let fd = try Sys.openat2(root, rel, flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
            return DirFD(fd: fd, path: root.display(rel))
        } catch {
            guard error.errno == .noSuchFileOrDirectory, dirMode != nil else { throw refusal(error, p) }
        }
        let mode = dirMode ?? 0o750
        // Create the missing directories one at a time, each resolved the same way.
        var current = DirFD(fd: try dup(root.fd), path: root.path)
        for name in parent {
            let n = FilePath(name)
            do throws(SystemCallError) {
                let made = try Sys.mkdirat(current, n, mode: mode & 0o777)
                if made {
                    let created = try Sys.openat2(current, n, flags: O_RDONLY | Sys.oDirectory, resolve: GuestFiles.resolve)
                    defer { Sys.close(created) }
                    try Sys.fchmod(created, mode: mode & 0o7777, path: current.display(n))
                    try fchown(created, uid, gid, current.display(n))
                }
                let next = try Sys.openat2(current, n, flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
                Sys.close(current.fd)
                current = DirFD(fd: next, path: current.display(n))
            } catch {
                Sys.close(current.fd)
                throw refusal(error, p)
            }
        }
        return current
    }

    private func dup(_ fd: FileDescriptor) throws(GuestAgentError) -> FileDescriptor {
        do {
            return try Sys.openat(DirFD(fd: fd, path: root.path), ".", flags: Sys.oPath | Sys.oDirectory)
        } catch {
            throw GuestAgentError(.failed, "\(error)")
        }
    }

    private func refusal(_ e: SystemCallError, _ p: GuestPath) -> GuestAgentError {
        switch e.errno {
        case .tooManySymbolicLinkLevels, .notDirectory, .improperLink:
            return GuestAgentError(.denied, "\(p.components.joined(separator: "/")): a parent is a symlink or not a directory (\(e))")
        case .noSuchFileOrDirectory:
            return GuestAgentError(.notFound, "\(e)")
        case .readOnlyFileSystem:
            return GuestAgentError(.readOnly, "\(e)")
        default:
            return GuestAgentError(.failed, "\(e)")
        }
    }

    private func chown(_ dir: DirFD, _ name: FilePath, _ uid: UInt32, _ gid: UInt32) throws(SystemCallError) {
        do {
            try Sys.lchownat(dir, name, uid: uid, gid: gid)
        } catch {
            // An unprivileged agent (a test) cannot give files away; root must.
            if error.errno == .notPermitted && !isRoot { return }
            throw error
        }
    }

    // MARK: - CopyFile

    /// Kata's `CopyFile` semantics (directories, symlinks, chunked files) with atomic replace.
    func copyFile(_ r: Grpc_CopyFileRequest) throws(GuestAgentError) {
        var failure: GuestAgentError?
        r.data.withUnsafeBytes { data in
            do throws(GuestAgentError) { try copyFile(r, data: data) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// ``copyFile(_:)`` with the request's `data` given apart (`r.data` is ignored): a chunk is
    /// written straight from the connection's buffer.
    func copyFile(_ r: Grpc_CopyFileRequest, data: UnsafeRawBufferPointer) throws(GuestAgentError) {
        let p = try GuestPath(r.path, shareDir: shareDir)
        let type = r.fileMode & UInt32(S_IFMT)
        let perm = mode_t(r.fileMode & 0o7777)
        let uid = UInt32(bitPattern: r.uid), gid = UInt32(bitPattern: r.gid)
        let parent = try openParent(p, create: mode_t(r.dirMode == 0 ? 0o750 : r.dirMode), uid: uid, gid: gid)
        defer { Sys.close(parent.fd) }
        let leaf = FilePath(p.leaf)
        do {
            switch type {
            case UInt32(S_IFDIR):
                if let st = try? Sys.statx(parent, leaf), st.kind != .directory { try removeTree(parent, leaf) }
                _ = try Sys.mkdirat(parent, leaf, mode: 0o700)
                let fd = try Sys.openat2(parent, leaf, flags: O_RDONLY | Sys.oDirectory, resolve: GuestFiles.resolve)
                defer { Sys.close(fd) }
                try Sys.fchmod(fd, mode: perm, path: parent.display(leaf))
                try fchown(fd, uid, gid, parent.display(leaf))
            case UInt32(S_IFLNK):
                let target = String(decoding: data, as: UTF8.self)
                try GuestPath.checkSymlinkTarget(target, at: p)
                // Create under a temp name and rename over the old link: never a moment without it.
                let tmp = GuestAgent.temporaryName(for: p.leaf)
                do {
                    try Sys.symlinkat(target, parent, tmp)
                } catch {
                    guard error.errno == .fileExists else { throw error }
                    try removeTree(parent, tmp)
                    try Sys.symlinkat(target, parent, tmp)
                }
                // A new link is ours: chown only when the request names another owner.
                if uid != euid || gid != egid { try chown(parent, tmp, uid, gid) }
                try replace(parent, tmp, leaf)
            case UInt32(S_IFREG):
                try writeChunk(r, data: data, parent: parent, leaf: leaf, perm: perm, uid: uid, gid: gid)
            default:
                throw GuestAgentError(.invalid, "\(r.path): file mode \(String(r.fileMode, radix: 8)) is not a file, directory or symlink")
            }
        } catch let e as GuestAgentError {
            throw e
        } catch let e as SystemCallError {
            throw refusal(e, p)
        } catch {
            throw GuestAgentError(.failed, "\(error)")
        }
    }

    private func fchown(_ fd: FileDescriptor, _ uid: UInt32, _ gid: UInt32, _ path: FilePath) throws(SystemCallError) {
        do {
            try Sys.fchown(fd, uid: uid, gid: gid, path: path)
        } catch {
            if error.errno == .notPermitted && !isRoot { return }
            throw error
        }
    }

    private func writeChunk(_ r: Grpc_CopyFileRequest, data: UnsafeRawBufferPointer, parent: DirFD, leaf: FilePath, perm: mode_t, uid: UInt32, gid: UInt32) throws(GuestAgentError) {
        guard r.fileSize >= 0, r.offset >= 0, r.offset <= r.fileSize - Int64(data.count) else {
            throw GuestAgentError(.invalid, "\(r.path): chunk at \(r.offset) of \(data.count) bytes does not fit a \(r.fileSize)-byte file")
        }
        let tmp = GuestAgent.temporaryName(for: leaf.string)
        do {
            let fd: FileDescriptor
            if r.offset == 0 {
                // Always a fresh inode of our own: a stale or planted temp file is replaced, never
                // reused (someone else could hold it open and write after the rename).
                let flags = O_WRONLY | Sys.oNoFollow | O_CREAT | O_EXCL
                do {
                    fd = try Sys.openat2(parent, tmp, flags: flags, mode: 0o600, resolve: GuestFiles.resolve)
                } catch {
                    guard error.errno == .fileExists else { throw error }
                    try removeTree(parent, tmp)
                    fd = try Sys.openat2(parent, tmp, flags: flags, mode: 0o600, resolve: GuestFiles.resolve)
                }
            } else {
                fd = try Sys.openat2(parent, tmp, flags: O_WRONLY | Sys.oNoFollow, resolve: GuestFiles.resolve)
            }
            defer { Sys.close(fd) }
            if !data.isEmpty {
                try Sys.pwriteAll(fd, data, offset: r.offset, path: parent.display(tmp))
            }
            // A file sent in one chunk is complete now; otherwise the size says so.
            if r.offset != 0 || Int64(data.count) != r.fileSize {
                let st = try Sys.fstatx(fd, path: parent.display(tmp))
                guard Int64(st.size) >= r.fileSize else { return }
            }
            try Sys.fchmod(fd, mode: perm, path: parent.display(tmp))
            // The temp file was created by us (O_EXCL): chown only to another owner.
            if uid != euid || gid != egid { try fchown(fd, uid, gid, parent.display(tmp)) }
            try replace(parent, tmp, leaf)
        } catch let e as GuestAgentError {
            throw e
        } catch let e as SystemCallError {
            if e.errno == .noSuchFileOrDirectory && r.offset > 0 {
                throw GuestAgentError(.invalid, "\(r.path): chunk at offset \(r.offset) without the chunk at 0")
            }
            throw GuestAgentError(.failed, "\(e)")
        } catch {
            throw GuestAgentError(.failed, "\(error)")
        }
    }

    /// Renames `tmp` over `leaf`; a directory in the way (a type change) is removed first.
    /// The common case is one rename: the directory check happens only when it fails.
    private func replace(_ parent: DirFD, _ tmp: FilePath, _ leaf: FilePath) throws(SystemCallError) {
        do {
            try Sys.renameat(parent, tmp, leaf)
        } catch {
            guard error.errno == .isDirectory || error.errno == .directoryNotEmpty || error.errno == .notDirectory,
                  let st = try? Sys.statx(parent, leaf), st.kind == .directory else { throw error }
            try removeTree(parent, leaf, kind: .directory)
            try Sys.renameat(parent, tmp, leaf)
        }
    }

    // MARK: - fsshare.GuestFiles

    func removePath(_ path: String, recursive: Bool) throws(GuestAgentError) {
        let p = try GuestPath(path, shareDir: shareDir)
        let parent: DirFD
        do {
            parent = try openParent(p, create: nil)
        } catch {
            if error.kind == .notFound { return }
            throw error
        }
        defer { Sys.close(parent.fd) }
        let leaf = FilePath(p.leaf)
        do {
            guard let st = try? Sys.statx(parent, leaf) else { return }
            if st.kind == .directory {
                guard recursive else {
                    try Sys.unlinkat(parent, leaf, directory: true)
                    return
                }
                try removeTree(parent, leaf)
            } else {
                try Sys.unlinkat(parent, leaf, directory: false)
            }
        } catch {
            throw refusal(error, p)
        }
    }

    func renamePath(from: String, to: String) throws(GuestAgentError) {
        let f = try GuestPath(from, shareDir: shareDir)
        let t = try GuestPath(to, shareDir: shareDir)
        let fromParent = try openParent(f, create: nil)
        defer { Sys.close(fromParent.fd) }
        let toParent = try openParent(t, create: nil)
        defer { Sys.close(toParent.fd) }
        do {
            try Sys.renameat(fromParent, FilePath(f.leaf), toParent, FilePath(t.leaf))
        } catch {
            throw refusal(error, t)
        }
    }

    /// Makes the directory `r.path` whole: its entries are written into `..<leaf>.fsshare-tmp`
    /// (files directly: nobody can see them yet), which is renamed onto the path only when
    /// complete, refusing to replace anything there (`exists`). Entry paths are relative,
    /// canonical, parents first; nothing is resolved through a symlink.
    func writeTree(_ r: Fsshare_WriteTreeRequest) throws(GuestAgentError) {
        let p = try GuestPath(r.path, shareDir: shareDir)
        // Every entry's path and link target is checked before anything is made.
        var entries: [(path: GuestPath, rel: FilePath, type: UInt32)] = []
        entries.reserveCapacity(r.entries.count)
        for e in r.entries {
            let full = try GuestPath(r.path + "/" + e.path, shareDir: shareDir)
            let type = e.mode & UInt32(S_IFMT)
            switch type {
            case UInt32(S_IFDIR), UInt32(S_IFREG): break
            case UInt32(S_IFLNK): try GuestPath.checkSymlinkTarget(String(decoding: e.data, as: UTF8.self), at: full)
            default: throw GuestAgentError(.invalid, "\(r.path)/\(e.path): mode \(String(e.mode, radix: 8)) is not a file, directory or symlink")
            }
            entries.append((full, FilePath(e.path), type))
        }
        let parent = try openParent(p, create: mode_t(r.dirMode == 0 ? 0o750 : r.dirMode), uid: UInt32(bitPattern: r.uid), gid: UInt32(bitPattern: r.gid))
        defer { Sys.close(parent.fd) }
        let leaf = FilePath(p.leaf)
        let tmp = GuestAgent.temporaryName(for: p.leaf)
        do {
            if (try? Sys.statx(parent, leaf)) != nil { throw GuestAgentError(.exists, "\(r.path) exists") }
            if (try? Sys.statx(parent, tmp)) != nil { try removeTree(parent, tmp) }
            _ = try Sys.mkdirat(parent, tmp, mode: 0o700)
            var built = false
            defer { if !built { try? removeTree(parent, tmp) } }
            let top = try Sys.openat2(parent, tmp, flags: O_RDONLY | Sys.oDirectory, resolve: GuestFiles.resolve)
            defer { Sys.close(top) }
            let dir = DirFD(fd: top, path: parent.display(tmp))
            for (i, e) in r.entries.enumerated() {
                let rel = entries[i].rel
                let uid = UInt32(bitPattern: e.uid), gid = UInt32(bitPattern: e.gid)
                let perm = mode_t(e.mode & 0o7777)
                switch entries[i].type {
                case UInt32(S_IFDIR):
                    guard try Sys.mkdirat(dir, rel, mode: 0o700) else { throw GuestAgentError(.invalid, "\(r.path)/\(e.path) is listed twice") }
                    let fd = try Sys.openat2(dir, rel, flags: O_RDONLY | Sys.oDirectory, resolve: GuestFiles.resolve)
                    defer { Sys.close(fd) }
                    try Sys.fchmod(fd, mode: perm, path: dir.display(rel))
                    if uid != euid || gid != egid { try fchown(fd, uid, gid, dir.display(rel)) }
                case UInt32(S_IFREG):
                    let fd = try Sys.openat2(dir, rel, flags: O_WRONLY | O_CREAT | O_EXCL | Sys.oNoFollow, mode: 0o600, resolve: GuestFiles.resolve)
                    defer { Sys.close(fd) }
                    if !e.data.isEmpty {
                        var failure: SystemCallError?
                        e.data.withUnsafeBytes { b in
                            do throws(SystemCallError) { try Sys.pwriteAll(fd, b, offset: 0, path: dir.display(rel)) } catch { failure = error }
                        }
                        if let failure { throw failure }
                    }
                    try Sys.fchmod(fd, mode: perm, path: dir.display(rel))
                    if uid != euid || gid != egid { try fchown(fd, uid, gid, dir.display(rel)) }
                default:
                    // The link's parent, resolved beneath the new tree without symlinks.
                    let linkParent: FileDescriptor
                    let parentRel = rel.removingLastComponent()
                    linkParent = try Sys.openat2(dir, parentRel.isEmpty ? "." : parentRel, flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
                    defer { Sys.close(linkParent) }
                    let name = FilePath(rel.lastComponent?.string ?? "")
                    let at = DirFD(fd: linkParent, path: dir.display(parentRel))
                    try Sys.symlinkat(String(decoding: e.data, as: UTF8.self), at, name)
                    if uid != euid || gid != egid { try chown(at, name, uid, gid) }
                }
            }
            try Sys.fchmod(top, mode: mode_t(r.mode & 0o7777), path: dir.path)
            try fchown(top, UInt32(bitPattern: r.uid), UInt32(bitPattern: r.gid), dir.path)
            do {
                try Sys.renameat(parent, tmp, parent, leaf, noReplace: true)
            } catch {
                if error.errno == .fileExists { throw GuestAgentError(.exists, "\(r.path) exists") }
                throw error
            }
            built = true
        } catch let e as GuestAgentError {
            throw e
        } catch let e as SystemCallError {
            throw refusal(e, p)
        } catch {
            throw GuestAgentError(.failed, "\(error)")
        }
    }

    /// Creates or replaces symlinks in the directory `r.dir`, in order, each through a temp
    /// name and one rename (a reader sees the old link or the new one, never none).
    func setLinks(_ r: Fsshare_SetLinksRequest) throws(GuestAgentError) {
        let p = try GuestPath(r.dir, shareDir: shareDir)
        for link in r.links {
            guard !link.name.isEmpty, !link.name.contains("/"), link.name != ".", link.name != "..", !link.name.utf8.contains(0) else {
                throw GuestAgentError(.invalid, "\(r.dir): \"\(link.name)\" is not a name")
            }
            let at = try GuestPath(r.dir + "/" + link.name, shareDir: shareDir)
            try GuestPath.checkSymlinkTarget(link.target, at: at)
        }
        let parent = try openParent(p, create: nil)
        defer { Sys.close(parent.fd) }
        let uid = UInt32(bitPattern: r.uid), gid = UInt32(bitPattern: r.gid)
        do throws(SystemCallError) {
            let fd = try Sys.openat2(parent, FilePath(p.leaf), flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
            defer { Sys.close(fd) }
            let dir = DirFD(fd: fd, path: parent.display(FilePath(p.leaf)))
            for link in r.links {
                // A link that is not there yet is made in place (symlinkat either makes it whole
                // or fails): one call instead of two.
                do {
                    try Sys.symlinkat(link.target, dir, FilePath(link.name))
                    if uid != euid || gid != egid { try chown(dir, FilePath(link.name), uid, gid) }
                    continue
                } catch {
                    guard error.errno == .fileExists else { throw error }
                }
                let tmp = GuestAgent.temporaryName(for: link.name)
                do {
                    try Sys.symlinkat(link.target, dir, tmp)
                } catch {
                    guard error.errno == .fileExists else { throw error }
                    try removeTree(dir, tmp)
                    try Sys.symlinkat(link.target, dir, tmp)
                }
                if uid != euid || gid != egid { try chown(dir, tmp, uid, gid) }
                try replace(dir, tmp, FilePath(link.name))
            }
        } catch {
            throw refusal(error, p)
        }
    }

    func pruneDirectory(_ path: String, keep: [String]) throws(GuestAgentError) {
        let p = try GuestPath(path, shareDir: shareDir)
        let parent = try openParent(p, create: nil)
        defer { Sys.close(parent.fd) }
        let keepSet = Set(keep)
        do {
            let fd = try Sys.openat2(parent, FilePath(p.leaf), flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
            defer { Sys.close(fd) }
            let dir = DirFD(fd: fd, path: parent.display(FilePath(p.leaf)))
            for entry in try Sys.listDirectory(dir, ".") where !keepSet.contains(entry.name) {
                try removeTree(dir, FilePath(entry.name), kind: entry.kind)
            }
        } catch {
            throw refusal(error, p)
        }
    }

    /// Removes `dir/name` and everything below it, never following a symlink. `kind` is the
    /// listing's d_type when known (saves a statx per entry); a stale one is corrected.
    func removeTree(_ dir: DirFD, _ name: FilePath, kind: FileKind? = nil) throws(SystemCallError) {
        var kind = kind
        if kind == nil {
            guard let st = try? Sys.statx(dir, name) else { return }
            kind = st.kind
        }
        if kind != .directory {
            do {
                try Sys.unlinkat(dir, name, directory: false)
            } catch {
                if error.errno == .noSuchFileOrDirectory { return }
                // Replaced by a directory since the listing: look again.
                guard error.errno == .isDirectory else { throw error }
                try removeTree(dir, name, kind: .directory)
            }
            return
        }
        let fd = try Sys.openat2(dir, name, flags: Sys.oPath | Sys.oDirectory, resolve: GuestFiles.resolve)
        defer { Sys.close(fd) }
        let sub = DirFD(fd: fd, path: dir.display(name))
        for entry in try Sys.listDirectory(sub, ".") {
            try removeTree(sub, FilePath(entry.name), kind: entry.kind)
        }
        do {
            try Sys.unlinkat(dir, name, directory: true)
        } catch {
            if error.errno != .noSuchFileOrDirectory { throw error }
        }
    }
}
