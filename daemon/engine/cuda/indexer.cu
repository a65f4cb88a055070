/* DSA indexer kernels (see indexer.cuh).
 *
 * Scores. The logits q_h . k_j are a small GEMM per cache block: A = 64 keys (4 warps x 16, the
 * m16 rows of mma), B = the heads of a query row (n8 tiles of 8 heads), K = 128. Default variant:
 * mma.m16n8k16 in f16 on exact e4m3 -> f16 conversions (products exact, f32 accumulation: the
 * cpu's result up to summation order). FP8 variant: mma.m16n8k32 on the e4m3 bytes directly
 * (half the instructions, no conversions; the tensor core's FP8 accumulation is not f32-exact).
 * As in the FP8 GEMM, lane (g, t) owns bytes [32t, 32t+32) of its key rows and of each head's q,
 * the K order inside being permuted the same way for A and B. The keys of a block are read once
 * per CTA (16-byte loads, next block prefetched), q is converted once into fragment order in
 * shared memory; relu, the per-head weights and the head sum are applied on the accumulator
 * (quad shuffles), then the key scale.
 *
 * Top-k. One CTA of 1024 threads per row: a radix select of the k-th largest score on the
 * order-preserving 32-bit key (11 + 11 + 10 bits, three passes), then the selected positions are
 * written in ascending order: each warp owns a contiguous segment, counts what it keeps (ballots),
 * one scan over the 32 warps gives the output offsets, and a second sweep writes. Among scores
 * equal to the threshold the lowest positions are kept. */
#include "indexer.cuh"

#include <errno.h>
#include <string.h>

#define IDX_QT 4 /* query rows per CTA */
#define IDX_STAGES 6 /* cp.async ring depth of the FP8 decode kernel */

static __device__ __forceinline__ uint32_t cvt_e4m3x2(uint32_t two)
{
    uint32_t r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((unsigned short)(two & 0xffffu)));
    return r;
}

static __device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t w32(const uint4 &v, int i)
{
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/* work item: rows [x, x + y) of one sequence, cache blocks [z, w) */
template <bool FP8, int NT>
static __global__ void __launch_bounds__(128) idx_scores_kernel(
    float *scores, int ld_s, int row_base, const int4 *work, const uint8_t *q, const float *q_scale,
    const float *w_raw, const uint8_t *cache, int block_bytes, const int32_t *blocks, int max_blocks,
    const int32_t *row_pos, const int32_t *row_seq, int IH, float wscale, float sscale)
{
    constexpr int STEPS = FP8 ? 4 : 8; /* k-steps over the 128 dims */
    extern __shared__ uint2 qf[];      /* [row][ntile][step][lane] */
    const int4 wk = work[blockIdx.x];
    const int r0 = wk.x, nr = wk.y; /* NT = IH / 8 head tiles, a compile-time constant */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    float *wsm = reinterpret_cast<float *>(qf + (size_t)nr * NT * STEPS * 32); /* [row][head] */

    /* q into fragment order; the weights as the cpu forms them */
    for (int e = threadIdx.x; e < nr * NT * STEPS * 32; e += blockDim.x) {
        const int ln = e & 31, s = (e >> 5) % STEPS, nt = (e / (32 * STEPS)) % NT, i = e / (32 * STEPS * NT);
        const int head = nt * 8 + (ln >> 2), tt = ln & 3;
        const uint8_t *qp = q + ((size_t)(r0 + i) * IH + head) * 128 + 32 * tt;
        uint2 v;
        if (FP8) {
            v.x = *reinterpret_cast<const uint32_t *>(qp + 8 * s);
            v.y = *reinterpret_cast<const uint32_t *>(qp + 8 * s + 4);
        } else {
            const uint32_t wd = *reinterpret_cast<const uint32_t *>(qp + 4 * s);
            v.x = cvt_e4m3x2(wd);
            v.y = cvt_e4m3x2(wd >> 16);
        }
        qf[e] = v;
    }
    for (int e = threadIdx.x; e < nr * IH; e += blockDim.x) {
        const int i = e / IH, h = e % IH;
        const size_t ri = (size_t)(r0 + i) * IH + h;
        wsm[e] = w_raw[ri] * wscale * q_scale[ri] * sscale;
    }
    __syncthreads();

    const int seq = row_seq[r0];
    int pos[IDX_QT];
#pragma unroll
    for (int i = 0; i < IDX_QT; i++)
        pos[i] = i < nr ? row_pos[r0 + i] : -1;
    const int32_t *bt = blocks + (size_t)seq * max_blocks;
    const int kr0 = 16 * warp + g, kr1 = kr0 + 8; /* this lane's key rows in a block */

    auto load = [&](int blk, uint4 (&k)[4], float &s0, float &s1) {
        const uint8_t *b = cache + (size_t)bt[blk] * block_bytes;
        k[0] = __ldg(reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t));
        k[1] = __ldg(reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t + 16));
        k[2] = __ldg(reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t));
        k[3] = __ldg(reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t + 16));
        s0 = __ldg(reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128) + kr0);
        s1 = __ldg(reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128) + kr1);
    };
    /* keys two blocks ahead in registers: the next block's loads are in flight while this one
     * computes, and the one after it is requested before this one's math starts */
    uint4 kn[4], kn2[4];
    float ks0n = 0.0f, ks1n = 0.0f, ks0n2 = 0.0f, ks1n2 = 0.0f;
    if (wk.z < wk.w)
        load(wk.z, kn, ks0n, ks1n);
    if (wk.z + 1 < wk.w)
        load(wk.z + 1, kn2, ks0n2, ks1n2);
    for (int blk = wk.z; blk < wk.w; blk++) {
        uint4 k[4] = {kn[0], kn[1], kn[2], kn[3]};
        const float ks0 = ks0n, ks1 = ks1n;
#pragma unroll
        for (int i = 0; i < 4; i++)
            kn[i] = kn2[i];
        ks0n = ks0n2;
        ks1n = ks1n2;
        if (blk + 2 < wk.w)
            load(blk + 2, kn2, ks0n2, ks1n2);
        /* A fragments of the 8 (f16) or 4 (FP8) k-steps */
        uint32_t a[STEPS][4];
#pragma unroll
        for (int s = 0; s < STEPS; s++) {
            if (FP8) {
                /* bytes [8s, 8s+8) of the lane's 32: words 2s and 2s+1 */
                const int wi = 2 * s;
                a[s][0] = w32(k[wi >> 2], wi & 3);
                a[s][2] = w32(k[(wi + 1) >> 2], (wi + 1) & 3);
                a[s][1] = w32(k[2 + (wi >> 2)], wi & 3);
                a[s][3] = w32(k[2 + ((wi + 1) >> 2)], (wi + 1) & 3);
            } else {
                const uint32_t r0w = w32(k[s >> 2], s & 3), r1w = w32(k[2 + (s >> 2)], s & 3);
                a[s][0] = cvt_e4m3x2(r0w);
                a[s][2] = cvt_e4m3x2(r0w >> 16);
                a[s][1] = cvt_e4m3x2(r1w);
                a[s][3] = cvt_e4m3x2(r1w >> 16);
            }
        }
        const int j0 = blk * DSV32_KV_BLOCK_TOKENS + kr0, j1 = j0 + 8;
#pragma unroll
        for (int i = 0; i < IDX_QT; i++) {
            if (i >= nr)
                break;
            if (blk * DSV32_KV_BLOCK_TOKENS > pos[i])
                continue; /* a row earlier in the causal order: nothing of this block */
            float sg0 = 0.0f, sg1 = 0.0f;
            const uint2 *qi = qf + (size_t)i * NT * STEPS * 32 + lane;
            const float *wi = wsm + i * IH;
            /* NT independent accumulator chains, k-steps outer: the tensor pipe stays busy */
            float acc[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
            for (int s = 0; s < STEPS; s++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const uint2 bq = qi[(nt * STEPS + s) * 32];
                    if (FP8)
                        mma_e4m3(acc[nt], a[s], bq.x, bq.y);
                    else
                        mma_f16(acc[nt], a[s], bq.x, bq.y);
                }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const float w0 = wi[nt * 8 + 2 * t], w1 = wi[nt * 8 + 2 * t + 1];
                sg0 += fmaxf(acc[nt][0], 0.0f) * w0 + fmaxf(acc[nt][1], 0.0f) * w1;
                sg1 += fmaxf(acc[nt][2], 0.0f) * w0 + fmaxf(acc[nt][3], 0.0f) * w1;
            }
            sg0 += __shfl_xor_sync(0xffffffffu, sg0, 1);
            sg0 += __shfl_xor_sync(0xffffffffu, sg0, 2);
            sg1 += __shfl_xor_sync(0xffffffffu, sg1, 1);
            sg1 += __shfl_xor_sync(0xffffffffu, sg1, 2);
            float *srow = scores + (size_t)(r0 + i - row_base) * ld_s;
            if (t == 0 && j0 <= pos[i])
                srow[j0] = sg0 * ks0;
            if (t == 1 && j1 <= pos[i])
                srow[j1] = sg1 * ks1;
        }
    }
}


/* Decode rows of DeepSeek-V3.2's shape (64 heads, one query row per work item) with FP8 mma: the
 * query's B fragments (64 heads x 128 bytes) stay in registers for the whole key range, so the
 * tensor pipe is fed from registers only and shared memory carries nothing (the smem-fed kernel
 * above is bound by shared-memory bandwidth at one query row). */
static __global__ void __launch_bounds__(128, 3) idx_dec_fp8_kernel(
    float *scores, int ld_s, int row_base, const int4 *work, const uint8_t *q, const float *q_scale,
    const float *w_raw, const uint8_t *cache, int block_bytes, const int32_t *blocks, int max_blocks,
    const int32_t *row_pos, const int32_t *row_seq, float wscale, float sscale)
{
    constexpr int NT = 8, IH = 64;
    const int4 wk = work[blockIdx.x];
    const int r0 = wk.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    uint2 bq[NT][4];
    float w0[NT], w1[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const uint8_t *qp = q + ((size_t)r0 * IH + nt * 8 + g) * 128 + 32 * t;
        const uint4 lo = __ldg(reinterpret_cast<const uint4 *>(qp)), hi = __ldg(reinterpret_cast<const uint4 *>(qp + 16));
        bq[nt][0] = make_uint2(lo.x, lo.y);
        bq[nt][1] = make_uint2(lo.z, lo.w);
        bq[nt][2] = make_uint2(hi.x, hi.y);
        bq[nt][3] = make_uint2(hi.z, hi.w);
        const size_t h0 = (size_t)r0 * IH + nt * 8 + 2 * t;
        w0[nt] = w_raw[h0] * wscale * q_scale[h0] * sscale;
        w1[nt] = w_raw[h0 + 1] * wscale * q_scale[h0 + 1] * sscale;
    }
    const int pos = row_pos[r0];
    const int32_t *bt = blocks + (size_t)row_seq[r0] * max_blocks;
    const int kr0 = 16 * warp + g, kr1 = kr0 + 8;
    /* the cache blocks of this item stream through a ring of IDX_STAGES shared-memory slots filled by
     * cp.async, IDX_STAGES - 1 blocks ahead of the math: many bytes in flight, no registers held */
    extern __shared__ __align__(16) uint8_t ring[];
    const int chunks = block_bytes / 16;
    auto issue = [&](int blk, int stage) {
        const uint8_t *src = cache + (size_t)bt[blk] * block_bytes;
        uint8_t *dst = ring + (size_t)stage * block_bytes;
        for (int i = threadIdx.x; i < chunks; i += blockDim.x)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((uint32_t)__cvta_generic_to_shared(dst + 16 * i)),
                         "l"(src + 16 * i));
    };
#pragma unroll
    for (int st = 0; st < IDX_STAGES - 1; st++) {
        if (wk.z + st < wk.w)
            issue(wk.z + st, st);
        asm volatile("cp.async.commit_group;");
    }
    float *srow = scores + (size_t)(r0 - row_base) * ld_s;
    for (int blk = wk.z, it = 0; blk < wk.w; blk++, it++) {
        if (blk + IDX_STAGES - 1 < wk.w)
            issue(blk + IDX_STAGES - 1, (it + IDX_STAGES - 1) % IDX_STAGES);
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group %0;" ::"n"(IDX_STAGES - 1));
        __syncthreads();
        const uint8_t *b = ring + (size_t)(it % IDX_STAGES) * block_bytes;
        const uint4 k[4] = {*reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t),
                            *reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t + 16),
                            *reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t),
                            *reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t + 16)};
        const float ks0 = reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128)[kr0];
        const float ks1 = reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128)[kr1];
        __syncthreads(); /* the slot may be refilled from the next iteration on */
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const int wi = 2 * s;
            const uint32_t a[4] = {w32(k[wi >> 2], wi & 3), w32(k[2 + (wi >> 2)], wi & 3),
                                   w32(k[(wi + 1) >> 2], (wi + 1) & 3), w32(k[2 + ((wi + 1) >> 2)], (wi + 1) & 3)};
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                mma_e4m3(acc[nt], a, bq[nt][s].x, bq[nt][s].y);
        }
        float sg0 = 0.0f, sg1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            sg0 += fmaxf(acc[nt][0], 0.0f) * w0[nt] + fmaxf(acc[nt][1], 0.0f) * w1[nt];
            sg1 += fmaxf(acc[nt][2], 0.0f) * w0[nt] + fmaxf(acc[nt][3], 0.0f) * w1[nt];
        }
        sg0 += __shfl_xor_sync(0xffffffffu, sg0, 1);
        sg0 += __shfl_xor_sync(0xffffffffu, sg0, 2);
        sg1 += __shfl_xor_sync(0xffffffffu, sg1, 1);
        sg1 += __shfl_xor_sync(0xffffffffu, sg1, 2);
        const int j0 = blk * DSV32_KV_BLOCK_TOKENS + kr0, j1 = j0 + 8;
        if (t == 0 && j0 <= pos)
            srow[j0] = sg0 * ks0;
        if (t == 1 && j1 <= pos)
            srow[j1] = sg1 * ks1;
    }
}

static __device__ __forceinline__ uint32_t order_key(float f)
{
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* adds one key to the histogram: lanes of the warp with the same bin add once (the scores
 * concentrate in few top-bit bins, and plain per-lane atomics would serialize on them) */
static __device__ __forceinline__ void hist_add(int *hist, bool valid, uint32_t u, uint32_t pmask, uint32_t prefix,
                                                int shift, int nbm)
{
    const bool match = valid && (u & pmask) == prefix;
    const uint32_t bin = (u >> shift) & (uint32_t)nbm;
    const uint32_t peers = __match_any_sync(0xffffffffu, match ? bin : 0xffffffffu);
    if (match && (threadIdx.x & 31) == __ffs(peers) - 1)
        atomicAdd(&hist[bin], __popc(peers));
}

static __device__ __forceinline__ int warp_excl_scan(int v, int lane, int *total)
{
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    *total = __shfl_sync(0xffffffffu, x, 31);
    return x - v;
}

static __global__ void __launch_bounds__(1024) topk_kernel(int32_t *sel, const float *scores, int ld_s,
                                                          int row_base, const int32_t *row_pos, int topk)
{
    __shared__ int hist[2048];
    __shared__ int warp_sum[32];
    __shared__ int sh_bin, sh_kk;
    __shared__ int w_gt[32], w_eq[32], w_eqbase[32], w_outbase[32];
    const int r = row_base + blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = row_pos[r] + 1;
    int32_t *out = sel + (size_t)r * topk;
    if (n <= topk) {
        for (int j = tid; j < topk; j += blockDim.x)
            out[j] = j < n ? j : -1;
        return;
    }
    const float *s = scores + (size_t)blockIdx.x * ld_s; /* ld_s is a multiple of 64: rows are 16-aligned */
    const float4 *s4 = reinterpret_cast<const float4 *>(s);
    const int n4 = (n + 3) / 4; /* float4s covering the row; elements >= n are masked */
    uint32_t prefix = 0, pmask = 0;
    int kk = topk;
    for (int pass = 0; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0, bits = pass == 2 ? 10 : 11;
        const int nb = 1 << bits, per = nb / 1024;
        for (int i = tid; i < nb; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        for (int base = warp * 32; base < n4; base += blockDim.x) { /* warp-uniform trip count */
            const int j4 = base + lane;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (j4 < n4)
                v = s4[j4];
            hist_add(hist, 4 * j4 + 0 < n, order_key(v.x), pmask, prefix, shift, nb - 1);
            hist_add(hist, 4 * j4 + 1 < n, order_key(v.y), pmask, prefix, shift, nb - 1);
            hist_add(hist, 4 * j4 + 2 < n, order_key(v.z), pmask, prefix, shift, nb - 1);
            hist_add(hist, 4 * j4 + 3 < n, order_key(v.w), pmask, prefix, shift, nb - 1);
        }
        __syncthreads();
        /* thread i owns bins [top - per, top) counted from the top: top = nb - i * per */
        const int top = nb - tid * per;
        int local = 0;
        for (int b = top - per; b < top; b++)
            local += hist[b];
        int v = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= o)
                v += y;
        }
        if (lane == 31)
            warp_sum[warp] = v;
        __syncthreads();
        if (warp == 0) {
            int ws = warp_sum[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, ws, o);
                if (lane >= o)
                    ws += y;
            }
            warp_sum[lane] = ws;
        }
        __syncthreads();
        const int above = v - local + (warp ? warp_sum[warp - 1] : 0);
        if (above < kk && kk <= above + local) {
            int cum = above;
            for (int b = top - 1; b >= top - per; b--) {
                if (cum + hist[b] >= kk) {
                    sh_bin = b;
                    sh_kk = kk - cum;
                    break;
                }
                cum += hist[b];
            }
        }
        __syncthreads();
        prefix |= (uint32_t)sh_bin << shift;
        pmask |= (uint32_t)(nb - 1) << shift;
        kk = sh_kk;
        __syncthreads();
    }
    const uint32_t T = prefix;
    const int need_eq = kk;
    /* ordered output: each warp owns a segment of whole 128-element chunks (a float4 per lane) */
    const int seg = ((n + 127) / 128 + 31) / 32 * 128;
    const int beg = warp * seg, end = min(n, beg + seg);
    int cgt = 0, ceq = 0;
    for (int j0 = beg; j0 < end; j0 += 128) {
        const int j = j0 + 4 * lane;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < end)
            v = s4[j >> 2];
        const float e4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const uint32_t u = order_key(e4[e]);
            cgt += j + e < end && u > T;
            ceq += j + e < end && u == T;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        cgt += __shfl_xor_sync(0xffffffffu, cgt, o);
        ceq += __shfl_xor_sync(0xffffffffu, ceq, o);
    }
    if (lane == 0) {
        w_gt[warp] = cgt;
        w_eq[warp] = ceq;
    }
    __syncthreads();
    if (tid == 0) {
        int eb = 0, ob = 0;
        for (int w = 0; w < 32; w++) {
            w_eqbase[w] = eb;
            w_outbase[w] = ob;
            ob += w_gt[w] + min(max(need_eq - eb, 0), w_eq[w]);
            eb += w_eq[w];
        }
    }
    __syncthreads();
    int eqb = w_eqbase[warp], ob = w_outbase[warp];
    for (int j0 = beg; j0 < end; j0 += 128) {
        const int j = j0 + 4 * lane;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < end)
            v = s4[j >> 2];
        const float e4[4] = {v.x, v.y, v.z, v.w};
        uint32_t u[4];
        int neq = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            u[e] = order_key(e4[e]);
            neq += j + e < end && u[e] == T;
        }
        int eq_tot, take_tot;
        int eq_rank = eqb + warp_excl_scan(neq, lane, &eq_tot);
        bool take[4];
        int ntake = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const bool in = j + e < end;
            const bool eq = in && u[e] == T;
            take[e] = (in && u[e] > T) || (eq && eq_rank < need_eq);
            eq_rank += eq;
            ntake += take[e];
        }
        int o = ob + warp_excl_scan(ntake, lane, &take_tot);
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (take[e])
                out[o++] = j + e;
        ob += take_tot;
        eqb += eq_tot;
    }
}

int cu_indexer(struct cu_ctx *c, int32_t *sel, const uint8_t *q, const float *q_scale,
               const float *w_raw, const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m,
               int topk)
{
    const int IH = c->cfg->index_n_heads, T = m->n_rows;
    if (T <= 0)
        return 0;
    if ((IH != 16 && IH != 32 && IH != 64 && IH != 128) || c->cfg->index_head_dim != 128)
        return DSV32_ECONFIG;
    const float wscale = (float)pow((double)IH, -0.5), sscale = (float)pow(128.0, -0.5);
    const int use_fp8 = c->fast && c->indexer_fp8;
    const int ld_s = (m->max_ctx + 63) / 64 * 64;
    /* rows in chunks whose scores fit 1 GiB */
    const size_t max_chunk_rows = ((size_t)1 << 28) / (size_t)(ld_s > 0 ? ld_s : 1);
    for (int rb = 0; rb < T;) {
        int re = T;
        if ((size_t)(re - rb) > max_chunk_rows) {
            re = rb + (int)(max_chunk_rows > 0 ? max_chunk_rows : 1);
            /* do not split a sequence's run of rows inside a group of IDX_QT */
        }
        /* groups of up to IDX_QT consecutive rows of one sequence that need scores */
        size_t total_blocks = 0;
        int n_groups = 0, max_nr = 1;
        for (int r = rb; r < re;) {
            int e = r + 1;
            while (e < re && e - r < IDX_QT && m->h_row_seq[e] == m->h_row_seq[r])
                e++;
            int need = 0, maxpos = 0;
            for (int i = r; i < e; i++) {
                need |= m->h_row_pos[i] + 1 > topk;
                if (m->h_row_pos[i] > maxpos)
                    maxpos = m->h_row_pos[i];
            }
            if (need) {
                total_blocks += (size_t)maxpos / DSV32_KV_BLOCK_TOKENS + 1;
                n_groups++;
                if (e - r > max_nr)
                    max_nr = e - r;
            }
            r = e;
        }
        if (n_groups > 0) {
            size_t bpc = (total_blocks + 8 * (size_t)c->n_sm - 1) / (8 * (size_t)c->n_sm);
            if (bpc < 2)
                bpc = 2;
            const size_t max_items = total_blocks / bpc + (size_t)n_groups + 1;
            int4 *items = (int4 *)malloc(sizeof(int4) * max_items);
            if (!items)
                return -ENOMEM;
            int n_items = 0;
            for (int r = rb; r < re;) {
                int e = r + 1;
                while (e < re && e - r < IDX_QT && m->h_row_seq[e] == m->h_row_seq[r])
                    e++;
                int need = 0, maxpos = 0;
                for (int i = r; i < e; i++) {
                    need |= m->h_row_pos[i] + 1 > topk;
                    if (m->h_row_pos[i] > maxpos)
                        maxpos = m->h_row_pos[i];
                }
                if (need) {
                    const int nblk = maxpos / DSV32_KV_BLOCK_TOKENS + 1;
                    for (int b = 0; b < nblk; b += (int)bpc)
                        items[n_items++] = make_int4(r, e - r, b, b + (int)bpc < nblk ? b + (int)bpc : nblk);
                }
                r = e;
            }
            const int4 *d_items = (const int4 *)cu_upload(c, SCR_WORK, items, sizeof(int4) * (size_t)n_items);
            free(items);
            float *scores = (float *)cu_scratch(c, SCR_SCORES, sizeof(float) * (size_t)(re - rb) * ld_s);
            if (!d_items || !scores)
                return -ENOMEM;
            const int steps = use_fp8 ? 4 : 8;
            const size_t smem = sizeof(uint2) * (size_t)max_nr * (IH / 8) * steps * 32 +
                                sizeof(float) * (size_t)max_nr * IH;
            const int NT = IH / 8;
#define IDX_LAUNCH(F8, N)                                                                          \
    do {                                                                                           \
        CU_CHECK(cudaFuncSetAttribute(idx_scores_kernel<F8, N>,                                    \
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));    \
        idx_scores_kernel<F8, N><<<n_items, 128, smem, c->st>>>(                                   \
            scores, ld_s, rb, d_items, q, q_scale, w_raw, kv->idx, c->geom.idx_block_bytes,        \
            m->d_blocks, m->max_blocks, m->d_row_pos, m->d_row_seq, IH, wscale, sscale);           \
    } while (0)
            if (use_fp8 && NT == 8 && max_nr == 1) {
                const size_t ring = (size_t)IDX_STAGES * c->geom.idx_block_bytes;
                CU_CHECK(cudaFuncSetAttribute(idx_dec_fp8_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int)ring));
                idx_dec_fp8_kernel<<<n_items, 128, ring, c->st>>>(
                    scores, ld_s, rb, d_items, q, q_scale, w_raw, kv->idx, c->geom.idx_block_bytes, m->d_blocks,
                    m->max_blocks, m->d_row_pos, m->d_row_seq, wscale, sscale);
            } else if (use_fp8 && NT == 8)
                IDX_LAUNCH(true, 8);
            else if (use_fp8 && NT == 2)
                IDX_LAUNCH(true, 2);
            else if (use_fp8 && NT == 4)
                IDX_LAUNCH(true, 4);
            else if (use_fp8 && NT == 16)
                IDX_LAUNCH(true, 16);
            else if (NT == 8)
                IDX_LAUNCH(false, 8);
            else if (NT == 2)
                IDX_LAUNCH(false, 2);
            else if (NT == 4)
                IDX_LAUNCH(false, 4);
            else
                IDX_LAUNCH(false, 16);
#undef IDX_LAUNCH
            CU_LAUNCHED("idx_scores");
        }
        float *scores = (float *)cu_scratch(c, SCR_SCORES, sizeof(float) * (size_t)(re - rb) * ld_s);
        if (!scores)
            return -ENOMEM;
        topk_kernel<<<re - rb, 1024, 0, c->st>>>(sel, scores, ld_s, rb, m->d_row_pos, topk);
        CU_LAUNCHED("topk");
        rb = re;
    }
    return 0;
}
