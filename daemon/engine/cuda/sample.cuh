/* The backend's sample op: the next token of rows of logits drawn on the device, greedy or over
 * the whole vocabulary, with logprobs (backend.h, sampling.h's dsv32_draw). */
#ifndef DSV32_CUDA_SAMPLE_CUH
#define DSV32_CUDA_SAMPLE_CUH

#include "common.cuh"

struct dsv32_draw;
struct dsv32_logprobs;

/* n draws d (host) on logits rows rows[i] (device, vocab V each): tok and lp (host) */
int cu_sample(struct cu_ctx *c, int32_t *tok, struct dsv32_logprobs *lp, const float *logits, int V,
              const int32_t *rows, const struct dsv32_draw *d, int n);

#endif
