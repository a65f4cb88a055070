/* Paged KV cache allocator; see kvcache.h. */
#include "kvcache.h"

#include "error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int64_t dsv32_kv_block_bytes(const struct dsv32_kv_geom *g, int n_layers)
{
    return (int64_t)n_layers * ((int64_t)DSV32_KV_BLOCK_TOKENS * g->mla_rec_bytes + g->idx_block_bytes);
}

void dsv32_kv_free(struct dsv32_kvcache *kv)
{
    if (!kv)
        return;
    if (kv->layers)
        for (int l = 0; l < kv->n_layers; l++) {
            if (kv->layers[l].mla)
                kv->be->ops->dealloc(kv->be, kv->layers[l].mla);
            if (kv->layers[l].idx)
                kv->be->ops->dealloc(kv->be, kv->layers[l].idx);
        }
    free(kv->layers);
    free(kv->free_blocks);
    free(kv->block_table);
    free(kv->seq_blocks);
    free(kv->seq_tokens);
    free(kv->seq_used);
    free(kv);
}

int dsv32_kv_new(struct dsv32_backend *be, const struct dsv32_kv_geom *geom, int n_layers,
                 int n_blocks, int max_seqs, int max_tokens_per_seq, struct dsv32_kvcache **ret)
{
    if (n_layers < 0 || n_blocks < 1 || max_seqs < 1 || max_tokens_per_seq < 1)
        return -EINVAL;
    struct dsv32_kvcache *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return -ENOMEM;
    kv->be = be;
    kv->geom = *geom;
    kv->n_layers = n_layers;
    kv->n_blocks = n_blocks;
    kv->max_seqs = max_seqs;
    kv->max_blocks_per_seq = (max_tokens_per_seq + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS;
    kv->layers = calloc((size_t)(n_layers ? n_layers : 1), sizeof(*kv->layers));
    kv->free_blocks = malloc(sizeof(int32_t) * (size_t)n_blocks);
    kv->block_table = malloc(sizeof(int32_t) * (size_t)max_seqs * kv->max_blocks_per_seq);
    kv->seq_blocks = calloc((size_t)max_seqs, sizeof(int32_t));
    kv->seq_tokens = calloc((size_t)max_seqs, sizeof(int32_t));
    kv->seq_used = calloc((size_t)max_seqs, 1);
    if (!kv->layers || !kv->free_blocks || !kv->block_table || !kv->seq_blocks ||
        !kv->seq_tokens || !kv->seq_used)
        goto nomem;
    for (int l = 0; l < n_layers; l++) {
        size_t mla = (size_t)n_blocks * DSV32_KV_BLOCK_TOKENS * geom->mla_rec_bytes;
        size_t idx = (size_t)n_blocks * geom->idx_block_bytes;
        kv->layers[l].mla = be->ops->alloc(be, mla);
        kv->layers[l].idx = be->ops->alloc(be, idx);
        if (!kv->layers[l].mla || !kv->layers[l].idx)
            goto nomem;
        /* Zeroed so that a read of a never-written slot is deterministic (and visible in tests). */
        if (be->ops->memset0(be, kv->layers[l].mla, mla) < 0 ||
            be->ops->memset0(be, kv->layers[l].idx, idx) < 0)
            goto nomem;
    }
    for (int i = 0; i < n_blocks; i++)
        kv->free_blocks[i] = n_blocks - 1 - i;
    kv->n_free = n_blocks;
    for (size_t i = 0; i < (size_t)max_seqs * kv->max_blocks_per_seq; i++)
        kv->block_table[i] = -1;
    *ret = kv;
    return 0;
nomem:
    dsv32_kv_free(kv);
    return -ENOMEM;
}

int dsv32_kv_seq_new(struct dsv32_kvcache *kv)
{
    for (int s = 0; s < kv->max_seqs; s++)
        if (!kv->seq_used[s]) {
            kv->seq_used[s] = 1;
            kv->seq_blocks[s] = 0;
            kv->seq_tokens[s] = 0;
            return s;
        }
    return DSV32_EFULL;
}

int dsv32_kv_blocks_needed(const struct dsv32_kvcache *kv, int seq, int n_tokens)
{
    int need = (n_tokens + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS - kv->seq_blocks[seq];
    return need > 0 ? need : 0;
}

int dsv32_kv_seq_reserve(struct dsv32_kvcache *kv, int seq, int n_tokens)
{
    if (seq < 0 || seq >= kv->max_seqs || !kv->seq_used[seq])
        return -EINVAL;
    if (n_tokens > kv->max_blocks_per_seq * DSV32_KV_BLOCK_TOKENS)
        return DSV32_ECONTEXT;
    int need = dsv32_kv_blocks_needed(kv, seq, n_tokens);
    if (need > kv->n_free)
        return DSV32_EFULL;
    int32_t *bt = kv->block_table + (size_t)seq * kv->max_blocks_per_seq;
    for (int i = 0; i < need; i++)
        bt[kv->seq_blocks[seq]++] = kv->free_blocks[--kv->n_free];
    return 0;
}

void dsv32_kv_seq_rollback(struct dsv32_kvcache *kv, int seq, int n_tokens, int keep_blocks)
{
    if (seq < 0 || seq >= kv->max_seqs || !kv->seq_used[seq])
        return;
    int32_t *bt = kv->block_table + (size_t)seq * kv->max_blocks_per_seq;
    while (kv->seq_blocks[seq] > keep_blocks) {
        int b = bt[--kv->seq_blocks[seq]];
        bt[kv->seq_blocks[seq]] = -1;
        kv->free_blocks[kv->n_free++] = b;
    }
    kv->seq_tokens[seq] = n_tokens;
}

void dsv32_kv_seq_truncate(struct dsv32_kvcache *kv, int seq, int n_tokens)
{
    if (seq < 0 || seq >= kv->max_seqs || !kv->seq_used[seq])
        return;
    int keep = (n_tokens + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS;
    int32_t *bt = kv->block_table + (size_t)seq * kv->max_blocks_per_seq;
    while (kv->seq_blocks[seq] > keep) {
        int b = bt[--kv->seq_blocks[seq]];
        bt[kv->seq_blocks[seq]] = -1;
        kv->free_blocks[kv->n_free++] = b;
    }
    if (kv->seq_tokens[seq] > n_tokens)
        kv->seq_tokens[seq] = n_tokens;
}

void dsv32_kv_seq_free(struct dsv32_kvcache *kv, int seq)
{
    if (seq < 0 || seq >= kv->max_seqs || !kv->seq_used[seq])
        return;
    dsv32_kv_seq_truncate(kv, seq, 0);
    kv->seq_used[seq] = 0;
}
