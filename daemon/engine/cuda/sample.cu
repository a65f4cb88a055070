/* Token draws on the device (see sample.cuh). One CTA of 1024 threads per row; its passes over
 * the row keep several loads in flight a thread (four logits a load where the row is 16-byte
 * aligned):
 *
 *  1. the largest logit and its first index, NaNs skipped (as the host's maximum and argmax; a NaN
 *     at index 0 makes the greedy token 0, as there): the greedy token and the maximum mx that the
 *     draw and the logprobs start from;
 *  2. a temperature > 0: sampling.c's draw_row, operation for operation. e = e^((x - mx) / T) by
 *     the same Cody-Waite reduction and polynomial in single precision without contraction
 *     (__fmul_rn, __fadd_rn), recomputed from x wherever it is needed (the fast path stores no e);
 *     the sums of each block of 1024 in four float lanes (lane l adds v = 1024 b + l, + 4, ... in
 *     order; top-k's and min-p's zeros add nothing), the lanes' sum in double, in the same pass
 *     that computes e; one thread walks the block sums and the chosen block in double.
 *     top-k and top-p work on at most SAMPLE_TOPM candidates in shared memory. The tokens are
 *     binned by z = (x - mx) / T in 1/64 nat (z_bin: monotone in the canonical order, larger logit
 *     then lower id), so the tokens of the bins <= b are always the first ones in that order. Such
 *     a prefix is gathered and sorted (bitonic); top-k's k-th key is read off it, top-p's nucleus
 *     walked over it (its mass summed in that order, in double), and a nucleus is only accepted
 *     where it ends inside the prefix: the choice of prefix decides the speed, never the token.
 *     The prefix: for top-k, the bins up to that of the k-th largest of the threads' maxima (k
 *     tokens lie there); for top-p, the bins whose tokens can matter (below them, V e^z is less
 *     than half of the mass top-p leaves out). When that prefix is too long or the nucleus runs
 *     out of it, a histogram of the row's bins gives top-k the bin of its k-th token, and top-p
 *     the longest prefix that fits and a bound on the mass of the first SAMPLE_TOPM candidates:
 *     a target above it (or above SAMPLE_TOPM, as no e exceeds 1) is a nucleus longer than the
 *     device sorts at once, which the chunked walk draws (top_p_chunked: the canonical order in
 *     chunks of <= SAMPLE_TOPM, the double sum carried across them; -1, the host's, only for
 *     NaN or infinite logits or T). What the fast path cannot settle (NaN or infinite
 *     logits or T; top-k above SAMPLE_TOPM or with its k-th token in a bin too full to gather; a
 *     nucleus ending past the longest prefix that fits) takes the exact path (draw_full): e into
 *     global scratch, top-k's k-th key and the SAMPLE_TOPM-th candidate by radix selects over
 *     the row, the candidates sorted and walked. Either way the token is the host's for the same
 *     logits and uniform, bit for bit;
 *  3. logprobs: the softmax sum in double as a tree (the host sums in order: the log-sum-exp may
 *     differ in its last float bit) and the top n by value, lower index first among equals: each
 *     thread keeps its own top n in order, then n rounds of a block-wide maximum over the
 *     threads' heads, the winner (the owner of index v is thread v % 1024) moving to its next. */
#include "sample.cuh"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "../sampling.h"

#define SAMPLE_THREADS 1024
/* the blocks of the vocabulary the draw sums (one staged in acc4: <= SAMPLE_THREADS) */
#define SAMPLE_BLK 1024
/* top-k and top-p: the candidates sorted at once in shared memory (a longer nucleus: the chunked
 * walk, this many at a time) */
#define SAMPLE_TOPM 2048
/* the bins of z = (x - mx) / T <= 0: bin trunc(-z * SAMPLE_BIN_SCALE), the last one (z at or
 * below -(SAMPLE_BINS - 1) / SAMPLE_BIN_SCALE, ~-32) taking everything further down */
#define SAMPLE_BINS 2048
#define SAMPLE_BIN_SCALE 64.0f
/* the fast path's answer for a row that the exact path must draw */
#define SAMPLE_EXACT (-2)

static_assert(SAMPLE_BLK <= SAMPLE_THREADS, "a block of the vocabulary staged one value a thread");
static_assert(SAMPLE_THREADS == 1024 && SAMPLE_BINS == 2 * SAMPLE_THREADS &&
                  SAMPLE_TOPM == 2 * SAMPLE_THREADS,
              "32 warps; two bins and two candidates a thread");

/* The kernel reads the host's struct dsv32_draw array as uploaded: the same layout in C (the
 * engine) and here (sampling.c asserts the same numbers) */
static_assert(sizeof(struct dsv32_draw) == 32 && offsetof(struct dsv32_draw, temperature) == 0 &&
                  offsetof(struct dsv32_draw, u) == 8 && offsetof(struct dsv32_draw, top_k) == 16 &&
                  offsetof(struct dsv32_draw, top_p) == 20 &&
                  offsetof(struct dsv32_draw, min_p) == 24 &&
                  offsetof(struct dsv32_draw, n_logprobs) == 28,
              "struct dsv32_draw as sampling.c lays it out");

struct cu_drawn {
    int32_t token;
    float lse;     /* the log-sum-exp of the row (logprobs asked) */
    float tok_val; /* the token's logit */
    int32_t top_tok[DSV32_MAX_LOGPROBS];
    float top_val[DSV32_MAX_LOGPROBS];
};

/* the kernel's static shared memory (~40 KB; the block sums are dynamic) */
struct sample_smem {
    uint64_t keys[SAMPLE_TOPM]; /* candidates' rank keys */
    union {
        float es[SAMPLE_TOPM]; /* their e, in the same order (top-p) */
        int rh[SAMPLE_TOPM];   /* the chunked walk's histogram of a key range (before es) */
    };
    double ck[SAMPLE_TOPM / 8]; /* the top-p walk's sum before every eighth candidate */
    int hist[SAMPLE_BINS];      /* radix digits (draw_full) or z-bins */
    float acc4[SAMPLE_THREADS]; /* lane sums; the walk's block */
    float sv[32];
    int si[32], sw[32];
    double sd[32];
    uint64_t su[2][32];
    double total, walk_u, walk_cum;
    uint64_t klo, khi; /* the chunked walk's key range */
    int walk_b, cnt, tok, sel, sh2[2], step;
};

/* A chunk of the chunked top-p walk (top_p_chunked), in global scratch: its candidates are those
 * of the z-bins [blo, bhi] when blo >= 0, else those with rank keys in [klo, khi]; c0 and c1 the
 * walk's sum before and after it (c1: where the walk stopped, inside its last chunk) */
struct sample_chunk {
    double c0, c1;
    uint64_t klo, khi;
    int blo, bhi;
};

/* exp_le0_v4 of sampling.c on one lane: e^x for x <= 0, x below -87 taken as -87 */
static __device__ __forceinline__ float exp_le0(float x)
{
    x = x < -87.0f ? -87.0f : x;
    const float n = __fsub_rn(__fadd_rn(__fmul_rn(x, 1.44269504089f), 12582912.0f), 12582912.0f);
    const float r =
        __fadd_rn(__fsub_rn(x, __fmul_rn(n, 0.693359375f)), __fmul_rn(n, 2.12194440e-4f));
    float q = __fadd_rn(__fmul_rn(r, 1.9875691500e-4f), 1.3981999507e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 8.3334519073e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 4.1665795894e-2f);
    q = __fadd_rn(__fmul_rn(q, r), 1.6666665459e-1f);
    q = __fadd_rn(__fmul_rn(q, r), 5.0000001201e-1f);
    const float er = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(q, r), r), r), 1.0f);
    const int ni = __float2int_rz(n);
    return __fmul_rn(er, __int_as_float((ni + 127) << 23));
}

/* z = (x - mx) / T as draw_row computes it (times 1 / T) */
static __device__ __forceinline__ float z_of(float x, float mx, float inv_t)
{
    return __fmul_rn(__fsub_rn(x, mx), inv_t);
}

/* e of a token from its z, with min-p (sampling.c: e < min_p gets 0) */
static __device__ __forceinline__ float e_minp(float z, float min_p)
{
    const float e = exp_le0(z);
    return min_p > 0.0f && e < min_p ? 0.0f : e;
}

/* The bin of z <= 0: trunc(-z * SAMPLE_BIN_SCALE), at most SAMPLE_BINS - 1. -z * 64 is exact, so
 * a token of bin b has z <= -b / 64, hence e <= e^(-b / 64) (1 + 1e-7: exp_le0's error, checked
 * on the host for every float z in [-90, 0], is within 8.3e-8; below -87 it is e^-87's). Every
 * step (the subtraction, the product by 1 / T > 0, the scaling, the minimum, the truncation) is
 * monotone, so for a finite mx and 1 / T and logits without NaN, a larger rank key never has a
 * larger bin: the tokens of the bins <= b are the first of the row in the canonical order. */
static __device__ __forceinline__ int z_bin(float z)
{
    return (int)fminf(__fmul_rn(z, -SAMPLE_BIN_SCALE), (float)(SAMPLE_BINS - 1));
}

/* (value, index): the larger value, the lower index among equals */
static __device__ __forceinline__ bool vi_better(float v, int i, float bv, int bi)
{
    return v > bv || (v == bv && i < bi);
}

/* the warp's best (value, index); all lanes get it */
static __device__ __forceinline__ void warp_best(float &v, int &i)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (vi_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

/* block-wide best (value, index) of every thread's pair; all threads get it */
static __device__ void block_best(float &v, int &i, float *sv, int *si)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_best(v, i);
    __syncthreads(); /* the previous round's readers are done */
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    v = sv[lane];
    i = si[lane];
    warp_best(v, i);
}

/* block-wide sum of every thread's double (a butterfly tree: every lane adds the same pairs, so
 * all threads get the same bits) */
static __device__ double block_sum(double s, double *sd)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    __syncthreads();
    if (lane == 0)
        sd[warp] = s;
    __syncthreads();
    s = sd[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

/* sampling.c's rank_key: the larger logit first, then the lower token id */
static __device__ __forceinline__ uint64_t rank_key(float w, int32_t v)
{
    uint32_t u = __float_as_uint(w);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint32_t) ~(uint32_t)v;
}

static __device__ __forceinline__ int32_t key_token(uint64_t k)
{
    return (int32_t) ~(uint32_t)k;
}

/* the logit a rank key was made from, bit for bit */
static __device__ __forceinline__ float key_logit(uint64_t k)
{
    const uint32_t u = (uint32_t)(k >> 32);
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

/* f(x[v], v, ok) for every token v of the row: four a thread a load (float4, U loads in flight
 * before any f), one at a time where the row is not 16-byte aligned. Every thread makes the same
 * number of calls (ok false past the row), so f may vote across its warp. */
template <int U, class F>
static __device__ __forceinline__ void row_pass(const float *x, int V, F &&f)
{
    const int tid = threadIdx.x;
    if ((V & 3) == 0 && ((uintptr_t)x & 15) == 0) {
        const float4 *x4 = (const float4 *)x;
        const int n4 = V >> 2;
        for (int i0 = 0; i0 < n4; i0 += U * SAMPLE_THREADS) {
            float4 t[U];
#pragma unroll
            for (int k = 0; k < U; k++) {
                const int i = i0 + k * SAMPLE_THREADS + tid;
                t[k] = i < n4 ? x4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int k = 0; k < U; k++) {
                const int i = i0 + k * SAMPLE_THREADS + tid;
                const bool ok = i < n4;
                f(t[k].x, 4 * i, ok);
                f(t[k].y, 4 * i + 1, ok);
                f(t[k].z, 4 * i + 2, ok);
                f(t[k].w, 4 * i + 3, ok);
            }
        }
    } else {
        for (int v0 = 0; v0 < V; v0 += 4 * U * SAMPLE_THREADS) {
            float t[4 * U];
#pragma unroll
            for (int k = 0; k < 4 * U; k++) {
                const int v = v0 + k * SAMPLE_THREADS + tid;
                t[k] = v < V ? x[v] : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < 4 * U; k++) {
                const int v = v0 + k * SAMPLE_THREADS + tid;
                f(t[k], v, v < V);
            }
        }
    }
}

/* adds one to bin `bin` of hist where `in`: lanes of the warp with the same bin add once (a flat
 * row crowds its tokens into few bins, and per-lane atomics on one address would serialize) */
static __device__ __forceinline__ void hist_add(int *hist, bool in, int bin)
{
    const unsigned peers = __match_any_sync(0xffffffffu, in ? bin : -1);
    if (in && (int)(threadIdx.x & 31) == __ffs(peers) - 1)
        atomicAdd(&hist[bin], __popc(peers));
}

/* c0, c1: the counts of the bins <= 2 tid and <= 2 tid + 1 of hist (a block scan; all threads) */
static __device__ void hist_scan(const int *hist, int *sw, int &c0, int &c1)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h0 = hist[2 * threadIdx.x], h1 = hist[2 * threadIdx.x + 1];
    int s = h0 + h1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, s, o);
        s += lane >= o ? t : 0;
    }
    __syncthreads(); /* sw's previous readers are done */
    if (lane == 31)
        sw[warp] = s;
    __syncthreads();
    int w = sw[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, w, o);
        w += lane >= o ? t : 0;
    }
    const int before = __shfl_sync(0xffffffffu, w, (warp + 31) & 31);
    c1 = (warp ? before : 0) + s;
    c0 = c1 - h1;
}

/* The histogram of the row's z-bins (the last bin, the far tail, is not counted: its count is V
 * less the others'), scanned: c0, c1 as hist_scan's, the last bin's count V. */
static __device__ void row_hist(const float *x, int V, float mx, float inv_t,
                                struct sample_smem &sm, int &c0, int &c1)
{
    for (int i = threadIdx.x; i < SAMPLE_BINS; i += SAMPLE_THREADS)
        sm.hist[i] = 0;
    __syncthreads();
    row_pass<4>(x, V, [&](float xv, int v, bool ok) {
        const int b = z_bin(z_of(xv, mx, inv_t));
        hist_add(sm.hist, ok && b < SAMPLE_BINS - 1, b);
    });
    __syncthreads();
    hist_scan(sm.hist, sm.sw, c0, c1);
    if (threadIdx.x == SAMPLE_THREADS - 1)
        c1 = V;
}

/* Appends the rank keys of the row's tokens v with pred(x[v], v) to sm.keys, in no order, placed by
 * a warp ballot with one atomic a warp. Returns their count to all threads; past SAMPLE_TOPM they
 * are counted, not stored. With bins monotone in the canonical order, they are the first of the
 * row's tokens (of its tokens with e > 0) in that order. */
template <class P>
static __device__ int gather_if(const float *x, int V, P &&pred, struct sample_smem &sm)
{
    const int lane = threadIdx.x & 31;
    if (threadIdx.x == 0)
        sm.cnt = 0;
    __syncthreads();
    row_pass<4>(x, V, [&](float xv, int v, bool ok) {
        const bool in = ok && pred(xv, v);
        const unsigned bal = __ballot_sync(0xffffffffu, in);
        if (bal) {
            int base = 0;
            if (lane == 0)
                base = atomicAdd(&sm.cnt, __popc(bal));
            base = __shfl_sync(0xffffffffu, base, 0);
            const int pos = base + __popc(bal & ((1u << lane) - 1u));
            if (in && pos < SAMPLE_TOPM)
                sm.keys[pos] = rank_key(xv, v);
        }
    });
    __syncthreads();
    const int n = sm.cnt;
    __syncthreads(); /* sm.cnt is set again by the next gather */
    return n;
}

/* gather_if of the tokens of bin <= bmax (and, when filt, e > 0 with min-p) */
static __device__ int gather(const float *x, int V, float mx, float inv_t, float min_p, int bmax,
                             bool filt, struct sample_smem &sm)
{
    return gather_if(
        x, V,
        [&](float xv, int) {
            const float z = z_of(xv, mx, inv_t);
            return z_bin(z) <= bmax && (!filt || e_minp(z, min_p) > 0.0f);
        },
        sm);
}

/* keys[0..P) in descending order (bitonic; P a power of two <= SAMPLE_TOPM) */
static __device__ void sort_desc(uint64_t *keys, int P)
{
    for (int k = 2; k <= P; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += SAMPLE_THREADS) {
                const int ixj = i ^ j;
                if (ixj > i) {
                    const uint64_t a = keys[i], b = keys[ixj];
                    if ((i & k) == 0 ? a < b : a > b) {
                        keys[i] = b;
                        keys[ixj] = a;
                    }
                }
            }
            __syncthreads();
        }
}

/* the first n of sm.keys sorted in descending order (the rest up to a power of two set to 0,
 * below every token's key: a key's top word is 0 only for a NaN) */
static __device__ void sort_first(int n, struct sample_smem &sm)
{
    int P = 2;
    while (P < n)
        P <<= 1;
    for (int i = n + threadIdx.x; i < P; i += SAMPLE_THREADS)
        sm.keys[i] = 0;
    __syncthreads();
    sort_desc(sm.keys, P);
}

/* e of token v (logit xv), from x: with top-k (KEYED), 0 below the k-th rank key kth */
/* sampling.c's block sum from its four float lanes: (double)acc[0] + acc[1] + acc[2] + acc[3] */
static __device__ __forceinline__ double lanes_sum(const float *acc4)
{
    double s = __dadd_rn((double)acc4[0], (double)acc4[1]);
    s = __dadd_rn(s, (double)acc4[2]);
    return __dadd_rn(s, (double)acc4[3]);
}

/* sampling.c's total: the block sums added in order, in double (one thread) */
static __device__ double blocks_total(const double *bsum, int nb)
{
    double total = 0.0;
    for (int b = 0; b < nb; b++)
        total = __dadd_rn(total, bsum[b]);
    return total;
}

template <bool KEYED>
static __device__ __forceinline__ float e_tok(float xv, int v, float mx, float inv_t, float min_p,
                                              uint64_t kth)
{
    if (KEYED && rank_key(xv, v) < kth)
        return 0.0f;
    return e_minp(z_of(xv, mx, inv_t), min_p);
}

/* The row's block sums as sampling.c adds them, into bsum (V / SAMPLE_BLK rounded up), e computed
 * here: thread 4 b' + l adds lane l of block b = b0 + b' (v = 1024 b + l, + 4, ... in order), U
 * loads in flight, then their sums in order; e = 0 adds nothing to the non-negative sum. Returns
 * the total (the block sums in order, in double) to all threads. */
template <bool KEYED, int U>
static __device__ double block_sums(const float *x, int V, float mx, float inv_t, float min_p,
                                    uint64_t kth, double *bsum, struct sample_smem &sm)
{
    const int tid = threadIdx.x, nb = (V + SAMPLE_BLK - 1) / SAMPLE_BLK;
    for (int b0 = 0; b0 < nb; b0 += SAMPLE_THREADS / 4) {
        const int b = b0 + (tid >> 2), l = tid & 3;
        float a = 0.0f;
        if (b < nb) {
            const int v1 = (b + 1) * SAMPLE_BLK < V ? (b + 1) * SAMPLE_BLK : V;
            for (int v = b * SAMPLE_BLK + l; v < v1; v += 4 * U) {
                float t[U];
#pragma unroll
                for (int k = 0; k < U; k++)
                    t[k] = v + 4 * k < v1 ? x[v + 4 * k] : 0.0f;
#pragma unroll
                for (int k = 0; k < U; k++)
                    if (v + 4 * k < v1)
                        a = __fadd_rn(a, e_tok<KEYED>(t[k], v + 4 * k, mx, inv_t, min_p, kth));
            }
        }
        sm.acc4[tid] = a;
        __syncthreads();
        if (l == 0 && b < nb)
            bsum[b] = lanes_sum(&sm.acc4[tid]);
        __syncthreads();
    }
    if (tid == 0)
        sm.total = blocks_total(bsum, nb);
    __syncthreads();
    return sm.total;
}

/* The host's walk without top-p: u * total over the block sums, then inside the block that holds
 * it (its e, e_of(v), staged in shared memory by all threads), in double by one thread, eight
 * values loaded ahead. All threads return the token. */
template <typename E>
static __device__ int32_t walk_staged(int V, double du, double total, const double *bsum,
                                      struct sample_smem &sm, E e_of)
{
    const int tid = threadIdx.x, nb = (V + SAMPLE_BLK - 1) / SAMPLE_BLK;
    if (tid == 0) {
        const double u = __dmul_rn(du, total);
        double cum = 0.0;
        int b = 0;
        while (b < nb - 1 && __dadd_rn(cum, bsum[b]) <= u)
            cum = __dadd_rn(cum, bsum[b++]);
        sm.walk_u = u;
        sm.walk_cum = cum;
        sm.walk_b = b;
    }
    __syncthreads();
    const int v0 = sm.walk_b * SAMPLE_BLK, v1 = v0 + SAMPLE_BLK < V ? v0 + SAMPLE_BLK : V;
    if (v0 + tid < v1)
        sm.acc4[tid] = e_of(v0 + tid);
    __syncthreads();
    if (tid == 0) {
        const double u = sm.walk_u;
        double cum = sm.walk_cum;
        int tok = -1, v = v0;
        for (; v + 8 <= v1 && tok < 0; v += 8) {
            float t[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                t[k] = sm.acc4[v - v0 + k];
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (tok < 0) {
                    cum = __dadd_rn(cum, (double)t[k]);
                    if (u < cum)
                        tok = v + k;
                }
        }
        for (; v < v1 && tok < 0; v++) {
            cum = __dadd_rn(cum, (double)sm.acc4[v - v0]);
            if (u < cum)
                tok = v;
        }
        for (v = v1 - 1; v >= v0 && tok < 0; v--) /* past the block's float rounding */
            if (sm.acc4[v - v0] > 0.0f)
                tok = v;
        sm.tok = tok < 0 ? v1 - 1 : tok;
    }
    __syncthreads();
    return sm.tok;
}

/* walk_staged with each e computed from its logit */
template <bool KEYED>
static __device__ int32_t walk_blocks(const float *x, int V, float mx, float inv_t, float min_p,
                                      uint64_t kth, double du, double total, const double *bsum,
                                      struct sample_smem &sm)
{
    return walk_staged(V, du, total, bsum, sm,
                       [&](int v) { return e_tok<KEYED>(x[v], v, mx, inv_t, min_p, kth); });
}

/* The host's top-p walk over candidates sm.keys[0..n) in the canonical order, their e in sm.es:
 * the shortest prefix whose mass, summed in that order in double, reaches target, then the walk
 * over it at du times that mass; by one thread, all threads return the token. If their mass stays
 * below target: the walk over all of them when they are all the row's candidates (all), else
 * SAMPLE_EXACT (the nucleus goes on past them). */
static __device__ int32_t walk_nucleus(int n, bool all, double target, double du,
                                       struct sample_smem &sm)
{
    if (threadIdx.x == 0) {
        /* while (m < n && c < target) c += es[m++], eight loads ahead; ck[j]: c before es[8 j] */
        double c = 0.0;
        int m = 0;
        for (int i0 = 0; m == i0 && i0 < n; i0 += 8) {
            sm.ck[i0 >> 3] = c;
            float t[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                t[k] = sm.es[i0 + k]; /* i0 + 7 < SAMPLE_TOPM; those past n unused */
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (m == i0 + k && m < n && c < target) {
                    c = __dadd_rn(c, (double)t[k]);
                    m++;
                }
        }
        int32_t tok;
        if (c < target && !all) {
            tok = SAMPLE_EXACT;
        } else {
            /* the first i < m with u < es[0] + ... + es[i] (those sums never decrease): it is not
             * before the last eighth whose sum before it is <= u, and within eight of it */
            const double u = __dmul_rn(du, c);
            int lo = 0, hi = (m + 7) / 8 - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (sm.ck[mid] <= u)
                    lo = mid;
                else
                    hi = mid - 1;
            }
            tok = key_token(sm.keys[m > 0 ? m - 1 : 0]);
            double acc = m > 0 ? sm.ck[lo] : 0.0;
            for (int i = 8 * lo; i < m; i++) {
                acc = __dadd_rn(acc, (double)sm.es[i]);
                if (u < acc) {
                    tok = key_token(sm.keys[i]);
                    break;
                }
            }
        }
        sm.tok = tok;
    }
    __syncthreads();
    return sm.tok;
}

/* sm.keys[0..n) (n <= SAMPLE_TOPM, the first candidates in no order) sorted, their e, the walk */
static __device__ int32_t nucleus_of(int n, bool all, float mx, float inv_t, float min_p,
                                     double target, double du, struct sample_smem &sm)
{
    sort_first(n, sm);
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS)
        sm.es[i] = e_minp(z_of(key_logit(sm.keys[i]), mx, inv_t), min_p);
    __syncthreads();
    return walk_nucleus(n, all, target, du, sm);
}

/* block-wide minimum and maximum of every thread's pair of keys; all threads get them */
static __device__ void block_minmax(uint64_t &lo, uint64_t &hi, struct sample_smem &sm)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t ol = __shfl_xor_sync(0xffffffffu, lo, o),
                       oh = __shfl_xor_sync(0xffffffffu, hi, o);
        lo = ol < lo ? ol : lo;
        hi = oh > hi ? oh : hi;
    }
    __syncthreads(); /* su's previous readers are done */
    if (lane == 0) {
        sm.su[0][warp] = lo;
        sm.su[1][warp] = hi;
    }
    __syncthreads();
    lo = sm.su[0][lane];
    hi = sm.su[1][lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const uint64_t ol = __shfl_xor_sync(0xffffffffu, lo, o),
                       oh = __shfl_xor_sync(0xffffffffu, hi, o);
        lo = ol < lo ? ol : lo;
        hi = oh > hi ? oh : hi;
    }
}

/* A chunk's candidates (those of rec.blo..rec.bhi, or rank keys in rec.klo..rec.khi; e > 0 and,
 * with kth, rank key >= kth) gathered into sm.keys, sorted, their e in sm.es; their count to all
 * threads (<= SAMPLE_TOPM: the bins' or the key range's count said so) or -1 past it. */
static __device__ int chunk_load(const float *x, int V, float mx, float inv_t, float min_p,
                                 uint64_t kth, const struct sample_chunk &rec,
                                 struct sample_smem &sm)
{
    const int n = gather_if(
        x, V,
        [&](float xv, int v) {
            const float z = z_of(xv, mx, inv_t);
            const uint64_t key = rank_key(xv, v);
            if (rec.blo >= 0) {
                const int b = z_bin(z);
                if (b < rec.blo || b > rec.bhi)
                    return false;
            } else if (key < rec.klo || key > rec.khi) {
                return false;
            }
            return key >= kth && e_minp(z, min_p) > 0.0f;
        },
        sm);
    if (n > SAMPLE_TOPM)
        return -1;
    sort_first(n, sm);
    for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS)
        sm.es[i] = e_minp(z_of(key_logit(sm.keys[i]), mx, inv_t), min_p);
    __syncthreads();
    return n;
}

/* The host's top-p walk over any number of candidates (e > 0 and, with kth, rank key >= kth),
 * sm.hist holding the row's z-bins (row_hist; its last bin is counted here). The canonical order
 * is cut into chunks of at most SAMPLE_TOPM candidates, each gathered, sorted and walked in turn
 * by one thread that carries the double sum c from chunk to chunk: the same additions in the same
 * order as the host's, so the same c, stopping where the host's first walk stops (c >= target, or
 * the candidates exhausted). The chunks: runs of whole bins that fit; a bin that does not fit is
 * cut by rank key, in ranges (a pass for their minimum and maximum, then histograms of 2048 equal
 * parts of a range, narrowed to its top part while that alone holds more than SAMPLE_TOPM: ties
 * are cut by token id, the low bits of the key). Each chunk's sums before and after it are kept
 * in rec (cap of them); the host's second walk repeats the first's additions, so its sum first
 * exceeds u = du c in the first chunk whose sum after it exceeds u, which is gathered again and
 * walked from its sum before it. Returns the token to all threads, -1 past cap chunks (not seen:
 * two chunks in a row hold more than SAMPLE_TOPM candidates, or one bin, and rec has room for
 * V / 10). */
static __device__ int32_t top_p_chunked(const float *x, int V, float mx, float inv_t, float min_p,
                                        uint64_t kth, double target, double du,
                                        struct sample_chunk *rec, int cap, struct sample_smem &sm)
{
    const int tid = threadIdx.x;
    __syncthreads(); /* the callers' readers of sm.tok and sm.sel are done */
    if (tid == 0) {  /* the last bin's count: the rest of the row */
        int rest = V;
        for (int b = 0; b < SAMPLE_BINS - 1; b++)
            rest -= sm.hist[b];
        sm.hist[SAMPLE_BINS - 1] = rest;
        sm.walk_cum = 0.0;
        sm.tok = -1;
        sm.step = 0;
    }
    __syncthreads();
    const uint64_t all = ~(uint64_t)0; /* above every key: a bin not yet cut */
    int b = 0, nrec = 0;
    uint64_t khi = all; /* bin b's candidates left: those with keys below khi */
    while (b < SAMPLE_BINS) {
        struct sample_chunk r;
        r.blo = -1;
        if (khi == all) { /* the bins from b that fit */
            if (tid == 0) {
                int cum = 0, b2 = b;
                while (b2 < SAMPLE_BINS && cum + sm.hist[b2] <= SAMPLE_TOPM)
                    cum += sm.hist[b2++];
                sm.sel = b2;
            }
            __syncthreads();
            const int b2 = sm.sel;
            __syncthreads(); /* sm.sel is set again below */
            if (b2 > b) {
                r.blo = b;
                r.bhi = b2 - 1;
                b = b2;
            }
        }
        if (r.blo < 0) { /* bin b's candidates below khi: more than SAMPLE_TOPM of them, or cut */
            uint64_t lo = all, hi = 0;
            double cnt = 0.0;
            row_pass<4>(x, V, [&](float xv, int v, bool ok) {
                if (!ok)
                    return;
                const float z = z_of(xv, mx, inv_t);
                const uint64_t key = rank_key(xv, v);
                if (z_bin(z) == b && key < khi && key >= kth && e_minp(z, min_p) > 0.0f) {
                    lo = key < lo ? key : lo;
                    hi = key > hi ? key : hi;
                    cnt += 1.0;
                }
            });
            const int n = (int)block_sum(cnt, sm.sd);
            block_minmax(lo, hi, sm);
            if (n == 0) {
                b++;
                khi = all;
                continue;
            }
            if (n <= SAMPLE_TOPM) { /* the rest of the bin */
                r.klo = lo;
                r.khi = hi;
                b++;
                khi = all;
            } else {
                /* cut [lo, hi] in parts of 2^s keys, from the top, narrowed to its top part while
                 * that alone holds more than SAMPLE_TOPM (its count never drops below that, so
                 * each round ends with a chunk or a range 2048 times shorter) */
                for (;;) {
                    int s = 0;
                    while (((hi - lo) >> s) >= (uint64_t)SAMPLE_TOPM)
                        s++;
                    for (int i = tid; i < SAMPLE_TOPM; i += SAMPLE_THREADS)
                        sm.rh[i] = 0;
                    __syncthreads();
                    row_pass<4>(x, V, [&](float xv, int v, bool ok) {
                        const uint64_t key = rank_key(xv, v);
                        const bool in = ok && key >= lo && key <= hi && key >= kth &&
                                        e_minp(z_of(xv, mx, inv_t), min_p) > 0.0f;
                        hist_add(sm.rh, in, in ? (int)((key - lo) >> s) : 0);
                    });
                    __syncthreads();
                    if (tid == 0) {
                        const int top = (int)((hi - lo) >> s);
                        int j = top, cum = 0;
                        while (j >= 0 && cum + sm.rh[j] <= SAMPLE_TOPM)
                            cum += sm.rh[j--];
                        /* j >= 0: the range holds more than SAMPLE_TOPM */
                        if (cum == 0) { /* part j alone holds more: the range narrowed to it */
                            sm.klo = lo + ((uint64_t)j << s);
                            sm.khi = j == top ? hi : lo + ((uint64_t)(j + 1) << s) - 1;
                            sm.sel = 1;
                        } else { /* parts j + 1 .. top: a chunk */
                            sm.klo = lo + ((uint64_t)(j + 1) << s);
                            sm.khi = hi;
                            sm.sel = 0;
                        }
                    }
                    __syncthreads();
                    const bool narrowed = sm.sel == 1;
                    lo = sm.klo;
                    hi = sm.khi;
                    __syncthreads(); /* sm.sel, sm.klo, sm.khi are set again */
                    if (!narrowed)
                        break;
                }
                r.klo = lo;
                r.khi = hi;
                khi = lo; /* bin b goes on below the chunk */
            }
        }
        if (nrec >= cap)
            return -1;
        const int n = chunk_load(x, V, mx, inv_t, min_p, kth, r, sm);
        if (n < 0)
            return -1;  /* not reached: the chunk's count said so */
        if (tid == 0) { /* the first walk: while (c < target) c += e, eight loads ahead */
            double c = sm.walk_cum;
            r.c0 = c;
            int m = 0;
            for (int i0 = 0; m == i0 && i0 < n; i0 += 8) {
                float t[8];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    t[k] = sm.es[i0 + k]; /* i0 + 7 < SAMPLE_TOPM; those past n unused */
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (m == i0 + k && m < n && c < target) {
                        c = __dadd_rn(c, (double)t[k]);
                        m++;
                    }
            }
            if (m > 0)
                sm.tok = key_token(sm.keys[m - 1]); /* the last candidate walked */
            r.c1 = c;
            rec[nrec] = r;
            sm.walk_cum = c;
            sm.step = c < target ? 0 : 1;
        }
        nrec++;
        __syncthreads();
        const bool reached = sm.step != 0;
        __syncthreads();
        if (reached)
            break;
    }
    /* the second walk: u = du c, the first chunk whose sum after it exceeds u, walked again */
    if (tid == 0) {
        const double u = __dmul_rn(du, sm.walk_cum);
        int i = 0;
        while (i < nrec && !(u < rec[i].c1))
            i++;
        sm.walk_u = u;
        sm.sel = i;
    }
    __syncthreads();
    const int ri = sm.sel;
    if (ri < nrec) { /* else u is past every sum: the last candidate walked, as the host's */
        const struct sample_chunk r = rec[ri];
        const int n = chunk_load(x, V, mx, inv_t, min_p, kth, r, sm);
        if (tid == 0 && n > 0) {
            const double u = sm.walk_u;
            double acc = r.c0;
            for (int i = 0; i < n; i++) {
                acc = __dadd_rn(acc, (double)sm.es[i]);
                if (u < acc) {
                    sm.tok = key_token(sm.keys[i]);
                    break;
                }
            }
        }
    }
    __syncthreads();
    return sm.tok;
}

/* Top-p over the whole row (min-p perhaps), the total known: the token or SAMPLE_EXACT. */
static __device__ int32_t top_p_row(const float *x, int V, const struct dsv32_draw &d, float mx,
                                    float inv_t, double total, struct sample_chunk *rec, int cap,
                                    struct sample_smem &sm)
{
    const double target = __dmul_rn((double)d.top_p, total);
    int c0, c1;
    /* Every e is <= 1 (z <= 0; exp_le0(0) = 1 and it never exceeds 1, checked on the host for
     * every float z <= 0), so the first SAMPLE_TOPM candidates carry at most SAMPLE_TOPM (their
     * sum in double rounds by less than 1e-12), and a target above 1.001 SAMPLE_TOPM needs more
     * candidates than that: the chunked walk at once (a flat row). */
    if (target > 1.001 * SAMPLE_TOPM) {
        row_hist(x, V, mx, inv_t, sm, c0, c1);
        return top_p_chunked(x, V, mx, inv_t, d.min_p, 0, target, d.u, rec, cap, sm);
    }
    /* The tokens of bins >= bw (z <= -bw / 64) carry at most V e^(-bw / 64) (1 + 1e-7): for bw
     * as below, half of what top-p leaves out. So the nucleus lies in bins < bw unless rounding
     * says otherwise, which the walk checks (this bound only picks the prefix). */
    if (threadIdx.x == 0) {
        const double rest = total - target;
        const double w = rest > 0.0 ? SAMPLE_BIN_SCALE * log(2.0 * V / rest) + 1.0 : 1e30;
        sm.sel = w < SAMPLE_BINS - 1 ? (w > 1.0 ? (int)w : 1) : SAMPLE_BINS - 1;
    }
    __syncthreads();
    const int bw = sm.sel;
    int n = gather(x, V, mx, inv_t, d.min_p, bw - 1, true, sm);
    if (n <= SAMPLE_TOPM) {
        const int32_t tok = nucleus_of(n, false, mx, inv_t, d.min_p, target, d.u, sm);
        if (tok != SAMPLE_EXACT)
            return tok;
    }
    /* the row's histogram: the longest prefix of whole bins that fits, and a bound on the mass
     * of the first SAMPLE_TOPM candidates */
    row_hist(x, V, mx, inv_t, sm, c0, c1);
    const int b0 = 2 * threadIdx.x, h0 = sm.hist[b0], ce0 = c0 - h0, h1 = c1 - c0;
    /* the first SAMPLE_TOPM tokens in the canonical order, by bin: the i-th candidate's key is
     * at most the i-th token's, its bin at least that token's, its e at most e^(-bin / 64) */
    double ub = 0.0;
    if (ce0 < SAMPLE_TOPM)
        ub += min(h0, SAMPLE_TOPM - ce0) * exp(-(double)b0 / SAMPLE_BIN_SCALE);
    if (c0 < SAMPLE_TOPM)
        ub += min(h1, SAMPLE_TOPM - c0) * exp(-(double)(b0 + 1) / SAMPLE_BIN_SCALE);
    ub = block_sum(ub, sm.sd);
    /* ub 1.001 < target: were there at most SAMPLE_TOPM candidates, their exact sum S would be
     * <= ub, and target <= total <= S (1 + 2e-5) (the total: S in float lanes of <= 256 terms,
     * 255 roundings of 2^-24 each): a contradiction. So the nucleus holds more than SAMPLE_TOPM
     * candidates: the chunked walk. So does a first bin of more than SAMPLE_TOPM tokens. */
    const int bcap =
        __syncthreads_count(c0 <= SAMPLE_TOPM) + __syncthreads_count(c1 <= SAMPLE_TOPM) - 1;
    if (ub * 1.001 < target || bcap < 0)
        return top_p_chunked(x, V, mx, inv_t, d.min_p, 0, target, d.u, rec, cap, sm);
    n = gather(x, V, mx, inv_t, d.min_p, bcap, true, sm);
    if (n > SAMPLE_TOPM)
        return SAMPLE_EXACT; /* not reached: the same bins as the histogram's */
    const int32_t tok = nucleus_of(n, bcap == SAMPLE_BINS - 1, mx, inv_t, d.min_p, target, d.u, sm);
    if (tok != SAMPLE_EXACT)
        return tok;
    /* the nucleus goes on past the longest prefix that fits (sm.hist is still the row's) */
    return top_p_chunked(x, V, mx, inv_t, d.min_p, 0, target, d.u, rec, cap, sm);
}

/* Top-k (k <= SAMPLE_TOPM): the k-th largest rank key of the row, or 0 for SAMPLE_EXACT; sm.keys
 * then holds the row's first k tokens in the canonical order. tmv, tmi: this thread's largest
 * logit and its index from pass 1 (tmi INT_MAX: none). */
static __device__ uint64_t top_k_key(const float *x, int V, int k, float mx, float inv_t, float tmv,
                                     int tmi, struct sample_smem &sm)
{
    int bk = SAMPLE_BINS, n = SAMPLE_TOPM + 1, c0, c1;
    if (k <= SAMPLE_THREADS) {
        /* the bin of the k-th largest of the threads' maxima: k tokens have a bin <= it, so the
         * row's first k tokens all do */
        for (int i = threadIdx.x; i < SAMPLE_BINS; i += SAMPLE_THREADS)
            sm.hist[i] = 0;
        __syncthreads();
        const int b = z_bin(z_of(tmv, mx, inv_t));
        hist_add(sm.hist, tmi != INT_MAX, b);
        __syncthreads();
        hist_scan(sm.hist, sm.sw, c0, c1);
        bk = __syncthreads_count(c0 < k) + __syncthreads_count(c1 < k);
    }
    if (bk < SAMPLE_BINS)
        n = gather(x, V, mx, inv_t, 0.0f, bk, false, sm);
    if (n > SAMPLE_TOPM) { /* the row's histogram: the bin of the k-th token */
        row_hist(x, V, mx, inv_t, sm, c0, c1);
        bk = __syncthreads_count(c0 < k) + __syncthreads_count(c1 < k); /* < SAMPLE_BINS: k < V */
        if (2 * (int)threadIdx.x == bk)
            sm.sel = c0;
        if (2 * (int)threadIdx.x + 1 == bk)
            sm.sel = c1;
        __syncthreads();
        if (sm.sel > SAMPLE_TOPM)
            return 0;
        n = gather(x, V, mx, inv_t, 0.0f, bk, false, sm);
    }
    if (n > SAMPLE_TOPM || n < k)
        return 0; /* neither happens: the same bins as the count's */
    sort_first(n, sm);
    return sm.keys[k - 1];
}

/* Top-k's candidates in the canonical order (sm.keys[0..k)) with their e, those min-p zeroes left
 * out (moved to the end by a second sort, which keeps the others' order), then the top-p walk. */
static __device__ int32_t top_p_of_k(int k, const struct dsv32_draw &d, float mx, float inv_t,
                                     double total, struct sample_smem &sm)
{
    const double target = __dmul_rn((double)d.top_p, total);
    for (int i = threadIdx.x; i < k; i += SAMPLE_THREADS)
        sm.es[i] = e_minp(z_of(key_logit(sm.keys[i]), mx, inv_t), d.min_p);
    __syncthreads();
    const int t = threadIdx.x;
    const int n = __syncthreads_count(t < k && sm.es[t] > 0.0f) +
                  __syncthreads_count(t + SAMPLE_THREADS < k && sm.es[t + SAMPLE_THREADS] > 0.0f);
    if (n < k) { /* keys 0 sort last; sort_first clears keys[k..) (other tokens of the gather) */
        for (int i = t; i < k; i += SAMPLE_THREADS)
            if (!(sm.es[i] > 0.0f))
                sm.keys[i] = 0;
        sort_first(k, sm);
        for (int i = t; i < n; i += SAMPLE_THREADS)
            sm.es[i] = e_minp(z_of(key_logit(sm.keys[i]), mx, inv_t), d.min_p);
        __syncthreads();
    }
    return walk_nucleus(n, true, target, d.u, sm);
}

/* The k-th largest rank key of the row's tokens (those with e > 0 when pred): a radix select
 * from the top in digits of 11 bits (bits 53-63, 42-52, 31-41, 20-30, 9-19) and the last of 9
 * (0-8: the low bits of the token id, which decide among equal logits), the histograms in shared
 * memory (lanes of a warp with the same bin add once: the logits' top bits crowd into a few bins).
 * All threads return it. */
static __device__ uint64_t select_kth(const float *x, const float *e, int V, int k, bool pred,
                                      int *hist, int *sh)
{
    const int lane = threadIdx.x & 31;
    uint64_t prefix = 0, pmask = 0;
    int need = k;
    for (int shift = 53; shift >= 0; shift -= shift > 9 ? 11 : 9) {
        const int width = shift == 0 ? 9 : 11, nbins = 1 << width;
        for (int i = threadIdx.x; i < nbins; i += SAMPLE_THREADS)
            hist[i] = 0;
        __syncthreads();
        for (int v0 = 0; v0 < V; v0 += SAMPLE_THREADS) {
            const int v = v0 + threadIdx.x;
            bool ok = v < V && (!pred || e[v] > 0.0f);
            const uint64_t key = ok ? rank_key(x[v], v) : 0;
            ok = ok && (key & pmask) == prefix;
            const unsigned bin =
                ok ? (unsigned)(key >> shift) & (unsigned)(nbins - 1) : 0xffffffffu;
            const unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (ok && lane == __ffs(peers) - 1)
                atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        if (threadIdx.x == 0) { /* the bin of the need-th largest, counted from the top */
            int b = nbins - 1, above = 0;
            while (b > 0 && above + hist[b] < need)
                above += hist[b--];
            sh[0] = b;
            sh[1] = need - above;
        }
        __syncthreads();
        prefix |= (uint64_t)sh[0] << shift;
        pmask |= (uint64_t)(nbins - 1) << shift;
        need = sh[1];
        __syncthreads(); /* sh and hist are rewritten by the next digit */
    }
    return prefix;
}

/* The exact path, the whole draw as it was before the fast path (what that path leaves: NaN or
 * infinite logits or T, top-k above SAMPLE_TOPM, a nucleus ending where no prefix of whole bins
 * fits): e into global scratch e (V floats), top-k (a radix select of the k-th rank key) and min-p
 * as zeros there, the block sums, then the walk; with top-p, the candidates sorted when they are
 * at most SAMPLE_TOPM, else the SAMPLE_TOPM first of them (a radix select), enough when the
 * nucleus ends among those, -1 when it does not. All threads return the token. */
static __device__ int32_t draw_full(const float *x, int V, const struct dsv32_draw &d, float mx,
                                    bool has_nan, float *e, double *bsum, struct sample_chunk *rec,
                                    int cap, struct sample_smem &sm)
{
    const int tid = threadIdx.x;
    int32_t tok = -1;
    const float inv_t = __fdiv_rn(1.0f, d.temperature);
    uint64_t kth = 0;
    for (int v = tid; v < V; v += SAMPLE_THREADS)
        e[v] = exp_le0(z_of(x[v], mx, inv_t));
    /* top-k and min-p: the tokens they leave out get no mass (each thread its own entries) */
    if (d.top_k > 0 && d.top_k < V) {
        kth = select_kth(x, e, V, d.top_k, false, sm.hist, sm.sh2);
        for (int v = tid; v < V; v += SAMPLE_THREADS)
            if (rank_key(x[v], v) < kth)
                e[v] = 0.0f;
    }
    if (d.min_p > 0.0f)
        for (int v = tid; v < V; v += SAMPLE_THREADS)
            if (e[v] < d.min_p)
                e[v] = 0.0f;
    __syncthreads(); /* e written: every thread reads others' entries below */
    const int nb = (V + SAMPLE_BLK - 1) / SAMPLE_BLK;
    for (int b0 = 0; b0 < nb; b0 += SAMPLE_THREADS / 4) {
        const int b = b0 + (tid >> 2), l = tid & 3;
        float a = 0.0f;
        if (b < nb) {
            const int v1 = (b + 1) * SAMPLE_BLK < V ? (b + 1) * SAMPLE_BLK : V;
            /* eight loads in flight, then their sums in order (a missing tail value adds 0:
             * a stays a non-negative sum, so + 0.0f leaves it as it is) */
            for (int v = b * SAMPLE_BLK + l; v < v1; v += 32) {
                float t[8];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    t[k] = v + 4 * k < v1 ? e[v + 4 * k] : 0.0f;
#pragma unroll
                for (int k = 0; k < 8; k++)
                    a = __fadd_rn(a, t[k]);
            }
        }
        sm.acc4[tid] = a;
        __syncthreads();
        if (l == 0 && b < nb)
            bsum[b] = lanes_sum(&sm.acc4[tid]);
        __syncthreads();
    }
    if (tid == 0)
        sm.total = blocks_total(bsum, nb);
    __syncthreads();
    if (d.top_p < 1.0f) {
        /* the candidates (e > 0) in the canonical order, the shortest prefix whose mass
         * reaches top_p * total, the walk over it: the candidates sorted here when they are
         * at most SAMPLE_TOPM, else the SAMPLE_TOPM first of them, enough when the prefix
         * ends among those */
        double cnt = 0.0;
        for (int v = tid; v < V; v += SAMPLE_THREADS)
            cnt += e[v] > 0.0f ? 1.0 : 0.0;
        const int n = (int)block_sum(cnt, sm.sd);
        const uint64_t kM =
            n > SAMPLE_TOPM ? select_kth(x, e, V, SAMPLE_TOPM, true, sm.hist, sm.sh2) : 0;
        if (tid == 0)
            sm.cnt = 0;
        __syncthreads();
        for (int v = tid; v < V; v += SAMPLE_THREADS)
            if (e[v] > 0.0f) {
                const uint64_t key = rank_key(x[v], v);
                if (key >= kM) { /* exactly SAMPLE_TOPM when kM is selected: keys are distinct */
                    const int pos = atomicAdd(&sm.cnt, 1);
                    if (pos < SAMPLE_TOPM)
                        sm.keys[pos] = key;
                }
            }
        const int M = n < SAMPLE_TOPM ? n : SAMPLE_TOPM;
        for (int i = M + tid; i < SAMPLE_TOPM; i += SAMPLE_THREADS)
            sm.keys[i] = 0; /* below every token's key */
        __syncthreads();
        sort_desc(sm.keys, SAMPLE_TOPM);
        if (tid == 0) {
            const double target = __dmul_rn((double)d.top_p, sm.total);
            double c = 0.0;
            int m = 0;
            while (m < M && c < target)
                c = __dadd_rn(c, (double)e[key_token(sm.keys[m++])]);
            if (c < target && n > M) {
                tok = SAMPLE_EXACT; /* a nucleus past the sorted candidates: chunked, below */
            } else {
                const double u = __dmul_rn(d.u, c);
                double acc = 0.0;
                tok = key_token(sm.keys[m > 0 ? m - 1 : 0]);
                for (int i = 0; i < m; i++) {
                    acc = __dadd_rn(acc, (double)e[key_token(sm.keys[i])]);
                    if (u < acc) {
                        tok = key_token(sm.keys[i]);
                        break;
                    }
                }
            }
            sm.tok = tok;
        }
        __syncthreads();
        tok = sm.tok;
    } else {
        /* the walk, in order, by one thread: over the block sums, then inside the block that
         * holds u * total (all threads get the token) */
        tok = walk_staged(V, d.u, sm.total, bsum, sm, [&](int v) { return e[v]; });
    }
    if (tok != SAMPLE_EXACT)
        return tok;
    /* a nucleus of more than SAMPLE_TOPM candidates (top-k above SAMPLE_TOPM, or NaN or infinite
     * logits or T): the chunked walk (e and the block sums no longer needed: rec may overwrite
     * e) where the z-bins keep the canonical order; NaN or infinite values: the host's (-1) */
    const bool sane = !has_nan && isfinite(mx) && isfinite(inv_t) && inv_t > 0.0f;
    if (!sane)
        return -1;
    __syncthreads(); /* every thread is done with e */
    int c0, c1;
    row_hist(x, V, mx, inv_t, sm, c0, c1);
    const double target = __dmul_rn((double)d.top_p, sm.total);
    return top_p_chunked(x, V, mx, inv_t, d.min_p, kth, target, d.u, rec, cap, sm);
}

/* The draw at temperature > 0 on the fast path: the token, -1 (a nucleus the host draws) or
 * SAMPLE_EXACT. has_nan: the row holds a NaN; tmv, tmi: this thread's maximum (pass 1). */
static __device__ int32_t draw_fast(const float *x, int V, const struct dsv32_draw &d, float mx,
                                    bool has_nan, float tmv, int tmi, double *bsum,
                                    struct sample_chunk *rec, int cap, struct sample_smem &sm)
{
    const float inv_t = __fdiv_rn(1.0f, d.temperature);
    const bool top_k = d.top_k > 0 && d.top_k < V, top_p = d.top_p < 1.0f;
    /* the bins are monotone in the canonical order (z_bin) only for finite z without NaN */
    const bool sane = !has_nan && isfinite(mx) && isfinite(inv_t) && inv_t > 0.0f;
    if (!top_k) {
        if (top_p && !sane)
            return SAMPLE_EXACT;
        const double total = block_sums<false, 8>(x, V, mx, inv_t, d.min_p, 0, bsum, sm);
        if (!top_p)
            return walk_blocks<false>(x, V, mx, inv_t, d.min_p, 0, d.u, total, bsum, sm);
        return top_p_row(x, V, d, mx, inv_t, total, rec, cap, sm);
    }
    if (!sane || d.top_k > SAMPLE_TOPM)
        return SAMPLE_EXACT;
    const uint64_t kth = top_k_key(x, V, d.top_k, mx, inv_t, tmv, tmi, sm);
    if (!kth)
        return SAMPLE_EXACT;
    const double total = block_sums<true, 16>(x, V, mx, inv_t, d.min_p, kth, bsum, sm);
    if (!top_p)
        return walk_blocks<true>(x, V, mx, inv_t, d.min_p, kth, d.u, total, bsum, sm);
    return top_p_of_k(d.top_k, d, mx, inv_t, total, sm);
}

/* draws[b] on row rows[b] of logits; e_all: (gridDim.x, V) floats of scratch for the exact path;
 * dynamic shared memory: the row's block sums (V / 1024 rounded up, doubles) */
static __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const float *logits, int V, const struct dsv32_draw *draws, const int32_t *rows,
                  struct cu_drawn *out, float *e_all)
{
    extern __shared__ double bsum[];
    __shared__ struct sample_smem sm;
    const struct dsv32_draw d = draws[blockIdx.x];
    const float *x = logits + (size_t)rows[blockIdx.x] * V;
    const int tid = threadIdx.x;
    /* 1. the maximum (NaNs never win a comparison) and its first index */
    float mv = -INFINITY;
    int mi = INT_MAX;
    bool has_nan = false;
    row_pass<4>(x, V, [&](float xv, int v, bool ok) {
        has_nan |= ok && xv != xv;
        if (ok && vi_better(xv, v, mv, mi)) {
            mv = xv;
            mi = v;
        }
    });
    const float tmv = mv;
    const int tmi = mi;
    has_nan = __syncthreads_or(has_nan);
    block_best(mv, mi, sm.sv, sm.si);
    const float mx = mv;
    int32_t tok = has_nan && x[0] != x[0] ? 0 : mi;
    /* 2. the draw */
    if (d.temperature != 0.0f) {
        /* the row's scratch: e on the exact path, the chunks of the chunked top-p walk */
        float *e_row = e_all + (size_t)blockIdx.x * V;
        const uintptr_t r0 = ((uintptr_t)e_row + 15) & ~(uintptr_t)15;
        const ptrdiff_t room = (ptrdiff_t)((uintptr_t)(e_row + V) - r0);
        struct sample_chunk *rec = (struct sample_chunk *)r0;
        const int cap = room > 0 ? (int)(room / (ptrdiff_t)sizeof(struct sample_chunk)) : 0;
        tok = draw_fast(x, V, d, mx, has_nan, tmv, tmi, bsum, rec, cap, sm);
        if (tok == SAMPLE_EXACT)
            tok = draw_full(x, V, d, mx, has_nan, e_row, bsum, rec, cap, sm);
    }
    /* 3. logprobs of the raw logits */
    const int n = d.n_logprobs > DSV32_MAX_LOGPROBS ? DSV32_MAX_LOGPROBS : d.n_logprobs;
    float lse = 0.0f;
    if (n >= 0) {
        double s = 0.0;
        float lv[DSV32_MAX_LOGPROBS];
        int li[DSV32_MAX_LOGPROBS], cnt = 0;
        for (int v = tid; v < V; v += SAMPLE_THREADS) {
            const float xv = x[v];
            s += exp((double)xv - (double)mx);
            if (n > 0 && (cnt < n || xv > lv[cnt - 1])) { /* this thread's top n, in order */
                int j = cnt < n ? cnt++ : n - 1;
                for (; j > 0 && xv > lv[j - 1]; j--) {
                    lv[j] = lv[j - 1];
                    li[j] = li[j - 1];
                }
                lv[j] = xv;
                li[j] = v;
            }
        }
        s = block_sum(s, sm.sd);
        lse = __fadd_rn(mx, (float)log(s));
        for (int r = 0, h = 0; r < n; r++) {
            float wv = h < cnt ? lv[h] : -INFINITY;
            int wi = h < cnt ? li[h] : 0x7fffffff;
            block_best(wv, wi, sm.sv, sm.si);
            if (wi == 0x7fffffff)
                break; /* fewer than n tokens */
            if (wi % SAMPLE_THREADS == tid)
                h++;
            if (tid == 0) {
                out[blockIdx.x].top_tok[r] = wi;
                out[blockIdx.x].top_val[r] = wv;
            }
        }
    }
    if (tid == 0) {
        out[blockIdx.x].token = tok;
        out[blockIdx.x].lse = lse;
        out[blockIdx.x].tok_val = tok >= 0 ? x[tok] : 0.0f;
    }
}

/* cu_sample's page-locked host buffer (c->sample_h): the n draws, then their rows (uploaded
 * together), then, 16-byte aligned, the n results */
static size_t sample_in_bytes(int n)
{
    return (sizeof(struct dsv32_draw) + sizeof(int32_t)) * (size_t)n;
}

static size_t sample_out_off(int n)
{
    return (sample_in_bytes(n) + 15) & ~(size_t)15;
}

int cu_sample(struct cu_ctx *c, int32_t *tok, struct dsv32_logprobs *lp, const float *logits, int V,
              const int32_t *rows, const struct dsv32_draw *d, int n)
{
    if (n <= 0)
        return 0;
    if (V <= 0)
        return -EINVAL;
    const size_t in_bytes = sample_in_bytes(n), out_off = sample_out_off(n);
    const size_t bytes = out_off + sizeof(struct cu_drawn) * (size_t)n;
    if (bytes > c->sample_h_bytes) { /* the previous call's copies are done: it synchronized */
        if (c->sample_h)
            cudaFreeHost(c->sample_h);
        c->sample_h = NULL;
        c->sample_h_bytes = 0;
        if (cudaMallocHost(&c->sample_h, bytes) != cudaSuccess) {
            log_error("cuda: sample: page-locked buffer of %zu bytes: %s", bytes,
                      cudaGetErrorString(cudaGetLastError()));
            c->sample_h = NULL;
            return -ENOMEM;
        }
        c->sample_h_bytes = bytes;
    }
    uint8_t *h = (uint8_t *)c->sample_h;
    memcpy(h, d, sizeof(*d) * (size_t)n);
    memcpy(h + sizeof(*d) * (size_t)n, rows, sizeof(int32_t) * (size_t)n);
    struct cu_drawn *ho = (struct cu_drawn *)(void *)(h + out_off);
    int any_t = 0;
    for (int i = 0; i < n; i++)
        any_t |= d[i].temperature != 0.0f;
    uint8_t *din = (uint8_t *)cu_scratch(c, SCR_WORK, in_bytes);
    struct cu_drawn *dout = (struct cu_drawn *)cu_scratch(c, SCR_TMP2, sizeof(*ho) * (size_t)n);
    float *e = any_t ? (float *)cu_scratch(c, SCR_TMP, sizeof(float) * (size_t)n * V) : NULL;
    if (!din || !dout || (any_t && !e))
        return -ENOMEM;
    const size_t smem = sizeof(double) * (size_t)((V + SAMPLE_BLK - 1) / SAMPLE_BLK);
    CU_SMEM_OPTIN(sample_kernel, smem);
    /* from here on the stream is waited for even after an error: its copies use h */
    cudaError_t err = cudaMemcpyAsync(din, h, in_bytes, cudaMemcpyHostToDevice, c->st);
    if (err == cudaSuccess) {
        sample_kernel<<<n, SAMPLE_THREADS, smem, c->st>>>(
            logits, V, (const struct dsv32_draw *)(void *)din,
            (const int32_t *)(void *)(din + sizeof(*d) * (size_t)n), dout, e);
        err = cudaPeekAtLastError();
    }
    if (err == cudaSuccess)
        err = cudaMemcpyAsync(ho, dout, sizeof(*ho) * (size_t)n, cudaMemcpyDeviceToHost, c->st);
    const cudaError_t es = cudaStreamSynchronize(c->st);
    if (err == cudaSuccess)
        err = es;
    if (err != cudaSuccess) {
        log_error("cuda: sample of %d rows: %s", n, cudaGetErrorString(err));
        return DSV32_ECUDA;
    }
    for (int i = 0; i < n; i++) {
        tok[i] = ho[i].token;
        if (d[i].n_logprobs < 0 || tok[i] < 0) /* -1: the host draws it (backend.h) */
            continue;
        const int nt = d[i].n_logprobs > DSV32_MAX_LOGPROBS ? DSV32_MAX_LOGPROBS : d[i].n_logprobs;
        lp[i].n_top = nt < V ? nt : V;
        for (int j = 0; j < lp[i].n_top; j++) {
            lp[i].top[j].token = ho[i].top_tok[j];
            lp[i].top[j].logprob = ho[i].top_val[j] - ho[i].lse;
        }
        lp[i].chosen.token = tok[i];
        lp[i].chosen.logprob = ho[i].tok_val - ho[i].lse;
    }
    return 0;
}
