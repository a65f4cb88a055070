/* The server half of rpc.h (and the helpers both halves share): calls are small state machines
 * driven by one completion-queue thread. Every operation posted to gRPC carries a `struct tag`
 * naming the call and the step it completes. The client is in rpc_client.c. */
#define _GNU_SOURCE 1
#include "rpc.h"

#include "error.h"
#include "log.h"
#include "rpc_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#define DEFAULT_MAX_CALLS 1024u
#define DEFAULT_STREAM_QUEUE 64u
#define MAX_METHODS 64u
#define MAX_PATH_BYTES 256u

/* ---- Shared helpers ----------------------------------------------------------------------- */

const char *dsv32_rpc_code_name(int code)
{
    static const char *const names[] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    if (code < 0 || code >= (int)(sizeof(names) / sizeof(names[0])))
        return "UNKNOWN";
    return names[code];
}

int dsv32_rpc_code_from_err(int err)
{
    switch (err) {
    case 0:
        return DSV32_RPC_OK;
    case -EINVAL:
    case -E2BIG:
    case DSV32_EFORMAT:
    case DSV32_EUTF8:
    case DSV32_ETOKEN:
    case DSV32_ECONTEXT:
        return DSV32_RPC_INVALID_ARGUMENT;
    case -ENOENT:
        return DSV32_RPC_NOT_FOUND;
    case -EEXIST:
        return DSV32_RPC_ALREADY_EXISTS;
    case -EPERM:
    case -EACCES:
        return DSV32_RPC_PERMISSION_DENIED;
    case -ENOMEM:
    case -EMSGSIZE:
    case DSV32_EFULL:
    case DSV32_EOVERLOAD:
        return DSV32_RPC_RESOURCE_EXHAUSTED;
    case -ETIMEDOUT:
    case DSV32_ETIMEOUT:
        return DSV32_RPC_DEADLINE_EXCEEDED;
    case -ECANCELED:
    case DSV32_ECANCELLED:
        return DSV32_RPC_CANCELLED;
    case DSV32_EUNSUPPORTED:
    case -ENOSYS:
    case -EOPNOTSUPP:
        return DSV32_RPC_UNIMPLEMENTED;
    case DSV32_ENOTLEADER:
    case DSV32_EEPOCH:
        return DSV32_RPC_FAILED_PRECONDITION;
    case DSV32_EPEER:
    case DSV32_EETCD:
    case -ECONNREFUSED:
    case -ECONNRESET:
    case -EAGAIN:
        return DSV32_RPC_UNAVAILABLE;
    default:
        return DSV32_RPC_INTERNAL;
    }
}

static bool ipv4_is_loopback(const char *a) { return strncmp(a, "127.", 4) == 0; }

bool dsv32_rpc_peer_is_loopback(const char *peer)
{
    if (!peer)
        return false;
    if (strncmp(peer, "unix:", 5) == 0 || strncmp(peer, "unix-abstract:", 14) == 0)
        return true;
    if (strncmp(peer, "ipv4:", 5) == 0)
        return ipv4_is_loopback(peer + 5);
    if (strncmp(peer, "ipv6:", 5) == 0) {
        const char *h = peer + 5;
        if (*h == '[')
            h++;
        if (strncmp(h, "::1]", 4) == 0)
            return true;
        if (strncasecmp(h, "::ffff:", 7) == 0)
            return ipv4_is_loopback(h + 7);
    }
    return false;
}

int dsv32_rpc_pack(const ProtobufCMessage *m, uint8_t **ret_buf, size_t *ret_len)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return -ENOMEM;
    protobuf_c_message_pack(m, b);
    *ret_buf = b;
    *ret_len = n;
    return 0;
}

/* ---- Server ------------------------------------------------------------------------------- */

struct method {
    char *path;
    enum dsv32_rpc_kind kind;
    unsigned flags;
    dsv32_rpc_handler_fn fn;
    void *arg;
    void *handle; /* grpc_server_register_method */
};

struct dsv32_rpc_server {
    struct dsv32_rpc_server_config cfg; /* strings owned */
    grpc_server *srv;
    grpc_completion_queue *cq;
    pthread_t thread;
    bool thread_started;
    struct method methods[MAX_METHODS];
    uint32_t n_methods;
    struct tag shutdown_tag;

    pthread_mutex_t mu;
    pthread_cond_t cond;
    uint32_t n_calls;   /* admitted calls not yet destroyed */
    uint32_t n_pending; /* call structs waiting in request_call */
    bool started, shutting_down, shutdown_notified, down;
};

struct dsv32_rpc_call {
    struct dsv32_rpc_server *srv;
    struct method *m; /* NULL: a method nobody registered */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* unregistered methods */
    grpc_byte_buffer *payload;
    struct tag t_new, t_close, t_send, t_status;
    int close_cancelled;
    char *peer;
    char *method_path; /* unregistered methods: copy of details.method */

    pthread_mutex_t mu;
    pthread_cond_t cond;
    int refs;       /* handler's hold + batches in flight + the pending request */
    bool admitted;  /* counted in srv->n_calls */
    bool md_sent, send_busy, finished, status_started, closed, broken, cancel_fired;
    atomic_bool cancelled;
    grpc_byte_buffer **q; /* (q_cap) ring of stream messages waiting */
    uint32_t q_head, q_len, q_cap;
    grpc_byte_buffer *send_bb;  /* the stream message in flight */
    grpc_byte_buffer *reply_bb; /* unary response, sent with the status */
    int fin_code;
    char fin_msg[DSV32_RPC_STATUS_MSG_MAX];
    dsv32_rpc_cancel_fn cancel_fn;
    void *cancel_arg;
};

static void srv_arm(struct dsv32_rpc_server *s, struct method *m);

static void call_destroy(struct dsv32_rpc_call *c)
{
    struct dsv32_rpc_server *s = c->srv;
    while (c->q_len > 0) {
        grpc_byte_buffer_destroy(c->q[c->q_head]);
        c->q_head = (c->q_head + 1) % c->q_cap;
        c->q_len--;
    }
    free(c->q);
    if (c->send_bb)
        grpc_byte_buffer_destroy(c->send_bb);
    if (c->reply_bb)
        grpc_byte_buffer_destroy(c->reply_bb);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    grpc_metadata_array_destroy(&c->md);
    grpc_call_details_destroy(&c->details);
    if (c->call)
        grpc_call_unref(c->call);
    if (c->peer)
        gpr_free(c->peer);
    free(c->method_path);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cond);
    bool admitted = c->admitted;
    free(c);
    if (admitted) {
        pthread_mutex_lock(&s->mu);
        s->n_calls--;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->mu);
    }
}

static void call_unref(struct dsv32_rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    int left = --c->refs;
    pthread_mutex_unlock(&c->mu);
    if (left == 0)
        call_destroy(c);
}

/* Starts a batch under c->mu; a failure here is a programming error in this file. */
static bool call_batch(struct dsv32_rpc_call *c, const grpc_op *ops, size_t n, struct tag *t)
{
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, t, NULL);
    if (e != GRPC_CALL_OK) {
        log_error("rpc: %s: grpc_call_start_batch failed (%d)", dsv32_rpc_call_method(c), (int)e);
        return false;
    }
    c->refs++;
    return true;
}

/* Under c->mu: sends the next queued message if none is in flight. */
static void call_pump_locked(struct dsv32_rpc_call *c)
{
    if (c->send_busy || c->q_len == 0 || c->broken)
        return;
    grpc_byte_buffer *bb = c->q[c->q_head];
    c->q_head = (c->q_head + 1) % c->q_cap;
    c->q_len--;
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = bb;
    n++;
    c->send_bb = bb;
    if (!call_batch(c, ops, n, &c->t_send)) {
        c->send_bb = NULL;
        grpc_byte_buffer_destroy(bb);
        c->broken = true;
        return;
    }
    c->md_sent = true;
    c->send_busy = true;
}

/* Under c->mu: once the handler finished and no message is in flight, sends the status. */
static void call_send_status_locked(struct dsv32_rpc_call *c)
{
    if (!c->finished || c->send_busy || c->status_started)
        return;
    if (c->q_len > 0 && !c->broken)
        return; /* call_pump_locked runs first */
    c->status_started = true;
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (c->reply_bb) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = c->reply_bb;
        n++;
    }
    grpc_slice details = grpc_slice_from_copied_string(c->fin_msg);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)c->fin_code;
    ops[n].data.send_status_from_server.status_details = c->fin_msg[0] ? &details : NULL;
    n++;
    c->md_sent = true;
    if (!call_batch(c, ops, n, &c->t_status))
        grpc_call_cancel(c->call, NULL);
    grpc_slice_unref(details);
}

/* Ends the call for the handler (or for this file, before the handler saw it). */
static int call_end(struct dsv32_rpc_call *c, int code, const char *msg, grpc_byte_buffer *reply)
{
    pthread_mutex_lock(&c->mu);
    if (c->finished) {
        pthread_mutex_unlock(&c->mu);
        log_error("rpc: %s finished twice", dsv32_rpc_call_method(c));
        if (reply)
            grpc_byte_buffer_destroy(reply);
        return -EALREADY;
    }
    c->finished = true;
    c->fin_code = code;
    snprintf(c->fin_msg, sizeof(c->fin_msg), "%s", msg ? msg : "");
    c->reply_bb = reply;
    call_send_status_locked(c);
    bool was_cancelled = atomic_load(&c->cancelled);
    pthread_mutex_unlock(&c->mu);
    call_unref(c); /* the handler's hold */
    return was_cancelled ? DSV32_ECANCELLED : 0;
}

int dsv32_rpc_call_reply(struct dsv32_rpc_call *c, const void *buf, size_t len)
{
    if (len > c->srv->cfg.max_send_bytes) {
        call_end(c, DSV32_RPC_INTERNAL, "response exceeds the server's max send size", NULL);
        return -EMSGSIZE;
    }
    int r = call_end(c, DSV32_RPC_OK, NULL, bb_from(buf, len));
    return r;
}

int dsv32_rpc_call_reply_msg(struct dsv32_rpc_call *c, const ProtobufCMessage *m)
{
    uint8_t *b;
    size_t n;
    int r = dsv32_rpc_pack(m, &b, &n);
    if (r < 0) {
        call_end(c, DSV32_RPC_INTERNAL, "out of memory", NULL);
        return r;
    }
    r = dsv32_rpc_call_reply(c, b, n);
    free(b);
    return r;
}

int dsv32_rpc_call_write(struct dsv32_rpc_call *c, const void *buf, size_t len)
{
    if (!c->m || c->m->kind != DSV32_RPC_SERVER_STREAM)
        return -EINVAL;
    if (len > c->srv->cfg.max_send_bytes)
        return -EMSGSIZE;
    pthread_mutex_lock(&c->mu);
    int r = 0;
    if (c->finished) {
        log_error("rpc: %s: write after finish", dsv32_rpc_call_method(c));
        r = -EINVAL;
    } else if (atomic_load(&c->cancelled) || c->broken || c->closed) {
        r = DSV32_ECANCELLED;
    } else if (c->q_len >= c->q_cap) {
        r = DSV32_EOVERLOAD;
    } else {
        c->q[(c->q_head + c->q_len) % c->q_cap] = bb_from(buf, len);
        c->q_len++;
        call_pump_locked(c);
        if (c->broken)
            r = DSV32_ECANCELLED;
    }
    pthread_mutex_unlock(&c->mu);
    return r;
}

int dsv32_rpc_call_write_msg(struct dsv32_rpc_call *c, const ProtobufCMessage *m)
{
    uint8_t *b;
    size_t n;
    int r = dsv32_rpc_pack(m, &b, &n);
    if (r < 0)
        return r;
    r = dsv32_rpc_call_write(c, b, n);
    free(b);
    return r;
}

int dsv32_rpc_call_wait_writable(struct dsv32_rpc_call *c, int64_t timeout_ms)
{
    if (c->srv->thread_started && pthread_equal(pthread_self(), c->srv->thread))
        return -EDEADLK;
    struct timespec ts;
    if (timeout_ms >= 0)
        abstime_after_ms(&ts, timeout_ms);
    pthread_mutex_lock(&c->mu);
    int r = 0;
    for (;;) {
        if (atomic_load(&c->cancelled) || c->broken || c->closed) {
            r = DSV32_ECANCELLED;
            break;
        }
        if (c->q_len < c->q_cap)
            break;
        if (cond_wait_until(&c->cond, &c->mu, timeout_ms >= 0 ? &ts : NULL) == ETIMEDOUT) {
            r = c->q_len < c->q_cap ? 0 : DSV32_ETIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return r;
}

int dsv32_rpc_call_finish(struct dsv32_rpc_call *c, int code, const char *fmt, ...)
{
    char msg[DSV32_RPC_STATUS_MSG_MAX];
    msg[0] = 0;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
    }
    return call_end(c, code, msg, NULL);
}

int dsv32_rpc_call_finish_err(struct dsv32_rpc_call *c, int err, const char *what)
{
    return dsv32_rpc_call_finish(c, dsv32_rpc_code_from_err(err), "%s%s%s", what ? what : "",
                                 what ? ": " : "", dsv32_strerror(err));
}

void dsv32_rpc_call_on_cancel(struct dsv32_rpc_call *c, dsv32_rpc_cancel_fn fn, void *arg)
{
    pthread_mutex_lock(&c->mu);
    bool now = false;
    if (atomic_load(&c->cancelled) && !c->cancel_fired && fn) {
        c->cancel_fired = true;
        now = true;
    }
    c->cancel_fn = fn;
    c->cancel_arg = arg;
    pthread_mutex_unlock(&c->mu);
    if (now)
        fn(arg, c);
}

bool dsv32_rpc_call_cancelled(const struct dsv32_rpc_call *c) { return atomic_load(&c->cancelled); }

int64_t dsv32_rpc_call_remaining_ms(const struct dsv32_rpc_call *c)
{
    gpr_timespec d = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(d, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0 || d.tv_sec > INT64_MAX / 2000)
        return INT64_MAX;
    gpr_timespec left = gpr_time_sub(d, gpr_now(GPR_CLOCK_MONOTONIC));
    return (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
}

const char *dsv32_rpc_call_peer(const struct dsv32_rpc_call *c) { return c->peer ? c->peer : ""; }

const char *dsv32_rpc_call_method(const struct dsv32_rpc_call *c)
{
    if (c->m)
        return c->m->path;
    return c->method_path ? c->method_path : "?";
}

int dsv32_rpc_call_metadata(const struct dsv32_rpc_call *c, const char *key, char *buf,
                            size_t cap)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *m = &c->md.metadata[i];
        if (GRPC_SLICE_LENGTH(m->key) != kl || memcmp(GRPC_SLICE_START_PTR(m->key), key, kl) != 0)
            continue;
        size_t vl = GRPC_SLICE_LENGTH(m->value);
        if (vl + 1 > cap)
            return -ENOBUFS;
        memcpy(buf, GRPC_SLICE_START_PTR(m->value), vl);
        buf[vl] = 0;
        return (int)vl;
    }
    return -ENOENT;
}

/* Constant-time comparison so the token cannot be guessed byte by byte from timings. */
static bool token_equal(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = la != lb;
    for (size_t i = 0; i < lb; i++)
        d |= (unsigned char)(a[i < la ? i : 0] ^ b[i]);
    return d == 0;
}

/* Admin methods: a loopback peer (unless configured otherwise) and the bearer token. Returns the
 * status to refuse with, or OK. */
static int admin_check(struct dsv32_rpc_call *c, const char **why)
{
    const struct dsv32_rpc_server_config *cfg = &c->srv->cfg;
    if (!cfg->admin_allow_remote && !dsv32_rpc_peer_is_loopback(c->peer)) {
        *why = "admin calls are only taken from loopback peers";
        return DSV32_RPC_PERMISSION_DENIED;
    }
    if (!cfg->admin_token || !cfg->admin_token[0]) {
        *why = "admin calls are disabled: no admin token configured";
        return DSV32_RPC_PERMISSION_DENIED;
    }
    char v[512];
    int n = dsv32_rpc_call_metadata(c, "authorization", v, sizeof(v));
    if (n < 0 || strncasecmp(v, "Bearer ", 7) != 0 || !token_equal(v + 7, cfg->admin_token)) {
        *why = "missing or wrong bearer token";
        return DSV32_RPC_UNAUTHENTICATED;
    }
    return DSV32_RPC_OK;
}

/* A call arrived: re-arm, listen for its end, check limits and hand it to the handler. */
static void srv_on_new(struct dsv32_rpc_call *c, bool ok)
{
    struct dsv32_rpc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    s->n_pending--;
    bool down = s->shutting_down;
    bool admit = ok && s->n_calls < s->cfg.max_calls;
    if (admit)
        s->n_calls++;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    if (!ok) { /* server shutting down: the request was dropped */
        call_unref(c);
        return;
    }
    if (!down)
        srv_arm(s, c->m);
    c->admitted = admit;
    c->peer = grpc_call_get_peer(c->call);
    if (!c->m)
        c->method_path = grpc_slice_to_c_string(c->details.method);

    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    pthread_mutex_lock(&c->mu);
    bool started = call_batch(c, &op, 1, &c->t_close);
    pthread_mutex_unlock(&c->mu);
    if (!started) {
        call_end(c, DSV32_RPC_INTERNAL, "internal error", NULL);
        return;
    }

    if (!c->m) {
        call_end(c, DSV32_RPC_UNIMPLEMENTED, "unknown method", NULL);
        return;
    }
    if (!admit) {
        call_end(c, DSV32_RPC_RESOURCE_EXHAUSTED, "too many calls in progress", NULL);
        return;
    }
    if (c->m->flags & DSV32_RPC_ADMIN) {
        const char *why = NULL;
        int code = admin_check(c, &why);
        if (code != DSV32_RPC_OK) {
            log_warn("rpc: %s from %s refused: %s", c->m->path, c->peer, why);
            call_end(c, code, why, NULL);
            return;
        }
    }
    if (!c->payload) {
        call_end(c, DSV32_RPC_INVALID_ARGUMENT, "missing request message", NULL);
        return;
    }
    uint8_t *req;
    size_t len;
    int r = bb_copy(c->payload, &req, &len);
    grpc_byte_buffer_destroy(c->payload);
    c->payload = NULL;
    if (r < 0) {
        call_end(c, DSV32_RPC_INTERNAL, "cannot read the request", NULL);
        return;
    }
    c->m->fn(c->m->arg, c, req, len);
    free(req);
}

static void srv_on_close(struct dsv32_rpc_call *c, bool ok)
{
    dsv32_rpc_cancel_fn fn = NULL;
    void *arg = NULL;
    pthread_mutex_lock(&c->mu);
    c->closed = true;
    if ((c->close_cancelled || !ok) && !c->finished) {
        atomic_store(&c->cancelled, true);
        if (c->cancel_fn && !c->cancel_fired) {
            c->cancel_fired = true;
            fn = c->cancel_fn;
            arg = c->cancel_arg;
        }
    }
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->mu);
    if (fn)
        fn(arg, c);
    call_unref(c);
}

static void srv_on_send(struct dsv32_rpc_call *c, bool ok)
{
    pthread_mutex_lock(&c->mu);
    c->send_busy = false;
    if (c->send_bb) {
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
    }
    if (!ok)
        c->broken = true;
    if (c->broken) {
        while (c->q_len > 0) {
            grpc_byte_buffer_destroy(c->q[c->q_head]);
            c->q_head = (c->q_head + 1) % c->q_cap;
            c->q_len--;
        }
    }
    call_pump_locked(c);
    call_send_status_locked(c);
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->mu);
    call_unref(c);
}

static void *srv_thread(void *arg)
{
    struct dsv32_rpc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        struct tag *t = ev.tag;
        switch (t->kind) {
        case TAG_SRV_NEW:
            srv_on_new(t->obj, ev.success);
            break;
        case TAG_SRV_CLOSE:
            srv_on_close(t->obj, ev.success);
            break;
        case TAG_SRV_SEND:
            srv_on_send(t->obj, ev.success);
            break;
        case TAG_SRV_STATUS:
            call_unref(t->obj);
            break;
        case TAG_SRV_SHUTDOWN:
            pthread_mutex_lock(&s->mu);
            s->shutdown_notified = true;
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->mu);
            break;
        default:
            log_error("rpc: unexpected tag %d on a server queue", (int)t->kind);
            break;
        }
    }
    return NULL;
}

/* Puts one call struct into request_call for method m (NULL: the catch-all). */
static void srv_arm(struct dsv32_rpc_server *s, struct method *m)
{
    struct dsv32_rpc_call *c = calloc(1, sizeof(*c));
    uint32_t q_cap = s->cfg.max_stream_queue;
    grpc_byte_buffer **q = m && m->kind == DSV32_RPC_SERVER_STREAM ? calloc(q_cap, sizeof(*q))
                                                                    : NULL;
    if (!c || (m && m->kind == DSV32_RPC_SERVER_STREAM && !q)) {
        free(c);
        free(q);
        log_error("rpc: out of memory; %s no longer taken", m ? m->path : "unknown methods");
        return;
    }
    c->srv = s;
    c->m = m;
    c->q = q;
    c->q_cap = q ? q_cap : 0;
    c->refs = 1;
    c->t_new = (struct tag){TAG_SRV_NEW, c};
    c->t_close = (struct tag){TAG_SRV_CLOSE, c};
    c->t_send = (struct tag){TAG_SRV_SEND, c};
    c->t_status = (struct tag){TAG_SRV_STATUS, c};
    atomic_init(&c->cancelled, false);
    pthread_mutex_init(&c->mu, NULL);
    cond_init_monotonic(&c->cond);
    grpc_metadata_array_init(&c->md);
    grpc_call_details_init(&c->details);
    pthread_mutex_lock(&s->mu);
    s->n_pending++;
    pthread_mutex_unlock(&s->mu);
    grpc_call_error e;
    if (m)
        e = grpc_server_request_registered_call(s->srv, m->handle, &c->call, &c->deadline, &c->md,
                                                &c->payload, s->cq, s->cq, &c->t_new);
    else
        e = grpc_server_request_call(s->srv, &c->call, &c->details, &c->md, s->cq, s->cq,
                                     &c->t_new);
    if (e != GRPC_CALL_OK) {
        log_error("rpc: request_call for %s failed (%d)", m ? m->path : "*", (int)e);
        pthread_mutex_lock(&s->mu);
        s->n_pending--;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->mu);
        call_destroy(c);
    }
}

static char *strdup_or_null(const char *s) { return s ? strdup(s) : NULL; }

int dsv32_rpc_server_new(const struct dsv32_rpc_server_config *cfg,
                         struct dsv32_rpc_server **ret)
{
    if (!cfg || !cfg->listen || !cfg->listen[0])
        return -EINVAL;
    struct dsv32_rpc_server *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->cfg = *cfg;
    s->cfg.listen = strdup(cfg->listen);
    s->cfg.admin_token = strdup_or_null(cfg->admin_token);
    if (!s->cfg.listen || (cfg->admin_token && !s->cfg.admin_token)) {
        free((char *)s->cfg.listen);
        free((char *)s->cfg.admin_token);
        free(s);
        return -ENOMEM;
    }
    if (!s->cfg.max_recv_bytes)
        s->cfg.max_recv_bytes = DSV32_RPC_DEFAULT_MAX_MSG_BYTES;
    if (!s->cfg.max_send_bytes)
        s->cfg.max_send_bytes = DSV32_RPC_DEFAULT_MAX_MSG_BYTES;
    if (!s->cfg.max_calls)
        s->cfg.max_calls = DEFAULT_MAX_CALLS;
    if (!s->cfg.max_stream_queue)
        s->cfg.max_stream_queue = DEFAULT_STREAM_QUEUE;
    if (s->cfg.max_recv_bytes > INT32_MAX || s->cfg.max_send_bytes > INT32_MAX) {
        free((char *)s->cfg.listen);
        free((char *)s->cfg.admin_token);
        free(s);
        return -EINVAL;
    }
    pthread_mutex_init(&s->mu, NULL);
    cond_init_monotonic(&s->cond);
    s->shutdown_tag = (struct tag){TAG_SRV_SHUTDOWN, s};

    grpc_init();
    grpc_arg args[4];
    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)s->cfg.max_recv_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)s->cfg.max_send_bytes;
    /* Our clients ping every 10 s while a stream is open (to notice dead peers); accept that. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS;
    args[2].value.integer = 5000;
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = GRPC_ARG_HTTP2_MAX_PING_STRIKES;
    args[3].value.integer = 0;
    grpc_channel_args ca = {.num_args = 4, .args = args};
    s->srv = grpc_server_create(&ca, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->srv, s->cq, NULL);
    *ret = s;
    return 0;
}

int dsv32_rpc_server_add_method(struct dsv32_rpc_server *s, const char *path,
                                enum dsv32_rpc_kind kind, unsigned flags, dsv32_rpc_handler_fn fn,
                                void *arg)
{
    if (s->started || !path || path[0] != '/' || strlen(path) >= MAX_PATH_BYTES || !fn ||
        (kind != DSV32_RPC_UNARY && kind != DSV32_RPC_SERVER_STREAM))
        return -EINVAL;
    for (uint32_t i = 0; i < s->n_methods; i++)
        if (strcmp(s->methods[i].path, path) == 0)
            return -EEXIST;
    if (s->n_methods >= MAX_METHODS)
        return DSV32_EFULL;
    struct method *m = &s->methods[s->n_methods];
    m->path = strdup(path);
    if (!m->path)
        return -ENOMEM;
    m->handle = grpc_server_register_method(s->srv, m->path, NULL,
                                            GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (!m->handle) {
        free(m->path);
        m->path = NULL;
        return -EINVAL;
    }
    m->kind = kind;
    m->flags = flags;
    m->fn = fn;
    m->arg = arg;
    s->n_methods++;
    return 0;
}

/* Started but no thread polls the queue: shuts the server down from here. */
static void srv_down_inline(struct dsv32_rpc_server *s)
{
    grpc_server_shutdown_and_notify(s->srv, s->cq, &s->shutdown_tag);
    grpc_server_cancel_all_calls(s->srv);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->shutdown_tag)
            break;
    }
    grpc_server_destroy(s->srv);
    s->srv = NULL;
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    s->down = true;
}

int dsv32_rpc_server_start(struct dsv32_rpc_server *s, int *ret_port)
{
    if (s->started)
        return -EALREADY;
    grpc_server_credentials *cr = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(s->srv, s->cfg.listen, cr);
    grpc_server_credentials_release(cr);
    if (port == 0) {
        log_error("rpc: cannot listen on %s", s->cfg.listen);
        return -EADDRNOTAVAIL;
    }
    grpc_server_start(s->srv);
    s->started = true;
    int r = pthread_create(&s->thread, NULL, srv_thread, s);
    if (r != 0) {
        srv_down_inline(s);
        return -r;
    }
    s->thread_started = true;
    for (uint32_t i = 0; i < s->n_methods; i++)
        for (int k = 0; k < 2; k++) /* two waiting per method: back-to-back calls never stall */
            srv_arm(s, &s->methods[i]);
    srv_arm(s, NULL);
    log_debug("rpc: serving %u methods on %s (port %d)", s->n_methods, s->cfg.listen, port);
    if (ret_port)
        *ret_port = port;
    return 0;
}

void dsv32_rpc_server_shutdown(struct dsv32_rpc_server *s, int64_t grace_ms)
{
    if (!s->thread_started || s->down)
        return;
    pthread_mutex_lock(&s->mu);
    bool first = !s->shutting_down;
    s->shutting_down = true;
    pthread_mutex_unlock(&s->mu);
    if (first)
        grpc_server_shutdown_and_notify(s->srv, s->cq, &s->shutdown_tag);
    struct timespec ts;
    abstime_after_ms(&ts, grace_ms > 0 ? grace_ms : 0);
    pthread_mutex_lock(&s->mu);
    while (!(s->shutdown_notified && s->n_calls == 0) &&
           pthread_cond_timedwait(&s->cond, &s->mu, &ts) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&s->mu);
    grpc_server_cancel_all_calls(s->srv);
    pthread_mutex_lock(&s->mu);
    int64_t waited_s = 0;
    while (!(s->shutdown_notified && s->n_calls == 0 && s->n_pending == 0)) {
        abstime_after_ms(&ts, 5000);
        if (pthread_cond_timedwait(&s->cond, &s->mu, &ts) == ETIMEDOUT) {
            waited_s += 5;
            log_warn("rpc: shutdown of %s waits for %u calls (%lds): a handler has not finished",
                     s->cfg.listen, s->n_calls, (long)waited_s);
        }
    }
    pthread_mutex_unlock(&s->mu);
    grpc_server_destroy(s->srv);
    s->srv = NULL;
    grpc_completion_queue_shutdown(s->cq);
    pthread_join(s->thread, NULL);
    s->down = true;
}

void dsv32_rpc_server_free(struct dsv32_rpc_server *s)
{
    if (!s)
        return;
    dsv32_rpc_server_shutdown(s, 0);
    if (!s->down) { /* never started: no listener, nothing to shut down */
        grpc_server_destroy(s->srv);
        s->srv = NULL;
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
    }
    grpc_completion_queue_destroy(s->cq);
    for (uint32_t i = 0; i < s->n_methods; i++)
        free(s->methods[i].path);
    free((char *)s->cfg.listen);
    free((char *)s->cfg.admin_token);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cond);
    free(s);
    grpc_shutdown();
}
