#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareSystem
import SystemPackage

struct Share: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Share a host file or directory (a container volume) into the sandbox.",
        discussion: """
            Binds --source at mounts/<container>-<16 hex>-<basename of destination> and prints the guest \
            path. --ro is read-only before the bind is attached, so it is read-only in the guest too; \
            --recursive carries submounts (read-only all the way down with --ro). Sharing the same \
            container destination again returns the same path and mounts nothing.

            Example:
              fsshare share --root /run/fsshare --sandbox pod1 --container web --source /srv/data --destination /data --ro
            """)
    @OptionGroup var common: CommonOptions
    @OptionGroup var hypervisor: HypervisorOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String
    @Option(name: .long, help: "Container id.") var container: String
    @Option(name: .long, help: "Host path to share.") var source: String
    @Option(name: .long, help: "Where the container mounts it.") var destination: String
    @Flag(name: .long, help: "Read-only (in the guest too).") var ro = false
    @Flag(name: .long, help: "Recursive: carry submounts of the source.") var recursive = false
    @Option(name: .long, help: "Descriptor output: json, binary or text.") var format: DescriptorFormat?
    @OptionGroup var sourceOptions: SourceOptions
    @OptionGroup var agent: AgentOptions

    func run() async throws {
        let known = recorded(common, sandbox)
        let sharer = try LinuxFilesystemSharer(
            sandboxID: sandbox,
            configuration: sourceOptions.apply(agent.apply(hypervisor.configuration(root: common.root, recorded: known), known, sharedFSGiven: hypervisor.sharedFS != nil)),
            agent: try agent.client(known))
        var options: [String] = []
        if ro { options.append("ro") }
        if recursive { options.append("rbind") }
        let mount = Mount(source: FilePath(source), destination: FilePath(destination), options: options)
        let c = Container(id: container, rootfs: .hostMounted("/"))
        guard let shared = try await sharer.shareFile(container: c, mount: mount) else {
            throw FSShareError(.invalidArgument, "\(destination) is not shared: the sandbox's /dev/shm comes from its own shm storage (prepare --shm-size), not from the host")
        }
        let resolved = resolvedLines(shared, source: source)
        var fields: [(String, JSON)] = [("guest_path", .string(shared.guestPath))] + resolved.fields
        var text = [shared.guestPath] + resolved.text
        if let why = shared.watchableFallback {
            fields.append(("watchable_fallback", .string(why)))
            text.append("note: \(why)")
        }
        if let r = shared.copyReport {
            fields.append(("copied", .object([
                ("files", .number(r.files)), ("directories", .number(r.directories)),
                ("symlinks", .number(r.symlinks)), ("bytes", .number(Int(r.bytes))),
                ("skipped", .array(r.skipped.map { .object([("path", .string($0.path)), ("reason", .string($0.reason))]) })),
            ])))
            text.append("copied \(r.files) files, \(r.directories) directories, \(r.symlinks) symlinks, \(r.bytes) bytes")
            text += r.skipped.map { "skipped \($0.path): \($0.reason)" }
        }
        try emit(common, format: format, fields: fields, storages: shared.volumeStorages, text: text)
    }
}
