/* dsv32ctl status, nodes, drain, cordon, uncordon: the nodes of a cluster through the router's
 * Admin service or straight from etcd (leases and their time left come from etcd only). */
#include "ctl.h"

#include "dsv32.pb-c.h"
#include "error.h"
#include "group.h"
#include "ops.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static enum dsv32_node_state state_from_pb(Dsv32__V1__NodeState s)
{
    switch (s) {
    case DSV32__V1__NODE_STATE__NODE_STATE_READY: return DSV32_NODE_READY;
    case DSV32__V1__NODE_STATE__NODE_STATE_DRAINING: return DSV32_NODE_DRAINING;
    default: return DSV32_NODE_LOADING;
    }
}

/* The nodes, from the router (ListNodes) or etcd; *ret malloc'ed. */
static int list_nodes(const struct ctl_target *t, bool from_etcd, const char *kind,
                      struct dsv32_ops_node **ret, size_t *ret_n)
{
    int r;
    if (from_etcd) {
        struct dsv32_etcd *e;
        if ((r = ctl_etcd_client(t, &e)) < 0)
            return r;
        r = dsv32_ops_list_nodes(e, t->cluster, kind, true, ret, ret_n, NULL);
        if (r < 0)
            fprintf(stderr, "dsv32ctl: reading the nodes of cluster %s from etcd %s: %s\n",
                    t->cluster, t->etcd, dsv32_strerror(r));
        dsv32_etcd_free(e);
        return r;
    }
    struct dsv32_rpc_client *c;
    if ((r = ctl_router_client(t, true, &c)) < 0)
        return r;
    Dsv32__V1__ListNodesRequest rq = DSV32__V1__LIST_NODES_REQUEST__INIT;
    rq.kind = (char *)(kind ? kind : "");
    ProtobufCMessage *m;
    r = ctl_call(c, t, "/dsv32.v1.Admin/ListNodes", &rq.base,
                 &dsv32__v1__list_nodes_response__descriptor, 10000, &m);
    dsv32_rpc_client_free(c);
    if (r < 0)
        return r;
    Dsv32__V1__ListNodesResponse *resp = (Dsv32__V1__ListNodesResponse *)m;
    struct dsv32_ops_node *out = calloc(resp->n_nodes ? resp->n_nodes : 1, sizeof(*out));
    if (!out) {
        protobuf_c_message_free_unpacked(m, NULL);
        return -ENOMEM;
    }
    for (size_t i = 0; i < resp->n_nodes; i++) {
        const Dsv32__V1__Node *p = resp->nodes[i];
        struct dsv32_node_info *n = &out[i].info;
        snprintf(n->kind, sizeof(n->kind), "%s", p->kind);
        snprintf(n->id, sizeof(n->id), "%s", p->id);
        snprintf(n->address, sizeof(n->address), "%s", p->address);
        snprintf(n->role, sizeof(n->role), "%s", p->role);
        n->gpu = p->gpu;
        n->state = state_from_pb(p->state);
        n->cordoned = p->cordoned;
        if (p->load) {
            n->load.running = p->load->running;
            n->load.waiting = p->load->waiting;
            n->load.free_kv_blocks = p->load->free_kv_blocks;
            n->load.total_kv_blocks = p->load->total_kv_blocks;
        }
        out[i].ttl_s = out[i].granted_ttl_s = -1;
    }
    *ret_n = resp->n_nodes;
    *ret = out;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

static cJSON *node_json(const struct dsv32_ops_node *o, bool with_lease)
{
    const struct dsv32_node_info *n = &o->info;
    cJSON *j = cJSON_CreateObject(), *l = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "kind", n->kind);
    cJSON_AddStringToObject(j, "id", n->id);
    cJSON_AddStringToObject(j, "address", n->address);
    cJSON_AddStringToObject(j, "role", n->role);
    cJSON_AddNumberToObject(j, "gpu", n->gpu);
    cJSON_AddStringToObject(j, "state", dsv32_node_state_name(n->state));
    cJSON_AddBoolToObject(j, "cordoned", n->cordoned);
    if (o->cordon_reason[0])
        cJSON_AddStringToObject(j, "cordon_reason", o->cordon_reason);
    cJSON_AddNumberToObject(l, "running", n->load.running);
    cJSON_AddNumberToObject(l, "waiting", n->load.waiting);
    cJSON_AddNumberToObject(l, "free_kv_blocks", (double)n->load.free_kv_blocks);
    cJSON_AddNumberToObject(l, "total_kv_blocks", (double)n->load.total_kv_blocks);
    cJSON_AddItemToObject(j, "load", l);
    if (with_lease) {
        char hex[32];
        snprintf(hex, sizeof(hex), "%llx", (unsigned long long)n->lease);
        cJSON_AddStringToObject(j, "lease", hex);
        cJSON_AddNumberToObject(j, "lease_ttl_s", (double)o->ttl_s);
        cJSON_AddNumberToObject(j, "lease_granted_ttl_s", (double)o->granted_ttl_s);
        cJSON_AddBoolToObject(j, "drain_requested", o->drain_requested);
    }
    return j;
}

static void print_table(const struct dsv32_ops_node *nodes, size_t n, bool with_lease)
{
    printf("%-7s %-14s %-9s %-8s %-22s %7s %7s %15s %6s  %s\n", "KIND", "ID", "STATE", "ROLE",
           "ADDRESS", "RUNNING", "WAITING", "KV FREE/TOTAL", with_lease ? "LEASE" : "", "NOTES");
    for (size_t i = 0; i < n; i++) {
        const struct dsv32_node_info *x = &nodes[i].info;
        char kv[48], lease[32], notes[DSV32_OPS_REASON_MAX + 48] = "";
        bool loaded = x->load.total_kv_blocks > 0;
        snprintf(kv, sizeof(kv), "%llu/%llu", (unsigned long long)x->load.free_kv_blocks,
                 (unsigned long long)x->load.total_kv_blocks);
        ctl_fmt_secs(with_lease ? nodes[i].ttl_s : -1, lease, sizeof(lease));
        if (x->cordoned)
            snprintf(notes, sizeof(notes), "cordoned%s%s%s", nodes[i].cordon_reason[0] ? " (" : "",
                     nodes[i].cordon_reason, nodes[i].cordon_reason[0] ? ")" : "");
        if (nodes[i].drain_requested && x->state != DSV32_NODE_DRAINING)
            strncat(notes, notes[0] ? ", drain requested" : "drain requested",
                    sizeof(notes) - strlen(notes) - 1);
        char running[16], waiting[16];
        snprintf(running, sizeof(running), "%u", x->load.running);
        snprintf(waiting, sizeof(waiting), "%u", x->load.waiting);
        bool attn = strcmp(x->kind, "attn") == 0;
        printf("%-7s %-14s %-9s %-8s %-22s %7s %7s %15s %6s  %s\n", x->kind, x->id,
               dsv32_node_state_name(x->state), x->role[0] ? x->role : "-", x->address,
               attn ? running : "-", attn ? waiting : "-", attn && loaded ? kv : "-",
               with_lease ? lease : "", notes);
    }
}

int ctl_cmd_nodes(const struct ctl_opts *o)
{
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ANY, &t) < 0)
        return 2;
    /* the router's view when there is a router: what it places with */
    bool from_etcd = !t.router[0];
    struct dsv32_ops_node *nodes;
    size_t n;
    if (list_nodes(&t, from_etcd, o->kind, &nodes, &n) < 0)
        return 1;
    if (o->json) {
        cJSON *j = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(j, "nodes");
        cJSON_AddStringToObject(j, "cluster", t.cluster);
        cJSON_AddStringToObject(j, "source", from_etcd ? "etcd" : "router");
        for (size_t i = 0; i < n; i++)
            cJSON_AddItemToArray(a, node_json(&nodes[i], from_etcd));
        ctl_print_json(j);
    } else {
        print_table(nodes, n, from_etcd);
    }
    free(nodes);
    return 0;
}

/* The router answers (grpc.health.v1 Check of the whole server): "serving", "not serving", or
 * "unreachable". */
static const char *router_health(const struct ctl_target *t)
{
    struct dsv32_rpc_client *c;
    if (ctl_router_client(t, false, &c) < 0)
        return "unreachable";
    /* HealthCheckRequest{service: ""} is the empty message */
    uint8_t *resp = NULL;
    size_t len = 0;
    const char *s = "unreachable";
    if (dsv32_rpc_unary(c, "/grpc.health.v1.Health/Check", "", 0, 3000, DSV32_RPC_WAIT_FOR_READY,
                        &resp, &len, NULL) == 0)
        s = len >= 2 && resp[0] == 0x08 && resp[1] == 1 ? "serving" : "not serving";
    free(resp);
    dsv32_rpc_client_free(c);
    return s;
}

int ctl_cmd_status(const struct ctl_opts *o)
{
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ANY, &t) < 0)
        return 2;
    bool from_etcd = t.etcd[0] != 0;
    struct dsv32_ops_node *nodes;
    size_t n;
    if (list_nodes(&t, from_etcd, o->kind, &nodes, &n) < 0)
        return 1;
    const char *health = t.router[0] ? router_health(&t) : NULL;
    /* the EP groups' current epochs (etcd only) */
    static char groups[DSV32_OPS_MAX_GROUPS][DSV32_NODE_NAME_MAX];
    static struct dsv32_group_epoch ep;
    size_t ng = 0;
    uint64_t epochs[DSV32_OPS_MAX_GROUPS] = {0};
    int n_attn[DSV32_OPS_MAX_GROUPS] = {0}, n_shards[DSV32_OPS_MAX_GROUPS] = {0};
    struct dsv32_etcd *e = NULL;
    if (from_etcd && dsv32_ops_list_groups(t.etcd, t.cluster, groups, DSV32_OPS_MAX_GROUPS, &ng) == 0 &&
        ctl_etcd_client(&t, &e) == 0) {
        for (size_t g = 0; g < ng; g++) {
            char *json;
            size_t len;
            if (dsv32_ops_group_current(e, t.cluster, groups[g], &epochs[g], &json, &len, NULL) < 0)
                continue;
            if (dsv32_group_epoch_from_json(json, len, &ep) == 0) {
                n_attn[g] = ep.n_attn;
                n_shards[g] = ep.n_shards;
                dsv32_group_epoch_done(&ep);
            }
            free(json);
        }
    }
    dsv32_etcd_free(e);
    size_t ready = 0;
    for (size_t i = 0; i < n; i++)
        ready += nodes[i].info.state == DSV32_NODE_READY;
    if (o->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "cluster", t.cluster);
        if (t.etcd[0])
            cJSON_AddStringToObject(j, "etcd", t.etcd);
        if (t.router[0]) {
            cJSON *r = cJSON_AddObjectToObject(j, "router");
            cJSON_AddStringToObject(r, "address", t.router);
            cJSON_AddStringToObject(r, "health", health);
        }
        if (t.dir[0])
            cJSON_AddStringToObject(j, "state_dir", t.dir);
        cJSON_AddStringToObject(j, "source", from_etcd ? "etcd" : "router");
        cJSON_AddNumberToObject(j, "ready", (double)ready);
        cJSON *a = cJSON_AddArrayToObject(j, "nodes");
        for (size_t i = 0; i < n; i++)
            cJSON_AddItemToArray(a, node_json(&nodes[i], from_etcd));
        cJSON *ga = cJSON_AddArrayToObject(j, "groups");
        for (size_t g = 0; g < ng; g++) {
            cJSON *x = cJSON_CreateObject();
            cJSON_AddStringToObject(x, "name", groups[g]);
            cJSON_AddNumberToObject(x, "epoch", (double)epochs[g]);
            cJSON_AddNumberToObject(x, "attn", n_attn[g]);
            cJSON_AddNumberToObject(x, "shards", n_shards[g]);
            cJSON_AddItemToArray(ga, x);
        }
        ctl_print_json(j);
    } else {
        printf("cluster %s: %zu nodes, %zu ready\n", t.cluster, n, ready);
        if (t.router[0])
            printf("router  %s (%s)\n", t.router, health);
        if (t.etcd[0])
            printf("etcd    %s\n", t.etcd);
        for (size_t g = 0; g < ng; g++)
            printf("group   %s: epoch %llu, %d attention daemon%s, %d expert shard%s\n", groups[g],
                   (unsigned long long)epochs[g], n_attn[g], n_attn[g] == 1 ? "" : "s",
                   n_shards[g], n_shards[g] == 1 ? "" : "s");
        printf("\n");
        print_table(nodes, n, from_etcd);
        printf("(load as each daemon last reported it: at most a second old)\n");
        if (!from_etcd)
            printf("(lease time left needs etcd: --etcd HOST:PORT or --dir STATE)\n");
    }
    free(nodes);
    return 0;
}

/* ---- drain ---- */

static int find(const struct dsv32_ops_node *nodes, size_t n, const char *kind, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(nodes[i].info.id, id) == 0 && (!kind || !kind[0] || !strcmp(nodes[i].info.kind, kind)))
            return (int)i;
    return -1;
}

int ctl_cmd_drain(const struct ctl_opts *o)
{
    if (o->n_args != 1) {
        fprintf(stderr, "usage: dsv32ctl drain ID [--kind attn|expert] [--no-wait] [--timeout S]\n");
        return 2;
    }
    const char *id = o->args[0];
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ANY, &t) < 0)
        return 2;
    char kind[DSV32_NODE_NAME_MAX] = "";
    if (o->kind)
        snprintf(kind, sizeof(kind), "%s", o->kind);
    if (t.router[0]) {
        struct dsv32_rpc_client *c;
        if (ctl_router_client(&t, true, &c) < 0)
            return 1;
        Dsv32__V1__DrainRequest rq = DSV32__V1__DRAIN_REQUEST__INIT;
        rq.kind = kind;
        rq.id = (char *)id;
        ProtobufCMessage *m;
        int r = ctl_call(c, &t, "/dsv32.v1.Admin/Drain", &rq.base,
                         &dsv32__v1__drain_response__descriptor, 15000, &m);
        dsv32_rpc_client_free(c);
        if (r < 0)
            return 1;
        Dsv32__V1__DrainResponse *resp = (Dsv32__V1__DrainResponse *)m;
        if (resp->node)
            snprintf(kind, sizeof(kind), "%s", resp->node->kind);
        protobuf_c_message_free_unpacked(m, NULL);
    } else {
        struct dsv32_etcd *e;
        if (ctl_etcd_client(&t, &e) < 0)
            return 1;
        struct dsv32_node_info node;
        char why[384];
        int r = dsv32_ops_drain(e, t.etcd, t.cluster, kind, id, &node, why, sizeof(why));
        dsv32_etcd_free(e);
        if (r < 0) {
            fprintf(stderr, "dsv32ctl: drain %s: %s\n", id, why);
            return 1;
        }
        snprintf(kind, sizeof(kind), "%s", node.kind);
    }
    if (!o->json)
        printf("%s/%s: drain requested\n", kind, id);
    if (o->no_wait) {
        if (o->json) {
            cJSON *j = cJSON_CreateObject();
            cJSON_AddStringToObject(j, "kind", kind);
            cJSON_AddStringToObject(j, "id", id);
            cJSON_AddStringToObject(j, "state", "drain requested");
            ctl_print_json(j);
        }
        return 0;
    }
    /* wait until it says DRAINING and (attention daemons) has nothing left to run */
    int timeout_ms = (o->timeout_s > 0 ? o->timeout_s : 60) * 1000;
    bool from_etcd = t.etcd[0] != 0;
    struct dsv32_ops_node last = {0};
    bool seen = false, done = false;
    for (int waited = 0; waited <= timeout_ms && !done; waited += 200) {
        struct dsv32_ops_node *nodes;
        size_t n;
        if (list_nodes(&t, from_etcd, kind, &nodes, &n) == 0) {
            int i = find(nodes, n, kind, id);
            if (i >= 0) {
                last = nodes[i];
                seen = true;
                done = last.info.state == DSV32_NODE_DRAINING &&
                       (strcmp(kind, "attn") != 0 ||
                        (last.info.load.running == 0 && last.info.load.waiting == 0));
            } else {
                done = true; /* gone: stopped meanwhile */
                seen = false;
            }
            free(nodes);
        }
        if (!done)
            sleep_ms(200);
    }
    if (o->json) {
        cJSON *j = seen ? node_json(&last, from_etcd) : cJSON_CreateObject();
        if (!seen) {
            cJSON_AddStringToObject(j, "kind", kind);
            cJSON_AddStringToObject(j, "id", id);
            cJSON_AddStringToObject(j, "state", "gone");
        }
        cJSON_AddBoolToObject(j, "drained", done);
        ctl_print_json(j);
    } else if (!seen) {
        printf("%s/%s: gone (it stopped)\n", kind, id);
    } else if (done) {
        printf("%s/%s: drained (state %s, nothing running): it can be stopped\n", kind, id,
               dsv32_node_state_name(last.info.state));
    } else {
        printf("%s/%s: not drained after %d s: state %s, %u running, %u waiting\n", kind, id,
               timeout_ms / 1000, dsv32_node_state_name(last.info.state), last.info.load.running,
               last.info.load.waiting);
    }
    return done ? 0 : 1;
}

/* ---- cordon, uncordon ---- */

static int cordon_cmd(const struct ctl_opts *o, bool on)
{
    if (o->n_args != 1) {
        fprintf(stderr, "usage: dsv32ctl %s ID%s\n", on ? "cordon" : "uncordon",
                on ? " [--reason TEXT]" : "");
        return 2;
    }
    const char *id = o->args[0];
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ANY, &t) < 0)
        return 2;
    int r;
    bool was_cordoned = true;
    if (t.router[0]) {
        struct dsv32_rpc_client *c;
        if (ctl_router_client(&t, true, &c) < 0)
            return 1;
        ProtobufCMessage *m = NULL;
        if (on) {
            Dsv32__V1__CordonRequest rq = DSV32__V1__CORDON_REQUEST__INIT;
            rq.id = (char *)id;
            rq.reason = (char *)(o->reason ? o->reason : "");
            r = ctl_call(c, &t, "/dsv32.v1.Admin/Cordon", &rq.base,
                         &dsv32__v1__cordon_response__descriptor, 10000, &m);
        } else {
            Dsv32__V1__UncordonRequest rq = DSV32__V1__UNCORDON_REQUEST__INIT;
            rq.id = (char *)id;
            struct dsv32_rpc_status st = {0};
            r = dsv32_rpc_unary_msg(c, "/dsv32.v1.Admin/Uncordon", &rq.base,
                                    &dsv32__v1__uncordon_response__descriptor, 10000,
                                    DSV32_RPC_WAIT_FOR_READY, &m, &st);
            if (r < 0 && st.code == DSV32_RPC_NOT_FOUND) {
                was_cordoned = false;
                r = 0;
            } else if (r < 0) {
                r = ctl_call(c, &t, "/dsv32.v1.Admin/Uncordon", &rq.base,
                             &dsv32__v1__uncordon_response__descriptor, 10000, &m);
            }
        }
        if (m)
            protobuf_c_message_free_unpacked(m, NULL);
        dsv32_rpc_client_free(c);
        if (r < 0)
            return 1;
    } else {
        struct dsv32_etcd *e;
        if (ctl_etcd_client(&t, &e) < 0)
            return 1;
        r = on ? dsv32_registry_cordon(e, t.cluster, id, o->reason ? o->reason : "")
               : dsv32_registry_uncordon(e, t.cluster, id);
        dsv32_etcd_free(e);
        if (!on && r == -ENOENT) {
            was_cordoned = false;
            r = 0;
        }
        if (r < 0) {
            fprintf(stderr, "dsv32ctl: %s %s: %s\n", on ? "cordon" : "uncordon", id,
                    dsv32_strerror(r));
            return 1;
        }
    }
    if (o->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "id", id);
        cJSON_AddBoolToObject(j, "cordoned", on);
        if (!on)
            cJSON_AddBoolToObject(j, "was_cordoned", was_cordoned);
        if (on && o->reason)
            cJSON_AddStringToObject(j, "reason", o->reason);
        ctl_print_json(j);
    } else if (on) {
        printf("%s: cordoned (no new work placed on it)\n", id);
    } else {
        printf("%s: %s\n", id, was_cordoned ? "uncordoned" : "was not cordoned");
    }
    return 0;
}

int ctl_cmd_cordon(const struct ctl_opts *o) { return cordon_cmd(o, true); }
int ctl_cmd_uncordon(const struct ctl_opts *o) { return cordon_cmd(o, false); }
