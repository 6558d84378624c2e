#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <linux/openat2.h>
#include <linux/mount.h>
#include <errno.h>
// hack/profile's LD_PRELOAD: valgrind 3.19 (Debian 12) does not know openat2, open_tree,
// open_tree_attr, mount_setattr or move_mount and fails them with ENOSYS. Under it, fsshare's
// own code (what is counted) runs its real path while these five are stood in for: openat2 by
// openat (with O_NOFOLLOW for RESOLVE_NO_SYMLINKS); open_tree(CLONE) and open_tree_attr by an
// O_PATH descriptor of the same object; mount_setattr by nothing; move_mount by a bind mount of
// that object onto the target. The kernel's side differs (no detached mounts): for instruction
// counts of user space only, never for timing or for checking behaviour.
long syscall(long n, ...) {
    va_list ap; va_start(ap, n);
    long a[6]; for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_openat2) {
        struct open_how *how = (struct open_how *)a[2];
        int flags = (int)how->flags;
        if (how->resolve & RESOLVE_NO_SYMLINKS) flags |= O_NOFOLLOW;
        return openat((int)a[0], (const char *)a[1], flags, (mode_t)how->mode);
    }
    // open_tree_attr (467): open_tree, its attributes dropped like mount_setattr's. The library
    // probes it and would fall back to open_tree + mount_setattr without it; standing in keeps
    // the counted path the one this kernel takes.
    if (n == SYS_open_tree || n == 467) {
        const char *p = (const char *)a[1];
        return openat((int)a[0], p[0] ? p : ".", O_PATH | O_CLOEXEC);
    }
    if (n == SYS_mount_setattr) return 0;
    if (n == SYS_move_mount) {
        char from[64], to[512];
        snprintf(from, sizeof from, "/proc/self/fd/%d", (int)a[0]);
        const char *tp = (const char *)a[3];
        if (tp && tp[0]) snprintf(to, sizeof to, "/proc/self/fd/%d/%s", (int)a[2], tp);
        else snprintf(to, sizeof to, "/proc/self/fd/%d", (int)a[2]);
        return mount(from, to, NULL, MS_BIND, NULL);
    }
    static long (*real)(long, ...);
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
