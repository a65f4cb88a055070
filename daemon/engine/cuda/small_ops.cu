/* Small ops of the cuda backend (see small_ops.cuh): one thread block per row for the norms, a
 * grid-stride loop for elementwise work. Memory-bound, and at a few rows bound by the latency of
 * their loads: a thread's loads of a row are issued together (SMALL_ILP at a time) rather than
 * one per loop trip, which made a 7168-wide RMSNorm of one row 8.3 us, the embedding 12.6 and
 * the 128-head RoPE (one CTA a row) 9.8 under Nsight Compute (docs/GPU-NOTES.md, 2026-11-30). */
#include "small_ops.cuh"

/* sum over the block (blockDim.x a multiple of 32, <= 1024) */
static __device__ float block_sum(float v, float *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_sum(v);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0)
        sh[w] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.0f;
    return cu_warp_sum(t);
}

template <typename T> static __device__ __forceinline__ float load_as_f32(const T *p, size_t i);
template <> __device__ __forceinline__ float load_as_f32<float>(const float *p, size_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load_as_f32<__nv_bfloat16>(const __nv_bfloat16 *p, size_t i)
{
    return __bfloat162float(p[i]);
}

#define SMALL_ILP 8

template <typename T>
static __global__ void embed_kernel(float *y, const int32_t *ids, const T *table, int64_t vocab, int dim)
{
    const int i = blockIdx.x;
    const int32_t id = ids[i];
    float *yr = y + (size_t)i * dim;
    if (id < 0 || id >= vocab) { /* the engine validates ids; make a bad one visible, not a crash */
        for (int d = threadIdx.x; d < dim; d += blockDim.x)
            yr[d] = __int_as_float(0x7fc00000);
        return;
    }
    const int nb = blockDim.x;
    for (int d0 = threadIdx.x; d0 < dim; d0 += SMALL_ILP * nb) {
        float t[SMALL_ILP];
#pragma unroll
        for (int k = 0; k < SMALL_ILP; k++)
            t[k] = d0 + k * nb < dim ? load_as_f32(table, (size_t)id * dim + d0 + k * nb) : 0.0f;
#pragma unroll
        for (int k = 0; k < SMALL_ILP; k++)
            if (d0 + k * nb < dim)
                yr[d0 + k * nb] = t[k];
    }
}

int cu_embed(struct cu_ctx *c, float *y, const int32_t *ids, int n, const struct cu_weight *t)
{
    if (n <= 0)
        return 0;
    if (t->f32)
        embed_kernel<float><<<n, 256, 0, c->st>>>(y, ids, t->f32, t->rows, (int)t->cols);
    else if (t->bf16)
        embed_kernel<__nv_bfloat16><<<n, 256, 0, c->st>>>(y, ids, t->bf16, t->rows, (int)t->cols);
    else
        return DSV32_EUNSUPPORTED;
    CU_LAUNCHED("embed");
    return 0;
}

/* sum over the row in the cpu's order (one thread, unfused): the exact mode's norms then give
 * the cpu's bits on the cpu's inputs, so that FP8 roundings downstream see the same values */
static __device__ float seq_sum_sq(const float *x, int dim, float mean, float *sh)
{
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < dim; i++) {
            const float d = __fsub_rn(x[i], mean);
            s = __fadd_rn(s, __fmul_rn(d, d));
        }
        sh[0] = s;
    }
    __syncthreads();
    const float s = sh[0];
    __syncthreads();
    return s;
}

static __device__ float seq_sum(const float *x, int dim, float *sh)
{
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int i = 0; i < dim; i++)
            s = __fadd_rn(s, x[i]);
        sh[0] = s;
    }
    __syncthreads();
    const float s = sh[0];
    __syncthreads();
    return s;
}

static __global__ void rmsnorm_kernel(float *y, int ldy, const float *x, int ldx, const float *g,
                                      int dim, float eps, int seq)
{
    pdl_begin(); /* cu_launch_dep */
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float *yr = y + (size_t)blockIdx.x * ldy;
    float ss = 0.0f;
    const int nb = blockDim.x;
    if (!seq && dim <= SMALL_ILP * nb) {
        /* the row in registers, its loads and the weights' issued at once; the same sums */
        float v[SMALL_ILP], gv[SMALL_ILP];
#pragma unroll
        for (int k = 0; k < SMALL_ILP; k++) {
            const int i = threadIdx.x + k * nb;
            v[k] = i < dim ? xr[i] : 0.0f;
            gv[k] = i < dim ? g[i] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < SMALL_ILP; k++)
            ss += v[k] * v[k];
        ss = block_sum(ss, sh);
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll
        for (int k = 0; k < SMALL_ILP; k++)
            if (threadIdx.x + k * nb < dim)
                yr[threadIdx.x + k * nb] = __fmul_rn(gv[k], __fmul_rn(v[k], inv));
        return;
    }
    if (seq) {
        ss = seq_sum_sq(xr, dim, 0.0f, sh);
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            ss += xr[i] * xr[i];
        ss = block_sum(ss, sh);
    }
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = __fmul_rn(g[i], __fmul_rn(xr[i], inv));
}

int cu_rmsnorm(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, const float *g,
               int rows, int dim, float eps)
{
    if (rows <= 0)
        return 0;
    CU_CHECK(cu_launch_dep(c, rmsnorm_kernel, dim3(rows), dim3(dim >= 1024 ? 1024 : 256), 0, y, ldy,
                           x, ldx, g, dim, eps, (int)!c->fast));
    CU_LAUNCHED("rmsnorm");
    return 0;
}

static __global__ void layernorm_kernel(float *y, int ldy, const float *x, int ldx, const float *g,
                                        const float *b, int dim, float eps, int seq)
{
    pdl_begin(); /* cu_launch_dep */
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float *yr = y + (size_t)blockIdx.x * ldy;
    float mean, var;
    if (seq) {
        mean = seq_sum(xr, dim, sh) / (float)dim;
        var = seq_sum_sq(xr, dim, mean, sh) / (float)dim;
    } else {
        float s = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            s += xr[i];
        mean = block_sum(s, sh) / (float)dim;
        float v = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            float d = xr[i] - mean;
            v += d * d;
        }
        var = block_sum(v, sh) / (float)dim;
    }
    const float inv = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = __fadd_rn(__fmul_rn(__fmul_rn(xr[i] - mean, inv), g[i]), b[i]);
}

int cu_layernorm(struct cu_ctx *c, float *y, int ldy, const float *x, int ldx, const float *g,
                 const float *b, int rows, int dim, float eps)
{
    if (rows <= 0)
        return 0;
    CU_CHECK(cu_launch_dep(c, layernorm_kernel, dim3(rows), dim3(256), 0, y, ldy, x, ldx, g, b, dim,
                           eps, (int)!c->fast));
    CU_LAUNCHED("layernorm");
    return 0;
}

static __global__ void add_kernel(float *y, const float *x, size_t n)
{
    pdl_begin(); /* cu_launch_dep */
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

int cu_add(struct cu_ctx *c, float *y, const float *x, size_t n)
{
    if (!n)
        return 0;
    unsigned g = cu_blocks(n, 256);
    CU_CHECK(cu_launch_dep(c, add_kernel, dim3(g > 65535u ? 65535u : g), dim3(256), 0, y, x, n));
    CU_LAUNCHED("add");
    return 0;
}

static __global__ void silu_mul_kernel(float *y, const float *g, const float *u, size_t n)
{
    pdl_begin(); /* cu_launch_dep */
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gv = g[i];
        y[i] = __fmul_rn(__fdiv_rn(gv, 1.0f + expf(-gv)), u[i]);
    }
}

int cu_silu_mul(struct cu_ctx *c, float *y, const float *g, const float *u, int rows, int dim)
{
    size_t n = (size_t)rows * dim;
    if (!n)
        return 0;
    unsigned b = cu_blocks(n, 256);
    CU_CHECK(
        cu_launch_dep(c, silu_mul_kernel, dim3(b > 65535u ? 65535u : b), dim3(256), 0, y, g, u, n));
    CU_LAUNCHED("silu_mul");
    return 0;
}

/* chunks CTAs a row (blockIdx.x = row * chunks + chunk), one (head, pair) a thread */
static __global__ void rope_kernel(float *x, int heads, int ldr, int ldh, const int32_t *pos,
                                   const float *cs_tab, const float *sn_tab, int n_pos, int half,
                                   int interleaved, int chunks)
{
    pdl_begin(); /* cu_launch_dep */
    const int r = blockIdx.x / chunks, t = (blockIdx.x % chunks) * blockDim.x + threadIdx.x;
    const int p = pos[r];
    if (p < 0 || p >= n_pos || t >= heads * half)
        return; /* the engine checks context lengths before a step */
    const float *cs = cs_tab + (size_t)p * half, *sn = sn_tab + (size_t)p * half;
    const int h = t / half, i = t % half;
    float *v = x + (size_t)r * ldr + (size_t)h * ldh;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float re = v[a], im = v[b];
    v[a] = __fsub_rn(__fmul_rn(re, cs[i]), __fmul_rn(im, sn[i]));
    v[b] = __fadd_rn(__fmul_rn(re, sn[i]), __fmul_rn(im, cs[i]));
}

int cu_rope(struct cu_ctx *c, float *x, int rows, int heads, int ldr, int ldh, const int32_t *pos,
            int interleaved)
{
    if (rows <= 0)
        return 0;
    const int half = c->cfg->qk_rope_head_dim / 2;
    const int chunks = (heads * half + 255) / 256;
    if ((int64_t)rows * chunks > 0x7fffffff)
        return DSV32_ESHAPE;
    CU_CHECK(cu_launch_dep(c, rope_kernel, dim3((unsigned)(rows * chunks)), dim3(256), 0, x, heads,
                           ldr, ldh, pos, (const float *)c->rope_cos, (const float *)c->rope_sin,
                           c->n_pos, half, interleaved, chunks));
    CU_LAUNCHED("rope");
    return 0;
}

static __global__ void gather_kernel(float *y, const float *x, const int32_t *idx, int dim)
{
    const int i = blockIdx.x;
    const float *xr = x + (size_t)idx[i] * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x)
        y[(size_t)i * dim + d] = xr[d];
}

int cu_gather_rows(struct cu_ctx *c, float *y, const float *x, const int32_t *idx, int n, int dim)
{
    if (n <= 0)
        return 0;
    gather_kernel<<<n, 256, 0, c->st>>>(y, x, idx, dim);
    CU_LAUNCHED("gather_rows");
    return 0;
}

/* Expert parallelism's exchange rows (backend.h rows_pack/rows_unpack): one CTA a row, the
 * elements in order across its threads (the bytes are few: 64 decode rows of 7,168 are 0.9 MB in
 * bf16; the cost is the launch). */
static __global__ void rows_pack_kernel(void *dst, const float *x, const int32_t *idx, int dim,
                                        int bf16)
{
    const int i = blockIdx.x;
    const float *xr = x + (size_t)(idx ? idx[i] : i) * dim;
    if (bf16) {
        uint16_t *d = (uint16_t *)dst + (size_t)i * dim;
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            d[j] = cu_f32_to_bf16_bits(xr[j]);
    } else {
        float *d = (float *)dst + (size_t)i * dim;
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            d[j] = xr[j];
    }
}

static __global__ void rows_unpack_kernel(float *y, const void *src, const int32_t *idx, int dim,
                                          int bf16, int add)
{
    const int i = blockIdx.x;
    float *yr = y + (size_t)(idx ? idx[i] : i) * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = bf16 ? cu_bf16_bits_to_f32(((const uint16_t *)src)[(size_t)i * dim + j])
                             : ((const float *)src)[(size_t)i * dim + j];
        yr[j] = add ? __fadd_rn(yr[j], v) : v;
    }
}

int cu_rows_pack(struct cu_ctx *c, void *dst, const float *x, const int32_t *idx, int n, int dim,
                 int bf16)
{
    if (n <= 0)
        return 0;
    rows_pack_kernel<<<n, 256, 0, c->st>>>(dst, x, idx, dim, bf16);
    CU_LAUNCHED("rows_pack");
    return 0;
}

int cu_rows_unpack(struct cu_ctx *c, float *y, const void *src, const int32_t *idx, int n, int dim,
                   int bf16, int add)
{
    if (n <= 0)
        return 0;
    rows_unpack_kernel<<<n, 256, 0, c->st>>>(y, src, idx, dim, bf16, add);
    CU_LAUNCHED("rows_unpack");
    return 0;
}

/* dsv32_weight_rows_to_f32 on the device: value (as stored) times its block scale for FP8 */
static __global__ void dequant_kernel(float *f32, __nv_bfloat16 *bf16, const void *src, int dt,
                                      const float *scale, int64_t rows, int64_t cols)
{
    const int64_t n = rows * cols, sc = (cols + 127) / 128;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v;
        switch (dt) {
        case DSV32_DT_F32:
            v = ((const float *)src)[i];
            break;
        case DSV32_DT_BF16:
            v = cu_bf16_bits_to_f32(((const uint16_t *)src)[i]);
            break;
        case DSV32_DT_F16:
            v = __half2float(((const __half *)src)[i]);
            break;
        default: { /* F8_E4M3 */
            const int64_t r = i / cols, col = i % cols;
            v = cu_e4m3_to_f32(((const uint8_t *)src)[i]);
            if (scale)
                v = __fmul_rn(v, scale[(r / 128) * sc + col / 128]);
        }
        }
        if (f32)
            f32[i] = v;
        if (bf16)
            bf16[i] = __float2bfloat16_rn(v);
    }
}

int cu_dequant(struct cu_ctx *c, float *f32, __nv_bfloat16 *bf16, const void *src,
               enum dsv32_dtype dt, const float *scale, int64_t rows, int64_t cols)
{
    if (rows * cols == 0)
        return 0;
    if (dt != DSV32_DT_F32 && dt != DSV32_DT_BF16 && dt != DSV32_DT_F16 && dt != DSV32_DT_F8_E4M3)
        return DSV32_EDTYPE;
    unsigned b = cu_blocks((size_t)(rows * cols), 256);
    dequant_kernel<<<b > 65535u ? 65535u : b, 256, 0, c->st>>>(f32, bf16, src, (int)dt, scale, rows, cols);
    CU_LAUNCHED("dequant");
    return 0;
}

static __global__ void to_bf16_kernel(__nv_bfloat16 *y, const float *x, int rows, int cols, int ldx)
{
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / cols, col = i % cols;
        y[i] = __float2bfloat16_rn(x[r * ldx + col]);
    }
}

int cu_to_bf16(struct cu_ctx *c, __nv_bfloat16 *y, const float *x, int rows, int cols, int ldx)
{
    size_t n = (size_t)rows * cols;
    if (!n)
        return 0;
    unsigned b = cu_blocks(n, 256);
    to_bf16_kernel<<<b > 65535u ? 65535u : b, 256, 0, c->st>>>(y, x, rows, cols, ldx);
    CU_LAUNCHED("to_bf16");
    return 0;
}
