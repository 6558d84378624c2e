#define _GNU_SOURCE
#include "copy_floor.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum { chunk = 1 << 20 };

static int address(const char *path, struct sockaddr_un *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa->sun_path) return -ENAMETOOLONG;
    strcpy(sa->sun_path, path);
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int copy_floor_sink(const char *socket_path, const char *dir) {
    struct sockaddr_un sa;
    int rc = address(socket_path, &sa);
    if (rc) return rc;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    unlink(socket_path);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(s, 8) < 0) return -errno;
    char *buf = malloc(chunk);
    if (!buf) return -ENOMEM;
    for (unsigned n = 0;; n++) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        char name[4096];
        snprintf(name, sizeof name, "%s/raw.%u", dir, n);
        int f = open(name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (f < 0) return -errno;
        for (;;) {
            ssize_t r = read(c, buf, chunk);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return -errno;
            if (r == 0) break;
            if ((rc = write_all(f, buf, (size_t)r))) return rc;
        }
        close(f);
        (void)write_all(c, "k", 1);
        close(c);
    }
}

int copy_floor_send(const char *socket_path, const char *file) {
    struct sockaddr_un sa;
    int rc = address(socket_path, &sa);
    if (rc) return rc;
    int f = open(file, O_RDONLY | O_CLOEXEC);
    if (f < 0) return -errno;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) return -errno;
    char *buf = malloc(chunk);
    if (!buf) return -ENOMEM;
    for (;;) {
        ssize_t r = read(f, buf, chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        if (r == 0) break;
        if ((rc = write_all(s, buf, (size_t)r))) return rc;
    }
    shutdown(s, SHUT_WR);
    char ack;
    ssize_t r;
    while ((r = read(s, &ack, 1)) < 0 && errno == EINTR) {}
    free(buf);
    close(f);
    close(s);
    return r == 1 ? 0 : -EPIPE;
}
