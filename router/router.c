/* The router's life cycle: model facts and tokenizer, the etcd view of the cluster, registration
 * as a router node, the gRPC server with its services, and a graceful stop that lets streams in
 * progress finish. */
#include "router.h"

#include "error.h"
#include "ep.h"
#include "group.h"
#include "log.h"
#include "notify.h"
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The group-leader role: one router of the cluster (the election's winner) publishes the EP
 * group's epochs; the others stand by and take over when its lease goes. */
static void *leader_main(void *arg)
{
    struct router *r = arg;
    while (!atomic_load(&r->stopping)) {
        if (!dsv32_etcd_election_is_leader(r->election)) {
            int rc = dsv32_etcd_election_campaign(r->election, 1000);
            if (rc < 0)
                continue;
            log_info("leader of cluster %s: publishing the epochs of group %s", r->cfg.cluster,
                     r->cfg.ep_group);
        }
        uint64_t ep = 0;
        int rc = dsv32_group_lead(r->etcd, r->cfg.cluster, r->cfg.ep_group, &r->mcfg,
                                  r->cfg.ep_transport, r->cfg.ep_redundant, r->ep_load, &ep);
        if (rc == 0)
            atomic_store(&r->epoch, ep);
        else if (rc != DSV32_EEPOCH)
            log_warn("group %s: %s", r->cfg.ep_group, dsv32_strerror(rc));
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

void router_free(struct router *r)
{
    if (!r)
        return;
    atomic_store(&r->stopping, 1);
    dsv32_metrics_stop(r->metrics);
    if (r->leader_started)
        pthread_join(r->leader_thread, NULL);
    dsv32_etcd_election_free(r->election);
    dsv32_rpc_server_free(r->server); /* waits for handlers; workers finish their calls below */
    for (int i = 0; i < 600 && atomic_load(&r->workers) > 0; i++) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    dsv32_rpc_health_free(r->health);
    dsv32_registry_free(r->reg);
    dsv32_registry_view_free(r->view);
    for (int i = 0; i < r->n_clients; i++)
        dsv32_rpc_client_free(r->clients[i].c);
    dsv32_etcd_free(r->etcd);
    dsv32_tok_free(r->tok);
    free(r->ep_load);
    dsv32_notify_watchdog_stop(r->watchdog);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* Sums the routed load of the --ep-stats files in `list` (comma-separated) into r->ep_load. */
static int read_ep_load(struct router *r, const char *list)
{
    const size_t n = (size_t)r->mcfg.num_hidden_layers * (size_t)r->mcfg.n_routed_experts;
    r->ep_load = calloc(n ? n : 1, sizeof(double));
    char *copy = strdup(list);
    int rc = r->ep_load && copy ? 0 : -ENOMEM;
    char *save = NULL;
    for (char *path = copy ? strtok_r(copy, ",", &save) : NULL; path && rc == 0;
         path = strtok_r(NULL, ",", &save)) {
        FILE *f = fopen(path, "rb");
        char *text = NULL;
        size_t len = 0;
        if (f) {
            fseek(f, 0, SEEK_END);
            long sz = ftell(f);
            fseek(f, 0, SEEK_SET);
            text = sz >= 0 ? malloc((size_t)sz + 1) : NULL;
            len = text ? fread(text, 1, (size_t)sz, f) : 0;
            fclose(f);
        }
        if (!text) {
            log_error("--ep-load %s: cannot read it", path);
            rc = -ENOENT;
            break;
        }
        text[len] = 0;
        if ((rc = dsv32_ep_load_add_json(text, &r->mcfg, r->ep_load)) < 0)
            log_error("--ep-load %s: not the routed load (dsv32-attn --ep-stats) of this model",
                      path);
        free(text);
    }
    free(copy);
    return rc;
}

int router_new(const struct router_config *cfg, struct router **ret)
{
    struct router *r = calloc(1, sizeof(*r));
    int rc;
    if (!r)
        return -ENOMEM;
    r->cfg = *cfg;
    pthread_mutex_init(&r->lock, NULL);
    dsv32_notify_watchdog_start(NULL, NULL, &r->watchdog);
    if ((rc = dsv32_config_load(cfg->model_dir, &r->mcfg)) < 0) {
        log_error("%s", dsv32_load_error());
        goto fail;
    }
    const char *tdir = cfg->tokenizer_dir ? cfg->tokenizer_dir : cfg->model_dir;
    if ((rc = dsv32_tok_load(tdir, &r->tok)) < 0) {
        log_error("tokenizer in %s: %s", tdir, dsv32_strerror(rc));
        goto fail;
    }
    r->think_end_id = dsv32_tok_token_id(r->tok, "</think>");
    if (r->think_end_id < 0)
        r->think_end_id = -1;
    if (cfg->ep_load && (rc = read_ep_load(r, cfg->ep_load)) < 0)
        goto fail;
    if (r->cfg.context <= 0 || r->cfg.context > r->mcfg.max_position_embeddings)
        r->cfg.context = r->mcfg.max_position_embeddings;
    if (r->cfg.max_inflight <= 0)
        r->cfg.max_inflight = 256;
    if (r->cfg.daemon_timeout_ms <= 0)
        r->cfg.daemon_timeout_ms = 120000;
    if (r->cfg.max_attempts <= 0)
        r->cfg.max_attempts = 4;
    /* latency buckets in seconds: first token up to minutes (long prefills queue), per-token
     * from a millisecond */
    static const double ttft_b[] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
    static const double tpot_b[] = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5};
    static const double e2e_b[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600};
    dsv32_histogram_init(&r->ttft, ttft_b, (int)(sizeof(ttft_b) / sizeof(ttft_b[0])));
    dsv32_histogram_init(&r->tpot, tpot_b, (int)(sizeof(tpot_b) / sizeof(tpot_b[0])));
    dsv32_histogram_init(&r->e2e, e2e_b, (int)(sizeof(e2e_b) / sizeof(e2e_b[0])));
    if (!r->cfg.model_name) {
        const char *slash = strrchr(cfg->model_dir, '/');
        r->cfg.model_name = slash && slash[1] ? slash + 1 : cfg->model_dir;
    }
    struct dsv32_etcd_config ec = {.endpoint = cfg->etcd};
    if ((rc = dsv32_etcd_new(&ec, &r->etcd)) < 0 ||
        (rc = dsv32_registry_view_new(r->etcd, cfg->cluster, NULL, NULL, &r->view)) < 0) {
        log_error("etcd %s: %s", cfg->etcd, dsv32_strerror(rc));
        goto fail;
    }
    struct dsv32_rpc_server_config sc = {.listen = cfg->listen, .max_recv_bytes = 16u << 20,
                                         .max_send_bytes = 64u << 20, .max_stream_queue = 1024,
                                         .max_calls = (uint32_t)r->cfg.max_inflight + 64,
                                         .admin_token = cfg->admin_token,
                                         .admin_allow_remote = cfg->admin_allow_remote};
    if ((rc = dsv32_rpc_server_new(&sc, &r->server)) < 0 ||
        (rc = dsv32_rpc_health_new(r->server, &r->health)) < 0 || (rc = router_add_generate(r)) < 0 ||
        (rc = router_add_admin(r)) < 0 || (rc = dsv32_rpc_server_start(r->server, &r->port)) < 0) {
        log_error("gRPC server on %s: %s", cfg->listen, dsv32_strerror(rc));
        goto fail;
    }
    char address[DSV32_NODE_ADDR_MAX];
    const char *colon = strrchr(cfg->listen, ':');
    snprintf(address, sizeof(address), "%.*s:%d", colon ? (int)(colon - cfg->listen) : 0,
             cfg->listen, r->port);
    struct dsv32_registry_config rc2 = {.cluster = cfg->cluster, .kind = "router", .id = cfg->id,
                                        .address = address, .gpu = -1, .ttl_s = cfg->lease_ttl_s};
    if ((rc = dsv32_registry_new(r->etcd, &rc2, &r->reg)) < 0) {
        log_error("registration: %s", dsv32_strerror(rc));
        goto fail;
    }
    dsv32_registry_set_state(r->reg, DSV32_NODE_READY);
    if (cfg->ep_group) {
        char key[256], value[256];
        snprintf(key, sizeof(key), "/dsv32/%s/leader", cfg->cluster);
        snprintf(value, sizeof(value), "%s %s", cfg->id, address);
        if (!r->cfg.ep_transport)
            r->cfg.ep_transport = "tcp";
        struct dsv32_etcd_election_config elc = {.key = key, .value = value,
                                                 .ttl_s = cfg->lease_ttl_s};
        if ((rc = dsv32_etcd_election_new(r->etcd, &elc, &r->election)) < 0 ||
            (rc = pthread_create(&r->leader_thread, NULL, leader_main, r)) != 0) {
            rc = rc > 0 ? -rc : rc;
            log_error("group leader election: %s", dsv32_strerror(rc));
            goto fail;
        }
        r->leader_started = 1;
    }
    dsv32_rpc_health_set(r->health, "", DSV32_RPC_HEALTH_SERVING);
    dsv32_rpc_health_set(r->health, "dsv32.v1.Generate", DSV32_RPC_HEALTH_SERVING);
    /* before --port-file: whoever reads that finds this too */
    if (cfg->metrics_listen && (rc = dsv32_metrics_start(cfg->metrics_listen, cfg->metrics_port_file,
                                                         router_fill_metrics, r, &r->metrics)) < 0)
        goto fail;
    if (cfg->port_file) {
        FILE *f = fopen(cfg->port_file, "w");
        if (!f || fprintf(f, "%d\n", r->port) < 0 || fclose(f) != 0) {
            rc = -EIO;
            log_error("%s: cannot write the port", cfg->port_file);
            goto fail;
        }
    }
    log_info("serving the dsv32.v1 API for %s on %s (cluster %s, etcd %s)", r->cfg.model_name,
             address, cfg->cluster, cfg->etcd);
    *ret = r;
    return 0;
fail:
    router_free(r);
    return rc;
}

int router_run(struct router *r, volatile int *stop)
{
    dsv32_notify_ready();
    while (!*stop) {
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
        dsv32_notify_status("%d requests in progress, %llu failovers", atomic_load(&r->inflight),
                            (unsigned long long)atomic_load(&r->failovers));
    }
    dsv32_notify_stopping();
    dsv32_rpc_health_set(r->health, "", DSV32_RPC_HEALTH_NOT_SERVING);
    /* let streams in progress finish (up to 30 s) before the server goes away */
    for (int i = 0; i < 300 && atomic_load(&r->inflight) > 0; i++) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return 0;
}
