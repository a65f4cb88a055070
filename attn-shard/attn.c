/* The attention daemon: model, KV cache, scheduler, and the dsv32.cluster.v1.Attn service the
 * router calls. One Run call = one request; its committed tokens stream back as they come out of
 * the scheduler's steps (a thread of their own writes them). A client that goes away (or passes
 * its deadline) cancels the request and its KV blocks are freed at the next step boundary. */
#include "attn.h"

#include "api.h"
#include "clock.h"
#include "cluster.pb-c.h"
#include "comm.h"
#include "ep.h"
#include "group.h"
#include "engine.h"
#include "error.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "ops.h"
#include "registry.h"
#include "rpc.h"
#include "safetensors.h"
#include "scheduler.h"
#include "textgen.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_RUNS 4096
/* stream messages packed by the scheduler's thread and not yet written, all runs together (the
 * runs' ends do not count: each has its own slot) */
#define MAX_OUT_MSGS 65536

struct run;

/* A packed RunResponse waiting for the writer thread. */
struct out_msg {
    struct out_msg *next;
    struct run *r;
    uint8_t *buf; /* len bytes, allocated with the message; NULL for the run's end */
    size_t len;
};

struct run {
    struct attn *a;
    struct dsv32_rpc_call *call;
    char rid[132];
    uint64_t id;
    int n_sent;            /* the scheduler's thread only */
    atomic_int broken;     /* a write failed (client gone or not reading): the request is being
                              cancelled; set by the writer thread */
    struct out_msg end;    /* the last message: finish reason and usage, then the call's status */
    enum dsv32_finish why; /* for the end, written before it is queued */
    struct dsv32_usage usage;
    int err;
};

struct attn {
    struct attn_config cfg;
    struct dsv32_model *model;
    struct dsv32_engine *engine;
    struct dsv32_sched *sched;
    struct dsv32_tok *tok;
    struct dsv32_rpc_server *server;
    struct dsv32_rpc_health *health;
    struct dsv32_notify_watchdog *watchdog;
    struct dsv32_etcd *etcd;
    struct dsv32_registry *reg;
    struct dsv32_ops_drain_watch *drain; /* the operator's drain request (ops.h) */
    struct dsv32_metrics *metrics;       /* --metrics-listen */
    struct dsv32_ep_stats metrics_ep;    /* the last EP counters a scrape could read */
    char address[DSV32_NODE_ADDR_MAX];
    int port;
    int context;
    /* expert parallelism (cfg.ep_group) */
    struct dsv32_comm_listener *lis;
    char comm_addr[128];
    struct dsv32_group_follower *follower;
    pthread_mutex_t ep_lock;           /* client and comm: the scheduler's thread uses them */
    pthread_cond_t ep_wake;
    struct dsv32_group_epoch *pending; /* newest epoch not applied */
    struct dsv32_comm *comm;
    struct dsv32_ep_client *client;
    uint64_t epoch;
    uint64_t bumped;  /* the epoch we asked the leader to replace */
    pthread_t ep_thread;
    int ep_thread_started, ep_stop;
    int64_t joined_lease;
    pthread_mutex_t lock; /* runs */
    struct run *runs[MAX_RUNS];
    int n_runs;
    uint64_t next_id;
    int draining;
    /* the stream writer (out_*): see "the stream writer" below */
    pthread_mutex_t out_lock;
    pthread_cond_t out_wake; /* a message was queued, or stop */
    pthread_cond_t out_done; /* the writer took nothing new and is idle */
    struct out_msg *out_head, *out_tail;
    int n_out;               /* queued messages that count against MAX_OUT_MSGS */
    int out_busy, out_stop, out_started;
    pthread_t out_thread;
};

/* ---- the live runs, by request id and by call ---- */

static int runs_add(struct attn *a, struct run *r)
{
    int rc = 0;
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < a->n_runs && rc == 0; i++)
        if (strcmp(a->runs[i]->rid, r->rid) == 0)
            rc = -EEXIST;
    if (rc == 0 && a->n_runs == MAX_RUNS)
        rc = DSV32_EOVERLOAD;
    if (rc == 0)
        a->runs[a->n_runs++] = r;
    pthread_mutex_unlock(&a->lock);
    return rc;
}

static void runs_remove(struct attn *a, struct run *r)
{
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < a->n_runs; i++)
        if (a->runs[i] == r) {
            a->runs[i] = a->runs[--a->n_runs];
            break;
        }
    pthread_mutex_unlock(&a->lock);
}

/* ---- the stream writer ---- */

/* A gRPC write to a stream with nothing in flight runs the HTTP/2 framing and the socket's
 * sendmsg on the caller's thread: 6-27 us per token with 64 streams and 24-140 us with one on
 * the 2-core VM (bench/stream_bench, docs/BENCHMARKS.md), while the GPU waits for the next step.
 * So the scheduler's thread only packs each message and queues it; this thread writes the queue
 * in order, ends the calls and frees the runs. It never calls the scheduler: a failed write marks
 * the run broken, and its next token cancels it (on the scheduler's thread). */

/* Queues m (under the limit when `limited`); 0 or DSV32_EOVERLOAD. */
static int out_push(struct attn *a, struct out_msg *m, int limited)
{
    int rc = 0;
    m->next = NULL;
    pthread_mutex_lock(&a->out_lock);
    if (limited && a->n_out >= MAX_OUT_MSGS) {
        rc = DSV32_EOVERLOAD;
    } else {
        if (a->out_tail)
            a->out_tail->next = m;
        else
            a->out_head = m;
        a->out_tail = m;
        a->n_out += limited;
        pthread_cond_signal(&a->out_wake);
    }
    pthread_mutex_unlock(&a->out_lock);
    return rc;
}

/* The last message of a run and its status; frees the run. */
static void out_end(struct run *r)
{
    Dsv32__Cluster__V1__RunResponse m = DSV32__CLUSTER__V1__RUN_RESPONSE__INIT;
    Dsv32__V1__Usage usage = DSV32__V1__USAGE__INIT;
    usage.prompt_tokens = (uint32_t)r->usage.prompt_tokens;
    usage.completion_tokens = (uint32_t)r->usage.completion_tokens;
    m.offset = (uint32_t)r->n_sent;
    m.finish_reason = dsv32_api_finish_to_pb(r->why);
    m.usage = &usage;
    if (r->why == DSV32_FINISH_ERROR)
        m.error_message = (char *)dsv32_strerror(r->err);
    if (!atomic_load(&r->broken) && dsv32_rpc_call_write_msg(r->call, &m.base) == 0)
        dsv32_rpc_call_finish(r->call, DSV32_RPC_OK, "%s", "");
    else
        dsv32_rpc_call_finish(r->call, DSV32_RPC_CANCELLED, "request %s cancelled", r->rid);
    free(r);
}

static void *out_main(void *arg)
{
    struct attn *a = arg;
    pthread_mutex_lock(&a->out_lock);
    for (;;) {
        while (!a->out_head && !a->out_stop) {
            a->out_busy = 0;
            pthread_cond_broadcast(&a->out_done);
            pthread_cond_wait(&a->out_wake, &a->out_lock);
        }
        struct out_msg *m = a->out_head;
        if (!m)
            break; /* stopped, and nothing left */
        a->out_head = a->out_tail = NULL;
        a->n_out = 0;
        a->out_busy = 1;
        pthread_mutex_unlock(&a->out_lock);
        while (m) {
            struct out_msg *next = m->next;
            struct run *r = m->r;
            if (m == &r->end) {
                out_end(r);
            } else {
                if (!atomic_load(&r->broken) && dsv32_rpc_call_write(r->call, m->buf, m->len) < 0)
                    atomic_store(&r->broken, 1); /* the client went away or stopped reading */
                free(m);
            }
            m = next;
        }
        pthread_mutex_lock(&a->out_lock);
    }
    a->out_busy = 0;
    pthread_cond_broadcast(&a->out_done);
    pthread_mutex_unlock(&a->out_lock);
    return NULL;
}

/* Waits (up to timeout_ms) until everything queued so far is written. */
static void out_flush(struct attn *a, int64_t timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&a->out_lock);
    while (a->out_started && (a->out_head || a->out_busy))
        if (pthread_cond_timedwait(&a->out_done, &a->out_lock, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&a->out_lock);
}

/* Writes what is left, then stops the thread. */
static void out_stop(struct attn *a)
{
    if (!a->out_started)
        return;
    pthread_mutex_lock(&a->out_lock);
    a->out_stop = 1;
    pthread_cond_signal(&a->out_wake);
    pthread_mutex_unlock(&a->out_lock);
    pthread_join(a->out_thread, NULL);
    a->out_started = 0;
}

/* ---- scheduler callbacks (on the scheduler's thread) ---- */

/* Packs m for the writer thread. A run whose writes failed, or that would pass the queue's limit,
 * is cancelled instead (the callbacks run under the scheduler's lock, which is recursive). */
static void send_msg(struct run *r, Dsv32__Cluster__V1__RunResponse *m)
{
    if (atomic_load(&r->broken)) {
        dsv32_sched_cancel(r->a->sched, r->id);
        return;
    }
    const size_t n = protobuf_c_message_get_packed_size(&m->base);
    struct out_msg *o = malloc(sizeof(*o) + (n ? n : 1));
    if (o) {
        o->r = r;
        o->buf = (uint8_t *)(o + 1);
        o->len = protobuf_c_message_pack(&m->base, o->buf);
    }
    if (!o || out_push(r->a, o, 1) < 0) {
        free(o);
        atomic_store(&r->broken, 1);
        dsv32_sched_cancel(r->a->sched, r->id);
    }
}

static void on_token(void *ctx, int32_t token, const char *text, size_t len,
                     const struct dsv32_logprobs *lp)
{
    struct run *r = ctx;
    Dsv32__Cluster__V1__RunResponse m = DSV32__CLUSTER__V1__RUN_RESPONSE__INIT;
    struct dsv32_api_logprobs_store st;
    Dsv32__V1__Logprobs *lps[1];
    m.offset = (uint32_t)r->n_sent;
    m.n_token_ids = 1;
    m.token_ids = &token;
    if (lp) {
        dsv32_api_logprobs_to_pb(r->a->tok, lp, &st);
        lps[0] = &st.msg;
        m.n_logprobs = 1;
        m.logprobs = lps;
    }
    send_msg(r, &m);
    r->n_sent++;
}

static void on_prompt_logprobs(void *ctx, const struct dsv32_logprobs *lp, int n)
{
    struct run *r = ctx;
    struct dsv32_api_logprobs_store *st = malloc(sizeof(*st) * (size_t)(n > 0 ? n : 1));
    Dsv32__V1__Logprobs **lps = malloc(sizeof(*lps) * (size_t)(n > 0 ? n : 1));
    if (!st || !lps) {
        free(st);
        free(lps);
        atomic_store(&r->broken, 1);
        dsv32_sched_cancel(r->a->sched, r->id);
        return;
    }
    for (int i = 0; i < n; i++) {
        dsv32_api_logprobs_to_pb(r->a->tok, &lp[i], &st[i]);
        lps[i] = &st[i].msg;
    }
    Dsv32__Cluster__V1__RunResponse m = DSV32__CLUSTER__V1__RUN_RESPONSE__INIT;
    m.n_prompt_logprobs = (size_t)n;
    m.prompt_logprobs = lps;
    send_msg(r, &m);
    free(st);
    free(lps);
}

/* The run leaves the table now; the writer thread sends its end after its last tokens. */
static void on_finish(void *ctx, enum dsv32_finish why, const char *text, size_t len,
                      const struct dsv32_usage *u, int err)
{
    struct run *r = ctx;
    struct attn *a = r->a;
    runs_remove(a, r);
    r->why = why;
    r->usage = *u;
    r->err = err;
    r->end.r = r;
    r->end.buf = NULL;
    r->end.len = 0;
    (void)out_push(a, &r->end, 0); /* never refused: the end does not count */
}

/* Called by the rpc layer when the client cancels or its deadline passes. */
static void on_call_cancel(void *arg, struct dsv32_rpc_call *call)
{
    struct attn *a = arg;
    uint64_t id = 0;
    /* never call the scheduler with our lock held: its callbacks take our lock */
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < a->n_runs; i++)
        if (a->runs[i]->call == call)
            id = a->runs[i]->id;
    pthread_mutex_unlock(&a->lock);
    if (id)
        dsv32_sched_cancel(a->sched, id);
}

/* ---- the Attn service ---- */

static void run_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct attn *a = arg;
    const struct dsv32_config *c = a->engine->cfg;
    char err[256];
    Dsv32__Cluster__V1__RunRequest *m = dsv32__cluster__v1__run_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed RunRequest");
        return;
    }
    struct run *r = NULL;
    int code = DSV32_RPC_INVALID_ARGUMENT;
    if (a->draining) {
        code = DSV32_RPC_UNAVAILABLE;
        snprintf(err, sizeof(err), "draining: no new requests");
        goto refuse;
    }
    if (dsv32_api_request_id_ok(m->request_id) < 0) {
        snprintf(err, sizeof(err), "request_id must be 1 to 128 characters of [A-Za-z0-9._:-]");
        goto refuse;
    }
    for (size_t i = 0; i < m->n_prompt_token_ids; i++)
        if (m->prompt_token_ids[i] < 0 || m->prompt_token_ids[i] >= c->vocab_size) {
            snprintf(err, sizeof(err), "prompt_token_ids[%zu] = %d is not a token id (vocabulary "
                     "of %d)", i, m->prompt_token_ids[i], c->vocab_size);
            goto refuse;
        }
    for (size_t i = 0; i < m->n_resume_token_ids; i++)
        if (m->resume_token_ids[i] < 0 || m->resume_token_ids[i] >= c->vocab_size) {
            snprintf(err, sizeof(err), "resume_token_ids[%zu] is not a token id", i);
            goto refuse;
        }
    struct dsv32_api_gen g;
    if (dsv32_api_gen_from_pb(m->sampling, (int)m->n_prompt_token_ids, c->vocab_size, a->context,
                              &g, err, sizeof(err)) < 0)
        goto refuse;
    if ((int)m->n_resume_token_ids >= g.max_tokens) {
        snprintf(err, sizeof(err), "%zu resumed tokens leave nothing to generate (max_tokens %d)",
                 m->n_resume_token_ids, g.max_tokens);
        goto refuse;
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        code = DSV32_RPC_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof(err), "out of memory");
        goto refuse;
    }
    r->a = a;
    r->call = call;
    snprintf(r->rid, sizeof(r->rid), "%s", m->request_id);
    pthread_mutex_lock(&a->lock);
    r->id = ++a->next_id;
    pthread_mutex_unlock(&a->lock);
    int rc = runs_add(a, r);
    if (rc < 0) {
        code = dsv32_rpc_code_from_err(rc);
        snprintf(err, sizeof(err), rc == -EEXIST ? "request %s is already running" : "%s",
                 rc == -EEXIST ? m->request_id : dsv32_strerror(rc));
        free(r);
        r = NULL;
        goto refuse;
    }
    struct dsv32_text_request tr = {.ctx = r, .on_token = on_token,
                                    .on_prompt_logprobs = on_prompt_logprobs,
                                    .on_finish = on_finish, .stop_strings = g.stop,
                                    .n_stop_strings = g.n_stop};
    tr.r = (struct dsv32_request){.id = r->id, .prompt = m->prompt_token_ids,
                                  .n_prompt = (int)m->n_prompt_token_ids, .sp = g.sp,
                                  .max_tokens = g.max_tokens, .n_stop_ids = g.n_stop_ids,
                                  .ignore_eos = g.ignore_eos, .resume = m->resume_token_ids,
                                  .n_resume = (int)m->n_resume_token_ids};
    memcpy(tr.r.stop_ids, g.stop_ids, sizeof(g.stop_ids));
    r->n_sent = (int)m->n_resume_token_ids;
    /* on_cancel before submit: it finds the run through the table, so it is safe whenever it
     * fires; a cancel that comes before the request is queued is answered by the scheduler
     * (-ENOENT) and the deadline check below */
    dsv32_rpc_call_on_cancel(call, on_call_cancel, a);
    rc = dsv32_textgen_submit(a->sched, a->tok, &tr);
    if (rc < 0) {
        runs_remove(a, r);
        free(r);
        r = NULL;
        code = dsv32_rpc_code_from_err(rc);
        snprintf(err, sizeof(err), "%s", rc == DSV32_EOVERLOAD ? "overloaded: the queue is full"
                                         : rc == DSV32_EFULL ? "the request is larger than the KV cache"
                                                             : dsv32_strerror(rc));
        goto refuse;
    }
    if (dsv32_rpc_call_cancelled(call))
        dsv32_sched_cancel(a->sched, r->id);
    dsv32__cluster__v1__run_request__free_unpacked(m, NULL);
    return;
refuse:
    dsv32__cluster__v1__run_request__free_unpacked(m, NULL);
    dsv32_rpc_call_finish(call, code, "%s", err);
}

static void cancel_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct attn *a = arg;
    Dsv32__Cluster__V1__CancelRequest *m = dsv32__cluster__v1__cancel_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed CancelRequest");
        return;
    }
    Dsv32__Cluster__V1__CancelResponse resp = DSV32__CLUSTER__V1__CANCEL_RESPONSE__INIT;
    uint64_t id = 0;
    pthread_mutex_lock(&a->lock);
    for (int i = 0; i < a->n_runs; i++)
        if (strcmp(a->runs[i]->rid, m->request_id) == 0)
            id = a->runs[i]->id;
    pthread_mutex_unlock(&a->lock);
    resp.found = id && dsv32_sched_cancel(a->sched, id) == 0;
    dsv32__cluster__v1__cancel_request__free_unpacked(m, NULL);
    dsv32_rpc_call_reply_msg(call, &resp.base);
}

static void status_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct attn *a = arg;
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(a->sched, &st);
    Dsv32__Cluster__V1__StatusResponse resp = DSV32__CLUSTER__V1__STATUS_RESPONSE__INIT;
    resp.id = (char *)a->cfg.id;
    resp.role = (char *)a->cfg.role;
    resp.state = a->draining ? DSV32__V1__NODE_STATE__NODE_STATE_DRAINING
                             : DSV32__V1__NODE_STATE__NODE_STATE_READY;
    resp.running = (uint32_t)st.running;
    resp.waiting = (uint32_t)st.queued;
    resp.free_kv_blocks = (uint64_t)st.free_blocks;
    resp.total_kv_blocks = (uint64_t)st.total_blocks;
    resp.kv_block_tokens = DSV32_KV_BLOCK_TOKENS;
    dsv32_rpc_call_reply_msg(call, &resp.base);
}

/* ---- expert parallelism ---- */

/* The communicator of the current epoch failed (a peer died, timed out, or restarted). A dead
 * member's lease expiry brings a new epoch by itself; a failure that leaves the membership as it
 * is needs the leader to be asked. Called with ep_lock held. */
static void ep_comm_failed(struct attn *a, int err)
{
    if (err == DSV32_EEPOCH || a->bumped == a->epoch)
        return; /* torn down for a new epoch, or asked already */
    a->bumped = a->epoch;
    log_warn("epoch %llu failed (%s): asking for a new one", (unsigned long long)a->epoch,
             dsv32_strerror(err));
    dsv32_group_request_new_epoch(a->etcd, a->cfg.cluster, a->cfg.ep_group, a->epoch);
}

/* The engine's MoE hook: the routed experts of the group's shards. */
static int ep_moe(void *ctx, int layer, float *y, const float *x, int rows, const int32_t *ids,
                  const float *w, int k)
{
    struct attn *a = ctx;
    pthread_mutex_lock(&a->ep_lock);
    /* a->comm is NULL between epochs: the client is not bound to a live communicator then */
    int r = a->client && a->comm ? dsv32_ep_moe_routed(a->client, layer, y, x, rows, ids, w, k)
                                 : DSV32_EEPOCH;
    if (r < 0 && a->client && a->comm) {
        dsv32_ep_client_step_failed(a->client); /* mid-step: the whole group moves on */
        ep_comm_failed(a, r);
    }
    pthread_mutex_unlock(&a->ep_lock);
    return r;
}

/* The scheduler has nothing to do: take part in the group's step with zero rows. */
static void ep_idle(void *ctx)
{
    struct attn *a = ctx;
    int r = 0;
    pthread_mutex_lock(&a->ep_lock);
    if (a->client && a->comm) {
        r = dsv32_ep_client_idle_step(a->client);
        if (r < 0) {
            dsv32_ep_client_step_failed(a->client);
            ep_comm_failed(a, r);
        }
    }
    pthread_mutex_unlock(&a->ep_lock);
    if (r <= 0) {
        /* the whole group is idle (or between epochs): poll again shortly */
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Steps run only with a communicator: between epochs one would fail at its first MoE layer
 * after computing the layers before it. */
static int ep_gate(void *ctx)
{
    struct attn *a = ctx;
    pthread_mutex_lock(&a->ep_lock);
    int ok = a->comm != NULL && a->client != NULL;
    pthread_mutex_unlock(&a->ep_lock);
    return ok;
}

static void on_epoch(void *arg, const struct dsv32_group_epoch *e)
{
    struct attn *a = arg;
    struct dsv32_group_epoch *copy = malloc(sizeof(*copy));
    if (!copy)
        return;
    *copy = *e;
    copy->placement.owner = NULL;
    if (e->n_shards) {
        size_t n = (size_t)e->placement.n_layers * e->placement.n_experts * e->placement.max_replicas;
        if (!(copy->placement.owner = malloc(sizeof(int16_t) * (n ? n : 1)))) {
            free(copy);
            return;
        }
        memcpy(copy->placement.owner, e->placement.owner, sizeof(int16_t) * n);
    }
    pthread_mutex_lock(&a->ep_lock);
    if (a->pending) {
        dsv32_group_epoch_done(a->pending);
        free(a->pending);
    }
    a->pending = copy;
    /* the old epoch is over: a step blocked on it fails now, not at its deadline */
    if (a->comm)
        a->comm->ops->abort(a->comm);
    pthread_cond_signal(&a->ep_wake);
    pthread_mutex_unlock(&a->ep_lock);
}

/* Applies epochs as they come: builds the communicator (outside the lock: it waits for the
 * other members) and hands it to the scheduler's thread through the client. */
static void *ep_main(void *arg)
{
    struct attn *a = arg;
    for (;;) {
        pthread_mutex_lock(&a->ep_lock);
        while (!a->pending && !a->ep_stop) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&a->ep_wake, &a->ep_lock, &ts);
            /* (re)join on the registry's lease: a new lease after an etcd outage needs a new key */
            int64_t lease = a->reg ? dsv32_registry_lease(a->reg) : 0;
            if (lease && lease != a->joined_lease) {
                struct dsv32_group_member me = {.kind = "attn", .gpu = a->cfg.gpu};
                snprintf(me.id, sizeof(me.id), "%s", a->cfg.id);
                snprintf(me.comm, sizeof(me.comm), "%s", a->comm_addr);
                pthread_mutex_unlock(&a->ep_lock);
                int jr = dsv32_group_join(a->etcd, a->cfg.cluster, a->cfg.ep_group, &me, lease);
                pthread_mutex_lock(&a->ep_lock);
                if (jr == 0)
                    a->joined_lease = lease;
            }
        }
        if (a->ep_stop) {
            pthread_mutex_unlock(&a->ep_lock);
            return NULL;
        }
        struct dsv32_group_epoch *e = a->pending;
        a->pending = NULL;
        struct dsv32_comm *old = a->comm;
        if (a->client && old)
            dsv32_ep_client_step_failed(a->client);
        a->comm = NULL; /* from now on the hooks leave the client alone until it is rebound */
        pthread_mutex_unlock(&a->ep_lock);
        dsv32_comm_free(old);

        int rank = dsv32_group_rank_of(e, "attn", a->cfg.id), world = e->n_attn + e->n_shards;
        struct dsv32_comm *c = NULL;
        int r = -ENOENT;
        if (rank >= 0 && e->n_shards > 0) {
            if (strcmp(e->transport, "nccl") == 0) {
                r = dsv32_comm_nccl_new(
                    e->nccl_id, rank, world, a->cfg.gpu >= 0 ? a->cfg.gpu : 0, e->epoch,
                    a->cfg.ep_timeout_ms,
                    dsv32_ep_device_blocks(a->engine->be) ? 0 : DSV32_COMM_NCCL_HOST_BUFFERS, &c);
            } else {
                const char *addrs[DSV32_GROUP_MAX_MEMBERS];
                for (int i = 0; i < world; i++)
                    addrs[i] = e->members[i].comm;
                r = dsv32_comm_tcp_new(a->lis, rank, world, addrs, e->epoch, a->cfg.ep_timeout_ms, &c);
            }
        }
        pthread_mutex_lock(&a->ep_lock);
        if (r == 0 && !a->pending) {
            if (a->client)
                r = dsv32_ep_client_rebind(a->client, c, e->n_attn, &e->placement);
            else
                r = dsv32_ep_client_new(c, e->n_attn, &e->placement, a->engine->cfg, a->engine->be,
                                        a->cfg.ep_wire_bf16 ? DSV32_EP_WIRE_BF16 : DSV32_EP_WIRE_F32,
                                        a->cfg.ep_timeout_ms, &a->client);
            if (r == 0) {
                a->comm = c;
                a->epoch = e->epoch;
                c = NULL;
                log_info("epoch %llu: attention rank %d of %d, %d expert shards",
                         (unsigned long long)e->epoch, rank, e->n_attn, e->n_shards);
            } else {
                log_error("epoch %llu: EP client: %s", (unsigned long long)e->epoch,
                          dsv32_strerror(r));
            }
        } else if (rank < 0) {
            log_info("epoch %llu: not a member", (unsigned long long)e->epoch);
        } else if (r < 0) {
            log_warn("epoch %llu: communicator not built: %s", (unsigned long long)e->epoch,
                     dsv32_strerror(r));
        }
        pthread_mutex_unlock(&a->ep_lock);
        dsv32_comm_free(c);
        dsv32_group_epoch_done(e);
        free(e);
    }
}

static int ep_start(struct attn *a)
{
    int port, r;
    pthread_mutex_init(&a->ep_lock, NULL);
    pthread_cond_init(&a->ep_wake, NULL);
    if (a->cfg.ep_timeout_ms <= 0)
        a->cfg.ep_timeout_ms = 10000;
    if ((r = dsv32_comm_tcp_listen(a->cfg.comm_host ? a->cfg.comm_host : "127.0.0.1", 0, &a->lis,
                                   &port)) < 0)
        return r;
    snprintf(a->comm_addr, sizeof(a->comm_addr), "%s:%d",
             a->cfg.comm_host ? a->cfg.comm_host : "127.0.0.1", port);
    if ((r = dsv32_group_follow(a->etcd, a->cfg.cluster, a->cfg.ep_group, on_epoch, a,
                                &a->follower)) < 0)
        return r;
    if (pthread_create(&a->ep_thread, NULL, ep_main, a) != 0)
        return -EAGAIN;
    a->ep_thread_started = 1;
    struct dsv32_step_hooks h = {.ctx = a, .moe_routed = ep_moe};
    dsv32_sched_set_hooks(a->sched, &h);
    dsv32_sched_set_idle(a->sched, ep_idle, a);
    dsv32_sched_set_gate(a->sched, ep_gate, a);
    return 0;
}

static void ep_stop(struct attn *a)
{
    if (!a->cfg.ep_group)
        return;
    dsv32_group_follower_free(a->follower);
    if (a->ep_thread_started) {
        pthread_mutex_lock(&a->ep_lock);
        a->ep_stop = 1;
        if (a->comm)
            a->comm->ops->abort(a->comm);
        pthread_cond_signal(&a->ep_wake);
        pthread_mutex_unlock(&a->ep_lock);
        pthread_join(a->ep_thread, NULL);
    }
}

/* --ep-stats: the counters and the routed load, written whole (a temporary file renamed). */
static void ep_write_stats(struct attn *a)
{
    char *json = dsv32_ep_client_stats_json(a->client), tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", a->cfg.ep_stats);
    FILE *f = json ? fopen(tmp, "w") : NULL;
    int ok = f && fputs(json, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0)
        ok = 0;
    if (ok && rename(tmp, a->cfg.ep_stats) == 0) {
        log_info("EP stats written to %s", a->cfg.ep_stats);
    } else {
        log_error("--ep-stats %s: cannot write it", a->cfg.ep_stats);
        unlink(tmp);
    }
    free(json);
}

static void ep_free(struct attn *a)
{
    if (!a->cfg.ep_group)
        return;
    if (a->client) {
        struct dsv32_ep_stats st;
        dsv32_ep_client_get_stats(a->client, &st);
        log_info("EP: %llu steps (%llu idle), %llu MoE layers with rows, %.1f us each",
                 (unsigned long long)st.steps, (unsigned long long)st.idle_steps,
                 (unsigned long long)st.moe_calls,
                 st.moe_calls ? (double)st.moe_ns / 1e3 / (double)st.moe_calls : 0.0);
        if (a->cfg.ep_stats)
            ep_write_stats(a);
    }
    dsv32_ep_client_free(a->client);
    dsv32_comm_free(a->comm);
    dsv32_comm_tcp_listener_free(a->lis);
    if (a->pending) {
        dsv32_group_epoch_done(a->pending);
        free(a->pending);
    }
    pthread_mutex_destroy(&a->ep_lock);
    pthread_cond_destroy(&a->ep_wake);
}

/* ---- operator drain (Admin.Drain, dsv32ctl drain; ops.h) ---- */

/* On the drain watch's thread: take no new requests (run_handler refuses them, the router places
 * only READY daemons), let the running ones finish; the daemon stays up, idle, until stopped. */
static void on_drain(void *arg)
{
    struct attn *a = arg;
    a->draining = 1;
    dsv32_registry_set_state(a->reg, DSV32_NODE_DRAINING);
    dsv32_rpc_health_set(a->health, "", DSV32_RPC_HEALTH_NOT_SERVING);
}

/* ---- life cycle ---- */

static void load_progress(void *ctx, int64_t done, int64_t total)
{
    if (done == total || done % 64 == 0)
        dsv32_notify_status("loading weights: %lld/%lld tensors", (long long)done, (long long)total);
}

static bool healthy(void *arg)
{
    (void)arg;
    return true;
}

/* The EP client's counters into *out; its lock is held through a whole exchange, so this waits
 * for it at most wait_ms: 1 when read, 0 when the lock stayed busy (*out untouched). */
static int ep_stats_try(struct attn *a, int wait_ms, struct dsv32_ep_stats *out)
{
    for (int i = 0;; i++) {
        if (pthread_mutex_trylock(&a->ep_lock) == 0) {
            if (a->client)
                dsv32_ep_client_get_stats(a->client, out);
            pthread_mutex_unlock(&a->ep_lock);
            return 1;
        }
        if (i >= wait_ms)
            return 0;
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* --metrics-listen: GET /metrics (metrics.h), vLLM's families under dsv32_ names */
static void fill_metrics(void *ctx, struct dsv32_metrics_text *t)
{
    struct attn *a = ctx;
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(a->sched, &st);
    dsv32_metrics_one(t, "dsv32_requests_running", "gauge", "Requests in the running batch.", st.running);
    dsv32_metrics_one(t, "dsv32_requests_waiting", "gauge", "Requests queued, not admitted yet.", st.queued);
    dsv32_metrics_one(t, "dsv32_kv_blocks", "gauge", "KV-cache blocks of 64 tokens.", st.total_blocks);
    dsv32_metrics_one(t, "dsv32_kv_blocks_free", "gauge", "KV-cache blocks not in use.", st.free_blocks);
    dsv32_metrics_one(t, "dsv32_prompt_tokens_total", "counter", "Prompt tokens computed.",
                      (double)st.prompt_tokens);
    dsv32_metrics_one(t, "dsv32_generation_tokens_total", "counter", "Tokens generated.",
                      (double)st.tokens_generated);
    dsv32_metrics_one(t, "dsv32_engine_steps_total", "counter", "Engine steps (batched forward passes).",
                      (double)st.steps);
    dsv32_metrics_one(t, "dsv32_engine_step_seconds_total", "counter", "Wall time in engine steps.",
                      (double)st.step_ns * 1e-9);
    dsv32_metrics_one(t, "dsv32_engine_step_tokens_total", "counter", "Token rows the engine steps carried.",
                      (double)st.step_rows);
    dsv32_metrics_one(t, "dsv32_engine_post_step_seconds_total", "counter",
                      "Host time after the steps: drawing the tokens, logprobs, streaming them.",
                      (double)st.post_ns * 1e-9);
    dsv32_metrics_one(t, "dsv32_engine_step_retries_total", "counter",
                      "Steps that failed and ran again (expert-parallel group changes).",
                      (double)st.step_retries);
    if (!a->cfg.ep_group)
        return;
    /* a busy lock for 100 ms (an exchange stuck on a dead peer) must not hang the scrape: then
     * the counters read last time */
    ep_stats_try(a, 100, &a->metrics_ep);
    const struct dsv32_ep_stats *ep = &a->metrics_ep;
    dsv32_metrics_one(t, "dsv32_ep_moe_layers_total", "counter",
                      "MoE layers run on the expert shards with rows from here.", (double)ep->moe_calls);
    dsv32_metrics_one(t, "dsv32_ep_rows_sent_total", "counter", "Token rows dispatched to the shards.",
                      (double)ep->rows_sent);
    dsv32_metrics_family(t, "dsv32_ep_moe_seconds_total", "counter",
                         "Time in those MoE layers, all and by phase (copy, pack, dispatch, "
                         "combine (waits for the shards), unpack).");
    dsv32_metrics_sample(t, "phase=\"all\"", (double)ep->moe_ns * 1e-9);
    dsv32_metrics_sample(t, "phase=\"copy\"", (double)ep->copy_ns * 1e-9);
    dsv32_metrics_sample(t, "phase=\"pack\"", (double)ep->pack_ns * 1e-9);
    dsv32_metrics_sample(t, "phase=\"dispatch\"", (double)ep->dispatch_ns * 1e-9);
    dsv32_metrics_sample(t, "phase=\"combine\"", (double)ep->combine_ns * 1e-9);
    dsv32_metrics_sample(t, "phase=\"unpack\"", (double)ep->unpack_ns * 1e-9);
}

void attn_free(struct attn *a)
{
    if (!a)
        return;
    dsv32_notify_watchdog_stop(a->watchdog);
    dsv32_metrics_stop(a->metrics); /* reads the scheduler and the EP client */
    dsv32_ops_drain_watch_free(a->drain); /* before the registry and health it touches */
    ep_stop(a);
    dsv32_registry_free(a->reg); /* deregisters: the router stops placing here at once */
    /* the streams' last messages out before the server cancels what is still open */
    out_flush(a, 5000);
    /* the server first: no handler runs after this; then the scheduler finishes what is left
     * (the writer thread ends the calls the server waits for, so it stops last) */
    dsv32_rpc_server_free(a->server);
    dsv32_rpc_health_free(a->health);
    if (a->cfg.ep_group && a->comm)
        a->comm->ops->abort(a->comm); /* a step waiting on the group ends now */
    dsv32_sched_free(a->sched);
    out_stop(a);
    ep_free(a);
    dsv32_etcd_free(a->etcd);
    dsv32_engine_free(a->engine);
    dsv32_model_free(a->model);
    dsv32_tok_free(a->tok);
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&a->out_lock);
    pthread_cond_destroy(&a->out_wake);
    pthread_cond_destroy(&a->out_done);
    free(a);
}

int attn_new(const struct attn_config *cfg, struct attn **ret)
{
    struct attn *a = calloc(1, sizeof(*a));
    int r;
    if (!a)
        return -ENOMEM;
    a->cfg = *cfg;
    pthread_mutex_init(&a->lock, NULL);
    pthread_mutex_init(&a->out_lock, NULL);
    pthread_cond_init(&a->out_wake, NULL);
    pthread_cond_init(&a->out_done, NULL);
    /* fed from the start: loading hundreds of GB of weights takes longer than WatchdogSec */
    dsv32_notify_watchdog_start(healthy, a, &a->watchdog);
    dsv32_notify_status("loading %s", cfg->model_dir);
    dsv32_backend_cpu_set_threads(cfg->cpu_threads > 0 ? cfg->cpu_threads : 1);
    if (cfg->ep_group && !cfg->etcd) {
        log_error("--ep-group needs --etcd (the group's epochs live there)");
        r = -EINVAL;
        goto fail;
    }
    /* in expert-parallel mode the routed experts are the shards' */
    struct dsv32_load_opts lo = {.progress = load_progress, .skip_experts = cfg->ep_group != NULL};
    if ((r = dsv32_model_load(cfg->model_dir, &lo, &a->model)) < 0) {
        log_error("%s", dsv32_load_error());
        goto fail;
    }
    if ((r = dsv32_tok_load(cfg->tokenizer_dir ? cfg->tokenizer_dir : cfg->model_dir, &a->tok)) < 0) {
        log_error("tokenizer in %s: %s", cfg->tokenizer_dir ? cfg->tokenizer_dir : cfg->model_dir,
                  dsv32_strerror(r));
        goto fail;
    }
    struct dsv32_engine_opts eo = {.backend = cfg->backend,
                                   .gpu = cfg->gpu >= 0 ? cfg->gpu : 0,
                                   .max_seqs = cfg->max_seqs,
                                   .max_batch_tokens = cfg->max_batch_tokens,
                                   .max_seq_len = cfg->max_seq_len,
                                   .kv_blocks = cfg->kv_blocks};
    if ((r = dsv32_engine_new(a->model, &eo, &a->engine)) < 0) {
        log_error("%s", dsv32_load_error());
        goto fail;
    }
    a->context = a->engine->kv->max_blocks_per_seq * DSV32_KV_BLOCK_TOKENS;
    if (a->context > a->model->cfg.max_position_embeddings)
        a->context = a->model->cfg.max_position_embeddings;
    struct dsv32_sched_opts so = {.max_queue = cfg->max_queue};
    if ((r = dsv32_sched_new(a->engine, &so, &a->sched)) < 0)
        goto fail;
    if (pthread_create(&a->out_thread, NULL, out_main, a) != 0) {
        r = -EAGAIN;
        goto fail;
    }
    a->out_started = 1;
    struct dsv32_rpc_server_config sc = {.listen = cfg->listen, .max_recv_bytes = 64u << 20,
                                         .max_send_bytes = 64u << 20, .max_stream_queue = 4096};
    if ((r = dsv32_rpc_server_new(&sc, &a->server)) < 0 ||
        (r = dsv32_rpc_health_new(a->server, &a->health)) < 0 ||
        (r = dsv32_rpc_server_add_method(a->server, "/dsv32.cluster.v1.Attn/Run",
                                         DSV32_RPC_SERVER_STREAM, 0, run_handler, a)) < 0 ||
        (r = dsv32_rpc_server_add_method(a->server, "/dsv32.cluster.v1.Attn/Cancel",
                                         DSV32_RPC_UNARY, 0, cancel_handler, a)) < 0 ||
        (r = dsv32_rpc_server_add_method(a->server, "/dsv32.cluster.v1.Attn/Status",
                                         DSV32_RPC_UNARY, 0, status_handler, a)) < 0 ||
        (r = dsv32_rpc_server_start(a->server, &a->port)) < 0) {
        log_error("gRPC server on %s: %s", cfg->listen, dsv32_strerror(r));
        goto fail;
    }
    dsv32_rpc_health_set(a->health, "", DSV32_RPC_HEALTH_SERVING);
    dsv32_rpc_health_set(a->health, "dsv32.cluster.v1.Attn", DSV32_RPC_HEALTH_SERVING);
    /* before --port-file: whoever reads that finds this too */
    if (cfg->metrics_listen && (r = dsv32_metrics_start(cfg->metrics_listen, cfg->metrics_port_file,
                                                        fill_metrics, a, &a->metrics)) < 0)
        goto fail;
    if (cfg->port_file) {
        FILE *f = fopen(cfg->port_file, "w");
        if (!f || fprintf(f, "%d\n", a->port) < 0 || fclose(f) != 0) {
            r = -errno;
            log_error("%s: cannot write the port", cfg->port_file);
            goto fail;
        }
    }
    /* the address the router dials: --advertise, else the listen host with the bound port */
    if (cfg->advertise) {
        snprintf(a->address, sizeof(a->address), "%s", cfg->advertise);
    } else {
        const char *colon = strrchr(cfg->listen, ':');
        int hl = colon ? (int)(colon - cfg->listen) : (int)strlen(cfg->listen);
        snprintf(a->address, sizeof(a->address), "%.*s:%d", hl, cfg->listen, a->port);
    }
    if (cfg->etcd) {
        struct dsv32_etcd_config ec = {.endpoint = cfg->etcd};
        struct dsv32_registry_config rc = {.cluster = cfg->cluster, .kind = "attn", .id = cfg->id,
                                           .address = a->address, .role = cfg->role,
                                           .gpu = cfg->gpu, .ttl_s = cfg->lease_ttl_s};
        if ((r = dsv32_etcd_new(&ec, &a->etcd)) < 0 ||
            (r = dsv32_registry_new(a->etcd, &rc, &a->reg)) < 0) {
            log_error("registration with etcd %s: %s", cfg->etcd, dsv32_strerror(r));
            goto fail;
        }
    }
    if (cfg->ep_group && (r = ep_start(a)) < 0) {
        log_error("EP group %s: %s", cfg->ep_group, dsv32_strerror(r));
        goto fail;
    }
    if ((r = dsv32_sched_start(a->sched)) < 0)
        goto fail;
    log_info("serving %s (%d layers, %s backend, context %d, %d KV blocks) on port %d",
             cfg->model_dir, a->model->cfg.num_hidden_layers, a->engine->be->ops->name, a->context,
             a->engine->kv->n_blocks, a->port);
    *ret = a;
    return 0;
fail:
    attn_free(a);
    return r;
}

static void publish_load(struct attn *a)
{
    if (!a->reg)
        return;
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(a->sched, &st);
    struct dsv32_node_load l = {.running = (uint32_t)st.running, .waiting = (uint32_t)st.queued,
                                .free_kv_blocks = (uint64_t)st.free_blocks,
                                .total_kv_blocks = (uint64_t)st.total_blocks};
    dsv32_registry_set_load(a->reg, &l);
}

/* --stats-interval: what the engine did since the last line (nothing when it was idle), as
 * operators of vLLM or SGLang read it in their logs. */
static void log_stats(struct attn *a, struct dsv32_sched_stats *last, struct dsv32_ep_stats *last_ep,
                      double *last_t)
{
    struct dsv32_sched_stats st;
    dsv32_sched_get_stats(a->sched, &st);
    const double t = dsv32_mono_s(), dt = t - *last_t;
    const uint64_t steps = st.steps - last->steps;
    char moe[256] = "";
    struct dsv32_ep_stats ep = *last_ep;
    if (a->cfg.ep_group && !ep_stats_try(a, 0, &ep))
        return; /* an exchange holds the lock: again at the next tick */
    if (ep.moe_calls > last_ep->moe_calls && steps) {
        const double k = 1e-6 / (double)(ep.moe_calls - last_ep->moe_calls);
        snprintf(moe, sizeof(moe), ", MoE %.2f ms of it (per layer %.2f: copies %.2f, pack %.2f, "
                 "dispatch %.2f, combine %.2f, unpack %.2f)",
                 (double)(ep.moe_ns - last_ep->moe_ns) / 1e6 / (double)steps,
                 (double)(ep.moe_ns - last_ep->moe_ns) * k, (double)(ep.copy_ns - last_ep->copy_ns) * k,
                 (double)(ep.pack_ns - last_ep->pack_ns) * k,
                 (double)(ep.dispatch_ns - last_ep->dispatch_ns) * k,
                 (double)(ep.combine_ns - last_ep->combine_ns) * k,
                 (double)(ep.unpack_ns - last_ep->unpack_ns) * k);
    }
    if (steps)
        log_info("engine: %.1f prompt tokens/s, %.1f generated tokens/s; %llu steps, %.2f ms each "
                 "(%.1f rows)%s, then %.2f ms drawing and streaming the tokens; %d running, %d "
                 "queued, KV blocks %d of %d in use",
                 (double)(st.prompt_tokens - last->prompt_tokens) / dt,
                 (double)(st.tokens_generated - last->tokens_generated) / dt, (unsigned long long)steps,
                 (double)(st.step_ns - last->step_ns) / 1e6 / (double)steps,
                 (double)(st.step_rows - last->step_rows) / (double)steps, moe,
                 (double)(st.post_ns - last->post_ns) / 1e6 / (double)steps, st.running, st.queued,
                 st.total_blocks - st.free_blocks, st.total_blocks);
    *last = st;
    *last_ep = ep;
    *last_t = t;
}

int attn_run(struct attn *a, volatile int *stop)
{
    if (a->reg) {
        publish_load(a);
        dsv32_registry_set_state(a->reg, DSV32_NODE_READY);
        /* after READY, so a drain that comes at once is not overwritten by it */
        if (dsv32_ops_drain_watch_new(a->etcd, a->cfg.cluster, "attn", a->cfg.id, on_drain, a,
                                      &a->drain) < 0)
            log_warn("no drain watch: Admin.Drain will not reach this daemon");
        /* READY=1 once the router can find us (or after 5 s without etcd: we serve anyway) */
        dsv32_registry_flush(a->reg, 5000);
    }
    dsv32_notify_ready();
    dsv32_notify_status("serving on %s", a->address);
    struct dsv32_sched_stats last;
    dsv32_sched_get_stats(a->sched, &last);
    struct dsv32_ep_stats last_ep = {0};
    double last_t = dsv32_mono_s();
    while (!*stop) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
        publish_load(a);
        if (a->cfg.stats_interval_s > 0 && dsv32_mono_s() - last_t >= a->cfg.stats_interval_s)
            log_stats(a, &last, &last_ep, &last_t);
    }
    if (a->reg)
        dsv32_registry_set_state(a->reg, DSV32_NODE_DRAINING);
    /* drain: refuse new requests, let running ones finish (up to 30 s), then stop */
    dsv32_notify_stopping();
    a->draining = 1;
    dsv32_rpc_health_set(a->health, "", DSV32_RPC_HEALTH_NOT_SERVING);
    for (int i = 0; i < 300; i++) {
        struct dsv32_sched_stats st;
        dsv32_sched_get_stats(a->sched, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        publish_load(a);
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return 0;
}
