/* Paged KV cache: blocks of 64 tokens holding, for every layer, the FP8 MLA latent (656 bytes per
 * token for DeepSeek-V3.2) and the indexer keys (132 bytes per token), in backend memory. A fixed
 * number of blocks and sequence slots is set at creation; when they run out, reserve() answers
 * -DSV32_EFULL and nothing changes (the scheduler then waits or rejects; the cache never grows). */
#ifndef DSV32_KVCACHE_H
#define DSV32_KVCACHE_H

#include <stdint.h>

#include "backend.h"

struct dsv32_kvcache {
    struct dsv32_backend *be;
    struct dsv32_kv_geom geom;
    int n_layers;
    int n_blocks;             /* the limit */
    int max_seqs;
    int max_blocks_per_seq;   /* ceil(max_tokens_per_seq / 64) */
    struct dsv32_kv_layer *layers; /* (n_layers) backend memory */
    /* host-side bookkeeping */
    int32_t *free_blocks;     /* (n_blocks) stack */
    int n_free;
    int32_t *block_table;     /* (max_seqs, max_blocks_per_seq) */
    int32_t *seq_blocks;      /* (max_seqs) blocks held */
    int32_t *seq_tokens;      /* (max_seqs) tokens stored */
    uint8_t *seq_used;        /* (max_seqs) */
};

/* Allocates n_blocks blocks for n_layers layers in the backend's memory. */
int dsv32_kv_new(struct dsv32_backend *be, const struct dsv32_kv_geom *geom, int n_layers,
                 int n_blocks, int max_seqs, int max_tokens_per_seq, struct dsv32_kvcache **ret);
void dsv32_kv_free(struct dsv32_kvcache *kv);
/* Bytes one block takes over all layers. */
int64_t dsv32_kv_block_bytes(const struct dsv32_kv_geom *g, int n_layers);

/* A new, empty sequence: its slot id, or -DSV32_EFULL when all slots are taken. */
int dsv32_kv_seq_new(struct dsv32_kvcache *kv);
/* Makes room for the sequence to hold n_tokens in all (allocates blocks as needed). All or
 * nothing: -DSV32_EFULL if the free blocks do not suffice, -DSV32_ECONTEXT past the per-sequence
 * limit. */
int dsv32_kv_seq_reserve(struct dsv32_kvcache *kv, int seq, int n_tokens);
/* Returns every block of the sequence and its slot. Accepts a free slot id. */
void dsv32_kv_seq_free(struct dsv32_kvcache *kv, int seq);
/* Gives back the blocks past the first keep_blocks (undoing a reservation) and sets the length
 * to n_tokens; blocks reserved earlier stay. */
void dsv32_kv_seq_rollback(struct dsv32_kvcache *kv, int seq, int n_tokens, int keep_blocks);
/* Forgets tokens past n_tokens (blocks no longer needed go back to the pool). */
void dsv32_kv_seq_truncate(struct dsv32_kvcache *kv, int seq, int n_tokens);
static inline int dsv32_kv_seq_len(const struct dsv32_kvcache *kv, int seq)
{
    return kv->seq_tokens[seq];
}
static inline int dsv32_kv_free_blocks(const struct dsv32_kvcache *kv) { return kv->n_free; }
/* Blocks needed to grow the sequence to n_tokens (0 if it has room). */
int dsv32_kv_blocks_needed(const struct dsv32_kvcache *kv, int seq, int n_tokens);

#endif
