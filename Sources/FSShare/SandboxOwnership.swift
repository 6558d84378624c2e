#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Decides whether a directory under the sandbox root is fsshare's, before anything in it is
/// unmounted, deleted or adopted. Only a manifest proves it: a regular file named `manifest`,
/// with one link, owned by this uid, whose first line is this sandbox's header. Without one the
/// directory belongs to someone else (an operator, another runtime, a guest), with one
/// exception: what an interrupted prepare can leave before its manifest exists.
enum SandboxOwnership {
    enum Verdict {
        /// fsshare made it; the manifest says what is in it.
        case sandbox(Manifest)
        /// An empty directory (or one holding only the manifest being written) of the same name:
        /// the most a prepare killed before its manifest existed can leave. Safe to remove.
        case interruptedPrepare
        /// Not fsshare's; the sentence says why. Never unmounted in, deleted or adopted.
        case foreign(String)
    }

    /// Inspects `dir` (an `O_RDONLY` descriptor of `<root>/<sandboxID>`).
    static func inspect(_ dir: DirFD, sandboxID: String) throws(FSShareError) -> Verdict {
        do {
            if let manifest = try Manifest.open(in: dir, sandboxID: sandboxID) { return .sandbox(manifest) }
        } catch {
            if error.code == .refused || error.code == .manifest { return .foreign(error.message) }
            throw error
        }
        let entries = try sys("cannot list \(dir.path)") { () throws(SystemCallError) in try Sys.listDirectory(dir, ".") }
        for entry in entries {
            let name = FilePath(entry.name)
            guard name == Manifest.fileName || name == Manifest.temporaryName, isTornHeader(dir, name, sandboxID: sandboxID) else {
                return .foreign("it has no fsshare manifest and is not empty (it holds \"\(entry.name)\")")
            }
        }
        return .interruptedPrepare
    }

    /// `dir/name` is a regular file of ours holding at most the beginning of the header line.
    private static func isTornHeader(_ dir: DirFD, _ name: FilePath, sandboxID: String) -> Bool {
        guard let fd = try? Sys.openat(dir, name, flags: O_RDONLY | O_NONBLOCK | Sys.oNoFollow) else { return false }
        defer { Sys.close(fd) }
        let header = Array(Manifest.headerLine(sandboxID).utf8)
        guard let st = try? Sys.fstatx(fd, path: dir.display(name)), st.kind == .regular, st.linkCount == 1,
              st.uid == geteuid(), st.size < header.count,
              let bytes = try? Sys.readAll(fd, path: dir.display(name)) else { return false }
        return header.starts(with: bytes)
    }

    /// Removes what an interrupted prepare left inside `dir` (its torn manifest files).
    static func removeInterruptedPrepare(_ dir: DirFD) throws(FSShareError) {
        for name in [Manifest.fileName, Manifest.temporaryName] {
            do {
                try Sys.unlinkat(dir, name, directory: false)
            } catch {
                if error.errno != .noSuchFileOrDirectory { throw FSShareError.system("cannot remove \(dir.display(name))", error) }
            }
        }
    }

    /// The one-time check that statx answers "is this a mount point?" (nil when it does).
    static let mountPointTestProblem: String? = Sys.mountPointTestProblem()

    /// Fails closed on a kernel whose statx cannot tell a mount point from a directory.
    static func requireMountPointTest() throws(FSShareError) {
        if let problem = mountPointTestProblem { throw FSShareError(.unsupported, problem) }
    }
}
