/* Operator actions on a cluster through etcd, shared by the router's Admin service, dsv32ctl and
 * the daemons. Drain: a key /dsv32/<cluster>/drain/<kind>/<id> written on the node's own lease,
 * so it lives exactly as long as that registration; the daemon watches its own key and moves to
 * DRAINING when it appears (takes no new work, finishes what it runs; an expert shard also
 * withdraws from its EP group so the group moves on to an epoch without it). Reading: the nodes
 * with their leases' time left and cordon reasons, the EP groups of a cluster and a group's
 * current epoch record (parse it with dsv32_group_epoch_from_json). */
#ifndef DSV32_OPS_H
#define DSV32_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "etcd.h"
#include "registry.h"

#define DSV32_OPS_REASON_MAX 256
#define DSV32_OPS_MAX_GROUPS 256

/* "/dsv32/<cluster>/drain/<kind>/<id>" into buf: 0, -EINVAL (bad names), -ENOBUFS. */
int dsv32_ops_drain_key(const char *cluster, const char *kind, const char *id, char *buf,
                        size_t cap);

/* One node of the cluster as etcd holds it. */
struct dsv32_ops_node {
    struct dsv32_node_info info; /* kind, id, lease, mod_revision, cordoned filled in */
    int64_t ttl_s;               /* seconds left on its lease; -1: not asked or unknown */
    int64_t granted_ttl_s;       /* the lease's TTL as granted; -1: unknown */
    bool drain_requested;        /* its drain key exists */
    char cordon_reason[DSV32_OPS_REASON_MAX];
};

/* The nodes of a cluster (kind NULL: all) sorted by kind then id, with cordon marks and drain
 * requests; with_ttl also asks etcd for each lease's time left (one request per node). *ret is
 * malloc'ed (free it); ret_revision (may be NULL): the revision the nodes were read at. */
int dsv32_ops_list_nodes(struct dsv32_etcd *e, const char *cluster, const char *kind,
                         bool with_ttl, struct dsv32_ops_node **ret, size_t *ret_n,
                         int64_t *ret_revision);

/* Finds a node by id (kind NULL or "": any kind; -EINVAL with why set when the id is taken by
 * nodes of several kinds). 0, -ENOENT. */
int dsv32_ops_find_node(struct dsv32_etcd *e, const char *cluster, const char *kind,
                        const char *id, struct dsv32_node_info *ret, char *why, size_t why_len);

/* Asks a node to drain: writes its drain key on its lease (endpoint: etcd's address, for the
 * group check). Errors, with the reason in why:
 * -ENOENT (no such node), -EINVAL (bad names, ambiguous id, a router: routers are stopped, not
 * drained), -EBUSY (the last expert shard of an EP group: the group would lose its experts).
 * Draining twice is not an error. ret_node (may be NULL): the node as read before the request. */
int dsv32_ops_drain(struct dsv32_etcd *e, const char *endpoint, const char *cluster,
                    const char *kind, const char *id, struct dsv32_node_info *ret_node, char *why,
                    size_t why_len);

/* Called once, on the watch's thread, when the node's drain key appears (or exists at start). */
typedef void (*dsv32_ops_drain_fn)(void *arg);

struct dsv32_ops_drain_watch;

/* A daemon watches its own drain key. */
int dsv32_ops_drain_watch_new(struct dsv32_etcd *e, const char *cluster, const char *kind,
                              const char *id, dsv32_ops_drain_fn fn, void *arg,
                              struct dsv32_ops_drain_watch **ret);
/* Whether the drain came (also true after fn ran). */
bool dsv32_ops_drain_watch_fired(struct dsv32_ops_drain_watch *w);
/* No callback runs after it returns. Accepts NULL. */
void dsv32_ops_drain_watch_free(struct dsv32_ops_drain_watch *w);

/* The EP groups of a cluster (those with any key under groups/), sorted, read keys-only from the
 * etcd at `endpoint`: names[i] for i < *ret_n (at most DSV32_OPS_MAX_GROUPS). */
int dsv32_ops_list_groups(const char *endpoint, const char *cluster,
                          char names[][DSV32_NODE_NAME_MAX], size_t cap, size_t *ret_n);

/* A group's current epoch: its number and record (malloc'ed JSON, NUL-terminated). 0, or -ENOENT
 * when the group has no epoch yet. ret_revision (may be NULL): the revision read at. */
int dsv32_ops_group_current(struct dsv32_etcd *e, const char *cluster, const char *group,
                            uint64_t *ret_epoch, char **ret_json, size_t *ret_len,
                            int64_t *ret_revision);

#endif
