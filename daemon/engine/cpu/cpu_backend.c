/* The cpu backend: the readable reference of every op in backend.h. Plain loops, with OpenBLAS
 * for the matrix products. Weights are dequantized to f32 once (prepare_weight); FP8 GEMMs
 * quantize their input per 1x128 block exactly as DeepSeek's act_quant does, so the products equal
 * the reference's fp8_gemm up to f32 summation order. */
#include "backend.h"

#include "dtype.h"
#include "error.h"
#include "sampling.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct cpu_ctx {
    float *rope_cos, *rope_sin; /* (n_pos, rope/2) */
    int n_pos;
};

/* Per-thread scratch that grows to the largest request and then stays: the hot path allocates
 * only while the first steps discover their sizes. A thread-specific key's destructor frees a
 * thread's set when the thread ends (a scheduler thread that stops gives its scratch back). */
static _Thread_local float *scratch_buf[4];
static _Thread_local size_t scratch_cap[4];
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_release(void *unused)
{
    (void)unused;
    for (int i = 0; i < 4; i++) {
        free(scratch_buf[i]);
        scratch_buf[i] = NULL;
        scratch_cap[i] = 0;
    }
}

static void scratch_key_make(void) { pthread_key_create(&scratch_key, scratch_release); }

static float *scratch(int slot, size_t n)
{
    if (n > scratch_cap[slot]) {
        pthread_once(&scratch_once, scratch_key_make);
        pthread_setspecific(scratch_key, scratch_buf); /* non-NULL: the destructor runs */
        free(scratch_buf[slot]);
        scratch_buf[slot] = aligned_alloc(64, ((n * sizeof(float)) + 63) & ~(size_t)63);
        scratch_cap[slot] = scratch_buf[slot] ? n : 0;
    }
    return scratch_buf[slot];
}

static struct cpu_ctx *ctx_of(struct dsv32_backend *be) { return be->ctx; }

/* ---- memory ---- */

static void *cpu_alloc(struct dsv32_backend *be, size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}
static void cpu_dealloc(struct dsv32_backend *be, void *p) { free(p); }
static int cpu_copy(struct dsv32_backend *be, void *dst, const void *src, size_t bytes)
{
    if (bytes)
        memmove(dst, src, bytes);
    return 0;
}
static int cpu_memset0(struct dsv32_backend *be, void *dst, size_t bytes)
{
    memset(dst, 0, bytes);
    return 0;
}
static int cpu_sync(struct dsv32_backend *be) { return 0; }

static int cpu_prepare_weight(struct dsv32_backend *be, struct dsv32_weight *w)
{
    if (w->be)
        return 0;
    float *f = malloc(sizeof(float) * (size_t)(w->rows * w->cols));
    if (!f)
        return -ENOMEM;
    dsv32_weight_to_f32(w, f);
    w->be = f;
    return 0;
}

static void cpu_release_weight(struct dsv32_backend *be, struct dsv32_weight *w)
{
    free(w->be);
    w->be = NULL;
}

/* ---- elementwise and norms ---- */

static int cpu_embed(struct dsv32_backend *be, float *y, const int32_t *ids, int n,
                     const struct dsv32_weight *table)
{
    const float *t = table->be;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= table->rows)
            return DSV32_ETOKEN;
        memcpy(y + (size_t)i * table->cols, t + (size_t)ids[i] * table->cols,
               sizeof(float) * (size_t)table->cols);
    }
    return 0;
}

static int cpu_rmsnorm(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                       const struct dsv32_weight *g, int rows, int dim, float eps)
{
    const float *gw = g->be;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        float ss = 0.0f;
        for (int i = 0; i < dim; i++)
            ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++)
            yr[i] = gw[i] * (xr[i] * inv);
    }
    return 0;
}

static int cpu_layernorm(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                         const struct dsv32_weight *g, const struct dsv32_weight *b, int rows,
                         int dim, float eps)
{
    const float *gw = g->be, *bw = b->be;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        float mean = 0.0f, var = 0.0f;
        for (int i = 0; i < dim; i++)
            mean += xr[i];
        mean /= (float)dim;
        for (int i = 0; i < dim; i++)
            var += (xr[i] - mean) * (xr[i] - mean);
        var /= (float)dim;
        float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < dim; i++)
            yr[i] = (xr[i] - mean) * inv * gw[i] + bw[i];
    }
    return 0;
}

static int cpu_add(struct dsv32_backend *be, float *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
    return 0;
}

static int cpu_silu_mul(struct dsv32_backend *be, float *y, const float *g, const float *u,
                        int rows, int dim)
{
    size_t n = (size_t)rows * dim;
    for (size_t i = 0; i < n; i++)
        y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    return 0;
}

/* ---- GEMMs ---- */

/* y = x w^T with x already in the form the weight wants (quantized when FP8). */
static void gemm_xwt(float *y, int ldy, const float *x, int ldx, int rows, const float *w,
                     int out, int in)
{
    if (rows == 0 || out == 0)
        return;
    if (rows <= 4) {
        /* GEMVs: a GEMM with so few rows spends its time packing the weight */
        for (int r = 0; r < rows; r++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x + (size_t)r * ldx, 1,
                        0.0f, y + (size_t)r * ldy, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, x, ldx, w, in, 0.0f,
                y, ldy);
}

/* y = x w^T; FP8 weights quantize each input row first. The probe sees row i of x as logical row
 * rows_of[i] (i when NULL) with sub-index subs_of[i] (0 when NULL). */
static int linear_at(float *y, int ldy, const float *x, int ldx, int rows,
                     const struct dsv32_weight *w, int ue8m0, const int32_t *rows_of,
                     const int32_t *subs_of)
{
    const int in = (int)w->cols, out = (int)w->rows;
    if (w->dtype != DSV32_DT_F8_E4M3) {
        gemm_xwt(y, ldy, x, ldx, rows, w->be, out, in);
        return 0;
    }
    /* act_quant: 1x128 blocks along the input features, then the dequantized product */
    float *xq = scratch(0, (size_t)rows * in);
    if (!xq)
        return -ENOMEM;
    for (int r = 0; r < rows; r++) {
        memcpy(xq + (size_t)r * in, x + (size_t)r * ldx, sizeof(float) * (size_t)in);
        dsv32_fp8_simulate_at(xq + (size_t)r * in, in, 128, ue8m0, subs_of ? subs_of[r] : 0,
                              rows_of ? rows_of[r] : r);
    }
    gemm_xwt(y, ldy, xq, in, rows, w->be, out, in);
    return 0;
}

static int cpu_linear(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                      int rows, const struct dsv32_weight *w, int ue8m0)
{
    return linear_at(y, ldy, x, ldx, rows, w, ue8m0, NULL, NULL);
}

static int cpu_gather_rows(struct dsv32_backend *be, float *y, const float *x, const int32_t *idx,
                           int n, int dim)
{
    for (int i = 0; i < n; i++)
        memcpy(y + (size_t)i * dim, x + (size_t)idx[i] * dim, sizeof(float) * (size_t)dim);
    return 0;
}

/* rows many enough for threads (below, one thread packs them faster than a team starts) */
#define ROWS_PAR_MIN ((size_t)1 << 18)

static int rows_threads(int threads)
{
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

void dsv32_rows_pack_host(void *dst, const float *x, const int32_t *idx, int n, int dim, int bf16,
                          int threads)
{
    const int nt = rows_threads(threads);
#pragma omp parallel for if ((size_t)n * dim >= ROWS_PAR_MIN && nt > 1) num_threads(nt)            \
    schedule(static)
    for (int i = 0; i < n; i++) {
        const float *xr = x + (size_t)(idx ? idx[i] : i) * dim;
        if (bf16)
            for (int j = 0; j < dim; j++)
                ((uint16_t *)dst)[(size_t)i * dim + j] = dsv32_f32_to_bf16(xr[j]);
        else
            memcpy((float *)dst + (size_t)i * dim, xr, sizeof(float) * (size_t)dim);
    }
}

void dsv32_rows_unpack_host(float *y, const void *src, const int32_t *idx, int n, int dim, int bf16,
                            int add, int threads)
{
    const int nt = rows_threads(threads);
#pragma omp parallel for if ((size_t)n * dim >= ROWS_PAR_MIN && nt > 1) num_threads(nt)            \
    schedule(static)
    for (int i = 0; i < n; i++) {
        float *yr = y + (size_t)(idx ? idx[i] : i) * dim;
        for (int j = 0; j < dim; j++) {
            const size_t o = (size_t)i * dim + j;
            const float v =
                bf16 ? dsv32_bf16_to_f32(((const uint16_t *)src)[o]) : ((const float *)src)[o];
            yr[j] = add ? yr[j] + v : v;
        }
    }
}

static int cpu_rows_pack(struct dsv32_backend *be, void *dst, const float *x, const int32_t *idx,
                         int n, int dim, int bf16)
{
    dsv32_rows_pack_host(dst, x, idx, n, dim, bf16, 0);
    return 0;
}

static int cpu_rows_unpack(struct dsv32_backend *be, float *y, const void *src, const int32_t *idx,
                           int n, int dim, int bf16, int add)
{
    dsv32_rows_unpack_host(y, src, idx, n, dim, bf16, add, 0);
    return 0;
}

/* ---- RoPE, Hadamard ---- */

static int cpu_rope(struct dsv32_backend *be, float *x, int rows, int heads, int ldr, int ldh,
                    const int32_t *pos, int interleaved)
{
    struct cpu_ctx *c = ctx_of(be);
    const int half = be->cfg->qk_rope_head_dim / 2;
    for (int r = 0; r < rows; r++) {
        if (pos[r] < 0 || pos[r] >= c->n_pos)
            return DSV32_ECONTEXT;
        const float *cs = c->rope_cos + (size_t)pos[r] * half, *sn = c->rope_sin + (size_t)pos[r] * half;
        for (int h = 0; h < heads; h++) {
            float *v = x + (size_t)r * ldr + (size_t)h * ldh;
            for (int i = 0; i < half; i++) {
                int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                float re = v[a], im = v[b];
                v[a] = re * cs[i] - im * sn[i];
                v[b] = re * sn[i] + im * cs[i];
            }
        }
    }
    return 0;
}

/* In-place fast Walsh-Hadamard transform of 128 values, Sylvester (natural) order, times
 * 128^-0.5: y[i] = sum_j (-1)^popcount(i & j) x[j] / sqrt(128). */
static void hadamard128(float *v)
{
    for (int len = 1; len < 128; len <<= 1)
        for (int i = 0; i < 128; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                float a = v[j], b = v[j + len];
                v[j] = a + b;
                v[j + len] = a - b;
            }
    const float s = (float)pow(128.0, -0.5);
    for (int i = 0; i < 128; i++)
        v[i] *= s;
}

static int cpu_hadamard_quant(struct dsv32_backend *be, uint8_t *q, float *scale, const float *x,
                              int n, int ue8m0)
{
    float v[128];
    for (int i = 0; i < n; i++) {
        memcpy(v, x + (size_t)i * 128, sizeof(v));
        hadamard128(v);
        scale[i] = dsv32_fp8_quant_block_at(q + (size_t)i * 128, v, 128, ue8m0, 0, i, 0);
    }
    return 0;
}

/* ---- caches ---- */

static uint8_t *mla_rec(const struct dsv32_backend *be, const struct dsv32_kv_layer *kv, int64_t slot)
{
    return kv->mla + (size_t)slot * be->geom.mla_rec_bytes;
}

static int cpu_kv_store(struct dsv32_backend *be, const struct dsv32_kv_layer *kv,
                        const float *latent, int ld_lat, const float *pe, int ld_pe,
                        const struct dsv32_step_meta *m, int ue8m0)
{
    const struct dsv32_kv_geom *g = &be->geom;
    for (int r = 0; r < m->n_rows; r++) {
        uint8_t *rec = mla_rec(be, kv, m->h_row_slot[r]);
        const float *lat = latent + (size_t)r * ld_lat, *p = pe + (size_t)r * ld_pe;
        float *scales = (float *)(rec + g->kv_lora);
        for (int b = 0; b < g->kv_lora / 128; b++) {
            float s = dsv32_fp8_quant_block_at(rec + b * 128, lat + b * 128, 128, ue8m0, 0, r, b * 128);
            memcpy(&scales[b], &s, 4);
        }
        uint8_t *pr = rec + g->kv_lora + 4 * (g->kv_lora / 128);
        for (int i = 0; i < g->rope; i++) {
            if (g->rope_f32) {
                memcpy(pr + 4 * i, &p[i], 4);
            } else {
                uint16_t h = dsv32_f32_to_bf16(p[i]);
                memcpy(pr + 2 * i, &h, 2);
            }
        }
    }
    return 0;
}

/* Decodes one cached token: latent c[kv_lora] and rope pe[rope] as f32. */
static void mla_load(const struct dsv32_backend *be, const struct dsv32_kv_layer *kv, int64_t slot,
                     float *c, float *pe)
{
    const struct dsv32_kv_geom *g = &be->geom;
    const uint8_t *rec = mla_rec(be, kv, slot);
    for (int b = 0; b < g->kv_lora / 128; b++) {
        float s;
        memcpy(&s, rec + g->kv_lora + 4 * b, 4);
        for (int i = 0; i < 128; i++)
            c[b * 128 + i] = dsv32_fp8_to_f32(rec[b * 128 + i]) * s;
    }
    const uint8_t *pr = rec + g->kv_lora + 4 * (g->kv_lora / 128);
    for (int i = 0; i < g->rope; i++) {
        if (g->rope_f32) {
            memcpy(&pe[i], pr + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, pr + 2 * i, 2);
            pe[i] = dsv32_bf16_to_f32(h);
        }
    }
}

static int cpu_index_store(struct dsv32_backend *be, const struct dsv32_kv_layer *kv,
                           const uint8_t *k, const float *k_scale, const struct dsv32_step_meta *m)
{
    for (int r = 0; r < m->n_rows; r++) {
        int64_t slot = m->h_row_slot[r];
        uint8_t *blk = kv->idx + (size_t)(slot / DSV32_KV_BLOCK_TOKENS) * be->geom.idx_block_bytes;
        int off = (int)(slot % DSV32_KV_BLOCK_TOKENS);
        memcpy(blk + off * 128, k + (size_t)r * 128, 128);
        memcpy(blk + DSV32_KV_BLOCK_TOKENS * 128 + off * 4, &k_scale[r], 4);
    }
    return 0;
}

static int64_t slot_of(const struct dsv32_step_meta *m, int seq, int pos)
{
    int32_t blk = m->h_blocks[(size_t)seq * m->max_blocks + pos / DSV32_KV_BLOCK_TOKENS];
    return (int64_t)blk * DSV32_KV_BLOCK_TOKENS + pos % DSV32_KV_BLOCK_TOKENS;
}

/* ---- the DSA indexer ---- */

struct scored {
    float s;
    int32_t pos;
};

/* Higher score first; equal scores: lower position first (a fixed, reproducible order). */
static int scored_better(const struct scored *a, const struct scored *b)
{
    return a->s > b->s || (a->s == b->s && a->pos < b->pos);
}

/* Moves the k best of v[0..n) to the front (quickselect, expected O(n)). */
static void select_top(struct scored *v, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        struct scored piv = v[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (scored_better(&v[i], &piv))
                i++;
            while (scored_better(&piv, &v[j]))
                j--;
            if (i <= j) {
                struct scored t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

#define INDEXER_ROW_TILE 32

static int cpu_indexer(struct dsv32_backend *be, int32_t *sel, const uint8_t *q,
                       const float *q_scale, const float *w_raw, const struct dsv32_kv_layer *kv,
                       const struct dsv32_step_meta *m, int topk)
{
    const int IH = be->cfg->index_n_heads;
    const float wscale = (float)pow((double)IH, -0.5), softmax_scale = (float)pow(128.0, -0.5);
    const int TR = INDEXER_ROW_TILE;
    float *qf = scratch(0, (size_t)TR * IH * 128);
    float *kf = scratch(1, (size_t)m->max_ctx * 129); /* keys, then their scales */
    float *logits = scratch(2, (size_t)TR * IH * m->max_ctx);
    struct scored *sc = (struct scored *)scratch(3, (size_t)m->max_ctx * 2);
    if (!qf || !kf || !logits || !sc)
        return -ENOMEM;
    if (IH > 1024)
        return DSV32_ECONFIG;
    float *kscale = kf + (size_t)m->max_ctx * 128;
    for (int r0 = 0; r0 < m->n_rows;) {
        /* rows [r0, r1): one sequence, at most TR rows; its keys decoded once */
        const int seq = m->h_row_seq[r0];
        int r1 = r0, n_ctx = 0;
        while (r1 < m->n_rows && r1 - r0 < TR && m->h_row_seq[r1] == seq) {
            if (m->h_row_pos[r1] + 1 > n_ctx)
                n_ctx = m->h_row_pos[r1] + 1;
            r1++;
        }
        for (int j = 0; j < n_ctx; j++) {
            int64_t slot = slot_of(m, seq, j);
            const uint8_t *blk = kv->idx + (size_t)(slot / DSV32_KV_BLOCK_TOKENS) * be->geom.idx_block_bytes;
            int off = (int)(slot % DSV32_KV_BLOCK_TOKENS);
            for (int d = 0; d < 128; d++)
                kf[(size_t)j * 128 + d] = dsv32_fp8_to_f32(blk[off * 128 + d]);
            memcpy(&kscale[j], blk + DSV32_KV_BLOCK_TOKENS * 128 + off * 4, 4);
        }
        const int nr = r1 - r0;
        for (int i = 0; i < nr * IH * 128; i++)
            qf[i] = dsv32_fp8_to_f32(q[(size_t)r0 * IH * 128 + i]);
        /* logits[(t, h), j] = q_{t,h} . k_j */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nr * IH, n_ctx, 128, 1.0f, qf, 128,
                    kf, 128, 0.0f, logits, n_ctx);
        for (int t = 0; t < nr; t++) {
            const int r = r0 + t, n = m->h_row_pos[r] + 1;
            /* the reference: weights_proj(x) * IH^-0.5, then * q_scale * head_dim^-0.5 */
            float w[1024];
            for (int h = 0; h < IH; h++)
                w[h] = w_raw[(size_t)r * IH + h] * wscale * q_scale[(size_t)r * IH + h] * softmax_scale;
            int32_t *out = sel + (size_t)r * topk;
            int k = n < topk ? n : topk;
            if (n <= topk) {
                for (int j = 0; j < n; j++)
                    out[j] = j;
            } else {
                const float *lt = logits + (size_t)t * IH * n_ctx;
                for (int j = 0; j < n; j++) {
                    float s = 0.0f;
                    for (int h = 0; h < IH; h++) {
                        float l = lt[(size_t)h * n_ctx + j];
                        s += (l > 0.0f ? l : 0.0f) * w[h];
                    }
                    sc[j].s = s * kscale[j];
                    sc[j].pos = j;
                }
                select_top(sc, n, k);
                for (int j = 0; j < k; j++)
                    out[j] = sc[j].pos;
                qsort(out, (size_t)k, sizeof(int32_t), cmp_i32);
            }
            for (int j = k; j < topk; j++)
                out[j] = -1;
        }
        r0 = r1;
    }
    return 0;
}

/* ---- MLA (absorbed) ---- */

/* the latents are f32 here (lat_bf16 0) */
static int cpu_mla(struct dsv32_backend *be, void *out_lat, const void *q_lat_v, const float *q_pe,
                   int ldr_pe, int ldh_pe, const int32_t *sel, int n_sel,
                   const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale)
{
    float *out = out_lat;
    const float *q_lat = q_lat_v;
    const int H = be->cfg->num_attention_heads, C = be->geom.kv_lora, R = be->geom.rope;
    const int cap = sel ? n_sel : m->max_ctx;
    float *cbuf = scratch(0, (size_t)cap * C);
    float *pbuf = scratch(1, (size_t)cap * R);
    float *s = scratch(2, (size_t)H * cap);
    if (!cbuf || !pbuf || !s)
        return -ENOMEM;
    for (int r = 0; r < m->n_rows; r++) {
        const int pos = m->h_row_pos[r], seq = m->h_row_seq[r];
        int n = 0;
        if (m->h_row_mha && m->h_row_mha[r])
            continue; /* cpu_mla_prefill computes these rows */
        if (sel) {
            for (int j = 0; j < n_sel; j++) {
                int32_t p = sel[(size_t)r * n_sel + j];
                if (p < 0)
                    continue;
                if (p > pos)
                    return -EINVAL; /* a selection beyond the causal horizon is a bug upstream */
                mla_load(be, kv, slot_of(m, seq, p), cbuf + (size_t)n * C, pbuf + (size_t)n * R);
                n++;
            }
        } else {
            for (int p = 0; p <= pos; p++, n++)
                mla_load(be, kv, slot_of(m, seq, p), cbuf + (size_t)n * C, pbuf + (size_t)n * R);
        }
        const float *ql = q_lat + (size_t)r * H * C, *qp = q_pe + (size_t)r * ldr_pe;
        float *o = out + (size_t)r * H * C;
        if (n == 0) {
            memset(o, 0, sizeof(float) * (size_t)H * C);
            continue;
        }
        /* s[h, j] = q_lat[h] . c_j + q_pe[h] . pe_j */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, H, n, C, 1.0f, ql, C, cbuf, C, 0.0f, s, n);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, H, n, R, 1.0f, qp, ldh_pe, pbuf, R,
                    1.0f, s, n);
        for (int h = 0; h < H; h++) {
            float *sh = s + (size_t)h * n, mx = -INFINITY, sum = 0.0f;
            for (int j = 0; j < n; j++) {
                sh[j] *= scale;
                mx = fmaxf(mx, sh[j]);
            }
            for (int j = 0; j < n; j++) {
                sh[j] = expf(sh[j] - mx);
                sum += sh[j];
            }
            for (int j = 0; j < n; j++)
                sh[j] /= sum;
        }
        /* o[h, :] = sum_j p[h, j] c_j */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, H, C, n, 1.0f, s, n, cbuf, C, 0.0f, o, C);
    }
    return 0;
}

static int cpu_mla_prefill(struct dsv32_backend *be, float *o, const float *q, const int32_t *sel,
                           int n_sel, const struct dsv32_kv_layer *kv,
                           const struct dsv32_step_meta *m, float scale,
                           const struct dsv32_weight *wkv_b, int ue8m0)
{
    const struct dsv32_config *cf = be->cfg;
    const int H = cf->num_attention_heads, C = be->geom.kv_lora, R = be->geom.rope;
    const int nope = cf->qk_nope_head_dim, V = cf->v_head_dim, qk = nope + R, hs = nope + V;
    const int cap = m->max_ctx;
    float *cbuf = scratch(1, (size_t)cap * C);
    float *pbuf = scratch(2, (size_t)cap * R);
    float *kvb = scratch(3, (size_t)cap * H * hs + (size_t)H * cap);
    if (!cbuf || !pbuf || !kvb)
        return -ENOMEM;
    float *p = kvb + (size_t)cap * H * hs; /* (cap) probabilities of one head */
    int32_t *ctx_pos = malloc(sizeof(int32_t) * (size_t)(cap > 0 ? cap : 1) * 2);
    if (!ctx_pos)
        return -ENOMEM;
    int32_t *ctx_sub = ctx_pos + (cap > 0 ? cap : 1);
    int r = 0;
    for (int r0 = 0; r0 < m->n_rows;) {
        if (!m->h_row_mha[r0]) {
            r0++;
            continue;
        }
        /* the rows [r0, r1) of one sequence: expand its cache once, up to the last row's pos */
        const int seq = m->h_row_seq[r0];
        int r1 = r0, last = 0;
        while (r1 < m->n_rows && m->h_row_mha[r1] && m->h_row_seq[r1] == seq) {
            if (m->h_row_pos[r1] > last)
                last = m->h_row_pos[r1];
            r1++;
        }
        const int n_ctx = last + 1;
        for (int j = 0; j < n_ctx; j++)
            mla_load(be, kv, slot_of(m, seq, j), cbuf + (size_t)j * C, pbuf + (size_t)j * R);
        /* k_nope and v of every position: wkv_b(c), quantizing c when wkv_b is FP8 (to the
         * probe: rows are positions, the sub-index the sequence's index in the step) */
        for (int j = 0; j < n_ctx; j++) {
            ctx_pos[j] = j;
            ctx_sub[j] = seq;
        }
        if ((r = linear_at(kvb, H * hs, cbuf, C, n_ctx, wkv_b, ue8m0, ctx_pos, ctx_sub)) < 0)
            break;
        for (int t = r0; t < r1; t++) {
            const int pos = m->h_row_pos[t];
            int n = 0;
            if (sel) {
                for (int j = 0; j < n_sel; j++) {
                    int32_t sp = sel[(size_t)t * n_sel + j];
                    if (sp >= 0 && sp <= pos)
                        ctx_pos[n++] = sp;
                }
            } else {
                for (int j = 0; j <= pos; j++)
                    ctx_pos[n++] = j;
            }
            for (int h = 0; h < H; h++) {
                const float *qh = q + (size_t)t * H * qk + (size_t)h * qk;
                float *oh = o + (size_t)t * H * V + (size_t)h * V, mx = -INFINITY, sum = 0.0f;
                for (int j = 0; j < n; j++) {
                    const float *k = kvb + (size_t)ctx_pos[j] * H * hs + (size_t)h * hs;
                    const float *pe = pbuf + (size_t)ctx_pos[j] * R;
                    float dot = 0.0f;
                    for (int d = 0; d < nope; d++)
                        dot += qh[d] * k[d];
                    for (int d = 0; d < R; d++)
                        dot += qh[nope + d] * pe[d];
                    p[j] = dot * scale;
                    mx = fmaxf(mx, p[j]);
                }
                for (int j = 0; j < n; j++) {
                    p[j] = expf(p[j] - mx);
                    sum += p[j];
                }
                for (int d = 0; d < V; d++)
                    oh[d] = 0.0f;
                for (int j = 0; j < n; j++) {
                    const float *v = kvb + (size_t)ctx_pos[j] * H * hs + (size_t)h * hs + nope;
                    const float pj = p[j] / sum;
                    for (int d = 0; d < V; d++)
                        oh[d] += pj * v[d];
                }
            }
        }
        r0 = r1;
    }
    free(ctx_pos);
    return r;
}

static int cpu_mla_absorb(struct dsv32_backend *be, void *q_lat_v, const float *q, int rows,
                          const struct dsv32_weight *wkv_b)
{
    float *q_lat = q_lat_v;
    const struct dsv32_config *c = be->cfg;
    const int H = c->num_attention_heads, C = c->kv_lora_rank, nope = c->qk_nope_head_dim;
    const int qk = nope + c->qk_rope_head_dim, hs = nope + c->v_head_dim;
    const float *w = wkv_b->be; /* (H * (nope + v), C) */
    for (int h = 0; h < H; h++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, C, nope, 1.0f, q + h * qk,
                    H * qk, w + (size_t)h * hs * C, C, 0.0f, q_lat + (size_t)h * C, H * C);
    return 0;
}

static int cpu_mla_expand(struct dsv32_backend *be, float *o, const void *lat_v, int rows,
                          const struct dsv32_weight *wkv_b)
{
    const float *lat = lat_v;
    const struct dsv32_config *c = be->cfg;
    const int H = c->num_attention_heads, C = c->kv_lora_rank, nope = c->qk_nope_head_dim;
    const int V = c->v_head_dim, hs = nope + V;
    const float *w = wkv_b->be;
    for (int h = 0; h < H; h++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, V, C, 1.0f, lat + (size_t)h * C,
                    H * C, w + ((size_t)h * hs + nope) * C, C, 0.0f, o + (size_t)h * V, H * V);
    return 0;
}

/* ---- MoE ---- */

static int cpu_moe_gate(struct dsv32_backend *be, int32_t *ids, float *wout, const float *x,
                        int rows, const struct dsv32_weight *gate, const struct dsv32_weight *bias)
{
    const struct dsv32_config *c = be->cfg;
    const int E = c->n_routed_experts, G = c->n_group, per = E / G, K = c->num_experts_per_tok;
    float *logits = scratch(1, (size_t)rows * E);
    if (!logits)
        return -ENOMEM;
    gemm_xwt(logits, E, x, c->hidden_size, rows, gate->be, E, c->hidden_size);
    const float *b = bias && bias->be ? bias->be : NULL;
    float orig[1024], sel[1024], gscore[1024];
    int gkeep[1024];
    if (E > 1024 || G > 1024)
        return DSV32_ECONFIG;
    for (int r = 0; r < rows; r++) {
        const float *l = logits + (size_t)r * E;
        if (c->scoring_sigmoid) {
            for (int e = 0; e < E; e++)
                orig[e] = 1.0f / (1.0f + expf(-l[e]));
        } else {
            float mx = -INFINITY, sum = 0.0f;
            for (int e = 0; e < E; e++)
                mx = fmaxf(mx, l[e]);
            for (int e = 0; e < E; e++)
                sum += (orig[e] = expf(l[e] - mx));
            for (int e = 0; e < E; e++)
                orig[e] /= sum;
        }
        for (int e = 0; e < E; e++)
            sel[e] = b ? orig[e] + b[e] : orig[e];
        if (G > 1) {
            /* group score: sum of the top-2 (with a bias) or the max; keep topk_group groups */
            for (int g = 0; g < G; g++) {
                float m1 = -INFINITY, m2 = -INFINITY;
                for (int e = g * per; e < (g + 1) * per; e++) {
                    if (sel[e] > m1) {
                        m2 = m1;
                        m1 = sel[e];
                    } else if (sel[e] > m2) {
                        m2 = sel[e];
                    }
                }
                gscore[g] = b ? m1 + m2 : m1;
                gkeep[g] = 0;
            }
            for (int t = 0; t < c->topk_group; t++) {
                int best = -1;
                for (int g = 0; g < G; g++)
                    if (!gkeep[g] && (best < 0 || gscore[g] > gscore[best]))
                        best = g;
                gkeep[best] = 1;
            }
            for (int g = 0; g < G; g++)
                if (!gkeep[g])
                    for (int e = g * per; e < (g + 1) * per; e++)
                        sel[e] = -INFINITY;
        }
        int32_t *id = ids + (size_t)r * K;
        float *w = wout + (size_t)r * K, wsum = 0.0f;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int j = 0; j < k; j++)
                    taken |= id[j] == e;
                if (!taken && (best < 0 || sel[e] > sel[best]))
                    best = e;
            }
            id[k] = best;
            w[k] = orig[best];
            wsum += w[k];
        }
        for (int k = 0; k < K; k++) {
            if (c->scoring_sigmoid && c->norm_topk_prob)
                w[k] /= wsum;
            w[k] *= c->routed_scaling_factor;
        }
    }
    return 0;
}

/* One expert on a gathered block of rows: out[n, D] = w2(silu(w1 x) * w3 x). tok[j] is the token
 * row of gathered row j and sub[j] = 1 + its expert slot (the probe's coordinates). */
static int expert_ffn(float *out, const float *x, int n, const struct dsv32_ffn_weights *f,
                      int ue8m0, float *g, float *u, const int32_t *tok, const int32_t *sub)
{
    const int D = (int)f->w1.cols, NI = (int)f->w1.rows;
    int r;
    if ((r = linear_at(g, NI, x, D, n, &f->w1, ue8m0, tok, NULL)) < 0 ||
        (r = linear_at(u, NI, x, D, n, &f->w3, ue8m0, tok, NULL)) < 0)
        return r;
    size_t m = (size_t)n * NI;
    for (size_t i = 0; i < m; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    return linear_at(out, D, g, NI, n, &f->w2, ue8m0, tok, sub);
}

static int cpu_moe_experts(struct dsv32_backend *be, float *y, const float *x, int rows,
                           const int32_t *ids, const float *w, int k,
                           const struct dsv32_ffn_weights *experts, int n_experts, int ue8m0)
{
    const int D = be->cfg->hidden_size, NI = be->cfg->moe_intermediate_size;
    memset(y, 0, sizeof(float) * (size_t)rows * D);
    int32_t *rowlist = malloc(sizeof(int32_t) * (size_t)rows * k * 4);
    if (!rowlist)
        return -ENOMEM;
    int r = 0;
    float *xe = scratch(1, (size_t)rows * k * D), *oe = scratch(2, (size_t)rows * k * D);
    float *g = scratch(3, (size_t)rows * k * NI * 2);
    if (!xe || !oe || !g) {
        r = -ENOMEM;
        goto out;
    }
    /* All rows of one expert go through it in one GEMM; experts in ascending id order. */
    for (int e = 0; e < n_experts; e++) {
        if (!dsv32_weight_loaded(&experts[e].w1))
            continue;
        int n = 0;
        for (int i = 0; i < rows * k; i++)
            if (ids[i] == e) {
                rowlist[2 * n] = i / k;
                rowlist[2 * n + 1] = i;
                n++;
            }
        if (n == 0)
            continue;
        int32_t *tok = rowlist + (size_t)rows * k * 2, *sub = tok + (size_t)rows * k;
        for (int j = 0; j < n; j++) {
            memcpy(xe + (size_t)j * D, x + (size_t)rowlist[2 * j] * D, sizeof(float) * D);
            tok[j] = rowlist[2 * j];
            sub[j] = 1 + rowlist[2 * j + 1] % k;
        }
        if ((r = expert_ffn(oe, xe, n, &experts[e], ue8m0, g, g + (size_t)n * NI, tok, sub)) < 0)
            goto out;
        for (int j = 0; j < n; j++) {
            float *yr = y + (size_t)rowlist[2 * j] * D, wt = w[rowlist[2 * j + 1]];
            const float *o = oe + (size_t)j * D;
            for (int d = 0; d < D; d++)
                yr[d] += o[d] * wt;
        }
    }
out:
    free(rowlist);
    return r;
}

static void cpu_free(struct dsv32_backend *be)
{
    if (!be)
        return;
    struct cpu_ctx *c = be->ctx;
    if (c) {
        free(c->rope_cos);
        free(c->rope_sin);
        free(c);
    }
    free(be);
}

/* the rows on several threads, as the scheduler drew them before the engine did (a draw over
 * the vocabulary costs about a millisecond) */
static int cpu_sample(struct dsv32_backend *be, int32_t *tok, struct dsv32_logprobs *lp,
                      const float *logits, int vocab, const int32_t *rows,
                      const struct dsv32_draw *d, int n)
{
    (void)be;
    int r = 0;
#pragma omp parallel for if (n > 1) schedule(dynamic, 1) reduction(min : r)
    for (int i = 0; i < n; i++) {
        const float *x = logits + (size_t)rows[i] * vocab;
        /* the thread's scratch (64-byte aligned) */
        float *work =
            scratch(0, (dsv32_draw_work_bytes(vocab) + sizeof(float) - 1) / sizeof(float));
        if (!work) {
            r = -ENOMEM;
            continue;
        }
        tok[i] = dsv32_draw_row(x, vocab, &d[i], work);
        if (d[i].n_logprobs >= 0)
            dsv32_logprobs_of(x, vocab, tok[i], d[i].n_logprobs, &lp[i]);
    }
    return r;
}

static const struct dsv32_backend_ops cpu_ops = {
    .name = "cpu",
    .free = cpu_free,
    .alloc = cpu_alloc,
    .dealloc = cpu_dealloc,
    .to_device = cpu_copy,
    .to_host = cpu_copy,
    .memset0 = cpu_memset0,
    .sync = cpu_sync,
    .prepare_weight = cpu_prepare_weight,
    .release_weight = cpu_release_weight,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .layernorm = cpu_layernorm,
    .linear = cpu_linear,
    .add = cpu_add,
    .silu_mul = cpu_silu_mul,
    .rope = cpu_rope,
    .hadamard_quant = cpu_hadamard_quant,
    .kv_store = cpu_kv_store,
    .index_store = cpu_index_store,
    .indexer = cpu_indexer,
    .mla = cpu_mla,
    .mla_prefill = cpu_mla_prefill,
    .mla_absorb = cpu_mla_absorb,
    .mla_expand = cpu_mla_expand,
    .moe_gate = cpu_moe_gate,
    .moe_experts = cpu_moe_experts,
    .gather_rows = cpu_gather_rows,
    .rows_pack = cpu_rows_pack,
    .rows_unpack = cpu_rows_unpack,
    .sample = cpu_sample,
};

void dsv32_backend_cpu_set_threads(int n)
{
    if (n > 0)
        openblas_set_num_threads(n);
}

int dsv32_backend_cpu_new(const struct dsv32_config *cfg, const struct dsv32_kv_geom *geom,
                          struct dsv32_backend **ret)
{
    struct dsv32_backend *be = calloc(1, sizeof(*be));
    struct cpu_ctx *c = calloc(1, sizeof(*c));
    int r;
    if (!be || !c) {
        free(be);
        free(c);
        return -ENOMEM;
    }
    be->ops = &cpu_ops;
    be->cfg = cfg;
    be->geom = *geom;
    be->ctx = c;
    c->n_pos = cfg->max_position_embeddings;
    if ((r = dsv32_rope_table(cfg, c->n_pos, &c->rope_cos, &c->rope_sin)) < 0) {
        cpu_free(be);
        return r;
    }
    *ret = be;
    return 0;
}
