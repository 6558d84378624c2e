#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// What is under a sandbox root: the sandboxes, their recorded shares, and leaked mounts.
public struct Inventory: Sendable {
    public struct Share: Sendable, Equatable {
        public var record: ShareRecord
        /// Whether the share's mount point is a mount right now.
        public var mounted: Bool
    }
    public struct Sandbox: Sendable, Equatable {
        public var id: String
        /// `shared/` is mounted (the sandbox is prepared).
        public var prepared: Bool
        public var shares: [Share]
        /// A manifest problem, if the manifest could not be read.
        public var problem: String?
    }
    public var root: FilePath
    public var sandboxes: [Sandbox]
    /// Mount points under the root that no manifest accounts for.
    public var leakedMounts: [FilePath]

    /// Reads the inventory of `root`. Reads `/proc/self/mountinfo` once (for leaks only).
    public static func read(root: FilePath) throws(FSShareError) -> Inventory {
        var result = Inventory(root: root, sandboxes: [], leakedMounts: [])
        let rootFD: FileDescriptor
        do {
            rootFD = try Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return result }
            throw FSShareError.system("cannot open the sandbox root \(root)", error)
        }
        defer { Sys.close(rootFD) }
        let rootDir = DirFD(fd: rootFD, path: root)
        let entries = try sys("cannot list \(root)") { () throws(SystemCallError) in try Sys.listDirectory(rootDir, ".") }
        var known: Set<String> = []
        for entry in entries.sorted(by: { $0.name < $1.name }) {
            guard Identifier.problem(entry.name) == nil,
                  let st = try? Sys.statx(rootDir, FilePath(entry.name)), st.kind == .directory else { continue }
            let sid = FilePath(entry.name)
            let base = root.appending(entry.name)
            var sandbox = Sandbox(id: entry.name, prepared: false, shares: [], problem: nil)
            sandbox.prepared = (try? Sys.statx(rootDir, sid.appending("shared")).isMountRoot) ?? false
            do throws(FSShareError) {
                let fd = try sys("cannot open \(base)") { () throws(SystemCallError) in
                    try Sys.openat(rootDir, sid, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
                }
                defer { Sys.close(fd) }
                try sys("cannot lock \(base)") { () throws(SystemCallError) in try Sys.flock(fd, operation: LOCK_SH, path: base) }
                if let manifest = try Manifest.open(in: DirFD(fd: fd, path: base), sandboxID: entry.name, create: false) {
                    known.insert(base.string)
                    known.insert(base.appending("shared").string)
                    for r in manifest.orderedShares {
                        let rel = FilePath("mounts").appending(r.name)
                        let mounted = (try? Sys.statx(rootDir, sid.pushing(rel)).isMountRoot) ?? false
                        sandbox.shares.append(Share(record: r, mounted: mounted))
                        known.insert(base.pushing(rel).string)
                        known.insert(base.appending("shared").appending(r.name).string)
                    }
                } else {
                    sandbox.problem = "no manifest"
                }
            } catch {
                sandbox.problem = error.message
            }
            result.sandboxes.append(sandbox)
        }
        for mountPoint in try mountPoints(under: root) where !known.contains(mountPoint.string) {
            result.leakedMounts.append(mountPoint)
        }
        return result
    }

    /// Mount points strictly below `root`, from `/proc/self/mountinfo` (octal escapes decoded).
    public static func mountPoints(under root: FilePath) throws(FSShareError) -> [FilePath] {
        let table = try sys("cannot read /proc/self/mountinfo") { () throws(SystemCallError) in try Sys.mountTable() }
        let prefix = root.string.hasSuffix("/") ? root.string : root.string + "/"
        return table.filter { $0.mountPoint.hasPrefix(prefix) }.map { FilePath($0.mountPoint) }
    }

    /// Cleans every sandbox under `root`, then unmounts leaked mounts (deepest first).
    /// Returns the ids of the sandboxes it cleaned.
    @discardableResult
    public static func cleanupAll(root: FilePath) throws(FSShareError) -> [String] {
        let before = try read(root: root)
        var problems: [String] = []
        var cleaned: [String] = []
        for sandbox in before.sandboxes {
            do throws(FSShareError) {
                try SandboxCleaner(root: root, sandboxID: sandbox.id).run()
                cleaned.append(sandbox.id)
            } catch {
                problems.append(error.message)
            }
        }
        let leaks = try mountPoints(under: root).sorted { $0.components.count > $1.components.count }
        for leak in leaks {
            do {
                try Sys.umount2(leak, flags: Int32(MNT_DETACH) | Int32(UMOUNT_NOFOLLOW))
            } catch {
                if error.errno != .invalidArgument && error.errno != .noSuchFileOrDirectory { problems.append("\(error)") }
            }
        }
        if !problems.isEmpty {
            throw FSShareError(.incompleteCleanup, "cleanup of \(root) is incomplete: " + problems.joined(separator: "; "))
        }
        return cleaned
    }
}
