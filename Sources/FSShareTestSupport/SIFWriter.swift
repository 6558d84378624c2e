#if canImport(Glibc)
import Glibc
#endif

/// Writes SIF files (Apptainer's container format) for tests, following the on-disk layout:
/// a 128-byte global header (launch script, `SIF_MAGIC`, version `01`, arch, id, times,
/// descriptor counts and offsets) and a table of packed 585-byte little-endian descriptors,
/// followed by the data objects. Written from the format's description, not from Apptainer's code.
public struct SIFWriter {
    /// One data object.
    public struct Object {
        /// SIF data types: 0x4001 definition file, 0x4004 partition, 0x4005 signature, ...
        public var datatype: Int32
        public var data: [UInt8]
        /// Partitions: 1 squashfs, 2 ext3, 3 archive, 4 raw, 5 encrypted squashfs.
        public var fstype: Int32
        /// Partitions: 1 system, 2 primary system, 3 data, 4 overlay.
        public var parttype: Int32
        public var used: Bool
        public var name: String

        public init(datatype: Int32, data: [UInt8], fstype: Int32 = 0, parttype: Int32 = 0, used: Bool = true, name: String = "") {
            self.datatype = datatype
            self.data = data
            self.fstype = fstype
            self.parttype = parttype
            self.used = used
            self.name = name
        }

        /// A partition object holding `image`.
        public static func partition(_ image: [UInt8], fstype: Int32 = 1, parttype: Int32 = 2) -> Object {
            Object(datatype: 0x4004, data: image, fstype: fstype, parttype: parttype, name: "rootfs")
        }
    }

    /// A SIF file laid out as a simple Apptainer one: a definition file first (so the root
    /// partition does not start where the data area does), then `partition` as the primary
    /// system partition.
    ///
    /// - Parameter partition: the root filesystem image (squashfs).
    /// - Returns: the writer (``bytes()``, ``dataOffsets()``).
    public static func withRootPartition(_ partition: [UInt8]) -> SIFWriter {
        SIFWriter(objects: [Object(datatype: 0x4001, data: Array("Bootstrap: scratch\n".utf8), name: "deffile"), .partition(partition)])
    }

    public var objects: [Object]
    /// Descriptor slots (used and free).
    public var descriptorSlots = 48
    /// Where data objects start and their alignment.
    public var dataOffset = 32768
    public var alignment = 4096
    /// Overrides for corrupting tests: replace the computed descriptor offset / count.
    public var descriptorsOffsetOverride: Int64?
    public var descriptorsTotalOverride: Int64?
    /// Overrides a partition's recorded offset (index into `objects`).
    public var offsetOverrides: [Int: Int64] = [:]

    public init(objects: [Object]) { self.objects = objects }

    /// The offsets each object's data will have.
    public func dataOffsets() -> [Int] {
        var at = dataOffset
        var out: [Int] = []
        for o in objects {
            out.append(at)
            at += (o.data.count + alignment - 1) / alignment * alignment
        }
        return out
    }

    /// The file's bytes.
    public func bytes() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: dataOffset)
        func put(_ v: UInt64, _ n: Int, at i: Int) { for k in 0..<n { out[i + k] = UInt8((v >> (8 * UInt64(k))) & 0xFF) } }
        func putBytes(_ b: [UInt8], at i: Int, max: Int) { for (k, x) in b.prefix(max).enumerated() { out[i + k] = x } }
        putBytes(Array("#!/usr/bin/env run-singularity\n".utf8), at: 0, max: 32)
        putBytes(Array("SIF_MAGIC".utf8), at: 32, max: 10)
        putBytes(Array("01".utf8), at: 42, max: 3)
        putBytes(Array("02".utf8), at: 45, max: 3)
        for k in 0..<16 { out[48 + k] = UInt8(k * 7 & 0xFF) }
        put(1_700_000_000, 8, at: 64)
        put(1_700_000_000, 8, at: 72)
        let descOffset = 4096
        put(UInt64(descriptorSlots - objects.count), 8, at: 80)
        put(UInt64(bitPattern: descriptorsTotalOverride ?? Int64(descriptorSlots)), 8, at: 88)
        put(UInt64(bitPattern: descriptorsOffsetOverride ?? Int64(descOffset)), 8, at: 96)
        put(UInt64(objects.count * 585), 8, at: 104)
        let offsets = dataOffsets()
        put(UInt64(dataOffset), 8, at: 112)
        put(UInt64((offsets.last.map { $0 + (objects.last?.data.count ?? 0) } ?? dataOffset) - dataOffset), 8, at: 120)
        precondition(descOffset + descriptorSlots * 585 <= dataOffset, "descriptors overlap data")
        for (i, o) in objects.enumerated() {
            let d = descOffset + i * 585
            put(UInt64(UInt32(bitPattern: o.datatype)), 4, at: d)
            out[d + 4] = o.used ? 1 : 0
            put(UInt64(i + 1), 4, at: d + 5)
            put(UInt64(0xF000_0001), 4, at: d + 9)
            put(UInt64(bitPattern: offsetOverrides[i] ?? Int64(offsets[i])), 8, at: d + 17)
            put(UInt64(o.data.count), 8, at: d + 25)
            put(UInt64((o.data.count + alignment - 1) / alignment * alignment), 8, at: d + 33)
            putBytes(Array(o.name.utf8), at: d + 73, max: 128)
            put(UInt64(UInt32(bitPattern: o.fstype)), 4, at: d + 201)
            put(UInt64(UInt32(bitPattern: o.parttype)), 4, at: d + 205)
            putBytes(Array("02".utf8), at: d + 209, max: 3)
        }
        for (i, o) in objects.enumerated() {
            let at = offsets[i]
            if out.count < at { out += [UInt8](repeating: 0, count: at - out.count) }
            out += o.data
        }
        return out
    }
}
