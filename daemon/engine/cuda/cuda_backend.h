/* The cuda backend's C interface beyond backend.h: what tests and benchmarks need to build inputs
 * on the device (random weights, caches and activations drawn on the GPU), to time device work
 * and to measure the two ceilings (copy bandwidth, bf16 matrix rate) in the same run. The
 * backend itself is created with dsv32_backend_cuda_new (backend.h); its numerics mode comes
 * from the environment at creation:
 *   DSV32_CUDA_MATH=exact (default): f32 GEMMs on dequantized weights and f32 attention; the
 *       same function as the cpu backend up to f32 summation order (the golden sets pass).
 *   DSV32_CUDA_MATH=fast: FP8 weights stay FP8 (tensor-core kernels with exact e4m3 products,
 *       cuBLASLt block-scaled FP8 for large row counts), bf16 matrices run as bf16 GEMMs, MLA
 *       decode runs on bf16 tensor cores (DeepSeek's deployment numerics).
 *   The indexer's logits: in the exact mode f16 wgmma on exact e4m3 -> f16 conversions (exact
 *       products, f32 sums); in the fast mode FP8 wgmma on the e4m3 bytes (the tensor core's FP8
 *       accumulation, as DeepSeek's fp8_index), or the f16 path with DSV32_CUDA_INDEXER=f16. */
#ifndef DSV32_CUDA_BACKEND_H
#define DSV32_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of usable GPUs; 0 when there is no GPU or driver (tests skip then). */
int dsv32_cuda_device_count(void);

/* Starts (on 1) or stops (0) the profilers' collection (cudaProfilerStart / Stop), so that a
 * profiler started with collection off (ncu --profile-from-start off) sees one part of a run. */
int dsv32_cuda_profiler(int on);

/* 1 when the backend runs in the fast numerics mode. */
int dsv32_cuda_is_fast(const struct dsv32_backend *be);
/* Selects a kernel variant at run time (benchmarks compare them; a process without a flag for
 * them takes DSV32_CUDA_KNOBS="name=value,..." at the backend's creation): "indexer_fp8" (0/1),
 * "lt_fp8" (0/1: let fast FP8 linears use cuBLASLt), "lt_min_rows" (the fewest rows a linear
 * takes cuBLASLt with; 65 by default), "lt_big_rows" (the same for weights of 32M elements or
 * more; 16), "idx_dev_items" (1, default: the wgmma indexers, FP8 and f16, derive a decode step's
 * work items on the device; 0: the host's list uploaded), "fp8_reg" (0/1: the FP8 GEMM kernel that
 * prefetches into registers instead of the shared-memory pipeline), "idx_wgmma" (1: f16 indexer
 * scores on wgmma, 0: on mma.sync, 2: wgmma with the descriptor offsets swapped, a diagnostic that
 * must fail the tests), "idx_no_topk" (1: scores only, for timing), "topk_global" (1: the top-k
 * finishes over global memory, its fallback when the candidates do not fit shared memory),
 * "topk_parts" (1, 2 or 4 top-k CTAs per row, a cluster; 0: by the row count: 2 for fewer rows
 * than half the SMs, else 1),
 * "mla_wgmma" (1: fast MLA decode on wgmma, 0: on mma.sync), "mla_cl" (64, default: the wgmma MLA
 * as a cluster of two head groups sharing each key tile's conversion, when the heads are a
 * multiple of 128, 64-key tiles; 32: the same with 32-key tiles, four buffers; 0: "mla_ws"
 * decides), "fp8_pdl" (1, default with "pdl": the activation quantization launched under
 * the kernel before it, cu_linear's FP8 kernel under the quantization, its first weights loaded
 * before it waits, and the split-K reduce under it; 0: each kernel after the one before),
 * "pdl_ops" (1, default with "pdl": the norms, add, SiLU x up, RoPE, the Hadamard quantization,
 * the cache stores, the router's choice, the experts' routing and their combine launched under the
 * kernel before them, each waiting at its start; 0: after it),
 * "mla_cl_nocopy" (1: a diagnostic, that kernel without its copies to the peer: wrong results, the
 * copies' time), "mla_ws" (1, default: the wgmma MLA warp-specialized, 32-key tiles; 0: both
 * warpgroups in every step, 64-key tiles), "mla_prof" (1: count the wgmma MLA kernel's cycles per
 * phase, read by dsv32_cuda_mla_prof, which takes "mla_ws"'s kernels), "idx_tma" (1: the FP8
 * indexer's cache blocks by TMA), "idx_l2_normal" (1: those TMA reads without the evict-first L2
 * hint), "idx_copy_only" (diagnostics of the FP8 indexer: 1, it reads its blocks and computes
 * nothing; 2, it computes the scores and does not store them), "idx_items" (1, default: the
 * indexer's work list as equal items, rounded down in number; 0: items of a fixed block count, the
 * last one short), "idx_poison" (1, tests: the indexer's score scratch set to NaN before each call,
 * so that a score no kernel wrote shows), "idx_pipe" (1: the FP8 wgmma indexer runs a block's
 * epilogue under the next block's MMAs when every work item has one row, decode; 0, default: in
 * turn), "idx_sample" (1: the FP8 wgmma indexer, when every work item has one row, scores a
 * sample of each row's cache blocks first, takes from it a threshold at about twice the k-th
 * score's rank, writes only the scores above it, selects among those, and scores the rows where
 * fewer than k came above it again in full; the same selection; 0, default: every score written),
 * "idx_sample_stride" (that sample's cache blocks: every Nth at least; 0, default: 64),
 * "mla_ostage" (1, default: the cluster MLA's O, for one split in bf16, goes out through shared
 * memory in whole 16-byte chunks; 0: stored from the accumulators, 4 bytes a lane; 2: not stored,
 * a diagnostic of the stores' time),
 * "idx_msum" (1, default: the FP8 wgmma indexer's ReLU, head weights and head sum on the tensor
 * core, the ReLU'd logits rounded to bf16 as a second MMA's A operand; 0: by FMAs in f32),
 * "idx_s16" (1, default: the FP8 wgmma indexer's scores rounded to f16, saturated at +-65504, and
 * stored in 16 bits for the top-k, whose ties at the k-th score then keep the lowest positions as
 * always; 0: f32),
 * "mla_q6" (1: the warp-specialized MLA stages Q with six loads in flight a thread instead
 * of four), "dsa_chunks" (N >= 2: the dsa op cuts the rows in up to N chunks and runs chunk i's MLA
 * beside chunk i + 1's indexer on disjoint SMs, dsa.cu; 0 or 1: the indexer, then the MLA),
 * "dsa_idx_sms" (the SMs of the indexer's partition there; 0: half), "dsa_skip" (benchmarks: the
 * chunked dsa op without its MLAs, 1, or its indexers, 2), "pdl" (1, default: the dsa op's FP8
 * scores, top-k and cluster MLA kernels by programmatic dependent launch, each starting under its
 * predecessor's tail; 0: plain stream order), "lat16" (1, the fast numerics' default: the MLA
 * latents of mla_absorb, mla, dsa and mla_expand in bf16, and the backend's lat_bf16 with it; 0:
 * f32, for same-run comparisons; the caller's latent buffers must hold the type set; -EINVAL in the
 * exact numerics). Returns 0 or -EINVAL. */
int dsv32_cuda_set_knob(struct dsv32_backend *be, const char *name, int value);
/* The current value of a knob above ("mla_prof" excluded); 0 or -EINVAL. */
int dsv32_cuda_get_knob(struct dsv32_backend *be, const char *name, int *value);
/* The SMs of the dsa op's two partitions (indexer, MLA) as the driver made them, and how many
 * calls ran chunks side by side since the backend was created; 0, or -1 when none was made. */
int dsv32_cuda_dsa_info(struct dsv32_backend *be, int sms[2], long *overlapped_calls);
/* Tests: how many indexer calls (chunks of rows) took the sampled path (knob "idx_sample") since
 * the backend was created, and how many rows of the last one fewer than k candidates served (the
 * dense pass did); waits for the stream. */
int dsv32_cuda_idx_sample_stats(struct dsv32_backend *be, long *calls, int *missed);
/* With the knob "mla_prof" 1: the wgmma MLA kernel's cycles per phase since the last call, summed
 * over the two warpgroups' first threads: out[8 wg + phase] for the phases of mla_wg_kernel's
 * tile loop (mla.cu names them); out[16] the tiles of warpgroup 0; out[17], out[18] thread 0's
 * cycles before and after the loop, out[19] the CTAs.
 * The counters restart at zero. */
int dsv32_cuda_mla_prof(struct dsv32_backend *be, unsigned long long out[20]);
/* Tests: the indexer's scores of the last call's last chunk of rows (row i at i * ld, ld the call's
 * longest context rounded up to 64; rows of at most k positions unwritten), n floats into out
 * (widened from f16 when the FP8 wgmma indexer stored them so: knob "idx_s16"); 0, or -EINVAL when
 * the scratch holds fewer. */
int dsv32_cuda_idx_scores(struct dsv32_backend *be, float *out, size_t n);
/* What the cuBLASLt block-scaled FP8 calibration found (calibrates on first call). */
const char *dsv32_cuda_lt_status(struct dsv32_backend *be);

enum dsv32_cuda_fill {
    DSV32_FILL_F32_NORMAL,  /* n floats ~ N(0, scale^2) */
    DSV32_FILL_F32_UNIFORM, /* n floats in [0, scale) */
    DSV32_FILL_E4M3,        /* n bytes: e4m3 of N(0, scale^2) */
    DSV32_FILL_BF16_NORMAL, /* n bf16 values ~ N(0, scale^2) */
    DSV32_FILL_MLA_CACHE,   /* n records of the backend's MLA layout: e4m3 latents of N(0, 1)*64,
                               power-of-two scales around scale/64, rope ~ N(0, 1) */
    DSV32_FILL_IDX_CACHE,   /* n indexer-key blocks: e4m3 of N(0, 1)*64, scales ~ scale/64 */
};
/* Fills device memory with pseudo-random values (a counter-based hash of seed and index). */
int dsv32_cuda_fill(struct dsv32_backend *be, void *dst, size_t n, enum dsv32_cuda_fill kind,
                    uint64_t seed, float scale);
/* Random ascending selections: sel[r, 0:k] distinct positions in [0, pos[r]] (all of them when
 * pos[r] < k, then -1 padding), pos a device array of rows entries. */
int dsv32_cuda_random_selection(struct dsv32_backend *be, int32_t *sel, const int32_t *pos, int rows,
                                int k, uint64_t seed);
/* A weight made directly in device memory (no host data): name, dtype, shape, random values with
 * standard deviation std (FP8: e4m3 values with power-of-two block scales; vectors of norms:
 * pass std < 0 for all ones). The result is prepared (w->be set) and released as usual. */
int dsv32_cuda_weight_random(struct dsv32_backend *be, struct dsv32_weight *w, const char *name,
                             enum dsv32_dtype dt, int64_t rows, int64_t cols, uint64_t seed,
                             float std);

/* Device-event timing on the backend's stream: start, then stop returns the milliseconds. */
int dsv32_cuda_timer_start(struct dsv32_backend *be);
int dsv32_cuda_timer_stop(struct dsv32_backend *be, float *ms);
/* A kernel that holds the backend's stream for us microseconds: the host queues work behind it,
 * so that a timer started after it times the device alone, not the host's launches. */
int dsv32_cuda_spin(struct dsv32_backend *be, int us);
/* Ceilings measured on this GPU: device-to-device copy bandwidth (bytes read + written per
 * second, median of iters) and the bf16 GEMM rate of cuBLAS (m x n x k, f32 accumulation,
 * random data, median of iters). */
int dsv32_cuda_copy_bandwidth(struct dsv32_backend *be, size_t bytes, int iters, double *gbps);
int dsv32_cuda_bf16_gemm_rate(struct dsv32_backend *be, int m, int n, int k, int iters,
                              double *tflops);
/* The device's name and multiprocessor count. */
int dsv32_cuda_device_info(struct dsv32_backend *be, char *name, size_t cap, int *n_sm);

#ifdef __cplusplus
}
#endif

#endif
