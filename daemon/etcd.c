/* etcd.h over rpc.h: requests are etcd.proto messages sent with wait-for-ready and a deadline;
 * keepers and watches each run a thread that retries with a capped backoff until etcd answers. */
#define _GNU_SOURCE 1
#include "etcd.h"

#include "error.h"
#include "log.h"
#include "rpc.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "etcd.pb-c.h"

#define M_RANGE "/etcdserverpb.KV/Range"
#define M_PUT "/etcdserverpb.KV/Put"
#define M_DELETE "/etcdserverpb.KV/DeleteRange"
#define M_TXN "/etcdserverpb.KV/Txn"
#define M_COMPACT "/etcdserverpb.KV/Compact"
#define M_WATCH "/etcdserverpb.Watch/Watch"
#define M_GRANT "/etcdserverpb.Lease/LeaseGrant"
#define M_REVOKE "/etcdserverpb.Lease/LeaseRevoke"
#define M_KEEPALIVE "/etcdserverpb.Lease/LeaseKeepAlive"
#define M_TTL "/etcdserverpb.Lease/LeaseTimeToLive"

#define MAX_KEY_BYTES 4096
#define MAX_TTL_S 3600
#define RETRY_MIN_MS 100

struct dsv32_etcd {
    struct dsv32_rpc_client *rpc;
    int64_t timeout_ms;
    int64_t max_backoff_ms;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void abstime_at_ms(struct timespec *ts, int64_t at_ms)
{
    ts->tv_sec = at_ms / 1000;
    ts->tv_nsec = (long)(at_ms % 1000) * 1000000L;
}

static void cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

/* Waits on cv until *stop or at_ms passes. */
static void sleep_until(pthread_cond_t *cv, pthread_mutex_t *mu, const bool *stop, int64_t at_ms)
{
    struct timespec ts;
    abstime_at_ms(&ts, at_ms);
    while (!*stop && pthread_cond_timedwait(cv, mu, &ts) != ETIMEDOUT) {
    }
}

int dsv32_etcd_new(const struct dsv32_etcd_config *cfg, struct dsv32_etcd **ret)
{
    if (!cfg || !cfg->endpoint || !cfg->endpoint[0])
        return -EINVAL;
    struct dsv32_etcd *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 5000;
    e->max_backoff_ms = cfg->max_backoff_ms > 0 ? cfg->max_backoff_ms : 1000;
    struct dsv32_rpc_client_config rc = {
        .target = cfg->endpoint,
        .max_recv_bytes = cfg->max_recv_bytes ? cfg->max_recv_bytes : (64u << 20),
        .max_send_bytes = 8u << 20, /* etcd's own request limit is 1.5 MiB */
        .max_backoff_ms = e->max_backoff_ms,
    };
    int r = dsv32_rpc_client_new(&rc, &e->rpc);
    if (r < 0) {
        free(e);
        return r;
    }
    *ret = e;
    return 0;
}

void dsv32_etcd_free(struct dsv32_etcd *e)
{
    if (!e)
        return;
    dsv32_rpc_client_free(e->rpc);
    free(e);
}

/* Maps a failed call: NOT_FOUND (lease not found) -> -ENOENT, INVALID_ARGUMENT -> -EINVAL,
 * DEADLINE_EXCEEDED -> -DSV32_ETIMEOUT, the rest -> -DSV32_EETCD. */
static int map_status(const char *method, int r, const struct dsv32_rpc_status *st)
{
    if (r == DSV32_ETIMEOUT)
        return DSV32_ETIMEOUT;
    switch (st->code) {
    case DSV32_RPC_NOT_FOUND:
        return -ENOENT;
    case DSV32_RPC_INVALID_ARGUMENT:
        log_warn("etcd: %s: %s", method, st->message);
        return -EINVAL;
    case DSV32_RPC_UNAVAILABLE:
    case DSV32_RPC_CANCELLED:
        log_debug("etcd: %s: %s %s", method, dsv32_rpc_code_name(st->code), st->message);
        return DSV32_EETCD;
    default:
        log_warn("etcd: %s: %s %s", method, dsv32_rpc_code_name(st->code), st->message);
        return r == DSV32_EFORMAT ? DSV32_EFORMAT : DSV32_EETCD;
    }
}

static int call_ex(struct dsv32_etcd *e, const char *method, const ProtobufCMessage *req,
                   const ProtobufCMessageDescriptor *desc, ProtobufCMessage **ret,
                   int64_t timeout, bool retry)
{
    int64_t end = now_ms() + (timeout > 0 ? timeout : e->timeout_ms);
    for (;;) {
        struct dsv32_rpc_status st = {0};
        int64_t left = end - now_ms();
        if (left < 1)
            left = 1;
        int r = dsv32_rpc_unary_msg(e->rpc, method, req, desc, left, DSV32_RPC_WAIT_FOR_READY, ret,
                                    &st);
        if (r == 0)
            return 0;
        /* A connection that broke under the call (etcd killed) fails it with UNAVAILABLE even
         * with wait-for-ready. Reads are safe to repeat; for writes the outcome is unknown. */
        if (retry && st.code == DSV32_RPC_UNAVAILABLE && now_ms() + 50 < end) {
            usleep(50000);
            continue;
        }
        return map_status(method, r, &st);
    }
}

static int call(struct dsv32_etcd *e, const char *method, const ProtobufCMessage *req,
                const ProtobufCMessageDescriptor *desc, ProtobufCMessage **ret, int64_t timeout)
{
    return call_ex(e, method, req, desc, ret, timeout, false);
}

static int check_key(const char *key)
{
    return key && key[0] && strlen(key) < MAX_KEY_BYTES ? 0 : -EINVAL;
}

static ProtobufCBinaryData bin(const void *p, size_t n)
{
    return (ProtobufCBinaryData){.len = n, .data = (uint8_t *)p};
}

/* The range_end that covers every key starting with key (in buf, at least strlen(key) bytes). */
static ProtobufCBinaryData prefix_end(const char *key, uint8_t *buf)
{
    size_t n = strlen(key);
    memcpy(buf, key, n);
    while (n > 0) {
        if (buf[n - 1] < 0xff) {
            buf[n - 1]++;
            return bin(buf, n);
        }
        n--;
    }
    buf[0] = 0; /* all 0xff: every key >= key */
    return bin(buf, 1);
}

void dsv32_etcd_kv_done(struct dsv32_etcd_kv *kv)
{
    if (!kv)
        return;
    free(kv->key);
    free(kv->value);
    memset(kv, 0, sizeof(*kv));
}

void dsv32_etcd_range_done(struct dsv32_etcd_range *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n; i++)
        dsv32_etcd_kv_done(&r->kvs[i]);
    free(r->kvs);
    memset(r, 0, sizeof(*r));
}

static int kv_copy(const Etcdserverpb__KeyValue *src, struct dsv32_etcd_kv *dst)
{
    memset(dst, 0, sizeof(*dst));
    if (!src)
        return 0;
    dst->key = malloc(src->key.len + 1);
    dst->value = malloc(src->value.len + 1);
    if (!dst->key || !dst->value) {
        dsv32_etcd_kv_done(dst);
        return -ENOMEM;
    }
    if (src->key.len)
        memcpy(dst->key, src->key.data, src->key.len);
    dst->key[src->key.len] = 0;
    if (src->value.len)
        memcpy(dst->value, src->value.data, src->value.len);
    dst->value[src->value.len] = 0;
    dst->value_len = src->value.len;
    dst->create_revision = src->create_revision;
    dst->mod_revision = src->mod_revision;
    dst->version = src->version;
    dst->lease = src->lease;
    return 0;
}

static int range_copy(const Etcdserverpb__RangeResponse *resp, struct dsv32_etcd_range *out)
{
    memset(out, 0, sizeof(*out));
    out->revision = resp->header ? resp->header->revision : 0;
    out->count = resp->count;
    out->more = resp->more;
    if (resp->n_kvs == 0)
        return 0;
    out->kvs = calloc(resp->n_kvs, sizeof(*out->kvs));
    if (!out->kvs)
        return -ENOMEM;
    for (size_t i = 0; i < resp->n_kvs; i++) {
        int r = kv_copy(resp->kvs[i], &out->kvs[i]);
        if (r < 0) {
            dsv32_etcd_range_done(out);
            return r;
        }
        out->n = i + 1;
    }
    return 0;
}

static void fill_range_req(Etcdserverpb__RangeRequest *rq, const char *key, unsigned flags,
                           int64_t limit, uint8_t *end_buf)
{
    rq->key = bin(key, strlen(key));
    if (flags & DSV32_ETCD_PREFIX)
        rq->range_end = prefix_end(key, end_buf);
    rq->limit = limit;
}

int dsv32_etcd_range(struct dsv32_etcd *e, const char *key, unsigned flags, int64_t limit,
                     struct dsv32_etcd_range *ret)
{
    if (check_key(key) < 0 || limit < 0)
        return -EINVAL;
    uint8_t end[MAX_KEY_BYTES];
    Etcdserverpb__RangeRequest rq = ETCDSERVERPB__RANGE_REQUEST__INIT;
    fill_range_req(&rq, key, flags, limit, end);
    ProtobufCMessage *m;
    int r = call_ex(e, M_RANGE, &rq.base, &etcdserverpb__range_response__descriptor, &m, 0, true);
    if (r < 0)
        return r;
    struct dsv32_etcd_range out;
    r = range_copy((Etcdserverpb__RangeResponse *)m, &out);
    protobuf_c_message_free_unpacked(m, NULL);
    if (r < 0)
        return r;
    *ret = out;
    return 0;
}

int dsv32_etcd_get(struct dsv32_etcd *e, const char *key, struct dsv32_etcd_kv *ret_kv,
                   int64_t *ret_revision)
{
    struct dsv32_etcd_range rg;
    int r = dsv32_etcd_range(e, key, 0, 1, &rg);
    if (r < 0)
        return r;
    if (rg.n == 0) {
        dsv32_etcd_range_done(&rg);
        return -ENOENT;
    }
    if (ret_revision)
        *ret_revision = rg.revision;
    if (ret_kv) {
        *ret_kv = rg.kvs[0];
        memset(&rg.kvs[0], 0, sizeof(rg.kvs[0]));
    }
    dsv32_etcd_range_done(&rg);
    return 0;
}

int dsv32_etcd_put(struct dsv32_etcd *e, const char *key, const void *value, size_t value_len,
                   int64_t lease, int64_t *ret_revision)
{
    if (check_key(key) < 0 || (!value && value_len))
        return -EINVAL;
    Etcdserverpb__PutRequest rq = ETCDSERVERPB__PUT_REQUEST__INIT;
    rq.key = bin(key, strlen(key));
    rq.value = bin(value, value_len);
    rq.lease = lease;
    ProtobufCMessage *m;
    int r = call(e, M_PUT, &rq.base, &etcdserverpb__put_response__descriptor, &m, 0);
    if (r < 0)
        return r;
    Etcdserverpb__PutResponse *resp = (Etcdserverpb__PutResponse *)m;
    if (ret_revision)
        *ret_revision = resp->header ? resp->header->revision : 0;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int dsv32_etcd_create(struct dsv32_etcd *e, const char *key, const void *value, size_t value_len,
                      int64_t lease, int64_t *ret_revision)
{
    struct dsv32_etcd_cmp cmp = {
        .key = key, .target = DSV32_ETCD_CMP_CREATE, .result = DSV32_ETCD_EQUAL, .number = 0};
    struct dsv32_etcd_op put = {.type = DSV32_ETCD_OP_PUT,
                                .key = key,
                                .value = value,
                                .value_len = value_len,
                                .lease = lease};
    struct dsv32_etcd_txn_result res;
    int r = dsv32_etcd_txn(e, &cmp, 1, &put, 1, NULL, 0, &res);
    if (r < 0)
        return r;
    bool ok = res.succeeded;
    int64_t rev = res.revision;
    dsv32_etcd_txn_result_done(&res);
    if (!ok)
        return -EEXIST;
    if (ret_revision)
        *ret_revision = rev;
    return 0;
}

int dsv32_etcd_delete(struct dsv32_etcd *e, const char *key, unsigned flags,
                      int64_t *ret_deleted)
{
    if (check_key(key) < 0)
        return -EINVAL;
    uint8_t end[MAX_KEY_BYTES];
    Etcdserverpb__DeleteRangeRequest rq = ETCDSERVERPB__DELETE_RANGE_REQUEST__INIT;
    rq.key = bin(key, strlen(key));
    if (flags & DSV32_ETCD_PREFIX)
        rq.range_end = prefix_end(key, end);
    ProtobufCMessage *m;
    int r = call(e, M_DELETE, &rq.base, &etcdserverpb__delete_range_response__descriptor, &m, 0);
    if (r < 0)
        return r;
    if (ret_deleted)
        *ret_deleted = ((Etcdserverpb__DeleteRangeResponse *)m)->deleted;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int dsv32_etcd_compact(struct dsv32_etcd *e, int64_t revision)
{
    Etcdserverpb__CompactionRequest rq = ETCDSERVERPB__COMPACTION_REQUEST__INIT;
    rq.revision = revision;
    rq.physical = true;
    ProtobufCMessage *m;
    int r = call(e, M_COMPACT, &rq.base, &etcdserverpb__compaction_response__descriptor, &m, 0);
    if (r < 0)
        return r;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

/* ---- Transactions ---- */

/* Storage for one txn request: every protobuf-c struct lives here, none on the heap. */
struct txn_build {
    Etcdserverpb__Compare cmps[DSV32_ETCD_MAX_TXN_OPS];
    Etcdserverpb__Compare *cmp_ptrs[DSV32_ETCD_MAX_TXN_OPS];
    Etcdserverpb__RequestOp ops[2][DSV32_ETCD_MAX_TXN_OPS];
    Etcdserverpb__RequestOp *op_ptrs[2][DSV32_ETCD_MAX_TXN_OPS];
    union {
        Etcdserverpb__RangeRequest range;
        Etcdserverpb__PutRequest put;
        Etcdserverpb__DeleteRangeRequest del;
    } reqs[2][DSV32_ETCD_MAX_TXN_OPS];
    uint8_t *ends[2][DSV32_ETCD_MAX_TXN_OPS];
};

static int build_ops(struct txn_build *b, int side, const struct dsv32_etcd_op *ops, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct dsv32_etcd_op *o = &ops[i];
        Etcdserverpb__RequestOp *ro = &b->ops[side][i];
        etcdserverpb__request_op__init(ro);
        b->op_ptrs[side][i] = ro;
        if (check_key(o->key) < 0 || (!o->value && o->value_len))
            return -EINVAL;
        if (o->flags & DSV32_ETCD_PREFIX) {
            b->ends[side][i] = malloc(strlen(o->key) + 1);
            if (!b->ends[side][i])
                return -ENOMEM;
        }
        switch (o->type) {
        case DSV32_ETCD_OP_GET: {
            Etcdserverpb__RangeRequest *rq = &b->reqs[side][i].range;
            etcdserverpb__range_request__init(rq);
            fill_range_req(rq, o->key, o->flags, 0, b->ends[side][i]);
            ro->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_RANGE;
            ro->request_range = rq;
            break;
        }
        case DSV32_ETCD_OP_PUT: {
            Etcdserverpb__PutRequest *rq = &b->reqs[side][i].put;
            etcdserverpb__put_request__init(rq);
            rq->key = bin(o->key, strlen(o->key));
            rq->value = bin(o->value, o->value_len);
            rq->lease = o->lease;
            ro->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_PUT;
            ro->request_put = rq;
            break;
        }
        case DSV32_ETCD_OP_DELETE: {
            Etcdserverpb__DeleteRangeRequest *rq = &b->reqs[side][i].del;
            etcdserverpb__delete_range_request__init(rq);
            rq->key = bin(o->key, strlen(o->key));
            if (o->flags & DSV32_ETCD_PREFIX)
                rq->range_end = prefix_end(o->key, b->ends[side][i]);
            ro->request_case = ETCDSERVERPB__REQUEST_OP__REQUEST_REQUEST_DELETE_RANGE;
            ro->request_delete_range = rq;
            break;
        }
        default:
            return -EINVAL;
        }
    }
    return 0;
}

static int build_cmp(Etcdserverpb__Compare *c, const struct dsv32_etcd_cmp *in)
{
    etcdserverpb__compare__init(c);
    if (check_key(in->key) < 0 || in->result > DSV32_ETCD_NOT_EQUAL)
        return -EINVAL;
    c->key = bin(in->key, strlen(in->key));
    c->result = (Etcdserverpb__Compare__CompareResult)in->result;
    switch (in->target) {
    case DSV32_ETCD_CMP_VERSION:
        c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__VERSION;
        c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VERSION;
        c->version = in->number;
        break;
    case DSV32_ETCD_CMP_CREATE:
        c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__CREATE;
        c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_CREATE_REVISION;
        c->create_revision = in->number;
        break;
    case DSV32_ETCD_CMP_MOD:
        c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__MOD;
        c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_MOD_REVISION;
        c->mod_revision = in->number;
        break;
    case DSV32_ETCD_CMP_VALUE:
        if (!in->value && in->value_len)
            return -EINVAL;
        c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__VALUE;
        c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_VALUE;
        c->value = bin(in->value, in->value_len);
        break;
    case DSV32_ETCD_CMP_LEASE:
        c->target = ETCDSERVERPB__COMPARE__COMPARE_TARGET__LEASE;
        c->target_union_case = ETCDSERVERPB__COMPARE__TARGET_UNION_LEASE;
        c->lease = in->number;
        break;
    default:
        return -EINVAL;
    }
    return 0;
}

static int txn_result(const Etcdserverpb__TxnResponse *resp, struct dsv32_etcd_txn_result *out)
{
    memset(out, 0, sizeof(*out));
    out->succeeded = resp->succeeded;
    out->revision = resp->header ? resp->header->revision : 0;
    size_t n = 0;
    for (size_t i = 0; i < resp->n_responses; i++)
        if (resp->responses[i]->response_case == ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_RANGE)
            n++;
    if (n == 0)
        return 0;
    out->ranges = calloc(n, sizeof(*out->ranges));
    if (!out->ranges)
        return -ENOMEM;
    for (size_t i = 0; i < resp->n_responses; i++) {
        const Etcdserverpb__ResponseOp *ro = resp->responses[i];
        if (ro->response_case != ETCDSERVERPB__RESPONSE_OP__RESPONSE_RESPONSE_RANGE)
            continue;
        int r = range_copy(ro->response_range, &out->ranges[out->n_ranges]);
        if (r < 0) {
            dsv32_etcd_txn_result_done(out);
            return r;
        }
        out->n_ranges++;
    }
    return 0;
}

int dsv32_etcd_txn(struct dsv32_etcd *e, const struct dsv32_etcd_cmp *cmp, size_t n_cmp,
                   const struct dsv32_etcd_op *then, size_t n_then,
                   const struct dsv32_etcd_op *otherwise, size_t n_otherwise,
                   struct dsv32_etcd_txn_result *ret)
{
    if (n_cmp > DSV32_ETCD_MAX_TXN_OPS || n_then > DSV32_ETCD_MAX_TXN_OPS ||
        n_otherwise > DSV32_ETCD_MAX_TXN_OPS)
        return -E2BIG;
    struct txn_build *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    Etcdserverpb__TxnRequest rq = ETCDSERVERPB__TXN_REQUEST__INIT;
    int r = 0;
    for (size_t i = 0; i < n_cmp && r == 0; i++) {
        r = build_cmp(&b->cmps[i], &cmp[i]);
        b->cmp_ptrs[i] = &b->cmps[i];
    }
    if (r == 0)
        r = build_ops(b, 0, then, n_then);
    if (r == 0)
        r = build_ops(b, 1, otherwise, n_otherwise);
    if (r == 0) {
        rq.n_compare = n_cmp;
        rq.compare = b->cmp_ptrs;
        rq.n_success = n_then;
        rq.success = b->op_ptrs[0];
        rq.n_failure = n_otherwise;
        rq.failure = b->op_ptrs[1];
        ProtobufCMessage *m;
        r = call(e, M_TXN, &rq.base, &etcdserverpb__txn_response__descriptor, &m, 0);
        if (r == 0) {
            struct dsv32_etcd_txn_result out;
            r = txn_result((Etcdserverpb__TxnResponse *)m, &out);
            protobuf_c_message_free_unpacked(m, NULL);
            if (r == 0)
                *ret = out;
        }
    }
    for (int s = 0; s < 2; s++)
        for (size_t i = 0; i < DSV32_ETCD_MAX_TXN_OPS; i++)
            free(b->ends[s][i]);
    free(b);
    return r;
}

void dsv32_etcd_txn_result_done(struct dsv32_etcd_txn_result *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n_ranges; i++)
        dsv32_etcd_range_done(&r->ranges[i]);
    free(r->ranges);
    memset(r, 0, sizeof(*r));
}

/* ---- Leases ---- */

static int lease_grant(struct dsv32_etcd *e, int64_t ttl_s, int64_t timeout_ms, int64_t *ret_id,
                       int64_t *ret_ttl_s)
{
    if (ttl_s < 1 || ttl_s > MAX_TTL_S)
        return -EINVAL;
    Etcdserverpb__LeaseGrantRequest rq = ETCDSERVERPB__LEASE_GRANT_REQUEST__INIT;
    rq.ttl = ttl_s;
    ProtobufCMessage *m;
    int r = call(e, M_GRANT, &rq.base, &etcdserverpb__lease_grant_response__descriptor, &m,
                 timeout_ms);
    if (r < 0)
        return r;
    Etcdserverpb__LeaseGrantResponse *resp = (Etcdserverpb__LeaseGrantResponse *)m;
    if (resp->error && resp->error[0]) {
        log_warn("etcd: lease grant: %s", resp->error);
        r = DSV32_EETCD;
    } else {
        *ret_id = resp->id;
        if (ret_ttl_s)
            *ret_ttl_s = resp->ttl;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return r;
}

int dsv32_etcd_lease_grant(struct dsv32_etcd *e, int64_t ttl_s, int64_t *ret_id,
                           int64_t *ret_ttl_s)
{
    return lease_grant(e, ttl_s, 0, ret_id, ret_ttl_s);
}

int dsv32_etcd_lease_revoke(struct dsv32_etcd *e, int64_t id)
{
    Etcdserverpb__LeaseRevokeRequest rq = ETCDSERVERPB__LEASE_REVOKE_REQUEST__INIT;
    rq.id = id;
    ProtobufCMessage *m;
    int r = call(e, M_REVOKE, &rq.base, &etcdserverpb__lease_revoke_response__descriptor, &m, 0);
    if (r < 0)
        return r;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

int dsv32_etcd_lease_ttl(struct dsv32_etcd *e, int64_t id, int64_t *ret_ttl_s,
                         int64_t *ret_granted_s)
{
    Etcdserverpb__LeaseTimeToLiveRequest rq = ETCDSERVERPB__LEASE_TIME_TO_LIVE_REQUEST__INIT;
    rq.id = id;
    ProtobufCMessage *m;
    int r = call_ex(e, M_TTL, &rq.base, &etcdserverpb__lease_time_to_live_response__descriptor,
                    &m, 0, true);
    if (r < 0)
        return r;
    Etcdserverpb__LeaseTimeToLiveResponse *resp = (Etcdserverpb__LeaseTimeToLiveResponse *)m;
    if (resp->ttl < 0) { /* etcd answers -1 for an expired or unknown lease */
        r = -ENOENT;
    } else {
        if (ret_ttl_s)
            *ret_ttl_s = resp->ttl;
        if (ret_granted_s)
            *ret_granted_s = resp->grantedttl;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return r;
}

/* One keepalive over a LeaseKeepAlive stream: the request, the answer, done. etcd ends the stream
 * after a half-close, so one stream per refresh is simple and survives reconnects for free. */
static int keepalive_once(struct dsv32_etcd *e, int64_t id, int64_t timeout_ms,
                          int64_t *ret_ttl_s)
{
    Etcdserverpb__LeaseKeepAliveRequest rq = ETCDSERVERPB__LEASE_KEEP_ALIVE_REQUEST__INIT;
    rq.id = id;
    struct dsv32_rpc_stream *s;
    int r = dsv32_rpc_stream_open_msg(e->rpc, M_KEEPALIVE, &rq.base, timeout_ms,
                                      DSV32_RPC_WAIT_FOR_READY, &s);
    if (r < 0)
        return r;
    ProtobufCMessage *m = NULL;
    r = dsv32_rpc_stream_read_msg(s, &etcdserverpb__lease_keep_alive_response__descriptor, -1, &m);
    if (r == 1) {
        int64_t ttl = ((Etcdserverpb__LeaseKeepAliveResponse *)m)->ttl;
        protobuf_c_message_free_unpacked(m, NULL);
        r = 0;
        if (ttl <= 0)
            r = -ENOENT; /* etcd answers TTL 0 for a lease it does not know */
        else
            *ret_ttl_s = ttl;
    } else {
        struct dsv32_rpc_status st;
        dsv32_rpc_stream_status(s, &st);
        r = r == 0 ? DSV32_EETCD : map_status(M_KEEPALIVE, r, &st);
    }
    dsv32_rpc_stream_free(s);
    return r;
}

int dsv32_etcd_lease_keepalive(struct dsv32_etcd *e, int64_t id, int64_t *ret_ttl_s)
{
    int64_t ttl;
    int r = keepalive_once(e, id, e->timeout_ms, &ttl);
    if (r == 0)
        *ret_ttl_s = ttl;
    return r;
}

struct dsv32_etcd_keeper {
    struct dsv32_etcd *e;
    int64_t ttl_s;
    dsv32_etcd_lease_fn fn;
    void *arg;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    int64_t lease; /* under mu */
};

static void keeper_set(struct dsv32_etcd_keeper *k, int64_t lease)
{
    pthread_mutex_lock(&k->mu);
    k->lease = lease;
    pthread_cond_broadcast(&k->cond);
    pthread_mutex_unlock(&k->mu);
}

static void *keeper_thread(void *arg)
{
    struct dsv32_etcd_keeper *k = arg;
    /* Each attempt may take until the next one is due (at least a second), so that a stop
     * request waits for one attempt at most. */
    int64_t ttl_ms = k->ttl_s * 1000, period = ttl_ms / 3;
    int64_t attempt_ms = period > 1000 ? period : 1000;
    int64_t lease = 0, last_ok = 0, next = now_ms();
    int64_t backoff = RETRY_MIN_MS;
    bool uncertain = false;
    pthread_mutex_lock(&k->mu);
    while (!k->stop) {
        sleep_until(&k->cond, &k->mu, &k->stop, next);
        if (k->stop)
            break;
        pthread_mutex_unlock(&k->mu);
        int64_t t0 = now_ms();
        if (lease == 0) {
            int64_t id, granted;
            int r = lease_grant(k->e, k->ttl_s, attempt_ms, &id, &granted);
            if (r == 0) {
                lease = id;
                last_ok = t0;
                uncertain = false;
                backoff = RETRY_MIN_MS;
                log_debug("etcd: lease %lx granted (%llds)", (unsigned long)id, (long long)granted);
                if (k->fn) /* before keeper_wait returns it: the owner has seen it first */
                    k->fn(k->arg, DSV32_ETCD_LEASE_GRANTED, id);
                keeper_set(k, id);
                next = t0 + period;
            } else {
                next = now_ms() + backoff;
                backoff = backoff * 2 < k->e->max_backoff_ms ? backoff * 2 : k->e->max_backoff_ms;
            }
        } else {
            int64_t ttl;
            int r = keepalive_once(k->e, lease, attempt_ms, &ttl);
            if (r == 0) {
                last_ok = t0;
                backoff = RETRY_MIN_MS;
                if (uncertain) {
                    uncertain = false;
                    log_info("etcd: lease %lx confirmed alive", (unsigned long)lease);
                    if (k->fn)
                        k->fn(k->arg, DSV32_ETCD_LEASE_CONFIRMED, lease);
                }
                next = t0 + period;
            } else if (r == -ENOENT) {
                log_warn("etcd: lease %lx is gone; granting a new one", (unsigned long)lease);
                int64_t old = lease;
                lease = 0;
                keeper_set(k, 0);
                if (k->fn)
                    k->fn(k->arg, DSV32_ETCD_LEASE_LOST, old);
                next = now_ms();
            } else {
                if (!uncertain && now_ms() - last_ok >= ttl_ms) {
                    uncertain = true;
                    log_warn("etcd: lease %lx not refreshed for %llds", (unsigned long)lease,
                             (long long)k->ttl_s);
                    if (k->fn)
                        k->fn(k->arg, DSV32_ETCD_LEASE_UNCERTAIN, lease);
                }
                next = now_ms() + backoff;
                backoff = backoff * 2 < k->e->max_backoff_ms ? backoff * 2 : k->e->max_backoff_ms;
            }
        }
        pthread_mutex_lock(&k->mu);
    }
    pthread_mutex_unlock(&k->mu);
    return NULL;
}

int dsv32_etcd_keeper_new(struct dsv32_etcd *e, int64_t ttl_s, dsv32_etcd_lease_fn fn, void *arg,
                          struct dsv32_etcd_keeper **ret)
{
    if (ttl_s < 1 || ttl_s > MAX_TTL_S)
        return -EINVAL;
    struct dsv32_etcd_keeper *k = calloc(1, sizeof(*k));
    if (!k)
        return -ENOMEM;
    k->e = e;
    k->ttl_s = ttl_s;
    k->fn = fn;
    k->arg = arg;
    pthread_mutex_init(&k->mu, NULL);
    cond_init_monotonic(&k->cond);
    int r = pthread_create(&k->thread, NULL, keeper_thread, k);
    if (r != 0) {
        pthread_mutex_destroy(&k->mu);
        pthread_cond_destroy(&k->cond);
        free(k);
        return -r;
    }
    *ret = k;
    return 0;
}

int64_t dsv32_etcd_keeper_lease(struct dsv32_etcd_keeper *k)
{
    pthread_mutex_lock(&k->mu);
    int64_t l = k->lease;
    pthread_mutex_unlock(&k->mu);
    return l;
}

int64_t dsv32_etcd_keeper_wait(struct dsv32_etcd_keeper *k, int64_t timeout_ms)
{
    int64_t end = timeout_ms < 0 ? INT64_MAX : now_ms() + timeout_ms;
    struct timespec ts;
    abstime_at_ms(&ts, end == INT64_MAX ? now_ms() + 365LL * 86400 * 1000 : end);
    pthread_mutex_lock(&k->mu);
    while (k->lease == 0 && !k->stop &&
           pthread_cond_timedwait(&k->cond, &k->mu, &ts) != ETIMEDOUT) {
    }
    int64_t l = k->lease;
    pthread_mutex_unlock(&k->mu);
    return l ? l : DSV32_ETIMEOUT;
}

void dsv32_etcd_keeper_free(struct dsv32_etcd_keeper *k, bool revoke)
{
    if (!k)
        return;
    pthread_mutex_lock(&k->mu);
    k->stop = true;
    pthread_cond_broadcast(&k->cond);
    pthread_mutex_unlock(&k->mu);
    pthread_join(k->thread, NULL);
    if (revoke && k->lease) {
        int r = dsv32_etcd_lease_revoke(k->e, k->lease);
        if (r < 0 && r != -ENOENT)
            log_warn("etcd: cannot revoke lease %lx: %s", (unsigned long)k->lease,
                     dsv32_strerror(r));
    }
    pthread_mutex_destroy(&k->mu);
    pthread_cond_destroy(&k->cond);
    free(k);
}

/* ---- Watches ---- */

struct dsv32_etcd_watch {
    struct dsv32_etcd *e;
    char *key;
    unsigned flags;
    dsv32_etcd_watch_fn fn;
    void *arg;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    struct dsv32_rpc_stream *stream; /* under mu: the open stream, cancelled by free */
    _Atomic int64_t last_rev;
    _Atomic uint64_t reconnects;
    int64_t next_rev; /* start_revision of the next stream (0: now) */
    bool need_snapshot;
    uint64_t cluster_id; /* of the etcd the revisions belong to (0: not known yet) */
};

static void deliver(struct dsv32_etcd_watch *w, const struct dsv32_etcd_event *ev, size_t n,
                    int64_t rev, bool reset)
{
    struct dsv32_etcd_watch_batch b = {.events = ev, .n = n, .revision = rev, .reset = reset};
    w->fn(w->arg, &b);
    atomic_store(&w->last_rev, rev);
    w->next_rev = rev + 1;
}

/* The current range as one reset batch. */
static int watch_snapshot(struct dsv32_etcd_watch *w)
{
    struct dsv32_etcd_range rg;
    int r = dsv32_etcd_range(w->e, w->key, w->flags & DSV32_ETCD_PREFIX, 0, &rg);
    if (r < 0)
        return r;
    struct dsv32_etcd_event *ev = rg.n ? calloc(rg.n, sizeof(*ev)) : NULL;
    if (rg.n && !ev) {
        dsv32_etcd_range_done(&rg);
        return -ENOMEM;
    }
    for (size_t i = 0; i < rg.n; i++) {
        ev[i].type = DSV32_ETCD_EVENT_PUT;
        ev[i].kv = rg.kvs[i];
    }
    deliver(w, ev, rg.n, rg.revision, true);
    free(ev);
    dsv32_etcd_range_done(&rg);
    return 0;
}

static int watch_events(struct dsv32_etcd_watch *w, const Etcdserverpb__WatchResponse *resp)
{
    struct dsv32_etcd_event *ev = calloc(resp->n_events, sizeof(*ev));
    if (!ev)
        return -ENOMEM;
    int64_t rev = 0;
    size_t n = 0;
    int r = 0;
    for (size_t i = 0; i < resp->n_events && r == 0; i++) {
        const Etcdserverpb__Event *e = resp->events[i];
        ev[n].type = e->type == ETCDSERVERPB__EVENT__EVENT_TYPE__DELETE ? DSV32_ETCD_EVENT_DELETE
                                                                          : DSV32_ETCD_EVENT_PUT;
        r = kv_copy(e->kv, &ev[n].kv);
        if (r == 0) {
            if (ev[n].kv.mod_revision > rev)
                rev = ev[n].kv.mod_revision;
            n++;
        }
    }
    if (r == 0)
        deliver(w, ev, n, rev, false);
    for (size_t i = 0; i < n; i++)
        dsv32_etcd_kv_done(&ev[i].kv);
    free(ev);
    return r;
}

/* One stream: create the watch, deliver until it breaks. Returns true when it ran (created). */
static bool watch_stream(struct dsv32_etcd_watch *w)
{
    uint8_t end[MAX_KEY_BYTES];
    Etcdserverpb__WatchCreateRequest cr = ETCDSERVERPB__WATCH_CREATE_REQUEST__INIT;
    cr.key = bin(w->key, strlen(w->key));
    if (w->flags & DSV32_ETCD_PREFIX)
        cr.range_end = prefix_end(w->key, end);
    cr.start_revision = w->next_rev;
    cr.progress_notify = true;
    Etcdserverpb__WatchRequest rq = ETCDSERVERPB__WATCH_REQUEST__INIT;
    rq.request_union_case = ETCDSERVERPB__WATCH_REQUEST__REQUEST_UNION_CREATE_REQUEST;
    rq.create_request = &cr;
    /* etcd keeps a watch stream open after the client half-closes it: server streaming. */
    struct dsv32_rpc_stream *s;
    if (dsv32_rpc_stream_open_msg(w->e->rpc, M_WATCH, &rq.base, -1, DSV32_RPC_WAIT_FOR_READY, &s) <
        0)
        return false;
    pthread_mutex_lock(&w->mu);
    bool stop = w->stop;
    if (!stop)
        w->stream = s;
    pthread_mutex_unlock(&w->mu);
    bool created = false;
    while (!stop) {
        ProtobufCMessage *m;
        int r = dsv32_rpc_stream_read_msg(s, &etcdserverpb__watch_response__descriptor, -1, &m);
        if (r != 1) {
            struct dsv32_rpc_status st;
            dsv32_rpc_stream_status(s, &st);
            log_debug("etcd: watch %s ended: %s %s", w->key, dsv32_rpc_code_name(st.code),
                      st.message);
            break;
        }
        Etcdserverpb__WatchResponse *resp = (Etcdserverpb__WatchResponse *)m;
        int64_t hrev = resp->header ? resp->header->revision : 0;
        if (resp->created) {
            created = true;
            /* Revisions only mean something within one etcd cluster's history: an etcd that
             * came back empty or from an old backup would leave us waiting for revisions it
             * has not reached, silently missing everything until then. Resync instead. */
            uint64_t cid = resp->header ? resp->header->cluster_id : 0;
            if ((w->cluster_id && cid && cid != w->cluster_id) ||
                hrev < atomic_load(&w->last_rev)) {
                log_warn("etcd: watch %s: etcd's history changed (revision %lld, had %lld); "
                         "resyncing",
                         w->key, (long long)hrev, (long long)atomic_load(&w->last_rev));
                w->cluster_id = cid;
                w->need_snapshot = true;
                protobuf_c_message_free_unpacked(m, NULL);
                break;
            }
            if (cid)
                w->cluster_id = cid;
            if (w->next_rev == 0) /* "from now": resume after what etcd had then */
                w->next_rev = hrev + 1;
        }
        if (resp->canceled) {
            if (resp->compact_revision > 0) {
                log_warn("etcd: watch %s: revision %lld compacted (oldest %lld); resyncing",
                         w->key, (long long)w->next_rev, (long long)resp->compact_revision);
                w->need_snapshot = true;
            } else {
                log_warn("etcd: watch %s cancelled by etcd: %s", w->key, resp->cancel_reason);
            }
            protobuf_c_message_free_unpacked(m, NULL);
            break;
        }
        if (resp->n_events > 0) {
            if (watch_events(w, resp) < 0) {
                protobuf_c_message_free_unpacked(m, NULL);
                break;
            }
        } else if (!resp->created && hrev >= w->next_rev) {
            /* progress notification: nothing happened up to hrev */
            atomic_store(&w->last_rev, hrev);
            w->next_rev = hrev + 1;
        }
        protobuf_c_message_free_unpacked(m, NULL);
        pthread_mutex_lock(&w->mu);
        stop = w->stop;
        pthread_mutex_unlock(&w->mu);
    }
    pthread_mutex_lock(&w->mu);
    w->stream = NULL;
    pthread_mutex_unlock(&w->mu);
    dsv32_rpc_stream_free(s);
    return created;
}

static void *watch_thread(void *arg)
{
    struct dsv32_etcd_watch *w = arg;
    int64_t backoff = RETRY_MIN_MS;
    bool first = true;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        pthread_mutex_unlock(&w->mu);
        bool ok;
        if (w->need_snapshot) {
            ok = watch_snapshot(w) == 0;
            if (ok)
                w->need_snapshot = false;
        } else {
            if (!first)
                atomic_fetch_add(&w->reconnects, 1);
            first = false;
            ok = watch_stream(w);
        }
        pthread_mutex_lock(&w->mu);
        if (ok && !w->need_snapshot) {
            /* the stream ran and broke: a short pause before resuming */
            backoff = RETRY_MIN_MS;
            sleep_until(&w->cond, &w->mu, &w->stop, now_ms() + backoff);
        } else if (!ok) {
            sleep_until(&w->cond, &w->mu, &w->stop, now_ms() + backoff);
            backoff = backoff * 2 < w->e->max_backoff_ms ? backoff * 2 : w->e->max_backoff_ms;
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int dsv32_etcd_watch_new(struct dsv32_etcd *e, const char *key, unsigned flags,
                         int64_t start_revision, dsv32_etcd_watch_fn fn, void *arg,
                         struct dsv32_etcd_watch **ret)
{
    if (check_key(key) < 0 || !fn || start_revision < 0 ||
        (flags & ~(DSV32_ETCD_PREFIX | DSV32_ETCD_SNAPSHOT)))
        return -EINVAL;
    struct dsv32_etcd_watch *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->key = strdup(key);
    if (!w->key) {
        free(w);
        return -ENOMEM;
    }
    w->e = e;
    w->flags = flags;
    w->fn = fn;
    w->arg = arg;
    w->next_rev = start_revision;
    w->need_snapshot = flags & DSV32_ETCD_SNAPSHOT;
    atomic_init(&w->last_rev, start_revision > 0 ? start_revision - 1 : 0);
    atomic_init(&w->reconnects, 0);
    pthread_mutex_init(&w->mu, NULL);
    cond_init_monotonic(&w->cond);
    int r = pthread_create(&w->thread, NULL, watch_thread, w);
    if (r != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cond);
        free(w->key);
        free(w);
        return -r;
    }
    *ret = w;
    return 0;
}

int64_t dsv32_etcd_watch_revision(struct dsv32_etcd_watch *w) { return atomic_load(&w->last_rev); }

uint64_t dsv32_etcd_watch_reconnects(struct dsv32_etcd_watch *w)
{
    return atomic_load(&w->reconnects);
}

void dsv32_etcd_watch_free(struct dsv32_etcd_watch *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    if (w->stream)
        dsv32_rpc_stream_cancel(w->stream);
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    free(w->key);
    free(w);
}

/* ---- Leader election ---- */

struct dsv32_etcd_election {
    struct dsv32_etcd *e;
    char *key, *value;
    dsv32_etcd_leader_fn fn;
    void *arg;
    struct dsv32_etcd_keeper *keeper;
    struct dsv32_etcd_watch *watch;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    bool leader;
    int64_t my_create_rev;   /* create_revision of our key while leader */
    int64_t last_absent_rev; /* a revision at which the key was seen absent (deleted) */
    int64_t lease_now;       /* what the keeper has; 0: none or uncertain */
};

/* Under el->mu: leadership ends; returns whether it was held (the caller then calls fn). */
static bool lose_locked(struct dsv32_etcd_election *el)
{
    bool was = el->leader;
    el->leader = false;
    el->my_create_rev = 0;
    pthread_cond_broadcast(&el->cond);
    return was;
}

static void election_on_lease(void *arg, enum dsv32_etcd_lease_event ev, int64_t lease)
{
    struct dsv32_etcd_election *el = arg;
    pthread_mutex_lock(&el->mu);
    bool lost = false;
    if (ev == DSV32_ETCD_LEASE_GRANTED || ev == DSV32_ETCD_LEASE_CONFIRMED) {
        el->lease_now = lease;
    } else {
        /* gone or in doubt: a leader that cannot prove its lease steps down */
        el->lease_now = 0;
        lost = lose_locked(el);
    }
    pthread_cond_broadcast(&el->cond);
    pthread_mutex_unlock(&el->mu);
    if (lost) {
        log_warn("etcd: election %s: leadership lost (lease %s)", el->key,
                 ev == DSV32_ETCD_LEASE_LOST ? "gone" : "not refreshed");
        if (el->fn)
            el->fn(el->arg, false);
    }
}

static void election_on_watch(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_etcd_election *el = arg;
    pthread_mutex_lock(&el->mu);
    bool lost = false;
    /* Changes older than our key (the watch may lag the campaign) say nothing about it. */
    if (b->reset) {
        const struct dsv32_etcd_kv *kv = b->n ? &b->events[0].kv : NULL;
        if (!kv && b->revision > el->last_absent_rev)
            el->last_absent_rev = b->revision;
        if (el->leader && b->revision >= el->my_create_rev &&
            (!kv || kv->create_revision != el->my_create_rev))
            lost = lose_locked(el);
    }
    for (size_t i = 0; !b->reset && i < b->n; i++) {
        const struct dsv32_etcd_event *ev = &b->events[i];
        if (ev->type == DSV32_ETCD_EVENT_DELETE) {
            if (ev->kv.mod_revision > el->last_absent_rev)
                el->last_absent_rev = ev->kv.mod_revision;
            if (el->leader && ev->kv.mod_revision > el->my_create_rev)
                lost |= lose_locked(el);
        } else if (el->leader && ev->kv.mod_revision > el->my_create_rev &&
                   ev->kv.create_revision != el->my_create_rev) {
            lost |= lose_locked(el);
        }
    }
    pthread_cond_broadcast(&el->cond);
    pthread_mutex_unlock(&el->mu);
    if (lost) {
        log_warn("etcd: election %s: leader key deleted", el->key);
        if (el->fn)
            el->fn(el->arg, false);
    }
}

int dsv32_etcd_election_new(struct dsv32_etcd *e, const struct dsv32_etcd_election_config *cfg,
                            struct dsv32_etcd_election **ret)
{
    if (!cfg || check_key(cfg->key) < 0 || !cfg->value || cfg->ttl_s < 0 || cfg->ttl_s > MAX_TTL_S)
        return -EINVAL;
    struct dsv32_etcd_election *el = calloc(1, sizeof(*el));
    if (!el)
        return -ENOMEM;
    el->e = e;
    el->key = strdup(cfg->key);
    el->value = strdup(cfg->value);
    el->fn = cfg->fn;
    el->arg = cfg->arg;
    pthread_mutex_init(&el->mu, NULL);
    cond_init_monotonic(&el->cond);
    int r = el->key && el->value ? 0 : -ENOMEM;
    if (r == 0)
        r = dsv32_etcd_watch_new(e, el->key, DSV32_ETCD_SNAPSHOT, 0, election_on_watch, el,
                                 &el->watch);
    if (r == 0)
        r = dsv32_etcd_keeper_new(e, cfg->ttl_s ? cfg->ttl_s : 5, election_on_lease, el,
                                  &el->keeper);
    if (r < 0) {
        dsv32_etcd_watch_free(el->watch);
        pthread_mutex_destroy(&el->mu);
        pthread_cond_destroy(&el->cond);
        free(el->key);
        free(el->value);
        free(el);
        return r;
    }
    *ret = el;
    return 0;
}

/* One attempt: 1 leader, 0 held by another (ret_rev: the revision it was seen at), < 0 error. */
static int campaign_once(struct dsv32_etcd_election *el, int64_t lease, int64_t *ret_rev)
{
    struct dsv32_etcd_cmp cmp = {
        .key = el->key, .target = DSV32_ETCD_CMP_CREATE, .result = DSV32_ETCD_EQUAL};
    struct dsv32_etcd_op put = {.type = DSV32_ETCD_OP_PUT,
                                .key = el->key,
                                .value = el->value,
                                .value_len = strlen(el->value),
                                .lease = lease};
    struct dsv32_etcd_op get = {.type = DSV32_ETCD_OP_GET, .key = el->key};
    struct dsv32_etcd_txn_result res;
    int r = dsv32_etcd_txn(el->e, &cmp, 1, &put, 1, &get, 1, &res);
    if (r < 0)
        return r;
    int64_t create_rev = 0;
    if (res.succeeded) {
        create_rev = res.revision;
    } else if (res.n_ranges == 1 && res.ranges[0].n == 1 && res.ranges[0].kvs[0].lease == lease) {
        create_rev = res.ranges[0].kvs[0].create_revision; /* ours already (campaign again) */
    }
    *ret_rev = res.revision;
    dsv32_etcd_txn_result_done(&res);
    if (create_rev == 0)
        return 0;
    pthread_mutex_lock(&el->mu);
    bool ours = el->lease_now == lease && !el->stop;
    if (ours) {
        el->leader = true;
        el->my_create_rev = create_rev;
    }
    pthread_mutex_unlock(&el->mu);
    return ours ? 1 : 0;
}

int dsv32_etcd_election_campaign(struct dsv32_etcd_election *el, int64_t timeout_ms)
{
    int64_t end = timeout_ms < 0 ? INT64_MAX / 2 : now_ms() + timeout_ms;
    struct timespec ts;
    abstime_at_ms(&ts, end);
    pthread_mutex_lock(&el->mu);
    for (;;) {
        if (el->stop) {
            pthread_mutex_unlock(&el->mu);
            return DSV32_ECANCELLED;
        }
        if (el->leader) {
            pthread_mutex_unlock(&el->mu);
            return 0;
        }
        if (now_ms() >= end) {
            pthread_mutex_unlock(&el->mu);
            return DSV32_ETIMEOUT;
        }
        int64_t lease = el->lease_now;
        if (lease == 0) {
            pthread_cond_timedwait(&el->cond, &el->mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&el->mu);
        int64_t seen_rev = 0;
        int r = campaign_once(el, lease, &seen_rev);
        if (r == 1) {
            log_info("etcd: election %s: leader as '%s'", el->key, el->value);
            if (el->fn)
                el->fn(el->arg, true);
            return 0;
        }
        pthread_mutex_lock(&el->mu);
        if (r < 0) { /* etcd unreachable: try again a little later */
            struct timespec t2;
            abstime_at_ms(&t2, now_ms() + RETRY_MIN_MS < end ? now_ms() + RETRY_MIN_MS : end);
            pthread_cond_timedwait(&el->cond, &el->mu, &t2);
            continue;
        }
        /* held by another: wait until the key is seen absent after seen_rev */
        while (!el->stop && el->last_absent_rev <= seen_rev && el->lease_now == lease &&
               pthread_cond_timedwait(&el->cond, &el->mu, &ts) != ETIMEDOUT) {
        }
    }
}

bool dsv32_etcd_election_is_leader(struct dsv32_etcd_election *el)
{
    pthread_mutex_lock(&el->mu);
    bool l = el->leader;
    pthread_mutex_unlock(&el->mu);
    return l;
}

int dsv32_etcd_election_resign(struct dsv32_etcd_election *el)
{
    pthread_mutex_lock(&el->mu);
    int64_t rev = el->my_create_rev;
    bool was = lose_locked(el);
    pthread_mutex_unlock(&el->mu);
    if (!was)
        return 0;
    if (el->fn)
        el->fn(el->arg, false);
    struct dsv32_etcd_cmp cmp = {
        .key = el->key, .target = DSV32_ETCD_CMP_CREATE, .result = DSV32_ETCD_EQUAL, .number = rev};
    struct dsv32_etcd_op del = {.type = DSV32_ETCD_OP_DELETE, .key = el->key};
    struct dsv32_etcd_txn_result res;
    int r = dsv32_etcd_txn(el->e, &cmp, 1, &del, 1, NULL, 0, &res);
    if (r == 0)
        dsv32_etcd_txn_result_done(&res);
    return r;
}

void dsv32_etcd_election_free(struct dsv32_etcd_election *el)
{
    if (!el)
        return;
    pthread_mutex_lock(&el->mu);
    el->stop = true;
    pthread_cond_broadcast(&el->cond);
    pthread_mutex_unlock(&el->mu);
    dsv32_etcd_election_resign(el);
    dsv32_etcd_keeper_free(el->keeper, true);
    dsv32_etcd_watch_free(el->watch);
    pthread_mutex_destroy(&el->mu);
    pthread_cond_destroy(&el->cond);
    free(el->key);
    free(el->value);
    free(el);
}

int dsv32_etcd_election_leader(struct dsv32_etcd *e, const char *key, char **ret_value)
{
    struct dsv32_etcd_kv kv;
    int r = dsv32_etcd_get(e, key, &kv, NULL);
    if (r < 0)
        return r;
    *ret_value = (char *)kv.value;
    kv.value = NULL;
    dsv32_etcd_kv_done(&kv);
    return 0;
}

struct dsv32_etcd_observer {
    dsv32_etcd_observe_fn fn;
    void *arg;
    struct dsv32_etcd_watch *watch;
};

static void observer_on_watch(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_etcd_observer *o = arg;
    if (b->reset) {
        o->fn(o->arg, b->n ? (const char *)b->events[0].kv.value : NULL, b->revision);
        return;
    }
    for (size_t i = 0; i < b->n; i++) {
        const struct dsv32_etcd_event *ev = &b->events[i];
        o->fn(o->arg, ev->type == DSV32_ETCD_EVENT_PUT ? (const char *)ev->kv.value : NULL,
              ev->kv.mod_revision);
    }
}

int dsv32_etcd_observer_new(struct dsv32_etcd *e, const char *key, dsv32_etcd_observe_fn fn,
                            void *arg, struct dsv32_etcd_observer **ret)
{
    if (!fn)
        return -EINVAL;
    struct dsv32_etcd_observer *o = calloc(1, sizeof(*o));
    if (!o)
        return -ENOMEM;
    o->fn = fn;
    o->arg = arg;
    int r = dsv32_etcd_watch_new(e, key, DSV32_ETCD_SNAPSHOT, 0, observer_on_watch, o, &o->watch);
    if (r < 0) {
        free(o);
        return r;
    }
    *ret = o;
    return 0;
}

void dsv32_etcd_observer_free(struct dsv32_etcd_observer *o)
{
    if (!o)
        return;
    dsv32_etcd_watch_free(o->watch);
    free(o);
}
