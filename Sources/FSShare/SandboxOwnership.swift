#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Decides whether a directory under the sandbox root is fsshare's, before anything in it is
/// unmounted, deleted or adopted. Only a manifest proves it: a regular file named `manifest`,
/// with one link, owned by this uid, whose first line is this sandbox's header. Without one the
/// directory belongs to someone else (an operator, another runtime, a guest) and is never
/// touched, even when it is empty.
///
/// That rule holds from the first instant because a sandbox directory never exists without its
/// manifest: prepare builds it as `.<sid>.fsshare-prepare`, writes the manifest inside, and
/// only then renames it to `<sid>`. A crash can leave only that hidden, fsshare-named directory
/// (empty, or holding the manifest), which is the one thing cleanup removes without a proof.
enum SandboxOwnership {
    enum Verdict {
        /// fsshare made it; the manifest says what is in it.
        case sandbox(Manifest)
        /// Not fsshare's; the sentence says why. Never unmounted in, deleted or adopted.
        case foreign(String)
    }

    /// Inspects `dir` (an `O_RDONLY` descriptor of `<root>/<sandboxID>`).
    static func inspect(_ dir: DirFD, sandboxID: String) -> Verdict {
        do {
            if let manifest = try Manifest.open(in: dir, sandboxID: sandboxID) { return .sandbox(manifest) }
            return .foreign("it has no fsshare manifest")
        } catch {
            // Whatever keeps the manifest from being read and trusted (a refusal, a corrupt or
            // future-version file, a read-only filesystem) means: no proof, hands off.
            return .foreign(error.message)
        }
    }

    // MARK: - The directory a prepare builds

    private static let preparingSuffix = ".fsshare-prepare"

    /// Where prepare builds `sandboxID`'s directory before renaming it into place.
    static func preparingName(_ sandboxID: String) -> FilePath { FilePath(preparingText(sandboxID)) }

    /// ``preparingName(_:)`` as text.
    static func preparingText(_ sandboxID: String) -> String { "." + sandboxID + preparingSuffix }

    /// The sandbox id of a preparing directory's name, or nil for any other name.
    static func sandboxID(ofPreparingName name: String) -> String? {
        guard name.hasPrefix("."), name.hasSuffix(preparingSuffix) else { return nil }
        let id = String(name.dropFirst().dropLast(preparingSuffix.count))
        return Identifier.problem(id) == nil ? id : nil
    }

    /// Whether `root/<preparing name of sandboxID>` is what a killed prepare leaves: a directory
    /// (not a mount) holding nothing, or only files of ours named like the manifest.
    static func isInterruptedPrepare(_ root: DirFD, sandboxID: String) -> Bool {
        let name = preparingName(sandboxID)
        guard let st = try? Sys.statx(root, name), st.kind == .directory, !st.isMountRoot, st.uid == geteuid(),
              let entries = try? Sys.listDirectory(root, name) else { return false }
        guard let fd = try? Sys.openat(root, name, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow) else { return false }
        defer { Sys.close(fd) }
        let dir = DirFD(fd: fd, path: root.display(name))
        for entry in entries {
            let file = FilePath(entry.name)
            guard file == Manifest.fileName || file == Manifest.temporaryName,
                  let fst = try? Sys.statx(dir, file), fst.kind == .regular, fst.linkCount == 1, fst.uid == geteuid()
            else { return false }
        }
        return true
    }

    /// Removes what a killed prepare of `sandboxID` left (see ``isInterruptedPrepare(_:sandboxID:)``).
    /// Returns whether there was something to remove; throws `FSShareError/Code/refused` if the
    /// name is taken by something else.
    /// Takes the root's lock unless the caller holds it, so a prepare building it right now is
    /// not undercut.
    @discardableResult
    static func removeInterruptedPrepare(_ root: DirFD, sandboxID: String, holdingRootLock: Bool = false) throws(FSShareError) -> Bool {
        // Nearly always absent: probed by text, with no error built for ENOENT.
        guard (try? Sys.statxIfPresent(root, named: preparingText(sandboxID))) != nil else { return false }
        let name = preparingName(sandboxID)
        if !holdingRootLock {
            let rootLock = try lockRoot(root)
            defer { rootLock.release() }
            return try removeInterruptedPrepare(root, sandboxID: sandboxID, holdingRootLock: true)
        }
        guard isInterruptedPrepare(root, sandboxID: sandboxID) else {
            throw FSShareError(.refused, "\(root.display(name)) is not what an interrupted prepare leaves; it was left alone")
        }
        let fd = try sys("cannot open \(root.display(name))") { () throws(SystemCallError) in
            try Sys.openat(root, name, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
        }
        defer { Sys.close(fd) }
        let dir = DirFD(fd: fd, path: root.display(name))
        try sys("cannot remove \(root.display(name))") { () throws(SystemCallError) in
            for file in [Manifest.fileName, Manifest.temporaryName] {
                do throws(SystemCallError) {
                    try Sys.unlinkat(dir, file, directory: false)
                } catch {
                    if error.errno != .noSuchFileOrDirectory { throw error }
                }
            }
            try Sys.unlinkat(root, name, directory: true)
        }
        return true
    }

    /// Creates `root/sandboxID` with its manifest already inside, or finds that it exists.
    /// Returns the new directory (open `O_RDONLY`, its `flock` held) and its manifest when this
    /// call made it, nil when it existed. Serialised with other prepares by `flock` on the root.
    /// `settings` are journalled with the manifest's header (one write).
    static func createSandboxDirectory(_ root: DirFD, sandboxID: String, style: SandboxLayoutStyle, settings: [(key: String, value: String)] = []) throws(FSShareError) -> (directory: FileDescriptor, manifest: Manifest)? {
        let rootLock = try lockRoot(root)
        defer { rootLock.release() }
        if (try? Sys.statxIfPresent(root, named: sandboxID)) != nil { return nil }
        let name = preparingText(sandboxID)
        // Paths are built only for messages.
        func shown() -> FilePath { root.display(FilePath(name)) }
        // Made directly: the name is taken only by a prepare killed before its rename (looked
        // at, and removed, only then; not probed first on every prepare).
        if try !sys("cannot create \(shown())", { () throws(SystemCallError) in try Sys.mkdirat(root, named: name, mode: 0o700) }) {
            try removeInterruptedPrepare(root, sandboxID: sandboxID, holdingRootLock: true)
            guard try sys("cannot create \(shown())", { () throws(SystemCallError) in try Sys.mkdirat(root, named: name, mode: 0o700) }) else {
                throw FSShareError(.conflict, "\(shown()) appeared again while the sandbox root was locked; prepare it again")
            }
        }
        var opened: FileDescriptor?
        do throws(FSShareError) {
            let fd = try sys("cannot open \(shown())") { () throws(SystemCallError) in
                try Sys.openat(root, named: name, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
            }
            opened = fd
            // The sandbox's own lock, taken before the directory has its name: no other process
            // can lock it before this prepare is done, so nothing can be appended to the
            // manifest meanwhile (the caller keeps the lock and need not read it back).
            try sys("cannot lock \(shown())") { () throws(SystemCallError) in try Sys.flock(fd, operation: LOCK_EX, path: shown()) }
            // The directory descriptor and the manifest stay valid across the rename (same
            // inode): the caller keeps both instead of opening and reading them again.
            let manifest = try Manifest.create(in: DirFD(fd: fd, in: root.path, name: sandboxID), sandboxID: sandboxID, style: style, settings: settings)
            try sys("cannot move \(shown()) into place") { () throws(SystemCallError) in
                try Sys.renameat(root, named: name, to: sandboxID, noReplace: true)
            }
            return (fd, manifest)
        } catch {
            if let opened { Sys.close(opened) }
            _ = try? removeInterruptedPrepare(root, sandboxID: sandboxID, holdingRootLock: true)
            throw error
        }
    }

    /// An exclusive `flock` on the sandbox root, held only while a sandbox directory is created
    /// or a preparing one removed.
    private struct RootLock {
        let fd: FileDescriptor
        /// The lock has a descriptor of its own (closing it unlocks), not the root's.
        let owned: Bool
        let path: FilePath

        func release() {
            if owned { Sys.close(fd) } else { try? Sys.flock(fd, operation: LOCK_UN, path: path) }
        }
    }

    /// Locks the root through its own descriptor when that is open for reading (prepare opens
    /// it so: no second open and close); an `O_PATH` one cannot hold a `flock` (EBADF), so then
    /// through a descriptor of its own. `flock` excludes per open file description: the root's
    /// descriptor serves only when this operation opened it itself (prepare's is opened per
    /// call), never one shared with other threads.
    private static func lockRoot(_ root: DirFD) throws(FSShareError) -> RootLock {
        do {
            try Sys.flock(root.fd, operation: LOCK_EX, path: root.path)
            return RootLock(fd: root.fd, owned: false, path: root.path)
        } catch {
            if error.errno != .badFileDescriptor { throw FSShareError.system("cannot lock the sandbox root \(root.path)", error) }
        }
        let fd = try sys("cannot open the sandbox root \(root.path)") { () throws(SystemCallError) in
            try Sys.openat(root, ".", flags: O_RDONLY | Sys.oDirectory)
        }
        do {
            try Sys.flock(fd, operation: LOCK_EX, path: root.path)
        } catch {
            Sys.close(fd)
            throw FSShareError.system("cannot lock the sandbox root \(root.path)", error)
        }
        return RootLock(fd: fd, owned: true, path: root.path)
    }

    // MARK: - The kernel's mount-point answer

    /// The one-time check that statx answers "is this a mount point?" (nil when it does).
    static let mountPointTestProblem: String? = Sys.mountPointTestProblem()

    /// Fails closed on a kernel whose statx cannot tell a mount point from a directory.
    static func requireMountPointTest() throws(FSShareError) {
        if let problem = mountPointTestProblem { throw FSShareError(.unsupported, problem) }
    }
}
