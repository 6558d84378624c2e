// The copy-mode benchmark's baseline: a plain unix-socket file copy in C (read a file, write it
// to a socket; the other end reads the socket and writes a file), 1 MiB at a time. No framing,
// no protocol, no checks: what the socket and the page cache allow.
#ifndef FSSHARE_COPY_FLOOR_H
#define FSSHARE_COPY_FLOOR_H

/// Serves `socket_path` until killed: each connection's bytes are written to a new file
/// `dir/raw.<n>`, then one byte is sent back once the file is closed. -errno on a setup failure.
int copy_floor_sink(const char *socket_path, const char *dir);
/// Sends `file` to the sink at `socket_path` and waits for its byte. 0 or -errno.
int copy_floor_send(const char *socket_path, const char *file);

#endif
