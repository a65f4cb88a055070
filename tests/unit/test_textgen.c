/* Unit tests of stop strings (held-back text, the earliest match wins, UTF-8 boundaries) and of
 * text generation through the scheduler with DeepSeek's real tokenizer on a model written by
 * dsv32-mkmodel: streamed text equals the decode of the streamed ids, stop strings end the text
 * exactly before them, and a resumed request continues the same text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "safetensors.h"
#include "textgen.h"

static void feed_all(struct dsv32_stop_matcher *m, const char *const *pieces, int n, char *out,
                     int *stopped)
{
    out[0] = 0;
    *stopped = 0;
    for (int i = 0; i < n && !*stopped; i++) {
        const char *o;
        size_t ol;
        int r = dsv32_stop_feed(m, pieces[i], strlen(pieces[i]), &o, &ol);
        assert_true(r >= 0);
        strncat(out, o, ol);
        *stopped = r;
    }
    if (!*stopped) {
        const char *o;
        size_t ol;
        dsv32_stop_flush(m, &o, &ol);
        strncat(out, o, ol);
    }
}

static void test_stop_strings(void **state)
{
    struct dsv32_stop_matcher m;
    const char *stops[] = {"END", "\n\n"};
    char out[256];
    int stopped;
    /* a stop string split across pieces */
    assert_int_equal(dsv32_stop_init(&m, stops, 2), 0);
    const char *p1[] = {"hello E", "N", "D and more"};
    feed_all(&m, p1, 3, out, &stopped);
    assert_int_equal(stopped, 1);
    assert_string_equal(out, "hello ");
    dsv32_stop_done(&m);
    /* no stop: everything comes out, nothing is lost or repeated */
    assert_int_equal(dsv32_stop_init(&m, stops, 2), 0);
    const char *p2[] = {"a", "bE", "N", "x\n", "y"};
    feed_all(&m, p2, 5, out, &stopped);
    assert_int_equal(stopped, 0);
    assert_string_equal(out, "abENx\ny");
    dsv32_stop_done(&m);
    /* the earliest match wins */
    assert_int_equal(dsv32_stop_init(&m, stops, 2), 0);
    const char *p3[] = {"one\n\ntwo END"};
    feed_all(&m, p3, 1, out, &stopped);
    assert_string_equal(out, "one");
    dsv32_stop_done(&m);
    /* held-back text is cut on a character boundary: a 3-byte character before a 4-byte stop */
    const char *s4[] = {"STOP"};
    assert_int_equal(dsv32_stop_init(&m, s4, 1), 0);
    const char *o;
    size_t ol;
    assert_int_equal(dsv32_stop_feed(&m, "ab\xe4\xb8\xad", 5, &o, &ol), 0);
    assert_int_equal(ol, 2); /* "ab": the character is held whole with the tail */
    dsv32_stop_done(&m);
    /* bad stop strings */
    const char *bad[] = {""};
    assert_int_equal(dsv32_stop_init(&m, bad, 1), -EINVAL);
    const char *bad2[] = {"\xff"};
    assert_int_equal(dsv32_stop_init(&m, bad2, 1), -EINVAL);
}

struct out {
    int32_t ids[64];
    int n;
    char text[4096];
    size_t pos[64];    /* text length after each token */
    enum dsv32_finish why;
    int finished;
};

static void on_token(void *ctx, int32_t t, const char *text, size_t len, const struct dsv32_logprobs *lp)
{
    struct out *o = ctx;
    strncat(o->text, text, len);
    o->pos[o->n] = strlen(o->text);
    o->ids[o->n++] = t;
}

static void on_finish(void *ctx, enum dsv32_finish why, const char *text, size_t len,
                      const struct dsv32_usage *u, int err)
{
    struct out *o = ctx;
    strncat(o->text, text, len);
    o->why = why;
    o->finished++;
}

static struct dsv32_text_request treq(uint64_t id, const int32_t *p, int n, int max, struct out *o)
{
    struct dsv32_text_request tr = {.ctx = o, .on_token = on_token, .on_finish = on_finish};
    tr.r.id = id;
    tr.r.prompt = p;
    tr.r.n_prompt = n;
    tr.r.max_tokens = max;
    tr.r.ignore_eos = 1;
    dsv32_sampling_defaults(&tr.r.sp);
    tr.r.sp.temperature = 0.8f;
    tr.r.sp.seed = 7;
    tr.r.sp.has_seed = 1;
    return tr;
}

static void test_generation_text(void **state)
{
    char dir[] = "/tmp/dsv32-textgen-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "%s --out %s/m --layers 2 >/dev/null 2>&1", MKMODEL, dir);
    assert_int_equal(system(cmd), 0);
    char mdir[600];
    snprintf(mdir, sizeof(mdir), "%s/m", dir);
    struct dsv32_tok *tok;
    assert_int_equal(dsv32_tok_load(mdir, &tok), 0);
    struct dsv32_model *m;
    struct dsv32_engine *e;
    struct dsv32_sched *s;
    assert_int_equal(dsv32_model_load(mdir, NULL, &m), 0);
    struct dsv32_engine_opts eo = {.max_seqs = 4, .max_seq_len = 256, .max_batch_tokens = 256};
    assert_int_equal(dsv32_engine_new(m, &eo, &e), 0);
    assert_int_equal(dsv32_sched_new(e, NULL, &s), 0);
    int32_t *p;
    size_t np;
    const char *prompt = "The quick brown fox 跳过了 the lazy dog 🐕.";
    assert_int_equal(dsv32_tok_encode(tok, prompt, strlen(prompt), DSV32_TOK_ADD_BOS, &p, &np), 0);

    /* the full run: streamed text == decode of the streamed ids */
    struct out full = {0};
    struct dsv32_text_request tr = treq(1, p, (int)np, 40, &full);
    assert_int_equal(dsv32_textgen_submit(s, tok, &tr), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(full.finished, 1);
    assert_int_equal(full.n, 40);
    char *dec;
    size_t dl;
    assert_int_equal(dsv32_tok_decode(tok, full.ids, 40, 0, &dec, &dl), 0);
    assert_string_equal(full.text, dec);

    /* a stop string taken from the middle of that text ends it right before */
    size_t cut = dl / 2;
    while (cut < dl && ((unsigned char)dec[cut] & 0xC0) == 0x80)
        cut++;
    char stop[8] = {0};
    size_t sl = 0;
    while (sl < 3 && cut + sl < dl) {
        stop[sl] = dec[cut + sl];
        sl++;
    }
    while (sl < dl - cut && ((unsigned char)dec[cut + sl] & 0xC0) == 0x80)
        stop[sl] = dec[cut + sl], sl++;
    const char *first = strstr(dec, stop);
    struct out st = {0};
    tr = treq(2, p, (int)np, 40, &st);
    const char *stops[1] = {stop};
    tr.stop_strings = stops;
    tr.n_stop_strings = 1;
    assert_int_equal(dsv32_textgen_submit(s, tok, &tr), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(st.why, DSV32_FINISH_STOP_STRING);
    assert_int_equal(strlen(st.text), (size_t)(first - dec));
    assert_memory_equal(st.text, dec, (size_t)(first - dec));

    /* resumed after 15 tokens: the rest of the text follows */
    struct out tail = {0};
    tr = treq(3, p, (int)np, 40, &tail);
    tr.r.resume = full.ids;
    tr.r.n_resume = 15;
    assert_int_equal(dsv32_textgen_submit(s, tok, &tr), 0);
    assert_int_equal(dsv32_sched_drain(s), 0);
    assert_int_equal(tail.n, 25);
    assert_memory_equal(tail.ids, full.ids + 15, 25 * sizeof(int32_t));
    /* what the client saw after 15 tokens, then the resumed request's text: the whole text */
    assert_string_equal(tail.text, full.text + full.pos[14]);
    free(dec);
    free(p);
    dsv32_sched_free(s);
    dsv32_engine_free(e);
    dsv32_model_free(m);
    dsv32_tok_free(tok);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_generation_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
