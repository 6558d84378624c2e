#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Four overlay layers in overlayfs's own on-disk format, as containerd's overlay snapshotter or
/// a containers/storage graph driver leaves them: `base`, then `mid` (which deletes
/// `etc/gone` with a whiteout — a 0:0 character device — and makes `data/old` opaque with
/// `trusted.overlay.opaque=y`), then `appA` or `appB` on top. Two containers share `base` and
/// `mid`. Needs root (the whiteout device and the trusted xattr).
public struct LayerStack {
    public let base: String, mid: String, appA: String, appB: String

    /// Container A's layers, lowest first.
    public var stackA: [String] { [base, mid, appA] }
    /// Container B's layers, lowest first.
    public var stackB: [String] { [base, mid, appB] }

    /// Builds the layers under `dir`; nil with the reason when a step fails.
    public static func build(in dir: String) -> (LayerStack?, String) {
        let s = LayerStack(base: dir + "/base", mid: dir + "/mid", appA: dir + "/appA", appB: dir + "/appB")
        for d in [s.base + "/etc", s.base + "/data/old/sub", s.base + "/opt/keep", s.mid + "/etc", s.mid + "/data/old", s.mid + "/opt/keep",
                  s.appA + "/app", s.appA + "/etc", s.appB + "/app"] {
            mkdirs(d)
        }
        writeFile(s.base + "/etc/os-release", "ID=layered\n")
        writeFile(s.base + "/etc/gone", "deleted by mid\n")
        writeFile(s.base + "/data/old/x", "hidden by the opaque dir\n")
        writeFile(s.base + "/data/old/sub/deep", "hidden too\n")
        writeFile(s.base + "/opt/keep/a", "a from base\n")
        writeFile(s.mid + "/data/old/y", "y from mid\n")
        writeFile(s.mid + "/opt/keep/b", "b from mid\n")
        writeFile(s.appA + "/app/run", "A\n")
        writeFile(s.appA + "/etc/os-release", "ID=layered-a\n")
        writeFile(s.appB + "/app/run", "B\n")
        // The whiteout: a character device 0:0 named like what it deletes.
        if mknod(s.mid + "/etc/gone", S_IFCHR | 0o000, 0) != 0 {
            return (nil, "mknod whiteout: \(Errno(rawValue: errno))")
        }
        do {
            try Sys.lsetxattr(FilePath(s.mid + "/data/old"), name: "trusted.overlay.opaque", value: Array("y".utf8))
        } catch {
            return (nil, "\(error)")
        }
        return (s, "")
    }

    /// What container A's merged rootfs holds (see ``snapshot(_:)`` for the encoding).
    public static let expectedA: [String: String] = [
        "app": "d", "app/run": "f:A\n", "data": "d", "data/old": "d", "data/old/y": "f:y from mid\n",
        "etc": "d", "etc/os-release": "f:ID=layered-a\n", "opt": "d", "opt/keep": "d",
        "opt/keep/a": "f:a from base\n", "opt/keep/b": "f:b from mid\n",
    ]

    /// What container B's merged rootfs holds.
    public static var expectedB: [String: String] {
        var e = expectedA
        e["app/run"] = "f:B\n"
        e["etc/os-release"] = "f:ID=layered\n"
        return e
    }

    /// A tree as `relative path → "d"` (directory), `"f:<content>"` (regular file),
    /// `"l:<target>"` (symlink) or `"o:<mode>"` (anything else), read without following links.
    public static func snapshot(_ root: String) -> [String: String] {
        var out: [String: String] = [:]
        func walk(_ rel: String) {
            let path = rel.isEmpty ? root : root + "/" + rel
            guard let entries = try? Sys.listDirectory(nil, FilePath(path)) else { return }
            for e in entries where e.name != "." && e.name != ".." {
                let r = rel.isEmpty ? e.name : rel + "/" + e.name
                let full = root + "/" + r
                guard let st = try? Sys.statx(nil, FilePath(full), followSymlinks: false) else { out[r] = "?"; continue }
                switch st.kind {
                case .directory:
                    out[r] = "d"
                    walk(r)
                case .regular: out[r] = "f:" + (readFile(full) ?? "?")
                case .symlink: out[r] = "l:" + ((try? Sys.readlinkat(nil, FilePath(full))) ?? "?")
                default: out[r] = "o:" + String(st.mode, radix: 8)
                }
            }
        }
        walk("")
        return out
    }

    /// The first difference between two snapshots, or nil when they are equal.
    public static func difference(_ got: [String: String], _ want: [String: String]) -> String? {
        for k in Set(got.keys).union(want.keys).sorted() where got[k] != want[k] {
            return "\(k): got \(got[k].map { "\"\($0)\"" } ?? "nothing"), want \(want[k].map { "\"\($0)\"" } ?? "nothing")"
        }
        return nil
    }
}
