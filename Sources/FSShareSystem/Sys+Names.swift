#if canImport(Glibc)
import Glibc
#endif
import CFSShareShim
import SystemPackage

/// The `*at` calls with the path given as a `String`: a native Swift string hands the kernel its
/// own NUL-terminated UTF-8, while a `FilePath` goes through several unspecialised conversion
/// layers per call (measured: about a third of the user-space time of a share and unshare). The
/// share hot path calls these directly; the `FilePath` forms delegate here. Fault injection and
/// errors as everywhere in ``Sys`` (the path shown is built only when a call fails).
extension Sys {
    @inline(__always)
    static func shown(_ dir: DirFD?, _ name: String) -> FilePath { shown(dir, FilePath(name)) }

    /// `mkdirat(2)` of `name` below `dir`. Returns false when something already exists there.
    ///
    /// - Parameters:
    ///   - dir: the directory `name` is relative to; nil: the current directory.
    ///   - name: the path (one component on the hot path).
    ///   - mode: permission bits.
    /// - Returns: true if it was made, false if something existed there.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    @discardableResult
    public static func mkdirat(_ dir: DirFD?, named name: String, mode: mode_t) throws(SystemCallError) -> Bool {
        try FaultInjection.check("mkdirat", shown(dir, name))
        let rc = name.withCString { Glibc.mkdirat(dirfd(dir), $0, mode) }
        if rc == 0 { return true }
        if Glibc.errno == EEXIST { return false }
        throw fail("mkdirat", shown(dir, name))
    }

    /// `statx(2)` of `name` below `dir` (a final symlink not followed), or nil when nothing is
    /// there: for probes that expect to find nothing, which then build no error.
    ///
    /// - Parameters:
    ///   - dir: the directory `name` is relative to; nil: the current directory.
    ///   - name: a non-empty path (one component where it is used).
    /// - Returns: the status, or nil for `ENOENT`.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno for any other failure.
    public static func statxIfPresent(_ dir: DirFD?, named name: String) throws(SystemCallError) -> FileStatus? {
        try FaultInjection.check("statx", shown(dir, name))
        var raw = fsshare_statx_t()
        let rc = name.withCString { fsshare_statx(dirfd(dir), $0, FSSHARE_AT_SYMLINK_NOFOLLOW, &raw) }
        if rc == 0 { return FileStatus(raw) }
        if Glibc.errno == ENOENT { return nil }
        throw fail("statx", shown(dir, name))
    }

    /// `unlinkat(2)` of `name` below `dir`.
    ///
    /// - Parameters:
    ///   - dir: the directory `name` is relative to; nil: the current directory.
    ///   - name: the path (one component on the hot path).
    ///   - directory: rmdir (`AT_REMOVEDIR`) rather than unlink.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func unlinkat(_ dir: DirFD?, named name: String, directory: Bool) throws(SystemCallError) {
        try FaultInjection.check("unlinkat", shown(dir, name))
        let rc = name.withCString { Glibc.unlinkat(dirfd(dir), $0, directory ? FSSHARE_AT_REMOVEDIR : 0) }
        if rc != 0 { throw fail("unlinkat", shown(dir, name)) }
    }

    /// ``umount2(at:_:flags:)`` of `dir/name`.
    ///
    /// - Parameters:
    ///   - dir: the directory.
    ///   - name: the entry, one component.
    ///   - flags: `umount2` flags.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func umount2(at dir: DirFD, named name: String, flags: Int32) throws(SystemCallError) {
        try FaultInjection.check("umount2", procPath(dir, FilePath(name)))
        let rc = name.withCString { umount2(procFD: dir.fd.rawValue, name: $0, flags: flags) }
        if rc != 0 { throw fail("umount2", procPath(dir, FilePath(name))) }
    }

    /// `move_mount(2)` of a detached mount onto the entry `name` of `dir`, a single component
    /// looked up in `dir` without following a symlink there (no `MOVE_MOUNT_T_SYMLINKS`): for a
    /// mount point this process has just created, no open of it is needed to pin it.
    ///
    /// - Parameters:
    ///   - mount: the detached mount (`open_tree` clone).
    ///   - dir: the directory holding the mount point.
    ///   - name: the mount point, one component.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func moveMount(_ mount: FileDescriptor, onto dir: DirFD, named name: String) throws(SystemCallError) {
        try FaultInjection.check("move_mount", shown(dir, name))
        let rc = name.withCString { fsshare_move_mount(mount.rawValue, "", dir.fd.rawValue, $0, FSSHARE_MOVE_MOUNT_F_EMPTY_PATH) }
        if rc != 0 { throw fail("move_mount", shown(dir, name)) }
    }

    /// `renameat2(2)` of `from` to `to`, both entries of `dir` given as text.
    ///
    /// - Parameters:
    ///   - dir: the directory holding both.
    ///   - from: the entry to move.
    ///   - to: its new name.
    ///   - noReplace: fail with `EEXIST` instead of replacing the target (`RENAME_NOREPLACE`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func renameat(_ dir: DirFD, named from: String, to: String, noReplace: Bool = false) throws(SystemCallError) {
        try FaultInjection.check("renameat", shown(dir, to))
        let flags = noReplace ? FSSHARE_RENAME_NOREPLACE : 0
        let rc = from.withCString { f in to.withCString { t in fsshare_renameat2(dir.fd.rawValue, f, dir.fd.rawValue, t, flags) } }
        if rc != 0 { throw fail("renameat", shown(dir, to)) }
    }

    /// `openat(2)` of `name` below `dir` given as text (always `O_CLOEXEC`; retried on `EINTR`).
    ///
    /// - Parameters:
    ///   - dir: the directory `name` is relative to; nil: the current directory.
    ///   - name: the entry (one component on the hot path).
    ///   - flags: open flags.
    ///   - mode: permission bits for what is created.
    /// - Returns: the new descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openat(_ dir: DirFD?, named name: String, flags: Int32, mode: mode_t = 0) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("openat", shown(dir, name))
        return try retryingOpen(failing: shown(dir, name)) {
            name.withCString { Glibc.openat(dirfd(dir), $0, flags | FSSHARE_O_CLOEXEC, mode) }
        }
    }

    /// `openat2(2)` of a path given as text (always `O_CLOEXEC`; retried on `EINTR`/`EAGAIN`).
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path.
    ///   - flags: open flags.
    ///   - mode: permission bits for what is created.
    ///   - resolve: `RESOLVE_*` flags.
    /// - Returns: the new descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openat2(_ dir: DirFD?, text path: String, flags: Int32, mode: mode_t = 0, resolve: UInt64) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("openat2", shown(dir, path))
        while true {
            let fd = path.withCString { fsshare_openat2(dirfd(dir), $0, flags | FSSHARE_O_CLOEXEC, UInt32(mode), resolve) }
            if fd >= 0 { return FileDescriptor(rawValue: fd) }
            if Glibc.errno == EINTR || Glibc.errno == EAGAIN { continue }
            throw fail("openat2", shown(dir, path))
        }
    }

    /// A sysfs attribute (`/sys/...`) without its trailing newline; nil when absent, unreadable
    /// or empty.
    ///
    /// - Parameter path: the attribute's path.
    /// - Returns: its text, or nil.
    public static func readSysfsAttribute(_ path: String) -> String? {
        guard let fd = try? openat(nil, FilePath(path), flags: O_RDONLY | O_CLOEXEC) else { return nil }
        defer { close(fd) }
        guard let bytes = try? readAll(fd, path: FilePath(path)) else { return nil }
        var s = String(decoding: bytes, as: UTF8.self)
        while s.hasSuffix("\n") { s.removeLast() }
        return s.isEmpty ? nil : s
    }
}
