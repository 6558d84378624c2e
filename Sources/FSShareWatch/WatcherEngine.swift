#if canImport(Glibc)
import Glibc
#endif
import CoreMetrics
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import Logging
import Synchronization
import SystemPackage
import Tracing

/// The watcher's machinery: the inotify instance, its reader thread, the per-sandbox sync
/// workers and their state. Its threads hold the engine, never the public ``VolumeWatcher``,
/// so dropping the last ``VolumeWatcher`` reference stops them (its `deinit` calls ``stop()``).
final class WatcherEngine: Sendable {
    let limits: WatchLimits
    /// Per-call timeout of the agent clients made for recorded agent addresses.
    let agentCallTimeout: Duration
    /// Where the watcher's records go (swift-log): lifecycle at `info`, each completed sync at
    /// `info` with `sandbox` and `volume` metadata, notes at `notice`, failures at `warning`.
    let logger: Logger
    let metrics: Metrics
    private let core = Mutex(Core())
    /// Test seam: while set, the reader leaves events queued in the kernel (see
    /// ``pauseReadingForTesting(_:)``).
    private let readingPaused = Atomic<Bool>(false)

    /// Stops (or resumes) reading the inotify queue, so that a test can fill the kernel's queue
    /// past `fs.inotify.max_queued_events` and get a real `IN_Q_OVERFLOW` without changing any
    /// host setting.
    func pauseReadingForTesting(_ paused: Bool) {
        readingPaused.store(paused, ordering: .releasing)
    }


    struct Volume {
        let sandboxID: String
        let name: String
        let hostPath: FilePath
        let guestPath: String
        let agent: AgentClient
        /// A shared-filesystem volume's `watchable-bind` mirror (written only through an agent
        /// that has `fsshare.GuestFiles`; a Kata agent keeps its own).
        let watchable: Bool
        /// Identifies this registration (a volume unwatched and watched again gets a new one).
        let generation: UInt64
        let wd: Int32
        var state: AtomicWriterMirror.GuestState?
        var dirty = false
        var force = false
        /// The log already said that this volume's agent cannot remove old data.
        var removalNoted = false
    }

    final class Worker: Sendable {
        let wakeRead: FileDescriptor
        let wakeWrite: FileDescriptor
        let thread: Mutex<OSThread?> = Mutex(nil)
        init(_ pipe: (FileDescriptor, FileDescriptor)) {
            wakeRead = pipe.0
            wakeWrite = pipe.1
        }
        func wake() {
            var b: UInt8 = 1
            _ = Glibc.write(wakeWrite.rawValue, &b, 1)
        }
    }

    /// A directory observed for someone else (``observe(_:mask:_:)``).
    struct Observer {
        let id: UInt64
        let handler: @Sendable (InotifyEvent) -> Void
    }

    /// A sandbox's volumes waiting for a sync, in the order they became dirty. A volume is in
    /// it at most once (its `dirty` flag), so a worker finds its next job in O(1) however many
    /// volumes the process watches.
    struct DirtyQueue {
        private var items: [String] = []
        private var head = 0
        mutating func push(_ key: String) { items.append(key) }
        mutating func pop() -> String? {
            guard head < items.count else { return nil }
            let key = items[head]
            head += 1
            if head > 64 && head * 2 > items.count {
                items.removeFirst(head)
                head = 0
            }
            return key
        }
    }

    struct Core: ~Copyable {
        var inotify: FileDescriptor?
        var wake: (FileDescriptor, FileDescriptor)?
        var reader: OSThread?
        var stopping = false
        var volumes: [String: Volume] = [:]
        /// The volumes on each watch: usually one, several when one directory is shared more than
        /// once (a configmap mounted into two containers), each mirrored to its own guest path.
        var byWD: [Int32: [String]] = [:]
        var workers: [String: Worker] = [:]
        /// Directories observed through ``VolumeWatcher/observe(_:mask:_:)``, by watch.
        var observers: [Int32: Observer] = [:]
        /// Per sandbox: the dirty volumes, and those whose last sync failed (agent away, I/O
        /// error), which the sandbox's worker retries every second until they work.
        var queues: [String: DirtyQueue] = [:]
        var failing: [String: Set<String>] = [:]
        /// Volumes whose sync is running now (``WatcherEngine/unwatch(sandboxID:name:)`` waits for them).
        var syncing: Set<String> = []
        var stats = VolumeWatcher.Statistics()

        /// Queues `key` for a sync (once, however many events arrive before it runs).
        mutating func markDirty(_ key: String, force: Bool = false) {
            guard var v = volumes[key] else { return }
            if force { v.force = true }
            if !v.dirty {
                v.dirty = true
                queues[v.sandboxID, default: DirtyQueue()].push(key)
            }
            volumes[key] = v
        }
        var generation: UInt64 = 0

        /// Stops mirroring `key`: forgets it, releases its watch (unless the kernel already did:
        /// `IN_IGNORED`) and, with a `reason`, records why. Returns what was removed.
        @discardableResult
        mutating func drop(_ key: String, releaseWatch: Bool = true, reason: String? = nil) -> Volume? {
            guard let v = volumes.removeValue(forKey: key) else { return nil }
            var sharing = byWD[v.wd] ?? []
            sharing.removeAll { $0 == key }
            byWD[v.wd] = sharing.isEmpty ? nil : sharing
            failing[v.sandboxID]?.remove(key)
            // The watch goes with the last volume on it.
            if releaseWatch, sharing.isEmpty, let fd = inotify { Sys.inotifyRemoveWatch(fd, v.wd) }
            stats.watchedVolumes = volumes.count
            if let reason { stats.stopped[key] = reason }
            return v
        }
    }

    static func key(_ sandboxID: String, _ name: String) -> String { sandboxID + "/" + name }

    /// A watcher; nothing runs until ``start()``.
    init(limits: WatchLimits = WatchLimits(), agentCallTimeout: Duration = .seconds(60), logger: Logger = Logger(label: "fsshare.watcher")) {
        self.limits = limits
        self.agentCallTimeout = agentCallTimeout
        self.logger = logger
        self.metrics = Metrics()
    }

    /// The watcher's metrics, named as Prometheus expects (`fsshare_watch_…`, units in the
    /// name, `_total` for counters), made once per watcher: recording one is a call on an
    /// existing object.
    struct Metrics: Sendable {
        let synced = Counter(label: "fsshare_watch_syncs_total", dimensions: [("result", "synced")])
        let unchanged = Counter(label: "fsshare_watch_syncs_total", dimensions: [("result", "unchanged")])
        let failed = Counter(label: "fsshare_watch_syncs_total", dimensions: [("result", "failed")])
        let bytes = Counter(label: "fsshare_watch_copied_bytes_total")
        let overflows = Counter(label: "fsshare_watch_queue_overflows_total")
        let stopped = Counter(label: "fsshare_watch_volumes_stopped_total")
        let volumes = Gauge(label: "fsshare_watch_volumes")
        let duration = CoreMetrics.Timer(label: "fsshare_watch_sync_duration_seconds")
    }

    /// One log record; `volume` and `sandbox` become metadata.
    func log(_ message: String, level: Logger.Level = .info, sandbox: String? = nil, volume: FilePath? = nil) {
        guard logger.logLevel <= level else { return }
        var metadata: Logger.Metadata = [:]
        if let sandbox { metadata["sandbox"] = .string(sandbox) }
        if let volume { metadata["volume"] = .string(volume.string) }
        logger.log(level: level, Logger.Message(stringLiteral: message), metadata: metadata.isEmpty ? nil : metadata)
    }

    var statistics: VolumeWatcher.Statistics { core.withLock { $0.stats } }

    // MARK: - Lifetime

    /// Creates the inotify instance and starts reading it. Starting a started watcher is a no-op.
    func start() throws(FSShareError) {
        try core.withLock { (c: inout Core) throws(FSShareError) in
            if c.inotify != nil { return }
            c.stopping = false
            let fd: FileDescriptor
            do throws(SystemCallError) {
                fd = try Sys.inotifyInit()
            } catch {
                if error.errno == .tooManyOpenFiles {
                    throw FSShareError(.limitExceeded, "cannot create an inotify instance: the per-user limit (fs.inotify.max_user_instances) is reached", systemCall: error)
                }
                throw FSShareError.system("cannot create an inotify instance", error)
            }
            let wake = try sys("cannot create the watcher's wake pipe") { () throws(SystemCallError) in try Sys.pipe() }
            c.inotify = fd
            c.wake = wake
            c.stats.inotifyInstances = 1
            do throws(SystemCallError) {
                c.reader = try OSThread { [self] in readLoop(fd, wake: wake.0) }
            } catch {
                Sys.close(fd)
                Sys.close(wake.0)
                Sys.close(wake.1)
                c.inotify = nil
                c.wake = nil
                c.stats.inotifyInstances = 0
                throw FSShareError.system("cannot start the watcher thread", error)
            }
        }
        log("watcher started (one inotify instance for every sandbox)")
    }

    /// Stops reading events and every sync worker, and releases every watch. Idempotent.
    func stop() {
        let (reader, wake, workers) = core.withLock { c -> (OSThread?, (FileDescriptor, FileDescriptor)?, [Worker]) in
            if c.stopping || c.inotify == nil { return (nil, nil, []) }
            c.stopping = true
            let r = c.reader
            c.reader = nil
            return (r, c.wake, Array(c.workers.values))
        }
        guard let wake else { return }
        var b: UInt8 = 1
        _ = Glibc.write(wake.1.rawValue, &b, 1)
        reader?.join()
        for w in workers {
            w.wake()
            let t = w.thread.withLock { t -> OSThread? in
                let x = t
                t = nil
                return x
            }
            t?.join()
            Sys.close(w.wakeRead)
            Sys.close(w.wakeWrite)
        }
        core.withLock { c in
            c.observers = [:]
            c.volumes = [:]
            c.queues = [:]
            c.failing = [:]
            c.byWD = [:]
            c.syncing = []
            c.workers = [:]
            if let fd = c.inotify { Sys.close(fd) }
            Sys.close(wake.0)
            Sys.close(wake.1)
            c.inotify = nil
            c.wake = nil
            c.stats.inotifyInstances = 0
            c.stats.watchedVolumes = 0
        }
        log("watcher stopped")
    }

    // MARK: - Volumes

    static let volumeMask = UInt32(IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

    /// Registers a volume (see ``VolumeWatcher/watch(sandboxID:name:volume:guestPath:agent:watchable:)``).
    /// `firstSync: false` registers without the initial full sync: a watchable mirror shared just
    /// now is first copied by the agent when it gets the storage, so the first sync waits for
    /// the first update.
    func watch(
        sandboxID: String, name: String, volume: FilePath, guestPath: String, agent: AgentClient, state: AtomicWriterMirror.GuestState?,
        watchable: Bool = false, firstSync: Bool = true
    ) throws(FSShareError) {
        let key = WatcherEngine.key(sandboxID, name)
        let added = try core.withLock { (c: inout Core) throws(FSShareError) -> Bool in
            guard let inotify = c.inotify, !c.stopping else {
                throw FSShareError(.notPrepared, "the volume watcher is not running; start() it first")
            }
            if c.volumes[key] != nil { return false }
            // No descriptor is held on the volume between syncs: a held reference would defer
            // IN_DELETE_SELF until it is closed, hiding a deleted volume.
            let wd: Int32
            do throws(SystemCallError) {
                // IN_MASK_ADD: a directory watched already (another volume on it, or an
                // observation) keeps the events it was watched for.
                wd = try Sys.inotifyAddWatch(inotify, volume, mask: WatcherEngine.volumeMask | UInt32(IN_DONT_FOLLOW) | UInt32(IN_MASK_ADD))
            } catch {
                if error.errno == .noSpace {
                    throw FSShareError(
                        .limitExceeded,
                        "cannot watch \(volume): the inotify watch limit is reached (fs.inotify.max_user_watches = \(WatcherEngine.sysctl("max_user_watches"))); raise it or watch fewer volumes",
                        systemCall: error)
                }
                throw FSShareError.system("cannot watch \(volume)", error)
            }
            c.generation += 1
            let v = Volume(
                sandboxID: sandboxID, name: name, hostPath: volume, guestPath: guestPath, agent: agent, watchable: watchable,
                generation: c.generation, wd: wd, state: state)
            // A second volume on the same directory shares the watch: both are mirrored.
            if c.observers[wd] != nil {
                throw FSShareError(.conflict, "\(volume) is already observed for another purpose")
            }
            c.volumes[key] = v
            c.byWD[wd, default: []].append(key)
            if state == nil && firstSync { c.markDirty(key, force: true) }
            c.stats.watchedVolumes = c.volumes.count
            metrics.volumes.record(c.volumes.count)
            c.stats.stopped[key] = nil
            let worker = try self.worker(for: sandboxID, &c)
            if state == nil && firstSync { worker.wake() }
            return true
        }
        if added {
            log("watching \(volume) -> \(guestPath)", sandbox: sandboxID, volume: volume)
        }
    }

    /// Stops mirroring a volume (its guest copy is left alone). Unknown volumes are ignored.
    func unwatch(sandboxID: String, name: String) {
        let key = WatcherEngine.key(sandboxID, name)
        core.withLock { c in
            if c.drop(key) != nil { metrics.volumes.record(c.volumes.count) }
        }
        // A sync of it already under way may still be writing (it reads the host when it
        // starts, perhaps after this call began): wait for it, so that once unwatch returns
        // nothing more is written for this volume. Never from the volume's own worker thread.
        while core.withLock({ $0.syncing.contains(key) && !$0.stopping }) { usleep(1000) }
    }

    /// The volumes being mirrored, as `sandbox/name` keys.
    var watchedVolumes: [String] { core.withLock { Array($0.volumes.keys).sorted() } }

    /// The names of the volumes being mirrored for one sandbox.
    func watchedVolumes(in sandboxID: String) -> [String] {
        core.withLock { c in c.volumes.values.filter { $0.sandboxID == sandboxID }.map(\.name).sorted() }
    }

    /// Records why a volume of a sandbox is not mirrored (it could not be watched), for
    /// ``Statistics/stopped``.
    func noteNotWatched(sandboxID: String, name: String, reason: String) {
        core.withLock { $0.stats.stopped[WatcherEngine.key(sandboxID, name)] = reason }
    }

    // MARK: - Other directories on the same inotify instance


    /// Calls `handler` for every inotify event of `directory` matching `mask`, on the
    /// watcher's one inotify instance (so a node-wide follower of sandbox manifests costs no
    /// instance of its own). The handler runs on the watcher's reader thread, outside its lock,
    /// in event order; it may call the watcher (``watch(sandboxID:name:volume:guestPath:agent:watchable:)``,
    /// ``observe(_:mask:_:)``). It also gets `IN_Q_OVERFLOW` (events were lost: look again) and
    /// `IN_IGNORED` (the kernel dropped the watch: the observation has ended). Observing a
    /// directory that is a watched volume, or already observed, is a `conflict`.
    func observe(_ directory: FilePath, mask: UInt32, _ handler: @escaping @Sendable (InotifyEvent) -> Void) throws(FSShareError) -> VolumeWatcher.Observation {
        try core.withLock { (c: inout Core) throws(FSShareError) -> VolumeWatcher.Observation in
            guard let inotify = c.inotify, !c.stopping else {
                throw FSShareError(.notPrepared, "the volume watcher is not running; start() it first")
            }
            let wd: Int32
            do throws(SystemCallError) {
                // IN_MASK_CREATE: a directory watched already (a volume) is refused, its watch untouched.
                wd = try Sys.inotifyAddWatch(inotify, directory, mask: mask | UInt32(IN_ONLYDIR) | UInt32(IN_MASK_CREATE))
            } catch {
                if error.errno == .fileExists { throw FSShareError(.conflict, "\(directory) is already watched") }
                throw FSShareError.system("cannot watch \(directory)", error)
            }
            if c.observers[wd] != nil || c.byWD[wd] != nil {
                throw FSShareError(.conflict, "\(directory) is already watched")
            }
            c.generation += 1
            c.observers[wd] = Observer(id: c.generation, handler: handler)
            return VolumeWatcher.Observation(watchDescriptor: wd, id: c.generation)
        }
    }

    /// Ends an observation (no-op if it already ended, or the watcher stopped).
    func stopObserving(_ observation: VolumeWatcher.Observation) {
        core.withLock { c in
            guard c.observers[observation.watchDescriptor]?.id == observation.id else { return }
            c.observers[observation.watchDescriptor] = nil
            if let fd = c.inotify { Sys.inotifyRemoveWatch(fd, observation.watchDescriptor) }
        }
    }

    private func worker(for sandboxID: String, _ c: inout Core) throws(FSShareError) -> Worker {
        if let w = c.workers[sandboxID] { return w }
        let w = Worker(try sys("cannot create a wake pipe") { () throws(SystemCallError) in try Sys.pipe() })
        let t: OSThread
        do throws(SystemCallError) {
            t = try OSThread { [self] in workLoop(sandboxID, w) }
        } catch {
            Sys.close(w.wakeRead)
            Sys.close(w.wakeWrite)
            throw FSShareError.system("cannot start a sync worker", error)
        }
        w.thread.withLock { $0 = t }
        c.workers[sandboxID] = w
        return w
    }

    static func sysctl(_ name: String) -> String {
        guard let fd = try? Sys.openat(nil, FilePath("/proc/sys/fs/inotify/" + name), flags: O_RDONLY) else { return "?" }
        defer { Sys.close(fd) }
        let bytes = (try? Sys.readAll(fd, path: "")) ?? []
        return String(decoding: bytes, as: UTF8.self).trimmingSuffixNewline
    }

    // MARK: - Events

    private func readLoop(_ fd: FileDescriptor, wake: FileDescriptor) {
        let size = 64 * 1024
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        while true {
            if readingPaused.load(ordering: .acquiring) {
                // Only the wake pipe (stop) is looked at while paused.
                if let ready = try? Sys.pollIn(wake, wake: wake, timeoutMilliseconds: 5, path: "inotify"), ready != 0 { return }
                continue
            }
            guard let ready = try? Sys.pollIn(fd, wake: wake, timeoutMilliseconds: -1, path: "inotify") else { return }
            if ready & 2 != 0 { return }
            guard let n = try? Sys.readAvailable(fd, into: buffer, path: "inotify"), n > 0 else { continue }
            let events = Sys.inotifyEvents(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            handle(events)
            // A handler may have dropped the last VolumeWatcher, whose deinit stopped the
            // engine from this very thread: its descriptors are closed, do not poll them.
            if core.withLock({ $0.stopping || $0.inotify == nil }) { return }
        }
    }

    private func handle(_ events: [InotifyEvent]) {
        var wakeSandboxes: Set<String> = []
        var lines: [String] = []
        // Observers' events, delivered after the lock is released, in order.
        var observed: [(@Sendable (InotifyEvent) -> Void, InotifyEvent)] = []
        core.withLock { c in
            for e in events {
                if e.mask & UInt32(IN_Q_OVERFLOW) != 0 {
                    // Events were lost: resync everything; observers look again.
                    c.stats.overflows += 1
                    for (k, v) in c.volumes {
                        c.markDirty(k, force: true)
                        wakeSandboxes.insert(v.sandboxID)
                    }
                    for o in c.observers.values { observed.append((o.handler, e)) }
                    lines.append("inotify queue overflowed: resyncing every volume")
                    continue
                }
                if let o = c.observers[e.wd] {
                    if e.mask & UInt32(IN_IGNORED) != 0 { c.observers[e.wd] = nil }
                    observed.append((o.handler, e))
                    continue
                }
                for key in c.byWD[e.wd] ?? [] {
                    guard let v = c.volumes[key] else { continue }
                    if e.mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT) != 0 {
                        c.drop(key, releaseWatch: e.mask & UInt32(IN_IGNORED) == 0, reason: "the volume directory \(v.hostPath) went away")
                        metrics.volumes.record(c.volumes.count)
                        lines.append("\(v.hostPath) went away: stopped mirroring it (the guest copy at \(v.guestPath) is left)")
                        continue
                    }
                    // The swap itself, or a key link added or removed after it.
                    let relevant = e.name == "..data" ? e.mask & UInt32(IN_MOVED_TO) != 0 : !e.name.hasPrefix("..")
                    guard relevant, !v.dirty else { continue }
                    c.markDirty(key)
                    wakeSandboxes.insert(v.sandboxID)
                }
            }
            for s in wakeSandboxes { c.workers[s]?.wake() }
        }
        for line in lines { log(line, level: .warning) }
        if events.contains(where: { $0.mask & UInt32(IN_Q_OVERFLOW) != 0 }) { metrics.overflows.increment() }
        for (handler, event) in observed { handler(event) }
    }

    // MARK: - Sync

    private func workLoop(_ sandboxID: String, _ worker: Worker) {
        var scratch: UInt8 = 0
        // Set when the agent could not be reached: until then events only queue volumes, so an
        // absent agent costs one attempt per pause, not one per event. The pause doubles from
        // 100 ms to 1 s: an agent that is just starting (a VM booting) is caught early, a dead
        // one costs one attempt per second.
        var pausedUntil: UInt64 = 0
        var pause: UInt64 = 100_000_000
        while true {
            let retrying = core.withLock { c in !(c.failing[sandboxID]?.isEmpty ?? true) }
            var timeout: Int32 = retrying ? 1000 : -1
            let now = Sys.monotonicNanoseconds()
            if pausedUntil > now { timeout = Int32((pausedUntil - now) / 1_000_000) + 1 }
            guard let ready = try? Sys.pollIn(worker.wakeRead, timeoutMilliseconds: timeout, path: "wake") else { return }
            while Glibc.read(worker.wakeRead.rawValue, &scratch, 1) > 0 {}
            if core.withLock({ $0.stopping }) { return }
            if Sys.monotonicNanoseconds() < pausedUntil { continue }
            if ready == 0 {
                // Retry failed syncs: without this an update whose sync failed (agent restarting)
                // would wait for the next kubelet update.
                core.withLock { c in
                    for k in c.failing[sandboxID] ?? [] { c.markDirty(k) }
                }
            }
            // Take every dirty volume of this sandbox; new events mark them dirty again.
            while true {
                let job: (String, Volume)? = core.withLock { c in
                    // Entries of volumes unwatched (or already synced) since they were queued
                    // are skipped.
                    while let k = c.queues[sandboxID]?.pop() {
                        guard let v = c.volumes[k], v.dirty else { continue }
                        var taken = v
                        taken.dirty = false
                        taken.force = false
                        c.volumes[k] = taken
                        c.syncing.insert(k)
                        return (k, v)
                    }
                    return nil
                }
                guard let (key, v) = job else { break }
                if core.withLock({ $0.stopping }) {
                    core.withLock { _ = $0.syncing.remove(key) }
                    return
                }
                // With the agent away, the rest of the queue waits for the next retry round
                // (one attempt per second, not one per volume).
                let reached = sync(key, v)
                core.withLock { _ = $0.syncing.remove(key) }
                if !reached {
                    pausedUntil = Sys.monotonicNanoseconds() + pause
                    pause = min(pause * 2, 1_000_000_000)
                    break
                }
                pause = 100_000_000
            }
        }
    }

    /// Syncs one volume. False when the agent could not be reached.
    @discardableResult
    private func sync(_ key: String, _ v: Volume) -> Bool {
        let start = Sys.monotonicNanoseconds()
        // One span per sync, a root of its own (the event, not a caller, started it).
        let span = Spans.start("SyncVolume", context: .topLevel, attributes: [
            ("sandbox", v.sandboxID), ("volume", v.hostPath.string), ("guest_path", v.guestPath), ("watchable", v.watchable ? "true" : "false"),
        ])
        defer { span.end() }
        var state = v.state
        var report = CopyReport()
        do throws(FSShareError) {
            var kata = false
            if v.watchable {
                do throws(AgentError) {
                    kata = try !v.agent.features().contains("RenamePath")
                } catch {
                    throw FSShareError.agent("cannot ask the agent at \(v.agent.address) what it serves", error)
                }
            }
            if kata {
                // A Kata agent: it polls the share into this mirror itself (every 2 s). A second
                // writer would race it on ..data, so the mirror is left to it.
                let reason = "the agent at \(v.agent.address) is not fsshare-agent (no fsshare.GuestFiles): it keeps the watchable mirror \(v.guestPath) itself (Kata polls every 2 s), so fsshare leaves it alone"
                core.withLock { c in
                    guard let gone = c.volumes[key], gone.generation == v.generation else { return }
                    c.drop(key, reason: reason)
                    metrics.volumes.record(c.volumes.count)
                }
                log("\(v.hostPath): \(reason)", level: .notice, sandbox: v.sandboxID, volume: v.hostPath)
                metrics.stopped.increment()
                return true
            }
            let fd = try sys("cannot open the watched volume \(v.hostPath)") { () throws(SystemCallError) in
                try Sys.openat(nil, v.hostPath, flags: Sys.oPath | Sys.oDirectory)
            }
            defer { Sys.close(fd) }
            var mirror = AtomicWriterMirror(volume: DirFD(fd: fd, path: v.hostPath), guestDir: v.guestPath, limits: limits)
            let skipped = Mutex<String?>(nil)
            mirror.skippedRemoval = { message in skipped.withLock { $0 = message } }
            let outcome = try mirror.sync(agent: v.agent, state: &state, force: v.force, report: &report)
            let micros = (Sys.monotonicNanoseconds() - start) / 1000
            let note = skipped.withLock { $0 }
            let firstNote = core.withLock { c -> Bool in
                var first = false
                if var now = c.volumes[key], now.generation == v.generation {
                    now.state = state
                    if note != nil && !now.removalNoted {
                        now.removalNoted = true
                        first = true
                    }
                    c.volumes[key] = now
                    c.failing[v.sandboxID]?.remove(key)
                }
                c.stats.syncs += 1
                return first
            }
            // Once per volume: from then on every update leaves its old directory behind.
            if firstNote, let note { log("\(v.hostPath): \(note); later updates leave theirs too", level: .notice, sandbox: v.sandboxID, volume: v.hostPath) }
            metrics.duration.recordNanoseconds(Int64(Sys.monotonicNanoseconds() - start))
            switch outcome {
            case .unchanged:
                metrics.unchanged.increment()
            case .synced(let ts, let entries, let bytes):
                if span.isRecording {
                    span.attributes["entries"] = entries
                    span.attributes["bytes"] = Int(bytes)
                }
                metrics.synced.increment()
                metrics.bytes.increment(by: Int64(bytes))
                log("synced \(v.hostPath) -> \(v.guestPath) (\(ts), \(entries) entries, \(bytes) bytes) in \(micros) µs", sandbox: v.sandboxID, volume: v.hostPath)
            case .notAtomicWriter:
                metrics.unchanged.increment()
                log("\(v.hostPath) has no ..data link: not an atomic-writer volume, nothing mirrored", level: .notice, sandbox: v.sandboxID, volume: v.hostPath)
            case .dangling:
                metrics.unchanged.increment()
                log("\(v.hostPath): ..data names a directory that is gone (the volume is being removed); nothing mirrored", level: .notice, sandbox: v.sandboxID, volume: v.hostPath)
            }
        } catch {
            Spans.fail(span, error)
            // The mirror marked its picture of the guest uncertain if an agent step failed:
            // keep that, so the next sync does not trust what may not have happened.
            core.withLock { c in
                if var now = c.volumes[key], now.generation == v.generation {
                    now.state = state
                    c.volumes[key] = now
                }
            }
            if error.code == .conflict {
                // Superseded: kubelet swapped again while we copied. The guest still has the
                // previous complete content; the newer swap is synced next.
                core.withLock { c in
                    if let now = c.volumes[key], now.generation == v.generation { c.markDirty(key) }
                }
                return true
            }
            // A watchable mirror the agent has not mounted yet (the runtime sends the storage
            // just after the share): wait for it quietly, retrying every second.
            if v.watchable, error.agentError?.status == GRPCStatus.failedPrecondition {
                core.withLock { c in
                    if var now = c.volumes[key], now.generation == v.generation {
                        now.force = true
                        c.volumes[key] = now
                        c.failing[v.sandboxID, default: []].insert(key)
                    }
                }
                log("\(v.guestPath) is not writable yet (the agent has not mounted the watchable mirror); retrying", level: .debug, sandbox: v.sandboxID, volume: v.hostPath)
                return true
            }
            core.withLock { c in
                c.stats.failedSyncs += 1
                if error.code == .limitExceeded, c.drop(key, reason: error.message) != nil {
                    // The fallback: stop mirroring, keep the last complete content in the guest.
                    metrics.volumes.record(c.volumes.count)
                } else if var now = c.volumes[key], now.generation == v.generation {
                    // Retried on the next event (or resync); the guest keeps its last good copy.
                    now.force = true
                    c.volumes[key] = now
                    c.failing[v.sandboxID, default: []].insert(key)
                }
            }
            metrics.failed.increment()
            if error.code == .limitExceeded { metrics.stopped.increment() }
            log("sync of \(v.hostPath) failed: \(error.message)\(error.code == .limitExceeded ? "; no longer mirrored (the guest keeps the last complete copy)" : "")",
                level: .warning, sandbox: v.sandboxID, volume: v.hostPath)
            if let transport = error.agentError?.code, [.unreachable, .disconnected, .timeout].contains(transport) { return false }
        }
        return true
    }
}

extension String {
    var trimmingSuffixNewline: String {
        var s = self
        while s.hasSuffix("\n") { s.removeLast() }
        return s
    }
}
