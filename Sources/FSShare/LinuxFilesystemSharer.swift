#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareSystem
import Synchronization
import Logging
import Tracing
import SystemPackage

/// The Linux ``FilesystemSharer``: Kata's Go layout and semantics, made crash-safe, idempotent
/// and correct on hosts whose `/` is a private mount.
///
/// ```swift
/// let sharer = try LinuxFilesystemSharer(sandboxID: "pod1", configuration: .init(root: "/run/fsshare"))
/// let storages = try await sharer.prepare()            // send in CreateSandbox
/// let c = Container(id: "web", rootfs: .hostMounted("/run/containerd/.../rootfs"))
/// let rootfs = try await sharer.shareRootFilesystem(container: c)
/// let vol = try await sharer.shareFile(container: c, mount: Mount(source: "/srv/data", destination: "/data", options: ["ro"]))
/// // vol?.guestPath == "/run/kata-containers/shared/containers/web-<16 hex>-data"
/// try await sharer.cleanup()
/// ```
///
/// One instance serves one sandbox and may be used from many tasks at once; operations on the
/// same sandbox from other processes (the `fsshare` CLI) are serialised with `flock`.
public final class LinuxFilesystemSharer: FilesystemSharer {
    /// The sandbox this sharer serves (a valid id: no `/`, not `.` or `..`).
    public let sandboxID: String
    /// The host and hypervisor settings it was made with.
    public let configuration: SharerConfiguration
    /// The sandbox's host and guest paths.
    public let layout: SandboxLayout
    /// Copy mode (`sharedFilesystem == .none`): the channel to the guest agent.
    public let agent: AgentClient?
    /// Copy mode: mirrors kubelet atomic-writer volumes shared by this sharer (shared per process).
    public let watcher: VolumeWatcher?

    /// The open sandbox tree. The mutex guards only this reference, never a system call that
    /// waits: operations are serialised by the sandbox's `flock`, taken on a descriptor of their
    /// own, which excludes other threads of this process exactly as it excludes other processes.
    private let handleState = Mutex<SandboxHandle?>(nil)
    /// The async API's queue: one operation of this sharer at a time on the ``BlockingPool``.
    private let gate = AsyncGate()
    /// What ``startFileEventWatcher()`` started: this sandbox followed on ``watcher``.
    let follower = Mutex<SandboxFollower?>(nil)

    /// Creates a sharer for one sandbox. Nothing is touched on disk until an operation runs.
    ///
    /// In copy mode (`configuration.sharedFilesystem == .none`) volumes are copied through
    /// `agent`; with a `watcher`, kubelet atomic-writer volumes are then kept in sync with it.
    ///
    /// - Parameters:
    ///   - sandboxID: the sandbox (a valid id; see `Identifier`).
    ///   - configuration: the host and hypervisor settings.
    ///   - agent: the guest agent's channel: needed for copy mode, and for pushing watched volumes.
    ///   - watcher: the process's volume watcher, for watched volumes (one serves every sandbox).
    /// - Throws: `invalidArgument` for a bad sandbox id or a relative root.
    public init(
        sandboxID: String, configuration: SharerConfiguration = SharerConfiguration(),
        agent: AgentClient? = nil, watcher: VolumeWatcher? = nil
    ) throws(FSShareError) {
        self.agent = agent
        self.watcher = watcher
        try Identifier.validate(sandboxID, what: "sandbox")
        guard configuration.root.isAbsolute, !configuration.root.string.utf8.contains(0) else {
            throw FSShareError(.invalidArgument, "the sandbox root \"\(configuration.root)\" must be an absolute path")
        }
        self.sandboxID = sandboxID
        self.configuration = configuration
        self.layout = SandboxLayout(
            root: configuration.root, sandboxID: sandboxID, guestSharedDir: configuration.guestSharedDir, style: configuration.layoutStyle)
    }

    /// What an existing sandbox's manifest records (its layout, shared filesystem and, in copy
    /// mode, agent address and guest directory), or nil when there is no fsshare sandbox of that
    /// id under `root`. Lets a tool that is not told them (`unshare`, `status`, `watch`) find them.
    ///
    /// - Parameters:
    ///   - root: the sandbox root.
    ///   - sandboxID: the sandbox.
    /// - Returns: what its manifest records, or nil when no fsshare sandbox of that id is there.
    public static func recorded(root: FilePath, sandboxID: String) -> RecordedSandbox? {
        guard Identifier.problem(sandboxID) == nil,
              let rootFD = try? Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory) else { return nil }
        defer { Sys.close(rootFD) }
        guard let fd = try? Sys.openat(DirFD(fd: rootFD, path: root), FilePath(sandboxID), flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
        else { return nil }
        defer { Sys.close(fd) }
        guard case .sandbox(let manifest) = SandboxOwnership.inspect(DirFD(fd: fd, path: root.appending(sandboxID)), sandboxID: sandboxID)
        else { return nil }
        return RecordedSandbox(manifest)
    }

    /// The sandbox-level storages (shared filesystem, shm) for `CreateSandbox`.
    public var sandboxStorages: [Storage] { Storages.sandbox(configuration) }

    // MARK: - Prepare / cleanup

    /// Creates the sandbox tree (see ``FilesystemSharer/prepare()``). Runs on the library's
    /// threads; the calling task is suspended, never blocked.
    ///
    /// - Returns: the sandbox-level storages (shared filesystem, shm) for `CreateSandbox`.
    /// - Throws: `refused` when a directory of the sandbox's name exists and is not an fsshare sandbox; `unsupported` when the kernel lacks what the mounts need; `systemCall`; `cancelled`.
    @discardableResult
    public func prepare() async throws(FSShareError) -> [Storage] {
        try await offload("Prepare") { _ throws(FSShareError) in try self.prepareSync() }
        return sandboxStorages
    }

    /// Runs a blocking body on the ``BlockingPool``, one per sharer at a time (``AsyncGate``),
    /// after checking for cancellation. Cancellation while the body runs is passed on through
    /// `cancelled` (copy mode checks it between chunks and rolls its copy back).
    ///
    /// Each operation is one trace span named as Kata names it (`ShareFile`, ...), a child of
    /// the calling task's `ServiceContext`, tagged like Kata's (see `Spans`), with the sandbox
    /// id and `attributes` (built only when a tracer records).
    func offload<T: Sendable>(
        _ span: String, attributes: @escaping @Sendable () -> [(String, String)] = { [] },
        _ body: @escaping @Sendable (CancellationFlag) throws(FSShareError) -> T
    ) async throws(FSShareError) -> T {
        await gate.enter()
        defer { gate.leave() }
        // The task-local context does not cross to the pool thread: take it here.
        let context = ServiceContext.current ?? .topLevel
        let sandbox = sandboxID
        if Task.isCancelled {
            let error = FSShareError(.cancelled, "cancelled before it started; nothing was changed")
            let refused = Spans.start(span, context: context, attributes: [("sandbox", sandbox)] + attributes())
            Spans.fail(refused, error)
            refused.end()
            throw error
        }
        let flag = CancellationFlag()
        let result: Result<T, FSShareError> = await withTaskCancellationHandler {
            do throws(FSShareError) {
                return .success(try await BlockingPool.shared.run { () throws(FSShareError) -> T in
                    try Spans.run(span, context: context, attributes: [("sandbox", sandbox)] + attributes()) { () throws(FSShareError) -> T in try body(flag) }
                })
            } catch {
                return .failure(error)
            }
        } onCancel: {
            flag.cancel()
        }
        return try result.get()
    }

    /// Runs `body` on the prepared sandbox with its lock held and its manifest read (see
    /// ``SandboxHandle/locked(_:)``). A handle whose sandbox another process cleaned up is
    /// noticed there, under the lock, from the manifest's own status (no extra check per
    /// operation); then the sandbox is looked up once more — it may have been prepared again —
    /// before `notPrepared` is thrown. `body` has not run when that happens.
    func withPreparedHandle<T>(_ body: (SandboxHandle) throws(FSShareError) -> T) throws(FSShareError) -> T {
        let h = try preparedHandle()
        do {
            return try h.locked { () throws(FSShareError) -> T in try body(h) }
        } catch {
            guard h.isStale else { throw error }
            let again = try preparedHandle()
            return try again.locked { () throws(FSShareError) -> T in try body(again) }
        }
    }

    /// The open sandbox tree, opened (and kept) if needed; throws `notPrepared` without one.
    /// Opening happens outside the mutex (it takes the sandbox's `flock` briefly). A kept
    /// handle is not re-checked here: ``SandboxHandle/locked(_:)`` finds out, under the lock,
    /// whether its sandbox is gone.
    func preparedHandle() throws(FSShareError) -> SandboxHandle {
        if let h = handleState.withLock({ $0 }), !h.isStale { return h }
        let opened = try openPrepared()
        return handleState.withLock { current in
            // Another thread may have opened it meanwhile: keep one (ours closes on deinit).
            if let other = current, !other.isStale { return other }
            current = opened
            return opened
        }
    }

    /// Copy mode: nothing is exported, so the sandbox needs its directory and manifest but no mounts.
    var copyMode: Bool { configuration.sharedFilesystem == .none }

    /// Blocking ``prepare()``, for callers on threads of their own (the CLI). In copy mode it
    /// makes the directories and the manifest only: there is nothing to export.
    ///
    /// - Throws: as ``prepare()``.
    @_spi(Blocking) public func prepareSync() throws(FSShareError) {
        if let h = handleState.withLock({ $0 }), h.isAlive,
           copyMode || (try? isMountRoot(h.sandbox, configuration.layoutStyle.exportPath)) == true { return }
        let made = try makeSandbox()
        handleState.withLock { $0 = made }
    }

    /// Removes the sandbox (see ``FilesystemSharer/cleanup()``) on the library's threads.
    ///
    /// - Throws: `refused` when the directory is not an fsshare sandbox (left alone); `incompleteCleanup` listing what is left; `cancelled`.
    public func cleanup() async throws(FSShareError) {
        try await offload("Cleanup") { _ throws(FSShareError) in _ = try self.cleanupSync() }
    }

    /// Blocking ``cleanup()``; says what it found. A directory of this name that no fsshare
    /// manifest proves to be a sandbox is refused (`FSShareError/Code/refused`) and left alone.
    ///
    /// - Returns: what it found: a sandbox cleaned, nothing, or an interrupted prepare removed.
    /// - Throws: as ``cleanup()``.
    @_spi(Blocking) @discardableResult
    public func cleanupSync() throws(FSShareError) -> CleanupOutcome {
        stopFollowing()
        handleState.withLock { $0 = nil }
        return try SandboxCleaner(root: configuration.root, sandboxID: sandboxID).run()
    }

    private func openRoot(create: Bool) throws(FSShareError) -> DirFD? {
        let root = configuration.root
        // Opened first: it exists nearly always (no statx to ask). Open for reading, so the
        // same descriptor can hold the root's flock (an O_PATH one cannot); O_PATH where
        // reading is not allowed.
        for attempt in 0..<2 {
            do {
                let fd: FileDescriptor
                do {
                    fd = try Sys.openat(nil, root, flags: O_RDONLY | Sys.oDirectory)
                } catch where error.errno == .permissionDenied {
                    fd = try Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory)
                }
                return DirFD(fd: fd, path: root)
            } catch {
                guard error.errno == .noSuchFileOrDirectory else { throw FSShareError.system("cannot open the sandbox root \(root)", error) }
                if !create { return nil }
                if attempt > 0 { throw FSShareError.system("cannot open the sandbox root \(root)", error) }
            }
            // The root is operator configuration, not guest-writable: create it like mkdir -p.
            var path = FilePath("/")
            for component in root.components {
                path.append(component)
                _ = try sys("cannot create the sandbox root \(root)") { () throws(SystemCallError) in try Sys.mkdirat(nil, path, mode: 0o755) }
            }
        }
        return nil
    }

    private func isMountRoot(_ dir: DirFD, _ name: FilePath) throws(FSShareError) -> Bool {
        try sys("cannot stat \(dir.display(name))") { () throws(SystemCallError) in try Sys.statx(dir, name).isMountRoot }
    }

    /// Builds (or finishes building) the sandbox tree, rolling back what it made on failure.
    private func makeSandbox() throws(FSShareError) -> SandboxHandle {
        var undo = Undo()
        do {
            return try makeSandbox(&undo)
        } catch {
            undo.run()
            throw error
        }
    }

    private func makeSandbox(_ undo: inout Undo) throws(FSShareError) -> SandboxHandle {
        try SandboxOwnership.requireMountPointTest()
        guard let root = try openRoot(create: true) else {
            throw FSShareError(.systemCall, "cannot open the sandbox root \(configuration.root)")
        }
        undo.add { Sys.close(root.fd) }
        let sid = FilePath(sandboxID)
        // The sandbox directory's path, built only for a message.
        let rootPath = root.path, sandboxID = sandboxID
        func sandboxPath() -> FilePath { rootPath.appending(sandboxID) }
        // A new sandbox directory appears with its manifest already inside (built aside and
        // renamed into place), so a directory without one is never fsshare's.
        // What later commands and the node's watcher need to know without being told. The
        // shared filesystem, the guest directory and the agent (copy mode's channel; with a
        // shared filesystem, where `fsshare watch` pushes the watchable mirrors). A new
        // sandbox's manifest is written with them; an existing one gets what changed, below.
        let fsName = configuration.sharedFilesystem.name
        var settings: [(key: String, value: String)] = [(RecordedSandbox.sharedFilesystemKey, fsName), (RecordedSandbox.guestDirectoryKey, configuration.guestSharedDir)]
        if let agent { settings.append((RecordedSandbox.agentKey, agent.address.description)) }
        let made = try SandboxOwnership.createSandboxDirectory(root, sandboxID: sandboxID, style: configuration.layoutStyle, settings: settings)
        let created = made != nil
        let lock: FileDescriptor
        if let made {
            lock = made.directory
        } else {
            do {
                lock = try Sys.openat(root, sid, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow)
            } catch {
                if error.errno == .tooManySymbolicLinkLevels || error.errno == .notDirectory {
                    throw FSShareError(.refused, "refusing to use \(sandboxPath()) as sandbox \(sandboxID): it is not a directory (a symbolic link or a file); it was left alone")
                }
                throw FSShareError.system("cannot open \(sandboxPath())", error)
            }
        }
        undo.add { Sys.close(lock) }
        // A directory this call made is locked already (since before it had its name).
        if made == nil {
            try sys("cannot lock \(sandboxPath())") { () throws(SystemCallError) in try Sys.flock(lock, operation: LOCK_EX, path: sandboxPath()) }
        }
        defer { try? Sys.flock(lock, operation: LOCK_UN, path: sandboxPath()) }

        // Adopt the directory only if a manifest proves it is ours: an operator's folder of the
        // same name, even an empty one, is never touched. One this call made is proven already,
        // and its manifest is current: it was written under the sandbox's lock, held since.
        let manifest: Manifest
        if let made {
            manifest = made.manifest
        } else {
            switch SandboxOwnership.inspect(DirFD(fd: lock, in: rootPath, name: sandboxID), sandboxID: sandboxID) {
            case .sandbox(let existing):
                manifest = existing
            case .foreign(let why):
                throw FSShareError(.refused, "refusing to use \(sandboxPath()) as sandbox \(sandboxID): it exists and is not an fsshare sandbox (\(why)); it was left alone")
            }
        }
        if created {
            // Rolled back after the subdirectories (undo runs newest first).
            // Back to its preparing name first: a sandbox directory never exists without its
            // manifest, even if this rollback is cut short.
            let sandboxID = sandboxID
            undo.add {
                try? Sys.renameat(root, sid, root, SandboxOwnership.preparingName(sandboxID), noReplace: true)
                _ = try? SandboxOwnership.removeInterruptedPrepare(root, sandboxID: sandboxID)
            }
        }

        // Make the sandbox directory a mount of its own with shared propagation, in a new peer
        // group: then binds under mounts/ propagate to shared/ and to virtiofsd's slave
        // namespace even where / is private (this machine; Kata's Prepare propagates nothing
        // there), and they propagate nowhere else on hosts where /run is shared.
        // The self-bind's root, when made here with the new mount API: it is the `top` below.
        var selfBindTop: FileDescriptor?
        // The new mount API unless the configuration asks for mount(2) only (the fallback for
        // kernels without it, kept tested that way).
        let prepareWithNewAPI = !copyMode && configuration.mountMethod != .legacy && MountOps.hasNewMountAPI()
        if !copyMode {
            // A directory this call created (under the root's lock, now held under the sandbox's)
            // cannot be a mount point yet: no statx to ask.
            var needsSelfBind = created
            if !created { needsSelfBind = try !isMountRoot(root, sid) }
            if needsSelfBind && prepareWithNewAPI {
                // A detached private copy of the directory attached onto itself, then made shared
                // there: a peer group of its own. By descriptor and name (no /proc/self/fd path
                // lookups), and its root is kept as the sandbox's `top`.
                let tree = try sys("cannot make a private copy of the sandbox directory \(sandboxPath())") { () throws(SystemCallError) in
                    try Sys.openTreeClone(lock, recursive: false, readOnly: false, propagation: UInt(MS_PRIVATE), display: sandboxPath())
                }
                undo.add { Sys.close(tree) }
                try sys("cannot bind the sandbox directory \(sandboxPath()) onto itself") { () throws(SystemCallError) in
                    try Sys.moveMount(tree, onto: root, named: sandboxID)
                }
                undo.add { _ = try? MountOps.unmountAll(root, sid) }
                // Once attached, the clone's descriptor is the root of the very mount just made
                // there: nothing to reopen and check (it cannot be a substitute).
                selfBindTop = tree
                try sys("cannot make \(sandboxPath()) a shared mount") { () throws(SystemCallError) in
                    try Sys.mountSetattr(tree, readOnly: false, recursive: false, propagation: UInt(MS_SHARED), display: sandboxPath())
                }
            } else if needsSelfBind {
                try sys("cannot bind the sandbox directory \(sandboxPath()) onto itself") { () throws(SystemCallError) in
                    try Sys.mount(source: MountOps.fdPath(lock), target: MountOps.fdPath(lock), flags: UInt(MS_BIND))
                }
                undo.add { _ = try? MountOps.unmountAll(root, sid) }
                let selfBind = try MountOps.mountRoot(root, sid)
                defer { Sys.close(selfBind) }
                try sys("cannot make \(sandboxPath()) a shared mount") { () throws(SystemCallError) in
                    try Sys.mount(source: nil, target: MountOps.fdPath(selfBind), flags: UInt(MS_PRIVATE))
                    try Sys.mount(source: nil, target: MountOps.fdPath(selfBind), flags: UInt(MS_SHARED))
                }
            } else {
                // Left by an earlier prepare (or made by the operator): make sure it propagates.
                let selfBind = try MountOps.mountRoot(root, sid)
                defer { Sys.close(selfBind) }
                try sys("cannot make \(sandboxPath()) a shared mount") { () throws(SystemCallError) in
                    try Sys.mount(source: nil, target: MountOps.fdPath(selfBind), flags: UInt(MS_SHARED))
                }
            }
        }
        // Re-open through the self-bind: descriptors opened before it point below it.
        let top: FileDescriptor
        if let selfBindTop {
            top = selfBindTop
        } else {
            top = try sys("cannot open \(sandboxPath())") { () throws(SystemCallError) in
                try Sys.openat(root, sid, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
            }
            undo.add { Sys.close(top) }
        }
        let sandbox = DirFD(fd: top, in: rootPath, name: sandboxID)
        // Copy mode and a shared filesystem are different trees: a sharer configured for the
        // other one is refused rather than allowed to turn one into the other.
        if let recordedFS = manifest.settings[RecordedSandbox.sharedFilesystemKey], (recordedFS == "none") != copyMode {
            throw FSShareError(.conflict, "sandbox \(sandboxID) was prepared with shared filesystem \(recordedFS); this sharer is configured for \(fsName)")
        }
        // One journal append for what changed (nothing, for a sandbox made just now). A
        // recorded shared filesystem is kept (the check above refused a different kind).
        if manifest.settings[RecordedSandbox.sharedFilesystemKey] != nil { settings.removeAll { $0.key == RecordedSandbox.sharedFilesystemKey } }
        try manifest.recordSettings(settings)
        let style = configuration.layoutStyle
        guard manifest.style == style else {
            throw FSShareError(.conflict, "sandbox \(sandboxID) was prepared with Kata's \(manifest.style.rawValue) layout; this sharer is configured for \(style.rawValue)")
        }
        /// fsshare's own directory `dir/name` (a symlink planted there is replaced), rolled
        /// back if this prepare made it and fails.
        func ownDirectory(_ dir: DirFD, _ name: FilePath, mode: mode_t) throws(FSShareError) -> (dir: DirFD, created: Bool) {
            let entry = try MountOps.ownEntry(dir, name, directory: true, mode: mode)
            undo.add { Sys.close(entry.fd) }
            if entry.created { undo.add { try? Sys.unlinkat(dir, name, directory: true) } }
            return (DirFD(fd: entry.fd, below: dir, name: name.string), entry.created)
        }
        // Go: mounts/ is exported through shared/. runtime-rs: rw/ is exported through ro/, and
        // shares go to rw/passthrough/.
        let exportSource = try ownDirectory(sandbox, style.exportSourcePath, mode: 0o750).dir
        let mounts = style == .go ? exportSource : try ownDirectory(exportSource, "passthrough", mode: 0o750).dir
        let exportName = style.exportPath
        // Built only for a message.
        func sharedShown() -> FilePath { sandbox.display(exportName) }
        // With the new mount API the export is attached by name (no descriptor of it needed).
        var export: DirFD?
        let exportCreated: Bool
        if prepareWithNewAPI {
            let made = try MountOps.ownMountPoint(sandbox, named: exportName.string, directory: true, mode: 0o700)
            if made.created { undo.add { try? Sys.unlinkat(sandbox, exportName, directory: true) } }
            if let fd = made.fd {
                undo.add { Sys.close(fd) }
                export = DirFD(fd: fd, below: sandbox, name: exportName.string)
            }
            exportCreated = made.created
        } else {
            let made = try ownDirectory(sandbox, exportName, mode: 0o700)
            export = made.dir
            exportCreated = made.created
        }
        // private/ is only entered by legacy read-only shares: made here, opened on first use.
        let staging = try MountOps.ownMountPoint(sandbox, named: SandboxHandle.stagingName.string, directory: true, mode: 0o750)
        if staging.created { undo.add { try? Sys.unlinkat(sandbox, SandboxHandle.stagingName, directory: true) } }
        if let fd = staging.fd { Sys.close(fd) }
        var ownStatus: FileStatus?
        if !copyMode {
            // A directory this prepare just made is not a mount point: no statx to ask.
            var needsBind = exportCreated
            if !exportCreated { needsBind = try !isMountRoot(sandbox, exportName) }
            // True when the export was bound here from mounts/' own descriptor.
            var boundFromDescriptor = false
            if needsBind && prepareWithNewAPI {
                // A clone of mounts/ (a peer of the sandbox's group), read-only before it is
                // attached, then made a slave once there: the same propagation as the bind,
                // slave and remount below, by descriptor and name, no /proc/self/fd lookups.
                let tree = try sys("cannot make a read-only copy of \(exportSource.path) for \(sharedShown())") { () throws(SystemCallError) in
                    try Sys.openTreeClone(exportSource.fd, recursive: false, readOnly: true, propagation: 0, display: exportSource.path)
                }
                defer { Sys.close(tree) }
                try sys("cannot bind \(exportSource.path) onto \(sharedShown())") { () throws(SystemCallError) in
                    try Sys.moveMount(tree, onto: sandbox, named: exportName.string)
                }
                undo.add { _ = try? MountOps.unmountAll(sandbox, exportName) }
                try sys("cannot make \(sharedShown()) a read-only slave") { () throws(SystemCallError) in
                    try Sys.mountSetattr(tree, readOnly: false, recursive: false, propagation: UInt(MS_SLAVE), display: sharedShown())
                }
                boundFromDescriptor = true
            } else if needsBind, let export {
                try sys("cannot bind \(exportSource.path) onto \(sharedShown())") { () throws(SystemCallError) in
                    try Sys.mount(source: MountOps.fdPath(exportSource.fd), target: MountOps.fdPath(export.fd), flags: UInt(MS_BIND))
                }
                undo.add { _ = try? MountOps.unmountAll(sandbox, exportName) }
                let shared = try MountOps.mountRoot(sandbox, exportName)
                defer { Sys.close(shared) }
                // Slave: receives every bind made under the mounts directory, sends nothing back.
                // Read-only: the guest can never create, rename or replace anything at the top
                // of the export.
                try sys("cannot make \(sharedShown()) a read-only slave") { () throws(SystemCallError) in
                    try Sys.mount(source: nil, target: MountOps.fdPath(shared), flags: UInt(MS_SLAVE))
                    try Sys.mount(source: nil, target: MountOps.fdPath(shared), flags: UInt(MS_BIND | MS_REMOUNT | MS_RDONLY))
                }
            }
            let own = try sys("cannot stat \(exportSource.path)") { () throws(SystemCallError) in
                try Sys.fstatx(exportSource.fd, path: exportSource.path)
            }
            ownStatus = own
            // The export must show this very directory: if it was swapped for another one,
            // new shares would silently never reach the guest. One cloned from mounts/' own
            // descriptor just now shows it by construction.
            if !boundFromDescriptor {
                let exported = try sys("cannot stat \(sharedShown())") { () throws(SystemCallError) in try Sys.statx(sandbox, exportName) }
                guard SourceCheck.RootGuard.Identity(exported) == SourceCheck.RootGuard.Identity(own) else {
                    throw FSShareError(.conflict, "\(sharedShown()) does not export \(exportSource.path) (the directory was replaced after prepare); run cleanup for sandbox \(sandboxID) and prepare it again")
                }
            }
        }
        // Go layout: mounts/ is the export's source, whose status was just taken.
        let mountsID: UInt64
        if style == .go, let ownStatus {
            mountsID = ownStatus.mountID
        } else {
            mountsID = try sys("cannot stat \(mounts.path)") { () throws(SystemCallError) in try Sys.statx(mounts, "").mountID }
        }
        if let export { Sys.close(export.fd) }
        if style != .go { Sys.close(exportSource.fd) }
        let handle = SandboxHandle(
            root: root, lock: lock, sandbox: sandbox, mounts: mounts, manifest: manifest,
            mountsMountID: mountsID)
        undo.commit()
        return handle
    }

    /// The handle of a prepared sandbox (opened on first use, reopened if another process
    /// cleaned up and re-prepared it). Throws `FSShareError/Code/notPrepared` otherwise.
    private func openPrepared() throws(FSShareError) -> SandboxHandle {
        let notPrepared = FSShareError(.notPrepared, "sandbox \(sandboxID) is not prepared under \(configuration.root)")
        guard let root = try openRoot(create: false) else { throw notPrepared }
        let sid = FilePath(sandboxID)
        let exported = copyMode
            ? (try? MountOps.statBeneath(root, sid.appending(Manifest.fileName.string))) != nil
            : (try? MountOps.statBeneath(root, sid.pushing(configuration.layoutStyle.exportPath)))?.isMountRoot == true
        guard exported else {
            Sys.close(root.fd)
            throw notPrepared
        }
        Sys.close(root.fd)
        return try makeSandbox()
    }

    // MARK: - Volumes

    /// Shares a container's bind mount (see ``FilesystemSharer/shareFile(container:mount:)``) on
    /// the library's threads. Cancelled during a copy-mode copy, the partial guest copy and its
    /// record are removed and `cancelled` is thrown.
    ///
    /// - Parameters:
    ///   - container: the container the mount belongs to.
    ///   - mount: the OCI mount; `ro` makes the share read-only, in the guest too.
    /// - Returns: the guest path and storages, or nil for a mount that is not a host bind.
    /// - Throws: `notPrepared`; `refused` for a source that must never be shared (under /proc or /sys, the sandbox root, a device); `conflict` when the mount point is shared from another source; `agent` (copy mode); `cancelled`; `systemCall`.
    public func shareFile(container: Container, mount: Mount) async throws(FSShareError) -> SharedFile? {
        try await offload("ShareFile", attributes: { [("container", container.id), ("mount.source", mount.source.string), ("mount.destination", mount.destination.string)] }) { (flag) throws(FSShareError) in
            try self.shareFileSync(container: container, mount: mount, cancellation: flag)
        }
    }

    /// Blocking ``shareFile(container:mount:)``.
    ///
    /// - Parameters:
    ///   - container: the container the mount belongs to.
    ///   - mount: the OCI mount.
    /// - Returns: as ``shareFile(container:mount:)``.
    /// - Throws: as ``shareFile(container:mount:)``, except `cancelled`.
    @_spi(Blocking) public func shareFileSync(container: Container, mount: Mount) throws(FSShareError) -> SharedFile? {
        try shareFileSync(container: container, mount: mount, cancellation: nil)
    }

    func shareFileSync(container: Container, mount: Mount, cancellation: CancellationFlag?) throws(FSShareError) -> SharedFile? {
        guard mount.type == "bind" else { return nil }
        // Normalised once, and only when it is not normal already (the common case).
        let given = mount.destination.string
        let destination = ShareNaming.isNormal(given) ? given : mount.destination.lexicallyNormalized().string
        guard destination != "/dev/shm" else { return nil }
        try Identifier.validate(container.id, what: "container")
        let name = try ShareNaming.volumeName(containerID: container.id, destination: mount.destination, text: given, style: configuration.layoutStyle)
        let record = ShareRecord(
            name: name, kind: .volume, containerID: container.id, source: mount.source.string,
            destination: destination, readOnly: mount.isReadOnly,
            recursive: mount.isRecursive, isFile: false)
        let method = configuration.mountMethod
        let policy = configuration.sourceSymlinks
        let copyMode = configuration.sharedFilesystem == .none
        return try withPreparedHandle { (h) throws(FSShareError) -> SharedFile in
                if copyMode { return try copyShare(record, handle: h, policy: policy, cancellation: cancellation) }
                var proposed = record
                var fallback: String?
                // Looked up once, here, for both the watchable check and the share.
                let existing = h.manifest.shares[name]
                if existing == nil {
                    (proposed.watched, fallback) = try watchable(mount.source, text: record.source, handle: h, policy: policy)
                }
                let made = try share(proposed, existing: existing, in: h.mounts, handle: h, method: method, policy: policy)
                let resolved = made.resolvedSource.map { FilePath($0) }
                guard made.watched else {
                    return SharedFile(guestPath: layout.guestPath(name), resolvedSource: resolved, watchableFallback: fallback)
                }
                // Kata's runtime rewrites the container's mount source to the mirror.
                let mirror = layout.watchableGuestPath(name)
                let storage = WatchableVolumes.storage(shareGuestPath: layout.guestPath(name), mirrorGuestPath: mirror, options: mount.options)
                if let agent {
                    // The agent makes the first copy when it gets the storage: no first sync.
                    registerWatched(name: name, volume: FilePath(made.source), guestPath: mirror, agent: agent, state: nil, watchable: true, firstSync: false)
                }
                return SharedFile(guestPath: mirror, volumeStorages: [storage], resolvedSource: resolved)
        }
    }

    /// Whether a new share of `source` gets a `watchable-bind` mirror, and if it is a kubelet
    /// volume that does not, why. Makes `mounts/watchable/` (the agent covers its guest view
    /// with a tmpfs; the read-only export cannot get it later).
    private func watchable(_ source: FilePath, text: String, handle h: SandboxHandle, policy: SourceSymlinkPolicy) throws(FSShareError) -> (Bool, String?) {
        // The path as given (as Kata matches it); resolving every source to look again would
        // cost each share an extra open. A symlinked kubelet root still matches once the
        // opened path is checked below.
        guard KubeletVolume.mayName(text),
              KubeletVolume.match(source) != nil || source.components.contains(where: { KubeletVolume.plugins.contains($0.string) }) else {
            return (false, nil)
        }
        guard let limits = configuration.watchableLimits else {
            return (false, "watchable mirrors are turned off: the guest sees the plain share, where updates raise no inotify event")
        }
        let opened = try SourceCheck.open(source, policy: policy, rootGuard: try h.rootGuard())
        defer { Sys.close(opened.fd) }
        guard opened.kind == .directory, KubeletVolume.match(source) != nil || KubeletVolume.match(opened.path) != nil else { return (false, nil) }
        if let over = try WatchableVolumes.overLimit(DirFD(fd: opened.fd, path: opened.path), limits: limits) {
            return (false, "\(opened.path) has \(over): shared without a watchable mirror, so updates raise no inotify event in the guest")
        }
        let dir = try MountOps.ownEntry(h.mounts, WatchableVolumes.directoryName, directory: true, mode: 0o750)
        Sys.close(dir.fd)
        return (true, nil)
    }

    /// Undoes ``shareFile(container:mount:)`` on the library's threads.
    ///
    /// - Parameters:
    ///   - container: the container the mount belongs to.
    ///   - mount: the mount as it was shared (its destination names the share).
    /// - Throws: `invalidArgument` for a bad container id; `incompleteCleanup` when the mount cannot be removed; `agent` (copy mode); `cancelled`.
    public func unshareFile(container: Container, mount: Mount) async throws(FSShareError) {
        try await offload("UnshareFile", attributes: { [("container", container.id), ("mount.destination", mount.destination.string)] }) { _ throws(FSShareError) in
            _ = try self.unshareFileSync(container: container, mount: mount)
        }
    }

    /// Blocking ``unshareFile(container:mount:)``; says what became of the share.
    ///
    /// - Parameters:
    ///   - container: the container the mount belongs to.
    ///   - mount: the mount as it was shared.
    /// - Returns: what became of the share.
    /// - Throws: as ``unshareFile(container:mount:)``, except `cancelled`.
    @_spi(Blocking) @discardableResult
    public func unshareFileSync(container: Container, mount: Mount) throws(FSShareError) -> UnshareOutcome {
        guard mount.type == "bind" else { return .removed }
        try Identifier.validate(container.id, what: "container")
        let name = try ShareNaming.volumeName(containerID: container.id, destination: mount.destination, style: configuration.layoutStyle)
        return try unshareSync(name: name)
    }

    /// Removes the share recorded under `name` (a volume name or `<cid>/rootfs`), on the
    /// library's threads. Not an error if it does not exist or the sandbox is already gone.
    ///
    /// - Returns: what became of it (a copy Kata's agent cannot remove stays in the guest).
    ///
    /// - Parameter name: the share's recorded name.
    /// - Throws: as ``unshareFile(container:mount:)``.
    @discardableResult
    public func unshare(name: String) async throws(FSShareError) -> UnshareOutcome {
        try await offload("UnshareFile", attributes: { [("share.name", name)] }) { _ throws(FSShareError) in try self.unshareSync(name: name) }
    }

    /// Blocking ``unshare(name:)``.
    ///
    /// - Parameter name: the share's recorded name.
    /// - Returns: what became of it.
    /// - Throws: as ``unshare(name:)``, except `cancelled`.
    @_spi(Blocking) @discardableResult
    public func unshareSync(name: String) throws(FSShareError) -> UnshareOutcome {
        do throws(FSShareError) {
            return try withPreparedHandle { (h) throws(FSShareError) -> UnshareOutcome in try unshareLocked(name, handle: h) }
        } catch {
            // No sandbox (never prepared, or cleaned up meanwhile): nothing is shared.
            if error.code == .notPrepared { return .removed }
            throw error
        }
    }

    private func unshareLocked(_ name: String, handle h: SandboxHandle) throws(FSShareError) -> UnshareOutcome {
        let record = h.manifest.shares[name]
        if let record {
            switch record.kind {
            case .copy: return try removeCopy(record, handle: h)
            case .rootfsLayers:
                try removeLayeredRootfs(record, handle: h)
                return .removed
            case .layer:
                let users = LinuxFilesystemSharer.layerUsers(name, in: h.manifest)
                guard users.isEmpty else {
                    throw FSShareError(.conflict, "layer \(name) (\(record.source)) is in use by the rootfs of \(users.joined(separator: ", ")); unshare those first")
                }
            default: break
            }
        }
        if record?.watched == true { watcher?.unwatch(sandboxID: sandboxID, name: name) }
        try removeShare(name, record: record, handle: h)
        return .removed
    }

    /// The shares the manifest records, with whether each is mounted right now (read on the
    /// library's threads).
    ///
    /// - Returns: every recorded share, in the order they were made.
    /// - Throws: `notPrepared`; `manifest` for an unreadable manifest; `cancelled`.
    public func shares() async throws(FSShareError) -> [ShareState] {
        try await offload("Shares") { _ throws(FSShareError) in try self.sharesSync() }
    }

    /// Blocking ``shares()``.
    ///
    /// - Returns: as ``shares()``.
    /// - Throws: as ``shares()``, except `cancelled`.
    @_spi(Blocking) public func sharesSync() throws(FSShareError) -> [ShareState] {
        return try withPreparedHandle { (h) throws(FSShareError) in
            return h.manifest.orderedShares.map { r in
                ShareState(record: r, mounted: (try? MountOps.statBeneath(h.mounts, FilePath(r.name)).isMountRoot) ?? false)
            }
        }
    }

    // MARK: - Mechanics (called with both locks held)

    /// Shares `record.source` at `dir/<last component of record.name>`; idempotent, and a
    /// share recorded by a process that died before finishing it is finished.
    func share(_ record: ShareRecord, in dir: DirFD, handle h: SandboxHandle, method: MountMethod, policy: SourceSymlinkPolicy) throws(FSShareError) -> ShareRecord {
        try share(record, existing: h.manifest.shares[record.name], in: dir, handle: h, method: method, policy: policy)
    }

    /// ``share(_:in:handle:method:policy:)`` with what the journal holds under the record's
    /// name already looked up (it decides whether to append).
    func share(_ record: consuming ShareRecord, existing: ShareRecord?, in dir: DirFD, handle h: SandboxHandle, method: MountMethod, policy: SourceSymlinkPolicy) throws(FSShareError) -> ShareRecord {
        // A volume's name is one component already; only `<cid>/rootfs` needs splitting.
        let leaf = !withUTF8Bytes(record.name, { $0.containsByte(UInt8(ascii: "/")) }) ? record.name
            : FilePath(record.name).lastComponent?.string ?? record.name
        var record = record
        if let existing {
            guard existing.source == record.source, existing.readOnly == record.readOnly,
                  existing.recursive == record.recursive, existing.kind == record.kind
            else {
                throw FSShareError(.conflict, "\(record.destination) of container \(record.containerID) is already shared from \(existing.source) (\(existing.readOnly ? "ro" : "rw")\(existing.recursive ? ", recursive" : "")); unshare it first")
            }
            // A missing mount point is a share recorded by a process that died before making it.
            if let st = try? Sys.statx(dir, FilePath(leaf)), st.isMountRoot { return existing }
            record = existing  // recorded but not mounted: the process died in between; finish it.
        }
        let source = try SourceCheck.open(text: record.source, policy: policy, rootGuard: try h.rootGuard())
        // The clone the new mount API attaches is closed with the source (one call, when
        // their numbers are adjacent).
        var attached: FileDescriptor?
        defer {
            if let attached { Sys.close(source.fd, attached) } else { Sys.close(source.fd) }
        }
        record.isFile = source.kind == .regular
        record.resolvedSource = source.resolvedThroughSymlinks?.string
        if existing != record {
            try h.manifest.recordShare(record)
        }
        // Rolled back newest first on failure: the mount point if this call made it, then the record.
        do throws(FSShareError) {
            let (target, created) = try MountOps.ownMountPoint(dir, named: leaf, directory: !record.isFile, mode: 0o755)
            defer { if let target { Sys.close(target) } }
            do throws(FSShareError) {
                attached = try MountOps.attach(
                    source: source.fd, sourcePath: source.path, target: target, dir: dir, name: leaf, staging: { () throws(FSShareError) in try h.staging() },
                    isFile: record.isFile, readOnly: record.readOnly, recursive: record.recursive, method: method)
            } catch {
                if created { try? MountOps.removeMountPoint(dir, FilePath(leaf)) }
                throw error
            }
        } catch {
            try? h.manifest.recordRemoval(record.name)
            throw error
        }
        return record
    }

    func makeBlockRootfsDirectories(_ record: ShareRecord, suffix: String, handle h: SandboxHandle) throws(FSShareError) {
        if h.manifest.shares[record.name] != record { try h.manifest.recordShare(record) }
        let cid = try MountOps.ownEntry(h.mounts, FilePath(record.name), directory: true, mode: 0o750)
        defer { Sys.close(cid.fd) }
        if !suffix.isEmpty {
            let dir = DirFD(fd: cid.fd, path: h.mounts.display(FilePath(record.name)))
            let inner = try MountOps.ownEntry(dir, FilePath(suffix), directory: true, mode: 0o750)
            Sys.close(inner.fd)
        }
    }

    /// Unmounts and removes a share and forgets it. Missing pieces are fine (idempotent).
    func removeShare(_ name: String, handle h: SandboxHandle) throws(FSShareError) {
        try removeShare(name, record: h.manifest.shares[name], handle: h)
    }

    /// ``removeShare(_:handle:)`` with the manifest's record of `name` (or nil) already looked up.
    func removeShare(_ name: String, record: ShareRecord?, handle h: SandboxHandle) throws(FSShareError) {
        // Volumes are one component below mounts/; rootfs is <cid>/rootfs; block rootfs <cid>[/suffix].
        // A volume's name (no slash, not a dot name) needs no path parsing.
        let plain = withUTF8Bytes(name) { b in
            !b.isEmpty && !(b.count <= 2 && b.allSatisfy { $0 == UInt8(ascii: ".") }) && !b.containsByte(UInt8(ascii: "/")) && !b.containsByte(0)
        }
        if plain, record?.kind != .rootfsHostImage,
           try sys("cannot unmount \(h.mounts.display(FilePath(name)))", { () throws(SystemCallError) in
               try MountOps.unmountAndRemove(h.mounts, named: name, isFile: record?.isFile ?? false)
           }) {
            // The common case: one umount2 and one rmdir (anything unusual takes the path below).
            try h.manifest.recordRemoval(name)
            return
        }
        let components = Array(FilePath(name).components)
        guard !components.isEmpty, components.count <= 2, components.allSatisfy({ $0.kind == .regular }) else {
            throw FSShareError(.invalidArgument, "\"\(name)\" is not a share name")
        }
        var parent = h.mounts
        var opened: FileDescriptor?
        defer { if let opened { Sys.close(opened) } }
        if components.count == 2 {
            let first = FilePath(components[0].string)
            do {
                let fd = try Sys.openat(h.mounts, first, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
                opened = fd
                parent = DirFD(fd: fd, path: h.mounts.display(first))
            } catch {
                switch error.errno {
                case .noSuchFileOrDirectory: break
                case .tooManySymbolicLinkLevels, .notDirectory:
                    // Not fsshare's directory (a planted symlink or file): nothing of ours is
                    // reachable through it. Remove a symlink without following it.
                    try MountOps.removePlantedSymlink(h.mounts, first)
                default:
                    throw FSShareError.system("cannot open \(h.mounts.display(first))", error)
                }
                try h.manifest.recordRemoval(name)
                return
            }
        }
        let leaf = FilePath(components[components.count - 1].string)
        if record?.kind == .rootfsDirectory, let suffix = record?.destination, !suffix.isEmpty {
            // Block rootfs: <cid>/<suffix> then <cid>; plain directories, never mounts.
            let fd = try? Sys.openat(h.mounts, leaf, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
            if let fd {
                defer { Sys.close(fd) }
                try MountOps.removeMountPoint(DirFD(fd: fd, path: h.mounts.display(leaf)), FilePath(suffix))
            }
            try MountOps.removeMountPoint(h.mounts, leaf)
            try h.manifest.recordRemoval(name)
            return
        }
        let left = try sys("cannot unmount \(parent.display(leaf))") { () throws(SystemCallError) in try MountOps.unmountAllReporting(parent, leaf) }
        if let record, record.kind == .rootfsHostImage { try HostImageLoop.release(record) }
        if components.count == 1, let status = left.status {
            // A volume sits directly in mounts/: what unmountAll saw last, and the mount id of
            // mounts/ the handle keeps, are all removeMountPoint needs.
            try MountOps.removeMountPoint(parent, leaf, status: status, parentMountID: h.mountsMountID)
        } else if components.count == 2 {
            try MountOps.removeMountPoint(parent, leaf)
        }
        if components.count == 2 {
            // The per-container directory goes when its last entry does.
            do {
                try Sys.unlinkat(h.mounts, FilePath(components[0].string), directory: true)
            } catch {
                if error.errno != .directoryNotEmpty && error.errno != .noSuchFileOrDirectory {
                    throw FSShareError.system("cannot remove \(h.mounts.display(FilePath(components[0].string)))", error)
                }
            }
        }
        try h.manifest.recordRemoval(name)
    }
}
