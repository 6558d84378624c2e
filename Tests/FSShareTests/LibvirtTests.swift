import FSShare
import FSShareLibvirt
import SystemPackage
import Testing

/// FSShareLibvirt against libvirt's in-process `test:///default` driver (no daemon, no QEMU):
/// the XML fsshare generates is accepted and read back, the lifecycle works, and what the test
/// driver cannot do (live attach, domain capabilities) fails with libvirt's own reason. Live
/// attach on a real QEMU is covered by the `libvirt` guest check.
@Suite("libvirt (test:///default)")
struct LibvirtTests {
    static let domainXML = LibvirtXML.sandboxDomain(
        name: "fsshare-unit", kernel: "/boot/vmlinuz", initrd: "/boot/initrd.img", memoryMiB: 256, kvm: false,
        channels: [("agent.channel.0", "/run/vm/agent.sock")], consoleLog: "/run/vm/console.log")

    @Test func filesystemXMLPerMode() throws {
        let shared: FilePath = "/run/kata-containers/shared/sandboxes/pod-a/shared"
        let virtiofs = try #require(LibvirtXML.filesystem(sharedDirectory: shared, tag: "kataShared", mode: .virtioFS(), alias: "fsshare-pod-a", virtiofsd: "/usr/lib/qemu/virtiofsd"))
        #expect(virtiofs == "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/><binary path='/usr/lib/qemu/virtiofsd'/><source dir='/run/kata-containers/shared/sandboxes/pod-a/shared'/><target dir='kataShared'/><alias name='ua-fsshare-pod-a'/></filesystem>")
        let ninep = try #require(LibvirtXML.filesystem(sharedDirectory: shared, tag: "kataShared", mode: .virtio9p(), alias: "a"))
        #expect(ninep.contains("<driver type='path'/>") && !ninep.contains("<binary"))
        #expect(!ninep.contains("<readonly/>"), "rw volume binds under shared/ must stay writable")
        #expect(LibvirtXML.filesystem(sharedDirectory: shared, tag: "kataShared", mode: .none, alias: "a") == nil)
        // Paths are escaped, never spliced.
        let odd = try #require(LibvirtXML.filesystem(sharedDirectory: "/tmp/a'b<c>&d", tag: "t\"x", mode: .virtio9p(), alias: "a"))
        #expect(odd.contains("dir='/tmp/a&apos;b&lt;c&gt;&amp;d'") && odd.contains("dir='t&quot;x'"))
    }

    @Test func imageDiskXMLIsReadOnlyAndSliced() {
        let sif = RootfsImage(format: .squashfs, offset: 36864, size: 4096, sifPartitionID: 2)
        let xml = LibvirtXML.imageDisk(imagePath: "/images/a'pp.sif", image: sif, target: "vdb", alias: "app-rootfs")
        #expect(xml == "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/images/a&apos;pp.sif'><slices><slice type='storage' offset='36864' size='4096'/></slices></source><target dev='vdb' bus='virtio'/><readonly/><alias name='ua-app-rootfs'/></disk>")
    }

    @Test func diskAddressFromTheLiveXML() {
        let live = """
            <domain><devices><disk type='file' device='disk'><source file='/a.sqfs'/><target dev='vdb' bus='virtio'/><alias name='ua-other'/>\
            <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/b.sif'/><target dev='vdc' bus='virtio'/><readonly/>\
            <alias name='ua-job'/><address type='pci' domain='0x0000' bus='0x00' slot='0x1a' function='0x0'/></disk>\
            <disk type='file' device='disk'><target dev='sdb' bus='scsi'/><alias name='ua-db'/><address type='drive' controller='0' bus='0' target='0' unit='3'/></disk>\
            <disk type='file' device='disk'><target dev='vdd' bus='virtio'/><alias name='ua-bridged'/><address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></disk>\
            </devices></domain>
            """
        #expect(LibvirtXML.diskAddress(alias: "job", in: live) == "1a")
        #expect(LibvirtXML.diskAddress(alias: "other", in: live) == "04")
        #expect(LibvirtXML.diskAddress(alias: "db", in: live) == "0:3")
        #expect(LibvirtXML.diskAddress(alias: "bridged", in: live) == nil, "behind a bridge: no flat PCI path")
        #expect(LibvirtXML.diskAddress(alias: "missing", in: live) == nil)
    }

    @Test func capabilitiesChooseTheMode() {
        func caps(fs: [String], memory: [String]) -> String {
            let fsValues = fs.map { "<value>\($0)</value>" }.joined()
            let memValues = memory.map { "<value>\($0)</value>" }.joined()
            return """
                <domainCapabilities><memoryBacking supported='yes'><enum name='sourceType'>\(memValues)</enum></memoryBacking>
                <devices><disk supported='yes'><enum name='bus'><value>virtio</value></enum></disk>
                <filesystem supported='yes'><enum name='driverType'>\(fsValues)</enum></filesystem></devices></domainCapabilities>
                """
        }
        let full = SharedFilesystemSupport(domainCapabilities: caps(fs: ["path", "handle", "virtiofs"], memory: ["file", "anonymous", "memfd"]))
        #expect(full.filesystemDriverTypes == ["path", "handle", "virtiofs"])
        #expect(full.preferred == .virtioFS())
        #expect(SharedFilesystemSupport(domainCapabilities: caps(fs: ["path", "virtiofs"], memory: ["anonymous"])).preferred == .virtio9p(),
                "virtio-fs needs shareable guest memory")
        #expect(SharedFilesystemSupport(domainCapabilities: caps(fs: ["path"], memory: ["memfd"])).preferred == .virtio9p())
        #expect(SharedFilesystemSupport(domainCapabilities: caps(fs: [], memory: ["memfd"])).preferred == .none)
        #expect(SharedFilesystemSupport(domainCapabilities: "<domainCapabilities><devices><filesystem supported='no'/></devices></domainCapabilities>").preferred == .none)
    }

    @Test func lifecycleOnTheTestDriver() throws {
        let conn = try LibvirtConnection(uri: "test:///default")
        // The sandbox domain with the share in its definition: accepted and read back.
        let fs = try #require(LibvirtXML.filesystem(sharedDirectory: "/srv/pod-t/shared", tag: "kataShared", mode: .virtioFS(), alias: "fsshare-pod-t"))
        let xml = LibvirtTests.domainXML.replacingFirst("<memballoon", with: fs + "<memballoon")
        let domain = try conn.define(xml: xml)
        defer { try? domain.undefine() }
        #expect(domain.name == "fsshare-unit")
        try domain.start()
        #expect(domain.isActive)
        let live = try domain.xml()
        #expect(live.contains("<source dir='/srv/pod-t/shared'/>") && live.contains("<target dir='kataShared'/>") && live.contains("type='virtiofs'"))
        #expect(live.contains("name='agent.channel.0'") && live.contains("<source type='memfd'/>"))
        // What the test driver lacks fails with libvirt's reason, not silently.
        let attach = #expect(throws: LibvirtError.self) { try domain.attachLive(deviceXML: fs) }
        #expect(attach?.isUnsupported == true, "\(String(describing: attach))")
        #expect(throws: LibvirtError.self) { _ = try conn.domainCapabilitiesXML() }
        try domain.destroy()
        #expect(!domain.isActive)
    }

    @Test func badURIsAndXMLFailWithLibvirtsReason() {
        let e = #expect(throws: LibvirtError.self) { _ = try LibvirtConnection(uri: "nosuchdriver:///x") }
        #expect(e?.message.isEmpty == false && e?.message != "no error")
        let conn = try? LibvirtConnection(uri: "test:///default")
        let bad = #expect(throws: LibvirtError.self) { _ = try conn?.define(xml: "<domain type='qemu'><name>x</name>") }
        #expect(bad?.description.contains("virDomainDefineXML") == true)
    }
}

extension String {
    func replacingFirst(_ target: String, with replacement: String) -> String {
        guard let r = firstRange(of: target) else { return self }
        return String(self[..<r.lowerBound]) + replacement + String(self[r.upperBound...])
    }
}
