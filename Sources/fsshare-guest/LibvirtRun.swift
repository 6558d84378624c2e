#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareLibvirt
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import FSShareVM
import SystemPackage

/// The same guest booted through libvirt's C API (`qemu:///embed`, no daemon): the hypervisor's
/// capabilities choose the shared-fs mode, the sandbox's `<filesystem>` is attached live after
/// boot, the agent mounts it from the descriptor, and it is detached live at the end.
struct LibvirtRun {
    let dir: String
    let image: GuestImage
    let checks: Checks

    func run() {
        // A short root: libvirt puts the virtiofsd socket at
        // ROOT/lib/qemu/domain-N-NAME/ALIAS-fs.sock, and a unix socket path has 107 bytes.
        var template = Array("/tmp/fslv.XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { checks.check(false, "libvirt: make a root for qemu:///embed"); return }
        let embedRoot = String(cString: made)
        defer { _ = Sys.run(["rm", "-rf", embedRoot]) }
        mkdirs(embedRoot + "/etc")
        // stdio_handler=file: embedded libvirt has no virtlogd. QEMU runs as root without a
        // security driver, as the rest of these tests do (9p and virtiofsd write as root).
        writeFile(embedRoot + "/etc/qemu.conf", """
            stdio_handler = "file"
            user = "root"
            group = "root"
            dynamic_ownership = 0
            security_driver = "none"
            namespaces = []

            """)
        let t0 = Sys.monotonicNanoseconds()
        guard let conn = checks.must("libvirt: open qemu:///embed", { try LibvirtConnection(uri: "qemu:///embed?root=\(embedRoot)") }) else { return }
        let kvm = Accelerator.detect() == .kvm
        guard let support = checks.must("libvirt: domain capabilities", {
            try conn.sharedFilesystemSupport(emulator: "/usr/bin/qemu-system-x86_64", arch: "x86_64", virtType: kvm ? "kvm" : "qemu")
        }) else { return }
        figure("libvirt.capabilities", ms(Sys.monotonicNanoseconds() - t0))
        checks.check(support.filesystemDriverTypes.contains("virtiofs"), "libvirt: QEMU offers virtiofs (driver types \(support.filesystemDriverTypes.sorted()))")
        let mode = support.preferred
        checks.check(mode == .virtioFS(), "libvirt: the capabilities choose virtio-fs (\(mode.name))")

        var config = SharerConfiguration(root: FilePath(dir + "/sandboxes"), sharedFilesystem: mode)
        config.blockDeviceDriver = .virtioBlk
        let sandbox = "pod-libvirt"
        guard let sharer = checks.must("libvirt: create the sharer", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config) }),
              checks.must("libvirt: prepare", { try sharer.prepareSync() }) != nil
        else { return }
        defer { _ = try? sharer.cleanupSync() }

        let vm = dir + "/vm"
        mkdirs(vm)
        let agentSocket = FilePath(vm + "/agent.sock"), checkSocket = FilePath(vm + "/check.sock")
        let console = FilePath(vm + "/console.log")
        let xml = LibvirtXML.sandboxDomain(
            name: "fsshare-\(sandbox)", kernel: image.kernel, initrd: image.initrd, memoryMiB: 512, kvm: kvm,
            channels: [(QEMUGuest.agentPortName, agentSocket), (QEMUGuest.checkPortName, checkSocket)], consoleLog: console)
        guard let domain = checks.must("libvirt: define the domain", { try conn.define(xml: xml) }) else { return }
        defer { _ = try? domain.undefine() }
        let started = Sys.monotonicNanoseconds()
        guard checks.must("libvirt: start the domain", { try domain.start() }) != nil else {
            print(QEMUGuest.tail(FilePath(embedRoot + "/log/qemu/fsshare-\(sandbox).log")))
            return
        }
        defer { if domain.isActive { _ = try? domain.destroy() } }
        figure("libvirt.start", ms(Sys.monotonicNanoseconds() - started))
        guard let boot = checks.must("libvirt: the guest agent answers", {
            try QEMUGuest.waitForAgent(.unix(agentSocket), since: started, timeout: .seconds(120), consoleLog: console) {
                domain.isActive ? nil : "the domain stopped"
            }
        }) else { return }
        figure("libvirt.boot", ms(boot))

        // Live attach of the sandbox's <filesystem>.
        guard let fsXML = LibvirtXML.filesystem(sharedDirectory: sharer.layout.sharedDirectory, tag: config.mountTag, mode: mode, alias: "share", virtiofsd: QEMUGuest.virtiofsdPath()) else {
            checks.check(false, "libvirt: a <filesystem> for \(mode.name)")
            return
        }
        let a0 = Sys.monotonicNanoseconds()
        guard checks.must("libvirt: attach the virtiofs <filesystem> live", { try domain.attachLive(deviceXML: fsXML) }) != nil else { return }
        figure("libvirt.attach", ms(Sys.monotonicNanoseconds() - a0))
        let live = (try? domain.xml()) ?? ""
        checks.check(live.contains("<target dir='\(config.mountTag)'/>") && live.contains(sharer.layout.sharedDirectory.string),
                     "libvirt: the live domain XML has the sandbox's filesystem")

        let agent = AgentClient(address: .unix(agentSocket), callTimeout: .seconds(30))
        let probe = GuestCheckClient(address: .unix(checkSocket))
        // Kata spells it with a trailing slash; mountinfo does not.
        let shared = FilePath(config.guestSharedDir).string
        _ = checks.must("libvirt: CreateSandbox with the virtio-fs storage") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }
        checks.check((try? probe.probe(.fstype, shared).text) == "virtiofs", "libvirt: the guest mounted the hot-plugged share at \(shared)")

        // A volume shared after the attach: seen, and read-only from inside.
        let src = dir + "/src"
        mkdirs(src + "/config")
        writeFile(src + "/config/app.conf", "from libvirt\n")
        let web = Container(id: "web", rootfs: .guestPull(image: "registry.example/web:1"))
        let mount = Mount(source: FilePath(src + "/config"), destination: "/etc/app", options: ["ro"])
        if let v = checks.must("libvirt: share an ro volume", { try sharer.shareFileSync(container: web, mount: mount) }), let v {
            let r = try? probe.await(.read, v.guestPath + "/app.conf", timeout: .seconds(10)) { $0.errno == 0 }
            checks.check(r?.0.text == "from libvirt\n", "libvirt: the guest reads the volume")
            let w = try? probe.probe(.write, v.guestPath + "/app.conf", data: Array("x".utf8))
            checks.check(w?.errno == EROFS, "libvirt: the guest's write is refused with EROFS (\(w?.description ?? "no answer"))")
            _ = checks.must("libvirt: unshare the volume") { try sharer.unshareFileSync(container: web, mount: mount) }
        }

        imageRootfs(domain: domain, sharer: sharer, agent: agent, probe: probe)

        // Unmount in the guest, then unplug live.
        _ = checks.must("libvirt: DestroySandbox") { try agent.destroySandbox() }
        let d0 = Sys.monotonicNanoseconds()
        _ = checks.must("libvirt: detach the <filesystem> live") { try domain.detachLive(deviceXML: fsXML) }
        let detached = LibvirtRun.waitUntilGone(domain, "<target dir='\(config.mountTag)'/>")
        checks.check(detached, "libvirt: the filesystem left the live domain")
        if detached { figure("libvirt.detach", ms(Sys.monotonicNanoseconds() - d0)) }
        agent.disconnect()
        probe.client.disconnect()
        _ = checks.must("libvirt: destroy the domain") { try domain.destroy() }
        _ = checks.must("libvirt: cleanup") { try sharer.cleanupSync() }
        let leaks = (try? Inventory.mountPoints(under: config.root)) ?? ["?"]
        checks.check(leaks.isEmpty, "libvirt: no mount left under the root (\(leaks))")
    }

    /// A SIF file's root partition attached live as a read-only virtio disk (a libvirt storage
    /// slice: the guest never sees the rest of the file), found by the agent from the PCI path
    /// libvirt assigned, read in the guest, refused writes, then detached live.
    func imageRootfs(domain: LibvirtDomain, sharer: LinuxFilesystemSharer, agent: AgentClient, probe: GuestCheckClient) {
        let tree = dir + "/image-tree"
        mkdirs(tree + "/etc")
        writeFile(tree + "/etc/os-release", "ID=sif-over-libvirt\n")
        let squash = dir + "/job.sqfs", sif = dir + "/job.sif"
        let made = Sys.run(["mksquashfs", tree, squash, "-noappend", "-quiet", "-no-progress"])
        checks.check(made.status == 0, "libvirt: mksquashfs (\(made.output.suffix(200)))")
        guard made.status == 0 else { return }
        writeBytes(sif, SIFWriter.withRootPartition(readBytes(squash)).bytes())
        guard let image = checks.must("libvirt: inspect the SIF file", { try RootfsImage.inspect(FilePath(sif)) }) else { return }
        let diskXML = LibvirtXML.imageDisk(imagePath: FilePath(sif), image: image, target: "vdb", alias: "job-rootfs")
        let a0 = Sys.monotonicNanoseconds()
        guard checks.must("libvirt: attach the SIF partition live as a read-only disk", { try domain.attachLive(deviceXML: diskXML) }) != nil else { return }
        figure("libvirt.image.attach", ms(Sys.monotonicNanoseconds() - a0))
        let live = (try? domain.xml()) ?? ""
        guard let address = LibvirtXML.diskAddress(alias: "job-rootfs", in: live) else {
            checks.check(false, "libvirt: the live XML gives the disk's PCI path")
            return
        }
        checks.check(live.contains("<slice type='storage' offset='\(image.offset)' size='\(image.size)'/>") && live.contains("<readonly/>"),
                     "libvirt: the live disk is the partition's slice, read-only")
        let job = Container(id: "job", rootfs: .image(FilePath(sif), deviceAddress: address))
        guard let shared = checks.must("libvirt: share the SIF rootfs at PCI path \(address)", { try sharer.shareRootFilesystemSync(container: job) }) else { return }
        let m0 = Sys.monotonicNanoseconds()
        guard checks.must("libvirt: CreateContainer mounts the hot-plugged disk", { try agent.createContainer(id: "job", storages: shared.containerStorages) }) != nil else { return }
        figure("libvirt.image.mount", ms(Sys.monotonicNanoseconds() - m0))
        let r0 = Sys.monotonicNanoseconds()
        let read = try? probe.probe(.read, shared.guestPath + "/etc/os-release")
        figure("libvirt.image.first-read", ms(Sys.monotonicNanoseconds() - r0))
        checks.check(read?.text == "ID=sif-over-libvirt\n", "libvirt: the guest reads the SIF partition's rootfs (\(read?.description ?? "no answer"))")
        let w = try? probe.probe(.create, shared.guestPath + "/etc/new", data: Array("x".utf8))
        checks.check(w?.errno == EROFS, "libvirt: a write to it gets EROFS (\(w?.description ?? "no answer"))")
        _ = checks.must("libvirt: RemoveContainer job") { try agent.removeContainer(id: "job") }
        _ = checks.must("libvirt: unshare the SIF rootfs") { try sharer.unshareRootFilesystemSync(container: job) }
        _ = checks.must("libvirt: detach the disk live") { try domain.detachLive(deviceXML: diskXML) }
        checks.check(LibvirtRun.waitUntilGone(domain, "ua-job-rootfs"), "libvirt: the disk left the live domain")
    }

    /// Polls the live domain XML until `marker` is gone from it (a live detach completes when
    /// the guest acknowledges the unplug), for up to 20 s.
    static func waitUntilGone(_ domain: LibvirtDomain, _ marker: String) -> Bool {
        let start = Sys.monotonicNanoseconds()
        while Sys.monotonicNanoseconds() - start < 20_000_000_000 {
            if let x = try? domain.xml(), !x.contains(marker) { return true }
            usleep(50_000)
        }
        return false
    }
}
