#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareProto
import FSShareSystem
import SystemPackage

/// Recognises kubelet atomic-writer volumes by their path:
/// `…/volumes/kubernetes.io~{configmap,secret,projected,downward-api}/<name>`, under any kubelet
/// root (the check is on the last three components, so `/var/lib/kubelet`, k0s' root and a
/// symlinked root all match; callers test both the path given and the resolved one).
public enum KubeletVolume {
    /// The kubelet volume plugins that write through the atomic writer.
    public static let plugins: Set<String> = [
        "kubernetes.io~configmap", "kubernetes.io~secret", "kubernetes.io~projected", "kubernetes.io~downward-api",
    ]

    /// False when `path` cannot name (or lie below) an atomic-writer volume: every plugin
    /// directory contains `kubernetes.io~`, and most share sources do not. A byte search, far
    /// cheaper than ``match(_:)``, for the hot path of sharing.
    ///
    /// - Parameter path: a path as given.
    public static func mayName(_ path: String) -> Bool {
        // Over the string's own UTF-8 (searching `String.UTF8View` element by element cost
        // about a thousand instructions per share).
        var path = path
        return path.withUTF8 { s in
            pluginMarker.withUnsafeBufferPointer { m in
                guard let text = s.baseAddress, let marker = m.baseAddress, s.count >= m.count else { return false }
                // memchr for the marker's first byte, memcmp for the rest.
                let last = s.count - m.count
                var i = 0
                while i <= last, let hit = memchr(text + i, Int32(marker[0]), last - i + 1) {
                    let at = text.distance(to: hit.assumingMemoryBound(to: UInt8.self))
                    if memcmp(text + at, marker, m.count) == 0 { return true }
                    i = at + 1
                }
                return false
            }
        }
    }

    private static let pluginMarker = Array("kubernetes.io~".utf8)

    /// The plugin and volume name when `path` names an atomic-writer volume directory.
    ///
    /// - Parameter path: a directory path.
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

    /// Limits of `maxEntries` entries and `maxBytes` bytes per update (defaults far above Kata's 16 / 1 MiB).
    ///
    /// - Parameters:
    ///   - maxEntries: files, directories and symlinks in one update.
    ///   - maxBytes: bytes of file content in one update.
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
/// 4. remove keys that are gone and every timestamped directory older than the one `..data`
///    named before this sync. That one stays until the next sync: a reader that resolved
///    `..data` just before the switch (a lookup of `key -> ..data/key` is several steps) still
///    finds its files, where pruning it at once would fail that open with ENOENT.
///
/// A reader in the guest therefore sees the old complete content or the new complete content,
/// never a dangling `..data`, a missing key (before its deletion) or a torn file. Nested items
/// (`a/b`) keep their layout. The host side is read with `*at` calls, never following links.
///
/// With nothing but Kata's `AgentService` (no `fsshare.GuestFiles`), step 2 is a `CopyFile` of
/// the `..data` symlink, which Kata's agent applies as unlink + symlink: between those two
/// calls, inside the agent, `..data` is missing. Files are still never torn (Kata writes them
/// beside and renames), new keys still appear only once their data is there, and step 4 is
/// skipped (Kata has no removal): old data directories and removed keys stay in the guest.
///
/// A directory is never rewritten once `..data` may name it: a sync whose host directory the
/// guest may already hold (after a restart, a failed step or a lost reply) copies into a fresh
/// guest name and switches to that.
package struct AtomicWriterMirror {
    /// What the guest holds after the last successful sync (nil: nothing known, e.g. after a
    /// restart: the next sync sends everything).
    package struct GuestState: Sendable, Equatable {
        /// The guest directory `..data` names.
        package var timestampDir: String
        /// The host directory it mirrors (kubelet's `..data` target).
        package var hostTarget: String
        package var keys: [String: String]
        /// A later sync failed part-way (or its reply was lost): the guest may hold any part of
        /// it. The next sync copies into a fresh directory and re-sends what it may have undone.
        package var uncertain = false
    }

    package enum Outcome: Equatable {
        /// The guest already had this content.
        case unchanged
        /// Synced; `copied` entries were sent.
        case synced(timestampDir: String, entries: Int, bytes: Int64)
        /// The volume has no `..data` link: not (or no longer) an atomic-writer volume.
        case notAtomicWriter
        /// `..data` names a directory that is gone (the volume is being deleted): nothing done.
        case dangling
    }

    /// Steps the agent could not take (Kata's agent has no removal RPC), for one log line.
    package var skippedRemoval: ((String) -> Void)?

    let volume: DirFD
    let guestDir: String
    let limits: WatchLimits
    package var copier = GuestCopier()
    /// The guest directory does not exist yet (a share's first copy): the host's directory
    /// name can be used as it is.
    package var firstCopy = false

    package init(volume: DirFD, guestDir: String, limits: WatchLimits) {
        self.volume = volume
        self.guestDir = guestDir
        self.limits = limits
    }

    /// Brings the guest in line with the host volume. `state` is updated on success.
    package func sync(agent: AgentClient, state: inout GuestState?, force: Bool, report: inout CopyReport) throws(FSShareError) -> Outcome {
        // Retried when kubelet swaps again and deletes the directory being copied.
        var attempts = 0
        while true {
            attempts += 1
            do throws(FSShareError) {
                report = CopyReport()
                return try syncOnce(agent: agent, state: &state, force: force, report: &report)
            } catch {
                // An agent step failed or its reply was lost: the guest may hold any part of
                // this sync, so stop trusting the picture (a host-side race publishes nothing).
                if error.code != .conflict { state?.uncertain = true }
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
                guard let current = try? Sys.listDirectory(volume, FilePath(target)) else {
                    // Gone because kubelet swapped again meanwhile (an ordinary rapid update):
                    // start over on the newer content. Still named by ..data: really dangling.
                    if (try? Sys.readlinkat(volume, "..data")) != target {
                        throw FSShareError(.conflict, "\(volume.path) was updated again while it was read")
                    }
                    return .dangling
                }
                let names = Set(current.map(\.name))
                for (key, link) in missing where names.contains(key) { keys[key] = link }
            }
        }
        if !force, let state, !state.uncertain, state.hostTarget == target, state.keys == keys { return .unchanged }
        // Copy into a name the guest cannot be showing: the host's, unless the guest may
        // already hold that one (published, or half-written by a failed sync).
        let fresh = state == nil || state?.uncertain == true || state?.hostTarget == target || state?.timestampDir == target
        let guestTarget = fresh && (state != nil || !firstCopy)
            ? target + ".fsshare-" + String(Sys.monotonicNanoseconds(), radix: 36) : target

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
        let features: Set<String>
        do {
            features = try agent.features()
        } catch {
            throw FSShareError.agent("cannot mirror \(volume.path) into the guest at \(guestDir)", error)
        }
        let batched = features.contains("Batches")
        let canRename = features.contains("RenamePath")
        let canPrune = features.contains("PruneDirectory")
        let canWriteTree = features.contains("WriteTree")
        let canSetLinks = features.contains("SetLinks")
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
                // 0. The volume directory itself (first sync, or after a failure).
                if previous == nil || previous?.uncertain == true {
                    try host { () throws(FSShareError) in
                        try copier.send(&p, copier.request(guestDir, volumeStatus, mode: UInt32(S_IFDIR)), path: volume.path)
                    }
                }
                // 1. The new timestamped directory, completely.
                if previous == nil || previous?.uncertain == true { try p.barrier() }
                // One WriteTree where the agent has it (the directory appears complete, by a
                // rename, in one request); otherwise entry by entry.
                let tree = canWriteTree ? try host { () throws(FSShareError) in
                    try copier.treeRequest(ts, status: st, to: guestDir + "/" + guestTarget, report: &report)
                } : nil
                if let tree {
                    try p.send(TTRPC.guestFilesService, "WriteTree", tree)
                } else {
                    try host { () throws(FSShareError) in
                        try copier.copyDirectory(ts, status: st, to: guestDir + "/" + guestTarget, pipeline: &p, report: &report)
                    }
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
                // 2. The switch, then 3. the new key links (kubelet's links; their targets are
                //    under ..data). After a failure they are re-sent too where the agent replaces
                //    a link atomically; Kata's agent unlinks first, so a link it already has is
                //    left as it is (it removes nothing, so one sent before is still there).
                let resendAll = previous?.uncertain == true && canRename
                let newKeys = keys.sorted(by: { $0.key < $1.key }).filter { resendAll || previous?.keys[$0.key] != $0.value }
                if canSetLinks {
                    // One request: ..data first, then the keys, each replaced by a rename.
                    var links = Fsshare_SetLinksRequest()
                    links.dir = guestDir
                    links.uid = Int32(bitPattern: volumeStatus.uid)
                    links.gid = Int32(bitPattern: volumeStatus.gid)
                    links.links = ([("..data", guestTarget)] + newKeys.map { ($0.key, $0.value) }).map { name, target in
                        var l = Fsshare_Link()
                        l.name = name
                        l.target = target
                        return l
                    }
                    try p.send(TTRPC.guestFilesService, "SetLinks", links)
                    report.symlinks += newKeys.count
                } else {
                    // The switch: atomic (a rename) where the agent can rename; else Kata's own
                    // replace of the link.
                    var link = copier.request(guestDir + (canRename ? "/..data_tmp" : "/..data"), volumeStatus, mode: UInt32(S_IFLNK))
                    link.fileMode = UInt32(S_IFLNK) | 0o777
                    link.data = Data(guestTarget.utf8)
                    try p.send(TTRPC.agentService, TTRPC.copyFileMethod, link)
                    if canRename {
                        var rename = Fsshare_RenamePathRequest()
                        rename.from = guestDir + "/..data_tmp"
                        rename.to = guestDir + "/..data"
                        try p.send(TTRPC.guestFilesService, "RenamePath", rename)
                    }
                    if !batched { try p.flush() }
                    for (key, linkTarget) in newKeys {
                        var k = copier.request(guestDir + "/" + key, volumeStatus, mode: UInt32(S_IFLNK))
                        k.fileMode = UInt32(S_IFLNK) | 0o777
                        k.data = Data(linkTarget.utf8)
                        try p.send(TTRPC.agentService, TTRPC.copyFileMethod, k)
                        report.symlinks += 1
                    }
                }
                if !batched { try p.flush() }
                // 4. Deleted keys and every other timestamped directory.
                let removedKey = previous.map { $0.uncertain || !Set($0.keys.keys).subtracting(keys.keys).isEmpty } ?? true
                if removedKey || previous?.timestampDir != guestTarget {
                    if canPrune {
                        var prune = Fsshare_PruneDirectoryRequest()
                        prune.path = guestDir
                        // The directory ..data named until now is kept one sync longer (above).
                        let before = previous.map { $0.timestampDir == guestTarget ? [] : [$0.timestampDir] } ?? []
                        prune.keep = ["..data", guestTarget] + before + keys.keys.sorted()
                        try p.send(TTRPC.guestFilesService, "PruneDirectory", prune)
                    } else if let previous {
                        let gone = Set(previous.keys.keys).subtracting(keys.keys).sorted()
                        skippedRemoval?("the agent has no removal RPC (Kata's AgentService): \(previous.timestampDir)"
                            + (gone.isEmpty ? "" : " and the removed keys \(gone.joined(separator: ", "))") + " stay in the guest at \(guestDir)")
                    }
                }
            }
        } catch {
            if let hostError, hostError.code == .limitExceeded {
                // Over a limit mid-copy: nothing was published; take back the partial directory
                // (never the one ..data names in the guest).
                if previous?.timestampDir != guestTarget { try? agent.removePath(guestDir + "/" + guestTarget, recursive: true) }
                throw FSShareError(
                    .limitExceeded,
                    "\(volume.path) has \(hostError.message), over the watch limits (\(limits.maxEntries) entries, \(limits.maxBytes) bytes)")
            }
            if let hostError { throw hostError }
            throw FSShareError.agent("cannot mirror \(volume.path) into the guest at \(guestDir)", error)
        }
        state = GuestState(timestampDir: guestTarget, hostTarget: target, keys: keys)
        return .synced(timestampDir: guestTarget, entries: report.entriesSeen, bytes: report.bytes)
    }
}
