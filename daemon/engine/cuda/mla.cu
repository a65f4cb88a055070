/* Absorbed MLA kernels (see mla.cuh).
 *
 * The fast mode's default is mla_cl_kernel (wgmma, the two head groups of a row as a cluster,
 * at the end with its own description) for bf16-rope caches and heads a multiple of 128, else
 * mla_ws_kernel (wgmma, warp-specialized, before it; knob mla_cl 0); mla_wg_kernel (wgmma, all
 * warps in every step) takes the rest (knob mla_ws 0); the mma.sync kernel described here remains
 * the benchmarks' baseline (knob mla_wgmma 0).
 * Fast kernel layout. A CTA of 8 warps takes one row, 64 of its heads and a range of its keys, in
 * tiles of 64 keys. Shared memory: Q (64 heads x 576 bf16), the current key tile K (64 x 576 bf16,
 * latent dequantized with its block scale, rope as cached), the raw records of the next tile
 * (cp.async), the score tile S (64 x 64 f32). Per tile:
 *   QK^T: warp w (of 16) computes S for heads 16(w%4).. and keys 16(w/4).. (36 k-steps x 2
 *         n-tiles, A = Q and B = K via ldmatrix), writes scale * S (or -inf for an unselected slot);
 *   PV:   warp w owns heads 16(w%4).. and latent dims 128(w/4)..: online softmax on its S rows
 *         (the four warps of a head group compute the same statistics), P packed to bf16 as the A
 *         operand straight from registers, V = the tile's latent part through ldmatrix.trans,
 *         O (16 x 128 f32) in registers. 16 warps (not 8) so that each scheduler has four to
 *         switch between: the kernel is latency-bound, and shared memory allows one CTA per SM.
 * Row strides of Q and K are padded by 16 bytes so that ldmatrix's 8 rows hit 8 distinct bank
 * groups. An invalid key (-1 in the selection, past the row's position) gets zeros in K (so that
 * 0 * garbage never makes a NaN) and -inf in S. */
#include "mla.cuh"
#include "wgmma.cuh"

#include <cooperative_groups.h>
#include <errno.h>

#define MLA_C 512
#define MLA_R 64
#define MLA_D (MLA_C + MLA_R)
#define MLA_HG 64   /* heads per CTA */
#define MLA_TH 512  /* threads per CTA */
#define MLA_KT 64   /* keys per tile */
#define MLA_QSTR (MLA_D + 8) /* bf16 elements per Q/K row in shared memory */
#define MLA_SSTR (MLA_KT + 4)
#define MLA_MAXSEL 2048 /* selected keys per CTA whose cache slots are resolved up front */

/* ---- exact kernel ---- */

#define EX_MAXC 32 /* C/32 <= 32: kv_lora up to 1024 */
#define EX_MAXR 4  /* R/32 <= 4 */

/* the cache slot of position p in its sequence's block blk (a block table entry) */
static __device__ __forceinline__ int64_t slot_in(int32_t blk, int p)
{
    return (int64_t)blk * DSV32_KV_BLOCK_TOKENS + p % DSV32_KV_BLOCK_TOKENS;
}

static __device__ __forceinline__ int64_t slot_of(const int32_t *blocks, int max_blocks, int seq, int p)
{
    return slot_in(blocks[(size_t)seq * max_blocks + p / DSV32_KV_BLOCK_TOKENS], p);
}

static __global__ void __launch_bounds__(128) mla_exact_kernel(
    float *out, const float *q_lat, const float *q_pe, int ldr_pe, int ldh_pe, const int32_t *sel,
    int n_sel, const uint8_t *mla, int rec_bytes, int C, int R, int rope_f32, const int32_t *blocks,
    int max_blocks, const int32_t *row_pos, const int32_t *row_seq, const uint8_t *row_mha, int H,
    float scale)
{
    __shared__ float sm_m[4], sm_l[4];
    __shared__ float sm_o[4][EX_MAXC * 32];
    const int h = blockIdx.x, r = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (row_mha && row_mha[r])
        return;
    const int pos = row_pos[r], seq = row_seq[r];
    const int CL = C / 32, RL = R / 32;
    const float *ql = q_lat + ((size_t)r * H + h) * C;
    const float *qp = q_pe + (size_t)r * ldr_pe + (size_t)h * ldh_pe;
    float qc[EX_MAXC], qr[EX_MAXR], o[EX_MAXC];
#pragma unroll
    for (int i = 0; i < EX_MAXC; i++) {
        qc[i] = i < CL ? ql[lane + 32 * i] : 0.0f;
        o[i] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < EX_MAXR; i++)
        qr[i] = i < RL ? qp[lane + 32 * i] : 0.0f;
    /* three passes over the keys, the cpu's arithmetic: s = (q_lat . c + q_pe . pe) * scale, the
     * maximum, the sum of exp(s - max), then out = sum_j (p_j / sum) c_j */
    const int n_keys = sel ? n_sel : pos + 1;
    auto key_at = [&](int jj) { return sel ? sel[(size_t)r * n_sel + jj] : jj; };
    auto rec_of = [&](int p) { return mla + (size_t)slot_of(blocks, max_blocks, seq, p) * rec_bytes; };
    auto score = [&](const uint8_t *rec) {
        const float *bsc = reinterpret_cast<const float *>(rec + C);
        const uint8_t *pr = rec + C + 4 * (C / 128);
        float dl = 0.0f, dr = 0.0f;
#pragma unroll
        for (int i = 0; i < EX_MAXC; i++)
            if (i < CL) {
                const int d = lane + 32 * i;
                dl = __fadd_rn(dl, __fmul_rn(qc[i], __fmul_rn(cu_e4m3_to_f32(rec[d]), bsc[d / 128])));
            }
#pragma unroll
        for (int i = 0; i < EX_MAXR; i++)
            if (i < RL) {
                const int d = lane + 32 * i;
                const float pe = rope_f32 ? reinterpret_cast<const float *>(pr)[d]
                                          : cu_bf16_bits_to_f32(reinterpret_cast<const uint16_t *>(pr)[d]);
                dr = __fadd_rn(dr, __fmul_rn(qr[i], pe));
            }
        return __fmul_rn(__fadd_rn(cu_warp_sum(dl), cu_warp_sum(dr)), scale);
    };
    float mx = -INFINITY;
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p >= 0 && p <= pos)
            mx = fmaxf(mx, score(rec_of(p)));
    }
    if (lane == 0)
        sm_m[warp] = mx;
    __syncthreads();
    const float M = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
    float sum = 0.0f;
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p >= 0 && p <= pos)
            sum += expf(score(rec_of(p)) - M);
    }
    if (lane == 0)
        sm_l[warp] = sum;
    __syncthreads();
    const float L = sm_l[0] + sm_l[1] + sm_l[2] + sm_l[3];
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p < 0 || p > pos)
            continue;
        const uint8_t *rec = rec_of(p);
        const float pj = expf(score(rec) - M) / L;
        const float *bsc = reinterpret_cast<const float *>(rec + C);
#pragma unroll
        for (int i = 0; i < EX_MAXC; i++)
            if (i < CL) {
                const int d = lane + 32 * i;
                o[i] = __fadd_rn(o[i], __fmul_rn(pj, __fmul_rn(cu_e4m3_to_f32(rec[d]), bsc[d / 128])));
            }
    }
#pragma unroll
    for (int i = 0; i < EX_MAXC; i++)
        if (i < CL)
            sm_o[warp][lane + 32 * i] = o[i];
    __syncthreads();
    float *orow = out + ((size_t)r * H + h) * C;
    for (int d = threadIdx.x; d < C; d += blockDim.x)
        orow[d] = M == -INFINITY ? 0.0f : ((sm_o[0][d] + sm_o[1][d]) + sm_o[2][d]) + sm_o[3][d];
}

/* ---- fast kernel ---- */

static __device__ __forceinline__ uint32_t smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void cp_async16(void *dst, const void *src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}

/* Four e4m3 bytes (dims in byte order) times sc -> two bf16x2 words: exact e4m3 -> f16 -> f32,
 * the product rounded once to bf16 (any scale) */
static __device__ __forceinline__ void e4m3x4_bf16_f32(uint32_t in, float sc, uint32_t &w0, uint32_t &w1)
{
    const __half2_raw h0 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(in & 0xffff), __NV_E4M3);
    const __half2_raw h1 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(in >> 16), __NV_E4M3);
    const float2 f0 = __half22float2(__half2(h0)), f1 = __half22float2(__half2(h1));
    w0 = pack_bf16(f0.x * sc, f0.y * sc);
    w1 = pack_bf16(f1.x * sc, f1.y * sc);
}

struct mla_fast_args {
    void *out;        /* (rows, H, 512) when one split: bf16 when lat16, else f32 */
    float *part_o;    /* (splits, rows, H, 512) */
    float2 *part_ml;  /* (splits, rows, H): running max, sum */
    const void *q_lat; /* (rows, H, 512): bf16 when lat16, else f32 */
    const float *q_pe;
    int lat16;
    int ldr_pe, ldh_pe;
    const int32_t *sel;
    int n_sel;
    const uint8_t *mla;
    int rec_bytes, rope_f32;
    const int32_t *blocks;
    int max_blocks;
    const int32_t *row_pos, *row_seq;
    const uint8_t *row_mha;
    int H, rows, splits, keys_per_split;
    float scale;
    unsigned long long *prof; /* mla_wg_kernel<true>: cycles per phase (knob mla_prof) */
    int q_first; /* mla_cl_kernel launched under the top-k (pdl): Q staged before its pdl_wait,
                    the selection read after it */
    int o_stage; /* mla_cl_kernel, one split, bf16 out: O through shared memory (1), stored
                    directly (0), not stored (2: a diagnostic, knob mla_ostage) */
};

/* element i of q_lat, of out: the latents in bf16 (lat16) or f32 */
static __device__ __forceinline__ float mla_ql(const struct mla_fast_args &a, size_t i)
{
    return a.lat16 ? __bfloat162float(static_cast<const __nv_bfloat16 *>(a.q_lat)[i])
                   : static_cast<const float *>(a.q_lat)[i];
}
static __device__ __forceinline__ void mla_out1(const struct mla_fast_args &a, size_t i, float x)
{
    if (a.lat16)
        static_cast<__nv_bfloat16 *>(a.out)[i] = __float2bfloat16_rn(x);
    else
        static_cast<float *>(a.out)[i] = x;
}
/* elements i, i + 1 (i even) */
static __device__ __forceinline__ void mla_out2(const struct mla_fast_args &a, size_t i, float x,
                                                float y)
{
    if (a.lat16)
        *reinterpret_cast<__nv_bfloat162 *>(static_cast<__nv_bfloat16 *>(a.out) + i) =
            __floats2bfloat162_rn(x, y);
    else
        *reinterpret_cast<float2 *>(static_cast<float *>(a.out) + i) = make_float2(x, y);
}

/* 1 / l, the softmax's normalizer of a head (0 for a head that saw no key) */
static __device__ __forceinline__ float mla_inv_l(float l)
{
    return l > 0.0f ? 1.0f / l : 0.0f;
}

/* The keys [*kbeg, *kend) of split z of row r: its selection's entries, or its positions 0..pos
 * when there is no selection (dense) */
static __device__ __forceinline__ void mla_key_range(const struct mla_fast_args &a, int z, int pos, int *kbeg,
                                                     int *kend)
{
    const int n_keys = a.sel ? a.n_sel : pos + 1;
    *kbeg = z * a.keys_per_split;
    *kend = min(n_keys, *kbeg + a.keys_per_split);
}

/* The cache slot of key j of row r (-1: past kend, an invalid selection entry, or beyond pos):
 * from sslot when the slots were resolved up front (pre), else from the selection and the block
 * table */
static __device__ __forceinline__ int32_t mla_slot_at(const struct mla_fast_args &a, const int32_t *sslot, bool pre,
                                                      int r, int pos, int seq, int kbeg, int kend, int j)
{
    if (j >= kend)
        return -1;
    if (pre)
        return sslot[j - kbeg];
    const int p = a.sel ? a.sel[(size_t)r * a.n_sel + j] : j;
    return (p >= 0 && p <= pos) ? (int32_t)slot_of(a.blocks, a.max_blocks, seq, p) : -1;
}

/* When the selection's keys kbeg..kend - 1 fit sslot (MLA_MAXSEL): their cache slots into sslot,
 * eight per thread of nth (the selections' loads, then the block tables'), so that a tile's
 * gather needs no dependent global loads; returns whether it did (pre: mla_slot_at reads sslot) */
static __device__ __forceinline__ bool mla_resolve_slots(const struct mla_fast_args &a, int32_t *sslot, int r,
                                                         int pos, int seq, int kbeg, int kend, int tid, int nth)
{
    if (!a.sel || kend - kbeg > MLA_MAXSEL)
        return false;
    for (int j0 = 0; j0 < kend - kbeg; j0 += 8 * nth) {
        int p[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int j = j0 + u * nth + tid;
            p[u] = j < kend - kbeg ? a.sel[(size_t)r * a.n_sel + kbeg + j] : -1;
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int j = j0 + u * nth + tid;
            if (j < kend - kbeg)
                sslot[j] = (p[u] >= 0 && p[u] <= pos) ? (int32_t)slot_of(a.blocks, a.max_blocks, seq, p[u]) : -1;
        }
    }
    return true;
}

static __global__ void __launch_bounds__(MLA_TH, 1) mla_fast_kernel(const struct mla_fast_args a)
{
    extern __shared__ __align__(16) uint8_t smem[];
    __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(smem);
    __nv_bfloat16 *Ks = Qs + MLA_HG * MLA_QSTR;
    float *Sc = reinterpret_cast<float *>(Ks + MLA_KT * MLA_QSTR);
    int32_t *kslot = reinterpret_cast<int32_t *>(Sc + MLA_HG * MLA_SSTR);
    int32_t *sslot = kslot + MLA_KT; /* (MLA_MAXSEL) the CTA's selected slots, sparse mode */
    uint8_t *stg = reinterpret_cast<uint8_t *>(sslot + MLA_MAXSEL);

    const int z = blockIdx.x, hg = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    if (a.row_mha && a.row_mha[r])
        return;
    const int pos = a.row_pos[r], seq = a.row_seq[r];
    int kbeg, kend;
    mla_key_range(a, z, pos, &kbeg, &kend);
    const int h0 = hg * MLA_HG;
    const int recb = a.rec_bytes, chunks = recb / 16;

    /* Q to bf16 */
    for (int i = tid; i < MLA_HG * MLA_D; i += MLA_TH) {
        const int h = i / MLA_D, d = i % MLA_D;
        const float v =
            d < MLA_C ? mla_ql(a, ((size_t)r * a.H + h0 + h) * MLA_C + d)
                      : a.q_pe[(size_t)r * a.ldr_pe + (size_t)(h0 + h) * a.ldh_pe + d - MLA_C];
        Qs[h * MLA_QSTR + d] = __float2bfloat16_rn(v);
    }

    /* sparse: every selected position of this CTA resolved to its cache slot once */
    const bool pre = mla_resolve_slots(a, sslot, r, pos, seq, kbeg, kend, tid, MLA_TH);
    auto issue = [&](int ts) {
        __syncthreads(); /* sslot written; kslot no longer read */
        if (tid < MLA_KT)
            kslot[tid] = mla_slot_at(a, sslot, pre, r, pos, seq, kbeg, kend, ts + tid);
        __syncthreads();
        for (int i = tid; i < MLA_KT * chunks; i += MLA_TH) {
            const int key = i / chunks, ch = i % chunks;
            const int32_t sl = kslot[key];
            if (sl >= 0)
                cp_async16(stg + key * recb + 16 * ch, a.mla + (size_t)sl * recb + 16 * ch);
        }
        asm volatile("cp.async.commit_group;");
    };

    float mrun[2] = {-INFINITY, -INFINITY}, lrun[2] = {0.0f, 0.0f};
    float O[16][4];
#pragma unroll
    for (int n = 0; n < 16; n++)
#pragma unroll
        for (int i = 0; i < 4; i++)
            O[n][i] = 0.0f;
    const int hq = warp & 3, kh = warp >> 2, dh = warp >> 2; /* kh: keys 16kh.., dh: dims 128dh.. */

    if (kbeg < kend)
        issue(kbeg);
    for (int ts = kbeg; ts < kend; ts += MLA_KT) {
        asm volatile("cp.async.wait_all;");
        __syncthreads();
        /* the raw tile -> K (bf16): 36 chunks of 16 dims per key */
        for (int i = tid; i < MLA_KT * 36; i += MLA_TH) {
            const int key = i / 36, ch = i % 36;
            uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
            if (kslot[key] >= 0) {
                const uint8_t *rec = stg + key * recb;
                if (ch < 32) {
                    const uint4 b = *reinterpret_cast<const uint4 *>(rec + 16 * ch);
                    const float sc = reinterpret_cast<const float *>(rec + MLA_C)[ch / 8];
                    uint32_t wv[8];
                    const uint32_t in[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                    for (int k = 0; k < 4; k++)
                        e4m3x4_bf16_f32(in[k], sc, wv[2 * k], wv[2 * k + 1]);
                    lo = make_uint4(wv[0], wv[1], wv[2], wv[3]);
                    hi = make_uint4(wv[4], wv[5], wv[6], wv[7]);
                } else {
                    const uint8_t *pr = rec + MLA_C + 4 * (MLA_C / 128);
                    const int d0 = 16 * (ch - 32);
                    if (a.rope_f32) {
                        const float *pf = reinterpret_cast<const float *>(pr) + d0;
                        lo = make_uint4(pack_bf16(pf[0], pf[1]), pack_bf16(pf[2], pf[3]), pack_bf16(pf[4], pf[5]),
                                        pack_bf16(pf[6], pf[7]));
                        hi = make_uint4(pack_bf16(pf[8], pf[9]), pack_bf16(pf[10], pf[11]),
                                        pack_bf16(pf[12], pf[13]), pack_bf16(pf[14], pf[15]));
                    } else {
                        lo = *reinterpret_cast<const uint4 *>(pr + 2 * d0);
                        hi = *reinterpret_cast<const uint4 *>(pr + 2 * d0 + 16);
                    }
                }
            }
            uint4 *dst = reinterpret_cast<uint4 *>(Ks + key * MLA_QSTR + 16 * ch);
            dst[0] = lo;
            dst[1] = hi;
        }
        __syncthreads();
        /* S validity of this tile, read before issue() rewrites kslot */
        bool kval[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            kval[nt][0] = kslot[16 * kh + 8 * nt + 2 * t] >= 0;
            kval[nt][1] = kslot[16 * kh + 8 * nt + 2 * t + 1] >= 0;
        }
        if (ts + MLA_KT < kend)
            issue(ts + MLA_KT);

        /* S = Q K^T for heads 16hq.., keys 16kh.. */
        float S[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                S[nt][i] = 0.0f;
        const uint32_t qa = smem_addr(Qs + (16 * hq + (lane & 15)) * MLA_QSTR + (lane >> 4) * 8);
        const int mi = lane >> 3, rr = lane & 7;
        const uint32_t kb0 = smem_addr(Ks + (16 * kh + (mi >> 1) * 8 + rr) * MLA_QSTR + (mi & 1) * 8);
#pragma unroll 6
        for (int ks = 0; ks < MLA_D / 16; ks++) {
            uint32_t af[4], b01[4];
            ldsm_x4(af, qa + ks * 32);
            ldsm_x4(b01, kb0 + ks * 32);
            mma_bf16(S[0], af, b01[0], b01[1]);
            mma_bf16(S[1], af, b01[2], b01[3]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const int key = 16 * kh + 8 * nt + 2 * t;
            float *s0 = Sc + (16 * hq + g) * MLA_SSTR + key, *s1 = s0 + 8 * MLA_SSTR;
            s0[0] = kval[nt][0] ? S[nt][0] * a.scale : -INFINITY;
            s0[1] = kval[nt][1] ? S[nt][1] * a.scale : -INFINITY;
            s1[0] = kval[nt][0] ? S[nt][2] * a.scale : -INFINITY;
            s1[1] = kval[nt][1] ? S[nt][3] * a.scale : -INFINITY;
        }
        __syncthreads();

        /* online softmax of rows 16hq+g and +8 over this tile */
        float pv[2][4][4]; /* [row][kk][{2t, 2t+1, 2t+8, 2t+9}] */
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int rw = 0; rw < 2; rw++) {
            const float *srow = Sc + (16 * hq + g + 8 * rw) * MLA_SSTR;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                pv[rw][kk][0] = srow[16 * kk + 2 * t];
                pv[rw][kk][1] = srow[16 * kk + 2 * t + 1];
                pv[rw][kk][2] = srow[16 * kk + 2 * t + 8];
                pv[rw][kk][3] = srow[16 * kk + 2 * t + 9];
#pragma unroll
                for (int i = 0; i < 4; i++)
                    mx[rw] = fmaxf(mx[rw], pv[rw][kk][i]);
            }
            mx[rw] = fmaxf(mx[rw], __shfl_xor_sync(0xffffffffu, mx[rw], 1));
            mx[rw] = fmaxf(mx[rw], __shfl_xor_sync(0xffffffffu, mx[rw], 2));
        }
        float alpha[2];
#pragma unroll
        for (int rw = 0; rw < 2; rw++) {
            const float mnew = fmaxf(mrun[rw], mx[rw]);
            const float mref = mnew == -INFINITY ? 0.0f : mnew;
            alpha[rw] = mrun[rw] == -INFINITY ? 0.0f : __expf(mrun[rw] - mref);
            float sum = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    pv[rw][kk][i] = __expf(pv[rw][kk][i] - mref);
                    sum += pv[rw][kk][i];
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            lrun[rw] = lrun[rw] * alpha[rw] + sum;
            mrun[rw] = mnew;
        }
#pragma unroll
        for (int n = 0; n < 16; n++) {
            O[n][0] *= alpha[0];
            O[n][1] *= alpha[0];
            O[n][2] *= alpha[1];
            O[n][3] *= alpha[1];
        }
        /* O += P V over this tile's 64 keys, dims 128dh.. */
        const uint32_t vb = smem_addr(Ks + ((mi & 1) * 8 + rr) * MLA_QSTR + 128 * dh + (mi >> 1) * 8);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint32_t pa[4] = {pack_bf16(pv[0][kk][0], pv[0][kk][1]), pack_bf16(pv[1][kk][0], pv[1][kk][1]),
                                    pack_bf16(pv[0][kk][2], pv[0][kk][3]), pack_bf16(pv[1][kk][2], pv[1][kk][3])};
#pragma unroll
            for (int np = 0; np < 8; np++) {
                uint32_t b[4];
                ldsm_x4_t(b, vb + (16 * kk * MLA_QSTR + 16 * np) * 2);
                mma_bf16(O[2 * np], pa, b[0], b[1]);
                mma_bf16(O[2 * np + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();
    }

    /* epilogue */
    const int hr0 = h0 + 16 * hq + g, hr1 = hr0 + 8;
    if (a.splits == 1) {
        const float inv0 = mla_inv_l(lrun[0]), inv1 = mla_inv_l(lrun[1]);
        const size_t o0 = ((size_t)r * a.H + hr0) * MLA_C + 128 * dh + 2 * t, o1 = o0 + 8 * MLA_C;
#pragma unroll
        for (int n = 0; n < 16; n++) {
            mla_out2(a, o0 + 8 * n, O[n][0] * inv0, O[n][1] * inv0);
            mla_out2(a, o1 + 8 * n, O[n][2] * inv1, O[n][3] * inv1);
        }
    } else {
        const size_t base = ((size_t)z * a.rows + r) * a.H;
        float *o0 = a.part_o + (base + hr0) * MLA_C + 128 * dh + 2 * t, *o1 = o0 + 8 * MLA_C;
#pragma unroll
        for (int n = 0; n < 16; n++) {
            *reinterpret_cast<float2 *>(o0 + 8 * n) = make_float2(O[n][0], O[n][1]);
            *reinterpret_cast<float2 *>(o1 + 8 * n) = make_float2(O[n][2], O[n][3]);
        }
        if (dh == 0 && t == 0) {
            a.part_ml[base + hr0] = make_float2(mrun[0], lrun[0]);
            a.part_ml[base + hr1] = make_float2(mrun[1], lrun[1]);
        }
    }
}

/* ---- fast kernel on wgmma (Hopper) ----
 *
 * A CTA of two warpgroups takes one row, 64 of its heads and a range of its keys, in tiles of 64.
 * Shared memory holds Q (64 heads x 576, bf16) and the current key tile K (64 x 576, bf16, latent
 * dequantized with its block scale) in the 128-byte-swizzle K-major layout of wgmma (64-column
 * atoms of 64 rows x 128 bytes, 16-byte chunk c of row r at c ^ (r % 8): wg_off; the no-swizzle
 * layout measured the same speed as the mma.sync kernel, its shared-memory reads conflicting),
 * the raw records of the next tile (one bulk copy per record into rows of wg_rec_stride bytes,
 * completion counted in bytes by an mbarrier) and P (64 heads x 64 keys, bf16, one atom). The
 * four lanes 4k.. convert key k (power-of-two scales on the ALU: e4m3x2_scaled_pow2). Per tile,
 * in this order (only the next gather hides under an MMA; a producer warpgroup converting the
 * next tile was slower, docs/GPU-NOTES.md):
 *   S = Q K^T: warpgroup w computes heads 0..63 x keys 32w..32w+31 (36 x m64n32k16, both
 *       operands from shared memory), the next tile's gather issued while they run;
 *   softmax: row maxima exchanged between the two warpgroups through shared memory, P written in
 *       bf16, the running max per head double-buffered by tile parity, the running sum updated
 *       by one warpgroup;
 *   O^T += V^T P^T: warpgroup w owns latent dims 256w..256w+255 as the M side (4 x m64), the 64
 *       heads as N, the 64 keys as K: A = V^T read by the tensor core from the key tile itself
 *       (its rows of 64 dims per key are the transposed, MN-major, layout; 2.5% faster than
 *       V^T through ldmatrix.trans into registers, and 58 registers fewer), B = P from shared
 *       memory (16 x m64n64k16);
 *   the next tile's records (gathered under this tile's QK^T) converted into the key tile.
 * Output and split partials as mla_fast_kernel's. */
#define WG_TH 256
#define WG_QB (9 * 8192) /* a 64 x 576 bf16 matrix: 9 swizzle atoms */

static __device__ __forceinline__ uint32_t wg_off(int row, int col) /* bytes, 128-byte swizzle K-major */
{
    /* 64-column (128-byte) atoms of 64 rows, 8 KB each; 16-byte chunk c of row r at c ^ (r % 8) */
    return (uint32_t)((col >> 6) * 8192 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2);
}

/* The raw records' row stride in shared memory: 64 bytes past a multiple of 128, so that the
 * conversion's quarter-warp (two keys, 64 bytes each) reads 128 distinct bytes */
static __host__ __device__ __forceinline__ int wg_rec_stride(int rec_bytes) { return (rec_bytes + 63) / 128 * 128 + 64; }

/* A scale the bf16 path below takes exactly: a power of two (ue8m0 caches: DeepSeek-V3.2's) in
 * [2^-100, 2^6], so that scale * 2^120 is a normal bf16 */
static __device__ __forceinline__ bool pow2_scale(float sc)
{
    const uint32_t u = __float_as_uint(sc);
    return (u & 0x007fffffu) == 0 && sc >= 0x1p-100f && sc <= 64.0f;
}

/* prmt.b32 with sign replication (a selector nibble's msb; __byte_perm documents only 3 bits) */
static __device__ __forceinline__ uint32_t prmt_sext(uint32_t x, uint32_t sel)
{
    uint32_t d;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(x), "r"(sel));
    return d;
}

/* Two e4m3 values times a power-of-two scale, as bf16x2, without the conversion unit (F2F/F2FP
 * run at a sixteenth of the ALU rate and were most of the key conversion's time): the input holds
 * each byte sign-extended to 16 bits (prmt_sext); shifted left
 * by 4 and masked, sign | exponent | mantissa land in bf16's fields with the exponent bias 7
 * instead of 127, i.e. the value times 2^-120 exactly (e4m3 subnormals become bf16 subnormals of
 * the same digits); one bf16 multiply by scale * 2^120 (exact: both powers of two apart from the
 * value's 4 significant bits) gives bf16(value * scale), the same bits as the f32 path. */
static __device__ __forceinline__ uint32_t e4m3x2_scaled_pow2(uint32_t sext_pair, float sc)
{
    const uint32_t x = (sext_pair << 4) & 0x87f087f0u;
    const __nv_bfloat162 s2 = __float2bfloat162_rn(sc * 0x1p120f);
    const uint32_t s = *reinterpret_cast<const uint32_t *>(&s2);
    uint32_t d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(s));
    return d;
}

/* mla_stage_q with the latent part of Q in bf16 already (lat16): its 16-byte chunks (4,096: the
 * heads' latents are contiguous) copied as they are, all of a thread's loads issued before its
 * first store (one round), then q_pe's 512 chunks of 8 f32, rounded (their loads after the
 * latents' stores: issued together, the cluster kernel spilled) */
template <int NTH>
static __device__ __forceinline__ void mla_stage_q16(const struct mla_fast_args &a, uint8_t *Qb,
                                                     int r, int h0, int tid)
{
    constexpr int NL = MLA_HG * MLA_C / 8, NR = MLA_HG * MLA_R / 8;
    constexpr int UL = (NL + NTH - 1) / NTH, UR = (NR + NTH - 1) / NTH;
    const uint4 *ql = static_cast<const uint4 *>(a.q_lat) + ((size_t)r * a.H + h0) * (MLA_C / 8);
    uint4 v[UL];
    float p[UR][8];
#pragma unroll
    for (int u = 0; u < UL; u++)
        if (NL % NTH == 0 || u * NTH + tid < NL)
            v[u] = __ldg(ql + u * NTH + tid);
#pragma unroll
    for (int u = 0; u < UL; u++) {
        const int i = u * NTH + tid;
        if (NL % NTH == 0 || i < NL)
            *reinterpret_cast<uint4 *>(Qb + wg_off(i / (MLA_C / 8), 8 * (i % (MLA_C / 8)))) = v[u];
    }
#pragma unroll
    for (int u = 0; u < UR; u++) {
        const int i = u * NTH + tid, h = i / (MLA_R / 8), d = 8 * (i % (MLA_R / 8));
        if (NR % NTH == 0 || i < NR) {
            const float *src = a.q_pe + (size_t)r * a.ldr_pe + (size_t)(h0 + h) * a.ldh_pe + d;
#pragma unroll
            for (int e = 0; e < 8; e++)
                p[u][e] = __ldg(src + e);
        }
    }
#pragma unroll
    for (int u = 0; u < UR; u++) {
        const int i = u * NTH + tid;
        if (NR % NTH == 0 || i < NR)
            *reinterpret_cast<uint4 *>(Qb +
                                       wg_off(i / (MLA_R / 8), MLA_C + 8 * (i % (MLA_R / 8)))) =
                make_uint4(pack_bf16(p[u][0], p[u][1]), pack_bf16(p[u][2], p[u][3]),
                           pack_bf16(p[u][4], p[u][5]), pack_bf16(p[u][6], p[u][7]));
    }
}

/* Q of row r, heads h0.., to bf16 in Qb (wg_off's layout), 8 dims (16 bytes) at a time by NTH
 * threads, U of a thread's chunks in flight (the loads, one after another, were a tenth of the
 * kernel's time); mla_stage_q16 when the latents are bf16 */
template <int NTH, int U>
static __device__ __forceinline__ void mla_stage_q(const struct mla_fast_args &a, uint8_t *Qb, int r, int h0, int tid)
{
    static_assert(MLA_HG * (MLA_D / 8) % (NTH * U) == 0, "whole rounds");
    if (a.lat16) {
        mla_stage_q16<NTH>(a, Qb, r, h0, tid);
        return;
    }
    for (int i0 = 0; i0 < MLA_HG * (MLA_D / 8); i0 += U * NTH) {
        float v[U][8];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * NTH + tid, h = i / (MLA_D / 8), d0 = 8 * (i % (MLA_D / 8));
            const float *src =
                d0 < MLA_C
                    ? static_cast<const float *>(a.q_lat) + ((size_t)r * a.H + h0 + h) * MLA_C + d0
                    : a.q_pe + (size_t)r * a.ldr_pe + (size_t)(h0 + h) * a.ldh_pe + d0 - MLA_C;
#pragma unroll
            for (int e = 0; e < 8; e++)
                v[u][e] = src[e];
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * NTH + tid, h = i / (MLA_D / 8), d0 = 8 * (i % (MLA_D / 8));
            *reinterpret_cast<uint4 *>(Qb + wg_off(h, d0)) =
                make_uint4(pack_bf16(v[u][0], v[u][1]), pack_bf16(v[u][2], v[u][3]), pack_bf16(v[u][4], v[u][5]),
                           pack_bf16(v[u][6], v[u][7]));
        }
    }
}

/* 16 e4m3 values times their block scale as 16 bf16 (wv, in order): on the ALU for a
 * power-of-two scale, else through f32 */
static __device__ __forceinline__ void e4m3x16_bf16(const uint4 raw, float sc, uint32_t (&wv)[8])
{
    const uint32_t in[4] = {raw.x, raw.y, raw.z, raw.w};
    if (pow2_scale(sc)) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            wv[2 * q] = e4m3x2_scaled_pow2(prmt_sext(in[q], 0x9180), sc);
            wv[2 * q + 1] = e4m3x2_scaled_pow2(prmt_sext(in[q], 0xB3A2), sc);
        }
    } else {
#pragma unroll
        for (int q = 0; q < 4; q++)
            e4m3x4_bf16_f32(in[q], sc, wv[2 * q], wv[2 * q + 1]);
    }
}

/* O^T (dims x heads) *= alpha per head (O[mt][4j + {0,1,2,3}] is (dim, head 8j+2t), (dim, +1),
 * (dim + 8, 8j+2t), (dim + 8, +1)), then O^T += V^T P^T over KK x 16 keys, issued and committed:
 * A = V^T (the warpgroup's 4 x 64 dims, keys 16kk..) straight from a key tile whose atoms of 64
 * dims start at vaddr, atom bytes apart (rows of 64 dims per key are V^T's MN-major layout: both
 * descriptor offsets 1 KB, the next 8 keys; one 64-dim atom per MMA), B = P at paddr */
template <int KK>
static __device__ __forceinline__ void mla_pv_issue(float (&O)[4][32], const float *alpha_s, int t, uint32_t vaddr,
                                                    uint32_t atom, uint32_t paddr)
{
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float al0 = alpha_s[8 * j + 2 * t], al1 = alpha_s[8 * j + 2 * t + 1];
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
            O[mt][4 * j + 0] *= al0;
            O[mt][4 * j + 1] *= al1;
            O[mt][4 * j + 2] *= al0;
            O[mt][4 * j + 3] *= al1;
        }
    }
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
        wg_fence(O[mt]);
    wg_begin();
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int kk = 0; kk < KK; kk++)
            wgmma_bf16_ss_n64_ta(O[mt], wg_desc(vaddr + mt * atom + kk * 2048, 1024, 1024) | ((uint64_t)1 << 62),
                                 wg_desc_sw128(paddr + kk * 32), 1);
    wg_commit();
}

/* One key's record (slot sl, -1: none) by one bulk copy into dst from the key's first lane
 * (first); lane 0 of the warp arrives on bar with the bytes of the warp's keys */
static __device__ __forceinline__ void mla_gather_key(const struct mla_fast_args &a, uint64_t *bar, uint8_t *dst,
                                                      int32_t sl, bool first, int lane)
{
    const uint32_t n_ok = __popc(__ballot_sync(0xffffffffu, first && sl >= 0));
    if (lane == 0)
        mbar_arrive_tx(bar, n_ok * (uint32_t)a.rec_bytes);
    if (first && sl >= 0)
        bulk_g2s(dst, a.mla + (size_t)sl * a.rec_bytes, (uint32_t)a.rec_bytes, bar);
}

/* O out (normalized when one split, else a split's partial with its running max and sum):
 * O[mt][4j + {0,1,2,3}] is (dim, head 8j+2t), (dim, +1), (dim + 8, 8j+2t), (dim + 8, +1) of
 * warpgroup wg's latent dims 256wg..; l_run and mfin per head, published */
static __device__ __forceinline__ void mla_store_o(const struct mla_fast_args &a, const float (&O)[4][32],
                                                   const float *l_run, const float *mfin, int z, int r, int h0,
                                                   int tid, int wg, int w, int g, int t)
{
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        const int d0 = 256 * wg + 64 * mt + 16 * w + g;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int hA = 8 * j + 2 * t, hB = hA + 1;
            if (a.splits == 1) {
                const float sA = mla_inv_l(l_run[hA]), sB = mla_inv_l(l_run[hB]);
                const size_t base = ((size_t)r * a.H + h0) * MLA_C;
                mla_out1(a, base + (size_t)hA * MLA_C + d0, O[mt][4 * j + 0] * sA);
                mla_out1(a, base + (size_t)hB * MLA_C + d0, O[mt][4 * j + 1] * sB);
                mla_out1(a, base + (size_t)hA * MLA_C + d0 + 8, O[mt][4 * j + 2] * sA);
                mla_out1(a, base + (size_t)hB * MLA_C + d0 + 8, O[mt][4 * j + 3] * sB);
            } else {
                float *base = a.part_o + (((size_t)z * a.rows + r) * a.H + h0) * MLA_C;
                base[(size_t)hA * MLA_C + d0] = O[mt][4 * j + 0];
                base[(size_t)hB * MLA_C + d0] = O[mt][4 * j + 1];
                base[(size_t)hA * MLA_C + d0 + 8] = O[mt][4 * j + 2];
                base[(size_t)hB * MLA_C + d0 + 8] = O[mt][4 * j + 3];
            }
        }
    }
    if (a.splits > 1 && tid < MLA_HG)
        a.part_ml[((size_t)z * a.rows + r) * a.H + h0 + tid] = make_float2(mfin[tid], l_run[tid]);
}

/* PROF: threads 0 and 128 add their cycles per phase of the tile loop to a.prof[8 wg + phase]
 * (0 QK^T with the next gather's issue, 1 softmax, 2 O rescale + PV, 3 barrier and gather wait,
 * 4 the next tile's conversion, 5 its proxy fence, 6 the closing barrier), a.prof[16] the tiles
 * of warpgroup 0, a.prof[17..19] thread 0's cycles before the loop, after it, and the CTAs: the
 * knob mla_prof's breakdown for the benchmark (cuda_bench names the phases in this order) */
/* *mx0, *mx1: the two heads' maxima over a tile's scores S (m64nN accumulator: S[4j + {0,1,2,3}]
 * is (head hr0, key 8j+2t), (hr0, +1), (hr0 + 8, 8j+2t), (hr0 + 8, +1)), over the quad's four
 * lanes */
template <int N>
static __device__ __forceinline__ void mla_quad_max(const float (&S)[N], float *mx0, float *mx1)
{
    float a0 = -INFINITY, a1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < N / 4; j++) {
        a0 = fmaxf(a0, fmaxf(S[4 * j + 0], S[4 * j + 1]));
        a1 = fmaxf(a1, fmaxf(S[4 * j + 2], S[4 * j + 3]));
    }
    a0 = fmaxf(a0, __shfl_xor_sync(0xffffffffu, a0, 1));
    a0 = fmaxf(a0, __shfl_xor_sync(0xffffffffu, a0, 2));
    a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, 1));
    a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, 2));
    *mx0 = a0;
    *mx1 = a1;
}

/* S times scale, -inf where the key flag v (v[2j], v[2j + 1]: keys 8j+2t, +1) is off, and its
 * maxima (mla_quad_max) */
template <int N>
static __device__ __forceinline__ void mla_mask_max(float (&S)[N], const bool (&v)[N / 2],
                                                    float scale, float *mx0, float *mx1)
{
#pragma unroll
    for (int j = 0; j < N / 4; j++) {
        S[4 * j + 0] = v[2 * j] ? S[4 * j + 0] * scale : -INFINITY;
        S[4 * j + 1] = v[2 * j + 1] ? S[4 * j + 1] * scale : -INFINITY;
        S[4 * j + 2] = v[2 * j] ? S[4 * j + 2] * scale : -INFINITY;
        S[4 * j + 3] = v[2 * j + 1] ? S[4 * j + 3] * scale : -INFINITY;
    }
    mla_quad_max(S, mx0, mx1);
}

#define MLA_PROF_PHASES 7
template <bool PROF>
static __global__ void __launch_bounds__(WG_TH, 1) mla_wg_kernel(const struct mla_fast_args a)
{
    extern __shared__ __align__(16) uint8_t dsmem[];
    /* the swizzle atoms want 1024-byte alignment, whatever the dynamic base */
    uint8_t *smem = dsmem + ((1024 - (smem_addr(dsmem) & 1023u)) & 1023u);
    uint8_t *Qb = smem, *Kb = smem + WG_QB, *Pb = smem + 2 * WG_QB;
    uint8_t *stg = Pb + 8192;
    const int srec = wg_rec_stride(a.rec_bytes);
    uint64_t *gbar = reinterpret_cast<uint64_t *>(stg + MLA_KT * srec);
    int32_t *sslot = reinterpret_cast<int32_t *>(gbar + 1);
    int32_t *kval = sslot + MLA_MAXSEL;
    float *red_m = reinterpret_cast<float *>(kval + MLA_KT); /* [2][64] */
    float *red_l = red_m + 2 * MLA_HG;                        /* [2][64] */
    float *m_run = red_l + 2 * MLA_HG;                        /* [2 parities][64] */
    float *l_run = m_run + 2 * MLA_HG;                        /* [64] */
    float *alpha_s = l_run + MLA_HG;                          /* [64] */

    const unsigned long long t_start = PROF ? clock64() : 0;
    const int z = blockIdx.x, hg = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    if (a.row_mha && a.row_mha[r])
        return;
    const int pos = a.row_pos[r], seq = a.row_seq[r], h0 = hg * MLA_HG;
    int kbeg, kend;
    mla_key_range(a, z, pos, &kbeg, &kend);

    if (tid < MLA_HG) {
        m_run[tid] = -INFINITY;
        l_run[tid] = 0.0f;
    }
    const bool pre = mla_resolve_slots(a, sslot, r, pos, seq, kbeg, kend, tid, WG_TH);
    if (tid == 0)
        mbar_init(gbar, WG_TH / 32);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* the barrier -> the copy engine */
    __syncthreads(); /* sslot, gbar */

    /* Key k of a tile is converted by the four lanes 4k.. (one warp holds eight keys whole); lane
     * 4k gathers its record with one bulk copy, so the warp alone orders its reads of the raw
     * records before their next copy, and a lane keeps its key's cache slot in a register. */
    const int key = tid >> 2;
    auto slot_at = [&](int j) { return mla_slot_at(a, sslot, pre, r, pos, seq, kbeg, kend, j); };
    /* one bulk copy per key, from its lane 0 (8 arrivals on gbar a phase: one per warp) */
    auto gather = [&](int32_t sl) { mla_gather_key(a, gbar, stg + key * srec, sl, t == 0, lane); };
    /* the raw record of this lane's key -> K (bf16): lane t converts latent bytes 16(t + 4k)..
     * (k < 8; scale block k / 2) and rope chunks t, t + 4 (bf16: 8 dims each; f32: 4 dims, lanes
     * take t + 4k, k < 4); zeros for an invalid key */
    auto convert = [&](int32_t sl) {
        const uint8_t *rec = stg + key * srec;
        const bool ok = sl >= 0;
        const float4 sc4 = ok ? *reinterpret_cast<const float4 *>(rec + MLA_C) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            uint4 raw[4];
#pragma unroll
            for (int k = 0; k < 4; k++)
                raw[k] = ok ? *reinterpret_cast<const uint4 *>(rec + 16 * (t + 4 * (4 * half + k))) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int kk = 4 * half + k, b = kk >> 1;
                const float sc = b == 0 ? sc4.x : b == 1 ? sc4.y : b == 2 ? sc4.z : sc4.w;
                uint32_t wv[8];
                e4m3x16_bf16(raw[k], sc, wv);
                const int col = 16 * (t + 4 * kk);
                *reinterpret_cast<uint4 *>(Kb + wg_off(key, col)) = make_uint4(wv[0], wv[1], wv[2], wv[3]);
                *reinterpret_cast<uint4 *>(Kb + wg_off(key, col + 8)) = make_uint4(wv[4], wv[5], wv[6], wv[7]);
            }
        }
        const uint8_t *pr = rec + MLA_C + 4 * (MLA_C / 128);
        if (a.rope_f32) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int d0 = 4 * (t + 4 * k);
                const float4 f = ok ? *reinterpret_cast<const float4 *>(pr + 4 * d0) : make_float4(0.f, 0.f, 0.f, 0.f);
                *reinterpret_cast<uint2 *>(Kb + wg_off(key, MLA_C + d0)) = make_uint2(pack_bf16(f.x, f.y), pack_bf16(f.z, f.w));
            }
        } else {
#pragma unroll
            for (int k = 0; k < 2; k++) {
                const int d0 = 8 * (t + 4 * k);
                const uint4 v = ok ? *reinterpret_cast<const uint4 *>(pr + 2 * d0) : make_uint4(0, 0, 0, 0);
                *reinterpret_cast<uint4 *>(Kb + wg_off(key, MLA_C + d0)) = v;
            }
        }
        if (t == 0)
            kval[key] = ok;
    };

    float O[4][32];
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int i = 0; i < 32; i++)
            O[mt][i] = 0.0f;
    const uint32_t qaddr = smem_addr(Qb), kaddr = smem_addr(Kb), paddr = smem_addr(Pb);
    const int hr0 = 16 * w + g, hr1 = hr0 + 8; /* this lane's S rows (heads) */
    int it = 0;
    unsigned long long ph[MLA_PROF_PHASES] = {}, tp = 0;
    auto mark = [&](int i) {
        if (PROF && (tid & 127) == 0) {
            const unsigned long long now = clock64();
            if (i >= 0)
                ph[i] += now - tp;
            tp = now;
        }
    };
    /* the first tile's records in flight while Q is staged, then converted */
    int32_t sl = -1;
    if (kbeg < kend) {
        sl = slot_at(kbeg + key);
        gather(sl);
    }
    mla_stage_q<WG_TH, 6>(a, Qb, r, h0, tid);
    if (kbeg < kend) {
        mbar_wait(gbar, 0);
        convert(sl);
    }
    /* Q and K -> the tensor core; the raw records read before the copy engine rewrites them */
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const unsigned long long t_loop = PROF ? clock64() : 0;
    /* Per tile i: S = Q K_i^T issued, tile i + 1's records gathered while the tensor cores run it
     * (the bulk copies' issue takes ~1000 cycles), softmax, PV_i (V_i^T read from the key tile,
     * so waited for before the key tile is rewritten), then tile i + 1's records are converted
     * into the key tile. */
    for (int ts = kbeg; ts < kend; ts += MLA_KT, it++) {
        mark(-1);
        /* S = Q K^T, heads x keys 32wg.. */
        float S[16];
#pragma unroll
        for (int i = 0; i < 16; i++)
            S[i] = 0.0f;
        wg_fence(S);
        wg_begin();
#pragma unroll
        for (int st = 0; st < MLA_D / 16; st++)
            wgmma_bf16_ss_n32(S, wg_desc_sw128(qaddr + (st >> 2) * 8192 + (st & 3) * 32),
                     wg_desc_sw128(kaddr + (st >> 2) * 8192 + wg * 4096 + (st & 3) * 32), st > 0);
        wg_commit();
        if (ts + MLA_KT < kend) {
            sl = slot_at(ts + MLA_KT + key);
            gather(sl);
        }
        wg_wait0();
        wg_fence(S);
        mark(0);
        /* S[4j + {0,1,2,3}]: (head hr0, key 8j+2t), (hr0, +1), (hr1, 8j+2t), (hr1, +1), keys of 32wg.. */
        bool v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            v[2 * j] = kval[32 * wg + 8 * j + 2 * t];
            v[2 * j + 1] = kval[32 * wg + 8 * j + 2 * t + 1];
        }
        float mx0, mx1;
        mla_mask_max(S, v, a.scale, &mx0, &mx1);
        if (t == 0) {
            red_m[wg * MLA_HG + hr0] = mx0;
            red_m[wg * MLA_HG + hr1] = mx1;
        }
        __syncthreads();
        const float *mr = m_run + (it & 1) * MLA_HG;
        float *mw = m_run + ((it + 1) & 1) * MLA_HG;
        float sum0 = 0.0f, sum1 = 0.0f;
        {
            const float mn0 = fmaxf(mr[hr0], fmaxf(red_m[hr0], red_m[MLA_HG + hr0]));
            const float mn1 = fmaxf(mr[hr1], fmaxf(red_m[hr1], red_m[MLA_HG + hr1]));
            const float ref0 = mn0 == -INFINITY ? 0.0f : mn0, ref1 = mn1 == -INFINITY ? 0.0f : mn1;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int kc = 32 * wg + 8 * j + 2 * t;
                const float p0 = __expf(S[4 * j + 0] - ref0), p1 = __expf(S[4 * j + 1] - ref0);
                const float p2 = __expf(S[4 * j + 2] - ref1), p3 = __expf(S[4 * j + 3] - ref1);
                sum0 += p0 + p1;
                sum1 += p2 + p3;
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr0, kc)) = pack_bf16(p0, p1);
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr1, kc)) = pack_bf16(p2, p3);
            }
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
            if (t == 0) {
                red_l[wg * MLA_HG + hr0] = sum0;
                red_l[wg * MLA_HG + hr1] = sum1;
                if (wg == 0) {
                    alpha_s[hr0] = mr[hr0] == -INFINITY ? 0.0f : __expf(mr[hr0] - ref0);
                    alpha_s[hr1] = mr[hr1] == -INFINITY ? 0.0f : __expf(mr[hr1] - ref1);
                    mw[hr0] = mn0;
                    mw[hr1] = mn1;
                }
            }
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* P -> the tensor core */
        __syncthreads();
        mark(1);
        if (wg == 0 && t == 0) {
            l_run[hr0] = l_run[hr0] * alpha_s[hr0] + red_l[hr0] + red_l[MLA_HG + hr0];
            l_run[hr1] = l_run[hr1] * alpha_s[hr1] + red_l[hr1] + red_l[MLA_HG + hr1];
        }
        mla_pv_issue<4>(O, alpha_s, t, kaddr + 4 * wg * 8192, 8192, paddr);
        wg_wait0(); /* the key tile is rewritten next */
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
            wg_fence(O[mt]);
        mark(2);
        const bool more = ts + MLA_KT < kend;
        if (more)
            mbar_wait(gbar, (it + 1) & 1); /* tile i + 1's raw records */
        __syncthreads(); /* the key tile read (S and V^T), kval read */
        mark(3);
        if (more) {
            convert(sl);
            mark(4);
            /* K -> the tensor core; the raw records read before the copy engine rewrites them */
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mark(5);
        }
        __syncthreads(); /* K_{i+1}, kval published; P free */
        mark(6);
    }
    const unsigned long long t_end = PROF ? clock64() : 0;
    __syncthreads(); /* l_run, m_run final */
    mla_store_o(a, O, l_run, m_run + (it & 1) * MLA_HG, z, r, h0, tid, wg, w, g, t);
    if (PROF && (tid & 127) == 0) {
        for (int i = 0; i < MLA_PROF_PHASES; i++)
            atomicAdd(a.prof + 8 * wg + i, ph[i]);
        if (wg == 0) {
            atomicAdd(a.prof + 16, (unsigned long long)it);
            atomicAdd(a.prof + 17, t_loop - t_start);
            atomicAdd(a.prof + 18, clock64() - t_end);
            atomicAdd(a.prof + 19, 1ull);
        }
    }
}

/* ---- the warp-specialized wgmma kernel (knob mla_ws, the default where its shared memory fits) ----
 *
 * mla_wg_kernel runs its steps one after another, both warpgroups in each (QK^T 2,760 cycles of a
 * 64-key tile, softmax 1,260, PV 1,580, conversion 1,690-1,810: 7,440 in all, GPU-NOTES). Here the
 * keys come in tiles of 32 and three warpgroups take different steps at once:
 *   warpgroup 0: S = Q K^T of tile i (all 32 keys: 36 x m64n32k16, Q read once per tile instead of
 *       once per warpgroup), the online softmax alone (no exchange of row maxima), P and alpha (QK^T
 *       of tile i + 1 issued before this softmax, FlashAttention-3's order, was slower: 0.185
 *       against 0.176 ms, the converters' PV waiting on the tensor cores);
 *   warpgroups 1 and 2 (c = 0, 1): the conversion of keys 16c.. of tile i + 1 into the other key
 *       tile (eight lanes a key: a quarter-warp reads 128 contiguous bytes of a record) and their
 *       gather for tile i + 1 + MLA_WS_NS into the staging buffer just read (three buffers: a
 *       record is asked for ~3 tiles before its conversion), then PV of tile i for latent dims
 *       256c.. as O += P V, one m64n256k16 a k-step (O in their registers, none in warpgroup 0: setmaxnreg moves registers from
 *       warpgroup 0, 120, to them, 192 each; at the launch's 168 they spilled).
 * Shared memory: Q (72 KB), two key tiles of 32 x 576 bf16 (36 KB each, 4 KB swizzle atoms), P
 * (64 heads x 32 keys in a 64-column atom), three staging buffers of 32 records, the slot table,
 * kval per key tile, alpha, the final statistics. Named barriers (count 384) hand tiles over:
 * Q_FULL (all three warpgroups stage a third of Q; 1 and 2 arrive, 0 waits), K_FULL[b] (warpgroups 1 and 2 arrive: key tile b converted; 0 waits), K_FREE[b] (0 arrives when
 * its QK^T of the tile in b is done, 1 and 2 wait, so also for each other's PV of it: b may be
 * rewritten), P_READY (0 arrives: P and alpha written; 1 and 2 wait), P_FREE (1 and 2 arrive after
 * their PV; 0 waits before the next P). An arrival is made only where the matching wait will come,
 * so none is left pending. bf16 rope only. At batch 64 x 2048 selected: 0.141-0.144 ms against
 * mla_wg_kernel's 0.165-0.166 timed beside it (GPU-NOTES, third session of 2026-11-29, also for
 * the variants measured and not kept). */
#define MLA_WS_KT 32
#define MLA_WS_KB (9 * 4096) /* a 32 x 576 bf16 key tile: 9 atoms of 32 rows x 128 bytes */
#define MLA_WS_NS 3
#define MLA_WS_TH 384
enum { WS_K_FULL = 1, WS_K_FREE = 3, WS_P_READY = 5, WS_P_FREE = 6, WS_Q_FULL = 7 };

/* named barriers of N threads (whole warps); the non-.aligned forms, which do not require a
 * converged warp (compute-sanitizer's synccheck flagged bar.sync after a one-lane branch) */
template <int N = MLA_WS_TH>
static __device__ __forceinline__ void nbar_sync(int id)
{
    asm volatile("barrier.sync %0, %1;" ::"r"(id), "n"(N) : "memory");
}
template <int N = MLA_WS_TH>
static __device__ __forceinline__ void nbar_arrive(int id)
{
    asm volatile("barrier.arrive %0, %1;" ::"r"(id), "n"(N) : "memory");
}

/* bytes of (row, col) in a key tile of 32 rows (wg_off's layout with 4 KB atoms) */
static __device__ __forceinline__ uint32_t ws_off(int row, int col)
{
    return (uint32_t)((col >> 6) * 4096 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2);
}

/* a staging row: the record rounded up to 16 bytes (no padding needed: a quarter-warp reads one
 * record's 128 contiguous bytes) */
static __host__ __device__ __forceinline__ int ws_rec_stride(int rec_bytes) { return (rec_bytes + 15) / 16 * 16; }

/* mla_ws_kernel's shared memory, for a record size */
static __host__ __device__ __forceinline__ size_t ws_smem(int rec_bytes)
{
    return (size_t)WG_QB + 2 * MLA_WS_KB + 8192 + (size_t)MLA_WS_NS * MLA_WS_KT * ws_rec_stride(rec_bytes) +
           MLA_WS_NS * sizeof(uint64_t) + sizeof(int32_t) * MLA_MAXSEL + 2 * MLA_WS_KT + sizeof(float) * 3 * MLA_HG;
}

/* O (m64n256: O[4j + {0,1}] of head hr0, O[4j + {2,3}] of head hr0 + 8) times its heads' alpha */
static __device__ __forceinline__ void o_rescale(float (&O)[128], float al0, float al1)
{
#pragma unroll
    for (int j = 0; j < 32; j++) {
        O[4 * j + 0] *= al0;
        O[4 * j + 1] *= al0;
        O[4 * j + 2] *= al1;
        O[4 * j + 3] *= al1;
    }
}

/* A warpgroup's O (heads x latent dims 256c.., m64n256: O[4j + {0,1,2,3}] is (head hr0, dim
 * 8j+2t), (hr0, +1), (hr0 + 8, 8j+2t), (hr0 + 8, +1)) out: normalized when one split, else a
 * split's partial, and with c = 0 the threads ctid < 64 publish their head's running max and sum */
static __device__ __forceinline__ void mla_store_o256(const struct mla_fast_args &a,
                                                      const float (&O)[128], const float *l_fin,
                                                      const float *m_fin, int z, int r, int h0,
                                                      int c, int hr0, int t, int ctid)
{
    const int hr1 = hr0 + 8;
    const float sA = a.splits == 1 ? mla_inv_l(l_fin[hr0]) : 1.0f;
    const float sB = a.splits == 1 ? mla_inv_l(l_fin[hr1]) : 1.0f;
    if (a.splits == 1) {
        const size_t base = ((size_t)r * a.H + h0) * MLA_C + 256 * c + 2 * t;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            mla_out2(a, base + (size_t)hr0 * MLA_C + 8 * j, O[4 * j] * sA, O[4 * j + 1] * sA);
            mla_out2(a, base + (size_t)hr1 * MLA_C + 8 * j, O[4 * j + 2] * sB, O[4 * j + 3] * sB);
        }
    } else {
        float *base = a.part_o + (((size_t)z * a.rows + r) * a.H + h0) * MLA_C + 256 * c + 2 * t;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            *reinterpret_cast<float2 *>(base + (size_t)hr0 * MLA_C + 8 * j) =
                make_float2(O[4 * j], O[4 * j + 1]);
            *reinterpret_cast<float2 *>(base + (size_t)hr1 * MLA_C + 8 * j) =
                make_float2(O[4 * j + 2], O[4 * j + 3]);
        }
    }
    if (a.splits > 1 && c == 0 && ctid < MLA_HG)
        a.part_ml[((size_t)z * a.rows + r) * a.H + h0 + ctid] =
            make_float2(m_fin[ctid], l_fin[ctid]);
}

/* the staged O's row stride: a head's 512 bf16 and 16 bytes, so that the 8 rows of a store lie 16
 * bytes apart in the banks */
#define MLA_OSTAGE_ROW (2 * MLA_C + 16)
static_assert(MLA_HG * MLA_OSTAGE_ROW <= WG_QB, "the staged O fits Q's buffer");

/* mla_store_o256 for one split and bf16 out, through shared memory: the warpgroup's half rows
 * into stage (64 rows of MLA_OSTAGE_ROW bytes), then,
 * once both halves are in (named barrier bar of the 256 consumers), the CTA's 64 contiguous rows
 * of 1 KB to out in whole 16-byte chunks (the direct stores write 4 bytes a lane, 16 of each
 * 32-byte sector a warp). At batch 64 x 2048 selected (H200, GPU-NOTES 2026-11-30 fifth): the dsa
 * op queued 0.424-0.427 ms against 0.428-0.431 with the direct stores, 0.423 with none at all */
static __device__ __forceinline__ void mla_store_o_staged(const struct mla_fast_args &a,
                                                          const float (&O)[128], const float *l_fin,
                                                          int r, int h0, int c, int hr0, int t,
                                                          int ctid, uint8_t *stage, int bar)
{
    const int hr1 = hr0 + 8;
    const float sA = mla_inv_l(l_fin[hr0]), sB = mla_inv_l(l_fin[hr1]);
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const int d = 256 * c + 8 * j + 2 * t;
        *reinterpret_cast<uint32_t *>(stage + hr0 * MLA_OSTAGE_ROW + 2 * d) =
            pack_bf16(O[4 * j] * sA, O[4 * j + 1] * sA);
        *reinterpret_cast<uint32_t *>(stage + hr1 * MLA_OSTAGE_ROW + 2 * d) =
            pack_bf16(O[4 * j + 2] * sB, O[4 * j + 3] * sB);
    }
    nbar_sync<256>(bar);
    uint8_t *dst = static_cast<uint8_t *>(a.out) + ((size_t)r * a.H + h0) * MLA_C * 2;
#pragma unroll
    for (int u = 0; u < 16; u++) {
        const int k = ctid + 256 * u, row = k >> 6, col = k & 63;
        *reinterpret_cast<uint4 *>(dst + (size_t)k * 16) =
            *reinterpret_cast<const uint4 *>(stage + row * MLA_OSTAGE_ROW + col * 16);
    }
}

/* mla_cl_kernel's O of consumer warpgroup c (ctid: the thread among the 256 consumers) by
 * a.o_stage: through shared memory (stage: Q's buffer, read for the last time) where one split
 * writes bf16, else directly; none for the diagnostic 2 */
static __device__ __forceinline__ void mla_cl_store_o(const struct mla_fast_args &a,
                                                      const float (&O)[128], const float *l_fin,
                                                      const float *m_fin, int z, int r, int h0,
                                                      int c, int hr0, int t, int ctid,
                                                      uint8_t *stage, int bar)
{
    if (a.o_stage == 2)
        return;
    if (a.o_stage == 1 && a.splits == 1 && a.lat16)
        mla_store_o_staged(a, O, l_fin, r, h0, c, hr0, t, ctid, stage, bar);
    else
        mla_store_o256(a, O, l_fin, m_fin, z, r, h0, c, hr0, t, ctid - 128 * c);
}

/* PROF phases (a.prof[8 wg + i], threads 0 and 128): warpgroup 0: 0 wait for the key tile, 1
 * QK^T, 2 softmax, 3 wait for P's buffer and the handover; warpgroup 1: 0 wait for the records, 1
 * wait for the key tile's buffer, 2 conversion, 3 the next gather's issue, 4 wait for P, 5 O
 * rescale + PV. QU: Q's loads of 32 bytes in flight a thread while staging it (4: three rounds,
 * the default; 6: two, knob mla_q6) */
template <bool PROF, int QU = 4>
static __global__ void __launch_bounds__(MLA_WS_TH, 1) mla_ws_kernel(const struct mla_fast_args a, int slack)
{
    extern __shared__ __align__(16) uint8_t dsmem[];
    /* the swizzle atoms want 1024-byte alignment; the host gives what the opt-in limit leaves for
     * it (slack), so a base further off stops the kernel (not seen: the base is aligned) */
    const uint32_t pad = (1024 - (smem_addr(dsmem) & 1023u)) & 1023u;
    if ((int)pad > slack)
        __trap();
    uint8_t *smem = dsmem + pad;
    uint8_t *Qb = smem, *Kb = smem + WG_QB, *Pb = Kb + 2 * MLA_WS_KB, *stg = Pb + 8192;
    const int srec = ws_rec_stride(a.rec_bytes);
    uint64_t *full = reinterpret_cast<uint64_t *>(stg + MLA_WS_NS * MLA_WS_KT * srec);
    int32_t *sslot = reinterpret_cast<int32_t *>(full + MLA_WS_NS);
    uint8_t *kval = reinterpret_cast<uint8_t *>(sslot + MLA_MAXSEL); /* [2][32] */
    float *alpha_s = reinterpret_cast<float *>(kval + 2 * MLA_WS_KT); /* [64] */
    float *l_fin = alpha_s + MLA_HG, *m_fin = l_fin + MLA_HG;

    const unsigned long long t_start = PROF ? clock64() : 0;
    unsigned long long t_loop = t_start;
    const int z = blockIdx.x, hg = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    if (a.row_mha && a.row_mha[r])
        return;
    const int pos = a.row_pos[r], seq = a.row_seq[r], h0 = hg * MLA_HG;
    int kbeg, kend;
    mla_key_range(a, z, pos, &kbeg, &kend);
    const int ntiles = kend > kbeg ? (kend - kbeg + MLA_WS_KT - 1) / MLA_WS_KT : 0;
    const bool pre = mla_resolve_slots(a, sslot, r, pos, seq, kbeg, kend, tid, MLA_WS_TH);
    if (tid == 0)
        for (int s = 0; s < MLA_WS_NS; s++)
            mbar_init(full + s, 8); /* warpgroups 1 and 2: eight warps arrive */
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* the barriers -> the copy engine */
    __syncthreads(); /* sslot, full */

    const uint32_t kaddr = smem_addr(Kb), paddr = smem_addr(Pb);
    unsigned long long ph[MLA_PROF_PHASES] = {}, tp = 0;
    auto mark = [&](int i) {
        if (PROF && (tid == 0 || tid == 128)) {
            const unsigned long long now = clock64();
            if (i >= 0)
                ph[i] += now - tp;
            tp = now;
        }
    };

    if (wg == 0) {
        /* registers to the converters, which hold O: 120 + 2 x 192 = the launch's 3 x 168 (an
         * unbalanced pair waits forever in setmaxnreg.inc); without it they spilled 28 bytes */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 120;");
        /* Q to bf16, a third of it (the converters, their first gathers issued, stage the rest:
         * 384 threads with QU loads of 32 bytes in flight, three rounds at 4; warpgroup 0 alone
         * took nine, latency-bound: 28.1K cycles before its first tile, 18.1K at QU 4) */
        mla_stage_q<MLA_WS_TH, QU>(a, Qb, r, h0, tid);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* Q -> the tensor core */
        nbar_sync(WS_Q_FULL);                                          /* all of Q */
        const uint32_t qaddr = smem_addr(Qb);
        const int hr0 = 16 * w + g, hr1 = hr0 + 8; /* this lane's S rows (heads) */
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
        t_loop = PROF ? clock64() : 0;
        mark(-1);
        for (int i = 0; i < ntiles; i++) {
            const int b = i & 1;
            nbar_sync(WS_K_FULL + b);
            mark(0);
            float S[16];
#pragma unroll
            for (int k = 0; k < 16; k++)
                S[k] = 0.0f;
            wg_fence(S);
            wg_begin();
#pragma unroll
            for (int st = 0; st < MLA_D / 16; st++)
                wgmma_bf16_ss_n32(S, wg_desc_sw128(qaddr + (st >> 2) * 8192 + (st & 3) * 32),
                                  wg_desc_sw128(kaddr + b * MLA_WS_KB + (st >> 2) * 4096 + (st & 3) * 32), st > 0);
            wg_commit();
            wg_wait0();
            wg_fence(S);
            /* S[4j + {0,1,2,3}]: (head hr0, key 8j+2t), (hr0, +1), (hr1, 8j+2t), (hr1, +1) */
            const uint8_t *kv = kval + b * MLA_WS_KT;
            bool v[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[2 * j] = kv[8 * j + 2 * t];
                v[2 * j + 1] = kv[8 * j + 2 * t + 1];
            }
            if (i + 2 < ntiles)
                nbar_arrive(WS_K_FREE + b); /* S and kval read: tile i + 2 may go to key tile b */
            mark(1);
            float mx0, mx1;
            mla_mask_max(S, v, a.scale, &mx0, &mx1);
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float ref0 = mn0 == -INFINITY ? 0.0f : mn0, ref1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float al0 = m0 == -INFINITY ? 0.0f : __expf(m0 - ref0), al1 = m1 == -INFINITY ? 0.0f : __expf(m1 - ref1);
            uint32_t pk[8];
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float p0 = __expf(S[4 * j + 0] - ref0), p1 = __expf(S[4 * j + 1] - ref0);
                const float p2 = __expf(S[4 * j + 2] - ref1), p3 = __expf(S[4 * j + 3] - ref1);
                sum0 += p0 + p1;
                sum1 += p2 + p3;
                pk[2 * j] = pack_bf16(p0, p1);
                pk[2 * j + 1] = pack_bf16(p2, p3);
            }
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
            sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
            sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
            l0 = l0 * al0 + sum0;
            l1 = l1 * al1 + sum1;
            m0 = mn0;
            m1 = mn1;
            mark(2);
            if (i > 0)
                nbar_sync(WS_P_FREE); /* warpgroups 1 and 2's PV of the last tile read P and alpha */
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int kc = 8 * j + 2 * t;
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr0, kc)) = pk[2 * j];
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr1, kc)) = pk[2 * j + 1];
            }
            if (t == 0) {
                alpha_s[hr0] = al0;
                alpha_s[hr1] = al1;
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* P -> the tensor core */
            nbar_arrive(WS_P_READY);
            mark(3);
        }
        if (t == 0) {
            l_fin[hr0] = l0;
            l_fin[hr1] = l1;
            m_fin[hr0] = m0;
            m_fin[hr1] = m1;
        }
        nbar_sync(0); /* l_fin, m_fin (warpgroup 0 has no O to store; the converters wait at their own call) */
    } else {
        /* warpgroups 1 and 2 (c = wg - 1): key k of a tile (16c <= k < 16c + 16) is gathered and
         * converted by the eight lanes 8k.. of the pair (lane 8k issues the record's bulk copy; the
         * warp alone orders its reads of the records before their next copy) */
        asm volatile("setmaxnreg.inc.sync.aligned.u32 192;");
        const int c = wg - 1, ctid = tid - 128, key = ctid >> 3, t8 = ctid & 7;
        /* O (heads x this warpgroup's 256 latent dims, m64n256): O[4j + {0,1,2,3}] is (head hr0,
         * dim 8j+2t), (hr0, +1), (hr1, 8j+2t), (hr1, +1) */
        float O[128];
#pragma unroll
        for (int i = 0; i < 128; i++)
            O[i] = 0.0f;
        const int hr0 = 16 * w + g, hr1 = hr0 + 8;
        auto slot_at = [&](int j) { return mla_slot_at(a, sslot, pre, r, pos, seq, kbeg, kend, j); };
        auto gather = [&](int i) { /* tile i into staging buffer i % MLA_WS_NS */
            const int s = i % MLA_WS_NS;
            mla_gather_key(a, full + s, stg + (s * MLA_WS_KT + key) * srec, slot_at(kbeg + i * MLA_WS_KT + key),
                           t8 == 0, lane);
        };
        /* this lane's part of tile i's record (waited for) -> key tile i & 1 (bf16): latent chunks
         * t8 + 8k (16 dims each, scale block k) and rope chunk t8; zeros for an invalid key */
        auto convert = [&](int i) {
            const int s = i % MLA_WS_NS, b = i & 1;
            mbar_wait(full + s, (uint32_t)(i / MLA_WS_NS) & 1u);
            mark(0);
            if (i >= 2)
                nbar_sync(WS_K_FREE + b); /* tile i - 2's QK^T and both PVs of it are done */
            mark(1);
            const uint8_t *rec = stg + (s * MLA_WS_KT + key) * srec;
            uint8_t *K = Kb + b * MLA_WS_KB;
            const bool ok = slot_at(kbeg + i * MLA_WS_KT + key) >= 0;
            const float4 sc4 = ok ? *reinterpret_cast<const float4 *>(rec + MLA_C) : make_float4(0.f, 0.f, 0.f, 0.f);
            uint4 raw[4];
#pragma unroll
            for (int k = 0; k < 4; k++)
                raw[k] = ok ? *reinterpret_cast<const uint4 *>(rec + 16 * (t8 + 8 * k)) : make_uint4(0, 0, 0, 0);
            const uint4 pe = ok ? *reinterpret_cast<const uint4 *>(rec + MLA_C + 4 * (MLA_C / 128) + 16 * t8)
                                : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float sc = k == 0 ? sc4.x : k == 1 ? sc4.y : k == 2 ? sc4.z : sc4.w;
                uint32_t wv[8];
                e4m3x16_bf16(raw[k], sc, wv);
                const int col = 16 * (t8 + 8 * k);
                *reinterpret_cast<uint4 *>(K + ws_off(key, col)) = make_uint4(wv[0], wv[1], wv[2], wv[3]);
                *reinterpret_cast<uint4 *>(K + ws_off(key, col + 8)) = make_uint4(wv[4], wv[5], wv[6], wv[7]);
            }
            *reinterpret_cast<uint4 *>(K + ws_off(key, MLA_C + 8 * t8)) = pe; /* bf16 rope */
            if (t8 == 0)
                kval[b * MLA_WS_KT + key] = ok;
            /* K -> the tensor core; the records read before the copy engine rewrites them */
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncwarp();
            nbar_arrive(WS_K_FULL + b);
            mark(2);
            if (i + MLA_WS_NS < ntiles)
                gather(i + MLA_WS_NS);
            mark(3);
        };
        /* O *= alpha per head, then O += P V over the 32 keys of key tile b: A = P (read once per
         * k-step, not once per 64 dims as mla_wg_kernel's O^T += V^T P^T), B = V, the tile's rows
         * of 64 dims per key being V's MN-major layout (leading offset 4 KB: the next 64 dims'
         * atom; stride 1 KB: the next 8 keys) */
        auto pv = [&](int b) {
            const float al0 = alpha_s[hr0], al1 = alpha_s[hr1];
            o_rescale(O, al0, al1);
            wg_fence(O);
            wg_begin();
#pragma unroll
            for (int kk = 0; kk < 2; kk++)
                wgmma_bf16_ss_n256_tb(O, wg_desc_sw128(paddr + kk * 32),
                                      wg_desc(kaddr + b * MLA_WS_KB + 4 * c * 4096 + kk * 2048, 4096, 1024) |
                                          ((uint64_t)1 << 62),
                                      1);
            wg_commit();
            wg_wait0();
            wg_fence(O);
        };
        for (int i = 0; i < MLA_WS_NS && i < ntiles; i++)
            gather(i);
        mla_stage_q<MLA_WS_TH, QU>(a, Qb, r, h0, tid); /* their two thirds of Q */
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        nbar_arrive(WS_Q_FULL);
        mark(-1);
        if (ntiles > 0)
            convert(0);
        for (int i = 0; i < ntiles; i++) {
            if (i + 1 < ntiles)
                convert(i + 1);
            nbar_sync(WS_P_READY);
            mark(4);
            pv(i & 1);
            if (i + 1 < ntiles)
                nbar_arrive(WS_P_FREE);
            mark(5);
        }
        nbar_sync(0); /* l_fin, m_fin (the non-aligned barrier 0: warpgroup 0 waits at another call) */
        mla_store_o256(a, O, l_fin, m_fin, z, r, h0, c, hr0, t, ctid);
    }
    if (PROF && (tid == 0 || tid == 128)) {
        for (int i = 0; i < MLA_PROF_PHASES; i++)
            atomicAdd(a.prof + 8 * wg + i, ph[i]);
        if (wg == 0) {
            atomicAdd(a.prof + 16, (unsigned long long)ntiles);
            atomicAdd(a.prof + 17, t_loop - t_start);
            atomicAdd(a.prof + 18, 0ull);
            atomicAdd(a.prof + 19, 1ull);
        }
    }
}

/* ---- mla_cl_kernel: the two head groups of a (row, split) as a cluster of two CTAs ----
 * Both CTAs of a cluster read the same selected keys (one 64-head group each), so each gathers
 * and dequantizes only half of every 64-key tile (32 keys: rank 0 the first, rank 1 the second)
 * into its own key tile, and its producer's first thread copies that half into the peer's (9
 * bulk copies, the half's rows of each atom: 4 KB each, counted on the peer's barrier): the
 * conversion, mla_ws_kernel's largest phase, is done once per cluster instead of once per CTA,
 * and the records go from global memory to registers to the tile with no staging copy (64-key
 * tiles described; cl_geo has the 32-key variant's mapping). 384 threads:
 *   warpgroup 0: S = Q K^T (m64n64, 36 k-steps, both from shared memory), the online softmax,
 *                P to shared memory for warpgroup 1, then O[:, 0:256] += P V with P from its
 *                registers (the accumulator's layout is the A fragment's);
 *   warpgroup 1: O[:, 256:512] += P V with P from shared memory;
 *   warpgroup 2: the producer: thread (warp w, lane) takes key 8w + lane % 8 of its half and
 *                the 16-byte quarter lane / 8 of each 64-dim group (8 loads of its latent, 2 of
 *                its rope, its scales), converts (e4m3x16_bf16) and stores 18 x 16 bytes;
 *                the next tile's loads are issued before it waits for that tile's buffer.
 * Barriers per key buffer b (of NB), the ready ones per group of 3 atoms (CL_NG groups: QK^T
 * starts on a tile's first 192 dims while the rest are stored and copied): ready[b][g] (mbarrier,
 * the local producer's 128 threads), from_peer[b][g] (mbarrier: the local producer's thread 0
 * expects cl_geo::TX / CL_NG bytes, the peer's copies of the group count them), avail[b]
 * (mbarrier of 4 arrivals: warpgroups 0 and 1 of both CTAs after their last read of b; a
 * producer waits before it writes b in either CTA). Named barriers
 * between warpgroups 0 and 1: P_READY, P_FREE, O_SYNC. The validity of a tile's keys (for S's
 * mask) is computed by the local producer for both halves from the selection, so no flag
 * crosses the cluster. Grid and outputs as mla_ws_kernel's (splits x head groups x rows); the
 * head groups must be even (H % 128 == 0) and the rope bf16.
 * At batch 64 x 2048 selected on the H200: 0.108-0.117 ms against mla_ws_kernel's 0.139-0.152
 * in the same runs (without the copies, a diagnostic with wrong results, knob mla_cl_nocopy:
 * 0.100-0.108). The groups of atoms took it from 0.136 to 0.124 (one barrier per atom: 0.133),
 * the producer's loaded indices used a step later from 0.124 to 0.112 (GPU-NOTES, seventh session
 * of 2026-11-29). With one barrier a tile, Nsight Compute had warpgroup 0
 * waiting ~30% of its time for the peer's half while the producers waited ~40% for a free buffer:
 * the loop from a buffer's release through the peer's conversion and copy to the next use was
 * longer than one tile of QK^T, softmax and PV. Also measured: each CTA converting the whole tile
 * itself, no copies (0.174: its loads one half tile ahead instead of a tile); the conversion
 * moved before the wait for the buffer (spills, or 0.133 for half of it). Measured
 * and not kept (GPU-NOTES): 32-key tiles in four buffers (KT 32, knob mla_cl 32: 0.150, the
 * consumers wait as long, QK^T at n32 costs more), st.async stores of each 16 bytes to the peer
 * instead of the bulk copies (0.143), per-warp copies (0.133-0.135 against 0.131-0.132).
 * Fifth session of 2026-11-30: 0.097-0.104 ms (367 TFLOP/s) with warpgroup 0's softmax on the
 * unscaled S and O out through shared memory (0.111 and ~4 us before). A clock64 trace of one
 * CTA had put a tile at ~4,500 cycles: ~300 waiting for the producer, QK^T ~1,300 (36 m64n64k16
 * at ~34 cycles each, the tensor rate: a second accumulator chain measured no faster in a
 * microbenchmark), the softmax ~1,000 with the tensor core idle, the hand-over ~250, both PVs
 * ~1,150; before the first tile ~10 us (Q's staging 4.6, the first tile's records and
 * conversion), after the last ~7 us (O's stores, the peer). Sixth session: FlashMLA's seesaw
 * (each consumer warpgroup taking S and the softmax of every other tile, O split by columns) and
 * warpgroup 0's next QK^T issued under its P V were both correct and 25-50% slower: each frees a
 * key buffer later, and the kernel then runs at the producer's release-to-ready latency (~one
 * tile already), GPU-NOTES. */
#define MLA_CL_TH 384
/* a key tile's groups of 3 atoms (192 dims), each ready on its own barriers, so that QK^T starts
 * on the first while the rest are copied (1 group: 0.136 ms, 3: 0.124, 9: 0.133 in one run) */
#define CL_NG 3
enum { CL_P_READY = 1, CL_P_FREE = 2, CL_O_SYNC = 3, CL_Q_READY = 4, CL_O_STAGED = 5 };

/* mla_cl_kernel's geometry for key tiles of KT keys (64: two key buffers; 32: four, in the same
 * bytes, so that the producer may run three tiles ahead instead of one) */
template <int KT> struct cl_geo {
    static constexpr int NB = KT == 64 ? 2 : 4; /* key buffers */
    static constexpr int AT = KT * 128; /* bytes of a tile's 64-dim atom (KT rows of 128 bytes) */
    static constexpr int KB = 9 * AT;   /* a KT x 576 bf16 key tile */
    static constexpr int HALF = KT / 2; /* the keys a CTA converts per tile */
    static constexpr int TPK = 128 / HALF; /* producer threads per key: 4 or 8 */
    static constexpr int HI = TPK / 4;     /* the stride of a producer thread's 64-dim groups */
    static constexpr int NGRP = 8 / HI;    /* its 64-dim groups (16 bytes of each) */
    static constexpr int NROPE = 8 / TPK;  /* its 16-byte rope chunks */
    static constexpr int TX = HALF * 2 * MLA_D; /* the bytes the peer copies into a key tile */
};

/* bytes of (row, col) in a key tile of KT rows (wg_off's swizzle, atoms of KT rows) */
template <int KT> static __device__ __forceinline__ uint32_t cl_off(int row, int col)
{
    return (uint32_t)((col >> 6) * cl_geo<KT>::AT + row * 128 +
                      ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2);
}

/* mla_cl_kernel's shared memory: Q, the key buffers, P, 3 barriers a buffer, key flags, alpha,
 * l, m */
template <int KT> static __host__ __device__ __forceinline__ size_t cl_smem()
{
    using G = cl_geo<KT>;
    return (size_t)WG_QB + (size_t)G::NB * G::KB + 8192 +
           (1 + 2 * CL_NG) * G::NB * sizeof(uint64_t) + G::NB * KT + sizeof(float) * 3 * MLA_HG;
}

static __device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <int KT>
static __global__ void __cluster_dims__(1, 2, 1) __launch_bounds__(MLA_CL_TH, 1)
    mla_cl_kernel(const struct mla_fast_args a, int slack, int nocopy)
{
    using G = cl_geo<KT>;
    constexpr int NB = G::NB;
    extern __shared__ __align__(16) uint8_t dsmem[];
    const uint32_t pad = (1024 - (smem_addr(dsmem) & 1023u)) & 1023u;
    if ((int)pad > slack)
        __trap();
    uint8_t *smem = dsmem + pad; /* the same offset in both CTAs: mapped addresses match */
    uint8_t *Qb = smem, *Kb = smem + WG_QB, *Pb = Kb + NB * G::KB;
    /* avail[NB], ready[NB][CL_NG], from_peer[NB][CL_NG] */
    uint64_t *bars = reinterpret_cast<uint64_t *>(Pb + 8192), *ready = bars + NB,
             *from_peer = ready + NB * CL_NG;
    uint8_t *kval = reinterpret_cast<uint8_t *>(from_peer + NB * CL_NG); /* [NB][KT] */
    float *alpha_s = reinterpret_cast<float *>(kval + NB * KT), *l_fin = alpha_s + MLA_HG,
          *m_fin = l_fin + MLA_HG;
    const int z = blockIdx.x, hg = blockIdx.y, r = blockIdx.z;
    const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2,
              t = lane & 3;
    const uint32_t rank = cooperative_groups::this_cluster().block_rank(), peer = rank ^ 1u;
    if (a.row_mha && a.row_mha[r])
        return; /* both CTAs of the cluster (one row) */
    const int pos = a.row_pos[r], seq = a.row_seq[r], h0 = hg * MLA_HG;
    int kbeg, kend;
    mla_key_range(a, z, pos, &kbeg, &kend);
    const int ntiles = kend > kbeg ? (kend - kbeg + KT - 1) / KT : 0;
    if (tid == 0) {
        for (int b = 0; b < NB; b++) {
            mbar_init(bars + b, 4);
            for (int gr = 0; gr < CL_NG; gr++) {
                mbar_init(ready + CL_NG * b + gr, 128);
                mbar_init(from_peer + CL_NG * b + gr, 1);
            }
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }

    /* the producer's key (its half's row kloc, the tile's row krow) and part (TPK a key: the
     * quarter q of each of its groups hi, hi + HI.., and its rope chunks);
     * its work runs three tiles deep: while tile i converts, the records of tile i + 1 load into
     * the other register set, the block table entry of tile i + 2 and the selection entry of tile
     * i + 3 load, and each loaded value is used only a step later (the selection's and the block
     * table's loads are unconditional, from clamped indices, so that none waits behind a branch;
     * their range checks and the slot's arithmetic wait for the next step, where the value is
     * in: done at once, they held the producer ~25% of its time on the loads) */
    const int kloc = (lane & 7) + 8 * (w % (4 / G::HI)), hi = w / (4 / G::HI), q = lane >> 3,
              part = 4 * hi + q;
    const int krow = G::HALF * (int)rank + kloc;
    struct cl_rec {
        uint4 v[G::NGRP + G::NROPE]; /* the key's quarters of its groups, then its rope chunks */
        float4 sc;
    } ra, rb;
    /* the selection entry of key kloc of half `half` of tile i, as loaded (sel_raw), and the
     * position it gives (sel_fix: -1 past the split's end) */
    auto sel_raw = [&](int i, uint32_t half) -> int {
        const int j = kbeg + KT * i + G::HALF * (int)half + kloc;
        return a.sel ? __ldg(a.sel + (size_t)r * a.n_sel + min(j, kend - 1)) : j;
    };
    auto sel_fix = [&](int i, uint32_t half, int raw) -> int {
        return kbeg + KT * i + G::HALF * (int)half + kloc < kend ? raw : -1;
    };
    auto pos_ok = [&](int p) { return p >= 0 && p <= pos; };
    /* the block table entry of position p, as loaded, and the slot it gives (slot_of in two
     * steps) */
    auto blk_raw = [&](int p) -> int32_t {
        return __ldg(a.blocks + (size_t)seq * a.max_blocks +
                     (pos_ok(p) ? p : 0) / DSV32_KV_BLOCK_TOKENS);
    };
    auto slot_fix = [&](int p, int32_t blk) -> int32_t {
        return pos_ok(p) ? (int32_t)slot_in(blk, p) : -1;
    };
    auto load = [&](struct cl_rec &d, int32_t sl) {
        const uint8_t *rec = a.mla + (size_t)(sl >= 0 ? sl : 0) * a.rec_bytes;
#pragma unroll
        for (int k = 0; k < G::NGRP; k++)
            d.v[k] =
                sl >= 0
                    ? __ldg(reinterpret_cast<const uint4 *>(rec + 64 * (hi + G::HI * k) + 16 * q))
                    : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int k = 0; k < G::NROPE; k++)
            d.v[G::NGRP + k] =
                sl >= 0 ? __ldg(reinterpret_cast<const uint4 *>(rec + MLA_C + 4 * (MLA_C / 128) +
                                                                16 * (G::NROPE * part + k)))
                        : make_uint4(0, 0, 0, 0);
        d.sc = sl >= 0 ? __ldg(reinterpret_cast<const float4 *>(rec + MLA_C))
                       : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    /* at step i: the slot of tile i; the position of tile i + 1 and its block table entry; the
     * selection entry of tile i + 2; the peer half's position in tile i and entry in tile i + 1 */
    int32_t sl0 = -1, b1 = 0;
    int p1 = -1, s2 = 0, pv0 = -1, pr1 = 0;
    /* Q: by all threads from f32, then the cluster barrier; from bf16 (lat16: one round of loads)
     * by the consumers alone, the producer past the cluster barrier (every thread arrives on it
     * first) and on to its first tiles while they stage it */
    auto stage_q = [&]() {
        if (!a.lat16)
            mla_stage_q<MLA_CL_TH, 4>(a, Qb, r, h0, tid);
        else if (wg < 2)
            mla_stage_q16<256>(a, Qb, r, h0, tid);
    };
    if (a.lat16)
        asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    if (a.q_first) { /* Q was written before the indexer ran: staged under the top-k's tail */
        stage_q();
        pdl_wait();
    }
    pdl_trigger(); /* the splits' combine may be placed on the SMs this grid leaves free */
    if (wg == 2 && ntiles > 0) {
        const int p0 = sel_fix(0, rank, sel_raw(0, rank));
        sl0 = slot_fix(p0, blk_raw(p0));
        load(ra, sl0); /* in flight under Q's staging */
        p1 = sel_fix(1, rank, sel_raw(1, rank));
        b1 = blk_raw(p1);
        s2 = sel_raw(2, rank);
        pv0 = sel_fix(0, peer, sel_raw(0, peer));
        pr1 = sel_raw(1, peer);
    }
    if (!a.q_first)
        stage_q();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* Q -> the tensor core */
    if (!a.lat16) {
        cooperative_groups::this_cluster().sync(); /* both CTAs' barriers initialized, Q staged */
    } else {
        asm volatile("barrier.cluster.wait.acquire.aligned;" ::
                         : "memory"); /* barriers initialized */
        if (wg < 2)
            nbar_sync<256>(CL_Q_READY); /* Q staged */
    }

    const uint32_t kaddr = smem_addr(Kb), paddr = smem_addr(Pb);
    const uint32_t avail_own = cl_map(smem_addr(bars), rank),
                   avail_peer = cl_map(smem_addr(bars), peer);
    const int hr0 = 16 * w + g, hr1 = hr0 + 8;
    /* V (the tile's latent dims 256c.., MN-major: the next 64 dims an atom on, the next 8 keys
     * 1 KB on) for keys 16kk.. of key buffer b */
    auto vdesc = [&](int b, int c, int kk) {
        return wg_desc(kaddr + b * G::KB + 4 * c * G::AT + kk * 2048, G::AT, 1024) |
               ((uint64_t)1 << 62);
    };
    /* buffer i % NB read by this warpgroup: tile i + NB may be written */
    auto release = [&](int i) {
        if (i + NB < ntiles && tid % 128 == 0) {
            mbar_arrive_cl(avail_own + 8 * (i % NB));
            mbar_arrive_cl(avail_peer + 8 * (i % NB));
        }
    };
    /* registers a thread: producer 144, warpgroup 0 200 (192 spilled 8 bytes once S stayed
     * unscaled), warpgroup 1 160 (152 too few for ptxas): 504, the 168 x 3 the CTA holds */
    if (wg == 2) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 144;");
        const uint32_t kb_peer = cl_map(kaddr, peer), fp_peer = cl_map(smem_addr(from_peer), peer);
        /* tile i from cur (loaded a step ago); tile i + 1's records into nxt */
        auto step = [&](int i, const struct cl_rec &cur, struct cl_rec &nxt) {
            const int b = i % NB;
            const int32_t sl1 = slot_fix(p1, b1);
            if (i + 1 < ntiles)
                load(nxt, sl1);
            const int p2 = sel_fix(i + 2, rank, s2), pv1 = sel_fix(i + 1, peer, pr1);
            const int32_t b2 = blk_raw(p2);
            const int s3 = sel_raw(i + 3, rank), pr2 = sel_raw(i + 2, peer);
            if (i >= NB) /* tile i - NB read in both CTAs */
                mbar_wait(bars + b, (uint32_t)((i / NB) & 1) ^ 1u);
            if (tid == 256)
                for (int gr = 0; gr < CL_NG; gr++) {
                    if (nocopy) /* diagnostic: the peer's half stays */
                        mbar_arrive(from_peer + CL_NG * b + gr);
                    else
                        mbar_arrive_tx(from_peer + CL_NG * b + gr, G::TX / CL_NG);
                }
            uint8_t *K = Kb + b * G::KB;
            /* the groups of atoms, each ready on its barrier once stored by all (atom a is stored
             * at k = a / HI by the threads of hi = a % HI; the rope and the key flags with the
             * last) */
#pragma unroll
            for (int k = 0; k < G::NGRP; k++) {
                const int dg = hi + G::HI * k, sb = dg >> 1;
                uint32_t wv[8];
                e4m3x16_bf16(cur.v[k],
                             sb == 0   ? cur.sc.x
                             : sb == 1 ? cur.sc.y
                             : sb == 2 ? cur.sc.z
                                       : cur.sc.w,
                             wv);
                *reinterpret_cast<uint4 *>(K + cl_off<KT>(krow, 64 * dg + 16 * q)) =
                    make_uint4(wv[0], wv[1], wv[2], wv[3]);
                *reinterpret_cast<uint4 *>(K + cl_off<KT>(krow, 64 * dg + 16 * q + 8)) =
                    make_uint4(wv[4], wv[5], wv[6], wv[7]);
#pragma unroll
                for (int gr = 0; gr < CL_NG - 1; gr++)
                    if (k == (9 / CL_NG * (gr + 1) - 1) / G::HI) {
                        /* -> the tensor core and the copies */
                        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                        mbar_arrive(ready + CL_NG * b + gr);
                    }
            }
#pragma unroll
            for (int k = 0; k < G::NROPE; k++)
                *reinterpret_cast<uint4 *>(
                    K + cl_off<KT>(krow, MLA_C + 8 * (G::NROPE * part + k))) = cur.v[G::NGRP + k];
            if (part == 0)
                kval[b * KT + krow] = sl0 >= 0;
            else if (part == 1)
                kval[b * KT + G::HALF * (int)peer + kloc] = pos_ok(pv0);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mbar_arrive(ready + CL_NG * b + CL_NG - 1);
            /* the half: its rows of each atom, contiguous, to the peer */
            if (tid == 256 && !nocopy) {
                const uint32_t Kp = kb_peer + b * G::KB, o = rank * G::HALF * 128;
#pragma unroll
                for (int gr = 0; gr < CL_NG; gr++) {
                    mbar_wait(ready + CL_NG * b + gr, (uint32_t)(i / NB) & 1u);
#pragma unroll
                    for (int c = gr * (9 / CL_NG); c < (gr + 1) * (9 / CL_NG); c++)
                        bulk_s2cl(Kp + c * G::AT + o, K + c * G::AT + o, G::HALF * 128,
                                  fp_peer + 8 * (CL_NG * b + gr));
                }
            }
            sl0 = sl1;
            p1 = p2;
            b1 = b2;
            s2 = s3;
            pv0 = pv1;
            pr1 = pr2;
        };
        for (int i = 0; i < ntiles; i += 2) {
            step(i, ra, rb);
            if (i + 1 < ntiles)
                step(i + 1, rb, ra);
        }
    } else if (wg == 0) {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 200;");
        const uint64_t dq0 = wg_desc_sw128(smem_addr(Qb));
        const float sl2 = a.scale * 1.4426950408889634f; /* scores in log2 units: exp2 below */
        float O[128], S[KT / 2];
#pragma unroll
        for (int i = 0; i < 128; i++)
            O[i] = 0.0f;
#pragma unroll
        for (int k = 0; k < KT / 2; k++)
            S[k] = 0.0f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* l: this thread's columns */
        for (int i = 0; i < ntiles; i++) {
            const int b = i % NB;
            const uint32_t par = (uint32_t)(i / NB) & 1u;
            const uint64_t dk0 = wg_desc_sw128(kaddr + b * G::KB);
            wg_fence(S); /* not zeroed: the first k-step's scale-d is 0 */
            wg_begin();
#pragma unroll
            for (int st = 0; st < MLA_D / 16; st++) {
                if (st % (4 * 9 / CL_NG) == 0) { /* the group of atoms in, local and the peer's */
                    mbar_wait(ready + CL_NG * b + st / (4 * 9 / CL_NG), par);
                    mbar_wait(from_peer + CL_NG * b + st / (4 * 9 / CL_NG), par);
                }
                const uint64_t dq = wg_desc_add(dq0, (st >> 2) * 8192 + (st & 3) * 32);
                const uint64_t dk = wg_desc_add(dk0, (st >> 2) * G::AT + (st & 3) * 32);
                if constexpr (KT == 64)
                    wgmma_bf16_ss_n64(S, dq, dk, st > 0);
                else
                    wgmma_bf16_ss_n32(S, dq, dk, st > 0);
            }
            wg_commit();
            wg_wait0();
            wg_fence(S);
            /* S[4j + {0,1,2,3}]: (head hr0, key 8j+2t), (hr0, +1), (hr1, 8j+2t), (hr1, +1);
             * S stays unscaled: the keys past the selection's end or not cached yet to -inf
             * (none in a full tile: each lane reads a word of the flags, the warp votes), the
             * maxima scaled after (sl2 > 0: the same as the scaled values' maxima) and each
             * exponent one FMA of S */
            const uint8_t *kv = kval + b * KT;
            if (!__all_sync(0xffffffffu, reinterpret_cast<const uint32_t *>(kv)[lane % (KT / 4)] ==
                                             0x01010101u)) {
#pragma unroll
                for (int j = 0; j < KT / 8; j++) {
                    const bool v0 = kv[8 * j + 2 * t], v1 = kv[8 * j + 2 * t + 1];
                    S[4 * j + 0] = v0 ? S[4 * j + 0] : -INFINITY;
                    S[4 * j + 1] = v1 ? S[4 * j + 1] : -INFINITY;
                    S[4 * j + 2] = v0 ? S[4 * j + 2] : -INFINITY;
                    S[4 * j + 3] = v1 ? S[4 * j + 3] : -INFINITY;
                }
            }
            float mx0, mx1;
            mla_quad_max(S, &mx0, &mx1);
            mx0 *= sl2;
            mx1 *= sl2;
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float ref0 = mn0 == -INFINITY ? 0.0f : mn0, ref1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float al0 = m0 == -INFINITY ? 0.0f : fast_exp2(m0 - ref0);
            const float al1 = m1 == -INFINITY ? 0.0f : fast_exp2(m1 - ref1);
            uint32_t pk[KT / 4];
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int j = 0; j < KT / 8; j++) {
                const float p0 = fast_exp2(fmaf(S[4 * j + 0], sl2, -ref0)),
                            p1 = fast_exp2(fmaf(S[4 * j + 1], sl2, -ref0));
                const float p2 = fast_exp2(fmaf(S[4 * j + 2], sl2, -ref1)),
                            p3 = fast_exp2(fmaf(S[4 * j + 3], sl2, -ref1));
                sum0 += p0 + p1;
                sum1 += p2 + p3;
                pk[2 * j] = pack_bf16(p0, p1);
                pk[2 * j + 1] = pack_bf16(p2, p3);
            }
            l0 = l0 * al0 + sum0;
            l1 = l1 * al1 + sum1;
            m0 = mn0;
            m1 = mn1;
            if (i > 0)
                nbar_sync<256>(CL_P_FREE); /* warpgroup 1's PV of the last tile read P and alpha */
#pragma unroll
            for (int j = 0; j < KT / 8; j++) {
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr0, 8 * j + 2 * t)) = pk[2 * j];
                *reinterpret_cast<uint32_t *>(Pb + wg_off(hr1, 8 * j + 2 * t)) = pk[2 * j + 1];
            }
            if (t == 0) {
                alpha_s[hr0] = al0;
                alpha_s[hr1] = al1;
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* P -> the tensor core */
            nbar_arrive<256>(CL_P_READY);
            if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) /* a row's max moved */
                o_rescale(O, al0, al1);
            wg_fence(O);
            wg_begin();
#pragma unroll
            for (int kk = 0; kk < KT / 16; kk++) {
                const uint32_t pa[4] = {pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]};
                wgmma_bf16_rs_n256_tb(O, pa, vdesc(b, 0, kk), 1);
            }
            wg_commit();
            wg_wait0();
            wg_fence(O);
            release(i);
        }
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        if (t == 0) { /* the running max back in natural units for the split combine */
            l_fin[hr0] = l0;
            l_fin[hr1] = l1;
            m_fin[hr0] = m0 * 0.6931471805599453f;
            m_fin[hr1] = m1 * 0.6931471805599453f;
        }
        nbar_sync<256>(CL_O_SYNC);
        mla_cl_store_o(a, O, l_fin, m_fin, z, r, h0, 0, hr0, t, tid, Qb, CL_O_STAGED);
    } else {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 160;");
        float O[128];
#pragma unroll
        for (int i = 0; i < 128; i++)
            O[i] = 0.0f;
        for (int i = 0; i < ntiles; i++) {
            const int b = i % NB;
            nbar_sync<256>(CL_P_READY);
            const float al0 = alpha_s[hr0], al1 = alpha_s[hr1];
            if (__any_sync(0xffffffffu, al0 != 1.0f || al1 != 1.0f)) /* a row's max moved */
                o_rescale(O, al0, al1);
            wg_fence(O);
            wg_begin();
#pragma unroll
            for (int kk = 0; kk < KT / 16; kk++)
                wgmma_bf16_ss_n256_tb(O, wg_desc_sw128(paddr + kk * 32), vdesc(b, 1, kk), 1);
            wg_commit();
            wg_wait0();
            wg_fence(O);
            release(i);
            if (i + 1 < ntiles)
                nbar_arrive<256>(CL_P_FREE);
        }
        nbar_sync<256>(CL_O_SYNC); /* l_fin, m_fin */
        mla_cl_store_o(a, O, l_fin, m_fin, z, r, h0, 1, hr0, t, tid, Qb, CL_O_STAGED);
    }
    /* no CTA leaves while its peer may still store into it or arrive on its barriers */
    cooperative_groups::this_cluster().sync();
}

/* The splits of (row r, head h) into out: O = sum_z O_z exp(m_z - M) / sum_z l_z exp(m_z - M)
 * over the splits that saw a key, in ascending z. The splits' (m, l) are read once into shared
 * memory; each thread then owns 4 adjacent latent dims and issues its splits' loads 16 at a time,
 * none waiting on another (one thread per dim walking the splits with a load of (m, l) before
 * each load of O took 58 us at one row and 32 splits: two dependent loads a split). The sums run
 * in the same order with the same operations as before, so the bits are the same. Launched under
 * the MLA kernel (cu_launch_dep). */
#define MLA_MAX_SPLITS 256
static __global__ void __launch_bounds__(128)
    mla_combine_kernel(const struct mla_fast_args a, int rows, int H, int splits)
{
    __shared__ float s_w[MLA_MAX_SPLITS], s_l[MLA_MAX_SPLITS];
    const int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    pdl_begin();
    if (a.row_mha && a.row_mha[r])
        return;
    const float2 *ml = a.part_ml + (size_t)r * H + h; /* split z at ml[z * rows * H] */
    const size_t zs = (size_t)rows * H;
    float mz = -INFINITY;
    for (int z = tid; z < splits; z += blockDim.x) {
        const float2 v = ml[z * zs];
        s_w[z] = v.x; /* the split's max, for now */
        s_l[z] = v.y;
        mz = fmaxf(mz, v.x);
    }
    __shared__ float s_m[4];
    mz = cu_warp_max(mz);
    if ((tid & 31) == 0)
        s_m[tid >> 5] = mz;
    __syncthreads();
    const float M = fmaxf(fmaxf(s_m[0], s_m[1]), fmaxf(s_m[2], s_m[3]));
    /* each split's max into its weight by the thread that stored it (-1: a split with no key) */
    for (int z = tid; z < splits; z += blockDim.x)
        s_w[z] = s_w[z] == -INFINITY ? -1.0f : __expf(s_w[z] - M);
    __syncthreads();
    float L = 0.0f;
    for (int z = 0; z < splits; z++)
        L += s_w[z] < 0.0f ? 0.0f : s_l[z] * s_w[z];
    const float4 *po =
        reinterpret_cast<const float4 *>(a.part_o + ((size_t)r * H + h) * MLA_C) + tid;
    const size_t zo = zs * MLA_C / 4; /* float4s from one split to the next */
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int z0 = 0; z0 < splits; z0 += 16) {
        float4 v[16];
#pragma unroll
        for (int u = 0; u < 16; u++)
            v[u] = z0 + u < splits ? po[(z0 + u) * zo] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int u = 0; u < 16; u++) {
            const float w = z0 + u < splits ? s_w[z0 + u] : -1.0f;
            if (w >= 0.0f) {
                acc.x += v[u].x * w;
                acc.y += v[u].y * w;
                acc.z += v[u].z * w;
                acc.w += v[u].w * w;
            }
        }
    }
    const size_t orow = ((size_t)r * H + h) * MLA_C + 4 * tid;
    mla_out1(a, orow + 0, L > 0.0f ? acc.x / L : 0.0f);
    mla_out1(a, orow + 1, L > 0.0f ? acc.y / L : 0.0f);
    mla_out1(a, orow + 2, L > 0.0f ? acc.z / L : 0.0f);
    mla_out1(a, orow + 3, L > 0.0f ? acc.w / L : 0.0f);
}

int cu_mla_fast_ok(const struct cu_ctx *c)
{
    const struct dsv32_kv_geom *g = &c->geom;
    return c->fast && g->kv_lora == MLA_C && g->rope == MLA_R && c->cfg->num_attention_heads % MLA_HG == 0 &&
           g->mla_rec_bytes % 16 == 0 && g->mla_rec_bytes <= 784;
}

int cu_mla(struct cu_ctx *c, void *out, const void *q_lat, const float *q_pe, int ldr_pe,
           int ldh_pe, const int32_t *sel, int n_sel, const struct dsv32_kv_layer *kv,
           const struct dsv32_step_meta *m, float scale, int after_topk)
{
    const struct dsv32_kv_geom *g = &c->geom;
    const int H = c->cfg->num_attention_heads, rows = m->n_rows;
    if (rows <= 0)
        return 0;
    if (!cu_mla_fast_ok(c)) {
        if (g->kv_lora % 128 || g->kv_lora > 32 * EX_MAXC || g->rope % 32 || g->rope > 32 * EX_MAXR)
            return DSV32_ECONFIG;
        if (c->lat16)
            return DSV32_ECONFIG; /* lat16 is only set where the fast kernels run */
        mla_exact_kernel<<<dim3(H, rows), 128, 0, c->st>>>(
            (float *)out, (const float *)q_lat, q_pe, ldr_pe, ldh_pe, sel, n_sel, kv->mla,
            g->mla_rec_bytes, g->kv_lora, g->rope, g->rope_f32, m->d_blocks, m->max_blocks,
            m->d_row_pos, m->d_row_seq, c->absorbed_prefill ? NULL : m->d_row_mha, H, scale);
        CU_LAUNCHED("mla_exact");
        return 0;
    }
    const int max_keys = sel ? n_sel : m->max_ctx;
    const int tiles = (max_keys + MLA_KT - 1) / MLA_KT;
    const int ctas = rows * (H / MLA_HG);
    int splits = c->n_sm / ctas;
    if (splits < 1)
        splits = 1;
    if (splits > tiles)
        splits = tiles > 0 ? tiles : 1;
    if (splits > MLA_MAX_SPLITS)
        splits = MLA_MAX_SPLITS;
    const int tiles_per = (tiles + splits - 1) / splits;
    splits = tiles_per > 0 ? (tiles + tiles_per - 1) / tiles_per : 1;
    if (splits < 1)
        splits = 1;
    struct mla_fast_args a;
    a.out = out;
    a.part_o = NULL;
    a.part_ml = NULL;
    if (splits > 1) {
        a.part_o = (float *)cu_scratch(c, SCR_PART, sizeof(float) * (size_t)splits * rows * H * MLA_C);
        a.part_ml = (float2 *)cu_scratch(c, SCR_TMP2, sizeof(float2) * (size_t)splits * rows * H);
        if (!a.part_o || !a.part_ml)
            return -ENOMEM;
    }
    a.q_lat = q_lat;
    a.lat16 = c->lat16;
    a.q_pe = q_pe;
    a.ldr_pe = ldr_pe;
    a.ldh_pe = ldh_pe;
    a.sel = sel;
    a.n_sel = n_sel;
    a.mla = kv->mla;
    a.rec_bytes = g->mla_rec_bytes;
    a.rope_f32 = g->rope_f32;
    a.blocks = m->d_blocks;
    a.max_blocks = m->max_blocks;
    a.row_pos = m->d_row_pos;
    a.row_seq = m->d_row_seq;
    a.row_mha = c->absorbed_prefill ? NULL : m->d_row_mha; /* prefill rows too (no mla_prefill) */
    a.H = H;
    a.rows = rows;
    a.splits = splits;
    a.keys_per_split = tiles_per * MLA_KT;
    a.scale = scale;
    a.prof = c->mla_prof;
    a.q_first = 0;
    a.o_stage = c->mla_ostage;
    const size_t optin = (size_t)c->smem_optin, ws_need = ws_smem(g->mla_rec_bytes);
    const size_t cl_need = c->mla_cl == 32 ? cl_smem<32>() : cl_smem<64>();
    if (c->mla_wgmma && c->mla_cl && !g->rope_f32 && H % (2 * MLA_HG) == 0 && !a.prof && cl_need <= optin) {
        const int slack = (int)(optin - cl_need < 1023 ? optin - cl_need : 1023);
        const size_t smem = cl_need + (size_t)slack;
        auto kern = c->mla_cl == 32 ? mla_cl_kernel<32> : mla_cl_kernel<64>;
        CU_SMEM_OPTIN(kern, smem);
        /* after the top-k (cu_dsa): launched under it, Q staged while it runs */
        a.q_first = c->pdl && after_topk;
        CU_CHECK(cu_launch_pdl(c, a.q_first, kern, dim3(splits, H / MLA_HG, rows), dim3(MLA_CL_TH),
                               smem, a, slack, c->mla_cl_nocopy));
        CU_LAUNCHED("mla_cl");
    } else if (c->mla_wgmma && c->mla_ws && !g->rope_f32 && ws_need <= optin) {
        /* what the limit leaves of the 1 KB alignment slack (all of it for 656-byte records) */
        const int slack = (int)(optin - ws_need < 1023 ? optin - ws_need : 1023);
        const size_t smem = ws_need + (size_t)slack;
        const dim3 grid(splits, H / MLA_HG, rows);
        auto kern = a.prof ? (c->mla_q6 ? mla_ws_kernel<true, 6> : mla_ws_kernel<true>)
                           : (c->mla_q6 ? mla_ws_kernel<false, 6> : mla_ws_kernel<false>);
        CU_SMEM_OPTIN(kern, smem);
        kern<<<grid, MLA_WS_TH, smem, c->st>>>(a, slack);
        CU_LAUNCHED("mla_ws");
    } else if (c->mla_wgmma) {
        const size_t smem = 1024 + 2 * (size_t)WG_QB + 8192 + (size_t)MLA_KT * wg_rec_stride(g->mla_rec_bytes) +
                            sizeof(uint64_t) + sizeof(int32_t) * (MLA_KT + MLA_MAXSEL) + sizeof(float) * 8 * MLA_HG;
        auto kern = a.prof ? mla_wg_kernel<true> : mla_wg_kernel<false>;
        CU_SMEM_OPTIN(kern, smem);
        kern<<<dim3(splits, H / MLA_HG, rows), WG_TH, smem, c->st>>>(a);
        CU_LAUNCHED("mla_wg");
    } else {
        const size_t smem = sizeof(__nv_bfloat16) * 2 * MLA_HG * MLA_QSTR + sizeof(float) * MLA_HG * MLA_SSTR +
                            sizeof(int32_t) * (MLA_KT + MLA_MAXSEL) + (size_t)MLA_KT * g->mla_rec_bytes;
        CU_SMEM_OPTIN(mla_fast_kernel, smem);
        mla_fast_kernel<<<dim3(splits, H / MLA_HG, rows), MLA_TH, smem, c->st>>>(a);
        CU_LAUNCHED("mla_fast");
    }
    if (splits > 1) {
        CU_CHECK(cu_launch_dep(c, mla_combine_kernel, dim3(H, rows), dim3(MLA_C / 4), 0, a, rows, H,
                               splits));
        CU_LAUNCHED("mla_combine");
    }
    return 0;
}
