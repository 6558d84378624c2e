#if canImport(Glibc)
import Glibc
#endif
import CFSShareBenchFloor
import FSShare
import FSShareAgentChannel
import FSShareSystem
import CoreMetrics
import FSShareTestSupport
import Logging
import Prometheus
import SystemPackage

/// The watcher benchmark: from kubelet's `rename(..data_tmp, ..data)` to the complete new
/// content readable in the guest directory, for three contenders that each watch their own N
/// volumes, trials interleaved so all see the same machine noise:
///
/// - **fsshare**: `VolumeWatcher` in this process, the real `fsshare-agent` (a separate process)
///   over a unix socket writing the guest directory;
/// - **inotifywait**: `inotifywait -m -e moved_to … | while read …; do cp -fL …; done`;
/// - **floor**: raw C in this process (inotify, copy, `..data` swap; no agent hop).
///
/// The observer is the same for all: an inotify watch on the guest volume directory, and on every
/// event a full read of every key compared with the expected bytes. Host volumes are on the work
/// directory's filesystem (kubelet keeps configmaps on disk); guest directories are on tmpfs (a
/// guest's share dir is in memory).
enum WatchBench {
    static let shape = watch_shape(keys: 10, size: 1024)

    /// One contender's volumes: host and guest directory descriptors, current timestamped dirs.
    final class Side {
        let name: String
        let host: String
        let guest: String
        var hostFD: [Int32] = []
        var guestFD: [Int32] = []
        var ts: [String] = []
        var stats = Bench.Stats()
        var timeouts = 0
        var stop: () -> Void = {}
        init(name: String, host: String, guest: String) {
            self.name = name
            self.host = host
            self.guest = guest
        }
        func openGuest(_ count: Int) {
            guestFD = (0..<count).map { open(guest + "/vol\($0)", Sys.oPath | O_DIRECTORY | O_CLOEXEC) }
            if guestFD.contains(where: { $0 < 0 }) { Bench.fail("\(name): a guest volume directory is missing") }
        }
        func close() {
            stop()
            for fd in hostFD + guestFD { Glibc.close(fd) }
        }
    }

    // Only the benchmark's main thread touches it.
    nonisolated(unsafe) static var version: UInt32 = 0
    static func nextVersion() -> UInt32 {
        version += 1
        return version
    }
    static func tsName(_ v: UInt32) -> String {
        let digits = String(v)
        return "..2026_11_22_00_00_00." + String(repeating: "0", count: max(0, 11 - digits.count)) + digits
    }

    /// Makes `count` kubelet volumes under `side.host`.
    static func makeHost(_ side: Side, _ count: Int, shape: watch_shape = WatchBench.shape) {
        _ = Sys.run(["mkdir", "-p", side.host, side.guest])
        for i in 0..<count {
            let path = side.host + "/vol\(i)"
            mkdir(path, 0o755)
            let fd = open(path, Sys.oPath | O_DIRECTORY | O_CLOEXEC)
            let v = nextVersion()
            guard fd >= 0, watch_kubelet_create(fd, tsName(v), shape, v) == 0 else { Bench.fail("cannot create \(path)") }
            side.hostFD.append(fd)
            side.ts.append(tsName(v))
        }
    }

    static func currentVersion(_ ts: String) -> UInt32 { UInt32(ts.split(separator: ".").last.map(String.init) ?? "") ?? 0 }

    static func run(work: String, trials: Int, counts: [Int]) {
        // FSSHARE_BENCH_METRICS=prometheus: the watcher's metrics go to a real Prometheus
        // registry (as under `fsshare watch --metrics-textfile`) instead of swift-metrics' no-op
        // backend, to measure what the instrumentation costs.
        if let backend = getenv("FSSHARE_BENCH_METRICS").map({ String(cString: $0) }), backend == "prometheus" {
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()))
            print("metrics: recorded into a Prometheus registry")
        } else {
            print("metrics: swift-metrics' no-op backend")
        }
        let guestRoot = work + "/guest"
        _ = Sys.run(["mkdir", "-p", guestRoot])
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(guestRoot), fstype: "tmpfs", flags: 0)
        } catch { Bench.fail("cannot mount the guest tmpfs: \(error)") }
        let warmup = max(10, trials / 10)
        print("")
        print("watcher: kubelet rename(..data_tmp, ..data) -> all \(shape.keys) keys x \(shape.size) B readable in the guest dir")
        print("  \(trials) trials per cell after \(warmup) warm-up; one random volume per trial; contenders interleaved; times in µs")
        print("  N      fsshare med / p99       inotifywait+cp med / p99   floor med / p99      fsshare/floor med / p99   inotifywait/floor med")
        for n in counts {
            runCell(work: work + "/w\(n)", guestRoot: guestRoot + "/w\(n)", count: n, trials: trials, warmup: warmup)
        }
        print("  Kata (guest agent polls every 2 s, limits.md §2): ~1,000,000 median / ~2,000,000 p99")
    }

    static func runCell(work: String, guestRoot: String, count: Int, trials: Int, warmup: Int) {
        let mine = Side(name: "fsshare", host: work + "/fsshare", guest: guestRoot + "/fsshare")
        let shell = Side(name: "inotifywait", host: work + "/inotifywait", guest: guestRoot + "/inotifywait")
        let raw = Side(name: "floor", host: work + "/floor", guest: guestRoot + "/floor")
        // FSSHARE_BENCH_ONLY=fsshare|inotifywait|floor measures one contender (for profiling).
        let only = getenv("FSSHARE_BENCH_ONLY").map { String(cString: $0) }
        let all = [mine, shell, raw]
        let sides = all.filter { only == nil || $0.name == only }
        for s in all { makeHost(s, count) }

        // fsshare: the watcher here, the agent in its own process.
        let (agent, watcher) = startFsshare(mine, count: count, work: work)
        mine.stop = {
            watcher.stop()
            agent.stop()
        }
        // inotifywait | cp, started on guest copies made beforehand.
        for i in 0..<count {
            let dir = shell.guest + "/vol\(i)"
            mkdir(dir, 0o755)
            let fd = open(dir, Sys.oPath | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0, watch_write_flat(fd, shape, currentVersion(shell.ts[i])) == 0 else { Bench.fail("cannot seed \(dir)") }
            Glibc.close(fd)
        }
        let shellProcess = startInotifywait(shell, count: count, work: work)
        shell.stop = {
            kill(-shellProcess.pid, SIGTERM)
            _ = shellProcess.wait()
        }
        shell.openGuest(count)
        // The floor.
        guard let floor = watch_floor_start(raw.host, raw.guest, Int32(count), shape) else { Bench.fail("floor start: errno \(errno)") }
        raw.stop = { watch_floor_stop(floor) }
        raw.openGuest(count)

        let observer = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        var rng = SplitMix(seed: UInt64(count))
        for t in 0..<(warmup + trials) {
            for k in 0..<sides.count {
                let side = sides[(t + k) % sides.count]
                let i = Int(rng.next() % UInt64(count))
                trial(side, i, guestFD: side.guestFD[i], observer: observer, record: t >= warmup)
            }
        }
        Glibc.close(observer)
        usleep(50_000)
        // Every contender must end with every volume at its latest content.
        var wrong: [String] = []
        for s in sides {
            let bad = (0..<count).filter { watch_content_is(s.guestFD[$0], shape, currentVersion(s.ts[$0])) == 0 }.count
            if bad > 0 || s.timeouts > 0 { wrong.append("\(s.name): \(bad) volumes stale, \(s.timeouts) trials timed out") }
        }
        let syncs = watcher.statistics
        for s in all { s.close() }
        func cell(_ st: Bench.Stats) -> String { "\(Bench.f(st.median)) / \(Bench.f(st.p99))" }
        var line = "  " + Bench.pad(String(count), 7) + Bench.pad(cell(mine.stats), 24) + Bench.pad(cell(shell.stats), 27)
        line += Bench.pad(cell(raw.stats), 21)
        line += Bench.pad("\(Bench.format2(mine.stats.median / raw.stats.median))x / \(Bench.format2(mine.stats.p99 / raw.stats.p99))x", 26)
        line += "\(Bench.format2(shell.stats.median / raw.stats.median))x"
        print(line)
        if syncs.failedSyncs > 0 { wrong.append("fsshare: \(syncs.failedSyncs) failed syncs") }
        if !wrong.isEmpty { Bench.fail("N=\(count): " + wrong.joined(separator: "; ")) }
    }

    /// One kubelet update of volume `i` of `side`, timed from the `..data` rename until the
    /// observer (inotify on the guest directory) sees the complete new content.
    static func trial(_ side: Side, _ i: Int, guestFD: Int32, observer: Int32, record: Bool, shape: watch_shape = WatchBench.shape) {
        let v = nextVersion()
        let old = side.ts[i]
        guard watch_kubelet_prepare(side.hostFD[i], tsName(v), shape, v) == 0 else { Bench.fail("kubelet prepare") }
        let wd = inotify_add_watch(observer, side.guest + "/vol\(i)", UInt32(IN_MOVED_TO | IN_CLOSE_WRITE | IN_CREATE))
        let start = Bench.now()
        guard watch_kubelet_swap(side.hostFD[i]) == 0 else { Bench.fail("kubelet swap") }
        let r = watch_wait_content(observer, guestFD, shape, v, 20, 10_000)
        let elapsed = Bench.now() - start
        inotify_rm_watch(observer, wd)
        if r != 0 { side.timeouts += 1 } else if record { side.stats.add(elapsed) }
        guard watch_kubelet_finish(side.hostFD[i], old, shape) == 0 else { Bench.fail("kubelet finish") }
        side.ts[i] = tsName(v)
        // Let the contender finish its tail (fsshare prunes the old dir after the swap) before
        // the next one is measured.
        usleep(2000)
    }

    /// The target of a symbolic link (a /proc entry), or nil.
    static func readlinkString(_ path: String) -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buf, buf.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func agentBinary() -> String {
        guard let me = readlinkString("/proc/self/exe") else { Bench.fail("cannot find my own binary") }
        return String(me[..<(me.lastIndex(of: "/") ?? me.endIndex)]) + "/fsshare-agent"
    }

    static func startAgent(shareDir: String, socket: String, log: String) -> ChildProcess {
        guard let p = try? ChildProcess([agentBinary(), "--share-dir", shareDir, "--listen", "unix:" + socket, "--quiet"], logPath: log) else {
            Bench.fail("cannot start fsshare-agent")
        }
        for _ in 0..<500 {
            if let fd = try? Sys.connectUnix(FilePath(socket)) {
                Sys.close(fd)
                return p
            }
            usleep(10_000)
        }
        Bench.fail("fsshare-agent did not listen on \(socket)")
    }

    static func startFsshare(_ side: Side, count: Int, work: String) -> (ChildProcess, VolumeWatcher) {
        let agent = startAgent(shareDir: side.guest, socket: work + "/agent.sock", log: work + "/agent.log")
        // FSSHARE_BENCH_LOG=1 prints the watcher's log (one line per sync, with its duration).
        let verbose = getenv("FSSHARE_BENCH_LOG") != nil
        let watcher = VolumeWatcher(logger: .lines { line in if verbose { print("watcher: \(line)") } })
        let client = AgentClient(address: .unix(FilePath(work + "/agent.sock")), callTimeout: .seconds(10))
        do {
            try watcher.start()
            for i in 0..<count {
                try watcher.watch(sandboxID: "bench", name: "vol\(i)", volume: FilePath(side.host + "/vol\(i)"), guestPath: side.guest + "/vol\(i)", agent: client)
            }
        } catch { Bench.fail("fsshare watch: \(error.message)") }
        // The first (full) sync of every volume.
        while watcher.statistics.syncs < count { usleep(1000) }
        side.openGuest(count)
        return (agent, watcher)
    }

    static func startInotifywait(_ side: Side, count: Int, work: String) -> ChildProcess {
        let list = work + "/inotifywait.list"
        let err = work + "/inotifywait.err"
        let paths = (0..<count).map { side.host + "/vol\($0)" }.joined(separator: "\n") + "\n"
        guard let file = fopen(list, "w") else { Bench.fail("cannot write \(list)") }
        fputs(paths, file)
        fclose(file)
        // What an operator would write: react to the ..data swap, copy the keys through their links.
        let script = #"""
            inotifywait -m -e moved_to --format '%w %f' --fromfile "$1" 2>"$3" |
            while read -r d f; do [ "$f" = ..data ] || continue; v=${d%/}; cp -fL "$v"/key* "$2/${v##*/}/"; done
            """#
        guard let p = try? ChildProcess(["setsid", "bash", "-c", script, "bash", list, side.guest, err], logPath: work + "/inotifywait.log") else {
            Bench.fail("cannot start inotifywait")
        }
        for _ in 0..<3000 {
            if Sys.run(["grep", "-q", "Watches established", err]).status == 0 { return p }
            usleep(10_000)
        }
        Bench.fail("inotifywait did not establish its watches: \(Sys.run(["cat", err]).output)")
    }
}

/// A small seeded generator, so runs pick the same volumes.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension WatchBench {
    /// `key:` from a /proc status-like file, in kB.
    static func procKB(_ path: String, _ key: String) -> Int {
        guard let f = fopen(path, "r") else { return -1 }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if s.hasPrefix(key + ":") {
                return Int(s.dropFirst(key.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
            }
        }
        return -1
    }

    /// inotify instances this process holds, and the watches on them (from /proc/self/fdinfo).
    static func inotifyUsage() -> (instances: Int, watches: Int) {
        var instances = 0
        var watches = 0
        guard let dir = opendir("/proc/self/fd") else { return (-1, -1) }
        defer { closedir(dir) }
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard Int(name) != nil else { continue }
            guard readlinkString("/proc/self/fd/" + name) == "anon_inode:inotify" else { continue }
            instances += 1
            guard let f = fopen("/proc/self/fdinfo/" + name, "r") else { continue }
            var line = [CChar](repeating: 0, count: 512)
            while fgets(&line, Int32(line.count), f) != nil {
                if strncmp(line, "inotify wd:", 11) == 0 { watches += 1 }
            }
            fclose(f)
        }
        return (instances, watches)
    }

    /// Memory and inotify use with `volumes` watched volumes over 10 sandboxes (one agent
    /// connection each), then fsshare's update latency at that scale.
    static func scale(work: String, volumes: Int) {
        let sandboxes = 10
        // 5 keys: 11 entries per volume (5 files, ..data, 5 key links), 110,000 for 10,000 volumes.
        let shape = watch_shape(keys: 5, size: 1024)
        let side = Side(name: "fsshare", host: work + "/scale/host", guest: work + "/scale/guest")
        _ = Sys.run(["mkdir", "-p", side.guest, side.host])
        // Both on tmpfs here (kubelet keeps secrets on tmpfs): 110,000 files on ext4 take long to make.
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(side.guest), fstype: "tmpfs", flags: 0)
            try Sys.mount(source: "tmpfs", target: FilePath(side.host), fstype: "tmpfs", flags: 0)
        } catch { Bench.fail("cannot mount tmpfs: \(error)") }
        print("")
        print("watcher at scale: \(volumes) volumes (\(shape.keys) keys x \(shape.size) B each) in \(sandboxes) sandboxes, one agent")
        var start = Bench.now()
        makeHost(side, volumes, shape: shape)
        print("  created the host volumes in \(Bench.now() / 1_000_000 - start / 1_000_000) ms")
        let before = inotifyUsage()
        let rss0 = procKB("/proc/self/status", "VmRSS")
        let slab0 = procKB("/proc/meminfo", "Slab")
        let unreclaimable0 = procKB("/proc/meminfo", "SUnreclaim")
        // The watches are registered while the agent is not listening yet, so the first syncs
        // fail fast and write nothing: the slab delta below is the watches' own.
        let socket = work + "/scale/agent.sock"
        let watcher = VolumeWatcher()
        let clients = (0..<sandboxes).map { _ in AgentClient(address: .unix(FilePath(socket)), callTimeout: .seconds(30)) }
        start = Bench.now()
        do {
            try watcher.start()
            for i in 0..<volumes {
                try watcher.watch(
                    sandboxID: "sb\(i % sandboxes)", name: "vol\(i)", volume: FilePath(side.host + "/vol\(i)"),
                    guestPath: side.guest + "/vol\(i)", agent: clients[i % sandboxes])
            }
        } catch { Bench.fail("fsshare watch: \(error.message)") }
        let registerMicros = Double(Bench.now() - start) / 1000
        let during = inotifyUsage()
        let rss1 = procKB("/proc/self/status", "VmRSS")
        let slab1 = procKB("/proc/meminfo", "Slab")
        let unreclaimable1 = procKB("/proc/meminfo", "SUnreclaim")
        print("  registered \(volumes) watches in \(Bench.f(registerMicros / 1000)) ms (\(Bench.f(registerMicros / Double(volumes))) µs each)")
        print("  inotify instances held by the process: \(before.instances) before, \(during.instances) after (watches: \(during.watches)); Kata: one per sandbox = \(sandboxes), capped at max_user_instances = \(VolumeWatcherSysctl.value("max_user_instances")) sandboxes per node")
        print("  kernel slab: +\(slab1 - slab0) kB total, +\(unreclaimable1 - unreclaimable0) kB unreclaimable (\((unreclaimable1 - unreclaimable0) * 1024 / max(1, volumes)) B per watch)")
        print("  watcher process VmRSS: +\(rss1 - rss0) kB for \(volumes) registered volumes (\((rss1 - rss0) * 1024 / max(1, volumes)) B per volume)")

        let agent = startAgent(shareDir: side.guest, socket: socket, log: work + "/scale/agent.log")
        start = Bench.now()
        let deadline = start + 600 * 1_000_000_000
        // Done when the watcher has synced every volume (its own count: checking 10,000 guest
        // directories every few ms would take a core from the run being measured); then every
        // guest copy is checked once.
        while watcher.statistics.syncs < volumes && Bench.now() < deadline { usleep(5_000) }
        let elapsed = Double(Bench.now() - start) / 1_000_000
        let bad = (0..<volumes).filter { i in
            let fd = open(side.guest + "/vol\(i)", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            defer { if fd >= 0 { Glibc.close(fd) } }
            return fd < 0 || watch_content_is(fd, shape, currentVersion(side.ts[i])) == 0
        }
        guard bad.isEmpty else { Bench.fail("\(bad.count) of \(volumes) volumes not (or not completely) in the guest after \(Bench.f(elapsed)) ms") }
        let entries = volumes * (2 * Int(shape.keys) + 1)
        print("  first full sync of every volume after the agent came up: \(Bench.f(elapsed)) ms (\(entries) entries, counting files, links and ..data; the watcher's first retry comes 100 ms after the failed attempt)")
        let rss2 = procKB("/proc/self/status", "VmRSS")
        print("  watcher process VmRSS after the syncs: +\(rss2 - rss0) kB over the start (\((rss2 - rss0) * 1024 / max(1, volumes)) B per volume); agent VmRSS \(procKB("/proc/\(agent.pid)/status", "VmRSS")) kB")

        // Update latency at this scale (fsshare only). Guest directories are opened per trial:
        // a descriptor per volume on both sides would exceed RLIMIT_NOFILE.
        let observer = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        var rng = SplitMix(seed: UInt64(volumes))
        let trials = 300
        for t in 0..<(trials + 30) {
            let i = Int(rng.next() % UInt64(volumes))
            let guestFD = open(side.guest + "/vol\(i)", Sys.oPath | O_DIRECTORY | O_CLOEXEC)
            defer { Glibc.close(guestFD) }
            trial(side, i, guestFD: guestFD, observer: observer, record: t >= 30, shape: shape)
        }
        Glibc.close(observer)
        print("  update latency at \(volumes) volumes: \(Bench.f(side.stats.median)) / \(Bench.f(side.stats.p99)) µs median / p99 (\(trials) trials, \(side.timeouts) timed out)")
        watcher.stop()
        agent.stop()
        let after = inotifyUsage()
        print("  after stop(): \(after.instances) inotify instances, \(after.watches) watches")
        if side.timeouts > 0 || after.instances != before.instances { Bench.fail("scale run failed") }
        side.stop = {}
        side.close()
    }
}

enum VolumeWatcherSysctl {
    static func value(_ name: String) -> String {
        guard let f = fopen("/proc/sys/fs/inotify/" + name, "r") else { return "?" }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 64)
        guard fgets(&buf, 64, f) != nil else { return "?" }
        return String(decoding: buf.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
