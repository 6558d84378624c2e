#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import FSShareVM
import SystemPackage

/// Container rootfs from image files and from layers, in a real guest: squashfs, ext4 and a
/// SIF file's root partition on virtio-blk, erofs on virtio-scsi, each handed to QEMU as a
/// read-only raw disk (the SIF file limited to its partition) and never mounted on the host;
/// the agent finds each disk by the address in its block storage and mounts it read-only.
/// Then a three-layer stack shared over virtio-fs, assembled by the agent from the overlayfs
/// storage, compared with the flattened tree; two containers sharing two base layers.
struct RootfsRun {
    let dir: String
    let image: GuestImage
    let checks: Checks
    let narrate: Bool

    /// What every image holds.
    static let osRelease = "ID=fsshare-image\n"

    func run() {
        let n = Narrator(on: narrate)
        let tree = dir + "/tree"
        mkdirs(tree + "/etc")
        mkdirs(tree + "/usr/share/doc")
        writeFile(tree + "/etc/os-release", RootfsRun.osRelease)
        writeFile(tree + "/usr/share/doc/big", String(repeating: "0123456789abcdef", count: 64 * 1024))  // 1 MiB to read
        var images: [(name: String, path: String)] = []
        func make(_ name: String, _ argv: [String], _ path: String) {
            let r = Sys.run(argv)
            checks.check(r.status == 0, "rootfs: \(argv[0]) makes the \(name) image (\(r.output.suffix(200)))")
            if r.status == 0 { images.append((name, path)) }
        }
        make("squashfs", ["mksquashfs", tree, dir + "/app.sqfs", "-noappend", "-quiet", "-no-progress"], dir + "/app.sqfs")
        _ = Sys.run(["truncate", "-s", "8M", dir + "/app.ext4"])
        make("ext4", ["mkfs.ext4", "-q", "-F", "-d", tree, dir + "/app.ext4"], dir + "/app.ext4")
        make("erofs", ["mkfs.erofs", "--quiet", dir + "/app.erofs", tree], dir + "/app.erofs")
        if let squash = images.first(where: { $0.name == "squashfs" }) {
            // A SIF file whose root partition does not start at offset 0: a definition file first.
            let sif = SIFWriter.withRootPartition(readBytes(squash.path))
            writeBytes(dir + "/app.sif", sif.bytes())
            images.append(("sif", dir + "/app.sif"))
        }
        let (built, why) = LayerStack.build(in: dir + "/layers")
        checks.check(built != nil, "rootfs: build the layer stack (\(why))")

        // Each image recognised, and its extent given to QEMU as a read-only disk.
        var disks: [(name: String, path: String, disk: GuestDisk, inspected: RootfsImage)] = []
        for (i, img) in images.enumerated() {
            guard let inspected = checks.must("rootfs: inspect the \(img.name) image", { try RootfsImage.inspect(FilePath(img.path)) }) else { continue }
            let bus: GuestDisk.Bus = img.name == "erofs" ? .scsi(target: 0, lun: 1) : .virtioBlk(slot: UInt8(0x10 + i))
            disks.append((img.name, img.path, GuestDisk(path: FilePath(img.path), offset: inspected.offset, size: inspected.size, bus: bus), inspected))
        }

        var config = SharerConfiguration(root: FilePath(dir + "/sandboxes"), sharedFilesystem: .virtioFS())
        config.blockDeviceDriver = .virtioBlk
        let sandbox = "pod-rootfs"
        guard let sharer = checks.must("rootfs: create the sharer", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config) }) else { return }
        var scsiConfig = config
        scsiConfig.blockDeviceDriver = .virtioSCSI
        guard let scsiSharer = checks.must("rootfs: a sharer for virtio-scsi", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: scsiConfig) }) else { return }
        n.step("rootfs from image files: \(disks.map(\.name).joined(separator: ", ")) as read-only disks; layers over virtio-fs")
        guard checks.must("rootfs: prepare", { try sharer.prepareSync() }) != nil else { return }
        defer { _ = try? sharer.cleanupSync() }
        let hostMountsBefore = ((try? Sys.mountTable()) ?? []).count
        guard let guest = checks.must("rootfs: start QEMU with \(disks.count) disks", {
            try QEMUGuest(image: image, share: .virtioFS(source: sharer.layout.sharedDirectory, tag: config.mountTag), workDir: FilePath(dir + "/vm"), disks: disks.map(\.disk))
        }) else { return }
        defer { guest.stop() }
        guard let boot = checks.must("rootfs: the guest agent answers", { try guest.waitForAgent(timeout: .seconds(120)) }) else {
            print(QEMUGuest.tail(guest.consoleLog))
            return
        }
        figure("rootfs.boot", ms(boot))
        let agent = AgentClient(address: guest.agentAddress, callTimeout: .seconds(60))
        let probe = GuestCheckClient(address: guest.checkAddress)
        defer {
            agent.disconnect()
            probe.client.disconnect()
        }
        _ = checks.must("rootfs: CreateSandbox") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }

        // Images.
        for d in disks {
            let cid = "img-" + d.name
            let s = d.name == "erofs" ? scsiSharer : sharer
            guard let shared = checks.must("rootfs: share the \(d.name) image", {
                try s.shareRootFilesystemSync(container: Container(id: cid, rootfs: .image(FilePath(d.path), deviceAddress: d.disk.deviceAddress)))
            }) else { continue }
            let st = shared.containerStorages.first
            n.say("  \(d.name): \(d.inspected.summary) -> Storage{driver: \(st?.driver ?? "?"), source: \(st?.source ?? "?"), fstype: \(st?.fstype ?? "?"), options: \(st?.options ?? [])}")
            let t0 = Sys.monotonicNanoseconds()
            guard checks.must("rootfs: CreateContainer mounts the \(d.name) disk at \(d.disk.deviceAddress)", { try agent.createContainer(id: cid, storages: shared.containerStorages) }) != nil else {
                print(QEMUGuest.tail(guest.consoleLog))
                continue
            }
            let mounted = Sys.monotonicNanoseconds() - t0
            let hostNow = ((try? Sys.mountTable()) ?? []).count
            checks.check(hostNow == hostMountsBefore, "rootfs: the \(d.name) image is mounted in the guest only, never on the host (\(hostNow) host mounts, \(hostMountsBefore) before)")
            let t1 = Sys.monotonicNanoseconds()
            let read = try? probe.probe(.read, shared.guestPath + "/etc/os-release")
            let firstRead = Sys.monotonicNanoseconds() - t1
            checks.check(read?.text == RootfsRun.osRelease, "rootfs: the guest reads the \(d.name) image's rootfs (\(read?.description ?? "no answer"))")
            let t2 = Sys.monotonicNanoseconds()
            let big = try? probe.probe(.read, shared.guestPath + "/usr/share/doc/big")
            let bigRead = Sys.monotonicNanoseconds() - t2
            checks.check(big?.data.count == 1 << 20, "rootfs: the guest reads 1 MiB from the \(d.name) image (\(big?.data.count ?? -1) bytes)")
            let fstype = try? probe.probe(.fstype, shared.guestPath).text
            checks.check(fstype == d.inspected.filesystemType, "rootfs: the guest mounted it as \(d.inspected.filesystemType) (saw \(fstype ?? "?"))")
            let w = try? probe.probe(.write, shared.guestPath + "/etc/os-release", data: Array("x".utf8))
            let c = try? probe.probe(.create, shared.guestPath + "/etc/new", data: Array("x".utf8))
            checks.check(w?.errno == EROFS && c?.errno == EROFS, "rootfs: writes to the \(d.name) rootfs get EROFS (write \(w?.description ?? "?"), create \(c?.description ?? "?"))")
            figure("rootfs.\(d.name).mount", ms(mounted))
            figure("rootfs.\(d.name).first-read", ms(firstRead))
            figure("rootfs.\(d.name).read-1MiB", ms(bigRead))
            n.say("    mounted in \(ms(mounted)) (CreateContainer round trip), first read \(ms(firstRead)), 1 MiB in \(ms(bigRead))")
            _ = checks.must("rootfs: RemoveContainer \(cid)") { try agent.removeContainer(id: cid) }
            let gone = (try? probe.probe(.mounts, shared.guestPath).names) ?? ["?"]
            checks.check(gone.isEmpty, "rootfs: the \(d.name) rootfs is unmounted in the guest (\(gone))")
            _ = checks.must("rootfs: unshare \(cid)") { try s.unshareRootFilesystemSync(container: Container(id: cid, rootfs: .image(FilePath(d.path), deviceAddress: d.disk.deviceAddress))) }
        }
        // --host-mount: the ext4 image on a host loop device, reaching the guest over virtio-fs.
        if let ext4 = images.first(where: { $0.name == "ext4" }) {
            let h = Container(id: "img-on-host", rootfs: .imageOnHost(FilePath(ext4.path)))
            if let shared = checks.must("rootfs: share the ext4 image mounted on the host", { try sharer.shareRootFilesystemSync(container: h) }) {
                let r = try? probe.await(.read, shared.guestPath + "/etc/os-release", timeout: .seconds(10)) { $0.errno == 0 }
                checks.check(r?.0.text == RootfsRun.osRelease, "rootfs: the guest reads the host-mounted image over virtio-fs (\(r?.0.description ?? "no answer"))")
                let w = try? probe.probe(.create, shared.guestPath + "/etc/new", data: Array("x".utf8))
                checks.check(w?.errno == EROFS, "rootfs: writes to it get EROFS in the guest (\(w?.description ?? "?"))")
                _ = checks.must("rootfs: unshare the host-mounted image") { try sharer.unshareRootFilesystemSync(container: h) }
            }
        }
        let hostMountsAfter = ((try? Sys.mountTable()) ?? []).count
        checks.check(hostMountsAfter == hostMountsBefore, "rootfs: no image is left mounted on the host (\(hostMountsBefore) mounts before, \(hostMountsAfter) after)")
        // A storage naming a disk that is not there: a clear error in time, nothing mounted
        // (the agent waits 10 s for a hot-plug; the demo skips it).
        if !narrate {
        let missing = Storages.imageRootfs(containerID: "nodisk", deviceAddress: "1f", image: disks.first?.inspected ?? RootfsImage(format: .squashfs, offset: 0, size: 0),
                                           driver: .virtioBlk, guestSharedDir: config.guestSharedDir)
        let m0 = Sys.monotonicNanoseconds()
        checks.mustFail("rootfs: a block storage naming an empty PCI slot fails") { try agent.createContainer(id: "nodisk", storages: [missing]) }
        figure("rootfs.missing-disk-error", ms(Sys.monotonicNanoseconds() - m0))
        }

        // Layers.
        guard let stack = built else { return }
        n.step("layered rootfs: two containers on one base, assembled by the agent in the guest")
        let a = Container(id: "lay-a", rootfs: .layers(stack.stackA.map { FilePath($0) }))
        let b = Container(id: "lay-b", rootfs: .layers(stack.stackB.map { FilePath($0) }))
        guard let sa = checks.must("rootfs: share A's layers", { try sharer.shareRootFilesystemSync(container: a) }),
              let sb = checks.must("rootfs: share B's layers", { try sharer.shareRootFilesystemSync(container: b) })
        else { return }
        let layerShares = ((try? sharer.sharesSync()) ?? []).filter { $0.record.kind == .layer }
        checks.check(layerShares.count == 4, "rootfs: two containers sharing two base layers make exactly one host share per layer (\(layerShares.count))")
        n.say("  layer shares on the host: \(layerShares.map(\.record.name))")
        for (c, s) in [(a, sa), (b, sb)] {
            let t0 = Sys.monotonicNanoseconds()
            guard checks.must("rootfs: CreateContainer assembles \(c.id)'s overlay", { try agent.createContainer(id: c.id, storages: s.containerStorages) }) != nil else {
                print(QEMUGuest.tail(guest.consoleLog))
                continue
            }
            figure("rootfs.\(c.id).assemble", ms(Sys.monotonicNanoseconds() - t0))
        }
        func guestTree(_ root: String) -> [String: String] {
            var out: [String: String] = [:]
            func walk(_ rel: String) {
                let path = rel.isEmpty ? root : root + "/" + rel
                guard let names = try? probe.probe(.list, path).names else { return }
                for name in names where name != "." && name != ".." {
                    let r = rel.isEmpty ? name : rel + "/" + name
                    guard let st = try? probe.probe(.stat, root + "/" + r), st.errno == 0 else { out[r] = "?"; continue }
                    switch st.mode & UInt32(S_IFMT) {
                    case UInt32(S_IFDIR):
                        out[r] = "d"
                        walk(r)
                    case UInt32(S_IFREG): out[r] = "f:" + ((try? probe.probe(.read, root + "/" + r))?.text ?? "?")
                    default: out[r] = "o:" + String(st.mode, radix: 8)
                    }
                }
            }
            walk("")
            return out
        }
        let treeA = guestTree(sa.guestPath), treeB = guestTree(sb.guestPath)
        let diffA = LayerStack.difference(treeA, LayerStack.expectedA), diffB = LayerStack.difference(treeB, LayerStack.expectedB)
        checks.check(diffA == nil, "rootfs: A's rootfs in the guest equals the flattened three-layer tree, whiteout and opaque directory included (\(diffA ?? "equal"))")
        checks.check(diffB == nil, "rootfs: B's rootfs in the guest equals its flattened tree (\(diffB ?? "equal"))")
        let fstype = try? probe.probe(.fstype, sa.guestPath).text
        checks.check(fstype == "overlay", "rootfs: A's rootfs is an overlay in the guest (\(fstype ?? "?"))")
        // The writable layer is the guest's: a write in A reaches neither B nor the host layers.
        let created = try? probe.probe(.create, sa.guestPath + "/etc/written-by-a", data: Array("a\n".utf8))
        checks.check(created?.errno == 0, "rootfs: A's rootfs is writable in the guest (\(created?.description ?? "?"))")
        let deleted = try? probe.probe(.unlink, sa.guestPath + "/opt/keep/a")
        checks.check(deleted?.errno == 0, "rootfs: A can delete a file of a lower layer (\(deleted?.description ?? "?"))")
        checks.check((try? probe.probe(.read, sb.guestPath + "/etc/written-by-a"))?.errno == ENOENT && (try? probe.probe(.read, sb.guestPath + "/opt/keep/a"))?.text == "a from base\n",
                     "rootfs: B sees neither A's new file nor A's deletion")
        checks.check(readFile(stack.appA + "/etc/written-by-a") == nil && readFile(stack.base + "/opt/keep/a") == "a from base\n", "rootfs: the host's layers are untouched")

        // Unsharing A keeps B's rootfs intact.
        _ = checks.must("rootfs: RemoveContainer A") { try agent.removeContainer(id: a.id) }
        _ = checks.must("rootfs: unshare A's rootfs") { try sharer.unshareRootFilesystemSync(container: a) }
        let left = ((try? sharer.sharesSync()) ?? []).filter { $0.record.kind == .layer }.count
        checks.check(left == 3, "rootfs: A's own layer went, the two shared ones stayed (\(left) layer shares)")
        let after = LayerStack.difference(guestTree(sb.guestPath), LayerStack.expectedB)
        checks.check(after == nil, "rootfs: B's rootfs is intact after A is unshared (\(after ?? "equal"))")
        _ = checks.must("rootfs: RemoveContainer B") { try agent.removeContainer(id: b.id) }
        _ = checks.must("rootfs: unshare B's rootfs") { try sharer.unshareRootFilesystemSync(container: b) }

        // A host upper directory: what the container writes lands in it.
        let upper = dir + "/upper-c"
        mkdirs(upper)
        let c = Container(id: "lay-c", rootfs: .layers([FilePath(stack.base), FilePath(stack.mid)], upper: FilePath(upper)))
        if let sc = checks.must("rootfs: share C's layers with a host upper directory", { try sharer.shareRootFilesystemSync(container: c) }) {
            if checks.must("rootfs: CreateContainer assembles C's overlay on the shared upper", { try agent.createContainer(id: c.id, storages: sc.containerStorages) }) != nil {
                let w = try? probe.probe(.create, sc.guestPath + "/etc/from-guest", data: Array("upper\n".utf8))
                checks.check(w?.errno == 0 && readFile(upper + "/fs/etc/from-guest") == "upper\n",
                             "rootfs: C's write lands in the host upper directory (\(w?.description ?? "?"), host: \(readFile(upper + "/fs/etc/from-guest") ?? "nothing"))")
                _ = checks.must("rootfs: RemoveContainer C") { try agent.removeContainer(id: c.id) }
            } else {
                print(QEMUGuest.tail(guest.consoleLog))
            }
            _ = checks.must("rootfs: unshare C's rootfs") { try sharer.unshareRootFilesystemSync(container: c) }
        }

        _ = checks.must("rootfs: DestroySandbox") { try agent.destroySandbox() }
        guest.stop()
        _ = checks.must("rootfs: cleanup") { try sharer.cleanupSync() }
        let leaks = (try? Inventory.mountPoints(under: config.root)) ?? ["?"]
        checks.check(leaks.isEmpty, "rootfs: no mount left under the root (\(leaks))")
    }
}
