#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import FSShareWatch
import Logging
import Synchronization
import SystemPackage

/// Container root filesystems: host-mounted (bound under `mounts/<cid>/rootfs`), block devices
/// (directories plus a block `Storage`) and guest pulls (a `Storage` only).
extension LinuxFilesystemSharer {
    /// Shares a container's root filesystem (see
    /// ``FilesystemSharer/shareRootFilesystem(container:)``) on the library's threads.
    ///
    /// - Parameter container: the container, with its rootfs: host-mounted (bound), a block device (directories and a block storage) or a guest pull (a storage only).
    /// - Returns: the rootfs's guest path and the container storages for `CreateContainer`.
    /// - Throws: `invalidArgument` for an incomplete rootfs description; otherwise as ``shareFile(container:mount:)``.
    public func shareRootFilesystem(container: Container) async throws(FSShareError) -> SharedFile {
        try await offload("ShareRootFilesystem", attributes: { [("container", container.id)] }) { _ throws(FSShareError) in
            try self.shareRootFilesystemSync(container: container)
        }
    }

    /// Blocking ``shareRootFilesystem(container:)``.
    ///
    /// - Parameter container: the container.
    /// - Returns: as ``shareRootFilesystem(container:)``.
    /// - Throws: as ``shareRootFilesystem(container:)``, except `cancelled`.
    @_spi(Blocking) public func shareRootFilesystemSync(container: Container) throws(FSShareError) -> SharedFile {
        try Identifier.validate(container.id, what: "container")
        let cid = container.id
        switch container.rootfs {
        case .guestPull(let image, let annotations):
            guard !image.isEmpty else { throw FSShareError(.invalidArgument, "guest pull needs an image reference") }
            let storage = Storages.guestPullRootfs(containerID: cid, image: image, annotations: annotations)
            return SharedFile(guestPath: Storages.guestPullRootfsPath(cid), containerStorages: [storage])
        case .blockDevice(let device, let suffix):
            guard !device.address.isEmpty, !device.fstype.isEmpty else {
                throw FSShareError(.invalidArgument, "a block-device rootfs needs a device address and a filesystem type")
            }
            if !suffix.isEmpty { try Identifier.validate(suffix, what: "rootfs suffix") }
            let record = ShareRecord(
                name: cid, kind: .rootfsDirectory, containerID: cid, source: device.address, destination: suffix,
                readOnly: false, recursive: false, isFile: false)
            try withPreparedHandle { (h) throws(FSShareError) in
                try makeBlockRootfsDirectories(record, suffix: suffix, handle: h)
            }
            let storage = Storages.blockRootfs(
                containerID: cid, device: device, driver: configuration.blockDeviceDriver, guestSharedDir: configuration.guestSharedDir)
            return SharedFile(guestPath: Storages.joinGuest(configuration.guestSharedDir, cid, suffix), containerStorages: [storage])
        case .image(let path, let deviceAddress):
            guard !deviceAddress.isEmpty else {
                throw FSShareError(
                    .invalidArgument,
                    "an image rootfs needs the guest address of the disk it was attached as: attach the byte range RootfsImage.inspect gives (read-only), then share it")
            }
            let image = try RootfsImage.inspect(path)
            let record = ShareRecord(
                name: cid, kind: .rootfsImage, containerID: cid, source: path.string, destination: "",
                readOnly: true, recursive: false, isFile: false)
            try withPreparedHandle { (h) throws(FSShareError) in
                if let existing = h.manifest.shares[cid], existing != record {
                    throw FSShareError(.conflict, "container \(cid)'s rootfs is already shared from \(existing.source); unshare it first")
                }
                try makeBlockRootfsDirectories(record, suffix: "", handle: h)
            }
            let storage = Storages.imageRootfs(
                containerID: cid, deviceAddress: deviceAddress, image: image, driver: configuration.blockDeviceDriver,
                guestSharedDir: configuration.guestSharedDir)
            var shared = SharedFile(guestPath: Storages.joinGuest(configuration.guestSharedDir, cid), containerStorages: [storage])
            shared.rootfsImage = image
            return shared
        case .layers(let lowers, let upper):
            return try shareLayeredRootfs(cid, lowers: lowers, upper: upper)
        case .imageOnHost(let path):
            return try shareImageOnHost(cid, path)
        case .hostMounted(let path):
            let record = ShareRecord(
                name: "\(cid)/rootfs", kind: .rootfs, containerID: cid, source: path.string, destination: "/",
                readOnly: false, recursive: false, isFile: false)
            let method = configuration.mountMethod
            let policy = configuration.sourceSymlinks
            let made = try withPreparedHandle { (h) throws(FSShareError) -> ShareRecord in
                let (dirFD, created) = try MountOps.ownEntry(h.mounts, FilePath(cid), directory: true, mode: 0o750)
                defer { Sys.close(dirFD) }
                do throws(FSShareError) {
                    return try share(record, in: DirFD(fd: dirFD, path: h.mounts.display(FilePath(cid))), handle: h, method: method, policy: policy)
                } catch {
                    if created { try? Sys.unlinkat(h.mounts, FilePath(cid), directory: true) }
                    throw error
                }
            }
            return SharedFile(guestPath: layout.guestPath("\(cid)/rootfs"), resolvedSource: made.resolvedSource.map { FilePath($0) })
        }
    }

    /// Undoes ``shareRootFilesystem(container:)`` on the library's threads.
    ///
    /// - Parameter container: the container, as shared.
    /// - Throws: as ``unshareFile(container:mount:)``.
    public func unshareRootFilesystem(container: Container) async throws(FSShareError) {
        try await offload("UnshareRootFilesystem", attributes: { [("container", container.id)] }) { _ throws(FSShareError) in
            try self.unshareRootFilesystemSync(container: container)
        }
    }

    /// Blocking ``unshareRootFilesystem(container:)``.
    ///
    /// - Parameter container: the container, as shared.
    /// - Throws: as ``unshareRootFilesystem(container:)``, except `cancelled`.
    @_spi(Blocking) public func unshareRootFilesystemSync(container: Container) throws(FSShareError) {
        try Identifier.validate(container.id, what: "container")
        switch container.rootfs {
        case .guestPull: return
        case .blockDevice, .image, .layers: try unshareSync(name: container.id)
        case .hostMounted, .imageOnHost: try unshareSync(name: "\(container.id)/rootfs")
        }
    }
}
