#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SystemPackage

extension Scenarios {
    /// Kata's `watchable-bind` on the host side: which shares get it, the exact storage, the
    /// `mounts/watchable/` directory, the limits with their reason, idempotence, both layouts.
    func watchable() {
        let kubelet = KubeletEmulator(root: work + "/kubelet", plugin: "configmap", name: "app")
        kubelet.write(["a.conf": "a\n", "b.conf": "b\n", "c": "c\n"])
        let big = KubeletEmulator(root: work + "/kubelet", plugin: "secret", name: "many")
        big.write(Dictionary(uniqueKeysWithValues: (0..<7).map { ("k\($0)", "v\($0)\n") }))
        let projected = KubeletEmulator(root: work + "/kubelet", plugin: "projected", name: "token")
        projected.write(["token": "t\n"])
        let plainDir = work + "/plain"
        mkdirs(plainDir)

        for style in [SandboxLayoutStyle.go, .runtimeRS] {
            let label = style.rawValue
            var c = config(style: style)
            c.sharedFilesystem = .virtioFS()
            let sid = "watch-\(label)"
            guard let sharer = checks.must("\(label): sharer", { try LinuxFilesystemSharer(sandboxID: sid, configuration: c) }),
                  checks.must("\(label): prepare", { try sharer.prepareSync() }) != nil else { return }
            let web = Container(id: "web", rootfs: .guestPull(image: "x"))
            let m = Mount(source: FilePath(kubelet.volume), destination: "/etc/app", options: ["ro", "rbind"])
            guard let shared = checks.must("\(label): share a configmap", { try sharer.shareFileSync(container: web, mount: m) }), let shared else { return }
            let name = String(shared.guestPath.split(separator: "/").last ?? "")
            let guestShared = "/run/kata-containers/shared/containers/" + (style == .go ? "" : "passthrough/")
            checks.check(shared.guestPath == guestShared + "watchable/" + name, "\(label): the container's path is the mirror (\(shared.guestPath))")
            let want = WatchableVolumes.storage(shareGuestPath: guestShared + name, mirrorGuestPath: guestShared + "watchable/" + name, options: ["ro", "rbind"])
            checks.check(shared.volumeStorages == [want], "\(label): Storage{watchable-bind, source: the share's guest path, fstype: bind, the OCI options, mount_point: the mirror} (\(shared.volumeStorages))")
            checks.check(want.driver == "watchable-bind" && want.fstype == "bind" && want.driverOptions.isEmpty, "\(label): Kata's driver and fstype")
            let dir = sharer.layout.mountsDirectory.appending("watchable")
            let st = try? Sys.statx(nil, dir)
            checks.check(st?.kind == .directory && (st?.mode ?? 0) & 0o7777 == 0o750, "\(label): \(dir) is a 0750 directory the export shows (\(String(st?.mode ?? 0, radix: 8)))")
            checks.check(readFile(sharer.layout.mountsDirectory.appending(name).appending("a.conf").string) == "a\n", "\(label): the plain share is mounted as before")
            let again = try? sharer.shareFileSync(container: web, mount: m)
            checks.check(again?.guestPath == shared.guestPath && again?.volumeStorages == shared.volumeStorages, "\(label): sharing again returns the same mirror and storage")
            let record = (try? sharer.sharesSync())?.first { $0.record.name == name }?.record
            checks.check(record?.watched == true && record?.kind == .volume, "\(label): the manifest records the volume as watched")

            // Over Kata's 16 entries: 7 keys are 2*7+3 = 17.
            let mb = Mount(source: FilePath(big.volume), destination: "/etc/many", options: ["ro"])
            let over = try? sharer.shareFileSync(container: web, mount: mb)
            checks.check(over?.volumeStorages.isEmpty == true && over?.guestPath.contains("/watchable/") == false,
                         "\(label): a secret over the entry limit is shared plainly (\(over?.guestPath ?? "nil"))")
            checks.check(over?.watchableFallback?.contains("more than 16 entries") == true, "\(label): with the reason (\(over?.watchableFallback ?? "none"))")
            // Projected volumes are watched too (Kata: configmaps and secrets only).
            let mp = Mount(source: FilePath(projected.volume), destination: "/var/run/secrets/token")
            let token = try? sharer.shareFileSync(container: web, mount: mp)
            checks.check(token?.volumeStorages.first?.driver == "watchable-bind", "\(label): a projected volume gets a mirror too")
            // Anything else: a plain share and no note.
            let plain = try? sharer.shareFileSync(container: web, mount: Mount(source: FilePath(plainDir), destination: "/data"))
            checks.check(plain?.volumeStorages.isEmpty == true && plain?.watchableFallback == nil, "\(label): an ordinary directory is shared plainly, without a note")
            _ = checks.must("\(label): unshare the configmap") { try sharer.unshareFileSync(container: web, mount: m) }
            _ = checks.must("\(label): cleanup") { try sharer.cleanupSync() }
        }

        // Mirrors turned off, and a higher limit.
        var off = config()
        off.watchableLimits = nil
        if let sharer = try? LinuxFilesystemSharer(sandboxID: "watch-off", configuration: off), (try? sharer.prepareSync()) != nil {
            let r = try? sharer.shareFileSync(container: Container(id: "web", rootfs: .guestPull(image: "x")), mount: Mount(source: FilePath(kubelet.volume), destination: "/etc/app"))
            checks.check(r?.volumeStorages.isEmpty == true && r?.watchableFallback?.contains("turned off") == true, "mirrors off: plain share with the reason (\(r?.watchableFallback ?? "none"))")
            _ = try? sharer.cleanupSync()
        }
        var wide = config()
        wide.watchableLimits = WatchLimits(maxEntries: 64, maxBytes: 1 << 20)
        if let sharer = try? LinuxFilesystemSharer(sandboxID: "watch-wide", configuration: wide), (try? sharer.prepareSync()) != nil {
            let r = try? sharer.shareFileSync(container: Container(id: "web", rootfs: .guestPull(image: "x")), mount: Mount(source: FilePath(big.volume), destination: "/etc/many"))
            checks.check(r?.volumeStorages.first?.driver == "watchable-bind", "a configured limit of 64 entries mirrors the 7-key secret")
            _ = try? sharer.cleanupSync()
        }

        // A symlink planted at mounts/watchable is replaced, never followed.
        if let sharer = try? LinuxFilesystemSharer(sandboxID: "watch-planted", configuration: config()), (try? sharer.prepareSync()) != nil {
            let outside = work + "/outside"
            mkdirs(outside)
            let planted = sharer.layout.mountsDirectory.appending("watchable").string
            _ = try? Sys.symlinkat(outside, nil, FilePath(planted))
            let r = try? sharer.shareFileSync(container: Container(id: "web", rootfs: .guestPull(image: "x")), mount: Mount(source: FilePath(kubelet.volume), destination: "/etc/app"))
            let st = try? Sys.statx(nil, FilePath(planted))
            checks.check(r?.volumeStorages.count == 1 && st?.kind == .directory, "a symlink planted at mounts/watchable is replaced by the directory (\(st.map { "\($0.kind)" } ?? "missing"))")
            checks.check((try? Sys.listDirectory(nil, FilePath(outside)))?.isEmpty == true, "nothing was made where the planted link pointed")
            _ = try? sharer.cleanupSync()
        }
        expectNothingLeft("watchable")
    }
}
