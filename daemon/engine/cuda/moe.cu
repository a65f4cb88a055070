/* MoE kernels of the cuda backend (see moe.cuh). Entries: one per (token, routed expert) pair
 * whose expert is loaded; the routing kernel groups them by expert (order inside a group does not
 * matter: every entry's result depends only on its own row) and records, per pair, its entry. */
#include "moe.cuh"

#include "gemm.cuh"
#include "quant.cuh"
#include "small_ops.cuh"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct cu_expert_table {
    const struct dsv32_ffn_weights *key;
    int E;
    int kind;  /* 0 f32, 1 bf16, 2 fp8 (fast mode) */
    int tiled; /* fp8: the matrices in cu_fp8_at's tiles */
    const void **d_w[3];
    const float **d_s[3];
    uint8_t *d_loaded;
    struct cu_expert_table *next;
};

void cu_moe_tables_free(struct cu_ctx *c)
{
    while (c->tables) {
        struct cu_expert_table *t = c->tables;
        c->tables = t->next;
        for (int i = 0; i < 3; i++) {
            cudaFree(t->d_w[i]);
            cudaFree(t->d_s[i]);
        }
        cudaFree(t->d_loaded);
        free(t);
    }
}

static __global__ void fp8_tile_kernel(uint8_t *dst, const uint8_t *src, int N, int K)
{
    const size_t n16 = (size_t)N * K / 16, per_row = (size_t)K / 16;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16;
         i += (size_t)gridDim.x * blockDim.x) {
        const int n = (int)(i / per_row);
        const size_t k = (i - (size_t)n * per_row) * 16;
        *reinterpret_cast<uint4 *>(dst + cu_fp8_at(1, n, k, N, K)) =
            *reinterpret_cast<const uint4 *>(src + (size_t)n * K + k);
    }
}

/* expert x's three matrices as the backend holds them (w1, w2, w3 in cw); false when it is not
 * loaded on this GPU */
static bool expert_mats(const struct dsv32_ffn_weights *x, struct cu_weight *cw[3])
{
    if (!dsv32_weight_loaded(&x->w1))
        return false;
    cw[0] = (struct cu_weight *)x->w1.be;
    cw[1] = (struct cu_weight *)x->w2.be;
    cw[2] = (struct cu_weight *)x->w3.be;
    return true;
}

static bool tileable(const struct cu_weight *cw)
{
    return cw && cw->fp8 && !cw->fp8_tiled && cw->rows % 128 == 0 && cw->cols % 128 == 0;
}

/* The routed experts' FP8 matrices rearranged in place into 128 x 128 tiles of 16 KB (each
 * through a copy in tmp, on the stream), so that a grouped GEMM's CTA, which streams its 128
 * weight rows 128 bytes of each at a time, reads 16 KB contiguous per step instead of 128 rows
 * 7 KB apart, and the CTAs of one expert, at the same K step, neighbouring tiles. Those with a
 * shape that is not in whole tiles stay row-major; all stay so when the copy buffer cannot be had
 * (a table mixing tiled and row-major matrices, which that could leave when experts are replaced
 * later, is refused: DSV32_EUNSUPPORTED). */
static int tile_experts(struct cu_ctx *c, const struct dsv32_ffn_weights *experts, int E)
{
    /* the copy buffer for the largest matrix, first: without it nothing is tiled (a table of
     * row-major experts works as before) */
    size_t tmp_bytes = 0;
    for (int e = 0; e < E; e++) {
        struct cu_weight *mats[3];
        if (!expert_mats(&experts[e], mats))
            continue;
        for (int i = 0; i < 3; i++) {
            const struct cu_weight *cw = mats[i];
            if (tileable(cw) && (size_t)cw->rows * cw->cols > tmp_bytes)
                tmp_bytes = (size_t)cw->rows * cw->cols;
        }
    }
    if (!tmp_bytes)
        return 0;
    uint8_t *tmp = NULL;
    cudaError_t ce = cudaMalloc(&tmp, tmp_bytes);
    if (ce != cudaSuccess) {
        cudaGetLastError();
        log_warn("cuda: no %zu bytes to tile the routed experts' FP8 matrices; they stay row-major",
                 tmp_bytes);
        return 0;
    }
    for (int e = 0; e < E && ce == cudaSuccess; e++) {
        struct cu_weight *mats[3];
        if (!expert_mats(&experts[e], mats))
            continue;
        for (int i = 0; i < 3 && ce == cudaSuccess; i++) {
            struct cu_weight *cw = mats[i];
            if (!tileable(cw))
                continue;
            const size_t bytes = (size_t)cw->rows * cw->cols;
            ce = cudaMemcpyAsync(tmp, cw->fp8, bytes, cudaMemcpyDeviceToDevice, c->st);
            if (ce == cudaSuccess) {
                fp8_tile_kernel<<<1024, 256, 0, c->st>>>(cw->fp8, tmp, (int)cw->rows,
                                                         (int)cw->cols);
                ce = cudaPeekAtLastError();
            }
            if (ce == cudaSuccess)
                cw->fp8_tiled = 1;
        }
    }
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(c->st);
    cudaFree(tmp);
    if (ce != cudaSuccess) {
        log_error("cuda: tiling the routed experts' FP8 matrices: %s", cudaGetErrorString(ce));
        return DSV32_ECUDA;
    }
    return 0;
}

static int expert_table(struct cu_ctx *c, const struct dsv32_ffn_weights *experts, int E,
                        struct cu_expert_table **ret)
{
    for (struct cu_expert_table *t = c->tables; t; t = t->next)
        if (t->key == experts && t->E == E) {
            *ret = t;
            return 0;
        }
    struct cu_expert_table *t = (struct cu_expert_table *)calloc(1, sizeof(*t));
    const void **hw = (const void **)calloc((size_t)E * 3, sizeof(void *));
    const float **hs = (const float **)calloc((size_t)E * 3, sizeof(float *));
    uint8_t *hl = (uint8_t *)calloc((size_t)E, 1);
    int r = 0;
    if (!t || !hw || !hs || !hl) {
        r = -ENOMEM;
        goto fail;
    }
    t->key = experts;
    t->E = E;
    t->kind = -1;
    t->tiled = -1;
    if (!c->moe_rowmajor && (r = tile_experts(c, experts, E)) < 0)
        goto fail;
    for (int e = 0; e < E; e++) {
        struct cu_weight *mats[3];
        if (!expert_mats(&experts[e], mats))
            continue;
        for (int i = 0; i < 3; i++) {
            const struct cu_weight *cw = mats[i];
            if (!cw) {
                r = -EINVAL;
                goto fail;
            }
            const int kind = cw->fp8 ? 2 : cw->bf16 ? 1 : 0;
            if (t->kind >= 0 && kind != t->kind) {
                r = DSV32_EDTYPE;
                goto fail;
            }
            t->kind = kind;
            if (kind == 2) { /* all tiled or none: one layout for the table's GEMMs */
                if (t->tiled >= 0 && t->tiled != cw->fp8_tiled) {
                    log_error("cuda: the routed experts' FP8 matrices are partly tiled, partly "
                              "row-major (expert %d)",
                              e);
                    r = DSV32_EUNSUPPORTED;
                    goto fail;
                }
                t->tiled = cw->fp8_tiled;
            }
            hw[i * E + e] = kind == 2 ? (const void *)cw->fp8 : kind == 1 ? (const void *)cw->bf16 : (const void *)cw->f32;
            hs[i * E + e] = cw->scale;
        }
        hl[e] = 1;
    }
    /* the tables go on c->st, ahead of the kernels that read them (common.cuh), and are in place
     * before hw, hs and hl are freed */
    for (int i = 0; i < 3; i++) {
        if (cudaMalloc(&t->d_w[i], sizeof(void *) * (size_t)E) != cudaSuccess ||
            cudaMalloc(&t->d_s[i], sizeof(float *) * (size_t)E) != cudaSuccess ||
            cudaMemcpyAsync(t->d_w[i], hw + (size_t)i * E, sizeof(void *) * (size_t)E,
                            cudaMemcpyHostToDevice, c->st) != cudaSuccess ||
            cudaMemcpyAsync(t->d_s[i], hs + (size_t)i * E, sizeof(float *) * (size_t)E,
                            cudaMemcpyHostToDevice, c->st) != cudaSuccess) {
            r = DSV32_ECUDA;
            goto fail;
        }
    }
    if (cudaMalloc(&t->d_loaded, (size_t)E) != cudaSuccess ||
        cudaMemcpyAsync(t->d_loaded, hl, (size_t)E, cudaMemcpyHostToDevice, c->st) != cudaSuccess ||
        cudaStreamSynchronize(c->st) != cudaSuccess) {
        r = DSV32_ECUDA;
        goto fail;
    }
    free(hw);
    free(hs);
    free(hl);
    t->next = c->tables;
    c->tables = t;
    *ret = t;
    return 0;
fail:
    if (r == DSV32_ECUDA)
        log_error("cuda: expert table of %d experts: %s", E, cudaGetErrorString(cudaGetLastError()));
    if (t) {
        for (int i = 0; i < 3; i++) {
            cudaFree(t->d_w[i]);
            cudaFree(t->d_s[i]);
        }
        cudaFree(t->d_loaded);
    }
    free(t);
    free(hw);
    free(hs);
    free(hl);
    return r;
}

/* ---- router ---- */

static __global__ void gate_route_kernel(int32_t *ids, float *wout, const float *logits, const float *bias,
                                         int rows, int E, int G, int topk_group, int K, int sigmoid, int norm,
                                         float rsf)
{
    extern __shared__ float gsm[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= rows)
        return;
    float *orig = gsm + (size_t)warp * (2 * E + 2 * G + E);
    float *sel = orig + E, *gs = sel + E, *keep = gs + G, *taken = keep + G;
    const float *l = logits + (size_t)r * E;
    if (sigmoid) {
        for (int e = lane; e < E; e += 32)
            orig[e] = 1.0f / (1.0f + expf(-l[e]));
    } else {
        float mx = -INFINITY;
        for (int e = lane; e < E; e += 32)
            mx = fmaxf(mx, l[e]);
        mx = cu_warp_max(mx);
        float s = 0.0f;
        for (int e = lane; e < E; e += 32)
            s += (orig[e] = expf(l[e] - mx));
        s = cu_warp_sum(s);
        for (int e = lane; e < E; e += 32)
            orig[e] /= s;
    }
    for (int e = lane; e < E; e += 32) {
        sel[e] = bias ? orig[e] + bias[e] : orig[e];
        taken[e] = 0.0f;
    }
    __syncwarp();
    if (G > 1) {
        const int per = E / G;
        for (int gi = lane; gi < G; gi += 32) {
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int e = gi * per; e < (gi + 1) * per; e++) {
                if (sel[e] > m1) {
                    m2 = m1;
                    m1 = sel[e];
                } else if (sel[e] > m2) {
                    m2 = sel[e];
                }
            }
            gs[gi] = bias ? m1 + m2 : m1;
            keep[gi] = 0.0f;
        }
        __syncwarp();
        if (lane == 0)
            for (int tg = 0; tg < topk_group; tg++) {
                int best = -1;
                for (int gi = 0; gi < G; gi++)
                    if (keep[gi] == 0.0f && (best < 0 || gs[gi] > gs[best]))
                        best = gi;
                keep[best] = 1.0f;
            }
        __syncwarp();
        for (int e = lane; e < E; e += 32)
            if (keep[e / per] == 0.0f)
                sel[e] = -INFINITY;
        __syncwarp();
    }
    float wk[16];
    int idk[16];
    for (int kk = 0; kk < K && kk < 16; kk++) {
        float bv = 0.0f;
        int bi = -1;
        for (int e = lane; e < E; e += 32)
            if (taken[e] == 0.0f && (bi < 0 || sel[e] > bv)) {
                bv = sel[e];
                bi = e;
            }
        warp_argmax(bv, bi);
        idk[kk] = bi;
        wk[kk] = orig[bi];
        if (lane == 0)
            taken[bi] = 1.0f;
        __syncwarp();
    }
    if (lane == 0) {
        float wsum = 0.0f;
        for (int kk = 0; kk < K; kk++)
            wsum += wk[kk];
        for (int kk = 0; kk < K; kk++) {
            float v = wk[kk];
            if (sigmoid && norm)
                v /= wsum;
            ids[(size_t)r * K + kk] = idk[kk];
            wout[(size_t)r * K + kk] = v * rsf;
        }
    }
}

/* gate_route_kernel's routing with a row's scores in registers: lane l holds experts l NE ..
 * l NE + NE - 1 (E = 32 NE), and a group of per experts is per / NE lanes (a power of two), so
 * that the group maxima, the groups' ranks and each of the K picks are shuffles instead of
 * loops over shared memory (15 us for one row in gate_route_kernel, most of it the serial scans
 * of lane 0 and of the first G lanes). The same choices: the top-2 sum (or the max, without a
 * bias) per group, the topk_group best groups with ties to the lower group, then the K best
 * experts of those with ties to the lower id; weights from the scores before the bias. */
template <int NE>
static __global__ void gate_route_reg_kernel(int32_t *ids, float *wout, const float *logits,
                                             const float *bias, int rows, int G, int topk_group,
                                             int K, int sigmoid, int norm, float rsf)
{
    pdl_begin(); /* cu_launch_dep */
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows)
        return;
    constexpr int E = 32 * NE;
    float orig[NE], sel[NE];
    const float *l = logits + (size_t)r * E + lane * NE;
#pragma unroll
    for (int i = 0; i < NE; i++)
        orig[i] = l[i];
    if (sigmoid) {
#pragma unroll
        for (int i = 0; i < NE; i++)
            orig[i] = 1.0f / (1.0f + expf(-orig[i]));
    } else {
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < NE; i++)
            mx = fmaxf(mx, orig[i]);
        mx = cu_warp_max(mx);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < NE; i++)
            s += (orig[i] = expf(orig[i] - mx));
        s = cu_warp_sum(s);
#pragma unroll
        for (int i = 0; i < NE; i++)
            orig[i] /= s;
    }
#pragma unroll
    for (int i = 0; i < NE; i++)
        sel[i] = bias ? orig[i] + bias[lane * NE + i] : orig[i];
    if (G > 1) {
        const int lpg = E / G / NE; /* lanes a group */
        float m1 = -INFINITY, m2 = -INFINITY;
#pragma unroll
        for (int i = 0; i < NE; i++) {
            if (sel[i] > m1) {
                m2 = m1;
                m1 = sel[i];
            } else if (sel[i] > m2) {
                m2 = sel[i];
            }
        }
        for (int o = 1; o < lpg; o <<= 1) { /* the group's two largest, over its lanes */
            const float b1 = __shfl_xor_sync(0xffffffffu, m1, o),
                        b2 = __shfl_xor_sync(0xffffffffu, m2, o);
            m2 = fmaxf(fminf(m1, b1), fmaxf(m2, b2));
            m1 = fmaxf(m1, b1);
        }
        const float gs = bias ? m1 + m2 : m1;
        const int grp = lane / lpg;
        int beaten = 0; /* groups ranked before this lane's */
        for (int h = 0; h < G; h++) {
            const float gh = __shfl_sync(0xffffffffu, gs, h * lpg);
            beaten += gh > gs || (gh == gs && h < grp);
        }
        if (beaten >= topk_group)
#pragma unroll
            for (int i = 0; i < NE; i++)
                sel[i] = -INFINITY;
    }
    unsigned taken = 0;
    float wsum = 0.0f, wk = 0.0f;
    int idk = -1;
    for (int kk = 0; kk < K; kk++) {
        float bv = 0.0f;
        int bi = -1;
#pragma unroll
        for (int i = 0; i < NE; i++)
            if (!(taken >> i & 1u) && (bi < 0 || sel[i] > bv)) {
                bv = sel[i];
                bi = lane * NE + i;
            }
        warp_argmax(bv, bi);
        float ow = 0.0f;
#pragma unroll
        for (int i = 0; i < NE; i++)
            if (bi == lane * NE + i) {
                taken |= 1u << i;
                ow = orig[i];
            }
        ow = __shfl_sync(0xffffffffu, ow, bi / NE);
        wsum += ow;
        if (lane == kk) { /* lane kk keeps pick kk */
            idk = bi;
            wk = ow;
        }
    }
    if (lane < K) {
        float v = wk;
        if (sigmoid && norm)
            v /= wsum;
        ids[(size_t)r * K + lane] = idk;
        wout[(size_t)r * K + lane] = v * rsf;
    }
}

int cu_moe_gate(struct cu_ctx *c, int32_t *ids, float *w, const float *x, int rows,
                const struct dsv32_weight *gate, const struct dsv32_weight *bias)
{
    const struct dsv32_config *cf = c->cfg;
    const int E = cf->n_routed_experts, G = cf->n_group > 0 ? cf->n_group : 1, K = cf->num_experts_per_tok;
    const int D = cf->hidden_size;
    if (rows <= 0)
        return 0;
    if (K > 16 || E % G || E > 4096)
        return DSV32_ECONFIG;
    const struct cu_weight *gw = (const struct cu_weight *)gate->be;
    float *logits = (float *)cu_scratch(c, SCR_MOE_A, sizeof(float) * (size_t)rows * E);
    if (!logits)
        return -ENOMEM;
    /* the router's GEMM never quantizes its input (the reference runs it in the weight's type) */
    if (gw->f32) {
        CU_TRY(cu_sgemm_xwt(c, logits, E, x, D, rows, gw->f32, E, D));
    } else if (gw->bf16) {
        __nv_bfloat16 *xb = (__nv_bfloat16 *)cu_scratch(c, SCR_BF16, sizeof(__nv_bfloat16) * (size_t)rows * D);
        if (!xb)
            return -ENOMEM;
        CU_TRY(cu_to_bf16(c, xb, x, rows, D, D));
        CU_TRY(cu_bgemm_xwt(c, logits, E, xb, D, rows, gw->bf16, E, D));
    } else {
        return DSV32_EUNSUPPORTED;
    }
    const struct cu_weight *bw = bias && bias->be ? (const struct cu_weight *)bias->be : NULL;
    /* the register kernel where its layout fits: E = 32 NE, a group whole lanes, a power of two */
    const int NE = E / 32, lpg = NE ? E / G / NE : 0;
    if (!c->route_smem && E % 32 == 0 && (NE == 1 || NE == 2 || NE == 4 || NE == 8) &&
        (E / G) % NE == 0 && lpg > 0 && (lpg & (lpg - 1)) == 0 && K <= 32) {
        const float *bp = bw ? bw->f32 : NULL;
        const int sg = cf->scoring_sigmoid, nt = cf->norm_topk_prob;
        const float rsf = cf->routed_scaling_factor;
        const unsigned nb = cu_blocks((size_t)rows, 8);
        if (NE == 8)
            CU_CHECK(cu_launch_dep(c, gate_route_reg_kernel<8>, dim3(nb), dim3(256), 0, ids, w,
                                   logits, bp, rows, G, cf->topk_group, K, sg, nt, rsf));
        else if (NE == 4)
            CU_CHECK(cu_launch_dep(c, gate_route_reg_kernel<4>, dim3(nb), dim3(256), 0, ids, w,
                                   logits, bp, rows, G, cf->topk_group, K, sg, nt, rsf));
        else if (NE == 2)
            CU_CHECK(cu_launch_dep(c, gate_route_reg_kernel<2>, dim3(nb), dim3(256), 0, ids, w,
                                   logits, bp, rows, G, cf->topk_group, K, sg, nt, rsf));
        else
            CU_CHECK(cu_launch_dep(c, gate_route_reg_kernel<1>, dim3(nb), dim3(256), 0, ids, w,
                                   logits, bp, rows, G, cf->topk_group, K, sg, nt, rsf));
        CU_LAUNCHED("gate_route_reg");
        return 0;
    }
    const size_t smem = sizeof(float) * 8 * (size_t)(3 * E + 2 * G);
    if (smem > 48 * 1024)
        CU_SMEM_OPTIN(gate_route_kernel, smem);
    gate_route_kernel<<<cu_blocks((size_t)rows, 8), 256, smem, c->st>>>(
        ids, w, logits, bw ? bw->f32 : NULL, rows, E, G, cf->topk_group, K, cf->scoring_sigmoid,
        cf->norm_topk_prob, cf->routed_scaling_factor);
    CU_LAUNCHED("gate_route");
    return 0;
}

/* ---- experts ---- */

static __global__ void __launch_bounds__(1024)
    route_kernel(const int32_t *ids, int n_pairs, int k, int E, const uint8_t *loaded, int *grp_off,
                 int *grp_list, int *slot_of, int *entry_tok, int *entry_sub, int *entry_e)
{
    extern __shared__ int rsm[];
    pdl_begin(); /* cu_launch_dep */
    int *cnt = rsm, *off = rsm + E, *fill = rsm + 2 * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = fill[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const int e = ids[i];
        if (e >= 0 && e < E && loaded[e])
            atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) { /* the offsets and the list of experts with rows, 32 experts a step */
        const int lane = threadIdx.x;
        int o = 0, n = 0;
        for (int e0 = 0; e0 < E; e0 += 32) {
            const int e = e0 + lane, c = e < E ? cnt[e] : 0;
            int tot;
            const int ex = warp_excl_scan(c, lane, &tot);
            const unsigned act = __ballot_sync(0xffffffffu, c > 0);
            if (e < E) {
                off[e] = grp_off[e] = o + ex;
                if (c)
                    grp_list[n + __popc(act & ((1u << lane) - 1u))] = e;
            }
            o += tot;
            n += __popc(act);
        }
        if (lane == 0) {
            grp_off[E] = o;
            grp_list[E] = n;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const int e = ids[i];
        if (e >= 0 && e < E && loaded[e]) {
            const int s = off[e] + atomicAdd(&fill[e], 1);
            slot_of[i] = s;
            entry_tok[s] = i / k;
            entry_sub[s] = 1 + i % k;
            entry_e[s] = e;
        } else {
            slot_of[i] = -1;
        }
    }
}

template <typename WT> static __device__ __forceinline__ float wval(const WT *p, size_t i);
template <> __device__ __forceinline__ float wval<float>(const float *p, size_t i) { return p[i]; }
template <> __device__ __forceinline__ float wval<__nv_bfloat16>(const __nv_bfloat16 *p, size_t i)
{
    return __bfloat162float(p[i]);
}

/* h[s, f] = silu(x[tok] . w1[e, f]) * (x[tok] . w3[e, f]); one warp per feature */
template <typename WT>
static __global__ void moe_up_kernel(float *h, const float *xin, const int *entry_tok, const int *entry_e,
                                     const int *grp_off, int E, const void *const *w1, const void *const *w3,
                                     int D, int I)
{
    const int s = blockIdx.y, lane = threadIdx.x & 31, f = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (s >= grp_off[E] || f >= I)
        return;
    const int e = entry_e[s];
    const float *xr = xin + (size_t)entry_tok[s] * D;
    const WT *a = (const WT *)w1[e] + (size_t)f * D, *b = (const WT *)w3[e] + (size_t)f * D;
    float ga = 0.0f, ub = 0.0f;
    for (int d = lane; d < D; d += 32) {
        ga += xr[d] * wval(a, d);
        ub += xr[d] * wval(b, d);
    }
    ga = cu_warp_sum(ga);
    ub = cu_warp_sum(ub);
    if (lane == 0)
        h[(size_t)s * I + f] = __fmul_rn(__fdiv_rn(ga, 1.0f + expf(-ga)), ub);
}

/* out[s, d] = h[s] . w2[e, d] */
template <typename WT>
static __global__ void moe_down_kernel(float *out, const float *h, const int *entry_e, const int *grp_off, int E,
                                       const void *const *w2, int D, int I)
{
    const int s = blockIdx.y, lane = threadIdx.x & 31, d = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (s >= grp_off[E] || d >= D)
        return;
    const WT *wr = (const WT *)w2[entry_e[s]] + (size_t)d * I;
    const float *hr = h + (size_t)s * I;
    float acc = 0.0f;
    for (int i = lane; i < I; i += 32)
        acc += hr[i] * wval(wr, i);
    acc = cu_warp_sum(acc);
    if (lane == 0)
        out[(size_t)s * D + d] = acc;
}

/* h <- dequant(quant(h)) per 1x128 block, the probe seeing (1 + slot, token, col) */
static __global__ void moe_hquant_kernel(float *h, int I, const int *grp_off, int E, const int *entry_sub,
                                         const int *entry_tok, int ue8m0, struct cu_probe p)
{
    const int nb = I / 128, lane = threadIdx.x & 31;
    const long id = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int s = (int)(id / nb), b = (int)(id % nb);
    if (s >= grp_off[E])
        return;
    float *hr = h + (size_t)s * I + b * 128;
    float v[4], amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        v[j] = hr[lane + 32 * j];
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = cu_warp_max(amax);
    const float sc = cu_block_scale(amax, ue8m0);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int col = b * 128 + lane + 32 * j;
        hr[lane + 32 * j] = __fmul_rn(cu_e4m3_to_f32(cu_quant(v[j] / sc, p, entry_sub[s], entry_tok[s], col)), sc);
    }
}

/* y[r] = sum over the row's experts in ascending id order of w * out[entry]; a thread 4
 * consecutive columns of one row (its expert rows' loads in flight together), grid (columns /
 * 1024, rows). One CTA a row looping over the columns took 93 us at one row: every iteration
 * reloaded the row's slots and weights behind its stores' possible aliases. */
static __global__ void moe_combine_kernel(float *y, const float *out, const int *slot_of, const int32_t *ids,
                                          const float *w, int k, int D)
{
    pdl_begin(); /* cu_launch_dep */
    const int r = blockIdx.y, d = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    int order[16], n = 0;
    for (int kk = 0; kk < k && kk < 16; kk++) {
        if (slot_of[r * k + kk] < 0)
            continue;
        int i = n++;
        while (i > 0 && ids[r * k + order[i - 1]] > ids[r * k + kk]) {
            order[i] = order[i - 1];
            i--;
        }
        order[i] = kk;
    }
    if (d >= D)
        return;
    float4 v[16];
    float wk[16];
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (i < n) {
            v[i] =
                *reinterpret_cast<const float4 *>(out + (size_t)slot_of[r * k + order[i]] * D + d);
            wk[i] = w[r * k + order[i]];
        }
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < 16; i++)
        if (i < n) {
            acc.x = __fadd_rn(acc.x, __fmul_rn(v[i].x, wk[i]));
            acc.y = __fadd_rn(acc.y, __fmul_rn(v[i].y, wk[i]));
            acc.z = __fadd_rn(acc.z, __fmul_rn(v[i].z, wk[i]));
            acc.w = __fadd_rn(acc.w, __fmul_rn(v[i].w, wk[i]));
        }
    *reinterpret_cast<float4 *>(y + (size_t)r * D + d) = acc;
}

int cu_moe_experts(struct cu_ctx *c, float *y, const float *x, int rows, const int32_t *ids,
                   const float *w, int k, const struct dsv32_ffn_weights *experts, int n_experts,
                   int ue8m0)
{
    const int D = c->cfg->hidden_size, I = c->cfg->moe_intermediate_size, E = n_experts;
    if (rows <= 0)
        return 0;
    if (k > 16 || E <= 0 || D % 4)
        return DSV32_ECONFIG;
    struct cu_expert_table *tab;
    CU_TRY(expert_table(c, experts, E, &tab));
    const int n_pairs = rows * k;
    if (tab->kind < 0) { /* no expert loaded here: y = 0 */
        CU_CHECK(cudaMemsetAsync(y, 0, sizeof(float) * (size_t)rows * D, c->st));
        return 0;
    }
    const int is_fp8 = experts[0].w1.dtype == DSV32_DT_F8_E4M3;
    /* routing buffers: grp_off, grp_list (E+1 each), slot_of, entry_tok, entry_sub, entry_e
     * (n_pairs each) */
    int *rb =
        (int *)cu_scratch(c, SCR_MOE_A, sizeof(int) * (2 * ((size_t)E + 1) + 4 * (size_t)n_pairs));
    if (!rb)
        return -ENOMEM;
    int *grp_off = rb, *grp_list = rb + E + 1, *slot_of = grp_list + E + 1,
        *entry_tok = slot_of + n_pairs, *entry_sub = entry_tok + n_pairs;
    int *entry_e = entry_sub + n_pairs;
    CU_CHECK(cu_launch_dep(c, route_kernel, dim3(1), dim3(1024), sizeof(int) * 3 * (size_t)E, ids,
                           n_pairs, k, E, (const uint8_t *)tab->d_loaded, grp_off, grp_list,
                           slot_of, entry_tok, entry_sub, entry_e));
    CU_LAUNCHED("moe_route");
    float *out = (float *)cu_scratch(c, SCR_MOE_B, sizeof(float) * (size_t)n_pairs * D);
    if (!out)
        return -ENOMEM;
    if (tab->kind == 2) {
        /* fast FP8: quantize each token once (sub 0), grouped SwiGLU GEMM with fused FP8 output
         * quantization, grouped down projection */
        uint8_t *xq = (uint8_t *)cu_scratch(c, SCR_XQ, (size_t)rows * D);
        float *xs = (float *)cu_scratch(c, SCR_XS, sizeof(float) * (size_t)rows * (D / 128));
        uint8_t *hq = (uint8_t *)cu_scratch(c, SCR_MOE_C, (size_t)n_pairs * I);
        float *hs = (float *)cu_scratch(c, SCR_MOE_D, sizeof(float) * (size_t)n_pairs * (I / 128));
        if (!xq || !xs || !hq || !hs)
            return -ENOMEM;
        CU_TRY(cu_act_quant(c, x, D, rows, D, ue8m0, 0, NULL, xq, xs, NULL, 0));
        struct cu_fp8_gemm a;
        memset(&a, 0, sizeof(a));
        a.xq = xq;
        a.xs = xs;
        a.K = D;
        a.N = I;
        a.n_groups = E;
        a.w1 = (const uint8_t *const *)tab->d_w[0];
        a.s1 = tab->d_s[0];
        a.w3 = (const uint8_t *const *)tab->d_w[2];
        a.s3 = tab->d_s[2];
        a.grp_off = grp_off;
        a.grp_list = c->moe_all_groups ? NULL : grp_list;
        a.w_tiled = tab->tiled > 0;
        a.M = n_pairs;
        a.row_x = entry_tok;
        a.hq = hq;
        a.hs = hs;
        a.entry_sub = entry_sub;
        a.entry_row = entry_tok;
        a.ue8m0 = ue8m0;
        CU_TRY(cu_fp8_gemm_run(c, &a));
        memset(&a, 0, sizeof(a));
        a.xq = hq;
        a.xs = hs;
        a.K = I;
        a.N = D;
        a.n_groups = E;
        a.w1 = (const uint8_t *const *)tab->d_w[1];
        a.s1 = tab->d_s[1];
        a.grp_off = grp_off;
        a.grp_list = c->moe_all_groups ? NULL : grp_list;
        a.w_tiled = tab->tiled > 0;
        a.M = n_pairs;
        a.y = out;
        a.ldy = D;
        CU_TRY(cu_fp8_gemm_run(c, &a));
    } else {
        float *h = (float *)cu_scratch(c, SCR_MOE_C, sizeof(float) * (size_t)n_pairs * I);
        if (!h)
            return -ENOMEM;
        const float *xin = x;
        if (is_fp8) {
            float *xdq = (float *)cu_scratch(c, SCR_TMP, sizeof(float) * (size_t)rows * D);
            if (!xdq)
                return -ENOMEM;
            CU_TRY(cu_act_quant(c, x, D, rows, D, ue8m0, 0, xdq, NULL, NULL, NULL, 0));
            xin = xdq;
        }
        const dim3 gu(cu_blocks((size_t)I, 8), n_pairs), gd(cu_blocks((size_t)D, 8), n_pairs);
        if (tab->kind == 1)
            moe_up_kernel<__nv_bfloat16><<<gu, 256, 0, c->st>>>(h, xin, entry_tok, entry_e, grp_off, E,
                                                                (const void *const *)tab->d_w[0],
                                                                (const void *const *)tab->d_w[2], D, I);
        else
            moe_up_kernel<float><<<gu, 256, 0, c->st>>>(h, xin, entry_tok, entry_e, grp_off, E,
                                                        (const void *const *)tab->d_w[0],
                                                        (const void *const *)tab->d_w[2], D, I);
        CU_LAUNCHED("moe_up");
        if (is_fp8) {
            if (I % 128)
                return DSV32_ECONFIG;
            struct cu_probe p;
            CU_TRY(cu_probe_begin(c, &p));
            const long warps = (long)n_pairs * (I / 128);
            moe_hquant_kernel<<<(unsigned)((warps + 7) / 8), 256, 0, c->st>>>(h, I, grp_off, E, entry_sub, entry_tok,
                                                                             ue8m0, p);
            CU_LAUNCHED("moe_hquant");
            CU_TRY(cu_probe_end(c, &p));
        }
        if (tab->kind == 1)
            moe_down_kernel<__nv_bfloat16><<<gd, 256, 0, c->st>>>(out, h, entry_e, grp_off, E,
                                                                  (const void *const *)tab->d_w[1], D, I);
        else
            moe_down_kernel<float><<<gd, 256, 0, c->st>>>(out, h, entry_e, grp_off, E,
                                                          (const void *const *)tab->d_w[1], D, I);
        CU_LAUNCHED("moe_down");
    }
    CU_CHECK(cu_launch_dep(c, moe_combine_kernel, dim3(cu_blocks((size_t)D, 1024), rows), dim3(256),
                           0, y, (const float *)out, (const int *)slot_of, ids, w, k, D));
    CU_LAUNCHED("moe_combine");
    return 0;
}
