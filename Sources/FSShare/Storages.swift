import FSShareProto

/// Pure builders for the Kata agent `Storage` descriptors fsshare emits. Field values follow
/// Kata's Go runtime (`kata_agent.go`, `fs_share_linux.go`) so a Kata agent accepts them.
public enum Storages {
    /// The guest path of the sandbox `/dev/shm`.
    public static let guestShmPath = "/run/kata-containers/sandbox/shm"
    /// The guest directory under which guest-pulled and block "layer" rootfs live.
    public static let guestContainersRoot = "/run/kata-containers"

    /// The sandbox-level storages sent in `CreateSandbox`: the shared filesystem and shm.
    ///
    /// - Parameter config: the sandbox's configuration.
    /// - Returns: the shared-filesystem storage (none in copy mode) and the shm storage (when `shmSize` > 0).
    public static func sandbox(_ config: SharerConfiguration) -> [Storage] {
        var result: [Storage] = []
        switch config.sharedFilesystem {
        case .virtioFS(let dax):
            result.append(make(
                driver: "virtio-fs", source: config.mountTag, fstype: "virtiofs",
                options: dax ? ["dax"] : [], mountPoint: config.guestSharedDir))
        case .virtio9p(let msize):
            result.append(make(
                driver: "9p", source: config.mountTag, fstype: "9p",
                options: ["trans=virtio,version=9p2000.L,cache=mmap", "nodev", "msize=\(msize)"],
                mountPoint: config.guestSharedDir))
        case .none:
            break
        }
        if config.shmSize > 0 {
            result.append(make(
                driver: "ephemeral", source: "shm", fstype: "tmpfs",
                options: ["noexec", "nosuid", "nodev", "mode=1777", "size=\(config.shmSize)"],
                mountPoint: guestShmPath))
        }
        return result
    }

    /// The storage for a block-device rootfs (Kata's case 6): driver and source by block driver,
    /// mount point `<guest shared dir>/<cid>`, `nouuid` for xfs.
    ///
    /// - Parameters:
    ///   - containerID: the container.
    ///   - device: the attached device and its filesystem.
    ///   - driver: the block driver (decides the storage driver and source form).
    ///   - guestSharedDir: the guest's shared directory (the mount point is below it).
    /// - Returns: the block storage, read-write, `nouuid` added for xfs.
    public static func blockRootfs(containerID: String, device: BlockDevice, driver: BlockDeviceDriver, guestSharedDir: String) -> Storage {
        make(
            driver: driver.storageDriver, source: device.address, fstype: device.fstype,
            options: device.fstype == "xfs" ? ["nouuid"] : [],
            mountPoint: joinGuest(guestSharedDir, containerID))
    }

    /// The storage for an image rootfs: Kata's block rootfs storage for the disk the runtime
    /// attached, mounted read-only with the image's detected filesystem.
    ///
    /// - Parameters:
    ///   - containerID: the container.
    ///   - deviceAddress: the attached disk's guest address, in the block driver's form.
    ///   - image: what the image was recognised as.
    ///   - driver: the block driver.
    ///   - guestSharedDir: the guest's shared directory (the mount point is below it).
    /// - Returns: the block storage with `ro`.
    public static func imageRootfs(
        containerID: String, deviceAddress: String, image: RootfsImage, driver: BlockDeviceDriver, guestSharedDir: String
    ) -> Storage {
        make(
            driver: driver.storageDriver, source: deviceAddress, fstype: image.filesystemType, options: ["ro"],
            mountPoint: joinGuest(guestSharedDir, containerID))
    }

    /// Kata's option asking its agent for a writable overlay whose upper and work directories it
    /// makes on the guest's own `/run` (`/run/kata-containers/<cid>/upper`, `work`).
    public static let overlayRWOption = "io.katacontainers.fs-opt.overlay-rw"

    /// The storage for a layered rootfs: Kata's `overlayfs` storage as its runtimes send it
    /// for layer rootfs (driver `overlayfs`, fstype `overlay`), mounted at
    /// `/run/kata-containers/<cid>/rootfs`. Without `upper` the agent makes the writable layer
    /// in the guest (``overlayRWOption``, the tardev-snapshotter form); with it, the upper and
    /// work directories are named as in Kata's nydus form (`index=off`: the work directory's
    /// index would pin inode numbers a shared filesystem does not keep stable).
    ///
    /// - Parameters:
    ///   - containerID: the container.
    ///   - lowerGuestPaths: the layers' guest paths, **lowest first**.
    ///   - upper: the guest paths of the upper and work directories, or nil for a guest-side upper.
    /// - Returns: the `overlayfs` storage.
    public static func layeredRootfs(containerID: String, lowerGuestPaths: [String], upper: (upperdir: String, workdir: String)?) -> Storage {
        // overlayfs lists the topmost layer first.
        let lowerdir = "lowerdir=" + lowerGuestPaths.reversed().joined(separator: ":")
        let options = upper.map { ["upperdir=\($0.upperdir)", "workdir=\($0.workdir)", lowerdir, "index=off"] } ?? [overlayRWOption, lowerdir]
        return make(driver: "overlayfs", source: "none", fstype: "overlay", options: options, mountPoint: layeredRootfsPath(containerID))
    }

    /// `/run/kata-containers/<cid>/rootfs`: where a layered rootfs is assembled in the guest.
    ///
    /// - Parameter containerID: the container.
    public static func layeredRootfsPath(_ containerID: String) -> String {
        "\(guestContainersRoot)/\(containerID)/rootfs"
    }

    /// The storage for a guest-pulled rootfs (Kata's case 1).
    ///
    /// - Parameters:
    ///   - containerID: the container.
    ///   - image: the image reference the guest pulls.
    ///   - annotations: the pull's metadata.
    /// - Returns: the `image_guest_pull` storage.
    public static func guestPullRootfs(containerID: String, image: String, annotations: [String: String]) -> Storage {
        make(
            driver: "image_guest_pull", driverOptions: ["image_guest_pull=" + imagePullJSON(annotations)],
            source: image, fstype: "overlay", mountPoint: guestPullRootfsPath(containerID))
    }

    /// `/run/kata-containers/<cid>/rootfs`.
    ///
    /// - Parameter containerID: the container.
    public static func guestPullRootfsPath(_ containerID: String) -> String {
        "\(guestContainersRoot)/\(containerID)/rootfs"
    }

    /// Joins guest path components the way Go's `filepath.Join` does for these inputs.
    ///
    /// - Parameters:
    ///   - base: a guest directory (a trailing slash is fine).
    ///   - parts: components to append.
    /// - Returns: the joined path, with single slashes.
    public static func joinGuest(_ base: String, _ parts: String...) -> String {
        // On UTF-8 bytes (O(1) for native strings): no Character (grapheme) walk.
        let slash = UInt8(ascii: "/")
        var result = base
        while result.utf8.count > 1 && result.utf8.last == slash { result.removeLast() }
        // One allocation: this runs on every share (the guest path it returns).
        result.reserveCapacity(parts.reduce(result.utf8.count) { $0 + 1 + $1.utf8.count })
        for part in parts where !part.isEmpty {
            if result.utf8.last != slash { result.append("/") }
            result.append(part)
        }
        return result
    }

    static func make(
        driver: String, driverOptions: [String] = [], source: String, fstype: String,
        options: [String] = [], mountPoint: String
    ) -> Storage {
        var s = Storage()
        s.driver = driver
        s.driverOptions = driverOptions
        s.source = source
        s.fstype = fstype
        s.options = options
        s.mountPoint = mountPoint
        return s
    }

    /// `{"metadata":{...}}` with sorted keys and Go's `encoding/json` escaping, so the bytes
    /// match what Kata's Go runtime sends.
    static func imagePullJSON(_ metadata: [String: String]) -> String {
        var out = "{\"metadata\":{"
        for (i, key) in metadata.keys.sorted().enumerated() {
            if i > 0 { out += "," }
            out += goJSONString(key) + ":" + goJSONString(metadata[key] ?? "")
        }
        return out + "}}"
    }

    /// A JSON string literal escaped as Go's `json.Marshal` does (HTML-safe).
    ///
    /// - Parameter s: the string to encode.
    /// - Returns: the JSON string literal, quotes included.
    public static func goJSONString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "<", ">", "&", "\u{2028}", "\u{2029}":
                out += "\\u" + hex4(scalar.value)
            default:
                if scalar.value < 0x20 { out += "\\u" + hex4(scalar.value) } else { out.unicodeScalars.append(scalar) }
            }
        }
        return out + "\""
    }

    private static func hex4(_ v: UInt32) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int((v >> 12) & 0xF)], digits[Int((v >> 8) & 0xF)], digits[Int((v >> 4) & 0xF)], digits[Int(v & 0xF)]])
    }
}
