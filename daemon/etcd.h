/* An etcd v3 client over rpc.h (etcd's own gRPC API, proto/etcd.proto): KV get/range/put/delete,
 * transactions with revision and value compares, leases (grant, revoke, time-to-live, one-shot
 * keepalive and a keeper thread that outlives etcd restarts), prefix watches delivered to a
 * callback and resumed from the last seen revision + 1 after a reconnect (no event lost or seen
 * twice; a compacted gap turns into a snapshot), and a leader election on a lease-bound key.
 * Every request waits for the connection (wait-for-ready) up to the configured timeout, so a
 * restarting etcd means slow answers, not spurious failures. Thread-safe. */
#ifndef DSV32_ETCD_H
#define DSV32_ETCD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct dsv32_etcd_config {
    const char *endpoint;   /* "127.0.0.1:2379", or any gRPC target ("dns:///etcd:2379") */
    int64_t timeout_ms;     /* per request; 0: 5000 */
    size_t max_recv_bytes;  /* largest response (ranges, watch batches); 0: 64 MiB */
    int64_t max_backoff_ms; /* reconnect backoff ceiling; 0: 1000 */
};

struct dsv32_etcd;

int dsv32_etcd_new(const struct dsv32_etcd_config *cfg, struct dsv32_etcd **ret);
/* After every watch, keeper, election and observer made from it. Accepts NULL. */
void dsv32_etcd_free(struct dsv32_etcd *e);

/* Errors: -DSV32_ETIMEOUT (no answer within the timeout: etcd down or unreachable), -ENOENT,
 * -EEXIST, -EINVAL, -E2BIG, -DSV32_EETCD (etcd refused: see the log). */

struct dsv32_etcd_kv {
    char *key;      /* NUL-terminated */
    uint8_t *value; /* value_len bytes, NUL-terminated for convenience */
    size_t value_len;
    int64_t create_revision, mod_revision, version, lease;
};

struct dsv32_etcd_range {
    struct dsv32_etcd_kv *kvs;
    size_t n;
    int64_t revision; /* the store's revision when read */
    int64_t count;    /* keys in the range (more than n when limited) */
    bool more;
};

void dsv32_etcd_kv_done(struct dsv32_etcd_kv *kv);
void dsv32_etcd_range_done(struct dsv32_etcd_range *r);

#define DSV32_ETCD_PREFIX 1u   /* the key is a prefix: every key that starts with it */
#define DSV32_ETCD_SNAPSHOT 2u /* watches: begin with the current range as a reset batch */

/* One key: 0 with it, -ENOENT when absent. ret_revision (may be NULL): the store's revision. */
int dsv32_etcd_get(struct dsv32_etcd *e, const char *key, struct dsv32_etcd_kv *ret_kv,
                   int64_t *ret_revision);
/* Keys in key order; limit 0: all. */
int dsv32_etcd_range(struct dsv32_etcd *e, const char *key, unsigned flags, int64_t limit,
                     struct dsv32_etcd_range *ret);
/* lease 0: none; -ENOENT when the lease does not exist. ret_revision may be NULL. */
int dsv32_etcd_put(struct dsv32_etcd *e, const char *key, const void *value, size_t value_len,
                   int64_t lease, int64_t *ret_revision);
/* Create-if-absent: -EEXIST when the key exists. */
int dsv32_etcd_create(struct dsv32_etcd *e, const char *key, const void *value, size_t value_len,
                      int64_t lease, int64_t *ret_revision);
int dsv32_etcd_delete(struct dsv32_etcd *e, const char *key, unsigned flags,
                      int64_t *ret_deleted);
/* Drops history before revision (tests, maintenance). */
int dsv32_etcd_compact(struct dsv32_etcd *e, int64_t revision);

/* ---- Transactions ---- */

enum dsv32_etcd_cmp_target {
    DSV32_ETCD_CMP_VERSION,
    DSV32_ETCD_CMP_CREATE, /* create_revision: 0 when the key is absent */
    DSV32_ETCD_CMP_MOD,    /* mod_revision */
    DSV32_ETCD_CMP_VALUE,
    DSV32_ETCD_CMP_LEASE,
};

enum dsv32_etcd_cmp_result {
    DSV32_ETCD_EQUAL,
    DSV32_ETCD_GREATER,
    DSV32_ETCD_LESS,
    DSV32_ETCD_NOT_EQUAL,
};

struct dsv32_etcd_cmp {
    const char *key;
    enum dsv32_etcd_cmp_target target;
    enum dsv32_etcd_cmp_result result;
    int64_t number;    /* VERSION, CREATE, MOD, LEASE */
    const void *value; /* VALUE */
    size_t value_len;
};

enum dsv32_etcd_op_type { DSV32_ETCD_OP_GET, DSV32_ETCD_OP_PUT, DSV32_ETCD_OP_DELETE };

struct dsv32_etcd_op {
    enum dsv32_etcd_op_type type;
    const char *key;
    unsigned flags; /* DSV32_ETCD_PREFIX for GET and DELETE */
    const void *value;
    size_t value_len;
    int64_t lease;
};

struct dsv32_etcd_txn_result {
    bool succeeded;
    int64_t revision;
    struct dsv32_etcd_range *ranges; /* one per GET of the branch that ran, in order */
    size_t n_ranges;
};

#define DSV32_ETCD_MAX_TXN_OPS 128 /* etcd's default --max-txn-ops */

/* If every compare holds, runs `then`, else `otherwise`, atomically. */
int dsv32_etcd_txn(struct dsv32_etcd *e, const struct dsv32_etcd_cmp *cmp, size_t n_cmp,
                   const struct dsv32_etcd_op *then, size_t n_then,
                   const struct dsv32_etcd_op *otherwise, size_t n_otherwise,
                   struct dsv32_etcd_txn_result *ret);
void dsv32_etcd_txn_result_done(struct dsv32_etcd_txn_result *r);

/* ---- Leases ---- */

int dsv32_etcd_lease_grant(struct dsv32_etcd *e, int64_t ttl_s, int64_t *ret_id,
                           int64_t *ret_ttl_s);
/* Deletes the lease and its keys; -ENOENT when it does not exist. */
int dsv32_etcd_lease_revoke(struct dsv32_etcd *e, int64_t id);
/* Seconds left and as granted; -ENOENT when expired or unknown. */
int dsv32_etcd_lease_ttl(struct dsv32_etcd *e, int64_t id, int64_t *ret_ttl_s,
                         int64_t *ret_granted_s);
/* One refresh; -ENOENT when the lease is gone. */
int dsv32_etcd_lease_keepalive(struct dsv32_etcd *e, int64_t id, int64_t *ret_ttl_s);

enum dsv32_etcd_lease_event {
    DSV32_ETCD_LEASE_GRANTED,   /* a new lease (the first, or after LOST): put the keys again */
    DSV32_ETCD_LEASE_LOST,      /* etcd says it is gone (expired, revoked); a new one follows */
    DSV32_ETCD_LEASE_UNCERTAIN, /* no keepalive answer for a whole TTL: it may have expired */
    DSV32_ETCD_LEASE_CONFIRMED, /* after UNCERTAIN: a keepalive went through, the lease lives */
};

/* Called on the keeper's thread; may call etcd, must not free the keeper. */
typedef void (*dsv32_etcd_lease_fn)(void *arg, enum dsv32_etcd_lease_event ev, int64_t lease);

struct dsv32_etcd_keeper;

/* Grants a lease of ttl_s seconds (1..3600) and keeps it alive from a thread of its own (every
 * ttl/3), through etcd restarts; when etcd says it is gone, grants a new one. Returns at once:
 * the first grant happens on the thread (GRANTED). fn may be NULL. */
int dsv32_etcd_keeper_new(struct dsv32_etcd *e, int64_t ttl_s, dsv32_etcd_lease_fn fn, void *arg,
                          struct dsv32_etcd_keeper **ret);
/* The lease now (0 while there is none). */
int64_t dsv32_etcd_keeper_lease(struct dsv32_etcd_keeper *k);
/* Waits up to timeout_ms for a lease: its id, or -DSV32_ETIMEOUT. */
int64_t dsv32_etcd_keeper_wait(struct dsv32_etcd_keeper *k, int64_t timeout_ms);
/* Stops the thread; revoke: also revoke the lease (deleting its keys; best effort, bounded by the
 * request timeout). Accepts NULL. */
void dsv32_etcd_keeper_free(struct dsv32_etcd_keeper *k, bool revoke);

/* ---- Watches ---- */

enum dsv32_etcd_event_type { DSV32_ETCD_EVENT_PUT, DSV32_ETCD_EVENT_DELETE };

struct dsv32_etcd_event {
    enum dsv32_etcd_event_type type;
    struct dsv32_etcd_kv kv; /* DELETE: key and mod_revision (the delete's revision) only */
};

struct dsv32_etcd_watch_batch {
    const struct dsv32_etcd_event *events;
    size_t n;
    int64_t revision; /* every change up to this revision has now been delivered */
    bool reset;       /* a snapshot of the whole watched range at `revision` (PUT events):
                         replace what was known (first batch with SNAPSHOT; after compaction) */
};

/* Called on the watch's thread, batches in revision order; the batch lives for the call only. */
typedef void (*dsv32_etcd_watch_fn)(void *arg, const struct dsv32_etcd_watch_batch *b);

struct dsv32_etcd_watch;

/* Watches a key (or prefix with DSV32_ETCD_PREFIX) from start_revision (0: from when the watch
 * reaches etcd, or after the snapshot with DSV32_ETCD_SNAPSHOT). Returns at once; a thread
 * connects, and reconnects as often as needed, resuming after the last revision delivered. */
int dsv32_etcd_watch_new(struct dsv32_etcd *e, const char *key, unsigned flags,
                         int64_t start_revision, dsv32_etcd_watch_fn fn, void *arg,
                         struct dsv32_etcd_watch **ret);
/* The last revision delivered (0 before the first batch). */
int64_t dsv32_etcd_watch_revision(struct dsv32_etcd_watch *w);
/* Reconnects since the start (tests, metrics). */
uint64_t dsv32_etcd_watch_reconnects(struct dsv32_etcd_watch *w);
/* Stops; no callback runs after it returns. Not from the watch's own callback. Accepts NULL. */
void dsv32_etcd_watch_free(struct dsv32_etcd_watch *w);

/* ---- Leader election ---- */

/* Called when this candidate becomes leader or stops being one (lease lost or uncertain, key
 * deleted, resigned). On an internal thread; must not block nor free the election. A loss is
 * reported after the state has changed: dsv32_etcd_election_is_leader can return false a moment
 * before fn(false) runs. */
typedef void (*dsv32_etcd_leader_fn)(void *arg, bool is_leader);

struct dsv32_etcd_election_config {
    const char *key;   /* "/dsv32/<cluster>/leader" */
    const char *value; /* this candidate (id, address) */
    int64_t ttl_s;     /* lease TTL; 0: 5 */
    dsv32_etcd_leader_fn fn;
    void *arg;
};

struct dsv32_etcd_election;

int dsv32_etcd_election_new(struct dsv32_etcd *e, const struct dsv32_etcd_election_config *cfg,
                            struct dsv32_etcd_election **ret);
/* Becomes leader: creates the key on this candidate's lease if absent, else waits for it to be
 * deleted and tries again. 0 when leader, -DSV32_ETIMEOUT, -DSV32_ECANCELLED (freed). A call
 * when already leader returns 0 at once. timeout_ms < 0: no limit. */
int dsv32_etcd_election_campaign(struct dsv32_etcd_election *el, int64_t timeout_ms);
bool dsv32_etcd_election_is_leader(struct dsv32_etcd_election *el);
/* Gives leadership up (deletes the key if it is still ours). */
int dsv32_etcd_election_resign(struct dsv32_etcd_election *el);
/* Resigns, revokes the lease, frees. Accepts NULL. */
void dsv32_etcd_election_free(struct dsv32_etcd_election *el);

/* The current leader's value (malloc'ed): 0, or -ENOENT when there is none. */
int dsv32_etcd_election_leader(struct dsv32_etcd *e, const char *key, char **ret_value);

/* Observes leadership: fn(arg, value or NULL, revision) at once with the current leader, then at
 * each change, on the observer's thread. */
typedef void (*dsv32_etcd_observe_fn)(void *arg, const char *leader, int64_t revision);

struct dsv32_etcd_observer;

int dsv32_etcd_observer_new(struct dsv32_etcd *e, const char *key, dsv32_etcd_observe_fn fn,
                            void *arg, struct dsv32_etcd_observer **ret);
void dsv32_etcd_observer_free(struct dsv32_etcd_observer *o);

#endif
