#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Kata's `watchable-bind` mirror for shared-filesystem sandboxes.
///
/// Neither virtio-fs nor 9p delivers inotify events to the guest, so a pod that reloads its
/// configuration on inotify never sees a configmap update through the plain share. Kata's answer:
/// the runtime sends a `watchable-bind` storage whose mount point is under
/// `<guest shared dir>/watchable/` (runtime-rs: `…/passthrough/watchable/`), the agent mounts a
/// tmpfs there, copies the volume into it, and the container binds the copy instead of the share.
///
/// fsshare emits that storage exactly as Kata's Go runtime does (`source` the guest path of the
/// ordinary share, `fstype` `bind`, the OCI options), for configmap, secret, projected and
/// downward-API volumes within ``SharerConfiguration/watchableLimits`` (Kata: configmaps and
/// secrets only, at most 8 entries at the runtime, 16 entries and 1 MiB at the agent). Beyond a
/// limit the volume is shared plainly and ``SharedFile/watchableFallback`` says why.
///
/// Who writes the mirror:
/// - **fsshare-agent** (it has `fsshare.GuestFiles`) copies the volume once when it mounts the
///   storage; from then on `fsshare watch` pushes every kubelet update through the agent channel
///   in atomic-writer order, so guest inotify sees `IN_MOVED_TO ..data` as on the host.
/// - **Kata's agent** polls the share every 2 s into its mirror and cannot be told to stop. A
///   second writer would race it on `..data` (and Kata's poll rewrites files in place), so fsshare
///   leaves a Kata agent's mirror alone: the watcher sees that the agent has no
///   `fsshare.GuestFiles` and stops mirroring that volume with that reason.
public enum WatchableVolumes {
    /// Kata agent's limits for one watchable storage (`MAX_ENTRIES_PER_STORAGE`,
    /// `MAX_SIZE_PER_WATCHABLE_MOUNT`): directories (the volume's own included), files and
    /// symlinks; file sizes plus symlink lengths.
    public static let kataLimits = WatchLimits(maxEntries: 16, maxBytes: 1 << 20)

    /// The directory under the mounts directory whose guest view the agent covers with its tmpfs.
    public static let directoryName: FilePath = "watchable"

    /// The `watchable-bind` storage for a volume shared at `shareGuestPath`.
    ///
    /// - Parameters:
    ///   - shareGuestPath: the plain share's guest path (the mirror's source).
    ///   - mirrorGuestPath: the mirror's guest path (the container's mount source).
    ///   - options: the OCI mount options, as Kata passes them.
    /// - Returns: the `watchable-bind` storage.
    public static func storage(shareGuestPath: String, mirrorGuestPath: String, options: [String]) -> Storage {
        Storages.make(driver: "watchable-bind", source: shareGuestPath, fstype: "bind", options: options, mountPoint: mirrorGuestPath)
    }

    /// Why the volume open at `source` cannot be mirrored within `limits`, or nil when it can.
    /// Counts as Kata's agent does: every directory (the top one included), file and symlink;
    /// bytes of files plus the length of each symlink's target. Never follows a symlink.
    static func overLimit(_ source: DirFD, limits: WatchLimits) throws(FSShareError) -> String? {
        var entries = 1
        var bytes: Int64 = 0
        var pending: [FilePath] = ["."]
        while let dir = pending.popLast() {
            let listed = try sys("cannot list \(source.display(dir))") { () throws(SystemCallError) in try Sys.listDirectory(source, dir) }
            for entry in listed {
                let path = dir == "." ? FilePath(entry.name) : dir.appending(entry.name)
                entries += 1
                if entries > limits.maxEntries {
                    return "more than \(limits.maxEntries) entries (the watchable limit)"
                }
                let st = try sys("cannot stat \(source.display(path))") { () throws(SystemCallError) in try Sys.statx(source, path) }
                switch st.kind {
                case .directory: pending.append(path)
                case .regular, .symlink: bytes += Int64(st.size)
                default: break
                }
                if bytes > limits.maxBytes {
                    return "more than \(limits.maxBytes) bytes (the watchable limit)"
                }
            }
        }
        return nil
    }
}
