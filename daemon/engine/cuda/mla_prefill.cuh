/* MLA in its prefill (MHA) form on the GPU, as DeepSeek's reference computes prefills and
 * cpu_backend.c's cpu_mla_prefill does: per sequence of the step, the cached latents of every
 * position up to its last row are decoded, expanded through wkv_b into k_nope and v (a GEMM with
 * FP8 input quantization when wkv_b is FP8; the probe sees rows as positions and the sequence's
 * step index as the sub-index), then each row and head attends to its selected positions. */
#ifndef DSV32_CUDA_MLA_PREFILL_CUH
#define DSV32_CUDA_MLA_PREFILL_CUH

#include "common.cuh"

int cu_mla_prefill(struct cu_ctx *c, float *o, const float *q, const int32_t *sel, int n_sel,
                   const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale,
                   const struct dsv32_weight *wkv_b, int ue8m0);

#endif
