/* The Admin service of the router (dsv32ctl's calls): ListNodes from the router's view of etcd,
 * Cordon and Uncordon through the cordon keys, Drain through the node's drain key (ops.h) and
 * GetPlacement from the EP groups' current epoch records. Every method needs the admin bearer
 * token and a loopback peer (the rpc layer's DSV32_RPC_ADMIN guard). Drain and GetPlacement make
 * several etcd requests: they run on a thread of their own, never on the completion queue's. */
#include "router.h"

#include "dsv32.pb-c.h"
#include "error.h"
#include "group.h"
#include "log.h"
#include "ops.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static Dsv32__V1__NodeState state_to_pb(enum dsv32_node_state s)
{
    switch (s) {
    case DSV32_NODE_LOADING: return DSV32__V1__NODE_STATE__NODE_STATE_LOADING;
    case DSV32_NODE_READY: return DSV32__V1__NODE_STATE__NODE_STATE_READY;
    case DSV32_NODE_DRAINING: return DSV32__V1__NODE_STATE__NODE_STATE_DRAINING;
    }
    return DSV32__V1__NODE_STATE__NODE_STATE_UNSPECIFIED;
}

static void node_to_pb(const struct dsv32_node_info *n, Dsv32__V1__Node *pb,
                       Dsv32__V1__NodeLoad *load)
{
    dsv32__v1__node__init(pb);
    dsv32__v1__node_load__init(load);
    pb->kind = (char *)n->kind;
    pb->id = (char *)n->id;
    pb->address = (char *)n->address;
    pb->role = (char *)n->role;
    pb->gpu = n->gpu;
    pb->state = state_to_pb(n->state);
    pb->cordoned = n->cordoned;
    load->running = n->load.running;
    load->waiting = n->load.waiting;
    load->free_kv_blocks = n->load.free_kv_blocks;
    load->total_kv_blocks = n->load.total_kv_blocks;
    pb->load = load;
}

static void list_nodes(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    Dsv32__V1__ListNodesRequest *m = dsv32__v1__list_nodes_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed ListNodesRequest");
        return;
    }
    const char *kind = m->kind[0] ? m->kind : NULL;
    size_t n = dsv32_registry_view_list(r->view, kind, NULL, 0);
    struct dsv32_node_info *nodes = calloc(n ? n : 1, sizeof(*nodes));
    Dsv32__V1__Node *pb = calloc(n ? n : 1, sizeof(*pb));
    Dsv32__V1__NodeLoad *loads = calloc(n ? n : 1, sizeof(*loads));
    Dsv32__V1__Node **ptrs = calloc(n ? n : 1, sizeof(*ptrs));
    if (!nodes || !pb || !loads || !ptrs) {
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "out of memory");
        goto out;
    }
    n = dsv32_registry_view_list(r->view, kind, nodes, n);
    for (size_t i = 0; i < n; i++) {
        node_to_pb(&nodes[i], &pb[i], &loads[i]);
        ptrs[i] = &pb[i];
    }
    Dsv32__V1__ListNodesResponse resp = DSV32__V1__LIST_NODES_RESPONSE__INIT;
    resp.nodes = ptrs;
    resp.n_nodes = n;
    dsv32_rpc_call_reply_msg(call, &resp.base);
out:
    free(nodes);
    free(pb);
    free(loads);
    free(ptrs);
    dsv32__v1__list_nodes_request__free_unpacked(m, NULL);
}

static void cordon(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    Dsv32__V1__CordonRequest *m = dsv32__v1__cordon_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed CordonRequest");
        return;
    }
    int rc = dsv32_registry_cordon(r->etcd, r->cfg.cluster, m->id, m->reason);
    dsv32__v1__cordon_request__free_unpacked(m, NULL);
    if (rc < 0) {
        dsv32_rpc_call_finish_err(call, rc, "cordon");
        return;
    }
    Dsv32__V1__CordonResponse resp = DSV32__V1__CORDON_RESPONSE__INIT;
    dsv32_rpc_call_reply_msg(call, &resp.base);
}

static void uncordon(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct router *r = arg;
    Dsv32__V1__UncordonRequest *m = dsv32__v1__uncordon_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed UncordonRequest");
        return;
    }
    int rc = dsv32_registry_uncordon(r->etcd, r->cfg.cluster, m->id);
    dsv32__v1__uncordon_request__free_unpacked(m, NULL);
    if (rc < 0) {
        dsv32_rpc_call_finish_err(call, rc, "uncordon");
        return;
    }
    Dsv32__V1__UncordonResponse resp = DSV32__V1__UNCORDON_RESPONSE__INIT;
    dsv32_rpc_call_reply_msg(call, &resp.base);
}

/* ---- calls that run on a thread of their own ---- */

struct admin_job {
    struct router *r;
    struct dsv32_rpc_call *call;
    void (*fn)(struct router *r, struct dsv32_rpc_call *call, const uint8_t *req, size_t len);
    size_t len;
    uint8_t req[]; /* a copy: the request lives for the handler's call only */
};

static void *admin_job_main(void *arg)
{
    struct admin_job *j = arg;
    struct router *r = j->r;
    j->fn(r, j->call, j->req, j->len);
    free(j);
    atomic_fetch_sub(&r->workers, 1); /* router_free waits for this */
    return NULL;
}

static void run_async(struct router *r, struct dsv32_rpc_call *call, const uint8_t *req,
                      size_t len,
                      void (*fn)(struct router *, struct dsv32_rpc_call *, const uint8_t *, size_t))
{
    struct admin_job *j = malloc(sizeof(*j) + len);
    pthread_t t;
    pthread_attr_t at;
    if (!j) {
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    *j = (struct admin_job){.r = r, .call = call, .fn = fn, .len = len};
    memcpy(j->req, req, len);
    atomic_fetch_add(&r->workers, 1);
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &at, admin_job_main, j);
    pthread_attr_destroy(&at);
    if (rc != 0) {
        atomic_fetch_sub(&r->workers, 1);
        free(j);
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "no thread for the call");
    }
}

/* Drain: the node's drain key on its lease; the node moves itself to DRAINING. */
static void drain_job(struct router *r, struct dsv32_rpc_call *call, const uint8_t *req,
                      size_t len)
{
    Dsv32__V1__DrainRequest *m = dsv32__v1__drain_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed DrainRequest");
        return;
    }
    struct dsv32_node_info node;
    char why[384];
    int rc = dsv32_ops_drain(r->etcd, r->cfg.etcd, r->cfg.cluster, m->kind, m->id, &node, why,
                             sizeof(why));
    if (rc < 0) {
        log_warn("Drain %s%s%s: %s", m->kind, m->kind[0] ? "/" : "", m->id, why);
        dsv32__v1__drain_request__free_unpacked(m, NULL);
        dsv32_rpc_call_finish(call, rc == -EBUSY ? DSV32_RPC_FAILED_PRECONDITION
                                                 : dsv32_rpc_code_from_err(rc),
                              "%s", why);
        return;
    }
    log_info("Drain: %s/%s asked to drain", node.kind, node.id);
    dsv32__v1__drain_request__free_unpacked(m, NULL);
    Dsv32__V1__Node pb;
    Dsv32__V1__NodeLoad load;
    node_to_pb(&node, &pb, &load);
    pb.cordoned = dsv32_registry_view_cordoned(r->view, node.id);
    Dsv32__V1__DrainResponse resp = DSV32__V1__DRAIN_RESPONSE__INIT;
    resp.node = &pb;
    dsv32_rpc_call_reply_msg(call, &resp.base);
}

static void drain(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    run_async(arg, call, req, len, drain_job);
}

/* One group's current epoch as a Group message; everything it points to comes from the arena. */
struct pb_arena {
    void **ptrs;
    size_t n, cap;
};

static void *arena_alloc(struct pb_arena *a, size_t bytes)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 64;
        void **p = realloc(a->ptrs, cap * sizeof(*p));
        if (!p)
            return NULL;
        a->ptrs = p;
        a->cap = cap;
    }
    void *m = calloc(1, bytes ? bytes : 1);
    if (m)
        a->ptrs[a->n++] = m;
    return m;
}

static char *arena_strdup(struct pb_arena *a, const char *s)
{
    char *d = arena_alloc(a, strlen(s) + 1);
    if (d)
        strcpy(d, s);
    return d;
}

static void arena_free(struct pb_arena *a)
{
    for (size_t i = 0; i < a->n; i++)
        free(a->ptrs[i]);
    free(a->ptrs);
}

static int group_to_pb(const char *name, const struct dsv32_group_epoch *e, struct pb_arena *a,
                       Dsv32__V1__Group *g)
{
    dsv32__v1__group__init(g);
    g->name = arena_strdup(a, name);
    if (!g->name)
        return -ENOMEM;
    if (!e)
        return 0;
    g->epoch = e->epoch;
    int nm = e->n_attn + e->n_shards;
    g->members = arena_alloc(a, sizeof(*g->members) * (size_t)nm);
    Dsv32__V1__GroupMember *mem = arena_alloc(a, sizeof(*mem) * (size_t)nm);
    if (!g->members || !mem)
        return -ENOMEM;
    for (int i = 0; i < nm; i++) {
        dsv32__v1__group_member__init(&mem[i]);
        mem[i].kind = (char *)e->members[i].kind;
        mem[i].id = (char *)e->members[i].id;
        mem[i].rank = (uint32_t)i;
        mem[i].address = (char *)e->members[i].comm;
        g->members[i] = &mem[i];
    }
    g->n_members = (size_t)nm;
    if (!e->n_shards)
        return 0;
    const struct dsv32_placement *p = &e->placement;
    size_t total = (size_t)p->n_layers * (size_t)p->n_experts;
    g->experts = arena_alloc(a, sizeof(*g->experts) * total);
    Dsv32__V1__ExpertReplicas *ex = arena_alloc(a, sizeof(*ex) * total);
    char **ids = arena_alloc(a, sizeof(*ids) * total * (size_t)p->max_replicas);
    if (!g->experts || !ex || !ids)
        return -ENOMEM;
    size_t n = 0;
    for (int l = 0; l < p->n_layers; l++)
        for (int x = 0; x < p->n_experts; x++) {
            const int16_t *own = dsv32_placement_owners(p, l, x);
            Dsv32__V1__ExpertReplicas *r = &ex[n];
            dsv32__v1__expert_replicas__init(r);
            r->layer = (uint32_t)l;
            r->expert = (uint32_t)x;
            r->shard_ids = ids + n * (size_t)p->max_replicas;
            for (int k = 0; k < p->max_replicas; k++)
                if (own[k] >= 0 && own[k] < e->n_shards)
                    r->shard_ids[r->n_shard_ids++] = (char *)e->members[e->n_attn + own[k]].id;
            if (r->n_shard_ids) /* dense layers own no routed experts */
                g->experts[n++] = r;
        }
    g->n_experts = n;
    return 0;
}

static void placement_job(struct router *r, struct dsv32_rpc_call *call, const uint8_t *req,
                          size_t len)
{
    Dsv32__V1__GetPlacementRequest *m = dsv32__v1__get_placement_request__unpack(NULL, len, req);
    if (!m) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed GetPlacementRequest");
        return;
    }
    static char names[DSV32_OPS_MAX_GROUPS][DSV32_NODE_NAME_MAX]; /* under names_lock */
    static pthread_mutex_t names_lock = PTHREAD_MUTEX_INITIALIZER;
    struct pb_arena a = {0};
    struct dsv32_group_epoch *epochs = NULL;
    Dsv32__V1__Group *groups = NULL, **gptrs = NULL;
    size_t ng = 0;
    int code = DSV32_RPC_OK, rc = 0;
    char err[256] = "";
    pthread_mutex_lock(&names_lock);
    if (m->group[0]) {
        if (dsv32_node_name_check(m->group) < 0) {
            code = DSV32_RPC_INVALID_ARGUMENT;
            snprintf(err, sizeof(err), "bad group name");
            goto out;
        }
        snprintf(names[0], sizeof(names[0]), "%s", m->group);
        ng = 1;
    } else if ((rc = dsv32_ops_list_groups(r->cfg.etcd, r->cfg.cluster, names,
                                           DSV32_OPS_MAX_GROUPS, &ng)) < 0) {
        code = DSV32_RPC_UNAVAILABLE;
        snprintf(err, sizeof(err), "listing the EP groups in etcd: %s", dsv32_strerror(rc));
        goto out;
    }
    epochs = calloc(ng ? ng : 1, sizeof(*epochs));
    groups = calloc(ng ? ng : 1, sizeof(*groups));
    gptrs = calloc(ng ? ng : 1, sizeof(*gptrs));
    if (!epochs || !groups || !gptrs) {
        code = DSV32_RPC_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof(err), "out of memory");
        goto out;
    }
    Dsv32__V1__GetPlacementResponse resp = DSV32__V1__GET_PLACEMENT_RESPONSE__INIT;
    for (size_t i = 0; i < ng; i++) {
        uint64_t epoch;
        char *json = NULL;
        size_t jlen;
        int64_t rev = 0;
        rc = dsv32_ops_group_current(r->etcd, r->cfg.cluster, names[i], &epoch, &json, &jlen, &rev);
        if (rc == -ENOENT && m->group[0]) {
            code = DSV32_RPC_NOT_FOUND;
            snprintf(err, sizeof(err), "EP group %s has no epoch", m->group);
            goto out;
        }
        const struct dsv32_group_epoch *e = NULL;
        if (rc == 0) {
            rc = dsv32_group_epoch_from_json(json, jlen, &epochs[i]);
            free(json);
            if (rc < 0) {
                code = DSV32_RPC_DATA_LOSS;
                snprintf(err, sizeof(err), "group %s: epoch %llu record is malformed", names[i],
                         (unsigned long long)epoch);
                goto out;
            }
            e = &epochs[i];
        } else if (rc != -ENOENT) {
            code = dsv32_rpc_code_from_err(rc);
            snprintf(err, sizeof(err), "group %s: %s", names[i], dsv32_strerror(rc));
            goto out;
        }
        if (rev > resp.revision)
            resp.revision = rev;
        if (group_to_pb(names[i], e, &a, &groups[i]) < 0) {
            code = DSV32_RPC_RESOURCE_EXHAUSTED;
            snprintf(err, sizeof(err), "out of memory");
            goto out;
        }
        gptrs[i] = &groups[i];
    }
    resp.groups = gptrs;
    resp.n_groups = ng;
    dsv32_rpc_call_reply_msg(call, &resp.base);
out:
    pthread_mutex_unlock(&names_lock);
    if (code != DSV32_RPC_OK)
        dsv32_rpc_call_finish(call, code, "%s", err);
    for (size_t i = 0; epochs && i < ng; i++)
        dsv32_group_epoch_done(&epochs[i]);
    free(epochs);
    free(groups);
    free(gptrs);
    arena_free(&a);
    dsv32__v1__get_placement_request__free_unpacked(m, NULL);
}

static void get_placement(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    run_async(arg, call, req, len, placement_job);
}

int router_add_admin(struct router *r)
{
    int rc;
    if ((rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/ListNodes", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, list_nodes, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/Cordon", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, cordon, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/Uncordon", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, uncordon, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/Drain", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, drain, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/GetPlacement",
                                          DSV32_RPC_UNARY, DSV32_RPC_ADMIN, get_placement, r)) < 0)
        return rc;
    return 0;
}
