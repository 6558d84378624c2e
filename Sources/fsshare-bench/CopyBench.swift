#if canImport(Glibc)
import Glibc
#endif
import CFSShareBenchFloor
import FSShareSystem
import SystemPackage

/// Copy mode's throughput: `fsshare share` of one large file into the real `fsshare-agent` over a
/// unix socket (two processes, as in a pod: the CLI and the agent), against a plain unix-socket
/// copy of the same file into a file (C, `copy_floor.c`: a sender process and a sink process).
/// Runs interleaved, order alternating; both include their process start. Both write into one
/// tmpfs (the guest's shared directory is tmpfs in a Kata guest) from the same cached source.
enum CopyBench {
    /// `fsshare-bench copy WORKDIR [RUNS]`; FSSHARE_BENCH_COPY_MIB sets the file size (100).
    static func run(work: String, runs: Int) {
        let mib = getenv("FSSHARE_BENCH_COPY_MIB").flatMap { Int(String(cString: $0)) } ?? 100
        let bin = binDirectory()
        let fsshare = bin + "/fsshare"
        guard access(fsshare, X_OK) == 0 else { Bench.fail("\(fsshare) is missing: build the fsshare product (release)") }
        let dst = work + "/dst"
        _ = Sys.run(["mkdir", "-p", dst, work + "/src"])
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(dst), fstype: "tmpfs", flags: 0)
        } catch { Bench.fail("cannot mount tmpfs: \(error)") }
        _ = Sys.run(["mkdir", "-p", dst + "/guest", dst + "/raw"])
        let source = work + "/src/big.bin"
        makeFile(source, mib: mib)

        let agent = WatchBench.startAgent(shareDir: dst + "/guest", socket: work + "/agent.sock", log: work + "/agent.log")
        defer { agent.stop() }
        guard let sink = try? ChildProcess([bin + "/fsshare-bench", "raw-sink", work + "/raw.sock", dst + "/raw"], logPath: work + "/sink.log") else {
            Bench.fail("cannot start the raw sink")
        }
        defer { sink.stop() }
        while access(work + "/raw.sock", F_OK) != 0 { usleep(1000) }
        let root = work + "/root"
        let prepared = Sys.run([fsshare, "prepare", "--root", root, "--sandbox", "s", "--shared-fs", "none"])
        guard prepared.status == 0 else { Bench.fail("fsshare prepare: \(prepared.output)") }

        func mine(_ i: Int) -> Spawned {
            let r = spawn([fsshare, "share", "--root", root, "--sandbox", "s", "--agent", "unix:" + work + "/agent.sock",
                           "--guest-shared-dir", dst + "/guest", "--container", "c\(i)", "--source", source, "--destination", "/big.bin"],
                          output: work + "/share.out")
            guard r.status == 0 else { Bench.fail("fsshare share exited \(r.status): \(Sys.run(["cat", work + "/share.out"]).output)") }
            let guestPath = Sys.run(["head", "-n1", work + "/share.out"]).output.split(separator: "\n").first.map(String.init) ?? ""
            if i == 0 {
                guard Sys.run(["cmp", source, guestPath]).status == 0 else { Bench.fail("the guest copy \(guestPath) differs from the source") }
            }
            let un = Sys.run([fsshare, "unshare", "--root", root, "--sandbox", "s", "--container", "c\(i)", "--destination", "/big.bin"])
            guard un.status == 0, access(guestPath, F_OK) != 0 else { Bench.fail("fsshare unshare: \(un.output)") }
            return r
        }
        func raw(_ i: Int) -> Spawned {
            let r = spawn([bin + "/fsshare-bench", "raw-send", work + "/raw.sock", source], output: work + "/send.out")
            guard r.status == 0 else { Bench.fail("raw-send exited \(r.status)") }
            if i == 0 {
                guard Sys.run(["sh", "-c", "cmp \(source) \(dst)/raw/raw.*"]).status == 0 else { Bench.fail("the raw copy differs from the source") }
            }
            _ = Sys.run(["sh", "-c", "rm -f \(dst)/raw/raw.*"])
            return r
        }

        print("fsshare-bench copy: a \(mib) MiB file, \(runs) runs, fsshare and the raw copy interleaved; ms end to end (process start included)")
        _ = mine(-1)
        _ = raw(-1)  // warm-up, not recorded
        var mineStats = Bench.Stats(), rawStats = Bench.Stats()
        var mineRSS = 0, rawRSS = 0
        for i in 0..<runs {
            let pair = i % 2 == 0 ? (mine(i), raw(i)) : { let r = raw(i); return (mine(i), r) }()
            mineStats.add(pair.0.nanoseconds)
            rawStats.add(pair.1.nanoseconds)
            mineRSS = max(mineRSS, pair.0.maxRSSKiB)
            rawRSS = max(rawRSS, pair.1.maxRSSKiB)
        }
        func rate(_ us: Double) -> String { Bench.f(Double(mib) / (us / 1_000_000)) }
        let line = { (name: String, s: Bench.Stats) in
            print(Bench.pad(name, 22) + Bench.pad("\(Bench.f(s.median / 1000)) / \(Bench.f(s.p99 / 1000)) ms", 24) + "\(rate(s.median)) MiB/s median")
        }
        print(Bench.pad("", 22) + "median / p99 (max)")
        line("fsshare share (copy)", mineStats)
        line("raw socket copy", rawStats)
        print("fsshare throughput / raw: \(Bench.format2(rawStats.median / mineStats.median))x median, \(Bench.format2(rawStats.p99 / mineStats.p99))x p99")
        print("peak RSS: fsshare share \(mineRSS / 1024) MiB (sender of the raw copy \(rawRSS / 1024) MiB); fsshare-agent VmHWM \(WatchBench.procKB("/proc/\(agent.pid)/status", "VmHWM") / 1024) MiB (raw sink \(WatchBench.procKB("/proc/\(sink.pid)/status", "VmHWM") / 1024) MiB)")
    }

    struct Spawned {
        var status: Int32
        var nanoseconds: UInt64
        var maxRSSKiB: Int
    }

    /// Runs `argv` with stdout and stderr to `output`; wall time and peak RSS from wait4.
    static func spawn(_ argv: [String], output: String) -> Spawned {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let cArgs = argv.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        var pid: pid_t = 0
        let start = Bench.now()
        guard posix_spawn(&pid, argv[0], &actions, nil, cArgs, environ) == 0 else { Bench.fail("cannot start \(argv[0])") }
        var status: Int32 = 0
        var usage = rusage()
        while wait4(pid, &status, 0, &usage) < 0 && errno == EINTR {}
        let elapsed = Bench.now() - start
        return Spawned(status: (status & 0x7f) == 0 ? (status >> 8) & 0xff : -(status & 0x7f), nanoseconds: elapsed, maxRSSKiB: usage.ru_maxrss)
    }

    /// `mib` MiB of incompressible bytes (xorshift), written once.
    static func makeFile(_ path: String, mib: Int) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { Bench.fail("cannot create \(path)") }
        defer { close(fd) }
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        var block = [UInt64](repeating: 0, count: (1 << 20) / 8)
        for _ in 0..<mib {
            for j in block.indices {
                state ^= state << 13
                state ^= state >> 7
                state ^= state << 17
                block[j] = state
            }
            let ok = block.withUnsafeBytes { b in write(fd, b.baseAddress, b.count) == b.count }
            guard ok else { Bench.fail("cannot write \(path)") }
        }
    }

    static func binDirectory() -> String {
        let agent = WatchBench.agentBinary()
        return String(agent[..<(agent.lastIndex(of: "/") ?? agent.endIndex)])
    }

    /// `fsshare-bench raw-sink SOCKET DIR` and `raw-send SOCKET FILE`: the two ends of the raw copy.
    static func rawSink(socket: String, dir: String) -> Never {
        let rc = copy_floor_sink(socket, dir)
        Bench.fail("raw-sink: \(String(cString: strerror(-rc)))")
    }

    static func rawSend(socket: String, file: String) -> Never {
        let rc = copy_floor_send(socket, file)
        if rc != 0 { Bench.fail("raw-send: \(String(cString: strerror(-rc)))") }
        exit(0)
    }
}
