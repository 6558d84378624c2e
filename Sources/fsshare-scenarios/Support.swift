#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import FSShareTestSupport
import SystemPackage

func run(_ argv: [String], environment: [String: String] = [:]) -> (status: Int32, output: String) {
    Sys.run(argv, environment: environment)
}

/// Starts a long-lived process in the background and returns its pid.
func spawnBackground(_ argv: [String]) -> pid_t? {
    let cArgs = argv.map { strdup($0) } + [nil]
    defer { cArgs.forEach { free($0) } }
    var pid: pid_t = 0
    guard posix_spawnp(&pid, argv[0], nil, nil, cArgs, environ) == 0 else { return nil }
    return pid
}

/// A mount namespace created as a slave copy of ours, the way virtiofsd makes its own: later
/// binds propagate into it, later remounts do not. Commands run in it through nsenter.
final class SlaveView {
    let pid: pid_t

    init?() {
        guard let pid = spawnBackground(["unshare", "-m", "--propagation", "slave", "sleep", "600"]) else { return nil }
        self.pid = pid
        // Wait until the child has its own namespace (its ns link differs from ours).
        for _ in 0..<200 {
            if let theirs = try? Sys.readlinkat(nil, FilePath("/proc/\(pid)/ns/mnt")),
               let ours = try? Sys.readlinkat(nil, "/proc/self/ns/mnt"), theirs != ours {
                return
            }
            usleep(5000)
        }
    }

    /// Runs a shell command inside the view.
    func sh(_ command: String) -> (status: Int32, output: String) {
        run(["nsenter", "-t", "\(pid)", "-m", "--", "sh", "-c", command])
    }

    deinit {
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }
}

/// Paths of mounts below `prefix` in our namespace (mountinfo, for verification only).
func mountsUnder(_ prefix: String) -> [String] {
    guard let fd = try? Sys.openat(nil, "/proc/self/mountinfo", flags: O_RDONLY),
          let bytes = try? Sys.readAll(fd, path: "/proc/self/mountinfo") else { return ["<cannot read mountinfo>"] }
    Sys.close(fd)
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap { line in
        let f = line.split(separator: " ")
        guard f.count > 4 else { return nil }
        let p = String(f[4])
        return p == prefix || p.hasPrefix(prefix + "/") ? p : nil
    }
}

/// Every path below `dir` (recursive, not following symlinks), sorted.
func listTree(_ dir: String) -> [String] {
    var out: [String] = []
    func walk(_ path: String) {
        guard let entries = try? Sys.listDirectory(nil, FilePath(path)) else { return }
        for e in entries.sorted(by: { $0.name < $1.name }) {
            let child = path + "/" + e.name
            out.append(child)
            if let st = try? Sys.statx(nil, FilePath(child)), st.kind == .directory { walk(child) }
        }
    }
    walk(dir)
    return out
}

func exists(_ path: String) -> Bool { (try? Sys.statx(nil, FilePath(path))) != nil }

/// A checksummed snapshot of a tree, for "nothing here changed": relative path -> kind, mode,
/// owner and, for files, size and FNV-1a 64 of the content; symlink targets verbatim. It never
/// follows a symlink and never enters a mount point (mounts are compared separately).
func digest(_ dir: String) -> [String: String] {
    var out: [String: String] = [:]
    guard let top = try? Sys.openat(nil, FilePath(dir), flags: Sys.oPath | Sys.oDirectory) else { return ["": "missing"] }
    defer { Sys.close(top) }
    func walk(_ d: DirFD, _ prefix: String) {
        guard let entries = try? Sys.listDirectory(d, ".") else { out[prefix + "/"] = "unreadable"; return }
        for e in entries {
            let rel = prefix + "/" + e.name
            let name = FilePath(e.name)
            guard let st = try? Sys.statx(d, name) else { out[rel] = "vanished"; continue }
            let meta = "\(st.kind) \(String(st.mode & 0o7777, radix: 8)) \(st.uid):\(st.gid)"
            switch st.kind {
            case .directory:
                out[rel] = meta + (st.isMountRoot ? " mount" : "")
                if !st.isMountRoot, let fd = try? Sys.openat(d, name, flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow) {
                    walk(DirFD(fd: fd, path: d.display(name)), rel)
                    Sys.close(fd)
                }
            case .symlink:
                out[rel] = meta + " -> " + ((try? Sys.readlinkat(d, name)) ?? "?")
            case .regular:
                var hash: UInt64 = 0xcbf2_9ce4_8422_2325
                if let fd = try? Sys.openat(d, name, flags: O_RDONLY | Sys.oNoFollow) {
                    for byte in (try? Sys.readAll(fd, path: d.display(name))) ?? [] {
                        hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3
                    }
                    Sys.close(fd)
                }
                out[rel] = meta + " \(st.size) \(String(hash, radix: 16))"
            default:
                out[rel] = meta
            }
        }
    }
    walk(DirFD(fd: top, path: FilePath(dir)), "")
    return out
}

/// The mount table outside `root` (mount point and id), to show that nothing there changed.
func mountsOutside(_ root: String) -> [String] {
    guard let table = try? Sys.mountTable() else { return ["<cannot read mountinfo>"] }
    return table.filter { $0.mountPoint != root && !$0.mountPoint.hasPrefix(root + "/") }.map { "\($0.mountID) \($0.mountPoint)" }
}

/// Names of the entries of `dir`, sorted (empty when it does not exist).
func entries(_ dir: String) -> [String] {
    ((try? Sys.listDirectory(nil, FilePath(dir))) ?? []).map(\.name).sorted()
}
