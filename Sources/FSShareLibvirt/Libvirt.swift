#if canImport(Glibc)
import Glibc
#endif
import CLibvirt
import FSShareSystem
import Synchronization

/// A libvirt call that failed, with libvirt's own message.
public struct LibvirtError: Error, CustomStringConvertible, Sendable {
    /// The libvirt function that failed.
    public let operation: String
    /// libvirt's error code (`virErrorNumber`), 0 if none was set.
    public let code: Int32
    public let message: String

    /// The last error libvirt recorded on this thread. Read it before any other libvirt call:
    /// each public call resets it (so `operation` is only built afterwards).
    static func last(_ operation: @autoclosure () -> String) -> LibvirtError {
        let message = virGetLastErrorMessage().map { String(cString: $0) } ?? "unknown error"
        let code = virGetLastErrorCode()
        return LibvirtError(operation: operation(), code: code, message: message)
    }

    /// libvirt said the driver does not support the operation (`VIR_ERR_NO_SUPPORT`).
    public var isUnsupported: Bool { code == Int32(VIR_ERR_NO_SUPPORT.rawValue) }

    public var description: String { "libvirt \(operation) failed: \(message)" }
}

/// libvirt's default event loop, run on a thread of its own; `qemu:///embed` needs one to
/// notice QEMU's monitor and the guest's lifecycle.
enum LibvirtEventLoop {
    private static let started = Mutex(false)

    static func ensureRunning() throws(LibvirtError) {
        let error = started.withLock { (started: inout Bool) -> LibvirtError? in
            if started { return nil }
            guard virEventRegisterDefaultImpl() == 0 else { return LibvirtError.last("virEventRegisterDefaultImpl") }
            do {
                try OSThread.detach {
                    while true { _ = virEventRunDefaultImpl() }
                }
            } catch {
                return LibvirtError(operation: "pthread_create", code: 0, message: "\(error)")
            }
            started = true
            return nil
        }
        if let error { throw error }
    }
}

/// A connection to a libvirt driver (`qemu:///embed?root=DIR`, `qemu:///system`,
/// `test:///default`). libvirt connections may be used from several threads.
public final class LibvirtConnection: @unchecked Sendable {
    let pointer: virConnectPtr
    public let uri: String

    /// Opens `uri`. libvirt's default error printing to stderr is turned off: errors are thrown.
    public init(uri: String) throws(LibvirtError) {
        // Errors are read with virGetLastError and thrown; do not also print them.
        virSetErrorFunc(nil) { _, _ in }
        if uri.hasPrefix("qemu:///embed") { try LibvirtEventLoop.ensureRunning() }
        guard let c = virConnectOpen(uri) else { throw LibvirtError.last("virConnectOpen(\(uri))") }
        pointer = c
        self.uri = uri
    }

    deinit { virConnectClose(pointer) }

    /// The hypervisor's domain capabilities XML (`virConnectGetDomainCapabilities`).
    public func domainCapabilitiesXML(emulator: String? = nil, arch: String? = nil, machine: String? = nil, virtType: String? = nil) throws(LibvirtError) -> String {
        guard let raw = virConnectGetDomainCapabilities(pointer, emulator, arch, machine, virtType, 0) else {
            throw LibvirtError.last("virConnectGetDomainCapabilities")
        }
        defer { free(raw) }
        return String(cString: raw)
    }

    /// What the hypervisor can share a filesystem with (see ``SharedFilesystemSupport``).
    public func sharedFilesystemSupport(emulator: String? = nil, arch: String? = nil, virtType: String? = nil) throws(LibvirtError) -> SharedFilesystemSupport {
        SharedFilesystemSupport(domainCapabilities: try domainCapabilitiesXML(emulator: emulator, arch: arch, virtType: virtType))
    }

    /// Defines a persistent domain from its XML.
    public func define(xml: String) throws(LibvirtError) -> LibvirtDomain {
        guard let d = virDomainDefineXML(pointer, xml) else { throw LibvirtError.last("virDomainDefineXML") }
        return LibvirtDomain(pointer: d, connection: self)
    }

    /// The domain called `name`.
    public func domain(named name: String) throws(LibvirtError) -> LibvirtDomain {
        guard let d = virDomainLookupByName(pointer, name) else { throw LibvirtError.last("virDomainLookupByName(\(name))") }
        return LibvirtDomain(pointer: d, connection: self)
    }
}

/// One libvirt domain (a VM).
public final class LibvirtDomain: @unchecked Sendable {
    let pointer: virDomainPtr
    // Keeps the connection open as long as the domain handle lives.
    let connection: LibvirtConnection

    init(pointer: virDomainPtr, connection: LibvirtConnection) {
        self.pointer = pointer
        self.connection = connection
    }

    deinit { virDomainFree(pointer) }

    public var name: String { virDomainGetName(pointer).map { String(cString: $0) } ?? "?" }

    /// Boots the defined domain.
    public func start() throws(LibvirtError) {
        guard virDomainCreate(pointer) == 0 else { throw LibvirtError.last("virDomainCreate(\(name))") }
    }

    /// Stops it at once (power off, no guest shutdown).
    public func destroy() throws(LibvirtError) {
        guard virDomainDestroy(pointer) == 0 else { throw LibvirtError.last("virDomainDestroy(\(name))") }
    }

    /// Removes the definition.
    public func undefine() throws(LibvirtError) {
        guard virDomainUndefine(pointer) == 0 else { throw LibvirtError.last("virDomainUndefine(\(name))") }
    }

    public var isActive: Bool { virDomainIsActive(pointer) == 1 }

    /// The live (or, when stopped, the persistent) XML.
    public func xml() throws(LibvirtError) -> String {
        guard let raw = virDomainGetXMLDesc(pointer, 0) else { throw LibvirtError.last("virDomainGetXMLDesc(\(name))") }
        defer { free(raw) }
        return String(cString: raw)
    }

    /// Hot-plugs a device into the running domain (`VIR_DOMAIN_AFFECT_LIVE`).
    public func attachLive(deviceXML: String) throws(LibvirtError) {
        guard virDomainAttachDeviceFlags(pointer, deviceXML, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) == 0 else {
            throw LibvirtError.last("virDomainAttachDeviceFlags(\(name), live)")
        }
    }

    /// Asks the running domain to unplug a device; the guest acknowledges it asynchronously,
    /// so the device may still be listed for a moment after this returns.
    public func detachLive(deviceXML: String) throws(LibvirtError) {
        guard virDomainDetachDeviceFlags(pointer, deviceXML, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) == 0 else {
            throw LibvirtError.last("virDomainDetachDeviceFlags(\(name), live)")
        }
    }
}
