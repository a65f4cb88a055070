/* Unit tests of the forward step's invariants on the tiny models: a prefill split into chunks
 * equals one prefill; logits of every row equal logits of the matching prefix; a step that does
 * not fit the cache fails without changing any sequence; bad input is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "error.h"
#include "safetensors.h"

static double rel(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

struct fx {
    struct dsv32_model *m;
    struct dsv32_engine *e;
    int V;
};

static int setup_model(void **state, const char *dir, int kv_blocks)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (dsv32_model_load(dir, NULL, &f->m) < 0) {
        print_error("%s\n", dsv32_load_error());
        return -1;
    }
    struct dsv32_engine_opts o = {.max_seqs = 4, .max_seq_len = 256, .kv_blocks = kv_blocks,
                                  .max_batch_tokens = 256};
    if (dsv32_engine_new(f->m, &o, &f->e) < 0) {
        print_error("%s\n", dsv32_load_error());
        return -1;
    }
    f->V = f->m->cfg.vocab_size;
    *state = f;
    return 0;
}

static int setup(void **state) { return setup_model(state, GOLDEN_DIR "/tiny-fp8", 0); }
static int setup_small(void **state) { return setup_model(state, GOLDEN_DIR "/tiny-bf16", 2); }

static int teardown(void **state)
{
    struct fx *f = *state;
    dsv32_engine_free(f->e);
    dsv32_model_free(f->m);
    free(f);
    return 0;
}

static void prompt_of(int32_t *p, int n, unsigned seed)
{
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (int32_t)((seed >> 8) % 1000) + 2;
    }
}

static void test_chunked_prefill(void **state)
{
    struct fx *f = *state;
    int32_t p[90];
    prompt_of(p, 90, 7);
    float *a = malloc(sizeof(float) * f->V), *b = malloc(sizeof(float) * f->V);
    int s1 = dsv32_kv_seq_new(f->e->kv), s2 = dsv32_kv_seq_new(f->e->kv);
    struct dsv32_seq_input in = {.seq = s1, .n_tokens = 90, .tokens = p, .logits = DSV32_LOGITS_LAST};
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, a, NULL), 0);
    /* 3 chunks crossing a 64-token block boundary; the last one asks for logits */
    int cuts[] = {0, 30, 70, 90};
    for (int c = 0; c < 3; c++) {
        in = (struct dsv32_seq_input){.seq = s2, .n_tokens = cuts[c + 1] - cuts[c],
                                      .tokens = p + cuts[c],
                                      .logits = c == 2 ? DSV32_LOGITS_LAST : DSV32_LOGITS_NONE};
        assert_int_equal(dsv32_engine_step(f->e, &in, 1, c == 2 ? b : NULL, NULL), 0);
    }
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, s2), 90);
    double r = rel(b, a, f->V);
    if (r > 1e-4)
        fail_msg("chunked prefill differs from one prefill: rel %.3e", r);
    dsv32_kv_seq_free(f->e->kv, s1);
    dsv32_kv_seq_free(f->e->kv, s2);
    free(a);
    free(b);
}

/* the backend's sample op, declining its first draw (-1: the host draws it) */
static int (*real_sample)(struct dsv32_backend *, int32_t *, struct dsv32_logprobs *, const float *,
                          int, const int32_t *, const struct dsv32_draw *, int);
static int declined;

static int sample_declining_first(struct dsv32_backend *be, int32_t *tok, struct dsv32_logprobs *lp,
                                  const float *logits, int vocab, const int32_t *rows,
                                  const struct dsv32_draw *d, int n)
{
    int r = real_sample(be, tok, lp, logits, vocab, rows, d, n);
    if (r == 0 && n > 0) {
        tok[0] = -1;
        if (lp)
            memset(&lp[0], 0, sizeof(lp[0]));
        declined++;
    }
    return r;
}

/* Inputs that draw their token where the logits are (the backend's sample op) beside inputs
 * that return their row: the rows keep their places in the returned buffer (a draw's place left
 * unwritten), the drawn tokens are dsv32_draw_row's on the same prompt's returned row, a draw
 * the backend declines is drawn by the engine from the row, and bad draws are refused before
 * anything runs. */
static void test_draw_in_step(void **state)
{
    struct fx *f = *state;
    int32_t p[12];
    prompt_of(p, 12, 5);
    float *lg = malloc(sizeof(float) * f->V * 4);
    void *work = malloc(dsv32_draw_work_bytes(f->V));
    for (size_t i = 0; i < (size_t)f->V * 4; i++)
        lg[i] = 12345.0f;
    int s[4];
    for (int i = 0; i < 4; i++)
        s[i] = dsv32_kv_seq_new(f->e->kv);
    const struct dsv32_draw greedy = {.temperature = 0.0f,
                                      .u = 0.0,
                                      .top_p = 1.0f,
                                      .n_logprobs = 4},
                            warm = {
                                .temperature = 0.8f, .u = 0.37, .top_p = 1.0f, .n_logprobs = -1};
    int32_t tg = -1, tw = -1;
    struct dsv32_logprobs lp;
    struct dsv32_seq_input in[4] = {
        {.seq = s[0], .n_tokens = 12, .tokens = p, .logits = DSV32_LOGITS_LAST},
        {.seq = s[1],
         .n_tokens = 12,
         .tokens = p,
         .logits = DSV32_LOGITS_LAST,
         .draw = &greedy,
         .token = &tg,
         .lp = &lp},
        {.seq = s[2], .n_tokens = 12, .tokens = p, .logits = DSV32_LOGITS_LAST},
        {.seq = s[3],
         .n_tokens = 12,
         .tokens = p,
         .logits = DSV32_LOGITS_LAST,
         .draw = &warm,
         .token = &tw},
    };
    assert_int_equal(dsv32_engine_step(f->e, in, 4, lg, NULL), 0);
    const float *r0 = lg, *r2 = lg + 2 * (size_t)f->V;
    for (int v = 0; v < f->V; v++) {
        assert_true(lg[(size_t)f->V + v] == 12345.0f && lg[3 * (size_t)f->V + v] == 12345.0f);
        assert_true(r0[v] != 12345.0f && r2[v] != 12345.0f);
    }
    double r = rel(r2, r0, f->V);
    if (r > 1e-4)
        fail_msg("the third input's row is not the first's: rel %.3e", r);
    assert_int_equal(tg, dsv32_draw_row(r0, f->V, &greedy, work));
    assert_int_equal(tw, dsv32_draw_row(r0, f->V, &warm, work));
    struct dsv32_logprobs ref;
    dsv32_logprobs_of(r0, f->V, tg, 4, &ref);
    assert_int_equal(lp.n_top, 4);
    assert_int_equal(lp.chosen.token, tg);
    assert_true(fabsf(lp.chosen.logprob - ref.chosen.logprob) < 1e-4f);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(lp.top[i].token, ref.top[i].token);
        assert_true(fabsf(lp.top[i].logprob - ref.top[i].logprob) < 1e-4f);
    }
    /* a backend that leaves a draw to the host (its sample op's -1, as the cuda backend does for
     * a top-p nucleus larger than it sorts): the engine draws it from the row itself */
    struct dsv32_backend_ops declining = *f->e->be->ops;
    const struct dsv32_backend_ops *real = f->e->be->ops;
    real_sample = real->sample;
    declining.sample = sample_declining_first;
    f->e->be->ops = &declining;
    const struct dsv32_draw nucleus = {
        .temperature = 1.1f, .u = 0.61, .top_k = 0, .top_p = 0.9f, .min_p = 0.0f, .n_logprobs = 3};
    int32_t tn = -1;
    struct dsv32_logprobs lpn;
    dsv32_kv_seq_free(f->e->kv, s[1]); /* max_seqs is 4 */
    dsv32_kv_seq_free(f->e->kv, s[2]);
    int s5 = dsv32_kv_seq_new(f->e->kv), s6 = dsv32_kv_seq_new(f->e->kv);
    struct dsv32_seq_input two[2] = {
        {.seq = s5,
         .n_tokens = 12,
         .tokens = p,
         .logits = DSV32_LOGITS_LAST,
         .draw = &nucleus,
         .token = &tn,
         .lp = &lpn},
        {.seq = s6, .n_tokens = 12, .tokens = p, .logits = DSV32_LOGITS_LAST},
    };
    declined = 0;
    const int rs = dsv32_engine_step(f->e, two, 2, lg, NULL);
    f->e->be->ops = real;
    assert_int_equal(rs, 0);
    assert_int_equal(declined, 1);
    const float *r1 = lg + (size_t)f->V; /* the second input's row */
    assert_true(rel(r1, r0, f->V) < 1e-4);
    assert_int_equal(tn, dsv32_draw_row(r1, f->V, &nucleus, work));
    dsv32_logprobs_of(r1, f->V, tn, 3, &ref);
    assert_int_equal(lpn.chosen.token, tn);
    assert_int_equal(lpn.n_top, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(lpn.top[i].token, ref.top[i].token);
    s[1] = s5;
    s[2] = s6;
    /* refused: a draw on all rows, without its token, with a uniform outside [0, 1) */
    const struct dsv32_draw bad_u = {
        .temperature = 1.0f, .u = 1.0, .top_p = 1.0f, .n_logprobs = -1};
    struct dsv32_seq_input bad[3] = {
        {.seq = s[0],
         .n_tokens = 1,
         .tokens = p,
         .logits = DSV32_LOGITS_ALL,
         .draw = &warm,
         .token = &tw},
        {.seq = s[0], .n_tokens = 1, .tokens = p, .logits = DSV32_LOGITS_LAST, .draw = &warm},
        {.seq = s[0],
         .n_tokens = 1,
         .tokens = p,
         .logits = DSV32_LOGITS_LAST,
         .draw = &bad_u,
         .token = &tw},
    };
    for (int i = 0; i < 3; i++)
        assert_int_equal(dsv32_engine_step(f->e, &bad[i], 1, lg, NULL), -EINVAL);
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, s[0]), 12);
    for (int i = 0; i < 4; i++)
        dsv32_kv_seq_free(f->e->kv, s[i]);
    free(lg);
    free(work);
}

static void test_all_rows(void **state)
{
    struct fx *f = *state;
    int32_t p[20];
    prompt_of(p, 20, 11);
    float *all = malloc(sizeof(float) * f->V * 20), *one = malloc(sizeof(float) * f->V);
    int s = dsv32_kv_seq_new(f->e->kv);
    struct dsv32_seq_input in = {.seq = s, .n_tokens = 20, .tokens = p, .logits = DSV32_LOGITS_ALL};
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, all, NULL), 0);
    dsv32_kv_seq_free(f->e->kv, s);
    for (int n = 1; n <= 20; n += 6) {
        s = dsv32_kv_seq_new(f->e->kv);
        in = (struct dsv32_seq_input){.seq = s, .n_tokens = n, .tokens = p, .logits = DSV32_LOGITS_LAST};
        assert_int_equal(dsv32_engine_step(f->e, &in, 1, one, NULL), 0);
        double r = rel(all + (size_t)(n - 1) * f->V, one, f->V);
        if (r > 1e-4)
            fail_msg("row %d of an all-rows prefill differs from a prefill of %d tokens: %.3e", n - 1, n, r);
        dsv32_kv_seq_free(f->e->kv, s);
    }
    free(all);
    free(one);
}

static void test_bad_input(void **state)
{
    struct fx *f = *state;
    int32_t p[3] = {1, 2, 5000};
    int s = dsv32_kv_seq_new(f->e->kv);
    float *lg = malloc(sizeof(float) * f->V);
    struct dsv32_seq_input in = {.seq = s, .n_tokens = 3, .tokens = p, .logits = DSV32_LOGITS_LAST};
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, lg, NULL), DSV32_ETOKEN);
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, s), 0);
    p[2] = 3;
    in.n_tokens = 0;
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, lg, NULL), -EINVAL);
    in.n_tokens = 3;
    struct dsv32_seq_input two[2] = {in, in}; /* the same sequence twice */
    assert_int_equal(dsv32_engine_step(f->e, two, 2, lg, NULL), -EINVAL);
    in.seq = 3; /* not allocated */
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, lg, NULL), -EINVAL);
    dsv32_kv_seq_free(f->e->kv, s);
    free(lg);
}

/* 2 blocks of 64 tokens in all: a second sequence that does not fit fails cleanly. */
static void test_cache_full(void **state)
{
    struct fx *f = *state;
    int32_t p[100];
    prompt_of(p, 100, 3);
    float *lg = malloc(sizeof(float) * f->V * 2);
    int a = dsv32_kv_seq_new(f->e->kv), b = dsv32_kv_seq_new(f->e->kv);
    struct dsv32_seq_input in[2] = {
        {.seq = a, .n_tokens = 70, .tokens = p, .logits = DSV32_LOGITS_LAST},
        {.seq = b, .n_tokens = 10, .tokens = p, .logits = DSV32_LOGITS_LAST},
    };
    assert_int_equal(dsv32_engine_step(f->e, in, 2, lg, NULL), DSV32_EFULL);
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, a), 0);
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, b), 0);
    assert_int_equal(dsv32_kv_free_blocks(f->e->kv), 2);
    assert_int_equal(dsv32_engine_step(f->e, in, 1, lg, NULL), 0);
    assert_int_equal(dsv32_kv_seq_len(f->e->kv, a), 70);
    dsv32_kv_seq_free(f->e->kv, a);
    dsv32_kv_seq_free(f->e->kv, b);
    free(lg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_chunked_prefill, setup, teardown),
        cmocka_unit_test_setup_teardown(test_all_rows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_draw_in_step, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cache_full, setup_small, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
