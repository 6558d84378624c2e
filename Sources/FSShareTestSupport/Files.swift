#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem
import SystemPackage

/// Writes `text` to `path` (created or truncated, mode 0644); failures are ignored (the caller
/// checks the result by reading).
public func writeFile(_ path: String, _ text: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { return }
    _ = text.withCString { write(fd, $0, strlen($0)) }
    close(fd)
}

/// The file's content, or nil if it cannot be read.
public func readFile(_ path: String) -> String? {
    guard let fd = try? Sys.openat(nil, FilePath(path), flags: O_RDONLY) else { return nil }
    defer { Sys.close(fd) }
    guard let bytes = try? Sys.readAll(fd, path: FilePath(path)) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

/// `mkdir -p`, mode 0755.
public func mkdirs(_ path: String) {
    try? Sys.makeDirectories(FilePath(path), mode: 0o755)
}

/// The file's bytes, or empty if it cannot be read.
public func readBytes(_ path: String) -> [UInt8] {
    guard let fd = try? Sys.openat(nil, FilePath(path), flags: O_RDONLY) else { return [] }
    defer { Sys.close(fd) }
    return (try? Sys.readAll(fd, path: FilePath(path))) ?? []
}

/// Writes `bytes` to `path` (created or truncated, mode 0644); failures are ignored.
public func writeBytes(_ path: String, _ bytes: [UInt8]) {
    guard let fd = try? Sys.openat(nil, FilePath(path), flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644) else { return }
    defer { Sys.close(fd) }
    try? Sys.writeAll(fd, bytes, path: FilePath(path))
}
