// An independent decoder for fsshare's wire format: protobuf-c (Debian libprotobuf-c-dev)
// decodes bytes that swift-protobuf encoded and prints every field, one per line, so a test
// can compare them field by field. Tests only.
#ifndef FSSHARE_PBC_CHECK_H
#define FSSHARE_PBC_CHECK_H
#include <stddef.h>
#include <stdint.h>

/// Decodes a grpc.Storage and writes "field=value" lines into out. Returns the length written,
/// or -1 if protobuf-c rejects the bytes (or out is too small).
int fsshare_pbc_dump_storage(const uint8_t *bytes, size_t length, char *out, size_t capacity);

/// The same for grpc.CopyFileRequest (data is printed as hex).
int fsshare_pbc_dump_copy_file(const uint8_t *bytes, size_t length, char *out, size_t capacity);

#endif
