/* Safetensors checkpoints: one file or a sharded set with model.safetensors.index.json, mapped
 * read-only. Shards are opened lazily, only when one of their tensors is asked for, so a process
 * that needs a few experts maps and touches only their files and pages. Every way a file can be
 * wrong (short, bad header, offsets out of range, size not matching shape and dtype) is an error
 * that names the file and the tensor. */
#ifndef DSV32_SAFETENSORS_H
#define DSV32_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

#define DSV32_ST_MAX_DIMS 4

struct dsv32_st_tensor {
    const char *name;
    const char *file; /* path of the file that holds it */
    enum dsv32_dtype dtype;
    char dtype_name[16]; /* as written in the header, for error messages */
    int n_dims;
    int64_t shape[DSV32_ST_MAX_DIMS];
    int64_t numel;
    const void *data; /* into the mapping; not necessarily aligned */
    size_t n_bytes;
};

struct dsv32_ckpt;

/* Error text of the last failure of any dsv32_ckpt_* / dsv32_model_* call in this thread. */
const char *dsv32_load_error(void);
/* Formats the thread's load error; returns err for `return dsv32_load_fail(err, ...)`. */
int dsv32_load_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Opens DIR/model.safetensors.index.json if present (shards opened on demand), else every
 * .safetensors file of DIR. PATH may also name one .safetensors file. */
int dsv32_ckpt_open(const char *path, struct dsv32_ckpt **ret);
void dsv32_ckpt_close(struct dsv32_ckpt *c);

/* Finds a tensor, mapping its shard if needed. -DSV32_EMISSING if the checkpoint has no such
 * tensor; a shard that fails to parse gives its own error. */
int dsv32_ckpt_get(struct dsv32_ckpt *c, const char *name, const struct dsv32_st_tensor **ret);
/* 1 if the checkpoint lists the tensor (opens no shard when an index exists). */
int dsv32_ckpt_has(struct dsv32_ckpt *c, const char *name);
/* Number of shards mapped so far and bytes of tensor data they hold (for tests and logs). */
int dsv32_ckpt_n_mapped(const struct dsv32_ckpt *c);

/* Parses one file's header and maps it; exposed for tests. */
struct dsv32_st_file;
int dsv32_st_file_open(const char *path, struct dsv32_st_file **ret);
void dsv32_st_file_close(struct dsv32_st_file *f);
int dsv32_st_file_count(const struct dsv32_st_file *f);
const struct dsv32_st_tensor *dsv32_st_file_tensor(const struct dsv32_st_file *f, int i);

/* Writes a safetensors file (used by dsv32-mkmodel and tests). data[i] holds names[i]. */
struct dsv32_st_entry {
    const char *name;
    enum dsv32_dtype dtype;
    int n_dims;
    int64_t shape[DSV32_ST_MAX_DIMS];
    const void *data;
};
int dsv32_st_write(const char *path, const struct dsv32_st_entry *entries, int n);
/* Streaming variant for tensors too large to hold at once: entries' data is NULL and fill(ctx, i,
 * buf, bytes) produces tensor i's bytes into buf, in pieces of at most `chunk` bytes, in order
 * (offset tells where the piece starts). */
int dsv32_st_write_stream(const char *path, const struct dsv32_st_entry *entries, int n,
                          size_t chunk,
                          int (*fill)(void *ctx, int i, size_t offset, void *buf, size_t bytes),
                          void *ctx);

#endif
