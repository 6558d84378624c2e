import SystemPackage

/// Deterministic share names: Kata's `<cid>-<16 hex>-<basename(destination)>` layout, with the
/// hex taken from a hash of (container id, destination) instead of random bytes, so sharing the
/// same container mount twice finds the same name (and makes no second mount).
public enum ShareNaming {
    /// The longest name a directory entry may have.
    static let nameMax = 255

    /// The share name of a container mount at `destination`.
    public static func volumeName(containerID: String, destination: FilePath) throws(FSShareError) -> String {
        let dest = try normalizedDestination(destination)
        let base = dest.lastComponent?.string ?? ""
        let hash = fnv1a64(Array(containerID.utf8) + [0] + Array(dest.string.utf8))
        let prefix = "\(containerID)-\(hex16(hash))-"
        // Keep the whole name within NAME_MAX; cut on a character boundary.
        var cut = base
        while prefix.utf8.count + cut.utf8.count > nameMax { cut.removeLast() }
        return prefix + cut
    }

    /// Checks a container destination: absolute, no NUL, a real last component.
    static func normalizedDestination(_ destination: FilePath) throws(FSShareError) -> FilePath {
        let raw = destination.string
        guard !raw.utf8.contains(0) else { throw FSShareError(.invalidArgument, "mount destination contains a NUL byte") }
        guard destination.isAbsolute else {
            throw FSShareError(.invalidArgument, "mount destination \"\(raw)\" is not an absolute path")
        }
        let dest = destination.lexicallyNormalized()
        guard let last = dest.lastComponent, last.kind == .regular else {
            throw FSShareError(.invalidArgument, "mount destination \"\(raw)\" has no final name to share under")
        }
        return dest
    }

    /// 64-bit FNV-1a: stable across processes and versions (unlike Swift's `Hasher`).
    static func fnv1a64(_ bytes: [UInt8]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01b3
        }
        return h
    }

    static func hex16(_ v: UInt64) -> String {
        let digits = Array("0123456789abcdef")
        var chars: [Character] = []
        chars.reserveCapacity(16)
        for shift in stride(from: 60, through: 0, by: -4) { chars.append(digits[Int((v >> UInt64(shift)) & 0xF)]) }
        return String(chars)
    }
}
