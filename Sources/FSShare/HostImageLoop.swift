#if canImport(Glibc)
import Glibc
#endif
import FSShareCore
import FSShareSystem
import SystemPackage

/// The loop device behind a host-mounted image (``Rootfs/imageOnHost(_:)``): bound read-only
/// with autoclear in one `LOOP_CONFIGURE`, so the kernel frees it when the last user — the
/// mount, or fsshare's descriptor if the process dies before mounting — goes.
enum HostImageLoop {
    /// Binds `backing` (the image, opened for reading) to a free loop device, limited to the
    /// image's extent. Another process may take the free device first: then the next one is tried.
    ///
    /// - Returns: the loop device, open (the caller closes it once the filesystem is mounted),
    ///   and its path.
    static func attach(_ backing: FileDescriptor, image: RootfsImage, name: String, shownAs path: FilePath) throws(FSShareError) -> (FileDescriptor, FilePath) {
        let control = try sys("cannot open /dev/loop-control (is the loop module loaded?)") { () throws(SystemCallError) in
            try Sys.openat(nil, "/dev/loop-control", flags: O_RDWR | O_CLOEXEC)
        }
        defer { Sys.close(control) }
        var lastError: SystemCallError?
        for _ in 0..<16 {
            let n = try sys("cannot find a free loop device") { () throws(SystemCallError) in try Sys.loopGetFree(control) }
            let device = FilePath("/dev/loop\(n)")
            let fd: FileDescriptor
            do {
                fd = try Sys.openat(nil, device, flags: O_RDONLY | O_CLOEXEC)
            } catch {
                // udev may not have made the node yet; another free device will do.
                lastError = error
                continue
            }
            do {
                try Sys.loopConfigure(fd, backing: backing, offset: UInt64(image.offset), size: UInt64(image.size), name: name, display: device)
                return (fd, device)
            } catch {
                Sys.close(fd)
                lastError = error
                guard error.errno == .resourceBusy else { break }
            }
        }
        throw FSShareError(.systemCall, "cannot bind \(path) to a loop device: \(lastError.map { "\($0)" } ?? "no free device")")
    }

    /// After the mount is gone: if the recorded device is still bound to the recorded image at
    /// its offset (someone else holds it open), unbind it; it goes when they close it. A device
    /// that is free, or now bound to something else, is left alone.
    static func release(_ record: ShareRecord) throws(FSShareError) {
        let device = record.destination
        guard device.hasPrefix("/dev/loop"), let n = Int(device.dropFirst("/dev/loop".count)) else { return }
        let sys = "/sys/block/loop\(n)/loop"
        guard let backing = Sys.readSysfsAttribute(sys + "/backing_file") else { return }  // not bound
        let image = record.resolvedSource ?? record.source
        guard backing == image || backing == record.source else { return }
        let fd: FileDescriptor
        do {
            fd = try Sys.openat(nil, FilePath(device), flags: O_RDONLY | O_CLOEXEC)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw FSShareError.system("cannot open \(device) to free it", error)
        }
        defer { Sys.close(fd) }
        do {
            try Sys.loopClear(fd, display: FilePath(device))
        } catch {
            // ENXIO: it was freed in between.
            if error.errno != .noSuchAddressOrDevice { throw FSShareError.system("cannot free \(device)", error) }
        }
    }

}

/// ``Rootfs/imageOnHost(_:)``: the image bound to a loop device, its filesystem mounted
/// detached and moved to `mounts/<cid>/rootfs` read-only.
extension LinuxFilesystemSharer {
    func shareImageOnHost(_ cid: String, _ path: FilePath) throws(FSShareError) -> SharedFile {
        let name = "\(cid)/rootfs"
        let policy = configuration.sourceSymlinks
        return try withPreparedHandle { (h) throws(FSShareError) -> SharedFile in
            let existing = h.manifest.shares[name]
            if let existing {
                guard existing.kind == .rootfsHostImage, existing.source == path.string else {
                    throw FSShareError(.conflict, "container \(cid)'s rootfs is already shared (\(existing.kind.rawValue) from \(existing.source)); unshare it first")
                }
            }
            // The image as one open file: what is inspected is what the loop device reads.
            let opened = try SourceCheck.open(path, policy: policy, rootGuard: try h.rootGuard())
            defer { Sys.close(opened.fd) }
            guard opened.kind == .regular else { throw FSShareError(.refused, "\(path) is a \(opened.kind), not an image file") }
            let file = try sys("cannot open the image \(path)") { () throws(SystemCallError) in
                try Sys.openat(nil, MountOps.fdPath(opened.fd), flags: O_RDONLY | O_CLOEXEC)
            }
            defer { Sys.close(file) }
            let image = try RootfsImage.inspect(file, shownAs: path)
            let (dirFD, createdDir) = try MountOps.ownEntry(h.mounts, FilePath(cid), directory: true, mode: 0o750)
            defer { Sys.close(dirFD) }
            let dir = DirFD(fd: dirFD, path: h.mounts.display(FilePath(cid)))
            if let existing, let st = try? Sys.statx(dir, "rootfs"), st.isMountRoot {
                return SharedFile(guestPath: layout.guestPath(name), resolvedSource: existing.resolvedSource.map { FilePath($0) })
            }
            var undo = Undo()
            if createdDir { undo.add { try? Sys.unlinkat(h.mounts, FilePath(cid), directory: true) } }
            do throws(FSShareError) {
                // Autoclear from the start: if this process dies before the mount holds the
                // device, closing `loop` frees it.
                let (loop, device) = try HostImageLoop.attach(file, image: image, name: "fsshare \(sandboxID)/\(cid)", shownAs: path)
                defer { Sys.close(loop) }
                let record = ShareRecord(
                    name: name, kind: .rootfsHostImage, containerID: cid, source: path.string, destination: device.string, readOnly: true,
                    recursive: false, isFile: false, resolvedSource: opened.path == path ? nil : opened.path.string)
                // Journal first: the device is known before anything is mounted from it.
                if h.manifest.shares[name] != record { try h.manifest.recordShare(record) }
                undo.add { try? h.manifest.recordRemoval(name) }
                let (target, created) = try MountOps.ownEntry(dir, "rootfs", directory: true, mode: 0o755)
                defer { Sys.close(target) }
                if created { undo.add { try? MountOps.removeMountPoint(dir, "rootfs") } }
                let shown = dir.display("rootfs")
                let mount = try sys("cannot mount the \(image.filesystemType) filesystem of \(path) (\(device))") { () throws(SystemCallError) in
                    try Sys.fsmountBlock(fstype: image.filesystemType, source: device, readOnly: true)
                }
                defer { Sys.close(mount) }
                try sys("cannot set the attributes of \(shown)") { () throws(SystemCallError) in
                    try Sys.mountSetattr(mount, readOnly: true, recursive: false, propagation: UInt(MS_PRIVATE), display: shown)
                }
                try sys("cannot attach \(shown)") { () throws(SystemCallError) in try Sys.moveMount(mount, onto: target, display: shown) }
                undo.commit()
                var shared = SharedFile(guestPath: layout.guestPath(name), resolvedSource: record.resolvedSource.map { FilePath($0) })
                shared.rootfsImage = image
                return shared
            } catch {
                undo.run()
                throw error
            }
        }
    }
}
