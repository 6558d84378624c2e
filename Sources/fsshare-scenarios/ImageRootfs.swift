#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SystemPackage

extension Scenarios {
    /// Image rootfs on the host side: a squashfs image and a SIF file are recognised, never
    /// mounted, and get Kata's block storage with the detected filesystem and `ro`; the sandbox
    /// holds only the guest's mount-point directory; refusals change nothing; unshare and
    /// cleanup leave nothing.
    func imageRootfs() {
        let tree = work + "/tree"
        mkdirs(tree + "/etc")
        writeFile(tree + "/etc/os-release", "ID=image-test\n")
        let squash = work + "/app.sqfs"
        let made = Sys.run(["mksquashfs", tree, squash, "-noappend", "-quiet", "-no-progress"])
        checks.check(made.status == 0, "mksquashfs made the image (\(made.output))")
        guard made.status == 0 else { return }
        let sif = work + "/app.sif"
        let squashBytes = readBytes(squash)
        let writer = SIFWriter(objects: [
            SIFWriter.Object(datatype: 0x4001, data: Array("Bootstrap: scratch\n".utf8), name: "deffile"), .partition(squashBytes),
        ])
        writeBytes(sif, writer.bytes())
        let notImage = work + "/notes.ext4"
        writeFile(notImage, String(repeating: "not an image\n", count: 400))

        var c = config()
        c.blockDeviceDriver = .virtioBlk
        guard let sharer = checks.must("sharer", { try LinuxFilesystemSharer(sandboxID: "img", configuration: c) }),
              checks.must("prepare", { try sharer.prepareSync() }) != nil else { return }
        let mountsBefore = mountsUnder(root)

        let app = Container(id: "app", rootfs: .image(FilePath(squash), deviceAddress: "02/00"))
        guard let shared = checks.must("share a squashfs image rootfs", { try sharer.shareRootFilesystemSync(container: app) }) else { return }
        let storage = shared.containerStorages.first
        checks.check(shared.containerStorages.count == 1 && storage?.driver == "blk" && storage?.source == "02/00" && storage?.fstype == "squashfs"
                     && storage?.options == ["ro"] && storage?.mountPoint == "/run/kata-containers/shared/containers/app",
                     "Storage{blk, source: the disk's PCI path, fstype: squashfs, options: [ro], mount_point: <guest dir>/app} (\(shared.containerStorages))")
        checks.check(shared.guestPath == "/run/kata-containers/shared/containers/app", "the rootfs's guest path is the mount point (\(shared.guestPath))")
        checks.check(shared.rootfsImage == RootfsImage(format: .squashfs, offset: 0, size: Int64(squashBytes.count)), "the image as recognised (\(shared.rootfsImage?.summary ?? "nil"))")
        checks.check(mountsUnder(root) == mountsBefore, "nothing was mounted on the host")
        let dir = sharer.layout.mountsDirectory.appending("app")
        checks.check((try? Sys.statx(nil, dir))?.kind == .directory, "mounts/app exists for the guest's mount point")
        let record = (try? sharer.sharesSync())?.first { $0.record.name == "app" }?.record
        checks.check(record?.kind == .rootfsImage && record?.source == squash && record?.readOnly == true, "the manifest records the image (\(String(describing: record)))")
        let again = try? sharer.shareRootFilesystemSync(container: app)
        checks.check(again == shared, "sharing it again returns the same")
        checks.mustFail("another image for the same container is a conflict") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "app", rootfs: .image(FilePath(sif), deviceAddress: "02/00")))
        }

        // SIF: the partition's extent, the partition's filesystem.
        let job = Container(id: "job", rootfs: .image(FilePath(sif), deviceAddress: "03/00"))
        let fromSIF = checks.must("share a SIF image rootfs") { try sharer.shareRootFilesystemSync(container: job) }
        checks.check(fromSIF?.rootfsImage?.offset == Int64(writer.dataOffsets()[1]) && fromSIF?.rootfsImage?.size == Int64(squashBytes.count)
                     && fromSIF?.containerStorages.first?.fstype == "squashfs",
                     "the SIF root partition's extent and filesystem (\(fromSIF?.rootfsImage?.summary ?? "nil"))")

        // Refusals change nothing.
        let before = listTree(root)
        checks.mustFail("a file that is not an image is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad", rootfs: .image(FilePath(notImage), deviceAddress: "04/00")))
        }
        checks.mustFail("an image without the attached disk's address is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad", rootfs: .image(FilePath(squash), deviceAddress: "")))
        }
        checks.check(listTree(root) == before, "the refusals left the sandbox as it was")

        _ = checks.must("unshare the image rootfs") { try sharer.unshareRootFilesystemSync(container: app) }
        checks.check((try? Sys.statx(nil, dir)) == nil, "mounts/app is gone")
        checks.check((try? sharer.sharesSync())?.contains { $0.record.name == "app" } == false, "the record is gone")
        _ = checks.must("cleanup") { try sharer.cleanupSync() }
        expectNothingLeft("after cleanup")
    }
}
