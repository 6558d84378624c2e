#if canImport(Glibc)
import Glibc
#endif

/// The UTF-8 bytes of `s` as one buffer: a native string's own storage, not a copy.
///
/// The hot path's byte checks (names, paths, journal fields) run over this buffer instead of
/// iterating `String.UTF8View`, whose index checks cost several times more per byte.
@inline(__always)
func withUTF8Bytes<R>(_ s: String, _ body: (UnsafeBufferPointer<UInt8>) -> R) -> R {
    if let result = s.utf8.withContiguousStorageIfAvailable(body) { return result }
    return Array(s.utf8).withUnsafeBufferPointer(body)
}

extension UnsafeBufferPointer<UInt8> {
    /// Whether `byte` occurs in the buffer.
    @inline(__always)
    func containsByte(_ byte: UInt8) -> Bool {
        for b in self where b == byte { return true }
        return false
    }

    /// Whether the buffer starts with `prefix` (ASCII), compared byte by byte.
    @inline(__always)
    func startsWith(_ prefix: StaticString) -> Bool {
        let n = prefix.utf8CodeUnitCount
        guard count >= n, let base = baseAddress else { return n == 0 }
        return memcmp(base, prefix.utf8Start, n) == 0
    }
}
