#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Finds the guest block device a block storage names, the way Kata's agent reads the
/// `Storage.source` of its block drivers:
/// - `blk`: a PCI path (`02/00`: the slot of each bridge from the root bus, then the device's
///   slot, two hex digits each, function 0), or a `/dev` path for a cold-plugged disk;
/// - `scsi`: a SCSI address `target:lun` on any host, channel 0 (what virtio-scsi reports);
/// - `mmioblk`: a `/dev` path.
///
/// A hot-plugged disk may still be probed when the storage arrives, so the lookup is retried
/// until ``wait`` passes (Kata waits for the uevent; sysfs says the same thing).
enum BlockDevices {
    static let wait: UInt64 = 10_000_000_000
    static let sysfsRoot = "/sys"

    /// The `/dev` node for `source` under `driver`, once the kernel has it.
    static func resolve(driver: String, source: String) throws(GuestAgentError) -> String {
        let lookup: () throws(GuestAgentError) -> String?
        switch driver {
        case "blk":
            if source.hasPrefix("/dev/") {
                lookup = { () throws(GuestAgentError) in try existingNode(source) }
            } else {
                let slots = try parsePCIPath(source)
                lookup = { () throws(GuestAgentError) in try virtioBlockName(pciSlots: slots).map { "/dev/" + $0 } }
            }
        case "mmioblk":
            guard source.hasPrefix("/dev/") else {
                throw GuestAgentError(.invalid, "an mmioblk storage names its device by /dev path, not \"\(source)\"")
            }
            lookup = { () throws(GuestAgentError) in try existingNode(source) }
        case "scsi":
            let (target, lun) = try parseSCSIAddress(source)
            var scanned = false
            lookup = { () throws(GuestAgentError) in
                if let name = scsiBlockName(target: target, lun: lun) { return "/dev/" + name }
                if !scanned {
                    // What Kata's agent does: ask every host to scan for that target and LUN.
                    scanned = true
                    scanSCSIHosts(target: target, lun: lun)
                }
                return nil
            }
        default:
            throw GuestAgentError(.invalid, "\(driver) is not a block storage driver")
        }
        let deadline = Sys.monotonicNanoseconds() + wait
        while true {
            if let node = try lookup() {
                try requireBlockDevice(node)
                return node
            }
            guard Sys.monotonicNanoseconds() < deadline else {
                throw GuestAgentError(.notFound, "no block device appeared for \(driver) \(source) within \(wait / 1_000_000_000) s")
            }
            var pause = timespec(tv_sec: 0, tv_nsec: 20_000_000)
            nanosleep(&pause, nil)
        }
    }

    /// `"02/00"` → `[2, 0]`: one or more slots, hex, each below 32 (Kata's `pci::Path`).
    static func parsePCIPath(_ source: String) throws(GuestAgentError) -> [UInt8] {
        let parts = source.split(separator: "/", omittingEmptySubsequences: false)
        var slots: [UInt8] = []
        for p in parts {
            guard (1...2).contains(p.count), let v = UInt8(p, radix: 16), v < 32 else {
                throw GuestAgentError(.invalid, "\"\(source)\" is not a PCI path (slots in hex below 20, separated by /, e.g. 02/00)")
            }
            slots.append(v)
        }
        return slots
    }

    /// `"0:1"` → target 0, LUN 1 (decimal).
    static func parseSCSIAddress(_ source: String) throws(GuestAgentError) -> (UInt32, UInt32) {
        let parts = source.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let t = UInt32(parts[0]), let l = UInt32(parts[1]), parts.allSatisfy({ $0.allSatisfy(\.isNumber) }) else {
            throw GuestAgentError(.invalid, "\"\(source)\" is not a SCSI address (target:lun, e.g. 0:0)")
        }
        return (t, l)
    }

    /// The sysfs directory of the device at `slots`, following each bridge's secondary bus.
    static func pciDeviceDirectory(_ slots: [UInt8]) throws(GuestAgentError) -> String? {
        var dir = sysfsRoot + "/devices/pci0000:00"
        var bus = "0000:00"
        for (i, slot) in slots.enumerated() {
            dir += "/\(bus):\(hex2(slot)).0"
            if i == slots.count - 1 { break }
            // A bridge exposes exactly one bus below it.
            guard let buses = list(dir + "/pci_bus") else { return nil }
            guard buses.count == 1 else {
                throw GuestAgentError(.invalid, "\(dir) is not a PCI bridge with one bus (\(buses.sorted()))")
            }
            bus = buses[0]
        }
        return dir
    }

    static func virtioBlockName(pciSlots: [UInt8]) throws(GuestAgentError) -> String? {
        guard let dir = try pciDeviceDirectory(pciSlots), let entries = list(dir) else { return nil }
        for virtio in entries.sorted() where virtio.hasPrefix("virtio") {
            if let names = list("\(dir)/\(virtio)/block"), names.count == 1 { return names[0] }
        }
        return nil
    }

    static func scsiBlockName(target: UInt32, lun: UInt32) -> String? {
        guard let devices = list(sysfsRoot + "/bus/scsi/devices") else { return nil }
        for d in devices.sorted() {
            let f = d.split(separator: ":")
            guard f.count == 4, f[1] == "0", f[2] == "\(target)", f[3] == "\(lun)" else { continue }
            if let names = list("\(sysfsRoot)/bus/scsi/devices/\(d)/block"), names.count == 1 { return names[0] }
        }
        return nil
    }

    static func scanSCSIHosts(target: UInt32, lun: UInt32) {
        for host in list(sysfsRoot + "/class/scsi_host") ?? [] {
            let path = FilePath("\(sysfsRoot)/class/scsi_host/\(host)/scan")
            guard let fd = try? Sys.openat(nil, path, flags: O_WRONLY | O_CLOEXEC) else { continue }
            _ = try? Sys.writeAll(fd, Array("0 \(target) \(lun)".utf8), path: path)
            Sys.close(fd)
        }
    }

    static func existingNode(_ path: String) throws(GuestAgentError) -> String? {
        let parts = path.dropFirst(5).split(separator: "/", omittingEmptySubsequences: false)
        guard !path.utf8.contains(0), parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else {
            throw GuestAgentError(.invalid, "\"\(path)\" is not a canonical /dev path")
        }
        return (try? Sys.statx(nil, FilePath(path), followSymlinks: false)) == nil ? nil : path
    }

    static func requireBlockDevice(_ node: String) throws(GuestAgentError) {
        let st: FileStatus
        do { st = try Sys.statx(nil, FilePath(node), followSymlinks: false) } catch {
            throw GuestAgentError(.notFound, "\(node): \(error)")
        }
        guard st.kind == .blockDevice else { throw GuestAgentError(.invalid, "\(node) is a \(st.kind), not a block device") }
    }

    static func list(_ path: String) -> [String]? {
        (try? Sys.listDirectory(nil, FilePath(path)))?.map(\.name).filter { $0 != "." && $0 != ".." }
    }

    static func hex2(_ v: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(v >> 4)], digits[Int(v & 0xF)]])
    }
}
