/* FP8 activation quantization kernels (see quant.cuh). One warp per block of 128 values: lanes
 * hold 4 values each, the block's absolute maximum is a warp reduction, and each value is divided
 * by the scale (IEEE division, as the cpu does) and rounded with cu_quant. */
#include "quant.cuh"

static __global__ void act_quant_kernel(const float *x, int ldx, int rows, int K, int ue8m0,
                                        int sub, float *xdq, uint8_t *xq, float *xs, float *xs_t,
                                        int ld_t, struct cu_probe p)
{
    pdl_begin(); /* under the kernel before it (knob fp8_pdl); the GEMM after it may start */
    const int nb = K / 128, lane = threadIdx.x & 31;
    const long id = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (id >= (long)rows * nb)
        return;
    const int r = (int)(id / nb), b = (int)(id % nb);
    const float *xr = x + (size_t)r * ldx + b * 128;
    float v[4], amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        v[j] = xr[lane + 32 * j];
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = cu_warp_max(amax);
    const float s = cu_block_scale(amax, ue8m0);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int col = b * 128 + lane + 32 * j;
        const uint8_t q = cu_quant(v[j] / s, p, sub, r, col);
        if (xq)
            xq[(size_t)r * K + col] = q;
        if (xdq)
            xdq[(size_t)r * K + col] = __fmul_rn(cu_e4m3_to_f32(q), s);
    }
    if (lane == 0) {
        if (xs)
            xs[(size_t)r * nb + b] = s;
        if (xs_t)
            xs_t[(size_t)b * ld_t + r] = s;
    }
}

int cu_act_quant(struct cu_ctx *c, const float *x, int ldx, int rows, int K, int ue8m0, int sub,
                 float *xdq, uint8_t *xq, float *xs, float *xs_t, int ld_t)
{
    if (rows <= 0)
        return 0;
    if (K % 128)
        return DSV32_ESHAPE;
    struct cu_probe p;
    CU_TRY(cu_probe_begin(c, &p));
    const long warps = (long)rows * (K / 128);
    CU_CHECK(cu_launch_pdl(c, c->pdl && c->fp8_pdl, act_quant_kernel,
                           dim3((unsigned)((warps + 7) / 8)), dim3(256), 0, x, ldx, rows, K, ue8m0,
                           sub, xdq, xq, xs, xs_t, ld_t, p));
    CU_LAUNCHED("act_quant");
    return cu_probe_end(c, &p);
}

/* Fast Walsh-Hadamard transform of 128 values held 4 per lane (value 4*lane + i), in the cpu's
 * butterfly order: len 1 and 2 inside a lane, len 4..64 across lanes (partner lane ^ len/4). The
 * same operations on the same operands: bit-identical to cpu_backend.c's hadamard128. */
static __global__ void hadamard_quant_kernel(uint8_t *q, float *scale, const float *x, int n,
                                             int ue8m0, float hs, struct cu_probe p)
{
    pdl_begin(); /* cu_launch_dep */
    const int lane = threadIdx.x & 31;
    const long i = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= n)
        return;
    const float4 in = reinterpret_cast<const float4 *>(x + (size_t)i * 128)[lane];
    float v[4] = {in.x, in.y, in.z, in.w};
    /* len 1: pairs (0,1), (2,3); len 2: pairs (0,2), (1,3) */
    float a0 = v[0] + v[1], a1 = v[0] - v[1], a2 = v[2] + v[3], a3 = v[2] - v[3];
    v[0] = a0 + a2;
    v[2] = a0 - a2;
    v[1] = a1 + a3;
    v[3] = a1 - a3;
#pragma unroll
    for (int len = 4; len < 128; len <<= 1) {
        const int pl = len >> 2;
        const bool upper = (lane & pl) != 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float o = __shfl_xor_sync(0xffffffffu, v[j], pl);
            v[j] = upper ? o - v[j] : v[j] + o;
        }
    }
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        v[j] = __fmul_rn(v[j], hs);
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = cu_warp_max(amax);
    const float s = cu_block_scale(amax, ue8m0);
    uchar4 out;
    out.x = cu_quant(v[0] / s, p, 0, (int)i, 4 * lane + 0);
    out.y = cu_quant(v[1] / s, p, 0, (int)i, 4 * lane + 1);
    out.z = cu_quant(v[2] / s, p, 0, (int)i, 4 * lane + 2);
    out.w = cu_quant(v[3] / s, p, 0, (int)i, 4 * lane + 3);
    reinterpret_cast<uchar4 *>(q + (size_t)i * 128)[lane] = out;
    if (lane == 0)
        scale[i] = s;
}

int cu_hadamard_quant(struct cu_ctx *c, uint8_t *q, float *scale, const float *x, int n, int ue8m0)
{
    if (n <= 0)
        return 0;
    struct cu_probe p;
    CU_TRY(cu_probe_begin(c, &p));
    const float hs = (float)pow(128.0, -0.5);
    CU_CHECK(cu_launch_dep(c, hadamard_quant_kernel, dim3(cu_blocks((size_t)n, 8)), dim3(256), 0, q,
                           scale, x, n, ue8m0, hs, p));
    CU_LAUNCHED("hadamard_quant");
    return cu_probe_end(c, &p);
}

/* one block of 128 threads per row: warps quantize the latent's 128-blocks, then all threads
 * write the rope part (bf16, or f32 in the reference layout) */
static __global__ void kv_store_kernel(uint8_t *mla, int rec_bytes, int C, int R, int rope_f32,
                                       const float *latent, int ld_lat, const float *pe, int ld_pe,
                                       const int64_t *row_slot, int ue8m0, struct cu_probe p)
{
    pdl_begin(); /* cu_launch_dep */
    const int r = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint8_t *rec = mla + (size_t)row_slot[r] * rec_bytes;
    const float *lat = latent + (size_t)r * ld_lat;
    for (int b = w; b < C / 128; b += blockDim.x >> 5) {
        float v[4], amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            v[j] = lat[b * 128 + lane + 32 * j];
            amax = fmaxf(amax, fabsf(v[j]));
        }
        amax = cu_warp_max(amax);
        const float s = cu_block_scale(amax, ue8m0);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int col = b * 128 + lane + 32 * j;
            rec[col] = cu_quant(v[j] / s, p, 0, r, col);
        }
        if (lane == 0)
            reinterpret_cast<float *>(rec + C)[b] = s;
    }
    uint8_t *pr = rec + C + 4 * (C / 128);
    const float *pv = pe + (size_t)r * ld_pe;
    for (int i = threadIdx.x; i < R; i += blockDim.x) {
        if (rope_f32)
            reinterpret_cast<float *>(pr)[i] = pv[i];
        else
            reinterpret_cast<uint16_t *>(pr)[i] = cu_f32_to_bf16_bits(pv[i]);
    }
}

int cu_kv_store(struct cu_ctx *c, const struct dsv32_kv_layer *kv, const float *latent, int ld_lat,
                const float *pe, int ld_pe, const struct dsv32_step_meta *m, int ue8m0)
{
    if (m->n_rows <= 0)
        return 0;
    const struct dsv32_kv_geom *g = &c->geom;
    if (g->kv_lora % 128)
        return DSV32_ECONFIG;
    struct cu_probe p;
    CU_TRY(cu_probe_begin(c, &p));
    CU_CHECK(cu_launch_dep(c, kv_store_kernel, dim3(m->n_rows), dim3(128), 0, kv->mla,
                           g->mla_rec_bytes, g->kv_lora, g->rope, g->rope_f32, latent, ld_lat, pe,
                           ld_pe, (const int64_t *)m->d_row_slot, ue8m0, p));
    CU_LAUNCHED("kv_store");
    return cu_probe_end(c, &p);
}

static __global__ void index_store_kernel(uint8_t *idx, int block_bytes, const uint8_t *k,
                                          const float *k_scale, const int64_t *row_slot)
{
    pdl_begin(); /* cu_launch_dep */
    const int r = blockIdx.x;
    const int64_t slot = row_slot[r];
    uint8_t *blk = idx + (size_t)(slot / DSV32_KV_BLOCK_TOKENS) * block_bytes;
    const int off = (int)(slot % DSV32_KV_BLOCK_TOKENS);
    blk[off * 128 + threadIdx.x] = k[(size_t)r * 128 + threadIdx.x];
    if (threadIdx.x == 0)
        reinterpret_cast<float *>(blk + DSV32_KV_BLOCK_TOKENS * 128)[off] = k_scale[r];
}

int cu_index_store(struct cu_ctx *c, const struct dsv32_kv_layer *kv, const uint8_t *k,
                   const float *k_scale, const struct dsv32_step_meta *m)
{
    if (m->n_rows <= 0)
        return 0;
    CU_CHECK(cu_launch_dep(c, index_store_kernel, dim3(m->n_rows), dim3(128), 0, kv->idx,
                           c->geom.idx_block_bytes, k, k_scale, (const int64_t *)m->d_row_slot));
    CU_LAUNCHED("index_store");
    return 0;
}
