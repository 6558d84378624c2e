#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import CoreMetrics
import FSShare
import FSShareAgentChannel
import FSShareServiceLifecycle
import FSShareSystem
import Logging
import Prometheus
import ServiceLifecycle
import SystemPackage
import UnixSignals

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Keep copied configmap/secret/projected/downward-API volumes in sync with their guests.",
        discussion: """
            Runs until SIGTERM or SIGINT. Without --sandbox it serves the whole node: every sandbox under \
            the root, those prepared later included, each through the agent its manifest recorded when a \
            share first named it; a sandbox that is cleaned up is dropped. With --sandbox (repeatable) it \
            serves those only. It mirrors every watched copy-mode share (resyncing each in full on start, \
            so a restart brings the guests back in line) and follows each manifest for shares added or \
            removed later. One inotify instance serves every volume; each sync is logged on standard output.

            Examples:
              fsshare watch --root /run/fsshare
              fsshare watch --root /run/fsshare --sandbox pod1 --agent unix:/run/vm/pod1/agent.sock
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id (repeatable). Default: every sandbox under the root, now and later.") var sandbox: [String] = []
    @Option(name: .long, help: "Guest agent address (unix:PATH, hvsock:PATH:PORT, vsock:CID:PORT or serial:PATH) for the --sandbox given. Default: the one each sandbox recorded.") var agent: String?
    @Option(name: .long, help: "Most entries one volume update may have before it is no longer mirrored.") var maxEntries: Int = WatchLimits().maxEntries
    @Option(name: .long, help: "Most bytes one volume update may have before it is no longer mirrored.") var maxBytes: Int64 = WatchLimits().maxBytes
    @Option(name: .long, help: "Seconds an agent call may take.") var agentTimeout: Int = 60
    @Option(name: .long, help: "Write the watcher's metrics in Prometheus text format to this file (for node_exporter's textfile collector), rewritten whole every --metrics-interval seconds and on stop.") var metricsTextfile: String?
    @Option(name: .long, help: "Seconds between two writes of --metrics-textfile.") var metricsInterval: Int = 15
    @Option(name: .long, help: ArgumentHelp("Least severe log records printed.", valueName: "trace|debug|info|notice|warning|error|critical")) var logLevel: String = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical") }
        if let metricsTextfile, !metricsTextfile.hasPrefix("/") { throw ValidationError("--metrics-textfile must be an absolute path") }
        guard metricsInterval > 0 else { throw ValidationError("--metrics-interval must be positive") }
    }

    func run() async throws {
        var client: AgentClient?
        if let agent {
            guard !sandbox.isEmpty else { throw ValidationError("--agent needs --sandbox (without it each sandbox's recorded agent is used)") }
            do {
                client = AgentClient(address: try AgentAddress(parsing: agent), callTimeout: .seconds(agentTimeout))
            } catch {
                throw ValidationError(error.message)
            }
        }
        let json = common.json
        var handler = WatchLogHandler(json: json)
        handler.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let logger = Logger(label: "fsshare.watch", factory: { _ in handler })
        // The metrics backend is process-wide (swift-metrics): bootstrapped only when asked for.
        var textfile: MetricsTextfile?
        if let metricsTextfile {
            let registry = PrometheusCollectorRegistry()
            var factory = PrometheusMetricsFactory(registry: registry)
            factory.defaultDurationHistogramBuckets = MetricsTextfile.syncBuckets
            MetricsSystem.bootstrap(factory)
            textfile = try MetricsTextfile(path: FilePath(metricsTextfile), registry: registry, interval: .seconds(metricsInterval))
        }
        // Deferred first, so it runs last: the final file counts the syncs the watcher's stop
        // lets finish.
        try textfile?.start()
        defer { textfile?.stop() }
        let watcher = VolumeWatcher(limits: WatchLimits(maxEntries: maxEntries, maxBytes: maxBytes), agentCallTimeout: .seconds(agentTimeout), logger: logger)
        // The watcher runs as a swift-service-lifecycle service: SIGTERM/SIGINT shut it down
        // gracefully (a sync in flight finishes), so the closing line and the final metrics
        // count everything.
        let service = VolumeWatcherService(
            watcher: watcher,
            following: sandbox.isEmpty ? .root(FilePath(common.root)) : .sandboxes(root: FilePath(common.root), ids: sandbox, agent: client))
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        let stats = watcher.statistics
        logger.info("stopping after \(stats.syncs) syncs (\(stats.failedSyncs) failed, \(stats.overflows) overflows)")
    }
}
