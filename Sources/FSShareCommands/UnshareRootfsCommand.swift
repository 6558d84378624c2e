#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
@_spi(Blocking) import FSShare
import FSShareSystem
import SystemPackage

struct UnshareRootfs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unshare-rootfs",
        abstract: "Undo share-rootfs for a container (any kind; a layer goes with its last user). Twice is not an error.",
        discussion: """
            Example:
              fsshare unshare-rootfs --root /run/fsshare --sandbox pod1 --container web
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String

    func run() async throws {
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox, configuration: SharerConfiguration(root: FilePath(common.root), layoutStyle: recorded(common, sandbox)?.layout ?? .go))
        try Identifier.validate(container, what: "container")
        try sharer.unshareSync(name: "\(container)/rootfs")
        try sharer.unshareSync(name: container)
        if common.json { print(JSON.object([("unshared", .bool(true))]).render()) } else { print("unshared") }
    }
}
