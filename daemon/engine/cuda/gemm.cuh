/* GEMMs of the cuda backend: y = x W^T for every weight format, and the MLA absorption GEMMs.
 *  - exact mode: cuBLAS f32 (pedantic: no TF32) on the dequantized weight; FP8 weights first
 *    quantize-dequantize x per 1x128 block exactly as DeepSeek's act_quant (cpu_backend.c).
 *  - fast mode, bf16 weights: x to bf16, cuBLAS bf16 GEMM with f32 accumulation and output.
 *  - fast mode, FP8 weights: x to e4m3 + 1x128 scales, then either cuBLASLt's block-scaled FP8
 *    matmul (VEC128 activations x BLK128x128 weights; used for many rows, once a calibration
 *    run has found the scale layout cuBLASLt accepts and checked its result) or this file's FP8
 *    kernel: mma.sync f16 tensor cores on exact e4m3 -> f16 conversions, per-128-K-block f32
 *    promotion with the two scales, weights staged through a cp.async shared-memory pipeline and
 *    streamed once per 32 rows. The same kernel runs the grouped expert GEMMs of moe.cu (many
 *    weights, few rows each; fused SiLU x up + FP8 quantization of the result); from 24
 *    expected rows per group a wgmma kernel on the FP8 tensor core takes them (not f32-exact).
 *    The routed experts' matrices are read in 128 x 128 tiles (cu_fp8_at; moe.cu tiles them),
 *    and a grouped launch has CTAs only for the groups with entries (grp_list).
 *    Knobs fp8_reg and fp8_no_wg select the previous kernels (dsv32_cuda_set_knob). */
#ifndef DSV32_CUDA_GEMM_CUH
#define DSV32_CUDA_GEMM_CUH

#include "common.cuh"

int cu_linear(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, int rows,
              const struct dsv32_weight *w, int ue8m0, int probe_sub);
int cu_mla_absorb(struct cu_ctx *c, void *q_lat, const float *q, int rows,
                  const struct dsv32_weight *wkv_b);
int cu_mla_expand(struct cu_ctx *c, float *o, const void *lat, int rows,
                  const struct dsv32_weight *wkv_b);
/* y[rows, out] = x[rows, in] W^T in f32 (cuBLAS pedantic f32), W dense f32 [out, in] */
int cu_sgemm_xwt(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, int rows,
                 const float *w, int out, int in);
int cu_bgemm_xwt(struct cu_ctx *c, float *y, int ldy, const __nv_bfloat16 *x, int ldx, int rows,
                 const __nv_bfloat16 *w, int out, int in);

/* The FP8 GEMM kernel's work: for each group g (expert) the list entries [off[g], off[g+1]) (or
 * [0, M) with one group), entry e reading activation row row_x[e] (e when NULL). */
struct cu_fp8_gemm {
    const uint8_t *xq;  /* (*, K) e4m3 */
    const float *xs;    /* (*, K/128) */
    int K, N;           /* reduction length (multiple of 128), outputs per row (multiple of 16) */
    int n_groups;
    const uint8_t *const *w1; const float *const *s1; /* per group (device arrays), NULL = skip */
    const uint8_t *const *w3; const float *const *s3; /* SwiGLU's second weight (w3 = up) */
    const uint8_t *w; const float *ws;                /* the weight when n_groups == 1 */
    int w_tiled;        /* the weights in cu_fp8_at's 128 x 128 tiles (not cuBLASLt's way) */
    const int *grp_off; /* (n_groups + 1) or NULL */
    /* with grp_off, or NULL: the groups with entries in ascending order and their count at
     * [n_groups]; the launch then has CTAs for at most min(n_groups, M) groups instead of all */
    const int *grp_list;
    int M;              /* entries when grp_off is NULL */
    const int *row_x;
    /* plain output: y[e * ldy + n] */
    float *y;
    int ldy;
    /* SwiGLU output: h = silu(x w1) * (x w3) quantized per 1x128: hq (entries, N), hs (entries,
     * N/128); the probe sees (op, entry_sub[e], entry_row[e], n) */
    uint8_t *hq;
    float *hs;
    const int *entry_sub, *entry_row;
    int ue8m0;
    /* launched as a programmatic dependent of the kernel before it (cu_linear: act_quant, which
     * writes xq and xs): the pipelined kernel loads its first stages' weights before pdl_wait;
     * the split-K reduce is launched the same way under it */
    int pdl;
};
int cu_fp8_gemm_run(struct cu_ctx *c, const struct cu_fp8_gemm *a);

/* Finds (once) whether cuBLASLt's block-scaled FP8 matmul works here and with which layout. */
int cu_lt_calibrate(struct cu_ctx *c);

#endif
