#if canImport(Glibc)
import Glibc
#endif
import CFSShareShim
import SystemPackage

/// The `*at` calls of the share hot path with the entry named by a `String` (one component
/// below an open directory) instead of a `FilePath`: a native Swift string hands the kernel its
/// own NUL-terminated UTF-8, while a `FilePath` goes through several unspecialised conversion
/// layers per call (measured: about a third of the user-space time of a share and unshare). The
/// same fault injection, errors (the path built only when a call fails) and flags as the
/// `FilePath` forms.
extension Sys {
    @inline(__always)
    static func shown(_ dir: DirFD, _ name: String) -> FilePath { dir.display(FilePath(name)) }

    /// ``mkdirat(_:_:mode:)`` of `dir/name`.
    ///
    /// - Parameters:
    ///   - dir: the directory.
    ///   - name: the entry, one component.
    ///   - mode: permission bits.
    /// - Returns: true if it was made, false if something existed there.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    @discardableResult
    public static func mkdirat(_ dir: DirFD, named name: String, mode: mode_t) throws(SystemCallError) -> Bool {
        try FaultInjection.check("mkdirat", shown(dir, name))
        let rc = name.withCString { Glibc.mkdirat(dir.fd.rawValue, $0, mode) }
        if rc == 0 { return true }
        if Glibc.errno == EEXIST { return false }
        throw fail("mkdirat", shown(dir, name))
    }

    /// ``unlinkat(_:_:directory:)`` of `dir/name`.
    ///
    /// - Parameters:
    ///   - dir: the directory.
    ///   - name: the entry, one component.
    ///   - directory: rmdir (`AT_REMOVEDIR`) rather than unlink.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func unlinkat(_ dir: DirFD, named name: String, directory: Bool) throws(SystemCallError) {
        try FaultInjection.check("unlinkat", shown(dir, name))
        let rc = name.withCString { Glibc.unlinkat(dir.fd.rawValue, $0, directory ? FSSHARE_AT_REMOVEDIR : 0) }
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

    /// ``moveMount(_:onto:_:display:)`` onto `dir/name` (no symlink there is followed).
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
}

extension Sys {
    /// ``openat2(_:_:flags:mode:resolve:)`` of a path given as text (always `O_CLOEXEC`).
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path.
    ///   - flags: open flags.
    ///   - resolve: `RESOLVE_*` flags.
    /// - Returns: the new descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openat2(_ dir: DirFD?, text path: String, flags: Int32, resolve: UInt64) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("openat2", shown(dir, FilePath(path)))
        while true {
            let fd = path.withCString { fsshare_openat2(dirfd(dir), $0, flags | FSSHARE_O_CLOEXEC, 0, resolve) }
            if fd >= 0 { return FileDescriptor(rawValue: fd) }
            if Glibc.errno == EINTR || Glibc.errno == EAGAIN { continue }
            throw fail("openat2", shown(dir, FilePath(path)))
        }
    }
}
