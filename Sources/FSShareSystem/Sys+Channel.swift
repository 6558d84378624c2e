#if canImport(Glibc)
import Glibc
#endif
import CFSShareShim
import SystemPackage

// Wrappers for the agent channel (sockets, polling, stream I/O), the guest agent's file writes,
// the watcher's inotify calls and threads. Same rules as the rest of `Sys`: fault injection,
// EINTR retried where safe, errors name the call and the path (or address).
extension Sys {
    // MARK: - Sockets and streams

    /// Connects a stream socket to a unix socket path.
    ///
    /// - Parameter path: the socket to connect to.
    /// - Returns: the connected socket.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func connectUnix(_ path: FilePath) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("connect", path)
        let fd = path.withPlatformString { fsshare_unix_connect($0) }
        if fd < 0 { throw fail("connect", path) }
        return FileDescriptor(rawValue: fd)
    }

    /// Binds and listens on a unix socket path (which must not exist).
    ///
    /// - Parameters:
    ///   - path: where the socket is made.
    ///   - backlog: the listen backlog.
    /// - Returns: the listening socket.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func listenUnix(_ path: FilePath, backlog: Int32 = 16) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("bind", path)
        let fd = path.withPlatformString { fsshare_unix_listen($0, backlog) }
        if fd < 0 { throw fail("bind", path) }
        return FileDescriptor(rawValue: fd)
    }

    /// Connects an AF_VSOCK stream socket to `cid:port`.
    ///
    /// - Parameters:
    ///   - cid: the vsock context id.
    ///   - port: the vsock port.
    /// - Returns: the connected socket.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func connectVsock(cid: UInt32, port: UInt32) throws(SystemCallError) -> FileDescriptor {
        let shown = FilePath("vsock:\(cid):\(port)")
        try FaultInjection.check("connect", shown)
        let fd = fsshare_vsock_connect(cid, port)
        if fd < 0 { throw fail("connect", shown) }
        return FileDescriptor(rawValue: fd)
    }

    /// Listens on AF_VSOCK `port` (any cid).
    ///
    /// - Parameters:
    ///   - port: the vsock port.
    ///   - backlog: the listen backlog.
    /// - Returns: the listening socket.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func listenVsock(port: UInt32, backlog: Int32 = 16) throws(SystemCallError) -> FileDescriptor {
        let shown = FilePath("vsock:any:\(port)")
        try FaultInjection.check("bind", shown)
        let fd = fsshare_vsock_listen(port, backlog)
        if fd < 0 { throw fail("bind", shown) }
        return FileDescriptor(rawValue: fd)
    }

    /// `accept4(2)` with `SOCK_CLOEXEC`.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: the connection.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func accept(_ fd: FileDescriptor, path: FilePath) throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("accept", path)
        while true {
            let conn = fsshare_accept(fd.rawValue)
            if conn >= 0 { return FileDescriptor(rawValue: conn) }
            if Glibc.errno == EINTR || Glibc.errno == ECONNABORTED { continue }
            throw fail("accept", path)
        }
    }

    /// Waits until `fd` (bit 1) or `wake` (bit 2) is readable. Returns 0 on timeout.
    /// `timeoutMilliseconds` < 0 waits forever.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - wake: a second descriptor whose readability also ends the wait.
    ///   - timeoutMilliseconds: how long to wait; negative waits forever.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: 0 on timeout, else bit 1 when `fd` is readable and bit 2 when `wake` is.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pollIn(_ fd: FileDescriptor, wake: FileDescriptor? = nil, timeoutMilliseconds: Int32, path: FilePath) throws(SystemCallError) -> Int32 {
        while true {
            let rc = fsshare_poll_in(fd.rawValue, wake?.rawValue ?? -1, timeoutMilliseconds)
            if rc >= 0 { return rc }
            if Glibc.errno == EINTR { continue }
            throw fail("poll", path)
        }
    }

    /// Waits until `fd` is writable. False on timeout.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - timeoutMilliseconds: how long to wait; negative waits forever.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: false on timeout.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pollOut(_ fd: FileDescriptor, timeoutMilliseconds: Int32, path: FilePath) throws(SystemCallError) -> Bool {
        while true {
            let rc = fsshare_poll_out(fd.rawValue, timeoutMilliseconds)
            if rc >= 0 { return rc == 1 }
            if Glibc.errno == EINTR { continue }
            throw fail("poll", path)
        }
    }

    /// One `read(2)` into `buffer`; 0 at end of stream.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: bytes read; 0 at end of file.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func read(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, path: FilePath) throws(SystemCallError) -> Int {
        try FaultInjection.check("read", path)
        while true {
            let n = Glibc.read(fd.rawValue, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if Glibc.errno == EINTR { continue }
            throw fail("read", path)
        }
    }

    /// One `send(2)` (MSG_NOSIGNAL) or, for non-sockets, `write(2)`. Returns bytes written.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - isSocket: `fd` is a socket (`send` with `MSG_NOSIGNAL`) rather than a file or tty (`write`).
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: bytes written.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func send(_ fd: FileDescriptor, _ buffer: UnsafeRawBufferPointer, isSocket: Bool, path: FilePath) throws(SystemCallError) -> Int {
        try FaultInjection.check("send", path)
        while true {
            let n = fsshare_send(fd.rawValue, buffer.baseAddress, buffer.count, isSocket ? 1 : 0)
            if n >= 0 { return n }
            if Glibc.errno == EINTR { continue }
            throw fail(isSocket ? "send" : "write", path)
        }
    }

    /// A socket `send(2)` that does not block: nil when the socket buffer is full.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: bytes written; 0 when the descriptor would block.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func sendNoWait(_ fd: FileDescriptor, _ buffer: UnsafeRawBufferPointer, path: FilePath) throws(SystemCallError) -> Int? {
        try FaultInjection.check("send", path)
        while true {
            let n = fsshare_send_nowait(fd.rawValue, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if Glibc.errno == EINTR { continue }
            if Glibc.errno == EAGAIN || Glibc.errno == EWOULDBLOCK { return nil }
            throw fail("send", path)
        }
    }

    /// Puts a terminal (a serial port or pty) into raw mode; a non-terminal is left alone.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func makeRaw(_ fd: FileDescriptor, path: FilePath) throws(SystemCallError) {
        if fsshare_make_raw(fd.rawValue) != 0 && Glibc.errno != ENOTTY && Glibc.errno != EINVAL {
            throw fail("tcsetattr", path)
        }
    }

    /// `socket` type check: true for sockets (they get MSG_NOSIGNAL sends).
    ///
    /// - Parameter fd: the descriptor.
    /// - Returns: whether it is a socket.
    public static func isSocket(_ fd: FileDescriptor) -> Bool {
        guard let st = try? fstatx(fd, path: "") else { return false }
        return st.kind == .socket
    }

    /// A non-blocking close-on-exec pipe: (read end, write end). Used to wake poll loops.
    ///
    /// - Returns: the read and write ends.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pipe() throws(SystemCallError) -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        if fsshare_pipe(&fds) != 0 { throw fail("pipe2", nil) }
        return (FileDescriptor(rawValue: fds[0]), FileDescriptor(rawValue: fds[1]))
    }

    /// A pseudo-terminal: (master, slave path). A pty stands in for a serial port.
    ///
    /// - Returns: the master and the slave's path.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func openPty() throws(SystemCallError) -> (FileDescriptor, FilePath) {
        var name = [CChar](repeating: 0, count: 128)
        let fd = fsshare_open_pty(&name, name.count)
        if fd < 0 { throw fail("posix_openpt", nil) }
        return (FileDescriptor(rawValue: fd), FilePath(String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))
    }

    /// `shutdown(fd, SHUT_RDWR)`: wakes a thread blocked reading the socket. Errors ignored.
    ///
    /// - Parameter fd: the descriptor.
    public static func shutdown(_ fd: FileDescriptor) {
        _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR))
    }

    // MARK: - File contents and metadata

    /// `pread(2)`; returns bytes read (0 at end of file).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - offset: the file offset.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: bytes read; 0 at end of file.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pread(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, offset: Int64, path: FilePath) throws(SystemCallError) -> Int {
        try FaultInjection.check("pread", path)
        while true {
            let n = Glibc.pread(fd.rawValue, buffer.baseAddress, buffer.count, off_t(offset))
            if n >= 0 { return n }
            if Glibc.errno == EINTR { continue }
            throw fail("pread", path)
        }
    }

    /// `pwrite(2)` of the whole buffer at `offset` (looping on short writes).
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - offset: the file offset.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func pwriteAll(_ fd: FileDescriptor, _ buffer: UnsafeRawBufferPointer, offset: Int64, path: FilePath) throws(SystemCallError) {
        try FaultInjection.check("pwrite", path)
        var done = 0
        while done < buffer.count {
            let n = Glibc.pwrite(fd.rawValue, buffer.baseAddress.map { $0 + done }, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw fail("pwrite", path)
            }
            done += n
        }
    }

    /// `symlinkat(2)`: creates `dir/path` pointing at `target`.
    ///
    /// - Parameters:
    ///   - target: the link's target text (not resolved).
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: where the link is made (relative to `dir`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func symlinkat(_ target: String, _ dir: DirFD?, _ path: FilePath) throws(SystemCallError) {
        try FaultInjection.check("symlinkat", shown(dir, path))
        let rc = path.withPlatformString { p in target.withCString { Glibc.symlinkat($0, dirfd(dir), p) } }
        if rc != 0 { throw fail("symlinkat", shown(dir, path)) }
    }

    /// `fchmod(2)`.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - mode: permission bits for what is created.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func fchmod(_ fd: FileDescriptor, mode: mode_t, path: FilePath) throws(SystemCallError) {
        try FaultInjection.check("fchmod", path)
        if Glibc.fchmod(fd.rawValue, mode) != 0 { throw fail("fchmod", path) }
    }

    /// `fchownat(2)`, never following a final symlink (it changes the link itself).
    ///
    /// - Parameters:
    ///   - dir: the directory `path` is relative to; nil: the current directory.
    ///   - path: the path, relative to `dir`.
    ///   - uid: the owner.
    ///   - gid: the group.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func lchownat(_ dir: DirFD?, _ path: FilePath, uid: UInt32, gid: UInt32) throws(SystemCallError) {
        try FaultInjection.check("fchownat", shown(dir, path))
        let flags = FSSHARE_AT_SYMLINK_NOFOLLOW | (path.isEmpty ? FSSHARE_AT_EMPTY_PATH : 0)
        let rc = path.withPlatformString { Glibc.fchownat(dirfd(dir), $0, uid, gid, flags) }
        if rc != 0 { throw fail("fchownat", shown(dir, path)) }
    }

    /// `fchown(2)`.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - uid: the owner.
    ///   - gid: the group.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func fchown(_ fd: FileDescriptor, uid: UInt32, gid: UInt32, path: FilePath) throws(SystemCallError) {
        try FaultInjection.check("fchown", path)
        if Glibc.fchown(fd.rawValue, uid, gid) != 0 { throw fail("fchown", path) }
    }

    /// `renameat(2)` between two directories; `noReplace` fails with EEXIST instead of
    /// replacing an existing `to` (`RENAME_NOREPLACE`).
    ///
    /// - Parameters:
    ///   - fromDir: the directory `from` is relative to.
    ///   - from: the entry to move.
    ///   - toDir: the directory `to` is relative to.
    ///   - to: where it goes.
    ///   - noReplace: fail with `EEXIST` instead of replacing the target (`RENAME_NOREPLACE`).
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func renameat(_ fromDir: DirFD, _ from: FilePath, _ toDir: DirFD, _ to: FilePath, noReplace: Bool = false) throws(SystemCallError) {
        try FaultInjection.check("renameat", toDir.display(to))
        let flags = noReplace ? FSSHARE_RENAME_NOREPLACE : 0
        let rc = from.withPlatformString { f in
            to.withPlatformString { t in fsshare_renameat2(fromDir.fd.rawValue, f, toDir.fd.rawValue, t, flags) }
        }
        if rc != 0 { throw fail("renameat", toDir.display(to)) }
    }

    // MARK: - inotify

    /// `inotify_init1(IN_CLOEXEC | IN_NONBLOCK)`.
    ///
    /// - Returns: the inotify descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func inotifyInit() throws(SystemCallError) -> FileDescriptor {
        try FaultInjection.check("inotify_init1", nil)
        let fd = inotify_init1(Int32(IN_CLOEXEC | IN_NONBLOCK))
        if fd < 0 { throw fail("inotify_init1", nil) }
        return FileDescriptor(rawValue: fd)
    }

    /// `inotify_add_watch(2)`; returns the watch descriptor.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - path: the directory to watch.
    ///   - mask: the inotify events wanted.
    /// - Returns: the watch descriptor.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func inotifyAddWatch(_ fd: FileDescriptor, _ path: FilePath, mask: UInt32) throws(SystemCallError) -> Int32 {
        try FaultInjection.check("inotify_add_watch", path)
        let wd = path.withPlatformString { inotify_add_watch(fd.rawValue, $0, mask) }
        if wd < 0 { throw fail("inotify_add_watch", path) }
        return wd
    }

    /// `inotify_rm_watch(2)`; errors (the watch is already gone) are ignored.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - wd: the watch descriptor.
    public static func inotifyRemoveWatch(_ fd: FileDescriptor, _ wd: Int32) {
        _ = inotify_rm_watch(fd.rawValue, wd)
    }

    /// A non-blocking read of an inotify descriptor: 0 when nothing is queued.
    /// Splits what `read(2)` returned from an inotify descriptor into events (`struct
    /// inotify_event`: wd, mask, cookie, len, then a NUL-padded name).
    ///
    /// - Parameter buffer: what one `read` of an inotify descriptor returned.
    /// - Returns: the events, in order.
    public static func inotifyEvents(_ buffer: UnsafeRawBufferPointer) -> [InotifyEvent] {
        var events: [InotifyEvent] = []
        var offset = 0
        while offset + 16 <= buffer.count {
            let wd = buffer.load(fromByteOffset: offset, as: Int32.self)
            let mask = buffer.load(fromByteOffset: offset + 4, as: UInt32.self)
            let len = Int(buffer.load(fromByteOffset: offset + 12, as: UInt32.self))
            guard offset + 16 + len <= buffer.count else { break }
            var name = ""
            if len > 0 {
                let raw = UnsafeRawBufferPointer(rebasing: buffer[(offset + 16)..<(offset + 16 + len)])
                let end = raw.firstIndex(of: 0) ?? len
                name = String(decoding: raw[0..<end], as: UTF8.self)
            }
            events.append(InotifyEvent(wd: wd, mask: mask, name: name))
            offset += 16 + len
        }
        return events
    }

    /// Reads what a non-blocking descriptor has now, up to `buffer.count` bytes; 0 when nothing (`EAGAIN`).
    ///
    /// - Throws: the `read` failure, with `path` for the message.
    ///
    /// - Parameters:
    ///   - fd: the descriptor.
    ///   - buffer: the bytes (read into, or written from).
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    /// - Returns: bytes read; 0 when nothing is there now.
    public static func readAvailable(_ fd: FileDescriptor, into buffer: UnsafeMutableRawBufferPointer, path: FilePath) throws(SystemCallError) -> Int {
        while true {
            let n = Glibc.read(fd.rawValue, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if Glibc.errno == EINTR { continue }
            if Glibc.errno == EAGAIN { return 0 }
            throw fail("read", path)
        }
    }

    // MARK: - Process facts

    /// Peak resident set size of this process in bytes (`VmHWM`), or nil.
    public static func peakResidentBytes() -> Int? {
        let kib = fsshare_peak_rss_kib()
        return kib < 0 ? nil : kib * 1024
    }

    /// `CLOCK_MONOTONIC` in nanoseconds.
    public static func monotonicNanoseconds() -> UInt64 { fsshare_monotonic_ns() }

    /// The CLOCK_MONOTONIC deadline `timeout` from now.
    ///
    /// - Parameter timeout: how long from now.
    /// - Returns: `CLOCK_MONOTONIC` nanoseconds.
    public static func deadline(after timeout: Duration) -> UInt64 { monotonicNanoseconds() + timeout.nanoseconds }
}

/// A joinable OS thread running a closure: the watcher's reader and the agent's connection
/// handlers block in syscalls, so they get threads of their own rather than pool threads.
public final class OSThread: Sendable {
    private let handle: UInt64

    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    /// Starts `body` on a new thread.
    ///
    /// - Parameter body: the thread's work.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public init(_ body: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let box = Unmanaged.passRetained(Box(body))
        var h: UInt64 = 0
        let rc = fsshare_thread_start({ ctx in
            guard let ctx else { return }
            let box = Unmanaged<Box>.fromOpaque(ctx).takeRetainedValue()
            box.body()
        }, box.toOpaque(), &h)
        if rc != 0 {
            box.release()
            throw SystemCallError(syscall: "pthread_create", path: nil, errno: Errno(rawValue: rc))
        }
        handle = h
    }

    /// Waits for the thread to finish. Call at most once.
    public func join() { _ = fsshare_thread_join(handle) }

    /// Starts `body` on a detached thread (nobody joins it; it cleans up when it returns).
    ///
    /// - Parameter body: the thread's work.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func detach(_ body: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let box = Unmanaged.passRetained(Box(body))
        let rc = fsshare_thread_start({ ctx in
            guard let ctx else { return }
            Unmanaged<Box>.fromOpaque(ctx).takeRetainedValue().body()
        }, box.toOpaque(), nil)
        if rc != 0 {
            box.release()
            throw SystemCallError(syscall: "pthread_create", path: nil, errno: Errno(rawValue: rc))
        }
    }
}

extension Duration {
    /// Whole nanoseconds (negative durations count as zero): deadlines are CLOCK_MONOTONIC ns.
    public var nanoseconds: UInt64 {
        let c = components
        guard c.seconds >= 0, c.attoseconds >= 0 else { return 0 }
        return UInt64(c.seconds) * 1_000_000_000 + UInt64(c.attoseconds / 1_000_000_000)
    }
}

/// One inotify event: the watch it came from, what happened, and the entry's name (empty for
/// the watched object itself).
public struct InotifyEvent: Sendable, Equatable {
    /// The watch descriptor (-1 for `IN_Q_OVERFLOW`).
    public var wd: Int32
    /// The event bits (`IN_MOVED_TO`, ...).
    public var mask: UInt32
    /// The entry's name inside the watched directory; empty for events of the directory itself.
    public var name: String
    /// An event of watch `wd` with bits `mask` about `name`.
    ///
    /// - Parameters:
    ///   - wd: the watch descriptor.
    ///   - mask: the inotify events wanted.
    ///   - name: the entry name in `dir`.
    public init(wd: Int32, mask: UInt32, name: String) {
        self.wd = wd
        self.mask = mask
        self.name = name
    }
}
