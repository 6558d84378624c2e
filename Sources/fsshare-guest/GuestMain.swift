#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import FSShareTestSupport
import FSShareVM
import SystemPackage

/// `fsshare-guest check virtio-fs|virtio-fs-runtime-rs|9p|copy|watchable|libvirt|rootfs DIR` — boots a real guest and checks every sharing
/// claim from inside it (prints `ok:` / `FAIL:` lines, `figure:` lines and a summary).
/// `fsshare-guest demo DIR` — the same, narrated, as `hack/demo` shows it.
///
/// Run it in a private mount namespace (`unshare -m --propagation private`): it mounts for real.
/// The guest image comes from `FSSHARE_GUEST_IMAGE` (a directory with `vmlinuz` and
/// `initramfs.img`, made by `hack/guest/build`).
@main
enum GuestMain {
    static func main() {
        Sys.lineBufferStdout()
        let args = CommandLine.arguments
        func usage() -> Never {
            print("usage: fsshare-guest check virtio-fs|virtio-fs-runtime-rs|9p|copy|watchable|libvirt|rootfs DIR | demo DIR")
            exit(2)
        }
        guard args.count >= 3 else { usage() }
        guard let image = locateImage() else {
            print("FAIL: no guest image: set FSSHARE_GUEST_IMAGE to the directory hack/guest/build prints")
            exit(1)
        }
        let checks = Checks()
        switch (args[1], args.count) {
        case ("check", 4):
            let dir = args[3]
            switch args[2] {
            case "virtio-fs": SharedFilesystemRun(transport: .virtioFS, dir: dir, image: image, checks: checks, narrate: false).run()
            case "9p": SharedFilesystemRun(transport: .virtio9p, dir: dir, image: image, checks: checks, narrate: false).run()
            case "virtio-fs-runtime-rs":
                SharedFilesystemRun(transport: .virtioFSRuntimeRS, dir: dir, image: image, checks: checks, narrate: false).run()
            case "copy": CopyModeRun(dir: dir, image: image, checks: checks, narrate: false, updates: 30).run()
            case "watchable": WatchableRun(dir: dir, image: image, checks: checks, narrate: false, updates: 20).run()
            case "libvirt": LibvirtRun(dir: dir, image: image, checks: checks).run()
            case "rootfs": RootfsRun(dir: dir, image: image, checks: checks, narrate: false).run()
            default: usage()
            }
        case ("demo", 3):
            let dir = args[2]
            SharedFilesystemRun(transport: .virtioFS, dir: dir + "/virtio-fs", image: image, checks: checks, narrate: true).run()
            CopyModeRun(dir: dir + "/copy", image: image, checks: checks, narrate: true, updates: 10).run()
            WatchableRun(dir: dir + "/watchable", image: image, checks: checks, narrate: true, updates: 5).run()
            RootfsRun(dir: dir + "/rootfs", image: image, checks: checks, narrate: true).run()
        default:
            usage()
        }
        checks.summary()
        exit(checks.failures == 0 ? 0 : 1)
    }

    static func locateImage() -> GuestImage? {
        guard let dir = getenv("FSSHARE_GUEST_IMAGE").map({ String(cString: $0) }) else { return nil }
        return GuestImage.at(FilePath(dir))
    }
}

/// Narration for the demo (silent in check runs, where `ok:`/`FAIL:` lines say it all).
struct Narrator {
    let on: Bool
    func step(_ text: String) { if on { print("\n\u{1B}[1m== \(text)\u{1B}[0m") } }
    func say(_ text: String) { if on { print(text) } }
}

/// `figure: NAME VALUE` lines: the numbers a run measured (the test prints them).
func figure(_ name: String, _ value: String) {
    print("figure: \(name) \(value)")
}

func ms(_ ns: UInt64) -> String {
    let tenths = (ns + 50_000) / 100_000
    return "\(tenths / 10).\(tenths % 10) ms"
}

func ms(_ d: Duration) -> String {
    ms(d.nanoseconds)
}
