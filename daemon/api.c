/* Conversions and validation between the public API and the engine; see api.h. */
#include "api.h"

#include "error.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define BAD(...)                                                                                   \
    do {                                                                                           \
        if (err)                                                                                   \
            snprintf(err, err_len, __VA_ARGS__);                                                   \
        return -EINVAL;                                                                            \
    } while (0)

int dsv32_api_gen_from_pb(const Dsv32__V1__SamplingParams *pb, int n_prompt, int vocab,
                          int context, struct dsv32_api_gen *g, char *err, size_t err_len)
{
    static const Dsv32__V1__SamplingParams none = DSV32__V1__SAMPLING_PARAMS__INIT;
    if (!pb)
        pb = &none;
    memset(g, 0, sizeof(*g));
    dsv32_sampling_defaults(&g->sp);
    if (n_prompt <= 0)
        BAD("the prompt is empty");
    if (n_prompt >= context)
        BAD("the prompt has %d tokens; the context length is %d, which leaves no room to generate",
            n_prompt, context);
    if (pb->temperature_opt_case == DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE)
        g->sp.temperature = pb->temperature;
    g->sp.top_p = pb->top_p == 0.0f ? 1.0f : pb->top_p;
    g->sp.top_k = pb->top_k;
    g->sp.min_p = pb->min_p;
    g->sp.presence_penalty = pb->presence_penalty;
    g->sp.frequency_penalty = pb->frequency_penalty;
    g->sp.repetition_penalty = pb->repetition_penalty == 0.0f ? 1.0f : pb->repetition_penalty;
    if (pb->seed_opt_case == DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED) {
        g->sp.seed = pb->seed;
        g->sp.has_seed = 1;
    }
    if (pb->logprobs_opt_case == DSV32__V1__SAMPLING_PARAMS__LOGPROBS_OPT_LOGPROBS) {
        if (pb->logprobs > DSV32_MAX_LOGPROBS)
            BAD("logprobs must be in [0, %d], got %u", DSV32_MAX_LOGPROBS, pb->logprobs);
        g->sp.n_logprobs = (int)pb->logprobs;
    }
    if (pb->prompt_logprobs_opt_case == DSV32__V1__SAMPLING_PARAMS__PROMPT_LOGPROBS_OPT_PROMPT_LOGPROBS) {
        if (pb->prompt_logprobs > DSV32_MAX_LOGPROBS)
            BAD("prompt_logprobs must be in [0, %d], got %u", DSV32_MAX_LOGPROBS, pb->prompt_logprobs);
        g->sp.n_prompt_logprobs = (int)pb->prompt_logprobs;
    }
    int r = dsv32_sampling_validate(&g->sp, err, err_len);
    if (r < 0)
        return r;
    const int room = context - n_prompt;
    if (pb->max_tokens == 0)
        g->max_tokens = room;
    else if (pb->max_tokens > (uint32_t)room)
        BAD("max_tokens %u with a prompt of %d tokens exceeds the context length %d (at most %d)",
            pb->max_tokens, n_prompt, context, room);
    else
        g->max_tokens = (int)pb->max_tokens;
    if (pb->n_stop_token_ids > DSV32_MAX_STOP_IDS)
        BAD("at most %d stop_token_ids, got %zu", DSV32_MAX_STOP_IDS, pb->n_stop_token_ids);
    for (size_t i = 0; i < pb->n_stop_token_ids; i++) {
        if (pb->stop_token_ids[i] < 0 || pb->stop_token_ids[i] >= vocab)
            BAD("stop_token_ids[%zu] = %d is not a token id (vocabulary of %d)", i,
                pb->stop_token_ids[i], vocab);
        g->stop_ids[g->n_stop_ids++] = pb->stop_token_ids[i];
    }
    if (pb->n_stop > DSV32_MAX_STOP_STRINGS)
        BAD("at most %d stop strings, got %zu", DSV32_MAX_STOP_STRINGS, pb->n_stop);
    for (size_t i = 0; i < pb->n_stop; i++) {
        size_t l = strlen(pb->stop[i]);
        if (l == 0 || l > DSV32_MAX_STOP_STRING_BYTES)
            BAD("stop[%zu] must have 1 to %d bytes", i, DSV32_MAX_STOP_STRING_BYTES);
        if (!dsv32_utf8_valid(pb->stop[i], l))
            BAD("stop[%zu] is not valid UTF-8", i);
    }
    g->stop = (const char *const *)pb->stop;
    g->n_stop = (int)pb->n_stop;
    g->ignore_eos = pb->ignore_eos;
    return 0;
}

static void token_text(const struct dsv32_tok *tok, int32_t id, char *buf, size_t cap)
{
    const char *b;
    size_t n;
    buf[0] = 0;
    if (!tok || dsv32_tok_id_bytes(tok, id, &b, &n) < 0)
        return;
    if (n >= cap)
        n = cap - 1;
    memcpy(buf, b, n);
    buf[n] = 0;
    /* a token may be a fragment of a character: keep the text valid UTF-8 for protobuf */
    while (n > 0 && !dsv32_utf8_valid(buf, n))
        buf[--n] = 0;
}

void dsv32_api_logprobs_to_pb(const struct dsv32_tok *tok, const struct dsv32_logprobs *lp,
                              struct dsv32_api_logprobs_store *st)
{
    dsv32__v1__logprobs__init(&st->msg);
    dsv32__v1__token_logprob__init(&st->chosen);
    st->chosen.token_id = lp->chosen.token;
    st->chosen.logprob = lp->chosen.logprob;
    token_text(tok, lp->chosen.token, st->text[0], sizeof(st->text[0]));
    st->chosen.token = st->text[0];
    st->msg.chosen = &st->chosen;
    for (int i = 0; i < lp->n_top && i < DSV32_MAX_LOGPROBS; i++) {
        dsv32__v1__token_logprob__init(&st->top[i]);
        st->top[i].token_id = lp->top[i].token;
        st->top[i].logprob = lp->top[i].logprob;
        token_text(tok, lp->top[i].token, st->text[i + 1], sizeof(st->text[i + 1]));
        st->top[i].token = st->text[i + 1];
        st->top_ptr[i] = &st->top[i];
    }
    st->msg.n_top = (size_t)(lp->n_top < DSV32_MAX_LOGPROBS ? lp->n_top : DSV32_MAX_LOGPROBS);
    st->msg.top = st->top_ptr;
}

Dsv32__V1__FinishReason dsv32_api_finish_to_pb(enum dsv32_finish f)
{
    switch (f) {
    case DSV32_FINISH_STOP: return DSV32__V1__FINISH_REASON__FINISH_REASON_STOP;
    case DSV32_FINISH_LENGTH: return DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    case DSV32_FINISH_STOP_STRING: return DSV32__V1__FINISH_REASON__FINISH_REASON_STOP_STRING;
    case DSV32_FINISH_CANCELLED: return DSV32__V1__FINISH_REASON__FINISH_REASON_CANCELLED;
    case DSV32_FINISH_ERROR: return DSV32__V1__FINISH_REASON__FINISH_REASON_ERROR;
    default: return DSV32__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
    }
}

enum dsv32_finish dsv32_api_finish_from_pb(Dsv32__V1__FinishReason f)
{
    switch (f) {
    case DSV32__V1__FINISH_REASON__FINISH_REASON_STOP: return DSV32_FINISH_STOP;
    case DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH: return DSV32_FINISH_LENGTH;
    case DSV32__V1__FINISH_REASON__FINISH_REASON_STOP_STRING: return DSV32_FINISH_STOP_STRING;
    case DSV32__V1__FINISH_REASON__FINISH_REASON_CANCELLED: return DSV32_FINISH_CANCELLED;
    case DSV32__V1__FINISH_REASON__FINISH_REASON_ERROR: return DSV32_FINISH_ERROR;
    default: return DSV32_FINISH_NONE;
    }
}

int dsv32_api_request_id_ok(const char *id)
{
    size_t n = strlen(id);
    if (n == 0 || n > 128)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        char ch = id[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == ':' || ch == '-'))
            return -EINVAL;
    }
    return 0;
}
