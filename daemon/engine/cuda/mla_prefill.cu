/* MLA prefill in the MHA form (see mla_prefill.cuh): f32 throughout. The expansion GEMM is
 * cu_linear (cuBLAS f32 in exact mode, the FP8 paths in fast mode); the attention is one CTA per
 * (row, head), 4 warps taking keys in turn with an online softmax each, merged at the end. */
#include "mla_prefill.cuh"

#include "gemm.cuh"

#include <errno.h>

#define PF_MAX 8 /* per-lane values: nope, rope, v up to 256 */

/* cbuf[j, :] = latent of position j (dequantized), pbuf[j, :] = its rope, j < n */
static __global__ void decode_cache_kernel(float *cbuf, float *pbuf, int n, const uint8_t *mla, int rec_bytes,
                                           int C, int R, int rope_f32, const int32_t *blocks, int max_blocks,
                                           int seq)
{
    const int j = blockIdx.x;
    if (j >= n)
        return;
    const int64_t slot = (int64_t)blocks[(size_t)seq * max_blocks + j / DSV32_KV_BLOCK_TOKENS] *
                             DSV32_KV_BLOCK_TOKENS + j % DSV32_KV_BLOCK_TOKENS;
    const uint8_t *rec = mla + (size_t)slot * rec_bytes;
    const float *sc = reinterpret_cast<const float *>(rec + C);
    const uint8_t *pr = rec + C + 4 * (C / 128);
    for (int d = threadIdx.x; d < C; d += blockDim.x)
        cbuf[(size_t)j * C + d] = __fmul_rn(cu_e4m3_to_f32(rec[d]), sc[d / 128]);
    for (int d = threadIdx.x; d < R; d += blockDim.x)
        pbuf[(size_t)j * R + d] = rope_f32 ? reinterpret_cast<const float *>(pr)[d]
                                           : cu_bf16_bits_to_f32(reinterpret_cast<const uint16_t *>(pr)[d]);
}

static __global__ void __launch_bounds__(128) prefill_attn_kernel(
    float *o, const float *q, const int32_t *sel, int n_sel, const float *kvb, const float *pbuf,
    const int32_t *row_pos, int row0, int H, int nope, int R, int V, float scale)
{
    __shared__ float sm_m[4], sm_l[4], sm_o[4][PF_MAX * 32];
    const int h = blockIdx.x, t = row0 + blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int qk = nope + R, hs = nope + V, pos = row_pos[t];
    const float *qh = q + (size_t)t * H * qk + (size_t)h * qk;
    float qn[PF_MAX], qr[PF_MAX], acc[PF_MAX];
#pragma unroll
    for (int i = 0; i < PF_MAX; i++) {
        qn[i] = lane + 32 * i < nope ? qh[lane + 32 * i] : 0.0f;
        qr[i] = lane + 32 * i < R ? qh[nope + lane + 32 * i] : 0.0f;
        acc[i] = 0.0f;
    }
    float mrun = -INFINITY, lrun = 0.0f;
    const int n_keys = sel ? n_sel : pos + 1;
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = sel ? sel[(size_t)t * n_sel + jj] : jj;
        if (p < 0 || p > pos)
            continue;
        const float *k = kvb + (size_t)p * H * hs + (size_t)h * hs;
        const float *pe = pbuf + (size_t)p * R;
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < PF_MAX; i++) {
            if (lane + 32 * i < nope)
                part += qn[i] * k[lane + 32 * i];
            if (lane + 32 * i < R)
                part += qr[i] * pe[lane + 32 * i];
        }
        const float s = cu_warp_sum(part) * scale;
        const float mnew = fmaxf(mrun, s);
        const float alpha = mrun == -INFINITY ? 0.0f : expf(mrun - mnew);
        const float pj = expf(s - mnew);
        lrun = lrun * alpha + pj;
#pragma unroll
        for (int i = 0; i < PF_MAX; i++)
            acc[i] = acc[i] * alpha + (lane + 32 * i < V ? pj * k[nope + lane + 32 * i] : 0.0f);
        mrun = mnew;
    }
    if (lane == 0) {
        sm_m[warp] = mrun;
        sm_l[warp] = lrun;
    }
#pragma unroll
    for (int i = 0; i < PF_MAX; i++)
        sm_o[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    const float M = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
    float f[4], L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        f[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);
        L += sm_l[w] * f[w];
    }
    float *oh = o + (size_t)t * H * V + (size_t)h * V;
    for (int d = threadIdx.x; d < V; d += blockDim.x) {
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; w++)
            s += sm_o[w][d] * f[w];
        oh[d] = M == -INFINITY ? 0.0f : s / L;
    }
}

int cu_mla_prefill(struct cu_ctx *c, float *o, const float *q, const int32_t *sel, int n_sel,
                   const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m, float scale,
                   const struct dsv32_weight *wkv_b, int ue8m0)
{
    const struct dsv32_config *cf = c->cfg;
    const struct dsv32_kv_geom *g = &c->geom;
    const int H = cf->num_attention_heads, C = g->kv_lora, R = g->rope;
    const int nope = cf->qk_nope_head_dim, V = cf->v_head_dim, hs = nope + V;
    if (nope > 32 * PF_MAX || R > 32 * PF_MAX || V > 32 * PF_MAX)
        return DSV32_ECONFIG;
    for (int r0 = 0; r0 < m->n_rows;) {
        if (!m->h_row_mha[r0]) {
            r0++;
            continue;
        }
        const int seq = m->h_row_seq[r0];
        int r1 = r0, last = 0;
        while (r1 < m->n_rows && m->h_row_mha[r1] && m->h_row_seq[r1] == seq) {
            if (m->h_row_pos[r1] > last)
                last = m->h_row_pos[r1];
            r1++;
        }
        const int n_ctx = last + 1;
        float *cbuf = (float *)cu_scratch(c, SCR_PREF_A, sizeof(float) * (size_t)n_ctx * C);
        float *pbuf = (float *)cu_scratch(c, SCR_PREF_B, sizeof(float) * (size_t)n_ctx * R);
        float *kvb = (float *)cu_scratch(c, SCR_PREF_C, sizeof(float) * (size_t)n_ctx * H * hs);
        if (!cbuf || !pbuf || !kvb)
            return -ENOMEM;
        decode_cache_kernel<<<n_ctx, 128, 0, c->st>>>(cbuf, pbuf, n_ctx, kv->mla, g->mla_rec_bytes, C, R,
                                                       g->rope_f32, m->d_blocks, m->max_blocks, seq);
        CU_LAUNCHED("decode_cache");
        CU_TRY(cu_linear(c, kvb, H * hs, cbuf, C, n_ctx, wkv_b, ue8m0, seq));
        prefill_attn_kernel<<<dim3(H, r1 - r0), 128, 0, c->st>>>(o, q, sel, n_sel, kvb, pbuf, m->d_row_pos, r0,
                                                                 H, nope, R, V, scale);
        CU_LAUNCHED("prefill_attn");
        r0 = r1;
    }
    return 0;
}
