/* Number format conversions; see dtype.h. */
#include "dtype.h"

#include <math.h>
#include <string.h>

static const struct {
    const char *name;
    enum dsv32_dtype dt;
    size_t size;
} dtype_info[] = {
    {"?", DSV32_DT_UNKNOWN, 0}, {"F32", DSV32_DT_F32, 4},         {"BF16", DSV32_DT_BF16, 2},
    {"F16", DSV32_DT_F16, 2},   {"F8_E4M3", DSV32_DT_F8_E4M3, 1}, {"I32", DSV32_DT_I32, 4},
    {"I64", DSV32_DT_I64, 8},   {"U8", DSV32_DT_U8, 1},
};

size_t dsv32_dtype_size(enum dsv32_dtype dt) { return dtype_info[dt].size; }
const char *dsv32_dtype_name(enum dsv32_dtype dt) { return dtype_info[dt].name; }

enum dsv32_dtype dsv32_dtype_parse(const char *s)
{
    for (size_t i = 1; i < sizeof(dtype_info) / sizeof(dtype_info[0]); i++)
        if (strcmp(s, dtype_info[i].name) == 0)
            return dtype_info[i].dt;
    return DSV32_DT_UNKNOWN;
}

float dsv32_f16_to_f32(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v;
    if (exp == 0)
        v = ldexpf((float)man, -24);
    else if (exp == 31)
        v = man ? NAN : INFINITY;
    else
        v = ldexpf((float)(man | 0x400), exp - 25);
    return sign ? -v : v;
}

/* e4m3fn: bias 7, no infinities, S.1111.111 is NaN, max normal 448 = 1.75 * 2^8. */
#define E4M3(b)                                                                                    \
    ((((b) & 0x7f) == 0x7f) ? NAN                                                                 \
     : ((b) & 0x78)         ? ldexpf(1.0f + (float)((b) & 7) / 8.0f, (((b) >> 3) & 15) - 7)        \
                            : ldexpf((float)((b) & 7), -9))
static float fp8_value(int b)
{
    float v = E4M3(b);
    return (b & 0x80) ? -v : v;
}

float dsv32_fp8_table[256];

__attribute__((constructor)) static void fp8_table_init(void)
{
    for (int b = 0; b < 256; b++)
        dsv32_fp8_table[b] = fp8_value(b);
}

uint8_t dsv32_f32_to_fp8(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u)
        return 0x7f; /* NaN */
    if (u >= 0x43e00000u) /* >= 448: clamp (the reference clamps before the cast) */
        return sign | 0x7e;
    if (u < 0x3c800000u) {
        /* below 2^-6, the subnormal range: steps of 2^-9. a * 512 is exact; rintf rounds half to
         * even. 8 * 2^-9 is the smallest normal, whose code is 8 as well. */
        float a;
        memcpy(&a, &u, 4);
        return sign | (uint8_t)(int)rintf(a * 512.0f);
    }
    /* normal: keep 3 of the 23 mantissa bits, rounding to nearest even */
    int e = (int)(u >> 23) - 127 + 7;
    uint32_t man = u & 0x7fffffu, keep = man >> 20, rest = man & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1)))
        keep++;
    if (keep == 8) {
        keep = 0;
        e++;
    }
    return sign | (uint8_t)((e << 3) | (int)keep);
}


_Thread_local struct dsv32_fp8_probe *dsv32_fp8_probe_cur;

int dsv32_fp8_key_cmp(const struct dsv32_fp8_key *a, const struct dsv32_fp8_key *b)
{
    if (a->op != b->op)
        return a->op < b->op ? -1 : 1;
    if (a->sub != b->sub)
        return a->sub < b->sub ? -1 : 1;
    if (a->row != b->row)
        return a->row < b->row ? -1 : 1;
    return (a->col > b->col) - (a->col < b->col);
}

static int probe_flip(const struct dsv32_fp8_probe *p, const struct dsv32_fp8_key *k)
{
    int lo = 0, hi = p->n_flips - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = dsv32_fp8_key_cmp(&p->flips[mid], k);
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return 0;
}

/* v = x / s rounded, with the probe looking: near-ties reported, chosen ones rounded the other
 * way (to the other of the two grid points around v). */
static uint8_t probed_round(struct dsv32_fp8_probe *p, float v, const struct dsv32_fp8_key *k)
{
    uint8_t b = dsv32_f32_to_fp8(v);
    float a = fabsf(v), q = fabsf(dsv32_fp8_table[b]);
    if (a >= DSV32_FP8_MAX || isnan(v))
        return b;
    /* the grid neighbour on the other side of v */
    uint8_t mag = b & 0x7f, other = q > a ? mag - 1 : (q < a ? mag + 1 : mag);
    if (other == mag || (q < a && mag == 0x7e))
        return b;
    float o = dsv32_fp8_table[other];
    float mid = 0.5f * (q + o);
    if (fabsf(a - mid) <= p->near_rel * a) {
        if (p->on_near)
            p->on_near(p->ctx, k, v);
        if (p->n_flips && probe_flip(p, k))
            return (uint8_t)((b & 0x80) | other);
    }
    return b;
}

float dsv32_fp8_quant_block_at(uint8_t *q, const float *x, int n, int ue8m0, int sub, int row,
                               int col0)
{
    struct dsv32_fp8_probe *p = dsv32_fp8_probe_cur;
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    float s = dsv32_fp8_block_scale(amax, ue8m0);
    if (!q)
        return s;
    if (!p) {
        for (int i = 0; i < n; i++)
            q[i] = dsv32_f32_to_fp8(x[i] / s);
        return s;
    }
    struct dsv32_fp8_key k = {.op = p->op, .sub = sub, .row = row};
    for (int i = 0; i < n; i++) {
        k.col = col0 + i;
        q[i] = probed_round(p, x[i] / s, &k);
    }
    return s;
}

float dsv32_fp8_quant_block(uint8_t *q, const float *x, int n, int ue8m0)
{
    return dsv32_fp8_quant_block_at(q, x, n, ue8m0, 0, 0, 0);
}

void dsv32_fp8_simulate_at(float *x, int n, int block, int ue8m0, int sub, int row)
{
    uint8_t q[256];
    if (block > 256) /* not a shape DeepSeek uses; quantize without the probe */
        for (int b = 0; b < n; b += block) {
            float s = dsv32_fp8_quant_block(NULL, x + b, block, ue8m0);
            for (int i = b; i < b + block; i++)
                x[i] = dsv32_fp8_round(x[i] / s) * s;
        }
    else
        for (int b = 0; b < n; b += block) {
            float s = dsv32_fp8_quant_block_at(q, x + b, block, ue8m0, sub, row, b);
            for (int i = 0; i < block; i++)
                x[b + i] = dsv32_fp8_table[q[i]] * s;
        }
}

void dsv32_fp8_simulate(float *x, int n, int block, int ue8m0)
{
    dsv32_fp8_simulate_at(x, n, block, ue8m0, 0, 0);
}
