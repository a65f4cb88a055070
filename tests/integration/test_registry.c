/* Integration tests of node registration and the cluster view (daemon/registry.h) against a real
 * etcd: states loading -> ready -> draining, load updates and their rate limit, deregistration,
 * cordons, malformed records, a lease lost behind the registry's back, etcd down and back. */
#define _GNU_SOURCE 1
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "etcd.h"
#include "etcd_fixture.h"
#include "registry.h"

static struct etcd_fixture fx;
static struct dsv32_etcd *E;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int group_setup(void **state)
{
    int r = etcd_fixture_start(&fx);
    if (r < 0) {
        fprintf(stderr, "cannot start etcd: %s\n", strerror(-r));
        return -1;
    }
    struct dsv32_etcd_config cfg = {.endpoint = fx.endpoint, .timeout_ms = 2000};
    assert_int_equal(dsv32_etcd_new(&cfg, &E), 0);
    return 0;
}

static int group_teardown(void **state)
{
    dsv32_etcd_free(E);
    etcd_fixture_stop(&fx);
    return 0;
}

static struct dsv32_registry_view *view(const char *cluster)
{
    struct dsv32_registry_view *v;
    assert_int_equal(dsv32_registry_view_new(E, cluster, NULL, NULL, &v), 0);
    int64_t end = now_ms() + 5000;
    while (!dsv32_registry_view_synced(v) && now_ms() < end)
        usleep(5000);
    assert_true(dsv32_registry_view_synced(v));
    return v;
}

/* Waits until node kind/id is present (want_present) in state st (-1: any) or gone. */
static bool wait_node(struct dsv32_registry_view *v, const char *kind, const char *id,
                      bool want_present, int st, int64_t ms, struct dsv32_node_info *out)
{
    int64_t end = now_ms() + ms;
    for (;;) {
        uint64_t ver = dsv32_registry_view_version(v);
        struct dsv32_node_info n;
        int r = dsv32_registry_view_get(v, kind, id, &n);
        bool ok = want_present ? r == 0 && (st < 0 || (int)n.state == st) : r == -ENOENT;
        if (ok) {
            if (out && r == 0)
                *out = n;
            return true;
        }
        int64_t left = end - now_ms();
        if (left <= 0)
            return false;
        dsv32_registry_view_wait(v, ver, left);
    }
}

static struct dsv32_registry *reg(const char *cluster, const char *id, int64_t ttl_s,
                                  int64_t load_interval_ms)
{
    struct dsv32_registry_config cfg = {
        .cluster = cluster,
        .kind = "attn",
        .id = id,
        .address = "127.0.0.1:7001",
        .role = "decode",
        .gpu = 3,
        .ttl_s = ttl_s,
        .load_interval_ms = load_interval_ms,
    };
    struct dsv32_registry *r;
    assert_int_equal(dsv32_registry_new(E, &cfg, &r), 0);
    return r;
}

static void test_names_and_json(void **state)
{
    char key[256];
    assert_int_equal(dsv32_registry_node_key("c1", "attn", "a0", key, sizeof(key)), 0);
    assert_string_equal(key, "/dsv32/c1/nodes/attn/a0");
    assert_int_equal(dsv32_registry_node_key("c1", "attn", "a/0", key, sizeof(key)), -EINVAL);
    assert_int_equal(dsv32_registry_node_key("", "attn", "a0", key, sizeof(key)), -EINVAL);
    assert_int_equal(dsv32_registry_node_key("c1", "attn", "..", key, sizeof(key)), -EINVAL);
    assert_int_equal(dsv32_registry_node_key("c1", "attn", "a0", key, 10), -ENOBUFS);
    char longname[80];
    memset(longname, 'x', sizeof(longname) - 1);
    longname[79] = 0;
    assert_int_equal(dsv32_node_name_check(longname), -EINVAL);
    longname[63] = 0;
    assert_int_equal(dsv32_node_name_check(longname), 0);

    struct dsv32_node_info n = {.kind = "attn", .id = "a0", .address = "10.0.0.1:7001",
                                .role = "prefill", .gpu = 2, .state = DSV32_NODE_DRAINING,
                                .load = {.running = 7, .waiting = 3, .free_kv_blocks = 1000,
                                         .total_kv_blocks = 1 << 20}};
    char *json;
    assert_int_equal(dsv32_node_info_to_json(&n, &json), 0);
    struct dsv32_node_info m;
    memset(&m, 0, sizeof(m));
    assert_int_equal(dsv32_node_info_from_json(json, strlen(json), &m), 0);
    free(json);
    assert_string_equal(m.address, n.address);
    assert_string_equal(m.role, n.role);
    assert_int_equal(m.gpu, 2);
    assert_int_equal(m.state, DSV32_NODE_DRAINING);
    assert_memory_equal(&m.load, &n.load, sizeof(n.load));
    const char *bad[] = {
        "", "{", "[]", "{\"address\":\"x\"}",
        "{\"address\":\"x\",\"role\":\"\",\"gpu\":0,\"state\":\"sleeping\",\"load\":{}}",
        "{\"address\":\"x\",\"role\":\"\",\"gpu\":0,\"state\":\"ready\",\"load\":{\"running\":-1,"
        "\"waiting\":0,\"free_kv_blocks\":0,\"total_kv_blocks\":0}}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(dsv32_node_info_from_json(bad[i], strlen(bad[i]), &m), DSV32_EFORMAT);

    enum dsv32_node_state st;
    assert_int_equal(dsv32_node_state_parse("ready", &st), 0);
    assert_int_equal(st, DSV32_NODE_READY);
    assert_int_equal(dsv32_node_state_parse("READY", &st), -EINVAL);
    assert_string_equal(dsv32_node_state_name(DSV32_NODE_LOADING), "loading");

    struct dsv32_registry_config cfg = {
        .cluster = "c1", .kind = "attn", .id = "a b", .address = "x:1", .gpu = -1};
    struct dsv32_registry *r;
    assert_int_equal(dsv32_registry_new(E, &cfg, &r), -EINVAL);
    cfg.id = "a0";
    cfg.address = "";
    assert_int_equal(dsv32_registry_new(E, &cfg, &r), -EINVAL);
}

static void test_states(void **state)
{
    struct dsv32_registry_view *v = view("c1");
    struct dsv32_registry *r = reg("c1", "a0", 2, 0);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    assert_true(dsv32_registry_synced(r));
    struct dsv32_node_info n;
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_LOADING, 5000, &n));
    assert_string_equal(n.address, "127.0.0.1:7001");
    assert_string_equal(n.role, "decode");
    assert_int_equal(n.gpu, 3);
    assert_int_equal(n.lease, dsv32_registry_lease(r));
    assert_true(n.lease != 0);
    assert_false(n.cordoned);

    /* the record in etcd, as other tools see it */
    struct dsv32_etcd_kv kv;
    assert_int_equal(dsv32_etcd_get(E, "/dsv32/c1/nodes/attn/a0", &kv, NULL), 0);
    assert_non_null(strstr((char *)kv.value, "\"state\":\"loading\""));
    dsv32_etcd_kv_done(&kv);

    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_READY), 0);
    struct dsv32_node_load load = {.running = 4, .waiting = 1, .free_kv_blocks = 900,
                                   .total_kv_blocks = 1024};
    dsv32_registry_set_load(r, &load);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_READY, 5000, &n));
    int64_t end = now_ms() + 5000;
    while (n.load.running != 4 && now_ms() < end) {
        usleep(5000);
        assert_int_equal(dsv32_registry_view_get(v, "attn", "a0", &n), 0);
    }
    assert_memory_equal(&n.load, &load, sizeof(load));
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_LOADING), -EINVAL);
    assert_int_equal(dsv32_registry_state(r), DSV32_NODE_READY);
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_DRAINING), 0);
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_DRAINING, 5000, NULL));
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_READY), 0); /* undrain */
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_READY, 5000, NULL));

    /* a second node, another kind; listing */
    struct dsv32_registry_config cfg = {.cluster = "c1", .kind = "expert", .id = "x0",
                                        .address = "127.0.0.1:7101", .gpu = -1};
    struct dsv32_registry *rx;
    assert_int_equal(dsv32_registry_new(E, &cfg, &rx), 0);
    assert_true(wait_node(v, "expert", "x0", true, -1, 5000, NULL));
    struct dsv32_node_info list[4];
    assert_int_equal(dsv32_registry_view_list(v, NULL, list, 4), 2);
    assert_string_equal(list[0].kind, "attn");
    assert_string_equal(list[1].kind, "expert");
    assert_int_equal(list[1].gpu, -1);
    assert_int_equal(dsv32_registry_view_list(v, "expert", list, 4), 1);
    assert_int_equal(dsv32_registry_view_list(v, "router", list, 4), 0);
    assert_int_equal(dsv32_registry_view_list(v, NULL, list, 1), 2); /* count beyond cap */

    /* a clean stop deregisters at once (not after the TTL) */
    int64_t t0 = now_ms();
    dsv32_registry_free(r);
    assert_true(wait_node(v, "attn", "a0", false, -1, 1500, NULL));
    assert_true(now_ms() - t0 < 1500);
    assert_int_equal(dsv32_etcd_get(E, "/dsv32/c1/nodes/attn/a0", NULL, NULL), -ENOENT);
    dsv32_registry_free(rx);
    assert_true(wait_node(v, "expert", "x0", false, -1, 1500, NULL));
    dsv32_registry_view_free(v);
}

struct put_count {
    pthread_mutex_t mu;
    int puts;
};

static void count_puts(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct put_count *c = arg;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < b->n; i++)
        if (b->events[i].type == DSV32_ETCD_EVENT_PUT)
            c->puts++;
    pthread_mutex_unlock(&c->mu);
}

static void test_load_rate_limit(void **state)
{
    int64_t rev;
    assert_int_equal(dsv32_etcd_put(E, "/t/marker", "x", 1, 0, &rev), 0);
    static struct put_count c; /* static: a failed assertion may leave the watch behind */
    c = (struct put_count){.mu = PTHREAD_MUTEX_INITIALIZER};
    struct dsv32_etcd_watch *w;
    assert_int_equal(dsv32_etcd_watch_new(E, "/dsv32/c2/nodes/attn/a1", 0, rev + 1, count_puts,
                                          &c, &w),
                     0);
    struct dsv32_registry *r = reg("c2", "a1", 5, 300);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    /* 60 load changes over ~600 ms: at most one write per 300 ms reaches etcd */
    for (uint32_t i = 1; i <= 60; i++) {
        struct dsv32_node_load l = {.running = i};
        dsv32_registry_set_load(r, &l);
        usleep(10000);
    }
    assert_int_equal(dsv32_registry_flush(r, 5000), 0); /* the last value goes out now */
    usleep(200000);
    pthread_mutex_lock(&c.mu);
    int puts = c.puts;
    pthread_mutex_unlock(&c.mu);
    assert_true(puts >= 2 && puts <= 6);
    struct dsv32_etcd_kv kv;
    assert_int_equal(dsv32_etcd_get(E, "/dsv32/c2/nodes/attn/a1", &kv, NULL), 0);
    assert_non_null(strstr((char *)kv.value, "\"running\":60"));
    dsv32_etcd_kv_done(&kv);
    dsv32_etcd_watch_free(w);
    dsv32_registry_free(r);
}

static void test_cordon_and_garbage(void **state)
{
    struct dsv32_registry_view *v = view("c3");
    struct dsv32_registry *r = reg("c3", "a0", 5, 0);
    assert_true(wait_node(v, "attn", "a0", true, -1, 5000, NULL));
    assert_false(dsv32_registry_view_cordoned(v, "a0"));
    assert_int_equal(dsv32_registry_cordon(E, "c3", "a0", "disk errors"), 0);
    int64_t end = now_ms() + 5000;
    while (!dsv32_registry_view_cordoned(v, "a0") && now_ms() < end)
        usleep(5000);
    assert_true(dsv32_registry_view_cordoned(v, "a0"));
    struct dsv32_node_info n;
    assert_int_equal(dsv32_registry_view_get(v, "attn", "a0", &n), 0);
    assert_true(n.cordoned);
    /* cordons outlive the node's registration */
    assert_int_equal(dsv32_registry_cordon(E, "c3", "gone", NULL), 0);
    assert_int_equal(dsv32_registry_uncordon(E, "c3", "a0"), 0);
    end = now_ms() + 5000;
    while (dsv32_registry_view_cordoned(v, "a0") && now_ms() < end)
        usleep(5000);
    assert_false(dsv32_registry_view_cordoned(v, "a0"));
    assert_true(dsv32_registry_view_cordoned(v, "gone"));
    assert_int_equal(dsv32_registry_uncordon(E, "c3", "a0"), -ENOENT);
    assert_int_equal(dsv32_registry_cordon(E, "c3", "bad/id", NULL), -EINVAL);

    /* records that are not ours are skipped, not trusted */
    const char *junk = "{not json";
    assert_int_equal(dsv32_etcd_put(E, "/dsv32/c3/nodes/attn/junk", junk, strlen(junk), 0, NULL),
                     0);
    assert_int_equal(dsv32_etcd_put(E, "/dsv32/c3/nodes/attn/too/deep", "{}", 2, 0, NULL), 0);
    struct dsv32_registry *r2 = reg("c3", "a1", 5, 0);
    assert_true(wait_node(v, "attn", "a1", true, -1, 5000, NULL));
    struct dsv32_node_info list[8];
    assert_int_equal(dsv32_registry_view_list(v, NULL, list, 8), 2);
    dsv32_registry_free(r2);
    dsv32_registry_free(r);
    dsv32_registry_view_free(v);
}

/* The lease vanishes behind the registry's back (expired while the daemon was stopped in a
 * debugger, revoked by an operator): it registers again on a new lease, state kept. */
static void test_lease_lost(void **state)
{
    struct dsv32_registry_view *v = view("c4");
    struct dsv32_registry *r = reg("c4", "a0", 1, 0);
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_READY), 0);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    int64_t lease = dsv32_registry_lease(r);
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_READY, 5000, NULL));
    assert_int_equal(dsv32_etcd_lease_revoke(E, lease), 0);
    int64_t end = now_ms() + 5000;
    struct dsv32_node_info n = {0};
    while (now_ms() < end) {
        if (dsv32_registry_view_get(v, "attn", "a0", &n) == 0 && n.lease != lease)
            break;
        usleep(10000);
    }
    assert_true(n.lease != 0 && n.lease != lease);
    assert_int_equal(n.state, DSV32_NODE_READY);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    assert_int_equal(dsv32_registry_lease(r), n.lease);
    dsv32_registry_free(r);
    assert_true(wait_node(v, "attn", "a0", false, -1, 2000, NULL));
    dsv32_registry_view_free(v);
}

/* etcd goes away: the registry keeps its state and catches etcd up when it is back; a daemon
 * that starts meanwhile registers then; the view resumes. */
static void test_etcd_down(void **state)
{
    struct dsv32_registry_view *v = view("c5");
    struct dsv32_registry *r = reg("c5", "a0", 2, 0);
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_READY), 0);
    assert_int_equal(dsv32_registry_flush(r, 5000), 0);
    int64_t lease = dsv32_registry_lease(r);
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_READY, 5000, NULL));

    assert_int_equal(etcd_fixture_kill(&fx), 0);
    assert_int_equal(dsv32_registry_set_state(r, DSV32_NODE_DRAINING), 0);
    assert_int_equal(dsv32_registry_state(r), DSV32_NODE_DRAINING);
    int64_t t0 = now_ms();
    struct dsv32_registry *late = reg("c5", "a1", 2, 0); /* etcd down: still fine */
    assert_true(now_ms() - t0 < 500);
    assert_int_equal(dsv32_registry_flush(r, 300), DSV32_ETIMEOUT);
    assert_false(dsv32_registry_synced(r));
    usleep(2500000); /* longer than the TTL */
    assert_int_equal(etcd_fixture_restart(&fx), 0);

    assert_int_equal(dsv32_registry_flush(r, 10000), 0);
    assert_int_equal(dsv32_registry_flush(late, 10000), 0);
    /* etcd renews every lease when it comes back: the old one is still good */
    assert_int_equal(dsv32_registry_lease(r), lease);
    assert_true(wait_node(v, "attn", "a0", true, DSV32_NODE_DRAINING, 10000, NULL));
    assert_true(wait_node(v, "attn", "a1", true, DSV32_NODE_LOADING, 10000, NULL));
    /* still kept alive afterwards */
    usleep(2200000);
    struct dsv32_node_info n;
    assert_int_equal(dsv32_registry_view_get(v, "attn", "a0", &n), 0);
    int64_t ttl;
    assert_int_equal(dsv32_etcd_lease_ttl(E, n.lease, &ttl, NULL), 0);
    dsv32_registry_free(late);
    dsv32_registry_free(r);
    assert_true(wait_node(v, "attn", "a0", false, -1, 2000, NULL));
    assert_true(wait_node(v, "attn", "a1", false, -1, 2000, NULL));
    dsv32_registry_view_free(v);
}

int main(void)
{
    if (!etcd_fixture_binary()) {
        fprintf(stderr, "no etcd binary: skipped\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names_and_json),
        cmocka_unit_test(test_states),
        cmocka_unit_test(test_load_rate_limit),
        cmocka_unit_test(test_cordon_and_garbage),
        cmocka_unit_test(test_lease_lost),
        cmocka_unit_test(test_etcd_down),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
