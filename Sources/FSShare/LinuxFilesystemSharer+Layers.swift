#if canImport(Glibc)
import Glibc
#endif
import FSShareCore
import FSShareSystem
import SystemPackage

/// Layered rootfs (``Rootfs/layers(_:upper:)``): each lower layer is one read-only share per
/// sandbox at `mounts/.layers/<id>`, counted by the containers that use it; the rootfs itself
/// is assembled by the guest agent from an `overlayfs` storage.
extension LinuxFilesystemSharer {
    /// The directory below `mounts/` that holds the layer shares. It starts with a dot, which no
    /// container id can, so no container's entries ever meet it.
    static let layersDirectory = ".layers"

    /// The share name of a layer: `.layers/` and 16 hex digits of FNV-1a over the layer
    /// directory's device and inode (one layer, one share, however its path is spelled).
    static func layerName(_ st: FileStatus) -> String {
        layersDirectory + "/" + ShareNaming.hex16(ShareNaming.fnv1a64(Array("\(st.deviceMajor):\(st.deviceMinor):\(st.inode)".utf8)))
    }

    /// The containers whose layered rootfs lists the layer share `name`.
    static func layerUsers(_ name: String, in manifest: Manifest) -> [String] {
        // Unordered (no sort): called for every layer of a share or unshare.
        manifest.shares.values.filter { $0.kind == .rootfsLayers && $0.source.split(separator: ":").contains { $0 == name } }.map(\.containerID).sorted()
    }

    /// Shares `lowers` (lowest first) and `upper` for `cid`; see ``Rootfs/layers(_:upper:)``.
    func shareLayeredRootfs(_ cid: String, lowers: [FilePath], upper: FilePath?) throws(FSShareError) -> SharedFile {
        guard !lowers.isEmpty else { throw FSShareError(.invalidArgument, "a layered rootfs needs at least one layer") }
        // overlayfs takes up to 500 lower layers; containerd images stay far below.
        guard lowers.count <= 500 else { throw FSShareError(.invalidArgument, "\(lowers.count) layers are more than overlayfs takes (500)") }
        let method = configuration.mountMethod
        let policy = configuration.sourceSymlinks
        return try withPreparedHandle { (h) throws(FSShareError) -> SharedFile in
            // Name every layer first (open, check it is a directory, read its identity):
            // nothing is recorded or mounted before all of them are known good.
            var names: [String] = []
            for layer in lowers {
                let opened = try SourceCheck.open(layer, policy: policy, rootGuard: try h.rootGuard())
                defer { Sys.close(opened.fd) }
                guard opened.kind == .directory else {
                    throw FSShareError(.invalidArgument, "layer \(layer) is a \(opened.kind), not a directory")
                }
                let st = try sys("cannot stat layer \(layer)") { () throws(SystemCallError) in try Sys.fstatx(opened.fd, path: layer) }
                let name = LinuxFilesystemSharer.layerName(st)
                if let twice = names.firstIndex(of: name) {
                    throw FSShareError(.invalidArgument, "layer \(layer) is the same directory as layer \(lowers[twice]): a layer can appear once")
                }
                names.append(name)
            }
            let upperName = upper.map { _ in "\(cid)/upper" }
            let record = ShareRecord(
                name: cid, kind: .rootfsLayers, containerID: cid, source: names.joined(separator: ":"), destination: upperName ?? "",
                readOnly: false, recursive: false, isFile: false)
            if let existing = h.manifest.shares[cid] {
                guard existing == record else {
                    throw FSShareError(.conflict, "container \(cid)'s rootfs is already shared (\(existing.kind.rawValue) from \(existing.source)); unshare it first")
                }
            }
            var undo = Undo()
            do throws(FSShareError) {
                let (layersFD, createdDir) = try MountOps.ownEntry(h.mounts, FilePath(LinuxFilesystemSharer.layersDirectory), directory: true, mode: 0o750)
                defer { Sys.close(layersFD) }
                let layersDir = DirFD(fd: layersFD, path: h.mounts.display(FilePath(LinuxFilesystemSharer.layersDirectory)))
                if createdDir { undo.add { try? Sys.unlinkat(h.mounts, FilePath(LinuxFilesystemSharer.layersDirectory), directory: true) } }
                for (layer, name) in zip(lowers, names) {
                    // A layer another container already shares keeps its record (and the
                    // spelling it was first given); a recorded but unmounted one is finished.
                    let fresh = ShareRecord(
                        name: name, kind: .layer, containerID: "", source: layer.string, destination: "", readOnly: true,
                        recursive: false, isFile: false)
                    let wanted = h.manifest.shares[name] ?? fresh
                    let hadUsers = !LinuxFilesystemSharer.layerUsers(name, in: h.manifest).isEmpty
                    _ = try share(wanted, in: layersDir, handle: h, method: method, policy: policy)
                    if !hadUsers { undo.add { try? self.removeShare(name, handle: h) } }
                }
                if let upper, let upperName {
                    try prepareUpperDirectory(upper, policy: policy, rootGuard: try h.rootGuard())
                    let upperRecord = ShareRecord(
                        name: upperName, kind: .rootfs, containerID: cid, source: upper.string, destination: "upper",
                        readOnly: false, recursive: false, isFile: false)
                    let (dirFD, created) = try MountOps.ownEntry(h.mounts, FilePath(cid), directory: true, mode: 0o750)
                    defer { Sys.close(dirFD) }
                    if created { undo.add { try? Sys.unlinkat(h.mounts, FilePath(cid), directory: true) } }
                    _ = try share(upperRecord, in: DirFD(fd: dirFD, path: h.mounts.display(FilePath(cid))), handle: h, method: method, policy: policy)
                    undo.add { try? self.removeShare(upperName, handle: h) }
                }
                // Recorded last: a container is a layer's user only once every layer is shared.
                if h.manifest.shares[cid] != record { try h.manifest.recordShare(record) }
                undo.commit()
            } catch {
                undo.run()
                throw error
            }
            let lowerPaths = names.map { layout.guestPath($0) }
            let upperPaths = upperName.map { n in (upperdir: layout.guestPath(n) + "/fs", workdir: layout.guestPath(n) + "/work") }
            let storage = Storages.layeredRootfs(containerID: cid, lowerGuestPaths: lowerPaths, upper: upperPaths)
            return SharedFile(guestPath: Storages.layeredRootfsPath(cid), containerStorages: [storage])
        }
    }

    /// Makes `fs/` and `work/` in the host upper directory (overlayfs's upper and work
    /// directories must be two directories on one filesystem). Existing ones are kept; anything
    /// else under those names (a symlink included) is refused, never followed or replaced.
    private func prepareUpperDirectory(_ upper: FilePath, policy: SourceSymlinkPolicy, rootGuard: SourceCheck.RootGuard) throws(FSShareError) {
        let opened = try SourceCheck.open(upper, policy: policy, rootGuard: rootGuard)
        defer { Sys.close(opened.fd) }
        guard opened.kind == .directory else { throw FSShareError(.invalidArgument, "the upper directory \(upper) is a \(opened.kind), not a directory") }
        let dir = DirFD(fd: opened.fd, path: upper)
        for sub in ["fs", "work"] {
            do {
                try Sys.mkdirat(dir, FilePath(sub), mode: 0o755)
            } catch {
                guard error.errno == .fileExists else { throw FSShareError.system("cannot make \(dir.display(FilePath(sub)))", error) }
            }
            let st = try sys("cannot stat \(dir.display(FilePath(sub)))") { () throws(SystemCallError) in try Sys.statx(dir, FilePath(sub)) }
            guard st.kind == .directory else {
                throw FSShareError(.conflict, "\(dir.display(FilePath(sub))) is a \(st.kind), not a directory: the upper directory must hold directories fs/ and work/ or nothing under those names")
            }
        }
    }

    /// Forgets a layered rootfs, then removes each of its layers no other container uses, and
    /// its upper share. Called with the sandbox lock held.
    func removeLayeredRootfs(_ record: ShareRecord, handle h: SandboxHandle) throws(FSShareError) {
        // Forgotten first: a crash after this leaves unused layers, which the next unshare of
        // a layered rootfs or cleanup removes; never a container whose layers are gone.
        try h.manifest.recordRemoval(record.name)
        var problems: [String] = []
        if !record.destination.isEmpty {
            do throws(FSShareError) { try removeShare(record.destination, handle: h) } catch { problems.append(error.message) }
        }
        // Every layer with no user left: this container's, and any a crash orphaned.
        let orphans = h.manifest.shares.values.filter { $0.kind == .layer && LinuxFilesystemSharer.layerUsers($0.name, in: h.manifest).isEmpty }
        for layer in orphans {
            do throws(FSShareError) { try removeShare(layer.name, handle: h) } catch { problems.append(error.message) }
        }
        if h.manifest.shares.values.contains(where: { $0.kind == .layer }) == false {
            // The last layer went: so does .layers/ (not an error if something else is in it).
            try? Sys.unlinkat(h.mounts, FilePath(LinuxFilesystemSharer.layersDirectory), directory: true)
        }
        if !problems.isEmpty {
            throw FSShareError(.incompleteCleanup, "unsharing the layered rootfs of \(record.containerID): " + problems.joined(separator: "; "))
        }
    }
}
