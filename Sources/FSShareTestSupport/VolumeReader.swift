#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import Synchronization

/// A reader hammering a mirrored atomic-writer volume from its own thread, the way an app in
/// the guest reads its configmap: each pass checks that `..data` is a directory and opens and
/// reads every key, and records what a reader must never see.
public final class VolumeReader: Sendable {
    /// What the reader saw.
    public struct Findings: Sendable {
        /// Full passes over every key.
        public var passes: Int
        /// `..data` missing or not a directory, or a key that could not be opened.
        public var missing: [String]
        /// A key whose content was not a complete value.
        public var torn: [String]
    }

    private final class Shared: Sendable {
        let stop = Atomic<Bool>(false)
        let passes = Atomic<Int>(0)
        let problems = Mutex<(missing: [String], torn: [String])>(([], []))
    }
    private let shared = Shared()
    private let thread: Mutex<OSThread?> = Mutex(nil)

    /// Starts reading `keys` below `dir`; `complete` says whether a key's content is whole.
    public init(dir: String, keys: [String], complete: @escaping @Sendable (String) -> Bool) throws {
        let t = try OSThread { [shared] in
            var buffer = [UInt8](repeating: 0, count: 8192)
            while !shared.stop.load(ordering: .relaxed) {
                var st = stat()
                if stat(dir + "/..data", &st) != 0 || st.st_mode & S_IFMT != S_IFDIR {
                    let e = errno
                    shared.problems.withLock { $0.missing.append("..data (errno \(e))") }
                }
                for key in keys {
                    let fd = open(dir + "/" + key, O_RDONLY)
                    if fd < 0 {
                        let e = errno
                        shared.problems.withLock { $0.missing.append("\(key) (errno \(e))") }
                        continue
                    }
                    let n = read(fd, &buffer, buffer.count)
                    close(fd)
                    let text = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : ""
                    if !complete(text) {
                        shared.problems.withLock { $0.torn.append("\(key): \(text.prefix(12))…\(text.suffix(6)) (\(n) bytes)") }
                    }
                }
                shared.passes.add(1, ordering: .relaxed)
            }
        }
        thread.withLock { $0 = t }
    }

    /// Stops the reader and returns what it saw.
    public func finish() -> Findings {
        shared.stop.store(true, ordering: .relaxed)
        thread.withLock { t in
            t?.join()
            t = nil
        }
        let p = shared.problems.withLock { $0 }
        return Findings(passes: shared.passes.load(ordering: .relaxed), missing: p.missing, torn: p.torn)
    }

    deinit { _ = finish() }
}
