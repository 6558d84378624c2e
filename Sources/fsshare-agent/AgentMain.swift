#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareGuestAgent
import FSShareSystem
import SystemPackage

/// `fsshare-agent --share-dir DIR --listen ADDRESS... [--checks] [--quiet]`: the guest agent
/// (see README).
@main
enum AgentMain {
    static func say(_ text: String) {
        try? Sys.writeAll(.standardError, Array(text.utf8), path: "<stderr>")
    }

    static func usage(_ why: String) -> Never {
        say("""
            fsshare-agent: \(why)
            usage: fsshare-agent [--share-dir DIR] [--listen ADDRESS]... [--checks] [--quiet]
              --share-dir DIR   the only directory copy-mode writes may land in
                                (default /run/kata-containers/shared/containers)
              --listen ADDRESS  unix:PATH, hvsock:PATH:PORT (unix socket with the CONNECT handshake),
                                vsock:CID:PORT (any CID), serial:PATH (a character device), or
                                vport:NAME (the virtio-serial port QEMU named NAME); repeatable,
                                each address served on its own thread
                                (default vsock:4294967295:1024, Kata's agent port)
              --checks          also serve fsshare.GuestCheck (in-guest probes for tests and
                                demos; they follow symlinks anywhere, so off by default)

            """)
        exit(2)
    }

    static func main() {
        var shareDir = "/run/kata-containers/shared/containers"
        var listen: [String] = []
        var quiet = false
        var checks = false
        var args = CommandLine.arguments.dropFirst()
        while let a = args.popFirst() {
            switch a {
            case "--share-dir":
                guard let v = args.popFirst() else { usage("--share-dir needs a value") }
                shareDir = v
            case "--listen":
                guard let v = args.popFirst() else { usage("--listen needs a value") }
                listen.append(v)
            case "--quiet": quiet = true
            case "--checks": checks = true
            case "-h", "--help": usage("serves CopyFile and fsshare.GuestFiles over ttrpc")
            default: usage("unknown argument \(a)")
            }
        }
        // The host is the only client: the socket and the files this agent makes are not
        // usable by others unless a request's mode says so.
        umask(0o077)
        signal(SIGPIPE, SIG_IGN)
        let log: @Sendable (String) -> Void
        if quiet {
            log = { _ in }
        } else {
            log = { line in say("fsshare-agent: \(line)\n") }
        }
        do {
            let addresses = try (listen.isEmpty ? ["vsock:4294967295:1024"] : listen).map(resolve)
            let agent = try GuestAgent(shareDir: shareDir, checks: checks, log: log)
            for address in addresses.dropFirst() {
                try OSThread.detach {
                    do { try agent.run(listening: address) } catch { fail(error) }
                }
            }
            if let first = addresses.first { try agent.run(listening: first) }
        } catch {
            fail(error)
        }
    }

    static func fail(_ error: any Error) -> Never {
        say("fsshare-agent: \(error)\n")
        exit(1)
    }

    /// `vport:NAME` becomes `serial:/dev/vportNpM`; the rest is parsed as an agent address.
    static func resolve(_ text: String) throws -> AgentAddress {
        guard text.hasPrefix("vport:") else { return try AgentAddress(parsing: text) }
        let name = String(text.dropFirst("vport:".count))
        guard let device = GuestAgent.virtioPort(named: name, timeout: .seconds(10)) else {
            throw AgentError(.unreachable, "no virtio-serial port named \(name) in /sys/class/virtio-ports after 10 s")
        }
        return .serial(device)
    }
}
