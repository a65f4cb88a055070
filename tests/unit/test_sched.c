/* Unit tests of the continuous-batching scheduler on the tiny golden models: concurrent greedy
 * requests reproduce DeepSeek's reference tokens, prompt logprobs, seeded resume after failover
 * equals an unbroken run, stops, cancellation, queue limits and cache admission. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "safetensors.h"
#include "scheduler.h"

struct out {
    int32_t tok[64];
    int n;
    enum dsv32_finish why;
    int finished;
    int stop_after;  /* on_token returns 1 after this many tokens (0: never) */
    struct dsv32_logprobs plp[64];
    int n_plp;
};

static int on_token(void *ctx, int32_t t, const struct dsv32_logprobs *lp)
{
    struct out *o = ctx;
    if (o->n < 64)
        o->tok[o->n++] = t;
    return o->stop_after && o->n >= o->stop_after;
}

static void on_finish(void *ctx, enum dsv32_finish why, int np, int ng, int err)
{
    struct out *o = ctx;
    o->why = why;
    o->finished++;
}

static void on_plp(void *ctx, const struct dsv32_logprobs *lp, int n)
{
    struct out *o = ctx;
    o->n_plp = n;
    memcpy(o->plp, lp, sizeof(*lp) * (size_t)(n < 64 ? n : 64));
}

struct fx {
    struct dsv32_model *m;
    struct dsv32_engine *e;
    struct dsv32_st_file *golden;
};

static int setup_blocks(void **state, int blocks)
{
    struct fx *f = calloc(1, sizeof(*f));
    if (dsv32_model_load(GOLDEN_DIR "/tiny-bf16", NULL, &f->m) < 0)
        return -1;
    struct dsv32_engine_opts o = {.max_seqs = 8, .max_seq_len = 256, .kv_rope_f32 = 1,
                                  .kv_blocks = blocks, .max_batch_tokens = 128};
    if (dsv32_engine_new(f->m, &o, &f->e) < 0)
        return -1;
    if (dsv32_st_file_open(GOLDEN_DIR "/tiny-bf16/golden.safetensors", &f->golden) < 0)
        return -1;
    *state = f;
    return 0;
}
static int setup(void **state) { return setup_blocks(state, 0); }
static int setup_small(void **state) { return setup_blocks(state, 3); }

static int teardown(void **state)
{
    struct fx *f = *state;
    dsv32_st_file_close(f->golden);
    dsv32_engine_free(f->e);
    dsv32_model_free(f->m);
    free(f);
    return 0;
}

static const struct dsv32_st_tensor *gt(struct fx *f, const char *name)
{
    for (int i = 0; i < dsv32_st_file_count(f->golden); i++)
        if (strcmp(dsv32_st_file_tensor(f->golden, i)->name, name) == 0)
            return dsv32_st_file_tensor(f->golden, i);
    fail_msg("golden tensor %s missing", name);
    return NULL;
}

static struct dsv32_request req(uint64_t id, const int32_t *p, int n, int max_tokens, struct out *o)
{
    struct dsv32_request r = {.id = id, .prompt = p, .n_prompt = n, .max_tokens = max_tokens,
                              .ctx = o, .on_token = on_token, .on_finish = on_finish,
                              .on_prompt_logprobs = on_plp};
    dsv32_sampling_defaults(&r.sp);
    r.sp.temperature = 0;
    r.ignore_eos = 1;
    return r;
}

/* All three golden prompts at once, greedy: the reference's argmax tokens. */
static void test_concurrent_greedy_matches_reference(void **state)
{
    struct fx *f = *state;
    struct dsv32_sched *s;
    assert_int_equal(dsv32_sched_new(f->e, NULL, &s), 0);
    struct out o[3] = {0};
    int32_t prompts[3][64], want[3][16];
    int np[3], nt[3];
    for (int c = 0; c < 3; c++) {
        char name[64];
        snprintf(name, sizeof(name), "case%d.prompt", c);
        const struct dsv32_st_tensor *t = gt(f, name);
        np[c] = (int)t->numel;
        memcpy(prompts[c], t->data, t->n_bytes);
        snprintf(name, sizeof(name), "case%d.tokens", c);
        t = gt(f, name);
        nt[c] = (int)t->numel;
        memcpy(want[c], t->data, t->n_bytes);
        struct dsv32_request r = req(100 + c, prompts[c], np[c], nt[c], &o[c]);
        assert_int_equal(dsv32_sched_submit(s, &r), 0);
    }
    assert_int_equal(dsv32_sched_drain(s), 0);
    for (int c = 0; c < 3; c++) {
        assert_int_equal(o[c].finished, 1);
        assert_int_equal(o[c].why, DSV32_FINISH_LENGTH);
        assert_int_equal(o[c].n, nt[c]);
        assert_memory_equal(o[c].tok, want[c], sizeof(int32_t) * (size_t)nt[c]);
    }
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(s, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.free_blocks, st.total_blocks);
    dsv32_sched_free(s);
}

static void test_prompt_logprobs(void **state)
{
    struct fx *f = *state;
    struct dsv32_sched *s;
    /* a small token budget: the prompt is prefilled in chunks */
    struct dsv32_sched_opts so = {.max_batch_tokens = 7};
    assert_int_equal(dsv32_sched_new(f->e, &so, &s), 0);
    const struct dsv32_st_tensor *t = gt(f, "case1.prompt");
    int32_t p[64];
    memcpy(p, t->data, t->n_bytes);
    int n = (int)t->numel;
    struct out o = {0};
    struct dsv32_request r = req(1, p, n, 2, &o);
    r.sp.n_prompt_logprobs = 3;
    assert_int_equal(dsv32_sched_submit(s, &r), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(o.n_plp, n - 1);
    /* against a direct all-rows forward */
    float *lg = malloc(sizeof(float) * 1024 * (size_t)n);
    int seq = dsv32_kv_seq_new(f->e->kv);
    struct dsv32_seq_input in = {.seq = seq, .n_tokens = n, .tokens = p, .logits = DSV32_LOGITS_ALL};
    assert_int_equal(dsv32_engine_step(f->e, &in, 1, lg, NULL), 0);
    for (int i = 0; i + 1 < n; i++) {
        struct dsv32_logprobs want;
        dsv32_logprobs_of(lg + (size_t)i * 1024, 1024, p[i + 1], 3, &want);
        assert_int_equal(o.plp[i].chosen.token, p[i + 1]);
        assert_float_equal(o.plp[i].chosen.logprob, want.chosen.logprob, 1e-4);
        assert_int_equal(o.plp[i].n_top, 3);
        assert_int_equal(o.plp[i].top[0].token, want.top[0].token);
        assert_true(o.plp[i].chosen.logprob <= 0);
    }
    dsv32_kv_seq_free(f->e->kv, seq);
    free(lg);
    dsv32_sched_free(s);
}

static void test_seeded_resume(void **state)
{
    struct fx *f = *state;
    struct dsv32_sched *s;
    assert_int_equal(dsv32_sched_new(f->e, NULL, &s), 0);
    int32_t p[5] = {11, 22, 33, 44, 55};
    struct out full = {0}, tail = {0};
    struct dsv32_request r = req(1, p, 5, 12, &full);
    r.sp.temperature = 0.9f;
    r.sp.top_p = 0.95f;
    r.sp.frequency_penalty = 0.3f;
    r.sp.seed = 42;
    r.sp.has_seed = 1;
    assert_int_equal(dsv32_sched_submit(s, &r), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(full.n, 12);
    /* the router re-runs it elsewhere after 5 tokens reached the client */
    struct dsv32_request r2 = r;
    r2.id = 2;
    r2.ctx = &tail;
    r2.resume = full.tok;
    r2.n_resume = 5;
    assert_int_equal(dsv32_sched_submit(s, &r2), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(tail.n, 7);
    assert_memory_equal(tail.tok, full.tok + 5, 7 * sizeof(int32_t));
    dsv32_sched_free(s);
}

static void test_stops_and_cancel(void **state)
{
    struct fx *f = *state;
    struct dsv32_sched *s;
    struct dsv32_sched_opts so = {.max_queue = 2};
    assert_int_equal(dsv32_sched_new(f->e, &so, &s), 0);
    int32_t p[4] = {7, 8, 9, 10};
    struct out a = {.stop_after = 3}, b = {0}, c = {0}, d = {0};
    struct dsv32_request ra = req(1, p, 4, 20, &a), rb = req(2, p, 4, 20, &b);
    assert_int_equal(dsv32_sched_submit(s, &ra), 0);
    assert_int_equal(dsv32_sched_submit(s, &rb), 0);
    struct dsv32_request rc = req(3, p, 4, 20, &c);
    assert_int_equal(dsv32_sched_submit(s, &rc), DSV32_EOVERLOAD); /* 2 waiting already */
    assert_int_equal(dsv32_sched_submit(s, &ra), -EEXIST);
    assert_int_equal(dsv32_sched_step(s), 1); /* both prefilled, one token each */
    assert_int_equal(dsv32_sched_cancel(s, 2), 0);
    assert_int_equal(dsv32_sched_cancel(s, 99), -ENOENT);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(a.why, DSV32_FINISH_STOP_STRING);
    assert_int_equal(a.n, 3);
    assert_int_equal(b.why, DSV32_FINISH_CANCELLED);
    assert_int_equal(b.finished, 1);
    /* a stop id: the first greedy token of this prompt, so it stops at once without output */
    struct out probe = {0};
    struct dsv32_request rp = req(4, p, 4, 1, &probe);
    assert_int_equal(dsv32_sched_submit(s, &rp), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    struct dsv32_request rd = req(5, p, 4, 10, &d);
    rd.stop_ids[0] = probe.tok[0];
    rd.n_stop_ids = 1;
    assert_int_equal(dsv32_sched_submit(s, &rd), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(d.why, DSV32_FINISH_STOP);
    assert_int_equal(d.n, 0);
    /* bad requests */
    struct dsv32_request bad = req(6, p, 0, 10, &d);
    assert_int_equal(dsv32_sched_submit(s, &bad), -EINVAL);
    bad = req(6, p, 4, 1000, &d);
    assert_int_equal(dsv32_sched_submit(s, &bad), DSV32_ECONTEXT);
    bad = req(6, p, 4, 10, &d);
    bad.sp.top_p = 0;
    assert_int_equal(dsv32_sched_submit(s, &bad), -EINVAL);
    int32_t badp[1] = {5000};
    bad = req(6, badp, 1, 10, &d);
    assert_int_equal(dsv32_sched_submit(s, &bad), DSV32_ETOKEN);
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(s, &st);
    assert_int_equal(st.free_blocks, st.total_blocks);
    dsv32_sched_free(s);
}

/* 3 blocks in all: two requests of 100 tokens each cannot run together; the second waits. */
static void test_admission(void **state)
{
    struct fx *f = *state;
    struct dsv32_sched *s;
    assert_int_equal(dsv32_sched_new(f->e, NULL, &s), 0);
    int32_t p[90];
    for (int i = 0; i < 90; i++)
        p[i] = 3 + i;
    struct out a = {0}, b = {0};
    struct dsv32_request ra = req(1, p, 90, 10, &a), rb = req(2, p, 90, 10, &b);
    assert_int_equal(dsv32_sched_submit(s, &ra), 0);
    assert_int_equal(dsv32_sched_submit(s, &rb), 0);
    assert_int_equal(dsv32_sched_step(s), 1);
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(s, &st);
    assert_int_equal(st.running, 1);
    assert_int_equal(st.queued, 1);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(a.n, 10);
    assert_int_equal(b.n, 10);
    assert_memory_equal(a.tok, b.tok, sizeof(int32_t) * 10);
    struct dsv32_request big = req(3, p, 90, 150, &a);
    assert_int_equal(dsv32_sched_submit(s, &big), DSV32_EFULL); /* larger than the whole cache */
    dsv32_sched_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_concurrent_greedy_matches_reference, setup, teardown),
        cmocka_unit_test_setup_teardown(test_prompt_logprobs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_seeded_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stops_and_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_admission, setup_small, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
