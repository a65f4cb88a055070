/* EP-group epochs against a real etcd: candidates on leases, the leader publishing only when the
 * membership changes or a member asks (bump), members sorted into ranks with a placement,
 * followers seeing every epoch, and a candidate whose lease goes leaving the next epoch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "error.h"
#include "etcd_fixture.h"
#include "group.h"

static struct etcd_fixture fx;
static struct dsv32_etcd *etcd;
static struct dsv32_config cfg;

static int setup(void **state)
{
    if (!etcd_fixture_binary()) {
        print_message("no etcd binary: skipped\n");
        exit(77);
    }
    if (etcd_fixture_start(&fx) < 0 || dsv32_config_load(GOLDEN_DIR "/tiny-fp8", &cfg) < 0)
        return -1;
    struct dsv32_etcd_config ec = {.endpoint = fx.endpoint};
    return dsv32_etcd_new(&ec, &etcd);
}

static int teardown(void **state)
{
    dsv32_etcd_free(etcd);
    etcd_fixture_stop(&fx);
    return 0;
}

struct seen {
    uint64_t epochs[16];
    int n;
};

static void on_epoch(void *arg, const struct dsv32_group_epoch *e)
{
    struct seen *s = arg;
    if (s->n < 16)
        s->epochs[s->n++] = e->epoch;
}

static void join(const char *kind, const char *id, int port, int64_t lease)
{
    struct dsv32_group_member m = {.gpu = -1};
    snprintf(m.kind, sizeof(m.kind), "%s", kind);
    snprintf(m.id, sizeof(m.id), "%s", id);
    snprintf(m.comm, sizeof(m.comm), "127.0.0.1:%d", port);
    assert_int_equal(dsv32_group_join(etcd, "c", "g", &m, lease), 0);
}

static struct dsv32_group_epoch *current(void)
{
    struct dsv32_etcd_kv kv;
    assert_int_equal(dsv32_etcd_get(etcd, "/dsv32/c/groups/g/current", &kv, NULL), 0);
    char key[128];
    snprintf(key, sizeof(key), "/dsv32/c/groups/g/epoch/%s", (char *)kv.value);
    dsv32_etcd_kv_done(&kv);
    assert_int_equal(dsv32_etcd_get(etcd, key, &kv, NULL), 0);
    struct dsv32_group_epoch *e = malloc(sizeof(*e));
    assert_int_equal(dsv32_group_epoch_from_json((char *)kv.value, kv.value_len, e), 0);
    dsv32_etcd_kv_done(&kv);
    return e;
}

static void test_epochs(void **state)
{
    struct seen seen = {0};
    struct dsv32_group_follower *f;
    assert_int_equal(dsv32_group_follow(etcd, "c", "g", on_epoch, &seen, &f), 0);
    int64_t lease, ttl;
    assert_int_equal(dsv32_etcd_lease_grant(etcd, 2, &lease, &ttl), 0);
    join("expert", "x-b", 3001, 0);
    join("attn", "a-1", 2001, 0);
    join("expert", "x-a", 3000, lease); /* this one goes with its lease */
    uint64_t ep;
    assert_int_equal(dsv32_group_lead(etcd, "c", "g", &cfg, "tcp", 1, NULL, &ep), 0);
    assert_int_equal(ep, 1);
    struct dsv32_group_epoch *e = current();
    assert_int_equal(e->n_attn, 1);
    assert_int_equal(e->n_shards, 2);
    assert_string_equal(e->members[0].id, "a-1");
    assert_string_equal(e->members[1].id, "x-a"); /* sorted by id */
    assert_string_equal(e->members[2].comm, "127.0.0.1:3001");
    assert_int_equal(dsv32_group_rank_of(e, "expert", "x-b"), 2);
    /* every (MoE layer, expert) has a home among the 2 shards, one layer's hot expert twice */
    for (int l = 1; l < 4; l++)
        for (int x = 0; x < 16; x++)
            assert_true(dsv32_placement_owners(&e->placement, l, x)[0] >= 0);
    dsv32_group_epoch_done(e);
    free(e);
    /* nothing changed: no new epoch */
    assert_int_equal(dsv32_group_lead(etcd, "c", "g", &cfg, "tcp", 1, NULL, &ep), 0);
    assert_int_equal(ep, 1);
    /* a member asks for a fresh epoch of the same members */
    assert_int_equal(dsv32_group_request_new_epoch(etcd, "c", "g", 1), 0);
    assert_int_equal(dsv32_group_lead(etcd, "c", "g", &cfg, "tcp", 1, NULL, &ep), 0);
    assert_int_equal(ep, 2);
    assert_int_equal(dsv32_group_lead(etcd, "c", "g", &cfg, "tcp", 1, NULL, &ep), 0);
    assert_int_equal(ep, 2); /* the request was for epoch 1: answered */
    /* x-a's lease expires: the next epoch is without it */
    for (int i = 0; i < 50 && ep == 2; i++) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
        assert_int_equal(dsv32_group_lead(etcd, "c", "g", &cfg, "tcp", 1, NULL, &ep), 0);
    }
    assert_int_equal(ep, 3);
    e = current();
    assert_int_equal(e->n_shards, 1);
    assert_int_equal(dsv32_group_rank_of(e, "expert", "x-a"), -1);
    dsv32_group_epoch_done(e);
    free(e);
    /* the follower saw the epochs in order */
    for (int i = 0; i < 50 && seen.n < 3; i++) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    dsv32_group_follower_free(f);
    assert_true(seen.n >= 1);
    for (int i = 1; i < seen.n; i++)
        assert_true(seen.epochs[i] > seen.epochs[i - 1]);
    assert_int_equal(seen.epochs[seen.n - 1], 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_epochs)};
    return cmocka_run_group_tests(tests, setup, teardown);
}
