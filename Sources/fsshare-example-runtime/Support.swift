#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Checks counted from many tasks; each prints one `ok:`/`FAIL:` line.
final class Tally: Sendable {
    private let counts = Mutex((passed: 0, failed: 0))
    func check(_ ok: Bool, _ what: String) {
        counts.withLock { ok ? ($0.passed += 1) : ($0.failed += 1) }
        print((ok ? "ok: " : "FAIL: ") + what)
    }
    var passed: Int { counts.withLock { $0.passed } }
    var failed: Int { counts.withLock { $0.failed } }
}

/// Sleeps 10 ms at a time until cancelled and records how late each wake-up was.
struct Heartbeat: Sendable {
    struct Report: Sendable {
        var ticks = 0
        var worst: Duration = .zero
        var p99: Duration = .zero
        var median: Duration = .zero
    }

    func run() async -> Report {
        let clock = ContinuousClock()
        let period = Duration.milliseconds(10)
        var delays: [Duration] = []
        while !Task.isCancelled {
            let before = clock.now
            do { try await Task.sleep(for: period) } catch { break }
            delays.append(max(.zero, clock.now - before - period))
        }
        var r = Report()
        r.ticks = delays.count
        guard !delays.isEmpty else { return r }
        delays.sort()
        r.worst = delays[delays.count - 1]
        r.p99 = delays[min(delays.count - 1, delays.count * 99 / 100)]
        r.median = delays[delays.count / 2]
        return r
    }
}

/// The few file operations the example needs, without Foundation.
enum FileManagerLite {
    static func makeDirectories(_ path: String) {
        var current = ""
        for part in path.split(separator: "/") {
            current += "/" + part
            mkdir(current, 0o755)
        }
    }

    static func write(_ path: String, _ text: String) {
        makeDirectories(String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)]))
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { close(fd) }
        var bytes = Array(text.utf8)
        _ = Glibc.write(fd, &bytes, bytes.count)
    }

    /// A file of `size` bytes (sparse: reading it costs no disk).
    static func makeFile(_ path: String, size: Int) -> Bool {
        makeDirectories(String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)]))
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return ftruncate(fd, off_t(size)) == 0
    }

    static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = Glibc.read(fd, &buffer, buffer.count)
        return n < 0 ? nil : String(decoding: buffer[0..<n], as: UTF8.self)
    }

    static func size(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : -1
    }

    /// Whether a file can be created at `path` (removed again if it could).
    static func canCreate(_ path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return false }
        close(fd)
        unlink(path)
        return true
    }

    static func list(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
