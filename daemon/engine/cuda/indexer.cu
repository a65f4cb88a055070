/* DSA indexer kernels (see indexer.cuh).
 *
 * Scores. The logits q_h . k_j are a small GEMM per cache block: A = 64 keys, B = the heads of a
 * query row, K = 128. For DeepSeek-V3.2's 64 heads two wgmma kernels are the defaults (below:
 * idx_wgmma_kernel, f16 on exact e4m3 -> f16 conversions, the exact mode's; idx_wgmma_fp8_kernel,
 * e4m3 from shared memory, the fast mode's). The mma.sync kernels here serve the other head
 * counts and remain as the benchmarks' baselines: A = 4 warps x 16 keys (the m16 rows of mma), B
 * = n8 tiles of 8 heads; mma.m16n8k16 in f16 on exact conversions (products exact, f32
 * accumulation: the cpu's result up to summation order), or mma.m16n8k32 on the e4m3 bytes (half
 * the instructions; the tensor core's FP8 accumulation is not f32-exact).
 * As in the FP8 GEMM, lane (g, t) owns bytes [32t, 32t+32) of its key rows and of each head's q,
 * the K order inside being permuted the same way for A and B. The keys of a block are read once
 * per CTA (16-byte loads, next block prefetched), q is converted once into fragment order in
 * shared memory; relu, the per-head weights and the head sum are applied on the accumulator
 * (quad shuffles), then the key scale.
 *
 * Top-k. A radix select of the k-th largest score on the order-preserving 32-bit key (11 + 11 +
 * 10 bits), one CTA of 1024 threads per row, or 2 (4 by a knob) launched as a cluster when the
 * rows are fewer than half the SMs. Rows of 16 k positions or more (topk_cluster) first take a
 * threshold from a sample of at least 1/32 of the row held in registers (two radix passes on
 * it, aimed at 1.25 k + 1024 scores' worth), gather every score at or above it into shared
 * memory in one sweep, and finish there when the gathered hold at least k and fit: radix passes
 * over the candidates until the k-th key's bin is kept whole (usually two), the selected
 * positions marked in a bitmap and written in ascending order from it. A cluster's CTAs each
 * sample the whole row (so all find the same threshold with no exchange), gather a share of the
 * row, sum the candidates' histograms through distributed shared memory and write their own
 * selections. Otherwise (short rows, or the sample missed) the exact path, on the cluster's first
 * CTA: two radix passes over the row, then either the 22-bit bin's few scores gathered and
 * finished in shared memory the same way, or (too many in that bin) the third pass over the row
 * and two ordered sweeps (each warp owns a segment, counts what it keeps, a scan over the warps
 * gives the offsets, a second sweep writes). Among scores equal to the threshold the lowest
 * positions are kept on every path. The scores are f32 or f16 (the FP8 wgmma kernel's default,
 * knob idx_s16): read in 16-byte units either way (srow), widened exactly, so the keys are the
 * same functions of the stored values; an f16 key is fixed after 22 bits, and its ties at the
 * k-th are ranked among themselves (topk_mark_write). The f16 stores took the scores ~2 us and
 * the top-k ~3.5 us (Nsight Compute: 26 against 29.5 us) below f32's, DSA decode queued
 * 0.418-0.420 against 0.427-0.430 ms (the fourth session of 2026-11-30; GPU-NOTES). An earlier f16
 * attempt's top-k took 0.081 ms: its loads chose the width at run time inside the unrolled sweeps,
 * and it ranked each tied key against every candidate on one thread; which of the two cost it was
 * not measured apart. */
#include "indexer.cuh"
#include "wgmma.cuh"

#include <cooperative_groups.h>
#include <cuda.h>
#include <errno.h>
#include <string.h>

#define IDX_QT 4 /* query rows per CTA */
#define IDX_STAGES 6 /* cp.async ring depth of the FP8 decode kernel */
#define TOPK_ILP 4     /* float4 loads per lane in flight in the top-k's sweeps */
#define TOPK_CAP 8192  /* candidates the top-k finishes in shared memory (64 KB) */
#define TOPK_SREG 2    /* float4s of the sample a thread holds in registers (topk_cluster) */
#define TOPK_STRIDE 32 /* the sample: at least every TOPK_STRIDE-th float4 of the row */
#define TOPK_MARGIN 32 /* the sample's threshold: its 1.25 k / TOPK_STRIDE + TOPK_MARGIN-th key */
#define IDX_SAMPLE_CAP                                                                             \
    8192 /* idx_mode's sample keys a row at most (idx_thr_kernel's shared memory) */

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

/* One (row, head)'s weight as the cpu forms it (w x q scale x head and dim scales); ri: row x
 * heads + head. */
static __device__ __forceinline__ float idx_weight(const float *w_raw, const float *q_scale,
                                                   size_t ri, float wscale, float sscale)
{
    return w_raw[ri] * wscale * q_scale[ri] * sscale;
}

/* The work item's per-(row, head) weights (idx_weight) into shared memory [row][head]. */
static __device__ __forceinline__ void idx_stage_weights(float *wsm, const float *w_raw, const float *q_scale, int r0,
                                                         int nr, int IH, float wscale, float sscale)
{
    for (int e = threadIdx.x; e < nr * IH; e += blockDim.x) /* row r0 + e / IH, head e % IH */
        wsm[e] = idx_weight(w_raw, q_scale, (size_t)r0 * IH + e, wscale, sscale);
}

/* The positions of the item's query rows (-1 past nr). */
static __device__ __forceinline__ void idx_row_pos(int (&pos)[IDX_QT], const int32_t *row_pos, int r0, int nr)
{
#pragma unroll
    for (int i = 0; i < IDX_QT; i++)
        pos[i] = i < nr ? row_pos[r0 + i] : -1;
}

/* This lane's per-head weights of a row for idx_store_w: heads nt * 8 + 2t, + 1 of each n8 tile */
template <int NT>
static __device__ __forceinline__ void idx_lane_weights(float (&w)[2 * NT], const float *wi, int t)
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        w[2 * nt] = wi[nt * 8 + 2 * t];
        w[2 * nt + 1] = wi[nt * 8 + 2 * t + 1];
    }
}

/* One cache block's logits -> the score of this lane's key (j0 for lanes t = 0, j0 + 8 for t =
 * 1; the other lanes' value is not a score): relu, the per-head weights w (idx_lane_weights), the
 * head sum (the lane's 2 x NT heads, then the quad's) and the key scale; acc in the m16n8
 * accumulator layout per 8 heads. */
template <int NT>
static __device__ __forceinline__ float idx_score_w(const float *acc, const float (&w)[2 * NT],
                                                    int t, float ks0, float ks1)
{
    float sg0 = 0.0f, sg1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        sg0 += fmaxf(acc[4 * nt + 0], 0.0f) * w[2 * nt] + fmaxf(acc[4 * nt + 1], 0.0f) * w[2 * nt + 1];
        sg1 += fmaxf(acc[4 * nt + 2], 0.0f) * w[2 * nt] + fmaxf(acc[4 * nt + 3], 0.0f) * w[2 * nt + 1];
    }
    sg0 += __shfl_xor_sync(0xffffffffu, sg0, 1);
    sg0 += __shfl_xor_sync(0xffffffffu, sg0, 2);
    sg1 += __shfl_xor_sync(0xffffffffu, sg1, 1);
    sg1 += __shfl_xor_sync(0xffffffffu, sg1, 2);
    return t == 0 ? sg0 * ks0 : sg1 * ks1;
}

/* The FP8 wgmma kernel's head sum on the tensor core (knob idx_msum, the default): the block's
 * relu'd logits, rounded to bf16, are the A operand of a second MMA straight from the
 * accumulators (the m64n64 accumulator layout of heads 16s..16s + 15 is the A fragment of k-step
 * s), and B is the row's weight tile: 64 heads x 8 columns of bf16, the even columns the weights'
 * high part, the odd ones the rest (w - high, rounded), so that the weights keep ~16 bits.
 * Column pairs (0, 1) of key g and (2, 3) of key g + 8 then sum to the lane's score (lanes t = 0
 * and 1; the other lanes' value is not a score). 16 conversions and 4 MMAs a thread where the FMA
 * epilogue (idx_score_w) takes 64 operations, 4 shuffles and their adds: 22% fewer instructions
 * in the kernel, scores 1-2% faster (GPU-NOTES, session 17). The bf16 rounding of the logits
 * (relative 2^-9 a head) is the fast mode's, on top of the tensor core's FP8 sums; the exact
 * mode never takes this kernel. sd: the second MMA's accumulators (any values). */
static __device__ __forceinline__ float idx_score_mma(const float (&acc)[32], float (&sd)[4],
                                                      uint64_t dw, int t, float ks0, float ks1)
{
    uint32_t a[4][4];
#pragma unroll
    for (int st = 0; st < 4; st++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            a[st][j] = bf16x2_relu(acc[8 * st + 2 * j], acc[8 * st + 2 * j + 1]);
    wg_begin();
#pragma unroll
    for (int st = 0; st < 4; st++)
        wgmma_bf16_rs_n8(sd, a[st], wg_desc_add(dw, 256 * st), st > 0);
    wg_commit_wait();
    wg_fence(sd);
#pragma unroll
    for (int st = 0; st < 4; st++)
        wg_fence_a(a[st]);
    return t == 0 ? (sd[0] + sd[1]) * ks0 : (sd[2] + sd[3]) * ks1;
}

/* idx_score_mma's weight tiles of the item's rows (row i's 1 KB at wt + 1024 i: head h, column n
 * at 128 (h / 8) + 16 n + 2 (h % 8), 16-byte aligned; K-major core matrices of 8 columns x 16
 * bytes, 128 bytes apart along K), from idx_weight as idx_stage_weights' */
static __device__ __forceinline__ void idx_stage_wtile(uint8_t *wt, const float *w_raw,
                                                       const float *q_scale, int r0, int nr,
                                                       float wscale, float sscale)
{
    for (int e = threadIdx.x; e < nr * 64; e += blockDim.x) {
        const int i = e >> 6, cm = (e >> 3) & 7, n = e & 7; /* a thread: 8 heads of one column */
        const size_t ri = (size_t)(r0 + i) * 64 + cm * 8;
        uint32_t v[4];
#pragma unroll
        for (int h = 0; h < 4; h++) {
            float w[2];
#pragma unroll
            for (int x = 0; x < 2; x++) {
                const float f = idx_weight(w_raw, q_scale, ri + 2 * h + x, wscale, sscale);
                const float hi = __uint_as_float(pack_bf16(f, 0.0f) << 16);
                w[x] = n & 1 ? f - hi : f;
            }
            v[h] = pack_bf16(w[0], w[1]);
        }
        *reinterpret_cast<uint4 *>(wt + (size_t)i * 1024 + cm * 128 + n * 16) =
            make_uint4(v[0], v[1], v[2], v[3]);
    }
}

/* idx_score_w stored at srow[j] for j <= pos: one store instruction for the warp's 16 keys (64
 * contiguous bytes) by lanes t = 0 and t = 1 (two, one for each half, measured 0.291 against
 * 0.289 ms for the FP8 scores) */
template <int NT>
static __device__ __forceinline__ void idx_store_w(const float *acc, const float (&w)[2 * NT],
                                                   int t, float ks0, float ks1, float *srow, int j0,
                                                   int pos)
{
    const float s = idx_score_w<NT>(acc, w, t, ks0, ks1);
    const int j = t == 0 ? j0 : j0 + 8;
    if (t < 2 && j <= pos)
        srow[j] = s;
}

/* idx_store_w with the weights read from the row's shared-memory weights wi */
template <int NT>
static __device__ __forceinline__ void idx_store(const float *acc, const float *wi, int t, float ks0, float ks1,
                                                 float *srow, int j0, int pos)
{
    float w[2 * NT];
    idx_lane_weights<NT>(w, wi, t);
    idx_store_w<NT>(acc, w, t, ks0, ks1, srow, j0, pos);
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
    idx_stage_weights(wsm, w_raw, q_scale, r0, nr, IH, wscale, sscale);
    __syncthreads();

    const int seq = row_seq[r0];
    int pos[IDX_QT];
    idx_row_pos(pos, row_pos, r0, nr);
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
        const int j0 = blk * DSV32_KV_BLOCK_TOKENS + kr0;
#pragma unroll
        for (int i = 0; i < IDX_QT; i++) {
            if (i >= nr)
                break;
            if (blk * DSV32_KV_BLOCK_TOKENS > pos[i])
                continue; /* a row earlier in the causal order: nothing of this block */
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
            idx_store<NT>(&acc[0][0], wi, t, ks0, ks1, scores + (size_t)(r0 + i - row_base) * ld_s, j0, pos[i]);
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

/* The f16 scores on Hopper's warpgroup MMA (wgmma), 64-head indexers. One warpgroup (4 warps) per
 * work item; a cache block of 64 keys is the M = 64 side of m64n64k16, the query row's 64 heads
 * the N side, K = 128 in 8 steps. The keys are the A operand from registers (each lane loads the
 * same 2 x 32 bytes of its two key rows as in idx_scores_kernel, converted exactly to f16 once per
 * block and reused for every query row of the item); the query is the B operand, read by the
 * tensor core from shared memory, written there once per item in f16 in the no-swizzle K-major
 * layout: per k-step 8 x 2 core matrices of 8 heads x 8 dims (16 bytes per head), the two core
 * matrices along K 128 bytes apart (the descriptor's leading byte offset), those along N 256 bytes
 * apart (its stride byte offset), with the same K permutation as the keys'. Compared with the
 * mma.sync kernel, which re-reads the query fragments from shared memory for every 16 keys, the
 * tensor core reads them once per 64 keys. The accumulators have mma.sync's m16n8 layout per
 * 8-head tile, so relu, weights, head sum and key scale are the same code. */
#define IDX_RING 5      /* cache blocks in the wgmma kernel's shared-memory ring */
#define IDX_ROWB 144    /* a key row's stride there: 128 bytes + 16 of padding (no bank conflicts) */
#define IDX_STAGEB (64 * IDX_ROWB + 64 * 4)

/* equal items of a row group's nblk cache blocks: floor(nblk / bpc), at least one (cu_indexer's
 * list and idx_dev_item both) */
static __host__ __device__ __forceinline__ int idx_item_count(int nblk, int bpc)
{
    return nblk / bpc > 0 ? nblk / bpc : 1;
}

/* Work item b of a step whose rows rb.. (nrows of them) are each their own group (decode, one row
 * per sequence), derived on the device instead of uploaded: the host's equal-item list
 * (cu_indexer, idx_items 1) in the same order, rows needing scores (pos + 1 > topk) cut in
 * max(1, nblk / bpc) items of nblk * i / n_it.. blocks. Each warp computes it (a prefix over the
 * rows' item counts, 32 rows a step), so that no copy of the list precedes the kernel. */
static __device__ int4 idx_dev_item(int b, const int32_t *row_pos, int rb, int nrows, int bpc,
                                    int topk, int bstride = 1)
{
    const int lane = threadIdx.x & 31;
    int base = 0;
    for (int r0 = 0; r0 < nrows; r0 += 32) { /* warp-uniform */
        int nblk = 0, nit = 0;
        if (r0 + lane < nrows) {
            const int pos = row_pos[rb + r0 + lane];
            if (pos + 1 > topk) {
                nblk = pos / DSV32_KV_BLOCK_TOKENS / bstride +
                       1; /* blocks 0, bstride, 2 bstride, .. */
                nit = idx_item_count(nblk, bpc);
            }
        }
        int tot;
        const int incl = warp_excl_scan(nit, lane, &tot) + nit;
        if (b < base + tot) {
            const int L = __ffs(__ballot_sync(0xffffffffu, b < base + incl)) - 1;
            const int incl_l = __shfl_sync(0xffffffffu, incl, L), nit_l = __shfl_sync(0xffffffffu, nit, L);
            const int nblk_l = __shfl_sync(0xffffffffu, nblk, L), i = b - (base + incl_l - nit_l);
            return make_int4(rb + r0 + L, 1, (int)((int64_t)nblk_l * i / nit_l),
                             (int)((int64_t)nblk_l * (i + 1) / nit_l));
        }
        base += tot;
    }
    return make_int4(rb, 1, 0, 0); /* not reached: b < the item count */
}

/* RING: the cache blocks stream through IDX_RING shared-memory stages filled by cp.async,
 * IDX_RING - 1 blocks ahead, and the lanes read their A fragments from there; otherwise two blocks
 * ahead in registers (the first version, kept as the baseline). */
template <bool RING>
static __global__ void __launch_bounds__(128)
    idx_wgmma_kernel(float *scores, int ld_s, int row_base, const int4 *work, int4 dev,
                     const uint8_t *q, const float *q_scale, const float *w_raw,
                     const uint8_t *cache, int block_bytes, const int32_t *blocks, int max_blocks,
                     const int32_t *row_pos, const int32_t *row_seq, float wscale, float sscale,
                     uint32_t lbo, uint32_t sbo)
{
    constexpr int IH = 64, QB = 8 * 2048; /* f16 query bytes per row: 8 k-steps x 2048 */
    extern __shared__ __align__(128) uint8_t qsm[];
    /* work NULL: dev = (bpc, rows, topk), the item derived (idx_dev_item) */
    const int4 wk = work ? work[blockIdx.x] : idx_dev_item(blockIdx.x, row_pos, row_base, dev.y, dev.x, dev.z);
    const int r0 = wk.x, nr = wk.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    float *wsm = reinterpret_cast<float *>(qsm + (size_t)nr * QB); /* [row][head] */
    /* the query rows: pair (kk, kk+1) of k-step s of head n holds dims 32 tt + 4 s + j0 + {0, 1}
     * (kk = 2 kk2; kk2 < 4: tt = kk2, j0 = 0; else tt = kk2 - 4, j0 = 2) */
    for (int e = threadIdx.x; e < nr * IH * 64; e += blockDim.x) {
        const int kk2 = e & 7, n = (e >> 3) & 63, st = (e >> 9) & 7, i = e >> 12;
        const int tt = kk2 & 3, j0 = kk2 < 4 ? 0 : 2;
        const uint8_t *qp = q + ((size_t)(r0 + i) * IH + n) * 128 + 32 * tt + 4 * st + j0;
        const uint32_t two = (uint32_t)qp[0] | ((uint32_t)qp[1] << 8);
        *reinterpret_cast<uint32_t *>(qsm + (size_t)i * QB + st * 2048 + (n >> 3) * 256 + (kk2 >> 2) * 128 +
                                      (n & 7) * 16 + (kk2 & 3) * 4) = cvt_e4m3x2(two);
    }
    idx_stage_weights(wsm, w_raw, q_scale, r0, nr, IH, wscale, sscale);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* the tensor core reads through the async proxy */
    __syncthreads();

    const int seq = row_seq[r0];
    int pos[IDX_QT];
    idx_row_pos(pos, row_pos, r0, nr);
    const int32_t *bt = blocks + (size_t)seq * max_blocks;
    const int kr0 = 16 * warp + g, kr1 = kr0 + 8;
    const uint32_t qbase = (uint32_t)__cvta_generic_to_shared(qsm);
    auto load = [&](int blk, uint4 (&k)[4], float &s0, float &s1) {
        const uint8_t *b = cache + (size_t)bt[blk] * block_bytes;
        k[0] = __ldg(reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t));
        k[1] = __ldg(reinterpret_cast<const uint4 *>(b + kr0 * 128 + 32 * t + 16));
        k[2] = __ldg(reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t));
        k[3] = __ldg(reinterpret_cast<const uint4 *>(b + kr1 * 128 + 32 * t + 16));
        s0 = __ldg(reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128) + kr0);
        s1 = __ldg(reinterpret_cast<const float *>(b + DSV32_KV_BLOCK_TOKENS * 128) + kr1);
    };
    uint4 kn[4], kn2[4];
    float ks0n = 0.0f, ks1n = 0.0f, ks0n2 = 0.0f, ks1n2 = 0.0f;
    uint8_t *ring = qsm + (size_t)nr * (QB + sizeof(float) * IH); /* RING: IDX_RING stages */
    auto issue = [&](int blk, int stage) {
        const uint8_t *src = cache + (size_t)bt[blk] * block_bytes;
        uint8_t *dst = ring + (size_t)stage * IDX_STAGEB;
#pragma unroll
        for (int x = 0; x < 4; x++) { /* 512 key chunks of 16 bytes, row r chunk c at r * IDX_ROWB + 16 c */
            const int ch = threadIdx.x + 128 * x, r = ch >> 3, cc = ch & 7;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                             (uint32_t)__cvta_generic_to_shared(dst + r * IDX_ROWB + 16 * cc)),
                         "l"(src + 16 * ch));
        }
        if (threadIdx.x < 16) /* the 64 key scales */
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                             (uint32_t)__cvta_generic_to_shared(dst + 64 * IDX_ROWB + 16 * threadIdx.x)),
                         "l"(src + DSV32_KV_BLOCK_TOKENS * 128 + 16 * threadIdx.x));
    };
    if (RING) {
#pragma unroll
        for (int st = 0; st < IDX_RING - 1; st++) {
            if (wk.z + st < wk.w)
                issue(wk.z + st, st);
            asm volatile("cp.async.commit_group;");
        }
    } else {
        if (wk.z < wk.w)
            load(wk.z, kn, ks0n, ks1n);
        if (wk.z + 1 < wk.w)
            load(wk.z + 1, kn2, ks0n2, ks1n2);
    }
    for (int blk = wk.z, it = 0; blk < wk.w; blk++, it++) {
        uint4 k[4];
        float ks0, ks1;
        if (RING) {
            asm volatile("cp.async.wait_group %0;" ::"n"(IDX_RING - 2));
            __syncthreads(); /* block blk is in; every lane is done with the stage refilled next */
            if (blk + IDX_RING - 1 < wk.w)
                issue(blk + IDX_RING - 1, (it + IDX_RING - 1) % IDX_RING);
            asm volatile("cp.async.commit_group;");
            const uint8_t *b = ring + (size_t)(it % IDX_RING) * IDX_STAGEB;
            k[0] = *reinterpret_cast<const uint4 *>(b + kr0 * IDX_ROWB + 32 * t);
            k[1] = *reinterpret_cast<const uint4 *>(b + kr0 * IDX_ROWB + 32 * t + 16);
            k[2] = *reinterpret_cast<const uint4 *>(b + kr1 * IDX_ROWB + 32 * t);
            k[3] = *reinterpret_cast<const uint4 *>(b + kr1 * IDX_ROWB + 32 * t + 16);
            ks0 = reinterpret_cast<const float *>(b + 64 * IDX_ROWB)[kr0];
            ks1 = reinterpret_cast<const float *>(b + 64 * IDX_ROWB)[kr1];
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++)
                k[i] = kn[i];
            ks0 = ks0n;
            ks1 = ks1n;
#pragma unroll
            for (int i = 0; i < 4; i++)
                kn[i] = kn2[i];
            ks0n = ks0n2;
            ks1n = ks1n2;
            if (blk + 2 < wk.w)
                load(blk + 2, kn2, ks0n2, ks1n2);
        }
        uint32_t a[8][4];
#pragma unroll
        for (int st = 0; st < 8; st++) {
            const uint32_t r0w = w32(k[st >> 2], st & 3), r1w = w32(k[2 + (st >> 2)], st & 3);
            a[st][0] = cvt_e4m3x2(r0w);
            a[st][2] = cvt_e4m3x2(r0w >> 16);
            a[st][1] = cvt_e4m3x2(r1w);
            a[st][3] = cvt_e4m3x2(r1w >> 16);
        }
        const int j0 = blk * DSV32_KV_BLOCK_TOKENS + kr0;
        for (int i = 0; i < nr; i++) {
            if (blk * DSV32_KV_BLOCK_TOKENS > pos[i])
                continue; /* the same for the whole warpgroup */
            float acc[32];
#pragma unroll
            for (int x = 0; x < 32; x++)
                acc[x] = 0.0f;
            wg_fence(acc);
            wg_begin();
#pragma unroll
            for (int st = 0; st < 8; st++)
                wgmma_f16_rs_n64(acc, a[st], wg_desc(qbase + i * QB + st * 2048, lbo, sbo), st > 0);
            wg_commit_wait();
            wg_fence(acc);
#pragma unroll
            for (int st = 0; st < 8; st++)
                wg_fence_a(a[st]);
            idx_store<8>(acc, wsm + i * IH, t, ks0, ks1,
                         scores + (size_t)(r0 + i - row_base) * ld_s, j0, pos[i]);
        }
    }
}

static __device__ __forceinline__ uint32_t order_key(float f)
{
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* adds one key to the histogram: lanes of the warp with the same bin add once (the scores
 * concentrate in few top-bit bins, and plain per-lane atomics would serialize on them) */
static __device__ __forceinline__ void hist_add(int *hist, bool valid, uint32_t u, uint32_t pmask,
                                                uint32_t prefix, int shift, int nbm)
{
    const bool match = valid && (u & pmask) == prefix;
    const uint32_t bin = (u >> shift) & (uint32_t)nbm;
    const uint32_t peers = __match_any_sync(0xffffffffu, match ? bin : 0xffffffffu);
    if (match && (threadIdx.x & 31) == __ffs(peers) - 1)
        atomicAdd(&hist[bin], __popc(peers));
}

/* The sampled path of the FP8 indexer (knob idx_sample; one-row items, cache blocks by cp.async),
 * five kernels where there are two:
 *  1. the scores of every bstride-th cache block of each row (idx_wgmma_fp8_kernel with bstride:
 *     block i of an item is the row's block i x bstride; stored densely, the sample's row;
 *     bstride 64 by default, knob idx_sample_stride: 32 measured 9-11 us slower in all);
 *  2. idx_thr_kernel: per row, the key (order_key) of rank m in its sample, m about 2 k times the
 *     sampled share of the row: the threshold T;
 *  3. every score (idx_wgmma_fp8_kernel with thr), but only those whose key reaches T written:
 *     (score, position) pairs compacted per warp into the row's slots of its item (warp w of the
 *     item of blocks [z, e) from slot 64 z + 16 w (e - z)), their count at cnt[z][w] of the row;
 *  4. topk_cand_kernel: when at least k were written, every key above the k-th was (T is at most
 *     the k-th): their top-k is the row's, the same selection as from every score; otherwise the
 *     row is marked missed (the sample put T above the k-th: not seen on random data, possible on
 *     data whose high scores gather in the blocks sampled);
 *  5. for the missed rows only (every CTA of the others returns at once): every score stored
 *     (idx_wgmma_fp8_kernel with miss) and topk_kernel (with miss).
 * Writing the candidates costs little (writing every key as an 8-byte pair took the scores
 * kernel 0.298 ms against 0.284 storing 4-byte scores); counting them to bound the k-th on the fly
 * cost much more (GPU-NOTES, the second session of 2026-11-30), which the sample replaces. */
struct idx_mode {
    int bstride;         /* 1: every block; else the sample's (1) */
    const uint32_t *thr; /* [row]: T (3), or NULL: every score stored */
    uint2 *cand;         /* [row][ld_s]: the candidates (3) */
    int *cnt;            /* [row][ld_s / 64][4] */
    const int *miss;     /* [row]: only rows marked here are scored (5), or NULL */
    int msum; /* the head sum by idx_score_mma (knob idx_msum), else by FMAs; set at the launch */
    int s16;  /* the scores as f16 values (knob idx_s16; set at the launch): the dense stores in
                 16 bits, the candidates' keys rounded to f16 (the same selection either way) */
};

/* f32 -> f16 -> f32, the f16 rounded to nearest and saturated at +-65504 (no infinities: the
 * top-k's order stays that of the scores up to the rounding) */
static __device__ __forceinline__ unsigned short f16_sat(float x)
{
    unsigned short h;
    asm("cvt.rn.satfinite.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

static __device__ __forceinline__ float f16_f32(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

/* The FP8 variant of the scores on wgmma (the fast numerics' default indexer): m64n64k32
 * with both operands read by the tensor core from shared memory as e4m3, no conversions and no
 * fragments in registers at all. The cache blocks stream through an IDX_RING-stage shared-memory
 * ring; keys (A, 64 x 128 bytes) and the query (B, 64 heads x 128 bytes) sit in the
 * 128-byte-swizzle K-major layout (16-byte chunk c of row r at r * 128 + 16 (c ^ (r % 8)), tiles
 * 1024-byte aligned; descriptor stride byte offset 1024, the leading one unused), k-step s starting
 * 32 s bytes in. A stage is filled either by TMA (thread 0: the keys as a box of the cache seen as
 * a tensor of 128-byte rows, a block being 66 of them, swizzled by the copy engine, and the scales
 * by a bulk copy, on the stage's mbarrier; the block table entry of the next fill loaded an
 * iteration early; evict-first in L2 when evict_first: the cache is read once, the scores, which
 * the top-k reads next, stay; knob idx_tma) or, the default, by 516 16-byte cp.async of all
 * threads (the two measured within 2% of each other; TMA without the L2 hint 6% slower; cp.async
 * with the hint raised an illegal-instruction error on the H200, again in 2026-11-30's third
 * session). The epilogue's ReLU, weights and head sum are a second MMA (idx_score_mma, knob
 * idx_msum, the default; the per-head weights as its B tile in shared memory) or FMAs with row 0's
 * weights in registers (msum 0, and PIPE); the accumulators are not zeroed per block (the first
 * k-step's scale-d is 0); a ring of 3 with 6 CTAs per SM instead of 5 with 4 was 7-13% slower
 * (docs/GPU-NOTES.md); so were, or no faster, the refill right after the MMAs, 5 blocks in flight,
 * and the scores kept in L2 by a persisting set-aside (the third session of 2026-11-30). Of the
 * kernel's time over its reads (~0.035 ms at batch 64 x 131072), ~0.018 is the scores' DRAM writes
 * amid the reads: half their bytes (f16, md.s16, now the default for the top-k's sake) took 2-4 us
 * off, whole-line stores nothing (same session).
 * copy_only (diagnostics, knob idx_copy_only): 1, the blocks are read and nothing computed, the
 * read rate of the same access pattern; 2, everything but the scores' stores (what they cost). PIPE
 * (items of one row only, knob idx_pipe): block i's MMAs run under block i - 1's epilogue (relu,
 * weights, head sum, store: its logits copied out of the accumulators before the next batch is
 * issued) and block i + 1's wait for its data (they are waited for just before the refill of their
 * stage), and the weights of one row only are held. The tensor core's FP8 products are accumulated
 * in its own (not f32-exact) precision, which is why the exact mode never takes this path. */
#define IDX8_STAGEB 9216 /* 8 KB of keys (1024-aligned) + 256 B of scales, rounded to 1 KB */

template <bool TMA, bool PIPE>
static __global__ void __launch_bounds__(128, 4) /* 4 CTAs an SM: at most 128 registers */
    idx_wgmma_fp8_kernel(const __grid_constant__ CUtensorMap tm, int evict_first, int copy_only,
                         float *scores, int ld_s, int row_base, const int4 *work, int4 dev,
                         const uint8_t *q, const float *q_scale, const float *w_raw,
                         const uint8_t *cache, int block_bytes, const int32_t *blocks,
                         int max_blocks, const int32_t *row_pos, const int32_t *row_seq,
                         float wscale, float sscale, idx_mode md)
{
    constexpr int IH = 64;
    extern __shared__ __align__(1024) uint8_t dyn[];
    /* 1024-byte alignment for the swizzled tiles, whatever the dynamic base */
    uint8_t *sm = dyn + ((1024 - ((uint32_t)__cvta_generic_to_shared(dyn) & 1023u)) & 1023u);
    /* work NULL: dev = (bpc, rows, topk), the item derived (idx_dev_item) */
    const int4 wk =
        work ? work[blockIdx.x]
             : idx_dev_item(blockIdx.x, row_pos, row_base, dev.y, dev.x, dev.z, md.bstride);
    const int r0 = wk.x, nr = wk.y, S = md.bstride;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    uint8_t *qsm = sm;                      /* [row][64 heads x 128 B], swizzled */
    uint8_t *ring = sm + (size_t)nr * 8192; /* IDX_RING stages */
    float *wsm = reinterpret_cast<float *>(ring + (size_t)IDX_RING * IDX8_STAGEB); /* [row][head] */
    uint8_t *wtile = reinterpret_cast<uint8_t *>(wsm + nr * IH); /* [row] 1 KB: idx_score_mma's B */
    uint64_t *full =
        reinterpret_cast<uint64_t *>(wtile + nr * 1024); /* TMA: a stage's bytes landed */
    const int seq = row_seq[r0];
    const int32_t *bt = blocks + (size_t)seq * max_blocks;
    const uint64_t pol = TMA ? l2_policy(evict_first) : 0;
    constexpr int BROWS = 64 * 132 / 128; /* a block's rows of the tensor map (block_bytes = 64 x 132) */
    auto fill = [&](int id, int stage) { /* TMA, thread 0 */
        uint8_t *dst = ring + (size_t)stage * IDX8_STAGEB;
        mbar_arrive_tx(full + stage, 64 * 132);
        tma_2d_g2s(dst, &tm, 0, id * BROWS, full + stage, pol);
        bulk_g2s_hint(dst + 8192, cache + (size_t)id * block_bytes + 8192, 256, full + stage, pol);
    };
    /* launched under the previous kernel (pdl): it may write the cache, q or the weights */
    pdl_begin();
    if (md.miss && !md.miss[r0 - row_base])
        return;  /* the same for the whole CTA: a row the candidates served */
    int nid = 0; /* TMA: the block table entry of the next fill (thread 0) */
    if (TMA && threadIdx.x == 0) {
        asm volatile("prefetch.tensormap [%0];" ::"l"(&tm) : "memory");
#pragma unroll
        for (int st = 0; st < IDX_RING; st++)
            mbar_init(full + st, 1);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* the barriers -> the copy engine */
#pragma unroll
        for (int st = 0; st < IDX_RING - 1; st++)
            if (wk.z + st < wk.w)
                fill(bt[wk.z + st], st);
        if (wk.z + IDX_RING - 1 < wk.w)
            nid = bt[wk.z + IDX_RING - 1];
    }
    /* cp.async, all threads: chunk x of this thread (16 bytes at 16 (tid + 128 x)) is row
     * tid / 8 + 16 x, column tid % 8 of the block's keys, so its swizzled place is 2048 x past
     * one this thread keeps (the row's swizzle, tid / 8 % 8, is the same for all four) */
    const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring),
                   dsw = (threadIdx.x >> 3) * 128 +
                         (((threadIdx.x & 7) ^ ((threadIdx.x >> 3) & 7)) << 4);
    /* id: the block's cache index */
    auto issue = [&](int32_t id, int stage) {
        const uint8_t *src = cache + (size_t)id * block_bytes + 16 * threadIdx.x;
        const uint32_t dst = ring_s + stage * IDX8_STAGEB;
#pragma unroll
        for (int x = 0; x < 4; x++)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + dsw + 2048 * x),
                         "l"(src + 2048 * x));
        if (threadIdx.x < 16)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 8192 + 16 * threadIdx.x),
                         "l"(src + DSV32_KV_BLOCK_TOKENS * 128));
    };
    if (!TMA) {
#pragma unroll
        for (int st = 0; st < IDX_RING - 1; st++) {
            if (wk.z + st < wk.w)
                issue(bt[(wk.z + st) * S], st);
            asm volatile("cp.async.commit_group;");
        }
    }
    for (int e = threadIdx.x; e < nr * IH * 8; e += blockDim.x) {
        const int c = e & 7, n = (e >> 3) & 63, i = e >> 9;
        const uint4 v = *reinterpret_cast<const uint4 *>(q + ((size_t)(r0 + i) * IH + n) * 128 + 16 * c);
        *reinterpret_cast<uint4 *>(qsm + (size_t)i * 8192 + n * 128 + ((c ^ (n & 7)) << 4)) = v;
    }
    idx_stage_weights(wsm, w_raw, q_scale, r0, nr, IH, wscale, sscale);
    if (md.msum) /* read by the tensor core: ordered by the loop's fence.proxy.async */
        idx_stage_wtile(wtile, w_raw, q_scale, r0, nr, wscale, sscale);
    int pos[IDX_QT];
    idx_row_pos(pos, row_pos, r0, nr);
    const int kr0 = 16 * warp + g, kr1 = kr0 + 8;
    const uint64_t dw0 = wg_desc((uint32_t)__cvta_generic_to_shared(wtile), 128, 256);
    float sacc[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* idx_score_mma's accumulators */
    /* the descriptors of q and of the ring's first stage (the rest one add away) */
    const uint64_t dq0 = wg_desc_sw128((uint32_t)__cvta_generic_to_shared(qsm)),
                   da0 = wg_desc_sw128(ring_s);
    __syncthreads(); /* the weights staged: this lane's, per row, into registers */
    float wv[16]; /* row 0's for the FMA head sum (msum 0, PIPE); the other rows' read when used */
    idx_lane_weights<8>(wv, wsm, t);
    float acc[32], accp[PIPE ? 32 : 1];
#pragma unroll
    for (int x = 0; x < 32; x++)
        acc[x] = 0.0f;
    int pj0 = -1; /* PIPE: the pending block's first key of this lane (-1: none), its key scales */
    float pks0 = 0.0f, pks1 = 0.0f;
    float *srow0 = scores + (size_t)(r0 - row_base) * ld_s;
    /* the candidates: this warp's slots, the row's threshold */
    uint2 *cout =
        md.thr ? md.cand + (size_t)(r0 - row_base) * ld_s + 64 * wk.z + 16 * warp * (wk.w - wk.z)
               : nullptr;
    const uint32_t thr = md.thr ? md.thr[r0 - row_base] : 0u;
    int ncand = 0;
    for (int blk = wk.z, it = 0; blk < wk.w; blk++, it++) {
        const int stage = it % IDX_RING;
        if (TMA) {
            mbar_wait(full + stage, (uint32_t)(it / IDX_RING) & 1u);
            if (it == 0)
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* q -> wgmma */
            if (PIPE) { /* the last block's MMAs read the stage refilled next */
                wg_wait0();
                wg_fence(acc);
            }
            __syncthreads(); /* every lane is done with the stage refilled next */
            if (threadIdx.x == 0 && blk + IDX_RING - 1 < wk.w) {
                fill(nid, (it + IDX_RING - 1) % IDX_RING);
                if (blk + IDX_RING < wk.w)
                    nid = bt[blk + IDX_RING];
            }
        } else {
            asm volatile("cp.async.wait_group %0;" ::"n"(IDX_RING - 2));
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* cp.async data (and q) -> wgmma */
            if (PIPE) { /* the last block's MMAs read the stage refilled next */
                wg_wait0();
                wg_fence(acc);
            }
            __syncthreads();
            if (blk + IDX_RING - 1 < wk.w)
                issue(bt[(blk + IDX_RING - 1) * S], (it + IDX_RING - 1) % IDX_RING);
            asm volatile("cp.async.commit_group;");
        }
        if (copy_only == 1)
            continue;
        const float *ksc = reinterpret_cast<const float *>(ring + (size_t)stage * IDX8_STAGEB + 8192);
        const float ks0 = ksc[kr0], ks1 = ksc[kr1];
        const uint64_t da = wg_desc_add(da0, stage * IDX8_STAGEB);
        const int j0 = blk * S * DSV32_KV_BLOCK_TOKENS + kr0;
        auto mma = [&](int i) { /* the block's logits for row i into acc, issued and committed */
            wg_fence(acc);
            wg_begin();
#pragma unroll
            for (int st = 0; st < 4; st++)
                wgmma_e4m3_ss_n64(acc, wg_desc_add(da, 32 * st),
                                  wg_desc_add(dq0, i * 8192 + 32 * st), st > 0);
            wg_commit();
        };
        if constexpr (PIPE) {
            if (blk * DSV32_KV_BLOCK_TOKENS > pos[0])
                continue; /* the same for the whole warpgroup */
            /* acc holds the pending block's logits (waited for before this iteration's refill) */
#pragma unroll
            for (int x = 0; x < 32; x++)
                accp[x] = acc[x];
            mma(0);
            if (pj0 >= 0)
                idx_store_w<8>(accp, wv, t, pks0, pks1, srow0, pj0, pos[0]);
            pj0 = j0; /* its MMAs run on under the next block's wait for its data */
            pks0 = ks0;
            pks1 = ks1;
        } else {
#pragma unroll
            for (int i = 0; i < IDX_QT; i++) {
                if (i >= nr)
                    break;
                if (blk * S * DSV32_KV_BLOCK_TOKENS > pos[i])
                    continue; /* the same for the whole warpgroup */
                mma(i);
                wg_wait0();
                wg_fence(acc);
                float sc;
                if (md.msum) {
                    sc = idx_score_mma(acc, sacc, wg_desc_add(dw0, 1024 * i), t, ks0, ks1);
                } else if (i == 0) {
                    sc = idx_score_w<8>(acc, wv, t, ks0, ks1);
                } else {
                    float wi[16];
                    idx_lane_weights<8>(wi, wsm + i * IH, t);
                    sc = idx_score_w<8>(acc, wi, t, ks0, ks1);
                }
                const int j = t == 0 ? j0 : j0 + 8;
                if (md.thr) { /* the candidates: keys at or above the row's threshold */
                    if (md.s16)
                        sc = f16_f32(f16_sat(sc));
                    const bool take = t < 2 && j <= pos[i] && order_key(sc) >= thr;
                    const uint32_t m = __ballot_sync(0xffffffffu, take);
                    if (take)
                        cout[ncand + __popc(m & ((1u << lane) - 1u))] =
                            make_uint2(__float_as_uint(sc), (uint32_t)j);
                    ncand += __popc(m);
                } else if (copy_only != 2 && t < 2 && j <= pos[i]) {
                    /* the sample (bstride > 1) stored densely: block blk at blk x 64 */
                    const size_t at = (size_t)(r0 + i - row_base) * ld_s -
                                      (size_t)blk * (S - 1) * DSV32_KV_BLOCK_TOKENS + j;
                    if (md.s16)
                        reinterpret_cast<unsigned short *>(scores)[at] = f16_sat(sc);
                    else
                        scores[at] = sc;
                }
            }
        }
    }
    if (PIPE && pj0 >= 0) {
        wg_wait0();
        wg_fence(acc);
        idx_store_w<8>(acc, wv, t, pks0, pks1, srow0, pj0, pos[0]);
    }
    if (md.thr && lane == 0)
        md.cnt[((size_t)(r0 - row_base) * (ld_s / 64) + wk.z) * 4 + warp] = ncand;
}

/* Block-wide exclusive scan of one int per thread (1024 threads); *total gets the sum. */
static __device__ __forceinline__ int block_excl_scan(int v, int *warp_sum, int *total)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int wtot;
    const int ex = warp_excl_scan(v, lane, &wtot); /* within the warp */
    __syncthreads();
    if (lane == 0)
        warp_sum[warp] = wtot;
    __syncthreads();
    if (warp == 0) { /* the warps' sums, inclusive */
        const int ws = warp_sum[lane];
        int all;
        warp_sum[lane] = warp_excl_scan(ws, lane, &all) + ws;
    }
    __syncthreads();
    *total = warp_sum[31];
    return ex + (warp ? warp_sum[warp - 1] : 0);
}

/* Block-wide: the bin of the kk-th largest key in hist[0:nb) (1024 threads, nb a multiple of
 * 1024); sh[0] = the bin, sh[1] = how many are still needed inside it, sh[2] = its count. */
static __device__ void topk_find(const int *hist, int nb, int kk, int *warp_sum, int *sh)
{
    const int tid = threadIdx.x, per = nb / 1024;
    /* thread i owns bins [top - per, top) counted from the top: top = nb - i * per */
    const int top = nb - tid * per;
    int local = 0;
    for (int b = top - per; b < top; b++)
        local += hist[b];
    int total;
    const int above = block_excl_scan(local, warp_sum, &total);
    if (above < kk && kk <= above + local) {
        int cum = above;
        for (int b = top - 1; b >= top - per; b--) {
            if (cum + hist[b] >= kk) {
                sh[0] = b;
                sh[1] = kk - cum;
                sh[2] = hist[b];
                break;
            }
            cum += hist[b];
        }
    }
    __syncthreads();
}

/* A row of scores as the top-k reads it, in 16-byte units of E elements: f32 (E 4) or f16 (E 8,
 * the FP8 scores kernel's dense stores with knob idx_s16), widened exactly on load, so that the
 * keys and their order are the same functions of the stored values either way and a unit's load
 * moves 16 bytes in both. */
template <bool H16> struct srow {
    static constexpr int E = H16 ? 8 : 4;
    const uint4 *u; /* 16-aligned: the rows' stride is a multiple of 64 elements */
    __device__ __forceinline__ void unit(int ju, float (&f)[E]) const
    {
        const uint4 v = u[ju];
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if constexpr (H16) {
                f[2 * i] = f16_f32((unsigned short)(w[i] & 0xffffu));
                f[2 * i + 1] = f16_f32((unsigned short)(w[i] >> 16));
            } else {
                f[i] = __uint_as_float(w[i]);
            }
        }
    }
    /* unit ju where in holds, else zeros (a lane's load the row has no unit for) */
    __device__ __forceinline__ void unit_if(bool in, int ju, float (&f)[E]) const
    {
        if (in) {
            unit(ju, f);
        } else {
#pragma unroll
            for (int i = 0; i < E; i++)
                f[i] = 0.0f;
        }
    }
    __device__ __forceinline__ float at(int j) const
    {
        if constexpr (H16)
            return f16_f32(reinterpret_cast<const unsigned short *>(u)[j]);
        else
            return reinterpret_cast<const float *>(u)[j];
    }
};

/* One radix pass over the row in global memory: the histogram of bits [shift, shift + log2 nb)
 * of the keys that match prefix under pmask, TOPK_ILP 16-byte loads per lane in flight (nu units
 * cover the row). */
template <bool H16>
static __device__ void topk_hist_global(int *hist, srow<H16> s, int n, int nu, uint32_t pmask,
                                        uint32_t prefix, int shift, int nb)
{
    constexpr int E = srow<H16>::E;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < nb; i += blockDim.x)
        hist[i] = 0;
    __syncthreads();
    /* warp-uniform */
    for (int base = warp * 32 * TOPK_ILP; base < nu; base += blockDim.x * TOPK_ILP) {
        float v[TOPK_ILP][E];
#pragma unroll
        for (int x = 0; x < TOPK_ILP; x++)
            s.unit_if(base + 32 * x + lane < nu, base + 32 * x + lane, v[x]);
#pragma unroll
        for (int x = 0; x < TOPK_ILP; x++) {
            const int ju = base + 32 * x + lane;
#pragma unroll
            for (int e = 0; e < E; e++)
                hist_add(hist, ju < nu && E * ju + e < n, order_key(v[x][e]), pmask, prefix, shift,
                         nb - 1);
        }
    }
    __syncthreads();
}

/* Gathers the row's keys whose upper 22 bits are >= hi (with their positions) from the units
 * [b4, e4) (default: the whole row, nu) into cu/cj, as many as fit cap; returns how many there are
 * (all threads). Each lane counts its candidates among the TOPK_ILP units of a sweep, a warp
 * scan places them and one atomic a warp claims the warp's room (candidates are a few percent of
 * the row, so an atomic per key and warp, on one address, serialized the warps). The last
 * sweep's loads past e4 are zero-filled and must not count: inside the row (a split row's first
 * share) a made-up 0 passes whenever the k-th score is below zero. */
template <bool H16>
static __device__ int topk_gather(uint32_t *cu, int32_t *cj, int cap, srow<H16> s, int n, int nu,
                                  uint32_t hi, int *s_n, int b4 = 0, int e4 = -1)
{
    constexpr int E = srow<H16>::E;
    static_assert(TOPK_ILP * E <= 32, "a lane's candidates of a sweep are the bits of a word");
    const int tid = threadIdx.x, lane = tid & 31;
    if (e4 < 0)
        e4 = nu;
    if (tid == 0)
        *s_n = 0;
    __syncthreads();
    for (int base = b4 + (tid >> 5) * 32 * TOPK_ILP; base < e4; base += blockDim.x * TOPK_ILP) {
        float v[TOPK_ILP][E];
#pragma unroll
        for (int x = 0; x < TOPK_ILP; x++)
            s.unit_if(base + 32 * x + lane < e4, base + 32 * x + lane, v[x]);
        uint32_t take = 0; /* bit E x + e: element e of unit x */
#pragma unroll
        for (int x = 0; x < TOPK_ILP; x++) {
            const int ju = base + 32 * x + lane;
#pragma unroll
            for (int e = 0; e < E; e++)
                take |= (uint32_t)(ju < e4 && E * ju + e < n && (order_key(v[x][e]) >> 10) >= hi)
                        << (E * x + e);
        }
        int wtot;
        int at = warp_excl_scan(__popc(take), lane, &wtot);
        if (wtot == 0) /* the same for the whole warp */
            continue;
        int b = 0;
        if (lane == 0)
            b = atomicAdd(s_n, wtot);
        at += __shfl_sync(0xffffffffu, b, 0);
        /* few a lane: each reloaded (from L1) rather than kept in registers by index */
        for (uint32_t t = take; t; t &= t - 1, at++) {
            const int e = __ffs(t) - 1, j = E * (base + 32 * (e / E) + lane) + e % E;
            if (at < cap) {
                cu[at] = order_key(s.at(j));
                cj[at] = j;
            }
        }
    }
    __syncthreads();
    return *s_n;
}

/* Adds the keys of ncand gathered candidates that match prefix under pmask to the histogram of
 * their bits [shift, shift + log2 nb) (no clearing, no barrier). */
static __device__ void topk_hist_cand(int *hist, const uint32_t *cu, int ncand, uint32_t pmask,
                                      uint32_t prefix, int shift, int nb)
{
    /* warp-uniform */
    for (int i0 = threadIdx.x - (threadIdx.x & 31); i0 < ncand; i0 += blockDim.x) {
        const int i = i0 + (threadIdx.x & 31);
        hist_add(hist, i < ncand, i < ncand ? cu[i] : 0u, pmask, prefix, shift, nb - 1);
    }
}

/* This thread's words [*w0, *w1) of a bitmap of W words (consecutive ranges, in thread order);
 * returns the bits set in the words before them (block-wide: every thread calls it). */
static __device__ int bitmap_rank(const uint32_t *bitmap, int W, int *w0, int *w1, int *warp_sum)
{
    const int per = (W + blockDim.x - 1) / blockDim.x;
    *w0 = threadIdx.x * per;
    *w1 = min(W, *w0 + per);
    int cnt = 0;
    for (int w = *w0; w < *w1; w++)
        cnt += __popc(bitmap[w]);
    int total;
    return block_excl_scan(cnt, warp_sum, &total);
}

/* Writes the positions j0 + i of the bits i set in bitmap (W words) to out, ascending. */
static __device__ void topk_write_bitmap(int32_t *out, const uint32_t *bitmap, int j0, int W,
                                         int *warp_sum)
{
    int w0, w1;
    int o = bitmap_rank(bitmap, W, &w0, &w1, warp_sum);
    for (int w = w0; w < w1; w++)
        for (uint32_t b = bitmap[w]; b; b &= b - 1)
            out[o++] = j0 + 32 * w + __ffs(b) - 1;
}

/* Marks, among ncand gathered candidates (positions in [j0, j0 + 32 W)), those whose keys under
 * the mask M (the bits the passes fixed) are above T and the take_eq lowest-positioned of the
 * cnt_eq equal to T under M (the k-th key's bin) in bitmap (W words, zeroed by the caller before
 * a barrier), then writes the marked positions in ascending order to out. A split tie's positions
 * are listed in eql (room for TOPK_EQ_CAP; *s_ne its count) and each ranked among them (f16
 * scores tie a few keys at the k-th, each of which was ranked against every candidate by one
 * thread); more than the room, each against every candidate. */
#define TOPK_EQ_CAP 2048
static __device__ void topk_mark_write(int32_t *out, const uint32_t *cu, const int32_t *cj,
                                       int ncand, uint32_t T, uint32_t M, int take_eq, int cnt_eq,
                                       int j0, int W, uint32_t *bitmap, int *warp_sum, int *eql,
                                       int *s_ne)
{
    const int tid = threadIdx.x;
    const bool split = take_eq != cnt_eq, listed = split && cnt_eq <= TOPK_EQ_CAP; /* uniform */
    if (listed) {
        if (tid == 0)
            *s_ne = 0;
        __syncthreads();
    }
    for (int i = tid; i < ncand; i += blockDim.x) {
        const uint32_t u = cu[i] & M;
        const int j = cj[i];
        bool take = u > T;
        if (u == T) {
            if (!split) {
                take = true;
            } else if (listed) {
                eql[atomicAdd(s_ne, 1)] = j;
            } else { /* the take_eq lowest positions */
                int below = 0;
                for (int x = 0; x < ncand; x++)
                    below += (cu[x] & M) == T && cj[x] < j;
                take = below < take_eq;
            }
        }
        if (take)
            atomicOr(&bitmap[(j - j0) >> 5], 1u << ((j - j0) & 31));
    }
    if (listed) {
        __syncthreads();
        for (int e = tid; e < cnt_eq; e += blockDim.x) {
            const int j = eql[e];
            int below = 0;
            for (int x = 0; x < cnt_eq; x++)
                below += eql[x] < j;
            if (below < take_eq)
                atomicOr(&bitmap[(j - j0) >> 5], 1u << ((j - j0) & 31));
        }
    }
    __syncthreads();
    topk_write_bitmap(out, bitmap, j0, W, warp_sum);
}

/* Radix passes from first_pass on (prefix, pmask, kk: what earlier passes fixed), each histogram
 * filled by fill(hist, pmask, prefix, shift, nb) from the keys wherever they are, until the kk-th
 * largest key's bin is kept whole (usually after two; cnt_eq = kk) or is the key (after the
 * third): then prefix under pmask is that bin, kk how many of it are taken, cnt_eq how many it
 * holds. */
template <class F>
static __device__ void topk_radix(int first_pass, uint32_t &prefix, uint32_t &pmask, int &kk,
                                  int &cnt_eq, int *hist, int *warp_sum, int *sh, F &&fill)
{
    for (int pass = first_pass; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0, nb = pass == 2 ? 1024 : 2048;
        for (int i = threadIdx.x; i < nb; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        fill(hist, pmask, prefix, shift, nb);
        __syncthreads();
        topk_find(hist, nb, kk, warp_sum, sh);
        prefix |= (uint32_t)sh[0] << shift;
        pmask |= (uint32_t)(nb - 1) << shift;
        kk = sh[1];
        cnt_eq = sh[2];
        __syncthreads();
        if (kk == cnt_eq) /* the bin is kept whole */
            break;
    }
}

/* topk_radix over n keys in shared memory */
static __device__ void topk_radix_smem(const uint32_t *keys, int n, int first_pass,
                                       uint32_t &prefix, uint32_t &pmask, int &kk, int &cnt_eq,
                                       int *hist, int *warp_sum, int *sh)
{
    topk_radix(first_pass, prefix, pmask, kk, cnt_eq, hist, warp_sum, sh,
               [&](int *h, uint32_t pm, uint32_t pf, int shift, int nb) {
                   topk_hist_cand(h, keys, n, pm, pf, shift, nb);
               });
}

/* The top-k among ncand gathered keys (which hold the row's top k), radix passes from first_pass
 * on in shared memory (prefix, pmask, kk: what earlier passes fixed) until the k-th key's bin is
 * kept whole (usually after two) or is the key, then the selected positions marked in a bitmap
 * and written in ascending order from it; among keys equal to the k-th the lowest positions are
 * kept, as in the global path. */
static __device__ void topk_select_smem(int32_t *out, const uint32_t *cu, const int32_t *cj,
                                        int ncand, int n, int first_pass, uint32_t prefix,
                                        uint32_t pmask, int kk, int *hist, int *warp_sum, int *sh,
                                        uint32_t *bitmap, int *s_ne)
{
    const int tid = threadIdx.x;
    const int W = (n + 31) / 32;
    for (int i = tid; i < W; i += blockDim.x)
        bitmap[i] = 0;
    int cnt_eq = 0;
    topk_radix_smem(cu, ncand, first_pass, prefix, pmask, kk, cnt_eq, hist, warp_sum, sh);
    /* hist (2048 ints) is free after the passes: a split tie's list */
    topk_mark_write(out, cu, cj, ncand, prefix, pmask, kk, cnt_eq, 0, W, bitmap, warp_sum, hist,
                    s_ne);
}

/* A row's sampled top-k split over the parts CTAs of its cluster (rows fewer than the SMs), every
 * exchange in distributed shared memory:
 *  1. each part holds the whole of a sample of the row (every stride-th float4, at most
 *     TOPK_SREG a thread) in registers; two radix passes on it give every part the same
 *     threshold, aimed at 1.25 k + 1024 of the row, with no exchange (each part sampling a share
 *     and summing the parts' histograms cost two cluster barriers);
 *  2. each part gathers the keys at or above it from its share of the row (part p's positions
 *     all below part p + 1's) and writes its count into every part;
 *  3. when they hold at least k and each fits cap, radix passes on the candidates, their
 *     histograms summed over the cluster by every part, give every part the k-th key's bin and
 *     how many of its keys are kept (the lowest positions: part 0's first), until the bin is
 *     kept whole (usually after two passes) or is the key (after three);
 *  4. each part writes its selected positions, ascending, after those of the parts before it:
 *     their count comes from the same histograms (their keys in each pass's bins above the one
 *     chosen, and their share of the ties), so no barrier waits for it.
 * Returns false, in all parts alike, when the sample missed (too few or too many above its
 * threshold): part 0 then runs the exact path. hist and hist2 alternate between passes, so that
 * a histogram another part may still be reading is never cleared, and one cluster barrier a pass
 * orders it all; the last one only waits before the exit. */
template <bool H16>
static __device__ bool topk_cluster(int32_t *out, srow<H16> s4, int n, int n4, int topk, int cap,
                                    int part, int parts, int *hist, int *hist2, int *hsum,
                                    int *warp_sum, int *sh, int *s_n, int *cnt_in, int *s_eqb,
                                    uint32_t *cu, int32_t *cj, uint32_t *bitmap)
{
    constexpr int E = srow<H16>::E, SREG = H16 ? 1 : TOPK_SREG; /* the sample's keys: 8 a thread */
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    const int tid = threadIdx.x;
    /* this part has started: waited for before the first write into another part's memory (the
     * counts, after the gather; racecheck: a peer "might not have entered yet") */
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    /* 1. the sample: units j4 = stride * u, u < all (thread tid: u = tid + 1024 x) */
    const int stride = max(TOPK_STRIDE, (n4 + 1024 * SREG - 1) / (1024 * SREG)),
              all = (n4 + stride - 1) / stride;
    const int sample = E * all,
              ks = min(sample, (int)((double)topk * sample / n * 1.25) + TOPK_MARGIN);
    uint32_t key[E * SREG], valid = 0;
#pragma unroll
    for (int x = 0; x < SREG; x++) {
        const int u = tid + 1024 * x, j4 = u * stride;
        float f[E];
        s4.unit_if(u < all, j4, f);
#pragma unroll
        for (int e = 0; e < E; e++) {
            key[E * x + e] = order_key(f[e]);
            valid |= (uint32_t)(u < all && E * j4 + e < n) << (E * x + e);
        }
    }
    for (int i = tid; i < 2048; i += blockDim.x) {
        hist[i] = 0;
        hist2[i] = 0;
    }
    __syncthreads();
    /* hsum[i] = all parts' H[i]; before[x]: the parts before this one's, for bin tid + 1024 x */
    int before[2];
    auto cl_sum = [&](const int *H, int nb) {
        for (int x = 0; x < 2; x++) {
            const int i = tid + 1024 * x;
            int v = 0, b = 0;
            if (i < nb)
                for (int q = 0; q < parts; q++) {
                    const int h = cl.map_shared_rank(H, q)[i];
                    v += h;
                    b += q < part ? h : 0;
                }
            if (i < nb)
                hsum[i] = v;
            before[x] = b;
        }
        __syncthreads();
    };
    uint32_t sp = 0, sm = 0;
    int skk = ks;
    for (int pass = 0; pass < 2; pass++) {
        const int shift = pass == 0 ? 21 : 10;
        int *H = pass == 0 ? hist : hist2;
#pragma unroll
        for (int x = 0; x < SREG; x++)
            if (1024 * x < all) /* the same for the whole CTA */
#pragma unroll
                for (int e = E * x; e < E * x + E; e++)
                    hist_add(H, (valid >> e) & 1u, key[e], sm, sp, shift, 2047);
        __syncthreads();
        if (pass == 1) /* pass 0's is done with: hist is free for the candidates */
            for (int i = tid; i < 2048; i += blockDim.x)
                hist[i] = 0;
        topk_find(H, 2048, skk, warp_sum, sh);
        sp |= (uint32_t)sh[0] << shift;
        sm |= 2047u << shift;
        skk = sh[1];
        __syncthreads();
    }
    /* 2. this part's share of the row: units [b4, e4), positions [j0, j0 + 32 W) */
    const int q4 = ((n4 + parts - 1) / parts + 31) & ~31, b4 = min(n4, part * q4),
              e4 = min(n4, b4 + q4);
    const int j0 = E * b4, W = (min(n, E * e4) - j0 + 31) / 32;
    const int nc = topk_gather(cu, cj, cap, s4, n, n4, sp >> 10, s_n, b4, e4), nm = min(nc, cap);
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); /* every part has started */
    if (tid < parts)
        cl.map_shared_rank(cnt_in, tid)[part] = nc;
    for (int i = tid; i < W; i += blockDim.x)
        bitmap[i] = 0;
    /* 3. the first pass's histogram with the counts' barrier */
    topk_hist_cand(hist, cu, nm, 0u, 0u, 21, 2048);
    cl.sync();
    int tot = 0;
    bool fits = true;
    for (int q = 0; q < parts; q++) {
        tot += cnt_in[q];
        fits = fits && cnt_in[q] <= cap;
    }
    if (tot < topk || !fits)
        return false; /* no part reads another's shared memory after that barrier */
    uint32_t prefix = 0, pmask = 0;
    /* gt: the earlier parts' keys above the k-th key's bin, in this thread's bins */
    int kk = topk, own_eq = 0, gt = 0;
    /* f16 keys end after 22 bits (the rest is the widening's): two passes fix the k-th's value */
    for (int pass = 0; pass < (H16 ? 2 : 3); pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0, nb = pass == 2 ? 1024 : 2048;
        int *H = pass == 1 ? hist2 : hist;
        if (pass > 0) {
            for (int i = tid; i < nb; i += blockDim.x)
                H[i] = 0;
            __syncthreads();
            topk_hist_cand(H, cu, nm, pmask, prefix, shift, nb);
            cl.sync();
        }
        cl_sum(H, nb);
        topk_find(hsum, nb, kk, warp_sum, sh);
        const int bin = sh[0];
        for (int x = 0; x < 2; x++) {
            const int i = tid + 1024 * x;
            gt += i < nb && i > bin ? before[x] : 0;
            if (i == bin)
                *s_eqb = before[x]; /* the earlier parts' keys in the bin */
        }
        prefix |= (uint32_t)bin << shift;
        pmask |= (uint32_t)(nb - 1) << shift;
        kk = sh[1];
        own_eq = H[bin];
        const bool whole = kk == sh[2];
        __syncthreads();
        if (whole) /* the bin is kept whole */
            break;
    }
    /* every read of another part's memory is done: arrive now, wait before the exit */
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    int gt_before;
    block_excl_scan(gt, warp_sum, &gt_before);
    /* 4. the ties are taken from the lowest positions on: the earlier parts' first */
    const int eqb = *s_eqb, take_eq = min(max(kk - eqb, 0), own_eq);
    /* hsum is this part's own and done with: a split tie's list */
    topk_mark_write(out + gt_before + min(kk, eqb), cu, cj, nm, prefix, pmask, take_eq, own_eq, j0,
                    W, bitmap, warp_sum, hsum, s_n);
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
    return true;
}

/* Split launches (gridDim.y = parts, 2 or 4) run as clusters of the row's parts (topk_cluster).
 * H16: the scores are f16 (srow). */
template <bool H16>
static __global__ void __launch_bounds__(1024)
    topk_kernel(int32_t *sel, const void *scores, int ld_s, int row_base, const int32_t *row_pos,
                int topk, int cap, const int *miss)
{
    constexpr int E = srow<H16>::E;
    __shared__ int hist[2048], hist2[2048], hsum[2048];
    __shared__ int warp_sum[32];
    __shared__ int sh[3], s_n, cnt_in[4], s_eqb;
    __shared__ int w_gt[32], w_eq[32], w_eqbase[32], w_outbase[32];
    /* dynamic: cap candidate keys, cap positions, then a bitmap of the row's positions */
    extern __shared__ __align__(16) uint32_t dsm[];
    uint32_t *cu = dsm, *bitmap = dsm + 2 * (size_t)cap;
    int32_t *cj = reinterpret_cast<int32_t *>(dsm + cap);
    /* launched under the scores (pdl); the MLA after it may start at once, and waits */
    pdl_begin();
    if (miss && !miss[blockIdx.x])
        return; /* the same for the row's cluster: a row the candidates served (idx_mode) */
    const int r = row_base + blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int n = row_pos[r] + 1, parts = gridDim.y,
              part = blockIdx.y; /* part: the rank in the row's cluster */
    int32_t *out = sel + (size_t)r * topk;
    if (part > 0 && !(cap >= 2 * topk && n >= 16 * topk))
        return; /* only the sampled path splits a row (the same for the whole cluster) */
    if (n <= topk) {
        for (int j = tid; j < topk; j += blockDim.x)
            out[j] = j < n ? j : -1;
        return;
    }
    /* ld_s is a multiple of 64: rows are 16-aligned */
    const srow<H16> s4 = {reinterpret_cast<const uint4 *>(
        reinterpret_cast<const char *>(scores) + (size_t)blockIdx.x * ld_s * (H16 ? 2 : 4))};
    const int n4 = (n + E - 1) / E; /* units covering the row; elements >= n are masked */
    uint32_t prefix = 0, pmask = 0;
    int kk = topk;
    if (cap >= 2 * topk && n >= 16 * topk) {
        /* long rows: a sampled threshold, the candidates above it finished in shared memory */
        if (topk_cluster(out, s4, n, n4, topk, cap, part, parts, hist, hist2, hsum, warp_sum, sh,
                         &s_n, cnt_in, &s_eqb, cu, cj, bitmap) ||
            part > 0)
            return;
        /* the sample missed (too few or too many above its threshold): the exact path */
    }
    for (int pass = 0; pass < 3; pass++) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0, nb = pass == 2 ? 1024 : 2048;
        /* the keys at or above the k-th score's bin so far fit shared memory (the whole row
         * when it fits, else after the first or second pass): gather them and finish there (the
         * gather after the first pass, one pass over global memory fewer, took a row of 8193
         * from 18.8 to 17.1 us under Nsight Compute, 64 rows from 19.3 to 18.6) */
        if ((pass == 0 && n <= cap) || (pass > 0 && topk - kk + sh[2] <= cap)) {
            const int nc = topk_gather(cu, cj, cap, s4, n, n4, prefix >> 10, &s_n);
            topk_select_smem(out, cu, cj, nc, n, pass, prefix, pmask, kk, hist, warp_sum, sh,
                             bitmap, &s_n);
            return;
        }
        topk_hist_global(hist, s4, n, n4, pmask, prefix, shift, nb);
        topk_find(hist, nb, kk, warp_sum, sh);
        prefix |= (uint32_t)sh[0] << shift;
        pmask |= (uint32_t)(nb - 1) << shift;
        kk = sh[1];
        __syncthreads();
    }
    const uint32_t T = prefix;
    const int need_eq = kk;
    /* ordered output: each warp owns a segment of whole chunks of 32 E elements (a unit per lane)
     */
    constexpr int C = 32 * E;
    const int seg = ((n + C - 1) / C + 31) / 32 * C;
    const int beg = warp * seg, end = min(n, beg + seg);
    int cgt = 0, ceq = 0;
    for (int j0 = beg; j0 < end; j0 += C) {
        const int j = j0 + E * lane;
        float e4[E];
        s4.unit_if(j < end, j / E, e4);
#pragma unroll
        for (int e = 0; e < E; e++) {
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
    for (int j0 = beg; j0 < end; j0 += C) {
        const int j = j0 + E * lane;
        float e4[E];
        s4.unit_if(j < end, j / E, e4);
        uint32_t u[E];
        int neq = 0;
#pragma unroll
        for (int e = 0; e < E; e++) {
            u[e] = order_key(e4[e]);
            neq += j + e < end && u[e] == T;
        }
        int eq_tot, take_tot;
        int eq_rank = eqb + warp_excl_scan(neq, lane, &eq_tot);
        bool take[E];
        int ntake = 0;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const bool in = j + e < end;
            const bool eq = in && u[e] == T;
            take[e] = (in && u[e] > T) || (eq && eq_rank < need_eq);
            eq_rank += eq;
            ntake += take[e];
        }
        int o = ob + warp_excl_scan(ntake, lane, &take_tot);
#pragma unroll
        for (int e = 0; e < E; e++)
            if (take[e])
                out[o++] = j + e;
        ob += take_tot;
        eqb += eq_tot;
    }
}

/* idx_mode's threshold of each row (one CTA of 1024 threads a row): the key of rank m among the
 * sample's keys (those of positions <= the row's), m = 2 k x (sampled / positions) + 32, found by
 * three radix passes in shared memory; 0 (every key a candidate) when the sample holds no more. */
static __global__ void __launch_bounds__(1024)
    idx_thr_kernel(uint32_t *thr, const float *sample, int lds, int row_base,
                   const int32_t *row_pos, int bstride, int topk)
{
    __shared__ int hist[2048];
    __shared__ int warp_sum[32];
    __shared__ int sh[3];
    __shared__ uint32_t keys[IDX_SAMPLE_CAP];
    pdl_begin();
    const int rl = blockIdx.x, tid = threadIdx.x;
    const int pos = row_pos[row_base + rl], n = pos + 1;
    if (n <= topk) /* no scores for this row */
        return;
    /* sample block i is the row's block i x bstride: its keys up to the row's position */
    const int nb = pos / DSV32_KV_BLOCK_TOKENS / bstride + 1;
    int ns = 0;
    for (int i = 0; i < nb; i++)
        ns += min(DSV32_KV_BLOCK_TOKENS, n - i * bstride * DSV32_KV_BLOCK_TOKENS);
    const int m = (int)(2.0 * topk * ns / n) + 32;
    if (m >= ns || nb * DSV32_KV_BLOCK_TOKENS > IDX_SAMPLE_CAP) {
        if (tid == 0)
            thr[rl] = 0u;
        return;
    }
    const float *srow = sample + (size_t)rl * lds;
    /* every sampled slot at once, those past the row's position as key 0 (below every score's:
     * the rank m < ns falls among the valid) */
    const int slots = nb * DSV32_KV_BLOCK_TOKENS;
    for (int e = tid; e < slots; e += blockDim.x) {
        const int i = e / DSV32_KV_BLOCK_TOKENS, o = e % DSV32_KV_BLOCK_TOKENS;
        keys[e] = i * bstride * DSV32_KV_BLOCK_TOKENS + o <= pos ? order_key(srow[e]) : 0u;
    }
    __syncthreads();
    /* T: the rank-m key, or the lowest key of its bin when the passes keep the bin whole (then
     * exactly m sample keys are at or above it, as at the key itself) */
    uint32_t prefix = 0, pmask = 0;
    int kk = m, cnt_eq = 0;
    topk_radix_smem(keys, slots, 0, prefix, pmask, kk, cnt_eq, hist, warp_sum, sh);
    if (tid == 0)
        thr[rl] = prefix;
}

/* idx_mode's top-k of a row from its candidates (one CTA of 1024 threads a row): fewer than k
 * written marks the row missed (miss[row] 1; the dense pass after serves it); else they hold the
 * row's top k, selected in shared memory (topk_select_smem) when they fit, or by radix passes over
 * them in global memory, the keys above the k-th marked in the bitmap and those equal to it in a
 * second one, of which the lowest positions are kept: the selection of topk_kernel on every score.
 */
#define TOPK_CAND_ILP 4 /* candidates a lane loads at once */
static __global__ void __launch_bounds__(1024)
    topk_cand_kernel(int32_t *sel, int *miss, const uint2 *cand, const int *cand_cnt, int ld_s,
                     int row_base, const int32_t *row_pos, int topk, int cap, int bpc)
{
    __shared__ int hist[2048];
    __shared__ int warp_sum[32];
    __shared__ int sh[3], s_n;
    /* dynamic: cap candidate keys, cap positions, then a bitmap of the row's positions */
    extern __shared__ __align__(16) uint32_t dsm[];
    uint32_t *cu = dsm, *bitmap = dsm + 2 * (size_t)cap;
    int32_t *cj = reinterpret_cast<int32_t *>(dsm + cap);
    /* launched under the scores (pdl); the kernels after it may start at once, and wait */
    pdl_begin();
    const int rl = blockIdx.x, r = row_base + rl, tid = threadIdx.x, lane = tid & 31,
              warp = tid >> 5;
    const int n = row_pos[r] + 1, W = (n + 31) / 32;
    int32_t *out = sel + (size_t)r * topk;
    if (n <= topk) {
        for (int j = tid; j < topk; j += blockDim.x)
            out[j] = j < n ? j : -1;
        if (tid == 0)
            miss[rl] = 0;
        return;
    }
    /* the row's work items as the scores kernel had them (idx_dev_item), 4 warps' slots each */
    const int nblk = (n - 1) / DSV32_KV_BLOCK_TOKENS + 1, nit = idx_item_count(nblk, bpc);
    const uint2 *crow = cand + (size_t)rl * ld_s;
    const int *crow_n = cand_cnt + (size_t)rl * (ld_s / 64) * 4;
    int tot = 0;
    for (int sub = lane; sub < 4 * nit; sub += 32) /* every warp the same sum */
        tot += crow_n[4 * (int)((int64_t)nblk * (sub >> 2) / nit) + (sub & 3)];
    for (int o = 16; o > 0; o >>= 1)
        tot += __shfl_xor_sync(0xffffffffu, tot, o);
    if (tot < topk) { /* the same for the whole CTA */
        if (tid == 0)
            miss[rl] = 1;
        return;
    }
    if (tid == 0)
        miss[rl] = 0;
    /* f(valid, key, position) for each candidate, warp-uniform (TOPK_CAND_ILP a lane at once) */
    auto each = [&](auto &&f) {
        for (int sub = warp; sub < 4 * nit; sub += 32) {
            const int i = sub >> 2, w = sub & 3;
            const int z = (int)((int64_t)nblk * i / nit), e = (int)((int64_t)nblk * (i + 1) / nit);
            const int cnt = crow_n[4 * z + w];
            const uint2 *src = crow + 64 * z + 16 * w * (e - z);
            for (int i0 = 0; i0 < cnt; i0 += 32 * TOPK_CAND_ILP) {
                uint2 v[TOPK_CAND_ILP];
#pragma unroll
                for (int x = 0; x < TOPK_CAND_ILP; x++) {
                    const int c = i0 + 32 * x + lane;
                    v[x] = c < cnt ? src[c] : make_uint2(0u, 0u);
                }
#pragma unroll
                for (int x = 0; x < TOPK_CAND_ILP; x++)
                    f(i0 + 32 * x + lane < cnt, order_key(__uint_as_float(v[x].x)), (int)v[x].y);
            }
        }
    };
    if (tot <= cap) { /* into shared memory, finished there */
        if (tid == 0)
            s_n = 0;
        __syncthreads();
        each([&](bool v, uint32_t u, int j) {
            const uint32_t m = __ballot_sync(0xffffffffu, v);
            if (!m)
                return;
            int b = 0;
            if (lane == __ffs(m) - 1)
                b = atomicAdd(&s_n, __popc(m));
            const int at =
                __shfl_sync(0xffffffffu, b, __ffs(m) - 1) + __popc(m & ((1u << lane) - 1u));
            if (v) {
                cu[at] = u;
                cj[at] = j;
            }
        });
        __syncthreads();
        topk_select_smem(out, cu, cj, s_n, n, 0, 0u, 0u, topk, hist, warp_sum, sh, bitmap, &s_n);
        return;
    }
    /* too many to hold: the digits by passes over the candidates in global memory */
    uint32_t prefix = 0, pmask = 0;
    int kk = topk, cnt_eq = 0;
    topk_radix(0, prefix, pmask, kk, cnt_eq, hist, warp_sum, sh,
               [&](int *h, uint32_t pm, uint32_t pf, int shift, int nb) {
                   each([&](bool v, uint32_t u, int) { hist_add(h, v, u, pm, pf, shift, nb - 1); });
               });
    /* above the k-th key into bitmap, equal to it into eq (cu's room: W <= cap, checked by the
     * host); then the kk lowest of the equal */
    uint32_t *eq = cu;
    for (int i = tid; i < W; i += blockDim.x) {
        bitmap[i] = 0;
        eq[i] = 0;
    }
    __syncthreads();
    const bool whole = kk == cnt_eq;
    each([&](bool v, uint32_t u, int j) {
        const uint32_t um = u & pmask;
        if (v && (um > prefix || (um == prefix && whole)))
            atomicOr(&bitmap[j >> 5], 1u << (j & 31));
        else if (v && um == prefix)
            atomicOr(&eq[j >> 5], 1u << (j & 31));
    });
    __syncthreads();
    if (!whole) {
        int w0, w1;
        int rank = bitmap_rank(eq, W, &w0, &w1, warp_sum);
        for (int w = w0; w < w1 && rank < kk; w++)
            for (uint32_t b = eq[w]; b && rank < kk; b &= b - 1, rank++)
                bitmap[w] |= b & (0u - b); /* the word is this thread's alone here */
        __syncthreads();
    }
    topk_write_bitmap(out, bitmap, 0, W, warp_sum);
}

/* ---- the indexer cache as a tensor of 128-byte rows for TMA (idx_wgmma_fp8_kernel<true, *>) ----
 * The driver's cuTensorMapEncodeTiled and cuMemGetAddressRange through the runtime's entry
 * points (no link against libcuda); the map spans the cache's allocation from the cache on (its
 * extent from the driver, checked on every call, so a cache freed and reallocated at the same
 * address gets a new map), boxes of 64 rows x 128 bytes with the 128-byte swizzle. */
typedef CUresult (*cu_encode_tiled_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                       const cuuint64_t *, const cuuint32_t *, const cuuint32_t *,
                                       CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                       CUtensorMapFloatOOBfill);
typedef CUresult (*cu_addr_range_fn)(CUdeviceptr *, size_t *, CUdeviceptr);

struct cu_driver_fns {
    cu_encode_tiled_fn encode;
    cu_addr_range_fn range;
};

static const struct cu_driver_fns *cu_driver(void)
{
    static const struct cu_driver_fns d = [] {
        struct cu_driver_fns x = {NULL, NULL};
        void *f = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) ==
                cudaSuccess && q == cudaDriverEntryPointSuccess)
            x.encode = (cu_encode_tiled_fn)f;
        if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault, &q) ==
                cudaSuccess && q == cudaDriverEntryPointSuccess)
            x.range = (cu_addr_range_fn)f;
        cudaGetLastError();
        if (!x.encode || !x.range)
            log_warn("cuda: no tensor-map entry points in the driver; the indexer reads its cache by cp.async");
        return x;
    }();
    return &d;
}

/* 0 and *out = the map of the FP8 indexer cache at ptr; -1 when TMA cannot serve it */
static int cu_idx_tmap(struct cu_ctx *c, const uint8_t *ptr, CUtensorMap *out)
{
    const struct cu_driver_fns *d = cu_driver();
    CUdeviceptr base = 0;
    size_t size = 0;
    if (!d->encode || !d->range || (uintptr_t)ptr % 16 || d->range(&base, &size, (CUdeviceptr)ptr) != CUDA_SUCCESS)
        return -1;
    for (int i = 0; i < c->n_tmaps && i < CU_TMAPS; i++)
        if (c->tmaps[i].ptr == ptr && c->tmaps[i].base == base && c->tmaps[i].size == size) {
            memcpy(out, c->tmaps[i].map, sizeof(*out));
            return 0;
        }
    /* rows from ptr to the allocation's end; block coordinates (66 rows a block) stay int32 */
    const cuuint64_t rows = (cuuint64_t)(base + size - (CUdeviceptr)ptr) / 128;
    if (rows < 66 || rows > 0x7fffffffull)
        return -1;
    const cuuint64_t dims[2] = {128, rows}, strides[1] = {128};
    const cuuint32_t box[2] = {128, 64}, estr[2] = {1, 1};
    if (d->encode(out, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void *)ptr, dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        log_warn("cuda: cuTensorMapEncodeTiled failed for the indexer cache; using cp.async");
        return -1;
    }
    struct cu_tmap *e = &c->tmaps[c->n_tmaps++ % CU_TMAPS];
    e->ptr = ptr;
    e->base = base;
    e->size = size;
    memcpy(e->map, out, sizeof(*out));
    return 0;
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
        /* the sampled path's missed rows (idx_mode), for the top-k; NULL: every row */
        int *miss = NULL;
        int s16 = 0; /* the FP8 wgmma scores stored in f16 (knob idx_s16), for the top-k */
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
            /* one row a group (decode) on the wgmma kernels (FP8 or f16): the items derived on the
             * device (knob idx_dev_items), the host counts them only */
            const bool fp8_wg = use_fp8 && IH == 64 && c->idx_wgmma && c->geom.idx_block_bytes == 64 * 132;
            const bool f16_wg = !use_fp8 && IH == 64 && c->idx_wgmma;
            const bool dev_items =
                (fp8_wg || f16_wg) && c->idx_dev_items && c->idx_items && max_nr == 1;
            if (!dev_items && max_items > c->idx_items_cap) { /* the host's work list, kept across calls */
                int4 *grown = (int4 *)realloc(c->idx_items_h, sizeof(int4) * max_items);
                if (!grown)
                    return -ENOMEM;
                c->idx_items_h = grown;
                c->idx_items_cap = max_items;
            }
            int4 *items = c->idx_items_h;
            int n_items = 0;
            for (int r = rb; dev_items && r < re; r++)
                if (m->h_row_pos[r] + 1 > topk) {
                    const int nblk = m->h_row_pos[r] / DSV32_KV_BLOCK_TOKENS + 1;
                    n_items += idx_item_count(nblk, (int)bpc);
                }
            for (int r = rb; !dev_items && r < re;) {
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
                    if (c->idx_items) {
                        /* floor(nblk / bpc) equal items: at most total / bpc items in all, so no
                         * partial wave beyond the planned ones (today's rounding up made 17 items
                         * of a 2048-block row, 1088 for 1056 CTA slots at batch 64 x 131072) */
                        const int n_it = idx_item_count(nblk, (int)bpc);
                        for (int i = 0; i < n_it; i++)
                            items[n_items++] = make_int4(r, e - r, (int)((int64_t)nblk * i / n_it),
                                                         (int)((int64_t)nblk * (i + 1) / n_it));
                    } else {
                        for (int b = 0; b < nblk; b += (int)bpc)
                            items[n_items++] = make_int4(r, e - r, b, b + (int)bpc < nblk ? b + (int)bpc : nblk);
                    }
                }
                r = e;
            }
            const int4 *d_items =
                dev_items ? NULL : (const int4 *)cu_upload(c, SCR_WORK, items, sizeof(int4) * (size_t)n_items);
            const int4 dev = make_int4((int)bpc, re - rb, topk, 0);
            float *scores =
                (float *)cu_scratch(c, SCR_SCORES, sizeof(float) * (size_t)(re - rb) * ld_s);
            if ((!dev_items && !d_items) || !scores)
                return -ENOMEM;
            if (c->idx_poison) /* all ones: a NaN */
                CU_CHECK(cudaMemsetAsync(scores, 0xff, sizeof(float) * (size_t)(re - rb) * ld_s, c->st));
            const int steps = use_fp8 ? 4 : 8;
            const size_t smem = sizeof(uint2) * (size_t)max_nr * (IH / 8) * steps * 32 +
                                sizeof(float) * (size_t)max_nr * IH;
            const int NT = IH / 8;
#define IDX_LAUNCH(F8, N)                                                                          \
    do {                                                                                           \
        CU_SMEM_OPTIN((idx_scores_kernel<F8, N>), smem);                                           \
        idx_scores_kernel<F8, N><<<n_items, 128, smem, c->st>>>(                                   \
            scores, ld_s, rb, d_items, q, q_scale, w_raw, kv->idx, c->geom.idx_block_bytes,        \
            m->d_blocks, m->max_blocks, m->d_row_pos, m->d_row_seq, IH, wscale, sscale);           \
    } while (0)
            if (f16_wg) {
                size_t qsmem = (size_t)max_nr * (8 * 2048 + sizeof(float) * IH);
                const uint32_t lbo = c->idx_wgmma == 2 ? 256 : 128, sbo = c->idx_wgmma == 2 ? 128 : 256;
                /* idx_wgmma 3: the register-prefetch version (the baseline) */
                const bool ring = c->idx_wgmma != 3 && c->geom.idx_block_bytes == 64 * 132;
                auto kern = ring ? idx_wgmma_kernel<true> : idx_wgmma_kernel<false>;
                if (ring)
                    qsmem += (size_t)IDX_RING * IDX_STAGEB;
                CU_SMEM_OPTIN(kern, qsmem);
                kern<<<n_items, 128, qsmem, c->st>>>(scores, ld_s, rb, d_items, dev, q, q_scale,
                                                     w_raw, kv->idx, c->geom.idx_block_bytes,
                                                     m->d_blocks, m->max_blocks, m->d_row_pos,
                                                     m->d_row_seq, wscale, sscale, lbo, sbo);
            } else if (fp8_wg) {
                const size_t smem8 = 1024 + (size_t)max_nr * 8192 + (size_t)IDX_RING * IDX8_STAGEB +
                                     sizeof(float) * (size_t)max_nr * IH + 1024 * (size_t)max_nr +
                                     sizeof(uint64_t) * IDX_RING;
                CUtensorMap tm;
                memset(&tm, 0, sizeof(tm));
                const bool tma = c->idx_tma && cu_idx_tmap(c, kv->idx, &tm) == 0;
                /* idx_pipe: the epilogue under the next block's MMAs, for one-row items */
                const bool pipe = c->idx_pipe && max_nr == 1;
                auto kern = tma ? (pipe ? idx_wgmma_fp8_kernel<true, true> : idx_wgmma_fp8_kernel<true, false>)
                                : (pipe ? idx_wgmma_fp8_kernel<false, true> : idx_wgmma_fp8_kernel<false, false>);
                CU_SMEM_OPTIN(kern, smem8);
                const idx_mode plain = {1, NULL, NULL, NULL, NULL};
                s16 = c->idx_s16 && !pipe; /* the pipelined epilogue stores f32 */
                /* the scores kernel over scores s (row stride lds), items (work list or dev) */
                auto scores8 = [&](decltype(kern) k, int items, float *s, int lds, const int4 *work,
                                   int4 dv, idx_mode md) {
                    md.msum = c->idx_msum;
                    md.s16 = md.bstride == 1 ? s16 : 0; /* the sample stays f32 (idx_thr_kernel) */
                    return cu_launch_pdl(c, c->pdl != 0, k, dim3(items), dim3(128), smem8, tm,
                                         (int)(c->idx_l2_normal == 0), c->idx_copy_only, s, lds, rb,
                                         work, dv, q, q_scale, w_raw, kv->idx,
                                         c->geom.idx_block_bytes, (const int32_t *)m->d_blocks,
                                         m->max_blocks, (const int32_t *)m->d_row_pos,
                                         (const int32_t *)m->d_row_seq, wscale, sscale, md);
                };
                /* the sampled path (idx_mode): one-row items by cp.async, a row's bitmap within the
                 * top-k's room (its fallback's) */
                if (c->idx_sample && !c->dsa_forked && !pipe && max_nr == 1 && c->idx_items &&
                    !c->topk_global && !c->idx_copy_only && (size_t)ld_s / 32 <= TOPK_CAP) {
                    const int nr = re - rb, max_nblk = ld_s / DSV32_KV_BLOCK_TOKENS;
                    const int S = max(c->idx_sample_stride > 0 ? c->idx_sample_stride : 64,
                                      (max_nblk + IDX_SAMPLE_CAP / 64 - 1) / (IDX_SAMPLE_CAP / 64));
                    const int lds = ((max_nblk - 1) / S + 1) * DSV32_KV_BLOCK_TOKENS;
                    size_t total_s = 0;
                    for (int r = rb; r < re; r++)
                        if (m->h_row_pos[r] + 1 > topk)
                            total_s += (size_t)(m->h_row_pos[r] / DSV32_KV_BLOCK_TOKENS / S + 1);
                    /* short items: the sample's latency, not its bytes, is its cost */
                    const int bpc_s = (int)std::max<size_t>(2, (total_s + 8 * (size_t)c->n_sm - 1) /
                                                                   (8 * (size_t)c->n_sm));
                    int items_s = 0;
                    for (int r = rb; r < re; r++)
                        if (m->h_row_pos[r] + 1 > topk)
                            items_s += idx_item_count(
                                m->h_row_pos[r] / DSV32_KV_BLOCK_TOKENS / S + 1, bpc_s);
                    /* the sample, the thresholds, the missed rows; the candidates and their counts
                     */
                    char *sb = (char *)cu_scratch(
                        c, SCR_IDX_SMP, sizeof(float) * (size_t)nr * lds + 8 * (size_t)nr);
                    /* a pair a slot, then 4 counts a cache block */
                    char *cb = (char *)cu_scratch(c, SCR_IDX_CAND,
                                                  sizeof(uint2) * (size_t)nr * ld_s +
                                                      sizeof(int) * 4 * (size_t)nr * (ld_s / 64));
                    if (!sb || !cb)
                        return -ENOMEM;
                    float *smp = (float *)sb;
                    uint32_t *thr = (uint32_t *)(sb + sizeof(float) * (size_t)nr * lds);
                    miss = (int *)(thr + nr);
                    uint2 *cand = (uint2 *)cb;
                    int *cnt = (int *)(cb + sizeof(uint2) * (size_t)nr * ld_s);
                    auto kern_s = idx_wgmma_fp8_kernel<false, false>;
                    CU_SMEM_OPTIN(kern_s, smem8);
                    const idx_mode md_s = {S, NULL, NULL, NULL, NULL},
                                   md_c = {1, thr, cand, cnt, NULL},
                                   md_r = {1, NULL, NULL, NULL, miss};
                    CU_CHECK(scores8(kern_s, items_s, smp, lds, NULL, make_int4(bpc_s, nr, topk, 0),
                                     md_s));
                    CU_LAUNCHED("idx_sample");
                    CU_CHECK(cu_launch_pdl(c, c->pdl != 0, idx_thr_kernel, dim3(nr), dim3(1024), 0,
                                           thr, (const float *)smp, lds, rb,
                                           (const int32_t *)m->d_row_pos, S, topk));
                    CU_LAUNCHED("idx_thr");
                    CU_CHECK(scores8(kern_s, n_items, (float *)NULL, ld_s, d_items, dev, md_c));
                    CU_LAUNCHED("idx_cand");
                    if (!c->idx_no_topk) {
                        const size_t tsm =
                            sizeof(uint32_t) * (2 * (size_t)TOPK_CAP + ((size_t)ld_s + 31) / 32);
                        CU_SMEM_OPTIN(topk_cand_kernel, tsm);
                        CU_CHECK(cu_launch_pdl(
                            c, c->pdl != 0, topk_cand_kernel, dim3(nr), dim3(1024), tsm, sel, miss,
                            (const uint2 *)cand, (const int *)cnt, ld_s, rb,
                            (const int32_t *)m->d_row_pos, topk, (int)TOPK_CAP, (int)bpc));
                        CU_LAUNCHED("topk_cand");
                        /* the missed rows' every score (the top-k after the groups, with miss) */
                        CU_CHECK(scores8(kern_s, n_items, scores, ld_s, d_items, dev, md_r));
                        CU_LAUNCHED("idx_scores_missed");
                    }
                    c->idx_sample_calls++;
                    c->idx_sample_miss = miss;
                    c->idx_sample_rows = nr;
                } else {
                    CU_CHECK(scores8(kern, n_items, scores, ld_s, d_items, dev, plain));
                }
            } else if (use_fp8 && NT == 8 && max_nr == 1) {
                const size_t ring = (size_t)IDX_STAGES * c->geom.idx_block_bytes;
                CU_SMEM_OPTIN(idx_dec_fp8_kernel, ring);
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
        if (!c->idx_no_topk) {
            /* dynamic: TOPK_CAP candidates (key, position) and a bitmap of the row's positions */
            const int cap = c->topk_global ? 0 : TOPK_CAP;
            const size_t tsm = sizeof(uint32_t) * (2 * (size_t)cap + ((size_t)ld_s + 31) / 32);
            /* rows fewer than half the SMs: 2 CTAs per row (the sweep over the row and the sampled
             * passes are most of the kernel, Nsight Compute: instruction-bound on the SMs it has;
             * 4 per row measured slower, 0.080 against 0.047 ms at 64 rows, when the
             * rows' candidates were merged through global memory); knob topk_parts
             * forces 1, 2 or 4 */
            const int nr = re - rb;
            int parts = 2 * nr <= c->n_sm ? 2 : 1;
            if (c->topk_parts == 1 || c->topk_parts == 2 || c->topk_parts == 4)
                parts = c->topk_parts;
            if (cap == 0)
                parts = 1;
            auto topk_k = s16 ? topk_kernel<true> : topk_kernel<false>;
            CU_SMEM_OPTIN(topk_k, tsm);
            cudaLaunchAttribute at[2];
            memset(&at[0], 0, sizeof(at[0]));
            at[0].id = cudaLaunchAttributeClusterDimension;
            at[0].val.clusterDim.x = 1;
            at[0].val.clusterDim.y = parts;
            at[0].val.clusterDim.z = 1;
            cu_pdl_attr(&at[1]);
            const cudaLaunchConfig_t lc =
                cu_launch_cfg(c, dim3(nr, parts), dim3(1024), tsm, at, c->pdl ? 2 : 1);
            CU_CHECK(cudaLaunchKernelEx(&lc, topk_k, sel, (const void *)scores, ld_s, rb,
                                        (const int32_t *)m->d_row_pos, topk, cap,
                                        (const int *)miss));
            CU_LAUNCHED("topk");
        }
        c->scores_h16 = s16;
        rb = re;
    }
    return 0;
}
