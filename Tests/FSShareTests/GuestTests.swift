#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import FSShareVM
import SystemPackage
import Testing

/// A real guest: `fsshare-guest check TRANSPORT DIR` boots QEMU (TCG unless KVM really works) on
/// a prepared sandbox and checks every sharing claim from inside the guest, in a private mount
/// namespace. The image comes from `hack/guest/build` (hack/test runs it first). `libvirt` boots
/// the same guest through libvirt's C API (`qemu:///embed`) and attaches the share live.
@Suite("A real guest (QEMU)", .serialized)
struct GuestTests {
    /// The guest image directory, or nil with the reason printed.
    static let image: String? = {
        if let reason = TestEnvironment.mountSkipReason {
            print("SKIP: guest tests: \(reason)")
            return nil
        }
        guard Sys.run(["sh", "-c", "command -v qemu-system-x86_64"]).status == 0 else {
            print("SKIP: guest tests: qemu-system-x86_64 is not installed (hack/guest/build installs it)")
            return nil
        }
        let dir = getenv("FSSHARE_GUEST_IMAGE").map { String(cString: $0) } ?? TestEnvironment.packageRoot + "/hack/.cache/guest"
        guard GuestImage.at(FilePath(dir)) != nil else {
            print("SKIP: guest tests: no guest image in \(dir): run hack/guest/build (hack/test does)")
            return nil
        }
        return dir
    }()

    @Test(
        "guest check",
        .enabled(if: GuestTests.image != nil, "needs root, QEMU and a guest image (see the SKIP line)"),
        arguments: ["virtio-fs", "virtio-fs-runtime-rs", "9p", "copy", "watchable", "libvirt", "rootfs"])
    func guest(_ transport: String) {
        guard let image = GuestTests.image else { return }
        let dir = TestEnvironment.scratch("guest-\(transport)")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let result = Sys.run(
            ["unshare", "-m", "--propagation", "private", "--", TestEnvironment.product("fsshare-guest"), "check", transport, dir],
            environment: ["FSSHARE_GUEST_IMAGE": image])
        let lines = result.output.split(separator: "\n")
        for line in lines where line.hasPrefix("figure:") { print("guest \(transport) \(line)") }
        let failures = lines.filter { $0.hasPrefix("FAIL") }
        #expect(result.status == 0, "guest check \(transport) exited \(result.status):\n\(failures.joined(separator: "\n"))\n--- last output ---\n\(result.output.suffix(3000))")
        #expect(result.output.contains(" 0 failed"), "guest check \(transport) did not report its checks")
    }
}
