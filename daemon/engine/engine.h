/* The engine: one model, one backend, one paged KV cache, and the batched forward step. A step
 * takes several sequences at once, each with any number of new tokens (a prefill chunk, one
 * decode token, a verify window...), appends their KV to the cache and returns the logits the
 * caller asked for. Numerics follow DeepSeek's reference (see tests/golden/README.md). */
#ifndef DSV32_ENGINE_H
#define DSV32_ENGINE_H

#include <stdint.h>

#include "backend.h"
#include "kvcache.h"
#include "model.h"
#include "sampling.h"

struct dsv32_engine_opts {
    const char *backend;   /* "cpu" (default) or "cuda" */
    int gpu;               /* the cuda backend's device (default 0) */
    int max_batch_tokens;  /* rows per step (default 1024) */
    int max_seqs;          /* sequences in the cache at once (default 64) */
    int max_seq_len;       /* tokens per sequence (default: the model's context, capped at 32768) */
    int kv_blocks;         /* cache blocks of 64 tokens (default: max_seqs * max_seq_len / 64, capped
                              at 1 GiB of cache) */
    int kv_rope_f32;       /* keep the cached rope part in f32 instead of bf16 (debugging) */
};

enum dsv32_logits_mode { DSV32_LOGITS_NONE = 0, DSV32_LOGITS_LAST = 1, DSV32_LOGITS_ALL = 2 };

struct dsv32_seq_input {
    int seq;                /* a KV cache sequence slot from dsv32_kv_seq_new */
    int n_tokens;
    const int32_t *tokens;  /* (n_tokens) host memory */
    enum dsv32_logits_mode logits;
    /* With DSV32_LOGITS_LAST: the next token drawn where the logits are (the backend's sample
     * op, or the engine from the row when the backend leaves it: sampling.h's dsv32_draw)
     * instead of the row returned; *token gets it and *lp its logprobs when draw->n_logprobs >=
     * 0. NULL: the row is returned. */
    const struct dsv32_draw *draw;
    int32_t *token;
    struct dsv32_logprobs *lp;
};

struct dsv32_step_hooks {
    void *ctx;
    /* the residual stream after each layer (host copy: rows, D) */
    void (*hidden)(void *ctx, int layer, const float *x, int rows, int dim);
    /* the indexer's selections of each layer (host copy: rows, topk; -1 pads) */
    void (*selection)(void *ctx, int layer, const int32_t *sel, int rows, int topk);
    /* When set, the routed experts run elsewhere (expert parallelism): fill y[rows, D] (backend
     * memory) with sum_k w[r,k] * expert_ids[r,k](x[r]). ids and w are host copies. */
    int (*moe_routed)(void *ctx, int layer, float *y, const float *x, int rows, const int32_t *ids,
                      const float *w, int k);
};

struct dsv32_engine {
    struct dsv32_model *model;
    const struct dsv32_config *cfg;
    struct dsv32_backend *be;
    struct dsv32_kvcache *kv;
    int max_rows;
    int64_t steps, rows_done;
    /* activations in backend memory, sized for max_rows */
    float *x, *xn, *qr, *q, *kva, *kvn, *qlat, *olat, *ov, *o, *iq, *ik, *iw, *g, *u, *y, *logits;
    uint8_t *iq8, *ik8;
    float *iqs, *iks, *wts;
    int32_t *sel, *ids;
    int32_t *d_tokens, *d_pos, *d_seq, *d_blocks, *d_logit_rows;
    int64_t *d_slot;
    uint8_t *d_mha, *h_mha;
    /* host staging */
    int32_t *h_tokens, *h_pos, *h_seq, *h_blocks, *h_logit_rows, *h_sel, *h_ids, *h_old_len;
    int32_t *h_draw_rows, *h_draw_tok; /* (max_seqs) a step's draws: their logits rows, tokens */
    struct dsv32_draw *h_draws;
    struct dsv32_logprobs *h_draw_lp;
    float *h_draw_row; /* (vocab) a row the backend left to the host (sample op's -1) */
    void *h_draw_work; /* dsv32_draw_work_bytes(vocab) */
    int64_t *h_slot;
    float *h_x, *h_wts;
    int max_logit_rows;   /* logits rows one step can return (min(max_rows, 512)) */
};

/* Prepares every loaded weight on the backend and allocates the cache and activations. The
 * model must outlive the engine. */
int dsv32_engine_new(struct dsv32_model *m, const struct dsv32_engine_opts *opts,
                     struct dsv32_engine **ret);
void dsv32_engine_free(struct dsv32_engine *e);

/* Prepares every loaded weight of m on be (what dsv32_engine_new does); an expert shard, which
 * runs no forward, uses this directly. release undoes it. */
int dsv32_model_prepare(struct dsv32_model *m, struct dsv32_backend *be);
void dsv32_model_release(struct dsv32_model *m, struct dsv32_backend *be);

/* One forward step. logits (host) receives, for each input in order, the rows it asked for:
 * (sum of rows, vocab), an input with a draw leaving its row's place unwritten (logits may be
 * NULL when no input asks for a row). On error nothing is appended to any sequence. */
int dsv32_engine_step(struct dsv32_engine *e, const struct dsv32_seq_input *in, int n_in,
                      float *logits, const struct dsv32_step_hooks *hooks);

#endif
