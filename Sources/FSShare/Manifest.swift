#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// What a sandbox has shared, as recorded in its manifest.
public struct ShareRecord: Sendable, Equatable, CustomReflectable {
    /// What kind of share a record is.
    public enum Kind: String, Sendable {
        /// A volume bind at `mounts/<name>`.
        case volume
        /// A rootfs bind at `mounts/<cid>/rootfs` (`name` is `<cid>/rootfs`).
        case rootfs
        /// A block-device rootfs: only directories `mounts/<cid>[/<suffix>]`, no mount.
        case rootfsDirectory = "rootfs-dir"
        /// Copy mode: a volume copied into the guest at `<guest shared dir>/<name>`; nothing on the host.
        case copy
        /// An image rootfs attached to the VM as a read-only disk: only the directory
        /// `mounts/<cid>` (the guest's mount point), no mount; `source` is the image file.
        case rootfsImage = "rootfs-image"
        /// One read-only layer directory of layered rootfs, at `mounts/.layers/<id>` (the id
        /// is derived from the layer's device and inode, so one layer is one share however
        /// it is spelled). Sandbox-owned: `containerID` is empty; its users are the
        /// ``rootfsLayers`` records that list it.
        case layer
        /// A layered rootfs: no mount on the host; `source` lists its layer shares
        /// (`.layers/<id>`, lowest first, `:`-separated), `destination` the upper share's name
        /// or is empty when the upper layer lives in the guest.
        case rootfsLayers = "rootfs-layers"
        /// An image mounted on the host through a loop device at `mounts/<cid>/rootfs`
        /// (``Rootfs/imageOnHost(_:)``); `destination` is the loop device (`/dev/loopN`), freed
        /// when the mount goes (autoclear) and checked again by unshare and cleanup.
        case rootfsHostImage = "rootfs-host-image"
    }
    // The fields live in one box shared by copies (copy on write): the journal's table hands
    // records out by value, and a copy is then one retain instead of six, with no generic
    // value-witness calls (a third of a share's instructions before).
    private struct Fields: Equatable {
        var name: String
        var kind: Kind
        var containerID: String
        var source: String
        var destination: String
        var readOnly: Bool
        var recursive: Bool
        var isFile: Bool
        var copied: Bool
        var watched: Bool
        var guestPath: String?
        var resolvedSource: String?
        var leftInGuest: Bool
    }

    private final class Box: @unchecked Sendable {
        var fields: Fields
        init(_ fields: Fields) { self.fields = fields }
    }

    private var box: Box

    /// The fields to change, copied first if another record shares the box (so a shared box
    /// is never written: what `@unchecked Sendable` relies on). Setters write only a changed
    /// value: assigning what a field already holds copies nothing.
    private var writable: Fields {
        get { box.fields }
        _modify {
            if !isKnownUniquelyReferenced(&box) { box = Box(box.fields) }
            yield &box.fields
        }
    }

    /// Path of the share below `mounts/` (one component for volumes, `<cid>/rootfs` for rootfs).
    public var name: String { get { box.fields.name } set { if newValue != box.fields.name { writable.name = newValue } } }
    /// What kind of share it is.
    public var kind: Kind { get { box.fields.kind } set { if newValue != box.fields.kind { writable.kind = newValue } } }
    /// The container it was shared for.
    public var containerID: String { get { box.fields.containerID } set { if newValue != box.fields.containerID { writable.containerID = newValue } } }
    /// The source as given (a host path; a device address for block rootfs).
    public var source: String { get { box.fields.source } set { if newValue != box.fields.source { writable.source = newValue } } }
    /// The container's mount point (volumes), `/` (rootfs) or the rootfs suffix (block rootfs).
    public var destination: String { get { box.fields.destination } set { if newValue != box.fields.destination { writable.destination = newValue } } }
    /// Shared read-only (in the guest too).
    public var readOnly: Bool { get { box.fields.readOnly } set { if newValue != box.fields.readOnly { writable.readOnly = newValue } } }
    /// Bound recursively (`rbind`): submounts of the source come along.
    public var recursive: Bool { get { box.fields.recursive } set { if newValue != box.fields.recursive { writable.recursive = newValue } } }
    /// The share is a single file (its mount point is a file).
    public var isFile: Bool { get { box.fields.isFile } set { if newValue != box.fields.isFile { writable.isFile = newValue } } }
    /// Copy mode: the copy into the guest completed.
    public var copied: Bool { get { box.fields.copied } set { if newValue != box.fields.copied { writable.copied = newValue } } }
    /// A kubelet atomic-writer volume whose updates the watcher mirrors: in copy mode into the
    /// copy; in shared-filesystem modes (a `.volume`) into its `watchable-bind` mirror.
    public var watched: Bool { get { box.fields.watched } set { if newValue != box.fields.watched { writable.watched = newValue } } }
    /// Copy mode: where the copy lives in the guest.
    public var guestPath: String? { get { box.fields.guestPath } set { if newValue != box.fields.guestPath { writable.guestPath = newValue } } }
    /// Where `source` led once its symbolic links were followed (nil when it has none): what
    /// was really bound or copied.
    public var resolvedSource: String? { get { box.fields.resolvedSource } set { if newValue != box.fields.resolvedSource { writable.resolvedSource = newValue } } }
    /// Copy mode: unshared, but the agent could not remove the copy (Kata's agent has no
    /// removal RPC), so it stays in the guest until the VM goes.
    public var leftInGuest: Bool { get { box.fields.leftInGuest } set { if newValue != box.fields.leftInGuest { writable.leftInGuest = newValue } } }

    /// A record with these fields.
    ///
    /// - Parameters:
    ///   - name: see ``name``.
    ///   - kind: see ``kind``.
    ///   - containerID: see ``containerID``.
    ///   - source: see ``source``.
    ///   - destination: see ``destination``.
    ///   - readOnly: see ``readOnly``.
    ///   - recursive: see ``recursive``.
    ///   - isFile: see ``isFile``.
    ///   - copied: see ``copied``.
    ///   - watched: see ``watched``.
    ///   - guestPath: see ``guestPath``.
    ///   - resolvedSource: see ``resolvedSource``.
    ///   - leftInGuest: see ``leftInGuest``.
    public init(
        name: String,
        kind: Kind,
        containerID: String,
        source: String,
        destination: String,
        readOnly: Bool,
        recursive: Bool,
        isFile: Bool,
        copied: Bool = false,
        watched: Bool = false,
        guestPath: String? = nil,
        resolvedSource: String? = nil,
        leftInGuest: Bool = false
    ) {
        box = Box(Fields(name: name, kind: kind, containerID: containerID, source: source, destination: destination, readOnly: readOnly, recursive: recursive, isFile: isFile, copied: copied, watched: watched, guestPath: guestPath, resolvedSource: resolvedSource, leftInGuest: leftInGuest))
    }

    /// The fields, as a struct without a box would show them (`print`, string interpolation).
    public var customMirror: Mirror {
        Mirror(self, children: Mirror(reflecting: box.fields).children, displayStyle: .struct)
    }

    /// Equal when every field is.
    ///
    /// - Parameters:
    ///   - a: a record.
    ///   - b: another record.
    public static func == (a: ShareRecord, b: ShareRecord) -> Bool {
        a.box === b.box || a.box.fields == b.box.fields
    }

}

/// The sandbox manifest: an append-only journal at `<root>/<sid>/manifest`, outside the exported
/// `shared/` tree. A share is recorded *before* its mount is made and its removal *after* the
/// mount is gone, so whenever the process dies the manifest lists a superset of what is mounted.
///
/// One line per record, tab-separated, `%`-escaped: `S name kind flags cid source destination`
/// or `U name`. Appends are single `write(2)`s on an `O_APPEND` descriptor: no rewrite per
/// operation. When removals dominate, the journal is compacted through a temp file and rename.
/// A torn last line (only possible if a write was cut short) is ignored: the mount it announced
/// was not made yet.
final class Manifest {
    static let fileName: FilePath = "manifest"
    /// ``fileName`` as text (compared with directory listings' names).
    static let fileNameText = "manifest"
    static let header = "fsshare-manifest 1"

    private(set) var fd: FileDescriptor
    let directory: DirFD
    /// Where the manifest is, for errors (made when one is shown).
    var path: FilePath { directory.display(Manifest.fileName) }
    let sandboxID: String
    /// The live shares, by name.
    private(set) var shares = ShareTable()
    private var nextSequence = 0
    private var parsedBytes = 0
    private var removals = 0
    /// The first line named this sandbox: the file proves the directory is fsshare's.
    private(set) var hasHeader = false
    /// The layout the sandbox was prepared with (from the header).
    private(set) var style: SandboxLayoutStyle = .go
    /// Settings recorded when they were first given (`A key value` lines): the shared
    /// filesystem, and in copy mode the agent address and the guest directory, so that later
    /// commands and the node's watcher need no flags to find them.
    private(set) var settings: [String: String] = Dictionary(minimumCapacity: 4)

    private init(fd: FileDescriptor, directory: DirFD, sandboxID: String) {
        self.fd = fd
        self.directory = directory
        self.sandboxID = sandboxID
    }

    deinit { if fd.rawValue >= 0 { Sys.close(fd) } }

    /// Hands the descriptor to an owner that closes it with its own (``Sys/closeAll(_:)``: one
    /// `close_range` for adjacent numbers). The manifest holds -1 from then on, so a late use
    /// fails with EBADF rather than reaching whatever file reuses the number.
    func surrenderDescriptor() -> FileDescriptor {
        let held = fd
        fd = FileDescriptor(rawValue: -1)
        return held
    }

    /// The first line of `sandboxID`'s manifest (the layout is named unless it is Kata's Go one).
    static func headerLine(_ sandboxID: String, style: SandboxLayoutStyle = .go) -> String {
        var line = header + "\t" + escape(sandboxID)
        if style != .go { line += "\tlayout=" + style.rawValue }
        return line + "\n"
    }

    /// The temp name earlier versions wrote a new manifest through (where `O_TMPFILE` was
    /// missing); still recognised in what an interrupted prepare leaves.
    static let temporaryName: FilePath = "manifest.new"

    /// Opens the manifest of a sandbox directory. Returns nil if there is none, or only the
    /// torn beginning of one (no complete header line: no proof the directory is fsshare's).
    /// Throws `FSShareError/Code/refused` when the file is not one fsshare could have made
    /// (a symlink, a hard link, another owner, not a regular file) or names another sandbox.
    static func open(in directory: DirFD, sandboxID: String) throws(FSShareError) -> Manifest? {
        let fd: FileDescriptor
        do {
            // O_NONBLOCK: a FIFO planted under this name must not hang the open.
            fd = try Sys.openat(directory, fileName, flags: O_RDWR | O_APPEND | O_NONBLOCK | Sys.oNoFollow)
        } catch {
            switch error.errno {
            case .noSuchFileOrDirectory: return nil
            case .tooManySymbolicLinkLevels:
                throw FSShareError(.refused, "\(directory.display(fileName)) is a symbolic link, not an fsshare manifest")
            case .isDirectory, .noSuchAddressOrDevice, .textFileBusy:
                throw FSShareError(.refused, "\(directory.display(fileName)) is not a regular file, so not an fsshare manifest")
            default: throw FSShareError.system("cannot open the sandbox manifest \(directory.display(fileName))", error)
            }
        }
        let manifest = Manifest(fd: fd, directory: directory, sandboxID: sandboxID)
        // One fstatx serves the identity check and the first read.
        let st = try manifest.checkIdentity()
        try manifest.refresh(status: st)
        return manifest.hasHeader ? manifest : nil
    }

    /// Creates the manifest of a new sandbox, header and first settings included, in the
    /// directory ``SandboxOwnership/createSandboxDirectory(_:sandboxID:style:settings:)`` builds aside. That
    /// directory appears under the sandbox's name (renamed into place) only once the manifest is
    /// complete, and a crash before leaves an interrupted prepare, which is removed: so the file
    /// is written under its own name directly (`O_CREAT|O_EXCL`, kept open for appending), and
    /// what was written is parsed from memory, not read back.
    static func create(in directory: DirFD, sandboxID: String, style: SandboxLayoutStyle = .go, settings initial: [(key: String, value: String)] = []) throws(FSShareError) -> Manifest {
        let line = headerLine(sandboxID, style: style)
        var header = Array(line.utf8)
        // The first settings go with the header: one write.
        for (key, value) in initial { appendSettingLine(key, value, to: &header) }
        // The path is built only for a message.
        func shown() -> FilePath { directory.display(fileName) }
        let fd = try sys("cannot create the sandbox manifest \(shown())") { () throws(SystemCallError) in
            try Sys.openat(directory, named: fileNameText, flags: O_RDWR | O_APPEND | O_CREAT | O_EXCL | Sys.oNoFollow, mode: 0o600)
        }
        let manifest = Manifest(fd: fd, directory: directory, sandboxID: sandboxID)
        try sys("cannot write the sandbox manifest \(shown())") { () throws(SystemCallError) in try Sys.writeAll(fd, header, path: shown()) }
        // What parsing the header just written would set.
        manifest.hasHeader = true
        manifest.style = style
        manifest.parsedBytes = header.count
        for (key, value) in initial { manifest.settings[key] = value }
        return manifest
    }

    /// Refuses a file fsshare cannot have made: only a regular file with one link, owned by us.
    @discardableResult
    private func checkIdentity() throws(FSShareError) -> FileStatus {
        let st = try sys("cannot stat the sandbox manifest") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
        if st.kind != .regular {
            throw FSShareError(.refused, "\(path) is a \(st.kind), not an fsshare manifest")
        }
        if st.linkCount != 1 {
            throw FSShareError(.refused, "\(path) has \(st.linkCount) hard links; fsshare never links its manifest twice, so it is not trusted")
        }
        if st.uid != geteuid() {
            throw FSShareError(.refused, "\(path) belongs to uid \(st.uid), not to this process's uid \(geteuid()); it is not trusted")
        }
        return st
    }

    /// Reads what other processes appended since the last look (or everything, if the file
    /// was replaced by a compaction).
    func refresh(status known: FileStatus? = nil) throws(FSShareError) {
        let st: FileStatus
        if let known {
            st = known
        } else {
            st = try sys("cannot stat the sandbox manifest") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
        }
        if st.linkCount == 0 {
            // No longer linked: a compaction by another process renamed a new file over it, or
            // the sandbox was cleaned up (the manifest goes last). One fstatx tells both apart
            // from "unchanged" without looking the name up on every operation.
            let newFD: FileDescriptor
            do {
                newFD = try Sys.openat(directory, Manifest.fileName, flags: O_RDWR | O_APPEND | Sys.oNoFollow | O_NONBLOCK)
            } catch {
                if error.errno == .noSuchFileOrDirectory {
                    throw FSShareError(.notPrepared, "sandbox \(sandboxID) was cleaned up (its manifest is gone)")
                }
                throw FSShareError.system("cannot reopen the sandbox manifest", error)
            }
            Sys.close(fd)
            fd = newFD
            try checkIdentity()
            reset()
            try refresh()
            return
        }
        if Int(st.size) == parsedBytes { return }
        if Int(st.size) < parsedBytes { reset() }
        // Only what was appended since the last look, up to the size just seen (more appended
        // since is read next time).
        let from = parsedBytes
        let tail = try sys("cannot read the sandbox manifest") { () throws(SystemCallError) in
            try Sys.readRange(fd, offset: from, count: Int(st.size) - from, path: path)
        }
        // Only whole lines count; a torn last line is left for later (or forever).
        guard let lastNewline = tail.lastIndex(of: 0x0A) else { return }
        parsedBytes += lastNewline + 1
        // Line by line over the buffer (empty lines skipped): no array of slices.
        try tail.withUnsafeBufferPointer { (buffer) throws(FSShareError) in
            var start = 0
            for i in 0...lastNewline where buffer[i] == 0x0A {
                if i > start { try apply(line: UnsafeBufferPointer(rebasing: buffer[start..<i])) }
                start = i + 1
            }
        }
    }

    private func reset() {
        shares = ShareTable()
        parsedBytes = 0
        removals = 0
        hasHeader = false
        settings = Dictionary(minimumCapacity: 4)
    }

    /// One journal line (without its newline), split on tabs as bytes: strings are made for
    /// the fields only (splitting a `String` walks grapheme clusters, which showed up in
    /// cleanup's profile).
    private func apply(line bytes: UnsafeBufferPointer<UInt8>) throws(FSShareError) {
        // The fields' array is kept between lines (one allocation per manifest, not per line).
        var fields = fieldScratch
        fieldScratch = []
        fields.removeAll(keepingCapacity: true)
        if fields.capacity < 9 { fields.reserveCapacity(9) }
        defer { fieldScratch = fields }
        var start = bytes.startIndex
        var i = start
        while true {
            if i == bytes.endIndex || bytes[i] == 0x09 {
                fields.append(Manifest.unescape(UnsafeBufferPointer(rebasing: bytes[start..<i])))
                if i == bytes.endIndex { break }
                start = i + 1
            }
            i += 1
        }
        guard let tag = fields.first else { return }
        if !hasHeader {
            // The first line must be this sandbox's header; anything else is not our manifest.
            guard tag.hasPrefix("fsshare-manifest") else { throw corrupt(bytes) }
            guard tag == Manifest.header else {
                throw FSShareError(.manifest, "\(path): unsupported manifest version \"\(tag)\"")
            }
            guard fields.count == 2 || fields.count == 3, fields[1] == sandboxID else {
                throw FSShareError(.refused, "\(path) is the manifest of sandbox \"\(fields.dropFirst().first ?? "")\", not of \"\(sandboxID)\"")
            }
            if fields.count == 3 {
                guard fields[2].hasPrefix("layout="), let style = SandboxLayoutStyle(rawValue: String(fields[2].dropFirst(7))) else {
                    throw FSShareError(.manifest, "\(path): unknown sandbox layout \"\(fields[2])\"")
                }
                self.style = style
            }
            hasHeader = true
            return
        }
        switch tag {
        case "S" where (7...9).contains(fields.count):
            guard let kind = ShareRecord.Kind(rawValue: fields[2]) else { throw corrupt(bytes) }
            // Flags are ASCII letters: looked for as bytes, not as Characters.
            let flags = fields[3].utf8
            func has(_ flag: Unicode.Scalar) -> Bool { flags.contains(UInt8(ascii: flag)) }
            let record = ShareRecord(
                name: fields[1], kind: kind, containerID: fields[4], source: fields[5], destination: fields[6],
                readOnly: has("r"), recursive: has("R"), isFile: has("f"),
                copied: has("c"), watched: has("w"),
                guestPath: fields.count >= 8 && !fields[7].isEmpty ? fields[7] : nil,
                resolvedSource: fields.count == 9 ? fields[8] : nil, leftInGuest: has("o"))
            insert(record)
        case "A" where fields.count == 3:
            settings[fields[1]] = fields[2]
        case "U" where fields.count == 2:
            if shares.entries.removeValue(forKey: fields[1]) != nil { removals += 1 }
        default:
            throw corrupt(bytes)
        }
    }

    private func corrupt(_ line: UnsafeBufferPointer<UInt8>) -> FSShareError {
        FSShareError(.manifest, "\(path): unreadable manifest line \"\(String(decoding: line, as: UTF8.self).prefix(120))\"")
    }

    /// Records a setting of the sandbox (appended only when it changes).
    func recordSetting(_ key: String, _ value: String) throws(FSShareError) {
        try recordSettings([(key, value)])
    }

    /// Records several settings with one append (those already recorded with the same value
    /// are left out; nothing is written when none changed).
    func recordSettings(_ pairs: [(key: String, value: String)]) throws(FSShareError) {
        scratch.removeAll(keepingCapacity: true)
        var changed: [(key: String, value: String)] = []
        for (key, value) in pairs where settings[key] != value && !changed.contains(where: { $0.key == key }) {
            Manifest.appendSettingLine(key, value, to: &scratch)
            changed.append((key, value))
        }
        guard !changed.isEmpty else { return }
        try append(scratch)
        for (key, value) in changed { settings[key] = value }
    }

    /// The journal line `A key value` (escaped), appended to `bytes`.
    static func appendSettingLine(_ key: String, _ value: String, to bytes: inout [UInt8]) {
        bytes.append(UInt8(ascii: "A"))
        bytes.append(0x09)
        appendEscaped(key, to: &bytes)
        bytes.append(0x09)
        appendEscaped(value, to: &bytes)
        bytes.append(0x0A)
    }

    /// Records a share before it is mounted.
    func recordShare(_ r: ShareRecord) throws(FSShareError) {
        scratch.removeAll(keepingCapacity: true)
        Manifest.appendLine(for: r, to: &scratch)
        try append(scratch)
        insert(r)
    }

    /// The journal line being written (kept to reuse its storage).
    private var scratch: [UInt8] = []
    /// A journal line's fields while it is parsed (kept to reuse its storage).
    private var fieldScratch: [String] = []

    /// One hash of the name for a new share; one recorded again keeps its place in the order.
    private func insert(_ r: ShareRecord) {
        if let old = shares.entries.updateValue(ShareTable.Entry(sequence: nextSequence, record: r), forKey: r.name) {
            shares.entries[r.name]?.sequence = old.sequence
        } else {
            nextSequence += 1
        }
    }

    /// Records that a share is gone (after its mount and mount point were removed).
    func recordRemoval(_ name: String) throws(FSShareError) {
        // One lookup: taken out first, put back if the journal cannot be written.
        guard let removed = shares.entries.removeValue(forKey: name) else { return }
        scratch.removeAll(keepingCapacity: true)
        scratch.append(UInt8(ascii: "U"))
        scratch.append(0x09)
        Manifest.appendEscaped(name, to: &scratch)
        scratch.append(0x0A)
        do {
            try append(scratch)
        } catch {
            shares.entries[name] = removed
            throw error
        }
        removals += 1
        if removals > 256 && removals > 2 * shares.count { try compact() }
    }

    /// The journal line that records `r`.
    static func line(for r: ShareRecord) -> String {
        var bytes: [UInt8] = []
        appendLine(for: r, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Appends the journal line that records `r` (bytes built in place: one per share).
    static func appendLine(for r: ShareRecord, to out: inout [UInt8]) {
        let tab: UInt8 = 0x09
        out.append(UInt8(ascii: "S"))
        out.append(tab)
        appendEscaped(r.name, to: &out)
        out.append(tab)
        out.append(contentsOf: r.kind.rawValue.utf8)
        out.append(tab)
        let flagsStart = out.count
        if r.readOnly { out.append(UInt8(ascii: "r")) }
        if r.recursive { out.append(UInt8(ascii: "R")) }
        if r.isFile { out.append(UInt8(ascii: "f")) }
        if r.copied { out.append(UInt8(ascii: "c")) }
        if r.watched { out.append(UInt8(ascii: "w")) }
        if r.leftInGuest { out.append(UInt8(ascii: "o")) }
        if out.count == flagsStart { out.append(UInt8(ascii: "-")) }
        out.append(tab)
        appendEscaped(r.containerID, to: &out)
        out.append(tab)
        appendEscaped(r.source, to: &out)
        out.append(tab)
        appendEscaped(r.destination, to: &out)
        if r.guestPath != nil || r.resolvedSource != nil {
            out.append(tab)
            appendEscaped(r.guestPath ?? "", to: &out)
        }
        if let resolved = r.resolvedSource {
            out.append(tab)
            appendEscaped(resolved, to: &out)
        }
        out.append(0x0A)
    }

    /// Appends `s` with `%`, tab and newline escaped (``escape(_:)`` as bytes).
    static func appendEscaped(_ s: String, to out: inout [UInt8]) {
        withUTF8Bytes(s) { bytes in
            // Nearly every field has nothing to escape: copied in one piece.
            guard bytes.contains(where: { $0 == 0x25 || $0 == 0x09 || $0 == 0x0A }) else {
                out.append(contentsOf: bytes)
                return
            }
            for b in bytes {
                switch b {
                case 0x25: out.append(contentsOf: [0x25, 0x32, 0x35])  // %25
                case 0x09: out.append(contentsOf: [0x25, 0x30, 0x39])  // %09
                case 0x0A: out.append(contentsOf: [0x25, 0x30, 0x41])  // %0A
                default: out.append(b)
                }
            }
        }
    }

    /// The shares in the order they were first recorded.
    var orderedShares: [ShareRecord] {
        shares.entries.values.sorted { $0.sequence < $1.sequence }.map(\.record)
    }

    private func append(_ bytes: [UInt8]) throws(FSShareError) {
        try sys("cannot write the sandbox manifest") { () throws(SystemCallError) in try Sys.writeAll(fd, bytes, path: path) }
        parsedBytes += bytes.count
    }

    /// Rewrites the journal with only the live records, atomically (temp file + rename).
    private func compact() throws(FSShareError) {
        let tmpName: FilePath = "manifest.tmp"
        var bytes = Array(Manifest.headerLine(sandboxID, style: style).utf8)
        for (key, value) in settings.sorted(by: { $0.key < $1.key }) { Manifest.appendSettingLine(key, value, to: &bytes) }
        for r in orderedShares { Manifest.appendLine(for: r, to: &bytes) }
        let dir = directory
        try sys("cannot compact the sandbox manifest") { () throws(SystemCallError) in
            let tmp = try Sys.openat(dir, tmpName, flags: O_WRONLY | O_CREAT | O_TRUNC | Sys.oNoFollow, mode: 0o600)
            defer { Sys.close(tmp) }
            try Sys.writeAll(tmp, bytes, path: dir.display(tmpName))
            try Sys.renameat(dir, tmpName, Manifest.fileName)
        }
        let newFD = try sys("cannot reopen the sandbox manifest") { () throws(SystemCallError) in
            try Sys.openat(dir, Manifest.fileName, flags: O_RDWR | O_APPEND | Sys.oNoFollow)
        }
        Sys.close(fd)
        fd = newFD
        parsedBytes = bytes.count
        removals = 0
    }

    static func escape(_ s: String) -> String {
        guard s.utf8.contains(where: { $0 == 0x25 || $0 == 0x09 || $0 == 0x0A }) else { return s }
        var out = ""
        for ch in s.unicodeScalars {
            switch ch {
            case "%": out += "%25"
            case "\t": out += "%09"
            case "\n": out += "%0A"
            default: out.unicodeScalars.append(ch)
            }
        }
        return out
    }

    /// ``unescape(_:)`` of a field's bytes.
    static func unescape(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        let s = String(decoding: bytes, as: UTF8.self)
        guard bytes.containsByte(0x25) else { return s }
        return unescape(s)
    }

    static func unescape(_ s: String) -> String {
        guard s.utf8.contains(0x25) else { return s }
        return s.replacing("%09", with: "\t").replacing("%0A", with: "\n").replacing("%25", with: "%")
    }
}

/// The manifest's live shares by name, each with when it was first recorded (for a stable
/// listing order): one table, so recording or removing a share hashes its name once.
struct ShareTable {
    struct Entry {
        var sequence: Int
        var record: ShareRecord
    }
    fileprivate(set) var entries: [String: Entry] = [:]

    /// The share recorded under `name`.
    subscript(name: String) -> ShareRecord? { entries[name]?.record }
    /// Every live share, in no particular order.
    var values: [ShareRecord] { entries.values.map(\.record) }
    /// How many shares are live.
    var count: Int { entries.count }
    /// No share is live.
    var isEmpty: Bool { entries.isEmpty }
}
