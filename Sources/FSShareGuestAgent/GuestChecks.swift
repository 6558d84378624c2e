#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareProto
import FSShareSystem
import SystemPackage

/// `fsshare.GuestCheck`: what the guest sees, asked from inside the guest (served only with
/// `fsshare-agent --checks`). Each probe reports the guest kernel's own answer (an errno), so a
/// read-only share is proven read-only by the guest, not assumed from the host's side.
///
/// Unlike the file operations of copy mode these follow symlinks and go anywhere: they act as a
/// process in a container would. That is why they are off unless asked for.
enum GuestChecks {
    static func probe(_ r: Fsshare_ProbeRequest) -> Fsshare_ProbeResponse {
        var out = Fsshare_ProbeResponse()
        let path = FilePath(r.path)
        do throws(SystemCallError) {
            switch r.op {
            case .stat:
                let st = try Sys.statx(nil, path, followSymlinks: false)
                out.mode = st.mode
                out.size = Int64(st.size)
            case .read:
                let fd = try Sys.openat(nil, path, flags: O_RDONLY | O_CLOEXEC)
                defer { Sys.close(fd) }
                out.data = Data(try Sys.readAll(fd, path: path))
            case .list:
                out.names = try Sys.listDirectory(nil, path).map(\.name).sorted()
            case .create:
                let fd = try Sys.openat(nil, path, flags: O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o644)
                defer { Sys.close(fd) }
                try Sys.writeAll(fd, Array(r.data), path: path)
            case .write:
                let fd = try Sys.openat(nil, path, flags: O_WRONLY | O_TRUNC | O_CLOEXEC)
                defer { Sys.close(fd) }
                try Sys.writeAll(fd, Array(r.data), path: path)
            case .unlink:
                try Sys.unlinkat(nil, path, directory: false)
            case .mkdir:
                if try !Sys.mkdirat(nil, path, mode: 0o755) { out.errno = EEXIST }
            case .rmdir:
                try Sys.unlinkat(nil, path, directory: true)
            case .mounts:
                let prefix = r.path.hasSuffix("/") ? r.path : r.path + "/"
                let lines = try Sys.mountTable()
                    .filter { $0.mountPoint == r.path || $0.mountPoint.hasPrefix(prefix) }
                    .map { "\($0.mountPoint) \($0.fstype) \($0.mountOptions)" }
                out.names = lines
            case .fstype:
                // The innermost mount whose point is a prefix of the path (mountinfo order puts
                // later mounts last, so the last match is the one on top).
                let table = try Sys.mountTable()
                let hit = table.last { m in
                    m.mountPoint == "/" || r.path == m.mountPoint || r.path.hasPrefix(m.mountPoint + "/")
                }
                out.data = Data((hit?.fstype ?? "").utf8)
            case .UNRECOGNIZED(let v):
                out.errno = EINVAL
                out.data = Data("unknown probe op \(v)".utf8)
            }
        } catch {
            out.errno = error.errno.rawValue
        }
        return out
    }

    /// A container's view of an atomic-writer volume, sampled in a loop: every pass resolves
    /// `..data`, reads each key through its link (as a pod does), and resolves `..data` again.
    /// A pass is *dangling* when `..data` is missing or a key is unreadable although `..data`
    /// did not change during the pass; it is *torn* when, through one unchanged `..data`, some
    /// keys already have the expected content and others do not (every key must change in the
    /// update for this to mean anything).
    static func watchContent(_ r: Fsshare_WatchContentRequest) -> Fsshare_WatchContentResponse {
        var out = Fsshare_WatchContentResponse()
        let start = Sys.monotonicNanoseconds()
        let deadline = start + UInt64(max(r.timeoutMs, 1)) * 1_000_000
        let dir = FilePath(r.dir)
        let keys = r.expect.keys.sorted()
        func target() -> String? { try? Sys.readlinkat(nil, dir.appending("..data")) }
        // An app that reloads on change: inotify on the directory, drained every pass.
        var listener: FileDescriptor?
        if r.inotify {
            do {
                let fd = try Sys.inotifyInit()
                listener = fd
                _ = try Sys.inotifyAddWatch(fd, dir, mask: UInt32(IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF))
            } catch {
                out.detail = "cannot listen with inotify on \(r.dir): \(error)"
                if let listener { Sys.close(listener) }
                return out
            }
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 8)
        defer {
            buffer.deallocate()
            if let listener { Sys.close(listener) }
        }
        // The first events, for the reply's detail when `..data` never moved.
        var seen: [String] = []
        func drain() {
            guard let listener else { return }
            while let n = try? Sys.readAvailable(listener, into: buffer, path: dir), n > 0 {
                for e in Sys.inotifyEvents(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) {
                    out.events += 1
                    if seen.count < 24 { seen.append("\(e.name.isEmpty ? "." : e.name):0x\(String(e.mask, radix: 16))") }
                    if e.name == "..data" && e.mask & UInt32(IN_MOVED_TO) != 0 {
                        out.dataMovedEvents += 1
                        if out.firstDataMovedNs == 0 { out.firstDataMovedNs = Sys.monotonicNanoseconds() - start }
                    }
                }
            }
        }
        while true {
            drain()
            out.passes += 1
            let before = target()
            var unreadable: [String] = []
            var matching = 0
            for key in keys {
                let path = dir.appending(key)
                guard let fd = try? Sys.openat(nil, path, flags: O_RDONLY | O_CLOEXEC) else {
                    unreadable.append(key)
                    continue
                }
                let bytes = try? Sys.readAll(fd, path: path)
                Sys.close(fd)
                if let bytes, bytes.elementsEqual(r.expect[key] ?? Data()) { matching += 1 }
            }
            let after = target()
            if before == nil || after == nil {
                out.dangling += 1
                out.detail = "\(r.dir)/..data is missing"
            } else if before == after {
                if !unreadable.isEmpty {
                    out.dangling += 1
                    out.detail = "keys \(unreadable) unreadable through ..data -> \(before ?? "")"
                } else if matching == keys.count {
                    drain()
                    // The kernel queues the rename's inotify event after the new `..data` is
                    // visible (vfs_rename: d_move, then fsnotify_move, which allocates the event
                    // and may reschedule first). On the single emulated vCPU this reader can run
                    // in that gap and see new content before the event exists — once in ~20
                    // updates under CI load. An app blocked on inotify gets it a moment later,
                    // so wait for it (up to 1 s, counted in its latency) before calling it missed.
                    if let listener, out.dataMovedEvents == 0 {
                        let waitUntil = Sys.monotonicNanoseconds() + 1_000_000_000
                        while out.dataMovedEvents == 0, case let now = Sys.monotonicNanoseconds(), now < waitUntil {
                            let ms = Int32(max(1, (waitUntil - now) / 1_000_000))
                            if (try? Sys.pollIn(listener, timeoutMilliseconds: ms, path: dir)) ?? 0 == 0 { break }
                            drain()
                        }
                    }
                    out.late = out.passes == 1
                    out.matched = true
                    out.elapsedNs = Sys.monotonicNanoseconds() - start
                    out.detail = listener != nil && out.dataMovedEvents == 0 ? "no IN_MOVED_TO ..data within 1 s of the new content; events: \(seen)" : ""
                    return out
                } else if matching > 0 {
                    out.torn += 1
                    out.detail = "\(matching) of \(keys.count) keys new through one ..data -> \(before ?? "")"
                } else {
                    out.detail = "old content through ..data -> \(before ?? "")"
                }
            }
            if Sys.monotonicNanoseconds() >= deadline {
                drain()
                return out
            }
            // Yield the (single, emulated) vCPU to the agent thread applying the update.
            var pause = timespec(tv_sec: 0, tv_nsec: 500_000)
            nanosleep(&pause, nil)
        }
    }
}
