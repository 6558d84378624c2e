#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import Synchronization
import SystemPackage

/// The mount mechanics of sharing: attaching a source read-only *before* it appears under
/// `mounts/`, unmounting by descriptor-anchored path, and removing a tree without ever crossing
/// a mount. Everything is relative to directory descriptors opened with `O_NOFOLLOW`.
enum MountOps {
    /// `/proc/self/fd/N[/name]`: a path that starts at an open descriptor, so only `name` is
    /// looked up (and the lookup of `name` crosses any mount stacked on it).
    static func fdPath(_ fd: FileDescriptor, _ name: FilePath? = nil) -> FilePath {
        let base = FilePath("/proc/self/fd/\(fd.rawValue)")
        guard let name else { return base }
        return base.pushing(name)
    }

    /// -1 unknown, 0 no new mount API, 1 has it. Probed on first use.
    private static let newAPIState = Atomic<Int>(-1)

    static func hasNewMountAPI() -> Bool {
        let s = newAPIState.load(ordering: .relaxed)
        if s >= 0 { return s == 1 }
        // Clone "/" detached and drop it: ENOSYS means no open_tree (Linux < 5.2); a
        // mount_setattr of nothing tells whether mount_setattr exists (Linux 5.12).
        var ok = false
        if let fd = try? Sys.openTreeClone(nil, "/", recursive: false) {
            do {
                try Sys.mountSetattr(fd, readOnly: false, recursive: false, propagation: 0, display: "/")
                ok = true
            } catch {
                ok = error.errno != .noFunction
            }
            Sys.close(fd)
        }
        newAPIState.store(ok ? 1 : 0, ordering: .relaxed)
        return ok
    }

    /// Attaches a copy of the mount holding `source` (an `O_PATH` descriptor) at `dir/name`
    /// (which must already exist and match the source's kind).
    ///
    /// With the new mount API the copy is made detached, set read-only (recursively when asked)
    /// and private, and only then attached by descriptor: no window in which a writable copy
    /// exists under `mounts/`, and no propagated writable copy in virtiofsd's namespace.
    static func attach(
        source: FileDescriptor, sourcePath: FilePath, target: FileDescriptor, dir: DirFD, name: FilePath,
        staging: DirFD, isFile: Bool, readOnly: Bool, recursive: Bool, method: MountMethod
    ) throws(FSShareError) {
        let shown = dir.display(name)
        let useNew: Bool
        switch method {
        case .newAPI:
            guard hasNewMountAPI() else {
                throw FSShareError(.unsupported, "the new mount API (open_tree, mount_setattr: Linux 5.12) is not available")
            }
            useNew = true
        case .automatic: useNew = hasNewMountAPI()
        case .legacy: useNew = false
        }
        if useNew {
            let tree = try sys("cannot clone the mount of \(sourcePath)") { () throws(SystemCallError) in
                try Sys.openTreeClone(DirFD(fd: source, path: sourcePath), "", recursive: recursive, display: sourcePath)
            }
            defer { Sys.close(tree) }
            try sys("cannot set the attributes of the share \(shown)") { () throws(SystemCallError) in
                try Sys.mountSetattr(tree, readOnly: readOnly, recursive: recursive, propagation: UInt(MS_PRIVATE), display: shown)
            }
            try sys("cannot attach the share at \(shown)") { () throws(SystemCallError) in
                try Sys.moveMount(tree, onto: target, display: shown)
            }
            return
        }
        if readOnly && recursive {
            throw FSShareError(.unsupported, "a recursive read-only share needs mount_setattr (Linux 5.12); the legacy method cannot make submounts read-only before they are attached")
        }
        let bindFlags = UInt(MS_BIND) | (recursive ? UInt(MS_REC) : 0)
        if !readOnly {
            try sys("cannot bind \(sourcePath) at \(shown)") { () throws(SystemCallError) in
                try Sys.mount(source: fdPath(source), target: fdPath(target), flags: bindFlags)
            }
            do {
                try Sys.mount(source: nil, target: fdPath(dir.fd, name), flags: UInt(MS_PRIVATE))
            } catch {
                _ = try? unmountAll(dir, name)
                throw FSShareError.system("cannot make the share at \(shown) private", error)
            }
            return
        }
        // Legacy read-only: bind into private/ (not exported), make that read-only, then bind
        // the read-only mount into mounts/. A bind of a read-only mount is read-only, so every
        // copy that propagates from mounts/ is read-only too. Remounting in place would not be.
        let stageShown = staging.display(name)
        let created = try sys("cannot create the staging point \(stageShown)") { () throws(SystemCallError) in
            isFile ? try Sys.mkfileat(staging, name, mode: 0o755) : try Sys.mkdirat(staging, name, mode: 0o755)
        }
        defer {
            _ = try? unmountAll(staging, name)
            if created { try? Sys.unlinkat(staging, name, directory: !isFile) }
        }
        try sys("cannot bind \(sourcePath) at the staging point \(stageShown)") { () throws(SystemCallError) in
            try Sys.mount(source: fdPath(source), target: fdPath(staging.fd, name), flags: UInt(MS_BIND))
            try Sys.mount(source: nil, target: fdPath(staging.fd, name), flags: UInt(MS_PRIVATE))
            try Sys.mount(source: nil, target: fdPath(staging.fd, name), flags: UInt(MS_BIND | MS_REMOUNT | MS_RDONLY))
        }
        try sys("cannot bind the read-only staging mount at \(shown)") { () throws(SystemCallError) in
            try Sys.mount(source: fdPath(staging.fd, name), target: fdPath(target), flags: UInt(MS_BIND))
        }
        do {
            try Sys.mount(source: nil, target: fdPath(dir.fd, name), flags: UInt(MS_PRIVATE))
        } catch {
            _ = try? unmountAll(dir, name)
            throw FSShareError.system("cannot make the share at \(shown) private", error)
        }
    }

    /// Unmounts everything stacked at `dir/name` (`MNT_DETACH|UMOUNT_NOFOLLOW`), checking with
    /// statx after each round. Returns how many mounts were removed; a missing path is 0.
    @discardableResult
    static func unmountAll(_ dir: DirFD, _ name: FilePath) throws(SystemCallError) -> Int {
        var count = 0
        while true {
            let st: FileStatus
            do {
                st = try Sys.statx(dir, name)
            } catch {
                if error.errno == .noSuchFileOrDirectory { return count }
                throw error
            }
            if !st.isMountRoot { return count }
            do {
                try Sys.umount2(fdPath(dir.fd, name), flags: Int32(MNT_DETACH) | Int32(UMOUNT_NOFOLLOW))
            } catch {
                // EINVAL: raced with another unmount; the statx above will tell.
                if error.errno != .invalidArgument { throw SystemCallError(syscall: "umount2", path: dir.display(name), errno: error.errno) }
            }
            count += 1
            if count > 64 {
                throw SystemCallError(syscall: "umount2", path: dir.display(name), errno: .resourceBusy)
            }
        }
    }

    /// Removes a share's mount point, which must no longer be a mount and must sit on the same
    /// mount as its parent. A missing mount point is fine.
    static func removeMountPoint(_ dir: DirFD, _ name: FilePath) throws(FSShareError) {
        let parent = try sys("cannot stat \(dir.path)") { () throws(SystemCallError) in try Sys.statx(dir, "") }
        let st: FileStatus
        do {
            st = try Sys.statx(dir, name)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot stat the mount point \(dir.display(name))", error)
        }
        guard !st.isMountRoot, st.mountID == parent.mountID else {
            throw FSShareError(.systemCall, "\(dir.display(name)) is still a mount point; it was not removed")
        }
        do {
            try Sys.unlinkat(dir, name, directory: st.kind == .directory)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot remove the mount point \(dir.display(name))", error)
        }
    }

    /// Removes `dir/name` and everything below it, entry by entry, only while every entry is on
    /// mount `mountID` and is not a mount root: it never deletes through a mount point (Kata's
    /// `RemoveAll` does, kata-behavior §2.2). With `unmountStrays`, a mount met on the way is
    /// unmounted first (children before their parents, since the walk unmounts on the way
    /// down only what is mounted on top of an entry). What it cannot remove is listed in `problems`.
    static func removeTree(_ dir: DirFD, _ name: FilePath, mountID: UInt64, unmountStrays: Bool, problems: inout [String]) {
        let shown = dir.display(name)
        var st: FileStatus
        do {
            st = try Sys.statx(dir, name)
            if (st.isMountRoot || st.mountID != mountID) && unmountStrays {
                try unmountAll(dir, name)
                st = try Sys.statx(dir, name)
            }
        } catch {
            if error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
            return
        }
        if st.isMountRoot || st.mountID != mountID {
            problems.append("\(shown) is a mount point; not removed and not entered")
            return
        }
        if st.kind == .directory {
            do {
                // One O_RDONLY descriptor serves both the listing and the *at calls below it.
                let child = try Sys.openat(dir, name, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
                defer { Sys.close(child) }
                let childDir = DirFD(fd: child, path: shown)
                for entry in try Sys.listDirectory(child, path: shown) {
                    removeTree(childDir, FilePath(entry.name), mountID: mountID, unmountStrays: unmountStrays, problems: &problems)
                }
            } catch {
                problems.append("\(error)")
                return
            }
        }
        do {
            try Sys.unlinkat(dir, name, directory: st.kind == .directory)
        } catch {
            if error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
        }
    }
}
