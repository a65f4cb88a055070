/* EP group records, candidates, followers and the leader's epoch publishing; see group.h. */
#include "group.h"

#include "error.h"
#include "log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dsv32_group_key(const char *cluster, const char *group, const char *rest, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "/dsv32/%s/groups/%s/%s", cluster, group, rest);
    return n < 0 || (size_t)n >= cap ? -ENOBUFS : 0;
}

void dsv32_group_epoch_done(struct dsv32_group_epoch *e)
{
    if (e)
        dsv32_placement_done(&e->placement);
}

static void hex(char *out, const uint8_t *b, size_t n)
{
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = d[b[i] >> 4];
        out[2 * i + 1] = d[b[i] & 15];
    }
    out[2 * n] = 0;
}

static int unhex(uint8_t *b, const char *s, size_t n)
{
    if (strlen(s) != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        b[i] = (uint8_t)v;
    }
    return 0;
}

char *dsv32_group_epoch_to_json(const struct dsv32_group_epoch *e)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "epoch", (double)e->epoch);
    cJSON_AddNumberToObject(o, "n_attn", e->n_attn);
    cJSON_AddNumberToObject(o, "n_shards", e->n_shards);
    cJSON_AddStringToObject(o, "transport", e->transport);
    if (strcmp(e->transport, "nccl") == 0) {
        char h[2 * DSV32_NCCL_ID_BYTES + 1];
        hex(h, e->nccl_id, DSV32_NCCL_ID_BYTES);
        cJSON_AddStringToObject(o, "nccl_id", h);
    }
    cJSON *mem = cJSON_AddArrayToObject(o, "members");
    for (int i = 0; i < e->n_attn + e->n_shards; i++) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "kind", e->members[i].kind);
        cJSON_AddStringToObject(m, "id", e->members[i].id);
        cJSON_AddStringToObject(m, "comm", e->members[i].comm);
        cJSON_AddNumberToObject(m, "gpu", e->members[i].gpu);
        cJSON_AddNumberToObject(m, "rank", i);
        cJSON_AddItemToArray(mem, m);
    }
    char *pl = e->n_shards ? dsv32_placement_to_json(&e->placement) : NULL;
    if (pl) {
        cJSON_AddItemToObject(o, "placement", cJSON_Parse(pl));
        free(pl);
    }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static int str_field(const cJSON *o, const char *name, char *dst, size_t cap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsString(v) || strlen(v->valuestring) >= cap)
        return -1;
    strcpy(dst, v->valuestring);
    return 0;
}

int dsv32_group_epoch_from_json(const char *json, size_t len, struct dsv32_group_epoch *e)
{
    cJSON *o = cJSON_ParseWithLength(json, len);
    int r = DSV32_EFORMAT;
    memset(e, 0, sizeof(*e));
    const cJSON *ep = cJSON_GetObjectItem(o, "epoch"), *na = cJSON_GetObjectItem(o, "n_attn"),
                *ns = cJSON_GetObjectItem(o, "n_shards"), *mem = cJSON_GetObjectItem(o, "members");
    if (!cJSON_IsNumber(ep) || !cJSON_IsNumber(na) || !cJSON_IsNumber(ns) || !cJSON_IsArray(mem) ||
        na->valueint < 0 || ns->valueint < 0 ||
        na->valueint + ns->valueint > DSV32_GROUP_MAX_MEMBERS ||
        cJSON_GetArraySize(mem) != na->valueint + ns->valueint ||
        str_field(o, "transport", e->transport, sizeof(e->transport)) < 0)
        goto out;
    e->epoch = (uint64_t)ep->valuedouble;
    e->n_attn = na->valueint;
    e->n_shards = ns->valueint;
    for (int i = 0; i < e->n_attn + e->n_shards; i++) {
        const cJSON *m = cJSON_GetArrayItem(mem, i), *gpu = cJSON_GetObjectItem(m, "gpu");
        if (str_field(m, "kind", e->members[i].kind, sizeof(e->members[i].kind)) < 0 ||
            str_field(m, "id", e->members[i].id, sizeof(e->members[i].id)) < 0 ||
            str_field(m, "comm", e->members[i].comm, sizeof(e->members[i].comm)) < 0 ||
            !cJSON_IsNumber(gpu))
            goto out;
        e->members[i].gpu = gpu->valueint;
    }
    if (strcmp(e->transport, "nccl") == 0) {
        const cJSON *id = cJSON_GetObjectItem(o, "nccl_id");
        if (!cJSON_IsString(id) || unhex(e->nccl_id, id->valuestring, DSV32_NCCL_ID_BYTES) < 0)
            goto out;
    } else if (strcmp(e->transport, "tcp") != 0) {
        goto out;
    }
    if (e->n_shards) {
        const cJSON *pl = cJSON_GetObjectItem(o, "placement");
        char *pls = pl ? cJSON_PrintUnformatted(pl) : NULL;
        int pr = pls ? dsv32_placement_from_json(pls, &e->placement) : DSV32_EFORMAT;
        free(pls);
        if (pr < 0 || e->placement.n_shards != e->n_shards)
            goto out;
    }
    r = 0;
out:
    cJSON_Delete(o);
    if (r < 0)
        dsv32_group_epoch_done(e);
    return r;
}

int dsv32_group_rank_of(const struct dsv32_group_epoch *e, const char *kind, const char *id)
{
    for (int i = 0; i < e->n_attn + e->n_shards; i++)
        if (strcmp(e->members[i].kind, kind) == 0 && strcmp(e->members[i].id, id) == 0)
            return i;
    return -1;
}

int dsv32_group_join(struct dsv32_etcd *e, const char *cluster, const char *group,
                     const struct dsv32_group_member *me, int64_t lease)
{
    char rest[160], key[512];
    snprintf(rest, sizeof(rest), "candidates/%s/%s", me->kind, me->id);
    int r = dsv32_group_key(cluster, group, rest, key, sizeof(key));
    if (r < 0)
        return r;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "comm", me->comm);
    cJSON_AddNumberToObject(o, "gpu", me->gpu);
    char *v = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!v)
        return -ENOMEM;
    r = dsv32_etcd_put(e, key, v, strlen(v), lease, NULL);
    free(v);
    return r;
}

int dsv32_group_request_new_epoch(struct dsv32_etcd *e, const char *cluster, const char *group,
                                  uint64_t failed_epoch)
{
    char key[512], val[32];
    int r = dsv32_group_key(cluster, group, "bump", key, sizeof(key));
    if (r < 0)
        return r;
    snprintf(val, sizeof(val), "%llu", (unsigned long long)failed_epoch);
    return dsv32_etcd_put(e, key, val, strlen(val), 0, NULL);
}

/* ---- followers ---- */

struct dsv32_group_follower {
    struct dsv32_etcd *etcd;
    struct dsv32_etcd_watch *watch;
    char cluster[64], group[64];
    dsv32_group_epoch_fn fn;
    void *arg;
    uint64_t last;
};

static void on_current(void *vf, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_group_follower *f = vf;
    for (size_t i = 0; i < b->n; i++) {
        if (b->events[i].type != DSV32_ETCD_EVENT_PUT)
            continue;
        uint64_t n = strtoull((const char *)b->events[i].kv.value, NULL, 10);
        if (n == 0 || n == f->last)
            continue;
        char rest[64], key[512];
        snprintf(rest, sizeof(rest), "epoch/%llu", (unsigned long long)n);
        if (dsv32_group_key(f->cluster, f->group, rest, key, sizeof(key)) < 0)
            continue;
        struct dsv32_etcd_kv kv;
        if (dsv32_etcd_get(f->etcd, key, &kv, NULL) < 0) {
            log_warn("group %s: epoch %llu announced but its record is missing", f->group,
                     (unsigned long long)n);
            continue;
        }
        struct dsv32_group_epoch *e = malloc(sizeof(*e));
        if (e && dsv32_group_epoch_from_json((const char *)kv.value, kv.value_len, e) == 0) {
            f->last = n;
            f->fn(f->arg, e);
            dsv32_group_epoch_done(e);
        } else {
            log_warn("group %s: epoch %llu record is malformed", f->group, (unsigned long long)n);
        }
        free(e);
        dsv32_etcd_kv_done(&kv);
    }
}

int dsv32_group_follow(struct dsv32_etcd *e, const char *cluster, const char *group,
                       dsv32_group_epoch_fn fn, void *arg, struct dsv32_group_follower **ret)
{
    struct dsv32_group_follower *f = calloc(1, sizeof(*f));
    if (!f)
        return -ENOMEM;
    f->etcd = e;
    snprintf(f->cluster, sizeof(f->cluster), "%s", cluster);
    snprintf(f->group, sizeof(f->group), "%s", group);
    f->fn = fn;
    f->arg = arg;
    char key[512];
    int r = dsv32_group_key(cluster, group, "current", key, sizeof(key));
    if (r == 0)
        r = dsv32_etcd_watch_new(e, key, DSV32_ETCD_SNAPSHOT, 0, on_current, f, &f->watch);
    if (r < 0) {
        free(f);
        return r;
    }
    *ret = f;
    return 0;
}

void dsv32_group_follower_free(struct dsv32_group_follower *f)
{
    if (!f)
        return;
    dsv32_etcd_watch_free(f->watch);
    free(f);
}

/* ---- the leader ---- */

static int cmp_member(const void *a, const void *b)
{
    const struct dsv32_group_member *x = a, *y = b;
    int k = strcmp(x->kind, y->kind); /* "attn" < "expert" */
    return k ? k : strcmp(x->id, y->id);
}

int dsv32_group_lead(struct dsv32_etcd *e, const char *cluster, const char *group,
                     const struct dsv32_config *cfg, const char *transport, int redundant,
                     const double *load, uint64_t *ret_epoch)
{
    char key[512], prefix[512];
    struct dsv32_etcd_range cand = {0};
    struct dsv32_group_epoch *cur = NULL, *next = NULL;
    char *json = NULL;
    int r;
    if ((r = dsv32_group_key(cluster, group, "candidates/", prefix, sizeof(prefix))) < 0 ||
        (r = dsv32_etcd_range(e, prefix, DSV32_ETCD_PREFIX, 0, &cand)) < 0)
        return r;
    next = calloc(1, sizeof(*next));
    cur = calloc(1, sizeof(*cur));
    if (!next || !cur) {
        r = -ENOMEM;
        goto out;
    }
    /* the live candidates, sorted: attention daemons, then expert shards */
    int n = 0;
    for (size_t i = 0; i < cand.n && n < DSV32_GROUP_MAX_MEMBERS; i++) {
        const char *rest = cand.kvs[i].key + strlen(prefix);
        const char *slash = strchr(rest, '/');
        if (!slash || (size_t)(slash - rest) >= sizeof(next->members[0].kind))
            continue;
        struct dsv32_group_member *m = &next->members[n];
        memcpy(m->kind, rest, (size_t)(slash - rest));
        m->kind[slash - rest] = 0;
        snprintf(m->id, sizeof(m->id), "%s", slash + 1);
        cJSON *o = cJSON_ParseWithLength((const char *)cand.kvs[i].value, cand.kvs[i].value_len);
        const cJSON *comm = cJSON_GetObjectItem(o, "comm"), *gpu = cJSON_GetObjectItem(o, "gpu");
        if (cJSON_IsString(comm) && cJSON_IsNumber(gpu) &&
            (strcmp(m->kind, "attn") == 0 || strcmp(m->kind, "expert") == 0)) {
            snprintf(m->comm, sizeof(m->comm), "%s", comm->valuestring);
            m->gpu = gpu->valueint;
            n++;
        }
        cJSON_Delete(o);
    }
    qsort(next->members, (size_t)n, sizeof(next->members[0]), cmp_member);
    for (int i = 0; i < n; i++)
        next->n_attn += strcmp(next->members[i].kind, "attn") == 0;
    next->n_shards = n - next->n_attn;
    snprintf(next->transport, sizeof(next->transport), "%s", transport);

    /* the current epoch */
    uint64_t cur_n = 0;
    int64_t cur_mod = 0;
    struct dsv32_etcd_kv kv;
    if ((r = dsv32_group_key(cluster, group, "current", key, sizeof(key))) < 0)
        goto out;
    r = dsv32_etcd_get(e, key, &kv, NULL);
    if (r == 0) {
        cur_n = strtoull((const char *)kv.value, NULL, 10);
        cur_mod = kv.mod_revision;
        dsv32_etcd_kv_done(&kv);
        char rest[64], ekey[512];
        snprintf(rest, sizeof(rest), "epoch/%llu", (unsigned long long)cur_n);
        if (dsv32_group_key(cluster, group, rest, ekey, sizeof(ekey)) == 0 &&
            dsv32_etcd_get(e, ekey, &kv, NULL) == 0) {
            if (dsv32_group_epoch_from_json((const char *)kv.value, kv.value_len, cur) < 0)
                memset(cur, 0, sizeof(*cur));
            dsv32_etcd_kv_done(&kv);
        }
    } else if (r != -ENOENT) {
        goto out;
    }
    /* a member asked for a fresh epoch of the current one (its communicator failed) */
    uint64_t bump = 0;
    char bkey[512];
    if (dsv32_group_key(cluster, group, "bump", bkey, sizeof(bkey)) == 0 &&
        dsv32_etcd_get(e, bkey, &kv, NULL) == 0) {
        bump = strtoull((const char *)kv.value, NULL, 10);
        dsv32_etcd_kv_done(&kv);
    }
    /* the same members (and comm addresses) as now: nothing to publish */
    int same = cur_n > 0 && bump < cur_n && cur->n_attn == next->n_attn && cur->n_shards == next->n_shards &&
               strcmp(cur->transport, transport) == 0;
    for (int i = 0; same && i < n; i++)
        same = cmp_member(&cur->members[i], &next->members[i]) == 0 &&
               strcmp(cur->members[i].comm, next->members[i].comm) == 0;
    if (same || n == 0) {
        *ret_epoch = cur_n;
        r = 0;
        goto out;
    }
    next->epoch = cur_n + 1;
    if (next->n_shards > 0 &&
        (r = dsv32_placement_build(cfg, next->n_shards, redundant, load, &next->placement)) < 0)
        goto out;
    if (strcmp(transport, "nccl") == 0 && (r = dsv32_comm_nccl_unique_id(next->nccl_id)) < 0)
        goto out;
    json = dsv32_group_epoch_to_json(next);
    if (!json) {
        r = -ENOMEM;
        goto out;
    }
    char rest[64], ekey[512], val[32];
    snprintf(rest, sizeof(rest), "epoch/%llu", (unsigned long long)next->epoch);
    snprintf(val, sizeof(val), "%llu", (unsigned long long)next->epoch);
    if ((r = dsv32_group_key(cluster, group, rest, ekey, sizeof(ekey))) < 0)
        goto out;
    /* atomically: the record, and current moved from the epoch we read (no other leader won) */
    struct dsv32_etcd_cmp cmp = {.key = key, .target = DSV32_ETCD_CMP_MOD,
                                 .result = DSV32_ETCD_EQUAL, .number = cur_mod};
    struct dsv32_etcd_op ops[2] = {
        {.type = DSV32_ETCD_OP_PUT, .key = ekey, .value = json, .value_len = strlen(json)},
        {.type = DSV32_ETCD_OP_PUT, .key = key, .value = val, .value_len = strlen(val)},
    };
    struct dsv32_etcd_txn_result tr;
    if ((r = dsv32_etcd_txn(e, &cmp, 1, ops, 2, NULL, 0, &tr)) < 0)
        goto out;
    int ok = tr.succeeded;
    dsv32_etcd_txn_result_done(&tr);
    if (!ok) {
        r = DSV32_EEPOCH; /* someone moved current meanwhile: read again */
        goto out;
    }
    log_info("group %s: epoch %llu: %d attention daemons, %d expert shards (%s)", group,
             (unsigned long long)next->epoch, next->n_attn, next->n_shards, transport);
    *ret_epoch = next->epoch;
    r = 0;
out:
    free(json);
    dsv32_etcd_range_done(&cand);
    if (cur)
        dsv32_group_epoch_done(cur);
    if (next)
        dsv32_group_epoch_done(next);
    free(cur);
    free(next);
    return r;
}
