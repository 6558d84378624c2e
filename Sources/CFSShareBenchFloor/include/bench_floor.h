// The benchmark's floor: the syscall sequences fsshare issues for share, unshare, prepare and
// cleanup, written as raw C with no checks beyond return codes. fsshare's cost over this is its
// own overhead (Swift, bookkeeping). Also Kata's minimal sequences, for reference.
#ifndef FSSHARE_BENCH_FLOOR_H
#define FSSHARE_BENCH_FLOOR_H
#include <stdint.h>
#include "watch_floor.h"
#include "copy_floor.h"

typedef struct {
    int root;      // O_PATH root directory
    int lock;      // O_RDONLY sandbox directory (flock)
    int top;       // O_PATH sandbox directory through its self-bind
    int mounts;    // O_PATH mounts/
    int manifest;  // O_APPEND journal
    int private_dir; // O_PATH private/
    int rootfd_own;  // the sharer's own descriptor of the root
} floor_sandbox;

/// fsshare's prepare sequence. 0 or -errno.
int floor_prepare(int root, const char *sid, floor_sandbox *out);
/// fsshare's cleanup sequence for a sandbox with no shares left. 0 or -errno.
int floor_cleanup(floor_sandbox *sb, const char *sid);
/// fsshare's steady-state share sequence (new mount API). 0 or -errno.
int floor_share(floor_sandbox *sb, const char *source, const char *name, int read_only);
/// fsshare's steady-state unshare sequence. 0 or -errno.
int floor_unshare(floor_sandbox *sb, const char *name);
/// Kata's rw share: mkdir + bind + MS_PRIVATE (paths). 0 or -errno.
int floor_kata_rw_share(const char *source, const char *target);
/// Kata's unshare: umount2(MNT_DETACH|UMOUNT_NOFOLLOW) + rmdir. 0 or -errno.
int floor_kata_unshare(const char *target);
/// Kata's ro share (fs_share_linux.go): a private ro bind at `private_target` (mkdir, bind,
/// MS_PRIVATE, remount ro), bound again at `target` (mkdir, bind, MS_PRIVATE), then the
/// private one unmounted (its directory stays, as Kata leaves it). 0 or -errno.
int floor_kata_ro_share(const char *source, const char *private_target, const char *target);
/// Kata's Prepare in `sandbox` (a directory under a shared mount): mkdir shared/ and mounts/,
/// bind mounts/ onto shared/, MS_SLAVE, remount ro. 0 or -errno.
int floor_kata_prepare(const char *sandbox);
/// Kata's Cleanup: umount shared/ (MNT_DETACH), then remove the tree (shared, mounts, private,
/// the sandbox directory). 0 or -errno.
int floor_kata_cleanup(const char *sandbox);
#endif
