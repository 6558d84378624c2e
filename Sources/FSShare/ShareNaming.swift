import SystemPackage

/// Deterministic share names: Kata's `<cid>-<16 hex>-<basename(destination)>` layout, with the
/// hex taken from a hash of (container id, destination) instead of random bytes, so sharing the
/// same container mount twice finds the same name (and makes no second mount).
public enum ShareNaming {
    /// The longest name a directory entry may have.
    static let nameMax = 255

    /// The share name of a container mount at `destination`: Kata's Go runtime's shape, or
    /// runtime-rs's (`sandbox-<16 hex>-<base>`; runtime-rs draws its hex at random).
    ///
    /// - Parameters:
    ///   - containerID: the container.
    ///   - destination: the container's mount point.
    ///   - style: the layout (runtime-rs names shares differently).
    /// - Returns: the share's name below the mounts directory.
    /// - Throws: `invalidArgument` for a destination that is not an absolute path.
    public static func volumeName(containerID: String, destination: FilePath, style: SandboxLayoutStyle = .go) throws(FSShareError) -> String {
        try volumeName(containerID: containerID, destination: destination, text: destination.string, style: style)
    }

    /// ``volumeName(containerID:destination:style:)`` with the destination's text already at
    /// hand. A destination that is absolute and normal already (nearly all) is used as it is:
    /// no `FilePath` parsing.
    static func volumeName(containerID: String, destination: FilePath, text: String, style: SandboxLayoutStyle) throws(FSShareError) -> String {
        // Nearly every destination is absolute, normal and short: its name is built in one
        // buffer, straight from the bytes.
        let fast = withUTF8Bytes(text) { (bytes) -> String? in
            guard bytes.first == UInt8(ascii: "/"), isNormal(bytes), !bytes.containsByte(0) else { return nil }
            return withUTF8Bytes(containerID) { (cid) -> String? in fastName(containerID: cid, path: bytes, style: style) }
        }
        if let fast { return fast }
        let path = try normalizedDestination(destination).string
        // A normal absolute path's last component is what follows its last slash.
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) ?? path.utf8.startIndex
        let base = Substring(path.utf8[path.utf8.index(after: slash)...])
        var hash = fnv1a64Start
        fnv1a64(&hash, containerID.utf8)
        fnv1a64(&hash, CollectionOfOne(0))
        fnv1a64(&hash, path.utf8)
        var name = style == .go ? containerID : "sandbox"
        name.reserveCapacity(name.utf8.count + 18 + base.utf8.count)
        name.append("-")
        name.append(hex16(hash))
        name.append("-")
        // Keep the whole name within NAME_MAX; cut on a character boundary.
        var cut = base
        while name.utf8.count + cut.utf8.count > nameMax { cut.removeLast() }
        name.append(contentsOf: cut)
        return name
    }

    /// `<prefix>-<16 hex>-<last component>` of a normal absolute path's bytes, or nil when the
    /// name would pass NAME_MAX (the caller then cuts it on a character boundary).
    private static func fastName(containerID cid: UnsafeBufferPointer<UInt8>, path: UnsafeBufferPointer<UInt8>, style: SandboxLayoutStyle) -> String? {
        var hash = fnv1a64Start
        fnv1a64(&hash, cid)
        fnv1a64(&hash, CollectionOfOne(0))
        fnv1a64(&hash, path)
        var slash = path.count - 1
        while slash > 0 && path[slash] != UInt8(ascii: "/") { slash -= 1 }
        let base = UnsafeBufferPointer(rebasing: path[(slash + 1)...])
        let sandbox: StaticString = "sandbox"
        let prefix = style == .go ? cid : UnsafeBufferPointer(start: sandbox.utf8Start, count: sandbox.utf8CodeUnitCount)
        let total = prefix.count + 18 + base.count
        guard total <= nameMax else { return nil }
        return String(unsafeUninitializedCapacity: total) { out in
            var i = 0
            for b in prefix { out[i] = b; i += 1 }
            out[i] = UInt8(ascii: "-"); i += 1
            writeHex16(hash, into: UnsafeMutableBufferPointer(rebasing: out[i..<(i + 16)]))
            i += 16
            out[i] = UInt8(ascii: "-"); i += 1
            for b in base { out[i] = b; i += 1 }
            return i
        }
    }

    /// Checks a container destination: absolute, no NUL, a real last component.
    static func normalizedDestination(_ destination: FilePath) throws(FSShareError) -> FilePath {
        let raw = destination.string
        guard !raw.utf8.contains(0) else { throw FSShareError(.invalidArgument, "mount destination contains a NUL byte") }
        guard destination.isAbsolute else {
            throw FSShareError(.invalidArgument, "mount destination \"\(raw)\" is not an absolute path")
        }
        // Normalising is the expensive part; most destinations are already normal.
        let dest = isNormal(raw) ? destination : destination.lexicallyNormalized()
        guard let last = dest.lastComponent, last.kind == .regular else {
            throw FSShareError(.invalidArgument, "mount destination \"\(raw)\" has no final name to share under")
        }
        return dest
    }

    /// True if `path` has no empty, "." or ".." components and no trailing slash.
    static func isNormal(_ path: String) -> Bool {
        withUTF8Bytes(path) { isNormal($0) }
    }

    /// ``isNormal(_:)`` of a path's bytes (the first byte, the leading slash, is not looked at).
    static func isNormal(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        var previous: UInt8 = 0x2F
        var componentStart = true
        var dots = 0
        for b in bytes.dropFirst() {
            if b == 0x2F {
                if previous == 0x2F || (componentStart && dots > 0) { return false }
                componentStart = true
                dots = 0
            } else if b == 0x2E && componentStart {
                dots += 1
                if dots > 2 { componentStart = false }
            } else {
                componentStart = false
                dots = 0
            }
            previous = b
        }
        return previous != 0x2F && !(componentStart && dots > 0)
    }

    /// 64-bit FNV-1a: stable across processes and versions (unlike Swift's `Hasher`).
    static func fnv1a64(_ bytes: [UInt8]) -> UInt64 {
        var h = fnv1a64Start
        fnv1a64(&h, bytes)
        return h
    }

    /// FNV-1a's offset basis: the hash of nothing.
    static let fnv1a64Start: UInt64 = 0xcbf2_9ce4_8422_2325

    /// Continues hash `h` over `bytes` (hashing parts one after the other equals hashing them
    /// joined, without joining them).
    static func fnv1a64(_ h: inout UInt64, _ bytes: some Sequence<UInt8>) {
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01b3
        }
    }

    static func hex16(_ v: UInt64) -> String {
        String(unsafeUninitializedCapacity: 16) { buffer in
            writeHex16(v, into: buffer)
            return 16
        }
    }

    /// `v` as 16 lowercase hex digits, into the first 16 bytes of `out`.
    @inline(__always)
    static func writeHex16(_ v: UInt64, into out: UnsafeMutableBufferPointer<UInt8>) {
        let digits: StaticString = "0123456789abcdef"
        for i in 0..<16 { out[i] = digits.utf8Start[Int((v >> UInt64(60 - 4 * i)) & 0xF)] }
    }
}
