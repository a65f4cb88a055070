/* DSA attention as one op (dsa.cu): the indexer's top-k selection, then sparse MLA over it, with
 * chunks of rows overlapped on two SM partitions when the knob dsa_chunks asks for it. */
#ifndef DSV32_CUDA_DSA_CUH
#define DSV32_CUDA_DSA_CUH

#include "common.cuh"

#define CU_DSA_MAX_CHUNKS 16

/* backend.h's dsa op: sel as the indexer op writes it, out as the mla op writes it */
int cu_dsa(struct cu_ctx *c, void *out, int32_t *sel, const uint8_t *q, const float *q_scale,
           const float *w_raw, int topk, const void *q_lat, const float *q_pe, int ldr_pe,
           int ldh_pe, const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m,
           float scale);
/* dsv32_cuda_dsa_info */
int cu_dsa_info(const struct cu_ctx *c, int sms[2], long *overlapped);
/* the partitions' contexts and streams (cuda_free) */
void cu_green_free(struct cu_ctx *c);

#endif
