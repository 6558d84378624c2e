import SystemPackage

/// The host and guest paths of one sandbox, in Kata's Go layout (``SandboxLayoutStyle/go``):
///
/// ```
/// <root>/<sid>/            self-bind, shared propagation (its own peer group)
/// <root>/<sid>/manifest    the crash-safety journal (not exported)
/// <root>/<sid>/mounts/     where shares are attached (writable by the host only)
/// <root>/<sid>/shared/     read-only slave bind of mounts/: what virtiofsd / 9p exports
/// <root>/<sid>/private/    staging binds (legacy read-only method), never exported
/// ```
///
/// or runtime-rs's (``SandboxLayoutStyle/runtimeRS``): shares under `rw/passthrough/`, and
/// `ro/` the read-only slave bind of `rw/` that is exported.
public struct SandboxLayout: Sendable, Equatable {
    /// The host directory holding one subdirectory per sandbox.
    public var root: FilePath
    /// The sandbox.
    public var sandboxID: String
    /// Where the guest mounts the shared filesystem.
    public var guestSharedDir: String { didSet { sharePathPrefix = Self.sharePathPrefix(guestSharedDir, style) } }
    /// Kata's Go layout or runtime-rs's.
    public var style: SandboxLayoutStyle { didSet { sharePathPrefix = Self.sharePathPrefix(guestSharedDir, style) } }
    /// What every share's guest path begins with (`<guestSharedDir>/<prefix>`), when
    /// appending a name is all ``guestPath(_:)`` has to do; else nil. Kept with the two above.
    private var sharePathPrefix: String?

    private static func sharePathPrefix(_ guestSharedDir: String, _ style: SandboxLayoutStyle) -> String? {
        let slash = UInt8(ascii: "/")
        let base = guestSharedDir.utf8
        // A base ending in at most one slash (Kata's default ends in one); else as joinGuest does it.
        guard base.count > 1, base.last != slash || base[base.index(base.endIndex, offsetBy: -2)] != slash else { return nil }
        return guestSharedDir + (base.last == slash ? "" : "/") + style.guestPrefix
    }

    /// The layout of sandbox `sandboxID` under `root`, in `style`, seen by the guest at `guestSharedDir`.
    ///
    /// - Parameters:
    ///   - root: the sandbox root.
    ///   - sandboxID: the sandbox.
    ///   - guestSharedDir: where the guest mounts the shared filesystem.
    ///   - style: Kata's Go layout or runtime-rs's.
    public init(
        root: FilePath, sandboxID: String, guestSharedDir: String = SharerConfiguration.defaultGuestSharedDir,
        style: SandboxLayoutStyle = .go
    ) {
        self.root = root
        self.sandboxID = sandboxID
        self.guestSharedDir = guestSharedDir
        self.style = style
        self.sharePathPrefix = Self.sharePathPrefix(guestSharedDir, style)
    }

    /// `<root>/<sid>`: the sandbox's own directory (bound onto itself).
    public var sandboxDirectory: FilePath { root.appending(sandboxID) }
    /// Where shares are attached.
    public var mountsDirectory: FilePath { sandboxDirectory.pushing(style.mountsPath) }
    /// The directory the hypervisor exports (virtiofsd `--shared-dir`, 9p `path=`).
    public var sharedDirectory: FilePath { sandboxDirectory.pushing(style.exportPath) }
    /// Staging points of the legacy read-only method; never exported.
    public var privateDirectory: FilePath { sandboxDirectory.appending("private") }
    /// The sandbox's manifest: the crash-safety journal of what it shared (not exported).
    public var manifest: FilePath { sandboxDirectory.appending("manifest") }

    /// The guest path of a share named `name` (a path below the mounts directory).
    ///
    /// - Parameter name: the share's name below the mounts directory.
    public func guestPath(_ name: String) -> String {
        // Every share returns one: the prefix is worked out once per layout, and a name without
        // a leading slash (always, in practice) is appended to it; else as joinGuest does it.
        guard let sharePathPrefix, !name.isEmpty, name.utf8.first != UInt8(ascii: "/") else {
            return Storages.joinGuest(guestSharedDir, style.guestPrefix, name)
        }
        return sharePathPrefix + name
    }
    /// The guest path of the `watchable-bind` mirror of a share named `name`
    /// (`…/containers/watchable/<name>`; runtime-rs `…/containers/passthrough/watchable/<name>`).
    ///
    /// - Parameter name: the volume share's name.
    public func watchableGuestPath(_ name: String) -> String {
        Storages.joinGuest(guestSharedDir, style.guestPrefix + WatchableVolumes.directoryName.string + "/" + name)
    }
    /// The host path of a share named `name`.
    ///
    /// - Parameter name: the share's name below the mounts directory.
    public func hostPath(_ name: String) -> FilePath { mountsDirectory.appending(name) }
}
