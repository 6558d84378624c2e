#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FSShare
import FSShareSystem
import SystemPackage

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List sandboxes, their shares, and leaked mounts under the root.",
        discussion: """
            A leaked mount is a mount point inside a sandbox that its manifest does not account for \
            (cleaning the sandbox removes it). Entries under the root that no fsshare manifest proves to \
            be sandboxes, and mounts outside sandboxes, are listed as foreign: cleanup leaves them alone.

            Example:
              fsshare status --root /run/fsshare --json
            """)
    @OptionGroup var common: CommonOptions
    @Option(name: .long, help: "Only this sandbox.") var sandbox: String?

    func run() async throws {
        var inventory = try Inventory.read(root: FilePath(common.root))
        if let sandbox { inventory.sandboxes = inventory.sandboxes.filter { $0.id == sandbox } }
        if common.json {
            let sandboxes: [JSON] = inventory.sandboxes.map { s in
                .object([
                    ("id", .string(s.id)), ("prepared", .bool(s.prepared)),
                    ("layout", s.recorded.map { .string($0.layout.rawValue) } ?? .null),
                    ("shared_fs", s.recorded?.sharedFilesystem.map(JSON.string) ?? .null),
                    ("agent", s.recorded?.agent.map(JSON.string) ?? .null),
                    ("problem", s.problem.map(JSON.string) ?? .null),
                    ("shares", .array(s.shares.map { share in
                        let r = share.record
                        return .object([
                            ("name", .string(r.name)), ("kind", .string(r.kind.rawValue)), ("container", .string(r.containerID)),
                            ("source", .string(r.source)), ("destination", .string(r.destination)),
                            ("resolved_source", r.resolvedSource.map(JSON.string) ?? .null),
                            ("read_only", .bool(r.readOnly)), ("recursive", .bool(r.recursive)), ("file", .bool(r.isFile)),
                            ("mounted", .bool(share.mounted)), ("left_in_guest", .bool(r.leftInGuest)),
                        ])
                    })),
                ])
            }
            print(JSON.object([
                ("root", .string(inventory.root.string)), ("sandboxes", .array(sandboxes)),
                ("leaked_mounts", .array(inventory.leakedMounts.map { .string($0.string) })),
                ("foreign", .array(inventory.foreign.map {
                    .object([("name", .string($0.name)), ("reason", .string($0.reason)), ("interrupted_prepare", .bool($0.interruptedPrepare))])
                })),
                ("foreign_mounts", .array(inventory.foreignMounts.map { .string($0.string) })),
            ]).render())
            return
        }
        if inventory.sandboxes.isEmpty { print("no sandboxes under \(inventory.root)") }
        for s in inventory.sandboxes {
            var how: [String] = []
            if let r = s.recorded {
                if r.layout != .go { how.append("\(r.layout.rawValue) layout") }
                if r.isCopyMode {
                    how.append("copy mode" + (r.agent.map { ", agent \($0)" } ?? ", no agent recorded yet"))
                } else if let agent = r.agent {
                    how.append("agent \(agent) for watchable mirrors")
                }
            }
            print("sandbox \(s.id): \(s.prepared ? "prepared" : "NOT prepared")\(how.isEmpty ? "" : " (\(how.joined(separator: ", ")))")\(s.problem.map { " (\($0))" } ?? "")")
            for share in s.shares {
                let r = share.record
                let flags = [r.readOnly ? "ro" : "rw", r.recursive ? "recursive" : nil, r.isFile ? "file" : nil,
                             r.leftInGuest ? "unshared, left in the guest (the agent cannot remove)" : nil,
                             r.watched && r.kind == .volume ? "watchable mirror" : nil].compactMap { $0 }
                let source = r.resolvedSource.map { "\(r.source) (resolves to \($0))" } ?? r.source
                print("  \(r.name)  \(r.kind.rawValue) \(flags.joined(separator: ","))  \(source) -> \(r.destination)  \(share.mounted || r.kind == .rootfsDirectory || r.kind == .rootfsImage || r.kind == .rootfsLayers || r.kind == .copy ? "" : "NOT MOUNTED")")
            }
        }
        for leak in inventory.leakedMounts { print("leaked mount: \(leak)") }
        for entry in inventory.foreign where sandbox == nil || entry.name == sandbox {
            print("foreign: \(inventory.root.appending(entry.name)): \(entry.reason)")
        }
        for mount in inventory.foreignMounts where sandbox == nil { print("foreign mount: \(mount)") }
    }
}
