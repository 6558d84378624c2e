// C shims for the Linux calls Swift's Glibc module does not import (it is built without
// _GNU_SOURCE): statx, openat2, the new mount API, O_PATH, AT_* flags and statfs magics.
// Each function returns what the syscall returns and leaves errno set; no policy lives here.
#ifndef FSSHARE_SHIM_H
#define FSSHARE_SHIM_H

#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/// What fsshare needs from one statx(2) call.
typedef struct {
    uint32_t mode;          // st_mode (type and permission bits)
    uint64_t mount_id;      // STATX_MNT_ID: which mount the object lives on
    int is_mount_root;      // STATX_ATTR_MOUNT_ROOT: the object is the root of a mount
    int mount_root_known;   // the kernel reported STATX_ATTR_MOUNT_ROOT in attributes_mask
    int mount_id_known;     // the kernel filled STATX_MNT_ID or STATX_MNT_ID_UNIQUE
    int mount_id_unique;    // mount_id is STATX_MNT_ID_UNIQUE's (Linux 6.8+): never reused until reboot
    uint64_t size;
    uint64_t ino;
    uint32_t dev_major, dev_minor;
    uint32_t rdev_major, rdev_minor; // the device a device node stands for
    uint32_t uid, gid;
    uint32_t nlink;
} fsshare_statx_t;

/// statx(dirfd, path, flags | AT_STATX_SYNC_AS_STAT, BASIC|MNT_ID|MNT_ID_UNIQUE). 0 or -1 with errno.
int fsshare_statx(int dirfd, const char *path, int flags, fsshare_statx_t *out);

/// openat2(2) with RESOLVE_* flags; -1 with errno (ENOSYS on kernels before 5.6).
int fsshare_openat2(int dirfd, const char *path, int flags, unsigned mode, uint64_t resolve);

/// open_tree(2). -1 with errno (ENOSYS before 5.2).
int fsshare_open_tree(int dirfd, const char *path, unsigned flags);

/// open_tree_attr(2) (Linux 6.15): open_tree with the mount attributes (attr_set, propagation)
/// applied before the descriptor exists. -1 with errno (ENOSYS before 6.15).
int fsshare_open_tree_attr(int dirfd, const char *path, unsigned flags, uint64_t attr_set, uint64_t propagation);

/// move_mount(2). -1 with errno.
int fsshare_move_mount(int from_dirfd, const char *from_path, int to_dirfd, const char *to_path, unsigned flags);
/// close_range(2) (Linux 5.9): closes every descriptor from first to last. -1 and errno on failure.
int fsshare_close_range(unsigned first, unsigned last);

/// mount_setattr(2) with a struct mount_attr built from the arguments. -1 with errno (ENOSYS before 5.12).
int fsshare_mount_setattr(int dirfd, const char *path, unsigned flags, uint64_t attr_set, uint64_t attr_clr, uint64_t propagation);

/// Writes "/proc/self/fd/N" into out (no allocation). Returns the length.
int fsshare_fd_link_path(int fd, char *out, size_t capacity);

/// getdents64(2) into buf; returns bytes read, 0 at the end, -1 with errno.
long fsshare_getdents64(int fd, void *buf, size_t size);

/// Walks a getdents64 buffer: returns the offset of the next record after `offset` (or -1 at the
/// end) and sets *name and *type for the record at `offset`.
long fsshare_dirent_at(const void *buf, long length, long offset, const char **name, unsigned char *type);

/// flock(2) (Swift sees the name as the struct).
int fsshare_flock(int fd, int operation);

/// fstatfs(2) f_type, or -1 with errno.
long fsshare_fstatfs_type(int fd);

// Constants that are GNU-only or missing from Swift's view of the headers.
extern const int FSSHARE_O_PATH;
extern const int FSSHARE_O_NOFOLLOW;
extern const int FSSHARE_O_DIRECTORY;
extern const int FSSHARE_O_CLOEXEC;
extern const int FSSHARE_AT_EMPTY_PATH;
extern const int FSSHARE_AT_RECURSIVE;
extern const int FSSHARE_AT_SYMLINK_NOFOLLOW;
extern const int FSSHARE_AT_REMOVEDIR;
extern const unsigned FSSHARE_OPEN_TREE_CLONE;
extern const unsigned FSSHARE_OPEN_TREE_CLOEXEC;
extern const unsigned FSSHARE_MOVE_MOUNT_F_EMPTY_PATH;
extern const unsigned FSSHARE_MOVE_MOUNT_T_EMPTY_PATH;
extern const uint64_t FSSHARE_MOUNT_ATTR_RDONLY;
extern const uint64_t FSSHARE_RESOLVE_NO_MAGICLINKS;
extern const uint64_t FSSHARE_RESOLVE_NO_SYMLINKS;
extern const uint64_t FSSHARE_RESOLVE_BENEATH;
extern const uint64_t FSSHARE_RESOLVE_NO_XDEV;

// ---- Sockets, channels, threads (the agent channel and the watcher) ----

/// socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC) + connect(path). fd or -1 with errno.
int fsshare_unix_connect(const char *path);
/// socket(AF_UNIX) + bind(path) + listen(backlog). fd or -1 with errno (ENAMETOOLONG if the path does not fit).
int fsshare_unix_listen(const char *path, int backlog);
/// socket(AF_VSOCK, SOCK_STREAM|SOCK_CLOEXEC) + connect(cid, port). fd or -1 with errno.
int fsshare_vsock_connect(unsigned cid, unsigned port);
/// socket(AF_VSOCK) + bind(VMADDR_CID_ANY, port) + listen. fd or -1 with errno.
int fsshare_vsock_listen(unsigned port, int backlog);
/// accept4(fd, SOCK_CLOEXEC). fd or -1 with errno.
int fsshare_accept(int fd);
/// poll(2) for POLLIN on up to two fds (fd2 < 0: unused). Returns a bitmask: 1 = fd1 readable
/// (or hung up), 2 = fd2 readable; 0 on timeout; -1 with errno. timeout_ms < 0 waits forever.
int fsshare_poll_in(int fd1, int fd2, int timeout_ms);
/// poll(2) for POLLOUT on fd. 1 writable, 0 timeout, -1 with errno.
int fsshare_poll_out(int fd, int timeout_ms);
/// send(2) with MSG_NOSIGNAL (a closed peer gives EPIPE, not SIGPIPE); write(2) for non-sockets.
long fsshare_send(int fd, const void *buf, size_t len, int is_socket);
/// send(MSG_NOSIGNAL|MSG_DONTWAIT): -1/EAGAIN when it would block.
long fsshare_send_nowait(int fd, const void *buf, size_t len);
/// renameat2(2). -1 with errno.
int fsshare_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned flags);
/// Puts a terminal into raw mode (cfmakeraw). 0, or -1 with errno (ENOTTY for a non-tty: fine).
int fsshare_make_raw(int fd);
/// pipe2(O_CLOEXEC|O_NONBLOCK). 0 or -1 with errno.
int fsshare_pipe(int fds[2]);
/// Starts a pthread running fn(ctx): joinable when handle is non-NULL, else detached. 0 or an errno.
int fsshare_thread_start(void (*fn)(void *), void *ctx, uint64_t *handle);
/// pthread_join.
int fsshare_thread_join(uint64_t handle);
/// The peak resident set size of this process in KiB (VmHWM), or -1.
long fsshare_peak_rss_kib(void);
/// Opens a pseudo-terminal master and writes its slave's path. Master fd or -1 with errno.
int fsshare_open_pty(char *slave_name, size_t capacity);
/// CLOCK_MONOTONIC in nanoseconds.
uint64_t fsshare_monotonic_ns(void);

/// ioctl(LOOP_CTL_GET_FREE) on /dev/loop-control: a free loop device number, or -1 with errno.
int fsshare_loop_get_free(int control_fd);

/// ioctl(LOOP_CONFIGURE) (Linux 5.8): binds `backing_fd` to the loop device `loop_fd` in one
/// step, limited to offset ..< offset + size, read-only, with autoclear (the device frees
/// itself when its last user — an open descriptor or a mount — goes). 0 or -1 with errno.
int fsshare_loop_configure(int loop_fd, int backing_fd, uint64_t offset, uint64_t size, const char *name);

/// ioctl(LOOP_CLR_FD). 0 or -1 with errno.
int fsshare_loop_clear(int loop_fd);

/// fsopen(2) (Linux 5.2): a filesystem context, or -1 with errno.
int fsshare_fsopen(const char *fstype);

/// fsconfig(2) FSCONFIG_SET_STRING (value non-NULL), FSCONFIG_SET_FLAG (value NULL) or, with
/// key NULL, FSCONFIG_CMD_CREATE. 0 or -1 with errno.
int fsshare_fsconfig(int fs_fd, const char *key, const char *value);

/// fsmount(2): a detached mount of the created superblock (read-only, nosuid, nodev when
/// `read_only`; nosuid and nodev always), or -1 with errno.
int fsshare_fsmount(int fs_fd, int read_only);

/// lsetxattr(2) (sys/xattr.h is not part of Glibc's Swift module). 0 or -1 with errno.
int fsshare_lsetxattr(const char *path, const char *name, const void *value, size_t size);

/// lgetxattr(2): the value's length, or -1 with errno.
long fsshare_lgetxattr(const char *path, const char *name, void *value, size_t size);

extern const unsigned FSSHARE_RENAME_NOREPLACE;
extern const unsigned FSSHARE_RENAME_EXCHANGE;
extern const unsigned FSSHARE_VMADDR_CID_HOST;

/// Makes stdout line-buffered (progress output through a pipe shows as it happens).
void fsshare_line_buffer_stdout(void);

#ifdef __cplusplus
}
#endif
#endif
