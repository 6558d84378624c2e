import SystemPackage

/// How the hypervisor exposes host files to the guest (Kata's `shared_fs`).
public enum SharedFilesystem: Sendable, Equatable {
    /// virtio-fs served by virtiofsd. `dax` adds the `dax` mount option (Kata adds it when the
    /// cache mode is not `never`/`metadata` and a DAX window is configured).
    case virtioFS(dax: Bool = false)
    /// virtio-9p; `msize` is Kata's `msize_9p` (default 8192).
    case virtio9p(msize: UInt32 = 8192)
    /// No shared filesystem: files are copied through the agent (copy mode).
    case none

    /// Kata's configuration spelling: `virtio-fs`, `virtio-9p`, `none`.
    public var name: String {
        switch self {
        case .virtioFS: "virtio-fs"
        case .virtio9p: "virtio-9p"
        case .none: "none"
        }
    }
}

/// Kata's `block_device_driver`: how a block-device rootfs reaches the guest.
public enum BlockDeviceDriver: String, Sendable, Equatable, CaseIterable {
    case virtioBlk = "virtio-blk"
    case virtioSCSI = "virtio-scsi"
    case virtioMMIO = "virtio-mmio"
    case virtioBlkCCW = "virtio-blk-ccw"

    /// The `Storage.driver` the Kata agent expects for this block driver.
    public var storageDriver: String {
        switch self {
        case .virtioBlk: "blk"
        case .virtioSCSI: "scsi"
        case .virtioMMIO: "mmioblk"
        case .virtioBlkCCW: "blk-ccw"
        }
    }
}

/// How shares are attached under `mounts/`.
public enum MountMethod: String, Sendable, Equatable, CaseIterable {
    /// The new mount API when the kernel has it (open_tree + mount_setattr + move_mount: the
    /// share is read-only before it is attached, and attached by descriptor), else legacy.
    case automatic
    /// Only the new mount API; fail if the kernel lacks it.
    case newAPI = "new-api"
    /// mount(2) only: read-only shares go through a staging bind under `private/` that is made
    /// read-only before the bind into `mounts/` (Kata's PR #1553 sequence). Recursive read-only
    /// shares need the new API.
    case legacy
}

/// Which Kata runtime's on-disk layout and guest paths a sandbox follows.
public enum SandboxLayoutStyle: String, Sendable, Equatable, CaseIterable {
    /// Kata's Go runtime: shares under `<sid>/mounts/`, exported through `<sid>/shared/`; guest
    /// paths `/run/kata-containers/shared/containers/<name>`; volume names
    /// `<cid>-<16 hex>-<basename(destination)>`.
    case go
    /// Kata's runtime-rs (the default since Kata 4.0): shares under `<sid>/rw/passthrough/`,
    /// exported through the read-only bind `<sid>/ro/` of `<sid>/rw/`; guest paths
    /// `/run/kata-containers/shared/containers/passthrough/<name>`; volume names
    /// `sandbox-<16 hex>-<basename(destination)>`.
    case runtimeRS = "runtime-rs"

    /// Where shares are attached, relative to the sandbox directory.
    public var mountsPath: FilePath { self == .go ? Paths.mounts : Paths.rwPassthrough }
    /// The directory bound read-only onto ``exportPath`` (what the guest sees the root of).
    public var exportSourcePath: FilePath { self == .go ? Paths.mounts : Paths.rw }
    /// What the hypervisor exports (virtiofsd `--shared-dir`, 9p `path=`).
    public var exportPath: FilePath { self == .go ? Paths.shared : Paths.ro }
    /// Where the shares appear in the export (the mounts directory seen through it).
    public var exportedMountsPath: FilePath { self == .go ? Paths.shared : Paths.roPassthrough }

    /// Made once: a `FilePath` literal is parsed again each time it is evaluated.
    private enum Paths {
        static let mounts: FilePath = "mounts"
        static let rwPassthrough: FilePath = "rw/passthrough"
        static let rw: FilePath = "rw"
        static let shared: FilePath = "shared"
        static let ro: FilePath = "ro"
        static let roPassthrough: FilePath = "ro/passthrough"
    }
    /// The guest path of `mounts/` below the guest shared directory.
    public var guestPrefix: String { self == .go ? "" : "passthrough/" }
}

/// What to do with symbolic links in a share's source path.
public enum SourceSymlinkPolicy: String, Sendable, Equatable, CaseIterable {
    /// Resolve them as Kata does (`EvalSymlinks`), but never through /proc magic links;
    /// the resolved object is then checked and bound by descriptor.
    case follow
    /// Refuse any source path that contains a symbolic link.
    case refuse
}

/// Everything a ``LinuxFilesystemSharer`` needs to know about its host and hypervisor.
public struct SharerConfiguration: Sendable, Equatable {
    /// Kata's default host root: `/run/kata-containers/shared/sandboxes`.
    public static let defaultRoot: FilePath = "/run/kata-containers/shared/sandboxes"
    /// Kata's guest mount point of the shared filesystem (with Kata's trailing slash).
    public static let defaultGuestSharedDir = "/run/kata-containers/shared/containers/"
    /// The virtio-fs / 9p tag.
    public static let defaultMountTag = "kataShared"

    /// The host directory holding one subdirectory per sandbox.
    public var root: FilePath
    /// How the sandbox reaches the guest: virtio-fs, 9p, or none (copy mode through the agent).
    public var sharedFilesystem: SharedFilesystem
    /// The driver block-device rootfs are attached with; it decides the `Storage` driver and source form.
    public var blockDeviceDriver: BlockDeviceDriver
    /// Where the guest mounts the shared filesystem.
    public var guestSharedDir: String
    /// The virtio-fs / 9p tag the guest mounts the export by.
    public var mountTag: String
    /// Size of the sandbox `/dev/shm` in bytes; 0 emits no shm storage.
    public var shmSize: UInt64
    /// How read-only shares are made read-only (detached mount API, or Kata's legacy bind + remount).
    public var mountMethod: MountMethod
    /// Whether a share source reached through symbolic links is followed (and reported) or refused.
    public var sourceSymlinks: SourceSymlinkPolicy
    /// The Kata runtime whose layout and guest paths the sandbox follows.
    public var layoutStyle: SandboxLayoutStyle
    /// Shared-filesystem modes: kubelet atomic-writer volumes (configmap, secret, projected,
    /// downward-API) within these limits get Kata's `watchable-bind` mirror in the guest (see
    /// ``WatchableVolumes``); nil shares them plainly. Default: Kata's agent's limits.
    public var watchableLimits: WatchLimits? = WatchableVolumes.kataLimits

    /// A configuration; every parameter defaults to Kata's Go runtime's behaviour.
    ///
    /// - Parameters:
    ///   - root: the host directory holding one subdirectory per sandbox.
    ///   - sharedFilesystem: virtio-fs, 9p or none (copy mode).
    ///   - blockDeviceDriver: how block-device rootfs are attached.
    ///   - guestSharedDir: where the guest mounts the shared filesystem (Kata's trailing slash kept).
    ///   - mountTag: the virtio-fs / 9p tag.
    ///   - shmSize: bytes of the sandbox's `/dev/shm`; 0 emits no shm storage.
    ///   - mountMethod: how read-only shares are made.
    ///   - sourceSymlinks: what to do with share sources reached through symbolic links.
    ///   - layoutStyle: Kata's Go layout or runtime-rs's.
    public init(
        root: FilePath = SharerConfiguration.defaultRoot,
        sharedFilesystem: SharedFilesystem = .virtioFS(),
        blockDeviceDriver: BlockDeviceDriver = .virtioSCSI,
        guestSharedDir: String = SharerConfiguration.defaultGuestSharedDir,
        mountTag: String = SharerConfiguration.defaultMountTag,
        shmSize: UInt64 = 0,
        mountMethod: MountMethod = .automatic,
        sourceSymlinks: SourceSymlinkPolicy = .follow,
        layoutStyle: SandboxLayoutStyle = .go
    ) {
        self.root = root
        self.sharedFilesystem = sharedFilesystem
        self.blockDeviceDriver = blockDeviceDriver
        self.guestSharedDir = guestSharedDir
        self.mountTag = mountTag
        self.shmSize = shmSize
        self.mountMethod = mountMethod
        self.sourceSymlinks = sourceSymlinks
        self.layoutStyle = layoutStyle
    }
}
