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

    /// What a lookup found: the `/dev` node to use and, when sysfs named the disk, the device
    /// number sysfs gives it (`major:minor` from its `dev` file).
    struct Found: Equatable {
        var node: String
        var device: (major: UInt32, minor: UInt32)?
        static func == (a: Found, b: Found) -> Bool {
            a.node == b.node && a.device?.major == b.device?.major && a.device?.minor == b.device?.minor
        }
    }

    /// The `/dev` node for `source` under `driver`, once the kernel has it.
    ///
    /// sysfs shows a hot-plugged disk (`…/block/vda`) before devtmpfs has made `/dev/vda`:
    /// the kernel creates the node on its own thread. So a disk found in sysfs is ready only
    /// when its node exists and stands for the device number sysfs reports.
    static func resolve(driver: String, source: String) throws(GuestAgentError) -> String {
        let lookup: () throws(GuestAgentError) -> Found?
        switch driver {
        case "blk":
            if source.hasPrefix("/dev/") {
                lookup = { () throws(GuestAgentError) in try existingNode(source).map { Found(node: $0) } }
            } else {
                let slots = try parsePCIPath(source)
                lookup = { () throws(GuestAgentError) in try virtioBlock(pciSlots: slots) }
            }
        case "mmioblk":
            guard source.hasPrefix("/dev/") else {
                throw GuestAgentError(.invalid, "an mmioblk storage names its device by /dev path, not \"\(source)\"")
            }
            lookup = { () throws(GuestAgentError) in try existingNode(source).map { Found(node: $0) } }
        case "scsi":
            let (target, lun) = try parseSCSIAddress(source)
            var scanned = false
            lookup = { () throws(GuestAgentError) in
                if let found = scsiBlock(target: target, lun: lun) { return found }
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
        return try waitForNode(lookup, missing: "no block device appeared for \(driver) \(source)", wait: wait)
    }

    /// Runs `lookup` every 20 ms until what it finds is ready (``nodeState(_:)``) or `wait`
    /// nanoseconds pass; the error says what was still missing.
    static func waitForNode(_ lookup: () throws(GuestAgentError) -> Found?, missing: String, wait: UInt64) throws(GuestAgentError) -> String {
        let deadline = Sys.monotonicNanoseconds() + wait
        var waitingFor = missing
        while true {
            if let found = try lookup() {
                switch try nodeState(found) {
                case .ready: return found.node
                case .pending(let why): waitingFor = why
                }
            }
            guard Sys.monotonicNanoseconds() < deadline else {
                throw GuestAgentError(.notFound, "\(waitingFor) within \(Double(wait) / 1e9) s")
            }
            var pause = timespec(tv_sec: 0, tv_nsec: 20_000_000)
            nanosleep(&pause, nil)
        }
    }

    enum NodeState: Equatable { case ready, pending(String) }

    /// Whether `found.node` is usable now. A node not there yet, or one that stands for another
    /// device than sysfs reports, is worth waiting for; anything but a block device is an error.
    static func nodeState(_ found: Found) throws(GuestAgentError) -> NodeState {
        let st: FileStatus
        do { st = try Sys.statx(nil, FilePath(found.node), followSymlinks: false) } catch {
            if error.errno == .noSuchFileOrDirectory {
                return .pending("the kernel made no \(found.node) for the disk it found")
            }
            throw GuestAgentError(.notFound, "\(found.node): \(error)")
        }
        guard st.kind == .blockDevice else {
            throw GuestAgentError(.invalid, "\(found.node) is a \(st.kind), not a block device")
        }
        if let want = found.device, (st.specialMajor, st.specialMinor) != (want.major, want.minor) {
            return .pending("\(found.node) is device \(st.specialMajor):\(st.specialMinor), not the disk's \(want.major):\(want.minor)")
        }
        return .ready
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

    static func virtioBlock(pciSlots: [UInt8]) throws(GuestAgentError) -> Found? {
        guard let dir = try pciDeviceDirectory(pciSlots), let entries = list(dir) else { return nil }
        for virtio in entries.sorted() where virtio.hasPrefix("virtio") {
            if let found = blockIn("\(dir)/\(virtio)/block") { return found }
        }
        return nil
    }

    static func scsiBlock(target: UInt32, lun: UInt32) -> Found? {
        guard let devices = list(sysfsRoot + "/bus/scsi/devices") else { return nil }
        for d in devices.sorted() {
            let f = d.split(separator: ":")
            guard f.count == 4, f[1] == "0", f[2] == "\(target)", f[3] == "\(lun)" else { continue }
            if let found = blockIn("\(sysfsRoot)/bus/scsi/devices/\(d)/block") { return found }
        }
        return nil
    }

    /// The one disk in a sysfs `block` directory, with the device number from its `dev` file
    /// (nil until the kernel has written it).
    static func blockIn(_ blockDir: String) -> Found? {
        guard let names = list(blockDir), names.count == 1,
              let device = deviceNumber(Sys.readSysfsAttribute("\(blockDir)/\(names[0])/dev")) else { return nil }
        return Found(node: "/dev/" + names[0], device: device)
    }

    /// `"254:0"` (a sysfs `dev` attribute) → (254, 0).
    static func deviceNumber(_ text: String?) -> (major: UInt32, minor: UInt32)? {
        guard let parts = text?.split(separator: ":", omittingEmptySubsequences: false), parts.count == 2,
              let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else { return nil }
        return (major, minor)
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

    static func list(_ path: String) -> [String]? {
        (try? Sys.listDirectory(nil, FilePath(path)))?.map(\.name).filter { $0 != "." && $0 != ".." }
    }

    static func hex2(_ v: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(v >> 4)], digits[Int(v & 0xF)]])
    }
}
