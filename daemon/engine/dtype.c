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
    if (isnan(x))
        return 0x7f;
    uint8_t sign = signbit(x) ? 0x80 : 0;
    float a = fabsf(x);
    if (a > DSV32_FP8_MAX)
        a = DSV32_FP8_MAX;
    if (a < 0x1p-6f) {
        /* Subnormal range: steps of 2^-9; rintf rounds half to even. 8 * 2^-9 is the smallest
         * normal, whose encoding (exponent 1, mantissa 0) is 8 as well. */
        int m = (int)rintf(a * 512.0f);
        return sign | (uint8_t)m;
    }
    int e;
    frexpf(a, &e); /* a = f * 2^e, f in [0.5, 1): a in [2^(e-1), 2^e) */
    int E = e - 1; /* a = 1.m * 2^E */
    float step = ldexpf(1.0f, E - 3);
    float q = rintf(a / step); /* 8..16 */
    int man = (int)q - 8;
    if (man == 8) { /* rounded up into the next binade */
        man = 0;
        E += 1;
    }
    return sign | (uint8_t)(((E + 7) << 3) | man);
}

float dsv32_fp8_quant_block(uint8_t *q, const float *x, int n, int ue8m0)
{
    float amax = 0.0f;
    for (int i = 0; i < n; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    float s = dsv32_fp8_block_scale(amax, ue8m0);
    if (q)
        for (int i = 0; i < n; i++)
            q[i] = dsv32_f32_to_fp8(x[i] / s);
    return s;
}

void dsv32_fp8_simulate(float *x, int n, int block, int ue8m0)
{
    for (int b = 0; b < n; b += block) {
        float s = dsv32_fp8_quant_block(NULL, x + b, block, ue8m0);
        for (int i = b; i < b + block; i++)
            x[i] = dsv32_fp8_round(x[i] / s) * s;
    }
}
