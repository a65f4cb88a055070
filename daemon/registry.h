/* Node registration in etcd and the cluster view built from it. A daemon registers under
 * /dsv32/<cluster>/nodes/<kind>/<id> on a lease (TTL 5 s by default) with a JSON record (address,
 * role, GPU, load, state loading -> ready -> draining) and keeps it current from a thread of its
 * own; when etcd is unreachable it keeps serving with what it has and registers again once etcd
 * is back (on a new lease if the old one expired); a clean stop revokes the lease, which deletes
 * the record at once. The view watches nodes/ and cordon/ of a cluster and keeps a local map
 * id -> node for the router and dsv32ctl. */
#ifndef DSV32_REGISTRY_H
#define DSV32_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "etcd.h"

#define DSV32_NODE_NAME_MAX 64  /* cluster, kind, id: [A-Za-z0-9._-], 1..63 bytes */
#define DSV32_NODE_ADDR_MAX 128 /* host:port */
#define DSV32_NODE_ROLE_MAX 16
#define DSV32_REGISTRY_MAX_NODES 4096 /* nodes (and cordons) a view keeps; more are ignored */

enum dsv32_node_state {
    DSV32_NODE_LOADING = 0, /* registered, weights loading: not placed yet */
    DSV32_NODE_READY,       /* takes work */
    DSV32_NODE_DRAINING,    /* finishes what it has, takes nothing new */
};

const char *dsv32_node_state_name(enum dsv32_node_state s);
int dsv32_node_state_parse(const char *s, enum dsv32_node_state *ret);

struct dsv32_node_load {
    uint32_t running; /* requests in the batch */
    uint32_t waiting; /* requests queued */
    uint64_t free_kv_blocks, total_kv_blocks;
};

struct dsv32_node_info {
    char kind[DSV32_NODE_NAME_MAX]; /* "attn", "expert", "router" */
    char id[DSV32_NODE_NAME_MAX];
    char address[DSV32_NODE_ADDR_MAX];
    char role[DSV32_NODE_ROLE_MAX]; /* attn: "prefill", "decode", "both"; others "" */
    int gpu;                        /* -1: none */
    enum dsv32_node_state state;
    struct dsv32_node_load load;
    /* from etcd, in views only */
    int64_t lease;
    int64_t mod_revision;
    bool cordoned;
};

/* Checks a cluster, kind or id name: 0 or -EINVAL. */
int dsv32_node_name_check(const char *name);
/* "/dsv32/<cluster>/nodes/<kind>/<id>" into buf: 0, -EINVAL, -ENOBUFS. */
int dsv32_registry_node_key(const char *cluster, const char *kind, const char *id, char *buf,
                            size_t cap);
/* The record as etcd holds it (malloc'ed JSON) and back. from_json: -DSV32_EFORMAT when
 * malformed; kind and id are not in the value (the key has them) and are left alone. */
int dsv32_node_info_to_json(const struct dsv32_node_info *n, char **ret_json);
int dsv32_node_info_from_json(const char *json, size_t len, struct dsv32_node_info *ret);

/* ---- Registration (daemons) ---- */

struct dsv32_registry_config {
    const char *cluster;
    const char *kind;
    const char *id;
    const char *address;
    const char *role;         /* NULL: "" */
    int gpu;                  /* -1: none */
    int64_t ttl_s;            /* lease TTL; 0: 5 */
    int64_t load_interval_ms; /* load updates reach etcd at most this often; 0: 1000 */
};

struct dsv32_registry;

/* Starts in state LOADING and registers from a thread (at once if etcd answers; -EINVAL for bad
 * names). Fails only on bad arguments or resources, never because etcd is down. */
int dsv32_registry_new(struct dsv32_etcd *e, const struct dsv32_registry_config *cfg,
                       struct dsv32_registry **ret);
/* LOADING -> READY -> DRAINING (-> READY again: undrain); -EINVAL for a move back to LOADING.
 * Written to etcd at once (in the background). */
int dsv32_registry_set_state(struct dsv32_registry *r, enum dsv32_node_state st);
/* Written at most every load_interval_ms. */
void dsv32_registry_set_load(struct dsv32_registry *r, const struct dsv32_node_load *load);
enum dsv32_node_state dsv32_registry_state(struct dsv32_registry *r);
/* Whether etcd holds the latest record (as of the last write). */
bool dsv32_registry_synced(struct dsv32_registry *r);
/* Waits until etcd holds every change made so far: 0 or -DSV32_ETIMEOUT. */
int dsv32_registry_flush(struct dsv32_registry *r, int64_t timeout_ms);
/* The lease the record is on now (0: none yet). */
int64_t dsv32_registry_lease(struct dsv32_registry *r);
/* Deregisters (revokes the lease: the record goes at once; if etcd is unreachable it expires
 * with its TTL) and frees. Accepts NULL. */
void dsv32_registry_free(struct dsv32_registry *r);

/* ---- Operations (dsv32ctl, the Admin service) ---- */

/* Marks a node id cordoned (no new work placed on it) with a reason, or clears the mark. */
int dsv32_registry_cordon(struct dsv32_etcd *e, const char *cluster, const char *id,
                          const char *reason);
int dsv32_registry_uncordon(struct dsv32_etcd *e, const char *cluster, const char *id);

/* ---- The cluster view (router, dsv32ctl) ---- */

/* Called on a watch thread after the view changed; must not block nor free the view. */
typedef void (*dsv32_registry_view_fn)(void *arg);

struct dsv32_registry_view;

int dsv32_registry_view_new(struct dsv32_etcd *e, const char *cluster, dsv32_registry_view_fn fn,
                            void *arg, struct dsv32_registry_view **ret);
void dsv32_registry_view_free(struct dsv32_registry_view *v);
/* Both snapshots (nodes and cordons) loaded. */
bool dsv32_registry_view_synced(struct dsv32_registry_view *v);
/* A copy of one node: 0 or -ENOENT. */
int dsv32_registry_view_get(struct dsv32_registry_view *v, const char *kind, const char *id,
                            struct dsv32_node_info *ret);
/* Copies up to cap nodes of a kind (NULL: all) ordered by kind then id; returns how many there
 * are (may exceed cap). */
size_t dsv32_registry_view_list(struct dsv32_registry_view *v, const char *kind,
                                struct dsv32_node_info *out, size_t cap);
bool dsv32_registry_view_cordoned(struct dsv32_registry_view *v, const char *id);
/* A counter bumped by every change; wait blocks until it differs from `seen`: 0 or
 * -DSV32_ETIMEOUT. Loop: check what you need, else wait for the next change. */
uint64_t dsv32_registry_view_version(struct dsv32_registry_view *v);
int dsv32_registry_view_wait(struct dsv32_registry_view *v, uint64_t seen, int64_t timeout_ms);

#endif
