#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SystemPackage

/// Real-mount scenarios. Each runs in a private mount namespace made by its caller
/// (`unshare -m --propagation private -- fsshare-scenarios NAME WORKDIR`), prints one line per
/// check and exits 1 if any check failed. The tests in Tests/FSShareTests run them.
@main
struct ScenarioMain {
    static func main() async {
        let args = CommandLine.arguments
        guard args.count >= 3 else {
            print("usage: fsshare-scenarios SCENARIO WORKDIR")
            exit(2)
        }
        let work = args[2]
        mkdirs(work)
        let checks = Checks()
        let s = Scenarios(work: work, checks: checks, selfPath: args[0])
        switch args[1] {
        case "lifecycle": await s.lifecycle()
        case "guest-view-new-api":
            print("open_tree_attr: \(Sys.hasOpenTreeAttr() ? "used (one call per copy)" : "absent: open_tree + mount_setattr")")
            s.guestView(method: .newAPI)
        case "guest-view-two-call-clone":
            // The path for kernels before 6.15 (or a seccomp filter without open_tree_attr):
            // the probe is told no before anything uses it, so every copy is open_tree then
            // mount_setattr; the guest must see exactly the same.
            s.requireFaultInjection()
            FaultInjection.install(FaultInjection.parse("open_tree_attr_probe=ENOSYS") ?? [])
            checks.check(!Sys.hasOpenTreeAttr(), "the open_tree_attr probe says no under the fault")
            FaultInjection.install([])
            s.guestView(method: .newAPI)
            s.rollback()
        case "guest-view-legacy": s.guestView(method: .legacy)
        case "guest-view-runtime-rs": s.guestView(method: .newAPI, style: .runtimeRS)
        case "refusals": s.refusals()
        case "rollback": s.requireFaultInjection(); s.rollback()
        case "crash": s.requireFaultInjection(); s.crash()
        case "crash-child": s.crashChild()
        case "adversary": s.adversary()
        case "foreign": s.foreign()
        case "mount-probe": s.requireFaultInjection(); s.mountProbe()
        case "mount-probe-child": s.mountProbeChild()
        case "no-delete-through-mounts": s.requireFaultInjection(); s.noDeleteThroughMounts()
        case "status-leaks": s.statusLeaks()
        case "watchable": s.watchable()
        case "image-rootfs": s.imageRootfs()
        case "layered-rootfs": s.layeredRootfs()
        case "image-on-host": s.imageOnHost()
        default:
            print("unknown scenario \(args[1])")
            exit(2)
        }
        checks.summary()
        exit(checks.failures == 0 ? 0 : 1)
    }
}

struct Scenarios {
    let work: String
    let checks: Checks
    let selfPath: String

    var root: String { work + "/root" }

    func config(_ method: MountMethod = .automatic, policy: SourceSymlinkPolicy = .follow, style: SandboxLayoutStyle = .go) -> SharerConfiguration {
        SharerConfiguration(root: FilePath(root), shmSize: 1 << 20, mountMethod: method, sourceSymlinks: policy, layoutStyle: style)
    }

    func sources() -> (rw: String, ro: String, file: String, rec: String, image: String) {
        let rw = work + "/src/rw", ro = work + "/src/ro", rec = work + "/src/rec"
        mkdirs(rw); mkdirs(ro); mkdirs(rec + "/sub")
        writeFile(ro + "/key", "value")
        writeFile(work + "/src/file.txt", "single")
        writeFile(rec + "/top", "top")
        // A squashfs rootfs image (made once: the crash runs must not spend their time here).
        let image = work + "/src/app.sqfs"
        if (try? Sys.statx(nil, FilePath(image))) == nil {
            _ = Sys.run(["mksquashfs", ro, image, "-noappend", "-quiet", "-no-progress"])
        }
        return (rw, ro, work + "/src/file.txt", rec, image)
    }

    /// Mounts a tmpfs at `rec/sub` holding `deep`: the submount a recursive share must carry.
    func mountSubmount(_ rec: String) {
        _ = checks.must("tmpfs submount in the recursive source") {
            try Sys.mount(source: "tmpfs", target: FilePath(rec + "/sub"), fstype: "tmpfs", flags: 0)
        }
        writeFile(rec + "/sub/deep", "deep")
    }

    /// Scenarios that inject faults or kills would pass without testing anything in a release
    /// build, which has no fault injection.
    func requireFaultInjection() {
        checks.check(FaultInjection.isCompiledIn, "fault injection is compiled in (a debug build)")
    }

    /// Nothing of the sandbox is left: no directory, no mount.
    func expectNothingLeft(_ what: String) {
        checks.check(mountsUnder(root).isEmpty, "\(what): no mounts under the root (\(mountsUnder(root)))")
        checks.check(listTree(root).isEmpty, "\(what): no files or directories under the root (\(listTree(root).prefix(5)))")
    }

    // MARK: lifecycle

    /// A sharer keeps its sandbox open between operations. When someone else cleans the
    /// sandbox up, its next operation finds out under the lock (from the manifest's link count)
    /// and fails with `notPrepared` having changed nothing; once the sandbox is prepared again,
    /// the same sharer reopens it and works.
    func staleHandle(_ source: String) {
        guard let a = try? LinuxFilesystemSharer(sandboxID: "st", configuration: config()),
              let b = try? LinuxFilesystemSharer(sandboxID: "st", configuration: config()) else { return }
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        let m = Mount(source: FilePath(source), destination: "/etc/app", options: ["ro"])
        _ = checks.must("stale: prepare and share through A") {
            try a.prepareSync()
            _ = try a.shareFileSync(container: c, mount: m)
        }
        _ = checks.must("stale: B cleans the sandbox up") { try b.cleanupSync() }
        let e = checks.mustFail("stale: A's next share fails") { _ = try a.shareFileSync(container: c, mount: Mount(source: FilePath(source), destination: "/x")) }
        checks.check((e as? FSShareError)?.code == .notPrepared, "stale: with notPrepared (\(e.map { "\($0)" } ?? "no error"))")
        checks.check((try? a.unshareFileSync(container: c, mount: m)) == .removed, "stale: unshare of a share the cleanup removed is .removed")
        checks.check(listTree(root + "/st").isEmpty && mountsUnder(root + "/st").isEmpty, "stale: the failed operations made nothing")
        _ = checks.must("stale: B prepares the sandbox again") { try b.prepareSync() }
        if let shared = checks.must("stale: A shares again (it reopens the new sandbox)", { try a.shareFileSync(container: c, mount: m) }), let shared {
            checks.check(readFile(b.layout.sharedDirectory.string + "/" + (shared.guestPath.split(separator: "/").last.map(String.init) ?? "") + "/key") == "value",
                         "stale: the new share is in the new sandbox's export")
        }
        // B compacts the journal (over 256 removals) while A holds the old file open: A's next
        // look sees a manifest with no link left and a successor, and reads the new one.
        let other = Mount(source: FilePath(source), destination: "/churn")
        _ = checks.must("stale: B shares and unshares 300 times (a compaction)") {
            for _ in 0..<300 {
                _ = try b.shareFileSync(container: c, mount: other)
                _ = try b.unshareFileSync(container: c, mount: other)
            }
        }
        let seen = (try? a.sharesSync())?.map(\.record.destination)
        checks.check(seen == ["/etc/app"], "stale: after B's compaction A reads the new journal (\(seen ?? []))")
        _ = checks.must("stale: cleanup") { try a.cleanupSync() }
    }

    func lifecycle() async {
        let src = sources()
        staleHandle(src.ro)
        guard let sharer = checks.must("create sharer", { try LinuxFilesystemSharer(sandboxID: "sb1", configuration: config()) }) else { return }
        let storages = checks.must("prepare") { try sharer.prepareSync(); return sharer.sandboxStorages }
        checks.check(storages?.map(\.driver) == ["virtio-fs", "ephemeral"], "sandbox storages are virtio-fs + shm")
        do {
            let again = try await sharer.prepare()
            checks.check(again == storages, "async prepare again is a no-op returning the same storages")
        } catch { checks.check(false, "prepare again: \(error)") }
        let layout = sharer.layout
        checks.check((try? Sys.statx(nil, layout.sandboxDirectory).isMountRoot) == true, "sandbox dir is a mount (self-bind)")
        checks.check((try? Sys.statx(nil, layout.sharedDirectory).isMountRoot) == true, "shared/ is a mount")
        checks.check(mountsUnder(root).count == 2, "prepare twice made exactly 2 mounts")

        let c = Container(id: "c1", rootfs: .hostMounted(FilePath(src.rw)))
        let rwMount = Mount(source: FilePath(src.rw), destination: "/data")
        let first = checks.must("share rw") { try sharer.shareFileSync(container: c, mount: rwMount) }
        let count = mountsUnder(root).count
        let second = checks.must("share rw again") { try sharer.shareFileSync(container: c, mount: rwMount) }
        checks.check(first != nil && first == second, "same guest path twice (\(first??.guestPath ?? "-"))")
        checks.check(mountsUnder(root).count == count, "no second mount for the same share")
        checks.check(first??.guestPath.hasPrefix("/run/kata-containers/shared/containers/c1-") == true && first??.guestPath.hasSuffix("-data") == true,
                     "Kata guest path layout <cid>-<hex>-<base>")
        checks.mustFail("same destination from another source is a conflict") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/data"))
        }
        checks.check((try? sharer.shareFileSync(container: c, mount: Mount(source: "tmpfs", destination: "/t", type: "tmpfs"))) == .some(nil),
                     "non-bind mounts are not shared (nil)")
        checks.check((try? sharer.shareFileSync(container: c, mount: Mount(source: "/dev/shm", destination: "/dev/shm"))) == .some(nil),
                     "/dev/shm is not shared (nil)")
        _ = checks.must("share ro, file, recursive") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.file), destination: "/etc/f.txt", options: ["ro"]))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rec), destination: "/rec", options: ["rbind"]))
        }
        let shares = (try? sharer.sharesSync()) ?? []
        checks.check(shares.count == 4 && shares.allSatisfy(\.mounted), "manifest lists 4 mounted shares")
        checks.check(shares.first { $0.record.destination == "/etc/f.txt" }?.record.isFile == true, "single file share recorded as file")

        // rootfs
        let rootfs = checks.must("share host rootfs") { try sharer.shareRootFilesystemSync(container: c) }
        checks.check(rootfs?.guestPath == "/run/kata-containers/shared/containers/c1/rootfs", "rootfs guest path")
        checks.check((try? Sys.statx(nil, FilePath(root + "/sb1/mounts/c1/rootfs")).isMountRoot) == true, "rootfs bound at mounts/c1/rootfs")
        let rootfs2 = checks.must("share host rootfs again") { try sharer.shareRootFilesystemSync(container: c) }
        checks.check(rootfs == rootfs2, "rootfs share is idempotent")
        let blk = Container(id: "c2", rootfs: .blockDevice(BlockDevice(address: "/dev/vdb", fstype: "ext4")))
        let b = checks.must("share block rootfs") { try sharer.shareRootFilesystemSync(container: blk) }
        checks.check(b?.containerStorages.first?.mountPoint == "/run/kata-containers/shared/containers/c2", "block rootfs storage mount point")
        checks.check(exists(root + "/sb1/mounts/c2/rootfs"), "block rootfs directory made for the agent")
        _ = checks.must("unshare block rootfs twice") {
            try sharer.unshareRootFilesystemSync(container: blk)
            try sharer.unshareRootFilesystemSync(container: blk)
        }
        checks.check(!exists(root + "/sb1/mounts/c2"), "block rootfs directories removed")

        // unshare (twice each)
        _ = checks.must("unshare rw twice") {
            try sharer.unshareFileSync(container: c, mount: rwMount)
            try sharer.unshareFileSync(container: c, mount: rwMount)
        }
        if let name = first??.guestPath.split(separator: "/").last {
            checks.check(!exists(root + "/sb1/mounts/\(name)"), "mount point removed after unshare")
            checks.check(!exists(root + "/sb1/shared/\(name)"), "gone from shared/ after unshare")
        }
        _ = checks.must("unshare rootfs twice") {
            try sharer.unshareRootFilesystemSync(container: c)
            try sharer.unshareRootFilesystemSync(container: c)
        }
        checks.check(!exists(root + "/sb1/mounts/c1"), "per-container dir removed with its rootfs")
        checks.check(exists(src.ro + "/key") && exists(src.rec + "/top"), "sources untouched")
        _ = checks.must("cleanup twice") {
            try sharer.cleanupSync()
            try sharer.cleanupSync()
        }
        expectNothingLeft("after cleanup")
        checks.check(readFile(src.ro + "/key") == "value", "ro source content intact")
        checks.mustFail("share after cleanup says not prepared") { _ = try sharer.shareFileSync(container: c, mount: rwMount) }
        _ = checks.must("unshare after cleanup is not an error") { try sharer.unshareFileSync(container: c, mount: rwMount) }
        // Prepare again where the sandbox's self-bind lost its shared propagation (made private
        // by someone) and shared/ was unmounted: prepare restores both.
        if let first = try? LinuxFilesystemSharer(sandboxID: "sb2", configuration: config()) {
            _ = checks.must("prepare sb2") { try first.prepareSync() }
        }
        _ = try? Sys.umount2(FilePath(root + "/sb2/shared"), flags: Int32(MNT_DETACH))
        _ = try? Sys.mount(source: nil, target: FilePath(root + "/sb2"), flags: UInt(MS_PRIVATE))
        if let s2 = try? LinuxFilesystemSharer(sandboxID: "sb2", configuration: config()) {
            _ = checks.must("prepare over a private self-bind") { try s2.prepareSync() }
            let r = try? s2.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/p"))
            let name = r?.guestPath.split(separator: "/").last.map(String.init) ?? "?"
            checks.check(readFile(root + "/sb2/shared/\(name)/key") == "value", "a share propagates to shared/ over a private pre-existing mount")
            _ = checks.must("cleanup sb2") { try s2.cleanupSync() }
        }
        // Another process (the CLI) sees the same sandbox through the manifest.
        _ = checks.must("prepare again after cleanup") { try sharer.prepareSync() }
        let other = try? LinuxFilesystemSharer(sandboxID: "sb1", configuration: config())
        let p1 = try? sharer.shareFileSync(container: c, mount: rwMount)
        let p2 = try? other?.shareFileSync(container: c, mount: rwMount)
        checks.check(p1 != nil && p1 == p2, "a second sharer instance finds the same share")
        _ = checks.must("cleanup from the second instance") { try other?.cleanupSync() }
        expectNothingLeft("after second cleanup")
    }

    // MARK: guest view

    func guestView(method: MountMethod, style: SandboxLayoutStyle = .go) {
        let src = sources()
        mkdirs(src.rec + "/sub")
        mountSubmount(src.rec)
        writeFile(src.rw + "/existing", "old")
        guard let sharer = checks.must("create sharer", { try LinuxFilesystemSharer(sandboxID: "gv", configuration: config(method, style: style)) }) else { return }
        // What the hypervisor exports, and where the shares appear in it.
        let export = sharer.layout.sharedDirectory.string
        let exported = sharer.layout.sandboxDirectory.pushing(style.exportedMountsPath).string
        _ = checks.must("prepare") { try sharer.prepareSync() }
        // The virtiofsd view: a slave namespace created after prepare and before any share.
        guard let view = SlaveView() else { checks.check(false, "start slave namespace"); return }
        let c = Container(id: "web", rootfs: .hostMounted(FilePath(src.rw)))
        func share(_ source: String, _ dest: String, _ options: [String]) -> String {
            let r = try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(source), destination: FilePath(dest), options: options))
            checks.check(r != nil, "share \(source) -> \(dest) \(options)")
            if style == .runtimeRS {
                checks.check(r?.guestPath.hasPrefix("/run/kata-containers/shared/containers/passthrough/sandbox-") == true, "runtime-rs guest path (\(r?.guestPath ?? "-"))")
            }
            return exported + "/" + (r?.guestPath.split(separator: "/").last.map(String.init) ?? "?")
        }
        let rw = share(src.rw, "/data", [])
        let ro = share(src.ro, "/cfg", ["ro"])
        let file = share(src.file, "/etc/f.txt", ["ro"])
        let rec: String? = method == .legacy ? nil : share(src.rec, "/rec", ["ro", "rbind"])
        if method == .legacy {
            let e = checks.mustFail("legacy method refuses a recursive read-only share") {
                _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rec), destination: "/rec", options: ["ro", "rbind"]))
            }
            checks.check((e as? FSShareError)?.code == .unsupported, "that refusal says unsupported")
        }
        let recRW = share(src.rec, "/rec-rw", ["rbind"])
        let rootfs = try? sharer.shareRootFilesystemSync(container: c)
        checks.check(rootfs != nil, "share rootfs")

        // Propagation: everything shared after the view was made is visible in it.
        checks.check(view.sh("cat \(ro)/key").output == "value", "ro volume visible in the slave view")
        checks.check(view.sh("cat \(file)").output == "single", "single file visible in the slave view")
        checks.check(view.sh("cat \(recRW)/sub/deep").output == "deep", "recursive share carries the submount into the view")
        checks.check(view.sh("ls \(exported)/web/rootfs/existing").status == 0, "rootfs visible in the view")

        // rw lands in the source.
        checks.check(view.sh("echo guest > \(rw)/fromguest").status == 0, "write into rw volume in the view")
        checks.check(readFile(src.rw + "/fromguest") == "guest\n", "guest write landed in the host source")

        // ro is enforced in the view: create, write, unlink all fail with EROFS.
        func refusesWrites(_ dir: String, existing: String, _ what: String) {
            let create = view.sh("echo x > \(dir)/new")
            let write = view.sh("echo x >> \(existing)")
            let unlink = view.sh("rm -f \(existing)")
            checks.check(create.status != 0 && create.output.contains("Read-only"), "\(what): create refused with EROFS in the view")
            checks.check(write.status != 0 && write.output.contains("Read-only"), "\(what): write refused with EROFS in the view")
            checks.check(unlink.status != 0 && unlink.output.contains("Read-only"), "\(what): unlink refused with EROFS in the view")
        }
        refusesWrites(ro, existing: ro + "/key", "ro dir")
        let fileWrite = view.sh("echo x >> \(file)")
        checks.check(fileWrite.status != 0 && fileWrite.output.contains("Read-only"), "ro single file: write refused with EROFS in the view")
        if let rec {
            refusesWrites(rec, existing: rec + "/top", "ro recursive (top)")
            refusesWrites(rec + "/sub", existing: rec + "/sub/deep", "ro recursive (submount)")
        }
        let top = view.sh("touch \(export)/planted")
        checks.check(top.status != 0 && top.output.contains("Read-only"), "top of shared/ is read-only in the view")
        let symlinkPlant = view.sh("ln -s / \(export)/evil")
        checks.check(symlinkPlant.status != 0, "cannot plant a symlink at the top of shared/")
        let beside = view.sh("touch \(exported)/planted")
        checks.check(beside.status != 0 && beside.output.contains("Read-only"), "the directory holding the shares is read-only in the view")
        checks.check(readFile(src.ro + "/key") == "value", "ro source unchanged")

        // Unshare: gone from the view.
        _ = try? sharer.unshareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
        checks.check(view.sh("ls \(ro)/key").status != 0, "unshared volume disappears from the view")
        _ = checks.must("cleanup") { try sharer.cleanupSync() }
        checks.check(view.sh("ls \(export)/").status != 0 || view.sh("ls -A \(export)/").output.isEmpty,
                     "after cleanup the view shows nothing")
        _ = try? Sys.umount2(FilePath(src.rec + "/sub"), flags: Int32(MNT_DETACH))
        expectNothingLeft("after cleanup")
        checks.check(readFile(src.rw + "/existing") == "old" && readFile(src.rw + "/fromguest") == "guest\n", "rw source content intact")
    }

    // MARK: refusals

    func refusals() {
        let src = sources()
        guard let sharer = checks.must("create sharer", { try LinuxFilesystemSharer(sandboxID: "rf", configuration: config()) }) else { return }
        _ = checks.must("prepare") { try sharer.prepareSync() }
        let before = listTree(root)
        let manifestBefore = readFile(root + "/rf/manifest")
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        mkfifo(work + "/fifo", 0o644)
        let sock = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let sockPath = work + "/sock"
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            sockPath.utf8CString.withUnsafeBytes { raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(raw.count))) }
        }
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        symlink("/proc/self", work + "/to-proc")
        symlink(src.ro, work + "/to-ro")
        let cases: [(String, String)] = [
            ("/proc/self", "under /proc"), ("/sys/kernel", "under /sys"), ("/dev", "host /dev"),
            ("/dev/null", "device node"), (work + "/fifo", "FIFO"), (sockPath, "socket"),
            (work + "/to-proc", "symlink to /proc"), ("/dev/pts", "directory under /dev"),
            ("relative/path", "relative source"), (work + "/missing", "missing source"),
            ("/", "/ (contains the root)"), (work, "the root's parent"), (root, "the root itself"),
            (root + "/rf", "a sandbox directory"), (root + "/rf/mounts", "a sandbox's mounts/"),
            (root + "/rf/private", "a sandbox's private/"), (work + "/alias", "a bind-mount alias of the root's parent"),
            (work + "/to-root", "a symlink to the root"),
        ]
        mkdirs(work + "/alias")
        _ = checks.must("bind the root's parent at an alias") { try Sys.mount(source: FilePath(work), target: FilePath(work + "/alias"), flags: UInt(MS_BIND)) }
        symlink(root, work + "/to-root")
        for (source, what) in cases {
            let e = checks.mustFail("refuse \(what) (\(source))") {
                _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(source), destination: "/x"))
            }
            if let e = e as? FSShareError, source != work + "/missing" {
                checks.check(e.code == .refused || e.code == .invalidArgument, "\(what): code \(e.code) says refused/invalid")
            }
        }
        for bad in ["", "..", ".", "a/b", "../x", String(repeating: "a", count: 129), "a\u{0}b", "-x"] {
            checks.mustFail("refuse container id \"\(bad.prefix(12))\"") {
                _ = try sharer.shareFileSync(container: Container(id: bad, rootfs: .hostMounted("/")), mount: Mount(source: FilePath(src.ro), destination: "/x"))
            }
            checks.mustFail("refuse sandbox id \"\(bad.prefix(12))\"") { _ = try LinuxFilesystemSharer(sandboxID: bad, configuration: config()) }
        }
        checks.mustFail("refuse relative destination") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "rel"))
        }
        checks.mustFail("refuse destination /") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/"))
        }
        let e = checks.mustFail("a rootfs directory inside the root is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "c", rootfs: .hostMounted(FilePath(root + "/rf/private"))))
        }
        checks.check((e as? FSShareError)?.code == .refused, "rootfs inside the root: refused")
        checks.check(listTree(root) == before, "refusals changed nothing in the tree")
        checks.check(readFile(root + "/rf/manifest") == manifestBefore, "refusals changed nothing in the manifest")
        // Symlink policy.
        let follow = try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(work + "/to-ro"), destination: "/follow"))
        checks.check(follow != nil, "symlinked source followed under the follow policy")
        checks.check(follow?.resolvedSource?.string == src.ro, "the share reports where the symlink led (\(follow?.resolvedSource?.string ?? "nil"))")
        let recorded = (try? sharer.sharesSync())?.first { $0.record.destination == "/follow" }?.record
        checks.check(recorded?.resolvedSource == src.ro && recorded?.source == work + "/to-ro", "the manifest records the given and the resolved source")
        let plain = try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/plain"))
        checks.check(plain != nil && plain?.resolvedSource == nil, "a source without symlinks reports no resolved path")
        if let strict = try? LinuxFilesystemSharer(sandboxID: "rf", configuration: config(policy: .refuse)) {
            let e = checks.mustFail("symlinked source refused under the refuse policy") {
                _ = try strict.shareFileSync(container: c, mount: Mount(source: FilePath(work + "/to-ro"), destination: "/strict"))
            }
            checks.check((e as? FSShareError)?.code == .refused, "refuse policy error code")
        }
        remembersFilesystemTypes(sharer, c)
        _ = checks.must("cleanup") { try sharer.cleanupSync() }
        close(sock)
        _ = try? Sys.umount2(FilePath(work + "/alias"), flags: Int32(MNT_DETACH))
        expectNothingLeft("after cleanup")
    }

    /// A pseudo-filesystem at a path nothing lexical refuses is caught by its filesystem type,
    /// also when the answer is remembered; a remembered type belongs to one mount only (the
    /// unique mount id): a tmpfs mounted where the proc was is judged afresh, and a source on a
    /// tmpfs already met needs no `fstatfs` (a fault on it is never reached).
    func remembersFilesystemTypes(_ sharer: LinuxFilesystemSharer, _ c: Container) {
        let place = work + "/fstype"
        mkdirs(place)
        guard checks.must("mount a proc where no path rule applies", { try Sys.mount(source: FilePath("proc"), target: FilePath(place), fstype: "proc", flags: 0) }) != nil else { return }
        for attempt in ["first", "remembered"] {
            let e = checks.mustFail("proc at \(place) refused (\(attempt) type lookup)") {
                _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(place), destination: "/fstype"))
            }
            checks.check((e as? FSShareError)?.message.contains("kernel pseudo-filesystem") == true,
                         "proc refused by its type (\(attempt)): \((e as? FSShareError)?.message ?? "nil")")
        }
        _ = try? Sys.umount2(FilePath(place), flags: Int32(MNT_DETACH))
        guard checks.must("mount a tmpfs where the proc was", { try Sys.mount(source: FilePath("tmpfs"), target: FilePath(place), fstype: "tmpfs", flags: 0) }) != nil else { return }
        mkdirs(place + "/a")
        mkdirs(place + "/b")
        let first = try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(place + "/a"), destination: "/fstype-a"))
        checks.check(first != nil, "a tmpfs mounted where a proc was is shared (its type is looked up afresh)")
        let unique = (try? Sys.statx(nil, FilePath(place)))?.mountIDIsUnique ?? false
        if unique {
            FaultInjection.install(FaultInjection.parse("fstatfs=EIO") ?? [])
            let second = try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(place + "/b"), destination: "/fstype-b"))
            checks.check(second != nil, "a second source on the same tmpfs needs no fstatfs (the fault is never reached)")
            let other = work + "/fstype2"
            mkdirs(other)
            _ = checks.must("mount a second tmpfs") { try Sys.mount(source: FilePath("tmpfs"), target: FilePath(other), fstype: "tmpfs", flags: 0) }
            let manifest = readFile(root + "/rf/manifest")
            let e = checks.mustFail("a tmpfs not met before is looked up (the injected fstatfs fault fails the share)") {
                _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(other), destination: "/fstype2"))
            }
            checks.check("\(e.map { "\($0)" } ?? "")".contains("fstatfs"), "the failure names fstatfs")
            checks.check(readFile(root + "/rf/manifest") == manifest, "the failed share left the manifest as it was")
            FaultInjection.install([])
            _ = try? sharer.unshareFileSync(container: c, mount: Mount(source: FilePath(place + "/b"), destination: "/fstype-b"))
            _ = try? Sys.umount2(FilePath(other), flags: Int32(MNT_DETACH))
        } else {
            print("skip: remembered filesystem types need STATX_MNT_ID_UNIQUE (Linux 6.8+); this kernel has plain mount ids only")
        }
        _ = try? sharer.unshareFileSync(container: c, mount: Mount(source: FilePath(place + "/a"), destination: "/fstype-a"))
        _ = try? Sys.umount2(FilePath(place), flags: Int32(MNT_DETACH))
    }

    // MARK: rollback (fault injection)

    func rollback() {
        let src = sources()
        let c = Container(id: "c", rootfs: .hostMounted(FilePath(src.rw)))
        // Prepare failing at each of its mount calls (new API — the self-bind: open_tree,
        // mount_setattr private, move_mount, mount_setattr shared; shared/: open_tree,
        // mount_setattr read-only, move_mount, mount_setattr slave — and mount(2) only — the
        // self-bind: bind, private, shared; shared/: bind, slave, read-only) and at directory
        // and manifest creation leaves nothing.
        let newAPIFaults = ["open_tree#1=ENOMEM", "mount_setattr#1=EINVAL", "move_mount#1=EPERM", "mount_setattr#2=EIO",
                            "open_tree#2=ENOMEM", "mount_setattr#3=EINVAL", "move_mount#2=EPERM", "mount_setattr#4=EIO",
                            "mkdirat#3=EACCES", "openat#2=EACCES", "openat#3=EACCES", "write#1=ENOSPC", "flock#2=EIO"]
        let legacyFaults = ["mount#1=EPERM", "mount#2=EIO", "mount#3=EIO", "mount#4=EPERM", "mount#5=EIO", "mount#6=EIO", "mkdirat#3=EACCES"]
        for (method, fault) in newAPIFaults.map({ (MountMethod.automatic, $0) }) + legacyFaults.map({ (MountMethod.legacy, $0) }) {
            FaultInjection.install(FaultInjection.parse(fault) ?? [])
            let sharer = try? LinuxFilesystemSharer(sandboxID: "rb", configuration: config(method))
            checks.mustFail("prepare (\(method)) fails under \(fault)") { try sharer?.prepareSync() }
            FaultInjection.install([])
            checks.check(mountsUnder(root).isEmpty, "prepare (\(method)) rolled back its mounts (\(fault))")
            checks.check(!exists(root + "/rb"), "prepare (\(method)) rolled back its directories (\(fault))")
        }
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "rb", configuration: config()) else { return }
        _ = checks.must("prepare") { try sharer.prepareSync() }
        let baseline = mountsUnder(root)
        let tree = listTree(root + "/rb/mounts")
        for fault in ["move_mount=EPERM", "mount_setattr=EINVAL", "open_tree=ENOMEM", "mkdirat=EACCES", "openat2=EACCES", "write=EIO"] {
            FaultInjection.install(FaultInjection.parse(fault) ?? [])
            checks.mustFail("ro share fails under \(fault)") {
                _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
            }
            FaultInjection.install([])
            checks.check(mountsUnder(root) == baseline, "share rolled back its mounts (\(fault))")
            checks.check(listTree(root + "/rb/mounts") == tree, "share rolled back its mount point (\(fault))")
            checks.check((try? sharer.sharesSync().isEmpty) == true, "manifest has no share after \(fault)")
        }
        if let legacy = try? LinuxFilesystemSharer(sandboxID: "rb", configuration: config(.legacy)) {
            for fault in ["mount#2=EIO", "mount#4=EPERM", "mount#5=EIO"] {
                FaultInjection.install(FaultInjection.parse(fault) ?? [])
                checks.mustFail("legacy ro share fails under \(fault)") {
                    _ = try legacy.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
                }
                FaultInjection.install([])
                checks.check(mountsUnder(root) == baseline, "legacy share rolled back its mounts (\(fault))")
                checks.check(listTree(root + "/rb/mounts") == tree && listTree(root + "/rb/private").isEmpty, "legacy share left no mount point or staging point (\(fault))")
            }
        }
        _ = checks.must("share works after the faults") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
        }
        _ = checks.must("cleanup") { try sharer.cleanupSync() }
        expectNothingLeft("after cleanup")
    }

    // MARK: crash (a real SIGKILL at every syscall of prepare and share)

    /// The child side: prepare, then share rw, ro, a file, recursive ro, a rootfs, a block
    /// rootfs and a legacy-method ro volume, in one process. Also the re-run after a kill.
    func crashChild() {
        let src = sources()
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "cr", configuration: config()),
              let legacy = try? LinuxFilesystemSharer(sandboxID: "cr", configuration: config(.legacy)) else { exit(3) }
        let c = Container(id: "c", rootfs: .hostMounted(FilePath(src.rw)))
        do {
            try sharer.prepareSync()
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rw), destination: "/data"))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.file), destination: "/f", options: ["ro"]))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rec), destination: "/rec", options: ["ro", "rbind"]))
            _ = try sharer.shareRootFilesystemSync(container: c)
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "b", rootfs: .blockDevice(BlockDevice(address: "/dev/vdb", fstype: "ext4"))))
            _ = try legacy.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/legacy", options: ["ro"]))
            // An image rootfs and two layered rootfs sharing a layer.
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "img", rootfs: .image(FilePath(src.image), deviceAddress: "05")))
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "l1", rootfs: .layers([FilePath(src.ro), FilePath(src.rec)])))
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "l2", rootfs: .layers([FilePath(src.ro)])))
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "hi", rootfs: .imageOnHost(FilePath(src.image))))
        } catch {
            print("child error: \(error)")
            exit(4)
        }
        exit(0)
    }

    /// Every kill point of the child: each checked syscall, by name and occurrence, read from a
    /// traced run (`FSSHARE_FAULT_TRACE`).
    func crashPoints() -> [String] {
        let trace = work + "/trace"
        unlink(trace)
        // A first run makes the root and the sources; the traced run then starts from the
        // state every killed run starts from (root present, no sandbox).
        _ = run([selfPath, "crash-child", work])
        _ = try? LinuxFilesystemSharer(sandboxID: "cr", configuration: config()).cleanupSync()
        let r = run([selfPath, "crash-child", work], environment: ["FSSHARE_FAULT_TRACE": trace])
        checks.check(r.status == 0, "traced child completes (\(r.output))")
        var seen: [String: Int] = [:]
        return (readFile(trace) ?? "").split(separator: "\n").map { name in
            seen[String(name), default: 0] += 1
            return "\(name)#\(seen[String(name)] ?? 1)=kill"
        }
    }

    /// A complete child run's result: every share recorded and, except the block rootfs, mounted.
    func expectCompleteShares(_ what: String) {
        guard let s = try? LinuxFilesystemSharer(sandboxID: "cr", configuration: config()), let shares = try? s.sharesSync() else {
            checks.check(false, "\(what): shares can be listed")
            return
        }
        let unmounted = shares.filter { !$0.mounted && ![.rootfsDirectory, .rootfsLayers, .rootfsImage].contains($0.record.kind) }.map(\.record.name)
        // 7 volume/rootfs shares, the image rootfs, two layered rootfs and their two layers, a
        // host-mounted image.
        checks.check(shares.count == 13 && unmounted.isEmpty, "\(what): 13 shares recorded, all that are mounts mounted (\(shares.count), unmounted: \(unmounted))")
    }

    func crash() {
        let points = crashPoints()
        let image = sources().image
        _ = checks.must("cleanup after the traced run") { try LinuxFilesystemSharer(sandboxID: "cr", configuration: config()).cleanupSync() }
        checks.check(points.count > 100, "the child makes \(points.count) checked syscalls, each a kill point")
        var rerunFailures: [String] = [], leftovers: [String] = []
        for point in points {
            // Killed, then the same operations again: they finish what the dead process began.
            let killed = run([selfPath, "crash-child", work], environment: ["FSSHARE_FAULTS": point])
            if killed.status != -SIGKILL { rerunFailures.append("\(point): child not killed (status \(killed.status))") }
            let rerun = run([selfPath, "crash-child", work])
            if rerun.status != 0 {
                rerunFailures.append("\(point): re-run exited \(rerun.status): \(rerun.output.suffix(300))")
            } else {
                let before = checks.failures
                expectCompleteShares("re-run after a kill at \(point)")
                if checks.failures != before { rerunFailures.append("\(point): incomplete after the re-run") }
            }
            _ = try? LinuxFilesystemSharer(sandboxID: "cr", configuration: config()).cleanupSync()
            if !mountsUnder(root).isEmpty || !listTree(root).isEmpty { leftovers.append("\(point) + re-run: \(mountsUnder(root)) \(listTree(root).prefix(3))") }
            if !eventuallyTrue({ loopDevices(backedBy: image).isEmpty }) { leftovers.append("\(point) + re-run: loop devices \(loopDevices(backedBy: image)) still bound") }
            // Killed, then cleaned up directly.
            _ = run([selfPath, "crash-child", work], environment: ["FSSHARE_FAULTS": point])
            do {
                try LinuxFilesystemSharer(sandboxID: "cr", configuration: config()).cleanupSync()
            } catch {
                leftovers.append("\(point): cleanup failed: \(error)")
            }
            if !mountsUnder(root).isEmpty || !listTree(root).isEmpty { leftovers.append("\(point): \(mountsUnder(root)) \(listTree(root).prefix(3))") }
            if !eventuallyTrue({ loopDevices(backedBy: image).isEmpty }) { leftovers.append("\(point): loop devices \(loopDevices(backedBy: image)) still bound") }
        }
        checks.check(rerunFailures.isEmpty, "after a kill at each of \(points.count) points, re-running the same operations completes them (\(rerunFailures.prefix(5)))")
        checks.check(leftovers.isEmpty, "after a kill at each of \(points.count) points, cleanup (with or without a re-run first) leaves no mount, no entry and no loop device (\(leftovers.prefix(5)))")
        print("figure: crash kill points \(points.count)")
    }

    // MARK: cleanup never deletes through a mount

    func noDeleteThroughMounts() {
        let src = sources()
        writeFile(src.rw + "/precious", "data")
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "nd", configuration: config()) else { return }
        _ = checks.must("prepare") { try sharer.prepareSync() }
        let c = Container(id: "c", rootfs: .hostMounted(FilePath(src.rw)))
        _ = checks.must("share rw + rootfs") {
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rw), destination: "/data"))
            _ = try sharer.shareRootFilesystemSync(container: c)
        }
        // An unmount that fails: cleanup must stop short of deleting anything.
        FaultInjection.install(FaultInjection.parse("umount2=EPERM") ?? [])
        let e = checks.mustFail("cleanup with failing unmounts fails") { try sharer.cleanupSync() }
        FaultInjection.install([])
        checks.check((e as? FSShareError)?.code == .incompleteCleanup, "error says cleanup is incomplete")
        checks.check(readFile(src.rw + "/precious") == "data", "source file survives a failed cleanup")
        // A mount nobody recorded (an operator's stray bind) inside mounts/.
        mkdirs(root + "/nd/mounts/stray")
        _ = checks.must("stray bind into mounts/") {
            try Sys.mount(source: FilePath(src.rw), target: FilePath(root + "/nd/mounts/stray"), flags: UInt(MS_BIND))
        }
        _ = checks.must("cleanup succeeds afterwards") { try sharer.cleanupSync() }
        checks.check(readFile(src.rw + "/precious") == "data", "source file survives cleanup of a stray mount")
        expectNothingLeft("after cleanup")
        // A bind made on the parent mount, under the sandbox dir, after its self-bind went away:
        // removal must not cross it.
        mkdirs(root + "/nd2/mounts/x")
        _ = try? Sys.mount(source: FilePath(src.rw), target: FilePath(root + "/nd2/mounts/x"), flags: UInt(MS_BIND))
        if let s2 = try? LinuxFilesystemSharer(sandboxID: "nd2", configuration: config()) {
            let e = checks.mustFail("cleanup of a directory with no manifest and a mount in it is refused") { try s2.cleanupSync() }
            checks.check((e as? FSShareError)?.code == .refused, "refused as not a sandbox")
        }
        checks.check(readFile(src.rw + "/precious") == "data", "source file survives (no manifest case)")
        checks.check(mountsUnder(root) == [root + "/nd2/mounts/x"], "the foreign mount was left mounted")
        _ = try? Sys.umount2(FilePath(root + "/nd2/mounts/x"), flags: Int32(MNT_DETACH))
        _ = run(["rm", "-r", root + "/nd2"])
        expectNothingLeft("after the test removed nd2 itself")
    }

    // MARK: status and leaks

    func statusLeaks() {
        let src = sources()
        mountSubmount(src.rec)
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "st", configuration: config()) else { return }
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        _ = checks.must("prepare + share (one of them recursive, carrying a submount)") {
            try sharer.prepareSync()
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/cfg", options: ["ro"]))
            _ = try sharer.shareFileSync(container: c, mount: Mount(source: FilePath(src.rec), destination: "/rec", options: ["ro", "rbind"]))
        }
        mkdirs(root + "/leak")
        _ = checks.must("someone else's mount under the root, outside any sandbox") {
            try Sys.mount(source: FilePath(src.ro), target: FilePath(root + "/leak"), flags: UInt(MS_BIND))
        }
        mkdirs(root + "/st/mounts/stray")
        _ = checks.must("a stray mount inside the sandbox that its manifest does not know") {
            try Sys.mount(source: FilePath(src.rw), target: FilePath(root + "/st/mounts/stray"), flags: UInt(MS_BIND))
        }
        let inv = checks.must("read inventory") { try Inventory.read(root: FilePath(root)) }
        checks.check(inv?.sandboxes.map(\.id) == ["st"], "inventory lists the sandbox only (\(inv?.sandboxes.map(\.id) ?? []))")
        checks.check(inv?.foreign.map(\.name) == ["leak"], "the mounted folder without a manifest is foreign")
        checks.check(inv?.sandboxes.first?.shares.count == 2, "inventory lists its shares")
        checks.check(inv?.sandboxes.first?.shares.allSatisfy(\.mounted) == true, "shares are mounted")
        checks.check(inv?.leakedMounts.map(\.string) == [root + "/st/mounts/stray", root + "/st/shared/stray"],
                     "only the stray mount in the sandbox (and its copy in shared/) is leaked; a recursive share's submounts are part of it (\(inv?.leakedMounts ?? []))")
        checks.check(inv?.foreignMounts.map(\.string) == [root + "/leak"], "the mount outside sandboxes is foreign (\(inv?.foreignMounts ?? []))")
        let report = checks.must("cleanup --all") { try Inventory.cleanupAll(root: FilePath(root)) }
        checks.check(report?.cleaned == ["st"] && report?.leftAlone.map(\.name) == ["leak"], "cleanup --all cleaned st and left leak alone")
        checks.check(mountsUnder(root) == [root + "/leak"], "cleanup --all removed every sandbox mount, and only those (\(mountsUnder(root)))")
        checks.check(!exists(root + "/st"), "cleanup --all removed the sandbox")
        checks.check(readFile(root + "/leak/key") == "value", "the foreign mount is still there")
        checks.check(readFile(src.ro + "/key") == "value" && readFile(src.rw + "/existing") == nil, "sources intact")
        _ = try? Sys.umount2(FilePath(root + "/leak"), flags: Int32(MNT_DETACH))
        _ = try? Sys.umount2(FilePath(src.rec + "/sub"), flags: Int32(MNT_DETACH))
    }
}
