/* FP8 e4m3 activation quantization on the GPU, everywhere DeepSeek's reference quantizes
 * activations: GEMM inputs per 1x128 block (act_quant), the indexer's Hadamard + quantization of
 * q and k, and the cache stores (MLA latent to e4m3 + scales + rope, indexer keys). Rounding is
 * the bit-exact port of dtype.c; each entry point honours the FP8 tie probe when one is installed
 * (reports near-ties, applies flips) and costs nothing extra when none is. */
#ifndef DSV32_CUDA_QUANT_CUH
#define DSV32_CUDA_QUANT_CUH

#include "common.cuh"

/* x[rows, K] (row stride ldx, K a multiple of 128) quantized per 1x128 block. Outputs (each may be
 * NULL): xdq = dequantized values (f32, dense [rows, K]); xq = e4m3 bytes [rows, K]; xs = scales
 * [rows, K/128]; xs_t = scales transposed [K/128, ld_t] (cuBLASLt's outer-dimension-major
 * layout). The probe sees value (r, col) as (op, sub, r, col). */
int cu_act_quant(struct cu_ctx *c, const float *x, int ldx, int rows, int K, int ue8m0, int sub,
                 float *xdq, uint8_t *xq, float *xs, float *xs_t, int ld_t);
int cu_hadamard_quant(struct cu_ctx *c, uint8_t *q, float *scale, const float *x, int n, int ue8m0);
int cu_kv_store(struct cu_ctx *c, const struct dsv32_kv_layer *kv, const float *latent, int ld_lat,
                const float *pe, int ld_pe, const struct dsv32_step_meta *m, int ue8m0);
int cu_index_store(struct cu_ctx *c, const struct dsv32_kv_layer *kv, const uint8_t *k,
                   const float *k_scale, const struct dsv32_step_meta *m);

#endif
