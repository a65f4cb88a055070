/* GEMMs of the cuda backend (see gemm.cuh): cuBLAS f32 / bf16, cuBLASLt block-scaled FP8 with a
 * calibration run, and the FP8 tensor-core kernel for few rows and grouped experts.
 *
 * The FP8 kernel. A CTA of 8 warps owns 128 output features (one 128x128 weight-scale row
 * block); warp w owns features [16w, 16w+16): the A operand of mma.m16n8k16 is the weight (16
 * features x 16 K), B is the activations (16 K x 8 rows). The K order inside a 64-byte chunk is
 * permuted so that every lane loads 16 contiguous bytes of its weight rows and activation row:
 * lane (g = lane/4, t = lane%4) takes bytes [16t, 16t+16) of the chunk, and in k-step s its
 * logical K pairs {2t, 2t+1} and {2t+8, 2t+9} are the bytes 16t + 4s + {0,1} and {2,3}, for A
 * and B alike (a dot product does not care about the order of its terms). e4m3 -> f16 is exact
 * (cvt.rn.f16x2.e4m3x2), products of two e4m3 values are exact, and each 128-K block is summed
 * by the tensor core in f32, then scaled by (weight scale x activation scale) and added to an f32
 * accumulator: DeepSeek's per-block promotion, with exact products. */
#include "gemm.cuh"
#include "wgmma.cuh"

#include "quant.cuh"
#include "small_ops.cuh"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const float k_one = 1.0f, k_zero = 0.0f;

int cu_sgemm_xwt(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, int rows,
                 const float *w, int out, int in)
{
    if (rows <= 0 || out <= 0)
        return 0;
    BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &k_one, w, CUDA_R_32F,
                            in, x, CUDA_R_32F, ldx, &k_zero, y, CUDA_R_32F, ldy,
                            CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
    return 0;
}

int cu_bgemm_xwt(struct cu_ctx *c, float *y, int ldy, const __nv_bfloat16 *x, int ldx, int rows,
                 const __nv_bfloat16 *w, int out, int in)
{
    if (rows <= 0 || out <= 0)
        return 0;
    BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &k_one, w, CUDA_R_16BF,
                            in, x, CUDA_R_16BF, ldx, &k_zero, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
    return 0;
}

/* ---- the FP8 tensor-core kernel ---- */

static __device__ __forceinline__ uint32_t cvt_e4m3x2(uint32_t two)
{
    uint32_t r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((unsigned short)(two & 0xffffu)));
    return r;
}

static __device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* weights are read once: no L1 allocation */
static __device__ __forceinline__ uint4 ld_stream16(const uint8_t *p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

static __device__ __forceinline__ uint32_t word_of(const uint4 &v, int s)
{
    return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

/* one 64-byte K chunk: 4 k-steps of m16n8k16 for each of the NT row tiles */
template <int NT>
static __device__ __forceinline__ void chunk_mma(float (&acc)[NT][4], const uint4 &A0, const uint4 &A1,
                                                 const uint4 (&B)[NT])
{
#pragma unroll
    for (int s = 0; s < 4; s++) {
        const uint32_t wa = word_of(A0, s), wb = word_of(A1, s);
        const uint32_t a0 = cvt_e4m3x2(wa), a2 = cvt_e4m3x2(wa >> 16);
        const uint32_t a1 = cvt_e4m3x2(wb), a3 = cvt_e4m3x2(wb >> 16);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint32_t bw = word_of(B[nt], s);
            mma_f16(acc[nt], a0, a1, a2, a3, cvt_e4m3x2(bw), cvt_e4m3x2(bw >> 16));
        }
    }
}

/* The work of this CTA's group (blockIdx.y: the group, or its index in grp_list): its entries
 * [beg, end) and weights (w1, and w3 for SwiGLU); false when it has none (no entries, or its
 * expert is not held here). */
template <bool SWIGLU>
static __device__ __forceinline__ bool fp8_group(const struct cu_fp8_gemm &a, int &beg, int &end,
                                                 const uint8_t *&W1, const uint8_t *&W3,
                                                 const float *&S1, const float *&S3)
{
    int grp = blockIdx.y;
    if (a.grp_list) {
        if (grp >= a.grp_list[a.n_groups])
            return false;
        grp = a.grp_list[grp];
    }
    beg = 0;
    end = a.M;
    if (a.grp_off) {
        beg = a.grp_off[grp];
        end = a.grp_off[grp + 1];
    }
    W1 = a.w;
    S1 = a.ws;
    W3 = nullptr;
    S3 = nullptr;
    if (!W1) {
        W1 = a.w1[grp];
        S1 = a.s1[grp];
        if (SWIGLU) {
            W3 = a.w3[grp];
            S3 = a.s3[grp];
        }
    }
    return beg < end && W1 && (!SWIGLU || W3);
}

/* The activation rows of this lane's two accumulator columns in each 8 entries of the pass at p0
 * (-1 past the group's end): their scales promote every 128-K block. */
template <int NT>
static __device__ __forceinline__ void fp8_scale_rows(const struct cu_fp8_gemm &a, int p0, int end, int t,
                                                      int (&xc0)[NT], int (&xc1)[NT])
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int e0 = p0 + nt * 8 + 2 * t;
        xc0[nt] = e0 < end ? (a.row_x ? a.row_x[e0] : e0) : -1;
        xc1[nt] = e0 + 1 < end ? (a.row_x ? a.row_x[e0 + 1] : e0 + 1) : -1;
    }
}

/* acc += (one 128-K block's sums) x (weight scale x activation scale), DeepSeek's promotion; tmp
 * and tmp3 (w3) in the m16n8 accumulator layout per 8 entries, flat. */
template <int NT, bool SWIGLU>
static __device__ __forceinline__ void fp8_promote(const struct cu_fp8_gemm &a, int kb, int kbs, float sw, float sw3,
                                                   const int (&xc0)[NT], const int (&xc1)[NT], const float *tmp,
                                                   const float *tmp3, float (&acc)[NT][4], float (&acc3)[NT][4])
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const float x0 = xc0[nt] >= 0 ? a.xs[(size_t)xc0[nt] * kbs + kb] : 0.0f;
        const float x1 = xc1[nt] >= 0 ? a.xs[(size_t)xc1[nt] * kbs + kb] : 0.0f;
        acc[nt][0] += tmp[4 * nt + 0] * (sw * x0);
        acc[nt][1] += tmp[4 * nt + 1] * (sw * x1);
        acc[nt][2] += tmp[4 * nt + 2] * (sw * x0);
        acc[nt][3] += tmp[4 * nt + 3] * (sw * x1);
        if (SWIGLU) {
            acc3[nt][0] += tmp3[4 * nt + 0] * (sw3 * x0);
            acc3[nt][1] += tmp3[4 * nt + 1] * (sw3 * x1);
            acc3[nt][2] += tmp3[4 * nt + 2] * (sw3 * x0);
            acc3[nt][3] += tmp3[4 * nt + 3] * (sw3 * x1);
        }
    }
}

/* The end of one row-tile pass: the plain output, or SwiGLU + FP8 quantization per (entry, the
 * CTA's 128 features). Every thread of the CTA calls it (it synchronizes in the SwiGLU case). */
template <int NT, bool SWIGLU>
static __device__ __forceinline__ void fp8_epilogue(const struct cu_fp8_gemm &a, float (&acc)[NT][4],
                                                    float (&acc3)[NT][4], int p0, int end, int f0, bool fvalid,
                                                    int warp, int g, int t, float *out, float (&s_amax)[8][NT * 8],
                                                    const struct cu_probe &p)
{
    if constexpr (!SWIGLU) {
        if (fvalid)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int f = f0 + g + (i >= 2 ? 8 : 0), e = p0 + nt * 8 + 2 * t + (i & 1);
                    if (e < end)
                        out[(size_t)e * a.ldy + f] = acc[nt][i];
                }
    } else {
        /* SwiGLU: h = silu(x w1) * (x w3), then FP8 per (entry, these 128 features) */
        float h[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float gv = acc[nt][i];
                h[nt][i] = __fmul_rn(__fdiv_rn(gv, 1.0f + expf(-gv)), acc3[nt][i]);
            }
            float m0 = fmaxf(fabsf(h[nt][0]), fabsf(h[nt][2])), m1 = fmaxf(fabsf(h[nt][1]), fabsf(h[nt][3]));
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, o));
                m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
            }
            if (g == 0) {
                s_amax[warp][nt * 8 + 2 * t] = m0;
                s_amax[warp][nt * 8 + 2 * t + 1] = m1;
            }
        }
        __syncthreads();
        const int nbk = a.N / 128;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            float am0 = 0.0f, am1 = 0.0f;
#pragma unroll
            for (int w = 0; w < 8; w++) {
                am0 = fmaxf(am0, s_amax[w][nt * 8 + 2 * t]);
                am1 = fmaxf(am1, s_amax[w][nt * 8 + 2 * t + 1]);
            }
            const float sc0 = cu_block_scale(am0, a.ue8m0), sc1 = cu_block_scale(am1, a.ue8m0);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int f = f0 + g + (i >= 2 ? 8 : 0), e = p0 + nt * 8 + 2 * t + (i & 1);
                if (e < end) {
                    const float sc = (i & 1) ? sc1 : sc0;
                    a.hq[(size_t)e * a.N + f] = cu_quant(h[nt][i] / sc, p, a.entry_sub[e], a.entry_row[e], f);
                }
            }
            if (warp == 0 && g == 0) {
                const int e0 = p0 + nt * 8 + 2 * t;
                if (e0 < end)
                    a.hs[(size_t)e0 * nbk + blockIdx.x] = sc0;
                if (e0 + 1 < end)
                    a.hs[(size_t)(e0 + 1) * nbk + blockIdx.x] = sc1;
            }
        }
        __syncthreads();
    }
}

template <int NT, bool SWIGLU>
static __global__ void __launch_bounds__(256) fp8_gemm_kernel(const struct cu_fp8_gemm a, int kb_per,
                                                              float *part, size_t part_stride,
                                                              const struct cu_probe p)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int beg, end;
    const uint8_t *W1, *W3;
    const float *S1, *S3;
    if (!fp8_group<SWIGLU>(a, beg, end, W1, W3, S1, S3))
        return;
    const int K = a.K, kbs = K / 128;
    const int f0 = blockIdx.x * 128 + warp * 16;
    const bool fvalid = f0 < a.N;
    const int kb_beg = blockIdx.z * kb_per, kb_end = min(kbs, kb_beg + kb_per);
    if (kb_beg >= kb_end)
        return;
    const int wr0 = fvalid ? f0 + g : 0; /* this lane's weight rows wr0 and wr0 + 8 */
    const float *s1row = S1 + (size_t)blockIdx.x * kbs;
    const float *s3row = SWIGLU ? S3 + (size_t)blockIdx.x * kbs : nullptr;
    __shared__ float s_amax[8][NT * 8];
    float *out = part ? part + blockIdx.z * part_stride : a.y;

    for (int p0 = beg; p0 < end; p0 += NT * 8) {
        int xb[NT], xc0[NT], xc1[NT];
        fp8_scale_rows<NT>(a, p0, end, t, xc0, xc1);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int eb = p0 + nt * 8 + g;
            xb[nt] = eb < end ? (a.row_x ? a.row_x[eb] : eb) : -1;
        }
        float acc[NT][4], acc3[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[nt][i] = acc3[nt][i] = 0.0f;
        if (fvalid) {
            const int cb = 2 * kb_beg, ce = 2 * kb_end;
            uint4 A0n, A1n, C0n = make_uint4(0, 0, 0, 0), C1n = C0n, Bn[NT];
            auto load = [&](int ci) {
                const int ko = ci * 64;
                const size_t o0 = cu_fp8_at(a.w_tiled, wr0, ko + 16 * t, a.N, K),
                             o1 = cu_fp8_at(a.w_tiled, wr0 + 8, ko + 16 * t, a.N, K);
                A0n = ld_stream16(W1 + o0);
                A1n = ld_stream16(W1 + o1);
                if (SWIGLU) {
                    C0n = ld_stream16(W3 + o0);
                    C1n = ld_stream16(W3 + o1);
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    Bn[nt] = xb[nt] >= 0 ? __ldg(reinterpret_cast<const uint4 *>(
                                               a.xq + (size_t)xb[nt] * K + ko + 16 * t))
                                         : make_uint4(0, 0, 0, 0);
            };
            load(cb);
            float tmp[NT][4], tmp3[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    tmp[nt][i] = tmp3[nt][i] = 0.0f;
            for (int ci = cb; ci < ce; ci++) {
                const uint4 A0 = A0n, A1 = A1n;
                uint4 C0 = C0n, C1 = C1n, B[NT];
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    B[nt] = Bn[nt];
                if (ci + 1 < ce)
                    load(ci + 1);
                chunk_mma<NT>(tmp, A0, A1, B);
                if (SWIGLU)
                    chunk_mma<NT>(tmp3, C0, C1, B);
                if (ci & 1) { /* end of a 128-K block: promote with the two scales */
                    const int kb = ci >> 1;
                    const float sw = s1row[kb], sw3 = SWIGLU ? s3row[kb] : 0.0f;
                    fp8_promote<NT, SWIGLU>(a, kb, kbs, sw, sw3, xc0, xc1, &tmp[0][0], &tmp3[0][0], acc, acc3);
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++)
                            tmp[nt][i] = tmp3[nt][i] = 0.0f;
                }
            }
        }
        fp8_epilogue<NT, SWIGLU>(a, acc, acc3, p0, end, f0, fvalid, warp, g, t, out, s_amax, p);
    }
}

/* The same computation with the operands staged through shared memory by cp.async: a ring of
 * PIPE_STAGES stages (launch_pipe), each one 128-K block (the weight-scale block) of the CTA's 128
 * weight rows (w1, and w3 for SwiGLU) and of its NT x 8 activation rows, PIPE_STAGES - 1 blocks in
 * flight ahead of the math. The register-prefetch kernel above keeps one 64-byte chunk per lane in
 * flight and needs registers for it (at 32 rows per pass 190 registers: one CTA per SM), so
 * streaming the experts' weights was bound by the bytes in flight; here they sit in shared
 * memory. Each lane reads exactly the bytes it loaded itself before (the same fragments, the
 * same mma order): results are identical to fp8_gemm_kernel's. A stage is laid out as two
 * 64-byte halves [half][row][64 B] so that the 8 lanes of a shared-memory phase read 128
 * contiguous bytes (no bank conflicts); global reads are 128 contiguous bytes per row. */
#define PIPE_STAGES_DEFAULT 4
#define PIPE_STAGES_THIN 3 /* plain products, one row tile a pass (launch_pipe) */

static __device__ __forceinline__ void cp_async16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}

template <int NT, bool SWIGLU>
static constexpr __host__ __device__ int pipe_stage_bytes()
{
    return (SWIGLU ? 2 : 1) * 128 * 128 + NT * 8 * 128;
}

template <int NT, bool SWIGLU, int PIPE_STAGES>
static __global__ void __launch_bounds__(256)
    fp8_gemm_pipe_kernel(const struct cu_fp8_gemm a, int kb_per, float *part, size_t part_stride,
                         const struct cu_probe p)
{
    extern __shared__ __align__(16) uint8_t pipe_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int beg, end;
    const uint8_t *W1, *W3;
    const float *S1, *S3;
    if (!fp8_group<SWIGLU>(a, beg, end, W1, W3, S1, S3))
        return;
    const int K = a.K, kbs = K / 128;
    const int fc = blockIdx.x * 128, f0 = fc + warp * 16, nrows = min(128, a.N - fc);
    const bool fvalid = f0 < a.N;
    const int kb_beg = blockIdx.z * kb_per, kb_end = min(kbs, kb_beg + kb_per);
    if (kb_beg >= kb_end)
        return;
    const float *s1row = S1 + (size_t)blockIdx.x * kbs;
    const float *s3row = SWIGLU ? S3 + (size_t)blockIdx.x * kbs : nullptr;
    __shared__ float s_amax[8][NT * 8];
    float *out = part ? part + blockIdx.z * part_stride : a.y;
    constexpr int WT = 128 * 128, ST = pipe_stage_bytes<NT, SWIGLU>();
    /* stage layout: W1 [2][128][64], then W3 [2][128][64] (SwiGLU), then X [2][NT*8][64] */

    for (int p0 = beg; p0 < end; p0 += NT * 8) {
        /* a.pdl (no row_x): launched under the activations' quantization; the first stages'
         * weights, which no kernel writes, load before the wait, their activations after it */
        const bool early = a.pdl && p0 == beg;
        int xc0[NT], xc1[NT];
        /* this thread's activation piece of every stage (NT*8 rows x 8 pieces of 16 B) */
        const int xj = threadIdx.x >> 3, xp = threadIdx.x & 7;
        int xrow = -1;
        auto load_w = [&](int kb, int st) {
            uint8_t *sb = pipe_smem + st * ST;
            const size_t ko = (size_t)kb * 128;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int piece = threadIdx.x + 256 * i, r = piece >> 3, pc = piece & 7;
                if (r < nrows) {
                    const int so = (pc >> 2) * (128 * 64) + r * 64 + (pc & 3) * 16;
                    const size_t wo = cu_fp8_at(a.w_tiled, fc + r, ko + pc * 16, a.N, K);
                    cp_async16(sb + so, W1 + wo);
                    if (SWIGLU)
                        cp_async16(sb + WT + so, W3 + wo);
                }
            }
        };
        auto load_x = [&](int kb, int st) {
            uint8_t *sb = pipe_smem + st * ST;
            const size_t ko = (size_t)kb * 128;
            if (xj < NT * 8) {
                uint8_t *xd = sb + (SWIGLU ? 2 : 1) * WT + (xp >> 2) * (NT * 8 * 64) + xj * 64 + (xp & 3) * 16;
                if (xrow >= 0)
                    cp_async16(xd, a.xq + (size_t)xrow * K + ko + xp * 16);
                else
                    *reinterpret_cast<uint4 *>(xd) = make_uint4(0, 0, 0, 0);
            }
        };
        auto load_stage = [&](int kb, int st) {
            load_w(kb, st);
            load_x(kb, st);
        };
        const int nkb = kb_end - kb_beg;
        if (early) {
#pragma unroll
            for (int s = 0; s < PIPE_STAGES - 1; s++)
                if (s < nkb)
                    load_w(kb_beg + s, s);
            pdl_begin();
        }
        fp8_scale_rows<NT>(a, p0, end, t, xc0, xc1);
        if (xj < NT * 8 && p0 + xj < end)
            xrow = a.row_x ? a.row_x[p0 + xj] : p0 + xj;
        float acc[NT][4], acc3[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[nt][i] = acc3[nt][i] = 0.0f;
#pragma unroll
        for (int s = 0; s < PIPE_STAGES - 1; s++) {
            if (s < nkb) { /* the early weights are in stage 0's group */
                if (!early)
                    load_w(kb_beg + s, s);
                load_x(kb_beg + s, s);
            }
            asm volatile("cp.async.commit_group;");
        }
        for (int i = 0; i < nkb; i++) {
            asm volatile("cp.async.wait_group %0;" ::"n"(PIPE_STAGES - 2));
            __syncthreads(); /* stage i is in; every warp is done with stage i - 1 */
            if (i + PIPE_STAGES - 1 < nkb)
                load_stage(kb_beg + i + PIPE_STAGES - 1, (i + PIPE_STAGES - 1) % PIPE_STAGES);
            asm volatile("cp.async.commit_group;");
            if (!fvalid)
                continue;
            const uint8_t *sb = pipe_smem + (i % PIPE_STAGES) * ST;
            float tmp[NT][4], tmp3[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    tmp[nt][j] = tmp3[nt][j] = 0.0f;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint8_t *wh = sb + h * (128 * 64) + (warp * 16 + g) * 64 + 16 * t;
                const uint4 A0 = *reinterpret_cast<const uint4 *>(wh);
                const uint4 A1 = *reinterpret_cast<const uint4 *>(wh + 8 * 64);
                uint4 B[NT];
                const uint8_t *xh = sb + (SWIGLU ? 2 : 1) * WT + h * (NT * 8 * 64) + g * 64 + 16 * t;
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    B[nt] = *reinterpret_cast<const uint4 *>(xh + nt * 8 * 64);
                chunk_mma<NT>(tmp, A0, A1, B);
                if (SWIGLU) {
                    const uint4 C0 = *reinterpret_cast<const uint4 *>(wh + WT);
                    const uint4 C1 = *reinterpret_cast<const uint4 *>(wh + WT + 8 * 64);
                    chunk_mma<NT>(tmp3, C0, C1, B);
                }
            }
            const int kb = kb_beg + i;
            const float sw = s1row[kb], sw3 = SWIGLU ? s3row[kb] : 0.0f;
            fp8_promote<NT, SWIGLU>(a, kb, kbs, sw, sw3, xc0, xc1, &tmp[0][0], &tmp3[0][0], acc, acc3);
        }
        asm volatile("cp.async.wait_group 0;");
        __syncthreads(); /* the ring is reused by the next pass */
        fp8_epilogue<NT, SWIGLU>(a, acc, acc3, p0, end, f0, fvalid, warp, g, t, out, s_amax, p);
    }
}

/* Many rows per weight (prefill-sized grouped experts): the FP8 tensor core through wgmma. A CTA
 * of two warpgroups owns 128 weight rows (one scale block; warpgroup w rows 64w..) and passes of
 * 64 entries; per 128-K block the weight tiles (w1, and w3 for SwiGLU) and the activation tile go
 * through a cp.async ring in the 128-byte-swizzle K-major layout (chunk c of row r at
 * c ^ (r % 8), 1024-byte-aligned tiles), four m64n64k32 e4m3 wgmmas (A = weights, B =
 * activations, both from shared memory) sum the block in the tensor core's FP8 accumulation, and
 * the block is promoted into f32 with the two scales, DeepSeek's (DeepGEMM's) scheme. The
 * accumulators have mma.sync's m16n8 layout per 8 entries (warp 4w + warp-in-group owns 16 weight
 * rows), so fp8_epilogue serves as is. Not f32-exact (2e-4-class, like cuBLASLt's FP8): used
 * from WG_MIN_ROWS expected rows per group on, where the mma.sync kernels are compute-bound. */
#define WG_STAGES 3
#define WG_MIN_ROWS 24

template <bool SWIGLU>
static constexpr __host__ __device__ int wg_stage_bytes()
{
    return (SWIGLU ? 2 : 1) * 128 * 128 + 64 * 128;
}

template <bool SWIGLU>
static __global__ void __launch_bounds__(256, 1) fp8_gemm_wg_kernel(const struct cu_fp8_gemm a, const struct cu_probe p)
{
    constexpr int NT = 8;
    extern __shared__ __align__(16) uint8_t wg_dsmem[];
    uint8_t *sm = wg_dsmem + ((1024 - ((uint32_t)__cvta_generic_to_shared(wg_dsmem) & 1023u)) & 1023u);
    const int lane = threadIdx.x & 31, wgi = threadIdx.x >> 7, wq = (threadIdx.x >> 5) & 3, g = lane >> 2,
              t = lane & 3;
    const int warp = 4 * wgi + wq; /* fp8_epilogue's warp: 16 weight rows from fc + 16 warp */
    int beg, end;
    const uint8_t *W1, *W3;
    const float *S1, *S3;
    if (!fp8_group<SWIGLU>(a, beg, end, W1, W3, S1, S3))
        return;
    const int K = a.K, kbs = K / 128;
    const int fc = blockIdx.x * 128, f0 = fc + warp * 16, nrows = min(128, a.N - fc);
    const bool fvalid = f0 < a.N;
    const float *s1row = S1 + (size_t)blockIdx.x * kbs;
    const float *s3row = SWIGLU ? S3 + (size_t)blockIdx.x * kbs : nullptr;
    __shared__ float s_amax[8][NT * 8];
    constexpr int WT = 128 * 128, ST = wg_stage_bytes<SWIGLU>();
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(sm);

    for (int p0 = beg; p0 < end; p0 += NT * 8) {
        int xc0[NT], xc1[NT];
        fp8_scale_rows<NT>(a, p0, end, t, xc0, xc1);
        /* this thread's activation row and chunks: 64 rows x 8 chunks = 2 per thread */
        const int xj = threadIdx.x >> 2;
        int xrow = -1;
        if (p0 + xj < end)
            xrow = a.row_x ? a.row_x[p0 + xj] : p0 + xj;
        auto load_stage = [&](int kb, int st) {
            uint8_t *sb = sm + st * ST;
            const size_t ko = (size_t)kb * 128;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int piece = threadIdx.x + 256 * i, r = piece >> 3, c = piece & 7;
                if (r < nrows) {
                    const int so = r * 128 + ((c ^ (r & 7)) << 4);
                    const size_t wo = cu_fp8_at(a.w_tiled, fc + r, ko + c * 16, a.N, K);
                    cp_async16(sb + so, W1 + wo);
                    if (SWIGLU)
                        cp_async16(sb + WT + so, W3 + wo);
                }
            }
            uint8_t *xd = sb + (SWIGLU ? 2 : 1) * WT;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int c = (threadIdx.x & 3) + 4 * i;
                uint8_t *dst = xd + xj * 128 + ((c ^ (xj & 7)) << 4);
                if (xrow >= 0)
                    cp_async16(dst, a.xq + (size_t)xrow * K + ko + c * 16);
                else
                    *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
            }
        };
        float acc[NT][4], acc3[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[nt][i] = acc3[nt][i] = 0.0f;
        const int nkb = kbs;
#pragma unroll
        for (int st = 0; st < WG_STAGES - 1; st++) {
            if (st < nkb)
                load_stage(st, st);
            asm volatile("cp.async.commit_group;");
        }
        for (int i = 0; i < nkb; i++) {
            asm volatile("cp.async.wait_group %0;" ::"n"(WG_STAGES - 2));
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();
            if (i + WG_STAGES - 1 < nkb)
                load_stage(i + WG_STAGES - 1, (i + WG_STAGES - 1) % WG_STAGES);
            asm volatile("cp.async.commit_group;");
            const uint32_t sb = sbase + (i % WG_STAGES) * ST;
            const uint32_t xa = sb + (SWIGLU ? 2 : 1) * WT;
            float tmp[32], tmp3[32];
#pragma unroll
            for (int x = 0; x < 32; x++)
                tmp[x] = tmp3[x] = 0.0f;
            if (64 * wgi < nrows) { /* the warpgroup's 64 weight rows exist (N is a multiple of 64 here) */
                wg_fence(tmp);
                if (SWIGLU)
                    wg_fence(tmp3);
                wg_begin();
#pragma unroll
                for (int ks = 0; ks < 4; ks++)
                    wgmma_e4m3_ss_n64(tmp, wg_desc_sw128(sb + wgi * 8192 + 32 * ks), wg_desc_sw128(xa + 32 * ks),
                                    ks > 0);
                if (SWIGLU)
#pragma unroll
                    for (int ks = 0; ks < 4; ks++)
                        wgmma_e4m3_ss_n64(tmp3, wg_desc_sw128(sb + WT + wgi * 8192 + 32 * ks),
                                        wg_desc_sw128(xa + 32 * ks), ks > 0);
                wg_commit_wait();
                wg_fence(tmp);
                if (SWIGLU)
                    wg_fence(tmp3);
            }
            const float sw = s1row[i], sw3 = SWIGLU ? s3row[i] : 0.0f;
            fp8_promote<NT, SWIGLU>(a, i, kbs, sw, sw3, xc0, xc1, tmp, tmp3, acc, acc3);
        }
        asm volatile("cp.async.wait_group 0;");
        __syncthreads(); /* the ring is reused by the next pass */
        fp8_epilogue<NT, SWIGLU>(a, acc, acc3, p0, end, f0, fvalid, warp, g, t, a.y, s_amax, p);
    }
}

static __global__ void split_reduce_kernel(float *y, int ldy, const float *part, int splits, int M, int N)
{
    pdl_begin(); /* launched under the GEMM (a.pdl) */
    const size_t n = (size_t)M * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        /* the splits' loads 8 at a time, summed in split order (with one load a loop trip a
         * 56-split reduce of one row took 5.1 us under Nsight Compute; not re-timed alone) */
        float s = 0.0f;
        for (int z0 = 0; z0 < splits; z0 += 8) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; u++)
                v[u] = z0 + u < splits ? part[(size_t)(z0 + u) * n + i] : 0.0f;
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (z0 + u < splits)
                    s += v[u];
        }
        y[(i / N) * ldy + i % N] = s;
    }
}

template <int NT, bool SWIGLU, int S>
static int launch_pipe_s(struct cu_ctx *c, const struct cu_fp8_gemm *a, dim3 grid, int kb_per,
                         float *part, size_t part_stride, const struct cu_probe &p)
{
    const int bytes = S * pipe_stage_bytes<NT, SWIGLU>();
    auto kern = fp8_gemm_pipe_kernel<NT, SWIGLU, S>;
    CU_SMEM_OPTIN(kern, bytes);
    CU_CHECK(
        cu_launch_pdl(c, a->pdl, kern, grid, dim3(256), bytes, *a, kb_per, part, part_stride, p));
    return 0;
}

/* The ring's depth. Plain products of one row tile a pass (the down projection of a few rows'
 * experts, the dense linears of a few rows) take PIPE_STAGES_THIN stages: 51 KB, so that four
 * CTAs fit an SM (64 registers) where four stages' 68 KB fit three, and the down projection of
 * one row's 8 experts (448 CTAs) runs in one wave instead of 1.13; knob fp8_stages_dn 4 for the
 * four. Measured (docs/GPU-NOTES.md, session of 2026-11-30, calls 2-3): the routed
 * experts at one row 0.118-0.121 against 0.120-0.126 ms; SwiGLU with 3, 5 or 6 stages instead of 4
 * gained nothing (at 4 rows 3 lost 6%). */
template <int NT, bool SWIGLU>
static int launch_pipe(struct cu_ctx *c, const struct cu_fp8_gemm *a, dim3 grid, int kb_per,
                       float *part, size_t part_stride, const struct cu_probe &p)
{
    if (NT == 1 && !SWIGLU && c->fp8_stages_dn != 4)
        return launch_pipe_s<1, false, PIPE_STAGES_THIN>(c, a, grid, kb_per, part, part_stride, p);
    return launch_pipe_s<NT, SWIGLU, PIPE_STAGES_DEFAULT>(c, a, grid, kb_per, part, part_stride, p);
}

template <int NT>
static int launch_fp8(struct cu_ctx *c, const struct cu_fp8_gemm *a, dim3 grid, int kb_per, float *part,
                      size_t part_stride, const struct cu_probe &p)
{
    if (!c->fp8_reg) /* the knob fp8_reg: the baseline of bench/cuda_bench --only moe */
        return a->hq ? launch_pipe<NT, true>(c, a, grid, kb_per, part, part_stride, p)
                     : launch_pipe<NT, false>(c, a, grid, kb_per, part, part_stride, p);
    if (a->hq)
        fp8_gemm_kernel<NT, true><<<grid, 256, 0, c->st>>>(*a, kb_per, part, part_stride, p);
    else
        fp8_gemm_kernel<NT, false><<<grid, 256, 0, c->st>>>(*a, kb_per, part, part_stride, p);
    return 0;
}

int cu_fp8_gemm_run(struct cu_ctx *c, const struct cu_fp8_gemm *a)
{
    if (a->K % 128 || a->N % 16 || (a->hq && a->N % 128))
        return DSV32_ESHAPE;
    const int kbs = a->K / 128, nfb = (a->N + 127) / 128;
    /* rows per tile pass: the expected rows of a group */
    const int per_group = a->grp_off && a->n_groups > 0 ? (a->M + a->n_groups - 1) / a->n_groups : a->M;
    const int nt = per_group <= 4 ? 1 : per_group <= 12 ? 2 : 4;
    int splits = 1, kb_per = kbs;
    float *part = NULL;
    if (!a->hq && !a->grp_off && a->M > 0) {
        /* split K when the grid is too small to keep the memory system busy (for at most 3 or
         * 4 CTAs an SM instead, at one row: no faster, GPU-NOTES 2026-11-30 call 10) */
        const int target = 2 * c->n_sm;
        if (nfb < target) {
            splits = (target + nfb - 1) / nfb;
            if (splits > kbs)
                splits = kbs;
            kb_per = (kbs + splits - 1) / splits;
            splits = (kbs + kb_per - 1) / kb_per;
        }
        if (splits > 1) {
            part = (float *)cu_scratch(c, SCR_PART, sizeof(float) * (size_t)splits * a->M * a->N);
            if (!part)
                return -ENOMEM;
        }
    }
    struct cu_fp8_gemm args = *a;
    if (part)
        args.ldy = a->N;
    struct cu_probe p;
    memset(&p, 0, sizeof(p));
    if (a->hq)
        CU_TRY(cu_probe_begin(c, &p));
    /* grouped: a CTA column per group, or per listed group (a few rows' few experts would
     * otherwise queue thousands of empty CTAs, each waiting for an SM's shared memory, between
     * the working ones) */
    const int n_y = !a->grp_off ? 1 : a->grp_list && a->M < a->n_groups ? a->M : a->n_groups;
    dim3 grid(nfb, n_y > 0 ? n_y : 1, splits);
    const size_t part_stride = (size_t)a->M * a->N;
    if (a->grp_off && per_group >= WG_MIN_ROWS && !c->fp8_reg && !c->fp8_no_wg && a->N % 64 == 0 && !part) {
        /* prefill-sized groups: the wgmma kernel (not f32-exact; the fast numerics only reach here) */
        const int bytes = 1024 + WG_STAGES * (a->hq ? wg_stage_bytes<true>() : wg_stage_bytes<false>());
        auto kern = a->hq ? fp8_gemm_wg_kernel<true> : fp8_gemm_wg_kernel<false>;
        CU_SMEM_OPTIN(kern, bytes);
        kern<<<grid, 256, bytes, c->st>>>(args, p);
    } else if (nt == 1)
        CU_TRY(launch_fp8<1>(c, &args, grid, kb_per, part, part_stride, p));
    else if (nt == 2)
        CU_TRY(launch_fp8<2>(c, &args, grid, kb_per, part, part_stride, p));
    else
        CU_TRY(launch_fp8<4>(c, &args, grid, kb_per, part, part_stride, p));
    CU_LAUNCHED("fp8_gemm");
    if (part) {
        size_t n = (size_t)a->M * a->N;
        unsigned b = cu_blocks(n, 256);
        CU_CHECK(cu_launch_pdl(c, a->pdl, split_reduce_kernel, dim3(b > 4096u ? 4096u : b),
                               dim3(256), 0, a->y, a->ldy, (const float *)part, splits, a->M,
                               a->N));
        CU_LAUNCHED("split_reduce");
    }
    if (a->hq)
        CU_TRY(cu_probe_end(c, &p));
    return 0;
}

/* ---- cuBLASLt block-scaled FP8 ---- */

/* Operand arrangement and scale layouts tried by the calibration, most plausible first:
 * arr 0: A = weight (BLK128x128), B = activations (VEC128), D = y directly;
 * arr 1: A = activations (VEC128), B = weight (BLK128x128), D = y^T (transposed after).
 * wl: weight scales as [nblk][round_up(kblk, 4)] (0), [nblk][kblk] (1), [kblk][nblk] (2).
 * al: activation scales as [kblk][rows] (0, outer-dimension-major) or [rows][kblk] (1). */
struct lt_variant {
    int arr, wl, al;
    cudaDataType_t dt;
};
static const struct lt_variant lt_variants[] = {
    {0, 0, 0, CUDA_R_32F}, {1, 0, 0, CUDA_R_32F}, {0, 1, 0, CUDA_R_32F}, {1, 1, 0, CUDA_R_32F},
    {0, 2, 0, CUDA_R_32F}, {1, 2, 0, CUDA_R_32F}, {0, 0, 1, CUDA_R_32F}, {1, 0, 1, CUDA_R_32F},
    {0, 1, 1, CUDA_R_32F}, {1, 1, 1, CUDA_R_32F}, {0, 0, 0, CUDA_R_16BF}, {1, 0, 0, CUDA_R_16BF},
};
#define N_LT_VARIANTS ((int)(sizeof(lt_variants) / sizeof(lt_variants[0])))

static __global__ void lt_scale_kernel(float *dst, const float *src, int nb, int kb, int wl)
{
    const int L4 = (kb + 3) / 4 * 4;
    const int n = wl == 0 ? nb * L4 : nb * kb;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (wl == 0) {
            const int r = i / L4, k = i % L4;
            dst[i] = k < kb ? src[r * kb + k] : 1.0f;
        } else if (wl == 1) {
            dst[i] = src[i];
        } else {
            const int k = i / nb, r = i % nb;
            dst[i] = src[r * kb + k];
        }
    }
}

static __global__ void transpose_kernel(float *y, int ldy, const float *d, int M, int N)
{
    /* d is column-major M x N (d[m + n*M]); y[m*ldy + n] */
    const size_t n = (size_t)M * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / N, col = i % N;
        y[m * ldy + col] = d[m + col * M];
    }
}

static __global__ void bf16_to_f32_kernel(float *y, const __nv_bfloat16 *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = __bfloat162float(x[i]);
}

/* one block-scaled FP8 matmul: y[M, N] (ldy) = x W^T; xs_rows [M][KB], xs_t [KB][M] */
static int lt_matmul(struct cu_ctx *c, const struct lt_variant *v, float *y, int ldy,
                     const uint8_t *xq, const float *xs_rows, const float *xs_t, int M,
                     const uint8_t *w, const float *w_lt_scale, int N, int K)
{
    cublasLtMatmulDesc_t desc = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    int r = DSV32_ECUBLAS;
    const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    const int32_t blk = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, vec = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    const float *xsc = v->al == 0 ? xs_t : xs_rows;
    const void *a_ptr = v->arr == 0 ? (const void *)w : (const void *)xq;
    const void *b_ptr = v->arr == 0 ? (const void *)xq : (const void *)w;
    const void *a_sc = v->arr == 0 ? (const void *)w_lt_scale : (const void *)xsc;
    const void *b_sc = v->arr == 0 ? (const void *)xsc : (const void *)w_lt_scale;
    const int32_t a_mode = v->arr == 0 ? blk : vec, b_mode = v->arr == 0 ? vec : blk;
    const int m = v->arr == 0 ? N : M, n = v->arr == 0 ? M : N;
    const size_t esz = v->dt == CUDA_R_32F ? 4 : 2;
    void *d = NULL;
    int ldd = m;
    if (v->arr == 0 && v->dt == CUDA_R_32F) {
        d = y;
        ldd = ldy;
    } else {
        d = cu_scratch(c, SCR_TMP2, esz * (size_t)M * N);
        if (!d)
            return -ENOMEM;
    }
    cublasLtMatmulHeuristicResult_t res;
    int n_res = 0;
    if (cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)) ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)) ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)) ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)) ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_sc, sizeof(a_sc)) ||
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_sc, sizeof(b_sc)) ||
        cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, K, m, K) ||
        cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, K, n, K) ||
        cublasLtMatrixLayoutCreate(&lc, v->dt, m, n, ldd) ||
        cublasLtMatmulPreferenceCreate(&pref) ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &c->lt_ws_bytes, sizeof(c->lt_ws_bytes)))
        goto out;
    if (cublasLtMatmulAlgoGetHeuristic(c->lt, desc, la, lb, lc, lc, pref, 1, &res, &n_res) !=
            CUBLAS_STATUS_SUCCESS || n_res == 0) {
        r = DSV32_EUNSUPPORTED;
        goto out;
    }
    if (cublasLtMatmul(c->lt, desc, &k_one, a_ptr, la, b_ptr, lb, &k_zero, d, lc, d, lc, &res.algo,
                       c->lt_ws, c->lt_ws_bytes, c->st) != CUBLAS_STATUS_SUCCESS)
        goto out;
    r = 0;
    if (v->dt != CUDA_R_32F) { /* widen to f32, same layout */
        float *f = (float *)cu_scratch(c, SCR_TMP, sizeof(float) * (size_t)M * N);
        if (!f) {
            r = -ENOMEM;
            goto out;
        }
        bf16_to_f32_kernel<<<cu_blocks((size_t)M * N, 256), 256, 0, c->st>>>(f, (const __nv_bfloat16 *)d,
                                                                            (size_t)M * N);
        d = f;
    }
    if (v->arr == 1) { /* d is column-major M x N: y = its transpose */
        unsigned b = cu_blocks((size_t)M * N, 256);
        transpose_kernel<<<b > 4096u ? 4096u : b, 256, 0, c->st>>>(y, ldy, (const float *)d, M, N);
    } else if (d != (void *)y) { /* d is column-major N x M: y's rows, densely packed */
        if (cudaMemcpy2DAsync(y, sizeof(float) * ldy, d, sizeof(float) * N, sizeof(float) * N, M,
                              cudaMemcpyDeviceToDevice, c->st) != cudaSuccess)
            r = DSV32_ECUDA;
    }
    if (cudaPeekAtLastError() != cudaSuccess)
        r = DSV32_ECUDA;
out:
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    if (lc)
        cublasLtMatrixLayoutDestroy(lc);
    if (lb)
        cublasLtMatrixLayoutDestroy(lb);
    if (la)
        cublasLtMatrixLayoutDestroy(la);
    if (desc)
        cublasLtMatmulDescDestroy(desc);
    return r;
}

/* the weight's scales in the calibrated layout, made once */
static const float *lt_weight_scale(struct cu_ctx *c, struct cu_weight *cw)
{
    if (cw->lt_scale)
        return cw->lt_scale;
    const struct lt_variant *v = &lt_variants[c->lt_variant];
    const int nb = (int)((cw->rows + 127) / 128), kb = (int)((cw->cols + 127) / 128);
    const int n = v->wl == 0 ? nb * ((kb + 3) / 4 * 4) : nb * kb;
    if (cudaMalloc(&cw->lt_scale, sizeof(float) * (size_t)n) != cudaSuccess) {
        cw->lt_scale = NULL;
        return NULL;
    }
    lt_scale_kernel<<<cu_blocks((size_t)n, 256), 256, 0, c->st>>>(cw->lt_scale, cw->scale, nb, kb, v->wl);
    return cw->lt_scale;
}

/* y = x W^T by plain f32 arithmetic on the dequantized operands: the calibration's reference */
static __global__ void ref_fp8_kernel(float *y, const uint8_t *xq, const float *xs, const uint8_t *w,
                                      const float *ws, int M, int N, int K)
{
    const int m = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const int kbs = K / 128;
    float acc = 0.0f;
    for (int kb = 0; kb < kbs; kb++) {
        float s = 0.0f;
        for (int k = kb * 128; k < kb * 128 + 128; k++)
            s += cu_e4m3_to_f32(xq[(size_t)m * K + k]) * cu_e4m3_to_f32(w[(size_t)n * K + k]);
        acc += s * xs[m * kbs + kb] * ws[(n / 128) * kbs + kb];
    }
    y[(size_t)m * N + n] = acc;
}

static __global__ void fill_cal_kernel(uint8_t *q, size_t nq, float *s, size_t ns, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < nq; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        uint8_t b = (uint8_t)(h & 0xff);
        if ((b & 0x7f) == 0x7f || (b & 0x78) == 0x78) /* no NaN, no huge values */
            b &= 0xb7;
        q[i] = b;
        if (i < ns)
            s[i] = ldexpf(1.0f + (float)((h >> 8) & 7) / 8.0f, -(int)((h >> 11) & 3) - 4);
    }
}

static __global__ void rel_err_kernel(const float *a, const float *b, size_t n, double *out)
{
    __shared__ double sn[256], sd[256];
    double num = 0, den = 0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        double d = (double)a[i] - (double)b[i];
        num += isnan(d) ? 1e300 : d * d;
        den += (double)b[i] * (double)b[i];
    }
    sn[threadIdx.x] = num;
    sd[threadIdx.x] = den;
    __syncthreads();
    for (int o = 128; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) {
            sn[threadIdx.x] += sn[threadIdx.x + o];
            sd[threadIdx.x] += sd[threadIdx.x + o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *out = sqrt(sn[0] / (sd[0] > 0 ? sd[0] : 1));
}

int cu_lt_calibrate(struct cu_ctx *c)
{
    if (c->lt_state)
        return 0;
    c->lt_state = -1;
    const int M = 208, N = 384, K = 640, KB = K / 128, NB = N / 128; /* M: not a multiple of 32 */
    uint8_t *xq = NULL, *w = NULL;
    float *xs = NULL, *xs_t = NULL, *ws = NULL, *wl = NULL, *y = NULL, *yref = NULL;
    double *err = NULL, herr = 0;
    int r = 0;
    /* scale buffers far larger than any layout needs: a layout guess that reads past what it
     * should must find memory there, not fault (a fault would end the process's CUDA context) */
    const size_t pad = 1 << 16;
    if (cudaMalloc(&xq, (size_t)M * K) || cudaMalloc(&w, (size_t)N * K) ||
        cudaMalloc(&xs, sizeof(float) * pad) || cudaMalloc(&xs_t, sizeof(float) * pad) ||
        cudaMalloc(&ws, sizeof(float) * NB * KB) || cudaMalloc(&wl, sizeof(float) * pad) ||
        cudaMalloc(&y, sizeof(float) * M * N) || cudaMalloc(&yref, sizeof(float) * M * N) ||
        cudaMalloc(&err, sizeof(double))) {
        snprintf(c->lt_note, sizeof(c->lt_note), "calibration: out of device memory");
        r = DSV32_ECUDA;
        goto out;
    }
    fill_cal_kernel<<<64, 256, 0, c->st>>>(xq, (size_t)M * K, xs, (size_t)M * KB, 0x1234u);
    fill_cal_kernel<<<64, 256, 0, c->st>>>(w, (size_t)N * K, ws, (size_t)NB * KB, 0x9876u);
    transpose_kernel<<<8, 256, 0, c->st>>>(xs_t, M, xs, KB, M); /* xs_t[kb][m] = xs[m][kb] */
    ref_fp8_kernel<<<dim3((N + 127) / 128, M), 128, 0, c->st>>>(yref, xq, xs, w, ws, M, N, K);
    snprintf(c->lt_note, sizeof(c->lt_note), "cuBLASLt block-scaled FP8: no variant accepted");
    for (int i = 0; i < N_LT_VARIANTS; i++) {
        const struct lt_variant *v = &lt_variants[i];
        const int n = v->wl == 0 ? NB * ((KB + 3) / 4 * 4) : NB * KB;
        lt_scale_kernel<<<cu_blocks((size_t)n, 256), 256, 0, c->st>>>(wl, ws, NB, KB, v->wl);
        cudaMemsetAsync(y, 0xff, sizeof(float) * M * N, c->st); /* poison: NaN */
        int rr = lt_matmul(c, v, y, N, xq, xs, xs_t, M, w, wl, N, K);
        cudaGetLastError();
        if (rr < 0)
            continue;
        rel_err_kernel<<<1, 256, 0, c->st>>>(y, yref, (size_t)M * N, err);
        if (cudaMemcpyAsync(&herr, err, sizeof(double), cudaMemcpyDeviceToHost, c->st) != cudaSuccess ||
            cudaStreamSynchronize(c->st) != cudaSuccess) {
            cudaGetLastError();
            continue;
        }
        if (herr < 1e-2) {
            c->lt_state = 1;
            c->lt_variant = i;
            snprintf(c->lt_note, sizeof(c->lt_note),
                     "cuBLASLt block-scaled FP8 ok: variant %d (arr %d, weight scales %d, act scales %d, "
                     "D %s), rel err %.2e vs f32 reference",
                     i, v->arr, v->wl, v->al, v->dt == CUDA_R_32F ? "f32" : "bf16", herr);
            break;
        }
    }
out:
    cudaStreamSynchronize(c->st);
    cudaGetLastError();
    cudaFree(xq);
    cudaFree(w);
    cudaFree(xs);
    cudaFree(xs_t);
    cudaFree(ws);
    cudaFree(wl);
    cudaFree(y);
    cudaFree(yref);
    cudaFree(err);
    log_info("%s", c->lt_note);
    return r;
}

/* ---- linear ---- */

int cu_linear(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, int rows,
              const struct dsv32_weight *w, int ue8m0, int probe_sub)
{
    struct cu_weight *cw = (struct cu_weight *)w->be;
    const int in = (int)w->cols, out = (int)w->rows;
    if (rows <= 0 || out <= 0)
        return 0;
    if (!cw)
        return -EINVAL;
    if (w->dtype == DSV32_DT_F8_E4M3) {
        if (!cw->fp8) { /* exact: act_quant simulated in f32, then f32 GEMM */
            float *xdq = (float *)cu_scratch(c, SCR_TMP, sizeof(float) * (size_t)rows * in);
            if (!xdq)
                return -ENOMEM;
            CU_TRY(cu_act_quant(c, x, ldx, rows, in, ue8m0, probe_sub, xdq, NULL, NULL, NULL, 0));
            return cu_sgemm_xwt(c, y, ldy, xdq, in, rows, cw->f32, out, in);
        }
        /* cuBLASLt's block-scaled FP8 from lt_min_rows rows, and from lt_big_rows for weights of
         * 32M elements or more (wq_b, wo): below those the mma.sync kernel (exact products) is
         * as fast or faster, above them cuBLASLt (BENCHMARKS.md, the layer's other ops) */
        const int lt_from = (int64_t)out * in >= ((int64_t)32 << 20) ? c->lt_big_rows : c->lt_min_rows;
        if (c->lt_fp8 && rows >= lt_from && !c->lt_state)
            CU_TRY(cu_lt_calibrate(c));
        const int use_lt = c->lt_fp8 && rows >= lt_from && c->lt_state > 0 && !cw->fp8_tiled;
        uint8_t *xq = (uint8_t *)cu_scratch(c, SCR_XQ, (size_t)rows * in);
        float *xs = (float *)cu_scratch(c, SCR_XS, sizeof(float) * (size_t)rows * (in / 128));
        float *xs_t = use_lt ? (float *)cu_scratch(c, SCR_XS_T, sizeof(float) * (size_t)rows * (in / 128)) : NULL;
        if (!xq || !xs || (use_lt && !xs_t))
            return -ENOMEM;
        CU_TRY(cu_act_quant(c, x, ldx, rows, in, ue8m0, probe_sub, NULL, xq, xs, xs_t, rows));
        if (use_lt) {
            const float *wsc = lt_weight_scale(c, cw);
            if (!wsc)
                return -ENOMEM;
            int r = lt_matmul(c, &lt_variants[c->lt_variant], y, ldy, xq, xs, xs_t, rows, cw->fp8, wsc,
                              out, in);
            if (r != DSV32_EUNSUPPORTED)
                return r;
            /* a shape this cuBLASLt does not take: the kernel below does */
        }
        struct cu_fp8_gemm a;
        memset(&a, 0, sizeof(a));
        a.xq = xq;
        a.xs = xs;
        a.K = in;
        a.N = out;
        a.n_groups = 1;
        a.w = cw->fp8;
        a.w_tiled = cw->fp8_tiled; /* a routed expert's matrix, tiled by moe.cu */
        a.ws = cw->scale;
        a.M = rows;
        a.y = y;
        a.ldy = ldy;
        /* under act_quant (not fp8_gemm_kernel, which does not wait) */
        a.pdl = c->pdl && c->fp8_pdl && !c->fp8_reg;
        return cu_fp8_gemm_run(c, &a);
    }
    if (cw->bf16) {
        __nv_bfloat16 *xb = (__nv_bfloat16 *)cu_scratch(c, SCR_BF16, sizeof(__nv_bfloat16) * (size_t)rows * in);
        if (!xb)
            return -ENOMEM;
        CU_TRY(cu_to_bf16(c, xb, x, rows, in, ldx));
        return cu_bgemm_xwt(c, y, ldy, xb, in, rows, cw->bf16, out, in);
    }
    if (!cw->f32)
        return -EINVAL;
    return cu_sgemm_xwt(c, y, ldy, x, ldx, rows, cw->f32, out, in);
}

/* ---- MLA absorption: per head, q_nope through W_uk; latent through W_uv ---- */

/* the bf16 form of wkv_b for the fast path (made once) */
static const __nv_bfloat16 *wkv_bf16(struct cu_ctx *c, struct cu_weight *cw)
{
    if (cw->bf16)
        return cw->bf16;
    if (cw->bf16_lazy)
        return cw->bf16_lazy;
    if (!cw->fp8)
        return NULL;
    if (cudaMalloc(&cw->bf16_lazy, sizeof(__nv_bfloat16) * (size_t)(cw->rows * cw->cols)) != cudaSuccess) {
        cw->bf16_lazy = NULL;
        return NULL;
    }
    if (cu_dequant(c, NULL, cw->bf16_lazy, cw->fp8, DSV32_DT_F8_E4M3, cw->scale, cw->rows, cw->cols) < 0)
        return NULL;
    return cw->bf16_lazy;
}

static __global__ void pack_bf16_kernel(__nv_bfloat16 *y, const float *x, int rows, int heads, int width,
                                        int ldr, int ldh)
{
    const size_t n = (size_t)rows * heads * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / ((size_t)heads * width), h = (i / width) % heads, d = i % width;
        y[i] = __float2bfloat16_rn(x[r * ldr + h * ldh + d]);
    }
}

int cu_mla_absorb(struct cu_ctx *c, void *q_lat, const float *q, int rows,
                  const struct dsv32_weight *wkv_b)
{
    const struct dsv32_config *cf = c->cfg;
    const int H = cf->num_attention_heads, C = cf->kv_lora_rank, nope = cf->qk_nope_head_dim;
    const int qk = nope + cf->qk_rope_head_dim, hs = nope + cf->v_head_dim;
    struct cu_weight *cw = (struct cu_weight *)wkv_b->be;
    if (rows <= 0)
        return 0;
    if (!c->fast || (!cw->fp8 && !cw->bf16)) {
        /* f32 weights: bf16 latents (lat16) rounded from an f32 product */
        float *ql = c->lat16 ? (float *)cu_scratch(c, SCR_TMP, sizeof(float) * (size_t)rows * H * C)
                             : (float *)q_lat;
        if (!ql)
            return -ENOMEM;
        BLAS_CHECK(cublasGemmStridedBatchedEx(
            c->blas, CUBLAS_OP_N, CUBLAS_OP_N, C, rows, nope, &k_one, cw->f32, CUDA_R_32F, C,
            (long long)hs * C, q, CUDA_R_32F, H * qk, qk, &k_zero, ql, CUDA_R_32F, H * C, C, H,
            CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
        if (c->lat16)
            CU_TRY(cu_to_bf16(c, (__nv_bfloat16 *)q_lat, ql, rows, H * C, H * C));
        return 0;
    }
    const __nv_bfloat16 *wb = wkv_bf16(c, cw);
    __nv_bfloat16 *qb = (__nv_bfloat16 *)cu_scratch(c, SCR_BF16, sizeof(__nv_bfloat16) * (size_t)rows * H * nope);
    if (!wb || !qb)
        return -ENOMEM;
    const size_t n = (size_t)rows * H * nope;
    unsigned b = cu_blocks(n, 256);
    pack_bf16_kernel<<<b > 8192u ? 8192u : b, 256, 0, c->st>>>(qb, q, rows, H, nope, H * qk, qk);
    CU_LAUNCHED("pack_bf16");
    /* lat16: the f32 products rounded to bf16 by cuBLAS, as the MLA kernels rounded Q when they
     * staged it from f32 */
    BLAS_CHECK(cublasGemmStridedBatchedEx(
        c->blas, CUBLAS_OP_N, CUBLAS_OP_N, C, rows, nope, &k_one, wb, CUDA_R_16BF, C,
        (long long)hs * C, qb, CUDA_R_16BF, H * nope, nope, &k_zero, q_lat,
        c->lat16 ? CUDA_R_16BF : CUDA_R_32F, H * C, C, H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}

int cu_mla_expand(struct cu_ctx *c, float *o, const void *lat, int rows,
                  const struct dsv32_weight *wkv_b)
{
    const struct dsv32_config *cf = c->cfg;
    const int H = cf->num_attention_heads, C = cf->kv_lora_rank, nope = cf->qk_nope_head_dim;
    const int V = cf->v_head_dim, hs = nope + V;
    struct cu_weight *cw = (struct cu_weight *)wkv_b->be;
    if (rows <= 0)
        return 0;
    const size_t n = (size_t)rows * H * C;
    if (!c->fast || (!cw->fp8 && !cw->bf16)) {
        const float *lf = (const float *)lat;
        if (c->lat16) { /* f32 weights: the bf16 latents widened */
            float *t = (float *)cu_scratch(c, SCR_TMP, sizeof(float) * n);
            if (!t)
                return -ENOMEM;
            CU_TRY(cu_dequant(c, t, NULL, lat, DSV32_DT_BF16, NULL, rows, (int64_t)H * C));
            lf = t;
        }
        BLAS_CHECK(cublasGemmStridedBatchedEx(
            c->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, rows, C, &k_one, cw->f32 + (size_t)nope * C,
            CUDA_R_32F, C, (long long)hs * C, lf, CUDA_R_32F, H * C, C, &k_zero, o, CUDA_R_32F,
            H * V, V, H, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
        return 0;
    }
    const __nv_bfloat16 *wb = wkv_bf16(c, cw);
    /* lat16: the MLA wrote them in bf16 (rounded as this conversion rounds) */
    const __nv_bfloat16 *lb = (const __nv_bfloat16 *)lat;
    if (!c->lat16) {
        __nv_bfloat16 *t = (__nv_bfloat16 *)cu_scratch(c, SCR_BF16, sizeof(__nv_bfloat16) * n);
        if (!t)
            return -ENOMEM;
        CU_TRY(cu_to_bf16(c, t, (const float *)lat, rows, H * C, H * C));
        lb = t;
    }
    if (!wb)
        return -ENOMEM;
    BLAS_CHECK(cublasGemmStridedBatchedEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, rows, C, &k_one,
                                          wb + (size_t)nope * C, CUDA_R_16BF, C, (long long)hs * C, lb,
                                          CUDA_R_16BF, H * C, C, &k_zero, o, CUDA_R_32F, H * V, V, H,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}
