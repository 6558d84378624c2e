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
}
