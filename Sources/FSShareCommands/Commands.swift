#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import CoreMetrics
import FSShare
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import Logging
import Prometheus
import SystemPackage

/// Options every command takes.
struct CommonOptions: ParsableArguments {
    @Option(name: .long, help: "Directory holding one subdirectory per sandbox.")
    var root: String = SharerConfiguration.defaultRoot.string

    @Flag(name: .long, help: "Print machine-readable JSON.")
    var json = false

    func validate() throws {
        guard root.hasPrefix("/") else { throw ValidationError("--root must be an absolute path") }
    }
}

/// Options that describe the hypervisor side (they shape the descriptors).
struct HypervisorOptions: ParsableArguments {
    @Option(name: .long, help: "Shared filesystem: virtio-fs, virtio-9p or none. Default: none when --agent is given, else virtio-fs. Kata's agent no longer mounts 9p storages (removed in 3.29): virtio-9p is for agents that do, such as fsshare-agent.")
    var sharedFS: String?

    @Flag(name: .long, help: "Add the dax option to the virtio-fs storage.")
    var dax = false

    @Option(name: .long, help: "9p msize (Kata's msize_9p).")
    var msize: UInt32 = 8192

    @Option(name: .long, help: "Size of the sandbox /dev/shm in bytes (0: no shm storage).")
    var shmSize: UInt64 = 0

    @Option(name: .long, help: "Block device driver for block rootfs: \(BlockDeviceDriver.allCases.map(\.rawValue).joined(separator: ", ")).")
    var blockDriver: String = BlockDeviceDriver.virtioSCSI.rawValue

    @Option(name: .long, help: "How shares are attached: automatic, new-api or legacy.")
    var mountMethod: String = MountMethod.automatic.rawValue

    @Option(name: .long, help: ArgumentHelp(
        "Kata runtime layout and guest paths: go (mounts/ exported as shared/) or runtime-rs (rw/passthrough/ exported as ro/, guest paths under containers/passthrough/). Default: what the sandbox was prepared with, else go.",
        valueName: "go|runtime-rs"))
    var layout: SandboxLayoutStyle?

    func validate() throws {
        guard ["virtio-fs", "virtio-9p", "none"].contains(sharedFS ?? "virtio-fs") else {
            throw ValidationError("--shared-fs must be virtio-fs, virtio-9p or none")
        }
        guard BlockDeviceDriver(rawValue: blockDriver) != nil else {
            throw ValidationError("--block-driver must be one of \(BlockDeviceDriver.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard MountMethod(rawValue: mountMethod) != nil else {
            throw ValidationError("--mount-method must be automatic, new-api or legacy")
        }
    }

    func configuration(root: String, recorded: RecordedSandbox?) -> SharerConfiguration {
        let fs: SharedFilesystem
        switch sharedFS ?? "virtio-fs" {
        case "virtio-9p": fs = .virtio9p(msize: msize)
        case "none": fs = .none
        default: fs = .virtioFS(dax: dax)
        }
        return SharerConfiguration(
            root: FilePath(root), sharedFilesystem: fs,
            blockDeviceDriver: BlockDeviceDriver(rawValue: blockDriver) ?? .virtioSCSI,
            shmSize: shmSize, mountMethod: MountMethod(rawValue: mountMethod) ?? .automatic,
            layoutStyle: layout ?? recorded?.layout ?? .go)
    }
}

/// Options for copy mode: how to reach the guest agent. Both default to what the sandbox's
/// manifest recorded when they were first given.
struct AgentOptions: ParsableArguments {
    @Option(name: .long, help: "Guest agent address: unix:PATH, hvsock:PATH:PORT, vsock:CID:PORT or serial:PATH. Without --shared-fs it means copy mode (--shared-fs none); with --shared-fs virtio-fs or virtio-9p it is recorded for `fsshare watch`, which pushes watched volumes into their watchable mirrors through it. Default: the one the sandbox recorded.")
    var agent: String?

    @Option(name: .long, help: "Where the guest keeps shares (copy mode destination prefix). Default: the one the sandbox recorded, else \(SharerConfiguration.defaultGuestSharedDir).")
    var guestSharedDir: String?

    @Option(name: .long, help: "Seconds an agent call may take.")
    var agentTimeout: Int = 60

    func validate() throws {
        if let agent {
            do { _ = try AgentAddress(parsing: agent) } catch { throw ValidationError(error.message) }
        }
        if let guestSharedDir, !guestSharedDir.hasPrefix("/") { throw ValidationError("--guest-shared-dir must be absolute") }
    }

    /// The agent to use: the one given, else the one the sandbox's copy-mode manifest recorded.
    func client(_ recorded: RecordedSandbox?) throws -> AgentClient? {
        guard let address = agent ?? (recorded?.isCopyMode == true ? recorded?.agent : nil) else { return nil }
        return AgentClient(address: try AgentAddress(parsing: address), callTimeout: .seconds(agentTimeout))
    }

    /// `base` switched to copy mode when an agent is given without a shared filesystem, or
    /// the sandbox was prepared so.
    func apply(_ base: SharerConfiguration, _ recorded: RecordedSandbox?, sharedFSGiven: Bool = false) -> SharerConfiguration {
        var c = base
        c.guestSharedDir = guestSharedDir ?? recorded?.guestSharedDir ?? SharerConfiguration.defaultGuestSharedDir
        let recordedFS = recorded?.sharedFilesystem
        if recorded?.isCopyMode == true || (agent != nil && !sharedFSGiven && (recordedFS == nil || recordedFS == "none")) {
            c.sharedFilesystem = .none
        }
        return c
    }
}

extension DescriptorFormat: ExpressibleByArgument {}
extension SourceSymlinkPolicy: ExpressibleByArgument {}
extension SandboxLayoutStyle: ExpressibleByArgument {}

/// What `sandbox`'s manifest records (read once per command), or nil for a new sandbox.
func recorded(_ common: CommonOptions, _ sandbox: String) -> RecordedSandbox? {
    LinuxFilesystemSharer.recorded(root: FilePath(common.root), sandboxID: sandbox)
}

/// How a share source's symbolic links are treated.
struct SourceOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "Symbolic links in the source path: follow (as Kata does; the resolved path is printed, recorded and shown by status) or refuse.",
        valueName: "follow|refuse"))
    var sourceSymlinks: SourceSymlinkPolicy = .follow

    func apply(_ base: SharerConfiguration) -> SharerConfiguration {
        var c = base
        c.sourceSymlinks = sourceSymlinks
        return c
    }
}

/// The text and JSON lines that say where a symlinked source really led.
func resolvedLines(_ shared: SharedFile, source: String) -> (fields: [(String, JSON)], text: [String]) {
    guard let resolved = shared.resolvedSource else { return ([], []) }
    return ([("resolved_source", .string(resolved.string))],
            ["note: \(source) resolves through symbolic links to \(resolved); that is what was shared"])
}

/// Prints a result: JSON, length-delimited protobuf, or text.
func emit(_ common: CommonOptions, format: DescriptorFormat?, fields: [(String, JSON)], storages: [Storage], text: [String]) throws {
    let chosen = format ?? (common.json ? .json : .text)
    switch chosen {
    case .binary:
        writeAll(fd: 1, try Render.delimited(storages))
    case .json:
        print(JSON.object(fields + [("storages", .array(storages.map(Render.storageJSON)))]).render())
    case .text:
        for line in text { print(line) }
        for s in storages { print(Render.storageText(s)) }
    }
}

struct Prepare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a sandbox's share tree and print its sandbox storages.",
        discussion: """
            Makes <root>/<sandbox>/{mounts,shared,private}: the sandbox directory becomes a shared \
            mount of its own, shared/ a read-only slave bind of mounts/ (export it with virtiofsd or 9p). \
            Idempotent. Prints the storages for CreateSandbox.

            Example:
              fsshare prepare --root /run/fsshare --sandbox pod1 --shm-size 67108864 --json
            """)
    @OptionGroup var common: CommonOptions
    @OptionGroup var hypervisor: HypervisorOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Descriptor output: json, binary (length-delimited protobuf) or text.") var format: DescriptorFormat?
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: agent.apply(hypervisor.configuration(root: common.root, recorded: known), known, sharedFSGiven: hypervisor.sharedFS != nil),
            agent: try agent.client(known))
        if hypervisor.sharedFS == "virtio-9p" {
            writeAll(fd: 2, Array("fsshare: warning: Kata's agent removed its 9p storage handler in 3.29 and refuses this storage (\"Failed to find the storage handler\"); use virtio-fs with a Kata agent. 9p storages are for agents that still mount them, such as fsshare-agent.\n".utf8))
        }
        let storages = try await sharer.prepare()
        try emit(common, format: format, fields: [
            ("sandbox", .string(sandbox)),
            ("shared_dir", .string(sharer.layout.sharedDirectory.string)),
            ("mounts_dir", .string(sharer.layout.mountsDirectory.string)),
        ], storages: storages, text: ["prepared sandbox \(sandbox): export \(sharer.layout.sharedDirectory)"])
    }
}

struct Cleanup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a sandbox's mounts and directories (or every sandbox's, with --all).",
        discussion: """
            Works after a crash at any point: unmounts what the manifest lists and anything else mounted \
            in the sandbox's tree, deepest first, verifies, then deletes without ever crossing a mount point. \
            Only a directory whose fsshare manifest proves it is a sandbox is touched: anything else under \
            the root (an operator's folder, another runtime's sandbox, mounts outside sandboxes) is named \
            and left alone. --all cleans every sandbox under the root.

            Examples:
              fsshare cleanup --root /run/fsshare --sandbox pod1
              fsshare cleanup --root /run/fsshare --all
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String?
    @Flag(name: .long, help: "Clean every sandbox under the root and unmount leaked mounts.") var all = false

    func validate() throws {
        guard (sandbox != nil) != all else { throw ValidationError("give exactly one of --sandbox or --all") }
    }

    func run() async throws {
        let root = FilePath(common.root)
        guard all else {
            let id = sandbox ?? ""
            let sharer = try LinuxFilesystemSharer(sandboxID: id, configuration: SharerConfiguration(root: root))
            let outcome = try sharer.cleanupSync()
            let text: String
            switch outcome {
            case .cleaned: text = "cleaned: \(id)"
            case .nothingToClean: text = "nothing to clean: there is no sandbox \(id) under \(root)"
            case .removedInterruptedPrepare: text = "cleaned: \(id) (only the empty directory of an interrupted prepare was there)"
            }
            if common.json {
                print(JSON.object([
                    ("cleaned", .array(outcome == .nothingToClean ? [] : [.string(id)])),
                    ("nothing_to_clean", .bool(outcome == .nothingToClean)),
                ]).render())
            } else {
                print(text)
            }
            return
        }
        let report = try Inventory.cleanupAll(root: root)
        if common.json {
            print(JSON.object([
                ("cleaned", .array(report.cleaned.map(JSON.string))),
                ("removed_interrupted_prepares", .array(report.removedInterruptedPrepares.map(JSON.string))),
                ("left_alone", .array(report.leftAlone.map { .object([("name", .string($0.name)), ("reason", .string($0.reason))]) })),
                ("foreign_mounts", .array(report.foreignMounts.map { .string($0.string) })),
            ]).render())
            return
        }
        let done = report.cleaned + report.removedInterruptedPrepares
        print(done.isEmpty ? "nothing to clean under \(root)" : "cleaned: \(done.joined(separator: " "))")
        for entry in report.leftAlone { print("left alone: \(root.appending(entry.name)): not an fsshare sandbox (\(entry.reason))") }
        for mount in report.foreignMounts { print("left alone: mount \(mount) (outside any fsshare sandbox)") }
    }
}

struct Share: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Share a host file or directory (a container volume) into the sandbox.",
        discussion: """
            Binds --source at mounts/<container>-<16 hex>-<basename of destination> and prints the guest \
            path. --ro is read-only before the bind is attached, so it is read-only in the guest too; \
            --recursive carries submounts (read-only all the way down with --ro). Sharing the same \
            container destination again returns the same path and mounts nothing.

            Example:
              fsshare share --root /run/fsshare --sandbox pod1 --container web --source /srv/data --destination /data --ro
            """)
    @OptionGroup var common: CommonOptions
    @OptionGroup var hypervisor: HypervisorOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String
    @Option(name: .long, help: "Host path to share.") var source: String
    @Option(name: .long, help: "Where the container mounts it.") var destination: String
    @Flag(name: .long, help: "Read-only (in the guest too).") var ro = false
    @Flag(name: .long, help: "Recursive: carry submounts of the source.") var recursive = false
    @Option(name: .long, help: "Descriptor output: json, binary or text.") var format: DescriptorFormat?
    @OptionGroup var sourceOptions: SourceOptions
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: sourceOptions.apply(agent.apply(hypervisor.configuration(root: common.root, recorded: known), known, sharedFSGiven: hypervisor.sharedFS != nil)),
            agent: try agent.client(known))
        var options: [String] = []
        if ro { options.append("ro") }
        if recursive { options.append("rbind") }
        let mount = Mount(source: FilePath(source), destination: FilePath(destination), options: options)
        let c = Container(id: container, rootfs: .hostMounted("/"))
        guard let shared = try await sharer.shareFile(container: c, mount: mount) else {
            throw FSShareError(.invalidArgument, "\(destination) is not shared: the sandbox's /dev/shm comes from its own shm storage (prepare --shm-size), not from the host")
        }
        let resolved = resolvedLines(shared, source: source)
        var fields: [(String, JSON)] = [("guest_path", .string(shared.guestPath))] + resolved.fields
        var text = [shared.guestPath] + resolved.text
        if let why = shared.watchableFallback {
            fields.append(("watchable_fallback", .string(why)))
            text.append("note: \(why)")
        }
        if let r = shared.copyReport {
            fields.append(("copied", .object([
                ("files", .number(r.files)), ("directories", .number(r.directories)),
                ("symlinks", .number(r.symlinks)), ("bytes", .number(Int(r.bytes))),
                ("skipped", .array(r.skipped.map { .object([("path", .string($0.path)), ("reason", .string($0.reason))]) })),
            ])))
            text.append("copied \(r.files) files, \(r.directories) directories, \(r.symlinks) symlinks, \(r.bytes) bytes")
            text += r.skipped.map { "skipped \($0.path): \($0.reason)" }
        }
        try emit(common, format: format, fields: fields, storages: shared.volumeStorages, text: text)
    }
}

struct Unshare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Undo a volume share. Unsharing twice is not an error.",
        discussion: """
            Example:
              fsshare unshare --root /run/fsshare --sandbox pod1 --container web --destination /data
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String
    @Option(name: .long, help: "The container destination given to share.") var destination: String
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: agent.apply(SharerConfiguration(root: FilePath(common.root), layoutStyle: known?.layout ?? .go), known),
            agent: try agent.client(known))
        let c = Container(id: container, rootfs: .hostMounted("/"))
        let outcome = try sharer.unshareFileSync(container: c, mount: Mount(source: "/", destination: FilePath(destination)))
        switch outcome {
        case .removed:
            if common.json { print(JSON.object([("unshared", .bool(true))]).render()) } else { print("unshared") }
        case .leftInGuest(let guestPath):
            let why = "the agent has no removal RPC (Kata's AgentService), so the copy stays in the guest at \(guestPath) until the VM goes"
            if common.json {
                print(JSON.object([("unshared", .bool(true)), ("left_in_guest", .string(guestPath)), ("note", .string(why))]).render())
            } else {
                print("unshared; \(why)")
            }
        }
    }
}

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
        let signals = try Sys.terminationSignals()
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
        let watcher = VolumeWatcher(limits: WatchLimits(maxEntries: maxEntries, maxBytes: maxBytes), agentCallTimeout: .seconds(agentTimeout), logger: logger)
        try watcher.start()
        defer { watcher.stop() }
        try textfile?.start()
        defer { textfile?.stop() }
        if sandbox.isEmpty {
            try watcher.followRoot(FilePath(common.root))
        } else {
            for id in sandbox { try watcher.follow(root: FilePath(common.root), sandboxID: id, agent: client) }
        }
        // Block until a termination signal; the watcher's own threads do the work.
        _ = try Sys.pollIn(signals, timeoutMilliseconds: -1, path: "signals")
        let stats = watcher.statistics
        logger.info("stopping after \(stats.syncs) syncs (\(stats.failedSyncs) failed, \(stats.overflows) overflows)")
    }
}

/// Which rootfs kind the command line describes.
struct RootfsOptions: ParsableArguments {
    @Option(name: .long, help: "A host-mounted rootfs (overlay mount or plain directory) to bind.") var dir: String?
    @Option(name: .long, help: "Guest address of a block-device rootfs (PCI path, SCSI address, /dev/vdX or CCW devno).") var blockDevice: String?
    @Option(name: .long, help: "Filesystem of the block device.") var fstype: String?
    @Option(name: .long, help: "Rootfs suffix under the device root.") var suffix: String = "rootfs"
    @Option(name: .long, help: "Image reference for guest pull.") var guestPull: String?
    @Option(name: .long, help: "key=value annotation passed as guest-pull metadata (repeatable).") var annotation: [String] = []

    func validate() throws {
        let kinds = [dir != nil, blockDevice != nil, guestPull != nil].filter { $0 }.count
        guard kinds == 1 else { throw ValidationError("give exactly one of --dir, --block-device or --guest-pull") }
        if blockDevice != nil && fstype == nil { throw ValidationError("--block-device needs --fstype") }
        for a in annotation where !a.contains("=") { throw ValidationError("--annotation must be key=value") }
    }

    var rootfs: Rootfs {
        if let dir { return .hostMounted(FilePath(dir)) }
        if let blockDevice { return .blockDevice(BlockDevice(address: blockDevice, fstype: fstype ?? ""), suffix: suffix) }
        var meta: [String: String] = [:]
        for a in annotation {
            let kv = a.split(separator: "=", maxSplits: 1)
            meta[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return .guestPull(image: guestPull ?? "", annotations: meta)
    }
}

struct ShareRootfs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "share-rootfs",
        abstract: "Share a container's root filesystem and print its storages.",
        discussion: """
            --dir binds a host-mounted rootfs at mounts/<container>/rootfs; --block-device emits a \
            blk/scsi/mmioblk/blk-ccw storage (xfs gets nouuid); --guest-pull emits image_guest_pull.

            Examples:
              fsshare share-rootfs --root /run/fsshare --sandbox pod1 --container web --dir /run/containerd/web/rootfs
              fsshare share-rootfs --root /run/fsshare --sandbox pod1 --container db --block-device 0:0:0:1 --fstype xfs --json
            """)
    @OptionGroup var common: CommonOptions
    @OptionGroup var hypervisor: HypervisorOptions
    @OptionGroup var rootfsOptions: RootfsOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String
    @Option(name: .long, help: "Descriptor output: json, binary or text.") var format: DescriptorFormat?
    @OptionGroup var sourceOptions: SourceOptions

    func run() async throws {
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox, configuration: sourceOptions.apply(hypervisor.configuration(root: common.root, recorded: recorded(common, sandbox))))
        let shared = try await sharer.shareRootFilesystem(container: Container(id: container, rootfs: rootfsOptions.rootfs))
        let resolved = resolvedLines(shared, source: rootfsOptions.dir ?? "")
        try emit(common, format: format, fields: [("guest_path", .string(shared.guestPath))] + resolved.fields,
                 storages: shared.containerStorages, text: [shared.guestPath] + resolved.text)
    }
}

struct UnshareRootfs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unshare-rootfs",
        abstract: "Undo share-rootfs for a container (bound or block-device). Twice is not an error.",
        discussion: """
            Example:
              fsshare unshare-rootfs --root /run/fsshare --sandbox pod1 --container web
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String

    func run() async throws {
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox, configuration: SharerConfiguration(root: FilePath(common.root), layoutStyle: recorded(common, sandbox)?.layout ?? .go))
        try Identifier.validate(container, what: "container")
        try sharer.unshare(name: "\(container)/rootfs")
        try sharer.unshare(name: container)
        if common.json { print(JSON.object([("unshared", .bool(true))]).render()) } else { print("unshared") }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List sandboxes, their shares, and leaked mounts under the root.",
        discussion: """
            A leaked mount is a mount point inside a sandbox that its manifest does not account for \
            (cleaning the sandbox removes it). Entries under the root that no fsshare manifest proves to \
            be sandboxes, and mounts outside sandboxes, are listed as foreign: cleanup leaves them alone.

            Example:
              fsshare status --root /run/fsshare --json
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Only this sandbox.") var sandbox: String?

    func run() async throws {
        var inventory = try Inventory.read(root: FilePath(common.root))
        if let sandbox { inventory.sandboxes = inventory.sandboxes.filter { $0.id == sandbox } }
        if common.json {
            let sandboxes: [JSON] = inventory.sandboxes.map { s in
                .object([
                    ("id", .string(s.id)), ("prepared", .bool(s.prepared)),
                    ("layout", s.recorded.map { .string($0.layout.rawValue) } ?? .null),
                    ("shared_fs", s.recorded?.sharedFilesystem.map(JSON.string) ?? .null),
                    ("agent", s.recorded?.agent.map(JSON.string) ?? .null),
                    ("problem", s.problem.map(JSON.string) ?? .null),
                    ("shares", .array(s.shares.map { share in
                        let r = share.record
                        return .object([
                            ("name", .string(r.name)), ("kind", .string(r.kind.rawValue)), ("container", .string(r.containerID)),
                            ("source", .string(r.source)), ("destination", .string(r.destination)),
                            ("resolved_source", r.resolvedSource.map(JSON.string) ?? .null),
                            ("read_only", .bool(r.readOnly)), ("recursive", .bool(r.recursive)), ("file", .bool(r.isFile)),
                            ("mounted", .bool(share.mounted)), ("left_in_guest", .bool(r.leftInGuest)),
                        ])
                    })),
                ])
            }
            print(JSON.object([
                ("root", .string(inventory.root.string)), ("sandboxes", .array(sandboxes)),
                ("leaked_mounts", .array(inventory.leakedMounts.map { .string($0.string) })),
                ("foreign", .array(inventory.foreign.map {
                    .object([("name", .string($0.name)), ("reason", .string($0.reason)), ("interrupted_prepare", .bool($0.interruptedPrepare))])
                })),
                ("foreign_mounts", .array(inventory.foreignMounts.map { .string($0.string) })),
            ]).render())
            return
        }
        if inventory.sandboxes.isEmpty { print("no sandboxes under \(inventory.root)") }
        for s in inventory.sandboxes {
            var how: [String] = []
            if let r = s.recorded {
                if r.layout != .go { how.append("\(r.layout.rawValue) layout") }
                if r.isCopyMode {
                    how.append("copy mode" + (r.agent.map { ", agent \($0)" } ?? ", no agent recorded yet"))
                } else if let agent = r.agent {
                    how.append("agent \(agent) for watchable mirrors")
                }
            }
            print("sandbox \(s.id): \(s.prepared ? "prepared" : "NOT prepared")\(how.isEmpty ? "" : " (\(how.joined(separator: ", ")))")\(s.problem.map { " (\($0))" } ?? "")")
            for share in s.shares {
                let r = share.record
                let flags = [r.readOnly ? "ro" : "rw", r.recursive ? "recursive" : nil, r.isFile ? "file" : nil,
                             r.leftInGuest ? "unshared, left in the guest (the agent cannot remove)" : nil,
                             r.watched && r.kind == .volume ? "watchable mirror" : nil].compactMap { $0 }
                let source = r.resolvedSource.map { "\(r.source) (resolves to \($0))" } ?? r.source
                print("  \(r.name)  \(r.kind.rawValue) \(flags.joined(separator: ","))  \(source) -> \(r.destination)  \(share.mounted || r.kind == .rootfsDirectory || r.kind == .copy ? "" : "NOT MOUNTED")")
            }
        }
        for leak in inventory.leakedMounts { print("leaked mount: \(leak)") }
        for entry in inventory.foreign where sandbox == nil || entry.name == sandbox {
            print("foreign: \(inventory.root.appending(entry.name)): \(entry.reason)")
        }
        for mount in inventory.foreignMounts where sandbox == nil { print("foreign mount: \(mount)") }
    }
}

/// The `fsshare` command.
public struct FSShareCLI: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "fsshare",
        abstract: "Share host filesystems into VM sandboxes (Kata-compatible layout and descriptors).",
        discussion: "Exit status: 0 ok, 1 the operation failed, 2 usage error. Under --json an error is one JSON object on standard error: {\"error\": {\"code\", \"message\"}}.",
        version: FSShareCLI.version,
        subcommands: [Prepare.self, Cleanup.self, Share.self, Unshare.self, ShareRootfs.self, UnshareRootfs.self, Status.self, Watch.self])

    /// What `fsshare --version` prints.
    public static let version = "fsshare 0.4 (manifest format 1; Kata agent protocol subset: Storage, CopyFile, Health)"

    public init() {}

    /// Parses `arguments`, runs the command, and returns the process exit status.
    public static func runMain(_ arguments: [String]) async -> Int32 {
        let json = arguments.contains("--json")
        /// One error line: text, or one JSON object under --json.
        func report(_ kind: String, _ message: String) {
            let line = json
                ? JSON.object([("error", .object([("code", .string(kind)), ("message", .string(message))]))]).compact()
                : "fsshare: \(message)"
            writeAll(fd: 2, Array((line + "\n").utf8))
        }
        var command: any ParsableCommand
        do {
            command = try parseAsRoot(arguments)
        } catch {
            // The command line itself: usage errors exit 2; --help and --version exit 0.
            let code = exitCode(for: error)
            let message = fullMessage(for: error)
            if code == .success {
                print(message)
                return 0
            }
            writeAll(fd: 2, Array((message + "\n").utf8))
            return 2
        }
        do {
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            return 0
        } catch let error as FSShareError {
            report(error.code.rawValue, error.message)
            return 1
        } catch let error as AgentError {
            report("agent-" + error.code.rawValue, error.message)
            return 1
        } catch let error as ValidationError {
            // A combination of options that parsing could not see: still a usage error.
            report("usage", error.message)
            return 2
        } catch {
            // --help and --version arrive here as a clean exit.
            if exitCode(for: error) == .success {
                print(fullMessage(for: error))
                return 0
            }
            // Anything else went wrong while operating: an operational failure.
            report("failed", fullMessage(for: error))
            return 1
        }
    }
}

/// Writes bytes straight to a descriptor (stdout/stderr) without stdio's global state.
func writeAll(fd: Int32, _ bytes: [UInt8]) {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { buffer -> Int in
            guard let base = buffer.baseAddress else { return 0 }
            return write(fd, base + offset, buffer.count - offset)
        }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        offset += n
    }
}
