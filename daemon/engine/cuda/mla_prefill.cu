/* MLA prefill in the MHA form (see mla_prefill.cuh): f32 throughout. The expansion GEMM is
 * cu_linear (cuBLAS f32 in exact mode, the FP8 paths in fast mode); the attention is one CTA per
 * (row, head): in the exact mode in the cpu's loop order, else 4 warps taking keys in turn. */
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
    /* the cpu's arithmetic, in three passes over the keys (no running rescale, which would add
     * roundings): the maximum score, the sum of exp(s - max), then sum_j (p_j / sum) v_j */
    const int n_keys = sel ? n_sel : pos + 1;
    auto score = [&](int p) {
        const float *k = kvb + (size_t)p * H * hs + (size_t)h * hs;
        const float *pe = pbuf + (size_t)p * R;
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < PF_MAX; i++)
            if (lane + 32 * i < nope)
                part = __fadd_rn(part, __fmul_rn(qn[i], k[lane + 32 * i]));
#pragma unroll
        for (int i = 0; i < PF_MAX; i++)
            if (lane + 32 * i < R)
                part = __fadd_rn(part, __fmul_rn(qr[i], pe[lane + 32 * i]));
        return cu_warp_sum(part) * scale;
    };
    auto key_at = [&](int jj) { return sel ? sel[(size_t)t * n_sel + jj] : jj; };
    float mx = -INFINITY;
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p >= 0 && p <= pos)
            mx = fmaxf(mx, score(p));
    }
    if (lane == 0)
        sm_m[warp] = mx;
    __syncthreads();
    const float M = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
    float sum = 0.0f;
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p >= 0 && p <= pos)
            sum += expf(score(p) - M);
    }
    if (lane == 0)
        sm_l[warp] = sum;
    __syncthreads();
    const float L = sm_l[0] + sm_l[1] + sm_l[2] + sm_l[3];
    for (int jj = warp; jj < n_keys; jj += 4) {
        const int p = key_at(jj);
        if (p < 0 || p > pos)
            continue;
        const float pj = expf(score(p) - M) / L;
        const float *v = kvb + (size_t)p * H * hs + (size_t)h * hs + nope;
#pragma unroll
        for (int i = 0; i < PF_MAX; i++)
            if (lane + 32 * i < V)
                acc[i] = __fadd_rn(acc[i], __fmul_rn(pj, v[lane + 32 * i]));
    }
#pragma unroll
    for (int i = 0; i < PF_MAX; i++)
        sm_o[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float *oh = o + (size_t)t * H * V + (size_t)h * V;
    for (int d = threadIdx.x; d < V; d += blockDim.x)
        oh[d] = M == -INFINITY ? 0.0f : ((sm_o[0][d] + sm_o[1][d]) + sm_o[2][d]) + sm_o[3][d];
}

#define PF_SEQ_MAX 4096 /* keys per row the cpu-order kernel holds in shared memory */

/* The exact mode's attention: cpu_mla_prefill's loops in its order (the kept positions in
 * selection order, each score a sequential unfused dot over nope then rope, the maximum, exp,
 * a sequential sum, then o[d] += (p_j / sum) v_j[d] over j in order): on the cpu's inputs it
 * gives the cpu's bits up to expf's last place. One CTA per (row, head). */
static __global__ void __launch_bounds__(128) prefill_attn_seq_kernel(
    float *o, const float *q, const int32_t *sel, int n_sel, const float *kvb, const float *pbuf,
    const int32_t *row_pos, int row0, int H, int nope, int R, int V, float scale)
{
    __shared__ int list[PF_SEQ_MAX];
    __shared__ float p[PF_SEQ_MAX];
    __shared__ int sh_n;
    __shared__ float sh_mx, sh_sum;
    const int h = blockIdx.x, t = row0 + blockIdx.y, tid = threadIdx.x;
    const int qk = nope + R, hs = nope + V, pos = row_pos[t];
    const float *qh = q + (size_t)t * H * qk + (size_t)h * qk;
    if (tid == 0) {
        int n = 0;
        if (sel) {
            for (int j = 0; j < n_sel; j++) {
                const int sp = sel[(size_t)t * n_sel + j];
                if (sp >= 0 && sp <= pos && n < PF_SEQ_MAX)
                    list[n++] = sp;
            }
        } else {
            for (int j = 0; j <= pos && n < PF_SEQ_MAX; j++)
                list[n++] = j;
        }
        sh_n = n;
    }
    __syncthreads();
    const int n = sh_n;
    for (int j = tid; j < n; j += blockDim.x) {
        const float *k = kvb + (size_t)list[j] * H * hs + (size_t)h * hs, *pe = pbuf + (size_t)list[j] * R;
        float dot = 0.0f;
        for (int d = 0; d < nope; d++)
            dot = __fadd_rn(dot, __fmul_rn(qh[d], k[d]));
        for (int d = 0; d < R; d++)
            dot = __fadd_rn(dot, __fmul_rn(qh[nope + d], pe[d]));
        p[j] = __fmul_rn(dot, scale);
    }
    __syncthreads();
    if (tid == 0) {
        float mx = -INFINITY;
        for (int j = 0; j < n; j++)
            mx = fmaxf(mx, p[j]);
        sh_mx = mx;
    }
    __syncthreads();
    for (int j = tid; j < n; j += blockDim.x)
        p[j] = expf(p[j] - sh_mx);
    __syncthreads();
    if (tid == 0) {
        float sum = 0.0f;
        for (int j = 0; j < n; j++)
            sum = __fadd_rn(sum, p[j]);
        sh_sum = sum;
    }
    __syncthreads();
    float *oh = o + (size_t)t * H * V + (size_t)h * V;
    for (int d = tid; d < V; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++)
            acc = __fadd_rn(acc, __fmul_rn(p[j] / sh_sum, kvb[(size_t)list[j] * H * hs + (size_t)h * hs + nope + d]));
        oh[d] = acc;
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
        if (!c->fast && (sel ? n_sel : n_ctx) <= PF_SEQ_MAX)
            prefill_attn_seq_kernel<<<dim3(H, r1 - r0), 128, 0, c->st>>>(o, q, sel, n_sel, kvb, pbuf, m->d_row_pos,
                                                                         r0, H, nope, R, V, scale);
        else
            prefill_attn_kernel<<<dim3(H, r1 - r0), 128, 0, c->st>>>(o, q, sel, n_sel, kvb, pbuf, m->d_row_pos, r0,
                                                                     H, nope, R, V, scale);
        CU_LAUNCHED("prefill_attn");
        r0 = r1;
    }
    return 0;
}
