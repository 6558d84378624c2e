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

/// Watched volumes, Kata's way: `StartFileEventWatcher` / `StopFileEventWatcher` on the shared
/// per-process `VolumeWatcher`, and the hand-over of each watched volume a share makes.
extension LinuxFilesystemSharer {
    /// Starts mirroring this sandbox's watched volumes into the guest with ``watcher`` (started
    /// if it is not): those shared already, and those any process shares later (the manifest is
    /// followed). Kata's `StartFileEventWatcher`; a no-op when already started.
    ///
    /// - Throws: `unsupported` when the sharer was made without a watcher; `notPrepared` before
    ///   ``prepare()``; what `VolumeWatcher/start()` throws.
    public func startFileEventWatcher() async throws(FSShareError) {
        try await offload("StartFileEventWatcher") { _ throws(FSShareError) in try self.startFileEventWatcherSync() }
    }

    /// Blocking ``startFileEventWatcher()``.
    ///
    /// - Throws: as ``startFileEventWatcher()``.
    @_spi(Blocking) public func startFileEventWatcherSync() throws(FSShareError) {
        guard let watcher else {
            throw FSShareError(.unsupported, "sandbox \(sandboxID)'s sharer has no VolumeWatcher: give it one (one per process serves every sandbox)")
        }
        if follower.withLock({ $0 != nil }) { return }
        try watcher.start()
        let made = SandboxFollower(watcher: watcher)
        try made.follow(root: configuration.root, sandboxID: sandboxID, agent: agent)
        let kept = follower.withLock { current -> Bool in
            if current != nil { return false }
            current = made
            return true
        }
        if !kept { made.stop() }
    }

    /// Stops mirroring this sandbox's volumes (the shared watcher goes on serving other
    /// sandboxes; the guest keeps its last copies). Kata's `StopFileEventWatcher`.
    public func stopFileEventWatcher() async {
        stopFollowing()
    }

    /// Hands a watched volume just shared to ``watcher``, if there is one and it runs. Not
    /// running: ``startFileEventWatcher()`` (or `fsshare watch`) finds it in the manifest later
    /// and starts with a full sync. Any other refusal (the inotify watch limit) is logged and
    /// shown in the watcher's statistics; the share itself stands (it is complete and recorded).
    func registerWatched(
        name: String, volume: FilePath, guestPath: String, agent: AgentClient, state: AtomicWriterMirror.GuestState?,
        watchable: Bool = false, firstSync: Bool = true
    ) {
        guard let watcher else { return }
        do {
            try watcher.watch(sandboxID: sandboxID, name: name, volume: volume, guestPath: guestPath, agent: agent, state: state, watchable: watchable, firstSync: firstSync)
        } catch {
            if error.code == .notPrepared { return }
            watcher.log("\(volume) is shared but not mirrored: \(error.message)", level: .warning, sandbox: sandboxID, volume: volume)
            watcher.noteNotWatched(sandboxID: sandboxID, name: name, reason: error.message)
        }
    }

    /// Ends the following and unwatches this sandbox's volumes (quick: no blocking call).
    func stopFollowing() {
        let f = follower.withLock { current -> SandboxFollower? in
            let f = current
            current = nil
            return f
        }
        f?.stop()
        guard let watcher else { return }
        for name in watcher.watchedVolumes(in: sandboxID) { watcher.unwatch(sandboxID: sandboxID, name: name) }
    }
}
