import FSShareProto
import SystemPackage

/// The Kata agent's `Storage` message (agent.proto, package `grpc`).
public typealias Storage = Grpc_Storage

/// An OCI mount of a container, as the runtime hands it to the sharer.
public struct Mount: Sendable, Equatable {
    /// Host path of the bind source.
    public var source: FilePath
    /// Where the container sees it.
    public var destination: FilePath
    /// OCI mount type; only `bind` mounts are shared.
    public var type: String
    /// OCI options: `ro` makes the share read-only (in the guest too), `rbind` recursive.
    public var options: [String]

    /// An OCI mount.
    ///
    /// - Parameters:
    ///   - source: host path of the bind source.
    ///   - destination: where the container sees it.
    ///   - type: the OCI mount type; only `bind` is shared.
    ///   - options: OCI options (`ro`, `rbind`, ...).
    public init(source: FilePath, destination: FilePath, type: String = "bind", options: [String] = []) {
        self.source = source
        self.destination = destination
        self.type = type
        self.options = options
    }

    /// The mount asks to be read-only (`ro`).
    public var isReadOnly: Bool { options.contains("ro") }
    /// The mount asks for a recursive bind (`rbind`).
    public var isRecursive: Bool { options.contains("rbind") }
}

/// A block device that holds a container's rootfs, already attached to the VM by the runtime.
public struct BlockDevice: Sendable, Equatable {
    /// The guest address in the form the block driver uses: PCI path (`virtio-blk`),
    /// SCSI address (`virtio-scsi`), `/dev/vdX` (`virtio-mmio`) or device number (`virtio-blk-ccw`).
    public var address: String
    /// Filesystem on the device (`ext4`, `xfs`, ...).
    public var fstype: String
    /// A block device at `address` holding a `fstype` filesystem.
    ///
    /// - Parameters:
    ///   - address: the guest address in the block driver's form.
    ///   - fstype: the filesystem on the device.
    public init(address: String, fstype: String) {
        self.address = address
        self.fstype = fstype
    }
}

/// Where a container's root filesystem comes from.
public enum Rootfs: Sendable, Equatable {
    /// A rootfs already mounted (or a plain directory) on the host: bound to `mounts/<cid>/rootfs`.
    case hostMounted(FilePath)
    /// A block device: the guest agent mounts it; `suffix` is Kata's rootfs suffix under the
    /// device root (`rootfs`, or empty when the device root is the rootfs).
    case blockDevice(BlockDevice, suffix: String = "rootfs")
    /// The guest pulls the image itself (`image_guest_pull`). `annotations` become the pull's metadata.
    case guestPull(image: String, annotations: [String: String] = [:])
    /// A root filesystem image file (squashfs, ext2/3/4, erofs, or a SIF file's root filesystem
    /// partition), recognised from its bytes by ``RootfsImage/inspect(_:)``. The host never mounts
    /// it: the runtime attaches the byte range ``RootfsImage/offset`` ..< `offset + size` to the
    /// VM as a read-only raw disk (libvirt: a `<disk>` with `<readonly/>` and a storage slice),
    /// and passes the guest address the block driver gives it (PCI path, SCSI address, ...). The
    /// storage is Kata's block rootfs storage, with the detected filesystem type and `ro`.
    case image(FilePath, deviceAddress: String)
    /// A stack of layer directories, **lowest first** (as a graph driver or containerd's overlay
    /// snapshotter lays them out; whiteouts and opaque directories in overlayfs's own format).
    /// Each layer is shared read-only once per sandbox, however many containers use it (the
    /// manifest counts its users), and an `overlayfs` storage tells the agent to assemble the
    /// rootfs in the guest. The writable upper layer lives in the guest (Kata's
    /// `io.katacontainers.fs-opt.overlay-rw`: the agent makes it on its own `/run`) unless
    /// `upper` names a host directory for it: that is shared read-write, and fsshare makes
    /// `fs/` and `work/` in it for overlayfs's upper and work directories.
    case layers([FilePath], upper: FilePath? = nil)
    /// An image file mounted **on the host** and shared like a host-mounted rootfs (at
    /// `mounts/<cid>/rootfs`, read-only): the fallback for hypervisors that cannot hot-plug a
    /// disk. The image (or a SIF file's root partition) is bound to a read-only loop device with
    /// autoclear and mounted detached (`fsmount`) before it is moved into place. This trusts the
    /// image: the host kernel parses its filesystem. ``image(_:deviceAddress:)`` does not.
    case imageOnHost(FilePath)
}

/// A container as the sharer sees it: its id and its rootfs.
public struct Container: Sendable, Equatable {
    /// The container id (a valid id: it names directories and shares).
    public var id: String
    /// Where its root filesystem comes from.
    public var rootfs: Rootfs
    /// A container `id` whose root filesystem is `rootfs`.
    ///
    /// - Parameters:
    ///   - id: the container id.
    ///   - rootfs: where its root filesystem comes from.
    public init(id: String, rootfs: Rootfs) {
        self.id = id
        self.rootfs = rootfs
    }
}

/// The result of sharing something: where the guest finds it, and what the agent must mount.
public struct SharedFile: Sendable, Equatable {
    /// The path inside the guest.
    public var guestPath: String
    /// Storages for the container's rootfs (`CreateContainerRequest.storages`).
    public var containerStorages: [Storage]
    /// Storages for volumes.
    public var volumeStorages: [Storage]
    /// Copy mode: what was copied into the guest (nil when nothing was copied by this call,
    /// including when the share already existed).
    public var copyReport: CopyReport?
    /// Where the source really is, when reaching it followed symbolic links (under
    /// ``SourceSymlinkPolicy/follow``); nil when the source path has none.
    public var resolvedSource: FilePath?
    /// A kubelet atomic-writer volume in a shared-filesystem sandbox that did not get its
    /// `watchable-bind` mirror: why (over a limit, or mirrors turned off). The guest sees the
    /// plain share, where updates raise no inotify event.
    public var watchableFallback: String?
    /// An image rootfs: what the image was recognised as (its format and byte range).
    public var rootfsImage: RootfsImage?

    /// The outcome of a share; the sharer makes these, tests and other sharers may too.
    ///
    /// - Parameters:
    ///   - guestPath: the path inside the guest.
    ///   - containerStorages: storages for the container's rootfs.
    ///   - volumeStorages: storages for volumes.
    ///   - copyReport: copy mode: what was copied.
    ///   - resolvedSource: where the source really is, when symbolic links were followed.
    ///   - watchableFallback: why a kubelet volume got no `watchable-bind` mirror.
    public init(
        guestPath: String, containerStorages: [Storage] = [], volumeStorages: [Storage] = [], copyReport: CopyReport? = nil,
        resolvedSource: FilePath? = nil, watchableFallback: String? = nil
    ) {
        self.watchableFallback = watchableFallback
        self.guestPath = guestPath
        self.containerStorages = containerStorages
        self.volumeStorages = volumeStorages
        self.copyReport = copyReport
        self.resolvedSource = resolvedSource
    }
}

/// What a sandbox's manifest records about it, so that commands not told (`unshare`, `status`,
/// the node's `watch`) can find it.
public struct RecordedSandbox: Sendable, Equatable {
    /// The Kata runtime layout it was prepared with.
    public var layout: SandboxLayoutStyle
    /// Kata's name of its shared filesystem (`virtio-fs`, `virtio-9p`, `none`).
    public var sharedFilesystem: String?
    /// The agent address last given (`unix:PATH`, `hvsock:PATH:PORT`, ...): copy mode's channel,
    /// and in shared-filesystem modes the one `fsshare watch` pushes watchable mirrors through.
    public var agent: String?
    /// Where the guest keeps the shares.
    public var guestSharedDir: String?

    /// Copy mode (no shared filesystem).
    public var isCopyMode: Bool { sharedFilesystem == "none" }

    static let sharedFilesystemKey = "shared-fs"
    static let agentKey = "agent"
    static let guestDirectoryKey = "guest-dir"

    init(_ manifest: Manifest) {
        layout = manifest.style
        sharedFilesystem = manifest.settings[RecordedSandbox.sharedFilesystemKey]
        agent = manifest.settings[RecordedSandbox.agentKey]
        guestSharedDir = manifest.settings[RecordedSandbox.guestDirectoryKey]
    }
}

/// What became of an unshared share.
public enum UnshareOutcome: Sendable, Equatable {
    /// Unmounted and removed (or there was nothing to remove).
    case removed
    /// Copy mode with an agent that cannot remove (Kata's `AgentService` has no removal RPC):
    /// the copy stays in the guest at `guestPath` until the VM goes; `status` shows it.
    case leftInGuest(guestPath: String)
}

/// What a cleanup found (``LinuxFilesystemSharer/cleanup()`` discards it; the CLI reports it).
public enum CleanupOutcome: Sendable, Equatable {
    /// The sandbox's mounts and directories were removed.
    case cleaned
    /// There was no directory of that name: nothing to clean.
    case nothingToClean
    /// Only the empty directory a prepare killed before writing its manifest leaves; removed.
    case removedInterruptedPrepare
}

/// A share the manifest records, and whether it is mounted right now.
public struct ShareState: Sendable, Equatable {
    /// What the manifest records (source, kind, guest path, ...).
    public var record: ShareRecord
    /// Its mount is in place under `mounts/` (always false for copy-mode and rootfs-directory records).
    public var mounted: Bool
    /// A recorded share and whether it is mounted.
    ///
    /// - Parameters:
    ///   - record: what the manifest records.
    ///   - mounted: whether it is mounted now.
    public init(record: ShareRecord, mounted: Bool) {
        self.record = record
        self.mounted = mounted
    }
}

/// The operations of Kata's `FilesystemSharer`, made idempotent and crash-safe.
///
/// One sharer serves one sandbox. ``prepare()`` makes the sandbox tree; the share operations
/// bind-mount sources under `mounts/`, where the hypervisor's export of `shared/` shows them to
/// the guest; ``cleanup()`` removes every mount and directory, even after a crash.
public protocol FilesystemSharer: Sendable {
    /// Creates the sandbox tree and returns the sandbox-level storages (shared fs, shm).
    /// Calling it again is a no-op that returns the same storages.
    @discardableResult
    func prepare() async throws(FSShareError) -> [Storage]
    /// Unmounts and removes everything the sandbox made. Safe to call at any time, repeatedly.
    func cleanup() async throws(FSShareError)
    /// Shares a container's bind mount. Returns nil for mounts that are not host binds
    /// (non-`bind` types, `/dev/shm`), which the runtime should leave to the guest.
    func shareFile(container: Container, mount: Mount) async throws(FSShareError) -> SharedFile?
    /// Undoes ``shareFile(container:mount:)``; unsharing twice is not an error.
    func unshareFile(container: Container, mount: Mount) async throws(FSShareError)
    /// Shares a container's root filesystem and returns its guest path and storages.
    func shareRootFilesystem(container: Container) async throws(FSShareError) -> SharedFile
    /// Undoes ``shareRootFilesystem(container:)``; twice is not an error.
    func unshareRootFilesystem(container: Container) async throws(FSShareError)
    /// Starts keeping the sandbox's watched volumes (configmaps, secrets, projected and
    /// downward-API volumes) in sync in the guest, including those shared later by other
    /// processes (Kata's `StartFileEventWatcher`). Starting twice is a no-op.
    func startFileEventWatcher() async throws(FSShareError)
    /// Stops what ``startFileEventWatcher()`` started (Kata's `StopFileEventWatcher`); the guest
    /// keeps its last copies. Safe to call at any time, repeatedly.
    func stopFileEventWatcher() async
}

extension FilesystemSharer {
    /// A sharer without watched volumes has nothing to start.
    ///
    /// - Throws: nothing here; conformers that watch document their errors.
    public func startFileEventWatcher() async throws(FSShareError) {}
    /// A sharer without watched volumes has nothing to stop.
    public func stopFileEventWatcher() async {}
}
