import FSShareSystem
import SystemPackage
import Testing

/// The real-mount scenarios (Sources/fsshare-scenarios), each in its own private mount
/// namespace: `unshare -m --propagation private -- fsshare-scenarios NAME DIR`. Each scenario
/// checks many things and prints them; the test fails if any check did.
@Suite("Real mounts in a private namespace", .serialized)
struct MountScenarioTests {
    @Test(
        "scenario",
        .enabled(if: TestEnvironment.canMount, "needs root with CAP_SYS_ADMIN to make mount namespaces"),
        arguments: [
            "lifecycle", "guest-view-new-api", "guest-view-two-call-clone", "guest-view-legacy", "guest-view-runtime-rs", "refusals", "rollback", "crash",
            "no-delete-through-mounts", "status-leaks", "adversary", "foreign", "mount-probe", "watchable", "image-rootfs", "layered-rootfs", "image-on-host",
        ])
    func scenario(_ name: String) {
        let dir = TestEnvironment.scratch(name)
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let result = Sys.run(["unshare", "-m", "--propagation", "private", "--", TestEnvironment.product("fsshare-scenarios"), name, dir])
        let failures = result.output.split(separator: "\n").filter { $0.hasPrefix("FAIL") }
        #expect(result.status == 0, "scenario \(name) exited \(result.status):\n\(failures.joined(separator: "\n"))\n--- last output ---\n\(result.output.suffix(3000))")
        #expect(result.output.contains(" 0 failed"), "scenario \(name) did not report its checks")
    }
}
