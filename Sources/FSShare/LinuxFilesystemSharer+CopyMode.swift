#if canImport(Glibc)
import Glibc
#endif
import FSShareAgentChannel
import FSShareCore
import FSShareSystem
import FSShareWatch
import Synchronization
import SystemPackage

/// Copy mode (shared filesystem "none"): volumes are copied into the guest through the agent's
/// `CopyFile` (`GuestCopier`), kubelet volumes as an atomic-writer mirror the watcher then keeps
/// in sync (FSShareWatch).
extension LinuxFilesystemSharer {
    /// Copies a volume into the guest (called with both locks held). Idempotent: a completed
    /// copy of the same source is not copied again. On failure the partial guest copy and the
    /// record are removed.
    func copyShare(_ proposed: ShareRecord, handle h: SandboxHandle, policy: SourceSymlinkPolicy, cancellation: CancellationFlag?) throws(FSShareError) -> SharedFile {
        guard let agent else {
            throw FSShareError(.unsupported, "copy mode (shared filesystem \"none\") needs an agent channel; none was given")
        }
        var record = proposed
        record.kind = .copy
        let guestPath = layout.guestPath(record.name)
        record.guestPath = guestPath
        let proposedIsNew = h.manifest.shares[record.name] == nil
        if let existing = h.manifest.shares[record.name] {
            guard existing.source == record.source, existing.readOnly == record.readOnly, existing.kind == .copy else {
                throw FSShareError(.conflict, "\(record.destination) of container \(record.containerID) is already shared from \(existing.source); unshare it first")
            }
            if existing.copied && !existing.leftInGuest {
                if existing.watched { registerWatched(name: existing.name, volume: FilePath(existing.source), guestPath: guestPath, agent: agent, state: nil) }
                return SharedFile(guestPath: guestPath)
            }
        }
        let source = try SourceCheck.open(FilePath(record.source), policy: policy, rootGuard: try h.rootGuard())
        defer { Sys.close(source.fd) }
        record.isFile = source.kind == .regular
        record.resolvedSource = source.resolvedThroughSymlinks?.string
        record.watched = !record.isFile && (KubeletVolume.match(FilePath(record.source)) != nil || KubeletVolume.match(source.path) != nil)
        try h.manifest.recordShare(record)
        var report = CopyReport()
        var mirrored: AtomicWriterMirror.GuestState?
        do throws(FSShareError) {
            var plain = true
            if record.watched {
                var mirror = AtomicWriterMirror(volume: DirFD(fd: source.fd, path: source.path), guestDir: guestPath, limits: watcher?.limits ?? WatchLimits(maxEntries: .max, maxBytes: .max))
                mirror.firstCopy = proposedIsNew
                mirror.copier.cancellation = cancellation
                if case .synced = try mirror.sync(agent: agent, state: &mirrored, force: true, report: &report) { plain = false }
            }
            if plain {
                record.watched = false
                report = try LinuxFilesystemSharer.copyTree(source, to: guestPath, agent: agent, cancellation: cancellation)
            }
        } catch {
            // Roll back: the guest copy (best effort; the agent may be what failed) and the record.
            try? agent.removePath(guestPath, recursive: true)
            try? h.manifest.recordRemoval(record.name)
            throw error
        }
        record.copied = true
        try h.manifest.recordShare(record)
        if record.watched {
            registerWatched(name: record.name, volume: FilePath(record.source), guestPath: guestPath, agent: agent, state: mirrored)
        }
        return SharedFile(guestPath: guestPath, copyReport: report, resolvedSource: record.resolvedSource.map { FilePath($0) })
    }

    /// Removes a copied volume from the guest and forgets it.
    func removeCopy(_ record: ShareRecord, handle h: SandboxHandle) throws(FSShareError) -> UnshareOutcome {
        watcher?.unwatch(sandboxID: sandboxID, name: record.name)
        let guestPath = layout.guestPath(record.name)
        guard let agent else {
            throw FSShareError(.unsupported, "removing the copied volume \(record.name) needs an agent channel")
        }
        if record.leftInGuest { return .leftInGuest(guestPath: guestPath) }
        do {
            try agent.removePath(guestPath, recursive: true)
        } catch {
            guard error.isUnimplemented else { throw FSShareError.agent("cannot remove \(guestPath) from the guest", error) }
            // Kata's agent has no removal RPC: the copy stays until the VM goes (as in Kata).
            // The manifest keeps the record, marked, so status can say so.
            var left = record
            left.leftInGuest = true
            left.watched = false
            try h.manifest.recordShare(left)
            return .leftInGuest(guestPath: guestPath)
        }
        try h.manifest.recordRemoval(record.name)
        return .removed
    }
}

extension LinuxFilesystemSharer {
    /// Copies an opened source (file or directory) to `guestPath` over one pipelined window.
    static func copyTree(_ source: SourceCheck.Opened, to guestPath: String, agent: AgentClient, cancellation: CancellationFlag? = nil) throws(FSShareError) -> CopyReport {
        // O_PATH descriptors cannot be read: reopen the checked object itself for reading.
        let readable = try sys("cannot open \(source.path)") { () throws(SystemCallError) in
            try Sys.openat(nil, MountOps.fdPath(source.fd), flags: O_RDONLY | (source.kind == .directory ? Sys.oDirectory : 0))
        }
        defer { Sys.close(readable) }
        var copier = GuestCopier()
        copier.cancellation = cancellation
        var report = CopyReport()
        var failure: FSShareError?
        do {
            try agent.withPipeline { (p: inout AgentClient.Pipeline) throws(AgentError) in
                do throws(FSShareError) {
                    try copier.copy(readable, shownAs: source.path, to: guestPath, pipeline: &p, report: &report)
                } catch {
                    failure = error
                    throw error.asAgentError
                }
                try p.flush()
                for refused in p.tolerated {
                    report.symlinks -= 1
                    report.skipped.append(.init(path: "", reason: refused.message))
                }
            }
        } catch {
            if let failure { throw failure }
            throw FSShareError.agent("cannot copy \(source.path) into the guest", error)
        }
        return report
    }
}
