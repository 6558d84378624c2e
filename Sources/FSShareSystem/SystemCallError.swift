import SystemPackage

/// A failed system call: which call, on which path, with which `errno`.
///
/// Every function in ``Sys`` throws this, so an error that reaches a user always names the
/// syscall and the path it was made on.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The system call's name, e.g. `"move_mount"`.
    public var syscall: String
    /// The path the call was made on (relative to a directory fd where the call is `*at`).
    public var path: FilePath?
    /// The error the kernel returned (or the fault injector pretended it did).
    public var errno: Errno

    /// `syscall` failed on `path` (nil: no path) with `errno`.
    ///
    /// - Parameters:
    ///   - syscall: the call's name.
    ///   - path: what errors show for the descriptor (the call itself uses `fd`).
    ///   - errno: the error.
    public init(syscall: String, path: FilePath?, errno: Errno) {
        self.syscall = syscall
        self.path = path
        self.errno = errno
    }

    /// `syscall(path): strerror (errno N)`.
    public var description: String {
        if let path {
            return "\(syscall)(\(path)): \(errno) (errno \(errno.rawValue))"
        }
        return "\(syscall): \(errno) (errno \(errno.rawValue))"
    }
}
