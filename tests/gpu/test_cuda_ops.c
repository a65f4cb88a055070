/* GPU tests of the cuda backend: every op of backend.h against the cpu backend (the readable
 * reference) on fresh random inputs, at the tiny models' shapes and at DeepSeek-V3.2's real
 * dimensions, in both numerics modes of the cuda backend (exact and fast). Outputs are poisoned
 * (NaN) before each run so that an unwritten element fails. Comparisons are relative L2 errors
 * per row, or exact where both backends run the same arithmetic (FP8 quantization of the same
 * values, Hadamard, cache stores). Where an FP8 quantization sits downstream of arithmetic that
 * differs in summation order (the experts' intermediate activations), a row may differ at an e4m3
 * rounding midpoint: such rows are excused only when the FP8 tie probe reported a near-tie in
 * that row, and counted. Indexer selections are checked against scores recomputed in double:
 * a position may differ from the cpu's choice only when its score is within a tolerance of the
 * k-th score.
 *   test_cuda_ops [--seed N] [--only NAME]     exit 77 when no GPU is present
 *   test_cuda_ops --probe                      exit 0 with a GPU, 77 without (ctest wrappers) */
#include "backend.h"
#include "cuda/cuda_backend.h"
#include "dtype.h"
#include "error.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int n_fail, n_checks;
static const char *only;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        n_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            n_fail++;                                                                              \
            printf("  FAIL %s:%d: ", __FILE__, __LINE__);                                          \
            printf(__VA_ARGS__);                                                                   \
            printf("\n");                                                                          \
        }                                                                                          \
    } while (0)

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int r_ = (expr);                                                                           \
        if (r_ < 0) {                                                                              \
            printf("  FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #expr, dsv32_strerror(r_));       \
            n_fail++;                                                                              \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* ---- random numbers ---- */

static uint64_t rng_state;
static uint64_t rnd64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rnd_u(void) { return (double)(rnd64() >> 11) * (1.0 / 9007199254740992.0); }
static float rnd_n(void)
{
    double u1 = rnd_u() + 1e-300, u2 = rnd_u();
    return (float)(sqrt(-2.0 * log(u1)) * cos(2 * M_PI * u2));
}
static int rnd_int(int n) { return (int)(rnd64() % (uint64_t)n); }
static uint8_t rnd_e4m3(float scale) { return dsv32_f32_to_fp8(rnd_n() * scale); }

/* n random e4m3 bytes, fast: exponent field below 8 (|v| < 2), never NaN */
static void rnd_e4m3_fill(uint8_t *q, size_t n)
{
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = rnd64() & 0xbfbfbfbfbfbfbfbfull;
        for (size_t j = 0; j < 8 && i + j < n; j++)
            q[i + j] = (uint8_t)(r >> (8 * j));
    }
}

static float *rnd_f32(size_t n, float scale)
{
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        p[i] = rnd_n() * scale;
    return p;
}

/* ---- comparisons ---- */

static double rel_l2(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        if (isnan(a[i]) || isnan(b[i]))
            return INFINITY;
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* max over rows of the per-row relative error */
static double rel_rows(const float *a, const float *b, int rows, int cols, int *worst)
{
    double m = 0;
    for (int r = 0; r < rows; r++) {
        double e = rel_l2(a + (size_t)r * cols, b + (size_t)r * cols, (size_t)cols);
        if (e > m || isnan(e)) {
            m = e;
            if (worst)
                *worst = r;
        }
    }
    return m;
}

static void report(const char *what, double err, double tol)
{
    printf("  %-58s rel err %.2e (tol %.0e) %s\n", what, err, tol, err <= tol ? "ok" : "FAIL");
    CHECK(err <= tol, "%s: %.3e > %.0e", what, err, tol);
}

/* ---- backends and buffers ---- */

struct pair {
    struct dsv32_backend *cpu, *gpu;
};

static void *dev_put(struct dsv32_backend *be, const void *h, size_t bytes)
{
    void *d = be->ops->alloc(be, bytes ? bytes : 4);
    if (d && bytes && be->ops->to_device(be, d, h, bytes) < 0)
        return NULL;
    return d;
}

static void *dev_nan(struct dsv32_backend *be, size_t bytes)
{
    void *d = be->ops->alloc(be, bytes ? bytes : 4);
    void *h = malloc(bytes ? bytes : 4);
    memset(h, 0xff, bytes ? bytes : 4); /* f32 NaN, byte 0xff (e4m3 NaN) */
    if (d)
        be->ops->to_device(be, d, h, bytes);
    free(h);
    return d;
}

static void dev_get(struct dsv32_backend *be, void *h, const void *d, size_t bytes)
{
    be->ops->to_host(be, h, d, bytes);
}

static void dev_free(struct dsv32_backend *be, void *d)
{
    if (d)
        be->ops->dealloc(be, d);
}

/* a weight with host data; each backend prepares its own copy of the struct */
struct tw {
    struct dsv32_weight w, wc, wg;
    void *data;
    float *scale;
};

static void tw_make(struct tw *t, enum dsv32_dtype dt, int64_t rows, int64_t cols, float std, int pow2_scales)
{
    memset(t, 0, sizeof(*t));
    const size_t n = (size_t)(rows * cols);
    t->w.name = "test";
    t->w.dtype = dt;
    t->w.rows = rows;
    t->w.cols = cols;
    if (dt == DSV32_DT_F8_E4M3) {
        uint8_t *q = malloc(n);
        rnd_e4m3_fill(q, n);
        const size_t ns = (size_t)((rows + 127) / 128) * (size_t)((cols + 127) / 128);
        t->scale = malloc(sizeof(float) * ns);
        int ex;
        frexpf(std, &ex);
        for (size_t i = 0; i < ns; i++)
            t->scale[i] = pow2_scales ? ldexpf(1.0f, ex + 1 - rnd_int(3)) : 2.0f * std * (float)(0.5 + rnd_u());
        t->data = q;
        t->w.scale = t->scale;
    } else if (dt == DSV32_DT_BF16) {
        uint16_t *h = malloc(2 * n);
        for (size_t i = 0; i < n; i++)
            h[i] = dsv32_f32_to_bf16(std < 0 ? 1.0f : rnd_n() * std);
        t->data = h;
    } else {
        float *f = malloc(4 * n);
        for (size_t i = 0; i < n; i++)
            f[i] = std < 0 ? 1.0f + 0.1f * rnd_n() : rnd_n() * std;
        t->data = f;
    }
    t->w.data = t->data;
    t->wc = t->w;
    t->wg = t->w;
}

static int tw_prepare(struct tw *t, struct pair *p)
{
    int r = p->cpu->ops->prepare_weight(p->cpu, &t->wc);
    return r < 0 ? r : p->gpu->ops->prepare_weight(p->gpu, &t->wg);
}

static void tw_done(struct tw *t, struct pair *p)
{
    p->cpu->ops->release_weight(p->cpu, &t->wc);
    p->gpu->ops->release_weight(p->gpu, &t->wg);
    free(t->data);
    free(t->scale);
}

/* ---- configurations ---- */

static void cfg_tiny(struct dsv32_config *c)
{
    memset(c, 0, sizeof(*c));
    c->vocab_size = 1024;
    c->hidden_size = 256;
    c->moe_intermediate_size = 128;
    c->num_attention_heads = 8;
    c->n_routed_experts = 16;
    c->num_experts_per_tok = 4;
    c->n_group = 4;
    c->topk_group = 2;
    c->routed_scaling_factor = 2.5f;
    c->norm_topk_prob = 1;
    c->scoring_sigmoid = 1;
    c->q_lora_rank = 128;
    c->kv_lora_rank = 128;
    c->qk_nope_head_dim = 64;
    c->qk_rope_head_dim = 64;
    c->v_head_dim = 64;
    c->index_n_heads = 16;
    c->index_head_dim = 128;
    c->index_topk = 16;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0;
    c->yarn = 1;
    c->rope_factor = 40;
    c->original_max_position_embeddings = 128;
    c->beta_fast = 32;
    c->beta_slow = 1;
    c->mscale = c->mscale_all_dim = 1;
    c->max_position_embeddings = 8192;
}

static void cfg_v32(struct dsv32_config *c)
{
    cfg_tiny(c);
    c->vocab_size = 129280;
    c->hidden_size = 7168;
    c->moe_intermediate_size = 2048;
    c->num_attention_heads = 128;
    c->n_routed_experts = 256;
    c->num_experts_per_tok = 8;
    c->n_group = 8;
    c->topk_group = 4;
    c->q_lora_rank = 1536;
    c->kv_lora_rank = 512;
    c->qk_nope_head_dim = 128;
    c->v_head_dim = 128;
    c->index_n_heads = 64;
    c->index_topk = 2048;
    c->rope_factor = 40;
    c->original_max_position_embeddings = 4096;
    c->max_position_embeddings = 32768;
}

static int pair_new(struct pair *p, const struct dsv32_config *cfg, int rope_f32, int fast)
{
    struct dsv32_kv_geom g;
    dsv32_kv_geom_init(&g, cfg, rope_f32);
    setenv("DSV32_CUDA_MATH", fast ? "fast" : "exact", 1);
    int r = dsv32_backend_new("cpu", cfg, &g, &p->cpu);
    if (r == 0)
        r = dsv32_backend_new("cuda", cfg, &g, &p->gpu);
    return r;
}

static void pair_free(struct pair *p)
{
    dsv32_backend_free(p->cpu);
    dsv32_backend_free(p->gpu);
}

/* ---- step metadata on both backends ---- */

struct tmeta {
    struct dsv32_step_meta hm, dm; /* cpu view (host pointers everywhere), cuda view */
    int32_t *pos, *seq, *blocks;
    int64_t *slot;
    uint8_t *mha;
    void *d[5];
};

/* rows: positions pos[r] of sequences seq[r]; block tables: a random permutation of n_blocks */
static void tmeta_make(struct tmeta *t, struct pair *p, int n_rows, const int32_t *pos, const int32_t *seq,
                       int n_seqs, int max_blocks, int n_blocks, const uint8_t *mha)
{
    memset(t, 0, sizeof(*t));
    t->pos = malloc(sizeof(int32_t) * n_rows);
    t->seq = malloc(sizeof(int32_t) * n_rows);
    t->slot = malloc(sizeof(int64_t) * n_rows);
    t->mha = calloc((size_t)n_rows, 1);
    t->blocks = malloc(sizeof(int32_t) * (size_t)n_seqs * max_blocks);
    int32_t *perm = malloc(sizeof(int32_t) * n_blocks);
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = rnd_int(i + 1), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    for (int i = 0; i < n_seqs * max_blocks; i++)
        t->blocks[i] = perm[i % n_blocks];
    free(perm);
    int max_ctx = 0, n_mha = 0;
    for (int r = 0; r < n_rows; r++) {
        t->pos[r] = pos[r];
        t->seq[r] = seq[r];
        t->mha[r] = mha ? mha[r] : 0;
        n_mha += t->mha[r];
        t->slot[r] = (int64_t)t->blocks[(size_t)seq[r] * max_blocks + pos[r] / 64] * 64 + pos[r] % 64;
        if (pos[r] + 1 > max_ctx)
            max_ctx = pos[r] + 1;
    }
    struct dsv32_step_meta m = {.n_rows = n_rows, .n_seqs = n_seqs, .max_blocks = max_blocks,
                                .n_mha_rows = n_mha, .max_ctx = max_ctx};
    m.h_row_pos = m.d_row_pos = t->pos;
    m.h_row_seq = m.d_row_seq = t->seq;
    m.h_blocks = m.d_blocks = t->blocks;
    m.h_row_slot = m.d_row_slot = t->slot;
    m.h_row_mha = m.d_row_mha = t->mha;
    t->hm = m;
    t->d[0] = dev_put(p->gpu, t->pos, sizeof(int32_t) * n_rows);
    t->d[1] = dev_put(p->gpu, t->seq, sizeof(int32_t) * n_rows);
    t->d[2] = dev_put(p->gpu, t->blocks, sizeof(int32_t) * (size_t)n_seqs * max_blocks);
    t->d[3] = dev_put(p->gpu, t->slot, sizeof(int64_t) * n_rows);
    t->d[4] = dev_put(p->gpu, t->mha, (size_t)n_rows);
    m.d_row_pos = t->d[0];
    m.d_row_seq = t->d[1];
    m.d_blocks = t->d[2];
    m.d_row_slot = t->d[3];
    m.d_row_mha = t->d[4];
    t->dm = m;
}

static void tmeta_done(struct tmeta *t, struct pair *p)
{
    for (int i = 0; i < 5; i++)
        dev_free(p->gpu, t->d[i]);
    free(t->pos);
    free(t->seq);
    free(t->slot);
    free(t->mha);
    free(t->blocks);
}

/* random cache contents, the same bytes in both backends' memory */
struct tcache {
    struct dsv32_kv_layer c, g;
    uint8_t *h_mla, *h_idx;
    size_t mla_bytes, idx_bytes;
};

static void tcache_make(struct tcache *t, struct pair *p, int n_blocks, int pow2_scales)
{
    const struct dsv32_kv_geom *g = &p->cpu->geom;
    t->mla_bytes = (size_t)n_blocks * 64 * g->mla_rec_bytes;
    t->idx_bytes = (size_t)n_blocks * g->idx_block_bytes;
    t->h_mla = malloc(t->mla_bytes);
    t->h_idx = malloc(t->idx_bytes);
    for (size_t s = 0; s < (size_t)n_blocks * 64; s++) {
        uint8_t *rec = t->h_mla + s * g->mla_rec_bytes;
        rnd_e4m3_fill(rec, (size_t)g->kv_lora);
        for (int b = 0; b < g->kv_lora / 128; b++) {
            float sc = pow2_scales ? ldexpf(1.0f, -rnd_int(3)) : (float)(0.5 + rnd_u());
            memcpy(rec + g->kv_lora + 4 * b, &sc, 4);
        }
        uint8_t *pr = rec + g->kv_lora + 4 * (g->kv_lora / 128);
        for (int i = 0; i < g->rope; i++) {
            float v = rnd_n();
            if (g->rope_f32) {
                memcpy(pr + 4 * i, &v, 4);
            } else {
                uint16_t h = dsv32_f32_to_bf16(v);
                memcpy(pr + 2 * i, &h, 2);
            }
        }
    }
    for (int b = 0; b < n_blocks; b++) {
        uint8_t *blk = t->h_idx + (size_t)b * g->idx_block_bytes;
        rnd_e4m3_fill(blk, 64 * 128);
        for (int i = 0; i < 64; i++) {
            float sc = (float)(0.5 + rnd_u());
            memcpy(blk + 64 * 128 + 4 * i, &sc, 4);
        }
    }
    t->c.mla = malloc(t->mla_bytes);
    t->c.idx = malloc(t->idx_bytes);
    memcpy(t->c.mla, t->h_mla, t->mla_bytes);
    memcpy(t->c.idx, t->h_idx, t->idx_bytes);
    t->g.mla = dev_put(p->gpu, t->h_mla, t->mla_bytes);
    t->g.idx = dev_put(p->gpu, t->h_idx, t->idx_bytes);
}

static void tcache_done(struct tcache *t, struct pair *p)
{
    free(t->c.mla);
    free(t->c.idx);
    dev_free(p->gpu, t->g.mla);
    dev_free(p->gpu, t->g.idx);
    free(t->h_mla);
    free(t->h_idx);
}

static int want(const char *name)
{
    if (only && !strstr(name, only))
        return 0;
    printf("== %s\n", name);
    return 1;
}

/* ---- small ops ---- */

static void test_small_ops(void)
{
    if (!want("small ops (exact): rmsnorm, layernorm, add, silu_mul, rope, embed, gather"))
        return;
    struct dsv32_config cfg;
    cfg_v32(&cfg);
    struct pair p;
    TRY(pair_new(&p, &cfg, 0, 0));
    const int rows = 37, D = 7168;
    float *x = rnd_f32((size_t)rows * D, 3.0f), *yc = malloc(sizeof(float) * rows * D), *yg = malloc(sizeof(float) * rows * D);
    float *dx = dev_put(p.gpu, x, sizeof(float) * rows * D), *dy = dev_nan(p.gpu, sizeof(float) * rows * D);
    struct tw g, b;
    tw_make(&g, DSV32_DT_BF16, 1, D, -1, 0);
    tw_make(&b, DSV32_DT_F32, 1, D, 0.5f, 0);
    TRY(tw_prepare(&g, &p));
    TRY(tw_prepare(&b, &p));
    p.cpu->ops->rmsnorm(p.cpu, yc, D, x, D, &g.wc, rows, D, 1e-6f);
    TRY(p.gpu->ops->rmsnorm(p.gpu, dy, D, dx, D, &g.wg, rows, D, 1e-6f));
    dev_get(p.gpu, yg, dy, sizeof(float) * rows * D);
    report("rmsnorm 37 x 7168", rel_rows(yg, yc, rows, D, NULL), 1e-6);
    /* layernorm in place over 128 of a wider row (the indexer's k) */
    p.cpu->ops->layernorm(p.cpu, yc, D, x, D, &g.wc, &b.wc, rows, 128, 1e-6f);
    TRY(p.gpu->ops->layernorm(p.gpu, dy, D, dx, D, &g.wg, &b.wg, rows, 128, 1e-6f));
    float *tmpc = malloc(sizeof(float) * rows * 128), *tmpg = malloc(sizeof(float) * rows * 128);
    dev_get(p.gpu, yg, dy, sizeof(float) * rows * D);
    for (int r = 0; r < rows; r++) {
        memcpy(tmpc + r * 128, yc + (size_t)r * D, 512);
        memcpy(tmpg + r * 128, yg + (size_t)r * D, 512);
    }
    report("layernorm 37 x 128 (row stride 7168)", rel_rows(tmpg, tmpc, rows, 128, NULL), 1e-6);
    /* add, silu_mul */
    float *u = rnd_f32((size_t)rows * D, 2.0f);
    float *du = dev_put(p.gpu, u, sizeof(float) * rows * D);
    memcpy(yc, x, sizeof(float) * rows * D);
    p.cpu->ops->add(p.cpu, yc, u, (size_t)rows * D);
    TRY(p.gpu->ops->add(p.gpu, dx, du, (size_t)rows * D));
    dev_get(p.gpu, yg, dx, sizeof(float) * rows * D);
    report("add", rel_l2(yg, yc, (size_t)rows * D), 0);
    p.cpu->ops->silu_mul(p.cpu, yc, x, u, rows, D);
    TRY(p.gpu->ops->to_device(p.gpu, dx, x, sizeof(float) * rows * D));
    TRY(p.gpu->ops->silu_mul(p.gpu, dy, dx, du, rows, D));
    dev_get(p.gpu, yg, dy, sizeof(float) * rows * D);
    report("silu_mul (expf may differ by an ulp)", rel_l2(yg, yc, (size_t)rows * D), 1e-6);
    /* rope, both layouts, on a (rows, heads, 192) tensor's rope part */
    const int H = 16, W = 192;
    int32_t *pos = malloc(sizeof(int32_t) * rows);
    for (int r = 0; r < rows; r++)
        pos[r] = rnd_int(cfg.max_position_embeddings);
    int32_t *dpos = dev_put(p.gpu, pos, sizeof(int32_t) * rows);
    for (int inter = 0; inter < 2; inter++) {
        float *q = rnd_f32((size_t)rows * H * W, 1.0f), *qg = malloc(sizeof(float) * rows * H * W);
        float *dq = dev_put(p.gpu, q, sizeof(float) * rows * H * W);
        p.cpu->ops->rope(p.cpu, q + 128, rows, H, H * W, W, pos, inter);
        TRY(p.gpu->ops->rope(p.gpu, dq + 128, rows, H, H * W, W, dpos, inter));
        dev_get(p.gpu, qg, dq, sizeof(float) * rows * H * W);
        report(inter ? "rope interleaved (MLA)" : "rope half-split (indexer)", rel_l2(qg, q, (size_t)rows * H * W), 0);
        free(q);
        free(qg);
        dev_free(p.gpu, dq);
    }
    /* embed and gather */
    struct tw emb;
    tw_make(&emb, DSV32_DT_BF16, 1000, 256, 1.0f, 0);
    TRY(tw_prepare(&emb, &p));
    int32_t ids[40];
    for (int i = 0; i < 40; i++)
        ids[i] = rnd_int(1000);
    int32_t *dids = dev_put(p.gpu, ids, sizeof(ids));
    p.cpu->ops->embed(p.cpu, yc, ids, 40, &emb.wc);
    TRY(p.gpu->ops->embed(p.gpu, dy, dids, 40, &emb.wg));
    dev_get(p.gpu, yg, dy, sizeof(float) * 40 * 256);
    report("embed (bf16 table)", rel_l2(yg, yc, 40 * 256), 0);
    int32_t idx[9] = {3, 0, 36, 5, 5, 17, 2, 30, 1};
    int32_t *didx = dev_put(p.gpu, idx, sizeof(idx));
    p.cpu->ops->gather_rows(p.cpu, yc, x, idx, 9, D);
    TRY(p.gpu->ops->gather_rows(p.gpu, dy, dx, didx, 9, D));
    dev_get(p.gpu, yg, dy, sizeof(float) * 9 * D);
    report("gather_rows", rel_l2(yg, yc, (size_t)9 * D), 0);
    tw_done(&emb, &p);
    tw_done(&g, &p);
    tw_done(&b, &p);
    dev_free(p.gpu, dx);
    dev_free(p.gpu, dy);
    dev_free(p.gpu, du);
    dev_free(p.gpu, dpos);
    dev_free(p.gpu, dids);
    dev_free(p.gpu, didx);
    free(x);
    free(u);
    free(yc);
    free(yg);
    free(tmpc);
    free(tmpg);
    free(pos);
    pair_free(&p);
}

/* ---- FP8 quantization: Hadamard, cache stores, the tie probe ---- */

struct near_log {
    struct dsv32_fp8_key k[4096];
    int n;
};

static void on_near(void *ctx, const struct dsv32_fp8_key *k, float v)
{
    struct near_log *l = ctx;
    if (l->n < 4096)
        l->k[l->n++] = *k;
}

static int key_cmp_q(const void *a, const void *b) { return dsv32_fp8_key_cmp(a, b); }

static void test_quant(void)
{
    if (!want("FP8 quantization (exact): hadamard_quant, kv_store, index_store, tie probe"))
        return;
    for (int ue = 0; ue < 2; ue++) {
        struct dsv32_config cfg;
        cfg_v32(&cfg);
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, 0));
        const int n = 517;
        float *x = rnd_f32((size_t)n * 128, 2.0f);
        for (int i = 0; i < 128; i++)
            x[i] = 0.0f; /* an all-zero vector: amax clamps to 1e-4 */
        uint8_t *qc = malloc((size_t)n * 128), *qg = malloc((size_t)n * 128);
        float *sc = malloc(sizeof(float) * n), *sg = malloc(sizeof(float) * n);
        float *dx = dev_put(p.gpu, x, sizeof(float) * n * 128);
        uint8_t *dq = dev_nan(p.gpu, (size_t)n * 128);
        float *ds = dev_nan(p.gpu, sizeof(float) * n);
        p.cpu->ops->hadamard_quant(p.cpu, qc, sc, x, n, ue);
        TRY(p.gpu->ops->hadamard_quant(p.gpu, dq, ds, dx, n, ue));
        dev_get(p.gpu, qg, dq, (size_t)n * 128);
        dev_get(p.gpu, sg, ds, sizeof(float) * n);
        int bad = 0, bads = 0;
        for (int i = 0; i < n * 128; i++)
            bad += qc[i] != qg[i];
        for (int i = 0; i < n; i++)
            bads += memcmp(&sc[i], &sg[i], 4) != 0;
        printf("  hadamard_quant %d x 128 ue8m0=%d: %d bytes and %d scales differ (bit-exact expected) %s\n",
               n, ue, bad, bads, bad || bads ? "FAIL" : "ok");
        CHECK(bad == 0 && bads == 0, "hadamard_quant differs");
        free(qc);
        free(qg);
        free(sc);
        free(sg);
        dev_free(p.gpu, dq);
        dev_free(p.gpu, ds);
        dev_free(p.gpu, dx);
        free(x);
        pair_free(&p);
    }
    /* kv_store + index_store, both layouts: the bytes of the caches must be equal */
    for (int rope_f32 = 0; rope_f32 < 2; rope_f32++) {
        struct dsv32_config cfg;
        cfg_v32(&cfg);
        struct pair p;
        TRY(pair_new(&p, &cfg, rope_f32, 0));
        const int n_blocks = 8, rows = 100, C = 512, R = 64;
        struct tcache tc;
        tcache_make(&tc, &p, n_blocks, 1);
        int32_t pos[100], seq[100];
        for (int r = 0; r < rows; r++) {
            seq[r] = r % 4;
            pos[r] = r / 4 + 30 * (r % 4); /* distinct slots */
        }
        struct tmeta tm;
        tmeta_make(&tm, &p, rows, pos, seq, 4, 2, n_blocks, NULL);
        float *lat = rnd_f32((size_t)rows * (C + R), 1.5f);
        uint8_t *k8 = malloc((size_t)rows * 128);
        float *ks = malloc(sizeof(float) * rows);
        for (int i = 0; i < rows * 128; i++)
            k8[i] = rnd_e4m3(10);
        for (int i = 0; i < rows; i++)
            ks[i] = (float)rnd_u();
        float *dl = dev_put(p.gpu, lat, sizeof(float) * rows * (C + R));
        uint8_t *dk = dev_put(p.gpu, k8, (size_t)rows * 128);
        float *dks = dev_put(p.gpu, ks, sizeof(float) * rows);
        p.cpu->ops->kv_store(p.cpu, &tc.c, lat, C + R, lat + C, C + R, &tm.hm, 1);
        TRY(p.gpu->ops->kv_store(p.gpu, &tc.g, dl, C + R, dl + C, C + R, &tm.dm, 1));
        p.cpu->ops->index_store(p.cpu, &tc.c, k8, ks, &tm.hm);
        TRY(p.gpu->ops->index_store(p.gpu, &tc.g, dk, dks, &tm.dm));
        uint8_t *hm = malloc(tc.mla_bytes), *hi = malloc(tc.idx_bytes);
        dev_get(p.gpu, hm, tc.g.mla, tc.mla_bytes);
        dev_get(p.gpu, hi, tc.g.idx, tc.idx_bytes);
        size_t dm = 0, di = 0;
        for (size_t i = 0; i < tc.mla_bytes; i++)
            dm += hm[i] != tc.c.mla[i];
        for (size_t i = 0; i < tc.idx_bytes; i++)
            di += hi[i] != tc.c.idx[i];
        printf("  kv_store + index_store, rope %s: %zu MLA and %zu index cache bytes differ %s\n",
               rope_f32 ? "f32" : "bf16", dm, di, dm || di ? "FAIL" : "ok");
        CHECK(dm == 0 && di == 0, "cache stores differ");
        free(hm);
        free(hi);
        free(lat);
        free(k8);
        free(ks);
        dev_free(p.gpu, dl);
        dev_free(p.gpu, dk);
        dev_free(p.gpu, dks);
        tmeta_done(&tm, &p);
        tcache_done(&tc, &p);
        pair_free(&p);
    }
    /* the tie probe: latents placed exactly on e4m3 midpoints (block amax 448 -> scale 1) */
    {
        struct dsv32_config cfg;
        cfg_v32(&cfg);
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, 0));
        const int rows = 3, C = 512, R = 64, n_blocks = 2;
        struct tcache tc;
        tcache_make(&tc, &p, n_blocks, 1);
        int32_t pos[3] = {0, 1, 2}, seq[3] = {0, 0, 0};
        struct tmeta tm;
        tmeta_make(&tm, &p, rows, pos, seq, 1, 2, n_blocks, NULL);
        float *lat = rnd_f32((size_t)rows * (C + R), 10.0f);
        for (int r = 0; r < rows; r++)
            for (int b = 0; b < 4; b++) {
                lat[r * (C + R) + b * 128] = 448.0f;
                lat[r * (C + R) + b * 128 + 5 + r] = 232.0f;          /* 224 | 240 */
                lat[r * (C + R) + b * 128 + 40] = -1.0625f;           /* 1.0 | 1.125 */
            }
        float *dl = dev_put(p.gpu, lat, sizeof(float) * rows * (C + R));
        struct near_log lc = {.n = 0}, lg = {.n = 0};
        struct dsv32_fp8_probe probe = {.near_rel = 1e-6, .on_near = on_near, .ctx = &lc, .op = 7};
        dsv32_fp8_probe_cur = &probe;
        p.cpu->ops->kv_store(p.cpu, &tc.c, lat, C + R, lat + C, C + R, &tm.hm, 0);
        probe.ctx = &lg;
        int r = p.gpu->ops->kv_store(p.gpu, &tc.g, dl, C + R, dl + C, C + R, &tm.dm, 0);
        dsv32_fp8_probe_cur = NULL;
        TRY(r);
        qsort(lc.k, (size_t)lc.n, sizeof(lc.k[0]), key_cmp_q);
        qsort(lg.k, (size_t)lg.n, sizeof(lg.k[0]), key_cmp_q);
        int same = lc.n == lg.n && lc.n >= 24;
        for (int i = 0; same && i < lc.n; i++)
            same = dsv32_fp8_key_cmp(&lc.k[i], &lg.k[i]) == 0;
        printf("  probe: near-ties reported cpu %d, cuda %d (>= 24 planted), same keys: %s\n", lc.n, lg.n,
               same ? "ok" : "FAIL");
        CHECK(same, "probe reports differ");
        /* flip every reported tie: both backends must round them the other way */
        probe.flips = lc.k;
        probe.n_flips = lc.n;
        probe.on_near = NULL;
        uint8_t *before = malloc(tc.mla_bytes), *hg = malloc(tc.mla_bytes);
        memcpy(before, tc.c.mla, tc.mla_bytes);
        dsv32_fp8_probe_cur = &probe;
        p.cpu->ops->kv_store(p.cpu, &tc.c, lat, C + R, lat + C, C + R, &tm.hm, 0);
        r = p.gpu->ops->kv_store(p.gpu, &tc.g, dl, C + R, dl + C, C + R, &tm.dm, 0);
        dsv32_fp8_probe_cur = NULL;
        TRY(r);
        dev_get(p.gpu, hg, tc.g.mla, tc.mla_bytes);
        size_t changed = 0, differ = 0;
        for (size_t i = 0; i < tc.mla_bytes; i++) {
            changed += before[i] != tc.c.mla[i];
            differ += hg[i] != tc.c.mla[i];
        }
        printf("  probe flips: %zu cache bytes changed on the cpu (%d flipped), cuda differs in %zu %s\n", changed,
               lc.n, differ, changed == (size_t)lc.n && !differ ? "ok" : "FAIL");
        CHECK(changed == (size_t)lc.n && differ == 0, "probe flips differ");
        free(before);
        free(hg);
        free(lat);
        dev_free(p.gpu, dl);
        tmeta_done(&tm, &p);
        tcache_done(&tc, &p);
        pair_free(&p);
    }
}

/* ---- GEMMs ---- */

static void one_linear(struct pair *p, const char *what, enum dsv32_dtype dt, int out, int in, int rows, int ue,
                       double tol)
{
    struct tw w;
    tw_make(&w, dt, out, in, 0.05f, ue);
    if (tw_prepare(&w, p) < 0) {
        CHECK(0, "prepare %s", what);
        return;
    }
    float *x = rnd_f32((size_t)rows * (in + 7), 1.0f), *yc = malloc(sizeof(float) * rows * out),
          *yg = malloc(sizeof(float) * rows * out);
    float *dx = dev_put(p->gpu, x, sizeof(float) * rows * (in + 7)), *dy = dev_nan(p->gpu, sizeof(float) * rows * out);
    p->cpu->ops->linear(p->cpu, yc, out, x, in + 7, rows, &w.wc, ue);
    int r = p->gpu->ops->linear(p->gpu, dy, out, dx, in + 7, rows, &w.wg, ue);
    CHECK(r == 0, "%s: %s", what, dsv32_strerror(r));
    dev_get(p->gpu, yg, dy, sizeof(float) * rows * out);
    char buf[160];
    snprintf(buf, sizeof(buf), "%s %d x %d, %d rows%s", what, out, in, rows, ue ? " ue8m0" : "");
    report(buf, rel_rows(yg, yc, rows, out, NULL), tol);
    tw_done(&w, p);
    free(x);
    free(yc);
    free(yg);
    dev_free(p->gpu, dx);
    dev_free(p->gpu, dy);
}

static void test_gemm(void)
{
    if (!want("linear, mla_absorb, mla_expand (exact and fast)"))
        return;
    struct dsv32_config cfg;
    cfg_v32(&cfg);
    for (int fast = 0; fast < 2; fast++) {
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, fast));
        printf(" mode %s\n", fast ? "fast" : "exact");
        /* fast bf16: x rounded to bf16 (2^-9 relative) */
        one_linear(&p, "bf16 weight", DSV32_DT_BF16, 320, 512, 5, 0, fast ? 1e-2 : 1e-6);
        one_linear(&p, "bf16 weight", DSV32_DT_BF16, 576, 7168, 70, 0, fast ? 1e-2 : 1e-6);
        /* FP8: the same quantized x on both sides, exact products; only summation order differs
         * (the fast path's cuBLASLt for > 64 rows accumulates in the FP8 tensor core) */
        one_linear(&p, "FP8 weight", DSV32_DT_F8_E4M3, 576, 7168, 1, 1, 1e-5);
        one_linear(&p, "FP8 weight", DSV32_DT_F8_E4M3, 1536, 7168, 3, 1, 1e-5);
        one_linear(&p, "FP8 weight", DSV32_DT_F8_E4M3, 24576, 1536, 16, 0, 1e-5);
        one_linear(&p, "FP8 weight", DSV32_DT_F8_E4M3, 7168, 2048, 40, 1, 1e-5);
        one_linear(&p, "FP8 weight", DSV32_DT_F8_E4M3, 2048, 7168, 200, 1, fast ? 2e-3 : 1e-5);
        if (fast)
            printf("  %s\n", dsv32_cuda_lt_status(p.gpu));
        if (fast) {
            dsv32_cuda_set_knob(p.gpu, "lt_fp8", 0);
            one_linear(&p, "FP8 weight, kernel only", DSV32_DT_F8_E4M3, 2048, 7168, 200, 1, 1e-5);
            dsv32_cuda_set_knob(p.gpu, "lt_fp8", 1);
        }
        /* absorb / expand with the real wkv_b shape */
        const int H = 128, C = 512, nope = 128, V = 128, qk = 192, rows = 9;
        for (int dt = 0; dt < 2; dt++) {
            struct tw wkv;
            tw_make(&wkv, dt ? DSV32_DT_F8_E4M3 : DSV32_DT_BF16, H * (nope + V), C, 0.05f, 1);
            TRY(tw_prepare(&wkv, &p));
            float *q = rnd_f32((size_t)rows * H * qk, 1.0f), *lc = malloc(sizeof(float) * rows * H * C),
                  *lg = malloc(sizeof(float) * rows * H * C);
            float *dq = dev_put(p.gpu, q, sizeof(float) * rows * H * qk), *dl = dev_nan(p.gpu, sizeof(float) * rows * H * C);
            p.cpu->ops->mla_absorb(p.cpu, lc, q, rows, &wkv.wc);
            TRY(p.gpu->ops->mla_absorb(p.gpu, dl, dq, rows, &wkv.wg));
            dev_get(p.gpu, lg, dl, sizeof(float) * rows * H * C);
            report(dt ? "mla_absorb (FP8 wkv_b)" : "mla_absorb (bf16 wkv_b)", rel_rows(lg, lc, rows * H, C, NULL),
                   fast ? 1e-2 : 1e-5);
            float *lat = rnd_f32((size_t)rows * H * C, 1.0f), *oc = malloc(sizeof(float) * rows * H * V),
                  *og = malloc(sizeof(float) * rows * H * V);
            float *dlat = dev_put(p.gpu, lat, sizeof(float) * rows * H * C), *dout = dev_nan(p.gpu, sizeof(float) * rows * H * V);
            p.cpu->ops->mla_expand(p.cpu, oc, lat, rows, &wkv.wc);
            TRY(p.gpu->ops->mla_expand(p.gpu, dout, dlat, rows, &wkv.wg));
            dev_get(p.gpu, og, dout, sizeof(float) * rows * H * V);
            report(dt ? "mla_expand (FP8 wkv_b)" : "mla_expand (bf16 wkv_b)", rel_rows(og, oc, rows * H, V, NULL),
                   fast ? 1e-2 : 1e-5);
            tw_done(&wkv, &p);
            free(q);
            free(lc);
            free(lg);
            free(lat);
            free(oc);
            free(og);
            dev_free(p.gpu, dq);
            dev_free(p.gpu, dl);
            dev_free(p.gpu, dlat);
            dev_free(p.gpu, dout);
        }
        pair_free(&p);
    }
}

/* ---- the indexer ---- */

/* scores in double from the cache bytes, as the reference defines them */
static void idx_scores_ref(double *s, const struct tcache *tc, const struct tmeta *tm, int r, const uint8_t *q,
                           const float *qs, const float *wr, int IH)
{
    const float wscale = (float)pow((double)IH, -0.5), sscale = (float)pow(128.0, -0.5);
    const int pos = tm->pos[r], seq = tm->seq[r];
    const int max_blocks = tm->hm.max_blocks;
    for (int j = 0; j <= pos; j++) {
        const int blk = tm->blocks[(size_t)seq * max_blocks + j / 64], off = j % 64;
        const uint8_t *b = tc->h_idx + (size_t)blk * (64 * 132);
        float ks;
        memcpy(&ks, b + 64 * 128 + 4 * off, 4);
        double acc = 0;
        for (int h = 0; h < IH; h++) {
            double d = 0;
            for (int i = 0; i < 128; i++)
                d += (double)dsv32_fp8_to_f32(q[((size_t)r * IH + h) * 128 + i]) * dsv32_fp8_to_f32(b[off * 128 + i]);
            const float w = wr[(size_t)r * IH + h] * wscale * qs[(size_t)r * IH + h] * sscale;
            acc += (d > 0 ? d : 0) * w;
        }
        s[j] = acc * ks;
    }
}

static int cmp_dbl_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* checks one row's selection against the double scores; returns the positions outside the
 * tie band that are wrongly in or out, and counts in-band differences to the other selection */
static int check_sel(const int32_t *sel, const int32_t *other, const double *s, int n, int k, double rel_tol,
                     int *band_diff)
{
    int bad = 0;
    const int kk = n < k ? n : k;
    for (int i = 0; i < k; i++) {
        if (i < kk) {
            if (sel[i] < 0 || sel[i] >= n || (i && sel[i] <= sel[i - 1]))
                bad++;
        } else if (sel[i] != -1) {
            bad++;
        }
    }
    if (bad || n <= k)
        return bad;
    double *srt = malloc(sizeof(double) * n), mx = 0;
    memcpy(srt, s, sizeof(double) * n);
    qsort(srt, (size_t)n, sizeof(double), cmp_dbl_desc);
    for (int j = 0; j < n; j++)
        mx = fmax(mx, fabs(s[j]));
    const double tau = srt[k - 1], tol = rel_tol * mx;
    char *in = calloc((size_t)n, 1), *in2 = calloc((size_t)n, 1);
    for (int i = 0; i < k; i++) {
        in[sel[i]] = 1;
        if (other[i] >= 0 && other[i] < n)
            in2[other[i]] = 1;
    }
    for (int j = 0; j < n; j++) {
        if (in[j] && s[j] < tau - tol)
            bad++;
        if (!in[j] && s[j] > tau + tol)
            bad++;
        if (in[j] != in2[j]) {
            if (fabs(s[j] - tau) <= tol)
                (*band_diff)++;
            else
                bad++;
        }
    }
    free(srt);
    free(in);
    free(in2);
    return bad;
}

static void indexer_case(struct pair *p, const char *what, int n_rows, const int32_t *pos, const int32_t *seq,
                         int n_seqs, int max_blocks, int n_blocks, double rel_tol)
{
    const int IH = p->cpu->cfg->index_n_heads, K = p->cpu->cfg->index_topk;
    struct tcache tc;
    tcache_make(&tc, p, n_blocks, 1);
    struct tmeta tm;
    tmeta_make(&tm, p, n_rows, pos, seq, n_seqs, max_blocks, n_blocks, NULL);
    uint8_t *q = malloc((size_t)n_rows * IH * 128);
    float *qs = malloc(sizeof(float) * n_rows * IH), *wr = rnd_f32((size_t)n_rows * IH, 1.0f);
    for (size_t i = 0; i < (size_t)n_rows * IH * 128; i++)
        q[i] = rnd_e4m3(64.0f);
    for (int i = 0; i < n_rows * IH; i++)
        qs[i] = (float)(0.001 + 0.01 * rnd_u());
    int32_t *sc = malloc(sizeof(int32_t) * n_rows * K), *sg = malloc(sizeof(int32_t) * n_rows * K);
    uint8_t *dq = dev_put(p->gpu, q, (size_t)n_rows * IH * 128);
    float *dqs = dev_put(p->gpu, qs, sizeof(float) * n_rows * IH), *dwr = dev_put(p->gpu, wr, sizeof(float) * n_rows * IH);
    int32_t *dsel = dev_nan(p->gpu, sizeof(int32_t) * n_rows * K);
    p->cpu->ops->indexer(p->cpu, sc, q, qs, wr, &tc.c, &tm.hm, K);
    int r = p->gpu->ops->indexer(p->gpu, dsel, dq, dqs, dwr, &tc.g, &tm.dm, K);
    CHECK(r == 0, "indexer: %s", dsv32_strerror(r));
    dev_get(p->gpu, sg, dsel, sizeof(int32_t) * n_rows * K);
    int bad = 0, bad_cpu = 0, band = 0, band_cpu = 0, rows_checked = 0, exact_rows = 0;
    for (int i = 0; i < n_rows; i++) {
        /* rows checked in full: all when few, else a sample (the double recomputation is slow) */
        if (n_rows > 24 && i % (n_rows / 24) != 0)
            continue;
        const int n = pos[i] + 1;
        double *s = malloc(sizeof(double) * n);
        idx_scores_ref(s, &tc, &tm, i, q, qs, wr, IH);
        bad += check_sel(sg + (size_t)i * K, sc + (size_t)i * K, s, n, K, rel_tol, &band);
        bad_cpu += check_sel(sc + (size_t)i * K, sg + (size_t)i * K, s, n, K, 1e-6, &band_cpu);
        exact_rows += memcmp(sg + (size_t)i * K, sc + (size_t)i * K, sizeof(int32_t) * K) == 0;
        rows_checked++;
        free(s);
    }
    printf("  %-44s rows %d checked %d: equal to cpu %d, in-band differences %d, errors %d (cpu %d) %s\n", what,
           n_rows, rows_checked, exact_rows, band, bad, bad_cpu, bad ? "FAIL" : "ok");
    CHECK(bad == 0, "%s: %d selection errors", what, bad);
    free(q);
    free(qs);
    free(wr);
    free(sc);
    free(sg);
    dev_free(p->gpu, dq);
    dev_free(p->gpu, dqs);
    dev_free(p->gpu, dwr);
    dev_free(p->gpu, dsel);
    tmeta_done(&tm, p);
    tcache_done(&tc, p);
}

static void test_indexer(void)
{
    if (!want("DSA indexer + top-k: decode and causal prefill, tiny and real dims"))
        return;
    for (int variant = 0; variant < 3; variant++) {
        /* 0: exact (f16 mma), 1: fast f16 mma, 2: fast FP8 mma */
        struct dsv32_config cfg;
        cfg_v32(&cfg);
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, variant > 0));
        dsv32_cuda_set_knob(p.gpu, "indexer_fp8", variant == 2);
        const double tol = variant == 2 ? 3e-3 : 2e-5;
        printf(" variant %s\n", variant == 0 ? "exact (f16 mma)" : variant == 1 ? "fast, f16 mma" : "fast, FP8 mma");
        /* decode: 12 sequences, 1 or 2 query rows each, contexts up to 9000 */
        int32_t pos[24], seq[24];
        int n = 0;
        for (int s = 0; s < 12; s++) {
            int len = s == 0 ? 100 : s == 1 ? 2048 : s == 2 ? 2049 : 1 + rnd_int(9000);
            int q = 1 + (s % 2);
            for (int t = 0; t < q; t++) {
                pos[n] = len - q + t;
                if (pos[n] < 0)
                    pos[n] = 0;
                seq[n++] = s;
            }
        }
        indexer_case(&p, "decode, 64 heads, top-2048", n, pos, seq, 12, 9000 / 64 + 1, 12 * (9000 / 64 + 1), tol);
        /* prefill: one sequence, 300 causal rows at positions 2000..2299 */
        int32_t ppos[300], pseq[300];
        for (int i = 0; i < 300; i++) {
            ppos[i] = 2000 + i;
            pseq[i] = 0;
        }
        indexer_case(&p, "prefill (causal), 300 rows", 300, ppos, pseq, 1, 40, 40, tol);
        pair_free(&p);
        if (variant == 0) { /* the tiny model's shape: 16 heads, top-16 */
            struct dsv32_config tc;
            cfg_tiny(&tc);
            TRY(pair_new(&p, &tc, 1, 0));
            int32_t tp[40], ts[40];
            for (int i = 0; i < 40; i++) {
                tp[i] = i * 7 % 200;
                ts[i] = i % 3;
            }
            indexer_case(&p, "tiny: 16 heads, top-16", 40, tp, ts, 3, 4, 12, tol);
            pair_free(&p);
        }
    }
}

/* ---- MLA ---- */

static void mla_case(struct pair *p, const char *what, int sparse, int rows, double tol)
{
    const struct dsv32_config *cf = p->cpu->cfg;
    const int H = cf->num_attention_heads, C = cf->kv_lora_rank, K = cf->index_topk;
    const int max_ctx = 5000, max_blocks = max_ctx / 64 + 1, n_seqs = rows, n_blocks = n_seqs * max_blocks;
    struct tcache tc;
    tcache_make(&tc, p, n_blocks, 1);
    int32_t *pos = malloc(sizeof(int32_t) * rows), *seq = malloc(sizeof(int32_t) * rows);
    for (int r = 0; r < rows; r++) {
        pos[r] = r == 0 ? 7 : r == 1 ? K - 1 : rnd_int(max_ctx);
        seq[r] = r;
    }
    struct tmeta tm;
    tmeta_make(&tm, p, rows, pos, seq, n_seqs, max_blocks, n_blocks, NULL);
    int32_t *sel = malloc(sizeof(int32_t) * rows * K);
    for (int r = 0; r < rows; r++) {
        int n = 0;
        for (int j = 0; j <= pos[r] && n < K; j++)
            if (pos[r] + 1 <= K || rnd_u() < (double)K / (pos[r] + 1) * 1.2)
                sel[(size_t)r * K + n++] = j;
        for (; n < K; n++)
            sel[(size_t)r * K + n] = -1;
    }
    const int ldh = 192, ldr = H * ldh; /* q_pe inside q rows of H x (nope + rope) */
    float *ql = rnd_f32((size_t)rows * H * C, 2.0f), *q = rnd_f32((size_t)rows * ldr, 0.3f);
    float *oc = malloc(sizeof(float) * rows * H * C), *og = malloc(sizeof(float) * rows * H * C);
    float *dql = dev_put(p->gpu, ql, sizeof(float) * rows * H * C), *dq = dev_put(p->gpu, q, sizeof(float) * rows * ldr);
    int32_t *dsel = dev_put(p->gpu, sel, sizeof(int32_t) * rows * K);
    float *dout = dev_nan(p->gpu, sizeof(float) * rows * H * C);
    const float scale = 0.07f;
    p->cpu->ops->mla(p->cpu, oc, ql, q + 128, ldr, ldh, sparse ? sel : NULL, K, &tc.c, &tm.hm, scale);
    int r = p->gpu->ops->mla(p->gpu, dout, dql, dq + 128, ldr, ldh, sparse ? dsel : NULL, K, &tc.g, &tm.dm, scale);
    CHECK(r == 0, "mla: %s", dsv32_strerror(r));
    dev_get(p->gpu, og, dout, sizeof(float) * rows * H * C);
    char buf[160];
    snprintf(buf, sizeof(buf), "%s: %d rows x %d heads, %s", what, rows, H, sparse ? "top-k selections" : "dense");
    report(buf, rel_rows(og, oc, rows * H, C, NULL), tol);
    free(pos);
    free(seq);
    free(sel);
    free(ql);
    free(q);
    free(oc);
    free(og);
    dev_free(p->gpu, dql);
    dev_free(p->gpu, dq);
    dev_free(p->gpu, dsel);
    dev_free(p->gpu, dout);
    tmeta_done(&tm, p);
    tcache_done(&tc, p);
}

static void test_mla(void)
{
    if (!want("MLA decode (absorbed): sparse and dense, exact and fast"))
        return;
    struct dsv32_config cfg;
    cfg_v32(&cfg);
    for (int fast = 0; fast < 2; fast++) {
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, fast));
        /* fast: q and the cache in bf16 (the latents are exact with power-of-two scales) */
        mla_case(&p, fast ? "fast (bf16 mma)" : "exact (f32)", 1, 6, fast ? 1e-2 : 1e-5);
        mla_case(&p, fast ? "fast (bf16 mma)" : "exact (f32)", 0, 3, fast ? 1e-2 : 1e-5);
        pair_free(&p);
    }
    struct dsv32_config tc;
    cfg_tiny(&tc);
    struct pair p;
    TRY(pair_new(&p, &tc, 1, 0));
    mla_case(&p, "tiny (rope f32 layout)", 1, 5, 1e-5);
    pair_free(&p);
}

static void test_mla_prefill(void)
{
    if (!want("MLA prefill (MHA form): FP8 and bf16 wkv_b, two sequences"))
        return;
    for (int dt = 0; dt < 2; dt++) {
        struct dsv32_config cfg;
        cfg_tiny(&cfg);
        cfg.num_attention_heads = 16;
        struct pair p;
        TRY(pair_new(&p, &cfg, 1, 0));
        const int H = 16, C = 128, nope = 64, R = 64, V = 64, qk = nope + R, K = cfg.index_topk;
        const int rows = 50, n_blocks = 8, max_blocks = 4;
        struct tcache tc;
        tcache_make(&tc, &p, n_blocks, 1);
        int32_t pos[50], seq[50];
        uint8_t mha[50];
        for (int r = 0; r < rows; r++) {
            seq[r] = r < 30 ? 0 : 1;
            pos[r] = r < 30 ? 100 + r : 10 + r;
            mha[r] = 1;
        }
        struct tmeta tm;
        tmeta_make(&tm, &p, rows, pos, seq, 2, max_blocks, n_blocks, mha);
        int32_t *sel = malloc(sizeof(int32_t) * rows * K);
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < K; i++)
                sel[r * K + i] = i < K - 2 ? (pos[r] * (i + 1)) / K : -1;
        struct tw wkv;
        tw_make(&wkv, dt ? DSV32_DT_F8_E4M3 : DSV32_DT_BF16, H * (nope + V), C, 0.05f, 1);
        TRY(tw_prepare(&wkv, &p));
        float *q = rnd_f32((size_t)rows * H * qk, 0.5f), *oc = malloc(sizeof(float) * rows * H * V),
              *og = malloc(sizeof(float) * rows * H * V);
        float *dq = dev_put(p.gpu, q, sizeof(float) * rows * H * qk), *dout = dev_nan(p.gpu, sizeof(float) * rows * H * V);
        int32_t *dsel = dev_put(p.gpu, sel, sizeof(int32_t) * rows * K);
        p.cpu->ops->mla_prefill(p.cpu, oc, q, sel, K, &tc.c, &tm.hm, 0.1f, &wkv.wc, 1);
        int r = p.gpu->ops->mla_prefill(p.gpu, dout, dq, dsel, K, &tc.g, &tm.dm, 0.1f, &wkv.wg, 1);
        CHECK(r == 0, "mla_prefill: %s", dsv32_strerror(r));
        dev_get(p.gpu, og, dout, sizeof(float) * rows * H * V);
        report(dt ? "mla_prefill, FP8 wkv_b (input quantized)" : "mla_prefill, bf16 wkv_b",
               rel_rows(og, oc, rows * H, V, NULL), 1e-5);
        tw_done(&wkv, &p);
        free(sel);
        free(q);
        free(oc);
        free(og);
        dev_free(p.gpu, dq);
        dev_free(p.gpu, dout);
        dev_free(p.gpu, dsel);
        tmeta_done(&tm, &p);
        tcache_done(&tc, &p);
        pair_free(&p);
    }
}

/* ---- MoE ---- */

static void test_moe_gate(void)
{
    if (!want("MoE router (noaux_tc, group-limited top-k)"))
        return;
    struct dsv32_config cfg;
    cfg_v32(&cfg);
    for (int fast = 0; fast < 2; fast++) {
        struct pair p;
        TRY(pair_new(&p, &cfg, 0, fast));
        const int rows = 300, D = cfg.hidden_size, E = cfg.n_routed_experts, K = cfg.num_experts_per_tok;
        struct tw gate, bias;
        tw_make(&gate, DSV32_DT_BF16, E, D, 0.02f, 0);
        tw_make(&bias, DSV32_DT_F32, 1, E, 0.3f, 0);
        TRY(tw_prepare(&gate, &p));
        TRY(tw_prepare(&bias, &p));
        float *x = rnd_f32((size_t)rows * D, 1.0f);
        for (size_t i = 0; fast && i < (size_t)rows * D; i++) /* the fast path's GEMM input is bf16 */
            x[i] = dsv32_bf16_to_f32(dsv32_f32_to_bf16(x[i]));
        int32_t *ic = malloc(sizeof(int32_t) * rows * K), *ig = malloc(sizeof(int32_t) * rows * K);
        float *wc = malloc(sizeof(float) * rows * K), *wg = malloc(sizeof(float) * rows * K);
        float *dx = dev_put(p.gpu, x, sizeof(float) * rows * D), *dw = dev_nan(p.gpu, sizeof(float) * rows * K);
        int32_t *di = dev_nan(p.gpu, sizeof(int32_t) * rows * K);
        p.cpu->ops->moe_gate(p.cpu, ic, wc, x, rows, &gate.wc, &bias.wc);
        TRY(p.gpu->ops->moe_gate(p.gpu, di, dw, dx, rows, &gate.wg, &bias.wg));
        dev_get(p.gpu, ig, di, sizeof(int32_t) * rows * K);
        dev_get(p.gpu, wg, dw, sizeof(float) * rows * K);
        int diff_rows = 0;
        for (int r = 0; r < rows; r++)
            diff_rows += memcmp(ic + r * K, ig + r * K, sizeof(int32_t) * K) != 0;
        /* a differing row must be a near-tie: recheck the cpu's scores for it */
        int unexplained = diff_rows;
        if (diff_rows) {
            float *lg = malloc(sizeof(float) * E);
            const float *gw = gate.wc.be;
            unexplained = 0;
            for (int r = 0; r < rows; r++) {
                if (!memcmp(ic + r * K, ig + r * K, sizeof(int32_t) * K))
                    continue;
                double near = INFINITY;
                for (int e = 0; e < E; e++) {
                    double l = 0;
                    for (int d = 0; d < D; d++)
                        l += (double)x[(size_t)r * D + d] * gw[(size_t)e * D + d];
                    lg[e] = (float)(1.0 / (1.0 + exp(-l)) + ((const float *)bias.wc.be)[e]);
                }
                for (int a = 0; a < E; a++)
                    for (int b = a + 1; b < E; b++)
                        near = fmin(near, fabs((double)lg[a] - lg[b]));
                unexplained += near > 1e-5;
            }
            free(lg);
        }
        int wrows = 0;
        for (int r = 0; r < rows; r++)
            if (!memcmp(ic + r * K, ig + r * K, sizeof(int32_t) * K))
                wrows += rel_l2(wg + r * K, wc + r * K, K) > 1e-6;
        printf("  router %s: %d rows x %d experts, top-%d of %d groups: %d rows differ (%d not near-ties), "
               "weights off in %d rows %s\n",
               fast ? "fast" : "exact", rows, E, cfg.topk_group, cfg.n_group, diff_rows, unexplained, wrows,
               unexplained || wrows ? "FAIL" : "ok");
        CHECK(unexplained == 0 && wrows == 0, "router differs");
        tw_done(&gate, &p);
        tw_done(&bias, &p);
        free(x);
        free(ic);
        free(ig);
        free(wc);
        free(wg);
        dev_free(p.gpu, dx);
        dev_free(p.gpu, dw);
        dev_free(p.gpu, di);
        pair_free(&p);
    }
}

/* rows whose error exceeds tol are excused only when a near-tie was reported in that row */
static void moe_case(const struct dsv32_config *cfg, int fast, enum dsv32_dtype dt, int rows, int n_loaded,
                     double tol)
{
    struct pair p;
    TRY(pair_new(&p, cfg, 0, fast));
    const int D = cfg->hidden_size, I = cfg->moe_intermediate_size, E = cfg->n_routed_experts;
    const int K = cfg->num_experts_per_tok;
    struct tw *ws = calloc((size_t)E * 3, sizeof(struct tw));
    struct dsv32_ffn_weights *fc = calloc((size_t)E, sizeof(*fc)), *fg = calloc((size_t)E, sizeof(*fg));
    const int stride = E / n_loaded;
#define LOADED(e) ((e) % stride == 0 && (e) != 3 * stride) /* one expert of them is held elsewhere */
    for (int e = 0; e < E; e++) {
        if (!LOADED(e))
            continue;
        tw_make(&ws[3 * e], dt, I, D, 0.03f, 1);
        tw_make(&ws[3 * e + 1], dt, D, I, 0.03f, 1);
        tw_make(&ws[3 * e + 2], dt, I, D, 0.03f, 1);
        for (int i = 0; i < 3; i++)
            TRY(tw_prepare(&ws[3 * e + i], &p));
        fc[e].w1 = ws[3 * e].wc;
        fc[e].w2 = ws[3 * e + 1].wc;
        fc[e].w3 = ws[3 * e + 2].wc;
        fg[e].w1 = ws[3 * e].wg;
        fg[e].w2 = ws[3 * e + 1].wg;
        fg[e].w3 = ws[3 * e + 2].wg;
    }
    int32_t *ids = malloc(sizeof(int32_t) * rows * K);
    float *w = malloc(sizeof(float) * rows * K);
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = rnd_u() < 0.1 ? rnd_int(E) : stride * (r % 5 == 0 ? rnd_int(2) : rnd_int(n_loaded)); /* some hot */
                dup = 0;
                for (int j = 0; j < k; j++)
                    dup |= ids[r * K + j] == e;
            } while (dup);
            ids[r * K + k] = e;
            w[r * K + k] = (float)(0.1 + rnd_u());
        }
    if (rows > 2)
        ids[2 * K + 1] = -1; /* a skipped slot */
    float *x = rnd_f32((size_t)rows * D, 1.0f), *yc = malloc(sizeof(float) * rows * D), *yg = malloc(sizeof(float) * rows * D);
    float *dx = dev_put(p.gpu, x, sizeof(float) * rows * D), *dw = dev_put(p.gpu, w, sizeof(float) * rows * K);
    int32_t *di = dev_put(p.gpu, ids, sizeof(int32_t) * rows * K);
    float *dy = dev_nan(p.gpu, sizeof(float) * rows * D);
    struct near_log *lc = calloc(1, sizeof(*lc)), *lg = calloc(1, sizeof(*lg));
    struct dsv32_fp8_probe probe = {.near_rel = 2e-6, .on_near = on_near, .ctx = lc, .op = 1};
    dsv32_fp8_probe_cur = &probe;
    p.cpu->ops->moe_experts(p.cpu, yc, x, rows, ids, w, K, fc, E, 1);
    probe.ctx = lg;
    int r = p.gpu->ops->moe_experts(p.gpu, dy, dx, rows, di, dw, K, fg, E, 1);
    dsv32_fp8_probe_cur = NULL;
    CHECK(r == 0, "moe_experts: %s", dsv32_strerror(r));
    dev_get(p.gpu, yg, dy, sizeof(float) * rows * D);
    int over = 0, excused = 0;
    double worst = 0;
    for (int row = 0; row < rows; row++) {
        double e = rel_l2(yg + (size_t)row * D, yc + (size_t)row * D, (size_t)D);
        if (e <= tol) {
            worst = fmax(worst, e);
            continue;
        }
        int tie = 0;
        for (int i = 0; i < lc->n && !tie; i++)
            tie = lc->k[i].row == row && lc->k[i].sub > 0;
        for (int i = 0; i < lg->n && !tie; i++)
            tie = lg->k[i].row == row && lg->k[i].sub > 0;
        if (tie && !isnan(e))
            excused++;
        else
            over++;
    }
    char buf[200];
    snprintf(buf, sizeof(buf), "moe_experts %s, %s experts, %d rows, D %d, I %d, %d of %d per row", fast ? "fast" : "exact",
             dt == DSV32_DT_F8_E4M3 ? "FP8" : "bf16", rows, D, I, K, E);
    printf("  %-58s worst row %.2e (tol %.0e), rows over tol: %d excused by reported FP8 ties, %d not %s\n", buf, worst,
           tol, excused, over, over ? "FAIL" : "ok");
    CHECK(over == 0, "%s: %d rows over tolerance", buf, over);
    for (int e = 0; e < E; e++)
        if (LOADED(e))
            for (int i = 0; i < 3; i++)
                tw_done(&ws[3 * e + i], &p);
#undef LOADED
    free(ws);
    free(fc);
    free(fg);
    free(ids);
    free(w);
    free(x);
    free(yc);
    free(yg);
    free(lc);
    free(lg);
    dev_free(p.gpu, dx);
    dev_free(p.gpu, dw);
    dev_free(p.gpu, di);
    dev_free(p.gpu, dy);
    pair_free(&p);
}

static void test_moe_experts(void)
{
    if (!want("MoE experts: grouped GEMMs, fused SiLU x up, weighted combine"))
        return;
    struct dsv32_config tiny, v32;
    cfg_tiny(&tiny);
    cfg_v32(&v32);
    moe_case(&tiny, 0, DSV32_DT_F8_E4M3, 33, 16, 1e-5);
    moe_case(&tiny, 0, DSV32_DT_BF16, 33, 16, 1e-5);
    moe_case(&tiny, 1, DSV32_DT_F8_E4M3, 33, 16, 1e-5);
    moe_case(&tiny, 1, DSV32_DT_BF16, 33, 16, 1e-5);
    moe_case(&v32, 1, DSV32_DT_F8_E4M3, 64, 16, 1e-5);
}

int main(int argc, char **argv)
{
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--probe") == 0)
            return dsv32_cuda_device_count() > 0 ? 0 : 77;
        if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
    }
    if (dsv32_cuda_device_count() == 0) {
        printf("no GPU: skipped\n");
        return 77;
    }
    rng_state = seed;
    printf("test_cuda_ops: seed %llu (rerun with --seed to reproduce)\n", (unsigned long long)seed);
    test_small_ops();
    test_quant();
    test_gemm();
    test_indexer();
    test_mla();
    test_mla_prefill();
    test_moe_gate();
    test_moe_experts();
    printf("%d checks, %d failed: %s\n", n_checks, n_fail, n_fail ? "FAIL" : "PASS");
    return n_fail ? 1 : 0;
}
