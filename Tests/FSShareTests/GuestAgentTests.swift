#if canImport(Glibc)
import Glibc
#endif
import FSShare
import FSShareAgentChannel
@testable import FSShareGuestAgent
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import FSShareVM
import Synchronization
import SystemPackage
import Testing

/// fsshare-agent's sandbox storages (CreateSandbox / DestroySandbox) and its in-guest checks,
/// against a real agent process on the host (in a private mount namespace where it mounts).
@Suite("Guest agent: storages and checks")
struct GuestAgentTests {
    static func storage(_ driver: String, _ source: String, _ fstype: String, _ point: String, _ options: [String] = []) -> Grpc_Storage {
        var s = Grpc_Storage()
        s.driver = driver
        s.source = source
        s.fstype = fstype
        s.mountPoint = point
        s.options = options
        return s
    }

    @Test(.enabled(if: TestEnvironment.canMount, "needs root with CAP_SYS_ADMIN to make mount namespaces"))
    func createSandboxMountsAllOrNothing() throws {
        let dir = TestEnvironment.scratch("storages")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let agent = try AgentUnderTest(dir, wrapper: ["unshare", "-m", "--propagation", "private", "--"], extra: ["--checks"])
        let client = agent.client()
        let probe = GuestCheckClient(address: agent.address)
        let shm = dir + "/run/sandbox/shm", second = dir + "/run/second"
        func fstype(_ p: String) throws -> String { try probe.probe(.fstype, p).text }
        let hostType = try fstype(dir)

        // Refused before anything is mounted: unknown driver, relative or ".." mount points,
        // fstype not matching the driver (a block storage's filesystem must be one the agent
        // mounts from a disk).
        for bad in [
            Self.storage("nvdimm", "/dev/pmem0", "ext4", shm),
            Self.storage("blk", "/dev/vda", "nfs", shm),
            Self.storage("ephemeral", "shm", "tmpfs", "run/shm"),
            Self.storage("ephemeral", "shm", "tmpfs", dir + "/run/../etc"),
            Self.storage("virtio-fs", "kataShared", "ext4", shm),
        ] {
            #expect(throws: AgentError.self) { try client.createSandbox(id: "s", storages: [Self.storage("ephemeral", "shm", "tmpfs", shm), bad]) }
            #expect(try fstype(shm) == hostType, "nothing mounted after refusing \(bad.driver) at \(bad.mountPoint)")
        }
        // A mount that fails in the kernel (tmpfs refuses the size) unmounts the ones before it.
        #expect(throws: AgentError.self) {
            try client.createSandbox(id: "s", storages: [
                Self.storage("ephemeral", "shm", "tmpfs", shm, ["nosuid", "size=1048576"]),
                Self.storage("ephemeral", "shm", "tmpfs", second, ["size=lots"]),
            ])
        }
        #expect(try fstype(shm) == hostType, "the first storage was rolled back")

        // Kata's options: flags become mount flags, the rest data.
        try client.createSandbox(id: "s", storages: [
            Self.storage("ephemeral", "shm", "tmpfs", shm, ["noexec", "nosuid", "nodev", "mode=1777", "size=1048576"]),
        ])
        #expect(try fstype(shm) == "tmpfs")
        let line = try probe.probe(.mounts, shm).names.first ?? ""
        #expect(line.contains("nosuid") && line.contains("nodev") && line.contains("noexec"), "flags applied: \(line)")
        #expect(throws: AgentError.self, "a second CreateSandbox is refused") { try client.createSandbox(id: "t", storages: []) }
        try client.destroySandbox()
        #expect(try fstype(shm) == hostType, "DestroySandbox unmounted it")
        try client.createSandbox(id: "t", storages: [])
        try client.destroySandbox()
    }

    /// `watchable-bind` (a container's storages): the tmpfs root, the first copy in
    /// atomic-writer order, Kata's placement rules, RemoveContainer and DestroySandbox.
    @Test(.enabled(if: TestEnvironment.canMount, "needs root with CAP_SYS_ADMIN to make mount namespaces"))
    func watchableBindMirrorsAVolume() throws {
        let dir = TestEnvironment.scratch("watchable-agent")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let agent = try AgentUnderTest(dir, wrapper: ["unshare", "-m", "--propagation", "private", "--"], extra: ["--checks"])
        let client = agent.client()
        let probe = GuestCheckClient(address: agent.address)
        let share = agent.shareDir
        // What the host's export shows: the volume's plain share and the empty watchable/ dir.
        let kubelet = KubeletEmulator(root: share + "/kube", plugin: "configmap", name: "cfg")
        kubelet.write(["a": "1\n", "b": "2\n"])
        _ = Sys.run(["mkdir", "-p", share + "/watchable", share + "/passthrough/watchable"])
        let mirror = share + "/watchable/web-0123456789abcdef-cfg"
        func bind(_ source: String, _ point: String) -> Grpc_Storage { Self.storage("watchable-bind", source, "bind", point, ["ro"]) }
        let hostType = try probe.probe(.fstype, share + "/watchable").text

        // Refused before anything happens: not directly below watchable/, a source outside the
        // share directory, "..".
        for bad in [
            bind(kubelet.volume, share + "/elsewhere/x"),
            bind(kubelet.volume, share + "/watchable/a/b"),
            bind("/etc", share + "/watchable/x"),
            bind(kubelet.volume, share + "/watchable/.."),
        ] {
            #expect(throws: AgentError.self, "\(bad.source) -> \(bad.mountPoint)") { try client.createContainer(id: "web", storages: [bad]) }
        }
        #expect(try probe.probe(.fstype, share + "/watchable").text == hostType, "nothing mounted after the refusals")

        try client.createContainer(id: "web", storages: [bind(kubelet.volume, mirror)])
        #expect(try probe.probe(.fstype, share + "/watchable").text == "tmpfs")
        #expect(try probe.probe(.read, mirror + "/a").text == "1\n")
        #expect(try probe.probe(.read, mirror + "/b").text == "2\n")
        let link = try probe.probe(.stat, mirror + "/..data")
        #expect(link.mode & UInt32(S_IFMT) == UInt32(S_IFLNK), "..data is copied as a link")
        // Kata: every mirror of the sandbox below one root.
        #expect(throws: AgentError.self) {
            try client.createContainer(id: "side", storages: [bind(kubelet.volume, share + "/passthrough/watchable/x")])
        }
        #expect(throws: AgentError.self, "the same container twice") { try client.createContainer(id: "web", storages: [bind(kubelet.volume, mirror)]) }
        try client.removeContainer(id: "web")
        #expect(try probe.probe(.stat, mirror).errno == ENOENT, "RemoveContainer dropped the mirror")
        #expect(try probe.probe(.fstype, share + "/watchable").text == "tmpfs", "the root stays for the sandbox's other containers")
        try client.createSandbox(id: "s", storages: [])
        try client.destroySandbox()
        #expect(try probe.probe(.fstype, share + "/watchable").text == hostType, "DestroySandbox unmounted the watchable tmpfs")
    }

    /// A watchable mirror the agent has not mounted yet is read-only under the request (the
    /// share): the agent says FAILED_PRECONDITION and the watcher waits quietly, retrying, until
    /// the place is writable, then mirrors. Provoked for real: a read-only tmpfs stands in for
    /// the read-only virtio-fs share until DestroySandbox removes it.
    @Test(.enabled(if: TestEnvironment.canMount, "needs root with CAP_SYS_ADMIN to make mount namespaces"))
    func watcherWaitsForTheWatchableMirror() throws {
        let dir = TestEnvironment.scratch("watchable-wait")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let agent = try AgentUnderTest(dir, wrapper: ["unshare", "-m", "--propagation", "private", "--"])
        let client = agent.client()
        try client.createSandbox(id: "s", storages: [Self.storage("ephemeral", "ro-share", "tmpfs", agent.shareDir + "/watchable", ["ro"])])
        let kubelet = KubeletEmulator(root: dir + "/kubelet", plugin: "configmap", name: "cfg")
        kubelet.write(["a": "1\n"])
        let lines = Mutex<[String]>([])
        let watcher = VolumeWatcher(logger: .lines { line in lines.withLock { $0.append(line) } })
        try watcher.start()
        defer { watcher.stop() }
        let mirror = agent.shareDir + "/watchable/c-0123456789abcdef-cfg"
        try watcher.watch(sandboxID: "s", name: "cfg", volume: FilePath(kubelet.volume), guestPath: mirror, agent: agent.client(), watchable: true)
        usleep(1_500_000)
        #expect(watcher.statistics.failedSyncs == 0, "waiting is not a failure")
        #expect(!lines.withLock { $0 }.contains { $0.contains("failed") }, "\(lines.withLock { $0 })")
        #expect(watcher.watchedVolumes == ["s/cfg"], "still mirrored")
        // The place becomes writable (in a guest: the agent mounts the mirror's tmpfs).
        try client.destroySandbox()
        let deadline = Sys.monotonicNanoseconds() + 10_000_000_000
        while readFile(mirror + "/a") != "1\n" && Sys.monotonicNanoseconds() < deadline { usleep(20_000) }
        #expect(readFile(mirror + "/a") == "1\n", "mirrored once writable: \(lines.withLock { $0 })")
    }

    /// Kata's block storage addresses, and what the agent refuses before anything is mounted.
    @Test func blockAndOverlayStoragesAreCheckedFirst() throws {
        #expect(try BlockDevices.parsePCIPath("02/00") == [2, 0])
        #expect(try BlockDevices.parsePCIPath("1f") == [31])
        for bad in ["", "20", "g0", "02//00", "002", "02/", "/02"] {
            #expect(throws: GuestAgentError.self, "PCI path \(bad)") { try BlockDevices.parsePCIPath(bad) }
        }
        #expect(try BlockDevices.parseSCSIAddress("0:1") == (0, 1))
        for bad in ["0", "a:b", "0:1:2", ":1", "0:-1", "0:+1"] {
            #expect(throws: GuestAgentError.self, "SCSI address \(bad)") { try BlockDevices.parseSCSIAddress(bad) }
        }
        func storage(_ driver: String, _ fstype: String, _ options: [String] = [], source: String = "02/00") -> Grpc_Storage {
            var s = Grpc_Storage()
            s.driver = driver
            s.fstype = fstype
            s.source = source
            s.options = options
            s.mountPoint = "/run/kata-containers/c1/rootfs"
            return s
        }
        try StorageMounter.validate(storage("blk", "squashfs", ["ro"]))
        try StorageMounter.validate(storage("scsi", "erofs", ["ro"], source: "0:1"))
        try StorageMounter.validate(storage("overlayfs", "overlay", ["io.katacontainers.fs-opt.overlay-rw", "lowerdir=/a/b:/c"], source: "none"))
        let refused: [(Grpc_Storage, String)] = [
            (storage("blk", "nfs"), "a filesystem the agent does not mount from a disk"),
            (storage("nvme", "ext4"), "an unknown driver"),
            (storage("overlayfs", "ext4", ["lowerdir=/a"]), "overlayfs with another fstype"),
            (storage("overlayfs", "overlay", ["io.katacontainers.fs-opt.overlay-rw"]), "overlayfs without lowerdir"),
            (storage("overlayfs", "overlay", ["lowerdir=/a", "lowerdir=/b"]), "two lowerdir options"),
            (storage("overlayfs", "overlay", ["lowerdir=a/b"]), "a relative layer"),
            (storage("overlayfs", "overlay", ["lowerdir=/a/../etc"]), "a layer with .."),
            (storage("overlayfs", "overlay", ["lowerdir=/a,upperdir=/etc"]), "a layer smuggling another option"),
            (storage("overlayfs", "overlay", ["lowerdir=/a", "upperdir=/x/./y"]), "a non-canonical upper"),
        ]
        for (s, why) in refused {
            #expect(throws: GuestAgentError.self, "\(why) is refused") { try StorageMounter.validate(s) }
        }
    }

    /// sysfs names a hot-plugged disk before devtmpfs has made its node (the CI run that found
    /// this saw `statx(/dev/vda): ENOENT` right after the attach). The agent waits until the node
    /// exists and stands for the device number sysfs gives, and says which of the two it missed.
    @Test func aDiskIsUsedOnlyOnceItsNodeStandsForIt() throws {
        // Linux's dev_t for major < 4096 and minor < 256 (glibc's makedev is a macro).
        @Sendable func blockDev(_ major: UInt32, _ minor: UInt32) -> dev_t { dev_t(major << 8 | minor) }
        let dir = TestEnvironment.scratch("blocknode")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        mkdirs(dir)
        guard mknod(dir + "/probe", S_IFBLK | 0o600, blockDev(7, 200)) == 0 else {
            print("SKIP: block-node test needs CAP_MKNOD: mknod: \(String(cString: strerror(errno)))")
            return
        }
        #expect(BlockDevices.deviceNumber("254:16")! == (254, 16))
        for bad in ["", "254", "254:", "a:1", "1:2:3"] {
            #expect(BlockDevices.deviceNumber(bad) == nil, "dev file \(bad)")
        }
        let found = BlockDevices.Found(node: dir + "/vdz", device: (7, 201))
        #expect(try BlockDevices.nodeState(found) != .ready, "no node yet")
        #expect(mknod(dir + "/vdz", S_IFBLK | 0o600, blockDev(7, 202)) == 0)
        guard case .pending(let why) = try BlockDevices.nodeState(found) else {
            Issue.record("a node for another device is not the disk")
            return
        }
        #expect(why.contains("7:202") && why.contains("7:201"), "\(why)")
        unlink(dir + "/vdz")

        // The node appears 150 ms after sysfs showed the disk: the wait takes it.
        let maker = try OSThread { usleep(150_000); _ = mknod(dir + "/vdz", S_IFBLK | 0o600, blockDev(7, 201)) }
        defer { maker.join() }
        let started = Sys.monotonicNanoseconds()
        let node = try BlockDevices.waitForNode({ found }, missing: "none", wait: 5_000_000_000)
        #expect(node == dir + "/vdz")
        #expect(Sys.monotonicNanoseconds() - started >= 100_000_000, "it waited for the node")

        // Never appearing: the error names what was missing, not "no block device".
        let absent = BlockDevices.Found(node: dir + "/vdy", device: (7, 203))
        do {
            _ = try BlockDevices.waitForNode({ absent }, missing: "none", wait: 100_000_000)
            Issue.record("a node that never appears is an error")
        } catch {
            #expect(error.message.contains("made no \(dir)/vdy"), "\(error.message)")
        }
        // Something other than a block device at the node is refused at once.
        writeFile(dir + "/vdx", "x")
        #expect(throws: GuestAgentError.self) {
            try BlockDevices.waitForNode({ .init(node: dir + "/vdx", device: nil) }, missing: "none", wait: 5_000_000_000)
        }
    }

    /// A writable overlay's upper directory holds what the container wrote: removing it never
    /// follows a link planted there.
    @Test func scratchRemovalFollowsNoLink() throws {
        let dir = TestEnvironment.scratch("scratch")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        mkdirs(dir + "/outside")
        writeFile(dir + "/outside/keep", "keep\n")
        mkdirs(dir + "/upper/a/b")
        writeFile(dir + "/upper/a/b/f", "x")
        try Sys.symlinkat(dir + "/outside", nil, FilePath(dir + "/upper/a/link"))
        try Sys.symlinkat(dir + "/outside/keep", nil, FilePath(dir + "/upper/filelink"))
        try StorageMounter.removeTree(FilePath(dir + "/upper"))
        #expect((try? Sys.statx(nil, FilePath(dir + "/upper"))) == nil)
        #expect(readFile(dir + "/outside/keep") == "keep\n")
        try StorageMounter.removeTree(FilePath(dir + "/upper"))  // gone already: not an error
    }

    @Test func mountOptionsSplitIntoFlagsAndData() {
        let r = StorageMounter.parseOptions(["trans=virtio,version=9p2000.L,cache=mmap", "nodev", "msize=8192", "ro", "rw"])
        #expect(r.data == "trans=virtio,version=9p2000.L,cache=mmap,msize=8192")
        #expect(r.flags == UInt(MS_NODEV), "ro then rw leaves rw; nodev stays")
    }

    /// The reader loop must see what a pod would see: it counts a dangling `..data` when an update
    /// is not atomic, and a torn read when keys change in place one by one.
    @Test func readerLoopCatchesNonAtomicUpdates() throws {
        let dir = TestEnvironment.scratch("reader")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let agent = try AgentUnderTest(dir, extra: ["--checks"])
        let probe = GuestCheckClient(address: agent.address)
        let vol = dir + "/vol"
        _ = Sys.run(["mkdir", "-p", vol + "/..v1"])
        for key in ["a", "b"] {
            writeFile(vol + "/..v1/" + key, "old")
            symlink("..data/" + key, vol + "/" + key)
        }
        symlink("..v1", vol + "/..data")

        // Atomic (kubelet's order): never dangling, never torn.
        let atomic = try watching(probe, vol, ["a": "new", "b": "new"]) {
            _ = Sys.run(["mkdir", "-p", vol + "/..v2"])
            for key in ["a", "b"] { writeFile(vol + "/..v2/" + key, "new") }
            symlink("..v2", vol + "/..data_tmp")
            rename(vol + "/..data_tmp", vol + "/..data")
        }
        #expect(atomic.matched && atomic.dangling == 0 && atomic.torn == 0, "\(atomic)")

        // Not atomic: ..data removed, then made again a while later.
        let gap = try watching(probe, vol, ["a": "v3", "b": "v3"]) {
            _ = Sys.run(["mkdir", "-p", vol + "/..v3"])
            for key in ["a", "b"] { writeFile(vol + "/..v3/" + key, "v3") }
            unlink(vol + "/..data")
            usleep(50_000)
            symlink("..v3", vol + "/..data")
        }
        #expect(gap.matched && gap.dangling > 0, "a missing ..data is seen: \(gap)")

        // In place, key by key, under one ..data: torn.
        let inPlace = try watching(probe, vol, ["a": "v4", "b": "v4"]) {
            writeFile(vol + "/..v3/a", "v4")
            usleep(50_000)
            writeFile(vol + "/..v3/b", "v4")
        }
        #expect(inPlace.matched && inPlace.torn > 0, "a half-applied update is seen: \(inPlace)")
    }

    func watching(_ probe: GuestCheckClient, _ vol: String, _ expect: [String: String], update: () -> Void) throws -> Fsshare_WatchContentResponse {
        let result = Mutex<Fsshare_WatchContentResponse?>(nil)
        let t = try OSThread {
            let r = try? probe.watchContent(dir: vol, expect: expect, timeout: .seconds(10))
            result.withLock { $0 = r }
        }
        usleep(50_000)
        update()
        t.join()
        return try #require(result.withLock { $0 })
    }
}
