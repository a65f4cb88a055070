/* Continuous batching scheduler; see sched.h. */
#include "scheduler.h"

#include "clock.h"
#include "error.h"
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum phase { PH_WAITING, PH_PREFILL, PH_DECODE };

struct req {
    struct dsv32_request r;     /* pointers inside are ours */
    enum phase phase;
    int seq;                    /* KV sequence slot, -1 until admitted */
    int32_t *tokens;            /* (n_prompt + max_tokens) prompt, resumed, generated */
    int n_known;                /* tokens known (prompt + resumed + generated) */
    int n_fed;                  /* tokens already in the KV cache */
    int n_gen;                  /* generated, resumed ones included */
    struct dsv32_sampler sampler;
    struct dsv32_logprobs *plp; /* (n_prompt - 1) prompt logprobs, when asked */
    atomic_int cancelled;
};

struct dsv32_sched {
    struct dsv32_engine *e;
    struct dsv32_sched_opts o;
    struct dsv32_step_hooks hooks;
    int have_hooks;
    void (*idle_fn)(void *ctx);
    void *idle_ctx;
    int (*gate_fn)(void *ctx);
    void *gate_ctx;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    int thread_started, stopping;
    struct req **reqs;          /* (cap) arrival order; NULL holes compacted each step */
    int n_reqs, cap;
    int n_waiting;
    /* per step, owned by the scheduler thread */
    struct dsv32_seq_input *in;
    struct req **in_req;
    int *in_logit_row;          /* first logits row of each input, -1 none */
    const float **draw_lg;      /* per input: the logits row its next token is drawn from, or NULL */
    int32_t *draw_tok;          /* per input: the token drawn */
    struct dsv32_draw *draw_p;  /* per input: the draw the backend takes (in[i].draw) */
    struct dsv32_logprobs *draw_lp;
    float *logits;
    struct dsv32_sched_stats st;
};

const char *dsv32_finish_name(enum dsv32_finish f)
{
    static const char *const names[] = {"none", "stop", "length", "stop_string", "cancelled", "error"};
    return (unsigned)f < sizeof(names) / sizeof(names[0]) ? names[f] : "?";
}

static void req_free(struct dsv32_sched *s, struct req *q)
{
    if (!q)
        return;
    if (q->seq >= 0)
        dsv32_kv_seq_free(s->e->kv, q->seq);
    dsv32_sampler_done(&q->sampler);
    free(q->tokens);
    free(q->plp);
    free(q);
}

static void finish(struct dsv32_sched *s, struct req *q, enum dsv32_finish why, int err)
{
    if (q->r.on_finish)
        q->r.on_finish(q->r.ctx, why, q->r.n_prompt, q->n_gen, err);
    for (int i = 0; i < s->n_reqs; i++)
        if (s->reqs[i] == q)
            s->reqs[i] = NULL;
    if (q->phase == PH_WAITING)
        s->n_waiting--;
    req_free(s, q);
}

int dsv32_sched_new(struct dsv32_engine *e, const struct dsv32_sched_opts *o,
                    struct dsv32_sched **ret)
{
    struct dsv32_sched *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->e = e;
    if (o)
        s->o = *o;
    if (s->o.max_queue <= 0)
        s->o.max_queue = 256;
    if (s->o.max_batch_tokens <= 0 || s->o.max_batch_tokens > e->max_rows)
        s->o.max_batch_tokens = e->max_rows;
    if (s->o.max_running <= 0 || s->o.max_running > e->kv->max_seqs)
        s->o.max_running = e->kv->max_seqs;
    s->cap = s->o.max_queue + s->o.max_running;
    s->reqs = calloc((size_t)s->cap, sizeof(*s->reqs));
    s->in = calloc((size_t)s->o.max_running, sizeof(*s->in));
    s->in_req = calloc((size_t)s->o.max_running, sizeof(*s->in_req));
    s->in_logit_row = calloc((size_t)s->o.max_running, sizeof(int));
    s->draw_lg = calloc((size_t)s->o.max_running, sizeof(*s->draw_lg));
    s->draw_tok = calloc((size_t)s->o.max_running, sizeof(*s->draw_tok));
    s->draw_lp = calloc((size_t)s->o.max_running, sizeof(*s->draw_lp));
    s->draw_p = calloc((size_t)s->o.max_running, sizeof(*s->draw_p));
    /* page-locked where the backend has it: a step's logits come back from the GPU at the link's
     * rate (16 rows of 129,280 are 8 MB) */
    const size_t lb = sizeof(float) * (size_t)e->max_logit_rows * e->cfg->vocab_size;
    s->logits = e->be->ops->host_alloc ? e->be->ops->host_alloc(e->be, lb) : malloc(lb);
    if (!s->reqs || !s->in || !s->in_req || !s->in_logit_row || !s->logits || !s->draw_lg ||
        !s->draw_tok || !s->draw_lp || !s->draw_p) {
        dsv32_sched_free(s);
        return -ENOMEM;
    }
    /* recursive: callbacks run under the lock and may cancel requests (their own included) */
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&s->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_cond_init(&s->wake, NULL);
    *ret = s;
    return 0;
}

void dsv32_sched_set_idle(struct dsv32_sched *s, void (*fn)(void *ctx), void *ctx)
{
    s->idle_fn = fn;
    s->idle_ctx = ctx;
}

void dsv32_sched_set_gate(struct dsv32_sched *s, int (*fn)(void *ctx), void *ctx)
{
    s->gate_fn = fn;
    s->gate_ctx = ctx;
}

void dsv32_sched_set_hooks(struct dsv32_sched *s, const struct dsv32_step_hooks *h)
{
    s->have_hooks = h != NULL;
    if (h)
        s->hooks = *h;
}

void dsv32_sched_free(struct dsv32_sched *s)
{
    if (!s)
        return;
    if (s->thread_started) {
        pthread_mutex_lock(&s->lock);
        s->stopping = 1;
        pthread_cond_signal(&s->wake);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->thread, NULL);
    }
    if (s->reqs)
        for (int i = 0; i < s->n_reqs; i++)
            if (s->reqs[i])
                finish(s, s->reqs[i], DSV32_FINISH_CANCELLED, 0);
    if (s->in) {
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->wake);
    }
    free(s->reqs);
    free(s->in);
    free(s->in_req);
    free(s->in_logit_row);
    free(s->draw_lg);
    free(s->draw_tok);
    free(s->draw_lp);
    free(s->draw_p);
    if (s->logits && s->e->be->ops->host_free)
        s->e->be->ops->host_free(s->e->be, s->logits);
    else
        free(s->logits);
    free(s);
}

int dsv32_sched_submit(struct dsv32_sched *s, const struct dsv32_request *r)
{
    const struct dsv32_config *c = s->e->cfg;
    const int ctx = s->e->kv->max_blocks_per_seq * DSV32_KV_BLOCK_TOKENS;
    if (r->n_prompt <= 0 || r->max_tokens <= 0 || r->n_resume < 0 || r->n_resume >= r->max_tokens ||
        r->n_stop_ids < 0 || r->n_stop_ids > DSV32_MAX_STOP_IDS)
        return -EINVAL;
    if (dsv32_sampling_validate(&r->sp, NULL, 0) < 0)
        return -EINVAL;
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= c->vocab_size)
            return DSV32_ETOKEN;
    for (int i = 0; i < r->n_resume; i++)
        if (r->resume[i] < 0 || r->resume[i] >= c->vocab_size)
            return DSV32_ETOKEN;
    if ((int64_t)r->n_prompt + r->max_tokens > ctx)
        return DSV32_ECONTEXT;
    /* a request longer than the whole cache would wait forever */
    if ((r->n_prompt + r->max_tokens + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS >
        s->e->kv->n_blocks)
        return DSV32_EFULL;
    struct req *q = calloc(1, sizeof(*q));
    if (!q)
        return -ENOMEM;
    q->r = *r;
    q->seq = -1;
    q->tokens = malloc(sizeof(int32_t) * (size_t)(r->n_prompt + r->max_tokens));
    if (!q->tokens || dsv32_sampler_init(&q->sampler, &r->sp, c->vocab_size, r->prompt, r->n_prompt) < 0) {
        req_free(s, q);
        return -ENOMEM;
    }
    if (r->sp.n_prompt_logprobs >= 0 && r->n_prompt > 1 &&
        !(q->plp = calloc((size_t)r->n_prompt - 1, sizeof(*q->plp)))) {
        req_free(s, q);
        return -ENOMEM;
    }
    memcpy(q->tokens, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
    memcpy(q->tokens + r->n_prompt, r->resume, sizeof(int32_t) * (size_t)r->n_resume);
    q->n_known = r->n_prompt + r->n_resume;
    q->n_gen = r->n_resume;
    dsv32_sampler_resume(&q->sampler, r->resume, r->n_resume);
    q->r.prompt = q->tokens;
    q->r.resume = q->tokens + r->n_prompt;

    pthread_mutex_lock(&s->lock);
    int rc = 0;
    for (int i = 0; i < s->n_reqs && rc == 0; i++)
        if (s->reqs[i] && s->reqs[i]->r.id == r->id)
            rc = -EEXIST;
    if (rc == 0 && (s->n_waiting >= s->o.max_queue || s->n_reqs >= s->cap))
        rc = DSV32_EOVERLOAD;
    if (rc == 0) {
        s->reqs[s->n_reqs++] = q;
        s->n_waiting++;
        pthread_cond_signal(&s->wake);
    }
    pthread_mutex_unlock(&s->lock);
    if (rc < 0)
        req_free(s, q);
    return rc;
}

int dsv32_sched_cancel(struct dsv32_sched *s, uint64_t id)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < s->n_reqs; i++)
        if (s->reqs[i] && s->reqs[i]->r.id == id) {
            atomic_store(&s->reqs[i]->cancelled, 1);
            rc = 0;
        }
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return rc;
}

/* Under the lock: drops cancelled requests, compacts, admits waiting ones whose whole length
 * fits in the cache (FIFO: a request that does not fit holds back the ones behind it). */
static void admit(struct dsv32_sched *s)
{
    struct dsv32_kvcache *kv = s->e->kv;
    for (int i = 0; i < s->n_reqs; i++)
        if (s->reqs[i] && atomic_load(&s->reqs[i]->cancelled))
            finish(s, s->reqs[i], DSV32_FINISH_CANCELLED, 0);
    int m = 0, running = 0;
    for (int i = 0; i < s->n_reqs; i++)
        if (s->reqs[i]) {
            s->reqs[m++] = s->reqs[i];
            running += s->reqs[i]->phase != PH_WAITING;
        }
    s->n_reqs = m;
    for (int i = 0; i < s->n_reqs && running < s->o.max_running; i++) {
        struct req *q = s->reqs[i];
        if (q->phase != PH_WAITING)
            continue;
        int need = q->r.n_prompt + q->r.max_tokens;
        if ((need + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS > dsv32_kv_free_blocks(kv))
            break;
        int seq = dsv32_kv_seq_new(kv);
        if (seq < 0)
            break;
        if (dsv32_kv_seq_reserve(kv, seq, need) < 0) {
            dsv32_kv_seq_free(kv, seq);
            break;
        }
        q->seq = seq;
        q->phase = PH_PREFILL;
        s->n_waiting--;
        running++;
    }
}

static int is_stop(const struct dsv32_sched *s, const struct req *q, int32_t t)
{
    if (t == s->e->cfg->eos_token_id && !q->r.ignore_eos)
        return 1;
    for (int i = 0; i < q->r.n_stop_ids; i++)
        if (q->r.stop_ids[i] == t)
            return 1;
    return 0;
}

/* A token sampled for q: deliver it or finish. Returns 1 when q finished. */
/* A drawn token (and its logprobs when the request wants them) joins the sequence. */
static int take_token(struct dsv32_sched *s, struct req *q, int32_t t, struct dsv32_logprobs *lp)
{
    int want_lp = q->r.sp.n_logprobs >= 0;
    q->n_gen++;
    s->st.tokens_generated++;
    if (is_stop(s, q, t)) {
        finish(s, q, DSV32_FINISH_STOP, 0);
        return 1;
    }
    q->tokens[q->n_known++] = t;
    if (q->r.on_token && q->r.on_token(q->r.ctx, t, want_lp ? lp : NULL)) {
        finish(s, q, DSV32_FINISH_STOP_STRING, 0);
        return 1;
    }
    if (q->n_gen >= q->r.max_tokens) {
        finish(s, q, DSV32_FINISH_LENGTH, 0);
        return 1;
    }
    return 0;
}

static int draw_threads(int n_draw)
{
#ifdef _OPENMP
    static int cores;
    if (!cores) {
        /* up to 16: a 64-row step draws 4 tokens per thread (the GPU hosts have 16-32 cores per
         * GPU; the EP packing, the other OpenMP user, does not run at the same time) */
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        cores = c > 16 ? 16 : c > 1 ? (int)c : 1;
    }
    return n_draw < cores ? n_draw : cores;
#else
    (void)n_draw;
    return 1;
#endif
}

int dsv32_sched_step(struct dsv32_sched *s)
{
    struct dsv32_engine *e = s->e;
    const int V = e->cfg->vocab_size;
    pthread_mutex_lock(&s->lock);
    admit(s);
    /* decode rows first (one token each), then prompt chunks within the token budget */
    int n = 0, budget = s->o.max_batch_tokens, logit_rows = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < s->n_reqs && n < s->o.max_running; i++) {
            struct req *q = s->reqs[i];
            if (!q || (pass == 0 && q->phase != PH_DECODE) || (pass == 1 && q->phase != PH_PREFILL))
                continue;
            int todo = q->n_known - q->n_fed;
            int chunk = todo < budget ? todo : budget;
            int all = q->plp && q->n_fed < q->r.n_prompt;
            if (all && chunk > e->max_logit_rows - logit_rows)
                chunk = e->max_logit_rows - logit_rows;
            if (chunk <= 0 || (!all && chunk == todo && logit_rows + 1 > e->max_logit_rows))
                continue;
            enum dsv32_logits_mode lm = all ? DSV32_LOGITS_ALL
                                        : chunk == todo ? DSV32_LOGITS_LAST : DSV32_LOGITS_NONE;
            s->in[n] = (struct dsv32_seq_input){.seq = q->seq, .n_tokens = chunk,
                                                .tokens = q->tokens + q->n_fed, .logits = lm};
            if (lm == DSV32_LOGITS_LAST && e->be->ops->sample &&
                dsv32_sampler_device_ok(&q->sampler)) {
                /* the token drawn by the backend where the logits are (no logits row copied back,
                 * no draw here); the sampler's stream advances only once the step succeeded */
                dsv32_sampler_draw_params(&q->sampler, &s->draw_p[n]);
                s->in[n].draw = &s->draw_p[n];
                s->in[n].token = &s->draw_tok[n];
                s->in[n].lp = &s->draw_lp[n];
            }
            s->in_req[n] = q;
            s->in_logit_row[n] = lm == DSV32_LOGITS_NONE ? -1 : logit_rows;
            logit_rows += lm == DSV32_LOGITS_ALL ? chunk : lm == DSV32_LOGITS_LAST ? 1 : 0;
            budget -= chunk;
            n++;
        }
    pthread_mutex_unlock(&s->lock);
    if (n == 0)
        return 0;

    const uint64_t t0 = dsv32_mono_ns();
    int r = dsv32_engine_step(e, s->in, n, s->logits, s->have_hooks ? &s->hooks : NULL);
    const uint64_t t1 = dsv32_mono_ns();
    pthread_mutex_lock(&s->lock);
    if (r < 0) {
        s->st.step_retries++;
        if (r == DSV32_EPEER || r == DSV32_ETIMEOUT || r == DSV32_EEPOCH || r == DSV32_EFULL) {
            /* transient: nothing was committed; the same step runs again */
            pthread_mutex_unlock(&s->lock);
            log_warn("step of %d sequences failed (%s); retrying", n, dsv32_strerror(r));
            return r;
        }
        log_error("step of %d sequences failed: %s", n, dsv32_strerror(r));
        for (int i = 0; i < n; i++)
            finish(s, s->in_req[i], DSV32_FINISH_ERROR, r);
        pthread_mutex_unlock(&s->lock);
        return r;
    }
    s->st.steps++;
    s->st.step_ns += t1 - t0;
    for (int i = 0; i < n; i++)
        s->st.step_rows += (uint64_t)s->in[i].n_tokens;
    /* the rows that end in a new token draw it first, on several threads: each request's
     * sampler is its own, and a draw over the vocabulary costs about a millisecond */
    int n_draw = 0;
    for (int i = 0; i < n; i++) {
        struct req *q = s->in_req[i];
        const int chunk = s->in[i].n_tokens;
        s->draw_lg[i] = NULL;
        if (s->in_logit_row[i] < 0 || q->n_fed + chunk < q->n_known)
            continue;
        if (s->in[i].draw) { /* drawn by the backend */
            dsv32_sampler_took(&q->sampler, s->draw_tok[i]);
            continue;
        }
        s->draw_lg[i] = s->logits + ((size_t)s->in_logit_row[i] +
                                     (s->in[i].logits == DSV32_LOGITS_ALL ? (size_t)chunk - 1 : 0)) * V;
        n_draw++;
    }
#pragma omp parallel for if (n_draw > 1) num_threads(draw_threads(n_draw)) schedule(dynamic, 1)
    for (int i = 0; i < n; i++)
        if (s->draw_lg[i]) {
            struct req *q = s->in_req[i];
            s->draw_tok[i] = dsv32_sample(&q->sampler, s->draw_lg[i],
                                          q->r.sp.n_logprobs >= 0 ? &s->draw_lp[i] : NULL);
        }
    for (int i = 0; i < n; i++) {
        struct req *q = s->in_req[i];
        const int first = q->n_fed, chunk = s->in[i].n_tokens;
        q->n_fed += chunk;
        if (q->phase == PH_PREFILL)
            s->st.prompt_tokens += (uint64_t)chunk;
        if (s->in_logit_row[i] < 0)
            continue;
        const float *lg = s->logits + (size_t)s->in_logit_row[i] * V;
        if (s->in[i].logits == DSV32_LOGITS_ALL) {
            /* row j (position first+j) predicts the token at first+j+1 */
            for (int j = 0; j < chunk; j++) {
                int pos = first + j;
                if (pos + 1 < q->r.n_prompt)
                    dsv32_logprobs_of(lg + (size_t)j * V, V, q->tokens[pos + 1],
                                      q->r.sp.n_prompt_logprobs, &q->plp[pos]);
            }
        }
        if (q->n_fed < q->n_known)
            continue; /* a middle chunk of the prompt */
        if (q->phase == PH_PREFILL) {
            q->phase = PH_DECODE;
            if (q->plp && q->r.on_prompt_logprobs)
                q->r.on_prompt_logprobs(q->r.ctx, q->plp, q->r.n_prompt - 1);
        }
        take_token(s, q, s->draw_tok[i], &s->draw_lp[i]);
    }
    s->st.post_ns += dsv32_mono_ns() - t1;
    pthread_mutex_unlock(&s->lock);
    return 1;
}

int dsv32_sched_drain(struct dsv32_sched *s)
{
    for (;;) {
        int r = dsv32_sched_step(s);
        if (r == 0) {
            pthread_mutex_lock(&s->lock);
            int left = 0;
            for (int i = 0; i < s->n_reqs; i++)
                left += s->reqs[i] != NULL;
            pthread_mutex_unlock(&s->lock);
            if (!left)
                return 0;
            return DSV32_EFULL; /* waiting requests that can never be admitted */
        }
        if (r < 0 && r != DSV32_EPEER && r != DSV32_ETIMEOUT && r != DSV32_EEPOCH)
            return r;
    }
}

static void *sched_thread(void *arg)
{
    struct dsv32_sched *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        if (s->stopping) {
            pthread_mutex_unlock(&s->lock);
            return NULL;
        }
        pthread_mutex_unlock(&s->lock);
        if (s->gate_fn && !s->gate_fn(s->gate_ctx)) {
            if (s->idle_fn) {
                s->idle_fn(s->idle_ctx);
            } else {
                struct timespec ts = {0, 10 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            continue;
        }
        int r = dsv32_sched_step(s);
        if (r < 0) {
            /* a failed step (peer died, cache full): back off briefly, then run it again */
            struct timespec ts = {0, 10 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (r == 0) {
            pthread_mutex_lock(&s->lock);
            int runnable = 0;
            for (int i = 0; i < s->n_reqs; i++)
                runnable |= s->reqs[i] && (s->reqs[i]->phase != PH_WAITING ||
                                           atomic_load(&s->reqs[i]->cancelled));
            if (!runnable && !s->stopping && s->idle_fn) {
                pthread_mutex_unlock(&s->lock);
                s->idle_fn(s->idle_ctx);
                continue;
            }
            if (!runnable && !s->stopping) {
                /* wake on submit/cancel, or after a while to retry admission */
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 50 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&s->wake, &s->lock, &ts);
            }
            pthread_mutex_unlock(&s->lock);
        }
    }
}

int dsv32_sched_start(struct dsv32_sched *s)
{
    if (s->thread_started)
        return -EALREADY;
    int r = pthread_create(&s->thread, NULL, sched_thread, s);
    if (r)
        return -r;
    s->thread_started = 1;
    return 0;
}

void dsv32_sched_get_stats(struct dsv32_sched *s, struct dsv32_sched_stats *out)
{
    pthread_mutex_lock(&s->lock);
    *out = s->st;
    out->queued = s->n_waiting;
    out->running = 0;
    for (int i = 0; i < s->n_reqs; i++)
        out->running += s->reqs[i] && s->reqs[i]->phase != PH_WAITING;
    out->free_blocks = dsv32_kv_free_blocks(s->e->kv);
    out->total_blocks = s->e->kv->n_blocks;
    pthread_mutex_unlock(&s->lock);
}
