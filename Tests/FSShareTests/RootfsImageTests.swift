#if canImport(Glibc)
import Glibc
#endif
import FSShare
import FSShareSystem
import FSShareTestSupport
import SystemPackage
import Testing

/// Root filesystem images recognised from their bytes: real images made by Debian's tools
/// (mksquashfs, mke2fs -d, mkfs.erofs), SIF files written by the test support's `SIFWriter`, and
/// broken, truncated, misleading and encrypted files — each a clear answer or a clear refusal.
@Suite("Rootfs images: detection")
struct RootfsImageTests {
    static func run(_ argv: [String]) throws {
        let r = Sys.run(argv)
        try #require(r.status == 0, "\(argv.joined(separator: " ")) exited \(r.status): \(r.output)")
    }

    /// A small tree and an image of it in every supported format.
    struct Images {
        let dir: String
        var squashfs: String { dir + "/rootfs.sqfs" }
        var ext2: String { dir + "/rootfs.ext2" }
        var ext3: String { dir + "/rootfs.ext3" }
        var ext4: String { dir + "/rootfs.ext4" }
        var erofs: String { dir + "/rootfs.erofs" }

        init(_ name: String) throws {
            dir = TestEnvironment.scratch(name)
            let tree = dir + "/tree"
            _ = Sys.run(["mkdir", "-p", tree + "/etc", tree + "/bin"])
            writeFile(tree + "/etc/os-release", "ID=fsshare-test\n")
            writeFile(tree + "/bin/hello", "#!/bin/sh\necho hello\n")
            try RootfsImageTests.run(["mksquashfs", tree, squashfs, "-noappend", "-quiet", "-no-progress"])
            for (kind, path) in [("ext2", ext2), ("ext3", ext3), ("ext4", ext4)] {
                try RootfsImageTests.run(["mke2fs", "-q", "-F", "-t", kind, "-d", tree, path, "4M"])
            }
            try RootfsImageTests.run(["mkfs.erofs", "--quiet", erofs, tree])
        }
    }

    func inspect(_ path: String) -> Result<RootfsImage, FSShareError> {
        do throws(FSShareError) { return .success(try RootfsImage.inspect(FilePath(path))) } catch { return .failure(error) }
    }

    func refusal(_ path: String) -> String? {
        if case .failure(let e) = inspect(path), e.code == .refused { return e.message }
        return nil
    }

    @Test("every supported format is recognised from its bytes, whatever its name")
    func formats() throws {
        let images = try Images("image-formats")
        defer { _ = Sys.run(["rm", "-rf", images.dir]) }
        let expected: [(String, RootfsImage.Format, String)] = [
            (images.squashfs, .squashfs, "squashfs"), (images.ext2, .ext2, "ext4"), (images.ext3, .ext3, "ext4"),
            (images.ext4, .ext4, "ext4"), (images.erofs, .erofs, "erofs"),
        ]
        for (path, format, fstype) in expected {
            let found = try inspect(path).get()
            #expect(found.format == format, "\(path): \(found.summary)")
            #expect(found.filesystemType == fstype)
            #expect(found.offset == 0 && found.size == Int64(readBytes(path).count) && found.sifPartitionID == nil)
        }
        // A misleading name changes nothing: a squashfs called .ext4, an erofs called .sif.
        _ = Sys.run(["cp", images.squashfs, images.dir + "/looks-like.ext4"])
        _ = Sys.run(["cp", images.erofs, images.dir + "/looks-like.sif"])
        #expect(try inspect(images.dir + "/looks-like.ext4").get().format == .squashfs)
        #expect(try inspect(images.dir + "/looks-like.sif").get().format == .erofs)
    }

    @Test("SIF: the root filesystem partition's extent, checked against what it holds")
    func sif() throws {
        let images = try Images("image-sif")
        defer { _ = Sys.run(["rm", "-rf", images.dir]) }
        let squash = readBytes(images.squashfs), ext3 = readBytes(images.ext3), ext4 = readBytes(images.ext4)
        let deffile = SIFWriter.Object(datatype: 0x4001, data: Array("Bootstrap: scratch\n".utf8), name: "deffile")
        func sif(_ name: String, _ w: SIFWriter) -> String {
            let path = images.dir + "/" + name
            writeBytes(path, w.bytes())
            return path
        }
        // A definition file, then the primary system partition (squashfs), then a signature.
        var w = SIFWriter(objects: [deffile, .partition(squash), SIFWriter.Object(datatype: 0x4005, data: [1, 2, 3])])
        let found = try inspect(sif("app.sif", w)).get()
        #expect(found.format == .squashfs && found.offset == Int64(w.dataOffsets()[1]) && found.size == Int64(squash.count) && found.sifPartitionID == 2,
                "\(found.summary)")
        // An ext3 system partition (SIF's only other filesystem type), not marked primary.
        w = SIFWriter(objects: [.partition(ext3, fstype: 2, parttype: 1)])
        #expect(try inspect(sif("ext3.sif", w)).get().format == .ext3)
        // A data partition beside the system one does not confuse it; two system partitions
        // with one primary pick the primary.
        w = SIFWriter(objects: [.partition(ext3, fstype: 2, parttype: 3), .partition(squash, parttype: 1), .partition(squash, parttype: 2)])
        #expect(try inspect(sif("several.sif", w)).get().sifPartitionID == 3)
        // Refusals, each with its reason.
        let cases: [(String, SIFWriter, String)] = [
            ("encrypted.sif", SIFWriter(objects: [.partition(squash, fstype: 5)]), "encrypted"),
            ("two-systems.sif", SIFWriter(objects: [.partition(squash, parttype: 1), .partition(squash, parttype: 1)]), "ambiguous"),
            ("no-system.sif", SIFWriter(objects: [deffile, .partition(squash, parttype: 3)]), "without a system partition"),
            ("raw.sif", SIFWriter(objects: [.partition(squash, fstype: 4)]), "raw data"),
            ("mislabelled.sif", SIFWriter(objects: [.partition(ext4, fstype: 1)]), "declared squashfs but holds ext4"),
            ("garbage.sif", SIFWriter(objects: [.partition([UInt8](repeating: 0x5A, count: 8192))]), "no recognisable filesystem"),
            ("outside.sif", { var x = SIFWriter(objects: [.partition(squash)]); x.offsetOverrides = [0: 1 << 40]; return x }(), "outside"),
            ("table.sif", { var x = SIFWriter(objects: [.partition(squash)]); x.descriptorsOffsetOverride = 1 << 40; return x }(), "descriptor table"),
            ("huge-table.sif", { var x = SIFWriter(objects: [.partition(squash)]); x.descriptorsTotalOverride = -1; return x }(), "descriptor table"),
        ]
        for (name, writer, reason) in cases {
            let message = refusal(sif(name, writer))
            #expect(message?.contains(reason) == true, "\(name): \(message ?? "accepted: \(inspect(images.dir + "/" + name))")")
        }
        // A SIF file cut short in its data: the partition lies outside the file.
        let whole = w.bytes()
        writeBytes(images.dir + "/cut.sif", Array(whole.prefix(whole.count - 100)))
        #expect(refusal(images.dir + "/cut.sif")?.contains("outside") == true)
    }

    @Test("truncated, corrupted, encrypted, compressed and non-files are refused with what was found")
    func refusals() throws {
        let images = try Images("image-refusals")
        defer { _ = Sys.run(["rm", "-rf", images.dir]) }
        let d = images.dir
        let squash = readBytes(images.squashfs), ext4 = readBytes(images.ext4), erofs = readBytes(images.erofs)
        writeBytes(d + "/empty.img", [])
        writeBytes(d + "/short-squash.img", Array(squash.prefix(50)))
        writeBytes(d + "/short-ext4.img", Array(ext4.prefix(1500)))
        var zeroed = ext4
        zeroed[1024 + 56] = 0
        zeroed[1024 + 57] = 0
        for i in 0..<16 { zeroed[i] = 0 }
        writeBytes(d + "/no-magic.img", zeroed)
        var oldSquash = squash
        oldSquash[28] = 3
        writeBytes(d + "/squashfs3.img", oldSquash)
        var encrypted = ext4
        encrypted[1024 + 96 + 2] |= 0x01  // INCOMPAT_ENCRYPT (0x10000)
        writeBytes(d + "/encrypted-ext4.img", encrypted)
        writeBytes(d + "/luks.img", [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE, 0, 2] + [UInt8](repeating: 0, count: 4096))
        writeBytes(d + "/layer.tar.gz", [0x1F, 0x8B, 8, 0] + [UInt8](repeating: 0, count: 4096))
        writeBytes(d + "/erofs-cut.img", Array(erofs.prefix(1030)))
        let cases: [(String, String)] = [
            ("empty.img", "empty"), ("short-squash.img", "too short"), ("short-ext4.img", "too short"),
            ("no-magic.img", "starts with 00 00"), ("squashfs3.img", "squashfs 3.x"), ("encrypted-ext4.img", "encrypted ext4"),
            ("luks.img", "LUKS"), ("layer.tar.gz", "gzip"), ("erofs-cut.img", "too short"),
        ]
        for (name, reason) in cases {
            let message = refusal(d + "/" + name)
            #expect(message?.contains(reason) == true, "\(name): \(message ?? "accepted")")
        }
        // Not a regular file.
        #expect(refusal(d)?.contains("not an image file") == true)
        #expect(refusal("/dev/null")?.contains("not an image file") == true)
        // Missing: a system-call error naming the path, not a refusal.
        if case .failure(let e) = inspect(d + "/missing.img") {
            #expect(e.code == .systemCall && e.message.contains("missing.img"))
        } else {
            Issue.record("a missing image was accepted")
        }
    }
}
