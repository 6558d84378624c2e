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
