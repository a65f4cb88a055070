/* dsv32ctl placement: the EP groups of a cluster, each with its current epoch, members with ranks
 * and which expert shard holds which (layer, expert), through the router's Admin.GetPlacement or
 * straight from the groups' epoch records in etcd. Both sources become the same JSON document,
 * which --json prints as is and the text form summarizes per shard. */
#include "ctl.h"

#include "dsv32.pb-c.h"
#include "error.h"
#include "group.h"
#include "ops.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

static cJSON *member_json(const char *kind, const char *id, unsigned rank, const char *address)
{
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "kind", kind);
    cJSON_AddStringToObject(m, "id", id);
    cJSON_AddNumberToObject(m, "rank", rank);
    cJSON_AddStringToObject(m, "address", address);
    return m;
}

static cJSON *expert_json(unsigned layer, unsigned expert)
{
    cJSON *x = cJSON_CreateObject();
    cJSON_AddNumberToObject(x, "layer", layer);
    cJSON_AddNumberToObject(x, "expert", expert);
    cJSON_AddArrayToObject(x, "shards");
    return x;
}

static cJSON *from_router(const struct ctl_target *t, const char *group)
{
    struct dsv32_rpc_client *c;
    if (ctl_router_client(t, true, &c) < 0)
        return NULL;
    Dsv32__V1__GetPlacementRequest rq = DSV32__V1__GET_PLACEMENT_REQUEST__INIT;
    rq.group = (char *)(group ? group : "");
    ProtobufCMessage *m;
    int r = ctl_call(c, t, "/dsv32.v1.Admin/GetPlacement", &rq.base,
                     &dsv32__v1__get_placement_response__descriptor, 15000, &m);
    dsv32_rpc_client_free(c);
    if (r < 0)
        return NULL;
    Dsv32__V1__GetPlacementResponse *resp = (Dsv32__V1__GetPlacementResponse *)m;
    cJSON *j = cJSON_CreateObject(), *ga = cJSON_AddArrayToObject(j, "groups");
    cJSON_AddStringToObject(j, "source", "router");
    cJSON_AddNumberToObject(j, "revision", (double)resp->revision);
    for (size_t g = 0; g < resp->n_groups; g++) {
        const Dsv32__V1__Group *pg = resp->groups[g];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "name", pg->name);
        cJSON_AddNumberToObject(x, "epoch", (double)pg->epoch);
        cJSON *ma = cJSON_AddArrayToObject(x, "members"), *ea = cJSON_AddArrayToObject(x, "experts");
        for (size_t i = 0; i < pg->n_members; i++)
            cJSON_AddItemToArray(ma, member_json(pg->members[i]->kind, pg->members[i]->id,
                                                 pg->members[i]->rank, pg->members[i]->address));
        for (size_t i = 0; i < pg->n_experts; i++) {
            cJSON *e = expert_json(pg->experts[i]->layer, pg->experts[i]->expert);
            cJSON *sa = cJSON_GetObjectItem(e, "shards");
            for (size_t k = 0; k < pg->experts[i]->n_shard_ids; k++)
                cJSON_AddItemToArray(sa, cJSON_CreateString(pg->experts[i]->shard_ids[k]));
            cJSON_AddItemToArray(ea, e);
        }
        cJSON_AddItemToArray(ga, x);
    }
    protobuf_c_message_free_unpacked(m, NULL);
    return j;
}

static cJSON *from_etcd(const struct ctl_target *t, const char *group)
{
    static char names[DSV32_OPS_MAX_GROUPS][DSV32_NODE_NAME_MAX];
    static struct dsv32_group_epoch ep;
    size_t ng = 0;
    int r;
    if (group) {
        snprintf(names[0], sizeof(names[0]), "%s", group);
        ng = 1;
    } else if ((r = dsv32_ops_list_groups(t->etcd, t->cluster, names, DSV32_OPS_MAX_GROUPS,
                                          &ng)) < 0) {
        fprintf(stderr, "dsv32ctl: listing the EP groups in etcd %s: %s\n", t->etcd,
                dsv32_strerror(r));
        return NULL;
    }
    struct dsv32_etcd *e;
    if (ctl_etcd_client(t, &e) < 0)
        return NULL;
    cJSON *j = cJSON_CreateObject(), *ga = cJSON_AddArrayToObject(j, "groups");
    cJSON_AddStringToObject(j, "source", "etcd");
    int64_t revision = 0;
    for (size_t g = 0; g < ng; g++) {
        uint64_t epoch = 0;
        char *json = NULL;
        size_t len = 0;
        int64_t rev = 0;
        r = dsv32_ops_group_current(e, t->cluster, names[g], &epoch, &json, &len, &rev);
        if (r == -ENOENT && group) {
            fprintf(stderr, "dsv32ctl: EP group %s of cluster %s has no epoch\n", group,
                    t->cluster);
            goto fail;
        }
        if (r < 0 && r != -ENOENT) {
            fprintf(stderr, "dsv32ctl: group %s: %s\n", names[g], dsv32_strerror(r));
            goto fail;
        }
        revision = rev > revision ? rev : revision;
        cJSON *x = cJSON_CreateObject();
        cJSON_AddItemToArray(ga, x);
        cJSON_AddStringToObject(x, "name", names[g]);
        cJSON_AddNumberToObject(x, "epoch", (double)(r == 0 ? epoch : 0));
        cJSON *ma = cJSON_AddArrayToObject(x, "members"), *ea = cJSON_AddArrayToObject(x, "experts");
        if (r < 0)
            continue;
        r = dsv32_group_epoch_from_json(json, len, &ep);
        free(json);
        if (r < 0) {
            fprintf(stderr, "dsv32ctl: group %s: epoch %llu record is malformed\n", names[g],
                    (unsigned long long)epoch);
            goto fail;
        }
        for (int i = 0; i < ep.n_attn + ep.n_shards; i++)
            cJSON_AddItemToArray(ma, member_json(ep.members[i].kind, ep.members[i].id,
                                                 (unsigned)i, ep.members[i].comm));
        const struct dsv32_placement *p = &ep.placement;
        for (int l = 0; ep.n_shards && l < p->n_layers; l++)
            for (int xe = 0; xe < p->n_experts; xe++) {
                const int16_t *own = dsv32_placement_owners(p, l, xe);
                cJSON *ex = NULL;
                for (int k = 0; k < p->max_replicas; k++) {
                    if (own[k] < 0 || own[k] >= ep.n_shards)
                        continue;
                    if (!ex)
                        ex = expert_json((unsigned)l, (unsigned)xe);
                    cJSON_AddItemToArray(cJSON_GetObjectItem(ex, "shards"),
                                         cJSON_CreateString(ep.members[ep.n_attn + own[k]].id));
                }
                if (ex)
                    cJSON_AddItemToArray(ea, ex);
            }
        dsv32_group_epoch_done(&ep);
    }
    cJSON_AddNumberToObject(j, "revision", (double)revision);
    dsv32_etcd_free(e);
    return j;
fail:
    cJSON_Delete(j);
    dsv32_etcd_free(e);
    return NULL;
}

/* Appends "L<layer>[a-b,c]" groups of one shard's experts to line. */
static void shard_summary(const cJSON *experts, const char *shard, char *line, size_t cap,
                          int *ret_count)
{
    int count = 0, cur_layer = -1, run_start = -1, run_end = -1;
    size_t len = strlen(line);
#define EMIT_RUN()                                                                                 \
    do {                                                                                           \
        if (run_start >= 0 && len < cap)                                                           \
            len += (size_t)snprintf(line + len, cap - len, run_start == run_end ? "%s%d" : "%s%d-%d", \
                                    line[len - 1] == '[' ? "" : ",", run_start, run_end);        \
    } while (0)
    const cJSON *x;
    cJSON_ArrayForEach(x, experts)
    {
        const cJSON *sh;
        bool mine = false;
        cJSON_ArrayForEach(sh, cJSON_GetObjectItem(x, "shards"))
            mine |= cJSON_IsString(sh) && strcmp(sh->valuestring, shard) == 0;
        if (!mine)
            continue;
        int l = cJSON_GetObjectItem(x, "layer")->valueint, e = cJSON_GetObjectItem(x, "expert")->valueint;
        count++;
        if (l != cur_layer) {
            EMIT_RUN();
            if (cur_layer >= 0 && len < cap)
                len += (size_t)snprintf(line + len, cap - len, "]");
            if (len < cap)
                len += (size_t)snprintf(line + len, cap - len, "%sL%d[", cur_layer >= 0 ? " " : "", l);
            cur_layer = l;
            run_start = run_end = e;
        } else if (e == run_end + 1) {
            run_end = e;
        } else {
            EMIT_RUN();
            run_start = run_end = e;
        }
    }
    EMIT_RUN();
    if (cur_layer >= 0 && len < cap)
        snprintf(line + len, cap - len, "]");
#undef EMIT_RUN
    *ret_count = count;
}

static void print_text(const cJSON *j)
{
    const cJSON *g;
    int ng = 0;
    cJSON_ArrayForEach(g, cJSON_GetObjectItem(j, "groups"))
    {
        const cJSON *members = cJSON_GetObjectItem(g, "members"), *experts = cJSON_GetObjectItem(g, "experts");
        printf("%sgroup %s: epoch %.0f, %d members\n", ng++ ? "\n" : "",
               cJSON_GetObjectItem(g, "name")->valuestring,
               cJSON_GetObjectItem(g, "epoch")->valuedouble, cJSON_GetArraySize(members));
        if (cJSON_GetArraySize(members) == 0)
            continue;
        printf("  %-4s %-7s %-14s %-22s %s\n", "RANK", "KIND", "ID", "COMM ADDRESS", "EXPERTS (layer[expert ids])");
        const cJSON *m;
        cJSON_ArrayForEach(m, members)
        {
            const char *kind = cJSON_GetObjectItem(m, "kind")->valuestring;
            const char *id = cJSON_GetObjectItem(m, "id")->valuestring;
            char line[8192] = "";
            int count = 0;
            if (strcmp(kind, "expert") == 0)
                shard_summary(experts, id, line, sizeof(line), &count);
            char head[32] = "";
            if (strcmp(kind, "expert") == 0)
                snprintf(head, sizeof(head), "%d: ", count);
            printf("  %-4.0f %-7s %-14s %-22s %s%s\n", cJSON_GetObjectItem(m, "rank")->valuedouble,
                   kind, id, cJSON_GetObjectItem(m, "address")->valuestring, head,
                   strcmp(kind, "expert") == 0 ? line : "-");
        }
    }
    if (ng == 0)
        printf("no EP groups (the cluster runs the experts inside its attention daemons)\n");
}

int ctl_cmd_placement(const struct ctl_opts *o)
{
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ANY, &t) < 0)
        return 2;
    if (o->group && dsv32_node_name_check(o->group) < 0) {
        fprintf(stderr, "dsv32ctl: bad group name %s\n", o->group);
        return 2;
    }
    cJSON *j = t.router[0] ? from_router(&t, o->group) : from_etcd(&t, o->group);
    if (!j)
        return 1;
    cJSON_AddStringToObject(j, "cluster", t.cluster);
    if (o->json)
        ctl_print_json(j);
    else {
        print_text(j);
        cJSON_Delete(j);
    }
    return 0;
}
