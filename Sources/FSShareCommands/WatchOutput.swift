#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import Logging
import Prometheus
import Synchronization
import SystemPackage

/// `fsshare watch`'s log records on standard output: `fsshare watch: <message>` lines, or with
/// `--json` one compact object per line (`time`, `level`, `message` and the record's metadata:
/// `sandbox`, `volume`), which log shippers read line by line.
struct WatchLogHandler: LogHandler {
    let json: Bool
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let text: String
        if json {
            var fields: [(String, JSON)] = [
                ("time", .string(WatchLogHandler.timestamp())), ("level", .string(event.level.rawValue)),
                ("message", .string(event.message.description)),
            ]
            let all = metadata.merging(event.metadata ?? [:]) { _, new in new }
            for (key, value) in all.sorted(by: { $0.key < $1.key }) { fields.append((key, .string(value.description))) }
            text = JSON.object(fields).compact()
        } else {
            text = "fsshare watch: \(event.message)"
        }
        writeAll(fd: 1, Array((text + "\n").utf8))
    }

    /// RFC 3339 UTC with milliseconds.
    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var parts = tm()
        gmtime_r(&t, &parts)
        func pad(_ v: Int32, _ n: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, n - s.count)) + s
        }
        return "\(pad(parts.tm_year + 1900, 4))-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }
}

/// The watcher's metrics in Prometheus text format, written to a file for node_exporter's
/// textfile collector: rewritten whole (temp file + rename, so the collector never reads half
/// of one) every `interval` and once more on stop.
///
/// A file rather than an HTTP endpoint: the watcher runs as root on every node, and a file
/// adds no listening socket to it (nothing to authenticate, no port to allocate); node_exporter,
/// which nodes run already, serves it with its own TLS and auth.
final class MetricsTextfile: Sendable {
    let path: FilePath
    let registry: PrometheusCollectorRegistry
    let interval: Duration
    private let wake: (FileDescriptor, FileDescriptor)
    private let thread = Mutex<OSThread?>(nil)

    /// A sync takes about half a millisecond with a local agent and tens of milliseconds to a
    /// TCG guest: buckets from 100 µs to 10 s (the default ones start at 5 ms).
    static let syncBuckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .seconds(1), .seconds(10),
    ]

    init(path: FilePath, registry: PrometheusCollectorRegistry, interval: Duration) throws {
        self.path = path
        self.registry = registry
        self.interval = interval
        wake = try Sys.pipe()
    }

    /// Writes the file now and then every `interval` on a thread of its own.
    func start() throws {
        try write()
        let t = try OSThread { [self] in
            let ms = Int32(clamping: interval.components.seconds * 1000 + interval.components.attoseconds / 1_000_000_000_000_000)
            while true {
                let ready = (try? Sys.pollIn(wake.0, timeoutMilliseconds: ms, path: "metrics")) ?? 1
                if ready != 0 { return }
                try? write()
            }
        }
        thread.withLock { $0 = t }
    }

    /// Stops the thread and writes the final figures.
    func stop() {
        var b: UInt8 = 1
        _ = Glibc.write(wake.1.rawValue, &b, 1)
        let t = thread.withLock { t -> OSThread? in
            let x = t
            t = nil
            return x
        }
        t?.join()
        try? write()
        Sys.close(wake.0)
        Sys.close(wake.1)
    }

    func write() throws {
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let dir = path.removingLastComponent()
        let tmp = dir.appending("." + (path.lastComponent?.string ?? "fsshare") + ".tmp")
        let fd = try Sys.openat(nil, tmp, flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode: 0o644)
        defer { Sys.close(fd) }
        try Sys.writeAll(fd, buffer, path: tmp)
        try Sys.renameat(nil, tmp, path)
    }
}
