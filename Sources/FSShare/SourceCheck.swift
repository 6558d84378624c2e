#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Opens a share source once (`O_PATH`) and decides whether it may be shared. The share is then
/// made from that descriptor, so what was checked is exactly what gets bound.
enum SourceCheck {
    struct Opened {
        var fd: FileDescriptor
        /// The resolved path, for messages.
        var path: FilePath
        var kind: FileKind
    }

    /// Filesystems that are kernel interfaces, not data: never exported to a guest.
    static let pseudoFilesystems: [Int: String] = [
        0x9fa0: "proc", 0x6265_6572: "sysfs", 0x6462_6720: "debugfs", 0x7472_6163: "tracefs",
        0x7363_6673: "securityfs", 0x27e0eb: "cgroup", 0x6367_7270: "cgroup2", 0xcafe_4a11: "bpf",
        0x1cd1: "devpts", 0x6265_6570: "configfs", 0xde5e_81e4: "efivarfs", 0x6165_676c: "pstore",
        0xf97c_ff8c: "selinuxfs", 0x4249_4e4d: "binfmt_misc", 0x6573_5543: "fusectl", 0x6e73_6673: "nsfs",
    ]

    /// Why `path` (lexically) may not be shared, or nil.
    static func lexicalProblem(_ path: FilePath) -> String? {
        let p = path.lexicallyNormalized()
        for system in ["/proc", "/sys"] where p == FilePath(system) || p.starts(with: FilePath(system)) {
            return "it is under \(system), a kernel interface"
        }
        if p == "/dev" { return "it is the host's /dev" }
        return nil
    }

    static func open(_ path: FilePath, policy: SourceSymlinkPolicy) throws(FSShareError) -> Opened {
        let raw = path.string
        guard !raw.isEmpty, !raw.utf8.contains(0), path.isAbsolute else {
            throw FSShareError(.invalidArgument, "share source \"\(raw)\" must be a non-empty absolute path")
        }
        if let problem = lexicalProblem(path) { throw refused(path, problem) }
        var resolve = Sys.resolveNoMagicLinks
        if policy == .refuse { resolve |= Sys.resolveNoSymlinks }
        let fd: FileDescriptor
        do {
            fd = try Sys.openat2(nil, path, flags: Sys.oPath, resolve: resolve)
        } catch {
            if error.errno == .tooManySymbolicLinkLevels || error.errno == .improperLink {
                throw refused(path, policy == .refuse ? "it contains a symbolic link (source symlinks are refused)" : "it resolves through a /proc magic link")
            }
            throw FSShareError.system("cannot open the share source \(path)", error)
        }
        do {
            let st = try Sys.fstatx(fd, path: path)
            let resolved = (try? Sys.pathOf(fd)) ?? path
            switch st.kind {
            case .regular, .directory: break
            default: throw refused(path, "it is a \(st.kind), which a shared filesystem cannot carry")
            }
            if let problem = lexicalProblem(resolved) { throw refused(path, "it resolves to \(resolved): \(problem.dropFirst(3))") }
            if resolved.starts(with: "/dev"), st.kind != .regular {
                throw refused(path, "it is a \(st.kind) under /dev (host devices are not shared)")
            }
            let magic = try Sys.filesystemType(fd, path: path)
            if let name = pseudoFilesystems[magic] {
                throw refused(path, "it is on \(name), a kernel pseudo-filesystem")
            }
            return Opened(fd: fd, path: resolved, kind: st.kind)
        } catch let error as FSShareError {
            Sys.close(fd)
            throw error
        } catch let error as SystemCallError {
            Sys.close(fd)
            throw FSShareError.system("cannot inspect the share source \(path)", error)
        } catch {
            Sys.close(fd)
            throw FSShareError(.systemCall, "cannot inspect the share source \(path): \(error)")
        }
    }

    static func refused(_ path: FilePath, _ why: String) -> FSShareError {
        FSShareError(.refused, "refusing to share \(path): \(why)")
    }
}
