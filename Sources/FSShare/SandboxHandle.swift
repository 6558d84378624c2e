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
    /// `private/`, opened on first use (see ``staging()``).
    private let stagingStorage = Mutex<DirFD?>(nil)
    static let stagingName: FilePath = "private"

    /// `private/` (legacy read-only shares stage there), opened `O_PATH|O_NOFOLLOW|O_DIRECTORY`
    /// the first time one needs it: a symlink there is refused, not followed.
    func staging() throws(FSShareError) -> DirFD {
        if let known = stagingStorage.withLock({ $0 }) { return known }
        let name = SandboxHandle.stagingName
        let fd = try sys("cannot open \(sandbox.display(name))") { () throws(SystemCallError) in
            try Sys.openat(sandbox, name, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
        }
        let opened = DirFD(fd: fd, path: sandbox.display(name))
        return stagingStorage.withLock { stored in
            if let stored { Sys.close(fd); return stored }
            stored = opened
            return opened
        }
    }
    let manifest: Manifest
    let mountsMountID: UInt64
    /// What share sources must stay clear of (the root, its ancestors, its inside): worked out
    /// on the first share, not at prepare (a prepare and cleanup alone never need it).
    private let guardStorage = Mutex<SourceCheck.RootGuard?>(nil)

    /// The root guard (see ``guardStorage``).
    func rootGuard() throws(FSShareError) -> SourceCheck.RootGuard {
        if let known = guardStorage.withLock({ $0 }) { return known }
        let fresh = try SourceCheck.RootGuard.cached(root: root)
        guardStorage.withLock { $0 = fresh }
        return fresh
    }

    init(root: DirFD, lock: FileDescriptor, sandbox: DirFD, mounts: DirFD, manifest: Manifest, mountsMountID: UInt64) {
        self.root = root
        self.lock = lock
        self.sandbox = sandbox
        self.mounts = mounts
        self.manifest = manifest
        self.mountsMountID = mountsMountID
    }

    deinit {
        // The manifest goes with the handle (only reached through it): its descriptor and the
        // handle's, opened one after another, close with one close_range per adjacent run.
        var fds = [root.fd, lock, sandbox.fd, mounts.fd, manifest.surrenderDescriptor()]
        if let staging = stagingStorage.withLock({ $0 }) { fds.append(staging.fd) }
        Sys.closeAll(fds)
    }

    /// Threads of this process using this handle, one at a time: `flock` belongs to an open
    /// file description, and they all share ``lock``'s, so it alone would not exclude them.
    private let threads = ThreadLock()
    private let staleFlag = Atomic<Bool>(false)

    /// Another process cleaned the sandbox up (found by ``locked(_:)``): open it again.
    var isStale: Bool { staleFlag.load(ordering: .acquiring) }

    /// Holds the sandbox's lock around `body`, with the manifest brought up to date first:
    /// this handle's threads one at a time (``threads``), other processes — and other handles
    /// of this one, which have descriptions of their own — by `flock` on ``lock``. One `flock`
    /// pair per operation: no descriptor is opened for it.
    ///
    /// The manifest's status, read under the lock anyway, says whether the sandbox is still
    /// there: a cleanup removes the manifest last, so a manifest with no link left and no
    /// successor means the sandbox is gone; then the handle is marked stale and `notPrepared`
    /// is thrown before `body` runs.
    func locked<T>(_ body: () throws(FSShareError) -> T) throws(FSShareError) -> T {
        threads.lock()
        defer { threads.unlock() }
        try sys("cannot lock the sandbox \(sandbox.path)") { () throws(SystemCallError) in try Sys.flock(lock, operation: LOCK_EX, path: sandbox.path) }
        defer { try? Sys.flock(lock, operation: LOCK_UN, path: sandbox.path) }
        do {
            try manifest.refresh()
        } catch {
            if error.code == .notPrepared { staleFlag.store(true, ordering: .releasing) }
            throw error
        }
        return try body()
    }

    /// False once another process has cleaned the sandbox up (its directory is gone). One
    /// statx: for the rare paths (prepare) that must know before taking the lock.
    var isAlive: Bool {
        guard let st = try? Sys.fstatx(lock, path: sandbox.path) else { return false }
        return st.linkCount > 0
    }
}

/// A list of rollback actions, run newest first unless committed.
struct Undo {
    private var actions: [() -> Void] = []
    mutating func add(_ action: @escaping () -> Void) {
        // A prepare adds about a dozen: one allocation instead of regrowing 1, 2, 4, 8, 16.
        if actions.isEmpty { actions.reserveCapacity(16) }
        actions.append(action)
    }
    mutating func commit() { actions.removeAll() }
    mutating func run() {
        for action in actions.reversed() { action() }
        actions.removeAll()
    }
}

/// A plain mutex for ``SandboxHandle/locked(_:)``: held across a body that throws and returns
/// any type, which `Mutex.withLock` would require to be `sending`.
final class ThreadLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
}
