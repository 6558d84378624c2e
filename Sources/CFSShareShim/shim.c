#define _GNU_SOURCE
#include "fsshare_shim.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <sys/ioctl.h>
#include <linux/loop.h>
#include <linux/mount.h>
#include <unistd.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x00001000U
#endif
#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE 0x00004000U
#endif
#ifndef STATX_ATTR_MOUNT_ROOT
#define STATX_ATTR_MOUNT_ROOT 0x00002000
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif

int fsshare_statx(int dirfd, const char *path, int flags, fsshare_statx_t *out) {
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    // Both mount-id bits: a 6.8+ kernel answers with the unique id (never reused until
    // reboot), an older one with the plain id and ignores the bit it does not know. Every
    // statx of the process asks the same way, so ids compare only with ids of one kind.
    if (statx(dirfd, path, flags | AT_STATX_SYNC_AS_STAT, STATX_BASIC_STATS | STATX_MNT_ID | STATX_MNT_ID_UNIQUE, &stx) != 0)
        return -1;
    out->mode = stx.stx_mode;
    out->mount_id_unique = (stx.stx_mask & STATX_MNT_ID_UNIQUE) != 0;
    out->mount_id_known = (stx.stx_mask & (STATX_MNT_ID | STATX_MNT_ID_UNIQUE)) != 0;
    out->mount_id = out->mount_id_known ? stx.stx_mnt_id : 0;
    out->mount_root_known = (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) != 0;
    out->is_mount_root = (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
    out->size = stx.stx_size;
    out->ino = stx.stx_ino;
    out->dev_major = stx.stx_dev_major;
    out->dev_minor = stx.stx_dev_minor;
    out->rdev_major = stx.stx_rdev_major;
    out->rdev_minor = stx.stx_rdev_minor;
    out->uid = stx.stx_uid;
    out->gid = stx.stx_gid;
    out->nlink = stx.stx_nlink;
    return 0;
}

int fsshare_openat2(int dirfd, const char *path, int flags, unsigned mode, uint64_t resolve) {
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)(unsigned)flags;
    how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

int fsshare_open_tree(int dirfd, const char *path, unsigned flags) {
    return (int)syscall(SYS_open_tree, dirfd, path, flags);
}

#ifndef SYS_open_tree_attr
#define SYS_open_tree_attr 467  // Linux 6.15; x86_64 and arm64 (the unified syscall table)
#endif

int fsshare_open_tree_attr(int dirfd, const char *path, unsigned flags, uint64_t attr_set, uint64_t propagation) {
    struct mount_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.attr_set = attr_set;
    attr.propagation = propagation;
    return (int)syscall(SYS_open_tree_attr, dirfd, path, flags, &attr, sizeof(attr));
}

int fsshare_close_range(unsigned first, unsigned last) {
    return (int)syscall(SYS_close_range, first, last, 0);
}

int fsshare_move_mount(int from_dirfd, const char *from_path, int to_dirfd, const char *to_path, unsigned flags) {
    return (int)syscall(SYS_move_mount, from_dirfd, from_path, to_dirfd, to_path, flags);
}

int fsshare_mount_setattr(int dirfd, const char *path, unsigned flags, uint64_t attr_set, uint64_t attr_clr, uint64_t propagation) {
    struct mount_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.attr_set = attr_set;
    attr.attr_clr = attr_clr;
    attr.propagation = propagation;
    return (int)syscall(SYS_mount_setattr, dirfd, path, flags, &attr, sizeof(attr));
}

struct fsshare_dirent64 {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

long fsshare_getdents64(int fd, void *buf, size_t size) {
    return syscall(SYS_getdents64, fd, buf, size);
}

long fsshare_dirent_at(const void *buf, long length, long offset, const char **name, unsigned char *type) {
    if (offset >= length) return -1;
    const struct fsshare_dirent64 *d = (const struct fsshare_dirent64 *)((const char *)buf + offset);
    *name = d->d_name;
    *type = d->d_type;
    return offset + d->d_reclen;
}

int fsshare_fd_link_path(int fd, char *out, size_t capacity) {
    return snprintf(out, capacity, "/proc/self/fd/%d", fd);
}

int fsshare_flock(int fd, int operation) { return flock(fd, operation); }

long fsshare_fstatfs_type(int fd) {
    struct statfs st;
    if (fstatfs(fd, &st) != 0) return -1;
    return (long)st.f_type;
}

const int FSSHARE_O_PATH = O_PATH;
const int FSSHARE_O_NOFOLLOW = O_NOFOLLOW;
const int FSSHARE_O_DIRECTORY = O_DIRECTORY;
const int FSSHARE_O_CLOEXEC = O_CLOEXEC;
const int FSSHARE_AT_EMPTY_PATH = AT_EMPTY_PATH;
const int FSSHARE_AT_RECURSIVE = AT_RECURSIVE;
const int FSSHARE_AT_SYMLINK_NOFOLLOW = AT_SYMLINK_NOFOLLOW;
const int FSSHARE_AT_REMOVEDIR = AT_REMOVEDIR;
const unsigned FSSHARE_OPEN_TREE_CLONE = OPEN_TREE_CLONE;
const unsigned FSSHARE_OPEN_TREE_CLOEXEC = OPEN_TREE_CLOEXEC;
const unsigned FSSHARE_MOVE_MOUNT_F_EMPTY_PATH = MOVE_MOUNT_F_EMPTY_PATH;
const unsigned FSSHARE_MOVE_MOUNT_T_EMPTY_PATH = MOVE_MOUNT_T_EMPTY_PATH;
const uint64_t FSSHARE_MOUNT_ATTR_RDONLY = MOUNT_ATTR_RDONLY;
const uint64_t FSSHARE_RESOLVE_NO_MAGICLINKS = RESOLVE_NO_MAGICLINKS;
const uint64_t FSSHARE_RESOLVE_NO_SYMLINKS = RESOLVE_NO_SYMLINKS;
const uint64_t FSSHARE_RESOLVE_BENEATH = RESOLVE_BENEATH;
const uint64_t FSSHARE_RESOLVE_NO_XDEV = RESOLVE_NO_XDEV;

int fsshare_unix_connect(const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        if (errno == EINTR) continue;
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int fsshare_unix_listen(const char *path, int backlog) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, backlog) != 0) {
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int fsshare_vsock_connect(unsigned cid, unsigned port) {
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        if (errno == EINTR) continue;
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int fsshare_vsock_listen(unsigned port, int backlog) {
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, backlog) != 0) {
        int saved = errno; close(fd); errno = saved; return -1;
    }
    return fd;
}

int fsshare_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int fsshare_poll_in(int fd1, int fd2, int timeout_ms) {
    struct pollfd p[2] = {{fd1, POLLIN, 0}, {fd2, POLLIN, 0}};
    int rc = poll(p, fd2 >= 0 ? 2 : 1, timeout_ms);
    if (rc <= 0) return rc;
    int mask = 0;
    if (p[0].revents) mask |= 1;
    if (fd2 >= 0 && p[1].revents) mask |= 2;
    return mask;
}

int fsshare_poll_out(int fd, int timeout_ms) {
    struct pollfd p = {fd, POLLOUT, 0};
    int rc = poll(&p, 1, timeout_ms);
    return rc < 0 ? -1 : (rc > 0 ? 1 : 0);
}

long fsshare_send(int fd, const void *buf, size_t len, int is_socket) {
    return is_socket ? send(fd, buf, len, MSG_NOSIGNAL) : write(fd, buf, len);
}

long fsshare_send_nowait(int fd, const void *buf, size_t len) {
    return send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int fsshare_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned flags) {
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

int fsshare_make_raw(int fd) {
    struct termios t;
    if (tcgetattr(fd, &t) != 0) return -1;
    cfmakeraw(&t);
    return tcsetattr(fd, TCSANOW, &t);
}

int fsshare_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC | O_NONBLOCK); }

typedef struct { void (*fn)(void *); void *ctx; } fsshare_thunk;

static void *fsshare_thread_main(void *arg) {
    fsshare_thunk t = *(fsshare_thunk *)arg;
    free(arg);
    t.fn(t.ctx);
    return NULL;
}

int fsshare_thread_start(void (*fn)(void *), void *ctx, uint64_t *handle) {
    fsshare_thunk *t = malloc(sizeof(*t));
    if (!t) return ENOMEM;
    t->fn = fn;
    t->ctx = ctx;
    pthread_t th;
    int rc = pthread_create(&th, NULL, fsshare_thread_main, t);
    if (rc != 0) { free(t); return rc; }
    if (handle) *handle = (uint64_t)th;
    else pthread_detach(th);
    return 0;
}

int fsshare_thread_join(uint64_t handle) { return pthread_join((pthread_t)handle, NULL); }

long fsshare_peak_rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return -1;
    char line[256];
    long kib = -1;
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "VmHWM:", 6) == 0) { kib = strtol(line + 6, NULL, 10); break; }
    }
    fclose(f);
    return kib;
}

uint64_t fsshare_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

const unsigned FSSHARE_RENAME_NOREPLACE = RENAME_NOREPLACE;
const unsigned FSSHARE_RENAME_EXCHANGE = RENAME_EXCHANGE;
const unsigned FSSHARE_VMADDR_CID_HOST = VMADDR_CID_HOST;

int fsshare_open_pty(char *slave_name, size_t capacity) {
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    if (grantpt(m) != 0 || unlockpt(m) != 0 || ptsname_r(m, slave_name, capacity) != 0) {
        int saved = errno; close(m); errno = saved; return -1;
    }
    return m;
}

void fsshare_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

int fsshare_lsetxattr(const char *path, const char *name, const void *value, size_t size) {
    return lsetxattr(path, name, value, size, 0);
}

long fsshare_lgetxattr(const char *path, const char *name, void *value, size_t size) {
    return (long)lgetxattr(path, name, value, size);
}

int fsshare_loop_get_free(int control_fd) {
    return ioctl(control_fd, LOOP_CTL_GET_FREE);
}

int fsshare_loop_configure(int loop_fd, int backing_fd, uint64_t offset, uint64_t size, const char *name) {
    struct loop_config config;
    memset(&config, 0, sizeof config);
    config.fd = (unsigned)backing_fd;
    config.info.lo_offset = offset;
    config.info.lo_sizelimit = size;
    config.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
    if (name) strncpy((char *)config.info.lo_file_name, name, LO_NAME_SIZE - 1);
    return ioctl(loop_fd, LOOP_CONFIGURE, &config);
}

int fsshare_loop_clear(int loop_fd) {
    return ioctl(loop_fd, LOOP_CLR_FD, 0);
}

int fsshare_fsopen(const char *fstype) {
    return (int)syscall(SYS_fsopen, fstype, FSOPEN_CLOEXEC);
}

int fsshare_fsconfig(int fs_fd, const char *key, const char *value) {
    if (key == NULL) return (int)syscall(SYS_fsconfig, fs_fd, FSCONFIG_CMD_CREATE, NULL, NULL, 0);
    if (value == NULL) return (int)syscall(SYS_fsconfig, fs_fd, FSCONFIG_SET_FLAG, key, NULL, 0);
    return (int)syscall(SYS_fsconfig, fs_fd, FSCONFIG_SET_STRING, key, value, 0);
}

int fsshare_fsmount(int fs_fd, int read_only) {
    unsigned attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (read_only ? MOUNT_ATTR_RDONLY : 0);
    return (int)syscall(SYS_fsmount, fs_fd, FSMOUNT_CLOEXEC, attrs);
}
