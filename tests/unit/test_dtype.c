/* Unit tests of the number formats: e4m3 encode/decode and round-to-nearest-even, clamping,
 * subnormals, bf16 rounding, block scales (plain and ue8m0) and the FP8 tie probe. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "dtype.h"

static void test_fp8_grid(void **state)
{
    /* every finite code decodes and re-encodes to itself */
    for (int b = 0; b < 256; b++) {
        float v = dsv32_fp8_to_f32((uint8_t)b);
        if (isnan(v)) {
            assert_true((b & 0x7f) == 0x7f);
            continue;
        }
        if (v == 0.0f)
            continue; /* +0 and -0 */
        assert_int_equal(dsv32_f32_to_fp8(v), b);
    }
    assert_float_equal(dsv32_fp8_to_f32(0x7e), 448.0f, 0);
    assert_float_equal(dsv32_fp8_to_f32(0x01), ldexpf(1, -9), 0);
    assert_float_equal(dsv32_fp8_to_f32(0x08), ldexpf(1, -6), 0);
    assert_float_equal(dsv32_fp8_to_f32(0x38), 1.0f, 0);
}

static void test_fp8_rounding(void **state)
{
    /* halfway cases go to the even mantissa */
    assert_float_equal(dsv32_fp8_round(1.0625f), 1.0f, 0);     /* between 1.0 (m=0) and 1.125 */
    assert_float_equal(dsv32_fp8_round(1.1875f), 1.25f, 0);    /* between 1.125 (m=1) and 1.25 */
    assert_float_equal(dsv32_fp8_round(1.07f), 1.125f, 0);
    assert_float_equal(dsv32_fp8_round(232.0f), 224.0f, 0);    /* 224 even, 240 odd */
    assert_float_equal(dsv32_fp8_round(-232.5f), -240.0f, 0);
    assert_float_equal(dsv32_fp8_round(1000.0f), 448.0f, 0);   /* clamped */
    assert_float_equal(dsv32_fp8_round(-1e9f), -448.0f, 0);
    assert_float_equal(dsv32_fp8_round(464.0f), 448.0f, 0);
    /* subnormals: steps of 2^-9, ties to even */
    assert_float_equal(dsv32_fp8_round(1.5f * ldexpf(1, -9)), 2 * ldexpf(1, -9), 0);
    assert_float_equal(dsv32_fp8_round(2.5f * ldexpf(1, -9)), 2 * ldexpf(1, -9), 0);
    assert_float_equal(dsv32_fp8_round(0.4f * ldexpf(1, -9)), 0.0f, 0);
    assert_float_equal(dsv32_fp8_round(7.6f * ldexpf(1, -9)), ldexpf(1, -6), 0); /* to the normals */
    /* exhaustive against a slow reference on a sweep of values */
    for (float x = 1e-4f; x < 500.0f; x *= 1.0007f) {
        float best = 0, bd = INFINITY;
        for (int b = 0; b < 127; b++) {
            float g = dsv32_fp8_to_f32((uint8_t)b), d = fabsf(g - fminf(x, 448.0f));
            if (d < bd || (d == bd && (b & 1) == 0)) {
                bd = d;
                best = g;
            }
        }
        assert_float_equal(dsv32_fp8_round(x), best, 0);
    }
}

static void test_bf16(void **state)
{
    assert_int_equal(dsv32_f32_to_bf16(1.0f), 0x3f80);
    float half_ulp = 1.0f + ldexpf(1, -8); /* exactly between 1.0 and the next bf16 */
    assert_int_equal(dsv32_f32_to_bf16(half_ulp), 0x3f80);
    assert_int_equal(dsv32_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)), 0x3f82);
    assert_float_equal(dsv32_bf16_to_f32(0xc000), -2.0f, 0);
    assert_true(isnan(dsv32_bf16_to_f32(dsv32_f32_to_bf16(NAN))));
    assert_float_equal(dsv32_f16_to_f32(0x3c00), 1.0f, 0);
    assert_float_equal(dsv32_f16_to_f32(0x0001), ldexpf(1, -24), 0);
}

static void test_block_scales(void **state)
{
    assert_float_equal(dsv32_fp8_block_scale(448.0f, 0), 1.0f, 0);
    assert_float_equal(dsv32_fp8_block_scale(0.0f, 0), 1e-4f / 448.0f, 1e-12);
    assert_float_equal(dsv32_fp8_block_scale(448.0f, 1), 1.0f, 0);
    assert_float_equal(dsv32_fp8_block_scale(449.0f, 1), 2.0f, 0);
    assert_float_equal(dsv32_fp8_block_scale(300.0f, 1), 1.0f, 0);
    assert_float_equal(dsv32_fp8_block_scale(224.0f, 1), 0.5f, 0);
    float x[128];
    for (int i = 0; i < 128; i++)
        x[i] = (float)(i - 64) * 0.37f;
    uint8_t q[128];
    float s = dsv32_fp8_quant_block(q, x, 128, 0);
    assert_float_equal(s, 64 * 0.37f / 448.0f, 1e-7);
    assert_float_equal(dsv32_fp8_to_f32(q[0]) * s, x[0], 1e-5);
    float y[128];
    memcpy(y, x, sizeof(x));
    dsv32_fp8_simulate(y, 128, 128, 1);
    for (int i = 0; i < 128; i++)
        assert_true(fabsf(y[i] - x[i]) <= fabsf(x[i]) * 0.0625f + 1e-6f);
}

struct seen {
    int n;
    struct dsv32_fp8_key k;
};

static void on_near(void *ctx, const struct dsv32_fp8_key *k, float v)
{
    struct seen *s = ctx;
    s->n++;
    s->k = *k;
}

static void test_tie_probe(void **state)
{
    float x[128] = {0};
    x[0] = 448.0f;            /* scale 1 */
    x[5] = 232.00001f;        /* a hair above the midpoint of 224 and 240 */
    x[6] = 101.0f;
    uint8_t q[128];
    struct seen seen = {0};
    struct dsv32_fp8_probe p = {.near_rel = 1e-6, .on_near = on_near, .ctx = &seen, .op = 7};
    dsv32_fp8_probe_cur = &p;
    dsv32_fp8_quant_block_at(q, x, 128, 0, 2, 9, 256);
    assert_int_equal(seen.n, 1);
    assert_int_equal(seen.k.op, 7);
    assert_int_equal(seen.k.sub, 2);
    assert_int_equal(seen.k.row, 9);
    assert_int_equal(seen.k.col, 261);
    assert_float_equal(dsv32_fp8_to_f32(q[5]), 240.0f, 0);
    struct dsv32_fp8_key flip = {7, 2, 9, 261};
    p.flips = &flip;
    p.n_flips = 1;
    dsv32_fp8_quant_block_at(q, x, 128, 0, 2, 9, 256);
    assert_float_equal(dsv32_fp8_to_f32(q[5]), 224.0f, 0); /* rounded the other way */
    assert_float_equal(dsv32_fp8_to_f32(q[6]), 104.0f, 0); /* others untouched */
    dsv32_fp8_probe_cur = NULL;
    dsv32_fp8_quant_block_at(q, x, 128, 0, 2, 9, 256);
    assert_float_equal(dsv32_fp8_to_f32(q[5]), 240.0f, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp8_grid),  cmocka_unit_test(test_fp8_rounding),
        cmocka_unit_test(test_bf16),      cmocka_unit_test(test_block_scales),
        cmocka_unit_test(test_tie_probe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
