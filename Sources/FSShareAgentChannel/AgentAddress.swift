import SystemPackage

/// Where the guest agent listens, and how to reach it.
///
/// Spellings (Kata's, plus plain paths): `unix:PATH` or an absolute `PATH`; `hvsock:PATH:PORT`
/// (also `hvsock://PATH:PORT`) for Firecracker / Cloud Hypervisor hybrid vsock; `vsock:CID:PORT`
/// (also `vsock://CID:PORT`); `serial:PATH` for a character device such as a virtio-serial port
/// or a pty.
public enum AgentAddress: Sendable, Equatable, CustomStringConvertible {
    /// A unix stream socket (also what QEMU exposes for a virtio-serial port's host side).
    case unix(FilePath)
    /// A unix socket in front of a vsock muxer: the client sends `CONNECT <port>\n`, the muxer
    /// answers `OK <n>\n`, then the stream is the guest's port.
    case hybridVsock(FilePath, port: UInt32)
    /// AF_VSOCK.
    case vsock(cid: UInt32, port: UInt32)
    /// A character device (virtio-serial port in the guest, a pty on the host); put in raw mode.
    case serial(FilePath)

    /// Parses an address; the error says which spellings are accepted.
    ///
    /// - Parameter text: `unix:PATH`, `hvsock:PATH:PORT`, `vsock:CID:PORT` or `serial:PATH`.
    /// - Throws: `invalidAddress`, saying what is wrong.
    public init(parsing text: String) throws(AgentError) {
        func bad(_ why: String) -> AgentError {
            AgentError(.invalidAddress, "\"\(text)\" is not an agent address (\(why)); use unix:PATH, hvsock:PATH:PORT, vsock:CID:PORT or serial:PATH")
        }
        func strip(_ s: Substring) -> Substring { s.hasPrefix("//") ? s.dropFirst(2) : s }
        func path(_ s: Substring) throws(AgentError) -> FilePath {
            // "unix:///run/x" and "unix:/run/x" both mean /run/x.
            var p = String(s)
            while p.hasPrefix("//") { p.removeFirst() }
            guard p.hasPrefix("/"), !p.utf8.contains(0) else { throw bad("the path must be absolute") }
            return FilePath(p)
        }
        func port(_ s: Substring) throws(AgentError) -> UInt32 {
            guard let v = UInt32(s) else { throw bad("\"\(s)\" is not a port number") }
            return v
        }
        if text.hasPrefix("/") {
            self = .unix(try path(Substring(text)))
            return
        }
        guard let colon = text.firstIndex(of: ":") else { throw bad("no scheme") }
        let scheme = text[..<colon]
        let rest = text[text.index(after: colon)...]
        switch scheme {
        case "unix":
            self = .unix(try path(rest))
        case "serial":
            self = .serial(try path(rest))
        case "hvsock":
            guard let last = rest.lastIndex(of: ":") else { throw bad("missing :PORT") }
            self = .hybridVsock(try path(rest[..<last]), port: try port(rest[rest.index(after: last)...]))
        case "vsock":
            let body = strip(rest)
            guard let last = body.lastIndex(of: ":"), let cid = UInt32(body[..<last]) else { throw bad("expected vsock:CID:PORT") }
            self = .vsock(cid: cid, port: try port(body[body.index(after: last)...]))
        default:
            throw bad("unknown scheme \"\(scheme)\"")
        }
    }

    /// The address in the form it is parsed from (`unix:PATH`, `hvsock:PATH:PORT`, `vsock:CID:PORT`, `serial:PATH`).
    public var description: String {
        switch self {
        case .unix(let p): "unix:\(p)"
        case .hybridVsock(let p, let port): "hvsock:\(p):\(port)"
        case .vsock(let cid, let port): "vsock:\(cid):\(port)"
        case .serial(let p): "serial:\(p)"
        }
    }
}
