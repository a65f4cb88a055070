/* Operator actions through etcd: drain requests and watches, node and group reading; see ops.h. */
#include "ops.h"

#include "error.h"
#include "etcd.pb-c.h"
#include "log.h"
#include "rpc.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KEY_MAX 512

static void set_why(char *why, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_why(char *why, size_t len, const char *fmt, ...)
{
    if (!why || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
}

int dsv32_ops_drain_key(const char *cluster, const char *kind, const char *id, char *buf,
                        size_t cap)
{
    if (dsv32_node_name_check(cluster) < 0 || dsv32_node_name_check(kind) < 0 ||
        dsv32_node_name_check(id) < 0)
        return -EINVAL;
    int n = snprintf(buf, cap, "/dsv32/%s/drain/%s/%s", cluster, kind, id);
    return n < 0 || (size_t)n >= cap ? -ENOBUFS : 0;
}

/* "<kind>/<id>" after prefix into kind and id: 0 or -EINVAL. */
static int split_kind_id(const char *key, size_t prefix_len, char *kind, char *id)
{
    const char *rest = key + prefix_len, *slash = strchr(rest, '/');
    if (!slash || slash == rest || (size_t)(slash - rest) >= DSV32_NODE_NAME_MAX ||
        strlen(slash + 1) >= DSV32_NODE_NAME_MAX || strchr(slash + 1, '/'))
        return -EINVAL;
    memcpy(kind, rest, (size_t)(slash - rest));
    kind[slash - rest] = 0;
    strcpy(id, slash + 1);
    return 0;
}

/* ---- nodes ---- */

int dsv32_ops_list_nodes(struct dsv32_etcd *e, const char *cluster, const char *kind,
                         bool with_ttl, struct dsv32_ops_node **ret, size_t *ret_n,
                         int64_t *ret_revision)
{
    char prefix[KEY_MAX], cprefix[KEY_MAX], dprefix[KEY_MAX];
    if (dsv32_node_name_check(cluster) < 0 || (kind && dsv32_node_name_check(kind) < 0))
        return -EINVAL;
    snprintf(prefix, sizeof(prefix), "/dsv32/%s/nodes/", cluster);
    snprintf(cprefix, sizeof(cprefix), "/dsv32/%s/cordon/", cluster);
    snprintf(dprefix, sizeof(dprefix), "/dsv32/%s/drain/", cluster);
    struct dsv32_etcd_range nodes = {0}, cordons = {0}, drains = {0};
    struct dsv32_ops_node *out = NULL;
    size_t n = 0;
    int r;
    if ((r = dsv32_etcd_range(e, prefix, DSV32_ETCD_PREFIX, 0, &nodes)) < 0 ||
        (r = dsv32_etcd_range(e, cprefix, DSV32_ETCD_PREFIX, 0, &cordons)) < 0 ||
        (r = dsv32_etcd_range(e, dprefix, DSV32_ETCD_PREFIX, 0, &drains)) < 0)
        goto out;
    out = calloc(nodes.n ? nodes.n : 1, sizeof(*out));
    if (!out) {
        r = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < nodes.n; i++) {
        struct dsv32_ops_node *o = &out[n];
        memset(o, 0, sizeof(*o));
        if (split_kind_id(nodes.kvs[i].key, strlen(prefix), o->info.kind, o->info.id) < 0 ||
            (kind && strcmp(kind, o->info.kind) != 0) ||
            dsv32_node_info_from_json((const char *)nodes.kvs[i].value, nodes.kvs[i].value_len,
                                      &o->info) < 0)
            continue;
        o->info.lease = nodes.kvs[i].lease;
        o->info.mod_revision = nodes.kvs[i].mod_revision;
        o->ttl_s = o->granted_ttl_s = -1;
        for (size_t j = 0; j < cordons.n; j++) {
            if (strcmp(cordons.kvs[j].key + strlen(cprefix), o->info.id) != 0)
                continue;
            o->info.cordoned = true;
            cJSON *c = cJSON_ParseWithLength((const char *)cordons.kvs[j].value,
                                             cordons.kvs[j].value_len);
            const cJSON *why = cJSON_GetObjectItemCaseSensitive(c, "reason");
            if (cJSON_IsString(why))
                snprintf(o->cordon_reason, sizeof(o->cordon_reason), "%s", why->valuestring);
            cJSON_Delete(c);
        }
        for (size_t j = 0; j < drains.n; j++) {
            char k[DSV32_NODE_NAME_MAX], id[DSV32_NODE_NAME_MAX];
            if (split_kind_id(drains.kvs[j].key, strlen(dprefix), k, id) == 0 &&
                strcmp(k, o->info.kind) == 0 && strcmp(id, o->info.id) == 0)
                o->drain_requested = true;
        }
        if (with_ttl && o->info.lease) {
            int64_t ttl, granted;
            if (dsv32_etcd_lease_ttl(e, o->info.lease, &ttl, &granted) == 0) {
                o->ttl_s = ttl;
                o->granted_ttl_s = granted;
            }
        }
        n++;
    }
    if (ret_revision)
        *ret_revision = nodes.revision;
    *ret = out;
    *ret_n = n;
    out = NULL;
    r = 0;
out:
    free(out);
    dsv32_etcd_range_done(&nodes);
    dsv32_etcd_range_done(&cordons);
    dsv32_etcd_range_done(&drains);
    return r;
}

int dsv32_ops_find_node(struct dsv32_etcd *e, const char *cluster, const char *kind,
                        const char *id, struct dsv32_node_info *ret, char *why, size_t why_len)
{
    if (dsv32_node_name_check(cluster) < 0 || dsv32_node_name_check(id) < 0 ||
        (kind && kind[0] && dsv32_node_name_check(kind) < 0)) {
        set_why(why, why_len, "bad cluster, kind or node id");
        return -EINVAL;
    }
    struct dsv32_ops_node *nodes;
    size_t n;
    int r = dsv32_ops_list_nodes(e, cluster, kind && kind[0] ? kind : NULL, false, &nodes, &n,
                                 NULL);
    if (r < 0) {
        set_why(why, why_len, "reading the nodes from etcd: %s", dsv32_strerror(r));
        return r;
    }
    int found = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(nodes[i].info.id, id) == 0) {
            if (found++ == 0)
                *ret = nodes[i].info;
        }
    free(nodes);
    if (found == 0) {
        set_why(why, why_len, "no node %s%s%s in cluster %s", kind && kind[0] ? kind : "",
                kind && kind[0] ? "/" : "", id, cluster);
        return -ENOENT;
    }
    if (found > 1) {
        set_why(why, why_len, "%d nodes of different kinds are called %s: give the kind", found,
                id);
        return -EINVAL;
    }
    return 0;
}

/* ---- drain ---- */

/* -EBUSY when `id` is an expert candidate of some group whose other expert candidates are all
 * gone or draining. */
static int last_shard_check(struct dsv32_etcd *e, const char *endpoint, const char *cluster,
                            const char *id, char *why, size_t why_len)
{
    static char groups[DSV32_OPS_MAX_GROUPS][DSV32_NODE_NAME_MAX]; /* under glock */
    static pthread_mutex_t glock = PTHREAD_MUTEX_INITIALIZER;
    size_t ng = 0;
    int r = 0;
    pthread_mutex_lock(&glock);
    if ((r = dsv32_ops_list_groups(endpoint, cluster, groups, DSV32_OPS_MAX_GROUPS, &ng)) < 0) {
        set_why(why, why_len, "listing the EP groups: %s", dsv32_strerror(r));
        goto out;
    }
    for (size_t g = 0; g < ng && r == 0; g++) {
        char prefix[KEY_MAX];
        snprintf(prefix, sizeof(prefix), "/dsv32/%s/groups/%s/candidates/expert/", cluster,
                 groups[g]);
        struct dsv32_etcd_range cand;
        if ((r = dsv32_etcd_range(e, prefix, DSV32_ETCD_PREFIX, 0, &cand)) < 0) {
            set_why(why, why_len, "reading group %s: %s", groups[g], dsv32_strerror(r));
            break;
        }
        int member = 0, others = 0;
        for (size_t i = 0; i < cand.n; i++) {
            const char *cid = cand.kvs[i].key + strlen(prefix);
            if (strcmp(cid, id) == 0) {
                member = 1;
                continue;
            }
            char dkey[KEY_MAX];
            struct dsv32_etcd_kv kv;
            if (dsv32_ops_drain_key(cluster, "expert", cid, dkey, sizeof(dkey)) == 0 &&
                dsv32_etcd_get(e, dkey, &kv, NULL) == 0) {
                dsv32_etcd_kv_done(&kv); /* draining too: it is leaving */
                continue;
            }
            others++;
        }
        dsv32_etcd_range_done(&cand);
        if (member && others == 0) {
            set_why(why, why_len, "%s is the last expert shard of EP group %s: start another "
                    "shard first (the group would have no experts)", id, groups[g]);
            r = -EBUSY;
        }
    }
out:
    pthread_mutex_unlock(&glock);
    return r;
}

int dsv32_ops_drain(struct dsv32_etcd *e, const char *endpoint, const char *cluster,
                    const char *kind, const char *id, struct dsv32_node_info *ret_node, char *why,
                    size_t why_len)
{
    struct dsv32_node_info node;
    int r = 0;
    /* the node may re-register on a new lease between the read and the write: try again */
    for (int attempt = 0; attempt < 3; attempt++) {
        if ((r = dsv32_ops_find_node(e, cluster, kind, id, &node, why, why_len)) < 0)
            return r;
        if (strcmp(node.kind, "attn") != 0 && strcmp(node.kind, "expert") != 0) {
            set_why(why, why_len, "%s is a %s: only attention daemons and expert shards drain "
                    "(stop a router instead; its clients reconnect to another)", id, node.kind);
            return -EINVAL;
        }
        if (node.lease == 0) {
            set_why(why, why_len, "%s/%s has no lease", node.kind, id);
            return -ENOENT;
        }
        if (strcmp(node.kind, "expert") == 0 &&
            (r = last_shard_check(e, endpoint, cluster, id, why, why_len)) < 0)
            return r;
        char key[KEY_MAX], value[64];
        if ((r = dsv32_ops_drain_key(cluster, node.kind, id, key, sizeof(key))) < 0) {
            set_why(why, why_len, "bad names");
            return r;
        }
        snprintf(value, sizeof(value), "{\"since_unix\":%lld}", (long long)time(NULL));
        r = dsv32_etcd_put(e, key, value, strlen(value), node.lease, NULL);
        if (r != -ENOENT)
            break;
    }
    if (r < 0) {
        set_why(why, why_len, "writing the drain request: %s", dsv32_strerror(r));
        return r;
    }
    if (ret_node)
        *ret_node = node;
    return 0;
}

struct dsv32_ops_drain_watch {
    struct dsv32_etcd_watch *w;
    dsv32_ops_drain_fn fn;
    void *arg;
    atomic_bool fired;
};

static void on_drain_key(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_ops_drain_watch *dw = arg;
    for (size_t i = 0; i < b->n; i++) {
        if (b->events[i].type != DSV32_ETCD_EVENT_PUT || atomic_exchange(&dw->fired, true))
            continue;
        log_info("drain requested (%s): finishing what runs, taking nothing new",
                 b->events[i].kv.key);
        dw->fn(dw->arg);
    }
}

int dsv32_ops_drain_watch_new(struct dsv32_etcd *e, const char *cluster, const char *kind,
                              const char *id, dsv32_ops_drain_fn fn, void *arg,
                              struct dsv32_ops_drain_watch **ret)
{
    char key[KEY_MAX];
    int r = dsv32_ops_drain_key(cluster, kind, id, key, sizeof(key));
    if (r < 0)
        return r;
    struct dsv32_ops_drain_watch *dw = calloc(1, sizeof(*dw));
    if (!dw)
        return -ENOMEM;
    dw->fn = fn;
    dw->arg = arg;
    atomic_init(&dw->fired, false);
    if ((r = dsv32_etcd_watch_new(e, key, DSV32_ETCD_SNAPSHOT, 0, on_drain_key, dw, &dw->w)) < 0) {
        free(dw);
        return r;
    }
    *ret = dw;
    return 0;
}

bool dsv32_ops_drain_watch_fired(struct dsv32_ops_drain_watch *w)
{
    return w && atomic_load(&w->fired);
}

void dsv32_ops_drain_watch_free(struct dsv32_ops_drain_watch *w)
{
    if (!w)
        return;
    dsv32_etcd_watch_free(w->w);
    free(w);
}

/* ---- EP groups ---- */

int dsv32_ops_list_groups(const char *endpoint, const char *cluster,
                          char names[][DSV32_NODE_NAME_MAX], size_t cap, size_t *ret_n)
{
    char prefix[KEY_MAX], end[KEY_MAX];
    if (dsv32_node_name_check(cluster) < 0)
        return -EINVAL;
    int plen = snprintf(prefix, sizeof(prefix), "/dsv32/%s/groups/", cluster);
    memcpy(end, prefix, (size_t)plen + 1);
    end[plen - 1]++; /* "/dsv32/<c>/groups0": just past every key under the prefix */
    /* keys only: the epoch records (placements) of every epoch stay out of the answer */
    struct dsv32_rpc_client_config cc = {.target = endpoint, .max_recv_bytes = 64u << 20};
    struct dsv32_rpc_client *c;
    int r = dsv32_rpc_client_new(&cc, &c);
    if (r < 0)
        return r;
    Etcdserverpb__RangeRequest rq = ETCDSERVERPB__RANGE_REQUEST__INIT;
    rq.key.data = (uint8_t *)prefix;
    rq.key.len = (size_t)plen;
    rq.range_end.data = (uint8_t *)end;
    rq.range_end.len = (size_t)plen;
    rq.keys_only = 1;
    ProtobufCMessage *m = NULL;
    struct dsv32_rpc_status st;
    r = dsv32_rpc_unary_msg(c, "/etcdserverpb.KV/Range", &rq.base,
                            &etcdserverpb__range_response__descriptor, 5000,
                            DSV32_RPC_WAIT_FOR_READY, &m, &st);
    if (r < 0) {
        log_warn("etcd %s: Range %s: %s %s", endpoint, prefix, dsv32_rpc_code_name(st.code),
                 st.message);
        dsv32_rpc_client_free(c);
        return r == DSV32_EGRPC ? DSV32_EETCD : r;
    }
    Etcdserverpb__RangeResponse *resp = (Etcdserverpb__RangeResponse *)m;
    size_t n = 0;
    for (size_t i = 0; i < resp->n_kvs; i++) {
        const ProtobufCBinaryData *k = &resp->kvs[i]->key;
        if (k->len <= (size_t)plen)
            continue;
        const char *g = (const char *)k->data + plen;
        size_t gl = 0;
        while (plen + gl < k->len && g[gl] != '/')
            gl++;
        if (gl == 0 || gl >= DSV32_NODE_NAME_MAX)
            continue;
        /* keys come sorted: a group's keys are consecutive */
        if (n > 0 && strlen(names[n - 1]) == gl && memcmp(names[n - 1], g, gl) == 0)
            continue;
        if (n == cap)
            break;
        memcpy(names[n], g, gl);
        names[n][gl] = 0;
        n++;
    }
    protobuf_c_message_free_unpacked(m, NULL);
    dsv32_rpc_client_free(c);
    *ret_n = n;
    return 0;
}

int dsv32_ops_group_current(struct dsv32_etcd *e, const char *cluster, const char *group,
                            uint64_t *ret_epoch, char **ret_json, size_t *ret_len,
                            int64_t *ret_revision)
{
    char key[KEY_MAX];
    if (dsv32_node_name_check(cluster) < 0 || dsv32_node_name_check(group) < 0)
        return -EINVAL;
    snprintf(key, sizeof(key), "/dsv32/%s/groups/%s/current", cluster, group);
    struct dsv32_etcd_kv kv;
    int64_t rev = 0;
    int r = dsv32_etcd_get(e, key, &kv, &rev);
    if (r < 0)
        return r;
    uint64_t n = strtoull((const char *)kv.value, NULL, 10);
    dsv32_etcd_kv_done(&kv);
    if (n == 0)
        return -ENOENT;
    snprintf(key, sizeof(key), "/dsv32/%s/groups/%s/epoch/%llu", cluster, group,
             (unsigned long long)n);
    if ((r = dsv32_etcd_get(e, key, &kv, NULL)) < 0)
        return r;
    *ret_epoch = n;
    *ret_json = (char *)kv.value; /* NUL-terminated by the etcd client */
    *ret_len = kv.value_len;
    kv.value = NULL;
    dsv32_etcd_kv_done(&kv);
    if (ret_revision)
        *ret_revision = rev;
    return 0;
}
