import FSShare
import SystemPackage

/// What a hypervisor offers for sharing host files, read from libvirt's domain capabilities:
/// the `<filesystem>` driver types (`path`, `handle`, `virtiofs`) and whether guest memory can
/// be shared (virtio-fs needs a memfd or file memory backend).
public struct SharedFilesystemSupport: Sendable, Equatable {
    public var filesystemDriverTypes: Set<String>
    public var memoryBackingSources: Set<String>

    public init(filesystemDriverTypes: Set<String>, memoryBackingSources: Set<String>) {
        self.filesystemDriverTypes = filesystemDriverTypes
        self.memoryBackingSources = memoryBackingSources
    }

    /// Reads `<filesystem supported='yes'>` and `<memoryBacking supported='yes'>` of a
    /// `virConnectGetDomainCapabilities` document.
    public init(domainCapabilities xml: String) {
        filesystemDriverTypes = Self.enumValues(xml, element: "filesystem", enumName: "driverType")
        memoryBackingSources = Self.enumValues(xml, element: "memoryBacking", enumName: "sourceType")
    }

    /// The mode to use: virtio-fs when QEMU has it and guest memory can be shared, else 9p
    /// (libvirt's `path`/`handle` drivers), else copy mode.
    public var preferred: SharedFilesystem {
        if filesystemDriverTypes.contains("virtiofs") && !memoryBackingSources.isDisjoint(with: ["memfd", "file"]) {
            return .virtioFS()
        }
        if !filesystemDriverTypes.isDisjoint(with: ["path", "handle"]) { return .virtio9p() }
        return .none
    }

    /// The `<value>`s of `<enum name='NAME'>` inside the first `<ELEMENT supported='yes'>`.
    /// libvirt writes this document itself, in a fixed shape; this reads only that shape.
    static func enumValues(_ xml: String, element: String, enumName: String) -> Set<String> {
        guard let open = xml.firstRange(of: "<\(element) supported='yes'>"),
              let close = xml[open.upperBound...].firstRange(of: "</\(element)>")
        else { return [] }
        let body = xml[open.upperBound..<close.lowerBound]
        guard let e = body.firstRange(of: "<enum name='\(enumName)'>"),
              let end = body[e.upperBound...].firstRange(of: "</enum>")
        else { return [] }
        var values: Set<String> = []
        var rest = body[e.upperBound..<end.lowerBound]
        while let v = rest.firstRange(of: "<value>"), let ve = rest[v.upperBound...].firstRange(of: "</value>") {
            values.insert(String(rest[v.upperBound..<ve.lowerBound]))
            rest = rest[ve.upperBound...]
        }
        return values
    }
}

/// libvirt XML fragments for a sandbox.
public enum LibvirtXML {
    /// XML-escapes an attribute or text value.
    public static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "'": out += "&apos;"
            case "\"": out += "&quot;"
            default: out.append(c)
            }
        }
        return out
    }

    /// The `<filesystem>` device exporting a sandbox's `shared/` under `tag` (Kata's
    /// `kataShared`): virtio-fs through virtiofsd, or 9p through QEMU. Copy mode has none (nil).
    /// `alias` (libvirt's user alias, `ua-` prefixed) names the device for detaching.
    ///
    /// No `<readonly/>`: `shared/` is already a read-only bind on the host, and the rw volume
    /// binds below it must stay writable. No `<cache>`: libvirt 9 rejects `auto` for virtiofs,
    /// and its default lets later host mounts and unmounts reach the guest.
    public static func filesystem(sharedDirectory: FilePath, tag: String, mode: SharedFilesystem, alias: String, virtiofsd: FilePath? = nil) -> String? {
        let driver: String
        var binary = ""
        switch mode {
        case .virtioFS:
            driver = "<driver type='virtiofs'/>"
            if let virtiofsd { binary = "<binary path='\(escape(virtiofsd.string))'/>" }
        case .virtio9p:
            driver = "<driver type='path'/>"
        case .none:
            return nil
        }
        return """
            <filesystem type='mount' accessmode='passthrough'>\
            \(driver)\(binary)\
            <source dir='\(escape(sharedDirectory.string))'/>\
            <target dir='\(escape(tag))'/>\
            <alias name='ua-\(escape(alias))'/>\
            </filesystem>
            """
    }

    /// The `<disk>` that hands a root filesystem image to the VM: a raw file disk limited to the
    /// image's byte range (a storage `<slice>`: for a SIF file only its root partition, so the
    /// guest never sees the rest of the file), read-only, on `bus` as `target`. Attach it live
    /// with ``LibvirtDomain/attachLive(deviceXML:)``; the guest address it gets (the PCI slot for
    /// virtio, the SCSI address for scsi) is what `Rootfs.image(_:deviceAddress:)` takes.
    ///
    /// - Parameters:
    ///   - imagePath: the image file.
    ///   - image: what `RootfsImage.inspect` recognised (its extent).
    ///   - target: the guest device name (`vdb`, `sdb`).
    ///   - bus: `virtio` or `scsi`.
    ///   - alias: names the device for detaching (`ua-` prefixed).
    /// - Returns: the device XML.
    public static func imageDisk(imagePath: FilePath, image: RootfsImage, target: String, bus: String = "virtio", alias: String) -> String {
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            + "<source file='\(escape(imagePath.string))'><slices><slice type='storage' offset='\(image.offset)' size='\(image.size)'/></slices></source>"
            + "<target dev='\(escape(target))' bus='\(escape(bus))'/><readonly/><alias name='ua-\(escape(alias))'/></disk>"
    }

    /// The guest address a live `<disk>` got, in the form Kata's block storages name it: the
    /// PCI path (the slot, two hex digits) of a virtio disk on the root bus, or `target:unit` of
    /// a SCSI disk. Read from the live domain XML (libvirt writes the `<address>` it assigned).
    ///
    /// - Parameters:
    ///   - alias: the disk's alias as given to ``imageDisk(imagePath:image:target:bus:alias:)`` (without `ua-`).
    ///   - domainXML: the live domain XML (``LibvirtDomain/xml()``).
    /// - Returns: the address, or nil when the disk is not there or sits behind a bridge (a
    ///   PCI path through bridges needs each bridge's slot, which a flat address does not give).
    public static func diskAddress(alias: String, in domainXML: String) -> String? {
        var rest = domainXML[...]
        while let open = rest.firstRange(of: "<disk "), let close = rest[open.upperBound...].firstRange(of: "</disk>") {
            let disk = rest[open.lowerBound..<close.upperBound]
            rest = rest[close.upperBound...]
            guard disk.contains("<alias name='ua-\(escape(alias))'/>") else { continue }
            func attribute(_ name: String, in element: Substring) -> String? {
                guard let a = element.firstRange(of: " \(name)='"), let end = element[a.upperBound...].firstIndex(of: "'") else { return nil }
                return String(element[a.upperBound..<end])
            }
            guard let addr = disk.firstRange(of: "<address "), let end = disk[addr.upperBound...].firstIndex(of: ">") else { return nil }
            let element = disk[addr.lowerBound..<end]
            switch attribute("type", in: element) {
            case "pci":
                guard let bus = attribute("bus", in: element).flatMap({ UInt32($0.dropFirst(2), radix: 16) }), bus == 0,
                      let slot = attribute("slot", in: element).flatMap({ UInt32($0.dropFirst(2), radix: 16) }), slot < 32
                else { return nil }
                return (slot < 16 ? "0" : "") + String(slot, radix: 16)
            case "drive":
                guard let target = attribute("target", in: element), let unit = attribute("unit", in: element) else { return nil }
                return "\(target):\(unit)"
            default:
                return nil
            }
        }
        return nil
    }

    /// A direct-kernel-boot domain for a sandbox VM: shared guest memory (memfd, which
    /// virtio-fs needs), ACPI (without it libvirt passes -no-acpi and PCI hot-plug of the
    /// share fails), the agent's virtio-serial channels as unix sockets libvirt binds, the
    /// console to a file, no disks, no network, no balloon.
    public static func sandboxDomain(
        name: String, kernel: FilePath, initrd: FilePath, memoryMiB: Int, kvm: Bool,
        channels: [(name: String, socket: FilePath)], consoleLog: FilePath,
        emulator: FilePath = "/usr/bin/qemu-system-x86_64"
    ) -> String {
        let channelXML = channels.map { c in
            "<channel type='unix'><source mode='bind' path='\(escape(c.socket.string))'/><target type='virtio' name='\(escape(c.name))'/></channel>"
        }.joined()
        return """
            <domain type='\(kvm ? "kvm" : "qemu")'>\
            <name>\(escape(name))</name>\
            <memory unit='MiB'>\(memoryMiB)</memory>\
            <vcpu>1</vcpu>\
            <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\
            <os><type arch='x86_64'>hvm</type><kernel>\(escape(kernel.string))</kernel><initrd>\(escape(initrd.string))</initrd>\
            <cmdline>console=ttyS0 panic=-1 quiet</cmdline></os>\
            <features><acpi/><apic/></features>\
            <cpu mode='\(kvm ? "host-passthrough" : "maximum")'/>\
            <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
            <devices><emulator>\(escape(emulator.string))</emulator>\
            <serial type='file'><source path='\(escape(consoleLog.string))'/><target port='0'/></serial>\
            \(channelXML)\
            <memballoon model='none'/></devices>\
            </domain>
            """
    }
}
