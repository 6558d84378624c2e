#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import Synchronization
import SystemPackage

/// Open descriptors of a prepared sandbox tree, kept for the sharer's lifetime so each
/// operation walks no paths: `*at` calls relative to these, never following symlinks.
///
/// Shared between threads: the descriptors never change, and the manifest (the one mutable
/// part) is only touched inside ``locked(_:)``, under the sandbox's `flock`.
final class SandboxHandle: @unchecked Sendable {
    let root: DirFD
    /// `<root>/<sid>`, opened `O_RDONLY` for `flock` (cross-process exclusion).
    let lock: FileDescriptor
    /// `<root>/<sid>` as seen through its self-bind (the top mount).
    let sandbox: DirFD
    let mounts: DirFD
    let staging: DirFD
    let manifest: Manifest
    let mountsMountID: UInt64
    /// What share sources must stay clear of (the root, its ancestors, its inside).
    let rootGuard: SourceCheck.RootGuard

    init(root: DirFD, lock: FileDescriptor, sandbox: DirFD, mounts: DirFD, staging: DirFD, manifest: Manifest, mountsMountID: UInt64, rootGuard: SourceCheck.RootGuard) {
        self.root = root
        self.lock = lock
        self.sandbox = sandbox
        self.mounts = mounts
        self.staging = staging
        self.manifest = manifest
        self.mountsMountID = mountsMountID
        self.rootGuard = rootGuard
    }

    deinit {
        for fd in [root.fd, lock, sandbox.fd, mounts.fd, staging.fd] { Sys.close(fd) }
    }

    /// Holds the sandbox's lock around `body`: `flock` on a descriptor opened for this call
    /// (reopened through `/proc/self/fd`, so the same directory however it was renamed). flock
    /// belongs to an open file description, so a fresh one excludes other threads of this
    /// process as it excludes other processes; the shared `lock` descriptor would not.
    func locked<T>(_ body: () throws(FSShareError) -> T) throws(FSShareError) -> T {
        let shown = sandbox.path
        let mine = try sys("cannot open the sandbox \(shown) to lock it") { () throws(SystemCallError) in
            try Sys.openat(nil, MountOps.fdPath(lock), flags: O_RDONLY | Sys.oDirectory)
        }
        defer { Sys.close(mine) }
        try sys("cannot lock the sandbox \(shown)") { () throws(SystemCallError) in try Sys.flock(mine, operation: LOCK_EX, path: shown) }
        defer { try? Sys.flock(mine, operation: LOCK_UN, path: shown) }
        return try body()
    }

    /// False once another process has cleaned the sandbox up (its directory is gone).
    var isAlive: Bool {
        guard let st = try? Sys.fstatx(lock, path: sandbox.path) else { return false }
        return st.linkCount > 0
    }
}

/// A list of rollback actions, run newest first unless committed.
struct Undo {
    private var actions: [() -> Void] = []
    mutating func add(_ action: @escaping () -> Void) { actions.append(action) }
    mutating func commit() { actions.removeAll() }
    mutating func run() {
        for action in actions.reversed() { action() }
        actions.removeAll()
    }
}
