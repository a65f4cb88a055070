/* The client half of rpc.h: one channel per client, its completion queue polled by a thread of
 * its own (reconnects go on while nobody calls); unary calls are one batch, streams keep at most
 * one send and one receive in flight and wait on them with timeouts. */
#define _GNU_SOURCE 1
#include "rpc.h"

#include "error.h"
#include "log.h"
#include "rpc_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>

/* ---- Client ------------------------------------------------------------------------------- */

struct dsv32_rpc_client {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    pthread_t thread;
    char *auth; /* "Bearer <token>" or NULL */
    size_t max_send_bytes;
    pthread_mutex_t mu;
    uint32_t n_streams;
};

/* A client call: unary calls use it for one batch, streams for their whole life. */
struct dsv32_rpc_stream {
    struct dsv32_rpc_client *cl;
    grpc_call *call;
    struct tag t_send, t_recv, t_status;
    grpc_metadata send_md[1];
    size_t n_send_md;
    grpc_metadata_array md_initial, md_trailing;
    grpc_byte_buffer *send_bb, *recv_bb;
    grpc_status_code status;
    grpc_slice details;

    pthread_mutex_t mu;
    pthread_cond_t cond;
    int inflight;                 /* batches not completed */
    bool send_busy, send_ok, recv_busy, recv_done, recv_ok, status_done, initial_md_asked;
    bool send_closed, bidi;
    char *method;
};

static void *cli_thread(void *arg)
{
    struct dsv32_rpc_client *c = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        struct tag *t = ev.tag;
        struct dsv32_rpc_stream *s = t->obj;
        pthread_mutex_lock(&s->mu);
        switch (t->kind) {
        case TAG_CLI_SEND:
            s->send_busy = false;
            s->send_ok = ev.success;
            if (s->send_bb) {
                grpc_byte_buffer_destroy(s->send_bb);
                s->send_bb = NULL;
            }
            break;
        case TAG_CLI_RECV:
            s->recv_busy = false;
            s->recv_done = true;
            s->recv_ok = ev.success;
            break;
        case TAG_CLI_STATUS:
            s->status_done = true;
            break;
        default:
            log_error("rpc: unexpected tag %d on a client queue", (int)t->kind);
            break;
        }
        s->inflight--;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

int dsv32_rpc_client_new(const struct dsv32_rpc_client_config *cfg,
                         struct dsv32_rpc_client **ret)
{
    if (!cfg || !cfg->target || !cfg->target[0])
        return -EINVAL;
    size_t max_recv = cfg->max_recv_bytes ? cfg->max_recv_bytes : DSV32_RPC_DEFAULT_MAX_MSG_BYTES;
    size_t max_send = cfg->max_send_bytes ? cfg->max_send_bytes : DSV32_RPC_DEFAULT_MAX_MSG_BYTES;
    if (max_recv > INT32_MAX || max_send > INT32_MAX)
        return -EINVAL;
    int64_t backoff = cfg->max_backoff_ms > 0 ? cfg->max_backoff_ms : 1000;
    int64_t keepalive = cfg->keepalive_ms ? cfg->keepalive_ms : 10000;
    if (backoff > INT32_MAX || keepalive > INT32_MAX)
        return -EINVAL;
    struct dsv32_rpc_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    if (cfg->bearer_token && cfg->bearer_token[0] &&
        asprintf(&c->auth, "Bearer %s", cfg->bearer_token) < 0) {
        free(c);
        return -ENOMEM;
    }
    c->max_send_bytes = max_send;
    pthread_mutex_init(&c->mu, NULL);

    grpc_init();
    grpc_arg args[10];
    memset(args, 0, sizeof(args));
    int n = 0;
#define INT_ARG(k, v)                                                                              \
    do {                                                                                           \
        args[n].type = GRPC_ARG_INTEGER;                                                           \
        args[n].key = (char *)(k);                                                                 \
        args[n].value.integer = (int)(v);                                                          \
        n++;                                                                                       \
    } while (0)
    INT_ARG(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_recv);
    INT_ARG(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max_send);
    /* Reconnect quickly after a peer restarts (the default backoff grows to 120 s). */
    INT_ARG(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, backoff < 100 ? backoff : 100);
    INT_ARG(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, backoff < 100 ? backoff : 100);
    INT_ARG(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, backoff);
    if (keepalive > 0) {
        /* A peer that vanishes without a reset (power loss) is noticed within ~2 pings. */
        INT_ARG(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive);
        INT_ARG(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive / 2 > 1000 ? keepalive / 2 : 1000);
        INT_ARG(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    }
#undef INT_ARG
    grpc_channel_args ca = {.num_args = (size_t)n, .args = args};
    grpc_channel_credentials *cr = grpc_insecure_credentials_create();
    c->ch = grpc_channel_create(cfg->target, cr, &ca);
    grpc_channel_credentials_release(cr);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    int r = pthread_create(&c->thread, NULL, cli_thread, c);
    if (r != 0) {
        grpc_channel_destroy(c->ch);
        grpc_completion_queue_shutdown(c->cq);
        while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(c->cq);
        free(c->auth);
        pthread_mutex_destroy(&c->mu);
        free(c);
        grpc_shutdown();
        return -r;
    }
    *ret = c;
    return 0;
}

void dsv32_rpc_client_free(struct dsv32_rpc_client *c)
{
    if (!c)
        return;
    if (c->n_streams)
        log_error("rpc: client freed with %u calls open", c->n_streams);
    grpc_channel_destroy(c->ch);
    grpc_completion_queue_shutdown(c->cq);
    pthread_join(c->thread, NULL);
    grpc_completion_queue_destroy(c->cq);
    free(c->auth);
    pthread_mutex_destroy(&c->mu);
    free(c);
    grpc_shutdown();
}

static struct dsv32_rpc_stream *cs_new(struct dsv32_rpc_client *cl, const char *method,
                                       int64_t timeout_ms)
{
    struct dsv32_rpc_stream *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->method = strdup(method);
    if (!s->method) {
        free(s);
        return NULL;
    }
    s->cl = cl;
    s->t_send = (struct tag){TAG_CLI_SEND, s};
    s->t_recv = (struct tag){TAG_CLI_RECV, s};
    s->t_status = (struct tag){TAG_CLI_STATUS, s};
    s->status = GRPC_STATUS_UNKNOWN;
    s->details = grpc_empty_slice();
    grpc_metadata_array_init(&s->md_initial);
    grpc_metadata_array_init(&s->md_trailing);
    pthread_mutex_init(&s->mu, NULL);
    cond_init_monotonic(&s->cond);
    grpc_slice m = grpc_slice_from_copied_string(method);
    s->call = grpc_channel_create_call(cl->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cl->cq, m, NULL,
                                       deadline_from_ms(timeout_ms), NULL);
    grpc_slice_unref(m);
    if (cl->auth) {
        s->send_md[0].key = grpc_slice_from_static_string("authorization");
        s->send_md[0].value = grpc_slice_from_copied_string(cl->auth);
        s->n_send_md = 1;
    }
    pthread_mutex_lock(&cl->mu);
    cl->n_streams++;
    pthread_mutex_unlock(&cl->mu);
    return s;
}

static void cs_wait_idle_locked(struct dsv32_rpc_stream *s)
{
    while (s->inflight > 0)
        pthread_cond_wait(&s->cond, &s->mu);
}

static void cs_free(struct dsv32_rpc_stream *s)
{
    pthread_mutex_lock(&s->mu);
    if (!s->status_done)
        grpc_call_cancel(s->call, NULL);
    cs_wait_idle_locked(s);
    pthread_mutex_unlock(&s->mu);
    grpc_call_unref(s->call);
    if (s->send_bb)
        grpc_byte_buffer_destroy(s->send_bb);
    if (s->recv_bb)
        grpc_byte_buffer_destroy(s->recv_bb);
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->md_initial);
    grpc_metadata_array_destroy(&s->md_trailing);
    if (s->n_send_md)
        grpc_slice_unref(s->send_md[0].value);
    struct dsv32_rpc_client *cl = s->cl;
    pthread_mutex_lock(&cl->mu);
    cl->n_streams--;
    pthread_mutex_unlock(&cl->mu);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cond);
    free(s->method);
    free(s);
}

static bool cs_batch(struct dsv32_rpc_stream *s, const grpc_op *ops, size_t n, struct tag *t)
{
    grpc_call_error e = grpc_call_start_batch(s->call, ops, n, t, NULL);
    if (e != GRPC_CALL_OK) {
        log_error("rpc: %s: grpc_call_start_batch failed (%d)", s->method, (int)e);
        return false;
    }
    s->inflight++;
    return true;
}

static void fill_status(const struct dsv32_rpc_stream *s, struct dsv32_rpc_status *st)
{
    if (!st)
        return;
    st->code = s->status_done ? (int)s->status : DSV32_RPC_UNKNOWN;
    size_t n = GRPC_SLICE_LENGTH(s->details);
    if (!s->status_done)
        n = 0;
    if (n >= sizeof(st->message))
        n = sizeof(st->message) - 1;
    memcpy(st->message, GRPC_SLICE_START_PTR(s->details), n);
    st->message[n] = 0;
}

static int err_from_status(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_OK:
        return 0;
    case GRPC_STATUS_DEADLINE_EXCEEDED:
        return DSV32_ETIMEOUT;
    case GRPC_STATUS_CANCELLED:
        return DSV32_ECANCELLED;
    default:
        return DSV32_EGRPC;
    }
}

static uint32_t md_flags(unsigned flags)
{
    return flags & DSV32_RPC_WAIT_FOR_READY
               ? GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                     GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET
               : 0;
}

int dsv32_rpc_unary(struct dsv32_rpc_client *c, const char *method, const void *req,
                    size_t req_len, int64_t timeout_ms, unsigned flags, uint8_t **ret_resp,
                    size_t *ret_len, struct dsv32_rpc_status *st)
{
    if (req_len > c->max_send_bytes)
        return -EMSGSIZE;
    struct dsv32_rpc_stream *s = cs_new(c, method, timeout_ms);
    if (!s)
        return -ENOMEM;
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].flags = md_flags(flags);
    ops[0].data.send_initial_metadata.count = s->n_send_md;
    ops[0].data.send_initial_metadata.metadata = s->n_send_md ? s->send_md : NULL;
    s->send_bb = bb_from(req, req_len);
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trailing;
    ops[5].data.recv_status_on_client.status = &s->status;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    pthread_mutex_lock(&s->mu);
    bool ok = cs_batch(s, ops, 6, &s->t_status);
    if (ok)
        cs_wait_idle_locked(s);
    pthread_mutex_unlock(&s->mu);
    int r;
    if (!ok) {
        r = DSV32_EGRPC;
        if (st) {
            st->code = DSV32_RPC_INTERNAL;
            snprintf(st->message, sizeof(st->message), "cannot start the call");
        }
    } else {
        fill_status(s, st);
        r = err_from_status(s->status);
        if (r == 0 && !s->recv_bb) {
            r = DSV32_EGRPC;
            if (st) {
                st->code = DSV32_RPC_INTERNAL;
                snprintf(st->message, sizeof(st->message), "no response message");
            }
        }
        if (r == 0)
            r = bb_copy(s->recv_bb, ret_resp, ret_len);
    }
    cs_free(s);
    return r;
}

int dsv32_rpc_unary_msg(struct dsv32_rpc_client *c, const char *method,
                        const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
                        int64_t timeout_ms, unsigned flags, ProtobufCMessage **ret_resp,
                        struct dsv32_rpc_status *st)
{
    uint8_t *b, *rb;
    size_t n, rn;
    int r = dsv32_rpc_pack(req, &b, &n);
    if (r < 0)
        return r;
    r = dsv32_rpc_unary(c, method, b, n, timeout_ms, flags, &rb, &rn, st);
    free(b);
    if (r < 0)
        return r;
    ProtobufCMessage *m = protobuf_c_message_unpack(resp_desc, NULL, rn, rb);
    free(rb);
    if (!m)
        return DSV32_EFORMAT;
    *ret_resp = m;
    return 0;
}

int dsv32_rpc_stream_open(struct dsv32_rpc_client *c, const char *method, const void *req,
                          size_t req_len, int64_t timeout_ms, unsigned flags,
                          struct dsv32_rpc_stream **ret)
{
    if ((!req && !(flags & DSV32_RPC_BIDI)) || (req && req_len > c->max_send_bytes))
        return req ? -EMSGSIZE : -EINVAL;
    struct dsv32_rpc_stream *s = cs_new(c, method, timeout_ms);
    if (!s)
        return -ENOMEM;
    s->bidi = flags & DSV32_RPC_BIDI;
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].flags = md_flags(flags);
    ops[n].data.send_initial_metadata.count = s->n_send_md;
    ops[n].data.send_initial_metadata.metadata = s->n_send_md ? s->send_md : NULL;
    n++;
    if (req) {
        s->send_bb = bb_from(req, req_len);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = s->send_bb;
        n++;
    }
    if (!s->bidi) {
        ops[n].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        n++;
        s->send_closed = true;
    }
    grpc_op st;
    memset(&st, 0, sizeof(st));
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &s->md_trailing;
    st.data.recv_status_on_client.status = &s->status;
    st.data.recv_status_on_client.status_details = &s->details;
    pthread_mutex_lock(&s->mu);
    bool ok = cs_batch(s, ops, n, &s->t_send);
    if (ok)
        s->send_busy = true;
    ok = ok && cs_batch(s, &st, 1, &s->t_status);
    pthread_mutex_unlock(&s->mu);
    if (!ok) {
        cs_free(s);
        return DSV32_EGRPC;
    }
    *ret = s;
    return 0;
}

int dsv32_rpc_stream_open_msg(struct dsv32_rpc_client *c, const char *method,
                              const ProtobufCMessage *req, int64_t timeout_ms, unsigned flags,
                              struct dsv32_rpc_stream **ret)
{
    uint8_t *b = NULL;
    size_t n = 0;
    if (req) {
        int r = dsv32_rpc_pack(req, &b, &n);
        if (r < 0)
            return r;
    }
    int r = dsv32_rpc_stream_open(c, method, b, n, timeout_ms, flags, ret);
    free(b);
    return r;
}

/* Under s->mu: waits for the send in flight; false when it failed (the call is over). */
static bool cs_wait_send_locked(struct dsv32_rpc_stream *s)
{
    while (s->send_busy)
        pthread_cond_wait(&s->cond, &s->mu);
    return s->send_ok;
}

int dsv32_rpc_stream_write(struct dsv32_rpc_stream *s, const void *buf, size_t len)
{
    if (!s->bidi || len > s->cl->max_send_bytes)
        return s->bidi ? -EMSGSIZE : -EINVAL;
    pthread_mutex_lock(&s->mu);
    int r = 0;
    if (s->send_closed)
        r = -EPIPE;
    else if (!cs_wait_send_locked(s) || s->status_done)
        r = DSV32_ECANCELLED;
    if (r == 0) {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_SEND_MESSAGE;
        s->send_bb = bb_from(buf, len);
        op.data.send_message.send_message = s->send_bb;
        if (!cs_batch(s, &op, 1, &s->t_send))
            r = DSV32_EGRPC;
        else
            s->send_busy = true;
        if (r == 0 && !cs_wait_send_locked(s))
            r = DSV32_ECANCELLED;
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

int dsv32_rpc_stream_write_msg(struct dsv32_rpc_stream *s, const ProtobufCMessage *m)
{
    uint8_t *b;
    size_t n;
    int r = dsv32_rpc_pack(m, &b, &n);
    if (r < 0)
        return r;
    r = dsv32_rpc_stream_write(s, b, n);
    free(b);
    return r;
}

int dsv32_rpc_stream_close_send(struct dsv32_rpc_stream *s)
{
    pthread_mutex_lock(&s->mu);
    int r = 0;
    if (!s->send_closed) {
        if (!cs_wait_send_locked(s) || s->status_done) {
            r = DSV32_ECANCELLED;
        } else {
            grpc_op op;
            memset(&op, 0, sizeof(op));
            op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
            if (!cs_batch(s, &op, 1, &s->t_send))
                r = DSV32_EGRPC;
            else
                s->send_busy = true;
        }
        s->send_closed = true;
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

int dsv32_rpc_stream_read(struct dsv32_rpc_stream *s, int64_t timeout_ms, uint8_t **ret_buf,
                          size_t *ret_len)
{
    struct timespec ts;
    if (timeout_ms >= 0)
        abstime_after_ms(&ts, timeout_ms);
    pthread_mutex_lock(&s->mu);
    int r;
    if (!s->recv_busy && !s->recv_done) {
        grpc_op ops[2];
        size_t n = 0;
        memset(ops, 0, sizeof(ops));
        /* grpc-go servers (etcd) send their headers with the first message: ask for both. */
        if (!s->initial_md_asked) {
            ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[n].data.recv_initial_metadata.recv_initial_metadata = &s->md_initial;
            n++;
        }
        ops[n].op = GRPC_OP_RECV_MESSAGE;
        ops[n].data.recv_message.recv_message = &s->recv_bb;
        n++;
        if (!cs_batch(s, ops, n, &s->t_recv)) {
            pthread_mutex_unlock(&s->mu);
            return DSV32_EGRPC;
        }
        s->initial_md_asked = true;
        s->recv_busy = true;
    }
    while (s->recv_busy) {
        if (cond_wait_until(&s->cond, &s->mu, timeout_ms >= 0 ? &ts : NULL) == ETIMEDOUT &&
            s->recv_busy) {
            pthread_mutex_unlock(&s->mu);
            return -EAGAIN;
        }
    }
    s->recv_done = false;
    if (s->recv_bb) {
        r = bb_copy(s->recv_bb, ret_buf, ret_len);
        grpc_byte_buffer_destroy(s->recv_bb);
        s->recv_bb = NULL;
        if (r == 0)
            r = 1;
    } else {
        /* The end: the status follows (or came already). */
        while (!s->status_done)
            pthread_cond_wait(&s->cond, &s->mu);
        r = err_from_status(s->status);
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

int dsv32_rpc_stream_read_msg(struct dsv32_rpc_stream *s, const ProtobufCMessageDescriptor *desc,
                              int64_t timeout_ms, ProtobufCMessage **ret)
{
    uint8_t *b;
    size_t n;
    int r = dsv32_rpc_stream_read(s, timeout_ms, &b, &n);
    if (r <= 0)
        return r;
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, n, b);
    free(b);
    if (!m)
        return DSV32_EFORMAT;
    *ret = m;
    return 1;
}

void dsv32_rpc_stream_status(struct dsv32_rpc_stream *s, struct dsv32_rpc_status *st)
{
    pthread_mutex_lock(&s->mu);
    fill_status(s, st);
    pthread_mutex_unlock(&s->mu);
}

void dsv32_rpc_stream_cancel(struct dsv32_rpc_stream *s) { grpc_call_cancel(s->call, NULL); }

void dsv32_rpc_stream_free(struct dsv32_rpc_stream *s)
{
    if (s)
        cs_free(s);
}
