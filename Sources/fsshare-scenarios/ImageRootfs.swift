#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SystemPackage

extension Scenarios {
    /// A tree with `etc/os-release`, its squashfs image and a SIF file wrapping it, under the
    /// work directory; nil (with a failed check) when mksquashfs fails.
    func squashfsAndSIF(osRelease: String) -> (tree: String, squash: String, sif: String, writer: SIFWriter, squashBytes: [UInt8])? {
        let tree = work + "/tree"
        mkdirs(tree + "/etc")
        writeFile(tree + "/etc/os-release", osRelease)
        let squash = work + "/app.sqfs"
        let made = Sys.run(["mksquashfs", tree, squash, "-noappend", "-quiet", "-no-progress"])
        checks.check(made.status == 0, "mksquashfs made the image (\(made.output))")
        guard made.status == 0 else { return nil }
        let sif = work + "/app.sif"
        let squashBytes = readBytes(squash)
        let writer = SIFWriter.withRootPartition(squashBytes)
        writeBytes(sif, writer.bytes())
        return (tree, squash, sif, writer, squashBytes)
    }

    /// Image rootfs on the host side: a squashfs image and a SIF file are recognised, never
    /// mounted, and get Kata's block storage with the detected filesystem and `ro`; the sandbox
    /// holds only the guest's mount-point directory; refusals change nothing; unshare and
    /// cleanup leave nothing.
    func imageRootfs() {
        guard let (_, squash, sif, writer, squashBytes) = squashfsAndSIF(osRelease: "ID=image-test\n") else { return }
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

    /// `--host-mount`: the image (a SIF file's partition too) on a read-only autoclear loop
    /// device, mounted detached and bound at mounts/<cid>/rootfs read-only; unshare and cleanup
    /// free the device; refusals bind no device.
    func imageOnHost() {
        guard let (tree, squash, sif, writer, _) = squashfsAndSIF(osRelease: "ID=host-mounted\n") else { return }
        guard let sharer = checks.must("sharer", { try LinuxFilesystemSharer(sandboxID: "hm", configuration: config()) }),
              checks.must("prepare", { try sharer.prepareSync() }) != nil else { return }
        let shared = sharer.layout.sharedDirectory.string

        let h1 = Container(id: "h1", rootfs: .imageOnHost(FilePath(squash)))
        guard let s1 = checks.must("share a squashfs image mounted on the host", { try sharer.shareRootFilesystemSync(container: h1) }) else { return }
        checks.check(s1.guestPath == "/run/kata-containers/shared/containers/h1/rootfs" && s1.containerStorages.isEmpty,
                     "shared like a host-mounted rootfs: guest path <guest dir>/h1/rootfs, no storage (\(s1.guestPath))")
        checks.check(readFile(shared + "/h1/rootfs/etc/os-release") == "ID=host-mounted\n", "the export shows the image's content")
        let entry = ((try? Sys.mountTable()) ?? []).first { $0.mountPoint == sharer.layout.mountsDirectory.string + "/h1/rootfs" }
        checks.check(entry?.fstype == "squashfs" && entry?.source.hasPrefix("/dev/loop") == true && entry?.isReadOnly == true
                     && (entry?.mountOptions.contains("nosuid") ?? false) && (entry?.mountOptions.contains("nodev") ?? false),
                     "mounted read-only, nosuid, nodev from a loop device (\(entry.map { "\($0.source) \($0.fstype) \($0.mountOptions)" } ?? "not mounted"))")
        let loop1 = entry?.source ?? "?"
        let sys1 = "/sys/block/\(loop1.dropFirst(5))"
        checks.check(readFile(sys1 + "/ro") == "1\n" && readFile(sys1 + "/loop/autoclear") == "1\n" && readFile(sys1 + "/loop/backing_file") == squash + "\n",
                     "the loop device is read-only, autoclear, backed by the image (\(sys1))")
        let w = Sys.run(["sh", "-c", "echo x > '\(shared)/h1/rootfs/etc/os-release'"])
        checks.check(w.status != 0 && w.output.contains("Read-only"), "writes are refused (\(w.output.split(separator: "\n").first ?? ""))")
        let record = (try? sharer.sharesSync())?.first { $0.record.name == "h1/rootfs" }?.record
        checks.check(record?.kind == .rootfsHostImage && record?.destination == loop1, "the manifest records the loop device (\(String(describing: record)))")
        let again = try? sharer.shareRootFilesystemSync(container: h1)
        checks.check(again?.guestPath == s1.guestPath && loopDevices(backedBy: squash).count == 1, "sharing it again binds no second device")

        let h2 = Container(id: "h2", rootfs: .imageOnHost(FilePath(sif)))
        if checks.must("share a SIF file's root partition mounted on the host", { try sharer.shareRootFilesystemSync(container: h2) }) != nil {
            checks.check(readFile(shared + "/h2/rootfs/etc/os-release") == "ID=host-mounted\n", "the SIF partition's content is exported")
            let loops = loopDevices(backedBy: sif)
            let offset = loops.first.flatMap { readFile("/sys/block/\($0)/loop/offset") }
            checks.check(loops.count == 1 && offset == "\(writer.dataOffsets()[1])\n", "the loop device starts at the partition's offset (\(loops) offset \(offset ?? "?"))")
        }

        let boundBefore = loopDevices(backedBy: nil).count
        let notImage = work + "/notes.img"
        writeFile(notImage, String(repeating: "not an image\n", count: 400))
        checks.mustFail("a file that is not an image is refused") { _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad", rootfs: .imageOnHost(FilePath(notImage)))) }
        checks.mustFail("a directory is refused") { _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad", rootfs: .imageOnHost(FilePath(tree)))) }
        checks.mustFail("another rootfs for h1 is a conflict") { _ = try sharer.shareRootFilesystemSync(container: Container(id: "h1", rootfs: .imageOnHost(FilePath(sif)))) }
        checks.check(loopDevices(backedBy: nil).count == boundBefore && (try? Sys.statx(nil, sharer.layout.mountsDirectory.appending("bad"))) == nil,
                     "the refusals bound no loop device and made no entry")

        _ = checks.must("unshare h1") { try sharer.unshareRootFilesystemSync(container: h1) }
        checks.check(eventuallyTrue { loopDevices(backedBy: squash).isEmpty }, "unshare frees the loop device (\(loopDevices(backedBy: squash)))")
        _ = checks.must("cleanup with h2 still shared") { try sharer.cleanupSync() }
        checks.check(eventuallyTrue { loopDevices(backedBy: sif).isEmpty }, "cleanup frees h2's loop device (\(loopDevices(backedBy: sif)))")
        expectNothingLeft("after cleanup")
    }
}

/// Loop devices (`loopN`) bound to `file` (any file when nil), from sysfs.
func loopDevices(backedBy file: String?) -> [String] {
    let names = ((try? Sys.listDirectory(nil, "/sys/block")) ?? []).map(\.name).filter { $0.hasPrefix("loop") }
    return names.filter { n in
        guard let b = readFile("/sys/block/\(n)/loop/backing_file") else { return false }
        return file.map { b == $0 + "\n" } ?? true
    }.sorted()
}

/// Polls `condition` for up to 2 s (a loop device's autoclear can trail its last close).
func eventuallyTrue(_ condition: () -> Bool) -> Bool {
    for _ in 0..<100 {
        if condition() { return true }
        usleep(20_000)
    }
    return condition()
}
