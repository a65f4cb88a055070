/* Integration tests of the etcd client (daemon/etcd.h) against a real etcd started on 127.0.0.1:
 * KV, transactions, leases and the keeper, watches (prefix, snapshot, compaction), etcd killed
 * and restarted under a watch and a keeper, leader election with failover and observation. */
#define _GNU_SOURCE 1
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "etcd.h"
#include "etcd_fixture.h"

static struct etcd_fixture fx;
static struct dsv32_etcd *E;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static struct dsv32_etcd *client(int64_t timeout_ms)
{
    struct dsv32_etcd_config cfg = {.endpoint = fx.endpoint, .timeout_ms = timeout_ms};
    struct dsv32_etcd *e;
    assert_int_equal(dsv32_etcd_new(&cfg, &e), 0);
    return e;
}

static int group_setup(void **state)
{
    int r = etcd_fixture_start(&fx);
    if (r < 0) {
        fprintf(stderr, "cannot start etcd: %s\n", strerror(-r));
        return -1;
    }
    E = client(3000);
    return 0;
}

static int group_teardown(void **state)
{
    dsv32_etcd_free(E);
    etcd_fixture_stop(&fx);
    return 0;
}

static void put_str(const char *key, const char *value)
{
    assert_int_equal(dsv32_etcd_put(E, key, value, strlen(value), 0, NULL), 0);
}

static void test_kv(void **state)
{
    struct dsv32_etcd_kv kv;
    int64_t rev1, rev2, rev;
    assert_int_equal(dsv32_etcd_get(E, "/t/kv/a", &kv, NULL), -ENOENT);
    assert_int_equal(dsv32_etcd_put(E, "/t/kv/a", "1", 1, 0, &rev1), 0);
    assert_int_equal(dsv32_etcd_put(E, "/t/kv/a", "22", 2, 0, &rev2), 0);
    assert_true(rev2 == rev1 + 1);
    assert_int_equal(dsv32_etcd_get(E, "/t/kv/a", &kv, &rev), 0);
    assert_string_equal((char *)kv.value, "22");
    assert_int_equal(kv.value_len, 2);
    assert_int_equal(kv.create_revision, rev1);
    assert_int_equal(kv.mod_revision, rev2);
    assert_int_equal(kv.version, 2);
    assert_int_equal(kv.lease, 0);
    assert_true(rev >= rev2);
    dsv32_etcd_kv_done(&kv);

    /* binary-safe values, empty values */
    const uint8_t bin[5] = {0, 1, 0, 255, 7};
    assert_int_equal(dsv32_etcd_put(E, "/t/kv/b", bin, sizeof(bin), 0, NULL), 0);
    assert_int_equal(dsv32_etcd_put(E, "/t/kv/c", NULL, 0, 0, NULL), 0);
    put_str("/t/kvx", "outside the prefix");
    assert_int_equal(dsv32_etcd_get(E, "/t/kv/b", &kv, NULL), 0);
    assert_int_equal(kv.value_len, 5);
    assert_memory_equal(kv.value, bin, 5);
    dsv32_etcd_kv_done(&kv);

    struct dsv32_etcd_range rg;
    assert_int_equal(dsv32_etcd_range(E, "/t/kv/", DSV32_ETCD_PREFIX, 0, &rg), 0);
    assert_int_equal(rg.n, 3);
    assert_string_equal(rg.kvs[0].key, "/t/kv/a");
    assert_string_equal(rg.kvs[1].key, "/t/kv/b");
    assert_string_equal(rg.kvs[2].key, "/t/kv/c");
    assert_int_equal(rg.kvs[2].value_len, 0);
    assert_false(rg.more);
    dsv32_etcd_range_done(&rg);
    assert_int_equal(dsv32_etcd_range(E, "/t/kv/", DSV32_ETCD_PREFIX, 2, &rg), 0);
    assert_int_equal(rg.n, 2);
    assert_true(rg.more);
    assert_int_equal(rg.count, 3);
    dsv32_etcd_range_done(&rg);

    int64_t deleted;
    assert_int_equal(dsv32_etcd_delete(E, "/t/kv/a", 0, &deleted), 0);
    assert_int_equal(deleted, 1);
    assert_int_equal(dsv32_etcd_delete(E, "/t/kv/", DSV32_ETCD_PREFIX, &deleted), 0);
    assert_int_equal(deleted, 2);
    assert_int_equal(dsv32_etcd_get(E, "/t/kvx", &kv, NULL), 0);
    dsv32_etcd_kv_done(&kv);

    assert_int_equal(dsv32_etcd_put(E, "", "x", 1, 0, NULL), -EINVAL);
    assert_int_equal(dsv32_etcd_range(E, "/t/kv/", 0, -1, &rg), -EINVAL);
}

static void test_txn(void **state)
{
    int64_t rev;
    assert_int_equal(dsv32_etcd_create(E, "/t/txn/k", "v1", 2, 0, &rev), 0);
    assert_int_equal(dsv32_etcd_create(E, "/t/txn/k", "v2", 2, 0, NULL), -EEXIST);

    /* compare-and-swap on mod_revision */
    struct dsv32_etcd_cmp cmp = {.key = "/t/txn/k",
                                 .target = DSV32_ETCD_CMP_MOD,
                                 .result = DSV32_ETCD_EQUAL,
                                 .number = rev};
    struct dsv32_etcd_op put = {
        .type = DSV32_ETCD_OP_PUT, .key = "/t/txn/k", .value = "v3", .value_len = 2};
    struct dsv32_etcd_op get = {.type = DSV32_ETCD_OP_GET, .key = "/t/txn/k"};
    struct dsv32_etcd_txn_result res;
    assert_int_equal(dsv32_etcd_txn(E, &cmp, 1, &put, 1, &get, 1, &res), 0);
    assert_true(res.succeeded);
    assert_int_equal(res.n_ranges, 0);
    int64_t rev3 = res.revision;
    dsv32_etcd_txn_result_done(&res);
    /* the same compare is stale now: the else branch runs and reads the current value */
    assert_int_equal(dsv32_etcd_txn(E, &cmp, 1, &put, 1, &get, 1, &res), 0);
    assert_false(res.succeeded);
    assert_int_equal(res.n_ranges, 1);
    assert_int_equal(res.ranges[0].n, 1);
    assert_string_equal((char *)res.ranges[0].kvs[0].value, "v3");
    assert_int_equal(res.ranges[0].kvs[0].mod_revision, rev3);
    dsv32_etcd_txn_result_done(&res);

    /* value and version compares, several ops */
    struct dsv32_etcd_cmp cmps[2] = {
        {.key = "/t/txn/k", .target = DSV32_ETCD_CMP_VALUE, .result = DSV32_ETCD_EQUAL,
         .value = "v3", .value_len = 2},
        {.key = "/t/txn/k", .target = DSV32_ETCD_CMP_VERSION, .result = DSV32_ETCD_GREATER,
         .number = 1},
    };
    struct dsv32_etcd_op ops[3] = {
        {.type = DSV32_ETCD_OP_PUT, .key = "/t/txn/a", .value = "A", .value_len = 1},
        {.type = DSV32_ETCD_OP_PUT, .key = "/t/txn/b", .value = "B", .value_len = 1},
        {.type = DSV32_ETCD_OP_GET, .key = "/t/txn/", .flags = DSV32_ETCD_PREFIX},
    };
    assert_int_equal(dsv32_etcd_txn(E, cmps, 2, ops, 3, NULL, 0, &res), 0);
    assert_true(res.succeeded);
    assert_int_equal(res.n_ranges, 1);
    assert_int_equal(res.ranges[0].n, 3); /* a, b, k: the puts are visible to the get */
    dsv32_etcd_txn_result_done(&res);
    cmps[0].result = DSV32_ETCD_NOT_EQUAL;
    struct dsv32_etcd_op del = {
        .type = DSV32_ETCD_OP_DELETE, .key = "/t/txn/", .flags = DSV32_ETCD_PREFIX};
    assert_int_equal(dsv32_etcd_txn(E, cmps, 2, NULL, 0, &del, 1, &res), 0);
    assert_false(res.succeeded);
    dsv32_etcd_txn_result_done(&res);
    struct dsv32_etcd_range rg;
    assert_int_equal(dsv32_etcd_range(E, "/t/txn/", DSV32_ETCD_PREFIX, 0, &rg), 0);
    assert_int_equal(rg.n, 0);
    dsv32_etcd_range_done(&rg);

    /* limits */
    struct dsv32_etcd_op many[DSV32_ETCD_MAX_TXN_OPS + 1];
    for (int i = 0; i <= DSV32_ETCD_MAX_TXN_OPS; i++)
        many[i] = (struct dsv32_etcd_op){.type = DSV32_ETCD_OP_GET, .key = "/t/txn/x"};
    assert_int_equal(dsv32_etcd_txn(E, NULL, 0, many, DSV32_ETCD_MAX_TXN_OPS + 1, NULL, 0, &res),
                     -E2BIG);
    many[0].key = "";
    assert_int_equal(dsv32_etcd_txn(E, NULL, 0, many, 1, NULL, 0, &res), -EINVAL);
}

struct lease_log {
    pthread_mutex_t mu;
    int n_granted, n_lost, n_uncertain, n_confirmed;
    int64_t last;
};

static void on_lease(void *arg, enum dsv32_etcd_lease_event ev, int64_t lease)
{
    struct lease_log *l = arg;
    pthread_mutex_lock(&l->mu);
    if (ev == DSV32_ETCD_LEASE_GRANTED)
        l->n_granted++;
    else if (ev == DSV32_ETCD_LEASE_LOST)
        l->n_lost++;
    else if (ev == DSV32_ETCD_LEASE_UNCERTAIN)
        l->n_uncertain++;
    else
        l->n_confirmed++;
    l->last = lease;
    pthread_mutex_unlock(&l->mu);
}

static int lease_count(struct lease_log *l, int *field)
{
    pthread_mutex_lock(&l->mu);
    int v = *field;
    pthread_mutex_unlock(&l->mu);
    return v;
}

static bool key_exists(struct dsv32_etcd *e, const char *key)
{
    struct dsv32_etcd_kv kv;
    int r = dsv32_etcd_get(e, key, &kv, NULL);
    if (r == 0)
        dsv32_etcd_kv_done(&kv);
    assert_true(r == 0 || r == -ENOENT);
    return r == 0;
}

/* The objects with threads of their own that a test makes (watches, keepers, elections, an observer,
 * clients and a campaign thread), freed by its teardown when an assertion ends it early: the
 * group teardown would otherwise free the client under their watches and hang. A test clears a
 * field when it frees the object itself. */
static struct {
    struct dsv32_etcd *e, *e2;
    struct dsv32_etcd_watch *w;
    struct dsv32_etcd_keeper *k;
    struct dsv32_etcd_observer *o;
    struct dsv32_etcd_election *a, *b;
    pthread_t campaigner; /* joined by the teardown when left running (its campaign times out) */
    bool campaigning;
} objs;

static int objs_teardown(void **state)
{
    (void)state;
    if (objs.campaigning)
        pthread_join(objs.campaigner, NULL);
    dsv32_etcd_election_free(objs.a);
    dsv32_etcd_election_free(objs.b);
    dsv32_etcd_observer_free(objs.o);
    dsv32_etcd_keeper_free(objs.k, true);
    dsv32_etcd_watch_free(objs.w);
    dsv32_etcd_free(objs.e2);
    dsv32_etcd_free(objs.e);
    memset(&objs, 0, sizeof(objs));
    return 0;
}

static void test_lease(void **state)
{
    int64_t id, ttl, granted;
    assert_int_equal(dsv32_etcd_lease_grant(E, 5, &id, &ttl), 0);
    assert_int_equal(ttl, 5);
    assert_int_equal(dsv32_etcd_lease_ttl(E, id, &ttl, &granted), 0);
    assert_true(ttl > 0 && ttl <= 5);
    assert_int_equal(granted, 5);
    assert_int_equal(dsv32_etcd_lease_keepalive(E, id, &ttl), 0);
    assert_int_equal(ttl, 5);
    assert_int_equal(dsv32_etcd_put(E, "/t/lease/a", "x", 1, id, NULL), 0);
    struct dsv32_etcd_kv kv;
    assert_int_equal(dsv32_etcd_get(E, "/t/lease/a", &kv, NULL), 0);
    assert_int_equal(kv.lease, id);
    dsv32_etcd_kv_done(&kv);
    assert_int_equal(dsv32_etcd_lease_revoke(E, id), 0);
    assert_false(key_exists(E, "/t/lease/a"));
    assert_int_equal(dsv32_etcd_lease_ttl(E, id, &ttl, NULL), -ENOENT);
    assert_int_equal(dsv32_etcd_lease_revoke(E, id), -ENOENT);
    assert_int_equal(dsv32_etcd_lease_keepalive(E, id, &ttl), -ENOENT);
    assert_int_equal(dsv32_etcd_put(E, "/t/lease/a", "x", 1, id, NULL), -ENOENT);
    assert_int_equal(dsv32_etcd_lease_grant(E, 0, &id, &ttl), -EINVAL);

    /* a kept lease outlives several TTLs; an unkept one of the same TTL expires meanwhile */
    static struct lease_log log; /* static: a failed assertion may leave threads behind */
    log = (struct lease_log){.mu = PTHREAD_MUTEX_INITIALIZER};
    assert_int_equal(dsv32_etcd_keeper_new(E, 1, on_lease, &log, &objs.k), 0);
    struct dsv32_etcd_keeper *k = objs.k;
    int64_t kl = dsv32_etcd_keeper_wait(k, 3000);
    assert_true(kl > 0);
    assert_int_equal(lease_count(&log, &log.n_granted), 1);
    assert_int_equal(dsv32_etcd_put(E, "/t/lease/kept", "x", 1, kl, NULL), 0);
    assert_int_equal(dsv32_etcd_lease_grant(E, 1, &id, &ttl), 0);
    assert_int_equal(dsv32_etcd_put(E, "/t/lease/unkept", "x", 1, id, NULL), 0);
    int64_t end = now_ms() + 5000;
    while (key_exists(E, "/t/lease/unkept") && now_ms() < end)
        usleep(100000);
    assert_false(key_exists(E, "/t/lease/unkept"));
    usleep(1200000); /* > 1 TTL more */
    assert_true(key_exists(E, "/t/lease/kept"));
    assert_int_equal(dsv32_etcd_keeper_lease(k), kl);
    assert_int_equal(lease_count(&log, &log.n_lost), 0);

    /* revoked behind its back: the keeper notices, reports it, and gets a new lease */
    assert_int_equal(dsv32_etcd_lease_revoke(E, kl), 0);
    end = now_ms() + 5000;
    while (lease_count(&log, &log.n_granted) < 2 && now_ms() < end)
        usleep(20000);
    assert_int_equal(lease_count(&log, &log.n_lost), 1);
    assert_int_equal(lease_count(&log, &log.n_granted), 2);
    int64_t kl2 = dsv32_etcd_keeper_lease(k);
    assert_true(kl2 > 0 && kl2 != kl);
    assert_int_equal(dsv32_etcd_lease_ttl(E, kl2, &ttl, NULL), 0);

    /* free with revoke: the lease and its keys go */
    assert_int_equal(dsv32_etcd_put(E, "/t/lease/kept", "x", 1, kl2, NULL), 0);
    dsv32_etcd_keeper_free(k, true);
    objs.k = NULL;
    assert_false(key_exists(E, "/t/lease/kept"));
    assert_int_equal(dsv32_etcd_lease_ttl(E, kl2, &ttl, NULL), -ENOENT);
}

/* What a watch delivered: "P key=value@rev" / "D key@rev" lines, and reset markers. Order
 * violations are counted here and asserted on the test's thread. */
struct watch_log {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    char lines[256][96];
    int n;
    int resets;
    int disorder;
    int64_t rev;
};

static void on_watch(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct watch_log *l = arg;
    pthread_mutex_lock(&l->mu);
    if (b->reset) {
        l->resets++;
        if (l->n < 256)
            snprintf(l->lines[l->n++], sizeof(l->lines[0]), "RESET@%lld", (long long)b->revision);
        l->rev = 0; /* a snapshot may start a new history (an etcd that came back empty) */
    }
    for (size_t i = 0; i < b->n && l->n < 256; i++) {
        const struct dsv32_etcd_event *ev = &b->events[i];
        if (ev->type == DSV32_ETCD_EVENT_PUT)
            snprintf(l->lines[l->n++], sizeof(l->lines[0]), "P %s=%s", ev->kv.key,
                     (const char *)ev->kv.value);
        else
            snprintf(l->lines[l->n++], sizeof(l->lines[0]), "D %s", ev->kv.key);
        /* in order, never twice; within the batch's revision */
        if (ev->kv.mod_revision > b->revision || (!b->reset && ev->kv.mod_revision <= l->rev))
            l->disorder++;
    }
    if (b->revision < l->rev)
        l->disorder++;
    l->rev = b->revision;
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->mu);
}

static void watch_log_init(struct watch_log *l)
{
    memset(l, 0, sizeof(*l));
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cond, NULL);
}

static bool wait_lines(struct watch_log *l, int n, int64_t ms)
{
    int64_t end = now_ms() + ms;
    pthread_mutex_lock(&l->mu);
    while (l->n < n && now_ms() < end) {
        pthread_mutex_unlock(&l->mu);
        usleep(5000);
        pthread_mutex_lock(&l->mu);
    }
    bool ok = l->n >= n;
    int disorder = l->disorder;
    pthread_mutex_unlock(&l->mu);
    assert_int_equal(disorder, 0);
    return ok;
}

/* A watch log's line i (a copy), count and resets, each read under its lock: assertions never
 * run with the lock held, so a failing one cannot leave the watch's thread blocked on it and the
 * test's teardown waiting for that thread. */
static const char *log_line(struct watch_log *l, int i)
{
    static char buf[4][96];
    static int next;
    char *b = buf[next++ % 4];
    pthread_mutex_lock(&l->mu);
    snprintf(b, sizeof(buf[0]), "%s", i < l->n ? l->lines[i] : "(none)");
    pthread_mutex_unlock(&l->mu);
    return b;
}

static int log_n(struct watch_log *l)
{
    pthread_mutex_lock(&l->mu);
    int n = l->n;
    pthread_mutex_unlock(&l->mu);
    return n;
}

static int log_resets(struct watch_log *l)
{
    pthread_mutex_lock(&l->mu);
    int n = l->resets;
    pthread_mutex_unlock(&l->mu);
    return n;
}

static void test_watch(void **state)
{
    int64_t rev;
    put_str("/t/w/old", "0");
    assert_int_equal(dsv32_etcd_put(E, "/t/w/a", "1", 1, 0, &rev), 0);
    static struct watch_log l;
    watch_log_init(&l);
    /* from the next revision: what happens after the put above, nothing before */
    assert_int_equal(dsv32_etcd_watch_new(E, "/t/w/", DSV32_ETCD_PREFIX, rev + 1, on_watch, &l,
                                          &objs.w),
                     0);
    put_str("/t/w/b", "2");
    put_str("/t/wx", "not watched");
    put_str("/t/w/a", "3");
    assert_int_equal(dsv32_etcd_delete(E, "/t/w/b", 0, NULL), 0);
    int64_t last;
    assert_int_equal(dsv32_etcd_put(E, "/t/w/c", "4", 1, 0, &last), 0);
    assert_true(wait_lines(&l, 4, 5000));
    usleep(50000);
    assert_int_equal(log_n(&l), 4);
    assert_string_equal(log_line(&l, 0), "P /t/w/b=2");
    assert_string_equal(log_line(&l, 1), "P /t/w/a=3");
    assert_string_equal(log_line(&l, 2), "D /t/w/b");
    assert_string_equal(log_line(&l, 3), "P /t/w/c=4");
    assert_int_equal(dsv32_etcd_watch_revision(objs.w), last);
    dsv32_etcd_watch_free(objs.w);
    objs.w = NULL;

    /* a snapshot first: the current range as a reset batch, then the changes */
    watch_log_init(&l);
    assert_int_equal(dsv32_etcd_watch_new(E, "/t/w/", DSV32_ETCD_PREFIX | DSV32_ETCD_SNAPSHOT, 0,
                                          on_watch, &l, &objs.w),
                     0);
    assert_true(wait_lines(&l, 4, 5000)); /* RESET + old, a, c */
    put_str("/t/w/d", "5");
    assert_true(wait_lines(&l, 5, 5000));
    assert_int_equal(log_resets(&l), 1);
    assert_string_equal(log_line(&l, 1), "P /t/w/a=3");
    assert_string_equal(log_line(&l, 2), "P /t/w/c=4");
    assert_string_equal(log_line(&l, 3), "P /t/w/old=0");
    assert_string_equal(log_line(&l, 4), "P /t/w/d=5");
    dsv32_etcd_watch_free(objs.w);
    objs.w = NULL;

    /* one key, not a prefix */
    watch_log_init(&l);
    assert_int_equal(dsv32_etcd_watch_new(E, "/t/w/a", 0, last + 1, on_watch, &l, &objs.w), 0);
    put_str("/t/w/ab", "no");
    put_str("/t/w/a", "yes");
    assert_true(wait_lines(&l, 1, 5000));
    usleep(50000);
    assert_int_equal(log_n(&l), 1);
    assert_string_equal(log_line(&l, 0), "P /t/w/a=yes");
    dsv32_etcd_watch_free(objs.w);
    objs.w = NULL;
}

static void test_watch_compacted(void **state)
{
    int64_t rev0, rev;
    assert_int_equal(dsv32_etcd_put(E, "/t/wc/a", "1", 1, 0, &rev0), 0);
    put_str("/t/wc/b", "2");
    assert_int_equal(dsv32_etcd_put(E, "/t/wc/a", "3", 1, 0, &rev), 0);
    assert_int_equal(dsv32_etcd_compact(E, rev), 0);
    /* the history it asks for is gone: it resyncs with a snapshot instead of losing changes */
    static struct watch_log l;
    watch_log_init(&l);
    assert_int_equal(dsv32_etcd_watch_new(E, "/t/wc/", DSV32_ETCD_PREFIX, rev0, on_watch, &l, &objs.w),
                     0);
    assert_true(wait_lines(&l, 3, 5000));
    put_str("/t/wc/c", "4");
    assert_true(wait_lines(&l, 4, 5000));
    assert_int_equal(log_resets(&l), 1);
    assert_true(strncmp(log_line(&l, 0), "RESET@", 6) == 0);
    assert_string_equal(log_line(&l, 1), "P /t/wc/a=3");
    assert_string_equal(log_line(&l, 2), "P /t/wc/b=2");
    assert_string_equal(log_line(&l, 3), "P /t/wc/c=4");
    dsv32_etcd_watch_free(objs.w);
    objs.w = NULL;
}

/* etcd killed and restarted under a watch, a keeper and a client: nothing lost or repeated. */
static void test_etcd_restart(void **state)
{
    struct dsv32_etcd *e = objs.e = client(1000);
    int64_t rev;
    assert_int_equal(dsv32_etcd_put(e, "/t/rs/start", "0", 1, 0, &rev), 0);
    static struct watch_log l;
    watch_log_init(&l);
    assert_int_equal(dsv32_etcd_watch_new(e, "/t/rs/", DSV32_ETCD_PREFIX, rev + 1, on_watch, &l,
                                          &objs.w),
                     0);
    struct dsv32_etcd_watch *w = objs.w;
    static struct lease_log ll;
    ll = (struct lease_log){.mu = PTHREAD_MUTEX_INITIALIZER};
    assert_int_equal(dsv32_etcd_keeper_new(e, 2, on_lease, &ll, &objs.k), 0);
    struct dsv32_etcd_keeper *k = objs.k;
    int64_t lease = dsv32_etcd_keeper_wait(k, 3000);
    assert_true(lease > 0);
    assert_int_equal(dsv32_etcd_put(e, "/t/rs/leased", "L", 1, lease, NULL), 0);
    char key[64], val[16];
    for (int i = 0; i < 5; i++) {
        snprintf(key, sizeof(key), "/t/rs/k%d", i);
        snprintf(val, sizeof(val), "%d", i);
        put_str(key, val);
    }
    assert_true(wait_lines(&l, 6, 5000)); /* leased + 5 */

    assert_int_equal(etcd_fixture_kill(&fx), 0);
    /* down: reads wait for etcd up to their timeout, then say so; a write fails within its
     * timeout (at once if the connection broke under it: its outcome is unknown) */
    int64_t t0 = now_ms();
    assert_int_equal(dsv32_etcd_get(e, "/t/rs/k0", NULL, NULL), DSV32_ETIMEOUT);
    assert_true(now_ms() - t0 >= 900 && now_ms() - t0 < 3000);
    t0 = now_ms();
    int r = dsv32_etcd_put(e, "/t/rs/lost", "x", 1, 0, NULL);
    assert_true(r == DSV32_ETIMEOUT || r == DSV32_EETCD);
    assert_true(now_ms() - t0 < 3000);
    assert_int_equal(etcd_fixture_restart(&fx), 0);

    /* writes from a fresh client right away, while the watch may still be reconnecting */
    struct dsv32_etcd *e2 = objs.e2 = client(5000);
    for (int i = 5; i < 10; i++) {
        snprintf(key, sizeof(key), "/t/rs/k%d", i);
        snprintf(val, sizeof(val), "%d", i);
        assert_int_equal(dsv32_etcd_put(e2, key, val, strlen(val), 0, NULL), 0);
    }
    assert_true(wait_lines(&l, 11, 10000));
    usleep(100000);
    assert_int_equal(log_n(&l), 11);
    assert_string_equal(log_line(&l, 0), "P /t/rs/leased=L");
    for (int i = 0; i < 10; i++) {
        char want[64];
        snprintf(want, sizeof(want), "P /t/rs/k%d=%d", i, i);
        assert_string_equal(log_line(&l, 1 + i), want);
    }
    assert_true(dsv32_etcd_watch_reconnects(w) >= 1);

    /* the lease survived the restart and is still kept alive past its TTL */
    usleep(2500000);
    assert_int_equal(dsv32_etcd_keeper_lease(k), lease);
    int64_t ttl;
    assert_int_equal(dsv32_etcd_lease_ttl(e2, lease, &ttl, NULL), 0);
    assert_true(key_exists(e2, "/t/rs/leased"));
    assert_int_equal(lease_count(&ll, &ll.n_lost), 0);
    /* and the first client works again */
    assert_int_equal(dsv32_etcd_put(e, "/t/rs/after", "x", 1, 0, NULL), 0);

    dsv32_etcd_keeper_free(k, true);
    dsv32_etcd_watch_free(w);
    dsv32_etcd_free(e2);
    dsv32_etcd_free(e);
    memset(&objs, 0, sizeof(objs));
}

struct leader_log {
    pthread_mutex_t mu;
    int n_up, n_down;
    char observed[8][32];
    int n_observed;
};

static void on_leader(void *arg, bool is_leader)
{
    struct leader_log *l = arg;
    pthread_mutex_lock(&l->mu);
    if (is_leader)
        l->n_up++;
    else
        l->n_down++;
    pthread_mutex_unlock(&l->mu);
}

static void on_observe(void *arg, const char *leader, int64_t revision)
{
    struct leader_log *l = arg;
    pthread_mutex_lock(&l->mu);
    if (l->n_observed < 8)
        snprintf(l->observed[l->n_observed++], sizeof(l->observed[0]), "%s",
                 leader ? leader : "-");
    pthread_mutex_unlock(&l->mu);
}

static int leader_field(struct leader_log *l, int *field)
{
    pthread_mutex_lock(&l->mu);
    int v = *field;
    pthread_mutex_unlock(&l->mu);
    return v;
}

/* The callback of a lost leadership runs after the state has flipped (on the thread that saw it:
 * the watch's or the keeper's), so a test that has seen is_leader false waits for the count; a
 * count that never comes still fails. */
static int wait_field(struct leader_log *l, int *field, int want, int64_t ms)
{
    int64_t end = now_ms() + ms;
    int v;
    while ((v = leader_field(l, field)) < want && now_ms() < end)
        usleep(5000);
    return v;
}

struct campaign_job {
    struct dsv32_etcd_election *el;
    int64_t timeout_ms;
    int result;
    int64_t took_ms;
};

static void *campaign_thread(void *arg)
{
    struct campaign_job *j = arg;
    int64_t t0 = now_ms();
    j->result = dsv32_etcd_election_campaign(j->el, j->timeout_ms);
    j->took_ms = now_ms() - t0;
    return NULL;
}

static bool wait_not_leader(struct dsv32_etcd_election *el, int64_t ms)
{
    int64_t end = now_ms() + ms;
    while (dsv32_etcd_election_is_leader(el) && now_ms() < end)
        usleep(10000);
    return !dsv32_etcd_election_is_leader(el);
}

static void test_election(void **state)
{
    const char *key = "/t/el/leader";
    struct dsv32_etcd *e2 = objs.e2 = client(3000);
    static struct leader_log la, lb, obs;
    la = lb = obs = (struct leader_log){.mu = PTHREAD_MUTEX_INITIALIZER};
    struct dsv32_etcd_observer *o;
    assert_int_equal(dsv32_etcd_observer_new(E, key, on_observe, &obs, &o), 0);
    objs.o = o;
    int64_t end = now_ms() + 3000;
    while (leader_field(&obs, &obs.n_observed) < 1 && now_ms() < end) /* its first snapshot */
        usleep(5000);
    struct dsv32_etcd_election_config ca = {
        .key = key, .value = "a", .ttl_s = 2, .fn = on_leader, .arg = &la};
    struct dsv32_etcd_election_config cb = {
        .key = key, .value = "b", .ttl_s = 2, .fn = on_leader, .arg = &lb};
    struct dsv32_etcd_election *a, *b;
    assert_int_equal(dsv32_etcd_election_new(E, &ca, &a), 0);
    objs.a = a;
    assert_int_equal(dsv32_etcd_election_new(e2, &cb, &b), 0);
    objs.b = b;

    assert_int_equal(dsv32_etcd_election_campaign(a, 5000), 0);
    assert_true(dsv32_etcd_election_is_leader(a));
    assert_int_equal(dsv32_etcd_election_campaign(a, 5000), 0); /* again: still leader */
    assert_int_equal(leader_field(&la, &la.n_up), 1);
    char *v;
    assert_int_equal(dsv32_etcd_election_leader(E, key, &v), 0);
    assert_string_equal(v, "a");
    free(v);
    assert_int_equal(dsv32_etcd_election_campaign(b, 300), DSV32_ETIMEOUT);
    assert_false(dsv32_etcd_election_is_leader(b));

    /* a resigns: b, campaigning meanwhile, takes over promptly */
    static struct campaign_job j;
    j = (struct campaign_job){.el = b, .timeout_ms = 10000};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, campaign_thread, &j), 0);
    objs.campaigner = t;
    objs.campaigning = true;
    usleep(200000);
    assert_false(dsv32_etcd_election_is_leader(b));
    int64_t t0 = now_ms();
    assert_int_equal(dsv32_etcd_election_resign(a), 0);
    pthread_join(t, NULL);
    objs.campaigning = false;
    assert_int_equal(j.result, 0);
    assert_true(now_ms() - t0 < 2000);
    assert_true(dsv32_etcd_election_is_leader(b));
    assert_false(dsv32_etcd_election_is_leader(a));
    assert_int_equal(wait_field(&la, &la.n_down, 1, 3000), 1);

    /* b's lease disappears (a crashed leader's lease expiring): b learns it is no longer leader
     * and a can take over */
    struct dsv32_etcd_kv kv;
    assert_int_equal(dsv32_etcd_get(E, key, &kv, NULL), 0);
    assert_string_equal((char *)kv.value, "b");
    assert_int_equal(dsv32_etcd_lease_revoke(E, kv.lease), 0);
    dsv32_etcd_kv_done(&kv);
    assert_true(wait_not_leader(b, 3000));
    assert_int_equal(wait_field(&lb, &lb.n_down, 1, 3000), 1);
    assert_int_equal(dsv32_etcd_election_campaign(a, 5000), 0);
    assert_int_equal(dsv32_etcd_election_leader(E, key, &v), 0);
    assert_string_equal(v, "a");
    free(v);

    /* the key deleted by an operator: the leader notices */
    assert_int_equal(dsv32_etcd_delete(E, key, 0, NULL), 0);
    assert_true(wait_not_leader(a, 3000));
    assert_int_equal(dsv32_etcd_election_campaign(b, 5000), 0);
    assert_true(dsv32_etcd_election_is_leader(b));

    /* freeing the leader frees the seat */
    dsv32_etcd_election_free(b);
    objs.b = NULL;
    assert_int_equal(dsv32_etcd_election_leader(E, key, &v), -ENOENT);
    assert_int_equal(dsv32_etcd_election_campaign(a, 5000), 0);
    dsv32_etcd_election_free(a);
    objs.a = NULL;

    /* the observer saw every change: none, a, (none), b, (none), a, (none), b, none, a, none */
    end = now_ms() + 3000;
    while (leader_field(&obs, &obs.n_observed) < 8 && now_ms() < end)
        usleep(10000);
    pthread_mutex_lock(&obs.mu);
    assert_string_equal(obs.observed[0], "-");
    assert_string_equal(obs.observed[1], "a");
    assert_string_equal(obs.observed[2], "-");
    assert_string_equal(obs.observed[3], "b");
    assert_string_equal(obs.observed[4], "-");
    assert_string_equal(obs.observed[5], "a");
    assert_string_equal(obs.observed[6], "-");
    assert_string_equal(obs.observed[7], "b");
    pthread_mutex_unlock(&obs.mu);
    dsv32_etcd_observer_free(o);
    objs.o = NULL;
    dsv32_etcd_free(e2);
    objs.e2 = NULL;
}

/* etcd comes back empty (a new cluster: revisions start over, leases unknown): the watch does not
 * wait for revisions the new etcd has not reached but resyncs; the keeper gets a new lease. Last,
 * since it wipes what the other tests wrote. */
static void test_etcd_wiped(void **state)
{
    struct dsv32_etcd *e = objs.e = client(1000);
    int64_t rev;
    for (int i = 0; i < 20; i++) /* revisions well ahead of what a new etcd will have */
        assert_int_equal(dsv32_etcd_put(e, "/t/wipe/old", "x", 1, 0, &rev), 0);
    static struct watch_log l;
    watch_log_init(&l);
    assert_int_equal(dsv32_etcd_watch_new(e, "/t/wipe/", DSV32_ETCD_PREFIX, rev + 1, on_watch, &l,
                                          &objs.w),
                     0);
    struct dsv32_etcd_watch *w = objs.w;
    static struct lease_log ll;
    ll = (struct lease_log){.mu = PTHREAD_MUTEX_INITIALIZER};
    assert_int_equal(dsv32_etcd_keeper_new(e, 1, on_lease, &ll, &objs.k), 0);
    struct dsv32_etcd_keeper *k = objs.k;
    int64_t lease = dsv32_etcd_keeper_wait(k, 3000);
    assert_true(lease > 0);
    assert_int_equal(dsv32_etcd_put(e, "/t/wipe/a", "1", 1, 0, NULL), 0);
    assert_true(wait_lines(&l, 1, 5000));

    assert_int_equal(etcd_fixture_restart_empty(&fx), 0);
    struct dsv32_etcd *e2 = objs.e2 = client(5000);
    assert_int_equal(dsv32_etcd_put(e2, "/t/wipe/b", "2", 1, 0, NULL), 0);
    /* a snapshot of the new etcd (only b), then its changes */
    assert_true(wait_lines(&l, 3, 10000));
    assert_int_equal(dsv32_etcd_put(e2, "/t/wipe/c", "3", 1, 0, NULL), 0);
    assert_true(wait_lines(&l, 4, 5000));
    assert_string_equal(log_line(&l, 0), "P /t/wipe/a=1");
    assert_true(strncmp(log_line(&l, 1), "RESET@", 6) == 0);
    assert_string_equal(log_line(&l, 2), "P /t/wipe/b=2");
    assert_string_equal(log_line(&l, 3), "P /t/wipe/c=3");
    /* the old lease means nothing to the new etcd: a new one */
    int64_t end = now_ms() + 5000;
    while (lease_count(&ll, &ll.n_granted) < 2 && now_ms() < end)
        usleep(20000);
    assert_int_equal(lease_count(&ll, &ll.n_lost), 1);
    int64_t l2 = dsv32_etcd_keeper_lease(k);
    assert_true(l2 > 0 && l2 != lease);
    int64_t ttl;
    assert_int_equal(dsv32_etcd_lease_ttl(e2, l2, &ttl, NULL), 0);
    dsv32_etcd_keeper_free(k, true);
    dsv32_etcd_watch_free(w);
    dsv32_etcd_free(e2);
    dsv32_etcd_free(e);
    memset(&objs, 0, sizeof(objs));
}

int main(void)
{
    if (!etcd_fixture_binary()) {
        fprintf(stderr, "no etcd binary: skipped\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv),
        cmocka_unit_test(test_txn),
        cmocka_unit_test_teardown(test_lease, objs_teardown),
        cmocka_unit_test_teardown(test_watch, objs_teardown),
        cmocka_unit_test_teardown(test_watch_compacted, objs_teardown),
        cmocka_unit_test_teardown(test_election, objs_teardown),
        cmocka_unit_test_teardown(test_etcd_restart, objs_teardown),
        cmocka_unit_test_teardown(test_etcd_wiped, objs_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
