#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareSystem
import SystemPackage

struct Prepare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a sandbox's share tree and print its sandbox storages.",
        discussion: """
            Makes <root>/<sandbox>/{mounts,shared,private}: the sandbox directory becomes a shared \
            mount of its own, shared/ a read-only slave bind of mounts/ (export it with virtiofsd or 9p). \
            Idempotent. Prints the storages for CreateSandbox.

            Example:
              fsshare prepare --root /run/fsshare --sandbox pod1 --shm-size 67108864 --json
            """)
    @OptionGroup var common: CommonOptions
    @OptionGroup var hypervisor: HypervisorOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Descriptor output: json, binary (length-delimited protobuf) or text.") var format: DescriptorFormat?
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: agent.apply(hypervisor.configuration(root: common.root, recorded: known), known, sharedFSGiven: hypervisor.sharedFS != nil),
            agent: try agent.client(known))
        if hypervisor.sharedFS == .virtio9p {
            writeAll(fd: 2, Array("fsshare: warning: Kata's agent removed its 9p storage handler in 3.29 and refuses this storage (\"Failed to find the storage handler\"); use virtio-fs with a Kata agent. 9p storages are for agents that still mount them, such as fsshare-agent.\n".utf8))
        }
        let storages = try await sharer.prepare()
        try emit(common, format: format, fields: [
            ("sandbox", .string(sandbox)),
            ("shared_dir", .string(sharer.layout.sharedDirectory.string)),
            ("mounts_dir", .string(sharer.layout.mountsDirectory.string)),
        ], storages: storages, text: ["prepared sandbox \(sandbox): export \(sharer.layout.sharedDirectory)"])
    }
}
