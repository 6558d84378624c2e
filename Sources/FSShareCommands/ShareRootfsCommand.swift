#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareSystem
import SystemPackage

/// Which rootfs kind the command line describes.
struct RootfsOptions: ParsableArguments {
    @Option(name: .long, help: "A host-mounted rootfs (overlay mount or plain directory) to bind.") var dir: String?
    @Option(name: .long, help: "Guest address of a block-device rootfs (PCI path, SCSI address, /dev/vdX or CCW devno).") var blockDevice: String?
    @Option(name: .long, help: "Filesystem of the block device.") var fstype: String?
    @Option(name: .long, help: "Rootfs suffix under the device root.") var suffix: String = "rootfs"
    @Option(name: .long, help: "Image reference for guest pull.") var guestPull: String?
    @Option(name: .long, help: "key=value annotation passed as guest-pull metadata (repeatable).") var annotation: [String] = []
    @Option(name: .long, help: "A rootfs image file (squashfs, ext2/3/4, erofs or SIF), recognised from its bytes; attached to the VM read-only, never mounted on the host.") var image: String?
    @Option(name: .long, help: "With --image: the guest address the attached disk got (PCI path, SCSI address, /dev/vdX or CCW devno).") var deviceAddress: String?
    @Flag(name: .long, help: "With --image, for hypervisors without disk hot-plug: mount the image on the host (read-only loop device, autoclear) and share it like --dir. This trusts the image: the host kernel parses it.") var hostMount = false
    @Option(name: .long, help: "A layer directory of a layered rootfs, lowest first (repeatable); each layer is shared read-only once per sandbox and the guest assembles the overlay.") var layer: [String] = []
    @Option(name: .long, help: "With --layer: a host directory for the writable upper layer (fsshare makes fs/ and work/ in it); without it the upper layer lives in the guest.") var upper: String?

    func validate() throws {
        let kinds = [dir != nil, blockDevice != nil, guestPull != nil, image != nil, !layer.isEmpty].filter { $0 }.count
        guard kinds == 1 else { throw ValidationError("give exactly one of --dir, --block-device, --guest-pull, --image or --layer") }
        if upper != nil && layer.isEmpty { throw ValidationError("--upper goes with --layer") }
        if image != nil && deviceAddress == nil && !hostMount {
            throw ValidationError("--image needs --device-address (attach the image's byte range, which fsshare inspect-image prints, read-only to the VM first) or --host-mount")
        }
        if hostMount && (image == nil || deviceAddress != nil) { throw ValidationError("--host-mount goes with --image and without --device-address") }
        if deviceAddress != nil && image == nil { throw ValidationError("--device-address goes with --image") }
        if blockDevice != nil && fstype == nil { throw ValidationError("--block-device needs --fstype") }
        for a in annotation where !a.contains("=") { throw ValidationError("--annotation must be key=value") }
    }

    var rootfs: Rootfs {
        if let dir { return .hostMounted(FilePath(dir)) }
        if let blockDevice { return .blockDevice(BlockDevice(address: blockDevice, fstype: fstype ?? ""), suffix: suffix) }
        if let image { return hostMount ? .imageOnHost(FilePath(image)) : .image(FilePath(image), deviceAddress: deviceAddress ?? "") }
        if !layer.isEmpty { return .layers(layer.map { FilePath($0) }, upper: upper.map { FilePath($0) }) }
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
            blk/scsi/mmioblk/blk-ccw storage (xfs gets nouuid); --guest-pull emits image_guest_pull; \
            --image checks a rootfs image (squashfs, ext2/3/4, erofs, SIF) and emits the block storage \
            of the disk it was attached as, read-only, with the detected filesystem (--host-mount instead \
            mounts it on the host through a read-only loop device and binds it like --dir); --layer (repeated, \
            lowest first) shares each layer read-only once per sandbox (counted per container) and emits \
            the overlayfs storage the guest assembles the rootfs from (upper layer in the guest, or in \
            --upper DIR).

            Examples:
              fsshare share-rootfs --root /run/fsshare --sandbox pod1 --container web --dir /run/containerd/web/rootfs
              fsshare share-rootfs --root /run/fsshare --sandbox pod1 --container db --block-device 0:0:0:1 --fstype xfs --json
              fsshare share-rootfs --root /run/fsshare --sandbox pod1 --container app --layer /layers/base --layer /layers/app
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
        var fields: [(String, JSON)] = [("guest_path", .string(shared.guestPath))] + resolved.fields
        var text = [shared.guestPath] + resolved.text
        if let image = shared.rootfsImage {
            fields.append(("image", ImageFields.json(image)))
            text.append("image: \(image.summary)")
        }
        try emit(common, format: format, fields: fields, storages: shared.containerStorages, text: text)
    }
}
