/* The Admin service of the router (dsv32ctl's calls): ListNodes from the router's view of etcd,
 * Cordon and Uncordon through the cordon keys. Every method needs the admin bearer token and a
 * loopback peer (the rpc layer's DSV32_RPC_ADMIN guard). */
#include "router.h"

#include "dsv32.pb-c.h"
#include "error.h"
#include "log.h"

#include <errno.h>
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
        dsv32__v1__node__init(&pb[i]);
        dsv32__v1__node_load__init(&loads[i]);
        pb[i].kind = nodes[i].kind;
        pb[i].id = nodes[i].id;
        pb[i].address = nodes[i].address;
        pb[i].role = nodes[i].role;
        pb[i].gpu = nodes[i].gpu;
        pb[i].state = state_to_pb(nodes[i].state);
        pb[i].cordoned = nodes[i].cordoned;
        loads[i].running = nodes[i].load.running;
        loads[i].waiting = nodes[i].load.waiting;
        loads[i].free_kv_blocks = nodes[i].load.free_kv_blocks;
        loads[i].total_kv_blocks = nodes[i].load.total_kv_blocks;
        pb[i].load = &loads[i];
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

int router_add_admin(struct router *r)
{
    int rc;
    if ((rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/ListNodes", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, list_nodes, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/Cordon", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, cordon, r)) < 0 ||
        (rc = dsv32_rpc_server_add_method(r->server, "/dsv32.v1.Admin/Uncordon", DSV32_RPC_UNARY,
                                          DSV32_RPC_ADMIN, uncordon, r)) < 0)
        return rc;
    return 0;
}
