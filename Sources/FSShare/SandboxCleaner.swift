#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Removes one sandbox's mounts and directories, from whatever state a crash left them in.
///
/// Only a directory that a manifest proves to be an fsshare sandbox is touched
/// (``SandboxOwnership``); any other is refused and left exactly as it is, except the empty
/// directory an interrupted prepare leaves.
///
/// Order: unmount the shares the manifest lists (deepest first), then `shared/`, then the
/// sandbox self-bind — when the self-bind is there, detaching it detaches everything below it
/// and the first two steps are skipped; verify nothing is mounted; then delete entry by entry,
/// never crossing a mount (a stray mount found on the way is unmounted first). Every unmount is `MNT_DETACH|UMOUNT_NOFOLLOW` through a descriptor-anchored path.
struct SandboxCleaner {
    var root: FilePath
    var sandboxID: String

    func run() throws(FSShareError) -> CleanupOutcome {
        try Identifier.validate(sandboxID, what: "sandbox")
        try SandboxOwnership.requireMountPointTest()
        let rootFD: FileDescriptor
        do {
            rootFD = try Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return .nothingToClean }
            throw FSShareError.system("cannot open the sandbox root \(root)", error)
        }
        // Closed together at the end: adjacent numbers go in one close_range.
        var opened = [rootFD]
        defer { Sys.closeAll(opened) }
        let rootDir = DirFD(fd: rootFD, path: root)
        // The sandbox directory's path is built only for a message.
        let root = root, sandboxID = sandboxID
        func sandboxPath() -> FilePath { root.appending(sandboxID) }
        let lock: FileDescriptor
        do {
            lock = try Sys.openat(rootDir, named: sandboxID, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory:
                // What a prepare killed before its rename leaves (a hidden, fsshare-named
                // directory). Looked for only here: a prepare makes it only while the sandbox
                // directory does not exist, and renames it to that name or removes it.
                let removedPreparing = try SandboxOwnership.removeInterruptedPrepare(rootDir, sandboxID: sandboxID)
                return removedPreparing ? .removedInterruptedPrepare : .nothingToClean
            case .tooManySymbolicLinkLevels, .notDirectory:
                throw FSShareError(.refused, "\(sandboxPath()) is not a directory (a symbolic link or a file), so not an fsshare sandbox; it was left alone")
            default: throw FSShareError.system("cannot open the sandbox directory \(sandboxPath())", error)
            }
        }
        opened.append(lock)
        try sys("cannot lock \(sandboxPath())") { () throws(SystemCallError) in try Sys.flock(lock, operation: LOCK_EX, path: sandboxPath()) }
        let manifest: Manifest
        // The lock's descriptor is the sandbox directory as its top mount shows it: the anchor
        // for what follows.
        let top = DirFD(fd: lock, in: root, name: sandboxID)
        switch SandboxOwnership.inspect(top, sandboxID: sandboxID) {
        case .sandbox(let m):
            manifest = m
            // Only what was read is used from here on: its descriptor closes with the others.
            opened.append(m.surrenderDescriptor())
        case .foreign(let why):
            throw FSShareError(.refused, "\(sandboxPath()) is not an fsshare sandbox (\(why)); nothing in it was unmounted or deleted")
        }
        var problems: [String] = []

        // 1. Shares the manifest knows, deepest first.
        // The sandbox's own mount (prepare's self-bind) is there: every share and the export
        // were attached below it, and detaching it in step 3 detaches them all (MNT_DETACH is
        // recursive and propagates like one unmount each): steps 1 and 2 are skipped, one
        // unmount and its RCU grace period per mount fewer. Anything mounted elsewhere (on
        // the directory below the self-bind) is still found and unmounted by step 4.
        let selfBound = (try? Sys.fstatx(lock, path: sandboxPath())).map { $0.mountAnswersKnown && $0.isMountRoot } ?? false
        let recorded = selfBound ? [] : manifest.orderedShares.filter { $0.kind != .rootfsDirectory && $0.kind != .rootfsImage && $0.kind != .rootfsLayers && $0.kind != .copy }
        for record in recorded.sorted(by: { $0.name.split(separator: "/").count > $1.name.split(separator: "/").count }) {
            let path = manifest.style.mountsPath.appending(record.name)
            guard path.components.allSatisfy({ (c: FilePath.Component) in c.kind == .regular }) else { continue }
            do throws(SystemCallError) {
                // Resolve the parent without following symlinks, then unmount by that anchor.
                let parentPath = path.removingLastComponent()
                let parent = try Sys.openat2(top, parentPath, flags: Sys.oPath | Sys.oDirectory, resolve: Sys.resolveNoSymlinks | Sys.resolveBeneath)
                defer { Sys.close(parent) }
                let leaf = FilePath(path.lastComponent?.string ?? "")
                try MountOps.unmountAll(DirFD(fd: parent, path: top.display(parentPath)), leaf)
            } catch {
                // ENOENT: already gone. ELOOP/ENOTDIR: a symlink or file planted on the path;
                // none of our mounts is reachable through it (step 4 removes it unfollowed).
                if ![.noSuchFileOrDirectory, .tooManySymbolicLinkLevels, .notDirectory].contains(error.errno) { problems.append("\(error)") }
            }
        }
        // 2. The export.
        if !selfBound {
            do { try MountOps.unmountAll(top, manifest.style.exportPath) } catch { problems.append("\(error)") }
        }
        // 3. The sandbox self-bind (detaching it also detaches anything left below it). What
        //    the last look saw of the directory serves the check before deleting.
        var sandboxStatus: FileStatus?
        do { sandboxStatus = try MountOps.unmountAllReporting(rootDir, FilePath(sandboxID)).status } catch { problems.append("\(error)") }

        guard problems.isEmpty else {
            throw FSShareError(.incompleteCleanup, "cleanup of sandbox \(sandboxID) left mounts behind; nothing was deleted: " + problems.joined(separator: "; "))
        }
        // Loop devices of host-mounted images: freed by autoclear with their mount; a device
        // some other opener still holds is unbound so it goes with that opener.
        for record in manifest.orderedShares where record.kind == .rootfsHostImage {
            do throws(FSShareError) { try HostImageLoop.release(record) } catch { problems.append(error.message) }
        }
        // 4. Delete entry by entry, never crossing a mount: a mount still found in the tree (one
        //    made on the parent mount, outside the self-bind) is unmounted first, deepest first,
        //    and what cannot be unmounted is neither entered nor deleted.
        // The manifest goes after everything else in the sandbox: if deletion stops early, the
        // next cleanup still finds it.
        do throws(SystemCallError) {
            let st: FileStatus
            if let sandboxStatus { st = sandboxStatus } else { st = try Sys.statx(rootDir, FilePath(sandboxID)) }
            // Not a mount root: then it is on the root's own mount (the walk from the root's
            // descriptor crossed no mount to reach it), which every entry below must share.
            guard st.mountAnswersKnown, !st.isMountRoot else {
                throw SystemCallError(syscall: "umount2", path: sandboxPath(), errno: .resourceBusy)
            }
            let sandboxFD = try Sys.openat(rootDir, named: sandboxID, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
            opened.append(sandboxFD)
            let sandboxDir = DirFD(fd: sandboxFD, in: root, name: sandboxID)
            for entry in try Sys.listDirectory(sandboxFD, path: sandboxPath()) where entry.name != Manifest.fileNameText {
                MountOps.removeTree(sandboxDir, named: entry.name, kind: entry.kind, mountID: st.mountID, unmountStrays: true, problems: &problems)
            }
            if problems.isEmpty {
                MountOps.removeTree(sandboxDir, named: Manifest.fileNameText, kind: .regular, mountID: st.mountID, unmountStrays: false, problems: &problems)
            }
            if problems.isEmpty { try Sys.unlinkat(rootDir, named: sandboxID, directory: true) }
        } catch {
            if error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
        }
        if !problems.isEmpty {
            throw FSShareError(.incompleteCleanup, "cleanup of sandbox \(sandboxID) is incomplete: " + problems.joined(separator: "; "))
        }
        return .cleaned
    }
}
