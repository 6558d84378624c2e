#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareSystem
import FSShareTestSupport
import SystemPackage

/// The adversarial scenarios: a guest that can write anywhere in the sandbox tree (as one with
/// a read-write share of the root's parent could) plants symbolic links at every name fsshare
/// uses, before and between operations; operators' folders sit under the root. Every case ends
/// with the same proof: nothing outside the root changed (a checksummed snapshot and the mount
/// table), and cleanup left no mount and no entry under the root.
extension Scenarios {
    enum ShareKind: String, CaseIterable {
        case rw, ro, file, recursiveRO = "recursive-ro", rootfs, block
    }

    enum Phase: String, CaseIterable {
        case beforeShare = "before share", beforeUnshare = "before unshare", beforeCleanup = "before cleanup"
    }

    /// Where the planted links point: an absolute directory, an absolute file, a relative path
    /// climbing out of the root, a dangling path, an empty directory (a mount target).
    func linkTargets(outside: String, depth: Int) -> [(String, String)] {
        [
            ("absolute-dir", outside + "/victim"),
            ("absolute-file", outside + "/victim/data"),
            ("relative-dir", String(repeating: "../", count: depth) + "outside/victim"),
            ("dangling", outside + "/nothing-here"),
            ("empty-dir", outside + "/empty"),
        ]
    }

    /// Plants a symlink at `sandboxDir/rel`: an existing entry is moved aside (what a guest can
    /// do to a directory that is not itself a mount point); a mount point cannot be replaced.
    /// The planting itself never follows a symlink (an earlier plant may be on the path).
    /// Returns false when nothing could be planted there.
    func plant(_ sandboxDir: String, _ rel: String, target: String) -> Bool {
        guard let top = try? Sys.openat(nil, FilePath(sandboxDir), flags: Sys.oPath | Sys.oDirectory | Sys.oNoFollow) else { return false }
        defer { Sys.close(top) }
        var dir = DirFD(fd: top, path: FilePath(sandboxDir))
        var opened: [FileDescriptor] = []
        defer { opened.forEach { Sys.close($0) } }
        let parts = rel.split(separator: "/").map(String.init)
        for part in parts.dropLast() {
            _ = try? Sys.mkdirat(dir, FilePath(part), mode: 0o755)
            guard let fd = try? Sys.openat2(dir, FilePath(part), flags: Sys.oPath | Sys.oDirectory, resolve: Sys.resolveNoSymlinks) else { return false }
            opened.append(fd)
            dir = DirFD(fd: fd, path: dir.display(FilePath(part)))
        }
        guard let leaf = parts.last else { return false }
        if let st = try? Sys.statx(dir, FilePath(leaf)) {
            if st.isMountRoot { return false }
            var n = 0
            while (try? Sys.statx(dir, FilePath("\(leaf).guest-moved-\(n)"))) != nil { n += 1 }
            guard (try? Sys.renameat(dir, FilePath(leaf), FilePath("\(leaf).guest-moved-\(n)"))) != nil else { return false }
        }
        return (try? Sys.symlinkat(target, dir, FilePath(leaf))) != nil
    }

    func adversary() {
        let src = sources()
        let outside = work + "/outside"
        mkdirs(outside + "/victim/inner")
        mkdirs(outside + "/empty")
        writeFile(outside + "/victim/data", "precious")
        writeFile(outside + "/victim/inner/more", "more precious")
        mkdirs(work + "/src/rootfs/etc")
        writeFile(work + "/src/rootfs/etc/os-release", "rootfs")
        mountSubmount(src.rec)
        // Everything outside the root: the sources, the victim tree, and the mount table.
        let before = digest(work).filter { !$0.key.hasPrefix("/root") }
        let mountsBefore = mountsOutside(root)

        let cid = "c"
        var style = SandboxLayoutStyle.go
        func volumeName(_ kind: ShareKind) -> String {
            (try? ShareNaming.volumeName(containerID: cid, destination: FilePath("/\(kind.rawValue)"), style: style)) ?? "?"
        }
        func share(_ kind: ShareKind, _ s: LinuxFilesystemSharer) throws {
            let c = Container(id: cid, rootfs: .hostMounted(FilePath(work + "/src/rootfs")))
            switch kind {
            case .rw: _ = try s.shareFileSync(container: c, mount: Mount(source: FilePath(src.rw), destination: "/rw"))
            case .ro: _ = try s.shareFileSync(container: c, mount: Mount(source: FilePath(src.ro), destination: "/ro", options: ["ro"]))
            case .file: _ = try s.shareFileSync(container: c, mount: Mount(source: FilePath(src.file), destination: "/file", options: ["ro"]))
            case .recursiveRO:
                _ = try s.shareFileSync(container: c, mount: Mount(source: FilePath(src.rec), destination: "/recursive-ro", options: ["ro", "rbind"]))
            case .rootfs: _ = try s.shareRootFilesystemSync(container: c)
            case .block:
                _ = try s.shareRootFilesystemSync(container: Container(id: cid, rootfs: .blockDevice(BlockDevice(address: "0:0:0:1", fstype: "ext4"))))
            }
        }
        func unshare(_ kind: ShareKind, _ s: LinuxFilesystemSharer) throws {
            let c = Container(id: cid, rootfs: .hostMounted("/"))
            switch kind {
            case .rw, .ro, .file, .recursiveRO:
                try s.unshareFileSync(container: c, mount: Mount(source: "/", destination: FilePath("/\(kind.rawValue)")))
            case .rootfs: try s.unshareRootFilesystemSync(container: c)
            case .block:
                try s.unshareRootFilesystemSync(container: Container(id: cid, rootfs: .blockDevice(BlockDevice(address: "0:0:0:1", fstype: "ext4"))))
            }
        }
        /// Where the share of `kind` is visible in the export when it worked.
        func exported(_ kind: ShareKind, _ sandboxDir: String) -> String {
            let shown = sandboxDir + "/" + style.exportedMountsPath.string
            switch kind {
            case .rootfs: return shown + "/\(cid)/rootfs/etc/os-release"
            case .block: return shown + "/\(cid)/rootfs"
            case .rw: return shown + "/\(volumeName(kind))"
            case .ro: return shown + "/\(volumeName(kind))/key"
            case .file: return shown + "/\(volumeName(kind))"
            case .recursiveRO: return shown + "/\(volumeName(kind))/sub/deep"
            }
        }
        /// fsshare's own directories (replacing one makes the export stale: refusals allowed).
        var ownDirectories: [String] { style == .go ? ["mounts"] : ["rw", "rw/passthrough"] }
        func targets(_ kind: ShareKind) -> [String] {
            let m = style.mountsPath.string
            switch kind {
            case .rootfs, .block: return ownDirectories + ["private", "\(m)/\(cid)", "\(m)/\(cid)/rootfs"]
            default: return ownDirectories + ["private", "\(m)/\(volumeName(kind))", "private/\(volumeName(kind))"]
            }
        }

        var cases = 0, failures = 0, plantedCount = 0, refusedOps = 0
        var n = 0
        for (method, layout) in [(MountMethod.newAPI, SandboxLayoutStyle.go), (.legacy, .go), (.newAPI, .runtimeRS)] {
            style = layout
            for kind in ShareKind.allCases where !(kind == .recursiveRO && method == .legacy) {
                for phase in Phase.allCases {
                    // Every single name, then all of them at once.
                    // Deepest names first, so the leaf links land in fsshare's directories before
                    // those are replaced in turn.
                    let all = targets(kind).sorted { $0.split(separator: "/").count > $1.split(separator: "/").count }
                    for target in targets(kind).map({ [$0] }) + [all] {
                        let depth = 2 + (target.count == 1 ? target[0].split(separator: "/").count - 1 : 0)
                        for (linkName, link) in linkTargets(outside: outside, depth: depth) where target.count == 1 || linkName == "absolute-dir" {
                            n += 1
                            cases += 1
                            let sid = "adv\(n)"
                            let sandboxDir = root + "/" + sid
                            let what = "\(method.rawValue) \(layout.rawValue) \(kind.rawValue), \(linkName) link at \(target.joined(separator: "+")) \(phase.rawValue)"
                            var notes: [String] = []
                            func fresh() -> LinuxFilesystemSharer? { try? LinuxFilesystemSharer(sandboxID: sid, configuration: config(method, style: layout)) }
                            func plantAll() {
                                for rel in target {
                                    let d = 2 + rel.split(separator: "/").count - 1
                                    let l = linkName == "relative-dir" ? String(repeating: "../", count: d) + "outside/victim" : link
                                    if plant(sandboxDir, rel, target: l) { plantedCount += 1 }
                                }
                            }
                            func attempt(_ label: String, _ body: (LinuxFilesystemSharer) throws -> Void) -> Bool {
                                guard let s = fresh() else { notes.append("\(label): no sharer"); return false }
                                do {
                                    try body(s)
                                    return true
                                } catch let e as FSShareError {
                                    refusedOps += 1
                                    if e.message.isEmpty { notes.append("\(label): an error without a sentence") }
                                    return false
                                } catch {
                                    notes.append("\(label): unexpected error type \(error)")
                                    return false
                                }
                            }
                            guard attempt("prepare", { try $0.prepareSync() }) else {
                                checks.check(false, "\(what): prepare")
                                continue
                            }
                            if phase == .beforeShare { plantAll() }
                            let shared = attempt("share") { try share(kind, $0) }
                            if shared && !exists(exported(kind, sandboxDir)) && kind != .block {
                                notes.append("share reported success but \(exported(kind, sandboxDir)) is not in the export")
                            }
                            // A link planted at fsshare's own leaf names before the share is removed
                            // and replaced: the share must work. Only a replaced mounts/ (which the
                            // export no longer shows) may refuse.
                            if phase == .beforeShare && !target.contains(where: ownDirectories.contains) && !shared {
                                notes.append("share failed although only leaf names were planted")
                            }
                            if phase == .beforeUnshare { plantAll() }
                            _ = attempt("unshare") { try unshare(kind, $0) }
                            if phase == .beforeCleanup { plantAll() }
                            let cleaned = attempt("cleanup") { try $0.cleanupSync() }
                            if !cleaned { notes.append("cleanup failed") }
                            let mountsLeft = mountsUnder(root)
                            if !mountsLeft.isEmpty { notes.append("mounts left: \(mountsLeft)") }
                            if !entries(root).isEmpty { notes.append("entries left: \(entries(root))") }
                            let after = digest(work).filter { !$0.key.hasPrefix("/root") }
                            if after != before {
                                let changed = Set(after.keys).symmetricDifference(before.keys).union(after.keys.filter { before[$0] != nil && before[$0] != after[$0] })
                                notes.append("outside the root changed: \(changed.sorted().prefix(5))")
                            }
                            if mountsOutside(root) != mountsBefore { notes.append("the mount table outside the root changed") }
                            if !notes.isEmpty {
                                failures += 1
                                checks.check(false, "\(what): \(notes.joined(separator: "; "))")
                                // Leave the next case a clean root.
                                _ = try? LinuxFilesystemSharer(sandboxID: sid, configuration: config(method, style: layout)).cleanupSync()
                            }
                        }
                    }
                }
            }
        }
        checks.check(failures == 0, "\(cases) adversarial cases (\(plantedCount) links planted, \(refusedOps) operations refused with a clear error): nothing outside the root changed, nothing mounted outside it, cleanup left nothing")
        _ = try? Sys.umount2(FilePath(src.rec + "/sub"), flags: Int32(MNT_DETACH))
        print("figure: adversarial cases \(cases), links planted \(plantedCount), operations refused \(refusedOps)")
    }

    // MARK: foreign directories under the root

    func foreign() {
        let src = sources()
        mkdirs(root)
        // An operator's folder with data, a folder with a non-id name, a file, a symlink to
        // data outside, an empty directory, and one holding someone else's mount.
        mkdirs(root + "/userdata/sub")
        writeFile(root + "/userdata/f", "precious")
        writeFile(root + "/userdata/sub/g", "precious too")
        mkdirs(root + "/.hidden")
        writeFile(root + "/.hidden/x", "x")
        writeFile(root + "/README", "operator notes")
        mkdirs(work + "/elsewhere")
        writeFile(work + "/elsewhere/keep", "keep")
        symlink(work + "/elsewhere", root + "/linked")
        mkdirs(root + "/mounted")
        writeFile(src.ro + "/under-mount", "u")
        _ = checks.must("someone else's mount under the root") {
            try Sys.mount(source: FilePath(src.ro), target: FilePath(root + "/mounted"), flags: UInt(MS_BIND))
        }
        // A directory holding a manifest of another sandbox, and one whose manifest is a hard
        // link to a file outside (a guest's trick to make fsshare append to it).
        mkdirs(root + "/copied")
        writeFile(root + "/copied/manifest", Manifest_header("other"))
        writeFile(root + "/copied/data", "d")
        mkdirs(root + "/linkedmanifest")
        writeFile(work + "/elsewhere/victim", Manifest_header("linkedmanifest"))
        link(work + "/elsewhere/victim", root + "/linkedmanifest/manifest")
        // A real sandbox beside them.
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "real", configuration: config()) else { return }
        _ = checks.must("prepare a real sandbox beside foreign folders") {
            try sharer.prepareSync()
            _ = try sharer.shareFileSync(container: Container(id: "c", rootfs: .hostMounted("/")), mount: Mount(source: FilePath(src.rw), destination: "/d"))
        }
        let before = digest(root).filter { !$0.key.hasPrefix("/real") }
        let outsideBefore = digest(work + "/elsewhere")

        let inv = checks.must("status reads the root") { try Inventory.read(root: FilePath(root)) }
        checks.check(inv?.sandboxes.map(\.id) == ["real"], "only the real sandbox is a sandbox (\(inv?.sandboxes.map(\.id) ?? []))")
        let foreignNames = Set(inv?.foreign.map(\.name) ?? [])
        checks.check(foreignNames == [".hidden", "README", "copied", "linked", "linkedmanifest", "mounted", "userdata"],
                     "every other entry is named foreign (\(foreignNames.sorted()))")
        checks.check(inv?.foreignMounts.map(\.string) == [root + "/mounted"], "the mount outside sandboxes is foreign, not leaked (\(inv?.foreignMounts ?? []))")
        checks.check(inv?.leakedMounts.isEmpty == true, "no leaked mounts")

        // cleanup --sandbox on each foreign entry: refused, nothing changed.
        for name in ["userdata", "copied", "linkedmanifest", "linked", "mounted"] {
            let e = checks.mustFail("cleanup --sandbox \(name) is refused") {
                try LinuxFilesystemSharer(sandboxID: name, configuration: config()).cleanupSync()
            }
            checks.check((e as? FSShareError)?.code == .refused, "\(name): refused, with a reason (\(e.map { "\($0)" } ?? ""))")
            let p = checks.mustFail("prepare --sandbox \(name) is refused (it would adopt the folder)") {
                try LinuxFilesystemSharer(sandboxID: name, configuration: config()).prepareSync()
            }
            checks.check((p as? FSShareError)?.code == .refused, "\(name): prepare refused")
        }
        checks.check(digest(root).filter { !$0.key.hasPrefix("/real") } == before, "refused cleanups and prepares changed nothing under the root")
        // cleanup --all: the sandbox goes, everything else stays exactly as it was.
        let report = checks.must("cleanup --all") { try Inventory.cleanupAll(root: FilePath(root)) }
        checks.check(report?.cleaned == ["real"], "cleanup --all cleaned the sandbox (\(report?.cleaned ?? []))")
        checks.check(Set(report?.leftAlone.map(\.name) ?? []) == foreignNames, "cleanup --all names what it left alone")
        checks.check(!exists(root + "/real"), "the sandbox is gone")
        checks.check(digest(root) == before, "every foreign entry is untouched, byte for byte")
        checks.check(mountsUnder(root) == [root + "/mounted"], "the foreign mount is still mounted (\(mountsUnder(root)))")
        checks.check(digest(work + "/elsewhere") == outsideBefore && readFile(work + "/elsewhere/victim") == Manifest_header("linkedmanifest"),
                     "the file hard-linked as a manifest was not appended to")
        // An empty folder with a sandbox-id name is an operator's too: fsshare never makes a
        // sandbox directory without its manifest, so it is left alone and never adopted.
        mkdirs(root + "/emptyfolder")
        let e = checks.mustFail("prepare --sandbox emptyfolder is refused (an empty folder is not a sandbox)") {
            try LinuxFilesystemSharer(sandboxID: "emptyfolder", configuration: config()).prepareSync()
        }
        checks.check((e as? FSShareError)?.code == .refused, "refused")
        // What a prepare killed before its rename leaves, and a look-alike holding data.
        mkdirs(root + "/.late.fsshare-prepare")
        writeFile(root + "/.late.fsshare-prepare/manifest", Manifest_header("late"))
        mkdirs(root + "/.fake.fsshare-prepare")
        writeFile(root + "/.fake.fsshare-prepare/data", "someone's")
        let before2 = digest(root).filter { !$0.key.hasPrefix("/.late.") }
        let i2 = checks.must("status names the interrupted prepare") { try Inventory.read(root: FilePath(root)) }
        checks.check(i2?.foreign.first { $0.name == ".late.fsshare-prepare" }?.interruptedPrepare == true, "a preparing directory holding only its manifest is an interrupted prepare")
        checks.check(i2?.foreign.first { $0.name == ".fake.fsshare-prepare" }?.interruptedPrepare == false, "one holding anything else is not")
        checks.check(i2?.foreign.first { $0.name == "emptyfolder" }?.interruptedPrepare == false, "an empty id-named folder is not")
        let r2 = checks.must("cleanup --all again") { try Inventory.cleanupAll(root: FilePath(root)) }
        checks.check(r2?.removedInterruptedPrepares == [".late.fsshare-prepare"] && !exists(root + "/.late.fsshare-prepare"), "cleanup --all removed the interrupted prepare")
        checks.check(digest(root) == before2, "and nothing else: the empty folder and the look-alike stay")
        mkdirs(root + "/.again.fsshare-prepare")
        let r3 = checks.must("cleanup --sandbox removes its own interrupted prepare") {
            try LinuxFilesystemSharer(sandboxID: "again", configuration: config()).cleanupSync()
        }
        checks.check(r3 == .removedInterruptedPrepare && !exists(root + "/.again.fsshare-prepare"), "and says so")
        mkdirs(root + "/.redo.fsshare-prepare")
        _ = checks.must("prepare over its own interrupted prepare") {
            let s = try LinuxFilesystemSharer(sandboxID: "redo", configuration: config())
            try s.prepareSync()
            try s.cleanupSync()
        }
        checks.check(digest(root) == before2, "prepare finished and cleanup removed it; the rest is unchanged")
        // A prepare whose preparing name is taken by a look-alike (not what a killed prepare
        // leaves) refuses, and touches nothing.
        let fake = checks.mustFail("prepare over a look-alike of its preparing directory") {
            try LinuxFilesystemSharer(sandboxID: "fake", configuration: config()).prepareSync()
        }
        let refusal = fake as? FSShareError
        checks.check(refusal?.code == .refused && digest(root) == before2, "refused (\(refusal?.message ?? "")); the look-alike and the rest unchanged")
        // Nothing to clean.
        let nothing = checks.must("cleanup of a sandbox that does not exist") {
            try LinuxFilesystemSharer(sandboxID: "nope", configuration: config()).cleanupSync()
        }
        checks.check(nothing == .nothingToClean, "says there was nothing to clean")
        _ = try? Sys.umount2(FilePath(root + "/mounted"), flags: Int32(MNT_DETACH))
    }

    func Manifest_header(_ sid: String) -> String { "fsshare-manifest 1\t\(sid)\n" }

    // MARK: a kernel that cannot say "is this a mount point"

    /// Run in a child whose statx probe is made to fail (FSSHARE_FAULTS=statx_mount_root=ENOSYS):
    /// every operation must refuse with `unsupported`, and change nothing.
    func mountProbeChild() {
        let src = sources()
        let before = digest(work)
        let e1 = checks.mustFail("prepare refuses") { try LinuxFilesystemSharer(sandboxID: "p", configuration: config()).prepareSync() }
        let e2 = checks.mustFail("cleanup refuses") { try LinuxFilesystemSharer(sandboxID: "p", configuration: config()).cleanupSync() }
        let e3 = checks.mustFail("status refuses") { _ = try Inventory.read(root: FilePath(root)) }
        let e4 = checks.mustFail("cleanup --all refuses") { try Inventory.cleanupAll(root: FilePath(root)) }
        let e5 = checks.mustFail("share refuses") {
            _ = try LinuxFilesystemSharer(sandboxID: "p", configuration: config()).shareFileSync(
                container: Container(id: "c", rootfs: .hostMounted("/")), mount: Mount(source: FilePath(src.rw), destination: "/d"))
        }
        for (i, e) in [e1, e2, e3, e4].enumerated() {
            let f = e as? FSShareError
            checks.check(f?.code == .unsupported && f?.message.contains("STATX_ATTR_MOUNT_ROOT") == true, "operation \(i + 1): unsupported, naming the kernel feature (\(f?.message.prefix(80) ?? "-"))")
        }
        checks.check(e5 != nil, "share fails too")
        checks.check(digest(work) == before, "nothing changed on disk")
    }

    func mountProbe() {
        let src = sources()
        // A sandbox prepared on a capable kernel, then a "kernel" that cannot answer.
        guard let sharer = try? LinuxFilesystemSharer(sandboxID: "p", configuration: config()) else { return }
        _ = checks.must("prepare + share") {
            try sharer.prepareSync()
            _ = try sharer.shareFileSync(container: Container(id: "c", rootfs: .hostMounted("/")), mount: Mount(source: FilePath(src.rw), destination: "/d"))
        }
        let mounts = mountsUnder(root)
        let r = run([selfPath, "mount-probe-child", work], environment: ["FSSHARE_FAULTS": "statx_mount_root=ENOSYS"])
        print(r.output)
        checks.check(r.status == 0, "every operation refused without the mount-point answer (child exit \(r.status))")
        checks.check(mountsUnder(root) == mounts, "the sandbox's mounts are untouched")
        _ = checks.must("cleanup with the capable kernel") { try sharer.cleanupSync() }
        expectNothingLeft("after cleanup")
    }
}
