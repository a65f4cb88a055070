/* dsv32-router: the public gRPC API (dsv32.v1.Generate, Tokenize, Detokenize, GetModelInfo, the
 * Admin service, grpc.health.v1.Health). It tokenizes and validates requests, places each one on
 * the least loaded ready attention daemon it sees in etcd, streams the committed tokens back with
 * their text, and when a daemon dies mid-request re-runs the request elsewhere from the prompt
 * plus the tokens already sent, so the client sees no token lost or repeated. */
#ifndef DSV32_ROUTER_H
#define DSV32_ROUTER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "config.h"
#include "notify.h"
#include "registry.h"
#include "metrics.h"
#include "rpc.h"
#include "tokenizer.h"

struct router_config {
    const char *model_dir;      /* config.json and the tokenizer */
    const char *tokenizer_dir;  /* default: model_dir */
    const char *model_name;     /* GetModelInfo; default: the directory's name */
    const char *listen;
    const char *etcd;
    const char *cluster;
    const char *id;
    const char *admin_token;    /* Admin service bearer token (NULL: Admin refuses everything) */
    int admin_allow_remote;
    const char *port_file;
    int max_inflight;           /* requests in progress; beyond: RESOURCE_EXHAUSTED */
    int max_attempts;           /* placements per request, failovers included */
    const char *metrics_listen;    /* HOST:PORT of GET /metrics (NULL: none) */
    const char *metrics_port_file;
    int daemon_timeout_ms;      /* no message from the serving daemon for this long (a request
                                 * queued behind long prefills included): it failed; default
                                 * 120000 (a dead daemon is found sooner, by its lease) */
    int context;                /* context length the router allows (default: the model's) */
    int lease_ttl_s;
    /* the group-leader role: publish the epochs of this EP group (NULL: no EP group) */
    const char *ep_group;
    const char *ep_transport;   /* "tcp" (default) or "nccl" */
    int ep_redundant;           /* redundant copies of the busiest experts per layer */
    const char *ep_load;        /* comma-separated dsv32-attn --ep-stats files: the placement
                                 * balances their summed routed load (NULL: by expert count) */
};

#define ROUTER_MAX_CLIENTS 256

struct router_client {
    char address[DSV32_NODE_ADDR_MAX];
    struct dsv32_rpc_client *c;
    int inflight;          /* requests this router has on that daemon */
    int64_t suspect_until; /* monotonic ms: a call to it just failed; placed elsewhere till then */
};

/* how Generate requests ended, for the metrics */
enum router_outcome { RO_OK, RO_CANCELLED, RO_INVALID, RO_REJECTED, RO_ERROR, ROUTER_OUTCOMES };
void router_fill_metrics(void *ctx, struct dsv32_metrics_text *t);

struct router {
    struct router_config cfg;
    struct dsv32_config mcfg;
    struct dsv32_tok *tok;
    int32_t think_end_id; /* "</think>", -1 if the tokenizer lacks it */
    struct dsv32_etcd *etcd;
    struct dsv32_registry_view *view;
    struct dsv32_registry *reg;
    struct dsv32_rpc_server *server;
    struct dsv32_rpc_health *health;
    struct dsv32_notify_watchdog *watchdog;
    int port;
    pthread_mutex_t lock; /* clients */
    struct router_client clients[ROUTER_MAX_CLIENTS];
    int n_clients;
    atomic_int inflight;
    atomic_uint_fast64_t next_rid;
    atomic_uint_fast64_t failovers;
    atomic_int workers;   /* worker threads alive */
    atomic_int stopping;
    /* group leader */
    struct dsv32_etcd_election *election;
    pthread_t leader_thread;
    int leader_started;
    atomic_uint_fast64_t epoch;
    double *ep_load;      /* (n_layers, n_experts) from cfg.ep_load, or NULL */
    /* --metrics-listen */
    struct dsv32_metrics *metrics;
    struct dsv32_histogram ttft, tpot, e2e; /* first token, per output token after it, whole request */
    atomic_uint_fast64_t req_outcome[ROUTER_OUTCOMES];
    atomic_uint_fast64_t prompt_tokens, generated_tokens;
};

int router_new(const struct router_config *cfg, struct router **ret);
int router_run(struct router *r, volatile int *stop_flag);
void router_free(struct router *r);

/* chat.c: renders chat messages with DeepSeek-V3.2's format and tokenizes them (special tokens
 * parsed); -EINVAL with the reason in err for bad messages. */
struct Dsv32__V1__Chat;
int router_render_chat(struct router *r, const struct Dsv32__V1__Chat *chat, int32_t **ret_ids,
                       size_t *ret_n, char *err, size_t err_len);

/* generate.c: registers Generate, Tokenize, Detokenize, GetModelInfo */
int router_add_generate(struct router *r);
/* admin.c: registers the Admin service */
int router_add_admin(struct router *r);

#endif
