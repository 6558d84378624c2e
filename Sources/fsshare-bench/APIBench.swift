#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareSystem
import SystemPackage
import Tracing

/// What the async API costs over the blocking calls: the per-sharer gate, the hop to the
/// library's thread and back, and the operation's trace span with the no-op tracer (none
/// bootstrapped, as in a runtime that does not trace). `fsshare-bench api WORKDIR [N]`.
enum APIBench {
    static func run(work: String, iterations: Int) async {
        let t = work + "/t"
        _ = Sys.run(["mkdir", "-p", t, work + "/src/vol"])
        do {
            try Sys.mount(source: "tmpfs", target: FilePath(t), fstype: "tmpfs", flags: 0)
        } catch { Bench.fail("cannot mount tmpfs: \(error)") }
        let config = SharerConfiguration(root: FilePath(t + "/root"))
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "api", configuration: config), (try? sharer.prepareSync()) != nil else {
            Bench.fail("prepare")
        }
        let c = Container(id: "c", rootfs: .hostMounted("/"))
        let mount = Mount(source: FilePath(work + "/src/vol"), destination: "/bench")
        var blocking = Bench.Stats(), async = Bench.Stats()
        for i in 0..<(iterations + iterations / 10) {
            let record = i >= iterations / 10
            func measureBlocking() {
                let a = Bench.now()
                guard (try? sharer.shareFileSync(container: c, mount: mount)) != nil,
                      (try? sharer.unshareFileSync(container: c, mount: mount)) != nil else { Bench.fail("blocking share/unshare") }
                if record { blocking.add(Bench.now() - a) }
            }
            func measureAsync() async {
                let a = Bench.now()
                do {
                    _ = try await sharer.shareFile(container: c, mount: mount)
                    try await sharer.unshareFile(container: c, mount: mount)
                } catch { Bench.fail("async share/unshare: \(error)") }
                if record { async.add(Bench.now() - a) }
            }
            if i % 2 == 0 {
                measureBlocking()
                await measureAsync()
            } else {
                await measureAsync()
                measureBlocking()
            }
        }
        _ = try? sharer.cleanupSync()
        // One no-op span as the API makes it: start, the recording check, end.
        let spans = 1_000_000
        let a = Bench.now()
        for _ in 0..<spans {
            let span = InstrumentationSystem.tracer.startAnySpan("ShareFile", context: .topLevel, ofKind: .internal)
            if span.isRecording { span.attributes["sandbox"] = "api" }
            span.end()
        }
        let perSpan = Double(Bench.now() - a) / Double(spans)
        print("fsshare-bench api: \(iterations) iterations, blocking and async interleaved; times in µs")
        print("op                          blocking med / p99     async med / p99       ratio med / p99")
        var line = Bench.pad("rw share+unshare", 28) + Bench.pad("\(Bench.f(blocking.median)) / \(Bench.f(blocking.p99))", 23)
        line += Bench.pad("\(Bench.f(async.median)) / \(Bench.f(async.p99))", 22)
        line += "\(Bench.format2(async.median / blocking.median))x / \(Bench.format2(async.p99 / blocking.p99))x"
        print(line)
        print("no-op tracer: \(Int(perSpan.rounded())) ns per span (start + end), \(Bench.format2(2 * perSpan / 10 / blocking.median))% of a blocking rw share+unshare (2 spans)")
    }
}
