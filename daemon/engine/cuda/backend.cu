/* The cuda backend: the ops vtable of backend.h over the op families of this directory, device
 * memory (cudaMalloc; one stream per backend), weights in their device form (see common.cuh's
 * cu_weight and the numerics modes of cuda_backend.h), scratch buffers that grow during the first
 * steps and then stay, the FP8 tie probe's host side, and the test/benchmark helpers of
 * cuda_backend.h (device-side random inputs, event timing, the copy and bf16 GEMM ceilings). */
#include "common.cuh"

#include <cuda_profiler_api.h>

#include "cuda_backend.h"
#include "dsa.cuh"
#include "gemm.cuh"
#include "indexer.cuh"
#include "mla.cuh"
#include "mla_prefill.cuh"
#include "moe.cuh"
#include "quant.cuh"
#include "sample.cuh"
#include "small_ops.cuh"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int knobs_from_env(struct dsv32_backend *be); /* DSV32_CUDA_KNOBS */

static struct cu_ctx *ctx_of(const struct dsv32_backend *be) { return (struct cu_ctx *)be->ctx; }

/* ops may be called from another host thread than the one that made the backend */
static int cu_enter(struct cu_ctx *c)
{
    int d = -1;
    if (cudaGetDevice(&d) == cudaSuccess && d == c->device)
        return 0;
    CU_CHECK(cudaSetDevice(c->device));
    return 0;
}

#define ENTER(be)                                                                                  \
    struct cu_ctx *c = ctx_of(be);                                                                 \
    CU_TRY(cu_enter(c))

/* ---- scratch, uploads, probe ---- */

void *cu_scratch(struct cu_ctx *c, int slot, size_t bytes)
{
    if (bytes <= c->scratch_cap[slot])
        return c->scratch[slot];
    size_t cap = bytes + bytes / 4 + 4096;
    void *p = NULL;
    if (c->scratch[slot]) {
        cudaStreamSynchronize(c->st); /* the old buffer may still be in use */
        cudaFree(c->scratch[slot]);
        c->scratch[slot] = NULL;
        c->scratch_cap[slot] = 0;
    }
    if (cudaMalloc(&p, cap) != cudaSuccess) {
        log_error("cuda: scratch buffer of %zu bytes: %s", cap, cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    c->scratch[slot] = p;
    c->scratch_cap[slot] = cap;
    return p;
}

void *cu_upload(struct cu_ctx *c, int slot, const void *src, size_t bytes)
{
    if (!bytes)
        bytes = 1;
    void *d = cu_scratch(c, slot, bytes);
    if (!d)
        return NULL;
    if (c->pinned && cudaEventSynchronize(c->pinned_done) != cudaSuccess)
        return NULL;
    if (bytes > c->pinned_cap) {
        cudaFreeHost(c->pinned);
        c->pinned = NULL;
        c->pinned_cap = 0;
        size_t cap = bytes + bytes / 2 + 4096;
        if (cudaHostAlloc(&c->pinned, cap, cudaHostAllocDefault) != cudaSuccess) {
            log_error("cuda: pinned staging of %zu bytes failed", cap);
            c->pinned = NULL;
            return NULL;
        }
        c->pinned_cap = cap;
    }
    memcpy(c->pinned, src, bytes);
    if (cudaMemcpyAsync(d, c->pinned, bytes, cudaMemcpyHostToDevice, c->st) != cudaSuccess ||
        cudaEventRecord(c->pinned_done, c->st) != cudaSuccess) {
        log_error("cuda: upload of %zu bytes failed", bytes);
        return NULL;
    }
    return d;
}

int cu_probe_begin(struct cu_ctx *c, struct cu_probe *out)
{
    struct dsv32_fp8_probe *p = dsv32_fp8_probe_cur;
    memset(out, 0, sizeof(*out));
    if (!p)
        return 0;
    if (!c->probe_near) {
        c->probe_cap = 1 << 16;
        CU_CHECK(cudaMalloc(&c->probe_near, sizeof(int4) * (size_t)c->probe_cap));
        CU_CHECK(cudaMalloc(&c->probe_n, sizeof(int)));
        c->probe_host = (int4 *)malloc(sizeof(int4) * (size_t)c->probe_cap);
        if (!c->probe_host)
            return -ENOMEM;
    }
    /* the flips of this op: a contiguous range of the sorted list */
    int lo = 0, n = 0;
    while (lo < p->n_flips && p->flips[lo].op < p->op)
        lo++;
    while (lo + n < p->n_flips && p->flips[lo + n].op == p->op)
        n++;
    if (n > c->probe_flips_cap) {
        cudaFree(c->probe_flips);
        c->probe_flips = NULL;
        CU_CHECK(cudaMalloc(&c->probe_flips, sizeof(int3) * (size_t)n));
        c->probe_flips_cap = n;
    }
    if (n) {
        int3 *h = (int3 *)malloc(sizeof(int3) * (size_t)n);
        if (!h)
            return -ENOMEM;
        for (int i = 0; i < n; i++)
            h[i] = make_int3(p->flips[lo + i].sub, p->flips[lo + i].row, p->flips[lo + i].col);
        /* in stream order: the op's kernel reads them next; h is read until the copy is done */
        cudaError_t e = cudaMemcpyAsync(c->probe_flips, h, sizeof(int3) * (size_t)n,
                                        cudaMemcpyHostToDevice, c->st);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(c->st);
        free(h);
        CU_CHECK(e);
    }
    CU_CHECK(cudaMemsetAsync(c->probe_n, 0, sizeof(int), c->st));
    out->on = 1;
    out->near_rel = p->near_rel;
    out->flips = c->probe_flips;
    out->n_flips = n;
    out->near = c->probe_near;
    out->n_near = c->probe_n;
    out->cap = c->probe_cap;
    return 0;
}

static int near_cmp(const void *a, const void *b)
{
    const int4 *x = (const int4 *)a, *y = (const int4 *)b;
    if (x->x != y->x)
        return x->x < y->x ? -1 : 1;
    if (x->y != y->y)
        return x->y < y->y ? -1 : 1;
    return (x->z > y->z) - (x->z < y->z);
}

int cu_probe_end(struct cu_ctx *c, const struct cu_probe *pp)
{
    struct dsv32_fp8_probe *p = dsv32_fp8_probe_cur;
    if (!pp->on || !p)
        return 0;
    int n = 0;
    CU_CHECK(cudaMemcpyAsync(&n, c->probe_n, sizeof(int), cudaMemcpyDeviceToHost, c->st));
    CU_CHECK(cudaStreamSynchronize(c->st));
    if (n > c->probe_cap) {
        log_warn("cuda: FP8 probe: %d near-ties in one op, %d reported", n, c->probe_cap);
        n = c->probe_cap;
    }
    if (n <= 0 || !p->on_near)
        return 0;
    CU_CHECK(cudaMemcpyAsync(c->probe_host, c->probe_near, sizeof(int4) * (size_t)n,
                             cudaMemcpyDeviceToHost, c->st));
    CU_CHECK(cudaStreamSynchronize(c->st));
    qsort(c->probe_host, (size_t)n, sizeof(int4), near_cmp);
    for (int i = 0; i < n; i++) {
        const int4 e = c->probe_host[i];
        if (i && near_cmp(&c->probe_host[i - 1], &e) == 0)
            continue;
        struct dsv32_fp8_key k = {p->op, e.x, e.y, e.z};
        float v;
        memcpy(&v, &e.w, 4);
        p->on_near(p->ctx, &k, v);
    }
    return 0;
}

/* ---- memory ---- */

/* page-locked host memory: copies to and from it run at the link's rate, not through the
 * driver's staging */
static void *cuda_host_alloc(struct dsv32_backend *be, size_t bytes)
{
    struct cu_ctx *c = ctx_of(be);
    void *p = NULL;
    if (cu_enter(c) < 0)
        return NULL;
    if (cudaMallocHost(&p, bytes ? bytes : 1) != cudaSuccess) {
        log_error("cuda: cudaMallocHost(%zu): %s", bytes, cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    return p;
}

static void cuda_host_free(struct dsv32_backend *be, void *p)
{
    (void)be;
    if (p)
        cudaFreeHost(p);
}

static void *cuda_alloc(struct dsv32_backend *be, size_t bytes)
{
    struct cu_ctx *c = ctx_of(be);
    void *p = NULL;
    if (cu_enter(c) < 0)
        return NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        log_error("cuda: cudaMalloc(%zu): %s", bytes, cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    return p;
}

static void cuda_dealloc(struct dsv32_backend *be, void *p)
{
    struct cu_ctx *c = ctx_of(be);
    if (!p || cu_enter(c) < 0)
        return;
    cudaStreamSynchronize(c->st);
    cudaFree(p);
}

static int cuda_to_device(struct dsv32_backend *be, void *dst, const void *src, size_t bytes)
{
    ENTER(be);
    if (bytes)
        CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->st));
    return 0;
}

static int cuda_to_host(struct dsv32_backend *be, void *dst, const void *src, size_t bytes)
{
    ENTER(be);
    if (bytes) {
        CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->st));
        CU_CHECK(cudaStreamSynchronize(c->st));
    }
    return 0;
}

static int cuda_memset0(struct dsv32_backend *be, void *dst, size_t bytes)
{
    ENTER(be);
    if (bytes)
        CU_CHECK(cudaMemsetAsync(dst, 0, bytes, c->st));
    return 0;
}

static int cuda_sync(struct dsv32_backend *be)
{
    ENTER(be);
    CU_CHECK(cudaStreamSynchronize(c->st));
    return 0;
}

/* ---- weights ---- */

static void weight_free(struct cu_weight *cw)
{
    if (!cw)
        return;
    void *ps[] = {cw->f32, cw->bf16, cw->fp8, cw->scale, cw->lt_scale, cw->bf16_lazy};
    for (size_t i = 0; i < sizeof(ps) / sizeof(ps[0]); i++)
        if (ps[i])
            cudaFree(ps[i]);
    free(cw);
}

static int cuda_prepare_weight(struct dsv32_backend *be, struct dsv32_weight *w)
{
    if (w->be)
        return 0;
    ENTER(be);
    if (!w->data)
        return -EINVAL;
    const size_t n = (size_t)(w->rows * w->cols), esz = dsv32_dtype_size(w->dtype);
    const int is_vec = w->rows == 1;
    if (!esz || (w->dtype != DSV32_DT_F32 && w->dtype != DSV32_DT_BF16 && w->dtype != DSV32_DT_F16 &&
                 w->dtype != DSV32_DT_F8_E4M3))
        return DSV32_EDTYPE;
    struct cu_weight *cw = (struct cu_weight *)calloc(1, sizeof(*cw));
    if (!cw)
        return -ENOMEM;
    cw->dtype = w->dtype;
    cw->rows = w->rows;
    cw->cols = w->cols;
    void *raw = NULL;
    float *dsc = NULL;
    int r = 0;
    const size_t n_sc = (size_t)((w->rows + 127) / 128) * (size_t)((w->cols + 127) / 128);
    /* The copies go on c->st, in order before the dequantization that reads them (see
     * common.cuh: a cudaMemcpy would run on the legacy stream, which c->st does not wait for). */
    if (cudaMalloc(&raw, n * esz) != cudaSuccess ||
        cudaMemcpyAsync(raw, w->data, n * esz, cudaMemcpyHostToDevice, c->st) != cudaSuccess)
        goto cuda_fail;
    if (w->dtype == DSV32_DT_F8_E4M3 && w->scale &&
        (cudaMalloc(&dsc, sizeof(float) * n_sc) != cudaSuccess ||
         cudaMemcpyAsync(dsc, w->scale, sizeof(float) * n_sc, cudaMemcpyHostToDevice, c->st) !=
             cudaSuccess))
        goto cuda_fail;
    if (c->fast && !is_vec && w->dtype == DSV32_DT_F8_E4M3 && dsc && w->cols % 128 == 0 && w->rows % 16 == 0) {
        cw->fp8 = (uint8_t *)raw;
        cw->scale = dsc;
    } else if (c->fast && !is_vec && w->dtype == DSV32_DT_BF16) {
        cw->bf16 = (__nv_bfloat16 *)raw;
    } else {
        if (cudaMalloc(&cw->f32, sizeof(float) * n) != cudaSuccess)
            goto cuda_fail;
        if ((r = cu_dequant(c, cw->f32, NULL, raw, w->dtype, dsc, w->rows, w->cols)) < 0)
            goto fail;
    }
    /* done with the host data and with raw/dsc when the dequantized form was kept */
    if (cudaStreamSynchronize(c->st) != cudaSuccess)
        goto cuda_fail;
    if (cw->f32) {
        cudaFree(raw);
        cudaFree(dsc);
    }
    w->be = cw;
    return 0;
cuda_fail:
    log_error("cuda: preparing weight %s (%lld x %lld): %s", w->name ? w->name : "?", (long long)w->rows,
              (long long)w->cols, cudaGetErrorString(cudaGetLastError()));
    r = DSV32_ECUDA;
fail:
    if (raw && raw != cw->fp8 && raw != (void *)cw->bf16)
        cudaFree(raw);
    if (dsc && dsc != cw->scale)
        cudaFree(dsc);
    weight_free(cw);
    return r;
}

static void cuda_release_weight(struct dsv32_backend *be, struct dsv32_weight *w)
{
    struct cu_ctx *c = ctx_of(be);
    if (!w->be)
        return;
    if (cu_enter(c) < 0)
        return;
    cudaStreamSynchronize(c->st);
    cu_moe_tables_free(c); /* they point at expert weights */
    weight_free((struct cu_weight *)w->be);
    w->be = NULL;
}

/* ---- the ops ---- */

static const float *vec_f32(const struct dsv32_weight *w)
{
    return w && w->be ? ((const struct cu_weight *)w->be)->f32 : NULL;
}

static int cuda_embed(struct dsv32_backend *be, float *y, const int32_t *ids, int n,
                      const struct dsv32_weight *table)
{
    ENTER(be);
    return cu_embed(c, y, ids, n, (const struct cu_weight *)table->be);
}

static int cuda_rmsnorm(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                        const struct dsv32_weight *g, int rows, int dim, float eps)
{
    ENTER(be);
    return cu_rmsnorm(c, y, ldy, x, ldx, vec_f32(g), rows, dim, eps);
}

static int cuda_layernorm(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx,
                          const struct dsv32_weight *g, const struct dsv32_weight *b, int rows, int dim,
                          float eps)
{
    ENTER(be);
    return cu_layernorm(c, y, ldy, x, ldx, vec_f32(g), vec_f32(b), rows, dim, eps);
}

static int cuda_linear(struct dsv32_backend *be, float *y, int ldy, const float *x, int ldx, int rows,
                       const struct dsv32_weight *w, int ue8m0)
{
    ENTER(be);
    return cu_linear(c, y, ldy, x, ldx, rows, w, ue8m0, 0);
}

static int cuda_add(struct dsv32_backend *be, float *y, const float *x, size_t n)
{
    ENTER(be);
    return cu_add(c, y, x, n);
}

static int cuda_silu_mul(struct dsv32_backend *be, float *y, const float *g, const float *u, int rows, int dim)
{
    ENTER(be);
    return cu_silu_mul(c, y, g, u, rows, dim);
}

static int cuda_rope(struct dsv32_backend *be, float *x, int rows, int heads, int ldr, int ldh,
                     const int32_t *pos, int interleaved)
{
    ENTER(be);
    return cu_rope(c, x, rows, heads, ldr, ldh, pos, interleaved);
}

static int cuda_hadamard_quant(struct dsv32_backend *be, uint8_t *q, float *scale, const float *x, int n,
                               int ue8m0)
{
    ENTER(be);
    return cu_hadamard_quant(c, q, scale, x, n, ue8m0);
}

static int cuda_kv_store(struct dsv32_backend *be, const struct dsv32_kv_layer *kv, const float *latent,
                         int ld_lat, const float *pe, int ld_pe, const struct dsv32_step_meta *m, int ue8m0)
{
    ENTER(be);
    return cu_kv_store(c, kv, latent, ld_lat, pe, ld_pe, m, ue8m0);
}

static int cuda_index_store(struct dsv32_backend *be, const struct dsv32_kv_layer *kv, const uint8_t *k,
                            const float *k_scale, const struct dsv32_step_meta *m)
{
    ENTER(be);
    return cu_index_store(c, kv, k, k_scale, m);
}

static int cuda_indexer(struct dsv32_backend *be, int32_t *sel, const uint8_t *q, const float *q_scale,
                        const float *w_raw, const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m,
                        int topk)
{
    ENTER(be);
    return cu_indexer(c, sel, q, q_scale, w_raw, kv, m, topk);
}

static int cuda_mla(struct dsv32_backend *be, void *out, const void *q_lat, const float *q_pe,
                    int ldr_pe, int ldh_pe, const int32_t *sel, int n_sel,
                    const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale)
{
    ENTER(be);
    return cu_mla(c, out, q_lat, q_pe, ldr_pe, ldh_pe, sel, n_sel, kv, m, scale, 0);
}

static int cuda_dsa(struct dsv32_backend *be, void *out, int32_t *sel, const uint8_t *q,
                    const float *q_scale, const float *w_raw, int topk, const void *q_lat,
                    const float *q_pe, int ldr_pe, int ldh_pe, const struct dsv32_kv_layer *kv,
                    const struct dsv32_step_meta *m, float scale)
{
    ENTER(be);
    return cu_dsa(c, out, sel, q, q_scale, w_raw, topk, q_lat, q_pe, ldr_pe, ldh_pe, kv, m, scale);
}

static int cuda_mla_prefill(struct dsv32_backend *be, float *o, const float *q, const int32_t *sel, int n_sel,
                            const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale,
                            const struct dsv32_weight *wkv_b, int ue8m0)
{
    ENTER(be);
    return cu_mla_prefill(c, o, q, sel, n_sel, kv, m, scale, wkv_b, ue8m0);
}

static int cuda_mla_absorb(struct dsv32_backend *be, void *q_lat, const float *q, int rows,
                           const struct dsv32_weight *wkv_b)
{
    ENTER(be);
    return cu_mla_absorb(c, q_lat, q, rows, wkv_b);
}

static int cuda_mla_expand(struct dsv32_backend *be, float *o, const void *lat, int rows,
                           const struct dsv32_weight *wkv_b)
{
    ENTER(be);
    return cu_mla_expand(c, o, lat, rows, wkv_b);
}

static int cuda_moe_gate(struct dsv32_backend *be, int32_t *ids, float *w, const float *x, int rows,
                         const struct dsv32_weight *gate, const struct dsv32_weight *bias)
{
    ENTER(be);
    return cu_moe_gate(c, ids, w, x, rows, gate, bias);
}

static int cuda_moe_experts(struct dsv32_backend *be, float *y, const float *x, int rows, const int32_t *ids,
                            const float *w, int k, const struct dsv32_ffn_weights *experts, int n_experts,
                            int ue8m0)
{
    ENTER(be);
    return cu_moe_experts(c, y, x, rows, ids, w, k, experts, n_experts, ue8m0);
}

static int cuda_gather_rows(struct dsv32_backend *be, float *y, const float *x, const int32_t *idx, int n,
                            int dim)
{
    ENTER(be);
    return cu_gather_rows(c, y, x, idx, n, dim);
}

static int cuda_rows_pack(struct dsv32_backend *be, void *dst, const float *x, const int32_t *idx,
                          int n, int dim, int bf16)
{
    ENTER(be);
    return cu_rows_pack(c, dst, x, idx, n, dim, bf16);
}

static int cuda_rows_unpack(struct dsv32_backend *be, float *y, const void *src, const int32_t *idx,
                            int n, int dim, int bf16, int add)
{
    ENTER(be);
    return cu_rows_unpack(c, y, src, idx, n, dim, bf16, add);
}

static int cuda_sample(struct dsv32_backend *be, int32_t *tok, struct dsv32_logprobs *lp,
                       const float *logits, int vocab, const int32_t *rows,
                       const struct dsv32_draw *d, int n)
{
    ENTER(be);
    return cu_sample(c, tok, lp, logits, vocab, rows, d, n);
}

/* ---- lifetime ---- */

static void cuda_free(struct dsv32_backend *be)
{
    if (!be)
        return;
    struct cu_ctx *c = ctx_of(be);
    if (c) {
        cudaSetDevice(c->device);
        if (c->st)
            cudaStreamSynchronize(c->st);
        cu_green_free(c);
        cu_moe_tables_free(c);
        for (int i = 0; i < CU_SCRATCH_SLOTS; i++)
            cudaFree(c->scratch[i]);
        cudaFree(c->rope_cos);
        cudaFree(c->rope_sin);
        cudaFree(c->probe_flips);
        cudaFree(c->mla_prof);
        free(c->idx_items_h);
        cudaFree(c->probe_near);
        cudaFree(c->probe_n);
        free(c->probe_host);
        cudaFree(c->lt_ws);
        if (c->pinned)
            cudaFreeHost(c->pinned);
        if (c->sample_h)
            cudaFreeHost(c->sample_h);
        if (c->pinned_done)
            cudaEventDestroy(c->pinned_done);
        if (c->lt)
            cublasLtDestroy(c->lt);
        if (c->blas)
            cublasDestroy(c->blas);
        if (c->st)
            cudaStreamDestroy(c->st);
        free(c);
    }
    free(be);
}

static const struct dsv32_backend_ops cuda_ops = {
    /* .name = */ "cuda",
    /* .free = */ cuda_free,
    /* .alloc = */ cuda_alloc,
    /* .dealloc = */ cuda_dealloc,
    /* .to_device = */ cuda_to_device,
    /* .to_host = */ cuda_to_host,
    /* .memset0 = */ cuda_memset0,
    /* .sync = */ cuda_sync,
    /* .prepare_weight = */ cuda_prepare_weight,
    /* .release_weight = */ cuda_release_weight,
    /* .embed = */ cuda_embed,
    /* .rmsnorm = */ cuda_rmsnorm,
    /* .layernorm = */ cuda_layernorm,
    /* .linear = */ cuda_linear,
    /* .add = */ cuda_add,
    /* .silu_mul = */ cuda_silu_mul,
    /* .rope = */ cuda_rope,
    /* .hadamard_quant = */ cuda_hadamard_quant,
    /* .kv_store = */ cuda_kv_store,
    /* .index_store = */ cuda_index_store,
    /* .indexer = */ cuda_indexer,
    /* .mla = */ cuda_mla,
    /* .mla_prefill = */ cuda_mla_prefill,
    /* .mla_absorb = */ cuda_mla_absorb,
    /* .mla_expand = */ cuda_mla_expand,
    /* .moe_gate = */ cuda_moe_gate,
    /* .moe_experts = */ cuda_moe_experts,
    /* .gather_rows = */ cuda_gather_rows,
    /* .rows_pack = */ cuda_rows_pack,
    /* .rows_unpack = */ cuda_rows_unpack,
    /* .host_alloc = */ cuda_host_alloc,
    /* .host_free = */ cuda_host_free,
    /* .dsa = */ cuda_dsa,
    /* .sample = */ cuda_sample,
};

/* The fast numerics: prefill rows take the absorbed form too (FlashMLA's sparse prefill form,
 * the same function up to rounding; the MHA form reads the expanded K and V of 2,048 positions
 * per row and head from memory, 2.6 MB per (row, head)), so there is no mla_prefill. */
static const struct dsv32_backend_ops *cuda_fast_ops(void)
{
    static const struct dsv32_backend_ops fast = [] {
        struct dsv32_backend_ops o = cuda_ops;
        o.mla_prefill = NULL;
        return o;
    }();
    return &fast;
}

extern "C" int dsv32_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" int dsv32_cuda_profiler(int on)
{
    if ((on ? cudaProfilerStart() : cudaProfilerStop()) != cudaSuccess) {
        cudaGetLastError();
        return DSV32_ECUDA;
    }
    return 0;
}

extern "C" int dsv32_backend_cuda_new(const struct dsv32_config *cfg, const struct dsv32_kv_geom *geom,
                                      int device, struct dsv32_backend **ret)
{
    const int n_dev = dsv32_cuda_device_count();
    if (device < 0 || device >= n_dev) {
        log_error("cuda: device %d requested, %d present", device, n_dev);
        return -ENODEV; /* "No such device": the configuration's, not a CUDA failure */
    }
    struct dsv32_backend *be = (struct dsv32_backend *)calloc(1, sizeof(*be));
    struct cu_ctx *c = (struct cu_ctx *)calloc(1, sizeof(*c));
    float *hc = NULL, *hs = NULL;
    int r = DSV32_ECUDA;
    if (!be || !c) {
        free(be);
        free(c);
        return -ENOMEM;
    }
    be->ops = &cuda_ops;
    be->cfg = cfg;
    be->geom = *geom;
    be->ctx = c;
    c->cfg = cfg;
    c->geom = *geom;
    c->device = device;
    const char *math = getenv("DSV32_CUDA_MATH"), *idx = getenv("DSV32_CUDA_INDEXER");
    if (math && strcmp(math, "fast") && strcmp(math, "exact"))
        log_warn("cuda: DSV32_CUDA_MATH=%s is not exact or fast; using exact", math);
    c->fast = math && strcmp(math, "fast") == 0;
    /* the fast numerics' indexer: FP8 wgmma (0.34 ms vs 0.44 ms of f16 wgmma for the scores of batch
     * 64 x 131072, BENCHMARKS.md) unless DSV32_CUDA_INDEXER=f16 */
    c->indexer_fp8 = c->fast && !(idx && strcmp(idx, "f16") == 0);
    c->lt_fp8 = 1;
    c->lt_min_rows = 65;
    c->lt_big_rows = 16;
    c->idx_wgmma = 1;
    c->mla_wgmma = 1;
    c->idx_items = 1;
    c->idx_dev_items = 1;
    c->idx_msum = 1;
    c->idx_s16 = 1;
    c->mla_ws = 1;
    c->mla_cl = 64;
    c->mla_ostage = 1;
    c->fp8_pdl = 1;
    c->pdl_ops = 1;
    c->pdl = 1;
    cudaDeviceProp prop;
    if (cudaSetDevice(device) != cudaSuccess || cudaGetDeviceProperties(&prop, device) != cudaSuccess ||
        cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking) != cudaSuccess ||
        cudaEventCreateWithFlags(&c->pinned_done, cudaEventDisableTiming) != cudaSuccess) {
        log_error("cuda: device %d setup: %s", device, cudaGetErrorString(cudaGetLastError()));
        goto fail;
    }
    c->n_sm = prop.multiProcessorCount;
    c->smem_optin = (int)prop.sharedMemPerBlockOptin;
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(c->blas, c->st) != CUBLAS_STATUS_SUCCESS ||
        cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS) {
        log_error("cuda: cuBLAS handles could not be created");
        r = DSV32_ECUBLAS;
        goto fail;
    }
    c->lt_ws_bytes = 32u << 20;
    if (cudaMalloc(&c->lt_ws, c->lt_ws_bytes) != cudaSuccess)
        goto fail;
    c->n_pos = cfg->max_position_embeddings;
    if ((r = dsv32_rope_table(cfg, c->n_pos, &hc, &hs)) < 0)
        goto fail;
    r = DSV32_ECUDA;
    {
        const size_t tb = sizeof(float) * (size_t)c->n_pos * (size_t)(cfg->qk_rope_head_dim / 2);
        if (cudaMalloc(&c->rope_cos, tb) != cudaSuccess || cudaMalloc(&c->rope_sin, tb) != cudaSuccess ||
            cudaMemcpyAsync(c->rope_cos, hc, tb, cudaMemcpyHostToDevice, c->st) != cudaSuccess ||
            cudaMemcpyAsync(c->rope_sin, hs, tb, cudaMemcpyHostToDevice, c->st) != cudaSuccess ||
            cudaStreamSynchronize(c->st) != cudaSuccess) {
            log_error("cuda: RoPE tables: %s", cudaGetErrorString(cudaGetLastError()));
            goto fail;
        }
    }
    free(hc);
    free(hs);
    snprintf(c->lt_note, sizeof(c->lt_note), "cuBLASLt block-scaled FP8: not calibrated yet");
    if (c->fast && cu_mla_fast_ok(c)) {
        c->absorbed_prefill = 1;
        c->lat16 = be->lat_bf16 = 1;
        be->ops = cuda_fast_ops();
    }
    log_info("cuda backend on %s (%d SMs), numerics %s", prop.name, c->n_sm, c->fast ? "fast" : "exact");
    if ((r = knobs_from_env(be)) < 0) { /* hc and hs are freed already */
        cuda_free(be);
        return r;
    }
    *ret = be;
    return 0;
fail:
    free(hc);
    free(hs);
    cuda_free(be);
    return r;
}

/* ---- helpers for tests and benchmarks (cuda_backend.h) ---- */

extern "C" int dsv32_cuda_is_fast(const struct dsv32_backend *be) { return ctx_of(be)->fast; }

/* The variant switches: name, field (offset in cu_ctx), whether the value is kept as given (else
 * as 0/1) */
#define KNOB(f, given) {#f, offsetof(struct cu_ctx, f), given}
static const struct {
    const char *name;
    size_t off;
    bool as_given;
} cu_knobs[] = {
    KNOB(indexer_fp8, false),      KNOB(lt_fp8, false),
    KNOB(fp8_reg, false),          KNOB(fp8_no_wg, false),
    KNOB(idx_wgmma, true),         KNOB(idx_no_topk, false),
    KNOB(topk_global, false),      KNOB(topk_parts, true),
    KNOB(mla_wgmma, false),        KNOB(idx_tma, false),
    KNOB(idx_copy_only, true),     KNOB(idx_l2_normal, false),
    KNOB(idx_items, false),        KNOB(mla_ws, false),
    KNOB(idx_poison, false),       KNOB(idx_pipe, false),
    KNOB(mla_q6, false),           KNOB(dsa_chunks, true),
    KNOB(dsa_idx_sms, true),       KNOB(dsa_skip, true),
    KNOB(lt_min_rows, true),       KNOB(lt_big_rows, true),
    KNOB(idx_dev_items, false),    KNOB(mla_cl, true),
    KNOB(mla_cl_nocopy, false),    KNOB(pdl, false),
    KNOB(moe_all_groups, false),   KNOB(route_smem, false),
    KNOB(moe_rowmajor, false),     KNOB(fp8_pdl, false),
    KNOB(pdl_ops, false),          KNOB(fp8_stages_dn, true),
    KNOB(idx_sample, false),       KNOB(idx_msum, false),
    KNOB(idx_sample_stride, true), KNOB(idx_s16, false),
    KNOB(mla_ostage, true),
};
#undef KNOB

/* the table's entry for name, or -1 */
static int knob_index(const char *name)
{
    for (size_t i = 0; i < sizeof(cu_knobs) / sizeof(cu_knobs[0]); i++)
        if (strcmp(name, cu_knobs[i].name) == 0)
            return (int)i;
    return -1;
}

extern "C" int dsv32_cuda_set_knob(struct dsv32_backend *be, const char *name, int value)
{
    struct cu_ctx *c = ctx_of(be);
    const int k = knob_index(name);
    if (k >= 0) {
        *(int *)((char *)c + cu_knobs[k].off) = cu_knobs[k].as_given ? value : value != 0;
        return 0;
    }
    if (strcmp(name, "lat16") == 0) { /* the backend's latent type with it */
        if (value && !c->absorbed_prefill)
            return -EINVAL;
        c->lat16 = be->lat_bf16 = value != 0;
        return 0;
    }
    if (strcmp(name, "mla_prof") == 0) {
        CU_TRY(cu_enter(c));
        if (value && !c->mla_prof) {
            CU_CHECK(cudaMalloc((void **)&c->mla_prof, CU_MLA_PROF_N * sizeof(unsigned long long)));
            CU_CHECK(cudaMemsetAsync(c->mla_prof, 0, CU_MLA_PROF_N * sizeof(unsigned long long), c->st));
        } else if (!value && c->mla_prof) {
            CU_CHECK(cudaStreamSynchronize(c->st));
            CU_CHECK(cudaFree(c->mla_prof));
            c->mla_prof = NULL;
        }
    } else
        return -EINVAL;
    return 0;
}

/* DSV32_CUDA_KNOBS="name=value,...": knobs for a whole process (a program that has no flag for
 * them, e.g. dsv32-run under a golden comparison); an unknown name or a bad value is an error */
static int knobs_from_env(struct dsv32_backend *be)
{
    const char *env = getenv("DSV32_CUDA_KNOBS");
    char buf[512];
    if (!env || !*env)
        return 0;
    if (strlen(env) >= sizeof(buf)) {
        log_error("cuda: DSV32_CUDA_KNOBS is longer than %zu bytes", sizeof(buf) - 1);
        return -EINVAL;
    }
    strcpy(buf, env);
    for (char *save = NULL, *item = strtok_r(buf, ",", &save); item;
         item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '='), *end = NULL;
        const long v = eq ? strtol(eq + 1, &end, 10) : 0;
        if (!eq || end == eq + 1 || *end || v < INT_MIN || v > INT_MAX) {
            log_error("cuda: DSV32_CUDA_KNOBS: \"%s\" is not name=integer", item);
            return -EINVAL;
        }
        *eq = 0;
        const int r = dsv32_cuda_set_knob(be, item, (int)v);
        if (r < 0) {
            log_error("cuda: DSV32_CUDA_KNOBS: knob %s=%ld: %s", item, v, dsv32_strerror(r));
            return r;
        }
        log_info("cuda: knob %s=%ld (DSV32_CUDA_KNOBS)", item, v);
    }
    return 0;
}

extern "C" int dsv32_cuda_get_knob(struct dsv32_backend *be, const char *name, int *value)
{
    const struct cu_ctx *c = ctx_of(be);
    const int k = knob_index(name);
    if (k < 0 && strcmp(name, "lat16") == 0) {
        *value = c->lat16;
        return 0;
    }
    if (k < 0)
        return -EINVAL;
    *value = *(const int *)((const char *)c + cu_knobs[k].off);
    return 0;
}

extern "C" int dsv32_cuda_dsa_info(struct dsv32_backend *be, int sms[2], long *overlapped_calls)
{
    return cu_dsa_info(ctx_of(be), sms, overlapped_calls);
}

extern "C" int dsv32_cuda_idx_sample_stats(struct dsv32_backend *be, long *calls, int *missed)
{
    ENTER(be);
    *calls = c->idx_sample_calls;
    *missed = 0;
    if (c->idx_sample_miss && c->idx_sample_rows > 0) {
        int *h = (int *)malloc(sizeof(int) * (size_t)c->idx_sample_rows);
        if (!h)
            return -ENOMEM;
        if (cudaMemcpyAsync(h, c->idx_sample_miss, sizeof(int) * (size_t)c->idx_sample_rows,
                            cudaMemcpyDeviceToHost, c->st) != cudaSuccess ||
            cudaStreamSynchronize(c->st) != cudaSuccess) {
            free(h);
            return DSV32_ECUDA;
        }
        for (int i = 0; i < c->idx_sample_rows; i++)
            *missed += h[i] != 0;
        free(h);
    }
    return 0;
}

extern "C" int dsv32_cuda_mla_prof(struct dsv32_backend *be, unsigned long long out[20])
{
    ENTER(be);
    if (!c->mla_prof)
        return -EINVAL;
    CU_CHECK(cudaMemcpyAsync(out, c->mla_prof, CU_MLA_PROF_N * sizeof(unsigned long long), cudaMemcpyDeviceToHost, c->st));
    CU_CHECK(cudaMemsetAsync(c->mla_prof, 0, CU_MLA_PROF_N * sizeof(unsigned long long), c->st));
    CU_CHECK(cudaStreamSynchronize(c->st));
    return 0;
}

extern "C" int dsv32_cuda_idx_scores(struct dsv32_backend *be, float *out, size_t n)
{
    ENTER(be);
    if (!c->scratch[SCR_SCORES] || n * sizeof(float) > c->scratch_cap[SCR_SCORES])
        return -EINVAL;
    /* f16 scores (knob idx_s16): the first n halves, widened here */
    CU_CHECK(cudaMemcpyAsync(out, c->scratch[SCR_SCORES], n * (c->scores_h16 ? 2 : sizeof(float)),
                             cudaMemcpyDeviceToHost, c->st));
    CU_CHECK(cudaStreamSynchronize(c->st));
    if (c->scores_h16) {
        const uint16_t *h = (const uint16_t *)out;
        for (size_t i = n; i-- > 0;) /* from the end: out[i] is halves 2i, 2i + 1, read already */
            out[i] = dsv32_f16_to_f32(h[i]);
    }
    return 0;
}

extern "C" const char *dsv32_cuda_lt_status(struct dsv32_backend *be)
{
    struct cu_ctx *c = ctx_of(be);
    if (cu_enter(c) == 0 && !c->lt_state)
        cu_lt_calibrate(c);
    return c->lt_note;
}

static __device__ __forceinline__ uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static __device__ __forceinline__ float rnd_normal(uint64_t seed, uint64_t i)
{
    const uint64_t h = mix64(seed ^ mix64(i));
    const float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777217.0f), u2 = (float)((h >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

static __global__ void fill_kernel(void *dst, size_t n, int kind, uint64_t seed, float scale, int C, int R,
                                   int rope_f32, int rec_bytes, int blk_bytes)
{
    const size_t total = kind == DSV32_FILL_MLA_CACHE ? n * rec_bytes : kind == DSV32_FILL_IDX_CACHE ? n * blk_bytes : n;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        switch (kind) {
        case DSV32_FILL_F32_NORMAL:
            ((float *)dst)[i] = rnd_normal(seed, i) * scale;
            break;
        case DSV32_FILL_F32_UNIFORM:
            ((float *)dst)[i] = (float)(mix64(seed ^ mix64(i)) >> 40) * (1.0f / 16777216.0f) * scale;
            break;
        case DSV32_FILL_E4M3:
            ((uint8_t *)dst)[i] = cu_f32_to_e4m3(rnd_normal(seed, i) * scale);
            break;
        case DSV32_FILL_BF16_NORMAL:
            ((uint16_t *)dst)[i] = cu_f32_to_bf16_bits(rnd_normal(seed, i) * scale);
            break;
        case DSV32_FILL_MLA_CACHE: {
            const size_t rec = i / rec_bytes;
            const int b = (int)(i % rec_bytes);
            uint8_t *p = (uint8_t *)dst + i;
            if (b < C) {
                *p = cu_f32_to_e4m3(rnd_normal(seed, i) * 64.0f);
            } else if (b < C + 4 * (C / 128)) {
                if ((b - C) % 4 == 0) {
                    const int e = -6 - (int)(mix64(seed ^ (rec * 131 + b)) % 3);
                    *(float *)p = ldexpf(scale, e);
                }
            } else {
                const int o = b - C - 4 * (C / 128);
                if (rope_f32 && o % 4 == 0 && o / 4 < R)
                    *(float *)p = rnd_normal(seed, i);
                else if (!rope_f32 && o % 2 == 0 && o / 2 < R)
                    *(uint16_t *)p = cu_f32_to_bf16_bits(rnd_normal(seed, i));
            }
            break;
        }
        case DSV32_FILL_IDX_CACHE: {
            const int b = (int)(i % blk_bytes);
            uint8_t *p = (uint8_t *)dst + i;
            if (b < DSV32_KV_BLOCK_TOKENS * 128)
                *p = cu_f32_to_e4m3(rnd_normal(seed, i) * 64.0f);
            else if ((b - DSV32_KV_BLOCK_TOKENS * 128) % 4 == 0)
                *(float *)p = scale * (0.5f + (float)(mix64(seed ^ i) >> 40) * (1.0f / 16777216.0f)) / 64.0f;
            break;
        }
        default:
            break;
        }
    }
}

extern "C" int dsv32_cuda_fill(struct dsv32_backend *be, void *dst, size_t n, enum dsv32_cuda_fill kind,
                               uint64_t seed, float scale)
{
    ENTER(be);
    if (!n)
        return 0;
    fill_kernel<<<4096, 256, 0, c->st>>>(dst, n, (int)kind, seed, scale, c->geom.kv_lora, c->geom.rope,
                                         c->geom.rope_f32, c->geom.mla_rec_bytes, c->geom.idx_block_bytes);
    CU_LAUNCHED("fill");
    return 0;
}

/* stratified: position i of k from [i*n/k, (i+1)*n/k), n = pos + 1 */
static __global__ void random_sel_kernel(int32_t *sel, const int32_t *pos, int k, uint64_t seed)
{
    const int r = blockIdx.x;
    const long n = (long)pos[r] + 1;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        int32_t v;
        if (n <= k) {
            v = i < n ? i : -1;
        } else {
            const long lo = (long)i * n / k, hi = (long)(i + 1) * n / k;
            v = (int32_t)(lo + (long)(mix64(seed ^ mix64((uint64_t)r * k + i)) % (uint64_t)(hi - lo)));
        }
        sel[(size_t)r * k + i] = v;
    }
}

extern "C" int dsv32_cuda_random_selection(struct dsv32_backend *be, int32_t *sel, const int32_t *pos, int rows,
                                           int k, uint64_t seed)
{
    ENTER(be);
    if (rows <= 0)
        return 0;
    random_sel_kernel<<<rows, 256, 0, c->st>>>(sel, pos, k, seed);
    CU_LAUNCHED("random_selection");
    return 0;
}

extern "C" int dsv32_cuda_weight_random(struct dsv32_backend *be, struct dsv32_weight *w, const char *name,
                                        enum dsv32_dtype dt, int64_t rows, int64_t cols, uint64_t seed, float std)
{
    ENTER(be);
    memset(w, 0, sizeof(*w));
    w->name = name;
    w->dtype = dt;
    w->rows = rows;
    w->cols = cols;
    struct cu_weight *cw = (struct cu_weight *)calloc(1, sizeof(*cw));
    if (!cw)
        return -ENOMEM;
    cw->dtype = dt;
    cw->rows = rows;
    cw->cols = cols;
    const size_t n = (size_t)(rows * cols);
    const int is_vec = rows == 1;
    int r = 0;
    if (dt == DSV32_DT_F8_E4M3 && c->fast && !is_vec) {
        const size_t n_sc = (size_t)((rows + 127) / 128) * (size_t)((cols + 127) / 128);
        if (cudaMalloc(&cw->fp8, n) != cudaSuccess || cudaMalloc(&cw->scale, sizeof(float) * n_sc) != cudaSuccess) {
            r = DSV32_ECUDA;
            goto fail;
        }
        /* e4m3 of N(0, 64^2), block scale std/64 rounded to a power of two */
        fill_kernel<<<4096, 256, 0, c->st>>>(cw->fp8, n, DSV32_FILL_E4M3, seed, 64.0f, 0, 0, 0, 0, 0);
        int e;
        frexpf(std / 64.0f, &e);
        {
            float *h = (float *)malloc(sizeof(float) * n_sc);
            if (!h) {
                r = -ENOMEM;
                goto fail;
            }
            for (size_t i = 0; i < n_sc; i++)
                h[i] = ldexpf(1.0f, e - 1);
            cudaError_t ce =
                cudaMemcpyAsync(cw->scale, h, sizeof(float) * n_sc, cudaMemcpyHostToDevice, c->st);
            if (ce == cudaSuccess)
                ce = cudaStreamSynchronize(c->st); /* h is read until then */
            free(h);
            if (ce != cudaSuccess) {
                r = DSV32_ECUDA;
                goto fail;
            }
        }
    } else if ((dt == DSV32_DT_BF16 || dt == DSV32_DT_F8_E4M3) && c->fast && !is_vec) {
        if (cudaMalloc(&cw->bf16, sizeof(__nv_bfloat16) * n) != cudaSuccess) {
            r = DSV32_ECUDA;
            goto fail;
        }
        fill_kernel<<<4096, 256, 0, c->st>>>(cw->bf16, n, DSV32_FILL_BF16_NORMAL, seed, std, 0, 0, 0, 0, 0);
    } else {
        if (cudaMalloc(&cw->f32, sizeof(float) * n) != cudaSuccess) {
            r = DSV32_ECUDA;
            goto fail;
        }
        if (std < 0) {
            float *h = (float *)malloc(sizeof(float) * n);
            if (!h) {
                r = -ENOMEM;
                goto fail;
            }
            for (size_t i = 0; i < n; i++)
                h[i] = 1.0f;
            cudaError_t ce =
                cudaMemcpyAsync(cw->f32, h, sizeof(float) * n, cudaMemcpyHostToDevice, c->st);
            if (ce == cudaSuccess)
                ce = cudaStreamSynchronize(c->st); /* h is read until then */
            free(h);
            if (ce != cudaSuccess) {
                r = DSV32_ECUDA;
                goto fail;
            }
        } else {
            fill_kernel<<<4096, 256, 0, c->st>>>(cw->f32, n, DSV32_FILL_F32_NORMAL, seed, std, 0, 0, 0, 0, 0);
        }
        if (dt == DSV32_DT_F8_E4M3 && !is_vec)
            cw->dtype = w->dtype = DSV32_DT_F32; /* the exact mode has no FP8 form to draw */
    }
    if (cudaStreamSynchronize(c->st) != cudaSuccess) {
        r = DSV32_ECUDA;
        goto fail;
    }
    w->be = cw;
    return 0;
fail:
    log_error("cuda: random weight %s (%lld x %lld): %s", name, (long long)rows, (long long)cols,
              cudaGetErrorString(cudaGetLastError()));
    weight_free(cw);
    return r;
}

static cudaEvent_t timer_ev[2];

extern "C" int dsv32_cuda_timer_start(struct dsv32_backend *be)
{
    ENTER(be);
    if (!timer_ev[0]) {
        CU_CHECK(cudaEventCreate(&timer_ev[0]));
        CU_CHECK(cudaEventCreate(&timer_ev[1]));
    }
    CU_CHECK(cudaEventRecord(timer_ev[0], c->st));
    return 0;
}

extern "C" int dsv32_cuda_timer_stop(struct dsv32_backend *be, float *ms)
{
    ENTER(be);
    CU_CHECK(cudaEventRecord(timer_ev[1], c->st));
    CU_CHECK(cudaEventSynchronize(timer_ev[1]));
    CU_CHECK(cudaEventElapsedTime(ms, timer_ev[0], timer_ev[1]));
    return 0;
}

static __global__ void spin_kernel(unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    while (t - t0 < ns);
}

extern "C" int dsv32_cuda_spin(struct dsv32_backend *be, int us)
{
    ENTER(be);
    spin_kernel<<<1, 1, 0, c->st>>>((unsigned long long)us * 1000ull);
    CU_LAUNCHED("spin");
    return 0;
}

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

extern "C" int dsv32_cuda_copy_bandwidth(struct dsv32_backend *be, size_t bytes, int iters, double *gbps)
{
    ENTER(be);
    void *a = NULL, *b = NULL;
    float *t = (float *)malloc(sizeof(float) * (size_t)(iters > 0 ? iters : 1));
    int r = 0;
    if (!t)
        return -ENOMEM;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
        r = DSV32_ECUDA;
        goto out;
    }
    fill_kernel<<<4096, 256, 0, c->st>>>(a, bytes / 4, DSV32_FILL_F32_NORMAL, 7, 1.0f, 0, 0, 0, 0, 0);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c->st);
    for (int i = 0; i < iters && r == 0; i++) {
        if ((r = dsv32_cuda_timer_start(be)) < 0)
            break;
        if (cudaMemcpyAsync(i & 1 ? a : b, i & 1 ? b : a, bytes, cudaMemcpyDeviceToDevice, c->st) != cudaSuccess) {
            r = DSV32_ECUDA;
            break;
        }
        r = dsv32_cuda_timer_stop(be, &t[i]);
    }
    if (r == 0) {
        qsort(t, (size_t)iters, sizeof(float), cmp_f);
        *gbps = 2.0 * (double)bytes / (t[iters / 2] * 1e-3) / 1e9;
    }
out:
    cudaFree(a);
    cudaFree(b);
    free(t);
    return r;
}

extern "C" int dsv32_cuda_bf16_gemm_rate(struct dsv32_backend *be, int m, int n, int k, int iters, double *tflops)
{
    ENTER(be);
    void *A = NULL, *B = NULL, *C = NULL;
    float *t = (float *)malloc(sizeof(float) * (size_t)(iters > 0 ? iters : 1));
    const float one = 1.0f, zero = 0.0f;
    int r = 0;
    if (!t)
        return -ENOMEM;
    if (cudaMalloc(&A, 2 * (size_t)m * k) != cudaSuccess || cudaMalloc(&B, 2 * (size_t)k * n) != cudaSuccess ||
        cudaMalloc(&C, 2 * (size_t)m * n) != cudaSuccess) {
        r = DSV32_ECUDA;
        goto out;
    }
    fill_kernel<<<4096, 256, 0, c->st>>>(A, (size_t)m * k, DSV32_FILL_BF16_NORMAL, 11, 1.0f, 0, 0, 0, 0, 0);
    fill_kernel<<<4096, 256, 0, c->st>>>(B, (size_t)k * n, DSV32_FILL_BF16_NORMAL, 12, 1.0f, 0, 0, 0, 0, 0);
    for (int i = -2; i < iters && r == 0; i++) {
        if ((r = dsv32_cuda_timer_start(be)) < 0)
            break;
        if (cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A, CUDA_R_16BF, k, B, CUDA_R_16BF, k,
                         &zero, C, CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
            r = DSV32_ECUBLAS;
            break;
        }
        float ms;
        r = dsv32_cuda_timer_stop(be, &ms);
        if (i >= 0)
            t[i] = ms;
    }
    if (r == 0) {
        qsort(t, (size_t)iters, sizeof(float), cmp_f);
        *tflops = 2.0 * m * (double)n * k / (t[iters / 2] * 1e-3) / 1e12;
    }
out:
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    free(t);
    return r;
}

extern "C" int dsv32_cuda_device_info(struct dsv32_backend *be, char *name, size_t cap, int *n_sm)
{
    ENTER(be);
    cudaDeviceProp prop;
    CU_CHECK(cudaGetDeviceProperties(&prop, c->device));
    snprintf(name, cap, "%s", prop.name);
    *n_sm = prop.multiProcessorCount;
    return 0;
}
