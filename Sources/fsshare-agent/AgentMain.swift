#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareGuestAgent
import FSShareSystem
import SystemPackage

/// `fsshare-agent --share-dir DIR --listen ADDRESS [--quiet]`: the guest agent (see README).
@main
enum AgentMain {
    static func say(_ text: String) {
        try? Sys.writeAll(.standardError, Array(text.utf8), path: "<stderr>")
    }

    static func usage(_ why: String) -> Never {
        say("""
            fsshare-agent: \(why)
            usage: fsshare-agent [--share-dir DIR] [--listen ADDRESS] [--quiet]
              --share-dir DIR   the only directory writes may land in
                                (default /run/kata-containers/shared/containers)
              --listen ADDRESS  unix:PATH, hvsock:PATH:PORT (unix socket with the CONNECT handshake),
                                vsock:CID:PORT (any CID), or serial:PATH (a virtio-serial port)
                                (default vsock:4294967295:1024, Kata's agent port)

            """)
        exit(2)
    }

    static func main() {
        var shareDir = "/run/kata-containers/shared/containers"
        var listen = "vsock:4294967295:1024"
        var quiet = false
        var args = CommandLine.arguments.dropFirst()
        while let a = args.popFirst() {
            switch a {
            case "--share-dir":
                guard let v = args.popFirst() else { usage("--share-dir needs a value") }
                shareDir = v
            case "--listen":
                guard let v = args.popFirst() else { usage("--listen needs a value") }
                listen = v
            case "--quiet": quiet = true
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
            let address = try AgentAddress(parsing: listen)
            let agent = try GuestAgent(shareDir: shareDir, log: log)
            try agent.run(listening: address)
        } catch {
            say("fsshare-agent: \(error)\n")
            exit(1)
        }
    }
}
