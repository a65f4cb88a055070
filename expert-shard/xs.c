/* dsv32-expert: an expert shard. It registers in etcd, asks to join its EP group, and follows
 * the group's epochs: at each one it loads the routed experts the placement gives it (straight
 * from the checkpoint directory: only those tensors are read), builds the communicator of the
 * epoch and serves MoE layers, all rows of one expert in one GEMM, until the epoch ends. */
#include "clock.h"
#include "comm.h"
#include "engine.h"
#include "ep.h"
#include "error.h"
#include "group.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "ops.h"
#include "registry.h"
#include "rpc.h"
#include "safetensors.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct xs_config {
    const char *model_dir, *id, *listen, *etcd, *cluster, *group, *comm_host, *backend;
    const char *port_file;
    int gpu, lease_ttl_s, timeout_ms, cpu_threads;
    int stats_interval_s; /* a line on where the shard's time goes this often (0: none) */
    const char *metrics_listen, *metrics_port_file; /* GET /metrics (metrics.h) */
};

struct xs {
    struct xs_config cfg;
    struct dsv32_config mcfg;
    struct dsv32_etcd *etcd;
    struct dsv32_registry *reg;
    struct dsv32_rpc_server *server;
    struct dsv32_rpc_health *health;
    struct dsv32_notify_watchdog *watchdog;
    struct dsv32_comm_listener *lis;
    char comm_addr[128];
    struct dsv32_group_follower *follower;
    pthread_mutex_t lock;
    struct dsv32_group_epoch *pending; /* the newest epoch not applied yet */
    /* the epoch being served */
    struct dsv32_group_epoch *cur;
    struct dsv32_model *model;
    struct dsv32_backend *be;
    struct dsv32_comm *comm;
    struct dsv32_ep_server *srv;
    int64_t joined_lease;
    /* operator drain (ops.h): the shard leaves its group, the next epoch goes on without it */
    struct dsv32_ops_drain_watch *drain;
    atomic_int draining;
    int withdrawn;
    uint64_t steps;
    /* the shard's counters over all epochs (a new epoch's server counts from 0): the ended
     * epochs' sum and the current one's, under lock (the metrics endpoint's thread reads them) */
    const struct dsv32_ep_server *tot_srv;
    struct dsv32_ep_server_stats tot_ended, tot_cur;
    uint64_t epochs;
    struct dsv32_ep_server_stats stats_last; /* --stats-interval: the totals at the last line */
    double stats_t;
    struct dsv32_metrics *metrics;           /* --metrics-listen */
};

static void stats_add(struct dsv32_ep_server_stats *a, const struct dsv32_ep_server_stats *b)
{
    a->layers += b->layers;
    a->rows += b->rows;
    a->wait_ns += b->wait_ns;
    a->unpack_ns += b->unpack_ns;
    a->copy_ns += b->copy_ns;
    a->compute_ns += b->compute_ns;
    a->pack_ns += b->pack_ns;
    a->send_ns += b->send_ns;
}

/* after each step: the current server's counters into the totals */
static void note_stats(struct xs *x)
{
    struct dsv32_ep_server_stats st = {0};
    if (x->srv)
        dsv32_ep_server_get_stats(x->srv, &st);
    pthread_mutex_lock(&x->lock);
    if (x->srv != x->tot_srv) { /* the previous epoch's server is gone: keep its counts */
        stats_add(&x->tot_ended, &x->tot_cur);
        x->tot_srv = x->srv;
        x->epochs += x->srv != NULL;
    }
    x->tot_cur = st;
    pthread_mutex_unlock(&x->lock);
}

static struct dsv32_ep_server_stats totals(struct xs *x)
{
    pthread_mutex_lock(&x->lock);
    struct dsv32_ep_server_stats t = x->tot_ended;
    stats_add(&t, &x->tot_cur);
    pthread_mutex_unlock(&x->lock);
    return t;
}

static void fill_metrics(void *ctx, struct dsv32_metrics_text *t)
{
    struct xs *x = ctx;
    const struct dsv32_ep_server_stats c = totals(x);
    pthread_mutex_lock(&x->lock);
    const uint64_t epochs = x->epochs, steps = x->steps;
    const int serving = x->tot_srv != NULL;
    pthread_mutex_unlock(&x->lock);
    dsv32_metrics_one(t, "dsv32_ep_shard_serving", "gauge", "1 while a member of an EP-group epoch.",
                      serving);
    dsv32_metrics_one(t, "dsv32_ep_shard_epochs_total", "counter", "EP-group epochs served.",
                      (double)epochs);
    dsv32_metrics_one(t, "dsv32_ep_shard_steps_total", "counter", "Group steps with rows.", (double)steps);
    dsv32_metrics_one(t, "dsv32_ep_shard_layers_total", "counter", "MoE layers served with rows.",
                      (double)c.layers);
    dsv32_metrics_one(t, "dsv32_ep_shard_rows_total", "counter", "Token rows received.", (double)c.rows);
    dsv32_metrics_family(t, "dsv32_ep_shard_seconds_total", "counter",
                         "Time in those layers by phase (wait: in the dispatch exchange, mostly "
                         "waiting for the attention side).");
    const struct { const char *l; uint64_t v; } ph[] = {
        {"phase=\"wait\"", c.wait_ns},       {"phase=\"unpack\"", c.unpack_ns},
        {"phase=\"copy\"", c.copy_ns},       {"phase=\"compute\"", c.compute_ns},
        {"phase=\"pack\"", c.pack_ns},       {"phase=\"send\"", c.send_ns}};
    for (size_t i = 0; i < sizeof(ph) / sizeof(ph[0]); i++)
        dsv32_metrics_sample(t, ph[i].l, (double)ph[i].v * 1e-9);
}

/* --stats-interval: where the time of the MoE layers served since the last line went, per layer */
static void log_stats(struct xs *x)
{
    const struct dsv32_ep_server_stats st = totals(x), *l = &x->stats_last;
    const uint64_t n = st.layers - l->layers;
    if (n) {
        const double k = 1e-6 / (double)n;
        log_info("MoE: %llu layers, %.1f rows each; per layer ms: waiting for the dispatch %.2f, "
                 "unpack %.2f, copies %.2f, expert GEMMs %.2f, pack %.2f, combine exchange %.2f",
                 (unsigned long long)n, (double)(st.rows - l->rows) / (double)n,
                 (double)(st.wait_ns - l->wait_ns) * k, (double)(st.unpack_ns - l->unpack_ns) * k,
                 (double)(st.copy_ns - l->copy_ns) * k, (double)(st.compute_ns - l->compute_ns) * k,
                 (double)(st.pack_ns - l->pack_ns) * k, (double)(st.send_ns - l->send_ns) * k);
    }
    x->stats_last = st;
    x->stats_t = dsv32_mono_s();
}

static volatile int stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void on_epoch(void *arg, const struct dsv32_group_epoch *e)
{
    struct xs *x = arg;
    struct dsv32_group_epoch *copy = malloc(sizeof(*copy));
    if (!copy)
        return;
    *copy = *e;
    copy->placement.owner = NULL;
    if (e->n_shards) {
        size_t n = (size_t)e->placement.n_layers * e->placement.n_experts * e->placement.max_replicas;
        copy->placement.owner = malloc(sizeof(int16_t) * (n ? n : 1));
        if (!copy->placement.owner) {
            free(copy);
            return;
        }
        memcpy(copy->placement.owner, e->placement.owner, sizeof(int16_t) * n);
    }
    pthread_mutex_lock(&x->lock);
    if (x->pending) {
        dsv32_group_epoch_done(x->pending);
        free(x->pending);
    }
    x->pending = copy;
    /* a step blocked on the old epoch's communicator would wait for its deadline: end it now */
    if (x->comm)
        x->comm->ops->abort(x->comm);
    pthread_mutex_unlock(&x->lock);
}

static void drop_epoch(struct xs *x)
{
    dsv32_ep_server_free(x->srv);
    x->srv = NULL;
    pthread_mutex_lock(&x->lock);
    struct dsv32_comm *c = x->comm;
    x->comm = NULL;
    pthread_mutex_unlock(&x->lock);
    dsv32_comm_free(c);
}

struct want {
    const struct dsv32_placement *pl;
    int shard;
};

static int want_expert(void *arg, int layer, int expert)
{
    struct want *w = arg;
    return dsv32_placement_has(w->pl, w->shard, layer, expert);
}

/* The experts of `shard` under pl: loaded again only when they differ from what is loaded. */
static int load_experts(struct xs *x, const struct dsv32_placement *pl, int shard)
{
    if (x->model && x->cur && x->cur->n_shards) {
        int same = 1;
        int old = dsv32_group_rank_of(x->cur, "expert", x->cfg.id) - x->cur->n_attn;
        for (int l = 0; same && l < pl->n_layers; l++)
            for (int e = 0; same && e < pl->n_experts; e++)
                same = dsv32_placement_has(pl, shard, l, e) ==
                       dsv32_placement_has(&x->cur->placement, old, l, e);
        if (same)
            return 0;
    }
    if (x->model) {
        dsv32_model_release(x->model, x->be);
        dsv32_model_free(x->model);
        x->model = NULL;
    }
    struct want w = {pl, shard};
    struct dsv32_load_opts lo = {.skip_attention = 1, .want_expert = want_expert, .want_ctx = &w};
    int r = dsv32_model_load(x->cfg.model_dir, &lo, &x->model);
    if (r < 0) {
        log_error("%s", dsv32_load_error());
        return r;
    }
    if ((r = dsv32_model_prepare(x->model, x->be)) < 0) {
        log_error("preparing experts: %s", dsv32_strerror(r));
        return r;
    }
    log_info("shard %d: %lld expert tensors loaded (%.1f MB)", shard,
             (long long)x->model->n_weights_loaded, (double)x->model->bytes_loaded / 1e6);
    return 0;
}

static int apply_epoch(struct xs *x, struct dsv32_group_epoch *e)
{
    drop_epoch(x);
    int rank = dsv32_group_rank_of(e, "expert", x->cfg.id);
    if (rank < 0 || e->n_attn == 0) {
        log_info("epoch %llu: %s", (unsigned long long)e->epoch,
                 rank < 0 ? "not a member" : "no attention daemon in the group yet");
        goto keep;
    }
    const int shard = rank - e->n_attn, world = e->n_attn + e->n_shards;
    dsv32_notify_status("epoch %llu: shard %d of %d, loading experts", (unsigned long long)e->epoch,
                        shard, e->n_shards);
    int r = load_experts(x, &e->placement, shard);
    if (r < 0)
        goto keep;
    struct dsv32_comm *c = NULL;
    if (strcmp(e->transport, "nccl") == 0) {
        r = dsv32_comm_nccl_new(
            e->nccl_id, rank, world, x->cfg.gpu >= 0 ? x->cfg.gpu : 0, e->epoch, x->cfg.timeout_ms,
            dsv32_ep_device_blocks(x->be) ? 0 : DSV32_COMM_NCCL_HOST_BUFFERS, &c);
    } else {
        const char *addrs[DSV32_GROUP_MAX_MEMBERS];
        for (int i = 0; i < world; i++)
            addrs[i] = e->members[i].comm;
        r = dsv32_comm_tcp_new(x->lis, rank, world, addrs, e->epoch, x->cfg.timeout_ms, &c);
    }
    if (r < 0) {
        log_warn("epoch %llu: communicator not built: %s", (unsigned long long)e->epoch,
                 dsv32_strerror(r));
        goto keep;
    }
    pthread_mutex_lock(&x->lock);
    x->comm = c;
    pthread_mutex_unlock(&x->lock);
    /* between epochs a layer can wait a long time for its attention daemons' next step; the
     * exchange deadline is the failure detector of a silent peer */
    if ((r = dsv32_ep_server_new(c, e->n_attn, shard, &e->placement, x->model, x->be,
                                 x->cfg.timeout_ms, &x->srv)) < 0) {
        log_error("epoch %llu: %s", (unsigned long long)e->epoch, dsv32_strerror(r));
        drop_epoch(x);
        goto keep;
    }
    log_info("epoch %llu: serving as shard %d of %d (rank %d of %d)", (unsigned long long)e->epoch,
             shard, e->n_shards, rank, world);
    dsv32_notify_status("epoch %llu: shard %d of %d", (unsigned long long)e->epoch, shard, e->n_shards);
keep:
    if (x->cur) {
        dsv32_group_epoch_done(x->cur);
        free(x->cur);
    }
    x->cur = e;
    return 0;
}

/* ---- operator drain (Admin.Drain, dsv32ctl drain; ops.h) ---- */

/* On the drain watch's thread: DRAINING in the registry; xs_loop withdraws the candidacy. */
static void on_drain(void *arg)
{
    struct xs *x = arg;
    atomic_store(&x->draining, 1);
    dsv32_registry_set_state(x->reg, DSV32_NODE_DRAINING);
}

/* Deletes this shard's candidate key: the leader publishes an epoch without it; the step in
 * progress ends with the old epoch and the attention daemons re-run it on the new one (ep.h). */
static int xs_withdraw(struct xs *x)
{
    char rest[160], key[512];
    snprintf(rest, sizeof(rest), "candidates/expert/%s", x->cfg.id);
    int r = dsv32_group_key(x->cfg.cluster, x->cfg.group, rest, key, sizeof(key));
    if (r == 0)
        r = dsv32_etcd_delete(x->etcd, key, 0, NULL);
    if (r == 0)
        log_info("drained: left EP group %s", x->cfg.group);
    return r;
}

static int xs_start(struct xs *x)
{
    int r;
    pthread_mutex_init(&x->lock, NULL);
    dsv32_notify_watchdog_start(NULL, NULL, &x->watchdog);
    if ((r = dsv32_config_load(x->cfg.model_dir, &x->mcfg)) < 0) {
        log_error("%s", dsv32_load_error());
        return r;
    }
    struct dsv32_kv_geom geom;
    dsv32_kv_geom_init(&geom, &x->mcfg, 0);
    dsv32_backend_cpu_set_threads(x->cfg.cpu_threads > 0 ? x->cfg.cpu_threads : 1);
    /* the same GPU as its NCCL communicator (--gpu) */
    if ((r = dsv32_backend_new(x->cfg.backend, &x->mcfg, &geom, x->cfg.gpu >= 0 ? x->cfg.gpu : 0,
                               &x->be)) < 0) {
        log_error("backend %s: %s", x->cfg.backend, dsv32_strerror(r));
        return r;
    }
    int port;
    if ((r = dsv32_comm_tcp_listen(x->cfg.comm_host, 0, &x->lis, &port)) < 0)
        return r;
    snprintf(x->comm_addr, sizeof(x->comm_addr), "%s:%d", x->cfg.comm_host, port);
    struct dsv32_rpc_server_config sc = {.listen = x->cfg.listen};
    int gport;
    if ((r = dsv32_rpc_server_new(&sc, &x->server)) < 0 ||
        (r = dsv32_rpc_health_new(x->server, &x->health)) < 0 ||
        (r = dsv32_rpc_server_start(x->server, &gport)) < 0)
        return r;
    dsv32_rpc_health_set(x->health, "", DSV32_RPC_HEALTH_SERVING);
    char address[DSV32_NODE_ADDR_MAX];
    const char *colon = strrchr(x->cfg.listen, ':');
    snprintf(address, sizeof(address), "%.*s:%d", colon ? (int)(colon - x->cfg.listen) : 0,
             x->cfg.listen, gport);
    struct dsv32_etcd_config ec = {.endpoint = x->cfg.etcd};
    struct dsv32_registry_config rc = {.cluster = x->cfg.cluster, .kind = "expert", .id = x->cfg.id,
                                       .address = address, .gpu = x->cfg.gpu,
                                       .ttl_s = x->cfg.lease_ttl_s};
    if ((r = dsv32_etcd_new(&ec, &x->etcd)) < 0 || (r = dsv32_registry_new(x->etcd, &rc, &x->reg)) < 0 ||
        (r = dsv32_group_follow(x->etcd, x->cfg.cluster, x->cfg.group, on_epoch, x, &x->follower)) < 0)
        return r;
    dsv32_registry_set_state(x->reg, DSV32_NODE_READY);
    if ((r = dsv32_ops_drain_watch_new(x->etcd, x->cfg.cluster, "expert", x->cfg.id, on_drain, x,
                                       &x->drain)) < 0)
        return r;
    /* before --port-file: whoever reads that finds this too */
    if (x->cfg.metrics_listen && (r = dsv32_metrics_start(x->cfg.metrics_listen, x->cfg.metrics_port_file,
                                                          fill_metrics, x, &x->metrics)) < 0)
        return r;
    if (x->cfg.port_file) {
        FILE *f = fopen(x->cfg.port_file, "w");
        if (!f || fprintf(f, "%d\n", gport) < 0 || fclose(f) != 0)
            return -EIO;
    }
    log_info("expert shard %s: group %s, comm %s, health on %s", x->cfg.id, x->cfg.group,
             x->comm_addr, address);
    return 0;
}

static void xs_stop(struct xs *x)
{
    dsv32_metrics_stop(x->metrics);
    dsv32_notify_watchdog_stop(x->watchdog);
    dsv32_ops_drain_watch_free(x->drain);
    dsv32_group_follower_free(x->follower);
    drop_epoch(x);
    dsv32_registry_free(x->reg);
    dsv32_etcd_free(x->etcd);
    dsv32_rpc_server_free(x->server);
    dsv32_rpc_health_free(x->health);
    dsv32_comm_tcp_listener_free(x->lis);
    if (x->model) {
        dsv32_model_release(x->model, x->be);
        dsv32_model_free(x->model);
    }
    dsv32_backend_free(x->be);
    if (x->pending) {
        dsv32_group_epoch_done(x->pending);
        free(x->pending);
    }
    if (x->cur) {
        dsv32_group_epoch_done(x->cur);
        free(x->cur);
    }
}

static void xs_loop(struct xs *x)
{
    dsv32_notify_ready();
    while (!stop_flag) {
        /* (re)join on the registry's lease: a new lease after an etcd outage needs a new key */
        if (atomic_load(&x->draining) && !x->withdrawn)
            x->withdrawn = xs_withdraw(x) == 0;
        int64_t lease = dsv32_registry_lease(x->reg);
        if (lease && lease != x->joined_lease && !atomic_load(&x->draining)) {
            struct dsv32_group_member me = {.kind = "expert", .gpu = x->cfg.gpu};
            snprintf(me.id, sizeof(me.id), "%s", x->cfg.id);
            snprintf(me.comm, sizeof(me.comm), "%s", x->comm_addr);
            if (dsv32_group_join(x->etcd, x->cfg.cluster, x->cfg.group, &me, lease) == 0)
                x->joined_lease = lease;
        }
        pthread_mutex_lock(&x->lock);
        struct dsv32_group_epoch *e = x->pending;
        x->pending = NULL;
        pthread_mutex_unlock(&x->lock);
        if (e)
            apply_epoch(x, e);
        if (x->cfg.stats_interval_s > 0 && dsv32_mono_s() - x->stats_t >= x->cfg.stats_interval_s)
            log_stats(x);
        note_stats(x);
        if (x->srv) {
            int r = dsv32_ep_server_step(x->srv);
            if (r > 0) {
                pthread_mutex_lock(&x->lock);
                x->steps++;
                pthread_mutex_unlock(&x->lock);
            }
            if (r < 0) {
                log_warn("epoch %llu ended: %s", (unsigned long long)(x->cur ? x->cur->epoch : 0),
                         dsv32_strerror(r));
                drop_epoch(x);
                /* not torn down for a newer epoch: the leader may need asking (see group.h) */
                if (r != DSV32_EEPOCH && x->cur)
                    dsv32_group_request_new_epoch(x->etcd, x->cfg.cluster, x->cfg.group,
                                                  x->cur->epoch);
            }
            continue;
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    dsv32_notify_stopping();
}

static void usage(FILE *f)
{
    fprintf(f, "usage: dsv32-expert --model DIR --etcd HOST:PORT [--cluster NAME] [--group G]\n"
               "                    [--id ID] [--listen HOST:PORT] [--comm-host HOST]\n"
               "                    [--backend cpu|cuda] [--gpu N] [--timeout-ms N]\n"
               "                    [--lease-ttl S] [--port-file PATH] [--cpu-threads N]\n"
               "                    [--log-level LEVEL] [--stats-interval S (10; 0: off)]\n"
               "                    [--metrics-listen HOST:PORT [--metrics-port-file PATH]]\n");
}

int main(int argc, char **argv)
{
    struct xs x = {.cfg = {.id = "expert-0", .listen = "127.0.0.1:0", .cluster = "default",
                           .group = "g0", .comm_host = "127.0.0.1", .backend = "cpu", .gpu = -1,
                           .lease_ttl_s = 5, .timeout_ms = 10000, .stats_interval_s = 10}};
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},    {"etcd", required_argument, 0, 'e'},
        {"cluster", required_argument, 0, 'c'},  {"group", required_argument, 0, 'G'},
        {"id", required_argument, 0, 'i'},       {"listen", required_argument, 0, 'l'},
        {"comm-host", required_argument, 0, 1},  {"backend", required_argument, 0, 'b'},
        {"gpu", required_argument, 0, 'g'},      {"timeout-ms", required_argument, 0, 2},
        {"lease-ttl", required_argument, 0, 3},  {"port-file", required_argument, 0, 4},
        {"log-level", required_argument, 0, 5},  {"cpu-threads", required_argument, 0, 6},
        {"stats-interval", required_argument, 0, 7}, {"metrics-listen", required_argument, 0, 8},
        {"metrics-port-file", required_argument, 0, 9}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    dsv32_log_set_ident("dsv32-expert");
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': x.cfg.model_dir = optarg; break;
        case 'e': x.cfg.etcd = optarg; break;
        case 'c': x.cfg.cluster = optarg; break;
        case 'G': x.cfg.group = optarg; break;
        case 'i': x.cfg.id = optarg; break;
        case 'l': x.cfg.listen = optarg; break;
        case 1: x.cfg.comm_host = optarg; break;
        case 'b': x.cfg.backend = optarg; break;
        case 'g': x.cfg.gpu = atoi(optarg); break;
        case 2: x.cfg.timeout_ms = atoi(optarg); break;
        case 3: x.cfg.lease_ttl_s = atoi(optarg); break;
        case 4: x.cfg.port_file = optarg; break;
        case 5: {
            enum dsv32_log_level l;
            if (dsv32_log_parse_level(optarg, &l) < 0) {
                fprintf(stderr, "dsv32-expert: --log-level: error, warn, info or debug\n");
                return 2;
            }
            dsv32_log_set_level(l);
            break;
        }
        case 6: x.cfg.cpu_threads = atoi(optarg); break;
        case 7: x.cfg.stats_interval_s = atoi(optarg); break;
        case 8: x.cfg.metrics_listen = optarg; break;
        case 9: x.cfg.metrics_port_file = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!x.cfg.model_dir || !x.cfg.etcd || optind != argc || x.cfg.timeout_ms < 100) {
        usage(stderr);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int r = xs_start(&x);
    if (r < 0) {
        fprintf(stderr, "dsv32-expert: cannot start: %s\n", dsv32_strerror(r));
        xs_stop(&x);
        return 1;
    }
    xs_loop(&x);
    xs_stop(&x);
    return 0;
}
