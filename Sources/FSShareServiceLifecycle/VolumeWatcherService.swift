import FSShare
import FSShareAgentChannel
import Logging
import ServiceLifecycle
import SystemPackage

/// A `VolumeWatcher` as a swift-service-lifecycle `Service`, for runtimes that run their
/// parts in a `ServiceGroup`: ``run()`` starts the watcher and follows what it was told to,
/// then waits; on graceful shutdown (or when its task is cancelled) it stops following and stops
/// the watcher, letting a sync in flight finish. `fsshare watch` runs the node's watcher this way.
///
/// ```swift
/// let watcher = VolumeWatcher(logger: logger)
/// let service = VolumeWatcherService(watcher: watcher, following: .root("/run/kata-containers/shared/sandboxes"))
/// let group = ServiceGroup(services: [service], gracefulShutdownSignals: [.sigterm], logger: logger)
/// try await group.run()
/// ```
public struct VolumeWatcherService: Service {
    /// What the service follows while it runs (see `SandboxFollower`).
    public enum Following: Sendable {
        /// Nothing: volumes are registered by sharers given the same watcher.
        case nothing
        /// Every sandbox under a root, now and later (`SandboxFollower/followRoot(_:)`).
        case root(FilePath)
        /// These sandboxes under a root, through `agent` (nil: the one each manifest records).
        case sandboxes(root: FilePath, ids: [String], agent: AgentClient?)
    }

    /// The watcher this service runs.
    public let watcher: VolumeWatcher
    /// What it follows while it runs.
    public let following: Following

    /// A service for `watcher` that follows `following` while it runs.
    ///
    /// - Parameters:
    ///   - watcher: the watcher to run (started by run(), stopped when it returns).
    ///   - following: what to follow while it runs.
    public init(watcher: VolumeWatcher, following: Following = .nothing) {
        self.watcher = watcher
        self.following = following
    }

    /// Starts the watcher and the following, waits for graceful shutdown or cancellation,
    /// then stops both.
    ///
    /// - Throws: what `VolumeWatcher/start()` and the following throw (the watcher is stopped
    ///   again first); never on shutdown.
    public func run() async throws {
        try watcher.start()
        let follower = SandboxFollower(watcher: watcher)
        defer {
            follower.stop()
            watcher.stop()
        }
        switch following {
        case .nothing:
            break
        case .root(let root):
            try follower.followRoot(root)
        case .sandboxes(let root, let ids, let agent):
            for id in ids { try follower.follow(root: root, sandboxID: id, agent: agent) }
        }
        // Cancellation (the group tearing down) ends the wait too: either way, stop.
        try? await gracefulShutdown()
    }
}
