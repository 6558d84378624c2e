#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import Logging
import SystemPackage

/// Keeps kubelet atomic-writer volumes (configmap, secret, projected, downward-API) in sync with
/// their copies in the guest, for every sandbox of the process, with **one** inotify instance.
///
/// Lifetime: ``start()`` creates the inotify instance and its reader thread; ``stop()`` ends
/// them and every sync worker, and may be called any number of times, from any thread, before
/// or after the last reference goes (dropping the watcher stops it: its threads hold only its
/// machinery, never the watcher itself). An ``observe(_:mask:_:)`` handler must not hold the
/// watcher strongly, or it keeps it alive. Volumes are added with
/// ``watch(sandboxID:name:volume:guestPath:agent:watchable:)`` (FSShare's sharer does this for
/// the volumes it shares; its `SandboxFollower` does it for every sandbox a manifest records,
/// which is what `fsshare watch` runs). Other directories can be observed on the same inotify
/// instance with ``observe(_:mask:_:)``.
///
/// How a configmap update reaches the guest, in order: kubelet swaps `..data` (the
/// `IN_MOVED_TO` lands in `handle(_:)`), the volume is queued once on its sandbox's worker
/// (`workLoop(_:_:)`), `sync(_:_:)` runs `AtomicWriterMirror` on it, which sends the new
/// timestamped directory (`GuestCopier`), then swaps the guest's `..data` and fixes the key links.
///
/// What it reacts to, per volume directory: `IN_MOVED_TO ..data` (kubelet's atomic swap: the new
/// timestamped directory is complete at that moment), `IN_CREATE`/`IN_DELETE` of key links (kubelet
/// adds and removes them right after the swap), `IN_DELETE_SELF`/`IN_MOVE_SELF` (the volume went
/// away: mirroring stops, the guest copy stays), and `IN_Q_OVERFLOW` (events were lost: every
/// volume is resynced in full). Each sandbox has its own sync worker thread, so a slow agent
/// delays only its own sandbox; updates that arrive during a sync are coalesced into one more.
///
/// Logs go through swift-log (`logger`: one record per sync, error and lifecycle event, with
/// `sandbox` and `volume` metadata where they apply); counts and sync latencies through
/// swift-metrics (`fsshare_watch_syncs_total{result}`, `fsshare_watch_copied_bytes_total`,
/// `fsshare_watch_queue_overflows_total`, `fsshare_watch_volumes_stopped_total`, the gauge
/// `fsshare_watch_volumes` and the timer `fsshare_watch_sync_duration_seconds`), so a host
/// process that bootstraps a backend (the CLI: Prometheus) gets them and one that does not pays
/// a no-op call.
public final class VolumeWatcher: Sendable {
    let engine: WatcherEngine

    /// Per-volume limits: a volume over them stops being mirrored, with the reason.
    public var limits: WatchLimits { engine.limits }
    /// Per-call timeout of the agent clients made for recorded agent addresses.
    public var agentCallTimeout: Duration { engine.agentCallTimeout }
    /// Where the watcher's records go (swift-log): lifecycle at `info`, each completed sync at
    /// `info` with `sandbox` and `volume` metadata, notes at `notice`, failures at `warning`.
    public var logger: Logger { engine.logger }

    /// Counters, for logs, tests and the benchmark.
    public struct Statistics: Sendable, Equatable {
        /// inotify instances held: 1 while started, else 0.
        public var inotifyInstances = 0
        /// Volumes mirrored now.
        public var watchedVolumes = 0
        /// Syncs completed (including those that found nothing to do).
        public var syncs = 0
        /// Syncs that failed (retried, or the volume stopped with a reason).
        public var failedSyncs = 0
        /// inotify queue overflows (each one resyncs every volume).
        public var overflows = 0
        /// Volumes no longer mirrored, with the reason (over a limit, gone, failing).
        public var stopped: [String: String] = [:]
    }

    /// A directory observed with ``VolumeWatcher/observe(_:mask:_:)``; pass it to
    /// ``VolumeWatcher/stopObserving(_:)``.
    public struct Observation: Sendable, Hashable {
        /// The inotify watch descriptor events of the directory carry.
        public let watchDescriptor: Int32
        let id: UInt64
    }

    /// A watcher; nothing runs until ``start()``.
    ///
    /// - Parameters:
    ///   - limits: entries and bytes a volume may hold to be mirrored (Kata's are 16 and 1 MiB;
    ///     the default is larger).
    ///   - agentCallTimeout: per-call timeout of the clients made for recorded agent addresses.
    ///   - logger: where records go (swift-log); metrics go to the process's swift-metrics backend.
    public init(limits: WatchLimits = WatchLimits(), agentCallTimeout: Duration = .seconds(60), logger: Logger = Logger(label: "fsshare.watcher")) {
        engine = WatcherEngine(limits: limits, agentCallTimeout: agentCallTimeout, logger: logger)
    }

    deinit { engine.stop() }

    /// Counters, for logs, tests and the benchmark.
    public var statistics: Statistics { engine.statistics }

    /// Creates the inotify instance and starts reading it. Starting a started watcher is a no-op.
    ///
    /// - Throws: `limitExceeded` when `fs.inotify.max_user_instances` is reached; `systemCall`
    ///   when a pipe or thread cannot be made.
    public func start() throws(FSShareError) { try engine.start() }

    /// Stops reading events and every sync worker (a sync in flight finishes first), and
    /// releases every watch and observation. Idempotent; ``start()`` may be called again.
    public func stop() { engine.stop() }

    /// Starts mirroring `volume` (a kubelet atomic-writer volume directory) to `guestPath`
    /// through `agent`. The first sync is a full one (it also removes stale guest entries).
    /// Watching an already watched volume is a no-op.
    ///
    /// - Parameters:
    ///   - sandboxID: the sandbox the volume belongs to (its syncs share one worker thread).
    ///   - name: the volume's name in the sandbox (with `sandboxID`, its key).
    ///   - volume: the host directory kubelet writes.
    ///   - guestPath: where the guest copy lives.
    ///   - agent: the channel to the sandbox's agent.
    ///   - watchable: `guestPath` is the `watchable-bind` mirror of a shared-filesystem volume,
    ///     which is only written through an agent that has `fsshare.GuestFiles`; a Kata agent
    ///     keeps that mirror itself, and mirroring stops with that reason.
    /// - Throws: `notPrepared` if the watcher is not started; `limitExceeded` when
    ///   `fs.inotify.max_user_watches` is reached; `conflict` when the directory is observed
    ///   (``observe(_:mask:_:)``). The same directory may be watched under several keys (one
    ///   configmap mounted into two containers): each key's guest copy is kept in sync.
    public func watch(sandboxID: String, name: String, volume: FilePath, guestPath: String, agent: AgentClient, watchable: Bool = false) throws(FSShareError) {
        try engine.watch(sandboxID: sandboxID, name: name, volume: volume, guestPath: guestPath, agent: agent, state: nil, watchable: watchable)
    }

    /// `firstSync: false` registers without the initial full sync: a watchable mirror shared just
    /// now is first copied by the agent when it gets the storage.
    package func watch(
        sandboxID: String, name: String, volume: FilePath, guestPath: String, agent: AgentClient, state: AtomicWriterMirror.GuestState?,
        watchable: Bool = false, firstSync: Bool = true
    ) throws(FSShareError) {
        try engine.watch(sandboxID: sandboxID, name: name, volume: volume, guestPath: guestPath, agent: agent, state: state, watchable: watchable, firstSync: firstSync)
    }

    /// Stops mirroring a volume (its guest copy is left alone). Unknown volumes are ignored. A
    /// sync of it already under way is waited for: once this returns, nothing more is written
    /// for the volume.
    ///
    /// - Parameters:
    ///   - sandboxID: the volume's sandbox.
    ///   - name: its name in the sandbox.
    public func unwatch(sandboxID: String, name: String) { engine.unwatch(sandboxID: sandboxID, name: name) }

    /// The volumes being mirrored, as `sandbox/name` keys.
    public var watchedVolumes: [String] { engine.watchedVolumes }

    /// The names of the volumes being mirrored for one sandbox.
    ///
    /// - Parameter sandboxID: the sandbox.
    public func watchedVolumes(in sandboxID: String) -> [String] { engine.watchedVolumes(in: sandboxID) }

    /// Calls `handler` for every inotify event of `directory` matching `mask`, on the
    /// watcher's one inotify instance (so a node-wide follower of sandbox manifests costs no
    /// instance of its own). The handler runs on the watcher's reader thread, outside its lock,
    /// in event order; it may call the watcher. It also gets `IN_Q_OVERFLOW` (events were lost:
    /// look again) and `IN_IGNORED` (the kernel dropped the watch: the observation has ended).
    ///
    /// - Returns: the observation, for ``stopObserving(_:)``.
    /// - Throws: `notPrepared` if the watcher is not started; `conflict` if `directory` is a
    ///   watched volume or already observed; `systemCall` if inotify refuses it.
    ///
    /// - Parameters:
    ///   - directory: the directory (a `/proc/self/fd/N` path of an open descriptor is fine).
    ///   - mask: the inotify events wanted (`IN_ONLYDIR` is added).
    ///   - handler: called with each event; must not hold the watcher strongly.
    public func observe(_ directory: FilePath, mask: UInt32, _ handler: @escaping @Sendable (InotifyEvent) -> Void) throws(FSShareError) -> Observation {
        try engine.observe(directory, mask: mask, handler)
    }

    /// Ends an observation (no-op if it already ended, or the watcher stopped).
    ///
    /// - Parameter observation: what observe(_:mask:_:) returned.
    public func stopObserving(_ observation: Observation) { engine.stopObserving(observation) }

    /// Records why a volume of a sandbox is not mirrored, for ``Statistics/stopped``.
    package func noteNotWatched(sandboxID: String, name: String, reason: String) {
        engine.noteNotWatched(sandboxID: sandboxID, name: name, reason: reason)
    }

    /// One log record through ``logger``, with `sandbox` and `volume` metadata.
    package func log(_ message: String, level: Logger.Level = .info, sandbox: String? = nil, volume: FilePath? = nil) {
        engine.log(message, level: level, sandbox: sandbox, volume: volume)
    }

    /// Stops (or resumes) reading the inotify queue, so that a test can fill the kernel's queue
    /// past `fs.inotify.max_queued_events` and get a real `IN_Q_OVERFLOW` without changing any
    /// host setting.
    ///
    /// - Parameter paused: true to leave events queued in the kernel, false to read again.
    @_spi(Testing) public func pauseReadingForTesting(_ paused: Bool) { engine.pauseReadingForTesting(paused) }
}
