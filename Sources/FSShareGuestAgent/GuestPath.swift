/// A path the host sent, checked before anything touches the filesystem: absolute, canonical
/// (no empty, `.` or `..` component, no trailing `/`) and strictly below the share directory.
struct GuestPath: Equatable {
    /// Components below the share directory (at least one).
    let components: [String]

    var leaf: String { components[components.count - 1] }
    var parent: [String] { Array(components.dropLast()) }

    /// `shareDir` is the agent's share directory spelled without a trailing slash.
    init(_ path: String, shareDir: String) throws(GuestAgentError) {
        guard !path.utf8.contains(0) else { throw GuestAgentError(.invalid, "the path contains a NUL byte") }
        guard path.utf8.count <= 4095 else { throw GuestAgentError(.invalid, "the path is longer than PATH_MAX") }
        guard path.hasPrefix("/") else { throw GuestAgentError(.invalid, "\"\(path)\" is not absolute") }
        let prefix = shareDir == "/" ? "/" : shareDir + "/"
        guard path.hasPrefix(prefix), path.utf8.count > prefix.utf8.count else {
            throw GuestAgentError(.denied, "\"\(path)\" is not below the share directory \(shareDir)")
        }
        let rest = path.dropFirst(prefix.count)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        for p in parts {
            guard !p.isEmpty else { throw GuestAgentError(.invalid, "\"\(path)\" is not canonical (empty component)") }
            guard p != "." && p != ".." else { throw GuestAgentError(.denied, "\"\(path)\" has a \"\(p)\" component") }
            guard p.utf8.count <= 255 else { throw GuestAgentError(.invalid, "\"\(path)\" has a component longer than NAME_MAX") }
        }
        components = parts
    }

    /// Checks a symlink target: relative, and when resolved lexically from the link's directory
    /// it stays inside the share directory. A link may not sit directly in the share directory
    /// (that is where container mount sources are; Kata's policy rule, CVE-2026-41326).
    static func checkSymlinkTarget(_ target: String, at link: GuestPath) throws(GuestAgentError) {
        guard !target.isEmpty, !target.utf8.contains(0), target.utf8.count <= 4095 else {
            throw GuestAgentError(.invalid, "symlink target is empty, too long or has a NUL byte")
        }
        guard !target.hasPrefix("/") else {
            throw GuestAgentError(.denied, "symlink \(link.components.joined(separator: "/")) -> \(target): absolute targets are refused")
        }
        guard link.components.count >= 2 else {
            throw GuestAgentError(.denied, "symlink \(link.leaf): links directly in the share directory are refused")
        }
        var depth = link.components.count - 1
        for part in target.split(separator: "/") {
            if part == ".." {
                depth -= 1
                guard depth >= 1 else {
                    throw GuestAgentError(.denied, "symlink \(link.components.joined(separator: "/")) -> \(target) escapes its share")
                }
            } else if part != "." {
                depth += 1
            }
        }
    }
}

/// Why the agent refused a request; mapped to a gRPC status on the wire.
struct GuestAgentError: Error {
    enum Kind { case invalid, denied, notFound, exists, readOnly, failed }
    let kind: Kind
    let message: String
    init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
}
