#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
@_spi(Blocking) import FSShare
import FSShareSystem
import SystemPackage

struct Unshare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Undo a volume share. Unsharing twice is not an error.",
        discussion: """
            Example:
              fsshare unshare --root /run/fsshare --sandbox pod1 --container web --destination /data
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String
    @Option(name: .long, help: "The container destination given to share.") var destination: String
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: agent.apply(SharerConfiguration(root: FilePath(common.root), layoutStyle: known?.layout ?? .go), known),
            agent: try agent.client(known))
        let c = Container(id: container, rootfs: .hostMounted("/"))
        let outcome = try sharer.unshareFileSync(container: c, mount: Mount(source: "/", destination: FilePath(destination)))
        switch outcome {
        case .removed:
            if common.json { print(JSON.object([("unshared", .bool(true))]).render()) } else { print("unshared") }
        case .leftInGuest(let guestPath):
            let why = "the agent has no removal RPC (Kata's AgentService), so the copy stays in the guest at \(guestPath) until the VM goes"
            if common.json {
                print(JSON.object([("unshared", .bool(true)), ("left_in_guest", .string(guestPath)), ("note", .string(why))]).render())
            } else {
                print("unshared; \(why)")
            }
        }
    }
}
