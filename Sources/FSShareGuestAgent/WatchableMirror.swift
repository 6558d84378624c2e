#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SystemPackage

/// The guest side of Kata's `watchable-bind` storage: a tmpfs over `<share dir>/watchable/`
/// holding a copy of each watched volume, which containers bind instead of the shared
/// filesystem's view (where updates raise no inotify event).
///
/// fsshare-agent copies a volume once, when its storage arrives; after that the host's watcher
/// pushes each update through `CopyFile` and `fsshare.GuestFiles` in atomic-writer order (Kata's
/// agent instead polls every 2 s). The copy goes through the same confined operations as the
/// host's requests (``GuestFiles/copyFile(_:)``): files land whole through a temp name, links are
/// copied as links, and no symlink is followed on either side.
enum WatchableMirror {
    /// The parents a mirror may live in, relative to the share directory (Kata's agent accepts
    /// `…/containers/watchable` and runtime-rs's `…/containers/passthrough/watchable`).
    static let parents = ["watchable", "passthrough/watchable"]

    /// The tmpfs root `mountPoint` belongs to, or a refusal: it must be a direct child of one of
    /// ``parents`` below `shareDir`.
    static func root(of mountPoint: String, shareDir: String) throws(GuestAgentError) -> String {
        let point = StorageMounter.canonical(mountPoint)
        guard let slash = point.lastIndex(of: "/") else {
            throw GuestAgentError(.invalid, "watchable mount point \"\(mountPoint)\" is not absolute")
        }
        let parent = String(point[..<slash])
        let leaf = point[point.index(after: slash)...]
        guard !leaf.isEmpty, leaf != ".", leaf != "..", parents.contains(where: { shareDir + "/" + $0 == parent }) else {
            throw GuestAgentError(
                .invalid,
                "watchable mount point \"\(mountPoint)\" must be directly below \(parents.map { shareDir + "/" + $0 }.joined(separator: " or "))")
        }
        return parent
    }

    /// The `CopyFile` requests that recreate `source` (a guest path on the shared filesystem) at
    /// `target`, in atomic-writer order: every directory and file first (a timestamped
    /// directory completely), then `..data`, then the other top-level links (a volume's keys).
    /// Bounded by Kata's per-storage limits, which the host applied already.
    static func requests(source: String, target: String, maxEntries: Int = 1024, maxBytes: Int = 16 << 20) throws(GuestAgentError) -> [Grpc_CopyFileRequest] {
        let top: FileDescriptor
        do {
            top = try Sys.openat2(nil, FilePath(source), flags: Sys.oPath, resolve: Sys.resolveNoSymlinks | Sys.resolveNoMagicLinks)
        } catch {
            throw GuestAgentError(.notFound, "watchable source \(source): \(error)")
        }
        defer { Sys.close(top) }
        var out: [Grpc_CopyFileRequest] = []
        var links: [Grpc_CopyFileRequest] = []
        var bytes = 0
        do {
            let st = try Sys.fstatx(top, path: FilePath(source))
            if st.kind == .regular {
                let fd = try Sys.openat2(nil, FilePath(source), flags: O_RDONLY | Sys.oNoFollow, resolve: Sys.resolveNoSymlinks | Sys.resolveNoMagicLinks)
                defer { Sys.close(fd) }
                var r = request(target, st, type: S_IFREG)
                let bytes = try Sys.readAll(fd, path: FilePath(source))
                r.fileSize = Int64(bytes.count)
                r.data = Data(bytes)
                return [r]
            }
            guard st.kind == .directory else { throw GuestAgentError(.invalid, "watchable source \(source) is a \(st.kind)") }
            out.append(request(target, st, type: S_IFDIR))
            // Depth first; directories before what is inside them.
            var pending: [(dir: FilePath, guest: String)] = [(".", target)]
            while let (dir, guest) = pending.popLast() {
                let base = DirFD(fd: top, path: FilePath(source))
                for entry in try Sys.listDirectory(base, dir).sorted(by: { $0.name < $1.name }) {
                    let rel = dir == "." ? FilePath(entry.name) : dir.appending(entry.name)
                    let path = guest + "/" + entry.name
                    let est = try Sys.statx(base, rel)
                    switch est.kind {
                    case .directory:
                        out.append(request(path, est, type: S_IFDIR))
                        pending.append((rel, path))
                    case .regular:
                        bytes += Int(est.size)
                        out.append(try file(base, rel, est, to: path))
                    case .symlink:
                        var r = request(path, est, type: S_IFLNK)
                        r.fileMode = UInt32(S_IFLNK) | 0o777
                        r.data = Data(try Sys.readlinkat(base, rel).utf8)
                        // Top-level links wait for the data they name; ..data goes first.
                        if dir == "." { links.append(r) } else { out.append(r) }
                    default:
                        continue
                    }
                    if out.count + links.count > maxEntries || bytes > maxBytes {
                        throw GuestAgentError(.invalid, "watchable source \(source) is over \(maxEntries) entries or \(maxBytes) bytes")
                    }
                }
            }
        } catch let e as GuestAgentError {
            throw e
        } catch {
            throw GuestAgentError(.failed, "cannot read the watchable source \(source): \(error)")
        }
        let data = target + "/..data"
        return out + links.filter { $0.path == data } + links.filter { $0.path != data }
    }

    private static func request(_ path: String, _ st: FileStatus, type: mode_t) -> Grpc_CopyFileRequest {
        var r = Grpc_CopyFileRequest()
        r.path = path
        r.fileMode = type | (st.mode & 0o7777)
        r.dirMode = 0o755
        r.uid = Int32(bitPattern: st.uid)
        r.gid = Int32(bitPattern: st.gid)
        return r
    }

    private static func file(_ dir: DirFD, _ rel: FilePath, _ st: FileStatus, to path: String) throws(SystemCallError) -> Grpc_CopyFileRequest {
        let fd = try Sys.openat(dir, rel, flags: O_RDONLY | Sys.oNoFollow)
        defer { Sys.close(fd) }
        let bytes = try Sys.readAll(fd, path: dir.display(rel))
        var r = request(path, st, type: S_IFREG)
        r.fileSize = Int64(bytes.count)
        r.data = Data(bytes)
        return r
    }
}
