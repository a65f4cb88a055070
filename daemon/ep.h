/* Expert parallelism: attention daemons run everything but the routed experts; at every MoE layer
 * they dispatch each token's activation to the expert shards that hold its chosen experts, and
 * combine the weighted results that come back. The group's ranks: attention daemons first
 * [0, n_attn), then expert shards [n_attn, n_attn + n_shards).
 *
 * The step protocol. A step is the sequence of MoE layers in order; each layer is two exchanges:
 * dispatch (attention -> every shard) and combine (every shard -> attention). Every member takes
 * part in every exchange, with zero rows when it has nothing, so no collective waits on an idle
 * member. Each dispatch says whether its sender is active this step and how many rows its step
 * has (a small step's later dispatches then send every shard all rows, sizes known to both sides,
 * no sizes round); after the first layer's dispatch the shards tell everyone whether anybody was
 * (combine header), and a step where nobody was ends there, so an idle group costs one round
 * trip per poll, not a full step. Any
 * failed exchange fails the step on every member; the caller moves to a new epoch and runs it
 * again (nothing of a failed step was committed). */
#ifndef DSV32_EP_H
#define DSV32_EP_H

#include <stdint.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "model.h"

/* Which shard(s) hold each (layer, routed expert). */
struct dsv32_placement {
    int n_layers, n_experts, n_shards, max_replicas;
    int16_t *owner;   /* (n_layers, n_experts, max_replicas) shard index, -1 = none */
};

/* Balanced placement: each MoE layer's experts spread evenly over the shards (by load when
 * `load` (n_layers, n_experts) is given, else by count), plus `redundant` extra copies per layer
 * of the busiest experts on other shards. */
int dsv32_placement_build(const struct dsv32_config *cfg, int n_shards, int redundant,
                          const double *load, struct dsv32_placement *ret);
void dsv32_placement_done(struct dsv32_placement *p);
static inline const int16_t *dsv32_placement_owners(const struct dsv32_placement *p, int layer,
                                                    int expert)
{
    return p->owner + ((size_t)layer * p->n_experts + expert) * p->max_replicas;
}
/* 1 if shard holds (layer, expert) in p. */
int dsv32_placement_has(const struct dsv32_placement *p, int shard, int layer, int expert);
/* JSON text {"layers":..,"experts":..,"shards":..,"owner":[[[s,..],..],..]} and back. */
char *dsv32_placement_to_json(const struct dsv32_placement *p);
int dsv32_placement_from_json(const char *json, struct dsv32_placement *ret);

enum dsv32_ep_wire { DSV32_EP_WIRE_F32 = 0, DSV32_EP_WIRE_BF16 = 1 };

/* 1 if a member on this backend packs and unpacks its exchange blocks on the device (a GPU
 * backend with rows_pack/rows_unpack): its nccl communicator then takes device blocks (no
 * DSV32_COMM_NCCL_HOST_BUFFERS) and the rows never go through host memory. Members choose for
 * themselves: the blocks' bytes are the same either way. The communicator must then be on the
 * backend's GPU (the daemons put both on --gpu). */
int dsv32_ep_device_blocks(const struct dsv32_backend *be);

struct dsv32_ep_stats {
    uint64_t steps, idle_steps, rows_sent, exchanges;
    uint64_t moe_calls;   /* MoE layers this member took part in with rows */
    uint64_t moe_ns;      /* their wall time: pack, dispatch, the shards' compute, combine */
    /* moe_ns by phase: activations device <-> host (GPU backends on host blocks; 0 when the
     * blocks are packed where the rows are), routing and packing, the dispatch exchange, the
     * combine exchange (which waits for the shards' compute), summing the shards' results
     * (enqueued only, when the backend sums them where the rows are) */
    uint64_t copy_ns, pack_ns, dispatch_ns, combine_ns, unpack_ns;
};

/* ---- the attention side ---- */
struct dsv32_ep_client;

int dsv32_ep_client_new(struct dsv32_comm *comm, int n_attn, const struct dsv32_placement *pl,
                        const struct dsv32_config *cfg, struct dsv32_backend *be,
                        enum dsv32_ep_wire wire, int timeout_ms, struct dsv32_ep_client **ret);
void dsv32_ep_client_free(struct dsv32_ep_client *c);
/* Replaces the communicator (a new epoch, with n_attn attention ranks); the placement may change
 * too (NULL keeps it). */
int dsv32_ep_client_rebind(struct dsv32_ep_client *c, struct dsv32_comm *comm, int n_attn,
                           const struct dsv32_placement *pl);
/* The engine hook (struct dsv32_step_hooks.moe_routed) with ctx = the client. */
int dsv32_ep_moe_routed(void *ctx, int layer, float *y, const float *x, int rows,
                        const int32_t *ids, const float *w, int k);
/* Takes part in one step with zero rows (the daemon has no work while others may). Returns 1 if
 * some member was active (a full step ran), 0 if the whole group was idle. */
int dsv32_ep_client_idle_step(struct dsv32_ep_client *c);
/* After a failed engine step: if the client stopped in the middle of a step, the group is out of
 * step, so the communicator is aborted (every member fails over to the next epoch). */
void dsv32_ep_client_step_failed(struct dsv32_ep_client *c);
void dsv32_ep_client_get_stats(const struct dsv32_ep_client *c, struct dsv32_ep_stats *out);
/* The counters above plus the routed load since the client was made: (expert, row) pairs sent per
 * shard of the current placement ("shard_pairs") and per (layer, expert) ("expert_pairs", one
 * array per layer, empty for dense layers), as JSON text (free()), or NULL without memory. */
char *dsv32_ep_client_stats_json(const struct dsv32_ep_client *c);
/* Adds the "expert_pairs" of a stats JSON text into load (n_layers x n_experts of cfg), the input
 * of dsv32_placement_build; DSV32_EFORMAT when the text is not such a record for this config. */
int dsv32_ep_load_add_json(const char *json, const struct dsv32_config *cfg, double *load);

/* ---- the expert-shard side ---- */
struct dsv32_ep_server;

/* model holds (at least) the experts pl assigns to `shard`, prepared on be. */
int dsv32_ep_server_new(struct dsv32_comm *comm, int n_attn, int shard,
                        const struct dsv32_placement *pl, const struct dsv32_model *model,
                        struct dsv32_backend *be, int timeout_ms, struct dsv32_ep_server **ret);
void dsv32_ep_server_free(struct dsv32_ep_server *s);
int dsv32_ep_server_rebind(struct dsv32_ep_server *s, struct dsv32_comm *comm);
/* Serves one step: every MoE layer, all rows of one expert in one GEMM. Returns 1 after an
 * active step, 0 after an idle one, <0 on failure (the epoch is over). */
int dsv32_ep_server_step(struct dsv32_ep_server *s);
/* Rows each local expert processed so far ((n_layers, n_experts)), for load balancing. */
const uint64_t *dsv32_ep_server_expert_rows(const struct dsv32_ep_server *s);
/* Where a shard's time goes, over the MoE layers it served with rows. */
struct dsv32_ep_server_stats {
    uint64_t layers, rows;
    uint64_t wait_ns;    /* in the dispatch exchange (mostly waiting for the attention side) */
    uint64_t unpack_ns;  /* checking and unpacking the rows */
    uint64_t copy_ns;    /* rows to the device and results back (GPU backends) */
    uint64_t compute_ns; /* the expert GEMMs, to completion */
    uint64_t pack_ns;    /* packing the results */
    uint64_t send_ns;    /* the combine exchange */
};
void dsv32_ep_server_get_stats(const struct dsv32_ep_server *s, struct dsv32_ep_server_stats *out);

#endif
