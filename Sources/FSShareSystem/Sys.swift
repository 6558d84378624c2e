#if canImport(Glibc)
import Glibc
#endif
import CFSShareShim
import SystemPackage
import Synchronization

/// An open directory (usually `O_PATH`) and the path it was opened at, kept together so that
/// `*at` calls relative to it report a full path in their errors. It does not own the fd.
public struct DirFD: Sendable {
    /// The open directory (often `O_PATH`).
    public var fd: FileDescriptor
    /// Its path, for messages only: calls go through `fd`. Built when asked for, for a
    /// directory given as a parent and a name.
    public var path: FilePath {
        get {
            guard let leaf else { return base }
            return base.appending(leaf)
        }
        set {
            base = newValue
            leaf = nil
        }
    }
    private var base: FilePath
    private var leaf: String?

    /// A directory open at `fd`, shown as `path` in errors.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    public init(fd: FileDescriptor, path: FilePath) {
        self.fd = fd
        self.base = path
        self.leaf = nil
    }

    /// A directory open at `fd`, shown as `parent/name` in errors; that path is built only
    /// when something shows it.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - parent: the path of the directory holding it.
    ///   - name: its name there (one component).
    public init(fd: FileDescriptor, in parent: FilePath, name: String) {
        self.fd = fd
        self.base = parent
        self.leaf = name
    }

    /// A directory open at `fd`, shown as `parent`'s path followed by `name`; built only when
    /// something shows it (also when `parent`'s own path is still unbuilt).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - parent: the directory holding it.
    ///   - name: its name there (one or more components).
    public init(fd: FileDescriptor, below parent: DirFD, name: String) {
        self.fd = fd
        self.base = parent.base
        self.leaf = parent.leaf.map { $0 + "/" + name } ?? name
    }
    /// The full path of `name` below this directory, for messages.
    ///
    /// - Parameter name: the entry name in `dir`.
    /// - Returns: `path` followed by `name`.
    public func display(_ name: FilePath) -> FilePath { path.pushing(name) }
}

/// The kind of a filesystem object, from `st_mode`.
public enum FileKind: Sendable, Equatable, CustomStringConvertible {
    case regular, directory, symlink, characterDevice, blockDevice, fifo, socket, unknown

    /// The kind a `st_mode` value encodes.
    ///
    /// - Parameter mode: permission bits for what is created.
    public init(mode: UInt32) {
        // The S_IF* values as literals: Glibc's imported macros are function calls, and this
        // runs on every statx.
        switch mode & 0o170000 {
        case 0o100000: self = .regular
        case 0o040000: self = .directory
        case 0o120000: self = .symlink
        case 0o020000: self = .characterDevice
        case 0o060000: self = .blockDevice
        case 0o010000: self = .fifo
        case 0o140000: self = .socket
        default: self = .unknown
        }
    }

    /// The kind in words (`directory`, `symbolic link`, ...).
    public var description: String {
        switch self {
        case .regular: "regular file"
        case .directory: "directory"
        case .symlink: "symbolic link"
        case .characterDevice: "character device"
        case .blockDevice: "block device"
        case .fifo: "FIFO"
        case .socket: "socket"
        case .unknown: "unknown file type"
        }
    }
}

/// What one `statx(2)` says about an object.
public struct FileStatus: Sendable, Equatable {
    /// `stx_mode`: type and permission bits.
    public var mode: UInt32
    /// The id of the mount the object lives on: `STATX_MNT_ID_UNIQUE`'s where the kernel has it
    /// (Linux 6.8+; see ``mountIDIsUnique``), else `STATX_MNT_ID`'s. Compare it only with other
    /// statuses' ids, never with `/proc/self/mountinfo`'s.
    public var mountID: UInt64
    /// The object is the root of a mount (`STATX_ATTR_MOUNT_ROOT`): "is this a mount point?"
    public var isMountRoot: Bool
    /// Size in bytes.
    public var size: UInt64
    /// Inode number.
    public var inode: UInt64
    /// Major number of the filesystem's device.
    public var deviceMajor: UInt32
    /// Minor number of the filesystem's device.
    public var deviceMinor: UInt32
    /// For a device node: major number of the device it stands for (`stx_rdev_major`).
    public var specialMajor: UInt32 = 0
    /// For a device node: minor number of the device it stands for (`stx_rdev_minor`).
    public var specialMinor: UInt32 = 0
    /// Owner.
    public var uid: UInt32
    /// Group.
    public var gid: UInt32
    /// Link count; 0 for a directory that has been removed while open.
    public var linkCount: UInt32
    /// The kernel answered both `STATX_MNT_ID` and `STATX_ATTR_MOUNT_ROOT` (Linux 5.8+). When it
    /// did not, ``mountID`` and ``isMountRoot`` mean nothing: callers must fail closed.
    public var mountAnswersKnown: Bool = true
    /// ``mountID`` is the kernel's unique mount id (`STATX_MNT_ID_UNIQUE`), which is never given
    /// to another mount until reboot: what is cached by it (a mount's filesystem type) stays true.
    public var mountIDIsUnique: Bool = false
    /// The file's kind, from ``mode``.
    public var kind: FileKind { FileKind(mode: mode) }
}

extension FileStatus {
    /// What the C shim's statx returned.
    init(_ raw: fsshare_statx_t) {
        self.init(
            mode: raw.mode, mountID: raw.mount_id, isMountRoot: raw.is_mount_root != 0, size: raw.size,
            inode: raw.ino, deviceMajor: raw.dev_major, deviceMinor: raw.dev_minor,
            specialMajor: raw.rdev_major, specialMinor: raw.rdev_minor, uid: raw.uid, gid: raw.gid,
            linkCount: raw.nlink, mountAnswersKnown: raw.mount_root_known != 0 && raw.mount_id_known != 0,
            mountIDIsUnique: raw.mount_id_unique != 0)
    }
}

/// The one layer of fsshare that calls the kernel. Every wrapper consults ``FaultInjection``,
/// retries `EINTR` where that is safe, and throws ``SystemCallError`` naming call, path and errno.
public enum Sys {
    // Flags the library needs, re-exported so no other module touches the C shim.
    /// `O_PATH`.
    public static let oPath = FSSHARE_O_PATH
    /// `O_NOFOLLOW`.
    public static let oNoFollow = FSSHARE_O_NOFOLLOW
    /// `O_DIRECTORY`.
    public static let oDirectory = FSSHARE_O_DIRECTORY
    /// `O_CLOEXEC`.
    public static let oCloexec = FSSHARE_O_CLOEXEC
    /// `openat2`'s `RESOLVE_NO_MAGICLINKS`.
    public static let resolveNoMagicLinks = FSSHARE_RESOLVE_NO_MAGICLINKS
    /// `openat2`'s `RESOLVE_NO_SYMLINKS`.
    public static let resolveNoSymlinks = FSSHARE_RESOLVE_NO_SYMLINKS
    /// `openat2`'s `RESOLVE_BENEATH`.
    public static let resolveBeneath = FSSHARE_RESOLVE_BENEATH
    /// `openat2`'s `RESOLVE_NO_XDEV`.
    public static let resolveNoXDev = FSSHARE_RESOLVE_NO_XDEV

    @inline(__always)
    static func fail(_ call: StaticString, _ path: @autoclosure () -> FilePath?) -> SystemCallError {
        // errno first: building the path allocates, and nothing may run between the failed
        // call and this read.
        let code = Glibc.errno
        return SystemCallError(syscall: call.description, path: path(), errno: Errno(rawValue: code))
    }

    @inline(__always)
    static func dirfd(_ dir: DirFD?) -> Int32 { dir?.fd.rawValue ?? AT_FDCWD }

    @inline(__always)
    static func shown(_ dir: DirFD?, _ path: FilePath) -> FilePath { dir?.display(path) ?? path }

    // MARK: - Files and directories

    /// `openat(2)`. Always adds `O_CLOEXEC`.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - flags: the call's flags (`O_*`, `MS_*`, `MNT_*`).
    ///   - mode: permission bits for what is created.
    /// - Returns: the new descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openat(_ dir: DirFD?, _ path: FilePath, flags: Int32, mode: mode_t = 0) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("openat", shown(dir, path))
        return try retryingOpen(failing: shown(dir, path)) {
            path.withPlatformString { Glibc.openat(dirfd(dir), $0, flags | FSSHARE_O_CLOEXEC, mode) }
        }
    }

    /// Runs an `openat` until it is not interrupted: its descriptor, or the error naming `failing`.
    static func retryingOpen(failing: @autoclosure () -> FilePath, _ open: () -> Int32) throws(SystemCallError) -> FileDescriptor {
        while true {
            let fd = open()
            if fd >= 0 { return FileDescriptor(rawValue: fd) }
            if Glibc.errno == EINTR { continue }
            throw fail("openat", failing())
        }
    }

    /// `openat2(2)` with `RESOLVE_*` flags. Always adds `O_CLOEXEC`.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - flags: the call's flags (`O_*`, `MS_*`, `MNT_*`).
    ///   - mode: permission bits for what is created.
    ///   - resolve: `openat2` `RESOLVE_*` flags.
    /// - Returns: the new descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openat2(_ dir: DirFD?, _ path: FilePath, flags: Int32, mode: mode_t = 0, resolve: UInt64) throws(SystemCallError) -> FileDescriptor {
        try openat2(dir, text: path.string, flags: flags, mode: mode, resolve: resolve)
    }

    /// `statx(2)` of `path` below `dir`, never following a final symlink unless asked.
    /// An empty path stats `dir` itself (`AT_EMPTY_PATH`).
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - followSymlinks: follow a final symbolic link (default: describe the link itself).
    /// - Returns: the file's status.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func statx(_ dir: DirFD?, _ path: FilePath, followSymlinks: Bool = false) throws(SystemCallError) -> FileStatus {
        // The descriptor itself: no path to convert (the hot case, once or twice per share).
        if path.isEmpty, let dir { return try fstatx(dir.fd, path: dir.path) }
        try FaultInjection.check("statx", shown(dir, path))
        var flags = followSymlinks ? 0 : FSSHARE_AT_SYMLINK_NOFOLLOW
        if path.isEmpty { flags |= FSSHARE_AT_EMPTY_PATH }
        var raw = fsshare_statx_t()
        let rc = path.withPlatformString { fsshare_statx(dirfd(dir), $0, flags, &raw) }
        if rc != 0 { throw fail("statx", shown(dir, path)) }
        return FileStatus(raw)
    }

    /// `statx(2)` of an open descriptor.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: the file's status.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func fstatx(_ fd: FileDescriptor, path: @autoclosure () -> FilePath) throws(SystemCallError) -> FileStatus {
        try FaultInjection.check("statx", path())
        var raw = fsshare_statx_t()
        if fsshare_statx(fd.rawValue, "", FSSHARE_AT_SYMLINK_NOFOLLOW | FSSHARE_AT_EMPTY_PATH, &raw) != 0 { throw fail("statx", path()) }
        return FileStatus(raw)
    }

    /// `mkdirat(2)`. Returns false when something already exists there (EEXIST).
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - mode: permission bits for what is created.
    /// - Returns: true if it was made, false if it existed.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    @discardableResult
    public static func mkdirat(_ dir: DirFD?, _ path: FilePath, mode: mode_t) throws(SystemCallError) -> Bool {
        try mkdirat(dir, named: path.string, mode: mode)
    }

    /// Creates an empty regular file (a mount point for a single-file share) with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW`. Returns false when something already exists there.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - mode: permission bits for what is created.
    /// - Returns: true if it was made, false if it existed.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    @discardableResult
    public static func mkfileat(_ dir: DirFD?, _ path: FilePath, mode: mode_t) throws(SystemCallError) -> Bool {
        try FaultInjection.check("mkfileat", shown(dir, path))
        let fd = path.withPlatformString {
            Glibc.openat(dirfd(dir), $0, O_CREAT | O_EXCL | O_WRONLY | FSSHARE_O_NOFOLLOW | FSSHARE_O_CLOEXEC, mode)
        }
        if fd >= 0 {
            _ = Glibc.close(fd)
            return true
        }
        if Glibc.errno == EEXIST { return false }
        throw fail("openat", shown(dir, path))
    }

    /// `unlinkat(2)`; `directory` adds `AT_REMOVEDIR`.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - directory: remove a directory (`AT_REMOVEDIR`) rather than a file.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func unlinkat(_ dir: DirFD?, _ path: FilePath, directory: Bool) throws(SystemCallError) {
        try unlinkat(dir, named: path.string, directory: directory)
    }

    /// Why this kernel cannot tell whether a path is a mount point, or nil if it can. fsshare
    /// refuses to share or clean up without that answer (a "no" it cannot trust would let it
    /// delete through a mount). Probed on `/`, which is always a mount root.
    public static func mountPointTestProblem() -> String? {
        do {
            try FaultInjection.check("statx_mount_root", "/")
            let st = try statx(nil, "/")
            if st.mountAnswersKnown && st.isMountRoot { return nil }
        } catch {}
        return "this kernel does not report STATX_MNT_ID and STATX_ATTR_MOUNT_ROOT from statx(2) (Linux 5.8 or later), so fsshare cannot tell a mount point from a directory; it refuses to share or clean up rather than risk deleting through a mount"
    }

    /// `renameat(2)`.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - from: the entry to move.
    ///   - to: where it goes.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func renameat(_ dir: DirFD?, _ from: FilePath, _ to: FilePath) throws(SystemCallError) {
        try FaultInjection.check("renameat", shown(dir, to))
        let rc = from.withPlatformString { f in to.withPlatformString { t in Glibc.renameat(dirfd(dir), f, dirfd(dir), t) } }
        if rc != 0 { throw fail("renameat", shown(dir, to)) }
    }

    /// `readlink` of `/proc/self/fd/N`: the path the kernel has for an open descriptor.
    ///
    /// - Parameter fd: the descriptor.
    /// - Returns: the path the kernel has for it.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pathOf(_ fd: FileDescriptor) throws(SystemCallError) -> FilePath {
        try FaultInjection.check("readlink", FilePath("/proc/self/fd/\(fd.rawValue)"))
        // A stack buffer: this runs on every share, and a zeroed 4 KiB heap array showed up in profiles.
        let result: FilePath? = withUnsafeTemporaryAllocation(of: CChar.self, capacity: Int(PATH_MAX) + 1) { buffer in
            withUnsafeTemporaryAllocation(of: CChar.self, capacity: 32) { link -> FilePath? in
                guard let target = buffer.baseAddress, let linkBase = link.baseAddress else { return nil }
                _ = fsshare_fd_link_path(fd.rawValue, linkBase, link.count)
                let n = Glibc.readlink(linkBase, target, buffer.count - 1)
                if n < 0 { return nil }
                return FilePath(String(decoding: UnsafeRawBufferPointer(start: target, count: n), as: UTF8.self))
            }
        }
        guard let result else { throw fail("readlink", FilePath("/proc/self/fd/\(fd.rawValue)")) }
        return result
    }

    /// `readlinkat(2)` of a symlink below `dir`.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    /// - Returns: the link's target text.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func readlinkat(_ dir: DirFD?, _ path: FilePath) throws(SystemCallError) -> String {
        try FaultInjection.check("readlinkat", shown(dir, path))
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = path.withPlatformString { Glibc.readlinkat(dirfd(dir), $0, &buffer, buffer.count - 1) }
        if n < 0 { throw fail("readlinkat", shown(dir, path)) }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `lsetxattr(2)`: sets the extended attribute `name` of `path` (a symlink itself, not
    /// its target).
    ///
    /// - Parameters:
    ///   - path: the file.
    ///   - name: the attribute (`trusted.overlay.opaque`).
    ///   - value: its bytes.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func lsetxattr(_ path: FilePath, name: String, value: [UInt8]) throws(SystemCallError) {
        try FaultInjection.check("lsetxattr", path)
        let rc = path.withPlatformString { p in value.withUnsafeBytes { fsshare_lsetxattr(p, name, $0.baseAddress, $0.count) } }
        if rc != 0 { throw fail("lsetxattr", path) }
    }

    /// `lgetxattr(2)`: the extended attribute `name` of `path` (not following a symlink).
    ///
    /// - Parameters:
    ///   - path: the file.
    ///   - name: the attribute.
    /// - Returns: its bytes (at most 4 KiB are read).
    /// - Throws: ``SystemCallError`` (`ENODATA` when there is no such attribute).
    public static func lgetxattr(_ path: FilePath, name: String) throws(SystemCallError) -> [UInt8] {
        try FaultInjection.check("lgetxattr", path)
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = path.withPlatformString { p in buffer.withUnsafeMutableBytes { fsshare_lgetxattr(p, name, $0.baseAddress, $0.count) } }
        if n < 0 { throw fail("lgetxattr", path) }
        return Array(buffer[0..<n])
    }

    /// `fstatfs(2)`'s `f_type` (the filesystem magic).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: `f_type` (a filesystem magic number).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func filesystemType(_ fd: FileDescriptor, path: @autoclosure () -> FilePath) throws(SystemCallError) -> Int {
        try FaultInjection.check("fstatfs", path())
        let t = fsshare_fstatfs_type(fd.rawValue)
        if t == -1 { throw fail("fstatfs", path()) }
        return t
    }

    /// Lists the names in a directory (not `.` or `..`), with their `d_type` kind. Uses
    /// getdents64 directly: opendir would add an fstat and two fcntls per listing.
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    /// - Returns: the entries (without `.` and `..`) and their `d_type`.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func listDirectory(_ dir: DirFD?, _ path: FilePath) throws(SystemCallError) -> [(name: String, kind: FileKind?)] {
        let fd = try openat(dir, path, flags: O_RDONLY | FSSHARE_O_DIRECTORY | FSSHARE_O_NOFOLLOW)
        defer { close(fd) }
        return try listDirectory(fd, path: shown(dir, path))
    }

    /// Lists a directory opened `O_RDONLY` (from its current position; use a fresh descriptor).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: the entries (without `.` and `..`) and their `d_type`.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func listDirectory(_ fd: FileDescriptor, path: @autoclosure () -> FilePath) throws(SystemCallError) -> [(name: String, kind: FileKind?)] {
        // Labelled like the return type: an unlabelled array would be converted element by
        // element (a dynamic cast each) on the way out.
        var result: [(name: String, kind: FileKind?)] = []
        var failure: SystemCallError?
        withUnsafeTemporaryAllocation(byteCount: 32768, alignment: 8) { buffer in
            while true {
                let n = fsshare_getdents64(fd.rawValue, buffer.baseAddress, buffer.count)
                if n < 0 {
                    if Glibc.errno == EINTR { continue }
                    failure = fail("getdents64", path())
                    return
                }
                if n == 0 { return }
                var offset = 0
                while true {
                    var namePointer: UnsafePointer<CChar>?
                    var type: UInt8 = 0
                    let next = fsshare_dirent_at(buffer.baseAddress, n, offset, &namePointer, &type)
                    if next < 0 { break }
                    offset = next
                    guard let namePointer else { continue }
                    let name = String(cString: namePointer)
                    if name == "." || name == ".." { continue }
                    let kind: FileKind?
                    switch Int32(type) {
                    case Int32(DT_DIR): kind = .directory
                    case Int32(DT_REG): kind = .regular
                    case Int32(DT_LNK): kind = .symlink
                    case Int32(DT_UNKNOWN): kind = nil
                    default: kind = .unknown
                    }
                    result.append((name: name, kind: kind))
                }
            }
        }
        if let failure { throw failure }
        return result
    }

    /// Closes a descriptor; errors from close(2) are not actionable here and are dropped.
    ///
    /// - Parameter fd: the descriptor.
    public static func close(_ fd: FileDescriptor) {
        _ = Glibc.close(fd.rawValue)
    }

    /// Closes two descriptors: one `close_range(2)` when they are adjacent numbers (a source and
    /// the clone opened right after it, usually), else one `close` each. Only these two are
    /// ever closed: a range is used only when it holds nothing else.
    ///
    /// - Parameters:
    ///   - a: a descriptor.
    ///   - b: another descriptor.
    public static func close(_ a: FileDescriptor, _ b: FileDescriptor) {
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: 2) { numbers in
            numbers[0] = a.rawValue
            numbers[1] = b.rawValue
            closeRuns(numbers)
        }
    }

    /// Closes every descriptor given (negative ones skipped, duplicates once): one
    /// `close_range(2)` per run of adjacent numbers, one `close` for a number alone. A range
    /// only ever spans numbers that are all in `fds`.
    ///
    /// - Parameter fds: the descriptors, in any order.
    public static func closeAll(_ fds: [FileDescriptor]) {
        // Sorted on the stack (a handful of numbers): no allocation.
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: fds.count) { numbers in
            for (i, fd) in fds.enumerated() { numbers[i] = fd.rawValue }
            closeRuns(numbers)
        }
    }

    /// Closes the non-negative descriptor numbers in `numbers` (sorted in place first: insertion
    /// sort, a handful), one `close_range` per run of adjacent numbers.
    private static func closeRuns(_ numbers: UnsafeMutableBufferPointer<Int32>) {
        var count = 0
        for index in numbers.indices where numbers[index] >= 0 {
            let n = numbers[index]
            var k = count
            while k > 0 && numbers[k - 1] > n {
                numbers[k] = numbers[k - 1]
                k -= 1
            }
            numbers[k] = n
            count += 1
        }
        var i = 0
        while i < count {
            var j = i
            while j + 1 < count && numbers[j + 1] <= numbers[j] + 1 { j += 1 }
            // numbers[i...j]: one run (a repeated number continues it, closed once).
            let (low, high) = (numbers[i], numbers[j])
            if high == low || fsshare_close_range(UInt32(low), UInt32(high)) != 0 {
                // Alone, or no close_range (before Linux 5.9): one at a time.
                var last: Int32 = -1
                for n in numbers[i...j] where n != last {
                    _ = Glibc.close(n)
                    last = n
                }
            }
            i = j + 1
        }
    }

    /// Writes all of `bytes` (looping on short writes and EINTR).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - bytes: the bytes to write, all of them.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func writeAll(_ fd: FileDescriptor, _ bytes: [UInt8], path: @autoclosure () -> FilePath) throws(SystemCallError) {
        try FaultInjection.check("write", path())
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { buffer -> Int in
                guard let base = buffer.baseAddress else { return 0 }
                return Glibc.write(fd.rawValue, base + offset, buffer.count - offset)
            }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw fail("write", path())
            }
            offset += n
        }
    }

    /// Reads a whole file from an open descriptor, from offset 0.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: every byte up to end of file.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func readAll(_ fd: FileDescriptor, path: FilePath) throws(SystemCallError) -> [UInt8] {
        try FaultInjection.check("read", path)
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        var offset: off_t = 0
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.pread(fd.rawValue, $0.baseAddress, $0.count, offset) }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw fail("read", path)
            }
            if n == 0 { return result }
            result.append(contentsOf: chunk[0..<n])
            offset += off_t(n)
        }
    }

    /// Up to `count` bytes at `offset` (`pread(2)` until they are read or the file ends): the
    /// part of a file known to be there, read in one call instead of to end of file.
    ///
    /// - Parameters:
    ///   - fd: an open file.
    ///   - offset: where to start.
    ///   - count: how many bytes at most.
    ///   - path: what errors show for the descriptor.
    /// - Returns: the bytes read (fewer than `count` at end of file).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func readRange(_ fd: FileDescriptor, offset: Int, count: Int, path: @autoclosure () -> FilePath) throws(SystemCallError) -> [UInt8] {
        try FaultInjection.check("read", path())
        guard count > 0 else { return [] }
        var failed = false
        let result = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            var done = 0
            while done < count {
                let n = Glibc.pread(fd.rawValue, buffer.baseAddress.map { $0 + done }, count - done, off_t(offset + done))
                if n < 0 {
                    if Glibc.errno == EINTR { continue }
                    failed = true
                    break
                }
                if n == 0 { break }
                done += n
            }
            initialized = done
        }
        if failed { throw fail("read", path()) }
        return result
    }

    /// `ftruncate(2)`.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - size: the new size in bytes.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func truncate(_ fd: FileDescriptor, to size: Int, path: FilePath) throws(SystemCallError) {
        try FaultInjection.check("ftruncate", path)
        if Glibc.ftruncate(fd.rawValue, off_t(size)) != 0 { throw fail("ftruncate", path) }
    }

    /// `flock(2)` (`LOCK_EX`, `LOCK_SH` or `LOCK_UN`), blocking, retried on EINTR.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - operation: `LOCK_EX`, `LOCK_SH` or `LOCK_UN`.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func flock(_ fd: FileDescriptor, operation: Int32, path: @autoclosure () -> FilePath) throws(SystemCallError) {
        try FaultInjection.check("flock", path())
        while fsshare_flock(fd.rawValue, operation) != 0 {
            if Glibc.errno != EINTR { throw fail("flock", path()) }
        }
    }

    // MARK: - Mounts

    /// `mount(2)`.
    ///
    /// - Parameters:
    ///   - source: the mount source (nil for none).
    ///   - target: where it applies (a mount point, or a symbolic link's target text).
    ///   - fstype: the filesystem type (nil for binds).
    ///   - flags: the call's flags (`O_*`, `MS_*`, `MNT_*`).
    ///   - data: filesystem options (nil for none).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func mount(source: FilePath?, target: FilePath, fstype: String? = nil, flags: UInt, data: String? = nil) throws(SystemCallError) {
        try FaultInjection.check("mount", target)
        let rc = target.withPlatformString { t in
            withOptionalCString(source?.string) { s in
                withOptionalCString(fstype) { f in
                    withOptionalCString(data) { d in Glibc.mount(s, t, f, flags, d) }
                }
            }
        }
        if rc != 0 { throw fail("mount", target) }
    }

    /// `umount2(2)` of the entry `name` of the open directory `dir` (through
    /// `/proc/self/fd/<dir>/<name>`: only `name` is looked up, and that lookup crosses any mount
    /// stacked on it).
    ///
    /// - Parameters:
    ///   - dir: the directory holding the mount point.
    ///   - name: the mount point's name (a single component, or a relative path) in `dir`.
    ///   - flags: the call's flags (`MNT_DETACH`, `UMOUNT_NOFOLLOW`, ...).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func umount2(at dir: DirFD, _ name: FilePath, flags: Int32) throws(SystemCallError) {
        try FaultInjection.check("umount2", procPath(dir, name))
        // "/proc/self/fd/<n>/<name>" built on the stack: one lookup of `name` from the open
        // directory, no path object made per call.
        let rc = name.withPlatformString { umount2(procFD: dir.fd.rawValue, name: $0, flags: flags) }
        if rc != 0 { throw fail("umount2", procPath(dir, name)) }
    }

    /// `umount2("/proc/self/fd/<dirFD>/<name>", flags)` with the path built on the stack: one
    /// lookup of `name` from the open directory, no path object made per call.
    static func umount2(procFD: Int32, name n: UnsafePointer<CChar>, flags: Int32) -> Int32 {
        let prefix: StaticString = "/proc/self/fd/"
        let nameLength = strlen(n)
        return withUnsafeTemporaryAllocation(of: CChar.self, capacity: prefix.utf8CodeUnitCount + 12 + nameLength) { buf -> Int32 in
            var i = 0
            for k in 0..<prefix.utf8CodeUnitCount {
                buf[i] = CChar(bitPattern: prefix.utf8Start[k])
                i += 1
            }
            var digits = 0
            var v = Int(procFD)
            repeat {
                digits += 1
                v /= 10
            } while v > 0
            v = Int(procFD)
            for k in stride(from: digits - 1, through: 0, by: -1) {
                buf[i + k] = CChar(48 + v % 10)
                v /= 10
            }
            i += digits
            buf[i] = 0x2F
            i += 1
            for k in 0..<nameLength { buf[i + k] = n[k] }
            buf[i + nameLength] = 0
            guard let base = buf.baseAddress else {
                Glibc.errno = EINVAL
                return -1
            }
            return Glibc.umount2(base, flags)
        }
    }

    /// `/proc/self/fd/<dir>/<name>`: how ``umount2(at:_:flags:)`` names its target.
    static func procPath(_ dir: DirFD, _ name: FilePath) -> FilePath {
        FilePath("/proc/self/fd/\(dir.fd.rawValue)").pushing(name)
    }

    /// `umount2(2)`.
    ///
    /// - Parameters:
    ///   - target: where it applies (a mount point, or a symbolic link's target text).
    ///   - flags: the call's flags (`O_*`, `MS_*`, `MNT_*`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func umount2(_ target: FilePath, flags: Int32) throws(SystemCallError) {
        try FaultInjection.check("umount2", target)
        let rc = target.withPlatformString { Glibc.umount2($0, flags) }
        if rc != 0 { throw fail("umount2", target) }
    }

    /// `open_tree(2)` with `OPEN_TREE_CLONE` of the object `fd` refers to, with mount attributes
    /// set on the copy before anything can see or attach it: `open_tree_attr(2)` (Linux 6.15),
    /// one call, and no descriptor exists until the attributes are on; on an older kernel
    /// `open_tree` then `mount_setattr` on the still-detached copy (closed again if that fails).
    /// Fault injection sees both names, in that order, on either path.
    ///
    /// - Parameters:
    ///   - fd: the descriptor (usually `O_PATH`).
    ///   - recursive: include the submounts (and set the attributes on all of them).
    ///   - readOnly: make the copy read-only.
    ///   - propagation: the copy's propagation (`MS_PRIVATE`, ...), or 0 to leave it.
    ///   - display: the path shown in errors (built only for one).
    /// - Returns: the detached mount's descriptor.
    /// - Throws: ``SystemCallError`` naming the call (`open_tree_attr`, `open_tree` or
    ///   `mount_setattr`), the path and errno.
    public static func openTreeClone(_ fd: FileDescriptor, recursive: Bool, readOnly: Bool, propagation: UInt, display: @autoclosure () -> FilePath) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("open_tree", display())
        try FaultInjection.check("mount_setattr", display())
        var flags = FSSHARE_OPEN_TREE_CLONE | FSSHARE_OPEN_TREE_CLOEXEC | UInt32(FSSHARE_AT_EMPTY_PATH)
        // AT_RECURSIVE means both "clone the submounts" and "set their attributes too".
        if recursive { flags |= UInt32(FSSHARE_AT_RECURSIVE) }
        let attrSet = readOnly ? FSSHARE_MOUNT_ATTR_RDONLY : 0
        if hasOpenTreeAttr() {
            let tree = fsshare_open_tree_attr(fd.rawValue, "", flags, attrSet, UInt64(propagation))
            if tree < 0 { throw fail("open_tree_attr", display()) }
            return FileDescriptor(rawValue: tree)
        }
        let tree = fsshare_open_tree(fd.rawValue, "", flags)
        if tree < 0 { throw fail("open_tree", display()) }
        var setFlags = UInt32(FSSHARE_AT_EMPTY_PATH)
        if recursive { setFlags |= UInt32(FSSHARE_AT_RECURSIVE) }
        if fsshare_mount_setattr(tree, "", setFlags, attrSet, 0, UInt64(propagation)) != 0 {
            let error = fail("mount_setattr", display())
            _ = Glibc.close(tree)  // a detached copy: closing it dissolves it
            throw error
        }
        return FileDescriptor(rawValue: tree)
    }

    /// -1 unknown, 0 no `open_tree_attr`, 1 has it. Probed on first use.
    private static let openTreeAttrState = Atomic<Int>(-1)

    /// Whether `open_tree_attr(2)` works here (probed once: a private detached copy of "/").
    /// A seccomp filter that refuses it reads as absent, so the two-call path is used.
    /// Fault injection can say no (`open_tree_attr_probe=ENOSYS`) to exercise that path.
    public static func hasOpenTreeAttr() -> Bool {
        let s = openTreeAttrState.load(ordering: .relaxed)
        if s >= 0 { return s == 1 }
        var ok = (try? FaultInjection.check("open_tree_attr_probe", "/")) != nil
        if ok {
            let fd = fsshare_open_tree_attr(AT_FDCWD, "/", FSSHARE_OPEN_TREE_CLONE | FSSHARE_OPEN_TREE_CLOEXEC, 0, UInt64(MS_PRIVATE))
            ok = fd >= 0
            if ok { _ = Glibc.close(fd) }
        }
        openTreeAttrState.store(ok ? 1 : 0, ordering: .relaxed)
        return ok
    }

    /// Whether the kernel has the new mount API fsshare uses (`open_tree`, Linux 5.2, and
    /// `mount_setattr`, 5.12): "/" is cloned detached and given an empty `mount_setattr`, then
    /// dropped. Raw calls, outside fault injection: a probe must not consume an injected fault
    /// meant for the operation that triggered it.
    public static func probeNewMountAPI() -> Bool {
        let fd = fsshare_open_tree(AT_FDCWD, "/", FSSHARE_OPEN_TREE_CLONE | FSSHARE_OPEN_TREE_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { _ = Glibc.close(fd) }
        let rc = fsshare_mount_setattr(fd, "", UInt32(FSSHARE_AT_EMPTY_PATH), 0, 0, 0)
        return rc == 0 || Glibc.errno != ENOSYS
    }

    /// `mount_setattr(2)` on a (possibly detached) mount fd: set read-only and/or propagation.
    ///
    /// - Parameters:
    ///   - fd: a mount (`O_PATH` descriptor of its root, or a detached mount).
    ///   - readOnly: make it read-only.
    ///   - recursive: include the submounts.
    ///   - propagation: the propagation to set (`MS_SLAVE`, ...), or 0 to leave it.
    ///   - display: the path shown in errors.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func mountSetattr(_ fd: FileDescriptor, readOnly: Bool, recursive: Bool, propagation: UInt, display: @autoclosure () -> FilePath) throws(SystemCallError) {
        try FaultInjection.check("mount_setattr", display())
        var flags = UInt32(FSSHARE_AT_EMPTY_PATH)
        if recursive { flags |= UInt32(FSSHARE_AT_RECURSIVE) }
        let rc = fsshare_mount_setattr(fd.rawValue, "", flags, readOnly ? FSSHARE_MOUNT_ATTR_RDONLY : 0, 0, UInt64(propagation))
        if rc != 0 { throw fail("mount_setattr", display()) }
    }

    /// `ioctl(LOOP_CTL_GET_FREE)`: the number of a free loop device.
    ///
    /// - Parameter control: `/dev/loop-control`, open.
    /// - Returns: N of `/dev/loopN`.
    /// - Throws: ``SystemCallError``.
    public static func loopGetFree(_ control: FileDescriptor) throws(SystemCallError) -> Int32 {
        try FaultInjection.check("loop_get_free", "/dev/loop-control")
        let n = fsshare_loop_get_free(control.rawValue)
        if n < 0 { throw fail("ioctl(LOOP_CTL_GET_FREE)", "/dev/loop-control") }
        return n
    }

    /// `ioctl(LOOP_CONFIGURE)`: binds `backing` to the loop device read-only with autoclear,
    /// limited to `offset ..< offset + size` (0 = to the end).
    ///
    /// - Parameters:
    ///   - loop: the loop device, open.
    ///   - backing: the file it reads.
    ///   - offset: where the device starts in the file.
    ///   - size: its length.
    ///   - name: recorded as the device's file name (shown by losetup).
    ///   - display: the loop device's path, for errors.
    /// - Throws: ``SystemCallError`` (`EBUSY` when another process took the device first).
    public static func loopConfigure(_ loop: FileDescriptor, backing: FileDescriptor, offset: UInt64, size: UInt64, name: String, display: FilePath) throws(SystemCallError) {
        try FaultInjection.check("loop_configure", display)
        if fsshare_loop_configure(loop.rawValue, backing.rawValue, offset, size, name) != 0 { throw fail("ioctl(LOOP_CONFIGURE)", display) }
    }

    /// `ioctl(LOOP_CLR_FD)`: unbinds a loop device (with autoclear, once its last user goes).
    ///
    /// - Parameters:
    ///   - loop: the loop device, open.
    ///   - display: its path, for errors.
    /// - Throws: ``SystemCallError``.
    public static func loopClear(_ loop: FileDescriptor, display: FilePath) throws(SystemCallError) {
        try FaultInjection.check("loop_clear", display)
        if fsshare_loop_clear(loop.rawValue) != 0 { throw fail("ioctl(LOOP_CLR_FD)", display) }
    }

    /// Mounts a block device's filesystem detached (`fsopen`, `fsconfig` source and `ro`,
    /// create, `fsmount`): the mount exists only as the returned descriptor until it is moved
    /// into place, so it is never reachable at a path half-made. Always nosuid and nodev.
    ///
    /// - Parameters:
    ///   - fstype: the filesystem (`squashfs`, `ext4`, `erofs`).
    ///   - source: the block device.
    ///   - readOnly: read-only superblock and mount.
    /// - Returns: the detached mount.
    /// - Throws: ``SystemCallError`` naming the step that failed.
    public static func fsmountBlock(fstype: String, source: FilePath, readOnly: Bool) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("fsopen", source)
        let ctx = fsshare_fsopen(fstype)
        if ctx < 0 { throw fail("fsopen", source) }
        defer { _ = Glibc.close(ctx) }
        try FaultInjection.check("fsconfig", source)
        if source.withPlatformString({ fsshare_fsconfig(ctx, "source", $0) }) != 0 { throw fail("fsconfig(source)", source) }
        if readOnly, fsshare_fsconfig(ctx, "ro", nil) != 0 { throw fail("fsconfig(ro)", source) }
        if fsshare_fsconfig(ctx, nil, nil) != 0 { throw fail("fsconfig(create)", source) }
        try FaultInjection.check("fsmount", source)
        let fd = fsshare_fsmount(ctx, readOnly ? 1 : 0)
        if fd < 0 { throw fail("fsmount", source) }
        return FileDescriptor(rawValue: fd)
    }

    /// `move_mount(2)` of a detached mount fd onto the object `target` refers to (an `O_PATH` fd):
    /// the attach point is pinned by descriptor, so no path is re-resolved.
    ///
    /// - Parameters:
    ///   - mount: a detached mount (from `openTreeClone`).
    ///   - target: the mount point (an `O_PATH` descriptor).
    ///   - display: the path shown in errors.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func moveMount(_ mount: FileDescriptor, onto target: FileDescriptor, display: @autoclosure () -> FilePath) throws(SystemCallError) {
        try FaultInjection.check("move_mount", display())
        let rc = fsshare_move_mount(mount.rawValue, "", target.rawValue, "", FSSHARE_MOVE_MOUNT_F_EMPTY_PATH | FSSHARE_MOVE_MOUNT_T_EMPTY_PATH)
        if rc != 0 { throw fail("move_mount", display()) }
    }
}

@inline(__always)
func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let s else { return body(nil) }
    return s.withCString { body($0) }
}
