#if canImport(Glibc)
import Glibc
#endif
@testable import FSShare
import FSShareSystem
import SystemPackage
import Testing

@Suite("Ids, names, manifest encoding, fault specs")
struct NamingTests {
    @Test("valid and invalid ids")
    func ids() {
        for good in ["a", "pod-1", "A.b_c-9", String(repeating: "f", count: 64), String(repeating: "x", count: 128)] {
            #expect(Identifier.problem(good) == nil, "\(good)")
        }
        for bad in ["", ".", "..", "../x", "a/b", "/a", "-a", ".a", "a b", "a\u{0}", "é", String(repeating: "x", count: 129)] {
            #expect(Identifier.problem(bad) != nil, "\(bad)")
        }
    }

    @Test("share names are deterministic, Kata-shaped, distinct per destination, and fit NAME_MAX")
    func names() throws {
        let a = try ShareNaming.volumeName(containerID: "c1", destination: "/etc/config")
        #expect(a == (try ShareNaming.volumeName(containerID: "c1", destination: "/etc//config/")))
        #expect(a.hasPrefix("c1-") && a.hasSuffix("-config"))
        #expect(a.split(separator: "-")[1].count == 16)
        #expect(a != (try ShareNaming.volumeName(containerID: "c2", destination: "/etc/config")))
        #expect(a != (try ShareNaming.volumeName(containerID: "c1", destination: "/other/config")))
        let long = try ShareNaming.volumeName(containerID: String(repeating: "c", count: 128), destination: .init("/" + String(repeating: "d", count: 250)))
        #expect(long.utf8.count <= 255)
        #expect(throws: FSShareError.self) { try ShareNaming.volumeName(containerID: "c", destination: "relative") }
        #expect(throws: FSShareError.self) { try ShareNaming.volumeName(containerID: "c", destination: "/") }
        // FNV-1a 64 reference vectors.
        #expect(ShareNaming.fnv1a64([]) == 0xcbf29ce484222325)
        #expect(ShareNaming.fnv1a64(Array("a".utf8)) == 0xaf63dc4c8601ec8c)
    }

    /// A normal destination is named from its bytes in one buffer; any other goes through
    /// normalisation. Both must give Kata's shape over the same FNV-1a input, at every length
    /// up to and past NAME_MAX, in both layouts.
    @Test("share names built from bytes equal the general path and the FNV-1a reference")
    func namesFastPathAgrees() throws {
        func reference(_ cid: String, _ path: String, _ style: SandboxLayoutStyle) -> String {
            let hash = ShareNaming.fnv1a64(Array(cid.utf8) + [0] + Array(path.utf8))
            let hex = String(hash, radix: 16)
            let base = path.split(separator: "/").last.map(String.init) ?? ""
            return (style == .go ? cid : "sandbox") + "-" + String(repeating: "0", count: 16 - hex.count) + hex + "-" + base
        }
        let cids = ["c", "0123456789abcdef" + String(repeating: "e", count: 48), String(repeating: "c", count: 128)]
        var destinations = ["/a", "/etc/config", "/var/run/secrets/kubernetes.io/serviceaccount", "/données/é", "/a/...", "/x/.hidden", "/a/b.c"]
        for n in [100, 200, 236, 237, 238, 250] { destinations.append("/d/" + String(repeating: "v", count: n)) }
        for style in [SandboxLayoutStyle.go, .runtimeRS] {
            for cid in cids {
                for d in destinations {
                    let fast = try ShareNaming.volumeName(containerID: cid, destination: FilePath(d), style: style)
                    // A "." component makes the destination not normal: the general path.
                    let general = try ShareNaming.volumeName(containerID: cid, destination: FilePath("/." + d), style: style)
                    #expect(fast == general, "\(cid) \(d) \(style)")
                    #expect(fast.utf8.count <= 255)
                    let expected = reference(cid, d, style)
                    if expected.utf8.count <= 255 { #expect(fast == expected, "\(cid) \(d) \(style)") }
                }
            }
        }
    }

    @Test("manifest escaping round-trips tabs, newlines and percent signs")
    func escaping() {
        for s in ["plain", "a\tb", "line\nbreak", "100%", "%09", "%2509\t\n%"] {
            #expect(Manifest.unescape(Manifest.escape(s)) == s)
            #expect(!Manifest.escape(s).contains("\t") && !Manifest.escape(s).contains("\n"))
        }
    }

    /// The journal is parsed as bytes: awkward fields survive a write and a fresh read, empty
    /// fields stay empty, removals apply, and a line of the wrong shape is refused by name.
    @Test("the manifest journal reads back what it recorded")
    func journalRoundTrip() throws {
        let dir = TestEnvironment.scratch("journal")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        _ = Sys.run(["mkdir", "-p", dir])
        let fd = try Sys.openat(nil, FilePath(dir), flags: O_RDONLY | Sys.oDirectory)
        defer { Sys.close(fd) }
        let d = DirFD(fd: fd, path: FilePath(dir))
        let m = try Manifest.create(in: d, sandboxID: "sb", style: .runtimeRS)
        let awkward = ShareRecord(
            name: "c-1-é\tx", kind: .volume, containerID: "c", source: "/src/a\tb\nc%09%é",
            destination: "/d\t", readOnly: true, recursive: false, isFile: false, watched: true,
            guestPath: "/guest/é\tp", resolvedSource: "/real/ü\t")
        let plain = ShareRecord(name: "c-2-v", kind: .volume, containerID: "c", source: "/s", destination: "/v",
                                readOnly: false, recursive: true, isFile: true)
        try m.recordShare(awkward)
        try m.recordShare(plain)
        try m.recordSettings([("k\t1", "v%\n"), ("k2", "")])
        try m.recordRemoval(plain.name)
        guard let back = try Manifest.open(in: d, sandboxID: "sb") else {
            Issue.record("the manifest is not found again")
            return
        }
        #expect(back.style == .runtimeRS)
        #expect(back.orderedShares == [awkward])
        #expect(back.settings == ["k\t1": "v%\n", "k2": ""])
        // Past 256 removals the journal is rewritten (compacted): the same state reads back.
        let before = try Sys.fstatx(m.fd, path: "manifest").inode
        for _ in 0..<300 {
            try m.recordShare(plain)
            try m.recordRemoval(plain.name)
        }
        #expect(try Sys.fstatx(m.fd, path: "manifest").inode != before, "the journal was compacted")
        guard let compacted = try Manifest.open(in: d, sandboxID: "sb") else {
            Issue.record("the compacted manifest is not found")
            return
        }
        #expect(compacted.style == .runtimeRS && compacted.orderedShares == [awkward])
        #expect(compacted.settings == ["k\t1": "v%\n", "k2": ""])
        // A line of the wrong shape: the whole manifest is refused, naming the line.
        let raw = try Sys.openat(d, Manifest.fileName, flags: O_WRONLY | O_APPEND)
        try Sys.writeAll(raw, Array("S\tonly\tthree\n".utf8), path: "manifest")
        Sys.close(raw)
        do {
            _ = try Manifest.open(in: d, sandboxID: "sb")
            Issue.record("a malformed line is refused")
        } catch {
            #expect(error.message.contains("unreadable manifest line \"S\tonly\tthree\""), "\(error.message)")
        }
    }

    @Test("a share's guest path is the guest shared dir, the layout's prefix and the name, joined once")
    func guestPaths() {
        for style in SandboxLayoutStyle.allCases {
            for base in ["/run/kata-containers/shared/containers", "/run/kata-containers/shared/containers/", "/run/x/", "/", "/a//", "//", "a"] {
                let layout = SandboxLayout(root: "/r", sandboxID: "s", guestSharedDir: base, style: style)
                for name in ["c-0123456789abcdef-vol", "c/rootfs", "é"] {
                    #expect(layout.guestPath(name) == Storages.joinGuest(base, style.guestPrefix, name), "\(style) \(base) \(name)")
                }
            }
        }
        #expect(SandboxLayout(root: "/r", sandboxID: "s", style: .runtimeRS).guestPath("v") == "/run/kata-containers/shared/containers/passthrough/v")
        // The prefix a layout keeps follows changes to its guest directory and its style.
        var layout = SandboxLayout(root: "/r", sandboxID: "s")
        layout.guestSharedDir = "/g"
        #expect(layout.guestPath("v") == "/g/v")
        layout.style = .runtimeRS
        #expect(layout.guestPath("v") == "/g/passthrough/v")
        layout.guestSharedDir = "//"
        #expect(layout.guestPath("v") == Storages.joinGuest("//", "passthrough/", "v"))
    }

    /// A record's fields live in a box its copies share: changing a copy must leave the
    /// original as it was, and equality is by field, never by box.
    @Test("share records are values: a changed copy leaves the original alone")
    func shareRecordIsAValue() {
        let original = ShareRecord(
            name: "c-1-v", kind: .volume, containerID: "c", source: "/src", destination: "/d",
            readOnly: false, recursive: false, isFile: false)
        var copy = original
        #expect(copy == original)
        copy.readOnly = true
        copy.source = "/other"
        copy.guestPath = "/g"
        #expect(original.readOnly == false && original.source == "/src" && original.guestPath == nil, "the original is unchanged")
        #expect(copy.readOnly && copy.source == "/other" && copy.guestPath == "/g")
        #expect(copy != original)
        // Built apart, equal field by field.
        var again = ShareRecord(
            name: "c-1-v", kind: .volume, containerID: "c", source: "/src", destination: "/d",
            readOnly: false, recursive: false, isFile: false)
        #expect(again == original)
        again.leftInGuest = true
        #expect(again != original)
        // Shown with its fields, as a plain struct is.
        #expect("\(original)".contains("name: \"c-1-v\"") && "\(original)".contains("readOnly: false"), "\(original)")
    }

    /// `count` new files f0, f1, ... in `dir`, opened one after another (adjacent numbers,
    /// unless another test opens something meanwhile).
    private func openFiles(_ count: Int, in dir: String) throws -> [FileDescriptor] {
        _ = Sys.run(["mkdir", "-p", dir])
        return try (0..<count).map { i in
            _ = Sys.run(["touch", "\(dir)/f\(i)"])
            return try Sys.openat(nil, FilePath("\(dir)/f\(i)"), flags: O_RDONLY)
        }
    }

    /// What a descriptor names now (nil once closed; another test may reuse the number).
    private func names(_ fd: FileDescriptor) -> String? { try? Sys.pathOf(fd).string }

    /// Two descriptors closed together (one close_range when adjacent) close exactly those two.
    /// Checked by what each number names afterwards (other tests open files meanwhile, so a
    /// freed number may already name theirs, never ours).
    @Test("closing a pair of descriptors closes those two and nothing else")
    func closePair() throws {
        let dir = TestEnvironment.scratch("close-pair")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        for adjacent in [true, false] {
            let opened = try openFiles(3, in: dir)
            let (a, b, other) = adjacent ? (opened[0], opened[1], opened[2]) : (opened[0], opened[2], opened[1])
            let (aPath, bPath, otherPath) = (names(a), names(b), names(other))
            Sys.close(a, b)
            #expect(names(a) != aPath && names(b) != bPath, "both closed (adjacent: \(adjacent))")
            #expect(names(other) == otherPath, "the descriptor between or beside them stays open")
            Sys.close(other)
        }
    }

    /// A set of descriptors closed together (close_range per adjacent run) closes exactly that
    /// set: runs, a lone number, a repeated one and a negative one, with kept descriptors
    /// between and beside them.
    @Test("closing a set of descriptors closes that set and nothing else")
    func closeSet() throws {
        let dir = TestEnvironment.scratch("close-set")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        let opened = try openFiles(8, in: dir)
        // Closed: 0, 1, 2 (a run, given out of order and 1 twice), 4 (alone), 6, 7 (a run).
        // Kept: 3 and 5, between the runs.
        let closed = [opened[2], opened[0], opened[1], opened[1], opened[4], opened[7], opened[6], FileDescriptor(rawValue: -1)]
        let kept = [opened[3], opened[5]]
        let before = opened.map(names)
        Sys.closeAll(closed)
        for fd in Set(closed.map(\.rawValue)) where fd >= 0 {
            let i = try #require(opened.firstIndex { $0.rawValue == fd })
            #expect(names(opened[i]) != before[i], "f\(i) closed")
        }
        for fd in kept {
            let i = try #require(opened.firstIndex(of: fd))
            #expect(names(fd) == before[i], "f\(i) stays open")
            Sys.close(fd)
        }
    }

    /// The probe for what is expected to be absent: nil for ENOENT, the status when present,
    /// an error naming the call and the path for anything else.
    @Test("statxIfPresent: nil when absent, the status when present, an error otherwise")
    func statxIfPresent() throws {
        let dir = TestEnvironment.scratch("probe")
        defer { _ = Sys.run(["rm", "-rf", dir]) }
        _ = Sys.run(["mkdir", "-p", dir + "/d"])
        _ = Sys.run(["touch", dir + "/f"])
        let fd = try Sys.openat(nil, FilePath(dir), flags: O_RDONLY | Sys.oDirectory)
        defer { Sys.close(fd) }
        let d = DirFD(fd: fd, path: FilePath(dir))
        #expect(try Sys.statxIfPresent(d, named: "missing") == nil)
        #expect(try Sys.statxIfPresent(d, named: "d")?.kind == .directory)
        #expect(try Sys.statxIfPresent(d, named: "f")?.kind == .regular)
        do {
            _ = try Sys.statxIfPresent(d, named: "f/x")
            Issue.record("a path through a file is an error, not absence")
        } catch {
            #expect(error.errno == .notDirectory && error.syscall == "statx" && "\(error)".contains(dir + "/f/x"), "\(error)")
        }
    }

    @Test("mountinfo octal escapes are decoded")
    func mountinfo() {
        #expect(Sys.unescapeMountinfo(Array(#"/a\040b\011c\134d"#.utf8)) == "/a b\tc\\d")
        #expect(Sys.unescapeMountinfo(Array(#"/end\04"#.utf8)) == #"/end\04"#)
    }

    @Test("fault specs parse, and bad ones are rejected")
    func faults() {
        #expect(FaultInjection.parse("move_mount#2=kill,mkdirat=EACCES") == [
            .init(syscall: "move_mount", occurrence: 2, action: .kill),
            .init(syscall: "mkdirat", occurrence: nil, action: .fail(.permissionDenied)),
        ])
        #expect(FaultInjection.parse("x=NOPE") == nil)
        #expect(FaultInjection.parse("x#0=EIO") == nil)
        #expect(FaultInjection.parse("novalue") == nil)
    }

    @Test("syscall errors name the call, the path and the errno")
    func errors() {
        #expect(throws: SystemCallError.self) { try Sys.statx(nil, "/nonexistent/fsshare") }
        do {
            _ = try Sys.statx(nil, "/nonexistent/fsshare")
        } catch {
            #expect(error.syscall == "statx" && error.path == "/nonexistent/fsshare" && error.errno == .noSuchFileOrDirectory)
            #expect(error.description.contains("statx(/nonexistent/fsshare)"))
        }
    }

    /// An injected fault is process-wide, so it is tried in a child process (the CLI), never in
    /// this one, where other suites run in parallel and would fail by coincidence.
    @Test("an injected fault reaches the CLI's message with call, path and errno; a bad spec is an error")
    func injectedFaultInChild() {
        let root = TestEnvironment.scratch("fault-child")
        _ = Sys.run(["mkdir", "-p", root])
        defer { _ = Sys.run(["rm", "-rf", root]) }
        let bin = TestEnvironment.product("fsshare")
        let failed = Sys.run([bin, "status", "--root", root], environment: ["FSSHARE_FAULTS": "getdents64=EIO,openat=EIO"])
        #expect(failed.status == 1, "\(failed.output)")
        #expect(failed.output.contains("openat(\(root)") && failed.output.contains("Input/output error"), "\(failed.output)")
        let malformed = Sys.run([bin, "status", "--root", root], environment: ["FSSHARE_FAULTS": "statx#0=EIO"])
        #expect(malformed.status == 2 && malformed.output.contains("malformed"), "\(malformed.output)")
        let clean = Sys.run([bin, "status", "--root", root])
        #expect(clean.status == 0, "\(clean.output)")
    }
}
