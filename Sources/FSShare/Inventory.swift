#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// What is under a sandbox root: the sandboxes, their recorded shares, leaked mounts, and
/// everything else (foreign entries), which fsshare reports and never touches.
public struct Inventory: Sendable {
    /// A share a sandbox's manifest records.
    public struct Share: Sendable, Equatable {
        /// What the manifest records.
        public var record: ShareRecord
        /// Whether the share's mount point is a mount right now.
        public var mounted: Bool
    }
    /// A directory under the root that a manifest proves to be an fsshare sandbox.
    public struct Sandbox: Sendable, Equatable {
        /// The sandbox id (its directory's name).
        public var id: String
        /// The sandbox is prepared: its export is mounted, or it is a copy-mode sandbox.
        public var prepared: Bool
        /// Its recorded shares, in the order they were made.
        public var shares: [Share]
        /// What its manifest records (layout, shared filesystem, copy-mode agent).
        public var recorded: RecordedSandbox?
        /// A problem met while reading the sandbox (its lock, its manifest).
        public var problem: String?
    }
    /// An entry under the root that is not an fsshare sandbox (no manifest proves it is).
    public struct Foreign: Sendable, Equatable {
        /// The entry's name under the root.
        public var name: String
        /// Why it is not a sandbox.
        public var reason: String
        /// It is what a prepare killed before its sandbox directory was complete leaves
        /// (`.<sid>.fsshare-prepare`, empty or holding only the manifest): `cleanup` removes it.
        public var interruptedPrepare: Bool
    }
    /// The sandbox root that was read.
    public var root: FilePath
    /// The sandboxes under it, by id.
    public var sandboxes: [Sandbox]
    /// Entries under the root that are not fsshare sandboxes; left alone by `cleanup --all`.
    public var foreign: [Foreign]
    /// Mount points inside sandboxes that their manifests do not account for (cleaning the
    /// sandbox removes them).
    public var leakedMounts: [FilePath]
    /// Mount points under the root outside any sandbox: someone else's, left alone.
    public var foreignMounts: [FilePath]

    /// Reads the inventory of `root`. Reads `/proc/self/mountinfo` once.
    ///
    /// - Parameter root: the sandbox root (a missing root reads as empty).
    /// - Returns: the sandboxes, foreign entries, leaked and foreign mounts under it.
    /// - Throws: `unsupported` when the kernel cannot tell mount points apart; `systemCall` when the root or the mount table cannot be read.
    public static func read(root: FilePath) throws(FSShareError) -> Inventory {
        try SandboxOwnership.requireMountPointTest()
        var result = Inventory(root: root, sandboxes: [], foreign: [], leakedMounts: [], foreignMounts: [])
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
        // Paths whose mounts a sandbox accounts for: exact mount points, and trees whose
        // submounts belong to a share (a recursive share carries the source's submounts).
        var known: Set<String> = []
        var knownTrees: [String] = []
        var sandboxDirs: [String] = []
        for entry in entries.sorted(by: { $0.name < $1.name }) {
            let sid = FilePath(entry.name)
            let base = root.appending(entry.name)
            func foreign(_ why: String, interrupted: Bool = false) {
                result.foreign.append(Foreign(name: entry.name, reason: why, interruptedPrepare: interrupted))
            }
            if let id = SandboxOwnership.sandboxID(ofPreparingName: entry.name) {
                let interrupted = SandboxOwnership.isInterruptedPrepare(rootDir, sandboxID: id)
                foreign(interrupted ? "what a prepare of sandbox \(id) left when it was interrupted" : "not what an interrupted prepare leaves",
                        interrupted: interrupted)
                continue
            }
            guard Identifier.problem(entry.name) == nil else { foreign("its name is not a sandbox id"); continue }
            let fd: FileDescriptor
            do {
                fd = try Sys.openat(rootDir, sid, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
            } catch {
                foreign(error.errno == .tooManySymbolicLinkLevels || error.errno == .notDirectory
                    ? "it is not a directory (a symbolic link or a file)" : "it cannot be opened: \(error)")
                continue
            }
            defer { Sys.close(fd) }
            var sandbox = Sandbox(id: entry.name, prepared: false, shares: [], recorded: nil, problem: nil)
            do throws(FSShareError) {
                try sys("cannot lock \(base)") { () throws(SystemCallError) in try Sys.flock(fd, operation: LOCK_SH, path: base) }
                switch SandboxOwnership.inspect(DirFD(fd: fd, path: base), sandboxID: entry.name) {
                case .foreign(let why):
                    foreign(why)
                    continue
                case .sandbox(let manifest):
                    sandboxDirs.append(base.string)
                    known.insert(base.string)
                    let style = manifest.style
                    known.insert(base.pushing(style.exportPath).string)
                    let recorded = RecordedSandbox(manifest)
                    sandbox.recorded = recorded
                    sandbox.prepared = recorded.isCopyMode
                        || ((try? MountOps.statBeneath(rootDir, sid.pushing(style.exportPath)).isMountRoot) ?? false)
                    for r in manifest.orderedShares {
                        let rel = style.mountsPath.appending(r.name)
                        let mounted = (try? MountOps.statBeneath(rootDir, sid.pushing(rel)).isMountRoot) ?? false
                        sandbox.shares.append(Share(record: r, mounted: mounted))
                        for path in [base.pushing(rel), base.pushing(style.exportedMountsPath).appending(r.name)] {
                            known.insert(path.string)
                            if r.recursive { knownTrees.append(path.string + "/") }
                        }
                    }
                }
            } catch {
                sandbox.problem = error.message
            }
            result.sandboxes.append(sandbox)
        }
        for mountPoint in try mountPoints(under: root) where !known.contains(mountPoint.string) {
            let path = mountPoint.string
            if knownTrees.contains(where: { path.hasPrefix($0) }) { continue }
            if sandboxDirs.contains(where: { path.hasPrefix($0 + "/") }) {
                result.leakedMounts.append(mountPoint)
            } else {
                result.foreignMounts.append(mountPoint)
            }
        }
        return result
    }

    /// Mount points strictly below `root`, from `/proc/self/mountinfo` (octal escapes decoded).
    ///
    /// - Parameter root: the directory below which to look.
    /// - Returns: the mount points, in mount-table order.
    /// - Throws: `systemCall` when the mount table cannot be read.
    public static func mountPoints(under root: FilePath) throws(FSShareError) -> [FilePath] {
        let table = try sys("cannot read /proc/self/mountinfo") { () throws(SystemCallError) in try Sys.mountTable() }
        let prefix = root.string.hasSuffix("/") ? root.string : root.string + "/"
        return table.filter { $0.mountPoint.hasPrefix(prefix) }.map { FilePath($0.mountPoint) }
    }

    /// What ``cleanupAll(root:)`` did.
    public struct CleanupReport: Sendable, Equatable {
        /// The sandboxes it cleaned (their mounts and directories are gone).
        public var cleaned: [String]
        /// What interrupted prepares left (`.<sid>.fsshare-prepare`), removed.
        public var removedInterruptedPrepares: [String]
        /// Entries that are not fsshare sandboxes, left exactly as they were.
        public var leftAlone: [Foreign]
        /// Mounts under the root outside any sandbox, left mounted.
        public var foreignMounts: [FilePath]
    }

    /// Cleans every sandbox under `root` (each one a manifest proves is fsshare's, mounts its
    /// manifest does not know included) and removes the empty directories of interrupted
    /// prepares. Anything else under the root, and any mount outside a sandbox, is reported
    /// and left alone: it may be an operator's data or another runtime's sandbox.
    ///
    /// - Parameter root: the sandbox root.
    /// - Returns: what was cleaned, removed and left alone.
    /// - Throws: `incompleteCleanup` listing every sandbox that could not be cleaned (the others are); what ``read(root:)`` throws.
    @discardableResult
    public static func cleanupAll(root: FilePath) throws(FSShareError) -> CleanupReport {
        let before = try read(root: root)
        var problems: [String] = []
        var report = CleanupReport(cleaned: [], removedInterruptedPrepares: [], leftAlone: [], foreignMounts: before.foreignMounts)
        for sandbox in before.sandboxes {
            do throws(FSShareError) {
                if try SandboxCleaner(root: root, sandboxID: sandbox.id).run() == .cleaned { report.cleaned.append(sandbox.id) }
            } catch {
                problems.append(error.message)
            }
        }
        for entry in before.foreign {
            guard entry.interruptedPrepare else {
                report.leftAlone.append(entry)
                continue
            }
            do throws(FSShareError) {
                // Re-checked under the root's lock: if it changed since the listing, it stays.
                guard let id = SandboxOwnership.sandboxID(ofPreparingName: entry.name),
                      let rootFD = try? Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory) else { continue }
                defer { Sys.close(rootFD) }
                if try SandboxOwnership.removeInterruptedPrepare(DirFD(fd: rootFD, path: root), sandboxID: id) {
                    report.removedInterruptedPrepares.append(entry.name)
                }
            } catch {
                if error.code == .refused { report.leftAlone.append(entry) } else { problems.append(error.message) }
            }
        }
        if !problems.isEmpty {
            throw FSShareError(.incompleteCleanup, "cleanup of \(root) is incomplete: " + problems.joined(separator: "; "))
        }
        return report
    }
}
