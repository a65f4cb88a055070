/* The small ops interface every compute backend implements (the ggml way: a vtable plus a context).
 * The forward (forward.c) is written once against these ops; `cpu` (cpu/, plain C + OpenBLAS, the
 * readable reference) and `cuda` (cuda/) implement them. All tensor pointers are backend memory
 * (host memory for cpu, device memory for cuda), row-major, f32 activations; `ld*` are row strides
 * in elements. Every op returns 0 or a negative error code. */
#ifndef DSV32_BACKEND_H
#define DSV32_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "model.h"

#define DSV32_KV_BLOCK_TOKENS 64

/* Where one layer's cache lives. Per token of the MLA cache: kv_lora e4m3 bytes, kv_lora/128 f32
 * scales, qk_rope bf16 values (f32 when rope_f32): 656 bytes for DeepSeek-V3.2. The indexer key
 * cache is grouped per block: 64 x 128 e4m3 keys, then 64 f32 scales (132 bytes per token). */
struct dsv32_kv_layer {
    uint8_t *mla; /* (n_blocks, 64, mla_rec_bytes) */
    uint8_t *idx; /* (n_blocks, 64*128 + 64*4) */
};

struct dsv32_kv_geom {
    int kv_lora, rope, rope_f32;
    int mla_rec_bytes;   /* kv_lora + 4*kv_lora/128 + rope*(2 or 4) */
    int idx_block_bytes; /* 64*(128+4) */
};

/* The rows of one step and where their cache lives. Device pointers (d_*) for the ops, host
 * copies (h_*) of the same arrays for backends and the forward. */
struct dsv32_step_meta {
    int n_rows, n_seqs, max_blocks;
    const int32_t *d_row_pos, *h_row_pos;     /* (n_rows) absolute position of each row */
    const int32_t *d_row_seq, *h_row_seq;     /* (n_rows) sequence index into the block table */
    const int32_t *d_blocks, *h_blocks;       /* (n_seqs, max_blocks) cache block ids */
    const int64_t *d_row_slot, *h_row_slot;   /* (n_rows) block*64 + offset where the row is stored */
    const uint8_t *d_row_mha, *h_row_mha;     /* (n_rows) 1: the row belongs to a multi-token
                                                 input (prefill), which mla_prefill handles */
    int n_mha_rows;
    int max_ctx;                              /* max over rows of pos+1 */
};

struct dsv32_backend;
struct dsv32_draw;     /* sampling.h */
struct dsv32_logprobs; /* sampling.h */

struct dsv32_backend_ops {
    const char *name;
    void (*free)(struct dsv32_backend *be);

    /* memory */
    void *(*alloc)(struct dsv32_backend *be, size_t bytes);
    void (*dealloc)(struct dsv32_backend *be, void *p);
    int (*to_device)(struct dsv32_backend *be, void *dst, const void *src, size_t bytes);
    int (*to_host)(struct dsv32_backend *be, void *dst, const void *src, size_t bytes);
    int (*memset0)(struct dsv32_backend *be, void *dst, size_t bytes);
    int (*sync)(struct dsv32_backend *be);

    /* weights: build w->be from the host view (dequantize, upload...); release frees it */
    int (*prepare_weight)(struct dsv32_backend *be, struct dsv32_weight *w);
    void (*release_weight)(struct dsv32_backend *be, struct dsv32_weight *w);

    /* y[n, D] = table[ids[n]] */
    int (*embed)(struct dsv32_backend *be, float *y, const int32_t *ids, int n,
                 const struct dsv32_weight *table);
    /* y = x / rms(x) * g, per row of dim values */
    int (*rmsnorm)(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                   const struct dsv32_weight *g, int rows, int dim, float eps);
    /* y = (x - mean) / sqrt(var + eps) * g + b */
    int (*layernorm)(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                     const struct dsv32_weight *g, const struct dsv32_weight *b, int rows, int dim,
                     float eps);
    /* y[rows, w->rows] = x[rows, w->cols] . w^T; FP8 weights quantize x per 1x128 block first
     * (ue8m0 scales when asked), as DeepSeek's fp8_gemm does */
    int (*linear)(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx, int rows,
                  const struct dsv32_weight *w, int ue8m0);
    /* y += x (n values) */
    int (*add)(struct dsv32_backend *be, float *y, const float *x, size_t n);
    /* y[r, :] = silu(g[r, :]) * u[r, :] */
    int (*silu_mul)(struct dsv32_backend *be, float *y, const float *g, const float *u, int rows,
                    int dim);
    /* RoPE on x[r, h, 0:rope] (row stride ldr, head stride ldh) at positions pos[r]; interleaved
     * pairs (2i, 2i+1) for MLA, half-split pairs (i, i+rope/2) for the indexer */
    int (*rope)(struct dsv32_backend *be, float *x, int rows, int heads, int ldr, int ldh,
                const int32_t *pos, int interleaved);
    /* Hadamard transform (Sylvester order, scale 128^-0.5) of n vectors of 128, then e4m3
     * quantization: q[n, 128], scale[n] */
    int (*hadamard_quant)(struct dsv32_backend *be, uint8_t *q, float *scale, const float *x,
                          int n, int ue8m0);
    /* store rows' FP8 latent (kv_lora) + rope into the MLA cache, indexer keys into the key cache */
    int (*kv_store)(struct dsv32_backend *be, const struct dsv32_kv_layer *kv, const float *latent,
                    int ld_lat, const float *pe, int ld_pe, const struct dsv32_step_meta *m,
                    int ue8m0);
    int (*index_store)(struct dsv32_backend *be, const struct dsv32_kv_layer *kv, const uint8_t *k,
                       const float *k_scale, const struct dsv32_step_meta *m);
    /* DSA lightning indexer: score[t, j] = kscale[j] * sum_h relu(q[t,h] . k[j]) * w[t,h] with
     * w[t,h] = w_raw[t,h] * q_scale[t,h] * IH^-0.5 * 128^-0.5, over the causal positions
     * j <= pos[t]; sel[t, :topk] = the top-min(topk, pos+1) positions in ascending order, -1
     * padded. q[t, IH, 128] e4m3 (after Hadamard), q_scale[t, IH]. */
    int (*indexer)(struct dsv32_backend *be, int32_t *sel, const uint8_t *q, const float *q_scale,
                   const float *w_raw, const struct dsv32_kv_layer *kv,
                   const struct dsv32_step_meta *m, int topk);
    /* Absorbed MLA over the cache: for each row and head, softmax(scale * (q_lat . c_j +
     * q_pe . pe_j)) over the selected positions (sel[t, 0:n_sel], -1 skipped; sel NULL = all
     * positions <= pos) and out[t, h, :] = sum_j p_j c_j (latent space, kv_lora wide). Rows with
     * h_row_mha set are skipped when the backend has mla_prefill. q_lat and out are latents
     * (dsv32_backend.lat_bf16); q_pe is f32. */
    int (*mla)(struct dsv32_backend *be, void *out, const void *q_lat, const float *q_pe,
               int ldr_pe, int ldh_pe, const int32_t *sel, int n_sel,
               const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale);
    /* MLA in its prefill (MHA) form, as DeepSeek's reference computes prefills: k_nope and v of
     * every needed cached position through wkv_b (a GEMM, FP8 input quantization included),
     * softmax(scale * (q_nope . k_nope + q_pe . pe)) over the selected positions, o = sum p v.
     * Writes o[t, H*v] only for rows with h_row_mha set. Optional: a backend without it runs
     * every row in the absorbed form (the same function up to rounding). */
    int (*mla_prefill)(struct dsv32_backend *be, float *o, const float *q, const int32_t *sel,
                       int n_sel, const struct dsv32_kv_layer *kv,
                       const struct dsv32_step_meta *m, float scale,
                       const struct dsv32_weight *wkv_b, int ue8m0);
    /* q_lat[t, h, :] = W_uk[h]^T q_nope[t, h, :] (q rows hold H x (nope+rope)); q_lat a latent */
    int (*mla_absorb)(struct dsv32_backend *be, void *q_lat, const float *q, int rows,
                      const struct dsv32_weight *wkv_b);
    /* o[t, h, :] = W_uv[h] lat[t, h, :]; lat a latent */
    int (*mla_expand)(struct dsv32_backend *be, float *o, const void *lat, int rows,
                      const struct dsv32_weight *wkv_b);
    /* noaux_tc router: ids[rows, k], weights[rows, k] */
    int (*moe_gate)(struct dsv32_backend *be, int32_t *ids, float *w, const float *x, int rows,
                    const struct dsv32_weight *gate, const struct dsv32_weight *bias);
    /* y[r] = sum_k w[r,k] * expert_{ids[r,k]}(x[r]) over the experts present in `experts`
     * (ids of missing ones are skipped); ids < 0 are skipped too. y is overwritten. */
    int (*moe_experts)(struct dsv32_backend *be, float *y, const float *x, int rows,
                       const int32_t *ids, const float *w, int k,
                       const struct dsv32_ffn_weights *experts, int n_experts, int ue8m0);
    /* y[i, :] = x[idx[i], :] */
    int (*gather_rows)(struct dsv32_backend *be, float *y, const float *x, const int32_t *idx,
                       int n, int dim);
    /* Optional (expert parallelism packing its exchange blocks where the rows are):
     * rows_pack: row i of dst (n rows of dim, bf16 by dsv32_f32_to_bf16 when bf16, else f32) =
     * x[idx ? idx[i] : i]; rows_unpack: y[idx ? idx[i] : i] = (add ? that row : 0) + row i of
     * src, in f32 (the idx rows distinct). dst and src are 4-byte aligned addresses inside a
     * block, idx backend memory. */
    int (*rows_pack)(struct dsv32_backend *be, void *dst, const float *x, const int32_t *idx, int n,
                     int dim, int bf16);
    int (*rows_unpack)(struct dsv32_backend *be, float *y, const void *src, const int32_t *idx,
                       int n, int dim, int bf16, int add);
    /* Optional: host memory that to_device/to_host copy fastest (page-locked); NULL: malloc */
    void *(*host_alloc)(struct dsv32_backend *be, size_t bytes);
    void (*host_free)(struct dsv32_backend *be, void *p);
    /* Optional: indexer, then mla over its selection, in one call: sel as indexer writes it, out
     * as mla writes it (n_sel = topk), so that a backend can run the two side by side over
     * different rows. NULL: the engine calls indexer and mla in turn. */
    int (*dsa)(struct dsv32_backend *be, void *out, int32_t *sel, const uint8_t *q,
               const float *q_scale, const float *w_raw, int topk, const void *q_lat,
               const float *q_pe, int ldr_pe, int ldh_pe, const struct dsv32_kv_layer *kv,
               const struct dsv32_step_meta *m, float scale);
    /* The next token of n rows of logits (row i at logits + rows[i] * vocab, backend memory)
     * drawn where they are, by d[i] (host; sampling.h): tok[i] (host) the token, equal to
     * dsv32_draw_row's on the same logits, or -1 when the backend leaves that draw to the host
     * (a case it does not handle; the cuda backend: non-finite logits or temperature with a
     * top-p nucleus past 2,048 candidates); lp[i] (host) its logprobs where d[i].n_logprobs >=
     * 0 and tok[i] >= 0 (lp may be NULL when none asks), dsv32_logprobs_of's up to the rounding
     * of the softmax sum. */
    int (*sample)(struct dsv32_backend *be, int32_t *tok, struct dsv32_logprobs *lp,
                  const float *logits, int vocab, const int32_t *rows, const struct dsv32_draw *d,
                  int n);
};

struct dsv32_backend {
    const struct dsv32_backend_ops *ops;
    const struct dsv32_config *cfg;
    struct dsv32_kv_geom geom;
    /* The latents (T, H, kv_lora) that mla_absorb writes, mla and dsa read and write, and
     * mla_expand reads: bf16 when set (the cuda backend's fast numerics, whose kernels round Q
     * to bf16 anyway: half the bytes, no conversion pass), else f32. Fixed at creation; the
     * engine sizes those buffers for f32 and never reads them itself. */
    int lat_bf16;
    void *ctx;
};

int dsv32_backend_cpu_new(const struct dsv32_config *cfg, const struct dsv32_kv_geom *geom,
                          struct dsv32_backend **ret);
/* Threads the cpu backend's matrix products use (OpenBLAS; process-wide). Daemons sharing a
 * machine set 1: OpenBLAS's idle threads spin, and several processes spinning starve the rest. */
void dsv32_backend_cpu_set_threads(int n);
/* The cpu backend's rows_pack and rows_unpack on host memory, on up to `threads` threads when
 * the rows are many (0: OpenMP's default); also the way an EP member on a GPU backend packs the
 * blocks of a transport whose blocks are host memory. */
void dsv32_rows_pack_host(void *dst, const float *x, const int32_t *idx, int n, int dim, int bf16,
                          int threads);
void dsv32_rows_unpack_host(float *y, const void *src, const int32_t *idx, int n, int dim, int bf16,
                            int add, int threads);
#ifdef DSV32_HAVE_CUDA
int dsv32_backend_cuda_new(const struct dsv32_config *cfg, const struct dsv32_kv_geom *geom,
                           int device, struct dsv32_backend **ret);
#endif
/* By name: "cpu" or "cuda" (-DSV32_EUNSUPPORTED when this build has no CUDA); device: the GPU
 * of "cuda" (0..count-1; the cpu backend ignores it). */
int dsv32_backend_new(const char *name, const struct dsv32_config *cfg,
                      const struct dsv32_kv_geom *geom, int device, struct dsv32_backend **ret);
static inline void dsv32_backend_free(struct dsv32_backend *be)
{
    if (be)
        be->ops->free(be);
}

void dsv32_kv_geom_init(struct dsv32_kv_geom *g, const struct dsv32_config *cfg, int rope_f32);

/* RoPE tables as DeepSeek's reference computes them (fp32 frequencies with YaRN correction):
 * cos/sin[pos * (rope/2) + i] for pos < n_pos. Caller frees. */
int dsv32_rope_table(const struct dsv32_config *cfg, int n_pos, float **ret_cos, float **ret_sin);

#endif
