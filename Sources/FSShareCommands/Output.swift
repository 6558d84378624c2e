import FSShare
import FSShareProto
import SwiftProtobuf

/// A minimal JSON value for the CLI's `--json` output (no Foundation needed).
indirect enum JSON {
    case string(String)
    case number(Int)
    case bool(Bool)
    case null
    case array([JSON])
    case object([(String, JSON)])
    /// Already-encoded JSON (a protobuf message's JSON mapping).
    case raw(String)

    func render(indent: Int = 0) -> String {
        let pad = String(repeating: "  ", count: indent + 1)
        let end = String(repeating: "  ", count: indent)
        switch self {
        case .string(let s): return Storages.goJSONString(s)
        case .number(let n): return String(n)
        case .bool(let b): return b ? "true" : "false"
        case .null: return "null"
        case .raw(let r): return r
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { pad + $0.render(indent: indent + 1) }.joined(separator: ",\n") + "\n" + end + "]"
        case .object(let fields):
            if fields.isEmpty { return "{}" }
            return "{\n" + fields.map { pad + Storages.goJSONString($0.0) + ": " + $0.1.render(indent: indent + 1) }.joined(separator: ",\n") + "\n" + end + "}"
        }
    }

    /// On one line, for line-oriented output (watch events, errors).
    func compact() -> String {
        switch self {
        case .array(let items): return "[" + items.map { $0.compact() }.joined(separator: ",") + "]"
        case .object(let fields): return "{" + fields.map { Storages.goJSONString($0.0) + ":" + $0.1.compact() }.joined(separator: ",") + "}"
        default: return render()
        }
    }
}

/// How `prepare` and `share*` print the `Storage` descriptors.
enum DescriptorFormat: String, CaseIterable {
    /// JSON with Kata's proto field names (`mount_point`, `driver_options`).
    case json
    /// Length-delimited protobuf: each message preceded by its size as a varint.
    case binary
    /// One line per storage, for people.
    case text
}

enum Render {
    static func storageJSON(_ s: Storage) -> JSON {
        var options = JSONEncodingOptions()
        options.preserveProtoFieldNames = true
        return .raw((try? s.jsonString(options: options)) ?? "{}")
    }

    static func storageText(_ s: Storage) -> String {
        var parts = ["driver=\(s.driver)", "source=\(s.source)", "fstype=\(s.fstype)", "mount_point=\(s.mountPoint)"]
        if !s.options.isEmpty { parts.append("options=\(s.options.joined(separator: ","))") }
        if !s.driverOptions.isEmpty { parts.append("driver_options=\(s.driverOptions.joined(separator: ","))") }
        return "  storage: " + parts.joined(separator: " ")
    }

    /// Length-delimited protobuf bytes of `storages`.
    static func delimited(_ storages: [Storage]) throws -> [UInt8] {
        var out: [UInt8] = []
        for s in storages {
            let bytes: [UInt8] = try s.serializedBytes()
            var n = UInt64(bytes.count)
            repeat {
                var byte = UInt8(n & 0x7F)
                n >>= 7
                if n != 0 { byte |= 0x80 }
                out.append(byte)
            } while n != 0
            out += bytes
        }
        return out
    }
}
