/* Text generation on top of the scheduler: streaming detokenization that never splits a UTF-8
 * character, stop strings with the OpenAI semantics (the text ends before the first stop string;
 * text that could still become one is held back until it cannot), and usage accounting. The
 * attention daemon and `dsv32 generate` both serve requests through it. */
#ifndef DSV32_TEXTGEN_H
#define DSV32_TEXTGEN_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"
#include "tokenizer.h"

#define DSV32_MAX_STOP_STRINGS 16
#define DSV32_MAX_STOP_STRING_BYTES 256

/* Stop-string matching over a growing text, usable on its own. */
struct dsv32_stop_matcher {
    char *stops[DSV32_MAX_STOP_STRINGS];
    int n_stops;
    size_t max_len;
    char *held;      /* text not handed out yet */
    size_t n_held, held_cap;
    char *out;       /* what the last call handed out */
    size_t out_cap;
    int stopped;
    int matched;     /* index of the stop string that ended the text, -1 */
};

/* -EINVAL for empty strings, too many or too long ones. */
int dsv32_stop_init(struct dsv32_stop_matcher *m, const char *const *stops, int n);
void dsv32_stop_done(struct dsv32_stop_matcher *m);
/* Adds text; *ret_out, *ret_len = what may be handed out now (valid until the next call). Returns 1
 * when a stop string matched (the output ends before it), 0 otherwise, <0 on error. */
int dsv32_stop_feed(struct dsv32_stop_matcher *m, const char *text, size_t len,
                    const char **ret_out, size_t *ret_len);
/* The held text, at the end of a generation that no stop string ended. */
void dsv32_stop_flush(struct dsv32_stop_matcher *m, const char **ret_out, size_t *ret_len);

struct dsv32_usage {
    int prompt_tokens, completion_tokens;
};

struct dsv32_text_request {
    struct dsv32_request r;           /* the token-level request; its callbacks are ours */
    const char *const *stop_strings;
    int n_stop_strings;
    unsigned decode_flags;            /* DSV32_TOK_SKIP_SPECIAL... */
    void *ctx;
    /* a committed token and the text it made safe to show (may be empty) */
    void (*on_token)(void *ctx, int32_t token, const char *text, size_t len,
                     const struct dsv32_logprobs *lp);
    void (*on_prompt_logprobs)(void *ctx, const struct dsv32_logprobs *lp, int n);
    /* last text (held back until now), then the end */
    void (*on_finish)(void *ctx, enum dsv32_finish reason, const char *text, size_t len,
                      const struct dsv32_usage *usage, int err);
};

/* Submits a request: everything pointed to is copied. Errors as dsv32_sched_submit, plus -EINVAL
 * for bad stop strings. */
int dsv32_textgen_submit(struct dsv32_sched *s, const struct dsv32_tok *tok,
                         const struct dsv32_text_request *tr);

#endif
