/* What every CUDA source of the cuda backend shares: the backend context (stream, cuBLAS handles,
 * scratch buffers, RoPE tables), the device form of a weight, error checks that map CUDA and cuBLAS
 * failures to DSV32_ECUDA / DSV32_ECUBLAS and leave a breadcrumb in the log, the FP8 e4m3 and
 * bf16 conversions of dtype.h as device functions (bit-exact with the host versions), and the
 * device side of the FP8 tie probe (dtype.h): near-ties are reported into a device buffer and the
 * probe's flips are applied, only when a probe is installed on the calling host thread. */
#ifndef DSV32_CUDA_COMMON_CUH
#define DSV32_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The engine headers are C17; dtype.h declares its thread-local probe with _Thread_local, which
 * is __thread (no dynamic initialization, the same TLS symbol) in GNU C++. */
#define _Thread_local __thread
extern "C" {
#include "../../error.h"
#include "../../log.h"
#include "../backend.h"
#include "../dtype.h"
}
#undef _Thread_local

/* ---- error checks: return a dsv32 code and log where it happened ---- */

#define CU_CHECK(call)                                                                             \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            log_error("cuda: %s failed (%s:%d): %s", #call, __FILE__, __LINE__,                    \
                      cudaGetErrorString(e_));                                                     \
            return DSV32_ECUDA;                                                                    \
        }                                                                                          \
    } while (0)

/* after every kernel launch: launch-configuration errors surface here */
#define CU_LAUNCHED(name) CU_CHECK(cudaPeekAtLastError())

/* A kernel's dynamic shared memory beyond 48 KB needs an opt-in (cu_smem_optin, below), at a
 * launch site with the backend's context c in scope; any kernel pointer, so one site serves the
 * template instances a launch chooses among */
#define CU_SMEM_OPTIN(kernel, bytes) CU_CHECK(cu_smem_optin(c, (const void *)(kernel), (bytes)))

#define BLAS_CHECK(call)                                                                           \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            log_error("cublas: %s failed (%s:%d): status %d", #call, __FILE__, __LINE__, (int)s_); \
            return DSV32_ECUBLAS;                                                                  \
        }                                                                                          \
    } while (0)

/* propagate a dsv32 error code */
#define CU_TRY(expr)                                                                               \
    do {                                                                                           \
        int r_ = (expr);                                                                           \
        if (r_ < 0)                                                                                \
            return r_;                                                                             \
    } while (0)

static inline unsigned cu_blocks(size_t n, unsigned per) { return (unsigned)((n + per - 1) / per); }

/* ---- the device form of a weight ---- */

/* Which forms exist depends on the numerics mode (see backend.cu): `exact` keeps f32 (the cpu
 * backend's dequantized values, so that GEMMs equal the reference up to summation order); `fast`
 * keeps FP8 weights as e4m3 + scales and bf16 matrices as bf16. Vectors are always f32. */
struct cu_weight {
    enum dsv32_dtype dtype; /* as stored in the checkpoint */
    int64_t rows, cols;
    float *f32;             /* (rows, cols) dequantized */
    __nv_bfloat16 *bf16;    /* (rows, cols) */
    uint8_t *fp8;           /* (rows, cols) e4m3 */
    float *scale;           /* (ceil(rows/128), ceil(cols/128)) weight_scale_inv, as stored */
    float *lt_scale;        /* the scales in the layout cuBLASLt wants (fast mode, made lazily) */
    __nv_bfloat16 *bf16_lazy; /* dequantized bf16 copy of an FP8 matrix (mla_absorb/expand) */
    int fp8_tiled;            /* fp8 holds 128 x 128 tiles, each 16 KB contiguous (cu_fp8_at): a
                                 routed expert's matrix, tiled by moe.cu's expert table */
};

/* byte k of row n of an FP8 matrix of N rows and K columns: row-major, or in 128 x 128 tiles of
 * 16 KB, K-block-major (tile (n / 128, k / 128) at index (k / 128) (N / 128) + n / 128: the tiles
 * that a GEMM's CTAs read at the same K step lie side by side), each tile's rows of 128 bytes
 * contiguous */
static __device__ __forceinline__ size_t cu_fp8_at(int tiled, int n, size_t k, int N, int K)
{
    if (!tiled)
        return (size_t)n * K + k;
    const size_t tile = (k >> 7) * (size_t)(N >> 7) + (size_t)(n >> 7);
    return (tile * 128 + (size_t)(n & 127)) * 128 + (k & 127);
}

/* ---- the FP8 tie probe, device side ---- */

struct cu_probe {
    int on;
    double near_rel;
    const int3 *flips; /* (sub, row, col) of this op, sorted */
    int n_flips;
    int4 *near;        /* reported near-ties: sub, row, col, bits of the scaled value */
    int *n_near;
    int cap;
};

/* ---- the context ---- */

enum { CU_SCRATCH_SLOTS = 18 };
enum { CU_MLA_PROF_N = 20 }; /* counters of the knob mla_prof (cuda_backend.h: dsv32_cuda_mla_prof) */
enum { CU_TMAPS = 64 };      /* tensor maps kept (indexer caches: one per layer) */
enum { CU_OPTINS = 32 };     /* kernels whose shared-memory opt-in a context remembers */

/* An encoded CUtensorMap (128 bytes, kept as words: the context is not 64-byte aligned) for the
 * cache at ptr, valid while ptr's allocation is [base, base + size) */
struct cu_tmap {
    const void *ptr;
    unsigned long long base;
    size_t size;
    uint64_t map[16];
};

struct cu_expert_table; /* moe.cu */

struct cu_ctx {
    int device, n_sm;
    int smem_optin; /* the device's opt-in limit of dynamic shared memory per CTA (bytes) */
    int fast;                  /* numerics mode: 0 exact, 1 fast */
    int absorbed_prefill;      /* fast and the absorbed kernel fits: prefill rows take that form */
    int lat16;                 /* the MLA latents in bf16 (dsv32_backend.lat_bf16): set with
                                  absorbed_prefill; knob lat16 */
    int indexer_fp8;           /* fast indexer variant: FP8 mma instead of f16 mma */
    int lt_fp8;                /* fast mode may use cuBLASLt block-scaled FP8 (when calibrated) */
    int lt_min_rows;           /* ... for linears of at least this many rows (65: the mma.sync
                                  kernel with exact products below) */
    int lt_big_rows;           /* ... and for weights of 32M elements or more from this many */
    int fp8_reg;               /* the FP8 kernel's register-prefetch variant (the baseline) */
    int fp8_no_wg;             /* grouped GEMMs of many rows per group stay on mma.sync (baseline) */
    int route_smem;            /* the router's choice by the shared-memory kernel (the
                                  baseline) where the register one would fit */
    int moe_rowmajor;          /* routed experts' FP8 matrices left row-major (the baseline)
                                  instead of tiled when their table is made */
    int moe_all_groups;        /* the grouped GEMMs launch CTAs for every expert, empty or not
                                  (the baseline), not only for the experts with rows */
    int idx_wgmma;             /* f16 indexer scores on wgmma (1; 2: descriptor offsets swapped,
                                  a diagnostic) or mma.sync (0) */
    int idx_no_topk;           /* benchmarks: scores only (the top-k's share by difference) */
    int mla_wgmma;             /* fast sparse/dense MLA decode on wgmma (1) or mma.sync (0) */
    int mla_ws;                /* the wgmma MLA warp-specialized in three warpgroups (1, default
                                  where its shared memory fits) or both warpgroups in every step (0) */
    int mla_cl;                /* the wgmma MLA as a cluster of the two head groups, each CTA
                                  converting half of every key tile for both, where the heads are
                                  a multiple of 128: 64-key tiles (64, default) or 32 (32); or
                                  mla_ws's choice (0) */
    int pdl_ops;               /* the norms, add, SiLU x up, RoPE, the Hadamard quantization,
                                  the cache stores, the router's choice, the experts' routing and
                                  their combine launched under the kernel before them (1, default,
                                  with pdl: cu_launch_dep) or after it (0) */
    int fp8_pdl;               /* act_quant under the kernel before it, cu_linear's FP8 kernel
                                  under its act_quant and the split-K reduce under that, by
                                  programmatic dependent launch (1, default, with pdl), or each
                                  after the one before (0) */
    int mla_ostage;            /* mla_cl_kernel's O for one split in bf16: through shared memory
                                  in whole 16-byte chunks (1, default) or stored from the
                                  accumulators (0); 2: not stored (benchmarks: the stores' share) */
    int mla_cl_nocopy;         /* benchmarks: mla_cl_kernel without its copies to the peer (each
                                  CTA's other half stale: the copies' share of its time) */
    unsigned long long *mla_prof; /* benchmarks: the wgmma MLA kernel's cycles per phase (CU_MLA_PROF_N) */
    int topk_global;           /* the top-k's last pass and ordered sweeps over global memory even
                                  when the candidates would fit shared memory (tests, baseline) */
    int idx_tma;               /* the FP8 indexer's cache blocks by TMA (1) or cp.async (0, default) */
    int idx_l2_normal;         /* its TMA reads without the evict-first L2 hint (benchmarks) */
    int idx_copy_only;         /* benchmarks: the FP8 indexer reads its blocks and computes nothing
                                  (1), or computes the scores and does not store them (2) */
    int fp8_stages_dn;         /* the FP8 pipe kernel's ring for plain products of one row tile
                                  a pass: 4 stages (3 CTAs an SM), else 3 (4 an SM, default) */
    int idx_items;             /* the indexer's work list as floor(blocks / bpc) equal items per row
                                  group (1, default: no partial extra wave, 3-5% faster) or items
                                  of bpc blocks, the last one short (0) */
    int idx_poison;            /* tests: the scores' scratch set to NaN before each indexer call,
                                  so that a score no kernel wrote shows in the selection */
    int mla_q6;                /* the warp-specialized MLA stages Q with six loads in flight a
                                  thread, two rounds (1), or four, three rounds (0, default) */
    int idx_dev_items;         /* the wgmma indexers derive a decode step's work items on the
                                  device (1, default) instead of uploading the host's list (0) */
    int idx_sample;            /* the FP8 wgmma indexer's sampled path for one-row items: a sample
                                  of the cache blocks sets each row's threshold, only scores above
                                  it are written, the top-k selects among them, and a dense pass
                                  serves the rows where fewer than k were (1); or every score (0) */
    long idx_sample_calls;     /* indexer calls (chunks) on the sampled path */
    int *idx_sample_miss;      /* the last one's missed rows (device), idx_sample_rows of them */
    int idx_sample_rows;
    int dsa_forked;            /* cu_dsa's chunks on their partitions: the indexer takes no path
                                  whose scratch cu_dsa did not size before the fork */
    int idx_msum;              /* the FP8 wgmma indexer's head sum on the tensor core (1, default:
                                  relu'd logits in bf16 times the weights by a second MMA) or by FMAs */
    int idx_s16;               /* the FP8 wgmma indexer's scores as f16 (1, default: stored in 16
                                  bits, the top-k widening them exactly; DSA decode queued 0.418-0.420
                                  against 0.427-0.430 ms, the fourth session of 2026-11-30) or
                                  f32 (0) */
    int scores_h16;            /* the last indexer call's scores are f16 (dsv32_cuda_idx_scores) */
    int idx_sample_stride;     /* the sampled path's sample: every Nth cache block at least (0, the
                                  default: 64; 32 measured 9-11 us slower, the third session of
                                  2026-11-30) */
    int idx_pipe;              /* the FP8 wgmma indexer with each block's epilogue under the next
                                  block's MMAs, for one-row items (1; 0, default: in turn) */
    int pdl;                   /* the dsa op's kernels (the FP8 indexer's scores, the top-k, the
                                  cluster MLA) launched with programmatic dependent launch (1,
                                  default), each starting under its predecessor's tail, or in
                                  plain stream order (0) */
    int topk_parts;            /* the top-k's CTAs per row forced (1: one, the baseline; 2, 4; 0: by
                                  the row count) */
    int dsa_chunks;            /* the dsa op's chunks of rows, chunk i's MLA beside chunk i + 1's
                                  indexer on their own SMs (dsa.cu); 0 or 1: indexer, then MLA */
    int dsa_idx_sms;           /* the SMs of the indexer's partition there (0: half) */
    int dsa_skip;              /* benchmarks: the chunked dsa op without its MLAs (1) or indexers (2) */
    struct cu_green *green;    /* those partitions (dsa.cu), made on first use */
    long dsa_overlapped;       /* dsa calls that ran chunks side by side */
    struct cu_tmap tmaps[CU_TMAPS];
    int n_tmaps;
    struct {
        const void *func;
        int bytes;
    } optin[CU_OPTINS];        /* the kernels opted into more dynamic shared memory, and how much */
    int n_optin;
    int4 *idx_items_h;         /* the indexer's work list on the host, grown as needed */
    size_t idx_items_cap;
    /* Every kernel, copy and memset of the backend runs on st, created cudaStreamNonBlocking: it
     * does not wait for the legacy default stream, where cudaMemcpy and cudaMemset run. A
     * cudaMemcpy from pageable memory returns before its DMA has landed, so a kernel launched on
     * st right after it can read the destination's old bytes (the cause of tiny-bf16's
     * run-to-run golden failures: prepare_weight's upload raced its dequantization). Hence only
     * *Async copies on st here: the ctest cuda_stream_lint checks the sources for synchronous
     * ones, test_cuda_ops --only upload checks prepared weights bit for bit. */
    cudaStream_t st;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *lt_ws;
    size_t lt_ws_bytes;
    int lt_state;              /* 0 not calibrated, 1 usable, -1 unusable */
    int lt_variant;            /* which operand arrangement / scale layout passed calibration */
    char lt_note[160];
    float *rope_cos, *rope_sin; /* (n_pos, rope/2) device */
    int n_pos;
    void *scratch[CU_SCRATCH_SLOTS];
    size_t scratch_cap[CU_SCRATCH_SLOTS];
    /* probe buffers */
    int3 *probe_flips;
    int probe_flips_cap;
    int4 *probe_near;
    int *probe_n;
    int probe_cap;
    int4 *probe_host;
    /* pinned staging for small host->device uploads of the step (work lists) */
    void *pinned;
    size_t pinned_cap;
    cudaEvent_t pinned_done;
    /* cu_sample's page-locked host buffer (sample.cu): the draws and their rows, uploaded in one
     * copy, then the results copied back; grown to the largest call, freed with the context */
    void *sample_h;
    size_t sample_h_bytes;
    struct cu_expert_table *tables;
    const struct dsv32_config *cfg;
    struct dsv32_kv_geom geom;
};

/* The opt-in is a driver call that holds for the kernel on the current device, i.e. this
 * context's: made once per kernel and size that grows, not per launch (the indexer and MLA launch
 * per layer and step); kernels past the table's CU_OPTINS entries make the call every time. */
static inline cudaError_t cu_smem_optin(struct cu_ctx *c, const void *func, size_t bytes)
{
    int i = 0;
    while (i < c->n_optin && c->optin[i].func != func)
        i++;
    if (i < c->n_optin && (int)bytes <= c->optin[i].bytes)
        return cudaSuccess;
    const cudaError_t e = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess && i < CU_OPTINS) {
        c->optin[i].func = func;
        c->optin[i].bytes = (int)bytes;
        c->n_optin += i == c->n_optin;
    }
    return e;
}

/* Programmatic dependent launch (knob pdl): a kernel launched with the attribute cu_pdl_attr
 * fills in (cu_launch_pdl, cu_launch_dep below) may start while the kernel before it on the
 * stream still runs. It calls pdl_wait() before it reads anything that kernel writes or writes
 * anything it reads, and pdl_trigger() (which lets the next one start) only after its own
 * pdl_wait() (pdl_begin: both at its start); so when a kernel starts, every kernel but the one
 * just before it has finished, and its prologue may read their outputs (or, like the FP8 GEMM,
 * load what no kernel writes). In a kernel launched without the attribute both are no-ops. */
static __device__ __forceinline__ void pdl_wait()
{
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
static __device__ __forceinline__ void pdl_trigger()
{
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
/* both at a kernel's start: it reads and writes nothing before the kernel before it is done,
 * and the kernel after it may start at once (cu_launch_dep) */
static __device__ __forceinline__ void pdl_begin()
{
    pdl_wait();
    pdl_trigger();
}
static inline void cu_pdl_attr(cudaLaunchAttribute *at)
{
    memset(at, 0, sizeof(*at));
    at->id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at->val.programmaticStreamSerializationAllowed = 1;
}

/* cudaLaunchKernelEx's configuration: grid x block threads, smem bytes of dynamic shared memory,
 * on the context's stream, with the n attributes at at */
static inline cudaLaunchConfig_t cu_launch_cfg(const struct cu_ctx *c, dim3 grid, dim3 block,
                                               size_t smem, cudaLaunchAttribute *at, int n)
{
    cudaLaunchConfig_t lc = {};
    lc.gridDim = grid;
    lc.blockDim = block;
    lc.dynamicSmemBytes = smem;
    lc.stream = c->st;
    lc.attrs = at;
    lc.numAttrs = (unsigned)n;
    return lc;
}

/* kern<<<grid, block, smem, c->st>>>(args...), launched under the kernel before it when pdl is
 * set: only for a kernel that calls pdl_wait() before it touches what another kernel writes */
template <typename... K, typename... A>
static inline cudaError_t cu_launch_pdl(const struct cu_ctx *c, int pdl, void (*kern)(K...),
                                        dim3 grid, dim3 block, size_t smem, A &&...args)
{
    cudaLaunchAttribute at;
    cu_pdl_attr(&at);
    const cudaLaunchConfig_t lc = cu_launch_cfg(c, grid, block, smem, &at, pdl);
    return cudaLaunchKernelEx(&lc, kern, static_cast<A &&>(args)...);
}

/* the same for a kernel that begins with pdl_begin(), with the knobs pdl and pdl_ops: its launch
 * and start overlap the tail of the one before */
template <typename... K, typename... A>
static inline cudaError_t cu_launch_dep(const struct cu_ctx *c, void (*kern)(K...), dim3 grid,
                                        dim3 block, size_t smem, A &&...args)
{
    return cu_launch_pdl(c, c->pdl && c->pdl_ops, kern, grid, block, smem,
                         static_cast<A &&>(args)...);
}

/* scratch slot owners (one op uses a slot at a time; ops run in stream order, except in cu_dsa,
 * whose indexer and MLA run side by side: it sizes their slots before it forks) */
enum {
    SCR_XQ = 0, /* quantized activations */
    SCR_XS,     /* their scales */
    SCR_XS_T,   /* scales transposed (cuBLASLt) */
    SCR_TMP,    /* f32 temporaries */
    SCR_TMP2,
    SCR_PART,     /* split-K / split-KV partials */
    SCR_SCORES,   /* indexer scores */
    SCR_IDX_SMP,  /* the sampled path's sample, thresholds and missed rows (indexer.cu) */
    SCR_IDX_CAND, /* its candidates and their counts */
    SCR_WORK,     /* small work lists */
    SCR_MOE_A,
    SCR_MOE_B,
    SCR_MOE_C,
    SCR_MOE_D,
    SCR_PREF_A,
    SCR_PREF_B,
    SCR_PREF_C,
    SCR_BF16,
    SCR_N
};
static_assert((int)SCR_N <= (int)CU_SCRATCH_SLOTS, "more scratch slots than CU_SCRATCH_SLOTS");

/* A scratch buffer of at least `bytes` (grows; growing waits for the stream first). */
void *cu_scratch(struct cu_ctx *c, int slot, size_t bytes);
/* Copies `bytes` of host data to a device scratch slot through pinned memory, in stream order. */
void *cu_upload(struct cu_ctx *c, int slot, const void *src, size_t bytes);

/* probe: begin fills p (p->on = 0 without a probe); end copies reports back and hands them to
 * the probe's on_near (sorted by sub, row, col) */
int cu_probe_begin(struct cu_ctx *c, struct cu_probe *p);
int cu_probe_end(struct cu_ctx *c, const struct cu_probe *p);

/* ---- device number formats (bit-exact with dtype.h) ---- */

__device__ __forceinline__ float cu_e4m3_to_f32(uint8_t b)
{
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    return __half2float(__half(h));
}

/* dsv32_f32_to_fp8: clamp to +-448, round to nearest even, subnormals included, NaN -> 0x7f */
__device__ __forceinline__ uint8_t cu_f32_to_e4m3(float x)
{
    uint32_t u = __float_as_uint(x);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u)
        return 0x7f;
    if (u >= 0x43e00000u)
        return sign | 0x7e;
    if (u < 0x3c800000u)
        return sign | (uint8_t)(int)rintf(__uint_as_float(u) * 512.0f);
    int e = (int)(u >> 23) - 127 + 7;
    uint32_t man = u & 0x7fffffu, keep = man >> 20, rest = man & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1)))
        keep++;
    if (keep == 8) {
        keep = 0;
        e++;
    }
    return sign | (uint8_t)((e << 3) | (int)keep);
}

/* dsv32_fp8_block_scale */
__device__ __forceinline__ float cu_block_scale(float amax, int ue8m0)
{
    if (amax < 1e-4f)
        amax = 1e-4f;
    float s = amax / 448.0f;
    if (ue8m0) {
        uint32_t u = __float_as_uint(s);
        int e = (int)((u >> 23) & 0xff) - 127 + ((u & 0x7fffffu) ? 1 : 0);
        s = ldexpf(1.0f, e);
    }
    return s;
}

/* dsv32_f32_to_bf16 (NaN kept quiet the same way) */
__device__ __forceinline__ uint16_t cu_f32_to_bf16_bits(float f)
{
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__device__ __forceinline__ float cu_bf16_bits_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

/* probed rounding (dtype.c probed_round) */
__device__ __forceinline__ int cu_probe_is_flip(const struct cu_probe &p, int sub, int row, int col)
{
    int lo = 0, hi = p.n_flips - 1;
    while (lo <= hi) {
        int mid = (lo + hi) >> 1;
        int3 k = p.flips[mid];
        int c = k.x != sub ? (k.x < sub ? -1 : 1)
                : k.y != row ? (k.y < row ? -1 : 1)
                : k.z != col ? (k.z < col ? -1 : 1) : 0;
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return 0;
}

static __device__ __noinline__ uint8_t cu_probed_round(float v, const struct cu_probe &p, int sub, int row,
                                                 int col)
{
    uint8_t b = cu_f32_to_e4m3(v);
    float a = fabsf(v), q = fabsf(cu_e4m3_to_f32(b));
    if (a >= 448.0f || isnan(v))
        return b;
    uint8_t mag = b & 0x7f, other = q > a ? mag - 1 : (q < a ? mag + 1 : mag);
    if (other == mag || (q < a && mag == 0x7e))
        return b;
    float o = cu_e4m3_to_f32(other);
    float mid = 0.5f * (q + o);
    if ((double)fabsf(a - mid) <= p.near_rel * (double)a) {
        int i = atomicAdd(p.n_near, 1);
        if (i < p.cap)
            p.near[i] = make_int4(sub, row, col, __float_as_int(v));
        if (p.n_flips && cu_probe_is_flip(p, sub, row, col))
            return (uint8_t)((b & 0x80) | other);
    }
    return b;
}

/* the quantization of one value: the fast path when no probe is installed */
__device__ __forceinline__ uint8_t cu_quant(float v, const struct cu_probe &p, int sub, int row, int col)
{
    return p.on ? cu_probed_round(v, p, sub, row, col) : cu_f32_to_e4m3(v);
}

/* ---- warp helpers ---- */

__device__ __forceinline__ float cu_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float cu_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* the sum of v over the lanes below this one; *total: over the warp */
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

/* the warp's largest (bv, bi) by value, ties to the lower index; bi < 0: no candidate */
static __device__ __forceinline__ void warp_argmax(float &bv, int &bi)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
}

#endif
