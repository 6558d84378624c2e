#define _GNU_SOURCE
#include "watch_floor.h"
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHECK(x) do { if ((x) < 0) return -errno; } while (0)

static void fill(char *buf, int key, watch_shape shape, unsigned version) {
    int n = snprintf(buf, (size_t)shape.size, "v%08u key%02d\n", version, key);
    for (int i = n; i < shape.size; i++) buf[i] = (char)('a' + (version + (unsigned)i) % 26);
}

static int write_keys(int vol, const char *ts, watch_shape shape, unsigned version) {
    char buf[65536], name[32];
    if (shape.size > (int)sizeof buf) return -EINVAL;
    CHECK(mkdirat(vol, ts, 0755));
    int dir = openat(vol, ts, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(dir);
    for (int k = 0; k < shape.keys; k++) {
        snprintf(name, sizeof name, "key%02d", k);
        fill(buf, k, shape, version);
        int fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, buf, (size_t)shape.size) != shape.size) { int e = errno; if (fd >= 0) close(fd); close(dir); return -e; }
        close(fd);
    }
    close(dir);
    return 0;
}

int watch_write_flat(int dir, watch_shape shape, unsigned version) {
    char buf[65536], name[32];
    if (shape.size > (int)sizeof buf) return -EINVAL;
    for (int k = 0; k < shape.keys; k++) {
        snprintf(name, sizeof name, "key%02d", k);
        fill(buf, k, shape, version);
        int fd = openat(dir, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, buf, (size_t)shape.size) != shape.size) { int e = errno; if (fd >= 0) close(fd); return -e; }
        close(fd);
    }
    return 0;
}

int watch_kubelet_create(int vol, const char *ts, watch_shape shape, unsigned version) {
    char name[32], target[48];
    int r = write_keys(vol, ts, shape, version);
    if (r < 0) return r;
    CHECK(symlinkat(ts, vol, "..data"));
    for (int k = 0; k < shape.keys; k++) {
        snprintf(name, sizeof name, "key%02d", k);
        snprintf(target, sizeof target, "..data/key%02d", k);
        CHECK(symlinkat(target, vol, name));
    }
    return 0;
}

int watch_kubelet_prepare(int vol, const char *ts, watch_shape shape, unsigned version) {
    int r = write_keys(vol, ts, shape, version);
    if (r < 0) return r;
    CHECK(symlinkat(ts, vol, "..data_tmp"));
    return 0;
}

int watch_kubelet_swap(int vol) {
    CHECK(renameat(vol, "..data_tmp", vol, "..data"));
    return 0;
}

int watch_kubelet_finish(int vol, const char *old, watch_shape shape) {
    char name[32];
    int dir = openat(vol, old, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(dir);
    for (int k = 0; k < shape.keys; k++) {
        snprintf(name, sizeof name, "key%02d", k);
        if (unlinkat(dir, name, 0) < 0) { int e = errno; close(dir); return -e; }
    }
    close(dir);
    CHECK(unlinkat(vol, old, AT_REMOVEDIR));
    return 0;
}

int watch_content_is(int dir, watch_shape shape, unsigned version) {
    char want[65536], got[65536 + 1], name[32];
    if (shape.size > (int)sizeof want) return 0;
    for (int k = 0; k < shape.keys; k++) {
        snprintf(name, sizeof name, "key%02d", k);
        int fd = openat(dir, name, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return 0;
        ssize_t n = read(fd, got, sizeof got);
        close(fd);
        fill(want, k, shape, version);
        if (n != shape.size || memcmp(got, want, (size_t)shape.size) != 0) return 0;
    }
    return 1;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int watch_wait_content(int inotify, int dir, watch_shape shape, unsigned version, int recheck_ms, int timeout_ms) {
    char events[4096] __attribute__((aligned(8)));
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        if (watch_content_is(dir, shape, version)) return 0;
        if (now_ms() > deadline) return -ETIMEDOUT;
        struct pollfd p = { .fd = inotify, .events = POLLIN };
        if (poll(&p, 1, recheck_ms) > 0) {
            // Drain: the check above reads the whole state, so the events themselves do not matter.
            while (read(inotify, events, sizeof events) > 0) {}
        }
    }
}

struct watch_floor {
    int inotify;
    int wake[2];
    int count;
    watch_shape shape;
    int *host;        // O_PATH per host volume
    int *guest;       // O_PATH per guest volume
    int *wd_to_index; // indexed by wd
    int max_wd;
    char (*current)[NAME_MAX + 1]; // the guest's current timestamped dir per volume
    unsigned long copies;
    pthread_t thread;
};

// Copies host `vol/..<ts>` into guest `vol/..<ts>` (files only: the bench's volumes are flat).
static int copy_ts(int host, int guest, const char *ts) {
    char buf[65536];
    int src = openat(host, ts, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(src);
    if (mkdirat(guest, ts, 0755) < 0 && errno != EEXIST) { int e = errno; close(src); return -e; }
    int dst = openat(guest, ts, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dst < 0) { int e = errno; close(src); return -e; }
    DIR *d = fdopendir(src);
    if (!d) { int e = errno; close(src); close(dst); return -e; }
    struct dirent *e;
    int result = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        int in = openat(dirfd(d), e->d_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        int out = in < 0 ? -1 : openat(dst, e->d_name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (in < 0 || out < 0) { result = -errno; if (in >= 0) close(in); break; }
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0) {
            if (write(out, buf, (size_t)n) != n) { result = -EIO; break; }
        }
        close(in);
        close(out);
        if (result < 0) break;
    }
    closedir(d);
    close(dst);
    return result;
}

static int remove_ts(int guest, const char *ts) {
    int dir = openat(guest, ts, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(dir);
    DIR *d = fdopendir(dir);
    if (!d) { close(dir); return -errno; }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
    CHECK(unlinkat(guest, ts, AT_REMOVEDIR));
    return 0;
}

static int mirror(watch_floor *f, int i) {
    char ts[NAME_MAX + 1];
    ssize_t n = readlinkat(f->host[i], "..data", ts, sizeof ts - 1);
    CHECK(n);
    ts[n] = 0;
    if (strcmp(ts, f->current[i]) == 0) return 0;
    int r = copy_ts(f->host[i], f->guest[i], ts);
    if (r < 0) return r;
    unlinkat(f->guest[i], "..data_tmp", 0);
    CHECK(symlinkat(ts, f->guest[i], "..data_tmp"));
    CHECK(renameat(f->guest[i], "..data_tmp", f->guest[i], "..data"));
    if (f->current[i][0]) remove_ts(f->guest[i], f->current[i]);
    memcpy(f->current[i], ts, sizeof ts);
    __atomic_add_fetch(&f->copies, 1, __ATOMIC_RELAXED);
    return 0;
}

static void *floor_loop(void *arg) {
    watch_floor *f = arg;
    char buf[65536] __attribute__((aligned(8)));
    struct pollfd p[2] = { { .fd = f->inotify, .events = POLLIN }, { .fd = f->wake[0], .events = POLLIN } };
    for (;;) {
        if (poll(p, 2, -1) < 0) continue;
        if (p[1].revents) return NULL;
        ssize_t n = read(f->inotify, buf, sizeof buf);
        for (ssize_t off = 0; off < n;) {
            struct inotify_event *e = (struct inotify_event *)(buf + off);
            if ((e->mask & IN_MOVED_TO) && e->len && strcmp(e->name, "..data") == 0 && e->wd <= f->max_wd) {
                int i = f->wd_to_index[e->wd];
                if (i >= 0) mirror(f, i);
            }
            off += (ssize_t)sizeof *e + e->len;
        }
    }
}

watch_floor *watch_floor_start(const char *host, const char *guest, int count, watch_shape shape) {
    watch_floor *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->count = count;
    f->shape = shape;
    f->host = calloc((size_t)count, sizeof(int));
    f->guest = calloc((size_t)count, sizeof(int));
    f->current = calloc((size_t)count, sizeof *f->current);
    f->inotify = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (!f->host || !f->guest || !f->current || f->inotify < 0 || pipe2(f->wake, O_CLOEXEC) < 0) return NULL;
    int hostdir = open(host, O_PATH | O_DIRECTORY | O_CLOEXEC), guestdir = open(guest, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (hostdir < 0 || guestdir < 0) return NULL;
    char name[32];
    int *wds = calloc((size_t)count, sizeof(int));
    if (!wds) return NULL;
    for (int i = 0; i < count; i++) {
        snprintf(name, sizeof name, "vol%d", i);
        if (mkdirat(guestdir, name, 0755) < 0 && errno != EEXIST) return NULL;
        f->host[i] = openat(hostdir, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        f->guest[i] = openat(guestdir, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (f->host[i] < 0 || f->guest[i] < 0) return NULL;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", host, name);
        wds[i] = inotify_add_watch(f->inotify, path, IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW);
        if (wds[i] < 0) return NULL;
        if (wds[i] > f->max_wd) f->max_wd = wds[i];
        // The initial copy, then the guest's key links.
        if (mirror(f, i) < 0) return NULL;
        for (int k = 0; k < shape.keys; k++) {
            char key[32], target[48];
            snprintf(key, sizeof key, "key%02d", k);
            snprintf(target, sizeof target, "..data/key%02d", k);
            if (symlinkat(target, f->guest[i], key) < 0 && errno != EEXIST) return NULL;
        }
    }
    f->wd_to_index = malloc(sizeof(int) * (size_t)(f->max_wd + 1));
    if (!f->wd_to_index) return NULL;
    for (int w = 0; w <= f->max_wd; w++) f->wd_to_index[w] = -1;
    for (int i = 0; i < count; i++) f->wd_to_index[wds[i]] = i;
    free(wds);
    close(hostdir);
    close(guestdir);
    if (pthread_create(&f->thread, NULL, floor_loop, f) != 0) return NULL;
    return f;
}

unsigned long watch_floor_copies(watch_floor *f) { return __atomic_load_n(&f->copies, __ATOMIC_RELAXED); }

void watch_floor_stop(watch_floor *f) {
    if (!f) return;
    char b = 1;
    if (write(f->wake[1], &b, 1) == 1) pthread_join(f->thread, NULL);
    for (int i = 0; i < f->count; i++) { close(f->host[i]); close(f->guest[i]); }
    close(f->inotify);
    close(f->wake[0]);
    close(f->wake[1]);
    free(f->host); free(f->guest); free(f->current); free(f->wd_to_index);
    free(f);
}
