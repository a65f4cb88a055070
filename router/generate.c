/* The router's generation path: Generate (server stream), Tokenize, Detokenize, GetModelInfo.
 * Each Generate call gets a worker thread that places the request on an attention daemon, relays
 * its committed tokens with their text (the router detokenizes and applies the stop strings, so
 * the text is the same whichever daemon made the tokens), and on a daemon failure places it again
 * with the tokens already sent as the resume state. */
#define _GNU_SOURCE 1 /* memmem */
#include "router.h"

#include "api.h"
#include "clock.h"
#include "cluster.pb-c.h"
#include "dsv32.pb-c.h"
#include "error.h"
#include "log.h"
#include "textgen.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PLACE_WAIT_MS 10000      /* how long a request waits for a ready daemon */
#define WORKER_STACK (512u << 10)

struct greq {
    struct router *r;
    struct dsv32_rpc_call *call;
    Dsv32__V1__GenerateRequest *msg; /* owned: sampling params and stop strings point into it */
    char rid[132];
    int32_t *prompt;
    int n_prompt;
    struct dsv32_api_gen g;
    int32_t *sent; /* tokens the client has */
    int n_sent;
    int plp_sent;
    struct dsv32_tok_stream *ts;
    struct dsv32_stop_matcher stop;
    int in_reasoning;      /* chat in thinking mode, before "</think>" */
    char think_hold[16];   /* reasoning bytes that could begin "</think>" */
    size_t n_think_hold;
    pthread_mutex_t lock;
    struct dsv32_rpc_stream *upstream;
    int cancelled;
    char excluded[8][DSV32_NODE_NAME_MAX];
    int n_excluded;
    double t_start, t_first; /* monotonic seconds: accepted, first token sent */
};

static void count_outcome(struct router *r, enum router_outcome o)
{
    atomic_fetch_add(&r->req_outcome[o], 1);
}

static void greq_free(struct greq *q)
{
    if (!q)
        return;
    if (q->msg)
        dsv32__v1__generate_request__free_unpacked(q->msg, NULL);
    dsv32_tok_stream_free(q->ts);
    dsv32_stop_done(&q->stop);
    free(q->prompt);
    free(q->sent);
    pthread_mutex_destroy(&q->lock);
    free(q);
}

#ifdef DSV32_ROUTER_NO_CHAT
/* A build without the chat encoder: chat input is refused with a clear reason. */
int router_render_chat(struct router *r, const struct Dsv32__V1__Chat *chat, int32_t **ret_ids,
                       size_t *ret_n, char *err, size_t err_len)
{
    snprintf(err, err_len, "this router was built without the chat encoder: send text or token_ids");
    return DSV32_EUNSUPPORTED;
}
#endif

/* ---- placement ---- */

static struct dsv32_rpc_client *client_for(struct router *r, const char *address, int delta)
{
    struct dsv32_rpc_client *c = NULL;
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n_clients; i++)
        if (strcmp(r->clients[i].address, address) == 0) {
            r->clients[i].inflight += delta;
            c = r->clients[i].c;
        }
    if (!c && delta >= 0 && r->n_clients < ROUTER_MAX_CLIENTS) {
        struct dsv32_rpc_client_config cc = {.target = address, .max_recv_bytes = 64u << 20,
                                             .max_send_bytes = 64u << 20};
        struct router_client *rc = &r->clients[r->n_clients];
        if (dsv32_rpc_client_new(&cc, &rc->c) == 0) {
            snprintf(rc->address, sizeof(rc->address), "%s", address);
            rc->inflight = delta;
            c = rc->c;
            r->n_clients++;
        }
    }
    pthread_mutex_unlock(&r->lock);
    return c;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Requests this router has on a daemon; -1 while the daemon is suspect (a call to it failed in
 * the last seconds: a dead daemon stays in etcd until its lease expires). */
static int router_inflight_on(struct router *r, const char *address)
{
    int n = 0;
    int64_t now = mono_ms();
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n_clients; i++)
        if (strcmp(r->clients[i].address, address) == 0)
            n = r->clients[i].suspect_until > now ? -1 : r->clients[i].inflight;
    pthread_mutex_unlock(&r->lock);
    return n;
}

static void mark_suspect(struct router *r, const char *address, int64_t ms)
{
    pthread_mutex_lock(&r->lock);
    for (int i = 0; i < r->n_clients; i++)
        if (strcmp(r->clients[i].address, address) == 0)
            r->clients[i].suspect_until = mono_ms() + ms;
    pthread_mutex_unlock(&r->lock);
}

static int excluded(const struct greq *q, const char *id)
{
    for (int i = 0; i < q->n_excluded; i++)
        if (strcmp(q->excluded[i], id) == 0)
            return 1;
    return 0;
}

/* The least loaded ready, uncordoned attention daemon not excluded; waits for one to appear. */
static int pick(struct router *r, struct greq *q, struct dsv32_node_info *ret)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        uint64_t ver = dsv32_registry_view_version(r->view);
        struct dsv32_node_info nodes[64];
        size_t n = dsv32_registry_view_list(r->view, "attn", nodes, 64);
        int best = -1;
        double best_score = 0;
        for (size_t i = 0; i < n && i < 64; i++) {
            const struct dsv32_node_info *x = &nodes[i];
            if (x->state != DSV32_NODE_READY || x->cordoned || excluded(q, x->id) ||
                (strcmp(x->role, "both") != 0 && x->role[0]))
                continue;
            /* what this router knows now, then what the daemon last reported */
            int mine = router_inflight_on(r, x->address);
            if (mine < 0)
                continue;
            double score = mine * 1000.0 +
                           (double)(x->load.running + x->load.waiting) -
                           (x->load.total_kv_blocks ? (double)x->load.free_kv_blocks /
                                                          (double)x->load.total_kv_blocks : 0);
            if (best < 0 || score < best_score) {
                best = (int)i;
                best_score = score;
            }
        }
        if (best >= 0) {
            *ret = nodes[best];
            return 0;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t waited = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
        if (waited >= PLACE_WAIT_MS || q->cancelled || atomic_load(&r->stopping))
            return -ENOENT;
        dsv32_registry_view_wait(r->view, ver, PLACE_WAIT_MS - waited);
    }
}

/* ---- writing to the client ---- */

static int client_write(struct greq *q, Dsv32__V1__GenerateResponse *m)
{
    for (;;) {
        int rc = dsv32_rpc_call_write_msg(q->call, &m->base);
        if (rc != DSV32_EOVERLOAD)
            return rc;
        /* the client reads slowly: wait for room (we are on our own thread) */
        rc = dsv32_rpc_call_wait_writable(q->call, 60000);
        if (rc < 0)
            return rc;
    }
}

/* Splits reasoning from the answer at "</think>" (a single token with V3.2's tokenizer, several
 * with V3's: found in the text either way). In: a text piece while in_reasoning. Out: the
 * reasoning that can be shown now and, once the marker has passed, the answer text after it. */
static const char THINK_END[] = "</think>";

static void split_reasoning(struct greq *q, const char *t, size_t tl, char **ret_reasoning,
                            size_t *ret_rl, const char **ret_rest, size_t *ret_restl)
{
    const size_t ml = sizeof(THINK_END) - 1;
    size_t n = q->n_think_hold + tl;
    char *buf = malloc(n + 1);
    *ret_reasoning = NULL;
    *ret_rl = 0;
    *ret_rest = NULL;
    *ret_restl = 0;
    if (!buf)
        return;
    memcpy(buf, q->think_hold, q->n_think_hold);
    memcpy(buf + q->n_think_hold, t, tl);
    buf[n] = 0;
    const char *p = memmem(buf, n, THINK_END, ml);
    if (p) {
        q->in_reasoning = 0;
        q->n_think_hold = 0;
        *ret_rl = (size_t)(p - buf);
        /* the text after the marker belongs to the answer: it comes from t */
        size_t after = (size_t)(p - buf) + ml; /* offset in buf */
        if (after < n) {
            *ret_rest = t + (after - (n - tl));
            *ret_restl = n - after;
        }
    } else {
        /* keep the last ml - 1 bytes (cut on a character boundary): they may begin the marker */
        size_t keep = n < ml - 1 ? n : ml - 1;
        size_t out = n - keep;
        while (out > 0 && out < n && ((unsigned char)buf[out] & 0xC0) == 0x80)
            out--;
        *ret_rl = out;
        q->n_think_hold = n - out;
        memcpy(q->think_hold, buf + out, q->n_think_hold);
    }
    buf[*ret_rl] = 0;
    *ret_reasoning = buf;
}

/* One committed token from a daemon: its text through the router's stream (and, in thinking
 * mode, the reasoning splitter) and stop matcher. Returns 1 when a stop string ended the text,
 * <0 when the client is gone. */
static int relay_token(struct greq *q, int32_t tok, Dsv32__V1__Logprobs *lp)
{
    const char *t = "", *out = "";
    size_t tl = 0, ol = 0;
    int stopped = 0;
    char *reasoning = NULL;
    size_t rl = 0;
    if (dsv32_tok_stream_push(q->ts, tok, &t, &tl) < 0)
        tl = 0;
    if (q->in_reasoning) {
        const char *rest;
        size_t restl;
        split_reasoning(q, t, tl, &reasoning, &rl, &rest, &restl);
        t = rest ? rest : "";
        tl = rest ? restl : 0;
    }
    if (!q->in_reasoning && tl) {
        stopped = dsv32_stop_feed(&q->stop, t, tl, &out, &ol);
        if (stopped < 0) {
            free(reasoning);
            return stopped;
        }
    }
    q->sent[q->n_sent++] = tok;
    if (q->n_sent == 1)
        q->t_first = dsv32_mono_s();
    Dsv32__V1__GenerateResponse m = DSV32__V1__GENERATE_RESPONSE__INIT;
    char *text = strndup(out, ol);
    if (!text) {
        free(reasoning);
        return -ENOMEM;
    }
    m.request_id = q->rid;
    m.n_token_ids = 1;
    m.token_ids = &tok;
    m.text = text;
    if (reasoning && rl)
        m.reasoning_text = reasoning;
    if (lp) {
        m.n_logprobs = 1;
        m.logprobs = &lp;
    }
    int rc = client_write(q, &m);
    free(text);
    free(reasoning);
    return rc < 0 ? rc : stopped;
}

static void finish_client(struct greq *q, enum dsv32_finish why, uint32_t completion,
                          const char *error)
{
    Dsv32__V1__GenerateResponse m = DSV32__V1__GENERATE_RESPONSE__INIT;
    Dsv32__V1__Usage u = DSV32__V1__USAGE__INIT;
    const char *t = "", *out = "";
    size_t tl = 0, ol = 0;
    char *text = NULL;
    if (why != DSV32_FINISH_STOP_STRING && !q->stop.stopped) {
        /* text still held by the stream (a partial character) and the stop matcher */
        struct dsv32_buf_like { char *p; size_t n; } acc = {NULL, 0};
        if (dsv32_tok_stream_flush(q->ts, &t, &tl) == 0 && tl &&
            dsv32_stop_feed(&q->stop, t, tl, &out, &ol) >= 0 && ol) {
            acc.p = strndup(out, ol);
            acc.n = ol;
        }
        dsv32_stop_flush(&q->stop, &out, &ol);
        text = malloc(acc.n + ol + 1);
        if (text) {
            memcpy(text, acc.p ? acc.p : "", acc.n);
            memcpy(text + acc.n, out, ol);
            text[acc.n + ol] = 0;
        }
        free(acc.p);
    }
    m.request_id = q->rid;
    if (text && *text) {
        if (q->in_reasoning)
            m.reasoning_text = text;
        else
            m.text = text;
    }
    char held[sizeof(q->think_hold) + 1];
    if (q->in_reasoning && q->n_think_hold && !(text && *text)) {
        /* the reply ended inside the reasoning: what was held back is reasoning after all */
        memcpy(held, q->think_hold, q->n_think_hold);
        held[q->n_think_hold] = 0;
        m.reasoning_text = held;
    }
    m.finish_reason = dsv32_api_finish_to_pb(why);
    if (why == DSV32_FINISH_STOP_STRING && q->stop.matched >= 0)
        m.matched_stop = q->stop.stops[q->stop.matched];
    if (error)
        m.error_message = (char *)error;
    u.prompt_tokens = (uint32_t)q->n_prompt;
    u.completion_tokens = completion;
    m.usage = &u;
    if (client_write(q, &m) == 0)
        dsv32_rpc_call_finish(q->call, DSV32_RPC_OK, "%s", "");
    else
        dsv32_rpc_call_finish(q->call, DSV32_RPC_CANCELLED, "client gone");
    free(text);
}

/* ---- one attempt on one daemon ---- */

enum outcome { OUT_DONE, OUT_FAILED, OUT_REFUSED, OUT_BUSY, OUT_CLIENT_GONE };

static enum outcome attempt(struct greq *q, const struct dsv32_node_info *node, int n_attempt,
                            struct dsv32_rpc_status *st)
{
    struct router *r = q->r;
    struct dsv32_rpc_client *c = client_for(r, node->address, 1);
    if (!c)
        return OUT_FAILED;
    Dsv32__Cluster__V1__RunRequest req = DSV32__CLUSTER__V1__RUN_REQUEST__INIT;
    char rid[160];
    snprintf(rid, sizeof(rid), "%s.%d", q->rid, n_attempt);
    req.request_id = rid;
    req.prompt_token_ids = q->prompt;
    req.n_prompt_token_ids = (size_t)q->n_prompt;
    req.sampling = q->msg->sampling;
    req.resume_token_ids = q->sent;
    req.n_resume_token_ids = (size_t)q->n_sent;
    struct dsv32_rpc_stream *s;
    enum outcome out = OUT_FAILED;
    memset(st, 0, sizeof(*st));
    /* fail fast: a daemon that cannot be reached answers UNAVAILABLE at once, and the request
     * goes elsewhere (waiting for it to come back could wait forever) */
    if (dsv32_rpc_stream_open_msg(c, "/dsv32.cluster.v1.Attn/Run", &req.base, -1, 0, &s) < 0) {
        client_for(r, node->address, -1);
        return OUT_FAILED;
    }
    pthread_mutex_lock(&q->lock);
    q->upstream = s;
    int gone = q->cancelled;
    pthread_mutex_unlock(&q->lock);
    if (gone)
        dsv32_rpc_stream_cancel(s);
    for (;;) {
        ProtobufCMessage *pm;
        int rc = dsv32_rpc_stream_read_msg(s, &dsv32__cluster__v1__run_response__descriptor,
                                           r->cfg.daemon_timeout_ms, &pm);
        if (rc <= 0) {
            dsv32_rpc_stream_status(s, st);
            if (q->cancelled)
                out = OUT_CLIENT_GONE;
            else if (rc == 0)
                out = OUT_FAILED; /* ended without a finish message */
            else if (st->code == DSV32_RPC_INVALID_ARGUMENT)
                out = OUT_REFUSED;
            else if (st->code == DSV32_RPC_RESOURCE_EXHAUSTED)
                out = OUT_BUSY;
            else
                out = OUT_FAILED;
            break;
        }
        Dsv32__Cluster__V1__RunResponse *m = (Dsv32__Cluster__V1__RunResponse *)pm;
        int stop = 0;
        if (m->n_prompt_logprobs && !q->plp_sent) {
            Dsv32__V1__GenerateResponse g = DSV32__V1__GENERATE_RESPONSE__INIT;
            g.request_id = q->rid;
            g.n_prompt_logprobs = m->n_prompt_logprobs;
            g.prompt_logprobs = m->prompt_logprobs;
            q->plp_sent = 1;
            if (client_write(q, &g) < 0)
                stop = -1;
        }
        /* tokens the client already has (a resumed run repeats none, but be exact) */
        for (size_t i = 0; i < m->n_token_ids && stop == 0; i++) {
            if ((int)(m->offset + i) < q->n_sent)
                continue;
            if (q->n_sent >= q->g.max_tokens) {
                stop = 1;
                break;
            }
            stop = relay_token(q, m->token_ids[i], i < m->n_logprobs ? m->logprobs[i] : NULL);
        }
        if (stop < 0) {
            protobuf_c_message_free_unpacked(pm, NULL);
            out = OUT_CLIENT_GONE;
            break;
        }
        if (stop == 1) {
            protobuf_c_message_free_unpacked(pm, NULL);
            finish_client(q, DSV32_FINISH_STOP_STRING, (uint32_t)q->n_sent, NULL);
            out = OUT_DONE;
            break;
        }
        if (m->finish_reason) {
            enum dsv32_finish why = dsv32_api_finish_from_pb(m->finish_reason);
            uint32_t comp = m->usage ? m->usage->completion_tokens : (uint32_t)q->n_sent;
            if (why == DSV32_FINISH_ERROR) {
                /* the daemon failed the request itself: let another one try */
                snprintf(st->message, sizeof(st->message), "%s", m->error_message);
                protobuf_c_message_free_unpacked(pm, NULL);
                out = OUT_FAILED;
                break;
            }
            finish_client(q, why, comp, NULL);
            protobuf_c_message_free_unpacked(pm, NULL);
            out = OUT_DONE;
            break;
        }
        protobuf_c_message_free_unpacked(pm, NULL);
    }
    pthread_mutex_lock(&q->lock);
    q->upstream = NULL;
    pthread_mutex_unlock(&q->lock);
    dsv32_rpc_stream_free(s); /* cancels the daemon's side when we stop early */
    client_for(r, node->address, -1);
    return out;
}

static void *worker(void *arg)
{
    struct greq *q = arg;
    struct router *r = q->r;
    int done = 0, outcome_ok = 0, outcome_invalid = 0;
    for (int n = 0; !done && n < r->cfg.max_attempts; n++) {
        struct dsv32_node_info node;
        if (pick(r, q, &node) < 0) {
            if (q->cancelled)
                break;
            if (q->n_sent == 0)
                dsv32_rpc_call_finish(q->call, DSV32_RPC_UNAVAILABLE,
                                      "no attention daemon is ready in cluster %s", r->cfg.cluster);
            else
                finish_client(q, DSV32_FINISH_ERROR, (uint32_t)q->n_sent,
                              "no attention daemon left to continue on");
            done = 1;
            break;
        }
        struct dsv32_rpc_status st;
        enum outcome o = attempt(q, &node, n, &st);
        switch (o) {
        case OUT_DONE:
            done = 1;
            outcome_ok = 1;
            break;
        case OUT_CLIENT_GONE:
            done = 2;
            break;
        case OUT_REFUSED:
            dsv32_rpc_call_finish(q->call, DSV32_RPC_INVALID_ARGUMENT, "%s", st.message);
            done = 1;
            outcome_invalid = 1;
            break;
        case OUT_BUSY:
        case OUT_FAILED:
            if (o == OUT_FAILED) {
                atomic_fetch_add(&r->failovers, 1);
                /* until its lease expires the daemon is still in etcd: keep others off it */
                mark_suspect(r, node.address, 3000 + 1000 * (int64_t)r->cfg.lease_ttl_s);
                log_warn("request %s: attention daemon %s (%s) failed after %d tokens (%s: %s); "
                         "placing it again", q->rid, node.id, node.address, q->n_sent,
                         dsv32_rpc_code_name(st.code), st.message);
            }
            if (q->n_excluded < 8)
                snprintf(q->excluded[q->n_excluded++], sizeof(q->excluded[0]), "%s", node.id);
            break;
        }
    }
    if (done == 2 || (!done && q->cancelled))
        dsv32_rpc_call_finish(q->call, DSV32_RPC_CANCELLED, "cancelled by the client");
    else if (!done)
        finish_client(q, DSV32_FINISH_ERROR, (uint32_t)q->n_sent,
                      "every attempt to place the request failed");
    /* the metrics: how it ended, and its latencies when it produced tokens */
    const double t_end = dsv32_mono_s();
    count_outcome(r, done == 2 || (!done && q->cancelled) ? RO_CANCELLED
                     : outcome_ok                          ? RO_OK
                     : outcome_invalid                     ? RO_INVALID
                                                           : RO_ERROR);
    atomic_fetch_add(&r->prompt_tokens, (uint_fast64_t)q->n_prompt);
    atomic_fetch_add(&r->generated_tokens, (uint_fast64_t)q->n_sent);
    if (q->n_sent > 0) {
        dsv32_histogram_observe(&r->ttft, q->t_first - q->t_start);
        if (q->n_sent > 1)
            dsv32_histogram_observe(&r->tpot, (t_end - q->t_first) / (q->n_sent - 1));
    }
    if (outcome_ok)
        dsv32_histogram_observe(&r->e2e, t_end - q->t_start);
    atomic_fetch_sub(&r->inflight, 1);
    greq_free(q);
    atomic_fetch_sub(&r->workers, 1);
    return NULL;
}

static void on_client_cancel(void *arg, struct dsv32_rpc_call *call)
{
    struct greq *q = arg;
    pthread_mutex_lock(&q->lock);
    q->cancelled = 1;
    if (q->upstream)
        dsv32_rpc_stream_cancel(q->upstream);
    pthread_mutex_unlock(&q->lock);
}

/* The prompt of a request: text (with BOS), chat (rendered, special tokens parsed) or ids. */
static int prompt_of(struct router *r, const Dsv32__V1__GenerateRequest *m, int32_t **ret,
                     int *ret_n, char *err, size_t err_len)
{
    size_t n = 0;
    int32_t *ids = NULL;
    int rc;
    switch (m->input_case) {
    case DSV32__V1__GENERATE_REQUEST__INPUT_TEXT:
        if (!m->text[0]) {
            snprintf(err, err_len, "the prompt text is empty");
            return -EINVAL;
        }
        rc = dsv32_tok_encode(r->tok, m->text, strlen(m->text), DSV32_TOK_ADD_BOS, &ids, &n);
        if (rc < 0) {
            snprintf(err, err_len, "%s", rc == DSV32_EUTF8 ? "text is not valid UTF-8"
                                         : rc == -E2BIG ? "text is too long"
                                                        : dsv32_strerror(rc));
            return -EINVAL;
        }
        break;
    case DSV32__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS:
        n = m->token_ids->n_ids;
        ids = malloc(sizeof(int32_t) * (n ? n : 1));
        if (!ids)
            return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
            if (m->token_ids->ids[i] < 0 || m->token_ids->ids[i] >= r->mcfg.vocab_size) {
                snprintf(err, err_len, "token_ids[%zu] = %d is not a token id (vocabulary of %d)",
                         i, m->token_ids->ids[i], r->mcfg.vocab_size);
                free(ids);
                return -EINVAL;
            }
            ids[i] = m->token_ids->ids[i];
        }
        break;
    case DSV32__V1__GENERATE_REQUEST__INPUT_CHAT:
        rc = router_render_chat(r, m->chat, &ids, &n, err, err_len);
        if (rc < 0)
            return rc;
        break;
    default:
        snprintf(err, err_len, "no input: set text, chat or token_ids");
        return -EINVAL;
    }
    if (n == 0) {
        free(ids);
        snprintf(err, err_len, "the prompt is empty");
        return -EINVAL;
    }
    *ret = ids;
    *ret_n = (int)n;
    return 0;
}

static void generate_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    char err[256] = "";
    int code = DSV32_RPC_INVALID_ARGUMENT;
    struct greq *q = calloc(1, sizeof(*q));
    if (!q) {
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    pthread_mutex_init(&q->lock, NULL);
    q->r = r;
    q->call = call;
    q->msg = dsv32__v1__generate_request__unpack(NULL, len, req);
    if (!q->msg) {
        snprintf(err, sizeof(err), "malformed GenerateRequest");
        goto refuse;
    }
    if (q->msg->request_id[0]) {
        if (dsv32_api_request_id_ok(q->msg->request_id) < 0) {
            snprintf(err, sizeof(err), "request_id must be 1 to 128 characters of [A-Za-z0-9._:-]");
            goto refuse;
        }
        snprintf(q->rid, sizeof(q->rid), "%s", q->msg->request_id);
    } else {
        snprintf(q->rid, sizeof(q->rid), "%s-%llu", r->cfg.id,
                 (unsigned long long)atomic_fetch_add(&r->next_rid, 1));
    }
    int rc = prompt_of(r, q->msg, &q->prompt, &q->n_prompt, err, sizeof(err));
    if (rc < 0) {
        code = dsv32_rpc_code_from_err(rc);
        goto refuse;
    }
    if (dsv32_api_gen_from_pb(q->msg->sampling, q->n_prompt, r->mcfg.vocab_size, r->cfg.context,
                              &q->g, err, sizeof(err)) < 0)
        goto refuse;
    if (dsv32_stop_init(&q->stop, q->g.stop, q->g.n_stop) < 0 ||
        dsv32_tok_stream_new(r->tok, 0, &q->ts) < 0 ||
        !(q->sent = malloc(sizeof(int32_t) * (size_t)q->g.max_tokens))) {
        code = DSV32_RPC_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof(err), "out of memory");
        goto refuse;
    }
    q->in_reasoning = q->msg->input_case == DSV32__V1__GENERATE_REQUEST__INPUT_CHAT &&
                      q->msg->chat->thinking;
    q->t_start = dsv32_mono_s();
    if (atomic_fetch_add(&r->inflight, 1) >= r->cfg.max_inflight) {
        atomic_fetch_sub(&r->inflight, 1);
        count_outcome(r, RO_REJECTED);
        code = DSV32_RPC_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof(err), "overloaded: %d requests in progress", r->cfg.max_inflight);
        goto refuse_counted;
    }
    dsv32_rpc_call_on_cancel(call, on_client_cancel, q);
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setstacksize(&at, WORKER_STACK);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    atomic_fetch_add(&r->workers, 1);
    rc = pthread_create(&th, &at, worker, q);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        atomic_fetch_sub(&r->workers, 1);
        atomic_fetch_sub(&r->inflight, 1);
        count_outcome(r, RO_REJECTED);
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "cannot start a worker");
        greq_free(q);
    }
    return;
refuse:
    count_outcome(r, code == DSV32_RPC_INVALID_ARGUMENT ? RO_INVALID : RO_ERROR);
refuse_counted:
    dsv32_rpc_call_finish(call, code, "%s", err);
    greq_free(q);
}

/* --metrics-listen (metrics.h): what the router sees of each request */
void router_fill_metrics(void *ctx, struct dsv32_metrics_text *t)
{
    struct router *r = ctx;
    dsv32_metrics_one(t, "dsv32_router_requests_running", "gauge", "Generate requests in progress.",
                      atomic_load(&r->inflight));
    dsv32_metrics_family(t, "dsv32_router_requests_total", "counter",
                         "Generate requests by how they ended (rejected: the router was full).");
    static const char *names[ROUTER_OUTCOMES] = {"outcome=\"ok\"", "outcome=\"cancelled\"",
                                                 "outcome=\"invalid\"", "outcome=\"rejected\"",
                                                 "outcome=\"error\""};
    for (int i = 0; i < ROUTER_OUTCOMES; i++)
        dsv32_metrics_sample(t, names[i], (double)atomic_load(&r->req_outcome[i]));
    dsv32_metrics_one(t, "dsv32_router_failovers_total", "counter",
                      "Requests moved to another attention daemon after one failed.",
                      (double)atomic_load(&r->failovers));
    dsv32_metrics_one(t, "dsv32_router_prompt_tokens_total", "counter", "Prompt tokens of ended requests.",
                      (double)atomic_load(&r->prompt_tokens));
    dsv32_metrics_one(t, "dsv32_router_generation_tokens_total", "counter",
                      "Tokens streamed to clients by ended requests.",
                      (double)atomic_load(&r->generated_tokens));
    dsv32_metrics_histogram(t, "dsv32_router_time_to_first_token_seconds",
                            "From accepting a request to sending its first token.", &r->ttft);
    dsv32_metrics_histogram(t, "dsv32_router_time_per_output_token_seconds",
                            "After the first token, the mean time per further token of a request.",
                            &r->tpot);
    dsv32_metrics_histogram(t, "dsv32_router_request_seconds",
                            "Whole requests that ended normally, accepted to last message.", &r->e2e);
}

/* ---- the unary calls ---- */

static void tokenize_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    Dsv32__V1__TokenizeRequest *m = dsv32__v1__tokenize_request__unpack(NULL, len, req);
    char err[256] = "";
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = -EINVAL;
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed TokenizeRequest");
        return;
    }
    if (m->input_case == DSV32__V1__TOKENIZE_REQUEST__INPUT_TEXT) {
        rc = dsv32_tok_encode(r->tok, m->text, strlen(m->text),
                              m->add_special_tokens ? DSV32_TOK_ADD_BOS : 0, &ids, &n);
        if (rc < 0)
            snprintf(err, sizeof(err), "%s", rc == DSV32_EUTF8 ? "text is not valid UTF-8"
                                                              : dsv32_strerror(rc));
    } else if (m->input_case == DSV32__V1__TOKENIZE_REQUEST__INPUT_CHAT) {
        rc = router_render_chat(r, m->chat, &ids, &n, err, sizeof(err));
    } else {
        snprintf(err, sizeof(err), "no input: set text or chat");
    }
    dsv32__v1__tokenize_request__free_unpacked(m, NULL);
    if (rc < 0) {
        dsv32_rpc_call_finish(call, dsv32_rpc_code_from_err(rc < 0 && rc != DSV32_EUTF8 ? rc : -EINVAL),
                              "%s", err);
        return;
    }
    Dsv32__V1__TokenizeResponse resp = DSV32__V1__TOKENIZE_RESPONSE__INIT;
    resp.token_ids = ids;
    resp.n_token_ids = n;
    dsv32_rpc_call_reply_msg(call, &resp.base);
    free(ids);
}

static void detokenize_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    Dsv32__V1__DetokenizeRequest *m = dsv32__v1__detokenize_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed DetokenizeRequest");
        return;
    }
    char *text = NULL;
    size_t tl = 0;
    int rc = dsv32_tok_decode(r->tok, m->token_ids, m->n_token_ids,
                              m->skip_special_tokens ? DSV32_TOK_SKIP_SPECIAL : 0, &text, &tl);
    dsv32__v1__detokenize_request__free_unpacked(m, NULL);
    if (rc < 0) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "%s",
                              rc == DSV32_ETOKEN ? "a token id is outside the vocabulary"
                                                 : dsv32_strerror(rc));
        return;
    }
    Dsv32__V1__DetokenizeResponse resp = DSV32__V1__DETOKENIZE_RESPONSE__INIT;
    resp.text = text;
    dsv32_rpc_call_reply_msg(call, &resp.base);
    free(text);
}

static void model_info_handler(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    const struct dsv32_config *c = &r->mcfg;
    Dsv32__V1__ModelInfo mi = DSV32__V1__MODEL_INFO__INIT;
    mi.model_name = (char *)r->cfg.model_name;
    mi.vocab_size = (uint32_t)c->vocab_size;
    mi.context_length = (uint32_t)r->cfg.context;
    mi.num_layers = (uint32_t)c->num_hidden_layers;
    mi.num_dense_layers = (uint32_t)c->first_k_dense_replace;
    mi.num_moe_layers = (uint32_t)(c->num_hidden_layers - c->first_k_dense_replace);
    mi.num_mtp_layers = (uint32_t)c->num_nextn_predict_layers;
    mi.hidden_size = (uint32_t)c->hidden_size;
    mi.num_attention_heads = (uint32_t)c->num_attention_heads;
    mi.num_routed_experts = (uint32_t)c->n_routed_experts;
    mi.num_experts_per_token = (uint32_t)c->num_experts_per_tok;
    mi.num_shared_experts = (uint32_t)c->n_shared_experts;
    mi.bos_token_id = c->bos_token_id;
    mi.eos_token_id = c->eos_token_id;
    mi.max_logprobs = DSV32_MAX_LOGPROBS;
    mi.kv_block_tokens = 64;
    mi.weight_dtype = c->fp8 ? "fp8_e4m3" : "bf16";
    dsv32_rpc_call_reply_msg(call, &mi.base);
}

int router_add_generate(struct router *r)
{
    int rc;
    if ((rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Generate/Generate",
                                          DSV32_RPC_SERVER_STREAM, 0, generate_handler, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Generate/Tokenize",
                                          DSV32_RPC_UNARY, 0, tokenize_handler, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Generate/Detokenize",
                                          DSV32_RPC_UNARY, 0, detokenize_handler, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Generate/GetModelInfo",
                                          DSV32_RPC_UNARY, 0, model_info_handler, r)) < 0)
        return rc;
    return 0;
}
