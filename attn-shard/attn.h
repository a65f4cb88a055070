/* dsv32-attn: the attention daemon. It holds the model except (in expert-parallel mode) the
 * routed experts, the paged KV cache and a continuous-batching scheduler, and serves the router
 * through dsv32.cluster.v1.Attn (Run streams one request's committed tokens, Cancel, Status) and
 * grpc.health.v1.Health. */
#ifndef DSV32_ATTN_H
#define DSV32_ATTN_H

#include <stdint.h>

struct attn_config {
    const char *model_dir;
    const char *tokenizer_dir; /* default: model_dir */
    const char *listen;        /* gRPC address; port 0 picks one */
    const char *id;
    const char *role;          /* "both", "prefill", "decode" */
    const char *backend;       /* "cpu", "cuda" */
    int gpu;
    int cpu_threads;           /* cpu backend matrix threads (default 1) */
    int max_seqs, max_batch_tokens, max_seq_len, kv_blocks, max_queue;
    const char *port_file;     /* the bound port is written here once serving */
    /* cluster membership */
    const char *etcd;          /* NULL: standalone */
    const char *cluster;
    int lease_ttl_s;
    const char *advertise;     /* address others use to reach us; default: listen host + port */
    /* expert parallelism: the routed experts live on the group's expert shards */
    const char *ep_group;      /* NULL: experts in this process */
    const char *comm_host;     /* host of the EP transport listener (tcp) */
    int ep_timeout_ms;         /* an exchange with no answer for this long: the peer failed */
    const char *ep_stats;      /* at exit, the EP counters and routed load written here as JSON
                                * (dsv32-router --ep-load reads them) */
    const char *metrics_listen;    /* HOST:PORT of GET /metrics (NULL: none) */
    const char *metrics_port_file; /* the bound metrics port is written here */
    int stats_interval_s;      /* an engine throughput line in the log this often (0: none) */
    int ep_wire_bf16;          /* activations to and from the shards in bf16 (default f32: the
                                * single-process engine's numbers exactly) */
};

struct attn;

int attn_new(const struct attn_config *cfg, struct attn **ret);
/* Serves until attn_stop (from a signal handler's flag); returns 0 after a clean drain. */
int attn_run(struct attn *a, volatile int *stop_flag);
void attn_free(struct attn *a);

#endif
