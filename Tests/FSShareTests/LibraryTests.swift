#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareSystem
import Logging
import FSShareServiceLifecycle
import FSShareTestSupport
import InMemoryTracing
import ServiceLifecycle
import SystemPackage
import Testing
import Tracing

/// The library as a runtime links it: the async API on the library's own threads, cancellation,
/// and the example runtime (Sources/fsshare-example-runtime) with its heartbeat.
@Suite("The library as runtimes link it", .serialized)
struct LibraryTests {
    @Test(
        "the example runtime: 20 sandboxes shared into concurrently, a large copy, a heartbeat that never stalls",
        .enabled(if: TestEnvironment.canMount, "needs root with CAP_SYS_ADMIN to make mount namespaces"))
    func exampleRuntime() throws {
        let base = TestEnvironment.scratch("example-runtime")
        defer { _ = Sys.run(["rm", "-rf", base]) }
        let agent = try AgentUnderTest(base + "/agent")
        let example = TestEnvironment.product("fsshare-example-runtime")
        let result = Sys.run([
            "unshare", "-m", "--propagation", "private", "--", example, base + "/async",
            "--agent", "unix:" + agent.socket, "--agent-share-dir", agent.shareDir + "/async",
            // 500 ms: the guest suites run beside this one on 2 cores (CI saw 75 ms at worst);
            // a starved pool shows seconds (2.4–4.1 s measured with blocking calls).
            "--max-delay-ms", "500",
        ])
        for line in result.output.split(separator: "\n") where line.hasPrefix("figure:") { print(line) }
        let failures = result.output.split(separator: "\n").filter { $0.hasPrefix("FAIL") }
        #expect(result.status == 0, "the example runtime exited \(result.status):\n\(failures.joined(separator: "\n"))\n--- last output ---\n\(result.output.suffix(3000))")
        #expect(result.output.contains(" 0 failed"), "the example runtime did not report its checks")
        // The same work through blocking calls inside the tasks, for comparison (not asserted:
        // how long the pool stalls then depends on the machine).
        let blocking = Sys.run([
            "unshare", "-m", "--propagation", "private", "--", example, base + "/blocking", "--blocking", "--max-delay-ms", "1000000",
            "--agent", "unix:" + agent.socket, "--agent-share-dir", agent.shareDir + "/blocking",
        ])
        for line in blocking.output.split(separator: "\n") where line.hasPrefix("figure:") { print(line) }
    }

    @Test("a cancelled copy-mode share stops between chunks and leaves nothing behind")
    func cancelledCopyRollsBack() async throws {
        let base = TestEnvironment.scratch("cancelled-copy")
        defer { _ = Sys.run(["rm", "-rf", base]) }
        let agent = try AgentUnderTest(base + "/agent")
        let source = base + "/src"
        _ = Sys.run(["mkdir", "-p", source])
        // Sparse: 8 GiB to stream, nothing to store on the host (copy mode streams several
        // GiB/s from a sparse file: the copy must still be under way when it is cancelled).
        _ = Sys.run(["truncate", "-s", "8G", source + "/blob"])
        let sharer = try LinuxFilesystemSharer(
            sandboxID: "cancel",
            configuration: SharerConfiguration(root: FilePath(base + "/root"), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/"),
            agent: agent.client(timeout: .seconds(60)))
        try await sharer.prepare()
        let c = Container(id: "c", rootfs: .guestPull(image: "registry.example/app:1"))
        let m = Mount(source: FilePath(source), destination: "/big")
        let task = Task { try await sharer.shareFile(container: c, mount: m) }
        // Cancel once the copy is under way (the guest file has grown).
        let started = await eventually(30) {
            ((try? Sys.listDirectory(nil, FilePath(agent.shareDir))) ?? []).contains { !$0.name.hasPrefix(".") }
        }
        #expect(started, "the copy never started")
        task.cancel()
        let outcome = await task.result
        switch outcome {
        case .success(let shared):
            Issue.record("the share finished (\(shared?.copyReport?.bytes ?? 0) bytes) although cancelled")
        case .failure(let error):
            #expect((error as? FSShareError)?.code == .cancelled, "\(error)")
        }
        #expect(try await sharer.shares().isEmpty, "the cancelled share is still recorded")
        let guest = ((try? Sys.listDirectory(nil, FilePath(agent.shareDir))) ?? []).map(\.name)
        #expect(guest.isEmpty, "the partial guest copy is left: \(guest)")
        // A share that was never started is refused without touching anything.
        let early = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await sharer.shareFile(container: c, mount: m)
        }
        let refused = await early.result
        if case .failure(let error) = refused {
            #expect((error as? FSShareError)?.code == .cancelled)
        } else {
            Issue.record("a share in a cancelled task ran")
        }
        #expect(try await sharer.shares().isEmpty)
        try await sharer.cleanup()
    }

    /// inotify instances this process holds.
    static func inotifyInstances() -> Int {
        ((try? Sys.listDirectory(nil, "/proc/self/fd")) ?? []).filter {
            (try? Sys.readlinkat(nil, FilePath("/proc/self/fd/" + $0.name))) == "anon_inode:inotify"
        }.count
    }

    @Test("the watcher's stop and deinit are safe in any order; dropping a started watcher stops it")
    func watcherLifecycle() throws {
        let before = Self.inotifyInstances()
        do {
            let started = VolumeWatcher()
            try started.start()
            try started.start()
            #expect(Self.inotifyInstances() == before + 1)
            _ = started
        }
        // Its threads held only its machinery: the last reference going stopped it.
        #expect(Self.inotifyInstances() == before, "a dropped started watcher kept its inotify instance")
        do {
            let w = VolumeWatcher()
            try w.start()
            w.stop()
            w.stop()
            #expect(Self.inotifyInstances() == before)
            try w.start()
            #expect(w.statistics.inotifyInstances == 1, "restarted after stop")
        }
        #expect(Self.inotifyInstances() == before)
        _ = VolumeWatcher()
        #expect(Self.inotifyInstances() == before)
    }

    @Test("startFileEventWatcher follows the sandbox (shares made later by anyone); stopFileEventWatcher ends it")
    func sharerFileEventWatcher() async throws {
        let base = TestEnvironment.scratch("file-event-watcher")
        defer { _ = Sys.run(["rm", "-rf", base]) }
        let agent = try AgentUnderTest(base + "/agent")
        let config = SharerConfiguration(root: FilePath(base + "/root"), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/")
        let watcher = VolumeWatcher()
        let runtime = try LinuxFilesystemSharer(sandboxID: "pod", configuration: config, agent: agent.client(), watcher: watcher)
        try await runtime.prepare()
        // Another process's share (the CLI): made without the watcher, so only following finds it.
        let kubelet = KubeletEmulator(root: base + "/kubelet", plugin: "configmap", name: "cfg")
        kubelet.write(["key": "v0"])
        let other = try LinuxFilesystemSharer(sandboxID: "pod", configuration: config, agent: agent.client())
        let c = Container(id: "c", rootfs: .guestPull(image: "registry.example/app:1"))
        let shared = try #require(try await other.shareFile(container: c, mount: Mount(source: FilePath(kubelet.volume), destination: "/etc/cfg")))
        let guestKey = shared.guestPath + "/key"
        #expect(readFile(guestKey) == "v0")

        try await runtime.startFileEventWatcher()
        try await runtime.startFileEventWatcher()
        #expect(await eventually(10) { watcher.watchedVolumes(in: "pod").count == 1 }, "the share made elsewhere is watched")
        kubelet.write(["key": "v1"])
        #expect(await eventually(20) { readFile(guestKey) == "v1" }, "the update reached the guest")

        await runtime.stopFileEventWatcher()
        #expect(watcher.watchedVolumes(in: "pod").isEmpty)
        kubelet.write(["key": "v2"])
        try await Task.sleep(for: .milliseconds(500))
        #expect(readFile(guestKey) == "v1", "an update after stopFileEventWatcher still reached the guest")
        await runtime.stopFileEventWatcher()

        // A sharer made without a watcher says why it cannot.
        await #expect(throws: FSShareError.self) { try await other.startFileEventWatcher() }
        try await runtime.cleanup()
    }

    @Test("VolumeWatcherService runs in a ServiceGroup: follows on run, stops on graceful shutdown")
    func watcherService() async throws {
        let base = TestEnvironment.scratch("watcher-service")
        defer { _ = Sys.run(["rm", "-rf", base]) }
        _ = Sys.run(["mkdir", "-p", base + "/root"])
        let watcher = VolumeWatcher()
        let service = VolumeWatcherService(watcher: watcher, following: .root(FilePath(base + "/root")))
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [.init(service: service)], logger: Logger(label: "test")))
        let running = Task { try await group.run() }
        #expect(await eventually(10) { watcher.statistics.inotifyInstances == 1 }, "the service did not start the watcher")
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(watcher.statistics.inotifyInstances == 0, "graceful shutdown left the watcher running")
    }

    /// The process's tracer for the tests: bootstrapped once (a process-wide setting), in memory.
    static let tracer: InMemoryTracer = {
        let t = InMemoryTracer()
        InstrumentationSystem.bootstrap(t)
        return t
    }()

    @Test("every operation and every sync is a span tagged like Kata's, a child of the caller's span; failures are marked")
    func spans() async throws {
        let tracer = Self.tracer
        let base = TestEnvironment.scratch("spans")
        defer { _ = Sys.run(["rm", "-rf", base]) }
        let agent = try AgentUnderTest(base + "/agent")
        let watcher = VolumeWatcher()
        let sharer = try LinuxFilesystemSharer(
            sandboxID: "traced",
            configuration: SharerConfiguration(root: FilePath(base + "/root"), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/"),
            agent: agent.client(), watcher: watcher)
        let kubelet = KubeletEmulator(root: base + "/kubelet", plugin: "configmap", name: "cfg")
        kubelet.write(["key": "v0"])
        let c = Container(id: "c", rootfs: .guestPull(image: "registry.example/app:1"))
        let volume = Mount(source: FilePath(kubelet.volume), destination: "/etc/cfg")
        let missing = Mount(source: FilePath(base + "/no-such-dir"), destination: "/data")
        let traceID = try await withSpan("runtime.CreateContainer") { span async throws -> String in
            try await sharer.prepare()
            _ = try await sharer.shareRootFilesystem(container: c)
            let shared = try #require(try await sharer.shareFile(container: c, mount: volume))
            await #expect(throws: FSShareError.self) { _ = try await sharer.shareFile(container: c, mount: missing) }
            try await sharer.startFileEventWatcher()
            kubelet.write(["key": "v1"])
            #expect(await eventually(20) { readFile(shared.guestPath + "/key") == "v1" })
            try await sharer.unshareFile(container: c, mount: volume)
            try await sharer.cleanup()
            return span.context.inMemorySpanContext?.traceID ?? ""
        }
        let finished = tracer.finishedSpans
        let mine = finished.filter { $0.traceID == traceID }
        let parent = try #require(mine.first { $0.operationName == "runtime.CreateContainer" })
        let ops = mine.filter { $0.parentSpanID == parent.spanID }
        #expect(ops.map(\.operationName) == ["Prepare", "ShareRootFilesystem", "ShareFile", "ShareFile", "StartFileEventWatcher", "UnshareFile", "Cleanup"])
        for span in ops {
            #expect(span.attributes["source"]?.toSpanAttribute() == "runtime".toSpanAttribute(), "\(span.operationName): source")
            #expect(span.attributes["subsystem"]?.toSpanAttribute() == "fs_share".toSpanAttribute(), "\(span.operationName): subsystem")
            #expect(span.attributes["package"]?.toSpanAttribute() == "fsshare".toSpanAttribute(), "\(span.operationName): package")
            #expect(span.attributes["sandbox"]?.toSpanAttribute() == "traced".toSpanAttribute(), "\(span.operationName): sandbox")
        }
        let failed = ops.filter { $0.status?.code == .error }
        #expect(failed.count == 1 && failed.first?.attributes["mount.destination"]?.toSpanAttribute() == "/data".toSpanAttribute(),
                "exactly the share of the missing source is marked failed: \(failed.map(\.operationName))")
        // The watcher's syncs are spans too: roots of their own (an event started them).
        let syncs = finished.filter { $0.operationName == "SyncVolume" && $0.attributes["sandbox"]?.toSpanAttribute() == "traced".toSpanAttribute() }
        #expect(!syncs.isEmpty, "no SyncVolume span")
        #expect(syncs.allSatisfy { $0.parentSpanID == nil && $0.attributes["subsystem"]?.toSpanAttribute() == "fs_share".toSpanAttribute() })
    }
}
