#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareAgentChannel
import FSShareSystem
import FSShareTestSupport
import SystemPackage
import Testing

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
        // Sparse: 2 GiB to stream, nothing to store on the host.
        _ = Sys.run(["truncate", "-s", "2G", source + "/blob"])
        let sharer = try LinuxFilesystemSharer(
            sandboxID: "cancel",
            configuration: SharerConfiguration(root: FilePath(base + "/root"), sharedFilesystem: .none, guestSharedDir: agent.shareDir + "/"),
            agent: agent.client(timeout: .seconds(60)))
        try await sharer.prepare()
        let c = Container(id: "c", rootfs: .guestPull(image: "registry.example/app:1"))
        let m = Mount(source: FilePath(source), destination: "/big")
        let task = Task { try await sharer.shareFile(container: c, mount: m) }
        // Cancel once the copy is under way (the guest file has grown).
        let started = NodeWatchTests.waitUntil(30) {
            ((try? Sys.listDirectory(nil, FilePath(agent.shareDir))) ?? []).contains { !$0.name.hasPrefix(".") }
        }
        #expect(started, "the copy never started")
        usleep(100_000)
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
}
