/* Text generation over the scheduler; see textgen.h. */
#define _GNU_SOURCE 1 /* memmem */
#include "textgen.h"

#include "error.h"
#include "log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* ---- stop strings ---- */

int dsv32_stop_init(struct dsv32_stop_matcher *m, const char *const *stops, int n)
{
    memset(m, 0, sizeof(*m));
    m->matched = -1;
    if (n < 0 || n > DSV32_MAX_STOP_STRINGS)
        return -EINVAL;
    for (int i = 0; i < n; i++) {
        size_t l = stops[i] ? strlen(stops[i]) : 0;
        if (l == 0 || l > DSV32_MAX_STOP_STRING_BYTES || !dsv32_utf8_valid(stops[i], l)) {
            dsv32_stop_done(m);
            return -EINVAL;
        }
        if (!(m->stops[m->n_stops++] = strdup(stops[i]))) {
            dsv32_stop_done(m);
            return -ENOMEM;
        }
        if (l > m->max_len)
            m->max_len = l;
    }
    return 0;
}

void dsv32_stop_done(struct dsv32_stop_matcher *m)
{
    for (int i = 0; i < m->n_stops; i++)
        free(m->stops[i]);
    free(m->held);
    free(m->out);
    memset(m, 0, sizeof(*m));
}

static int reserve(char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t c = need * 2 > 64 ? need * 2 : 64;
    char *b = realloc(*buf, c);
    if (!b)
        return -ENOMEM;
    *buf = b;
    *cap = c;
    return 0;
}

/* Moves held[0..n) to the hand-out buffer. */
static int hand_out(struct dsv32_stop_matcher *m, size_t n, const char **ret_out, size_t *ret_len)
{
    if (reserve(&m->out, &m->out_cap, n + 1) < 0)
        return -ENOMEM;
    memcpy(m->out, m->held, n);
    m->out[n] = 0;
    memmove(m->held, m->held + n, m->n_held - n);
    m->n_held -= n;
    *ret_out = m->out;
    *ret_len = n;
    return 0;
}

int dsv32_stop_feed(struct dsv32_stop_matcher *m, const char *text, size_t len,
                    const char **ret_out, size_t *ret_len)
{
    if (m->stopped)
        return hand_out(m, 0, ret_out, ret_len) < 0 ? -ENOMEM : 1;
    if (reserve(&m->held, &m->held_cap, m->n_held + len + 1) < 0)
        return -ENOMEM;
    memcpy(m->held + m->n_held, text, len);
    m->n_held += len;
    /* the earliest occurrence of any stop string ends the text */
    size_t best = (size_t)-1;
    int which = -1;
    for (int i = 0; i < m->n_stops; i++) {
        const char *p = memmem(m->held, m->n_held, m->stops[i], strlen(m->stops[i]));
        if (p && (size_t)(p - m->held) < best) {
            best = (size_t)(p - m->held);
            which = i;
        }
    }
    if (best != (size_t)-1) {
        m->stopped = 1;
        m->matched = which;
        int r = hand_out(m, best, ret_out, ret_len);
        m->n_held = 0;
        return r < 0 ? r : 1;
    }
    /* hold back the last max_len - 1 bytes (they could begin a stop string), cut on a UTF-8
     * character boundary */
    size_t keep = m->n_stops ? m->max_len - 1 : 0;
    size_t n = m->n_held > keep ? m->n_held - keep : 0;
    while (n > 0 && n < m->n_held && ((unsigned char)m->held[n] & 0xC0) == 0x80)
        n--;
    return hand_out(m, n, ret_out, ret_len);
}

void dsv32_stop_flush(struct dsv32_stop_matcher *m, const char **ret_out, size_t *ret_len)
{
    if (m->stopped || hand_out(m, m->n_held, ret_out, ret_len) < 0) {
        *ret_out = "";
        *ret_len = 0;
    }
}

/* ---- requests ---- */

struct tg {
    struct dsv32_text_request tr; /* user callbacks and ctx */
    struct dsv32_tok_stream *stream;
    struct dsv32_stop_matcher stop;
    int n_completion;
};

static void tg_free(struct tg *g)
{
    if (!g)
        return;
    dsv32_tok_stream_free(g->stream);
    dsv32_stop_done(&g->stop);
    free(g);
}

static int tg_on_token(void *ctx, int32_t token, const struct dsv32_logprobs *lp)
{
    struct tg *g = ctx;
    const char *t = "", *out = "";
    size_t tl = 0, ol = 0;
    g->n_completion++;
    if (dsv32_tok_stream_push(g->stream, token, &t, &tl) < 0)
        tl = 0; /* an id the tokenizer does not know: no text (the id still streams) */
    int stopped = dsv32_stop_feed(&g->stop, t, tl, &out, &ol);
    if (stopped < 0) {
        out = "";
        ol = 0;
        stopped = 0;
    }
    if (g->tr.on_token)
        g->tr.on_token(g->tr.ctx, token, out, ol, lp);
    return stopped == 1;
}

static void tg_on_plp(void *ctx, const struct dsv32_logprobs *lp, int n)
{
    struct tg *g = ctx;
    if (g->tr.on_prompt_logprobs)
        g->tr.on_prompt_logprobs(g->tr.ctx, lp, n);
}

static void tg_on_finish(void *ctx, enum dsv32_finish why, int n_prompt, int n_generated, int err)
{
    struct tg *g = ctx;
    const char *t = "", *out = "";
    size_t tl = 0, ol = 0;
    char *text = NULL;
    size_t n = 0;
    if (why != DSV32_FINISH_STOP_STRING) {
        /* what the stream and the stop matcher still hold */
        if (dsv32_tok_stream_flush(g->stream, &t, &tl) == 0 && tl > 0 &&
            dsv32_stop_feed(&g->stop, t, tl, &out, &ol) >= 0 && ol > 0) {
            text = malloc(ol + 1);
            if (text) {
                memcpy(text, out, ol);
                n = ol;
            }
        }
        if (!g->stop.stopped) {
            dsv32_stop_flush(&g->stop, &out, &ol);
            char *t2 = realloc(text, n + ol + 1);
            if (t2) {
                text = t2;
                memcpy(text + n, out, ol);
                n += ol;
            }
        }
    }
    if (text)
        text[n] = 0;
    struct dsv32_usage u = {.prompt_tokens = n_prompt, .completion_tokens = n_generated};
    if (g->tr.on_finish)
        g->tr.on_finish(g->tr.ctx, why, text ? text : "", n, &u, err);
    free(text);
    tg_free(g);
}

int dsv32_textgen_submit(struct dsv32_sched *s, const struct dsv32_tok *tok,
                         const struct dsv32_text_request *tr)
{
    struct tg *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->tr = *tr;
    g->tr.stop_strings = NULL;
    int r = dsv32_stop_init(&g->stop, tr->stop_strings, tr->n_stop_strings);
    if (r < 0 || (r = dsv32_tok_stream_new(tok, tr->decode_flags, &g->stream)) < 0) {
        tg_free(g);
        return r;
    }
    /* Resumed tokens (failover): replaying them through the stream and the stop matcher puts
     * both in the state the failed daemon's were in. What they hand out now is the text the
     * client already has; what they still hold comes out with the next tokens, as it would have. */
    for (int i = 0; i < tr->r.n_resume; i++) {
        const char *t, *out;
        size_t tl, ol;
        if (dsv32_tok_stream_push(g->stream, tr->r.resume[i], &t, &tl) < 0)
            continue;
        r = dsv32_stop_feed(&g->stop, t, tl, &out, &ol);
        if (r != 0) {
            tg_free(g);
            return r < 0 ? r : -EINVAL; /* the delivered text already held a stop string */
        }
    }
    struct dsv32_request r2 = tr->r;
    r2.ctx = g;
    r2.on_token = tg_on_token;
    r2.on_prompt_logprobs = tg_on_plp;
    r2.on_finish = tg_on_finish;
    r = dsv32_sched_submit(s, &r2);
    if (r < 0)
        tg_free(g);
    return r;
}
