#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SystemPackage

/// Applies the `Storage` descriptors of Kata's `CreateSandbox` and `CreateContainer` in the
/// guest: the shared filesystem (`virtio-fs` / `9p`), the sandbox shm (`ephemeral`), watchable
/// mirrors (`watchable-bind`, see ``WatchableMirror``), block rootfs (`blk`, `scsi`, `mmioblk`:
/// the disk found by its address, see ``BlockDevices``) and layered rootfs (`overlayfs`), the
/// same messages a Kata agent receives. What one request made is undone again if a later storage of it fails;
/// `RemoveContainer` drops a container's mirrors and `DestroySandbox` unmounts everything in
/// reverse order.
final class StorageMounter {
    /// Drivers this agent mounts, with the filesystem type each must name.
    static let drivers: [String: String] = [
        "virtio-fs": "virtiofs", "9p": "9p", "ephemeral": "tmpfs", "watchable-bind": "bind", "overlayfs": "overlay",
    ]
    /// Block drivers, and the filesystems this agent mounts from a block device.
    static let blockDrivers: Set<String> = ["blk", "scsi", "mmioblk"]
    static let blockFilesystems: Set<String> = ["ext2", "ext3", "ext4", "squashfs", "erofs", "xfs"]
    /// Kata's agent directory for per-container state: an `overlayfs` storage with
    /// ``overlayRW`` gets its upper and work directories in `<containerBase>/<cid>/`.
    static let containerBase = "/run/kata-containers"
    /// The option that asks for a writable overlay whose upper layer lives in the guest.
    static let overlayRW = "io.katacontainers.fs-opt.overlay-rw"

    /// Mount flags by option name (Kata agent's table); any other option is filesystem data.
    static let flagOptions: [String: (set: UInt, clear: UInt)] = [
        "defaults": (0, 0),
        "ro": (UInt(MS_RDONLY), 0), "rw": (0, UInt(MS_RDONLY)),
        "nosuid": (UInt(MS_NOSUID), 0), "suid": (0, UInt(MS_NOSUID)),
        "nodev": (UInt(MS_NODEV), 0), "dev": (0, UInt(MS_NODEV)),
        "noexec": (UInt(MS_NOEXEC), 0), "exec": (0, UInt(MS_NOEXEC)),
        "sync": (UInt(MS_SYNCHRONOUS), 0), "async": (0, UInt(MS_SYNCHRONOUS)),
        "dirsync": (UInt(MS_DIRSYNC), 0),
        "noatime": (UInt(MS_NOATIME), 0), "atime": (0, UInt(MS_NOATIME)),
        "nodiratime": (UInt(MS_NODIRATIME), 0), "diratime": (0, UInt(MS_NODIRATIME)),
        "relatime": (UInt(MS_RELATIME), 0), "norelatime": (0, UInt(MS_RELATIME)),
        "strictatime": (UInt(MS_STRICTATIME), 0), "nostrictatime": (0, UInt(MS_STRICTATIME)),
    ]

    private(set) var sandboxID: String?
    private(set) var mounted: [String] = []
    /// The tmpfs every watchable mirror of the sandbox lives in (one root, as Kata requires).
    private(set) var watchableRoot: String?
    /// What one request's storages made: mirrors, mounts, and guest scratch directories (a
    /// writable overlay's upper and work).
    struct Made {
        var mirrors: [String] = []
        var mounted: [String] = []
        var scratch: [String] = []
    }
    /// Per container: what its storages made.
    private(set) var containers: [String: Made] = [:]
    let files: GuestFilesBox
    let log: @Sendable (String) -> Void

    init(files: GuestFilesBox, log: @escaping @Sendable (String) -> Void) {
        self.files = files
        self.log = log
    }

    /// Splits Kata's option list into mount flags and a data string.
    static func parseOptions(_ options: [String]) -> (flags: UInt, data: String) {
        var flags: UInt = 0
        var data: [String] = []
        for option in options.flatMap({ $0.split(separator: ",").map(String.init) }) where !option.isEmpty {
            if let f = flagOptions[option] {
                flags = (flags & ~f.clear) | f.set
            } else {
                data.append(option)
            }
        }
        return (flags, data.joined(separator: ","))
    }

    /// Checks one storage before anything is mounted.
    static func validate(_ s: Grpc_Storage) throws(GuestAgentError) {
        if blockDrivers.contains(s.driver) {
            guard blockFilesystems.contains(s.fstype) else {
                throw GuestAgentError(.invalid, "a \(s.driver) storage's fstype must be one of \(blockFilesystems.sorted().joined(separator: ", ")), not \"\(s.fstype)\"")
            }
        } else {
            guard let fstype = drivers[s.driver] else {
                let known = (Array(drivers.keys) + blockDrivers).sorted().joined(separator: ", ")
                throw GuestAgentError(.invalid, "storage driver \"\(s.driver)\" is not supported (fsshare-agent mounts \(known))")
            }
            guard s.fstype == fstype else {
                throw GuestAgentError(.invalid, "storage driver \(s.driver) needs fstype \(fstype), not \"\(s.fstype)\"")
            }
        }
        guard !s.source.isEmpty, !s.source.utf8.contains(0) else {
            throw GuestAgentError(.invalid, "storage for \(s.mountPoint) has no source")
        }
        let point = canonical(s.mountPoint)
        guard point.hasPrefix("/"), point != "/", !point.utf8.contains(0) else {
            throw GuestAgentError(.invalid, "mount point \"\(s.mountPoint)\" is not an absolute path below /")
        }
        for c in point.split(separator: "/", omittingEmptySubsequences: false).dropFirst() {
            guard !c.isEmpty, c != ".", c != ".." else {
                throw GuestAgentError(.invalid, "mount point \"\(s.mountPoint)\" is not canonical")
            }
        }
        for o in s.options where o.utf8.contains(0) {
            throw GuestAgentError(.invalid, "storage option \"\(o)\" contains a NUL byte")
        }
        if s.driver == "overlayfs" {
            let lower = s.options.filter { $0.hasPrefix("lowerdir=") }
            guard lower.count == 1 else {
                throw GuestAgentError(.invalid, "an overlayfs storage needs exactly one lowerdir= option (has \(lower.count))")
            }
            for key in ["lowerdir=", "upperdir=", "workdir="] {
                for o in s.options where o.hasPrefix(key) {
                    for dir in o.dropFirst(key.count).split(separator: ":", omittingEmptySubsequences: false) {
                        let d = String(dir)
                        guard d.hasPrefix("/"), canonical(d) == d, !d.contains(","),
                              !d.split(separator: "/", omittingEmptySubsequences: false).dropFirst().contains(where: { $0.isEmpty || $0 == "." || $0 == ".." })
                        else {
                            throw GuestAgentError(.invalid, "overlay \(key)\(d) is not an absolute canonical path")
                        }
                    }
                }
            }
        }
    }

    /// Kata sends the shared dir with a trailing slash; the kernel does not care, mountinfo does.
    static func canonical(_ path: String) -> String {
        var p = path
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        return p
    }

    /// Mounts every storage, or none: a failure unmounts what this call mounted.
    func createSandbox(_ request: Grpc_CreateSandboxRequest) throws(GuestAgentError) {
        if let sandboxID {
            throw GuestAgentError(.invalid, "the sandbox \(sandboxID) was already created; DestroySandbox first")
        }
        let made = try apply(request.storages, containerID: nil)
        sandboxID = request.sandboxID
        mounted += made.mounted
    }

    /// Applies a container's storages, all or nothing. fsshare-agent runs no container: this is
    /// the storage half of Kata's `CreateContainer`.
    func createContainer(_ request: Grpc_CreateContainerRequest) throws(GuestAgentError) {
        guard !request.containerID.isEmpty, containers[request.containerID] == nil else {
            throw GuestAgentError(.invalid, "container \"\(request.containerID)\" is empty or was already created; RemoveContainer first")
        }
        let made = try apply(request.storages, containerID: request.containerID)
        containers[request.containerID] = made
    }

    /// Drops what a container's storages made: its mirrors, then its mounts. Unknown: no-op.
    func removeContainer(_ request: Grpc_RemoveContainerRequest) throws(GuestAgentError) {
        guard let made = containers.removeValue(forKey: request.containerID) else { return }
        var problems: [String] = []
        for mirror in made.mirrors.reversed() {
            do throws(GuestAgentError) {
                try files.locked(mirror) { (f) throws(GuestAgentError) in try f.removePath(mirror, recursive: true) }
            } catch {
                problems.append(error.message)
            }
        }
        for point in made.mounted.reversed() {
            do throws(SystemCallError) { try Sys.umount2(FilePath(point), flags: Int32(MNT_DETACH)) } catch { problems.append("\(error)") }
        }
        for dir in made.scratch.reversed() {
            do throws(SystemCallError) { try StorageMounter.removeTree(FilePath(dir)) } catch { problems.append("\(error)") }
        }
        try files.lockedAll { (f) throws(GuestAgentError) in f.reopenRoot() }
        if !problems.isEmpty { throw GuestAgentError(.failed, "RemoveContainer: " + problems.joined(separator: "; ")) }
    }

    /// Validates every storage, then applies them in order; a failure undoes this call's work.
    private func apply(_ storages: [Grpc_Storage], containerID: String?) throws(GuestAgentError) -> Made {
        for s in storages {
            try StorageMounter.validate(s)
            if s.driver == "watchable-bind" {
                let root = try WatchableMirror.root(of: s.mountPoint, shareDir: files.shareDir)
                if let watchableRoot, watchableRoot != root {
                    throw GuestAgentError(.invalid, "every watchable mirror of a sandbox must be below one root (\(watchableRoot)), not \(root)")
                }
                guard StorageMounter.canonical(s.source).hasPrefix(files.shareDir + "/") else {
                    throw GuestAgentError(.invalid, "watchable source \(s.source) is not below the shared directory \(files.shareDir)")
                }
            }
        }
        var made = Made()
        var madeRoot = false
        func undo() {
            for m in made.mirrors.reversed() { try? files.locked(m) { (f) throws(GuestAgentError) in try f.removePath(m, recursive: true) } }
            for p in made.mounted.reversed() { try? Sys.umount2(FilePath(p), flags: Int32(MNT_DETACH)) }
            for d in made.scratch.reversed() { try? StorageMounter.removeTree(FilePath(d)) }
            if madeRoot, let root = watchableRoot {
                try? Sys.umount2(FilePath(root), flags: Int32(MNT_DETACH))
                mounted.removeAll { $0 == root }
                watchableRoot = nil
            }
            try? files.lockedAll { (f) throws(GuestAgentError) in f.reopenRoot() }
        }
        for s in storages {
            let point = StorageMounter.canonical(s.mountPoint)
            if s.driver == "watchable-bind" {
                do throws(GuestAgentError) {
                    if watchableRoot == nil {
                        let root = try WatchableMirror.root(of: point, shareDir: files.shareDir)
                        do throws(SystemCallError) {
                            // The host made the directory in the (read-only) share.
                            try Sys.mount(source: "tmpfs", target: FilePath(root), fstype: "tmpfs", flags: UInt(MS_NOSUID | MS_NODEV), data: "mode=0755")
                        } catch {
                            throw GuestAgentError(.failed, "cannot mount the watchable tmpfs at \(root): \(error)")
                        }
                        // The sandbox's, not this container's: every mirror lives in it.
                        watchableRoot = root
                        madeRoot = true
                        mounted.append(root)
                        log("mounted the watchable tmpfs at \(root)")
                    }
                    let requests = try WatchableMirror.requests(source: StorageMounter.canonical(s.source), target: point)
                    made.mirrors.append(point)
                    // Under the files lock: the host's watcher may already be pushing into it.
                    try files.locked(point) { (f) throws(GuestAgentError) in
                        for r in requests { try f.copyFile(r) }
                    }
                    log("mirrored \(s.source) at \(point) (\(requests.count) entries)")
                } catch {
                    undo()
                    throw error
                }
                continue
            }
            var storage = s
            if StorageMounter.blockDrivers.contains(s.driver) {
                do throws(GuestAgentError) {
                    storage.source = try BlockDevices.resolve(driver: s.driver, source: s.source)
                } catch {
                    undo()
                    throw error
                }
            } else if s.driver == "overlayfs" {
                // Kata's markers (io.katacontainers.*) are for the agent, not for overlayfs.
                storage.options = s.options.filter { !$0.hasPrefix("io.katacontainers.") }
                if s.options.contains(StorageMounter.overlayRW) {
                    guard let containerID, !containerID.contains("/"), containerID != ".", containerID != ".." else {
                        undo()
                        throw GuestAgentError(.invalid, "a writable overlay (\(StorageMounter.overlayRW)) needs a container id: send it in CreateContainer")
                    }
                    let base = "\(StorageMounter.containerBase)/\(containerID)"
                    do throws(SystemCallError) {
                        // Kata's layout: <base>/upper and <base>/work, on the guest's own /run.
                        try Sys.makeDirectories(FilePath(base + "/upper"), mode: 0o755)
                        try Sys.makeDirectories(FilePath(base + "/work"), mode: 0o755)
                    } catch {
                        undo()
                        throw GuestAgentError(.failed, "cannot make the overlay's upper and work directories in \(base): \(error)")
                    }
                    made.scratch.append(base + "/upper")
                    made.scratch.append(base + "/work")
                    storage.options += ["upperdir=\(base)/upper", "workdir=\(base)/work"]
                }
            }
            do throws(SystemCallError) {
                // The agent owns these paths (they are not below any share): plain mkdir -p.
                try Sys.makeDirectories(FilePath(point), mode: 0o755)
                let (flags, data) = StorageMounter.parseOptions(storage.options)
                try StorageMounter.mount(storage, at: point, flags: flags, data: data.isEmpty ? nil : data)
                made.mounted.append(point)
                log("mounted \(s.driver) \(storage.source) (\(s.source)) at \(point)")
            } catch {
                undo()
                throw GuestAgentError(.failed, "cannot mount \(s.driver) \(storage.source) at \(point): \(error)")
            }
        }
        // Descriptors opened before a mount on (or above) the share directory point below it.
        try files.lockedAll { (f) throws(GuestAgentError) in f.reopenRoot() }
        return made
    }

    /// How long a shared filesystem's tag may take to appear: a share hot-plugged just before
    /// CreateSandbox (libvirt's live attach) is still being probed by the guest kernel.
    static let tagWait: UInt64 = 10_000_000_000

    /// mount(2); for virtio-fs and 9p, retried while the kernel does not know the tag yet
    /// (virtio-fs says EINVAL, 9p ENOENT) until ``tagWait`` passes.
    static func mount(_ s: Grpc_Storage, at point: String, flags: UInt, data: String?) throws(SystemCallError) {
        let deadline = Sys.monotonicNanoseconds() + tagWait
        while true {
            do throws(SystemCallError) {
                try Sys.mount(source: FilePath(s.source), target: FilePath(point), fstype: s.fstype, flags: flags, data: data)
                return
            } catch {
                let waiting = (s.driver == "virtio-fs" && error.errno == .invalidArgument) || (s.driver == "9p" && error.errno == .noSuchFileOrDirectory)
                guard waiting, Sys.monotonicNanoseconds() < deadline else { throw error }
                var pause = timespec(tv_sec: 0, tv_nsec: 50_000_000)
                nanosleep(&pause, nil)
            }
        }
    }

    /// Unmounts what ``createSandbox(_:)`` mounted, newest first.
    func destroySandbox() throws(GuestAgentError) {
        var problems: [String] = []
        // Containers' mounts first (newest first), then the sandbox's.
        mounted += containers.values.flatMap(\.mounted)
        let scratch = containers.values.flatMap(\.scratch)
        for point in mounted.reversed() {
            do throws(SystemCallError) {
                try Sys.umount2(FilePath(point), flags: 0)
            } catch {
                // Busy (a process has a file open): detach it; the guest lets go when it closes.
                do { try Sys.umount2(FilePath(point), flags: Int32(MNT_DETACH)) } catch { problems.append("\(error)") }
            }
        }
        for dir in scratch {
            do throws(SystemCallError) { try StorageMounter.removeTree(FilePath(dir)) } catch { problems.append("\(error)") }
        }
        mounted = []
        sandboxID = nil
        watchableRoot = nil
        containers = [:]
        try? files.lockedAll { (f) throws(GuestAgentError) in f.reopenRoot() }
        if !problems.isEmpty { throw GuestAgentError(.failed, "DestroySandbox: " + problems.joined(separator: "; ")) }
    }

    /// Removes a guest scratch tree the agent made (a writable overlay's upper or work
    /// directory). What the container wrote there is untrusted: nothing is followed (every
    /// entry is opened `O_NOFOLLOW` relative to its parent), and a mount found inside is left
    /// alone (`EBUSY`).
    static func removeTree(_ path: FilePath) throws(SystemCallError) {
        guard let parent = path.removingLastComponent().string.isEmpty ? nil : Optional(path.removingLastComponent()),
              let leaf = path.lastComponent.map({ FilePath($0.string) })
        else { return }
        let dir: FileDescriptor
        do {
            dir = try Sys.openat(nil, parent, flags: Sys.oPath | Sys.oDirectory | Sys.oCloexec)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw error
        }
        defer { Sys.close(dir) }
        try removeEntry(DirFD(fd: dir, path: parent), leaf)
    }

    private static func removeEntry(_ dir: DirFD, _ name: FilePath) throws(SystemCallError) {
        do {
            try Sys.unlinkat(dir, name, directory: false)
            return
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory: return
            case .isDirectory, .notPermitted: break
            default: throw error
            }
        }
        let fd: FileDescriptor
        do {
            fd = try Sys.openat(dir, name, flags: O_RDONLY | Sys.oDirectory | Sys.oNoFollow | Sys.oCloexec)
        } catch {
            if error.errno == .noSuchFileOrDirectory { return }
            throw error
        }
        defer { Sys.close(fd) }
        let inner = DirFD(fd: fd, path: dir.display(name))
        for entry in try Sys.listDirectory(fd, path: inner.path) where entry.name != "." && entry.name != ".." {
            try removeEntry(inner, FilePath(entry.name))
        }
        try Sys.unlinkat(dir, name, directory: true)
    }
}
