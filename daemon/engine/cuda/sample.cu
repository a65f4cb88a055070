/* Token draws on the device (see sample.cuh). One CTA of 1024 threads per row:
 *
 *  1. the largest logit and its first index (thread t reads v = t, t + 1024, ... in order and keeps
 *     the first of equals; the block reduction prefers the lower index): the greedy token and the
 *     maximum the draw and the logprobs start from;
 *  2. a temperature > 0: sampling.c's draw_row, operation for operation: e[v] = e^((x - max) / T)
 *     by the same Cody-Waite reduction and polynomial in single precision without contraction
 *     (__fmul_rn, __fadd_rn), into global scratch; top-k (a radix select of the k-th rank key)
 *     and min-p as zeros in e; the sums of each block of 1024 in four float lanes (lane l adds
 *     v = 1024 b + l, + 4, ... in order), the lanes' sum in double; then one thread walks the
 *     block sums and the chosen block (staged in shared memory) in double, or, with top-p, the
 *     candidates sorted in the canonical order (at most SAMPLE_TOPM of them: a longer nucleus
 *     returns -1, the host's). So the token is the host's for the same logits and uniform, bit
 *     for bit;
 *  3. logprobs: the softmax sum in double as a tree (the host sums in order: the log-sum-exp may
 *     differ in its last float bit) and the top n by value, lower index first among equals: each
 *     thread keeps its own top n in order, then n rounds of a block-wide maximum over the
 *     threads' heads, the winner (the owner of index v is thread v % 1024) moving to its next. */
#include "sample.cuh"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "../sampling.h"

#define SAMPLE_THREADS 1024
/* draw_full's blocks of the vocabulary (one staged in acc4: <= SAMPLE_THREADS) */
#define SAMPLE_BLK 1024
/* top-p: the candidates sorted on the device; a nucleus past them is the host's */
#define SAMPLE_TOPM 2048

/* The kernel reads the engine's struct dsv32_draw array as it was uploaded: the same layout in
 * C and here (sampling.c asserts the same numbers) */
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

/* block-wide sum of every thread's double (a tree); all threads get it */
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

/* The k-th largest rank key of the row's tokens (those with e > 0 when pred): a radix select
 * from the top in digits of 11 bits (the last of 9), the histograms in shared memory (lanes of a
 * warp with the same bin add once: the logits' top bits crowd into a few bins). All threads
 * return it. */
static __device__ uint64_t select_kth(const float *x, const float *e, int V, int k, bool pred,
                                      int *hist, int *sh)
{
    const int lane = threadIdx.x & 31;
    uint64_t prefix = 0, pmask = 0;
    int need = k;
    for (int shift = 53; shift >= 0; shift = shift > 9 ? shift - 11 : -1) {
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

/* keys[0..SAMPLE_TOPM) in descending order (bitonic) */
static __device__ void sort_desc(uint64_t *keys)
{
    for (int k = 2; k <= SAMPLE_TOPM; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < SAMPLE_TOPM; i += SAMPLE_THREADS) {
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

static __device__ __forceinline__ int32_t key_token(uint64_t k)
{
    return (int32_t) ~(uint32_t)k;
}

/* draws[b] on row rows[b] of logits; e_all: (gridDim.x, V) floats of scratch; dynamic shared
 * memory: the row's block sums (V / 1024 rounded up, doubles) */
static_assert(SAMPLE_BLK <= SAMPLE_THREADS, "a block of the vocabulary staged one value a thread");

static __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const float *logits, int V, const struct dsv32_draw *draws, const int32_t *rows,
                  struct cu_drawn *out, float *e_all)
{
    extern __shared__ double bsum[];
    __shared__ float sv[32], acc4[SAMPLE_THREADS];
    __shared__ int si[32], hist[2048], sh2[2];
    __shared__ uint64_t skeys[SAMPLE_TOPM];
    __shared__ double sd[32];
    const struct dsv32_draw d = draws[blockIdx.x];
    const float *x = logits + (size_t)rows[blockIdx.x] * V;
    const int tid = threadIdx.x;
    /* 1. the maximum and its first index */
    float mv = -INFINITY;
    int mi = 0x7fffffff;
    for (int v = tid; v < V; v += SAMPLE_THREADS)
        if (mi == 0x7fffffff || x[v] > mv) {
            mv = x[v];
            mi = v;
        }
    block_best(mv, mi, sv, si);
    const float mx = mv;
    int32_t tok = mi;
    /* 2. the draw over the whole vocabulary (draw_full) */
    if (d.temperature != 0.0f) {
        float *e = e_all + (size_t)blockIdx.x * V;
        const float inv_t = __fdiv_rn(1.0f, d.temperature);
        for (int v = tid; v < V; v += SAMPLE_THREADS)
            e[v] = exp_le0(__fmul_rn(__fsub_rn(x[v], mx), inv_t));
        /* top-k and min-p: the tokens they leave out get no mass (each thread its own entries) */
        if (d.top_k > 0 && d.top_k < V) {
            const uint64_t kth = select_kth(x, e, V, d.top_k, false, hist, sh2);
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
            acc4[tid] = a;
            __syncthreads();
            if (l == 0 && b < nb) { /* (double)acc[0] + acc[1] + acc[2] + acc[3] */
                double s = __dadd_rn((double)acc4[tid], (double)acc4[tid + 1]);
                s = __dadd_rn(s, (double)acc4[tid + 2]);
                bsum[b] = __dadd_rn(s, (double)acc4[tid + 3]);
            }
            __syncthreads();
        }
        __shared__ double walk_u, walk_cum, walk_total;
        __shared__ int walk_b, n_kept;
        if (tid == 0) {
            double total = 0.0;
            for (int b = 0; b < nb; b++)
                total = __dadd_rn(total, bsum[b]);
            walk_total = total;
        }
        __syncthreads();
        if (d.top_p < 1.0f) {
            /* the candidates (e > 0) in the canonical order, the shortest prefix whose mass
             * reaches top_p * total, the walk over it: the candidates sorted here when they are
             * at most SAMPLE_TOPM, else the SAMPLE_TOPM first of them, enough when the prefix
             * ends among those */
            double cnt = 0.0;
            for (int v = tid; v < V; v += SAMPLE_THREADS)
                cnt += e[v] > 0.0f ? 1.0 : 0.0;
            const int n = (int)block_sum(cnt, sd);
            const uint64_t kM =
                n > SAMPLE_TOPM ? select_kth(x, e, V, SAMPLE_TOPM, true, hist, sh2) : 0;
            if (tid == 0)
                n_kept = 0;
            __syncthreads();
            for (int v = tid; v < V; v += SAMPLE_THREADS)
                if (e[v] > 0.0f) {
                    const uint64_t key = rank_key(x[v], v);
                    if (key >= kM)
                        skeys[atomicAdd(&n_kept, 1)] = key;
                }
            const int M = n < SAMPLE_TOPM ? n : SAMPLE_TOPM;
            for (int i = M + tid; i < SAMPLE_TOPM; i += SAMPLE_THREADS)
                skeys[i] = 0; /* below every token's key */
            __syncthreads();
            sort_desc(skeys);
            if (tid == 0) {
                const double target = __dmul_rn((double)d.top_p, walk_total);
                double c = 0.0;
                int m = 0;
                while (m < M && c < target)
                    c = __dadd_rn(c, (double)e[key_token(skeys[m++])]);
                if (c < target && n > M) {
                    tok = -1; /* a nucleus past the sorted candidates: the host draws it */
                } else {
                    const double u = __dmul_rn(d.u, c);
                    double acc = 0.0;
                    tok = key_token(skeys[m > 0 ? m - 1 : 0]);
                    for (int i = 0; i < m; i++) {
                        acc = __dadd_rn(acc, (double)e[key_token(skeys[i])]);
                        if (u < acc) {
                            tok = key_token(skeys[i]);
                            break;
                        }
                    }
                }
            }
        } else {
            /* the walk, in order, by one thread: over the block sums, then (staged in shared
             * memory by all) inside the block that holds u * total */
            if (tid == 0) {
                const double u = __dmul_rn(d.u, walk_total);
                double cum = 0.0;
                int b = 0;
                while (b < nb - 1 && __dadd_rn(cum, bsum[b]) <= u)
                    cum = __dadd_rn(cum, bsum[b++]);
                walk_u = u;
                walk_cum = cum;
                walk_b = b;
            }
            __syncthreads();
            const int v0 = walk_b * SAMPLE_BLK, v1 = v0 + SAMPLE_BLK < V ? v0 + SAMPLE_BLK : V;
            if (v0 + tid < v1)
                acc4[tid] = e[v0 + tid];
            __syncthreads();
            if (tid == 0) {
                const double u = walk_u;
                double cum = walk_cum;
                tok = -1;
                for (int v = v0; v < v1 && tok < 0; v++) {
                    cum = __dadd_rn(cum, (double)acc4[v - v0]);
                    if (u < cum)
                        tok = v;
                }
                for (int v = v1 - 1; v >= v0 && tok < 0; v--) /* past the block's float rounding */
                    if (acc4[v - v0] > 0.0f)
                        tok = v;
                if (tok < 0)
                    tok = v1 - 1;
            }
        }
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
        s = block_sum(s, sd);
        lse = __fadd_rn(mx, (float)log(s));
        for (int r = 0, h = 0; r < n; r++) {
            float wv = h < cnt ? lv[h] : -INFINITY;
            int wi = h < cnt ? li[h] : 0x7fffffff;
            block_best(wv, wi, sv, si);
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
