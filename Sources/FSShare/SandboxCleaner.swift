#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Removes one sandbox's mounts and directories, from whatever state a crash left them in.
///
/// Order: unmount the shares the manifest lists (deepest first), then any other mount found
/// below `mounts/` and `private/` (statx per entry, no mountinfo), then `shared/`, then the
/// sandbox self-bind; verify nothing is mounted; then delete entry by entry, never crossing a
/// mount. Every unmount is `MNT_DETACH|UMOUNT_NOFOLLOW` through a descriptor-anchored path.
struct SandboxCleaner {
    var root: FilePath
    var sandboxID: String

    func run() throws(FSShareError) {
        try Identifier.validate(sandboxID, what: "sandbox")
        let rootFD: FileDescriptor
        do {
            rootFD = try Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot open the sandbox root \(root)", error)
        }
        defer { Sys.close(rootFD) }
        let rootDir = DirFD(fd: rootFD, path: root)
        let sid = FilePath(sandboxID)
        let sandboxPath = rootDir.display(sid)
        let lock: FileDescriptor
        do {
            lock = try Sys.openat(rootDir, sid, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot open the sandbox directory \(sandboxPath)", error)
        }
        defer { Sys.close(lock) }
        try sys("cannot lock \(sandboxPath)") { () throws(SystemCallError) in try Sys.flock(lock, operation: LOCK_EX, path: sandboxPath) }
        var problems: [String] = []

        // 1. Shares the manifest knows, deepest first.
        let topFD = try sys("cannot open \(sandboxPath)") { () throws(SystemCallError) in
            try Sys.openat(rootDir, sid, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
        }
        defer { Sys.close(topFD) }
        let top = DirFD(fd: topFD, path: sandboxPath)
        let manifest = try? Manifest.open(in: DirFD(fd: lock, path: sandboxPath), sandboxID: sandboxID, create: false)
        let recorded = (manifest?.orderedShares ?? []).filter { $0.kind != .rootfsDirectory }
        for record in recorded.sorted(by: { $0.name.split(separator: "/").count > $1.name.split(separator: "/").count }) {
            let path = FilePath("mounts").appending(record.name)
            guard path.components.allSatisfy({ (c: FilePath.Component) in c.kind == .regular }) else { continue }
            do throws(SystemCallError) {
                // Resolve the parent without following symlinks, then unmount by that anchor.
                let parentPath = path.removingLastComponent()
                let parent = try Sys.openat2(top, parentPath, flags: Sys.oPath | Sys.oDirectory, resolve: Sys.resolveNoSymlinks | Sys.resolveBeneath)
                defer { Sys.close(parent) }
                let leaf = FilePath(path.lastComponent?.string ?? "")
                try MountOps.unmountAll(DirFD(fd: parent, path: top.display(parentPath)), leaf)
            } catch {
                if error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
            }
        }
        // 2. Anything else mounted below mounts/ and private/ (a crash between mount and
        //    manifest cannot happen, but an operator's stray mount can).
        if let baseID = try? Sys.statx(top, "").mountID {
            for dir in ["mounts", "private"] {
                let n = FilePath(dir)
                do {
                    try MountOps.unmountAll(top, n)
                    let fd = try Sys.openat(top, n, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
                    defer { Sys.close(fd) }
                    MountOps.unmountBelow(DirFD(fd: fd, path: top.display(n)), mountID: baseID, problems: &problems)
                } catch {
                    if error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
                }
            }
            // 3. The export.
            do { try MountOps.unmountAll(top, "shared") } catch { problems.append("\(error)") }
        }
        // 4. The sandbox self-bind (detaching it also detaches anything left below it).
        do { try MountOps.unmountAll(rootDir, sid) } catch { problems.append("\(error)") }

        // 5. Verify and delete, never crossing a mount.
        let rootStat = try sys("cannot stat \(root)") { () throws(SystemCallError) in try Sys.statx(rootDir, "") }
        guard problems.isEmpty else {
            throw FSShareError(.incompleteCleanup, "cleanup of sandbox \(sandboxID) left mounts behind; nothing was deleted: " + problems.joined(separator: "; "))
        }
        // The manifest goes last among files: if deletion stops early, a later cleanup still finds it.
        MountOps.removeTree(rootDir, sid, mountID: rootStat.mountID, problems: &problems)
        if !problems.isEmpty {
            throw FSShareError(.incompleteCleanup, "cleanup of sandbox \(sandboxID) is incomplete: " + problems.joined(separator: "; "))
        }
    }
}
