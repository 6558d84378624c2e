/// A buffer in which a request frame is assembled around a large `bytes` field whose content
/// the caller puts in place first (a file chunk read straight into ``data``): the frame header,
/// the ttrpc envelope and the request's other fields are written into the room before it, the
/// envelope's trailing fields after it, and the frame leaves in one write — no copy of the
/// content in user space (``AgentClient/Pipeline/sendBulk(_:_:_:field:in:count:onError:)``).
///
/// Reusable: one per copy, for every chunk. Not thread-safe (owned by one copier at a time).
public final class BulkFrame {
    /// Room before the content: the frame header, the envelope's service and method, and the
    /// request's own fields (a guest path is at most 4096 bytes). A request whose fields do not
    /// fit is sent the ordinary way (copied).
    static let headroom = 8192
    /// Room after the content: the envelope's timeout and batch metadata.
    static let tailroom = 512
    /// Content bytes the buffer holds at most.
    public let capacity: Int
    let storage: UnsafeMutableRawBufferPointer

    /// A buffer for content of up to `capacity` bytes (not zeroed: pages are touched as the
    /// content is read into them).
    ///
    /// - Parameter capacity: the largest content (a chunk) it will hold.
    public init(capacity: Int) {
        self.capacity = max(capacity, 0)
        storage = .allocate(byteCount: BulkFrame.headroom + self.capacity + BulkFrame.tailroom, alignment: 16)
    }

    deinit { storage.deallocate() }

    /// Where the content goes.
    public var data: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: storage[BulkFrame.headroom..<(BulkFrame.headroom + capacity)])
    }

    /// Writes `prefix` right before the content and `suffix` right after its first `count`
    /// bytes; returns the whole frame, or nil when they do not fit the room.
    func frame(prefix: [UInt8], count: Int, suffix: [UInt8]) -> UnsafeRawBufferPointer? {
        guard prefix.count <= BulkFrame.headroom, suffix.count <= BulkFrame.tailroom, count <= capacity else { return nil }
        let first = BulkFrame.headroom - prefix.count
        UnsafeMutableRawBufferPointer(rebasing: storage[first..<BulkFrame.headroom]).copyBytes(from: prefix)
        UnsafeMutableRawBufferPointer(rebasing: storage[(BulkFrame.headroom + count)..<(BulkFrame.headroom + count + suffix.count)]).copyBytes(from: suffix)
        return UnsafeRawBufferPointer(rebasing: storage[first..<(BulkFrame.headroom + count + suffix.count)])
    }
}
