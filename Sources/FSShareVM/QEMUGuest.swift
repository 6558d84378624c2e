#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareSystem
import SystemPackage

/// The kernel and initramfs a guest boots (made by `hack/guest/build`).
public struct GuestImage: Sendable, Equatable {
    public var kernel: FilePath
    public var initrd: FilePath

    public init(kernel: FilePath, initrd: FilePath) {
        self.kernel = kernel
        self.initrd = initrd
    }

    /// The image in `directory` (`vmlinuz`, `initramfs.img`), or nil if either is missing.
    /// Paths are made absolute (libvirt starts QEMU in another directory).
    public static func at(_ directory: FilePath) -> GuestImage? {
        guard let resolved = realpath(directory.string, nil) else { return nil }
        let absolute = FilePath(String(cString: resolved))
        free(resolved)
        let image = GuestImage(kernel: absolute.appending("vmlinuz"), initrd: absolute.appending("initramfs.img"))
        guard (try? Sys.statx(nil, image.kernel, followSymlinks: true)) != nil,
              (try? Sys.statx(nil, image.initrd, followSymlinks: true)) != nil
        else { return nil }
        return image
    }
}

/// How the guest reaches the host's files.
public enum GuestShare: Sendable, Equatable {
    /// virtiofsd exports `source` under `tag` (vhost-user-fs).
    case virtioFS(source: FilePath, tag: String)
    /// QEMU's own 9p server exports `source` under `tag` (passthrough security model).
    case virtio9p(source: FilePath, tag: String)
    /// No shared filesystem (copy mode).
    case none
}

/// A read-only raw disk handed to the guest at boot: the byte range `offset ..< offset + size`
/// of `path` (QEMU's raw driver limits the guest to it: for a SIF file only its root partition).
public struct GuestDisk: Sendable, Equatable {
    /// Where the disk sits in the guest.
    public enum Bus: Sendable, Equatable {
        /// virtio-blk-pci on the root bus at `slot` (the PCI path is that slot).
        case virtioBlk(slot: UInt8)
        /// scsi-hd on a virtio-scsi controller, channel 0.
        case scsi(target: UInt32, lun: UInt32)
    }
    public var path: FilePath
    public var offset: Int64
    public var size: Int64
    public var bus: Bus

    public init(path: FilePath, offset: Int64, size: Int64, bus: Bus) {
        self.path = path
        self.offset = offset
        self.size = size
        self.bus = bus
    }

    /// The address Kata's block storages name the disk by: the PCI path (`10`) for
    /// virtio-blk, `target:lun` for SCSI.
    public var deviceAddress: String {
        switch bus {
        case .virtioBlk(let slot): (slot < 16 ? "0" : "") + String(slot, radix: 16)
        case .scsi(let target, let lun): "\(target):\(lun)"
        }
    }

    /// QEMU's arguments for disk number `index` (`-blockdev` + `-device`).
    func qemuArguments(index: Int) -> [String] {
        // QEMU option strings escape a comma by doubling it.
        let file = path.string.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,")
        var args = [
            "-blockdev",
            "driver=raw,node-name=disk\(index),read-only=on,offset=\(offset),size=\(size),file.driver=file,file.filename=\(file),file.read-only=on",
        ]
        switch bus {
        case .virtioBlk(let slot): args += ["-device", "virtio-blk-pci,drive=disk\(index),addr=0x\(String(slot, radix: 16))"]
        case .scsi(let target, let lun): args += ["-device", "scsi-hd,bus=scsi0.0,channel=0,scsi-id=\(target),lun=\(lun),drive=disk\(index)"]
        }
        return args
    }
}

/// QEMU's accelerator.
public enum Accelerator: String, Sendable {
    case kvm, tcg

    /// KVM only when it can boot a stock kernel: `/dev/kvm` opens and the host runs a hardware
    /// KVM module (kvm_intel / kvm_amd). Some hosts expose `/dev/kvm` through another module
    /// (PVM here) that boots only specially built kernels. `FSSHARE_GUEST_ACCEL` overrides.
    public static func detect() -> Accelerator {
        if let forced = getenv("FSSHARE_GUEST_ACCEL").map({ String(cString: $0) }), let a = Accelerator(rawValue: forced) {
            return a
        }
        guard let fd = try? Sys.openat(nil, "/dev/kvm", flags: O_RDWR | O_CLOEXEC) else { return .tcg }
        Sys.close(fd)
        for module in ["kvm_intel", "kvm_amd"] where (try? Sys.statx(nil, FilePath("/sys/module/\(module)"))) != nil {
            return .kvm
        }
        return .tcg
    }
}

/// Why a guest could not be started or did not come up.
public struct GuestError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A QEMU guest booted from a ``GuestImage``, with the virtio-serial ports fsshare's guest
/// agent listens on (`agent.channel.0` for the agent protocol, `fsshare.check` for in-guest
/// checks), and the sandbox's `shared/` exported by virtio-fs or 9p.
///
/// Everything it makes lives in `workDir`: the sockets, virtiofsd's and QEMU's logs and the
/// guest console. ``stop()`` ends QEMU (virtiofsd exits with it).
public final class QEMUGuest: Sendable {
    public static let agentPortName = "agent.channel.0"
    public static let checkPortName = "fsshare.check"

    public let workDir: FilePath
    public let accelerator: Accelerator
    /// The host end of the agent channel (QEMU's socket for the `agent.channel.0` port).
    public let agentAddress: AgentAddress
    /// The host end of the in-guest check channel.
    public let checkAddress: AgentAddress
    public let consoleLog: FilePath
    let qemu: ChildProcess
    let virtiofsd: ChildProcess?
    /// When QEMU was started (CLOCK_MONOTONIC ns).
    public let startedAt: UInt64

    /// The C virtiofsd Debian 12 ships, or the Rust one newer releases ship.
    public static func virtiofsdPath() -> FilePath? {
        let candidates: [String] = ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"]
        return candidates.first { access($0, X_OK) == 0 }.map { FilePath($0) }
    }

    /// Starts the guest (and virtiofsd first, for virtio-fs). Returns once QEMU runs; use
    /// ``waitForAgent(timeout:)`` for the guest to be up.
    public init(
        image: GuestImage, share: GuestShare, workDir: FilePath, memoryMiB: Int = 512, disks: [GuestDisk] = [],
        accelerator: Accelerator = .detect()
    ) throws(GuestError) {
        self.workDir = workDir
        self.accelerator = accelerator
        do { try Sys.makeDirectories(workDir, mode: 0o700) } catch { throw GuestError("cannot make \(workDir): \(error)") }
        let agentSocket = workDir.appending("agent.sock"), checkSocket = workDir.appending("check.sock")
        agentAddress = .unix(agentSocket)
        checkAddress = .unix(checkSocket)
        consoleLog = workDir.appending("console.log")
        for stale in [agentSocket, checkSocket, consoleLog, workDir.appending("virtiofsd.sock")] {
            try? Sys.unlinkat(nil, stale, directory: false)
        }

        var argv = [
            "qemu-system-x86_64", "-accel", accelerator.rawValue, "-cpu", accelerator == .kvm ? "host" : "max",
            "-smp", "1", "-m", "\(memoryMiB)", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", image.kernel.string, "-initrd", image.initrd.string,
            "-append", "console=ttyS0 panic=-1 quiet",
            "-serial", "file:\(consoleLog)",
            "-device", "virtio-serial-pci",
            "-chardev", "socket,id=agent,path=\(agentSocket),server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=\(QEMUGuest.agentPortName)",
            "-chardev", "socket,id=check,path=\(checkSocket),server=on,wait=off",
            "-device", "virtserialport,chardev=check,name=\(QEMUGuest.checkPortName)",
        ]
        if disks.contains(where: { if case .scsi = $0.bus { true } else { false } }) {
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        }
        for (i, disk) in disks.enumerated() { argv += disk.qemuArguments(index: i) }
        var daemon: ChildProcess?
        switch share {
        case .virtioFS(let source, let tag):
            guard let binary = QEMUGuest.virtiofsdPath() else { throw GuestError("virtiofsd is not installed (Debian: qemu-system-common)") }
            let socket = workDir.appending("virtiofsd.sock")
            // cache=auto: later binds and unmounts on the host reach the guest (cache=always
            // would hide them for up to a day). xattr and CAP_SYS_ADMIN: an overlay layer marks
            // opaque directories with trusted.overlay.opaque, which the guest's overlayfs must
            // read (and a host upper directory needs trusted.* set); without sys_admin the
            // daemon sees no trusted.* attribute at all.
            do {
                daemon = try ChildProcess(
                    [binary.string, "--socket-path=\(socket)", "-o", "source=\(source)", "-o", "cache=auto", "-o", "sandbox=namespace",
                     "-o", "xattr", "-o", "modcaps=+sys_admin"],
                    logPath: workDir.appending("virtiofsd.log").string)
            } catch { throw GuestError("cannot start virtiofsd: \(error)") }
            // QEMU needs the socket to exist when it starts.
            let deadline = Sys.monotonicNanoseconds() + 10_000_000_000
            while (try? Sys.statx(nil, socket)) == nil {
                if daemon?.exitStatus() != nil || Sys.monotonicNanoseconds() > deadline {
                    daemon?.stop(signal: SIGKILL)
                    throw GuestError("virtiofsd did not create \(socket): \(QEMUGuest.tail(workDir.appending("virtiofsd.log")))")
                }
                usleep(5_000)
            }
            argv += [
                "-object", "memory-backend-memfd,id=mem,size=\(memoryMiB)M,share=on", "-numa", "node,memdev=mem",
                "-chardev", "socket,id=vfs,path=\(socket)", "-device", "vhost-user-fs-pci,chardev=vfs,tag=\(tag)",
            ]
        case .virtio9p(let source, let tag):
            // multidevs=remap: shared/ spans many mounts; without it inode numbers collide.
            argv += [
                "-fsdev", "local,id=fs0,path=\(source),security_model=passthrough,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=\(tag)",
            ]
        case .none:
            break
        }
        startedAt = Sys.monotonicNanoseconds()
        do {
            qemu = try ChildProcess(argv, logPath: workDir.appending("qemu.log").string)
        } catch {
            daemon?.stop(signal: SIGKILL)
            throw GuestError("cannot start QEMU (Debian: qemu-system-x86): \(error)")
        }
        virtiofsd = daemon
    }

    /// Waits until the guest agent answers on the agent channel; returns the time from QEMU's
    /// start (the boot time as the host sees it).
    public func waitForAgent(timeout: Duration) throws(GuestError) -> Duration {
        try QEMUGuest.waitForAgent(agentAddress, since: startedAt, timeout: timeout, consoleLog: consoleLog) { [qemu, workDir] in
            qemu.exitStatus().map { "QEMU exited (\($0)): \(QEMUGuest.tail(workDir.appending("qemu.log")))" }
        }
    }

    /// Polls the agent at `address` (GetInfo) until it answers, `exited` reports the VM gone, or
    /// `timeout` after `since` (CLOCK_MONOTONIC ns) passes. Returns the time since `since`.
    public static func waitForAgent(
        _ address: AgentAddress, since: UInt64, timeout: Duration, consoleLog: FilePath, exited: () -> String?
    ) throws(GuestError) -> Duration {
        let deadline = since + timeout.nanoseconds
        while Sys.monotonicNanoseconds() < deadline {
            if let why = exited() {
                throw GuestError("\(why) before the agent answered; console: \(QEMUGuest.tail(consoleLog))")
            }
            let probe = AgentClient(address: address, callTimeout: .seconds(2), connectTimeout: .seconds(1))
            defer { probe.disconnect() }
            if (try? probe.info()) != nil {
                return .nanoseconds(Int64(Sys.monotonicNanoseconds() - since))
            }
            usleep(100_000)
        }
        throw GuestError("the guest agent did not answer within \(timeout); console: \(QEMUGuest.tail(consoleLog))")
    }

    /// Ends QEMU (SIGTERM, then SIGKILL after 5 s) and waits for virtiofsd to exit with it.
    public func stop() {
        qemu.stop(signal: SIGTERM, grace: .seconds(5))
        virtiofsd?.stop(signal: SIGTERM, grace: .seconds(5))
    }

    /// True while QEMU runs.
    public var isRunning: Bool { qemu.exitStatus() == nil }

    /// The last part of a log file, for error messages.
    public static func tail(_ path: FilePath, bytes: Int = 1500) -> String {
        guard let fd = try? Sys.openat(nil, path, flags: O_RDONLY | O_CLOEXEC) else { return "(no \(path))" }
        defer { Sys.close(fd) }
        let all = (try? Sys.readAll(fd, path: path)) ?? []
        return String(decoding: all.suffix(bytes), as: UTF8.self)
    }
}
