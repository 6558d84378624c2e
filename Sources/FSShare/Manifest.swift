#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// What a sandbox has shared, as recorded in its manifest.
public struct ShareRecord: Sendable, Equatable {
    public enum Kind: String, Sendable {
        /// A volume bind at `mounts/<name>`.
        case volume
        /// A rootfs bind at `mounts/<cid>/rootfs` (`name` is `<cid>/rootfs`).
        case rootfs
        /// A block-device rootfs: only directories `mounts/<cid>[/<suffix>]`, no mount.
        case rootfsDirectory = "rootfs-dir"
        /// Copy mode: a volume copied into the guest at `<guest shared dir>/<name>`; nothing on the host.
        case copy
    }
    /// Path of the share below `mounts/` (one component for volumes, `<cid>/rootfs` for rootfs).
    public var name: String
    public var kind: Kind
    public var containerID: String
    public var source: String
    public var destination: String
    public var readOnly: Bool
    public var recursive: Bool
    /// The share is a single file (its mount point is a file).
    public var isFile: Bool
    /// Copy mode: the copy into the guest completed.
    public var copied: Bool = false
    /// Copy mode: a kubelet atomic-writer volume whose updates are mirrored by the watcher.
    public var watched: Bool = false
    /// Copy mode: where the copy lives in the guest.
    public var guestPath: String? = nil
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
    static let header = "fsshare-manifest 1"

    private(set) var fd: FileDescriptor
    let path: FilePath
    let directory: DirFD
    private(set) var shares: [String: ShareRecord] = [:]
    /// When each live share was first recorded (for a stable listing order).
    private var sequence: [String: Int] = [:]
    private var nextSequence = 0
    private var parsedBytes = 0
    private var pending: [UInt8] = []
    private var removals = 0
    private var inode: UInt64 = 0

    private init(fd: FileDescriptor, directory: DirFD) {
        self.fd = fd
        self.directory = directory
        self.path = directory.display(Manifest.fileName)
    }

    deinit { Sys.close(fd) }

    /// Opens (and with `create`, creates) the manifest in a sandbox directory. Returns nil if it
    /// does not exist and `create` is false.
    static func open(in directory: DirFD, sandboxID: String, create: Bool) throws(FSShareError) -> Manifest? {
        let fd: FileDescriptor
        do {
            fd = try Sys.openat(directory, fileName, flags: O_RDWR | O_APPEND | Sys.oNoFollow | (create ? O_CREAT : 0), mode: 0o600)
        } catch {
            if error.errno == .noSuchFileOrDirectory && !create { return nil }
            throw FSShareError.system("cannot open the sandbox manifest \(directory.display(fileName))", error)
        }
        let manifest = Manifest(fd: fd, directory: directory)
        try manifest.refresh()
        if manifest.parsedBytes == 0 && create {
            try manifest.append("\(header)\t\(escape(sandboxID))\n")
        }
        return manifest
    }

    /// Reads what other processes appended since the last look (or everything, if the file
    /// was replaced by a compaction).
    func refresh() throws(FSShareError) {
        let st = try sys("cannot stat the sandbox manifest") { () throws(SystemCallError) in try Sys.fstatx(fd, path: path) }
        if let onDisk = try? Sys.statx(directory, Manifest.fileName), onDisk.inode != st.inode {
            // Compacted by another process: reopen the new file and parse it from the start.
            let newFD = try sys("cannot reopen the sandbox manifest") { () throws(SystemCallError) in
                try Sys.openat(directory, Manifest.fileName, flags: O_RDWR | O_APPEND | Sys.oNoFollow)
            }
            Sys.close(fd)
            fd = newFD
            reset()
            try refresh()
            return
        }
        inode = st.inode
        if Int(st.size) == parsedBytes { return }
        if Int(st.size) < parsedBytes { reset() }
        let bytes = try sys("cannot read the sandbox manifest") { () throws(SystemCallError) in try Sys.readAll(fd, path: path) }
        guard bytes.count > parsedBytes else { return }
        var tail = Array(bytes[parsedBytes...])
        // Only whole lines count; a torn last line is left for later (or forever).
        if let lastNewline = tail.lastIndex(of: 0x0A) {
            tail = Array(tail[...lastNewline])
        } else {
            return
        }
        parsedBytes += tail.count
        for line in tail.split(separator: 0x0A) { try apply(line: String(decoding: line, as: UTF8.self)) }
    }

    private func reset() {
        shares = [:]
        sequence = [:]
        parsedBytes = 0
        removals = 0
    }

    private func apply(line: String) throws(FSShareError) {
        let fields = line.split(separator: "\t", omittingEmptySubsequences: false).map { Manifest.unescape(String($0)) }
        guard let tag = fields.first else { return }
        switch tag {
        case "S" where fields.count == 7 || fields.count == 8:
            guard let kind = ShareRecord.Kind(rawValue: fields[2]) else { throw corrupt(line) }
            let flags = fields[3]
            let record = ShareRecord(
                name: fields[1], kind: kind, containerID: fields[4], source: fields[5], destination: fields[6],
                readOnly: flags.contains("r"), recursive: flags.contains("R"), isFile: flags.contains("f"),
                copied: flags.contains("c"), watched: flags.contains("w"), guestPath: fields.count == 8 ? fields[7] : nil)
            insert(record)
        case "U" where fields.count == 2:
            if shares.removeValue(forKey: fields[1]) != nil {
                sequence[fields[1]] = nil
                removals += 1
            }
        case _ where tag.hasPrefix("fsshare-manifest"):
            guard tag == Manifest.header else {
                throw FSShareError(.manifest, "\(path): unsupported manifest version \"\(tag)\"")
            }
        default:
            throw corrupt(line)
        }
    }

    private func corrupt(_ line: String) -> FSShareError {
        FSShareError(.manifest, "\(path): unreadable manifest line \"\(line.prefix(120))\"")
    }

    /// Records a share before it is mounted.
    func recordShare(_ r: ShareRecord) throws(FSShareError) {
        try append(Manifest.line(for: r))
        insert(r)
    }

    private func insert(_ r: ShareRecord) {
        if shares[r.name] == nil {
            sequence[r.name] = nextSequence
            nextSequence += 1
        }
        shares[r.name] = r
    }

    /// Records that a share is gone (after its mount and mount point were removed).
    func recordRemoval(_ name: String) throws(FSShareError) {
        guard shares[name] != nil else { return }
        try append("U\t\(Manifest.escape(name))\n")
        shares[name] = nil
        sequence[name] = nil
        removals += 1
        if removals > 256 && removals > 2 * shares.count { try compact() }
    }

    /// The journal line that records `r`.
    static func line(for r: ShareRecord) -> String {
        var flags = (r.readOnly ? "r" : "") + (r.recursive ? "R" : "") + (r.isFile ? "f" : "") + (r.copied ? "c" : "") + (r.watched ? "w" : "")
        if flags.isEmpty { flags = "-" }
        var fields = ["S", r.name, r.kind.rawValue, flags, r.containerID, r.source, r.destination]
        if let g = r.guestPath { fields.append(g) }
        return fields.map(escape).joined(separator: "\t") + "\n"
    }

    /// The shares in the order they were first recorded.
    var orderedShares: [ShareRecord] {
        shares.values.sorted { (sequence[$0.name] ?? 0) < (sequence[$1.name] ?? 0) }
    }

    private func append(_ text: String) throws(FSShareError) {
        let bytes = Array(text.utf8)
        try sys("cannot write the sandbox manifest") { () throws(SystemCallError) in try Sys.writeAll(fd, bytes, path: path) }
        parsedBytes += bytes.count
    }

    /// Rewrites the journal with only the live records, atomically (temp file + rename).
    private func compact() throws(FSShareError) {
        let tmpName: FilePath = "manifest.tmp"
        var text = Manifest.header + "\n"
        for r in orderedShares { text += Manifest.line(for: r) }
        let bytes = Array(text.utf8)
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

    static func unescape(_ s: String) -> String {
        guard s.utf8.contains(0x25) else { return s }
        return s.replacing("%09", with: "\t").replacing("%0A", with: "\n").replacing("%25", with: "%")
    }
}
