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

/// virtio-fs or 9p: prepare a sandbox, boot a guest on its `shared/`, let the agent mount it from
/// the `CreateSandbox` storages, share after boot, and check each claim from inside the guest.
struct SharedFilesystemRun {
    /// `virtioFSRuntimeRS`: virtio-fs with Kata runtime-rs's layout (`rw/passthrough/`
    /// exported through `ro/`, guest paths under `containers/passthrough/`).
    enum Transport { case virtioFS, virtio9p, virtioFSRuntimeRS }
    let transport: Transport
    let dir: String
    let image: GuestImage
    let checks: Checks
    let narrate: Bool

    var name: String {
        switch transport {
        case .virtioFS: "virtio-fs"
        case .virtio9p: "9p"
        case .virtioFSRuntimeRS: "virtio-fs-runtime-rs"
        }
    }

    func run() {
        let n = Narrator(on: narrate)
        let root = dir + "/sandboxes"
        let src = dir + "/src"
        mkdirs(src)
        // Inputs: a rootfs, an rw volume, an ro volume, a single file, and a tree with a
        // submount of its own (tmpfs) for a recursive read-only share.
        mkdirs(src + "/rootfs/etc")
        writeFile(src + "/rootfs/etc/os-release", "NAME=\"fsshare demo rootfs\"\n")
        mkdirs(src + "/data")
        writeFile(src + "/data/existing", "host data\n")
        mkdirs(src + "/config")
        writeFile(src + "/config/app.conf", "log_level=info\n")
        writeFile(src + "/hosts", "127.0.0.1 localhost\n")
        mkdirs(src + "/tree/sub")
        writeFile(src + "/tree/top", "top\n")
        _ = checks.must("tmpfs submount in the recursive source") {
            try Sys.mount(source: "tmpfs", target: FilePath(src + "/tree/sub"), fstype: "tmpfs", flags: 0)
        }
        writeFile(src + "/tree/sub/deep", "deep\n")
        defer { try? Sys.umount2(FilePath(src + "/tree/sub"), flags: Int32(MNT_DETACH)) }

        let fs: SharedFilesystem = transport == .virtio9p ? .virtio9p() : .virtioFS()
        let config = SharerConfiguration(
            root: FilePath(root), sharedFilesystem: fs, shmSize: 64 << 20, layoutStyle: transport == .virtioFSRuntimeRS ? .runtimeRS : .go)
        let sandbox = "pod-\(name)"
        guard let sharer = checks.must("create the sharer", { try LinuxFilesystemSharer(sandboxID: sandbox, configuration: config) }) else { return }
        n.step("\(name): prepare the sandbox, boot a guest on its shared/ (\(Accelerator.detect().rawValue))")
        guard checks.must("prepare", { try sharer.prepareSync() }) != nil else { return }
        let share: GuestShare = transport == .virtio9p
            ? .virtio9p(source: sharer.layout.sharedDirectory, tag: config.mountTag)
            : .virtioFS(source: sharer.layout.sharedDirectory, tag: config.mountTag)
        guard let guest = checks.must("start QEMU with \(name)", { try QEMUGuest(image: image, share: share, workDir: FilePath(dir + "/vm")) }) else {
            _ = try? sharer.cleanupSync()
            return
        }
        var guestStopped = false
        defer {
            if !guestStopped { guest.stop() }
        }
        guard let boot = checks.must("\(name): the guest agent answers", { try guest.waitForAgent(timeout: .seconds(120)) }) else {
            print(QEMUGuest.tail(guest.consoleLog))
            _ = try? sharer.cleanupSync()
            return
        }
        figure("\(name).boot", ms(boot))
        n.say("guest up in \(ms(boot)) (QEMU start to the agent's first answer)")

        let agent = AgentClient(address: guest.agentAddress, callTimeout: .seconds(30))
        let probe = GuestCheckClient(address: guest.checkAddress)
        // Kata spells it with a trailing slash; mountinfo does not.
        let shared = FilePath(config.guestSharedDir).string

        // The agent mounts what the descriptors say.
        n.step("CreateSandbox: the agent mounts the sandbox storages")
        for s in sharer.sandboxStorages {
            n.say("  Storage{driver: \(s.driver), source: \(s.source), fstype: \(s.fstype), options: \(s.options), mount_point: \(s.mountPoint)}")
        }
        _ = checks.must("\(name): CreateSandbox with the sandbox storages") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }
        let wantType = transport == .virtio9p ? "9p" : "virtiofs"
        let fstype = try? probe.probe(.fstype, shared).text
        checks.check(fstype == wantType, "\(name): the guest has \(shared) on \(wantType) (saw \(fstype ?? "nothing"))")
        // The mount itself (the guest's /run is a tmpfs too, so the type alone proves nothing).
        let shm = (try? probe.probe(.mounts, Storages.guestShmPath).names) ?? []
        checks.check(shm.first?.hasPrefix(Storages.guestShmPath + " tmpfs ") == true, "\(name): the guest has a tmpfs mounted at \(Storages.guestShmPath) (\(shm))")
        checks.mustFail("\(name): a second CreateSandbox is refused") { try agent.createSandbox(id: sandbox, storages: sharer.sandboxStorages) }
        checks.check((try? probe.probe(.fstype, shared).text) == wantType, "\(name): the refused CreateSandbox changed nothing")
        if narrate, let mounts = try? probe.probe(.mounts, "/run/kata-containers").names {
            n.say("guest mounts under /run/kata-containers:")
            for m in mounts { n.say("  \(m)") }
        }

        // Share after boot.
        n.step("Share a rootfs and four volumes after boot")
        let web = Container(id: "web", rootfs: .hostMounted(FilePath(src + "/rootfs")))
        let mounts: [(label: String, mount: Mount)] = [
            ("rw", Mount(source: FilePath(src + "/data"), destination: "/data")),
            ("ro", Mount(source: FilePath(src + "/config"), destination: "/etc/app", options: ["ro"])),
            ("file", Mount(source: FilePath(src + "/hosts"), destination: "/etc/hosts", options: ["ro"])),
            ("recursive", Mount(source: FilePath(src + "/tree"), destination: "/tree", options: ["rbind", "ro"])),
        ]
        let rootfs = checks.must("\(name): share the rootfs") { try sharer.shareRootFilesystemSync(container: web) }
        var paths: [String: String] = [:]
        for (label, mount) in mounts {
            if let shared = checks.must("\(name): share the \(label) volume", { try sharer.shareFileSync(container: web, mount: mount) }), let shared {
                paths[label] = shared.guestPath
                n.say("  \(label): \(mount.source) -> guest \(shared.guestPath)")
            }
        }
        if let rootfs { n.say("  rootfs: \(src)/rootfs -> guest \(rootfs.guestPath)") }

        // The guest sees each.
        n.step("What the guest sees (read inside the guest)")
        func sees(_ path: String, _ content: String, _ what: String) {
            let r = try? probe.await(.read, path, timeout: .seconds(10)) { $0.errno == 0 && $0.text == content }
            checks.check(r?.0.text == content, "\(name): the guest reads \(what) at \(path) (\(r?.0.description ?? "no answer"), after \(r.map { ms($0.1) } ?? "?"))")
            n.say("  \(path): \(r?.0.text.trimmingNewline ?? "?")")
        }
        if let rootfs { sees(rootfs.guestPath + "/etc/os-release", "NAME=\"fsshare demo rootfs\"\n", "the rootfs") }
        if let p = paths["rw"] { sees(p + "/existing", "host data\n", "the rw volume") }
        if let p = paths["ro"] { sees(p + "/app.conf", "log_level=info\n", "the ro volume") }
        if let p = paths["file"] { sees(p, "127.0.0.1 localhost\n", "the single file") }
        if let p = paths["recursive"] {
            sees(p + "/top", "top\n", "the recursive volume")
            sees(p + "/sub/deep", "deep\n", "the recursive volume's submount")
        }

        // rw lands in the host source.
        n.step("Guest writes: rw lands on the host, ro is refused by the guest kernel")
        if let p = paths["rw"] {
            let created = try? probe.probe(.create, p + "/from-guest", data: Array("written in the guest\n".utf8))
            checks.check(created?.errno == 0, "\(name): the guest creates a file in the rw volume (\(created?.description ?? "no answer"))")
            checks.check(readFile(src + "/data/from-guest") == "written in the guest\n", "\(name): the guest's new file is in the host source")
            let written = try? probe.probe(.write, p + "/existing", data: Array("changed in the guest\n".utf8))
            checks.check(written?.errno == 0 && readFile(src + "/data/existing") == "changed in the guest\n", "\(name): the guest's write to an existing file lands in the host source")
            n.say("  host \(src)/data/from-guest: \(readFile(src + "/data/from-guest")?.trimmingNewline ?? "missing")")
        }
        func refused(_ op: Fsshare_ProbeRequest.Op, _ path: String, _ what: String) {
            let r = try? probe.probe(op, path, data: Array("x\n".utf8))
            checks.check(r?.errno == EROFS, "\(name): \(what) refused with EROFS in the guest (\(r?.description ?? "no answer"))")
            n.say("  \(op) \(path): \(r?.description ?? "no answer")")
        }
        if let p = paths["ro"] {
            refused(.create, p + "/new", "ro volume: create")
            refused(.write, p + "/app.conf", "ro volume: write")
            refused(.unlink, p + "/app.conf", "ro volume: unlink")
            refused(.mkdir, p + "/newdir", "ro volume: mkdir")
        }
        if let p = paths["file"] { refused(.write, p, "ro single file: write") }
        if let p = paths["recursive"] {
            refused(.create, p + "/new", "ro recursive volume: create")
            refused(.write, p + "/top", "ro recursive volume: write")
            refused(.unlink, p + "/top", "ro recursive volume: unlink")
            refused(.create, p + "/sub/new", "ro recursive volume's submount: create")
            refused(.write, p + "/sub/deep", "ro recursive volume's submount: write")
            refused(.unlink, p + "/sub/deep", "ro recursive volume's submount: unlink")
        }
        refused(.create, shared + "/planted", "the top of the shared directory: create")
        if transport == .virtioFSRuntimeRS {
            refused(.create, shared + "/passthrough/planted", "runtime-rs's passthrough/ directory: create")
        }
        checks.check(readFile(src + "/config/app.conf") == "log_level=info\n" && readFile(src + "/tree/sub/deep") == "deep\n" && readFile(src + "/hosts") == "127.0.0.1 localhost\n",
                     "\(name): the ro sources are unchanged on the host")

        // Unshare: the content disappears from the guest.
        n.step("Unshare: gone from the guest")
        func disappears(_ path: String, _ what: String) {
            let r = try? probe.await(.stat, path, timeout: .seconds(10)) { $0.errno == ENOENT }
            checks.check(r?.0.errno == ENOENT, "\(name): after unshare the guest no longer has \(what) (\(r?.0.description ?? "no answer"), after \(r.map { ms($0.1) } ?? "?"))")
            if let r { figure("\(name).unshare-visible", ms(r.1)) }
            n.say("  \(path): \(r?.0.description ?? "no answer") after \(r.map { ms($0.1) } ?? "?")")
        }
        for (label, mount) in mounts {
            _ = checks.must("\(name): unshare the \(label) volume") { try sharer.unshareFileSync(container: web, mount: mount) }
            if let p = paths[label] { disappears(p, "the \(label) volume") }
        }
        _ = checks.must("\(name): unshare the rootfs") { try sharer.unshareRootFilesystemSync(container: web) }
        if let rootfs { disappears(rootfs.guestPath + "/etc/os-release", "the rootfs") }

        // DestroySandbox unmounts; then the VM goes, then cleanup.
        _ = checks.must("\(name): DestroySandbox") { try agent.destroySandbox() }
        let after = try? probe.probe(.fstype, shared).text
        checks.check(after != wantType, "\(name): after DestroySandbox \(shared) is no longer \(wantType) (\(after ?? "?"))")
        agent.disconnect()
        probe.client.disconnect()
        guest.stop()
        guestStopped = true
        n.step("Cleanup: nothing left on the host")
        _ = checks.must("\(name): cleanup") { try sharer.cleanupSync() }
        let leaks = (try? Inventory.mountPoints(under: FilePath(root))) ?? ["?"]
        checks.check(leaks.isEmpty, "\(name): no mount left under the root (\(leaks))")
        let left = (try? Sys.listDirectory(nil, FilePath(root)).map(\.name)) ?? []
        checks.check(left.isEmpty, "\(name): nothing left in the root (\(left))")
        n.say("  mounts under \(root): \(leaks.count); entries: \(left.count)")
    }
}

extension String {
    var trimmingNewline: String { hasSuffix("\n") ? String(dropLast()) : self }
}
