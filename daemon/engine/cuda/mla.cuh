/* Absorbed MLA over the paged FP8 cache (the decode form): for each row and head,
 * softmax(scale * (q_lat . c_j + q_pe . pe_j)) over the selected positions (sparse, DSA) or all
 * positions <= pos (dense), out = sum_j p_j c_j in latent space. Two kernels:
 *  - exact: f32 throughout, one CTA per (row, head); the cpu's function up to summation order.
 *  - fast (DeepSeek-V3.2 shapes: kv_lora 512, rope 64, heads a multiple of 64): bf16 tensor
 *    cores (mma.sync m16n8k16, f32 accumulation), 64 heads per CTA sharing each key tile, the
 *    cache records gathered with cp.async while the previous tile computes, online softmax,
 *    split over keys with a combine pass when rows are too few to fill the GPU. */
#ifndef DSV32_CUDA_MLA_CUH
#define DSV32_CUDA_MLA_CUH

#include "common.cuh"

/* q_lat and out: the latents, bf16 when c->lat16, else f32 (q_pe f32).
 * after_topk: the kernel launched just before on c->st is the top-k that wrote sel, and q_lat and
 * q_pe come from before it, so the cluster kernel may start under it (knob pdl) and stage Q before
 * it waits (cu_dsa); 0 anywhere else */
int cu_mla(struct cu_ctx *c, void *out, const void *q_lat, const float *q_pe, int ldr_pe,
           int ldh_pe, const int32_t *sel, int n_sel, const struct dsv32_kv_layer *kv,
           const struct dsv32_step_meta *m, float scale, int after_topk);
/* 1 when the fast kernel handles this configuration */
int cu_mla_fast_ok(const struct cu_ctx *c);

#endif
