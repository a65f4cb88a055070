/* The DSA lightning indexer on the GPU: for each query row, score[j] = kscale[j] * sum_h
 * relu(q_h . k_j) * w_h over the causal positions j <= pos of its sequence, read from the paged
 * FP8 indexer-key cache, then the top-k positions (k = 2048 for DeepSeek-V3.2) in ascending
 * order, -1 padded; the function of cpu_backend.c's cpu_indexer, ties (equal scores) going to
 * the lower position as there. Decode (1-2 query rows per sequence) and prefill (many causal rows)
 * share one kernel: a CTA takes up to 4 consecutive rows of one sequence and a range of cache
 * blocks. */
#ifndef DSV32_CUDA_INDEXER_CUH
#define DSV32_CUDA_INDEXER_CUH

#include "common.cuh"

int cu_indexer(struct cu_ctx *c, int32_t *sel, const uint8_t *q, const float *q_scale,
               const float *w_raw, const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m,
               int topk);

#endif
