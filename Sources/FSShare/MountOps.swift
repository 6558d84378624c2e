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
        let ok = Sys.probeNewMountAPI()
        newAPIState.store(ok ? 1 : 0, ordering: .relaxed)
        return ok
    }

    /// Attaches a copy of the mount holding `source` (an `O_PATH` descriptor) at `dir/name`
    /// (which must already exist and match the source's kind).
    ///
    /// With the new mount API the copy is made detached, set read-only (recursively when asked)
    /// and private, and only then attached by descriptor: no window in which a writable copy
    /// exists under `mounts/`, and no propagated writable copy in virtiofsd's namespace.
    ///
    /// `target` nil: `dir/name` is a mount point this operation has just created (see
    /// ``ownMountPoint(_:named:directory:mode:)``), named in `dir` rather than opened.
    ///
    /// Returns the new mount's descriptor when the new API made it (the caller closes it, with
    /// the source's in one call when it can); nil with `mount(2)`.
    @discardableResult
    static func attach(
        source: FileDescriptor, sourcePath: @autoclosure () -> FilePath, target given: FileDescriptor?, dir: DirFD, name nameText: String,
        staging stagingDirectory: () throws(FSShareError) -> DirFD, isFile: Bool, readOnly: Bool, recursive: Bool, method: MountMethod
    ) throws(FSShareError) -> FileDescriptor? {
        // Shown only in errors: built when one is thrown, not on every share.
        func shown() -> FilePath { dir.display(FilePath(nameText)) }
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
            // The copy is read-only (when asked) and private from the moment it exists: one
            // open_tree_attr where the kernel has it.
            let tree = try sys("cannot make a \(readOnly ? "read-only " : "")private copy of the mount of \(sourcePath()) for \(shown())") { () throws(SystemCallError) in
                try Sys.openTreeClone(source, recursive: recursive, readOnly: readOnly, propagation: UInt(MS_PRIVATE), display: sourcePath())
            }
            do throws(FSShareError) {
                try sys("cannot attach the share at \(shown())") { () throws(SystemCallError) in
                    if let given {
                        try Sys.moveMount(tree, onto: given, display: shown())
                    } else {
                        try Sys.moveMount(tree, onto: dir, named: nameText)
                    }
                }
            } catch {
                Sys.close(tree)
                throw error
            }
            return tree
        }
        // The legacy mount(2) names its target through a descriptor.
        let name = FilePath(nameText)
        let target: FileDescriptor
        if let given {
            target = given
        } else {
            target = try sys("cannot open \(shown())") { () throws(SystemCallError) in
                try Sys.openat(dir, name, flags: Sys.oPath | Sys.oNoFollow | (isFile ? 0 : Sys.oDirectory))
            }
        }
        defer { if given == nil { Sys.close(target) } }
        if readOnly && recursive {
            throw FSShareError(.unsupported, "a recursive read-only share needs mount_setattr (Linux 5.12); the legacy method cannot make submounts read-only before they are attached")
        }
        // Every mount(2) below names its target through /proc/self/fd/N of a descriptor opened
        // with O_NOFOLLOW and checked: no path under the sandbox is looked up again, so a
        // symlink planted there is never followed.
        let bindFlags = UInt(MS_BIND) | (recursive ? UInt(MS_REC) : 0)
        if !readOnly {
            try sys("cannot bind \(sourcePath()) at \(shown())") { () throws(SystemCallError) in
                try Sys.mount(source: fdPath(source), target: fdPath(target), flags: bindFlags)
            }
            try makePrivate(dir, name, shown: shown())
            return nil
        }
        // Legacy read-only: bind into private/ (not exported), make that read-only, then bind
        // the read-only mount into mounts/. A bind of a read-only mount is read-only, so every
        // copy that propagates from mounts/ is read-only too. Remounting in place would not be.
        let staging = try stagingDirectory()
        let stageShown = staging.display(name)
        // A staging mount left by a process killed here is ours: drop it and start again.
        _ = try? unmountAll(staging, name)
        let stage = try ownEntry(staging, name, directory: !isFile, mode: 0o755)
        defer {
            Sys.close(stage.fd)
            _ = try? unmountAll(staging, name)
            try? removeMountPoint(staging, name)
        }
        try sys("cannot bind \(sourcePath()) at the staging point \(stageShown)") { () throws(SystemCallError) in
            try Sys.mount(source: fdPath(source), target: fdPath(stage.fd), flags: UInt(MS_BIND))
        }
        let staged = try mountRoot(staging, name)
        defer { Sys.close(staged) }
        try sys("cannot make the staging mount \(stageShown) read-only") { () throws(SystemCallError) in
            try Sys.mount(source: nil, target: fdPath(staged), flags: UInt(MS_PRIVATE))
            try Sys.mount(source: nil, target: fdPath(staged), flags: UInt(MS_BIND | MS_REMOUNT | MS_RDONLY))
        }
        try sys("cannot bind the read-only staging mount at \(shown())") { () throws(SystemCallError) in
            try Sys.mount(source: fdPath(staged), target: fdPath(target), flags: UInt(MS_BIND))
        }
        try makePrivate(dir, name, shown: shown())
        return nil
    }

    /// Makes the share just attached at `dir/name` private (it must not propagate back), or
    /// unmounts it again if that fails.
    private static func makePrivate(_ dir: DirFD, _ name: FilePath, shown: FilePath) throws(FSShareError) {
        do {
            let top = try mountRoot(dir, name)
            defer { Sys.close(top) }
            try sys("cannot make the share at \(shown) private") { () throws(SystemCallError) in
                try Sys.mount(source: nil, target: fdPath(top), flags: UInt(MS_PRIVATE))
            }
        } catch {
            _ = try? unmountAll(dir, name)
            throw error
        }
    }

    /// An `O_PATH` descriptor of the mount stacked at `dir/name`, opened without following a
    /// symlink and checked to be a mount root (what was just mounted there, not a substitute).
    static func mountRoot(_ dir: DirFD, _ name: FilePath) throws(FSShareError) -> FileDescriptor {
        let shown = dir.display(name)
        let fd = try sys("cannot open the mount at \(shown)") { () throws(SystemCallError) in
            try Sys.openat(dir, name, flags: Sys.oPath | Sys.oNoFollow)
        }
        guard let st = try? Sys.fstatx(fd, path: shown), st.isMountRoot, st.kind != .symlink else {
            Sys.close(fd)
            throw FSShareError(.conflict, "\(shown) is not the mount fsshare just made there (it was replaced)")
        }
        return fd
    }

    /// fsshare's own entry `dir/name` (a directory, or an empty file for a single-file share),
    /// opened `O_PATH|O_NOFOLLOW`: created when missing; a symbolic link found there (planted,
    /// never made by fsshare) is removed, never followed, and the entry made anew. Anything
    /// else of the wrong kind is refused. `created` says whether this call made it.
    static func ownEntry(_ dir: DirFD, _ name: FilePath, directory: Bool, mode: mode_t) throws(FSShareError) -> (fd: FileDescriptor, created: Bool) {
        // Built only for a message.
        func shown() -> FilePath { dir.display(name) }
        for _ in 0..<4 {
            let created = try sys("cannot create \(shown())") { () throws(SystemCallError) in
                directory ? try Sys.mkdirat(dir, name, mode: mode) : try Sys.mkfileat(dir, name, mode: mode)
            }
            if directory {
                // O_DIRECTORY with O_NOFOLLOW opens only a real directory (a symlink to one is
                // ENOTDIR): the common case needs no fstatx to know what it opened.
                do {
                    return (try Sys.openat(dir, name, flags: Sys.oPath | Sys.oNoFollow | Sys.oDirectory), created)
                } catch {
                    if error.errno == .noSuchFileOrDirectory { continue }  // removed meanwhile: make it again
                    if error.errno != .notDirectory { throw FSShareError.system("cannot open \(shown())", error) }
                }
            }
            let fd: FileDescriptor
            do {
                fd = try Sys.openat(dir, name, flags: Sys.oPath | Sys.oNoFollow)
            } catch {
                if error.errno == .noSuchFileOrDirectory { continue }  // removed meanwhile: make it again
                throw FSShareError.system("cannot open \(shown())", error)
            }
            let st: FileStatus
            do {
                st = try Sys.fstatx(fd, path: shown())
            } catch {
                Sys.close(fd)
                throw FSShareError.system("cannot stat \(shown())", error)
            }
            if st.kind == (directory ? .directory : .regular) { return (fd, created) }
            Sys.close(fd)
            guard st.kind == .symlink else {
                throw FSShareError(.conflict, "\(shown()) exists and is a \(st.kind), not the \(directory ? "directory" : "file") fsshare expects there; it was left alone")
            }
            do {
                try Sys.unlinkat(dir, name, directory: false)
            } catch {
                if error.errno != .noSuchFileOrDirectory { throw FSShareError.system("cannot remove the symbolic link planted at \(shown())", error) }
            }
        }
        throw FSShareError(.conflict, "\(shown()) kept being replaced while fsshare made it; refusing")
    }

    /// ``ownEntry(_:_:directory:mode:)`` for a mount point that is about to be attached to, its
    /// one-component `name` given as text. When this call creates the entry nothing is opened
    /// (`fd` nil): it is fsshare's fresh entry, made under the sandbox lock in a directory only
    /// root can write, and `move_mount` names it in `dir` without following a symlink (one open
    /// and close fewer per share, no `FilePath` built). An entry that already exists is checked
    /// and opened as ``ownEntry(_:_:directory:mode:)`` does.
    static func ownMountPoint(_ dir: DirFD, named name: String, directory: Bool, mode: mode_t) throws(FSShareError) -> (fd: FileDescriptor?, created: Bool) {
        let created = try sys("cannot create \(dir.display(FilePath(name)))") { () throws(SystemCallError) in
            directory ? try Sys.mkdirat(dir, named: name, mode: mode) : try Sys.mkfileat(dir, FilePath(name), mode: mode)
        }
        if created { return (nil, true) }
        let (fd, madeNow) = try ownEntry(dir, FilePath(name), directory: directory, mode: mode)
        return (fd, madeNow)
    }

    /// statx of `path` below `dir` without following any symlink on the way (the parent is
    /// resolved with `RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH`, the leaf is not followed).
    static func statBeneath(_ dir: DirFD, _ path: FilePath) throws(SystemCallError) -> FileStatus {
        guard path.components.count > 1 else { return try Sys.statx(dir, path) }
        let parentPath = path.removingLastComponent()
        let parent = try Sys.openat2(dir, parentPath, flags: Sys.oPath | Sys.oDirectory, resolve: Sys.resolveNoSymlinks | Sys.resolveBeneath)
        defer { Sys.close(parent) }
        return try Sys.statx(DirFD(fd: parent, path: dir.display(parentPath)), FilePath(path.lastComponent?.string ?? ""))
    }

    /// Removes `dir/name` if it is a symbolic link (never following it); anything else stays.
    static func removePlantedSymlink(_ dir: DirFD, _ name: FilePath) throws(FSShareError) {
        guard let st = try? Sys.statx(dir, name), st.kind == .symlink else { return }
        do {
            try Sys.unlinkat(dir, name, directory: false)
        } catch {
            if error.errno != .noSuchFileOrDirectory { throw FSShareError.system("cannot remove the symbolic link planted at \(dir.display(name))", error) }
        }
    }

    /// The common unshare of a mount point fsshare made: one `umount2` (`MNT_DETACH|UMOUNT_NOFOLLOW`),
    /// then one `rmdir` (`unlink` for a file). True when `dir/name` is gone. Neither call can
    /// delete through a mount (rmdir/unlink of a mount point is `EBUSY`; of a non-empty
    /// directory `ENOTEMPTY`), so nothing needs looking at first. False when anything is
    /// unusual — not a mount, mounts stacked, another kind of entry — and nothing was removed:
    /// the caller then takes the careful path (``unmountAllReporting(_:_:)``), which looks.
    static func unmountAndRemove(_ dir: DirFD, named name: String, isFile: Bool) throws(SystemCallError) -> Bool {
        do {
            try Sys.umount2(at: dir, named: name, flags: Int32(MNT_DETACH) | Int32(UMOUNT_NOFOLLOW))
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory: return true
            case .invalidArgument: return false
            default: throw SystemCallError(syscall: "umount2", path: dir.display(FilePath(name)), errno: error.errno)
            }
        }
        do {
            try Sys.unlinkat(dir, named: name, directory: !isFile)
        } catch {
            return error.errno == .noSuchFileOrDirectory
        }
        return true
    }

    /// Unmounts everything stacked at `dir/name` (`MNT_DETACH|UMOUNT_NOFOLLOW`): one unmount
    /// first, then a statx after each round until it is no longer a mount root. Returns how many mounts were removed; a missing path is 0.
    @discardableResult
    static func unmountAll(_ dir: DirFD, _ name: FilePath) throws(SystemCallError) -> Int {
        try unmountAllReporting(dir, name).count
    }

    /// ``unmountAll(_:_:)``, also returning what the last statx saw of `dir/name` once it was no
    /// longer a mount root (nil when it does not exist), so the caller need not look again.
    @discardableResult
    static func unmountAllReporting(_ dir: DirFD, _ name: FilePath) throws(SystemCallError) -> (count: Int, status: FileStatus?) {
        // What is being removed is a mount nearly always: unmount first and look afterwards
        // (one statx per round instead of one before and one after). UMOUNT_NOFOLLOW: a
        // symlink planted at the name is not followed (EINVAL, then statx shows what it is).
        var count = 0
        do {
            try Sys.umount2(at: dir, name, flags: Int32(MNT_DETACH) | Int32(UMOUNT_NOFOLLOW))
            count = 1
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory: return (0, nil)
            case .invalidArgument: break  // not a mount point (the statx below says what it is)
            default: throw SystemCallError(syscall: "umount2", path: dir.display(name), errno: error.errno)
            }
        }
        while true {
            let st: FileStatus
            do {
                st = try Sys.statx(dir, name)
            } catch {
                if error.errno == .noSuchFileOrDirectory { return (count, nil) }
                throw error
            }
            if !st.isMountRoot { return (count, st) }
            do {
                try Sys.umount2(at: dir, name, flags: Int32(MNT_DETACH) | Int32(UMOUNT_NOFOLLOW))
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
        try removeMountPoint(dir, name, status: st, parentMountID: parent.mountID)
    }

    /// ``removeMountPoint(_:_:)`` with the entry's status and its parent's mount id already
    /// known (from ``unmountAllReporting(_:_:)`` and the sandbox handle). Removing an empty
    /// directory or a file cannot delete through a mount; if something is mounted on it after
    /// the status was taken, the kernel refuses the unlink (`EBUSY`).
    static func removeMountPoint(_ dir: DirFD, _ name: FilePath, status st: FileStatus, parentMountID: UInt64) throws(FSShareError) {
        guard !st.isMountRoot, st.mountID == parentMountID else {
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
    ///
    /// `kind` is what the directory listing said the entry is (its `d_type`), if it said: a
    /// hint for which of rmdir and unlink to try first, never trusted for anything else. The
    /// name is text (a listing's): no path is built unless the careful walk is needed.
    static func removeTree(_ dir: DirFD, named text: String, kind: FileKind? = nil, mountID: UInt64, unmountStrays: Bool, problems: inout [String]) {
        // An empty directory or a plain entry goes in one call: rmdir and unlink never cross a
        // mount (on a mount point in this namespace they fail with EBUSY) and never follow a
        // link. Anything else (not empty, busy) takes the careful walk below.
        let fileFirst = kind != nil && kind != .directory
        do {
            try Sys.unlinkat(dir, named: text, directory: !fileFirst)
            return
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory: return
            case .notDirectory where !fileFirst, .isDirectory where fileFirst:
                do {
                    try Sys.unlinkat(dir, named: text, directory: fileFirst)
                    return
                } catch {
                    if error.errno == .noSuchFileOrDirectory { return }
                }
            default: break
            }
        }
        removeTreeCarefully(dir, FilePath(text), mountID: mountID, unmountStrays: unmountStrays, problems: &problems)
    }

    /// The walk for what one unlink or rmdir could not remove: checks the mount, enters
    /// directories by descriptor, unmounts strays when asked.
    private static func removeTreeCarefully(_ dir: DirFD, _ name: FilePath, mountID: UInt64, unmountStrays: Bool, problems: inout [String]) {
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
                    removeTree(childDir, named: entry.name, kind: entry.kind, mountID: mountID, unmountStrays: unmountStrays, problems: &problems)
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
