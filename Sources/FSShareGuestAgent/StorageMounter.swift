#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SystemPackage

/// Applies the sandbox `Storage` descriptors of Kata's `CreateSandbox` in the guest: the shared
/// filesystem (`virtio-fs` / `9p`) and the sandbox shm (`ephemeral`), the same messages a Kata
/// agent receives. What one request mounted is unmounted again if a later storage of it fails,
/// and `DestroySandbox` unmounts everything in reverse order.
final class StorageMounter {
    /// Drivers this agent mounts, with the filesystem type each must name.
    static let drivers: [String: String] = ["virtio-fs": "virtiofs", "9p": "9p", "ephemeral": "tmpfs"]

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
    let log: @Sendable (String) -> Void

    init(log: @escaping @Sendable (String) -> Void) {
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
        guard let fstype = drivers[s.driver] else {
            throw GuestAgentError(.invalid, "storage driver \"\(s.driver)\" is not supported (fsshare-agent mounts \(drivers.keys.sorted().joined(separator: ", ")))")
        }
        guard s.fstype == fstype else {
            throw GuestAgentError(.invalid, "storage driver \(s.driver) needs fstype \(fstype), not \"\(s.fstype)\"")
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
        for s in request.storages { try StorageMounter.validate(s) }
        var made: [String] = []
        for s in request.storages {
            let point = StorageMounter.canonical(s.mountPoint)
            do throws(SystemCallError) {
                // The agent owns these paths (they are not below any share): plain mkdir -p.
                try Sys.makeDirectories(FilePath(point), mode: 0o755)
                let (flags, data) = StorageMounter.parseOptions(s.options)
                try StorageMounter.mount(s, at: point, flags: flags, data: data.isEmpty ? nil : data)
                made.append(point)
                log("mounted \(s.driver) \(s.source) at \(point)")
            } catch {
                for p in made.reversed() { try? Sys.umount2(FilePath(p), flags: Int32(MNT_DETACH)) }
                throw GuestAgentError(.failed, "cannot mount \(s.driver) \(s.source) at \(point): \(error)")
            }
        }
        sandboxID = request.sandboxID
        mounted = made
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
        for point in mounted.reversed() {
            do throws(SystemCallError) {
                try Sys.umount2(FilePath(point), flags: 0)
            } catch {
                // Busy (a process has a file open): detach it; the guest lets go when it closes.
                do { try Sys.umount2(FilePath(point), flags: Int32(MNT_DETACH)) } catch { problems.append("\(error)") }
            }
        }
        mounted = []
        sandboxID = nil
        if !problems.isEmpty { throw GuestAgentError(.failed, "DestroySandbox: " + problems.joined(separator: "; ")) }
    }
}
