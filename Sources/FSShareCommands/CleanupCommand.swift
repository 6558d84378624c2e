#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
@_spi(Blocking) import FSShare
import FSShareSystem
import SystemPackage

struct Cleanup: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a sandbox's mounts and directories (or every sandbox's, with --all).",
        discussion: """
            Works after a crash at any point: unmounts what the manifest lists and anything else mounted \
            in the sandbox's tree, deepest first, verifies, then deletes without ever crossing a mount point. \
            Only a directory whose fsshare manifest proves it is a sandbox is touched: anything else under \
            the root (an operator's folder, another runtime's sandbox, mounts outside sandboxes) is named \
            and left alone. --all cleans every sandbox under the root.

            Examples:
              fsshare cleanup --root /run/fsshare --sandbox pod1
              fsshare cleanup --root /run/fsshare --all
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Sandbox id.") var sandbox: String?
    @Flag(name: .long, help: "Clean every sandbox under the root and unmount leaked mounts.") var all = false

    func validate() throws {
        guard (sandbox != nil) != all else { throw ValidationError("give exactly one of --sandbox or --all") }
    }

    func run() async throws {
        let root = FilePath(common.root)
        guard all else {
            let id = sandbox ?? ""
            let sharer = try LinuxFilesystemSharer(sandboxID: id, configuration: SharerConfiguration(root: root))
            let outcome = try sharer.cleanupSync()
            let text: String
            switch outcome {
            case .cleaned: text = "cleaned: \(id)"
            case .nothingToClean: text = "nothing to clean: there is no sandbox \(id) under \(root)"
            case .removedInterruptedPrepare: text = "cleaned: \(id) (only the empty directory of an interrupted prepare was there)"
            }
            if common.json {
                print(JSON.object([
                    ("cleaned", .array(outcome == .nothingToClean ? [] : [.string(id)])),
                    ("nothing_to_clean", .bool(outcome == .nothingToClean)),
                ]).render())
            } else {
                print(text)
            }
            return
        }
        let report = try Inventory.cleanupAll(root: root)
        if common.json {
            print(JSON.object([
                ("cleaned", .array(report.cleaned.map(JSON.string))),
                ("removed_interrupted_prepares", .array(report.removedInterruptedPrepares.map(JSON.string))),
                ("left_alone", .array(report.leftAlone.map { .object([("name", .string($0.name)), ("reason", .string($0.reason))]) })),
                ("foreign_mounts", .array(report.foreignMounts.map { .string($0.string) })),
            ]).render())
            return
        }
        let done = report.cleaned + report.removedInterruptedPrepares
        print(done.isEmpty ? "nothing to clean under \(root)" : "cleaned: \(done.joined(separator: " "))")
        for entry in report.leftAlone { print("left alone: \(root.appending(entry.name)): not an fsshare sandbox (\(entry.reason))") }
        for mount in report.foreignMounts { print("left alone: mount \(mount) (outside any fsshare sandbox)") }
    }
}
