/* EP groups in etcd: who is in the group at each epoch, with ranks, the expert placement and the
 * communicator bootstrap. Keys under /dsv32/<cluster>/groups/<group>/:
 *   candidates/<kind>/<id>  a daemon that wants to take part (its comm address, GPU), on the
 *                           daemon's lease, so it disappears with the daemon
 *   epoch/<n>               the record of epoch n (JSON), written once by the group leader
 *   current                 n, moved by the leader in a transaction (compare-and-swap)
 * Members follow `current`; at every new epoch they tear the old communicator down and build
 * the new one. The leader (the router that holds the election) publishes a new epoch whenever
 * the set of live candidates differs from the current epoch's members. */
#ifndef DSV32_GROUP_H
#define DSV32_GROUP_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "ep.h"
#include "etcd.h"

#define DSV32_GROUP_MAX_MEMBERS 256

struct dsv32_group_member {
    char kind[64]; /* "attn" or "expert" */
    char id[64];
    char comm[128]; /* tcp listener host:port */
    int gpu;
};

struct dsv32_group_epoch {
    uint64_t epoch;
    int n_attn, n_shards;
    struct dsv32_group_member members[DSV32_GROUP_MAX_MEMBERS]; /* attn ranks, then shards */
    struct dsv32_placement placement;
    char transport[8];                 /* "tcp" or "nccl" */
    uint8_t nccl_id[DSV32_NCCL_ID_BYTES];
};

void dsv32_group_epoch_done(struct dsv32_group_epoch *e);
char *dsv32_group_epoch_to_json(const struct dsv32_group_epoch *e);
int dsv32_group_epoch_from_json(const char *json, size_t len, struct dsv32_group_epoch *ret);
/* This member's rank in e: 0.., or -1. */
int dsv32_group_rank_of(const struct dsv32_group_epoch *e, const char *kind, const char *id);

/* Key of a group item: "/dsv32/<cluster>/groups/<group>/<rest>". */
int dsv32_group_key(const char *cluster, const char *group, const char *rest, char *buf,
                    size_t cap);

/* A daemon asks to take part (the key lives on `lease`: the registry's). */
int dsv32_group_join(struct dsv32_etcd *e, const char *cluster, const char *group,
                     const struct dsv32_group_member *me, int64_t lease);

/* ---- followers (members) ---- */

/* Called on a watch thread with each new epoch record (the record lives for the call). */
typedef void (*dsv32_group_epoch_fn)(void *arg, const struct dsv32_group_epoch *e);

struct dsv32_group_follower;

int dsv32_group_follow(struct dsv32_etcd *e, const char *cluster, const char *group,
                       dsv32_group_epoch_fn fn, void *arg, struct dsv32_group_follower **ret);
void dsv32_group_follower_free(struct dsv32_group_follower *f);

/* A member whose communicator failed while the membership stayed the same (a timeout, a peer
 * that restarted) asks the leader for a fresh epoch of the same members: key `bump` = the epoch
 * that failed. */
int dsv32_group_request_new_epoch(struct dsv32_etcd *e, const char *cluster, const char *group,
                                  uint64_t failed_epoch);

/* ---- the leader ---- */

/* Reads the candidates (the live ones: their keys exist) and the current epoch; when they differ
 * publishes epoch current + 1 with members sorted (attn by id, then expert by id), a balanced
 * placement for the model config (redundant copies of `redundant` experts per layer; balanced
 * by `load`, (n_layers, n_experts) routed pairs as dsv32_ep_load_add_json reads them, when not
 * NULL, else by count) and, for nccl, a fresh unique id. Returns the epoch now current (0: none),
 * or <0. */
int dsv32_group_lead(struct dsv32_etcd *e, const char *cluster, const char *group,
                     const struct dsv32_config *cfg, const char *transport, int redundant,
                     const double *load, uint64_t *ret_epoch);

#endif
