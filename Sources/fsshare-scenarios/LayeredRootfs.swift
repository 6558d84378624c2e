#if canImport(Glibc)
import Glibc
#endif
@_spi(Blocking) import FSShare
import FSShareProto
import FSShareSystem
import FSShareTestSupport
import SystemPackage

extension Scenarios {
    /// Layered rootfs on the host side: two containers on a three-layer stack sharing two base
    /// layers make exactly one read-only share per layer; the overlayfs storage is Kata's; the
    /// layers as exported (through `shared/`) assemble into the flattened tree, whiteouts and
    /// opaque directories included; unsharing one container keeps the other's layers; refusals
    /// change nothing; an upper directory is shared read-write; cleanup leaves nothing.
    func layeredRootfs() {
        let (built, why) = LayerStack.build(in: work + "/layers")
        guard let stack = built else {
            checks.check(false, "build the layer stack: \(why)")
            return
        }
        guard let sharer = checks.must("sharer", { try LinuxFilesystemSharer(sandboxID: "lay", configuration: config()) }),
              checks.must("prepare", { try sharer.prepareSync() }) != nil else { return }
        let layers = sharer.layout.mountsDirectory.appending(".layers").string
        let shared = sharer.layout.sharedDirectory.string
        func layerEntries() -> [String] { ((try? Sys.listDirectory(nil, FilePath(layers))) ?? []).map(\.name).filter { $0 != "." && $0 != ".." }.sorted() }

        let a = Container(id: "a", rootfs: .layers(stack.stackA.map { FilePath($0) }))
        let b = Container(id: "b", rootfs: .layers(stack.stackB.map { FilePath($0) }))
        guard let sharedA = checks.must("share A's three layers", { try sharer.shareRootFilesystemSync(container: a) }) else { return }
        let storage = sharedA.containerStorages.first
        let lower = storage?.options.first { $0.hasPrefix("lowerdir=") }.map { String($0.dropFirst("lowerdir=".count)) } ?? ""
        let lowerGuest = lower.split(separator: ":").map(String.init)
        checks.check(sharedA.containerStorages.count == 1 && storage?.driver == "overlayfs" && storage?.source == "none" && storage?.fstype == "overlay"
                     && storage?.options.first == Storages.overlayRWOption && storage?.mountPoint == "/run/kata-containers/a/rootfs",
                     "Storage{overlayfs, source: none, fstype: overlay, options: [overlay-rw, lowerdir=…], mount_point: /run/kata-containers/a/rootfs} (\(sharedA.containerStorages))")
        checks.check(sharedA.guestPath == "/run/kata-containers/a/rootfs", "the rootfs's guest path is the overlay's mount point (\(sharedA.guestPath))")
        checks.check(lowerGuest.count == 3 && lowerGuest.allSatisfy { $0.hasPrefix("/run/kata-containers/shared/containers/.layers/") },
                     "lowerdir names the three layer shares' guest paths, topmost first (\(lower))")
        checks.check(layerEntries().count == 3, "three layer shares (\(layerEntries()))")

        guard let sharedB = checks.must("share B (same base and mid layers)", { try sharer.shareRootFilesystemSync(container: b) }) else { return }
        let lowerB = sharedB.containerStorages.first?.options.first { $0.hasPrefix("lowerdir=") } ?? ""
        checks.check(layerEntries().count == 4, "two containers sharing two base layers: exactly one share per layer, 4 in all (\(layerEntries()))")
        checks.check(lowerB.hasSuffix(lowerGuest[1] + ":" + lowerGuest[2]), "B's lowerdir ends with the same mid and base shares (\(lowerB))")
        let table = (try? Sys.mountTable()) ?? []
        let layerMounts = table.filter { $0.mountPoint.hasPrefix(layers + "/") }
        checks.check(layerMounts.count == 4 && layerMounts.allSatisfy(\.isReadOnly), "each layer share is a read-only mount (\(layerMounts.map { "\($0.mountPoint) \($0.mountOptions)" }))")

        // The layers as the guest gets them (through shared/) assemble into the flattened tree.
        func assemble(_ lowerdir: String, _ name: String, expect: [String: String]) {
            let hostLower = lowerdir.split(separator: ":").map { shared + "/" + $0.split(separator: "/").suffix(2).joined(separator: "/") }
            let merged = work + "/merged-" + name
            mkdirs(merged)
            guard checks.must("overlay-mount \(name)'s exported layers on the host", {
                try Sys.mount(source: "overlay", target: FilePath(merged), fstype: "overlay", flags: UInt(MS_RDONLY), data: "lowerdir=" + hostLower.joined(separator: ":"))
            }) != nil else { return }
            defer { try? Sys.umount2(FilePath(merged), flags: Int32(MNT_DETACH)) }
            let diff = LayerStack.difference(LayerStack.snapshot(merged), expect)
            checks.check(diff == nil, "\(name)'s exported layers assemble into the flattened tree: whiteout and opaque directory hold (\(diff ?? "equal"))")
        }
        assemble(lower, "a", expect: LayerStack.expectedA)
        assemble(String(lowerB.dropFirst("lowerdir=".count)), "b", expect: LayerStack.expectedB)

        let again = try? sharer.shareRootFilesystemSync(container: a)
        checks.check(again == sharedA && layerEntries().count == 4, "sharing A again returns the same and shares nothing new")
        // A layer spelled another way is still the same share.
        let respelled = Container(id: "a2", rootfs: .layers([FilePath(stack.base + "/."), FilePath(work + "/layers/../layers/mid")]))
        if let r = checks.must("share a stack whose paths are spelled differently", { try sharer.shareRootFilesystemSync(container: respelled) }) {
            checks.check(layerEntries().count == 4 && (r.containerStorages.first?.options.last ?? "").hasSuffix(lowerGuest[1] + ":" + lowerGuest[2]),
                         "a layer is one share however its path is spelled (\(layerEntries()))")
            _ = checks.must("unshare it") { try sharer.unshareRootFilesystemSync(container: respelled) }
        }

        // Refusals: nothing recorded, nothing mounted.
        let before = (try? sharer.sharesSync())?.map(\.record.name) ?? []
        let mountsBefore = mountsUnder(root)
        writeFile(work + "/not-a-dir", "x")
        checks.mustFail("a file as a layer is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad1", rootfs: .layers([FilePath(stack.base), FilePath(work + "/not-a-dir")])))
        }
        checks.mustFail("a layer given twice is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad2", rootfs: .layers([FilePath(stack.base), FilePath(stack.mid), FilePath(stack.base)])))
        }
        checks.mustFail("a missing layer is refused") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad3", rootfs: .layers([FilePath(stack.base), FilePath(work + "/nope")])))
        }
        checks.mustFail("no layer at all is refused") { _ = try sharer.shareRootFilesystemSync(container: Container(id: "bad4", rootfs: .layers([]))) }
        checks.mustFail("another rootfs for container a is a conflict") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "a", rootfs: .layers([FilePath(stack.base)])))
        }
        let baseName = ".layers/" + (lowerGuest.last?.split(separator: "/").last.map(String.init) ?? "?")
        checks.mustFail("unsharing a layer two containers use is refused") { _ = try sharer.unshareSync(name: baseName) }
        checks.check((try? sharer.sharesSync())?.map(\.record.name) == before && mountsUnder(root) == mountsBefore && layerEntries().count == 4,
                     "the refusals recorded and mounted nothing")

        // Unsharing A keeps B's layers; unsharing B removes the rest.
        _ = checks.must("unshare A") { try sharer.unshareRootFilesystemSync(container: a) }
        checks.check(layerEntries().count == 3, "A's own layer went, the shared base and mid stayed (\(layerEntries()))")
        assemble(String(lowerB.dropFirst("lowerdir=".count)), "b-after", expect: LayerStack.expectedB)
        _ = checks.must("unshare B") { try sharer.unshareRootFilesystemSync(container: b) }
        checks.check((try? Sys.statx(nil, FilePath(layers))) == nil, "with the last user gone, no layer share and no .layers/ remain")
        checks.check(mountsUnder(root).filter { $0.contains("/.layers") }.isEmpty, "no layer mount remains")

        // An upper directory on the host: shared read-write, fs/ and work/ made in it.
        let upper = work + "/upper-c"
        mkdirs(upper)
        let c = Container(id: "c", rootfs: .layers([FilePath(stack.base), FilePath(stack.mid)], upper: FilePath(upper)))
        if let sc = checks.must("share a stack with a host upper directory", { try sharer.shareRootFilesystemSync(container: c) }) {
            let o = sc.containerStorages.first?.options ?? []
            checks.check(o.count == 4 && o[0] == "upperdir=/run/kata-containers/shared/containers/c/upper/fs" && o[1] == "workdir=/run/kata-containers/shared/containers/c/upper/work"
                         && o[2].hasPrefix("lowerdir=") && o[3] == "index=off",
                         "options [upperdir=<guest>/c/upper/fs, workdir=<guest>/c/upper/work, lowerdir=…, index=off] (\(o))")
            checks.check((try? Sys.statx(nil, FilePath(upper + "/fs")))?.kind == .directory && (try? Sys.statx(nil, FilePath(upper + "/work")))?.kind == .directory,
                         "fs/ and work/ exist in the upper directory")
            let up = ((try? Sys.mountTable()) ?? []).first { $0.mountPoint == shared + "/c/upper" }
            checks.check(up != nil && up?.isReadOnly == false, "the upper directory is exported read-write at shared/c/upper (\(up?.mountOptions ?? "not mounted"))")
            writeFile(upper + "/fs/written", "by the container\n")
            _ = checks.must("unshare C") { try sharer.unshareRootFilesystemSync(container: c) }
            checks.check(readFile(upper + "/fs/written") == "by the container\n" && mountsUnder(root).filter({ $0.contains("/c/upper") }).isEmpty,
                         "unshare unmounts everything and leaves the operator's upper directory and its contents in place")
        }
        let planted = work + "/upper-planted"
        mkdirs(planted)
        _ = try? Sys.symlinkat("/etc", nil, FilePath(planted + "/fs"))
        checks.mustFail("an upper directory with a symlink named fs is refused, not followed") {
            _ = try sharer.shareRootFilesystemSync(container: Container(id: "d", rootfs: .layers([FilePath(stack.base)], upper: FilePath(planted))))
        }
        checks.check((try? Sys.statx(nil, FilePath("/etc/work"))) == nil, "nothing was made through the planted link")

        _ = checks.must("cleanup") { try sharer.cleanupSync() }
        checks.check(mountsUnder(root).isEmpty && listTree(root).isEmpty, "cleanup leaves no mount and no entry (\(mountsUnder(root)) \(listTree(root).prefix(3)))")
    }
}
