#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareProto
import FSShareSystem
import SystemPackage

/// Recognises kubelet atomic-writer volumes by their path:
/// `…/volumes/kubernetes.io~{configmap,secret,projected,downward-api}/<name>`, under any kubelet
/// root (the check is on the last three components, so `/var/lib/kubelet`, k0s' root and a
/// symlinked root all match; callers test both the path given and the resolved one).
public enum KubeletVolume {
    public static let plugins: Set<String> = [
        "kubernetes.io~configmap", "kubernetes.io~secret", "kubernetes.io~projected", "kubernetes.io~downward-api",
    ]

    /// The plugin and volume name when `path` names an atomic-writer volume directory.
    public static func match(_ path: FilePath) -> (plugin: String, name: String)? {
        let c = path.lexicallyNormalized().components.map(\.string)
        guard c.count >= 3, c[c.count - 3] == "volumes", plugins.contains(c[c.count - 2]) else { return nil }
        return (c[c.count - 2], c[c.count - 1])
    }
}

/// Per-volume limits of the watcher, with a clear fallback: a volume over a limit keeps the last
/// content mirrored, stops being mirrored, and the watcher reports why (Kata's agent instead
/// switches to a bind mount at 16 entries / 1 MiB).
public struct WatchLimits: Sendable, Equatable {
    /// Files, directories and symlinks in one update.
    public var maxEntries: Int
    /// Bytes of file content in one update.
    public var maxBytes: Int64

    public init(maxEntries: Int = 4096, maxBytes: Int64 = 64 << 20) {
        self.maxEntries = maxEntries
        self.maxBytes = maxBytes
    }
}

/// Mirrors one kubelet atomic-writer volume into the guest, in the order that keeps every
/// reader safe:
///
/// 1. copy the new timestamped directory `..<ts>` completely (files land by temp + rename);
/// 2. point `..data` at it atomically (`..data_tmp` symlink, then rename over `..data`);
/// 3. add the user-visible key links (`key -> ..data/key`) that are new;
/// 4. remove keys that are gone and every other timestamped directory.
///
/// A reader in the guest therefore sees the old complete content or the new complete content,
/// never a dangling `..data`, a missing key (before its deletion) or a torn file. Nested items
/// (`a/b`) keep their layout. The host side is read with `*at` calls, never following links.
struct AtomicWriterMirror {
    /// What the guest holds after the last successful sync (nil: unknown, e.g. after a restart).
    struct GuestState: Sendable, Equatable {
        var timestampDir: String
        var keys: [String: String]
    }

    enum Outcome: Equatable {
        /// The guest already had this content.
        case unchanged
        /// Synced; `copied` entries were sent.
        case synced(timestampDir: String, entries: Int, bytes: Int64)
        /// The volume has no `..data` link: not (or no longer) an atomic-writer volume.
        case notAtomicWriter
        /// `..data` names a directory that is gone (the volume is being deleted): nothing done.
        case dangling
    }

    let volume: DirFD
    let guestDir: String
    let limits: WatchLimits
    var copier = GuestCopier()

    /// Brings the guest in line with the host volume. `state` is updated on success.
    func sync(agent: AgentClient, state: inout GuestState?, force: Bool, report: inout CopyReport) throws(FSShareError) -> Outcome {
        // Retried when kubelet swaps again and deletes the directory being copied.
        var attempts = 0
        while true {
            attempts += 1
            do throws(FSShareError) {
                report = CopyReport()
                return try syncOnce(agent: agent, state: &state, force: force, report: &report)
            } catch {
                let raced = error.code == .conflict || error.systemCall?.errno == .noSuchFileOrDirectory
                if raced && attempts < 5 { continue }
                if raced { throw FSShareError(.conflict, "\(volume.path) kept changing during the copy (superseded)") }
                throw error
            }
        }
    }

    private func syncOnce(agent: AgentClient, state: inout GuestState?, force: Bool, report: inout CopyReport) throws(FSShareError) -> Outcome {
        let target: String
        do {
            target = try Sys.readlinkat(volume, "..data")
        } catch {
            if error.errno == .noSuchFileOrDirectory || error.errno == .invalidArgument { return .notAtomicWriter }
            throw FSShareError.system("cannot read \(volume.display("..data"))", error)
        }
        guard target.hasPrefix(".."), !target.contains("/"), target != ".." else {
            throw FSShareError(.refused, "\(volume.display("..data")) points at \"\(target)\", not a timestamped directory of the volume")
        }

        // The user-visible keys: every top-level entry not starting with "..".
        let top = try sys("cannot list \(volume.path)") { () throws(SystemCallError) in try Sys.listDirectory(volume, ".") }
        var keys: [String: String] = [:]
        for entry in top where !entry.name.hasPrefix("..") {
            let link = try sys("cannot read \(volume.display(FilePath(entry.name)))") { () throws(SystemCallError) in
                try Sys.readlinkat(volume, FilePath(entry.name))
            }
            keys[entry.name] = link
        }
        // A key is gone only when kubelet's current data no longer has it. A link missing while
        // its entry is still in the timestamped directory is a volume being torn down (or a
        // kubelet mid-write), not a removed key: the guest keeps it.
        if let previous = state {
            let missing = previous.keys.filter { keys[$0.key] == nil }
            if !missing.isEmpty {
                // No timestamped directory behind ..data: the volume is being removed. Mirror
                // nothing; kubelet's next swap (or the deletion) is seen as an event.
                guard let current = try? Sys.listDirectory(volume, FilePath(target)) else { return .dangling }
                let names = Set(current.map(\.name))
                for (key, link) in missing where names.contains(key) { keys[key] = link }
            }
        }
        if !force, let state, state.timestampDir == target, state.keys == keys { return .unchanged }

        let tsFD = try sys("cannot open \(volume.display(FilePath(target)))") { () throws(SystemCallError) in
            try Sys.openat(volume, FilePath(target), flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow)
        }
        defer { Sys.close(tsFD) }
        let ts = DirFD(fd: tsFD, path: volume.display(FilePath(target)))
        let st = try sys("cannot stat \(ts.path)") { () throws(SystemCallError) in try Sys.fstatx(tsFD, path: ts.path) }
        var copier = self.copier
        copier.limits = limits
        let guestDir = self.guestDir
        let volumeStatus = try sys("cannot stat \(volume.path)") { () throws(SystemCallError) in try Sys.fstatx(volume.fd, path: volume.path) }
        let previous = state
        // With an agent that honours batches, the whole sync is one batch and one round trip:
        // a failed step makes the agent refuse every later one, so nothing is published on top
        // of a failure. Otherwise each step waits for the previous one's replies.
        let batched: Bool
        do {
            batched = try agent.features().contains("Batches")
        } catch {
            throw FSShareError.agent("cannot mirror \(volume.path) into the guest at \(guestDir)", error)
        }
        // Errors of our own (host reads) are carried past the agent-typed pipeline closure.
        var hostError: FSShareError?
        func host<T>(_ body: () throws(FSShareError) -> T) throws(AgentError) -> T {
            do {
                return try body()
            } catch {
                hostError = error
                throw error.asAgentError
            }
        }
        do {
            try agent.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
                if batched { p.beginBatch() }
                // 0. The volume directory itself (first sync only).
                if previous == nil {
                    try host { () throws(FSShareError) in
                        try copier.send(&p, copier.request(guestDir, volumeStatus, mode: UInt32(S_IFDIR)), path: volume.path)
                    }
                }
                // 1. The new timestamped directory, completely.
                try host { () throws(FSShareError) in
                    try copier.copyDirectory(ts, status: st, to: guestDir + "/" + target, pipeline: &p, report: &report)
                }
                if !batched { try p.flush() }
                // kubelet deletes a timestamped directory only after ..data has moved off it:
                // if ..data still names it now, everything read above was intact.
                let now = try host { () throws(FSShareError) in
                    try sys("cannot read \(volume.display("..data"))") { () throws(SystemCallError) in try Sys.readlinkat(volume, "..data") }
                }
                guard now == target else {
                    hostError = FSShareError(.conflict, "\(volume.path) was updated again during the copy")
                    throw AgentError(.remote, "raced")
                }
                // 2. The atomic switch.
                var link = copier.request(guestDir + "/..data_tmp", volumeStatus, mode: UInt32(S_IFLNK))
                link.fileMode = UInt32(S_IFLNK) | 0o777
                link.data = Data(target.utf8)
                try p.send(TTRPC.agentService, TTRPC.copyFileMethod, link)
                var rename = Fsshare_RenamePathRequest()
                rename.from = guestDir + "/..data_tmp"
                rename.to = guestDir + "/..data"
                try p.send(TTRPC.guestFilesService, "RenamePath", rename)
                if !batched { try p.flush() }
                // 3. New key links (kubelet's links; their targets are under ..data).
                for (key, linkTarget) in keys.sorted(by: { $0.key < $1.key }) where previous?.keys[key] != linkTarget {
                    var k = copier.request(guestDir + "/" + key, volumeStatus, mode: UInt32(S_IFLNK))
                    k.fileMode = UInt32(S_IFLNK) | 0o777
                    k.data = Data(linkTarget.utf8)
                    try p.send(TTRPC.agentService, TTRPC.copyFileMethod, k)
                    report.symlinks += 1
                }
                if !batched { try p.flush() }
                // 4. Deleted keys and every other timestamped directory.
                let removedKey = previous.map { !Set($0.keys.keys).subtracting(keys.keys).isEmpty } ?? true
                if removedKey || previous?.timestampDir != target {
                    var prune = Fsshare_PruneDirectoryRequest()
                    prune.path = guestDir
                    prune.keep = ["..data", target] + keys.keys.sorted()
                    try p.send(TTRPC.guestFilesService, "PruneDirectory", prune)
                }
            }
        } catch {
            if let hostError, hostError.code == .limitExceeded {
                // Over a limit mid-copy: nothing was published; take back the partial directory
                // (never the one ..data names in the guest).
                if let previous, previous.timestampDir != target { try? agent.removePath(guestDir + "/" + target, recursive: true) }
                throw FSShareError(
                    .limitExceeded,
                    "\(volume.path) has \(hostError.message), over the watch limits (\(limits.maxEntries) entries, \(limits.maxBytes) bytes)")
            }
            if let hostError { throw hostError }
            throw FSShareError.agent("cannot mirror \(volume.path) into the guest at \(guestDir)", error)
        }
        state = GuestState(timestampDir: target, keys: keys)
        return .synced(timestampDir: target, entries: report.entriesSeen, bytes: report.bytes)
    }
}
