#if canImport(Glibc)
import Glibc
#endif
import FSShareCore
import FSShareSystem
import SystemPackage

/// A container root filesystem image, recognised from its content (never from its name): a
/// squashfs, ext2/3/4 or erofs filesystem image, or an Apptainer SIF container whose root
/// filesystem partition is one of those. What the VM is given is the byte range ``offset`` ..<
/// ``offset`` + ``size`` of the file (the whole file, or the SIF partition), read-only, mounted
/// in the guest as ``filesystemType``.
///
/// Anything else is refused with a sentence saying what was found, encrypted images included
/// (LUKS, SIF encrypted squashfs): fsshare never hands the guest bytes it could not identify.
public struct RootfsImage: Sendable, Equatable {
    /// What the image's bytes are.
    public enum Format: String, Sendable, Equatable {
        /// A squashfs 4.x filesystem image (read-only).
        case squashfs
        /// An ext2 filesystem image (no journal, no ext4 features).
        case ext2
        /// An ext3 filesystem image (a journal, no ext4 features).
        case ext3
        /// An ext4 filesystem image.
        case ext4
        /// An erofs filesystem image (read-only).
        case erofs
    }

    /// The filesystem of the root filesystem (inside the SIF partition for a SIF file).
    public var format: Format
    /// Where the filesystem starts in the file (0, or the SIF partition's offset).
    public var offset: Int64
    /// Its length in bytes (the file's size, or the SIF partition's).
    public var size: Int64
    /// For a SIF file: the partition's descriptor id; nil for a plain image.
    public var sifPartitionID: UInt32?

    /// The `fstype` the guest mounts it with (ext2 and ext3 images are mounted by the ext4 driver,
    /// which reads them, as Kata's guests do).
    public var filesystemType: String {
        switch format {
        case .squashfs: return "squashfs"
        case .erofs: return "erofs"
        case .ext2, .ext3, .ext4: return "ext4"
        }
    }

    /// A short description: `squashfs, 1.2 MiB` or `SIF partition 2: squashfs at 32768, 1.2 MiB`.
    public var summary: String {
        let mib = Double(size) / 1_048_576
        let sizeText = mib >= 0.1 ? "\(Double(Int(mib * 10)) / 10) MiB" : "\(size) bytes"
        if let id = sifPartitionID { return "SIF partition \(id): \(format.rawValue) at offset \(offset), \(sizeText)" }
        return "\(format.rawValue), \(sizeText)"
    }

    /// Creates a description of an image extent (tests, callers that know their image).
    ///
    /// - Parameters:
    ///   - format: the filesystem.
    ///   - offset: where it starts in the file.
    ///   - size: its length in bytes.
    ///   - sifPartitionID: the SIF partition's id, for a SIF file.
    public init(format: Format, offset: Int64, size: Int64, sifPartitionID: UInt32? = nil) {
        self.format = format
        self.offset = offset
        self.size = size
        self.sifPartitionID = sifPartitionID
    }

    // MARK: - Inspecting

    /// Opens `path` (a regular file; symbolic links are followed, as for any operator-given
    /// path) and recognises it.
    ///
    /// - Parameter path: the image file.
    /// - Returns: the root filesystem's format and extent.
    /// - Throws: `refused` (with what was found) for anything but a supported, unencrypted image;
    ///   `systemCall` when the file cannot be opened or read.
    public static func inspect(_ path: FilePath) throws(FSShareError) -> RootfsImage {
        let fd = try sys("cannot open the image \(path)") { () throws(SystemCallError) in
            try Sys.openat(nil, path, flags: O_RDONLY)
        }
        defer { Sys.close(fd) }
        return try inspect(fd, shownAs: path)
    }

    /// Recognises the image open at `fd`.
    ///
    /// - Parameters:
    ///   - fd: the image, open for reading.
    ///   - path: how it is shown in messages.
    /// - Returns: the root filesystem's format and extent.
    /// - Throws: as ``inspect(_:)``.
    public static func inspect(_ fd: FileDescriptor, shownAs path: FilePath) throws(FSShareError) -> RootfsImage {
        let st = try sys("cannot stat the image \(path)") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
        guard st.kind == .regular else {
            throw FSShareError(.refused, "\(path) is a \(st.kind), not an image file")
        }
        let reader = Reader(fd: fd, path: path, size: Int64(st.size))
        if let sif = try reader.sifHeader() { return try sifRootfs(reader, sif) }
        guard let format = try recognise(reader, at: 0, length: reader.size) else {
            throw FSShareError(.refused, "\(path) is not a squashfs, ext2/3/4, erofs or SIF image (\(try describeUnknown(reader)))")
        }
        return RootfsImage(format: format, offset: 0, size: reader.size)
    }

    // MARK: - Filesystems

    /// The filesystem whose superblock is at `offset` within a `length`-byte extent, or nil.
    static func recognise(_ r: Reader, at offset: Int64, length: Int64) throws(FSShareError) -> Format? {
        // squashfs: "hsqs" at 0; major version 4 at byte 28.
        if length >= 96, let sb = try r.bytes(at: offset, count: 96), sb.starts(with: Array("hsqs".utf8)) {
            let major = le16(sb, 28)
            guard major == 4 else {
                throw FSShareError(.refused, "\(r.path) is a squashfs \(major).x image; only squashfs 4 is mounted by Linux")
            }
            return .squashfs
        }
        // ext2/3/4 and erofs: superblocks at 1024.
        guard length >= 2048, let sb = try r.bytes(at: offset + 1024, count: 1024) else { return nil }
        if le32(sb, 0) == 0xE0F5_E1E2 { return .erofs }
        if le16(sb, 56) == 0xEF53 {
            let compat = le32(sb, 92), incompat = le32(sb, 96), roCompat = le32(sb, 100)
            // Encryption and casefolding need keys or tables the guest may not have; refuse
            // what would not mount rather than attach it.
            if incompat & 0x10000 != 0 {
                throw FSShareError(.refused, "\(r.path) is an encrypted ext4 image (INCOMPAT_ENCRYPT); encrypted images are not shared")
            }
            // ext4-only features: extents, 64bit, flex_bg, meta_bg csum, inline data, huge files...
            let ext4Incompat: UInt32 = 0x40 | 0x80 | 0x200 | 0x400 | 0x8000 | 0x1000
            let ext4RoCompat: UInt32 = 0x8 | 0x10 | 0x20 | 0x40 | 0x400 | 0x1000
            if incompat & ext4Incompat != 0 || roCompat & ext4RoCompat != 0 { return .ext4 }
            return compat & 0x4 != 0 ? .ext3 : .ext2
        }
        return nil
    }

    /// What an unrecognised file starts with, for the refusal's sentence.
    static func describeUnknown(_ r: Reader) throws(FSShareError) -> String {
        guard let head = try r.bytes(at: 0, count: Int(min(r.size, 16))), !head.isEmpty else { return "it is empty" }
        if head.starts(with: [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE]) { return "it is a LUKS-encrypted volume" }
        if head.starts(with: [0x1F, 0x8B]) { return "it is gzip-compressed" }
        if head.starts(with: [0x28, 0xB5, 0x2F, 0xFD]) { return "it is zstd-compressed" }
        if head.starts(with: [0xFD, 0x37, 0x7A, 0x58, 0x5A]) { return "it is xz-compressed" }
        if r.size > 262, let tar = try r.bytes(at: 257, count: 5), tar == Array("ustar".utf8) { return "it is a tar archive, not a filesystem image" }
        if head.starts(with: Array("QFI".utf8) + [0xFB]) { return "it is a qcow2 disk image" }
        if r.size < 2048 { return "it is \(r.size) bytes, too short for a filesystem superblock" }
        let hex = head.prefix(8).map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: " ")
        return "it starts with \(hex)"
    }

    // MARK: - SIF

    /// A SIF global header's fields fsshare uses.
    struct SIFHeader {
        var descriptorsTotal: Int64
        var descriptorsOffset: Int64
    }

    /// SIF layout: a 128-byte global header, then packed 585-byte descriptors (little endian).
    static let sifHeaderSize = 128
    static let sifDescriptorSize = 585
    static let sifDataPartition: Int32 = 0x4004
    static let sifMaxDescriptors: Int64 = 4096

    /// Picks the root filesystem partition of a SIF file: the primary system partition, or the
    /// only system partition; refuses encrypted and ambiguous ones.
    static func sifRootfs(_ r: Reader, _ h: SIFHeader) throws(FSShareError) -> RootfsImage {
        let path = r.path
        guard h.descriptorsTotal > 0, h.descriptorsTotal <= sifMaxDescriptors,
              h.descriptorsOffset >= Int64(sifHeaderSize),
              h.descriptorsOffset + h.descriptorsTotal * Int64(sifDescriptorSize) <= r.size
        else {
            throw FSShareError(.refused, "\(path) is a SIF file whose descriptor table (\(h.descriptorsTotal) entries at \(h.descriptorsOffset)) does not fit in its \(r.size) bytes")
        }
        struct Partition { var id: UInt32; var offset: Int64; var size: Int64; var fstype: Int32; var parttype: Int32 }
        var partitions: [Partition] = []
        for i in 0..<h.descriptorsTotal {
            guard let d = try r.bytes(at: h.descriptorsOffset + i * Int64(sifDescriptorSize), count: sifDescriptorSize) else { break }
            let datatype = Int32(bitPattern: le32(d, 0))
            let used = d[4] != 0
            guard used, datatype == sifDataPartition else { continue }
            let id = le32(d, 5)
            let offset = Int64(bitPattern: le64(d, 17)), size = Int64(bitPattern: le64(d, 25))
            // Extra (at 201): fstype int32, parttype int32, arch [3].
            let fstype = Int32(bitPattern: le32(d, 201)), parttype = Int32(bitPattern: le32(d, 205))
            partitions.append(Partition(id: id, offset: offset, size: size, fstype: fstype, parttype: parttype))
        }
        // Partition types: 1 system, 2 primary system, 3 data, 4 overlay.
        let systems = partitions.filter { $0.parttype == 1 || $0.parttype == 2 }
        let primary = systems.filter { $0.parttype == 2 }
        let chosen: Partition
        if primary.count == 1 {
            chosen = primary[0]
        } else if primary.isEmpty && systems.count == 1 {
            chosen = systems[0]
        } else if systems.isEmpty {
            throw FSShareError(.refused, "\(path) is a SIF file without a system partition (\(partitions.count) partitions, none holds a root filesystem)")
        } else {
            throw FSShareError(.refused, "\(path) is a SIF file with \(systems.count) system partitions and no single primary one; which is the root filesystem is ambiguous")
        }
        let fstypeName = [1: "squashfs", 2: "ext3", 3: "an archive", 4: "raw data", 5: "encrypted squashfs"][Int(chosen.fstype)] ?? "fstype \(chosen.fstype)"
        switch chosen.fstype {
        case 5:
            throw FSShareError(.refused, "\(path) is a SIF file whose root filesystem partition is encrypted squashfs; encrypted images are not shared")
        case 1, 2:
            break
        default:
            throw FSShareError(.refused, "\(path) is a SIF file whose root filesystem partition holds \(fstypeName), not a filesystem fsshare shares")
        }
        guard chosen.offset >= 0, chosen.size > 0, chosen.offset <= r.size, chosen.size <= r.size - chosen.offset else {
            throw FSShareError(.refused, "\(path) is a SIF file whose root filesystem partition (\(chosen.size) bytes at \(chosen.offset)) lies outside its \(r.size) bytes")
        }
        // The partition must really be what its descriptor says.
        guard let found = try recognise(r, at: chosen.offset, length: chosen.size) else {
            throw FSShareError(.refused, "\(path) is a SIF file whose root filesystem partition is declared \(fstypeName) but holds no recognisable filesystem")
        }
        let declaredSquash = chosen.fstype == 1
        guard declaredSquash == (found == .squashfs) else {
            throw FSShareError(.refused, "\(path) is a SIF file whose root filesystem partition is declared \(fstypeName) but holds \(found.rawValue)")
        }
        return RootfsImage(format: found, offset: chosen.offset, size: chosen.size, sifPartitionID: chosen.id)
    }

    // MARK: - Reading

    /// Bounded reads of the image; a read past its end is nil, not an error.
    struct Reader {
        let fd: FileDescriptor
        let path: FilePath
        let size: Int64

        func bytes(at offset: Int64, count: Int) throws(FSShareError) -> [UInt8]? {
            guard offset >= 0, count >= 0, offset <= size, Int64(count) <= size - offset else { return nil }
            var out = [UInt8](repeating: 0, count: count)
            var done = 0
            while done < count {
                var failure: SystemCallError?
                let n = out.withUnsafeMutableBytes { b -> Int in
                    do throws(SystemCallError) {
                        return try Sys.pread(fd, into: UnsafeMutableRawBufferPointer(rebasing: b[done...]), offset: offset + Int64(done), path: path)
                    } catch {
                        failure = error
                        return 0
                    }
                }
                if let failure { throw FSShareError.system("cannot read the image \(path)", failure) }
                if n == 0 { return nil }  // shrank under us
                done += n
            }
            return out
        }

        /// The SIF global header, if the file is a SIF file.
        func sifHeader() throws(FSShareError) -> SIFHeader? {
            guard let h = try bytes(at: 0, count: RootfsImage.sifHeaderSize),
                  Array(h[32..<42]) == Array("SIF_MAGIC".utf8) + [0] else { return nil }
            // launch 32, magic 10, version 3, arch 3, id 16, ctime 8, mtime 8, free 8, then the count and offset.
            return SIFHeader(descriptorsTotal: Int64(bitPattern: le64(h, 88)), descriptorsOffset: Int64(bitPattern: le64(h, 96)))
        }
    }

    static func le16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) | UInt16(b[i + 1]) << 8 }
    static func le32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24
    }
    static func le64(_ b: [UInt8], _ i: Int) -> UInt64 { UInt64(le32(b, i)) | UInt64(le32(b, i + 4)) << 32 }
}
