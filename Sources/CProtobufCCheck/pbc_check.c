#include "pbc_check.h"
#include "agent.pb-c.h"
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

typedef struct { char *out; size_t cap; size_t len; int overflow; } sink;

static void put(sink *s, const char *fmt, ...) {
    if (s->overflow) return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s->out + s->len, s->cap - s->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= s->cap - s->len) { s->overflow = 1; return; }
    s->len += (size_t)n;
}

int fsshare_pbc_dump_storage(const uint8_t *bytes, size_t length, char *out, size_t capacity) {
    Grpc__Storage *m = grpc__storage__unpack(NULL, length, bytes);
    if (m == NULL) return -1;
    sink s = { out, capacity, 0, 0 };
    put(&s, "driver=%s\n", m->driver);
    for (size_t i = 0; i < m->n_driver_options; i++) put(&s, "driver_options=%s\n", m->driver_options[i]);
    put(&s, "source=%s\n", m->source);
    put(&s, "fstype=%s\n", m->fstype);
    for (size_t i = 0; i < m->n_options; i++) put(&s, "options=%s\n", m->options[i]);
    put(&s, "mount_point=%s\n", m->mount_point);
    if (m->fs_group) {
        put(&s, "fs_group.group_id=%" PRIu32 "\n", m->fs_group->group_id);
        put(&s, "fs_group.group_change_policy=%d\n", (int)m->fs_group->group_change_policy);
    }
    put(&s, "shared=%d\n", m->shared ? 1 : 0);
    grpc__storage__free_unpacked(m, NULL);
    return s.overflow ? -1 : (int)s.len;
}

int fsshare_pbc_dump_copy_file(const uint8_t *bytes, size_t length, char *out, size_t capacity) {
    Grpc__CopyFileRequest *m = grpc__copy_file_request__unpack(NULL, length, bytes);
    if (m == NULL) return -1;
    sink s = { out, capacity, 0, 0 };
    put(&s, "path=%s\n", m->path);
    put(&s, "file_size=%" PRId64 "\n", m->file_size);
    put(&s, "file_mode=%" PRIu32 "\n", m->file_mode);
    put(&s, "dir_mode=%" PRIu32 "\n", m->dir_mode);
    put(&s, "uid=%" PRId32 "\n", m->uid);
    put(&s, "gid=%" PRId32 "\n", m->gid);
    put(&s, "offset=%" PRId64 "\n", m->offset);
    put(&s, "data=");
    for (size_t i = 0; i < m->data.len; i++) put(&s, "%02x", m->data.data[i]);
    put(&s, "\n");
    grpc__copy_file_request__free_unpacked(m, NULL);
    return s.overflow ? -1 : (int)s.len;
}
