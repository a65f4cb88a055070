/* Unit tests of sampling: greedy, seeds, the empirical distribution at temperature 1 (also over a
 * vocabulary of 1037: blocks, lanes and tail of the full-vocabulary draw), top-k, top-p, min-p,
 * penalties, logprobs, parameter validation, and the draws the backends take where the logits are.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampling.h"

#define V 8
static const float logits[V] = {1.0f, 2.0f, 0.5f, 3.0f, -1.0f, 2.5f, 0.0f, 1.5f};

static void test_greedy_and_seed(void **state)
{
    struct dsv32_sampling_params p;
    struct dsv32_sampler s;
    dsv32_sampling_defaults(&p);
    p.temperature = 0;
    assert_int_equal(dsv32_sampler_init(&s, &p, V, NULL, 0), 0);
    assert_int_equal(dsv32_sample(&s, logits, NULL), 3);
    dsv32_sampler_done(&s);
    p.temperature = 1.0f;
    p.seed = 1234;
    p.has_seed = 1;
    int32_t a[64], b[64];
    assert_int_equal(dsv32_sampler_init(&s, &p, V, NULL, 0), 0);
    for (int i = 0; i < 64; i++)
        a[i] = dsv32_sample(&s, logits, NULL);
    dsv32_sampler_done(&s);
    assert_int_equal(dsv32_sampler_init(&s, &p, V, NULL, 0), 0);
    for (int i = 0; i < 64; i++)
        b[i] = dsv32_sample(&s, logits, NULL);
    dsv32_sampler_done(&s);
    assert_memory_equal(a, b, sizeof(a));
    p.seed = 1235;
    assert_int_equal(dsv32_sampler_init(&s, &p, V, NULL, 0), 0);
    int differs = 0;
    for (int i = 0; i < 64; i++)
        differs |= dsv32_sample(&s, logits, NULL) != a[i];
    dsv32_sampler_done(&s);
    assert_true(differs);
}

static void histogram(struct dsv32_sampling_params *p, int n, double *freq)
{
    struct dsv32_sampler s;
    p->has_seed = 1;
    p->seed = 99;
    assert_int_equal(dsv32_sampler_init(&s, p, V, NULL, 0), 0);
    memset(freq, 0, sizeof(double) * V);
    for (int i = 0; i < n; i++) {
        freq[dsv32_sample(&s, logits, NULL)] += 1.0 / n;
        memset(s.out_count, 0, sizeof(uint32_t) * V); /* no penalties here anyway */
    }
    dsv32_sampler_done(&s);
}

static void test_distribution(void **state)
{
    struct dsv32_sampling_params p;
    dsv32_sampling_defaults(&p);
    double f[V], z = 0;
    for (int v = 0; v < V; v++)
        z += exp(logits[v] / 0.7);
    p.temperature = 0.7f;
    histogram(&p, 200000, f);
    for (int v = 0; v < V; v++)
        assert_true(fabs(f[v] - exp(logits[v] / 0.7) / z) < 0.005);
    /* top-k 2: only tokens 3 and 5, in the ratio e^(3-2.5) */
    dsv32_sampling_defaults(&p);
    p.top_k = 2;
    histogram(&p, 100000, f);
    assert_true(fabs(f[3] - 1 / (1 + exp(-0.5))) < 0.01);
    assert_true(f[3] + f[5] > 0.999999);
    /* top-p 0.5: the smallest set holding half the mass is {3, 5} (0.35 + 0.21 = 0.56) */
    dsv32_sampling_defaults(&p);
    p.top_p = 0.5f;
    histogram(&p, 50000, f);
    assert_true(f[3] + f[5] > 0.999999 && f[5] > 0.3);
    /* min-p 0.5: tokens with p >= p_max / 2: 3 (e^0) and 5 (e^-0.5 = 0.61) */
    dsv32_sampling_defaults(&p);
    p.min_p = 0.5f;
    histogram(&p, 50000, f);
    assert_true(f[3] + f[5] > 0.999999);
}

/* The full-vocabulary draw over a vocabulary that ends inside a group of four and spans two
 * blocks of 1024 (the block sums, the vector lanes and the tail): every token's frequency
 * against softmax(x / T) over 400,000 draws, and the mass of the last block. */
static void test_distribution_long(void **state)
{
    (void)state;
    enum { VL = 1037, N = 400000 };
    static float lg[VL];
    static double f[VL], pr[VL];
    double z = 0;
    for (int v = 0; v < VL; v++) {
        lg[v] = (float)((v * 37 % 101) * 0.05 - 2.0) + (v >= 1030 ? 2.0f : 0.0f);
        z += exp(lg[v] / 1.3);
    }
    for (int v = 0; v < VL; v++)
        pr[v] = exp(lg[v] / 1.3) / z;
    struct dsv32_sampling_params p;
    dsv32_sampling_defaults(&p);
    p.temperature = 1.3f;
    p.seed = 42;
    p.has_seed = 1;
    struct dsv32_sampler s;
    assert_int_equal(dsv32_sampler_init(&s, &p, VL, NULL, 0), 0);
    memset(f, 0, sizeof(f));
    for (int i = 0; i < N; i++) {
        const int32_t t = dsv32_sample(&s, lg, NULL);
        assert_true(t >= 0 && t < VL);
        f[t] += 1.0 / N;
    }
    dsv32_sampler_done(&s);
    double tail = 0, tail_p = 0, worst = 0;
    for (int v = 0; v < VL; v++) {
        /* 5 standard deviations of a binomial frequency */
        const double sd = sqrt(pr[v] * (1 - pr[v]) / N);
        worst = fmax(worst, fabs(f[v] - pr[v]) / sd);
        if (v >= 1024) {
            tail += f[v];
            tail_p += pr[v];
        }
    }
    assert_true(worst < 5.0);
    assert_true(fabs(tail - tail_p) < 0.003);
}

static void test_penalties(void **state)
{
    struct dsv32_sampling_params p;
    struct dsv32_sampler s;
    dsv32_sampling_defaults(&p);
    p.temperature = 0;
    p.frequency_penalty = 1.0f;
    assert_int_equal(dsv32_sampler_init(&s, &p, V, NULL, 0), 0);
    assert_int_equal(dsv32_sample(&s, logits, NULL), 3);   /* 3.0 */
    assert_int_equal(dsv32_sample(&s, logits, NULL), 5);   /* 3 is now 2.0, 5 is 2.5 */
    assert_int_equal(dsv32_sample(&s, logits, NULL), 1);   /* 3: 2.0, 1: 2.0: ties go to the lower id */
    dsv32_sampler_done(&s);
    /* repetition penalty 2 on prompt tokens {3, 5}: 3 -> 1.5, 5 -> 1.25; 1 (2.0) wins */
    p.frequency_penalty = 0;
    p.repetition_penalty = 2.0f;
    int32_t prompt[2] = {3, 5};
    assert_int_equal(dsv32_sampler_init(&s, &p, V, prompt, 2), 0);
    assert_int_equal(dsv32_sample(&s, logits, NULL), 1);
    dsv32_sampler_done(&s);
}

static void test_logprobs(void **state)
{
    struct dsv32_logprobs lp;
    dsv32_logprobs_of(logits, V, 2, 3, &lp);
    double z = 0;
    for (int v = 0; v < V; v++)
        z += exp(logits[v]);
    assert_float_equal(lp.chosen.logprob, 0.5 - log(z), 1e-5);
    assert_int_equal(lp.n_top, 3);
    assert_int_equal(lp.top[0].token, 3);
    assert_int_equal(lp.top[1].token, 5);
    assert_int_equal(lp.top[2].token, 1);
    assert_float_equal(lp.top[0].logprob, 3.0 - log(z), 1e-5);
    struct dsv32_sampling_params p;
    struct dsv32_sampler s;
    dsv32_sampling_defaults(&p);
    p.temperature = 0;
    p.n_logprobs = 2;
    p.repetition_penalty = 2.0f;
    int32_t prompt[1] = {3};
    assert_int_equal(dsv32_sampler_init(&s, &p, V, prompt, 1), 0);
    int32_t t = dsv32_sample(&s, logits, &lp);
    assert_int_equal(t, 5);
    assert_int_equal(lp.chosen.token, 5);
    assert_float_equal(lp.chosen.logprob, 2.5 - log(z), 1e-5); /* raw distribution */
    assert_int_equal(lp.n_top, 2);
    dsv32_sampler_done(&s);
}

static void test_validate(void **state)
{
    struct dsv32_sampling_params p;
    char err[128];
    dsv32_sampling_defaults(&p);
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), 0);
    p.temperature = -0.5f;
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "temperature"));
    dsv32_sampling_defaults(&p);
    p.top_p = 0.0f;
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "top_p"));
    p.top_p = 1.5f;
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), -EINVAL);
    dsv32_sampling_defaults(&p);
    p.n_logprobs = 21;
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), -EINVAL);
    dsv32_sampling_defaults(&p);
    p.top_p = NAN;
    assert_int_equal(dsv32_sampling_validate(&p, err, sizeof(err)), -EINVAL);
}

/* The backends' draw (dsv32_sampler_draw_params, dsv32_draw_row, dsv32_sampler_took) gives the
 * token stream dsv32_sample gives (greedy, top_k 1, the whole vocabulary at any temperature,
 * top-k, top-p, min-p and their mixes), and dsv32_sampler_device_ok refuses penalties. A vocabulary
 * of 2100: two full blocks of 1024 and a tail. */
static void test_device_draw(void **state)
{
    (void)state;
    enum { NV = 2100, STEPS = 200 };
    static float lg[NV];
    uint64_t x = 99;
    for (int v = 0; v < NV; v++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        lg[v] = (float)((x >> 40) % 2000) / 250.0f - 4.0f; /* many equal values: ties */
    }
    const struct {
        float t;
        int top_k, n_lp;
        float top_p, min_p;
    } cases[] = {
        {0.0f, 0, -1, 1.0f, 0.0f}, {1.0f, 1, 3, 1.0f, 0.0f},   {1.0f, 0, -1, 1.0f, 0.0f},
        {0.7f, 0, 5, 1.0f, 0.0f},  {1.9f, 0, 0, 1.0f, 0.0f},   {1.0f, 40, -1, 1.0f, 0.0f},
        {1.3f, 0, 2, 0.9f, 0.0f},  {1.0f, 0, -1, 1.0f, 0.05f}, {1.6f, 200, -1, 0.8f, 0.01f}};
    void *work = malloc(dsv32_draw_work_bytes(NV));
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct dsv32_sampling_params p;
        dsv32_sampling_defaults(&p);
        p.temperature = cases[c].t;
        p.top_k = cases[c].top_k;
        p.n_logprobs = cases[c].n_lp;
        p.top_p = cases[c].top_p;
        p.min_p = cases[c].min_p;
        p.seed = 7 + c;
        p.has_seed = 1;
        struct dsv32_sampler a, b;
        assert_int_equal(dsv32_sampler_init(&a, &p, NV, NULL, 0), 0);
        assert_int_equal(dsv32_sampler_init(&b, &p, NV, NULL, 0), 0);
        assert_true(dsv32_sampler_device_ok(&b));
        int distinct = 0, prev = -1;
        for (int i = 0; i < STEPS; i++) {
            struct dsv32_logprobs la, lb;
            const int32_t ta = dsv32_sample(&a, lg, &la);
            struct dsv32_draw d;
            dsv32_sampler_draw_params(&b, &d);
            struct dsv32_draw d2;
            dsv32_sampler_draw_params(&b, &d2); /* no stream consumed until took */
            assert_true(d.u == d2.u);
            const int32_t tb = dsv32_draw_row(lg, NV, &d, work);
            dsv32_sampler_took(&b, tb);
            assert_int_equal(ta, tb);
            if (d.n_logprobs >= 0) {
                dsv32_logprobs_of(lg, NV, tb, d.n_logprobs, &lb);
                assert_memory_equal(&la.chosen, &lb.chosen, sizeof(la.chosen));
                assert_int_equal(la.n_top, lb.n_top);
                assert_memory_equal(la.top, lb.top, sizeof(la.top[0]) * (size_t)la.n_top);
            }
            distinct += ta != prev;
            prev = ta;
        }
        if (cases[c].t > 0.0f && cases[c].top_k != 1)
            assert_true(distinct > STEPS / 4); /* a real draw, not the maximum every time */
        dsv32_sampler_done(&a);
        dsv32_sampler_done(&b);
    }
    /* what the backends do not take: penalties (they need the request's token counts) */
    struct dsv32_sampling_params p;
    struct dsv32_sampler s;
    for (int k = 0; k < 3; k++) {
        dsv32_sampling_defaults(&p);
        if (k == 0)
            p.presence_penalty = 0.5f;
        else if (k == 1)
            p.frequency_penalty = -0.3f;
        else
            p.repetition_penalty = 1.2f;
        assert_int_equal(dsv32_sampler_init(&s, &p, NV, NULL, 0), 0);
        assert_false(dsv32_sampler_device_ok(&s));
        dsv32_sampler_done(&s);
    }
    free(work);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_seed),   cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_distribution_long), cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logprobs),          cmocka_unit_test(test_validate),
        cmocka_unit_test(test_device_draw),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
