import CProtobufCCheck
import FSShare
import FSShareProto
import FoundationEssentials
import SwiftProtobuf
import SystemPackage
import Testing

/// Every descriptor fsshare emits, checked against Kata's values, then encoded by
/// swift-protobuf and decoded by protobuf-c (an independent implementation), field by field.
@Suite("Storage descriptors")
struct DescriptorTests {
    /// What protobuf-c sees in the bytes.
    func decodedByProtobufC(_ s: Storage) throws -> String {
        let bytes: [UInt8] = try s.serializedBytes()
        var out = [CChar](repeating: 0, count: 1 << 16)
        let n = bytes.withUnsafeBufferPointer { fsshare_pbc_dump_storage($0.baseAddress, $0.count, &out, out.count) }
        try #require(n >= 0, "protobuf-c rejected the bytes")
        return String(decoding: out[0..<Int(n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The same dump built from the Swift message.
    func expectedDump(_ s: Storage) -> String {
        var out = "driver=\(s.driver)\n"
        for o in s.driverOptions { out += "driver_options=\(o)\n" }
        out += "source=\(s.source)\nfstype=\(s.fstype)\n"
        for o in s.options { out += "options=\(o)\n" }
        out += "mount_point=\(s.mountPoint)\n"
        if s.hasFsGroup {
            out += "fs_group.group_id=\(s.fsGroup.groupID)\nfs_group.group_change_policy=\(s.fsGroup.groupChangePolicy.rawValue)\n"
        }
        return out + "shared=\(s.shared ? 1 : 0)\n"
    }

    func roundTrip(_ s: Storage) throws {
        #expect(try decodedByProtobufC(s) == expectedDump(s))
        let back = try Storage(serializedBytes: try s.serializedBytes() as [UInt8])
        #expect(back == s)
    }

    @Test("virtio-fs sandbox storage, with and without dax")
    func virtioFS() throws {
        let plain = Storages.sandbox(SharerConfiguration(sharedFilesystem: .virtioFS()))
        #expect(plain.count == 1)
        #expect(plain[0].driver == "virtio-fs" && plain[0].source == "kataShared" && plain[0].fstype == "virtiofs")
        #expect(plain[0].mountPoint == "/run/kata-containers/shared/containers/" && plain[0].options.isEmpty)
        let dax = Storages.sandbox(SharerConfiguration(sharedFilesystem: .virtioFS(dax: true)))
        #expect(dax[0].options == ["dax"])
        // Kata's Go runtime appends to a package-global options slice; ours never grows.
        #expect(Storages.sandbox(SharerConfiguration(sharedFilesystem: .virtioFS(dax: true)))[0].options == ["dax"])
        try roundTrip(plain[0])
        try roundTrip(dax[0])
    }

    @Test("9p sandbox storage uses Kata's options")
    func ninep() throws {
        let s = Storages.sandbox(SharerConfiguration(sharedFilesystem: .virtio9p(msize: 262144)))
        #expect(s[0].driver == "9p" && s[0].fstype == "9p" && s[0].source == "kataShared")
        #expect(s[0].options == ["trans=virtio,version=9p2000.L,cache=mmap", "nodev", "msize=262144"])
        #expect(Storages.sandbox(SharerConfiguration(sharedFilesystem: .virtio9p()))[0].options.last == "msize=8192")
        try roundTrip(s[0])
    }

    @Test("shm storage, and none for shared_fs=none")
    func shm() throws {
        let s = Storages.sandbox(SharerConfiguration(sharedFilesystem: .none, shmSize: 67_108_864))
        #expect(s.count == 1)
        #expect(s[0].driver == "ephemeral" && s[0].source == "shm" && s[0].fstype == "tmpfs")
        #expect(s[0].mountPoint == "/run/kata-containers/sandbox/shm")
        #expect(s[0].options == ["noexec", "nosuid", "nodev", "mode=1777", "size=67108864"])
        #expect(Storages.sandbox(SharerConfiguration(sharedFilesystem: .none)).isEmpty)
        try roundTrip(s[0])
    }

    @Test("block rootfs per block driver; xfs gets nouuid", arguments: BlockDeviceDriver.allCases)
    func blockRootfs(driver: BlockDeviceDriver) throws {
        let expected = ["virtio-blk": "blk", "virtio-scsi": "scsi", "virtio-mmio": "mmioblk", "virtio-blk-ccw": "blk-ccw"]
        for fstype in ["ext4", "xfs"] {
            let s = Storages.blockRootfs(
                containerID: "c1", device: BlockDevice(address: "02/00", fstype: fstype), driver: driver,
                guestSharedDir: SharerConfiguration.defaultGuestSharedDir)
            #expect(s.driver == expected[driver.rawValue])
            #expect(s.source == "02/00" && s.fstype == fstype)
            #expect(s.mountPoint == "/run/kata-containers/shared/containers/c1")
            #expect(s.options == (fstype == "xfs" ? ["nouuid"] : []))
            try roundTrip(s)
        }
    }

    @Test("image rootfs: the block storage, detected fstype, ro")
    func imageRootfs() throws {
        let s = Storages.imageRootfs(
            containerID: "c1", deviceAddress: "05", image: RootfsImage(format: .erofs, offset: 0, size: 4096), driver: .virtioBlk,
            guestSharedDir: SharerConfiguration.defaultGuestSharedDir)
        #expect(s.driver == "blk" && s.source == "05" && s.fstype == "erofs" && s.options == ["ro"])
        #expect(s.mountPoint == "/run/kata-containers/shared/containers/c1")
        try roundTrip(s)
    }

    @Test("layered rootfs: Kata's overlayfs storage, guest upper (overlay-rw) or a shared one (index=off)")
    func layeredRootfs() throws {
        let lowers = ["/g/.layers/base", "/g/.layers/mid", "/g/.layers/app"]
        let s = Storages.layeredRootfs(containerID: "c1", lowerGuestPaths: lowers, upper: nil)
        #expect(s.driver == "overlayfs" && s.source == "none" && s.fstype == "overlay")
        #expect(s.options == ["io.katacontainers.fs-opt.overlay-rw", "lowerdir=/g/.layers/app:/g/.layers/mid:/g/.layers/base"], "overlayfs lists the top layer first")
        #expect(s.mountPoint == "/run/kata-containers/c1/rootfs")
        try roundTrip(s)
        let u = Storages.layeredRootfs(containerID: "c1", lowerGuestPaths: lowers, upper: ("/g/c1/upper/fs", "/g/c1/upper/work"))
        #expect(u.options == ["upperdir=/g/c1/upper/fs", "workdir=/g/c1/upper/work", "lowerdir=/g/.layers/app:/g/.layers/mid:/g/.layers/base", "index=off"])
        try roundTrip(u)
    }

    @Test("guest pull rootfs: Kata's image_guest_pull option with Go-escaped metadata")
    func guestPull() throws {
        let s = Storages.guestPullRootfs(
            containerID: "c1", image: "docker.io/library/busybox:latest",
            annotations: ["io.kubernetes.cri.image-name": "busybox", "a<b": "x&y"])
        #expect(s.driver == "image_guest_pull" && s.fstype == "overlay" && s.source == "docker.io/library/busybox:latest")
        #expect(s.mountPoint == "/run/kata-containers/c1/rootfs")
        #expect(s.driverOptions == [#"image_guest_pull={"metadata":{"a\u003cb":"x\u0026y","io.kubernetes.cri.image-name":"busybox"}}"#])
        try roundTrip(s)
    }

    @Test("fs_group and shared survive the round trip (Kata numbers FSGroup from 2)")
    func fsGroup() throws {
        var s = Storages.blockRootfs(containerID: "c", device: BlockDevice(address: "a", fstype: "ext4"), driver: .virtioBlk, guestSharedDir: "/g/")
        s.fsGroup.groupID = 4242
        s.fsGroup.groupChangePolicy = .onRootMismatch
        s.shared = true
        try roundTrip(s)
        // The raw bytes of FSGroup: field 2 varint, field 3 varint.
        let group: [UInt8] = try s.fsGroup.serializedBytes()
        #expect(group == [0x10, 0x92, 0x21, 0x18, 0x01])
    }

    @Test("CopyFileRequest is wire-compatible (decoded by protobuf-c)")
    func copyFile() throws {
        var r = Grpc_CopyFileRequest()
        r.path = "/run/kata-containers/shared/containers/x/..data"
        r.fileSize = 1 << 33
        r.fileMode = 0o100644
        r.dirMode = 0o750
        r.uid = -1
        r.gid = 1000
        r.offset = 1 << 20
        r.data = Data([0, 1, 0xfe, 0xff])
        let bytes: [UInt8] = try r.serializedBytes()
        var out = [CChar](repeating: 0, count: 4096)
        let n = bytes.withUnsafeBufferPointer { fsshare_pbc_dump_copy_file($0.baseAddress, $0.count, &out, out.count) }
        try #require(n >= 0)
        let dump = String(decoding: out[0..<Int(n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        #expect(dump == "path=\(r.path)\nfile_size=8589934592\nfile_mode=33188\ndir_mode=488\nuid=-1\ngid=1000\noffset=1048576\ndata=0001feff\n")
    }
}
