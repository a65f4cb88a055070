/* The MoE of the cuda backend: the noaux_tc router (sigmoid scores, bias for selection only,
 * group-limited top-k with the top-2-sum group score, weights normalized and scaled) and the
 * routed experts as grouped GEMMs: rows are sorted by expert on the device (no host sync), the
 * gate/up projections run with SiLU x up fused, the down projection writes one row per (token,
 * expert) and a combine pass sums them per token in ascending expert order, as cpu_backend.c
 * does. FP8 experts in the fast mode run on the FP8 tensor-core kernel of gemm.cu (with the
 * intermediate FP8 quantization fused); otherwise f32 kernels over the stored weights. */
#ifndef DSV32_CUDA_MOE_CUH
#define DSV32_CUDA_MOE_CUH

#include "common.cuh"

int cu_moe_gate(struct cu_ctx *c, int32_t *ids, float *w, const float *x, int rows,
                const struct dsv32_weight *gate, const struct dsv32_weight *bias);
int cu_moe_experts(struct cu_ctx *c, float *y, const float *x, int rows, const int32_t *ids,
                   const float *w, int k, const struct dsv32_ffn_weights *experts, int n_experts,
                   int ue8m0);
/* forgets the cached per-layer expert pointer tables (weights were released) */
void cu_moe_tables_free(struct cu_ctx *c);

#endif
