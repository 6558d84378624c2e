/// The protobuf wire format at the one place the generated code costs a copy per megabyte:
/// a large `bytes` field (a CopyFile chunk's `data`, the ttrpc `Request.payload` around it).
///
/// Sending, the field is written *around* bytes already in place (``BulkFrame``): the fields
/// before it are encoded by swift-protobuf, then its tag and length, then the bytes, then the
/// fields after it. Receiving, ``ProtoWire/separate(_:field:)`` walks a message once, returns
/// the byte range of that field and copies everything else into a small message that
/// swift-protobuf decodes (and validates) as usual. Nothing else about the format is decided here.
public enum ProtoWire {
    /// Wire type 2: length-delimited (bytes, strings, embedded messages).
    static let lengthDelimited: UInt64 = 2

    /// Bytes of `value` as a varint.
    ///
    /// - Parameter value: the number.
    /// - Returns: how many bytes its varint takes (1–10).
    public static func varintLength(_ value: UInt64) -> Int {
        var v = value
        var n = 1
        while v >= 0x80 {
            v >>= 7
            n += 1
        }
        return n
    }

    /// Appends `value` as a varint.
    ///
    /// - Parameters:
    ///   - value: the number.
    ///   - out: the buffer it is appended to.
    public static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    /// Appends the tag and length of length-delimited field `field` holding `length` bytes.
    ///
    /// - Parameters:
    ///   - field: the field number.
    ///   - length: the bytes the field holds.
    ///   - out: the buffer they are appended to.
    public static func appendBytesHeader(field: UInt32, length: Int, to out: inout [UInt8]) {
        appendVarint(UInt64(field) << 3 | lengthDelimited, to: &out)
        appendVarint(UInt64(length), to: &out)
    }

    /// The byte range of length-delimited field `field` in the encoded message `bytes` (the
    /// last occurrence: proto3 keeps the last value of a singular field), and the message's
    /// other fields, byte for byte, as a message of their own.
    ///
    /// - Parameters:
    ///   - bytes: an encoded message.
    ///   - field: the field number of a `bytes` (or `string`) field.
    /// - Returns: the other fields, and the field's range in `bytes` (nil when absent).
    /// - Throws: `protocol` for a malformed message (a truncated varint or field, an
    ///   unknown wire type, `field` with a wire type other than length-delimited).
    public static func separate(_ bytes: UnsafeRawBufferPointer, field: UInt32) throws(AgentError) -> (rest: [UInt8], field: Range<Int>?) {
        var rest: [UInt8] = []
        var found: Range<Int>?
        var i = 0
        // Copies the runs of other fields with one append each.
        var runStart = 0
        func varint() throws(AgentError) -> UInt64 {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard i < bytes.count, shift < 64 else { throw AgentError(.protocolError, "a malformed protobuf message: truncated or over-long varint") }
                let b = bytes[i]
                i += 1
                value |= UInt64(b & 0x7f) << shift
                if b < 0x80 { return value }
                shift += 7
            }
        }
        while i < bytes.count {
            let fieldStart = i
            let key = try varint()
            let number = key >> 3
            guard number != 0 else { throw AgentError(.protocolError, "a malformed protobuf message: field number 0") }
            switch key & 7 {
            case 0: _ = try varint()
            case 1: i += 8
            case 2:
                let length = try varint()
                guard length <= UInt64(bytes.count - i) else { throw AgentError(.protocolError, "a malformed protobuf message: a field longer than the message") }
                if number == UInt64(field) {
                    rest.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[runStart..<fieldStart]))
                    found = i..<(i + Int(length))
                    runStart = i + Int(length)
                }
                i += Int(length)
            case 5: i += 4
            default:
                throw AgentError(.protocolError, "a malformed protobuf message: wire type \(key & 7)")
            }
            guard i <= bytes.count else { throw AgentError(.protocolError, "a malformed protobuf message: a truncated field") }
            if number == UInt64(field) && key & 7 != lengthDelimited {
                throw AgentError(.protocolError, "a malformed protobuf message: field \(field) is not length-delimited")
            }
        }
        rest.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[runStart..<bytes.count]))
        return (rest, found)
    }
}
