#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// One line of `/proc/self/mountinfo`, with its octal escapes decoded.
public struct MountEntry: Sendable, Equatable {
    /// The kernel's mount id (as `statx` reports it).
    public var mountID: UInt64
    /// Where it is mounted, unescaped.
    public var mountPoint: String
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    public var mountOptions: String
    /// The filesystem type.
    public var fstype: String
    /// The mount source (device, `tmpfs`, ...).
    public var source: String
    /// Per-superblock options.
    public var superOptions: String
    /// The mount itself is read-only (`ro` in its per-mount options).
    public var isReadOnly: Bool { mountOptions.split(separator: ",").contains("ro") }
}

extension Sys {
    /// `mkdir -p` of an absolute path: each missing component made with `mode`.
    ///
    /// - Parameters:
    ///   - path: the directory to make, with its missing ancestors.
    ///   - mode: permission bits for what is created.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func makeDirectories(_ path: FilePath, mode: mode_t) throws(SystemCallError) {
        var partial = FilePath("/")
        for c in path.components {
            partial.append(c)
            _ = try mkdirat(nil, partial, mode: mode)
        }
    }

    /// The calling process's mount table, in mountinfo order (parents before children).
    ///
    /// - Returns: every mount of this process's namespace.
    /// - Throws: ``SystemCallError`` naming the call, the path and errno.
    public static func mountTable() throws(SystemCallError) -> [MountEntry] {
        let path: FilePath = "/proc/self/mountinfo"
        let fd = try openat(nil, path, flags: O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        return parseMountinfo(try readAll(fd, path: path))
    }

    /// Parses mountinfo text (see proc(5)); malformed lines are skipped.
    ///
    /// - Parameter bytes: the contents of a mountinfo file.
    /// - Returns: the mounts it lists.
    public static func parseMountinfo(_ bytes: [UInt8]) -> [MountEntry] {
        var result: [MountEntry] = []
        for line in bytes.split(separator: 0x0A) {
            let fields = line.split(separator: 0x20)
            // id parent major:minor root mountpoint options [optional...] - fstype source superopts
            guard let dash = fields.firstIndex(where: { $0.elementsEqual([0x2D]) }), dash >= 6, dash + 2 < fields.endIndex else { continue }
            let text = { (i: Int) -> String in i < fields.endIndex ? unescapeMountinfo(Array(fields[i])) : "" }
            result.append(MountEntry(
                mountID: UInt64(text(fields.startIndex)) ?? 0,
                mountPoint: text(fields.startIndex + 4), mountOptions: text(fields.startIndex + 5),
                fstype: text(dash + 1), source: text(dash + 2), superOptions: text(dash + 3)))
        }
        return result
    }

    /// Decodes mountinfo's `\NNN` octal escapes (space, tab, newline, backslash).
    ///
    /// - Parameter raw: the field as mountinfo writes it.
    /// - Returns: the decoded text.
    public static func unescapeMountinfo(_ raw: [UInt8]) -> String {
        var out: [UInt8] = []
        var i = 0
        while i < raw.count {
            if raw[i] == 0x5C, i + 3 < raw.count {
                let digits = raw[(i + 1)...(i + 3)]
                if digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x37 }) {
                    out.append(UInt8(truncatingIfNeeded: digits.reduce(0) { $0 * 8 + Int($1 - 0x30) }))
                    i += 4
                    continue
                }
            }
            out.append(raw[i])
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }
}
