// The watcher benchmark's C parts: kubelet's atomic-writer update, the observer that timestamps
// the moment the complete new content is readable in a guest directory, and the floor: an
// in-process inotify watcher that copies a swapped volume with the fewest syscalls (no agent,
// no checks beyond return codes).
#ifndef FSSHARE_WATCH_FLOOR_H
#define FSSHARE_WATCH_FLOOR_H
#include <stdint.h>

/// The volume shape every contender sees: `keys` files of `size` bytes each.
typedef struct {
    int keys;
    int size;
} watch_shape;

/// Creates a kubelet volume in `vol` (an existing empty directory): `..<ts>/key<i>`, `..data`,
/// and the `key<i> -> ..data/key<i>` links, with content version `version`. 0 or -errno.
int watch_kubelet_create(int vol, const char *ts, watch_shape shape, unsigned version);
/// First half of kubelet's update: the new `..<ts>` written completely, `..data_tmp` made.
int watch_kubelet_prepare(int vol, const char *ts, watch_shape shape, unsigned version);
/// The atomic swap: rename(`..data_tmp`, `..data`).
int watch_kubelet_swap(int vol);
/// Last half: remove the old timestamped directory `old`.
int watch_kubelet_finish(int vol, const char *old, watch_shape shape);

/// Writes the keys as plain files into `dir` (what a `cp -L` of the volume leaves).
int watch_write_flat(int dir, watch_shape shape, unsigned version);
/// 1 when every key in `dir` (followed through links, as a reader would) has the full content of
/// `version`; 0 when not (yet); never an error.
int watch_content_is(int dir, watch_shape shape, unsigned version);
/// Waits on `inotify` (which watches the guest directory) until `dir` shows `version`.
/// Re-checks on every event and every `recheck_ms`. Returns 0, or -ETIMEDOUT after `timeout_ms`.
int watch_wait_content(int inotify, int dir, watch_shape shape, unsigned version, int recheck_ms, int timeout_ms);

/// The floor: one inotify instance and one thread; on `IN_MOVED_TO ..data` in `host/vol<i>` it
/// copies the new timestamped directory into `guest/vol<i>` (plain writes: the directory is not
/// yet published), makes `..data_tmp` and renames it over `..data`, then removes the old
/// directory. Creates the guest copies first. NULL on error (errno set).
typedef struct watch_floor watch_floor;
watch_floor *watch_floor_start(const char *host, const char *guest, int count, watch_shape shape);
/// Copies made so far.
unsigned long watch_floor_copies(watch_floor *f);
void watch_floor_stop(watch_floor *f);
#endif
