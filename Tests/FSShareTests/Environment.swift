#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// What this machine can do, probed for real (not guessed from the uid).
enum TestEnvironment {
    /// The directory holding the built products (next to the test bundle).
    static let productsDirectory: String = {
        let exe = (try? Sys.readlinkat(nil, "/proc/self/exe")) ?? ""
        var parts = exe.split(separator: "/", omittingEmptySubsequences: false)
        while let last = parts.last, !last.hasSuffix(".xctest") && parts.count > 1 { parts.removeLast() }
        if parts.last?.hasSuffix(".xctest") == true { parts.removeLast() }
        return parts.joined(separator: "/")
    }()

    static func product(_ name: String) -> String { productsDirectory + "/" + name }

    /// The package root: the nearest parent of the products directory holding Package.swift.
    static let packageRoot: String = {
        var parts = productsDirectory.split(separator: "/", omittingEmptySubsequences: false)
        while parts.count > 1 {
            parts.removeLast()
            let candidate = parts.joined(separator: "/")
            if access(candidate + "/Package.swift", F_OK) == 0 { return candidate }
        }
        return "."
    }()

    /// Nil if real mounts can be made here (`unshare -m` works and a bind inside it works),
    /// else the reason they cannot.
    static let mountSkipReason: String? = {
        let probe = Sys.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                             "d=$(mktemp -d) && mount --bind \"$d\" \"$d\" && umount \"$d\" && rmdir \"$d\""])
        if probe.status == 0 { return nil }
        return "real-mount tests skipped: cannot create a private mount namespace and bind-mount in it (needs root with CAP_SYS_ADMIN): \(probe.output.prefix(200))"
    }()

    static var canMount: Bool {
        if let reason = mountSkipReason {
            print("SKIP: \(reason)")
            return false
        }
        return true
    }

    /// A fresh scratch directory for one test.
    static func scratch(_ name: String) -> String {
        let dir = "/tmp/fsshare-tests-\(getpid())-\(name)"
        _ = Sys.run(["rm", "-rf", dir])
        return dir
    }
}
