/* CUDA kernel benchmarks at DeepSeek-V3.2's real dimensions (hidden 7168, 128 heads, kv_lora 512,
 * rope 64, indexer 64 heads x 128, top-2048, 256 experts of 2048, 8 per token), on the cuda
 * backend in its fast numerics mode, with caches and weights drawn directly on the GPU (no model
 * needed). Every table is printed next to its floor from ceilings measured in the same run:
 *   - ceilings: device-to-device copy bandwidth, cuBLAS bf16 GEMM rate;
 *   - DSA decode attention (indexer + top-k + sparse MLA) at batch 64, context 131072, against the
 *     bytes it must read (132 B of indexer key per cached token + 656 B per selected token), with
 *     dense MLA over the whole context in the same run;
 *   - cost against context length (dense vs DSA), also written as CSV for the plot;
 *   - sparse MLA prefill (and the causal indexer over a prefill) in TFLOP/s next to the bf16 rate;
 *   - the routed experts of one MoE layer (moe_experts alone) at 1 to 4096 rows, against the
 *     bytes of the experts hit and the arithmetic, the previous FP8 kernel in the same run;
 *   - one full decoder layer (MLA + DSA + MoE with all 256 experts) at batch 1, 16, 64, 256:
 *     the step time of a 2-layer model minus that of a 1-layer model, next to the floor of the
 *     layer's weight and KV bytes;
 *   - the other ops of a layer one by one (embedding, norms, both RoPEs, Hadamard + FP8, add,
 *     SiLU x up, the FP8 linears, the absorb/expand GEMMs, the router) at 64 and 4096 rows,
 *     against the bytes they must move and, for the GEMMs, their arithmetic at the bf16 rate.
 *   cuda_bench [--only dsa|sweep|prefill|moe|layer|ops] [--csv DIR] [--iters N] [--ctx-layer N] */
#include "cuda/cuda_backend.h"
#include "engine.h"
#include "error.h"
#include "kvcache.h"
#include "sampling.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MUST(expr)                                                                                 \
    do {                                                                                           \
        int r_ = (expr);                                                                           \
        if (r_ < 0) {                                                                              \
            fprintf(stderr, "cuda_bench: %s: %s\n", #expr, dsv32_strerror(r_));                    \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static int iters = 10;
static double copy_gbps, bf16_tflops;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return v[n / 2];
}

static void cfg_v32(struct dsv32_config *c)
{
    memset(c, 0, sizeof(*c));
    c->vocab_size = 129280;
    c->hidden_size = 7168;
    c->intermediate_size = 18432;
    c->moe_intermediate_size = 2048;
    c->num_hidden_layers = 1;
    c->first_k_dense_replace = 0;
    c->moe_layer_freq = 1;
    c->num_attention_heads = 128;
    c->n_routed_experts = 256;
    c->n_shared_experts = 1;
    c->num_experts_per_tok = 8;
    c->n_group = 8;
    c->topk_group = 4;
    c->routed_scaling_factor = 2.5f;
    c->norm_topk_prob = 1;
    c->scoring_sigmoid = 1;
    c->q_lora_rank = 1536;
    c->kv_lora_rank = 512;
    c->qk_nope_head_dim = 128;
    c->qk_rope_head_dim = 64;
    c->v_head_dim = 128;
    c->index_n_heads = 64;
    c->index_head_dim = 128;
    c->index_topk = 2048;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0;
    c->yarn = 1;
    c->rope_factor = 40;
    c->original_max_position_embeddings = 4096;
    c->beta_fast = 32;
    c->beta_slow = 1;
    c->mscale = c->mscale_all_dim = 1;
    c->max_position_embeddings = 163840;
    c->fp8 = 1;
    c->fp8_block = 128;
    c->ue8m0 = 1;
}

/* ---- the DSA decode setup: one layer's caches for B sequences of up to L tokens ---- */

struct dsa {
    struct dsv32_backend *be;
    struct dsv32_config cfg;
    int B, L, max_blocks;
    struct dsv32_kv_layer kv;
    int32_t *h_pos, *h_seq, *h_blocks, *d_pos, *d_seq, *d_blocks;
    int64_t *h_slot, *d_slot;
    uint8_t *h_mha, *d_mha;
    uint8_t *q8;
    float *qs, *wr, *qlat, *q, *out;
    void *qlat16; /* the same shape in bf16: the latents of a backend with lat_bf16 */
    int32_t *sel;
};

static void *dalloc(struct dsv32_backend *be, size_t bytes)
{
    void *p = be->ops->alloc(be, bytes);
    if (!p) {
        fprintf(stderr, "cuda_bench: out of device memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static void dsa_init(struct dsa *d, struct dsv32_backend *be, int B, int L, int rows_per_seq)
{
    memset(d, 0, sizeof(*d));
    d->be = be;
    cfg_v32(&d->cfg);
    d->B = B;
    d->L = L;
    d->max_blocks = L / 64;
    const size_t n_blocks = (size_t)B * d->max_blocks, rows = (size_t)B * rows_per_seq;
    d->kv.mla = dalloc(be, n_blocks * 64 * be->geom.mla_rec_bytes);
    d->kv.idx = dalloc(be, n_blocks * be->geom.idx_block_bytes);
    MUST(dsv32_cuda_fill(be, d->kv.mla, n_blocks * 64, DSV32_FILL_MLA_CACHE, 1, 1.0f));
    MUST(dsv32_cuda_fill(be, d->kv.idx, n_blocks, DSV32_FILL_IDX_CACHE, 2, 1.0f));
    /* block tables: a random permutation, as a paged cache after some churn */
    d->h_blocks = malloc(sizeof(int32_t) * n_blocks);
    for (size_t i = 0; i < n_blocks; i++)
        d->h_blocks[i] = (int32_t)i;
    srand(12345);
    for (size_t i = n_blocks - 1; i > 0; i--) {
        size_t j = ((size_t)rand() * 65536u + (size_t)rand()) % (i + 1);
        int32_t x = d->h_blocks[i];
        d->h_blocks[i] = d->h_blocks[j];
        d->h_blocks[j] = x;
    }
    d->h_pos = malloc(sizeof(int32_t) * rows);
    d->h_seq = malloc(sizeof(int32_t) * rows);
    d->h_slot = malloc(sizeof(int64_t) * rows);
    d->h_mha = calloc(rows, 1);
    d->d_blocks = dalloc(be, sizeof(int32_t) * n_blocks);
    d->d_pos = dalloc(be, sizeof(int32_t) * rows);
    d->d_seq = dalloc(be, sizeof(int32_t) * rows);
    d->d_slot = dalloc(be, sizeof(int64_t) * rows);
    d->d_mha = dalloc(be, rows);
    MUST(be->ops->to_device(be, d->d_blocks, d->h_blocks, sizeof(int32_t) * n_blocks));
    const int H = 128, IH = 64, K = 2048;
    d->q8 = dalloc(be, rows * IH * 128);
    d->qs = dalloc(be, sizeof(float) * rows * IH);
    d->wr = dalloc(be, sizeof(float) * rows * IH);
    d->qlat = dalloc(be, sizeof(float) * rows * H * 512);
    d->qlat16 = dalloc(be, sizeof(uint16_t) * rows * H * 512);
    d->q = dalloc(be, sizeof(float) * rows * H * 192);
    d->out = dalloc(be, sizeof(float) * rows * H * 512);
    d->sel = dalloc(be, sizeof(int32_t) * rows * K);
    MUST(dsv32_cuda_fill(be, d->q8, rows * IH * 128, DSV32_FILL_E4M3, 3, 64.0f));
    MUST(dsv32_cuda_fill(be, d->qs, rows * IH, DSV32_FILL_F32_UNIFORM, 4, 0.01f));
    MUST(dsv32_cuda_fill(be, d->wr, rows * IH, DSV32_FILL_F32_NORMAL, 5, 1.0f));
    MUST(dsv32_cuda_fill(be, d->qlat, rows * H * 512, DSV32_FILL_F32_NORMAL, 6, 1.0f));
    MUST(dsv32_cuda_fill(be, d->qlat16, rows * H * 512, DSV32_FILL_BF16_NORMAL, 6, 1.0f));
    MUST(dsv32_cuda_fill(be, d->q, rows * H * 192, DSV32_FILL_F32_NORMAL, 7, 1.0f));
}

static void dsa_free(struct dsa *d)
{
    struct dsv32_backend *be = d->be;
    void *dev[] = {d->kv.mla, d->kv.idx, d->d_blocks, d->d_pos, d->d_seq,
                   d->d_slot, d->d_mha,  d->q8,       d->qs,    d->wr,
                   d->qlat,   d->qlat16, d->q,        d->out,   d->sel};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        be->ops->dealloc(be, dev[i]);
    free(d->h_blocks);
    free(d->h_pos);
    free(d->h_seq);
    free(d->h_slot);
    free(d->h_mha);
}

/* rows: `per` query rows per sequence for the first nseq sequences, the last at position ctx-1 */
static struct dsv32_step_meta dsa_meta(struct dsa *d, int nseq, int per, int ctx)
{
    const int rows = nseq * per;
    for (int s = 0; s < nseq; s++)
        for (int t = 0; t < per; t++) {
            const int r = s * per + t, pos = ctx - per + t;
            d->h_pos[r] = pos;
            d->h_seq[r] = s;
            d->h_slot[r] = (int64_t)d->h_blocks[(size_t)s * d->max_blocks + pos / 64] * 64 + pos % 64;
            d->h_mha[r] = 0;
        }
    MUST(d->be->ops->to_device(d->be, d->d_pos, d->h_pos, sizeof(int32_t) * rows));
    MUST(d->be->ops->to_device(d->be, d->d_seq, d->h_seq, sizeof(int32_t) * rows));
    MUST(d->be->ops->to_device(d->be, d->d_slot, d->h_slot, sizeof(int64_t) * rows));
    MUST(d->be->ops->to_device(d->be, d->d_mha, d->h_mha, (size_t)rows));
    struct dsv32_step_meta m = {.n_rows = rows, .n_seqs = nseq, .max_blocks = d->max_blocks, .max_ctx = ctx};
    m.d_row_pos = d->d_pos;
    m.h_row_pos = d->h_pos;
    m.d_row_seq = d->d_seq;
    m.h_row_seq = d->h_seq;
    m.d_blocks = d->d_blocks;
    m.h_blocks = d->h_blocks;
    m.d_row_slot = d->d_slot;
    m.h_row_slot = d->h_slot;
    m.d_row_mha = d->d_mha;
    m.h_row_mha = d->h_mha;
    return m;
}

enum {
    RUN_INDEXER = 1,
    RUN_SPARSE = 2,
    RUN_DENSE = 4,
    RUN_DSA = 8,    /* the dsa op: both, one call */
    RUN_QUEUED = 16 /* 8 calls between the events, the time per call: the host's work for a call
                       (the indexer's work list: ~25 us) runs under the previous call's kernels,
                       as a step's layers queue; without it, each call starts on an idle GPU */
};

static double dsa_host_ms; /* dsa_time's host milliseconds per call (median), RUN_QUEUED */

/* median milliseconds of the chosen ops, device events around each repetition */
static double dsa_time(struct dsa *d, const struct dsv32_step_meta *m, int what, int reps)
{
    struct dsv32_backend *be = d->be;
    const float scale = 0.1352f; /* DeepSeek-V3.2's softmax scale: 192^-0.5 * (0.1 ln 40 + 1)^2 */
    double *t = malloc(sizeof(double) * (size_t)reps), *th = malloc(sizeof(double) * (size_t)reps);
    const int inner = what & RUN_QUEUED ? 8 : 1;
    const void *qlat = be->lat_bf16 ? d->qlat16 : (const void *)d->qlat; /* out holds either */
    for (int i = -2; i < reps; i++) {
        MUST(dsv32_cuda_timer_start(be));
        const double h0 = now_s();
        for (int j = 0; j < inner; j++) {
            if (what & RUN_INDEXER)
                MUST(be->ops->indexer(be, d->sel, d->q8, d->qs, d->wr, &d->kv, m, 2048));
            if (what & RUN_SPARSE)
                MUST(be->ops->mla(be, d->out, qlat, d->q + 128, 128 * 192, 192, d->sel, 2048,
                                  &d->kv, m, scale));
            if (what & RUN_DENSE)
                MUST(be->ops->mla(be, d->out, qlat, d->q + 128, 128 * 192, 192, NULL, 2048, &d->kv,
                                  m, scale));
            if (what & RUN_DSA)
                MUST(be->ops->dsa(be, d->out, d->sel, d->q8, d->qs, d->wr, 2048, qlat, d->q + 128,
                                  128 * 192, 192, &d->kv, m, scale));
        }
        const double h1 = now_s();
        float ms;
        MUST(dsv32_cuda_timer_stop(be, &ms));
        if (i >= 0) {
            t[i] = ms / inner;
            th[i] = (h1 - h0) * 1e3 / inner;
        }
    }
    dsa_host_ms = median(th, reps);
    free(th);
    double r = median(t, reps);
    free(t);
    return r;
}

/* dsa_time with kernel variants chosen by knobs, each restored afterwards: one measurement, no
 * knob state carried into the next */
struct knob {
    const char *name;
    int value;
};
#define KNOBS(...) (int)(sizeof((struct knob[]){__VA_ARGS__}) / sizeof(struct knob)), (struct knob[]){__VA_ARGS__}

static double dsa_time_with(struct dsa *d, const struct dsv32_step_meta *m, int what, int reps, int n,
                            const struct knob *k)
{
    int old[8];
    if (n > 8) {
        fprintf(stderr, "cuda_bench: more than 8 knobs at once\n");
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        MUST(dsv32_cuda_get_knob(d->be, k[i].name, &old[i]));
        MUST(dsv32_cuda_set_knob(d->be, k[i].name, k[i].value));
    }
    const double t = dsa_time(d, m, what, reps);
    for (int i = n - 1; i >= 0; i--)
        MUST(dsv32_cuda_set_knob(d->be, k[i].name, old[i]));
    return t;
}

/* the bytes DSA decode must read for B sequences at context ctx: the indexer key of every cached
 * token (132 B) and the 656-byte latent of each of its (at most 2048) selected tokens */
static double dsa_bytes(int B, int ctx)
{
    const int sel = ctx < 2048 ? ctx : 2048;
    return (double)B * ((double)ctx * 132 + (double)sel * 656);
}

static void bench_dsa(struct dsv32_backend *be, const char *csv_dir, int do_dsa, int do_sweep)
{
    const int B = 64, L = 131072;
    struct dsa d;
    dsa_init(&d, be, B, L, 1);
    const double gb = 1e9;
    if (do_dsa) {
        struct dsv32_step_meta m = dsa_meta(&d, B, 1, L);
        const double bytes = dsa_bytes(B, L);
        const double floor_ms = bytes / (copy_gbps * gb) * 1e3;
        const double dense_bytes = (double)B * L * 656;
        const int I = RUN_INDEXER, IS = RUN_INDEXER | RUN_SPARSE;
        /* f16 indexer (the exact mode's kernels): with the top-k, scores alone, the register-prefetch
         * wgmma version, the exact global top-k, mma.sync */
        const double t_idx = dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}));
        const double t_all = dsa_time_with(&d, &m, IS, iters, KNOBS({"indexer_fp8", 0}));
        const double t_scores = dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}, {"idx_no_topk", 1}));
        const double t_all_up = dsa_time_with(&d, &m, IS, iters, KNOBS({"indexer_fp8", 0}, {"idx_dev_items", 0}));
        const double t_scores5 =
            dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}, {"idx_no_topk", 1}, {"idx_wgmma", 3}));
        const double t_idx_gtopk = dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}, {"topk_global", 1}));
        const double t_scores_mma =
            dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}, {"idx_no_topk", 1}, {"idx_wgmma", 0}));
        const double t_idx_mma = dsa_time_with(&d, &m, I, iters, KNOBS({"indexer_fp8", 0}, {"idx_wgmma", 0}));
        /* the FP8 indexer (the fast mode's default) and its variants */
        MUST(dsv32_cuda_set_knob(be, "indexer_fp8", 1));
        const double t_idx8 = dsa_time(&d, &m, I, iters);
        const double t_idx8_1cta = dsa_time_with(&d, &m, I, iters, KNOBS({"topk_parts", 1}));
        const double t_idx8_4cta = dsa_time_with(&d, &m, I, iters, KNOBS({"topk_parts", 4}));
        const double t_all8 = dsa_time(&d, &m, IS, iters);
        const double t_scores8 = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}));
        /* the work list in items of a fixed block count, the last one short (the previous default:
         * a partial extra wave) */
        const double t_scores8_items = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_items", 0}));
        const double t_idx8_items = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_items", 0}));
        const double t_all8_items = dsa_time_with(&d, &m, IS, iters, KNOBS({"idx_items", 0}));
        /* each block's epilogue under the next block's MMAs (knob idx_pipe; one-row items) */
        const double t_scores8_pipe = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_pipe", 1}));
        const double t_all8_pipe = dsa_time_with(&d, &m, IS, iters, KNOBS({"idx_pipe", 1}));
        const double t_up = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_dev_items", 0}));
        const double t_up_all = dsa_time_with(&d, &m, IS, iters, KNOBS({"idx_dev_items", 0}));
        const double q_up = dsa_time_with(&d, &m, IS | RUN_QUEUED, iters, KNOBS({"idx_dev_items", 0}));
        const double q_dev = dsa_time(&d, &m, IS | RUN_QUEUED, iters);
        /* the cache blocks by TMA (evict-first in L2, and without the hint) instead of cp.async */
        const double t_scores8_tma = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_tma", 1}));
        const double t_idx8_tma = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_tma", 1}));
        const double t_idx8_l2n = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_tma", 1}, {"idx_l2_normal", 1}));
        const double t_scores8_l2n =
            dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_tma", 1}, {"idx_l2_normal", 1}));
        /* the same reads with nothing computed (the access pattern's rate), and both with the
         * sequences' blocks contiguous instead of a random permutation */
        const double t_read8 = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_copy_only", 1}));
        int32_t *ident = malloc(sizeof(int32_t) * (size_t)B * d.max_blocks);
        for (size_t i = 0; i < (size_t)B * d.max_blocks; i++)
            ident[i] = (int32_t)i;
        MUST(be->ops->to_device(be, d.d_blocks, ident, sizeof(int32_t) * (size_t)B * d.max_blocks));
        const double t_read8_seq =
            dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}, {"idx_copy_only", 1}));
        const double t_scores8_seq = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_no_topk", 1}));
        MUST(be->ops->to_device(be, d.d_blocks, d.h_blocks, sizeof(int32_t) * (size_t)B * d.max_blocks));
        free(ident);
        const double t_idx8_mma = dsa_time_with(&d, &m, I, iters, KNOBS({"idx_wgmma", 0}));
        /* sparse MLA: wgmma (default) and mma.sync */
        const double t_sp = dsa_time(&d, &m, RUN_SPARSE, iters);
        const double t_sp_ws = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_cl", 0}));
        const double t_sp_cl32 = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_cl", 32}));
        /* a diagnostic: the cluster without its copies to the peer (wrong results; their time) */
        const double t_sp_nocopy = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_cl_nocopy", 1}));
        const double t_all8_ws = dsa_time_with(&d, &m, IS, iters, KNOBS({"mla_cl", 0}));
        const double q_all8_ws = dsa_time_with(&d, &m, IS | RUN_QUEUED, iters, KNOBS({"mla_cl", 0}));
        const double t_sp_wg = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_cl", 0}, {"mla_ws", 0}));
        const double t_sp_q6 = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_cl", 0}, {"mla_q6", 1}));
        const double t_sp_mma = dsa_time_with(&d, &m, RUN_SPARSE, iters, KNOBS({"mla_wgmma", 0}));
        const double t_all8_mma = dsa_time_with(&d, &m, IS, iters, KNOBS({"mla_wgmma", 0}));
        const double t_dense = dsa_time(&d, &m, RUN_DENSE, iters > 5 ? 5 : iters);
        const double idx_flop = (double)B * L * 64 * 128 * 2;
        const double sp_flop = (double)B * 128 * 2048 * (576 + 512) * 2;
        printf("\n## DSA decode attention: batch %d, context %d per sequence (fast mode)\n", B, L);
        printf("floor: %.3f GB (indexer keys %.3f GB + selected latents %.3f GB) at %.0f GB/s = %.3f ms\n",
               bytes / gb, (double)B * L * 132 / gb, (double)B * 2048 * 656 / gb, copy_gbps, floor_ms);
        printf("| part | time (ms) | x floor | achieved |\n|---|---|---|---|\n");
        printf("| indexer scores + top-2048 (f16 wgmma, exact products; the default) | %.3f | | %.0f GB/s, %.0f TFLOP/s |\n",
               t_idx, (double)B * L * 132 / (t_idx * 1e-3) / gb, idx_flop / (t_idx * 1e-3) / 1e12);
        printf("| of it: scores alone (f16 wgmma) | %.3f | %.2f of the key bytes' floor | %.0f GB/s, %.0f TFLOP/s |\n",
               t_scores, t_scores / ((double)B * L * 132 / (copy_gbps * gb) * 1e3),
               (double)B * L * 132 / (t_scores * 1e-3) / gb, idx_flop / (t_scores * 1e-3) / 1e12);
        printf("| of it: top-2048 (by difference) | %.3f | | the exact global-memory path alone: %.3f ms |\n",
               t_idx - t_scores, t_idx_gtopk - t_scores);
        printf("| scores alone, wgmma with register prefetch (the first wgmma version) | %.3f | | |\n", t_scores5);
        printf("| indexer scores + top-2048 (f16 mma.sync, the previous kernel) | %.3f | | %.0f GB/s; scores alone %.3f ms |\n",
               t_idx_mma, (double)B * L * 132 / (t_idx_mma * 1e-3) / gb, t_scores_mma);
        printf("| indexer scores + top-2048 (FP8 wgmma, the fast mode default) | %.3f | | %.0f GB/s, %.0f TFLOP/s |\n",
               t_idx8, (double)B * L * 132 / (t_idx8 * 1e-3) / gb, idx_flop / (t_idx8 * 1e-3) / 1e12);
        printf("| of it: scores alone (FP8 wgmma) | %.3f | %.2f of the key bytes' floor | %.0f GB/s |\n", t_scores8,
               t_scores8 / ((double)B * L * 132 / (copy_gbps * gb) * 1e3), (double)B * L * 132 / (t_scores8 * 1e-3) / gb);
        const double kfloor = (double)B * L * 132 / (copy_gbps * gb) * 1e3;
        printf("| scores alone, the work list in items of a fixed block count, a partial last wave (knob idx_items 0, the previous default) | %.3f | %.2f | with the top-k %.3f ms; DSA total %.3f ms |\n",
               t_scores8_items, t_scores8_items / kfloor, t_idx8_items, t_all8_items);
        printf("| scores alone, the work list built on the host and uploaded (knob idx_dev_items 0, the previous kernel) | %.3f | %.2f | DSA total %.3f ms; queued: DSA %.3f against %.3f with the items derived on the GPU |\n",
               t_up, t_up / ((double)B * L * 132 / (copy_gbps * gb) * 1e3), t_up_all, q_up, q_dev);
        printf("| scores alone, each block's epilogue under the next block's MMAs (knob idx_pipe) | %.3f | %.2f | DSA total %.3f ms |\n",
               t_scores8_pipe, t_scores8_pipe / kfloor, t_all8_pipe);
        printf("| scores alone, cache blocks by TMA, evict-first in L2 (knob idx_tma) | %.3f | %.2f | with the top-k %.3f ms |\n",
               t_scores8_tma, t_scores8_tma / kfloor, t_idx8_tma);
        printf("| the same without the L2 hint (knob idx_l2_normal) | %.3f | %.2f | with the top-k %.3f ms |\n",
               t_scores8_l2n, t_scores8_l2n / kfloor, t_idx8_l2n);
        printf("| the FP8 indexer's block reads alone, nothing computed (knob idx_copy_only) | %.3f | %.2f | %.0f GB/s |\n", t_read8,
               t_read8 / ((double)B * L * 132 / (copy_gbps * gb) * 1e3), (double)B * L * 132 / (t_read8 * 1e-3) / gb);
        printf("| the same reads with each sequence's blocks contiguous (not permuted) | %.3f | %.2f | scores %.3f ms |\n",
               t_read8_seq, t_read8_seq / ((double)B * L * 132 / (copy_gbps * gb) * 1e3), t_scores8_seq);
        printf("| of it: top-2048 (by difference; a cluster of 2 CTAs per row, the default below half the SMs' rows) | %.3f | | 4 CTAs per row (knob topk_parts 4): %.3f ms; one (topk_parts 1): %.3f ms |\n",
               t_idx8 - t_scores8, t_idx8_4cta - t_scores8, t_idx8_1cta - t_scores8);
        printf("| indexer scores + top-2048 (FP8 mma.sync, the previous FP8 kernel) | %.3f | | |\n", t_idx8_mma);
        printf("| sparse MLA decode (bf16 wgmma, 2048 selected; a cluster of the two head groups, each converting half of every 64-key tile, two key buffers) | %.3f | | %.0f TFLOP/s |\n", t_sp,
               sp_flop / (t_sp * 1e-3) / 1e12);
        printf("| sparse MLA decode, the cluster with 32-key tiles, four key buffers (knob mla_cl 32) | %.3f | | %.0f TFLOP/s |\n", t_sp_cl32,
               sp_flop / (t_sp_cl32 * 1e-3) / 1e12);
        printf("| sparse MLA decode, the cluster without its copies to the peer (a diagnostic, wrong results: knob mla_cl_nocopy) | %.3f | | the copies' share of the cluster's time |\n",
               t_sp_nocopy);
        printf("| sparse MLA decode (warp-specialized, 32-key tiles, each CTA converting all: knob mla_cl 0, the previous kernel) | %.3f | | %.0f TFLOP/s; DSA total with it %.3f ms, queued %.3f |\n",
               t_sp_ws, sp_flop / (t_sp_ws * 1e-3) / 1e12, t_all8_ws, q_all8_ws);
        printf("| sparse MLA decode, warp-specialized, Q staged with six loads in flight a thread (knob mla_q6) | %.3f | | %.0f TFLOP/s |\n",
               t_sp_q6, sp_flop / (t_sp_q6 * 1e-3) / 1e12);
        printf("| sparse MLA decode (both warpgroups in every step, 64-key tiles: knobs mla_cl 0, mla_ws 0) | %.3f | | %.0f TFLOP/s |\n",
               t_sp_wg, sp_flop / (t_sp_wg * 1e-3) / 1e12);
        printf("| sparse MLA decode (bf16 mma.sync, the previous kernel) | %.3f | | %.0f TFLOP/s; with the FP8 indexer %.3f ms in all |\n",
               t_sp_mma, sp_flop / (t_sp_mma * 1e-3) / 1e12, t_all8_mma);
        printf("| **DSA decode total (f16 wgmma indexer)** | %.3f | %.2f | with its work list uploaded (knob idx_dev_items 0): %.3f |\n",
               t_all, t_all / floor_ms, t_all_up);
        printf("| **DSA decode total (FP8 wgmma indexer, the fast mode default)** | %.3f | %.2f | |\n", t_all8, t_all8 / floor_ms);
        /* steady state: the same calls queued back to back */
        const double q_all8 = dsa_time(&d, &m, RUN_DSA | RUN_QUEUED, iters), q_host = dsa_host_ms;
        const double q_scores8 = dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_no_topk", 1}));
        const double q_idx8 = dsa_time(&d, &m, I | RUN_QUEUED, iters);
        const double q_sp = dsa_time(&d, &m, RUN_SPARSE | RUN_QUEUED, iters);
        const double q_read8 = dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_no_topk", 1}, {"idx_copy_only", 1}));
        printf("| **DSA decode total, fast mode, calls queued back to back (steady state)** | **%.3f** | **%.2f** | "
               "of it: scores %.3f (reads alone %.3f: %.0f GB/s), top-k %.3f (by difference), sparse MLA %.3f; "
               "the host's time per call, its waits included (a queued call's work-list upload waits for the one before) %.3f ms |\n",
               q_all8, q_all8 / floor_ms, q_scores8, q_read8, (double)B * L * 132 / (q_read8 * 1e-3) / gb,
               q_idx8 - q_scores8, q_sp, q_host);
        /* the dsa op (the engine's call) against the indexer and MLA ops called in turn, and
         * without programmatic dependent launch (knob pdl); one call on an idle GPU and calls
         * queued back to back; the variants interleaved over 3 rounds, each the median of its
         * rounds: the clocks drift over a run (the queued op above measured 0.425 ms, the same
         * op 0.442-0.450 a second later in one call), so only interleaved variants compare */
        /* (and with the latents in f32, knob lat16 0: Q read as f32 and O written as f32; the
         * fast mode's default is bf16) */
        enum { NV = 4, NR = 3 };
        int lat16 = 0;
        MUST(dsv32_cuda_get_knob(be, "lat16", &lat16));
        double tv[2][NV][NR], tm[2][NR];
        for (int rd = 0; rd < NR; rd++) {
            for (int qd = 0; qd < 2; qd++)
                for (int v = 0; v < NV; v++)
                    tv[qd][v][rd] =
                        dsa_time_with(&d, &m, (v == 0 ? IS : RUN_DSA) | (qd ? RUN_QUEUED : 0),
                                      iters, KNOBS({"pdl", v != 2}, {"lat16", v == 3 ? 0 : lat16}));
            for (int v = 0; v < 2; v++)
                tm[v][rd] = dsa_time_with(&d, &m, RUN_SPARSE | RUN_QUEUED, iters,
                                          KNOBS({"lat16", v ? 0 : lat16}));
        }
        for (int qd = 0; qd < 2; qd++) {
            double md[NV];
            for (int v = 0; v < NV; v++)
                md[v] = median(tv[qd][v], NR);
            printf("| DSA decode, the dsa op (the engine's call), %s | %.3f | %.2f | the indexer "
                   "and MLA ops in "
                   "turn %.3f; the op without programmatic dependent launch (knob pdl 0) %.3f; "
                   "with f32 latents "
                   "(knob lat16 0) %.3f (interleaved, medians of %d rounds) |\n",
                   qd ? "calls queued back to back" : "one call on an idle GPU", md[1],
                   md[1] / floor_ms, md[0], md[2], md[3], NR);
        }
        printf("| the sparse MLA alone, calls queued, latents %s (interleaved, medians of %d "
               "rounds) | %.3f | | "
               "with f32 latents (knob lat16 0) %.3f |\n",
               lat16 ? "bf16" : "f32", NR, median(tm[0], NR), median(tm[1], NR));
        {
            /* what the scores' stores cost (knob idx_copy_only 2: everything but the stores),
             * interleaved with the scores and their reads alone */
            double tc[3][NR];
            for (int rd = 0; rd < NR; rd++)
                for (int v = 0; v < 3; v++)
                    tc[v][rd] = dsa_time_with(&d, &m, I, iters,
                                              KNOBS({"idx_no_topk", 1}, {"idx_copy_only", v}));
            printf("| the FP8 scores without their stores (a diagnostic, knob idx_copy_only 2; "
                   "interleaved, medians of "
                   "%d rounds) | %.3f | | the scores %.3f, their reads alone %.3f |\n",
                   NR, median(tc[2], NR), median(tc[0], NR), median(tc[1], NR));
        }
        /* the dsa op with chunks of rows overlapped: chunk i's MLA beside chunk i + 1's indexer on
         * disjoint SMs (dsa.cu), by chunk count and the indexer's SMs */
        static const int chunk_n[] = {2, 4, 8}, idx_sms[] = {64, 96}, diag_sms[] = {48, 64, 96, 112};
        for (size_t ci = 0; ci < sizeof(chunk_n) / sizeof(chunk_n[0]); ci++)
            for (size_t si = 0; si < sizeof(idx_sms) / sizeof(idx_sms[0]); si++) {
                double t[3];
                for (int skip = 0; skip < 3; skip++)
                    t[skip] = dsa_time_with(&d, &m, RUN_DSA, iters,
                                            KNOBS({"dsa_chunks", chunk_n[ci]}, {"dsa_idx_sms", idx_sms[si]},
                                                  {"dsa_skip", skip}));
                printf("| DSA decode, %d chunks overlapped, the indexer on %d SMs (knobs dsa_chunks, dsa_idx_sms) | %.3f | %.2f | "
                       "its indexers alone %.3f ms, its MLAs alone %.3f ms (knob dsa_skip) |\n",
                       chunk_n[ci], idx_sms[si], t[0], t[0] / floor_ms, t[1], t[2]);
            }
        /* whether the indexer's rate follows its SM count: 2 chunks, indexers alone (the first on
         * the whole GPU, the second on the partition), as scores only and as reads only */
        for (size_t si = 0; si < sizeof(diag_sms) / sizeof(diag_sms[0]); si++) {
            const double t_sc = dsa_time_with(&d, &m, RUN_DSA, iters,
                                              KNOBS({"dsa_chunks", 2}, {"dsa_idx_sms", diag_sms[si]}, {"dsa_skip", 1},
                                                    {"idx_no_topk", 1}));
            const double t_rd = dsa_time_with(&d, &m, RUN_DSA, iters,
                                              KNOBS({"dsa_chunks", 2}, {"dsa_idx_sms", diag_sms[si]}, {"dsa_skip", 1},
                                                    {"idx_no_topk", 1}, {"idx_copy_only", 1}));
            printf("| of 2 chunks' indexers (the second on %d SMs): scores alone | %.3f | | reads alone %.3f ms; the whole GPU's: scores %.3f, reads %.3f |\n",
                   diag_sms[si], t_sc, t_rd, t_scores8, t_read8);
        }
        printf("| dense MLA decode over all %d positions | %.3f | %.1f (own floor %.3f ms) | %.0f GB/s |\n", L,
               t_dense, t_dense / floor_ms, dense_bytes / (copy_gbps * gb) * 1e3, dense_bytes / (t_dense * 1e-3) / gb);
        /* where the sparse MLA kernel's time goes: cycles per 64-key tile and phase */
        if (dsv32_cuda_set_knob(be, "mla_prof", 1) == 0) {
            unsigned long long pc[20]; /* dsv32_cuda_mla_prof's counters */
            for (int ws = 0; ws < 2; ws++) { /* ends on the default */
                MUST(dsv32_cuda_set_knob(be, "mla_ws", ws));
                dsa_time(&d, &m, RUN_SPARSE, 3);
                dsv32_cuda_mla_prof(be, pc);
                dsa_time(&d, &m, RUN_SPARSE, 3);
                if (dsv32_cuda_mla_prof(be, pc) != 0 || pc[16] == 0)
                    continue;
                /* each kernel's phases (mla.cu: mla_ws_kernel's per warpgroup, mla_wg_kernel's the same
                 * for both) */
                static const char *names_wg[] = {"QK^T (with the next tile's gather issued under it)", "softmax",
                                                 "O rescale + PV", "barrier + gather wait", "next tile's conversion",
                                                 "proxy fence after the conversion", "closing barrier"};
                static const char *names_ws0[] = {"wait for the key tile", "QK^T", "softmax", "wait for P's buffer + handover",
                                                  "-", "-", "-"};
                static const char *names_ws1[] = {"wait for the records", "wait for the key tile's buffer", "conversion",
                                                  "next gather's issue", "wait for P", "O rescale + PV", "-"};
                const int np = 7;
                unsigned long long tot = 0, tot1 = 0;
                for (int i = 0; i < np; i++) {
                    tot += pc[i];
                    tot1 += pc[8 + i];
                }
                printf("\nsparse MLA (%s) cycles per %d-key tile: warpgroup 0 %.0f, warpgroup 1 %.0f in all\n",
                       ws ? "warp-specialized" : "both warpgroups per step", ws ? 32 : 64, (double)tot / (double)pc[16],
                       (double)tot1 / (double)pc[16]);
                printf("(and per CTA: %.0f cycles before the loop, %.0f after it)\n", (double)pc[17] / (double)pc[19],
                       (double)pc[18] / (double)pc[19]);
                printf("| phase (wg 0) | cycles | phase (wg 1) | cycles |\n|---|---|---|---|\n");
                for (int i = 0; i < np; i++)
                    printf("| %s | %.0f | %s | %.0f |\n", ws ? names_ws0[i] : names_wg[i], (double)pc[i] / (double)pc[16],
                           ws ? names_ws1[i] : names_wg[i], (double)pc[8 + i] / (double)pc[16]);
            }
            /* the warp-specialized kernel's cycles before its first tile with Q in two rounds */
            MUST(dsv32_cuda_set_knob(be, "mla_q6", 1));
            dsa_time(&d, &m, RUN_SPARSE, 3);
            dsv32_cuda_mla_prof(be, pc);
            dsa_time(&d, &m, RUN_SPARSE, 3);
            if (dsv32_cuda_mla_prof(be, pc) == 0 && pc[19] > 0)
                printf("\nsparse MLA (warp-specialized, knob mla_q6): %.0f cycles per CTA before the loop\n",
                       (double)pc[17] / (double)pc[19]);
            MUST(dsv32_cuda_set_knob(be, "mla_q6", 0));
            dsv32_cuda_set_knob(be, "mla_prof", 0);
        }
        fflush(stdout);
    }
    if (do_sweep) {
        static const int ctxs[] = {4096, 8192, 16384, 32768, 65536, 131072};
        FILE *csv = NULL;
        if (csv_dir) {
            char path[1024];
            snprintf(path, sizeof(path), "%s/dsa_sweep.csv", csv_dir);
            csv = fopen(path, "w");
            if (csv)
                fprintf(csv, "context,dsa_ms,dsa_fp8idx_ms,dense_ms,dsa_floor_ms,dense_floor_ms,dsa_fp8idx_queued_ms\n");
        }
        printf("\n## Cost against context length: batch %d decode, dense MLA vs DSA (indexer + top-k + sparse MLA)\n", B);
        printf("| context | DSA (ms) | DSA, FP8 indexer (ms) | the same, calls queued (ms) | DSA floor (ms) | dense MLA (ms) | dense floor (ms) | dense / DSA |\n");
        printf("|---|---|---|---|---|---|---|---|\n");
        for (size_t i = 0; i < sizeof(ctxs) / sizeof(ctxs[0]); i++) {
            const int ctx = ctxs[i];
            struct dsv32_step_meta m = dsa_meta(&d, B, 1, ctx);
            const double t_dsa = dsa_time_with(&d, &m, RUN_INDEXER | RUN_SPARSE, iters, KNOBS({"indexer_fp8", 0}));
            const double t_dsa8 = dsa_time_with(&d, &m, RUN_INDEXER | RUN_SPARSE, iters, KNOBS({"indexer_fp8", 1}));
            const double t_dsa8q = dsa_time_with(&d, &m, RUN_INDEXER | RUN_SPARSE | RUN_QUEUED, iters, KNOBS({"indexer_fp8", 1}));
            const double t_dense = dsa_time(&d, &m, RUN_DENSE, iters > 5 ? 5 : iters);
            const double f_dsa = dsa_bytes(B, ctx) / (copy_gbps * gb) * 1e3;
            const double f_dense = (double)B * ctx * 656 / (copy_gbps * gb) * 1e3;
            printf("| %d | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f |\n", ctx, t_dsa, t_dsa8, t_dsa8q, f_dsa, t_dense,
                   f_dense, t_dense / t_dsa8q);
            if (csv)
                fprintf(csv, "%d,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f\n", ctx, t_dsa, t_dsa8, t_dense, f_dsa, f_dense, t_dsa8q);
            fflush(stdout);
        }
        if (csv)
            fclose(csv);
    }
    dsa_free(&d);
}

/* --only dsa-quick: the DSA table's default rows alone (the fast mode's kernels, one call and
 * queued, and the queued parts), a fraction of the full table's device time */
static void bench_dsa_quick(struct dsv32_backend *be)
{
    const int B = 64, L = 131072, I = RUN_INDEXER, IS = RUN_INDEXER | RUN_SPARSE;
    struct dsa d;
    dsa_init(&d, be, B, L, 1);
    struct dsv32_step_meta m = dsa_meta(&d, B, 1, L);
    const double bytes = dsa_bytes(B, L), floor_ms = bytes / (copy_gbps * 1e9) * 1e3;
    MUST(dsv32_cuda_set_knob(be, "indexer_fp8", 1));
    /* the two ops in turn and the dsa op, one call and queued, interleaved over 3 rounds (medians):
     * the clocks drift down within a process under load, so rows measured apart differ by a few
     * percent for that alone (a later dsa op measured 5-12 us above the earlier ops in turn) */
    double r_all[3], r_qall[3], r_op[3], r_qop[3];
    for (int i = 0; i < 3; i++) {
        r_all[i] = dsa_time(&d, &m, IS, iters);
        r_qall[i] = dsa_time(&d, &m, IS | RUN_QUEUED, iters);
        r_op[i] = dsa_time(&d, &m, RUN_DSA, iters);
        r_qop[i] = dsa_time(&d, &m, RUN_DSA | RUN_QUEUED, iters);
    }
    const double t_all = median(r_all, 3), q_all = median(r_qall, 3);
    const double t_op = median(r_op, 3), q_op = median(r_qop, 3);
    const double q_scores = dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_no_topk", 1}));
    const double q_read = dsa_time_with(&d, &m, I | RUN_QUEUED, iters,
                                        KNOBS({"idx_no_topk", 1}, {"idx_copy_only", 1}));
    const double q_idx = dsa_time(&d, &m, I | RUN_QUEUED, iters);
    const double q_sp = dsa_time(&d, &m, RUN_SPARSE | RUN_QUEUED, iters);
    /* the indexer's sampled path (knob idx_sample), in the same run */
    const double q_smp = dsa_time_with(&d, &m, IS | RUN_QUEUED, iters, KNOBS({"idx_sample", 1}));
    const double q_smp_idx = dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_sample", 1}));
    /* the FP8 scores' head sum by FMAs (knob idx_msum 0) instead of the tensor core */
    const double q_fma = dsa_time_with(&d, &m, IS | RUN_QUEUED, iters, KNOBS({"idx_msum", 0}));
    const double q_fma_sc =
        dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_no_topk", 1}, {"idx_msum", 0}));
    /* the FP8 scores in the other width (knob idx_s16: f16 or f32) */
    int s16 = 0;
    MUST(dsv32_cuda_get_knob(be, "idx_s16", &s16));
    const int w16 = !s16;
    const double q_w = dsa_time_with(&d, &m, IS | RUN_QUEUED, iters, KNOBS({"idx_s16", w16}));
    const double q_w_sc =
        dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_no_topk", 1}, {"idx_s16", w16}));
    const double q_w_idx = dsa_time_with(&d, &m, I | RUN_QUEUED, iters, KNOBS({"idx_s16", w16}));
    printf("\n## DSA decode attention, batch %d x context %d (quick: the defaults only)\n", B, L);
    printf("floor: %.3f GB at %.0f GB/s = %.3f ms\n", bytes / 1e9, copy_gbps, floor_ms);
    printf("| part | time (ms) | x floor | |\n|---|---|---|---|\n");
    printf("| DSA decode total, the indexer and MLA ops in turn, one call (3 rounds interleaved "
           "with the dsa op's, medians) | %.3f | %.2f | |\n",
           t_all, t_all / floor_ms);
    printf("| the same, calls queued back to back | %.3f | %.2f | of it: scores %.3f (reads alone "
           "%.3f: %.0f "
           "GB/s), top-k %.3f (by difference), sparse MLA %.3f |\n",
           q_all, q_all / floor_ms, q_scores, q_read, (double)B * L * 132 / (q_read * 1e-3) / 1e9,
           q_idx - q_scores, q_sp);
    printf("| the dsa op (the engine's call), one call / queued | %.3f / %.3f | %.2f / %.2f | |\n",
           t_op, q_op, t_op / floor_ms, q_op / floor_ms);
    printf("| queued, the indexer's sampled path (knob idx_sample 1) | %.3f | %.2f | of it: the "
           "indexer %.3f "
           "(every score: %.3f) |\n",
           q_smp, q_smp / floor_ms, q_smp_idx, q_idx);
    printf("| queued, the scores' head sum by FMAs (knob idx_msum 0) | %.3f | %.2f | of it: scores "
           "%.3f (on the tensor core: %.3f) |\n",
           q_fma, q_fma / floor_ms, q_fma_sc, q_scores);
    printf("| queued, the scores in %s (knob idx_s16 %d) | %.3f | %.2f | of it: scores %.3f, top-k "
           "%.3f (in %s: %.3f, %.3f) |\n",
           w16 ? "f16" : "f32", w16, q_w, q_w / floor_ms, q_w_sc, q_w_idx - q_w_sc,
           w16 ? "f32" : "f16", q_scores, q_idx - q_scores);
    fflush(stdout);
    dsa_free(&d);
}

static void bench_prefill(struct dsv32_backend *be)
{
    /* one sequence of 131072 cached tokens; the last T rows are a prefill chunk */
    const int L = 131072, T = 4096, H = 128;
    struct dsa d;
    dsa_init(&d, be, 1, L, T);
    struct dsv32_step_meta m = dsa_meta(&d, 1, T, L);
    MUST(dsv32_cuda_random_selection(be, d.sel, d.d_pos, T, 2048, 99));
    const double t_sp = dsa_time(&d, &m, RUN_SPARSE, iters);
    const double flop = (double)T * H * 2048 * (576 + 512) * 2;
    const double t_idx = dsa_time_with(&d, &m, RUN_INDEXER, iters > 5 ? 5 : iters, KNOBS({"indexer_fp8", 0}));
    const double t_idx8 = dsa_time_with(&d, &m, RUN_INDEXER, iters > 5 ? 5 : iters, KNOBS({"indexer_fp8", 1}));
    double idx_flop = 0;
    for (int t = 0; t < T; t++)
        idx_flop += (double)(L - T + t + 1) * 64 * 128 * 2;
    printf("\n## Sparse MLA prefill: %d query rows of one sequence at positions %d..%d, top-2048 each\n", T,
           L - T, L - 1);
    printf("| kernel | time (ms) | TFLOP/s | x bf16 GEMM rate (%.0f TFLOP/s) |\n|---|---|---|---|\n", bf16_tflops);
    printf("| sparse MLA prefill, absorbed (bf16 wgmma; %.2f TFLOP) | %.3f | %.0f | %.2f |\n", flop / 1e12, t_sp,
           flop / (t_sp * 1e-3) / 1e12, flop / (t_sp * 1e-3) / 1e12 / bf16_tflops);
    printf("| causal indexer + top-2048 over the chunk (f16 wgmma; %.2f TFLOP) | %.3f | %.0f | %.2f |\n",
           idx_flop / 1e12, t_idx, idx_flop / (t_idx * 1e-3) / 1e12, idx_flop / (t_idx * 1e-3) / 1e12 / bf16_tflops);
    printf("| causal indexer + top-2048 over the chunk (FP8 wgmma; %.2f TFLOP) | %.3f | %.0f | %.2f |\n",
           idx_flop / 1e12, t_idx8, idx_flop / (t_idx8 * 1e-3) / 1e12, idx_flop / (t_idx8 * 1e-3) / 1e12 / bf16_tflops);
    fflush(stdout);
    dsa_free(&d);
}

/* ---- one decoder layer ---- */

static void rnd_w(struct dsv32_backend *be, struct dsv32_weight *w, const char *name, enum dsv32_dtype dt,
                  int64_t rows, int64_t cols, uint64_t *seed, float std)
{
    MUST(dsv32_cuda_weight_random(be, w, name, dt, rows, cols, ++*seed, std));
}

static double weight_bytes(const struct dsv32_weight *w)
{
    return (double)w->rows * w->cols * (w->dtype == DSV32_DT_F8_E4M3 ? 1 : w->dtype == DSV32_DT_BF16 ? 2 : 4);
}

static void make_layer(struct dsv32_backend *be, struct dsv32_layer_weights *L, const struct dsv32_config *c,
                       uint64_t *seed, double *attn_bytes)
{
    const int D = c->hidden_size, H = c->num_attention_heads, E = c->n_routed_experts, I = c->moe_intermediate_size;
    const enum dsv32_dtype F8 = DSV32_DT_F8_E4M3, BF = DSV32_DT_BF16, F32 = DSV32_DT_F32;
    memset(L, 0, sizeof(*L));
    rnd_w(be, &L->attn_norm, "attn_norm", F32, 1, D, seed, -1);
    rnd_w(be, &L->ffn_norm, "ffn_norm", F32, 1, D, seed, -1);
    rnd_w(be, &L->wq_a, "wq_a", F8, c->q_lora_rank, D, seed, 0.02f);
    rnd_w(be, &L->q_norm, "q_norm", F32, 1, c->q_lora_rank, seed, -1);
    rnd_w(be, &L->wq_b, "wq_b", F8, H * 192, c->q_lora_rank, seed, 0.02f);
    rnd_w(be, &L->wkv_a, "wkv_a", F8, 576, D, seed, 0.02f);
    rnd_w(be, &L->kv_norm, "kv_norm", F32, 1, 512, seed, -1);
    rnd_w(be, &L->wkv_b, "wkv_b", F8, H * 256, 512, seed, 0.02f);
    rnd_w(be, &L->wo, "wo", F8, D, H * 128, seed, 0.01f);
    rnd_w(be, &L->idx_wq_b, "idx_wq_b", F8, 64 * 128, c->q_lora_rank, seed, 0.02f);
    rnd_w(be, &L->idx_wk, "idx_wk", F8, 128, D, seed, 0.02f);
    rnd_w(be, &L->idx_k_norm_w, "idx_k_norm_w", F32, 1, 128, seed, -1);
    rnd_w(be, &L->idx_k_norm_b, "idx_k_norm_b", F32, 1, 128, seed, 0.0f);
    rnd_w(be, &L->idx_weights_proj, "idx_weights_proj", BF, 64, D, seed, 0.02f);
    L->is_moe = 1;
    rnd_w(be, &L->gate, "gate", BF, E, D, seed, 0.02f);
    rnd_w(be, &L->gate_bias, "gate_bias", F32, 1, E, seed, 0.01f);
    rnd_w(be, &L->shared.w1, "shared.w1", F8, I, D, seed, 0.02f);
    rnd_w(be, &L->shared.w2, "shared.w2", F8, D, I, seed, 0.02f);
    rnd_w(be, &L->shared.w3, "shared.w3", F8, I, D, seed, 0.02f);
    L->experts = calloc((size_t)E, sizeof(*L->experts));
    for (int e = 0; e < E; e++) {
        rnd_w(be, &L->experts[e].w1, "expert.w1", F8, I, D, seed, 0.02f);
        rnd_w(be, &L->experts[e].w2, "expert.w2", F8, D, I, seed, 0.02f);
        rnd_w(be, &L->experts[e].w3, "expert.w3", F8, I, D, seed, 0.02f);
    }
    const struct dsv32_weight *aw[] = {&L->wq_a, &L->wq_b, &L->wkv_a, &L->wkv_b, &L->wo, &L->idx_wq_b, &L->idx_wk,
                                       &L->idx_weights_proj, &L->gate, &L->shared.w1, &L->shared.w2, &L->shared.w3};
    *attn_bytes = 0;
    for (size_t i = 0; i < sizeof(aw) / sizeof(aw[0]); i++)
        *attn_bytes += weight_bytes(aw[i]);
}

/* --knob NAME=VALUE: a kernel variant for the whole run (cuda_backend.h's knobs), on the bench's
 * backend and on the layer table's engines' own */
static const char *knobs[16];
static int n_knobs;

static void apply_knobs(struct dsv32_backend *be)
{
    for (int i = 0; i < n_knobs; i++) {
        char kn[64];
        const char *eq = strchr(knobs[i], '=');
        snprintf(kn, sizeof(kn), "%.*s", (int)(eq - knobs[i]), knobs[i]);
        if (dsv32_cuda_set_knob(be, kn, atoi(eq + 1)) != 0) {
            fprintf(stderr, "cuda_bench: no knob %s\n", kn);
            exit(2);
        }
    }
}

/* median seconds of decode steps of B sequences at context ctx on the host clock, and in *dev on
 * the device's with the step queued behind a 20 ms kernel (its launches hidden: the device's
 * work alone) */
static double layer_steps(struct dsv32_engine *e, int B, int ctx, int reps, int *experts_hit,
                          double *dev)
{
    int *seqs = malloc(sizeof(int) * B);
    int32_t *tok = malloc(sizeof(int32_t) * B);
    struct dsv32_seq_input *in = malloc(sizeof(*in) * B);
    double *t = malloc(sizeof(double) * reps);
    for (int i = 0; i < B; i++) {
        seqs[i] = dsv32_kv_seq_new(e->kv);
        MUST(seqs[i]);
        MUST(dsv32_kv_seq_reserve(e->kv, seqs[i], ctx + reps + 8));
        e->kv->seq_tokens[seqs[i]] = ctx; /* the cache holds random data already */
        tok[i] = (int32_t)((i * 7919) % e->cfg->vocab_size);
        in[i] = (struct dsv32_seq_input){.seq = seqs[i], .n_tokens = 1, .tokens = &tok[i], .logits = DSV32_LOGITS_NONE};
    }
    for (int s = -3; s < reps; s++) {
        double t0 = now_s();
        MUST(dsv32_engine_step(e, in, B, NULL, NULL));
        if (s >= 0)
            t[s] = now_s() - t0;
    }
    double *td = malloc(sizeof(double) * reps);
    for (int s = 0; s < reps; s++) {
        float ms;
        MUST(dsv32_cuda_spin(e->be, 20000));
        MUST(dsv32_cuda_timer_start(e->be));
        MUST(dsv32_engine_step(e, in, B, NULL, NULL));
        MUST(dsv32_cuda_timer_stop(e->be, &ms));
        td[s] = ms * 1e-3;
    }
    *dev = median(td, reps);
    free(td);
    /* distinct routed experts of the last layer in the last step */
    const int K = e->cfg->num_experts_per_tok;
    int32_t *ids = malloc(sizeof(int32_t) * B * K);
    char hit[256] = {0};
    MUST(e->be->ops->to_host(e->be, ids, e->ids, sizeof(int32_t) * B * K));
    *experts_hit = 0;
    for (int i = 0; i < B * K; i++)
        if (ids[i] >= 0 && ids[i] < 256 && !hit[ids[i]]) {
            hit[ids[i]] = 1;
            (*experts_hit)++;
        }
    for (int i = 0; i < B; i++)
        dsv32_kv_seq_free(e->kv, seqs[i]);
    double r = median(t, reps);
    free(seqs);
    free(tok);
    free(in);
    free(t);
    free(ids);
    return r;
}

static int only_rows; /* --rows: that row count's lines of the layer, moe and ops tables only */

static void bench_layer(struct dsv32_backend *be, int ctx)
{
    struct dsv32_config c;
    cfg_v32(&c);
    c.num_hidden_layers = 2;
    struct dsv32_model m2, m1;
    memset(&m2, 0, sizeof(m2));
    m2.cfg = c;
    uint64_t seed = 1000;
    double attn_bytes = 0;
    MUST(dsv32_cuda_weight_random(be, &m2.embed, "embed", DSV32_DT_BF16, c.vocab_size, c.hidden_size, ++seed, 1.0f));
    MUST(dsv32_cuda_weight_random(be, &m2.norm, "norm", DSV32_DT_F32, 1, c.hidden_size, ++seed, -1));
    MUST(dsv32_cuda_weight_random(be, &m2.head, "head", DSV32_DT_BF16, 1024, c.hidden_size, ++seed, 0.02f));
    m2.layers = calloc(2, sizeof(*m2.layers));
    make_layer(be, &m2.layers[0], &c, &seed, &attn_bytes);
    make_layer(be, &m2.layers[1], &c, &seed, &attn_bytes);
    m1 = m2;
    m1.cfg.num_hidden_layers = 1;
    struct dsv32_engine *e1, *e2;
    const int max_b = 256, blocks = max_b * ((ctx + 64 + 63) / 64) + 16;
    struct dsv32_engine_opts o = {.backend = "cuda", .max_batch_tokens = max_b, .max_seqs = max_b,
                                  .max_seq_len = ctx + 64, .kv_blocks = blocks};
    MUST(dsv32_engine_new(&m1, &o, &e1));
    MUST(dsv32_engine_new(&m2, &o, &e2));
    apply_knobs(e1->be);
    apply_knobs(e2->be);
    for (int l = 0; l < 2; l++) {
        struct dsv32_engine *e = l ? e2 : e1;
        for (int k = 0; k < e->kv->n_layers; k++) {
            MUST(dsv32_cuda_fill(e->be, e->kv->layers[k].mla, (size_t)blocks * 64, DSV32_FILL_MLA_CACHE, 50 + k, 1.0f));
            MUST(dsv32_cuda_fill(e->be, e->kv->layers[k].idx, (size_t)blocks, DSV32_FILL_IDX_CACHE, 60 + k, 1.0f));
        }
        MUST(e->be->ops->sync(e->be));
    }
    const double expert_bytes = 3.0 * c.moe_intermediate_size * c.hidden_size;
    printf("\n## One decoder layer (MLA + DSA indexer + MoE, all 256 experts on this GPU), decode at context %d\n",
           ctx);
    printf("time per layer = step time of a 2-layer model - step time of a 1-layer model (both: embedding, "
           "no LM head); attention + shared expert + router weights %.0f MB (FP8 as DeepSeek ships them), "
           "%.1f MB per routed expert\n",
           attn_bytes / 1e6, expert_bytes / 1e6);
    printf("| batch | step, 1 layer (ms) | step, 2 layers (ms) | per layer (ms) | "
           "tokens/s (one layer) | experts hit | floor bytes (MB) | floor (ms) | x floor | "
           "device per layer, launches hidden (ms) | x floor |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|\n");
    static const int bs[] = {1, 16, 64, 256};
    for (size_t i = 0; i < sizeof(bs) / sizeof(bs[0]); i++) {
        const int B = bs[i];
        if (only_rows > 0 && B != only_rows)
            continue;
        int hit1, hit2;
        double d1, d2;
        /* DSV32_PROFILE_LAYER set: the profilers' collection on for these steps only (ncu
         * --profile-from-start off: the layer's kernels without the set-up's) */
        const int prof = getenv("DSV32_PROFILE_LAYER") != NULL;
        if (prof)
            MUST(dsv32_cuda_profiler(1));
        const double t1 = layer_steps(e1, B, ctx, iters, &hit1, &d1);
        const double t2 = layer_steps(e2, B, ctx, iters, &hit2, &d2);
        if (prof)
            MUST(dsv32_cuda_profiler(0));
        const double per = t2 - t1, dper = d2 - d1;
        const double bytes = attn_bytes + hit2 * expert_bytes + dsa_bytes(B, ctx);
        const double floor_ms = bytes / (copy_gbps * 1e9) * 1e3;
        printf("| %d | %.3f | %.3f | %.3f | %.0f | %d | %.0f | %.3f | %.2f | %.3f | %.2f |\n", B,
               t1 * 1e3, t2 * 1e3, per * 1e3, B / per, hit2, bytes / 1e6, floor_ms,
               per * 1e3 / floor_ms, dper * 1e3, dper * 1e3 / floor_ms);
        fflush(stdout);
    }
    /* m1 shares m2's layers (the same structs) but holds copies of embed, norm and head: e1's
     * release frees those and layer 0; e2 then finds layer 0 released and must not see the copies */
    dsv32_engine_free(e1);
    m2.embed.be = m2.norm.be = m2.head.be = NULL;
    dsv32_engine_free(e2);
    for (int l = 0; l < 2; l++)
        free(m2.layers[l].experts);
    free(m2.layers);
}

/* ---- the routed experts alone ---- */

/* Routing as a real router spreads it: each row picks K distinct experts uniformly (a hash of the
 * row and the draw), weights 1/K. */
static void moe_routing(int32_t *ids, float *w, int rows, int K, int E, uint64_t seed)
{
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < K; k++) {
            uint64_t x = seed ^ ((uint64_t)r * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)k << 40);
            for (;;) {
                x ^= x >> 31;
                x *= 0xbf58476d1ce4e5b9ull;
                x ^= x >> 29;
                const int32_t e = (int32_t)(x % (uint64_t)E);
                int dup = 0;
                for (int j = 0; j < k; j++)
                    dup |= ids[r * K + j] == e;
                if (!dup) {
                    ids[r * K + k] = e;
                    break;
                }
            }
            w[r * K + k] = 1.0f / (float)K;
        }
}

/* One MoE layer's routed experts (all 256 of DeepSeek-V3.2's, FP8) through the backend's
 * moe_experts: routing tables, activation quantization, the grouped SwiGLU GEMM with fused FP8
 * output, the grouped down projection and the weighted combine; device events around each call.
 * Floor: the weights of the distinct experts hit (44 MB each) at the copy bandwidth, or the
 * arithmetic at the bf16 tensor rate (the kernel runs f16 mma on exact FP8 -> f16 conversions),
 * whichever is larger. The register-prefetch kernel is timed in the same run as the baseline. */
/* median milliseconds of one backend call, device events around each repetition (2 warm-ups) */
#define OP_TIME(res, call)                                                                         \
    do {                                                                                           \
        double *t_ = malloc(sizeof(double) * (size_t)iters);                                       \
        for (int i_ = -2; i_ < iters; i_++) {                                                      \
            MUST(dsv32_cuda_timer_start(be));                                                      \
            MUST(call);                                                                            \
            float ms_;                                                                             \
            MUST(dsv32_cuda_timer_stop(be, &ms_));                                                 \
            if (i_ >= 0)                                                                           \
                t_[i_] = ms_;                                                                      \
        }                                                                                          \
        (res) = median(t_, iters);                                                                 \
        free(t_);                                                                                  \
    } while (0)

static void bench_moe(struct dsv32_backend *be)
{
    struct dsv32_config c;
    cfg_v32(&c);
    const int D = c.hidden_size, I = c.moe_intermediate_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    uint64_t seed = 7000;
    struct dsv32_ffn_weights *ex = calloc((size_t)E, sizeof(*ex));
    for (int e = 0; e < E; e++) {
        rnd_w(be, &ex[e].w1, "expert.w1", DSV32_DT_F8_E4M3, I, D, &seed, 0.02f);
        rnd_w(be, &ex[e].w2, "expert.w2", DSV32_DT_F8_E4M3, D, I, &seed, 0.02f);
        rnd_w(be, &ex[e].w3, "expert.w3", DSV32_DT_F8_E4M3, I, D, &seed, 0.02f);
    }
    static const int rows_list[] = {1, 4, 16, 64, 256, 1024, 4096};
    const int max_rows = 4096;
    float *dx = dalloc(be, sizeof(float) * (size_t)max_rows * D), *dy = dalloc(be, sizeof(float) * (size_t)max_rows * D);
    int32_t *di = dalloc(be, sizeof(int32_t) * (size_t)max_rows * K);
    float *dw = dalloc(be, sizeof(float) * (size_t)max_rows * K);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)max_rows * K);
    float *w = malloc(sizeof(float) * (size_t)max_rows * K);
    MUST(dsv32_cuda_fill(be, dx, (size_t)max_rows * D, DSV32_FILL_F32_NORMAL, 71, 1.0f));
    const double expert_bytes = 3.0 * I * D;
    printf("\n## Routed experts of one MoE layer (256 FP8 experts of %d x %d, %d per row), moe_experts alone\n", I, D, K);
    printf("floor = max(bytes of the distinct experts hit / copy bandwidth, FLOP / bf16 rate); "
           "the previous kernels (register prefetch; the pipelined mma.sync one for every row count) timed in the same run\n");
    printf("| rows | experts hit | weight bytes (MB) | TFLOP | floor (ms) | "
           "register kernel (ms) | x floor | pipelined mma.sync (ms) | x floor | "
           "default, CTAs for every expert (knob moe_all_groups; ms) | x floor | "
           "default: pipelined, or wgmma from %d rows per expert (ms) | x floor | "
           "weights read (TB/s) | TFLOP/s |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
           24);
    for (size_t i = 0; i < sizeof(rows_list) / sizeof(rows_list[0]); i++) {
        const int rows = rows_list[i];
        if (only_rows > 0 && rows != only_rows)
            continue;
        moe_routing(ids, w, rows, K, E, 99 + (uint64_t)rows);
        char hit[256] = {0};
        int n_hit = 0;
        for (int j = 0; j < rows * K; j++)
            if (!hit[ids[j]]) {
                hit[ids[j]] = 1;
                n_hit++;
            }
        MUST(be->ops->to_device(be, di, ids, sizeof(int32_t) * (size_t)rows * K));
        MUST(be->ops->to_device(be, dw, w, sizeof(float) * (size_t)rows * K));
        const double bytes = n_hit * expert_bytes, flop = 2.0 * rows * K * 3.0 * I * D;
        const double floor_ms = fmax(bytes / (copy_gbps * 1e9), flop / (bf16_tflops * 1e12)) * 1e3;
        double tv[4];
        for (int v = 0; v < 4; v++) {
            MUST(dsv32_cuda_set_knob(be, "fp8_reg", v == 0));
            MUST(dsv32_cuda_set_knob(be, "fp8_no_wg", v == 1));
            MUST(dsv32_cuda_set_knob(be, "moe_all_groups", v == 2));
            OP_TIME(tv[v], be->ops->moe_experts(be, dy, dx, rows, di, dw, K, ex, E, c.ue8m0));
        }
        MUST(dsv32_cuda_set_knob(be, "fp8_reg", 0));
        MUST(dsv32_cuda_set_knob(be, "fp8_no_wg", 0));
        MUST(dsv32_cuda_set_knob(be, "moe_all_groups", 0));
        printf("| %d | %d | %.0f | %.3f | %.3f | %.3f | %.2f | %.3f | %.2f | %.3f | %.2f | %.3f | "
               "%.2f | %.2f | %.0f |\n",
               rows, n_hit, bytes / 1e6, flop / 1e12, floor_ms, tv[0], tv[0] / floor_ms, tv[1],
               tv[1] / floor_ms, tv[2], tv[2] / floor_ms, tv[3], tv[3] / floor_ms,
               bytes / (tv[3] * 1e-3) / 1e12, flop / (tv[3] * 1e-3) / 1e12);
        fflush(stdout);
    }
    for (int e = 0; e < E; e++) {
        be->ops->release_weight(be, &ex[e].w1);
        be->ops->release_weight(be, &ex[e].w2);
        be->ops->release_weight(be, &ex[e].w3);
    }
    free(ex);
    be->ops->dealloc(be, dx);
    be->ops->dealloc(be, dy);
    be->ops->dealloc(be, di);
    be->ops->dealloc(be, dw);
    free(ids);
    free(w);
}

/* ---- the other ops of a layer, one by one ---- */

/* OP_TIME for short ops queued back to back, as a step queues them: n calls between the events
 * (n so that they take ~0.2 ms, at most 64), the median per call. One call alone between two
 * events also times the host's launch (~5-8 us), which a step's queue hides. The calls are
 * queued behind a kernel that holds the stream for op_spin_us, so that an op whose launches
 * take the host longer than the device's work is timed on the device all the same (--host-queue:
 * no such kernel, the device waiting for the host when it is faster). */
static int op_spin_us = 3000;
#define OP_TIME_QUEUED(res, call)                                                                  \
    do {                                                                                           \
        double t1_;                                                                                \
        OP_TIME(t1_, call);                                                                        \
        const int n_ = t1_ > 0.2 ? 1 : t1_ < 0.2 / 64 ? 64 : (int)ceil(0.2 / t1_);                 \
        double *t_ = malloc(sizeof(double) * (size_t)iters);                                       \
        for (int i_ = -2; i_ < iters; i_++) {                                                      \
            if (op_spin_us > 0) /* the calls queue behind it: the device's time alone */           \
                MUST(dsv32_cuda_spin(be, op_spin_us));                                             \
            MUST(dsv32_cuda_timer_start(be));                                                      \
            for (int j_ = 0; j_ < n_; j_++)                                                        \
                MUST(call);                                                                        \
            float ms_;                                                                             \
            MUST(dsv32_cuda_timer_stop(be, &ms_));                                                 \
            if (i_ >= 0)                                                                           \
                t_[i_] = ms_ / n_;                                                                 \
        }                                                                                          \
        (res) = median(t_, iters);                                                                 \
        free(t_);                                                                                  \
    } while (0)

/* one table row: bytes moved and FLOP (0: none) against max(bytes / copy rate, FLOP / tensor
 * rate), the tensor rate the measured bf16 GEMM rate, twice that for FP8 operands (Hopper's FP8
 * tensor cores run at twice their bf16 rate) */
/* the draws of a sampling row the device left to the host (token -1), if any */
static void report_left(const int32_t *tok, int n, const char *what)
{
    int left = 0;
    for (int r = 0; r < n; r++)
        left += tok[r] < 0;
    if (left)
        printf("(%d of the %d %s rows left to the host)\n", left, n, what);
}

static void op_row(const char *op, const char *shape, int rows, double bytes, double flop, int fp8, double ms)
{
    const double floor_ms =
        fmax(bytes / (copy_gbps * 1e9), flop / ((fp8 ? 2 : 1) * bf16_tflops * 1e12)) * 1e3;
    printf("| %s | %s | %d | %.2f | %.4f | %.4f | %.2f | %.0f GB/s", op, shape, rows, bytes / 1e6, floor_ms, ms,
           ms / floor_ms, bytes / (ms * 1e-3) / 1e9);
    if (flop > 0)
        printf(", %.0f TFLOP/s", flop / (ms * 1e-3) / 1e12);
    printf(" |\n");
}

static void bench_ops(struct dsv32_backend *be)
{
    struct dsv32_config c;
    cfg_v32(&c);
    const int D = c.hidden_size, H = c.num_attention_heads, QL = c.q_lora_rank, IH = c.index_n_heads;
    const int FF = c.intermediate_size, E = c.n_routed_experts, K = c.num_experts_per_tok;
    const enum dsv32_dtype F8 = DSV32_DT_F8_E4M3, BF = DSV32_DT_BF16, F32 = DSV32_DT_F32;
    uint64_t seed = 9000;
    struct dsv32_weight emb, norm, knw, knb, wq_a, wq_b, wkv_a, wkv_b, wo, idx_wq_b, gate, gate_bias;
    rnd_w(be, &emb, "embed", BF, c.vocab_size, D, &seed, 1.0f);
    rnd_w(be, &norm, "attn_norm", F32, 1, D, &seed, -1);
    rnd_w(be, &knw, "idx_k_norm_w", F32, 1, 128, &seed, -1);
    rnd_w(be, &knb, "idx_k_norm_b", F32, 1, 128, &seed, 0.0f);
    rnd_w(be, &wq_a, "wq_a", F8, QL, D, &seed, 0.02f);
    rnd_w(be, &wq_b, "wq_b", F8, H * 192, QL, &seed, 0.02f);
    rnd_w(be, &wkv_a, "wkv_a", F8, 576, D, &seed, 0.02f);
    rnd_w(be, &wkv_b, "wkv_b", F8, H * 256, 512, &seed, 0.02f);
    rnd_w(be, &wo, "wo", F8, D, H * 128, &seed, 0.01f);
    rnd_w(be, &idx_wq_b, "idx_wq_b", F8, IH * 128, QL, &seed, 0.02f);
    rnd_w(be, &gate, "gate", BF, E, D, &seed, 0.02f);
    rnd_w(be, &gate_bias, "gate_bias", F32, 1, E, &seed, 0.01f);
    const int max_rows = 4096;
    const size_t big = (size_t)max_rows * H * 512; /* the widest activation: q_lat, 1 GiB */
    float *x = dalloc(be, sizeof(float) * big), *y = dalloc(be, sizeof(float) * big),
          *z = dalloc(be, sizeof(float) * big);
    uint8_t *q8 = dalloc(be, (size_t)max_rows * IH * 128);
    float *qs = dalloc(be, sizeof(float) * (size_t)max_rows * IH), *gw = dalloc(be, sizeof(float) * (size_t)max_rows * K);
    int32_t *ids = dalloc(be, sizeof(int32_t) * max_rows), *pos = dalloc(be, sizeof(int32_t) * max_rows);
    int32_t *eids = dalloc(be, sizeof(int32_t) * (size_t)max_rows * K);
    MUST(dsv32_cuda_fill(be, x, big, DSV32_FILL_F32_NORMAL, 91, 1.0f));
    MUST(dsv32_cuda_fill(be, y, big, DSV32_FILL_F32_NORMAL, 92, 1.0f));
    MUST(dsv32_cuda_fill(be, z, big, DSV32_FILL_F32_NORMAL, 93, 1.0f));
    int32_t *h = malloc(sizeof(int32_t) * max_rows);
    for (int r = 0; r < max_rows; r++)
        h[r] = (int32_t)((r * 2654435761u) % (uint32_t)c.vocab_size); /* token ids, then positions */
    MUST(be->ops->to_device(be, ids, h, sizeof(int32_t) * max_rows));
    for (int r = 0; r < max_rows; r++)
        h[r] = 100000 + r;
    MUST(be->ops->to_device(be, pos, h, sizeof(int32_t) * max_rows));
    free(h);
    printf("\n## The other ops of a layer, one by one (fast mode)\n");
    printf("floor = max(bytes moved / copy bandwidth, FLOP / tensor rate: the bf16 GEMM rate, twice it for FP8 weights); "
           "bytes: activations read and written as the ops do (f32), weights as stored (FP8 or bf16); each op's "
           "time per call with calls queued back to back (~0.2 ms of them between two events)\n");
    printf("| op | shape | rows | MB moved | floor (ms) | time (ms) | x floor | achieved |\n"
           "|---|---|---|---|---|---|---|---|\n");
    static const int rows_list[] = {1, 4, 16, 64, 4096};
    for (size_t i = 0; i < sizeof(rows_list) / sizeof(rows_list[0]); i++) {
        const int R = rows_list[i];
        if (only_rows > 0 && R != only_rows)
            continue;
        double t;
        OP_TIME_QUEUED(t, be->ops->embed(be, y, ids, R, &emb));
        op_row("embedding (bf16 table)", "129280 x 7168", R, (double)R * D * (2 + 4), 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->rmsnorm(be, y, D, x, D, &norm, R, D, 1e-6f));
        op_row("RMSNorm", "7168", R, (double)R * D * 8 + D * 4.0, 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->layernorm(be, y, 128, x, 128, &knw, &knb, R, 128, 1e-6f));
        op_row("LayerNorm (indexer key)", "128", R, (double)R * 128 * 8 + 1024, 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->rope(be, y + 128, R, H, H * 192, 192, pos, 1));
        op_row("RoPE, interleaved (MLA q_pe)", "128 heads x 64", R, (double)R * H * 64 * 8, 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->rope(be, y, R, IH, IH * 128, 128, pos, 0));
        op_row("RoPE, half-split (indexer q)", "64 heads x 64 of 128", R, (double)R * IH * 64 * 8, 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->hadamard_quant(be, q8, qs, x, R * IH, 1));
        op_row("Hadamard + FP8 (indexer q)", "64 heads x 128", R, (double)R * IH * (128 * 4 + 128 + 4), 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->add(be, y, x, (size_t)R * D));
        op_row("add (residual)", "7168", R, (double)R * D * 12, 0, 0, t);
        OP_TIME_QUEUED(t, be->ops->silu_mul(be, y, x, z, R, FF));
        op_row("SiLU x up (dense FFN)", "18432", R, (double)R * FF * 12, 0, 0, t);
        if (R <= 512) { /* a step's logits rows (the engine returns at most 512) */
            /* the next token drawn where the logits are (the sample op, its result copied back
             * and waited for), greedy and over the whole vocabulary at temperature 1, against
             * the host's way: the rows copied to the host, then drawn there (one thread) */
            const int V = c.vocab_size;
            int32_t *rows = malloc(sizeof(int32_t) * R), *tok = malloc(sizeof(int32_t) * R);
            struct dsv32_draw *dr = malloc(sizeof(*dr) * R);
            for (int r = 0; r < R; r++) {
                rows[r] = r;
                dr[r] = (struct dsv32_draw){
                    .temperature = 0.0f, .u = 0.0, .top_p = 1.0f, .n_logprobs = -1};
            }
            OP_TIME_QUEUED(t, be->ops->sample(be, tok, NULL, x, V, rows, dr, R));
            op_row("sampling on the GPU: greedy", "129280", R, (double)R * V * 4, 0, 0, t);
            for (int r = 0; r < R; r++)
                dr[r] = (struct dsv32_draw){
                    .temperature = 1.0f, .u = (r + 0.5) / R, .top_p = 1.0f, .n_logprobs = -1};
            OP_TIME_QUEUED(t, be->ops->sample(be, tok, NULL, x, V, rows, dr, R));
            op_row("sampling on the GPU: a draw over the vocabulary (T 1)", "129280", R,
                   (double)R * V * 4, 0, 0, t);
            /* DeepSeek's recommended top-p, then with a top-k of 50 too, on logits of a model's
             * spread (normal, sigma 8: a nucleus of a few tokens; at sigma 1 it would be most of
             * the vocabulary: the flat row below) */
            MUST(dsv32_cuda_fill(be, z, (size_t)R * V, DSV32_FILL_F32_NORMAL, 94, 8.0f));
            for (int r = 0; r < R; r++)
                dr[r].top_p = 0.95f;
            double tp, tpk;
            OP_TIME_QUEUED(tp, be->ops->sample(be, tok, NULL, z, V, rows, dr, R));
            op_row("sampling on the GPU: top-p 0.95 (T 1)", "129280", R, (double)R * V * 4, 0, 0,
                   tp);
            for (int r = 0; r < R; r++)
                dr[r].top_k = 50;
            OP_TIME_QUEUED(tpk, be->ops->sample(be, tok, NULL, z, V, rows, dr, R));
            report_left(tok, R, "top-p");
            op_row("sampling on the GPU: top-k 50, top-p 0.95 (T 1)", "129280", R,
                   (double)R * V * 4, 0, 0, tpk);
            /* a flat row (sigma 1 at T 0.6, the scale benchmark's random weights): a nucleus of
             * most of the vocabulary, the chunked walk */
            MUST(dsv32_cuda_fill(be, z, (size_t)R * V, DSV32_FILL_F32_NORMAL, 95, 1.0f));
            for (int r = 0; r < R; r++) {
                dr[r].top_k = 0;
                dr[r].temperature = 0.6f;
            }
            double tf;
            OP_TIME_QUEUED(tf, be->ops->sample(be, tok, NULL, z, V, rows, dr, R));
            report_left(tok, R, "flat top-p");
            op_row("sampling on the GPU: top-p 0.95, flat (sigma 1, T 0.6)", "129280", R,
                   (double)R * V * 4, 0, 0, tf);
            for (int r = 0; r < R; r++) {
                dr[r].temperature = 1.0f;
                dr[r].top_k = 0;
                dr[r].top_p = 1.0f;
            }
            float *hl = malloc(sizeof(float) * (size_t)R * V);
            void *work = malloc(dsv32_draw_work_bytes(V));
            double th[5], td[5];
            for (int k = 0; k < 5; k++) {
                const double h0 = now_s();
                MUST(be->ops->to_host(be, hl, x, sizeof(float) * (size_t)R * V));
                const double h1 = now_s();
                for (int r = 0; r < R; r++)
                    tok[r] = dsv32_draw_row(hl + (size_t)r * V, V, &dr[r], work);
                td[k] = (now_s() - h1) * 1e3;
                th[k] = (h1 - h0) * 1e3;
            }
            printf("| the host's way: the logits copied to the host, then drawn there (T 1, one "
                   "thread) | 129280 | %d | "
                   "%.2f | | %.4f | | copy %.4f ms (%.0f GB/s), draws %.4f ms |\n",
                   R, (double)R * V * 4 / 1e6, median(th, 5) + median(td, 5), median(th, 5),
                   (double)R * V * 4 / (median(th, 5) * 1e-3) / 1e9, median(td, 5));
            free(rows);
            free(tok);
            free(dr);
            free(hl);
            free(work);
        }
        const struct {
            const char *name;
            const struct dsv32_weight *w;
        } lin[] = {{"linear FP8: wq_a", &wq_a},     {"linear FP8: wq_b", &wq_b},
                   {"linear FP8: wkv_a", &wkv_a},   {"linear FP8: wo", &wo},
                   {"linear FP8: indexer wq_b", &idx_wq_b}};
        for (size_t l = 0; l < sizeof(lin) / sizeof(lin[0]); l++) {
            const struct dsv32_weight *w = lin[l].w;
            char shape[64];
            snprintf(shape, sizeof(shape), "%lld x %lld", (long long)w->rows, (long long)w->cols);
            OP_TIME_QUEUED(t, be->ops->linear(be, y, (int)w->rows, x, (int)w->cols, R, w, 1));
            op_row(lin[l].name, shape, R, weight_bytes(w) + (double)R * (w->rows + w->cols) * 4,
                   2.0 * R * w->rows * w->cols, 1, t);
            { /* the same, each kernel launched after the one before */
                char name[96];
                snprintf(name, sizeof(name),
                         "%s, without programmatic dependent launch (knob fp8_pdl 0)", lin[l].name);
                MUST(dsv32_cuda_set_knob(be, "fp8_pdl", 0));
                OP_TIME_QUEUED(t, be->ops->linear(be, y, (int)w->rows, x, (int)w->cols, R, w, 1));
                MUST(dsv32_cuda_set_knob(be, "fp8_pdl", 1));
                op_row(name, shape, R, weight_bytes(w) + (double)R * (w->rows + w->cols) * 4,
                       2.0 * R * w->rows * w->cols, 1, t);
            }
            int lt_min, lt_big;
            MUST(dsv32_cuda_get_knob(be, "lt_min_rows", &lt_min));
            MUST(dsv32_cuda_get_knob(be, "lt_big_rows", &lt_big));
            for (int v = 0; R < lt_min && v < 2; v++) { /* below the threshold: each path forced */
                char name[96];
                const int from = v ? 1 : 1 << 30;
                snprintf(name, sizeof(name), "%s, %s", lin[l].name,
                         v ? "cuBLASLt (knobs lt_min_rows, lt_big_rows 1)" : "the mma.sync kernel (exact products)");
                MUST(dsv32_cuda_set_knob(be, "lt_min_rows", from));
                MUST(dsv32_cuda_set_knob(be, "lt_big_rows", from));
                OP_TIME_QUEUED(t, be->ops->linear(be, y, (int)w->rows, x, (int)w->cols, R, w, 1));
                MUST(dsv32_cuda_set_knob(be, "lt_min_rows", lt_min));
                MUST(dsv32_cuda_set_knob(be, "lt_big_rows", lt_big));
                op_row(name, shape, R, weight_bytes(w) + (double)R * (w->rows + w->cols) * 4,
                       2.0 * R * w->rows * w->cols, 1, t);
            }
        }
        /* absorb and expand: bf16 batched GEMMs on wkv_b's bf16 copy (its half each: rows x cols
         * bytes) */
        OP_TIME_QUEUED(t, be->ops->mla_absorb(be, y, x, R, &wkv_b));
        op_row("MLA absorb (q_nope -> latent)", "128 heads x 128 -> 512", R,
               (double)wkv_b.rows * wkv_b.cols + (double)R * H * (192 + 512) * 4, 2.0 * R * H * 128 * 512, 0, t);
        OP_TIME_QUEUED(t, be->ops->mla_expand(be, y, x, R, &wkv_b));
        op_row("MLA expand (latent -> v)", "128 heads x 512 -> 128", R,
               (double)wkv_b.rows * wkv_b.cols + (double)R * H * (512 + 128) * 4, 2.0 * R * H * 512 * 128, 0, t);
        for (int v = 0; v < 2; v++) { /* v 1: the shared-memory routing kernel (the baseline) */
            MUST(dsv32_cuda_set_knob(be, "route_smem", v));
            OP_TIME_QUEUED(t, be->ops->moe_gate(be, eids, gw, x, R, &gate, &gate_bias));
            op_row(v ? "MoE router, shared-memory routing (knob route_smem)"
                     : "MoE router (bf16 gate, group-limited top-8)",
                   "256 x 7168", R, weight_bytes(&gate) + (double)R * D * 4 + (double)R * K * 8,
                   2.0 * R * E * D, 0, t);
        }
        MUST(dsv32_cuda_set_knob(be, "route_smem", 0));
        fflush(stdout);
    }
    struct dsv32_weight *all[] = {&emb, &norm, &knw, &knb, &wq_a, &wq_b, &wkv_a, &wkv_b, &wo, &idx_wq_b, &gate, &gate_bias};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        be->ops->release_weight(be, all[i]);
    void *bufs[] = {x, y, z, q8, qs, gw, ids, eids, pos};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        be->ops->dealloc(be, bufs[i]);
}

int main(int argc, char **argv)
{
    const char *only = NULL, *csv_dir = NULL;
    int ctx_layer = 8192;
    /* a table row out before the backend's log lines (stderr) of the next measurement */
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv_dir = argv[++i];
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ctx-layer") && i + 1 < argc)
            ctx_layer = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
            only_rows = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--host-queue"))
            op_spin_us = 0;
        else if (!strcmp(argv[i], "--knob") && i + 1 < argc && n_knobs < 16 && strchr(argv[i + 1], '='))
            knobs[n_knobs++] = argv[++i];
        else {
            fprintf(stderr,
                    "usage: cuda_bench [--only dsa|dsa-quick|sweep|prefill|moe|layer|ops] [--csv "
                    "DIR] [--iters N] "
                    "[--ctx-layer N] [--rows N] [--host-queue] [--knob NAME=VALUE]...\n");
            return 2;
        }
    }
    if (iters < 1)
        iters = 1;
    static const char *const parts[] = {"dsa", "dsa-quick", "sweep", "prefill",
                                        "moe", "layer",     "ops"};
    int known = !only;
    for (size_t i = 0; only && i < sizeof(parts) / sizeof(parts[0]); i++)
        known |= !strcmp(only, parts[i]);
    if (!known) {
        fprintf(
            stderr,
            "cuda_bench: --only %s: not one of dsa, dsa-quick, sweep, prefill, moe, layer, ops\n",
            only);
        return 2;
    }
    if (dsv32_cuda_device_count() == 0) {
        fprintf(stderr, "cuda_bench: no GPU\n");
        return 77;
    }
    setenv("DSV32_CUDA_MATH", "fast", 1);
    struct dsv32_config cfg;
    cfg_v32(&cfg);
    struct dsv32_kv_geom g;
    dsv32_kv_geom_init(&g, &cfg, 0);
    struct dsv32_backend *be;
    MUST(dsv32_backend_new("cuda", &cfg, &g, 0, &be));
    apply_knobs(be);
    for (int i = 0; i < n_knobs; i++)
        printf("knob %s\n", knobs[i]);
    char name[256];
    int n_sm = 0;
    MUST(dsv32_cuda_device_info(be, name, sizeof(name), &n_sm));
    MUST(dsv32_cuda_copy_bandwidth(be, (size_t)2 << 30, 20, &copy_gbps));
    MUST(dsv32_cuda_bf16_gemm_rate(be, 8192, 8192, 8192, 10, &bf16_tflops));
    printf("# cuda_bench on %s (%d SMs)\n", name, n_sm);
    printf("ceilings measured now: device-to-device copy %.0f GB/s (read + write), cuBLAS bf16 GEMM 8192^3 "
           "%.0f TFLOP/s\n",
           copy_gbps, bf16_tflops);
    printf("%s\n", dsv32_cuda_lt_status(be));
    fflush(stdout);
    const int all = !only;
    if (all || !strcmp(only, "dsa") || !strcmp(only, "sweep"))
        bench_dsa(be, csv_dir, all || !strcmp(only, "dsa"), all || !strcmp(only, "sweep"));
    if (!all && !strcmp(only, "dsa-quick"))
        bench_dsa_quick(be);
    if (all || !strcmp(only, "prefill"))
        bench_prefill(be);
    if (all || !strcmp(only, "moe"))
        bench_moe(be);
    if (all || !strcmp(only, "layer"))
        bench_layer(be, ctx_layer);
    if (all || !strcmp(only, "ops"))
        bench_ops(be);
    dsv32_backend_free(be);
    return 0;
}
