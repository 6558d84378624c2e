#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
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
    var sharedFS: SharedFSOption?

    @Flag(name: .long, help: "Add the dax option to the virtio-fs storage.")
    var dax = false

    @Option(name: .long, help: "9p msize (Kata's msize_9p).")
    var msize: UInt32 = 8192

    @Option(name: .long, help: "Size of the sandbox /dev/shm in bytes (0: no shm storage).")
    var shmSize: UInt64 = 0

    @Option(name: .long, help: "Block device driver for block rootfs: \(BlockDeviceDriver.allCases.map(\.rawValue).joined(separator: ", ")).")
    var blockDriver: BlockDeviceDriver = .virtioSCSI

    @Option(name: .long, help: "How shares are attached: automatic, new-api or legacy.")
    var mountMethod: MountMethod = .automatic

    @Option(name: .long, help: ArgumentHelp(
        "Kata runtime layout and guest paths: go (mounts/ exported as shared/) or runtime-rs (rw/passthrough/ exported as ro/, guest paths under containers/passthrough/). Default: what the sandbox was prepared with, else go.",
        valueName: "go|runtime-rs"))
    var layout: SandboxLayoutStyle?

    func configuration(root: String, recorded: RecordedSandbox?) -> SharerConfiguration {
        let fs: SharedFilesystem
        switch sharedFS ?? .virtioFS {
        case .virtio9p: fs = .virtio9p(msize: msize)
        case .none: fs = .none
        case .virtioFS: fs = .virtioFS(dax: dax)
        }
        return SharerConfiguration(
            root: FilePath(root), sharedFilesystem: fs,
            blockDeviceDriver: blockDriver,
            shmSize: shmSize, mountMethod: mountMethod,
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

/// `--shared-fs`: Kata's names of the shared filesystem.
enum SharedFSOption: String, CaseIterable, ExpressibleByArgument {
    case virtioFS = "virtio-fs"
    case virtio9p = "virtio-9p"
    case none
}

extension DescriptorFormat: ExpressibleByArgument {}

extension BlockDeviceDriver: ExpressibleByArgument {}

extension MountMethod: ExpressibleByArgument {}

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
