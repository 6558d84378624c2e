#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import Synchronization
import SystemPackage

/// Opens a share source once (`O_PATH`) and decides whether it may be shared. The share is then
/// made from that descriptor, so what was checked is exactly what gets bound.
enum SourceCheck {
    struct Opened {
        var fd: FileDescriptor
        /// The resolved path (where the kernel found the object), as text.
        var pathText: String
        var kind: FileKind
        /// `path`, when following symbolic links took the source somewhere else than it says.
        var resolvedThroughSymlinks: FilePath?
        /// The resolved path (made when asked for: the share hot path only shows it in errors).
        var path: FilePath { resolvedThroughSymlinks ?? FilePath(pathText) }
    }

    /// What a source must stay clear of: the sandbox root, its ancestors and everything below
    /// it. A share that contains the root would let the guest plant symlinks in `mounts/` and
    /// `private/` of every sandbox; a share from inside it would export fsshare's own mounts.
    struct RootGuard {
        struct Identity: Hashable {
            var major: UInt32, minor: UInt32, inode: UInt64
            init(_ st: FileStatus) { (major, minor, inode) = (st.deviceMajor, st.deviceMinor, st.inode) }
        }
        /// The root as the kernel names it (symlinks in the configured path resolved).
        var path: FilePath
        /// `path` as text, made once (compared with every source).
        var pathText: String
        var root: Identity
        /// The root's ancestors up to `/`, by identity: a bind-mount alias of one is caught too.
        var ancestors: Set<Identity>

        /// The guard for `root`, from a process-wide cache when the root is still the same
        /// directory at the same place (its identity and the path the kernel gives for it, one
        /// fstatx and one readlink), else walked afresh. Every sandbox of a node shares its
        /// root: the walk up to `/` (two syscalls per level) is done once per process.
        static func cached(root: DirFD) throws(FSShareError) -> RootGuard {
            let path = (try? Sys.pathOf(root.fd)) ?? root.path
            let st = try sys("cannot stat \(root.path)") { () throws(SystemCallError) in try Sys.fstatx(root.fd, path: root.path) }
            let key = path.string
            if let known = cache.withLock({ $0[key] }), known.root == Identity(st) { return known }
            let fresh = try RootGuard(root: root)
            cache.withLock { $0[key] = fresh }
            return fresh
        }

        private static let cache = Mutex<[String: RootGuard]>([:])

        /// Walks from the root (an open directory) up to `/`.
        init(root: DirFD) throws(FSShareError) {
            path = (try? Sys.pathOf(root.fd)) ?? root.path
            pathText = path.string
            var current = try sys("cannot open \(root.path)") { () throws(SystemCallError) in
                try Sys.openat(root, ".", flags: Sys.oPath | Sys.oDirectory)
            }
            defer { Sys.close(current) }
            let rootStat = try sys("cannot stat \(root.path)") { () throws(SystemCallError) in try Sys.fstatx(current, path: root.path) }
            self.root = Identity(rootStat)
            var seen: Set<Identity> = []
            var last = self.root
            for _ in 0..<256 {
                let parent = try sys("cannot open the parent of \(root.path)") { () throws(SystemCallError) in
                    try Sys.openat(DirFD(fd: current, path: root.path), "..", flags: Sys.oPath | Sys.oDirectory)
                }
                Sys.close(current)
                current = parent
                let st = try sys("cannot stat an ancestor of \(root.path)") { () throws(SystemCallError) in try Sys.fstatx(parent, path: root.path) }
                let id = Identity(st)
                if id == last || !seen.insert(id).inserted { break }  // "/" is its own parent
                last = id
            }
            ancestors = seen
        }

        /// Why a source that resolved to `resolved` (a normal absolute path) with status `st`
        /// may not be shared, or nil.
        func problem(resolved: String, _ st: FileStatus) -> String? {
            let id = Identity(st)
            if id == root { return "it is the sandbox root \(path)" }
            let rootPath = pathText
            if ancestors.contains(id) || RootGuard.isPrefix(resolved, of: rootPath) {
                return "it contains the sandbox root \(path); a guest could plant symlinks in fsshare's own directories"
            }
            if RootGuard.isPrefix(rootPath, of: resolved) {
                return "it is inside the sandbox root \(path), where fsshare keeps its own mounts"
            }
            return nil
        }

        /// `FilePath.starts(with:)` for two normal absolute paths, on their bytes: `prefix`'s
        /// components begin `path`'s (`/a` begins `/a/b`, not `/ab`; `/` begins everything).
        static func isPrefix(_ prefix: String, of path: String) -> Bool {
            withUTF8Bytes(prefix) { p in
                withUTF8Bytes(path) { s in
                    if p.count == 1 && p[0] == UInt8(ascii: "/") { return s.first == UInt8(ascii: "/") }
                    guard s.count >= p.count, let sb = s.baseAddress, let pb = p.baseAddress, memcmp(sb, pb, p.count) == 0 else { return false }
                    return s.count == p.count || s[p.count] == UInt8(ascii: "/")
                }
            }
        }
    }

    /// Filesystem types by unique mount id. A mount's filesystem never changes and the kernel
    /// never gives its unique id (`STATX_MNT_ID_UNIQUE`, Linux 6.8+) to another mount, so a
    /// remembered answer is the answer: sources on one tmpfs (a pod's configmaps, secrets,
    /// projected and memory-backed volumes) cost one `fstatfs` per mount, not per share. With
    /// only plain mount ids (reused after an unmount) nothing is remembered.
    enum FilesystemTypes {
        /// Bounded: when full it starts over (a node has a few hundred such mounts at most).
        static let limit = 512
        private static let known = Mutex<[UInt64: Int]>([:])

        /// `fd`'s filesystem magic (`st` is `fd`'s status).
        static func of(_ fd: FileDescriptor, _ st: FileStatus, path: @autoclosure () -> FilePath) throws(SystemCallError) -> Int {
            let remember = st.mountIDIsUnique && st.mountAnswersKnown
            if remember, let magic = known.withLock({ $0[st.mountID] }) { return magic }
            let magic = try Sys.filesystemType(fd, path: path())
            if remember {
                known.withLock {
                    if $0.count >= limit { $0.removeAll(keepingCapacity: true) }
                    $0[st.mountID] = magic
                }
            }
            return magic
        }
    }

    /// Filesystems that are kernel interfaces, not data: never exported to a guest.
    static let pseudoFilesystems: [Int: String] = [
        0x9fa0: "proc", 0x6265_6572: "sysfs", 0x6462_6720: "debugfs", 0x7472_6163: "tracefs",
        0x7363_6673: "securityfs", 0x27e0eb: "cgroup", 0x6367_7270: "cgroup2", 0xcafe_4a11: "bpf",
        0x1cd1: "devpts", 0x6265_6570: "configfs", 0xde5e_81e4: "efivarfs", 0x6165_676c: "pstore",
        0xf97c_ff8c: "selinuxfs", 0x4249_4e4d: "binfmt_misc", 0x6573_5543: "fusectl", 0x6e73_6673: "nsfs",
    ]

    /// Why `path` (lexically) may not be shared, or nil. Byte-level, on the path's own bytes
    /// (`text`, when the caller has it): this runs on every share.
    static func lexicalProblem(_ path: @autoclosure () -> FilePath, text: String? = nil) -> String? {
        var raw = text ?? path().string
        // Only a path with "." or ".." components or doubled slashes needs normalising first.
        if let decided = raw.withUTF8({ b -> String?? in
            var end = b.count
            while end > 1 && b[end - 1] == 0x2F { end -= 1 }
            var previous: UInt8 = 0
            for i in 0..<end {
                let c = b[i]
                if c == 0x2F && previous == 0x2F { return nil }
                if c == 0x2E && previous == 0x2F && (i + 1 == end || b[i + 1] == 0x2F || b[i + 1] == 0x2E) { return nil }
                previous = c
            }
            return .some(kernelInterface(UnsafeBufferPointer(rebasing: b[0..<end])))
        }) {
            return decided
        }
        var normal = path().lexicallyNormalized().string
        return normal.withUTF8 { kernelInterface($0) }
    }

    /// Why a normal path is a kernel interface (/proc, /sys, /dev itself), or nil.
    private static func kernelInterface(_ bytes: UnsafeBufferPointer<UInt8>) -> String? {
        func under(_ prefix: StaticString) -> Bool {
            let p = UnsafeBufferPointer(start: prefix.utf8Start, count: prefix.utf8CodeUnitCount)
            guard bytes.count >= p.count, bytes[0..<p.count].elementsEqual(p) else { return false }
            return bytes.count == p.count || bytes[p.count] == 0x2F
        }
        if under("/proc") { return "it is under /proc, a kernel interface" }
        if under("/sys") { return "it is under /sys, a kernel interface" }
        if bytes.elementsEqual("/dev".utf8) { return "it is the host's /dev" }
        return nil
    }

    static func open(_ path: FilePath, policy: SourceSymlinkPolicy, rootGuard: RootGuard? = nil) throws(FSShareError) -> Opened {
        try open(text: path.string, given: path, policy: policy, rootGuard: rootGuard)
    }

    /// ``open(_:policy:rootGuard:)`` of a source recorded as text (the share hot path: the
    /// text is checked and opened as it is; a `FilePath` is made only for an error or a
    /// source reached through symlinks).
    static func open(text: String, policy: SourceSymlinkPolicy, rootGuard: RootGuard? = nil) throws(FSShareError) -> Opened {
        try open(text: text, given: nil, policy: policy, rootGuard: rootGuard)
    }

    private static func open(text raw: String, given: FilePath?, policy: SourceSymlinkPolicy, rootGuard: RootGuard?) throws(FSShareError) -> Opened {
        var path: FilePath { given ?? FilePath(raw) }
        // One pass over the bytes: absolute, no NUL, and whether it is normal already.
        let (valid, normal) = withUTF8Bytes(raw) { b in
            (b.first == UInt8(ascii: "/") && !b.containsByte(0), ShareNaming.isNormal(b))
        }
        guard valid else {
            throw FSShareError(.invalidArgument, "share source \"\(raw)\" must be a non-empty absolute path")
        }
        if let problem = lexicalProblem(path, text: raw) { throw refused(path, problem) }
        // First without any symlink: then the path as given (already normal) is where the open
        // went, and the kernel need not be asked for it (readlink of /proc/self/fd). Only a
        // path with a symlink in it, which `follow` allows, is opened a second time.
        var resolve = Sys.resolveNoMagicLinks
        if policy == .refuse || normal { resolve |= Sys.resolveNoSymlinks }
        var fd: FileDescriptor
        var withoutSymlinks = resolve & Sys.resolveNoSymlinks != 0
        do {
            fd = try Sys.openat2(nil, text: raw, flags: Sys.oPath, resolve: resolve)
        } catch {
            if error.errno == .tooManySymbolicLinkLevels && policy == .follow && normal {
                do {
                    fd = try Sys.openat2(nil, path, flags: Sys.oPath, resolve: Sys.resolveNoMagicLinks)
                    withoutSymlinks = false
                } catch {
                    if error.errno == .tooManySymbolicLinkLevels || error.errno == .improperLink {
                        throw refused(path, "it resolves through a /proc magic link")
                    }
                    throw FSShareError.system("cannot open the share source \(path)", error)
                }
            } else if error.errno == .tooManySymbolicLinkLevels || error.errno == .improperLink {
                throw refused(path, policy == .refuse ? "it contains a symbolic link (source symlinks are refused)" : "it resolves through a /proc magic link")
            } else {
                throw FSShareError.system("cannot open the share source \(path)", error)
            }
        }
        do {
            let st = try Sys.fstatx(fd, path: path)
            // Opened without a symlink from a normal path: the open went exactly where it says.
            let asGiven = withoutSymlinks && normal
            let resolved: FilePath? = asGiven ? nil : ((try? Sys.pathOf(fd)) ?? path)
            let resolvedText = resolved?.string ?? raw
            switch st.kind {
            case .regular, .directory: break
            default: throw refused(path, "it is a \(st.kind), which a shared filesystem cannot carry")
            }
            // The path as given was checked above; a path reached through symlinks is checked too.
            if let resolved, let problem = lexicalProblem(resolved, text: resolvedText) {
                throw refused(path, "it resolves to \(resolved): \(problem.dropFirst(3))")
            }
            if st.kind != .regular, withUTF8Bytes(resolvedText, { $0.startsWith("/dev/") }) {
                throw refused(path, "it is a \(st.kind) under /dev (host devices are not shared)")
            }
            // Kernel pseudo-filesystems all sit on anonymous devices (major 0): a filesystem on
            // a real block device cannot be one, and needs no fstatfs.
            if st.deviceMajor == 0 {
                let magic = try FilesystemTypes.of(fd, st, path: path)
                if let name = pseudoFilesystems[magic] {
                    throw refused(path, "it is on \(name), a kernel pseudo-filesystem")
                }
            }
            if let problem = rootGuard?.problem(resolved: resolvedText, st) { throw refused(path, problem) }
            guard let resolved else {
                return Opened(fd: fd, pathText: raw, kind: st.kind, resolvedThroughSymlinks: nil)
            }
            let viaSymlinks = resolved == (normal ? path : path.lexicallyNormalized()) ? nil : resolved
            return Opened(fd: fd, pathText: resolvedText, kind: st.kind, resolvedThroughSymlinks: viaSymlinks)
        } catch let error as FSShareError {
            Sys.close(fd)
            throw error
        } catch let error as SystemCallError {
            Sys.close(fd)
            throw FSShareError.system("cannot inspect the share source \(path)", error)
        } catch {
            Sys.close(fd)
            throw FSShareError(.systemCall, "cannot inspect the share source \(path): \(error)")
        }
    }

    static func refused(_ path: FilePath, _ why: String) -> FSShareError {
        FSShareError(.refused, "refusing to share \(path): \(why)")
    }
}
