#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Kubernetes' AtomicWriter (pkg/volume/util/atomic_writer.go), step for step: payload into a
/// new `..<timestamp>` dir, `..data_tmp` symlink, rename over `..data`, new user-visible links,
/// removal of links for deleted keys, then RemoveAll of the old timestamped dir.
public final class KubeletEmulator {
    public let volume: String
    private var counter = 0
    private var current: [String: String] = [:]

    /// `root` plays the kubelet root; the volume is `<root>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>`.
    public init(root: String, plugin: String = "configmap", name: String = "cfg") {
        volume = "\(root)/pods/0a1b/volumes/kubernetes.io~\(plugin)/\(name)"
        _ = Sys.run(["mkdir", "-p", volume])
    }

    /// Payload paths may be nested (`a/b`, as projected items allow). Returns when the
    /// `..data` rename happened (CLOCK_MONOTONIC ns): the moment the update is published.
    @discardableResult
    public func write(_ payload: [String: String]) -> UInt64 {
        counter += 1
        let oldTarget = try? Sys.readlinkat(nil, FilePath(volume + "/..data"))
        let ts = "..2026_11_22_10_00_00.\(String(counter, radix: 10))\(getpid())"
        mkdir(volume + "/" + ts, 0o755)
        for (path, content) in payload {
            var dir = volume + "/" + ts
            let parts = path.split(separator: "/").map(String.init)
            for p in parts.dropLast() {
                dir += "/" + p
                mkdir(dir, 0o755)
            }
            writeFile(dir + "/" + parts[parts.count - 1], content)
        }
        symlink(ts, volume + "/..data_tmp")
        let published = Sys.monotonicNanoseconds()
        rename(volume + "/..data_tmp", volume + "/..data")
        let newTop = Set(payload.keys.map { String($0.split(separator: "/")[0]) })
        let oldTop = Set(current.keys.map { String($0.split(separator: "/")[0]) })
        for key in newTop.sorted() where !oldTop.contains(key) {
            symlink("..data/" + key, volume + "/" + key)
        }
        for key in oldTop.subtracting(newTop) { unlink(volume + "/" + key) }
        if let oldTarget { KubeletEmulator.removeTree(FilePath(volume + "/" + oldTarget)) }
        current = payload
        return published
    }

    /// Removes a directory tree in process (no `rm` child: a node-scale test updates hundreds
    /// of volumes, and a process per update would be what it measures).
    static func removeTree(_ path: FilePath) {
        for entry in (try? Sys.listDirectory(nil, path)) ?? [] {
            let child = path.appending(entry.name)
            if entry.kind == .directory { removeTree(child) } else { _ = try? Sys.unlinkat(nil, child, directory: false) }
        }
        _ = try? Sys.unlinkat(nil, path, directory: true)
    }
}

/// A directory tree as comparable values: relative path -> "d", "l:<target>" or "f:<content>".
public func snapshot(_ dir: String) -> [String: String]? {
    guard let top = try? Sys.openat(nil, FilePath(dir), flags: Sys.oPath | Sys.oDirectory) else { return nil }
    defer { Sys.close(top) }
    var out: [String: String] = [:]
    func walk(_ d: DirFD, _ prefix: String) {
        guard let entries = try? Sys.listDirectory(d, ".") else { return }
        for e in entries {
            let rel = prefix.isEmpty ? e.name : prefix + "/" + e.name
            guard let st = try? Sys.statx(d, FilePath(e.name)) else { continue }
            switch st.kind {
            case .directory:
                out[rel] = "d"
                if let fd = try? Sys.openat(d, FilePath(e.name), flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow) {
                    walk(DirFD(fd: fd, path: d.display(FilePath(e.name))), rel)
                    Sys.close(fd)
                }
            case .symlink:
                out[rel] = "l:" + ((try? Sys.readlinkat(d, FilePath(e.name))) ?? "?")
            case .regular:
                if let fd = try? Sys.openat(d, FilePath(e.name), flags: O_RDONLY | Sys.oNoFollow) {
                    out[rel] = "f:" + String(decoding: (try? Sys.readAll(fd, path: "")) ?? [], as: UTF8.self)
                    Sys.close(fd)
                }
            default:
                out[rel] = "?"
            }
        }
    }
    walk(DirFD(fd: top, path: FilePath(dir)), "")
    return out
}

/// What a reader of an atomic-writer volume sees, independent of the name of the timestamped
/// directory: every user-visible key link with its target, `..data` as a directory, and the
/// content under it (`..data/<path>`). Other timestamped directories are not part of it.
public func readerView(_ dir: String) -> [String: String]? {
    guard let all = snapshot(dir) else { return nil }
    guard let data = all["..data"], data.hasPrefix("l:") else { return all }
    let target = String(data.dropFirst(2))
    var view: [String: String] = ["..data": "d"]
    for (path, value) in all {
        if !path.hasPrefix("..") { view[path] = value }
        if path.hasPrefix(target + "/") { view["..data/" + path.dropFirst(target.count + 1)] = value }
    }
    return view
}

/// Polls until the guest copy shows a reader the same volume as the host (keys, their links,
/// and what `..data` holds) or the timeout passes; returns the last difference, nil when equal.
public func waitForMirror(host: String, guest: String, seconds: Double = 10) -> String? {
    let deadline = Sys.monotonicNanoseconds() + UInt64(seconds * 1e9)
    var last = "never compared"
    while Sys.monotonicNanoseconds() < deadline {
        let h = readerView(host), g = readerView(guest)
        if let h, h == g { return nil }
        let hk = Set(h?.keys.map { $0 } ?? []), gk = Set(g?.keys.map { $0 } ?? [])
        last = "host-only \(hk.subtracting(gk).sorted()), guest-only \(gk.subtracting(hk).sorted()), differing \(hk.intersection(gk).filter { h?[$0] != g?[$0] }.sorted())"
        usleep(5_000)
    }
    return last
}
