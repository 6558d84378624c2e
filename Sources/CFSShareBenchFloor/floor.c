#define _GNU_SOURCE
#include "bench_floor.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/mount.h>
#include <linux/openat2.h>

#define CHECK(x) do { if ((x) < 0) return -errno; } while (0)

#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE 0x00004000U
#endif

static int sx(int dir, const char *path, int flags, struct statx *st) {
    return statx(dir, path, flags | AT_SYMLINK_NOFOLLOW | AT_STATX_SYNC_AS_STAT, STATX_BASIC_STATS | STATX_MNT_ID | STATX_MNT_ID_UNIQUE, st);
}

// The filesystem magic of an anonymous-device source, remembered by unique mount id as the
// library does (a mount's filesystem never changes; a unique id is never reused).
static struct { unsigned long long mnt; long type; } fs_types[64];
static int fs_type_count;
static int fs_type_of(int fd, const struct statx *st, long *type) {
    int unique = (st->stx_mask & STATX_MNT_ID_UNIQUE) != 0;
    for (int i = 0; unique && i < fs_type_count; i++)
        if (fs_types[i].mnt == st->stx_mnt_id) { *type = fs_types[i].type; return 0; }
    struct statfs sfs;
    if (fstatfs(fd, &sfs) != 0) return -1;
    *type = (long)sfs.f_type;
    if (unique) {
        if (fs_type_count == 64) fs_type_count = 0;
        fs_types[fs_type_count].mnt = st->stx_mnt_id;
        fs_types[fs_type_count++].type = *type;
    }
    return 0;
}

// A detached copy of `fd` with its attributes set, as the library makes it: open_tree_attr
// where the kernel has it (probed once), else open_tree + mount_setattr.
static int has_open_tree_attr = -1;
static int clone_with(int fd, unsigned long long attr_set, unsigned long long propagation) {
    struct mount_attr attr = { .attr_set = attr_set, .propagation = propagation };
    unsigned flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH;
    if (has_open_tree_attr < 0) {
        struct mount_attr probe = { .propagation = MS_PRIVATE };
        int p = (int)syscall(467, AT_FDCWD, "/", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC, &probe, sizeof probe);
        has_open_tree_attr = p >= 0;
        if (p >= 0) close(p);
    }
    if (has_open_tree_attr) return (int)syscall(467, fd, "", flags, &attr, sizeof attr);
    int tree = (int)syscall(SYS_open_tree, fd, "", flags);
    if (tree < 0) return -1;
    if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) { close(tree); return -1; }
    return tree;
}

// Closes a set of descriptors as the library does: one close_range per adjacent run.
static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }
static void close_set(int *fds, int n) {
    qsort(fds, (size_t)n, sizeof *fds, cmp_int);
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && fds[j + 1] <= fds[j] + 1) j++;
        if (j == i) close(fds[i]); else syscall(SYS_close_range, fds[i], fds[j], 0);
        i = j + 1;
    }
}

int floor_prepare(int root, const char *sid, floor_sandbox *out) {
    struct statx st;
    char aside[300];
    // What fsshare's prepare issues (strace of `hack/bench syscalls`), in order.
    snprintf(aside, sizeof aside, ".%s.fsshare-prepare", sid);
    out->root = root;
    // The root open for reading: its own descriptor holds the root's lock.
    CHECK(out->rootfd_own = openat(root, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    // The sandbox directory is built aside under the root's lock, manifest inside, then renamed.
    CHECK(flock(out->rootfd_own, LOCK_EX));
    if (sx(out->rootfd_own, sid, 0, &st) == 0) return -EEXIST;
    // The aside name is made directly (looked at only when it exists: a killed prepare's).
    CHECK(mkdirat(out->rootfd_own, aside, 0700));
    CHECK(out->lock = openat(out->rootfd_own, aside, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    // The sandbox's lock, taken before the directory has its name: the manifest needs no re-read.
    CHECK(flock(out->lock, LOCK_EX));
    CHECK(out->manifest = openat(out->lock, "manifest", O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    // The header and the first settings in one write.
    static const char header[] = "fsshare-manifest 1\tsb\nA\tshared-fs\tvirtio-fs\nA\tguest-dir\t/run/kata-containers/shared/containers/\n";
    CHECK(write(out->manifest, header, sizeof header - 1));
    CHECK(syscall(SYS_renameat2, out->rootfd_own, aside, out->rootfd_own, sid, RENAME_NOREPLACE));
    CHECK(flock(out->rootfd_own, LOCK_UN));
    // The self-bind with the new mount API: a private detached clone moved onto the directory,
    // then made shared through its root (the clone's descriptor, kept as `top`).
    int tree = clone_with(out->lock, 0, MS_PRIVATE);
    CHECK(tree);
    struct mount_attr shared = { .propagation = MS_SHARED };
    CHECK(syscall(SYS_move_mount, tree, "", out->rootfd_own, sid, MOVE_MOUNT_F_EMPTY_PATH));
    out->top = tree;
    CHECK(syscall(SYS_mount_setattr, out->top, "", AT_EMPTY_PATH, &shared, sizeof shared));
    CHECK(mkdirat(out->top, "mounts", 0750));
    CHECK(out->mounts = openat(out->top, "mounts", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    CHECK(mkdirat(out->top, "shared", 0700));
    CHECK(mkdirat(out->top, "private", 0750));
    out->private_dir = -1;  // private/ is opened by the first legacy read-only share only
    // shared/: a clone of mounts/, read-only before it is attached by name, then a slave.
    int exp = clone_with(out->mounts, MOUNT_ATTR_RDONLY, 0);
    CHECK(exp);
    struct mount_attr slave = { .propagation = MS_SLAVE };
    CHECK(syscall(SYS_move_mount, exp, "", out->top, "shared", MOVE_MOUNT_F_EMPTY_PATH));
    CHECK(syscall(SYS_mount_setattr, exp, "", AT_EMPTY_PATH, &slave, sizeof slave));
    close(exp);
    CHECK(sx(out->mounts, "", AT_EMPTY_PATH, &st));
    CHECK(flock(out->lock, LOCK_UN));
    return 0;
}

int floor_cleanup(floor_sandbox *sb, const char *sid) {
    struct statx st;
    char p[320], buf[32768];
    // What fsshare's cleaner does: fresh descriptors, read the manifest, one recursive detach of
    // the self-bind, then delete entry by entry.
    int held[] = { sb->rootfd_own, sb->lock, sb->top, sb->mounts, sb->manifest };
    close_set(held, 5);
    int root = openat(sb->root, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    CHECK(root);
    // The aside name is looked for only when the sandbox directory is missing.
    int lock = openat(root, sid, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(lock);
    CHECK(flock(lock, LOCK_EX));
    int manifest = openat(lock, "manifest", O_RDWR | O_APPEND | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    CHECK(manifest);
    CHECK(sx(manifest, "", AT_EMPTY_PATH, &st));
    CHECK(geteuid());
    CHECK(pread(manifest, buf, st.stx_size < sizeof buf ? st.stx_size : sizeof buf, 0));
    // The self-bind is there (the lock's descriptor is a mount root): detaching it detaches
    // shared/ and every share below it.
    CHECK(sx(lock, "", AT_EMPTY_PATH, &st));
    snprintf(p, sizeof p, "/proc/self/fd/%d/%s", root, sid);
    CHECK(umount2(p, MNT_DETACH | UMOUNT_NOFOLLOW));
    CHECK(sx(root, sid, 0, &st));  // not a mount root: on the root's mount (no statx of the root)
    int dir = openat(root, sid, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(dir);
    while (syscall(SYS_getdents64, dir, buf, sizeof buf) > 0) {}
    // Empty directories and the manifest go with one call each (d_type picks which).
    CHECK(unlinkat(dir, "private", AT_REMOVEDIR));
    CHECK(unlinkat(dir, "shared", AT_REMOVEDIR));
    CHECK(unlinkat(dir, "mounts", AT_REMOVEDIR));
    CHECK(unlinkat(dir, "manifest", 0));
    CHECK(unlinkat(root, sid, AT_REMOVEDIR));
    int opened[] = { root, lock, manifest, dir };
    close_set(opened, 4);
    return 0;
}

int floor_share(floor_sandbox *sb, const char *source, const char *name, int read_only) {
    struct statx st;
    struct open_how how = { .flags = O_PATH | O_CLOEXEC, .resolve = RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS };
    char line[512];
    CHECK(flock(sb->lock, LOCK_EX));
    CHECK(sx(sb->manifest, "", AT_EMPTY_PATH, &st));
    int src = (int)syscall(SYS_openat2, AT_FDCWD, source, &how, sizeof how);
    CHECK(src);
    CHECK(sx(src, "", AT_EMPTY_PATH, &st));
    // No symlink in the path (RESOLVE_NO_SYMLINKS): no readlink. fstatfs only on an
    // anonymous-device filesystem not met before, as the library does.
    long fs_type;
    if (st.stx_dev_major == 0) CHECK(fs_type_of(src, &st, &fs_type));
    int n = snprintf(line, sizeof line, "S\t%s\tvolume\t%s\tc\t%s\t/d\n", name, read_only ? "r" : "-", source);
    CHECK(write(sb->manifest, line, (size_t)n));
    // A mount point this call created is attached by name (no symlink followed), not opened.
    CHECK(mkdirat(sb->mounts, name, 0755));
    int tree = clone_with(src, read_only ? MOUNT_ATTR_RDONLY : 0, MS_PRIVATE);
    CHECK(tree);
    CHECK(syscall(SYS_move_mount, tree, "", sb->mounts, name, MOVE_MOUNT_F_EMPTY_PATH));
    // The clone and the source in one call when their numbers are adjacent (as fsshare does).
    if (tree == src + 1) syscall(SYS_close_range, src, tree, 0); else { close(tree); close(src); }
    CHECK(flock(sb->lock, LOCK_UN));
    return 0;
}

int floor_unshare(floor_sandbox *sb, const char *name) {
    struct statx st;
    char p[512], line[512];
    CHECK(flock(sb->lock, LOCK_EX));
    CHECK(sx(sb->manifest, "", AT_EMPTY_PATH, &st));
    snprintf(p, sizeof p, "/proc/self/fd/%d/%s", sb->mounts, name);
    // umount then rmdir: neither can delete through a mount, so nothing is looked at first.
    CHECK(umount2(p, MNT_DETACH | UMOUNT_NOFOLLOW));
    CHECK(unlinkat(sb->mounts, name, AT_REMOVEDIR));
    int n = snprintf(line, sizeof line, "U\t%s\n", name);
    CHECK(write(sb->manifest, line, (size_t)n));
    CHECK(flock(sb->lock, LOCK_UN));
    return 0;
}

int floor_kata_rw_share(const char *source, const char *target) {
    CHECK(mkdir(target, 0755));
    CHECK(mount(source, target, NULL, MS_BIND, NULL));
    CHECK(mount(NULL, target, NULL, MS_PRIVATE, NULL));
    return 0;
}

int floor_kata_unshare(const char *target) {
    CHECK(umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW));
    CHECK(rmdir(target));
    return 0;
}

int floor_kata_ro_share(const char *source, const char *private_target, const char *target) {
    if (mkdir(private_target, 0755) != 0 && errno != EEXIST) return -errno;
    CHECK(mount(source, private_target, NULL, MS_BIND, NULL));
    CHECK(mount(NULL, private_target, NULL, MS_PRIVATE, NULL));
    CHECK(mount(source, private_target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL));
    CHECK(mkdir(target, 0755));
    CHECK(mount(private_target, target, NULL, MS_BIND, NULL));
    CHECK(mount(NULL, target, NULL, MS_PRIVATE, NULL));
    CHECK(umount2(private_target, MNT_DETACH | UMOUNT_NOFOLLOW));
    return 0;
}

/// Kata's sandbox paths: <sandbox>/shared, mounts, private.
typedef struct { char shared[512], mounts[512], priv[512]; } kata_paths;

static kata_paths kata_paths_of(const char *sandbox) {
    kata_paths p;
    snprintf(p.shared, sizeof p.shared, "%s/shared", sandbox);
    snprintf(p.mounts, sizeof p.mounts, "%s/mounts", sandbox);
    snprintf(p.priv, sizeof p.priv, "%s/private", sandbox);
    return p;
}

int floor_kata_prepare(const char *sandbox) {
    kata_paths k = kata_paths_of(sandbox);
    const char *shared = k.shared, *mounts = k.mounts, *priv = k.priv;
    CHECK(mkdir(sandbox, 0750));
    CHECK(mkdir(shared, 0750));
    CHECK(mkdir(mounts, 0750));
    CHECK(mkdir(priv, 0750));
    CHECK(mount(mounts, shared, NULL, MS_BIND, NULL));
    CHECK(mount(NULL, shared, NULL, MS_SLAVE, NULL));
    CHECK(mount(mounts, shared, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL));
    return 0;
}

int floor_kata_cleanup(const char *sandbox) {
    kata_paths k = kata_paths_of(sandbox);
    const char *shared = k.shared, *mounts = k.mounts, *priv = k.priv;
    CHECK(umount2(shared, MNT_DETACH | UMOUNT_NOFOLLOW));
    CHECK(rmdir(shared));
    CHECK(rmdir(mounts));
    CHECK(rmdir(priv));
    CHECK(rmdir(sandbox));
    return 0;
}
