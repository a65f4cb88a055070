/* Continuous batching over one engine: requests wait in a bounded queue, are admitted when the
 * KV cache can hold their whole length (prompt + max_tokens, so a running request never runs out
 * of cache), and every step mixes one decode token per running request with chunks of waiting
 * prompts up to a token budget (chunked prefill). Tokens reach the caller (on_token) only after
 * the step that made them has completed; a step that fails (an expert shard died, say) changes
 * nothing and is run again. One thread runs the steps; submit and cancel may be called from any
 * thread. Callbacks run on the scheduler's thread and must not block; they may call
 * dsv32_sched_cancel (any request, their own included) but must not take locks that other threads
 * hold while they call into the scheduler. */
#ifndef DSV32_SCHED_H
#define DSV32_SCHED_H

#include <stdint.h>

#include "engine.h"
#include "sampling.h"

enum dsv32_finish {
    DSV32_FINISH_NONE = 0,
    DSV32_FINISH_STOP,        /* end-of-sequence or a stop token id */
    DSV32_FINISH_LENGTH,      /* max_tokens reached (or the context is full) */
    DSV32_FINISH_STOP_STRING, /* on_token asked to stop (a stop string matched) */
    DSV32_FINISH_CANCELLED,
    DSV32_FINISH_ERROR,
};
const char *dsv32_finish_name(enum dsv32_finish f);

#define DSV32_MAX_STOP_IDS 16

struct dsv32_request {
    uint64_t id;                 /* unique among live requests */
    const int32_t *prompt;       /* (n_prompt), copied at submit */
    int n_prompt;
    struct dsv32_sampling_params sp;
    int max_tokens;              /* generated tokens, resumed ones included */
    int32_t stop_ids[DSV32_MAX_STOP_IDS];
    int n_stop_ids;
    int ignore_eos;
    /* Failover: tokens a client already received from an earlier attempt. They are appended to
     * the prompt, count towards max_tokens and the penalties, and the sampler's random stream is
     * advanced past them, so a seeded request continues exactly where it stopped. */
    const int32_t *resume;
    int n_resume;
    void *ctx;
    /* n entries for prompt tokens 1..n_prompt-1 (token 0 has no logprob), when requested */
    void (*on_prompt_logprobs)(void *ctx, const struct dsv32_logprobs *lp, int n);
    /* a committed token; return 1 to finish with STOP_STRING (this token is the last) */
    int (*on_token)(void *ctx, int32_t token, const struct dsv32_logprobs *lp);
    /* exactly once per accepted request; err is 0 unless reason is ERROR */
    void (*on_finish)(void *ctx, enum dsv32_finish reason, int n_prompt, int n_generated, int err);
};

struct dsv32_sched_opts {
    int max_queue;         /* waiting requests (default 256); past it submit says EOVERLOAD */
    int max_batch_tokens;  /* rows per step (default: the engine's max) */
    int max_running;       /* default: the engine's max_seqs */
};

struct dsv32_sched_stats {
    int queued, running;
    int free_blocks, total_blocks;
    uint64_t steps, tokens_generated, prompt_tokens, step_retries;
    uint64_t step_ns, step_rows; /* wall time in the engine's steps, token rows they carried */
    uint64_t post_ns;            /* after the steps: drawing tokens, logprobs, streaming them */
};

struct dsv32_sched;

int dsv32_sched_new(struct dsv32_engine *e, const struct dsv32_sched_opts *o,
                    struct dsv32_sched **ret);
/* Stops the thread if running; unfinished requests finish as CANCELLED. */
void dsv32_sched_free(struct dsv32_sched *s);
/* Step hooks (expert parallelism); set before starting. */
void dsv32_sched_set_hooks(struct dsv32_sched *s, const struct dsv32_step_hooks *h);

/* Queues a request (copying what it points to). -EINVAL for an empty prompt, bad ids or bad
 * sampling parameters; -DSV32_ECONTEXT when prompt + max_tokens exceed the context;
 * -DSV32_EOVERLOAD when the queue is full; -EEXIST for a live id. on_finish is called only for
 * accepted requests. */
int dsv32_sched_submit(struct dsv32_sched *s, const struct dsv32_request *r);
/* Cancels a request; its KV blocks are freed at the next step boundary. -ENOENT if unknown. */
int dsv32_sched_cancel(struct dsv32_sched *s, uint64_t id);

/* What the scheduler's thread does when it has no work (expert parallelism: take part in the
 * group's step with zero rows). NULL: wait for work. Set before starting. */
void dsv32_sched_set_idle(struct dsv32_sched *s, void (*fn)(void *ctx), void *ctx);
/* When set and it returns false, no step is tried (the step could not succeed: an EP group
 * between epochs) and the thread does what it does when idle. Set before starting. */
void dsv32_sched_set_gate(struct dsv32_sched *s, int (*fn)(void *ctx), void *ctx);

/* Runs the steps on a thread of its own until dsv32_sched_free. */
int dsv32_sched_start(struct dsv32_sched *s);
/* Or inline: one step (0 when there was nothing to do, 1 when a step ran, <0 on error). */
int dsv32_sched_step(struct dsv32_sched *s);
/* Inline: steps until every request has finished. */
int dsv32_sched_drain(struct dsv32_sched *s);

void dsv32_sched_get_stats(struct dsv32_sched *s, struct dsv32_sched_stats *out);

#endif
