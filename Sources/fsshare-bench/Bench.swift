#if canImport(Glibc)
import Glibc
#endif
import CFSShareBenchFloor
@_spi(Blocking) import FSShare
import FSShareSystem
import SystemPackage

/// fsshare against the C floor (the same syscall sequences, raw), interleaved iteration by
/// iteration in one process so both see the same machine noise. Run by hack/bench inside a
/// private mount namespace: `fsshare-bench mounts WORKDIR [ITERATIONS]`; the watcher's
/// benchmarks are in WatchBench.swift.
@main
struct Bench {
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func fail(_ what: String) -> Never {
        print("fsshare-bench: \(what)")
        exit(1)
    }

    struct Stats {
        var samples: [Double] = []
        mutating func add(_ ns: UInt64) { samples.append(Double(ns) / 1000) }
        var median: Double { percentile(0.5) }
        var p99: Double { percentile(0.99) }
        func percentile(_ p: Double) -> Double {
            let s = samples.sorted()
            guard !s.isEmpty else { return .nan }
            return s[min(s.count - 1, Int((Double(s.count - 1) * p).rounded()))]
        }
    }

    /// An operation timed whole and by its two halves (share / unshare, prepare / cleanup):
    /// where its time goes (on a VM, `umount2` alone can be most of it).
    struct Timings {
        var total = Stats(), first = Stats(), second = Stats()
        mutating func add(_ t: (start: UInt64, middle: UInt64, end: UInt64)) {
            total.add(t.end - t.start)
            first.add(t.middle - t.start)
            second.add(t.end - t.middle)
        }
        var halves: String { "\(f(first.median)) / \(f(second.median))" }
    }

    /// Runs `first` then `second` as one marked operation; returns when each began and ended.
    static func timed(_ label: @autoclosure () -> String, _ first: () -> Void, _ second: () -> Void) -> (start: UInt64, middle: UInt64, end: UInt64) {
        let start = now()
        var middle: UInt64 = 0
        marked(label()) {
            first()
            middle = now()
            second()
        }
        return (start, middle, now())
    }

    /// `  halves med (share / unshare): fsshare a / b   floor c / d   kata-min e / f`.
    static func reportHalves(_ names: String, _ mine: Timings, _ raw: Timings?, _ kata: Timings?) {
        var line = "  halves med (\(names)): fsshare \(mine.halves)"
        if let raw { line += "   floor \(raw.halves)" }
        if let kata { line += "   kata-min \(kata.halves)" }
        print(line)
    }

    static func main() async {
        let usage = "usage: fsshare-bench mounts|api|watch|scale|copy WORKDIR [N]"
        let args = CommandLine.arguments
        guard args.count >= 3 else { fail(usage) }
        // The raw copy's two ends, started by `copy` as processes of their own.
        if args[1] == "raw-sink", args.count == 4 { CopyBench.rawSink(socket: args[2], dir: args[3]) }
        if args[1] == "raw-send", args.count == 4 { CopyBench.rawSend(socket: args[2], file: args[3]) }
        let work = args[2]
        let n = args.count > 3 ? Int(args[3]) : nil
        switch args[1] {
        case "mounts": mounts(work: work, iterations: n ?? 2000)
        case "api": await APIBench.run(work: work, iterations: n ?? 2000)
        case "watch":
            // FSSHARE_BENCH_VOLUMES=1,100 picks the cells (for profiling).
            let counts = getenv("FSSHARE_BENCH_VOLUMES").map { String(cString: $0).split(separator: ",").compactMap { Int($0) } }
            WatchBench.run(work: work, trials: n ?? 1000, counts: counts ?? [1, 100, 1000])
        case "scale": WatchBench.scale(work: work, volumes: n ?? 10_000)
        case "copy": CopyBench.run(work: work, runs: n ?? 7)
        default: fail(usage)
        }
    }

    static func mounts(work: String, iterations: Int) {
        let t = work + "/t"
        _ = Sys.run(["mkdir", "-p", t, work + "/src"])
        // Targets on tmpfs, as under /run on a real host; sources on their own tmpfs.
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(t), fstype: "tmpfs", flags: 0)
            try Sys.mount(source: "tmpfs", target: FilePath(work + "/src"), fstype: "tmpfs", flags: 0)
        } catch { fail("cannot mount tmpfs: \(error)") }
        let source = work + "/src/vol"
        mkdir(source, 0o755)
        // Kata's sequences in C run in a tree of their own, made MS_SHARED as /run is on a
        // systemd host: its mounts/ propagates to shared/ (slave) as fsshare's does.
        mkdir(t + "/kata", 0o755)
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(t + "/kata"), fstype: "tmpfs", flags: 0)
            try Sys.mount(source: "none", target: FilePath(t + "/kata"), fstype: "", flags: UInt(MS_SHARED))
        } catch { fail("cannot mount the Kata tmpfs: \(error)") }

        print("fsshare-bench: \(iterations) iterations per cell; fsshare and floor interleaved; times in µs")
        print(idleRegime())
        print("op                          N   fsshare med / p99      floor med / p99     ratio med / p99    kata-min floor med / p99  fsshare/kata-min med")
        // FSSHARE_BENCH_EXISTING=0|1000 runs one of the two cells (for profiling).
        let cells = getenv("FSSHARE_BENCH_EXISTING").flatMap { Int(String(cString: $0)) }.map { [$0] } ?? [0, 1000]
        for existing in cells {
            run(existing: existing, iterations: iterations, t: t, source: source)
        }
    }

    /// How this machine's idle CPUs wake, which sets what every `umount2` costs: an unmount
    /// waits for an expedited RCU grace period, whose kernel thread is woken on the other CPU
    /// and wakes the caller back. In a VM whose idle vCPUs halt at once (cpuidle-haltpoll with
    /// `guest_halt_poll_ns` 0) each wake is a VM exit: measured here, a lone bind + umount2
    /// costs ~3× what it does with halt polling (README, "Where the time goes").
    static func idleRegime() -> String {
        let driver = Sys.readSysfsAttribute("/sys/devices/system/cpu/cpuidle/current_driver") ?? "none"
        let poll = Sys.readSysfsAttribute("/sys/module/haltpoll/parameters/guest_halt_poll_ns").map { ", guest_halt_poll_ns \($0)" } ?? ""
        return "idle: cpuidle driver \(driver)\(poll); online CPUs \(sysconf(Int32(_SC_NPROCESSORS_ONLN)))"
    }

    /// `FSSHARE_BENCH_MARKERS=1` (set by `hack/bench syscalls`, which runs this under strace):
    /// every measured operation is bracketed by a failing `write(-1, "fsshare-bench:begin
    /// LABEL")` and `write(-1, "fsshare-bench:end")`, so the trace can be cut per operation.
    static let markers = getenv("FSSHARE_BENCH_MARKERS") != nil

    static func marked(_ label: @autoclosure () -> String, _ body: () -> Void) {
        guard markers else { return body() }
        let begin = "fsshare-bench:begin " + label()
        _ = begin.withCString { write(-1, $0, strlen($0)) }
        body()
        _ = "fsshare-bench:end".withCString { write(-1, $0, strlen($0)) }
    }

    /// User and system CPU seconds of the process so far (getrusage).
    static func cpuTimes() -> (user: Double, system: Double) {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return (s(u.ru_utime), s(u.ru_stime))
    }

    /// In SOLO runs: the CPU time per operation of the loop just run (setup excluded), the
    /// part of the process's time that is user space (Swift) and the part in the kernel.
    static func cpuLine(since start: (user: Double, system: Double), operations: Int) -> String {
        let end = cpuTimes()
        return "  cpu per op: user \(f((end.user - start.user) * 1e6 / Double(operations))) µs, system \(f((end.system - start.system) * 1e6 / Double(operations))) µs"
    }

    static func run(existing: Int, iterations: Int, t: String, source: String) {
        let solo: String? = getenv("FSSHARE_BENCH_SOLO").map { String(cString: $0) }
        let root = t + "/root-\(existing)"
        mkdir(root, 0o755)
        // FSSHARE_BENCH_METHOD=legacy|new-api compares the attach methods (default: automatic).
        let method = getenv("FSSHARE_BENCH_METHOD").flatMap { MountMethod(rawValue: String(cString: $0)) } ?? .automatic
        let config = SharerConfiguration(root: FilePath(root), mountMethod: method)
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "fs", configuration: config),
              (try? sharer.prepareSync()) != nil else { fail("prepare fs") }
        let rootFD = open(root, Sys.oPath | O_DIRECTORY | O_CLOEXEC)
        var floor = floor_sandbox()
        // SOLO=mine builds no floor sandbox (so the run works under tools that lack the new mount
        // API's syscalls, valgrind among them, with FSSHARE_BENCH_METHOD=legacy).
        let withFloor = solo != "mine"
        guard !withFloor || floor_prepare(rootFD, "fl", &floor) == 0 else { fail("floor prepare") }
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        let kataSandbox = t + "/kata/sb-\(existing)"
        guard floor_kata_prepare(kataSandbox) == 0 else { fail("kata-min prepare") }
        // N existing shares in every sandbox.
        for i in 0..<existing {
            guard (try? sharer.shareFileSync(container: c, mount: Mount(source: FilePath(source), destination: FilePath("/v\(i)")))) != nil,
                  !withFloor || floor_share(&floor, source, "c-0000000000000000-v\(i)", 0) == 0,
                  floor_kata_rw_share(source, kataSandbox + "/mounts/v\(i)") == 0 else { fail("existing share \(i)") }
        }
        let floorName = "c-0123456789abcdef-bench"
        // FSSHARE_BENCH_ONLY=rw|ro|pc runs one operation (for profiling one op at a time).
        let only: String? = getenv("FSSHARE_BENCH_ONLY").map { String(cString: $0) }
        for readOnly in [false, true] where only == nil || only == (readOnly ? "ro" : "rw") {
            var mine = Timings(), raw = Timings(), kata = Timings()
            let mount = Mount(source: FilePath(source), destination: "/bench", options: readOnly ? ["ro"] : [])
            let cpuStart = cpuTimes()
            for i in 0..<(iterations + iterations / 10) {
                let record = i >= iterations / 10  // the first 10% warm up
                let op = readOnly ? "ro share+unshare" : "rw share+unshare"
                func measureMine() {
                    let t = timed("\(op) \(existing) fsshare", {
                        do { _ = try sharer.shareFileSync(container: c, mount: mount) } catch { fail("fsshare share: \(error)") }
                    }, {
                        do { try sharer.unshareFileSync(container: c, mount: mount) } catch { fail("fsshare unshare: \(error)") }
                    })
                    if record { mine.add(t) }
                }
                func measureFloor() {
                    let t = timed("\(op) \(existing) floor", {
                        guard floor_share(&floor, source, floorName, readOnly ? 1 : 0) == 0 else { fail("floor share") }
                    }, {
                        guard floor_unshare(&floor, floorName) == 0 else { fail("floor unshare") }
                    })
                    if record { raw.add(t) }
                }
                if solo == "mine" { measureMine() } else if solo == "floor" { measureFloor() } else if i % 2 == 0 { measureMine(); measureFloor() } else { measureFloor(); measureMine() }
                if solo == nil {
                    let target = kataSandbox + "/mounts/x"
                    let t = timed("\(op) \(existing) kata-min", {
                        let shared = readOnly ? floor_kata_ro_share(source, kataSandbox + "/private/x", target) : floor_kata_rw_share(source, target)
                        guard shared == 0 else { fail("kata floor share") }
                    }, {
                        guard floor_kata_unshare(target) == 0 else { fail("kata floor unshare") }
                    })
                    if record { kata.add(t) }
                }
            }
            report(readOnly ? "ro share+unshare" : "rw share+unshare", existing, mine.total, raw.total, solo == nil ? kata.total : nil)
            reportHalves("share / unshare", mine, solo == nil ? raw : nil, solo == nil ? kata : nil)
            if solo != nil { print(cpuLine(since: cpuStart, operations: iterations + iterations / 10)) }
        }
        // prepare + cleanup of another sandbox while the N shares exist.
        var mine = Timings(), raw = Timings(), kata = Timings()
        let pcIterations = only == nil || only == "pc" ? iterations : 0
        guard let pc = try? LinuxFilesystemSharer(sandboxID: "pc", configuration: config) else { fail("pc") }
        let cpuStart = cpuTimes()
        for i in 0..<(pcIterations / 2 + pcIterations / 20) {
            let record = i >= pcIterations / 20
            func measureMine() {
                let t = timed("prepare+cleanup \(existing) fsshare", {
                    guard (try? pc.prepareSync()) != nil else { fail("fsshare prepare") }
                }, {
                    guard (try? pc.cleanupSync()) != nil else { fail("fsshare cleanup") }
                })
                if record { mine.add(t) }
            }
            func measureFloor() {
                var sb = floor_sandbox()
                let t = timed("prepare+cleanup \(existing) floor", {
                    guard floor_prepare(rootFD, "pf", &sb) == 0 else { fail("floor prepare") }
                }, {
                    guard floor_cleanup(&sb, "pf") == 0 else { fail("floor cleanup") }
                })
                if record { raw.add(t) }
            }
            if solo == "mine" { measureMine(); continue } else if solo == "floor" { measureFloor(); continue }
            if i % 2 == 0 { measureMine(); measureFloor() } else { measureFloor(); measureMine() }
            let times = timed("prepare+cleanup \(existing) kata-min", {
                guard floor_kata_prepare(t + "/kata/pc") == 0 else { fail("kata-min prepare") }
            }, {
                guard floor_kata_cleanup(t + "/kata/pc") == 0 else { fail("kata-min cleanup") }
            })
            if record { kata.add(times) }
        }
        if pcIterations > 0 {
            report("prepare+cleanup", existing, mine.total, raw.total, solo == nil ? kata.total : nil)
            reportHalves("prepare / cleanup", mine, solo == nil ? raw : nil, solo == nil ? kata : nil)
            if solo != nil { print(cpuLine(since: cpuStart, operations: pcIterations / 2 + pcIterations / 20)) }
        }
        for i in 0..<existing {
            _ = floor_unshare(&floor, "c-0000000000000000-v\(i)")
            _ = floor_kata_unshare(kataSandbox + "/mounts/v\(i)")
        }
        _ = rmdir(kataSandbox + "/private/x")
        _ = floor_kata_cleanup(kataSandbox)
        if withFloor { _ = floor_cleanup(&floor, "fl") }
        guard (try? sharer.cleanupSync()) != nil else { fail("cleanup fs") }
        close(rootFD)
    }

    static func f(_ v: Double) -> String {
        guard v.isFinite else { return "-" }
        let s = String(Int((v * 10).rounded()))
        let padded = s.count < 2 ? "0" + s : s
        return String(padded.dropLast()) + "." + String(padded.last ?? "0")
    }

    static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

    static func report(_ op: String, _ n: Int, _ mine: Stats, _ raw: Stats, _ kata: Stats?) {
        let ratioMed = mine.median / raw.median
        let ratioP99 = mine.p99 / raw.p99
        var line = pad(op, 24) + pad(String(n), 6)
        line += pad("\(f(mine.median)) / \(f(mine.p99))", 22) + pad("\(f(raw.median)) / \(f(raw.p99))", 20)
        line += pad("\(format2(ratioMed))x / \(format2(ratioP99))x", 19)
        if let kata { line += pad("\(f(kata.median)) / \(f(kata.p99))", 26) + "\(format2(mine.median / kata.median))x" }
        print(line)
    }

    static func format2(_ v: Double) -> String {
        guard v.isFinite else { return "-" }
        let hundredths = Int((v * 100).rounded())
        let frac = hundredths % 100
        return "\(hundredths / 100).\(frac < 10 ? "0" : "")\(frac)"
    }
}
