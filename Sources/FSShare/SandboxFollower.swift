#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import FSShareWatch
import Logging
import Synchronization
import SystemPackage

/// Keeps a `VolumeWatcher` mirroring what sandbox manifests record: every watched copy-mode
/// volume and every shared-filesystem volume with a `watchable-bind` mirror, for one sandbox
/// (``follow(root:sandboxID:agent:)``) or for every sandbox under a root, now and as they are
/// prepared (``followRoot(_:)``). Shares added or removed later, by any process, are picked up
/// from the manifest; a sandbox cleaned up is dropped. This is what `fsshare watch` runs: one
/// process, on the watcher's single inotify instance, for the whole node.
///
/// Each sandbox's volumes go to the agent its manifest records, unless one was given. The
/// follower holds the watcher; the watcher holds the follower only weakly, so dropping the
/// follower (or ``stop()``) ends the following. Stopping the watcher first is fine too.
public final class SandboxFollower: Sendable {
    /// The watcher the followed volumes are registered with.
    public let watcher: VolumeWatcher

    /// Connections opened at most to one agent address, shared by the sandboxes that name it.
    public static let connectionsPerAgent = 4

    struct Followed {
        let root: FilePath
        let sandboxID: String
        /// The agent given; nil: the one the sandbox's manifest records.
        let agent: AgentClient?
        let dir: DirFD
        let observation: VolumeWatcher.Observation
        /// The client dealt to this sandbox for its recorded agent (kept across reloads).
        var client: AgentClient?
    }

    struct State: ~Copyable {
        var followed: [String: Followed] = [:]
        var roots: [FilePath: (fd: FileDescriptor, observation: VolumeWatcher.Observation)] = [:]
        /// Clients per recorded agent address, and how many sandboxes were handed one.
        var agents: [String: (clients: [AgentClient], handedOut: Int)] = [:]
        var stopped = false
    }

    private let state = Mutex(State())

    /// A follower for `watcher` (which must be started before anything is followed). Clients
    /// made for recorded agent addresses use the watcher's `agentCallTimeout`.
    ///
    /// - Parameter watcher: the watcher volumes are registered with.
    public init(watcher: VolumeWatcher) {
        self.watcher = watcher
    }

    deinit { stop() }

    static func key(_ root: FilePath, _ sandboxID: String) -> String { root.string + "\u{0}" + sandboxID }

    /// The sandboxes followed, as `root/sandbox` paths.
    public var followedSandboxes: [String] {
        state.withLock { s in s.followed.values.map { $0.root.appending($0.sandboxID).string }.sorted() }
    }

    private func log(_ message: String, level: Logger.Level = .info, sandbox: String? = nil) {
        watcher.log(message, level: level, sandbox: sandbox)
    }

    // MARK: - Following

    /// Follows every sandbox under `root`, now and as they are prepared (prepare renames a
    /// complete sandbox in, so its manifest is there when it appears); sandboxes cleaned up are
    /// dropped. A directory that is not a sandbox (no manifest of ours) is never followed.
    ///
    /// - Parameter root: the sandbox root.
    /// - Throws: `systemCall` when the root cannot be opened, listed or watched; `notPrepared` when the watcher is not started.
    public func followRoot(_ root: FilePath) throws(FSShareError) {
        let fd = try sys("cannot open the sandbox root \(root)") { () throws(SystemCallError) in
            try Sys.openat(nil, root, flags: Sys.oPath | Sys.oDirectory)
        }
        let observation: VolumeWatcher.Observation
        do throws(FSShareError) {
            observation = try watcher.observe(MountOps.fdPath(fd), mask: UInt32(IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM)) { [weak self] e in
                self?.rootEvent(e, root: root)
            }
        } catch {
            Sys.close(fd)
            throw error
        }
        let kept = state.withLock { s -> Bool in
            guard !s.stopped, s.roots[root] == nil else { return false }
            s.roots[root] = (fd, observation)
            return true
        }
        guard kept else {
            watcher.stopObserving(observation)
            Sys.close(fd)
            return
        }
        try rescan(root, fd: fd)
        log("following every sandbox under \(root)")
    }

    /// Follows sandbox `sandboxID` under `root`: mirrors the watched volumes its manifest
    /// records through `agent` (nil: the agent the manifest records), and re-reads the
    /// manifest whenever it changes. Every volume gets a full resync on start, so a restarted
    /// watcher brings the guest back in line.
    ///
    /// - Parameters:
    ///   - root: the sandbox root.
    ///   - sandboxID: the sandbox.
    ///   - agent: the agent to push through; nil: the one the manifest records.
    /// - Throws: `invalidArgument` for a bad id; `notPrepared` without a manifest or a started watcher; `limitExceeded` when inotify's watch limit stops a volume; `systemCall`.
    public func follow(root: FilePath, sandboxID: String, agent: AgentClient?) throws(FSShareError) {
        try Identifier.validate(sandboxID, what: "sandbox")
        let key = SandboxFollower.key(root, sandboxID)
        if state.withLock({ $0.followed[key] != nil }) { return }
        let path = root.appending(sandboxID)
        let fd = try sys("cannot open the sandbox directory \(path)") { () throws(SystemCallError) in
            try Sys.openat(nil, path, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
        }
        let observation: VolumeWatcher.Observation
        do throws(FSShareError) {
            observation = try watcher.observe(MountOps.fdPath(fd), mask: UInt32(IN_MODIFY | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF)) { [weak self] e in
                self?.sandboxEvent(e, root: root, sandboxID: sandboxID)
            }
        } catch {
            Sys.close(fd)
            throw error
        }
        let f = Followed(root: root, sandboxID: sandboxID, agent: agent, dir: DirFD(fd: fd, path: path), observation: observation)
        let kept = state.withLock { s -> Bool in
            guard !s.stopped, s.followed[key] == nil else { return false }
            s.followed[key] = f
            return true
        }
        guard kept else {
            watcher.stopObserving(observation)
            Sys.close(fd)
            return
        }
        do {
            try reloadOrThrow(key)
        } catch {
            unfollow(key, quietly: true)
            throw error
        }
    }

    /// Stops following every sandbox and root (their volumes stay watched until the watcher
    /// stops or unwatches them). Idempotent.
    public func stop() {
        let (followed, roots) = state.withLock { s -> ([Followed], [(fd: FileDescriptor, observation: VolumeWatcher.Observation)]) in
            s.stopped = true
            let f = Array(s.followed.values)
            let r = Array(s.roots.values)
            s.followed = [:]
            s.roots = [:]
            s.agents = [:]
            return (f, r)
        }
        for f in followed {
            watcher.stopObserving(f.observation)
            Sys.close(f.dir.fd)
        }
        for r in roots {
            watcher.stopObserving(r.observation)
            Sys.close(r.fd)
        }
    }

    // MARK: - Events (on the watcher's reader thread)

    private func rootEvent(_ e: InotifyEvent, root: FilePath) {
        if e.mask & UInt32(IN_Q_OVERFLOW) != 0 {
            // Creations and removals may have been lost: look at the root again.
            guard let fd = state.withLock({ $0.roots[root]?.fd }) else { return }
            do {
                try rescan(root, fd: fd)
            } catch {
                log("cannot list the sandbox root \(root) again: \(error.message)", level: .warning)
            }
            return
        }
        if e.mask & UInt32(IN_IGNORED) != 0 {
            state.withLock { s in
                if let r = s.roots.removeValue(forKey: root) { Sys.close(r.fd) }
            }
            log("the sandbox root \(root) went away: no longer following it", level: .warning)
            return
        }
        guard Identifier.problem(e.name) == nil else { return }
        if e.mask & UInt32(IN_CREATE | IN_MOVED_TO) != 0 { followIfSandbox(root: root, sandboxID: e.name) }
        if e.mask & UInt32(IN_DELETE | IN_MOVED_FROM) != 0 { unfollow(SandboxFollower.key(root, e.name)) }
    }

    private func sandboxEvent(_ e: InotifyEvent, root: FilePath, sandboxID: String) {
        let key = SandboxFollower.key(root, sandboxID)
        if e.mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) != 0 {
            unfollow(key)
        } else if e.mask & UInt32(IN_Q_OVERFLOW) != 0 || e.name == "manifest" {
            do {
                try reloadOrThrow(key)
            } catch {
                log("cannot re-read the manifest of sandbox \(sandboxID): \(error.message)", level: .warning, sandbox: sandboxID)
            }
        }
    }

    /// Follows the sandboxes under `root` not followed yet, and drops those that are gone.
    private func rescan(_ root: FilePath, fd: FileDescriptor) throws(FSShareError) {
        // Listed through the descriptor (the configured root may be a symlink).
        let entries = try sys("cannot list \(root)") { () throws(SystemCallError) in try Sys.listDirectory(DirFD(fd: fd, path: root), ".") }
        let names = Set(entries.map(\.name))
        let gone = state.withLock { s in
            s.followed.filter { $0.value.root == root && !names.contains($0.value.sandboxID) }.map(\.key)
        }
        for key in gone { unfollow(key) }
        for name in names.sorted() where Identifier.problem(name) == nil {
            followIfSandbox(root: root, sandboxID: name)
        }
    }

    private func followIfSandbox(root: FilePath, sandboxID: String) {
        let known = state.withLock { $0.followed[SandboxFollower.key(root, sandboxID)] != nil }
        guard !known, LinuxFilesystemSharer.recorded(root: root, sandboxID: sandboxID) != nil else { return }
        do {
            try follow(root: root, sandboxID: sandboxID, agent: nil)
        } catch {
            log("cannot follow sandbox \(sandboxID): \(error.message)", level: .warning, sandbox: sandboxID)
        }
    }

    /// Stops following a sandbox (its directory went away) and mirroring its volumes.
    private func unfollow(_ key: String, quietly: Bool = false) {
        // Seen twice when both the root's watch and the sandbox's own report the removal.
        guard let f = state.withLock({ $0.followed.removeValue(forKey: key) }) else { return }
        watcher.stopObserving(f.observation)
        Sys.close(f.dir.fd)
        let names = watcher.watchedVolumes(in: f.sandboxID)
        for name in names { watcher.unwatch(sandboxID: f.sandboxID, name: name) }
        if !quietly { log("sandbox \(f.sandboxID) is gone: stopped following it (\(names.count) volumes)", sandbox: f.sandboxID) }
    }

    // MARK: - The manifest

    private func reloadOrThrow(_ key: String) throws(FSShareError) {
        guard let f = state.withLock({ $0.followed[key] }) else { return }
        guard let manifest = try Manifest.open(in: f.dir, sandboxID: f.sandboxID) else {
            throw FSShareError(.notPrepared, "sandbox \(f.sandboxID) has no manifest under \(f.root)")
        }
        let recorded = RecordedSandbox(manifest)
        let layout = SandboxLayout(
            root: f.root, sandboxID: f.sandboxID, guestSharedDir: recorded.guestSharedDir ?? SharerConfiguration.defaultGuestSharedDir,
            style: recorded.layout)
        // Copy-mode volumes once copied, and shared-filesystem volumes with a watchable mirror.
        let wanted = manifest.orderedShares.filter {
            $0.watched && (($0.kind == .copy && $0.copied && !$0.leftInGuest) || $0.kind == .volume)
        }
        guard let agent = f.agent ?? client(for: key, address: recorded.agent) else {
            if !wanted.isEmpty { log("sandbox \(f.sandboxID) has watched volumes but no agent address recorded yet", sandbox: f.sandboxID) }
            return
        }
        let wantedNames = Set(wanted.map(\.name))
        for name in watcher.watchedVolumes(in: f.sandboxID) where !wantedNames.contains(name) {
            watcher.unwatch(sandboxID: f.sandboxID, name: name)
            log("\(f.sandboxID)/\(name) was unshared: stopped mirroring it", sandbox: f.sandboxID)
        }
        var firstError: FSShareError?
        for r in wanted {
            // Stopped or unfollowed while this reload ran: register nothing more.
            guard state.withLock({ !$0.stopped && $0.followed[key] != nil }) else { return }
            do {
                if r.kind == .volume {
                    try watcher.watch(sandboxID: f.sandboxID, name: r.name, volume: FilePath(r.source), guestPath: layout.watchableGuestPath(r.name), agent: agent, watchable: true)
                } else {
                    try watcher.watch(sandboxID: f.sandboxID, name: r.name, volume: FilePath(r.source), guestPath: r.guestPath ?? layout.guestPath(r.name), agent: agent)
                }
            } catch {
                watcher.log("cannot watch \(r.source): \(error.message)", level: .warning, sandbox: f.sandboxID, volume: FilePath(r.source))
                watcher.noteNotWatched(sandboxID: f.sandboxID, name: r.name, reason: error.message)
                if firstError == nil { firstError = error }
            }
        }
        if let firstError, firstError.code == .limitExceeded { throw firstError }
    }

    /// The client for a sandbox's recorded agent address. Each sandbox's VM has an address of
    /// its own, so a slow or dead agent holds up only its own sandbox. Sandboxes naming the
    /// same address share a few connections, dealt out in turn (an agent serves a bounded
    /// number of connections; one connection would serialise every sync of them all).
    private func client(for key: String, address: String?) -> AgentClient? {
        guard let address, let parsed = try? AgentAddress(parsing: address) else { return nil }
        return state.withLock { s -> AgentClient? in
            guard var f = s.followed[key] else { return nil }
            if let known = f.client, known.address.description == parsed.description { return known }
            var pool = s.agents[address] ?? ([], 0)
            let client: AgentClient
            if pool.clients.count < SandboxFollower.connectionsPerAgent {
                client = AgentClient(address: parsed, callTimeout: watcher.agentCallTimeout)
                pool.clients.append(client)
            } else {
                client = pool.clients[pool.handedOut % pool.clients.count]
            }
            pool.handedOut += 1
            s.agents[address] = pool
            f.client = client
            s.followed[key] = f
            return client
        }
    }
}
