/// Validates sandbox and container ids before they become path components.
///
/// Ids follow containerd's rule: 1–128 characters of `[A-Za-z0-9_.-]`, starting with a letter
/// or digit. That excludes `/`, `..`, `.`, empty strings, NUL and anything a shell or a
/// mountinfo line would need escaping for.
public enum Identifier {
    /// The longest id accepted.
    public static let maximumLength = 128

    /// Throws `FSShareError/Code/invalidArgument` unless `id` is a valid id.
    ///
    /// - Parameters:
    ///   - id: the id to check.
    ///   - what: what it names (`sandbox`, `container`), for the message.
    /// - Throws: `invalidArgument`, saying what is wrong with it.
    public static func validate(_ id: String, what: String) throws(FSShareError) {
        if let problem = problem(id) {
            throw FSShareError(.invalidArgument, "invalid \(what) id \"\(id.prefix(200))\": \(problem)")
        }
    }

    /// Why `id` is not valid, or nil if it is.
    ///
    /// - Parameter id: the id to check.
    /// - Returns: a sentence fragment (`it contains "/"`), or nil for a valid id.
    public static func problem(_ id: String) -> String? {
        let bytes = id.utf8  // walked in place: no copy of the id per operation
        if bytes.isEmpty { return "it is empty" }
        if bytes.count > maximumLength { return "it is longer than \(maximumLength) bytes" }
        func alnum(_ b: UInt8) -> Bool {
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A)
        }
        guard let first = bytes.first, alnum(first) else { return "it must start with a letter or digit" }
        for b in bytes where !(alnum(b) || b == 0x5F || b == 0x2E || b == 0x2D) {
            if b == 0x2F { return "it contains \"/\"" }
            return "it contains a character outside [A-Za-z0-9_.-]"
        }
        return nil
    }
}
