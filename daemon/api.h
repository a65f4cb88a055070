/* The public API's messages <-> the engine's structures, with the validation both the router and
 * the attention daemons apply: sampling parameters from dsv32.v1.SamplingParams (with the reason
 * for every refusal, for INVALID_ARGUMENT), logprobs into dsv32.v1.Logprobs, finish reasons. */
#ifndef DSV32_API_H
#define DSV32_API_H

#include <stddef.h>
#include <stdint.h>

#include "dsv32.pb-c.h"
#include "sampling.h"
#include "scheduler.h"
#include "textgen.h"
#include "tokenizer.h"

/* A request's generation settings, validated. */
struct dsv32_api_gen {
    struct dsv32_sampling_params sp;
    int max_tokens;
    int32_t stop_ids[DSV32_MAX_STOP_IDS];
    int n_stop_ids;
    int ignore_eos;
    const char *const *stop;    /* points into the message */
    int n_stop;
};

/* Validates pb (NULL: all defaults) for a prompt of n_prompt tokens on a model with `vocab` ids
 * and `context` positions. max_tokens 0 means up to the context. -EINVAL with a message in err
 * naming the parameter and its allowed range. */
int dsv32_api_gen_from_pb(const Dsv32__V1__SamplingParams *pb, int n_prompt, int vocab,
                          int context, struct dsv32_api_gen *ret, char *err, size_t err_len);

/* Fills out (and its token text, allocated into the arena `strbuf` of strbuf_cap bytes) from lp.
 * The message points into top_store (DSV32_MAX_LOGPROBS entries + 1) and strbuf. */
struct dsv32_api_logprobs_store {
    Dsv32__V1__Logprobs msg;
    Dsv32__V1__TokenLogprob chosen;
    Dsv32__V1__TokenLogprob top[DSV32_MAX_LOGPROBS];
    Dsv32__V1__TokenLogprob *top_ptr[DSV32_MAX_LOGPROBS];
    char text[DSV32_MAX_LOGPROBS + 1][64];
};
void dsv32_api_logprobs_to_pb(const struct dsv32_tok *tok, const struct dsv32_logprobs *lp,
                              struct dsv32_api_logprobs_store *st);

Dsv32__V1__FinishReason dsv32_api_finish_to_pb(enum dsv32_finish f);
enum dsv32_finish dsv32_api_finish_from_pb(Dsv32__V1__FinishReason f);

/* Copies a request id into buf (at most cap - 1 bytes of [A-Za-z0-9._:-]); -EINVAL otherwise. */
int dsv32_api_request_id_ok(const char *id);

#endif
