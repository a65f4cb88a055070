/* The small ops of the cuda backend: embedding, RMSNorm, LayerNorm, residual add, SiLU x up,
 * both RoPE layouts, row gather, and the conversions weights and GEMM inputs need (dequantize a
 * stored tensor to f32 or bf16, f32 activations to bf16). Each computes what cpu_backend.c
 * computes; products that the cpu does without fusing are kept unfused (__fmul_rn) so that the
 * results agree to the bit where the cpu's order of operations is followed; in the exact mode the
 * norms also sum in the cpu's order (one thread per row), in the fast mode as a tree. */
#ifndef DSV32_CUDA_SMALL_OPS_CUH
#define DSV32_CUDA_SMALL_OPS_CUH

#include "common.cuh"

int cu_embed(struct cu_ctx *c, float *y, const int32_t *ids, int n, const struct cu_weight *table);
int cu_rmsnorm(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, const float *g,
               int rows, int dim, float eps);
int cu_layernorm(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, const float *g,
                 const float *b, int rows, int dim, float eps);
int cu_add(struct cu_ctx *c, float *y, const float *x, size_t n);
int cu_silu_mul(struct cu_ctx *c, float *y, const float *g, const float *u, int rows, int dim);
int cu_rope(struct cu_ctx *c, float *x, int rows, int heads, int ldr, int ldh, const int32_t *pos,
            int interleaved);
int cu_gather_rows(struct cu_ctx *c, float *y, const float *x, const int32_t *idx, int n, int dim);
int cu_rows_pack(struct cu_ctx *c, void *dst, const float *x, const int32_t *idx, int n, int dim,
                 int bf16);
int cu_rows_unpack(struct cu_ctx *c, float *y, const void *src, const int32_t *idx, int n, int dim,
                   int bf16, int add);
/* src (device) holds rows x cols values of dtype dt (FP8: with scale, device); writes f32 and/or
 * bf16 (either may be NULL) */
int cu_dequant(struct cu_ctx *c, float *f32, __nv_bfloat16 *bf16, const void *src,
               enum dsv32_dtype dt, const float *scale, int64_t rows, int64_t cols);
/* y[r, 0:cols] = bf16(x[r * ldx + 0:cols]), y dense */
int cu_to_bf16(struct cu_ctx *c, __nv_bfloat16 *y, const float *x, int rows, int cols, int ldx);

#endif
