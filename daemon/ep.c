/* Expert parallelism: placement, the attention-side dispatch/combine hook and the shard-side
 * step loop; see ep.h.
 *
 * Wire format (little-endian, host memory on tcp):
 *   dispatch = struct ep_hdr, rows x dim activations (f32 or bf16), rows x k (expert, weight)
 *              pairs (int32, f32; expert -1 where the pair goes to another shard)
 *   combine  = struct ep_hdr, rows x dim weighted partial sums (f32 or bf16)
 * The dispatch's sizes come in a sizes round, except after the first MoE layer of a small step
 * (known_sizes), where every shard gets all the sender's rows and the sizes are known. */
#include "ep.h"

#include "clock.h"
#include "error.h"
#include "log.h"
#include "safetensors.h" /* dsv32_load_fail */
#ifdef DSV32_HAVE_CUDA
#include "cuda/cuda_backend.h" /* the trace's device timer */
#endif

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EP_DISPATCH 0x44504531u /* "1EPD" */
#define EP_COMBINE 0x43504531u
#define EP_ACTIVE 1u

struct ep_hdr {
    uint32_t magic, layer, rows, k, dim, wire, flags;
    uint32_t step_rows; /* dispatch: the sender's rows in this step (the same in every layer) */
};

/* From the second MoE layer of a step on, a sender whose step is small sends every shard all its
 * rows (the pairs of other shards' experts as -1), so that both sides know every block's size
 * (the step's rows came with the first layer's headers) and the dispatch needs no sizes round.
 * Small: rows x shards <= EP_KNOWN_BLOCKS, decode steps. With 3 shards and 8 experts a token a
 * row misses a given shard 1 time in 26 anyway; with many shards the padding would cost more
 * than the round it saves. */
#define EP_KNOWN_BLOCKS 512
static int known_sizes(int step_rows, int n_shards)
{
    return (int64_t)step_rows * n_shards <= EP_KNOWN_BLOCKS;
}

/* A round that only receives: a block from each peer marked in from, of the size in expect
 * (DSV32_COMM_SIZE_UNKNOWN where not known), its first head_bytes also in host memory (head) */
static int recv_round(struct dsv32_comm *comm, const uint8_t *from, const size_t *expect,
                      size_t head_bytes, void **recv, size_t *rb, void **head, int timeout_ms)
{
    static const void *const none[DSV32_COMM_MAX_WORLD];
    static const size_t zero[DSV32_COMM_MAX_WORLD];
    struct dsv32_comm_xchg x = {.send = none,
                                .send_bytes = zero,
                                .recv_from = from,
                                .recv = recv,
                                .recv_bytes = rb,
                                .recv_expect = expect,
                                .head_bytes = head_bytes,
                                .recv_head = head};
    return dsv32_comm_exchange(comm, &x, timeout_ms);
}

/* ---- placement ---- */

void dsv32_placement_done(struct dsv32_placement *p)
{
    if (!p)
        return;
    free(p->owner);
    memset(p, 0, sizeof(*p));
}

int dsv32_placement_has(const struct dsv32_placement *p, int shard, int layer, int expert)
{
    const int16_t *o = dsv32_placement_owners(p, layer, expert);
    for (int r = 0; r < p->max_replicas; r++)
        if (o[r] == shard)
            return 1;
    return 0;
}

int dsv32_placement_build(const struct dsv32_config *cfg, int n_shards, int redundant,
                          const double *load, struct dsv32_placement *ret)
{
    const int L = cfg->num_hidden_layers, E = cfg->n_routed_experts;
    if (n_shards < 1 || n_shards > 32767 || redundant < 0 || redundant > E)
        return -EINVAL;
    struct dsv32_placement p = {.n_layers = L, .n_experts = E, .n_shards = n_shards,
                                .max_replicas = redundant > 0 && n_shards > 1 ? 2 : 1};
    p.owner = malloc(sizeof(int16_t) * (size_t)L * (size_t)(E ? E : 1) * p.max_replicas);
    double *sl = calloc((size_t)n_shards, sizeof(double));
    int *order = malloc(sizeof(int) * (size_t)(E ? E : 1));
    if (!p.owner || !sl || !order) {
        free(p.owner);
        free(sl);
        free(order);
        return -ENOMEM;
    }
    for (size_t i = 0; i < (size_t)L * E * p.max_replicas; i++)
        p.owner[i] = -1;
    for (int l = 0; l < L; l++) {
        if (!dsv32_config_is_moe_layer(cfg, l))
            continue;
        const double *ld = load ? load + (size_t)l * E : NULL;
        /* busiest first, each to the least loaded shard (count breaks ties, then the lower id) */
        for (int e = 0; e < E; e++)
            order[e] = e;
        for (int i = 1; i < E; i++)
            for (int j = i; j > 0; j--) {
                double a = ld ? ld[order[j]] : 0, b = ld ? ld[order[j - 1]] : 0;
                if (a > b) {
                    int t = order[j];
                    order[j] = order[j - 1];
                    order[j - 1] = t;
                } else {
                    break;
                }
            }
        int *count = calloc((size_t)n_shards, sizeof(int));
        if (!count) {
            free(p.owner);
            free(sl);
            free(order);
            return -ENOMEM;
        }
        /* every shard holds ceil(E / n_shards) experts at most (memory stays balanced); among
         * those with room, the one with the least load so far takes the next busiest expert */
        const int cap = (E + n_shards - 1) / n_shards;
        memset(sl, 0, sizeof(double) * (size_t)n_shards);
        for (int i = 0; i < E; i++) {
            int e = order[i], best = -1;
            double w = ld ? ld[e] : 1.0;
            for (int s = 0; s < n_shards; s++)
                if (count[s] < cap && (best < 0 || sl[s] < sl[best]))
                    best = s;
            p.owner[((size_t)l * E + e) * p.max_replicas] = (int16_t)best;
            sl[best] += w;
            count[best]++;
        }
        /* redundant copies of the `redundant` busiest experts on the least loaded other shard;
         * each copy then takes about half of the expert's rows */
        for (int i = 0; i < redundant && p.max_replicas > 1; i++) {
            int e = order[i], home = p.owner[((size_t)l * E + e) * p.max_replicas];
            int best = -1;
            for (int s = 0; s < n_shards; s++)
                if (s != home && (best < 0 || sl[s] < sl[best]))
                    best = s;
            double w = ld ? ld[e] : 1.0;
            p.owner[((size_t)l * E + e) * p.max_replicas + 1] = (int16_t)best;
            sl[home] -= w / 2;
            sl[best] += w / 2;
        }
        free(count);
    }
    free(sl);
    free(order);
    *ret = p;
    return 0;
}

char *dsv32_placement_to_json(const struct dsv32_placement *p)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "layers", p->n_layers);
    cJSON_AddNumberToObject(o, "experts", p->n_experts);
    cJSON_AddNumberToObject(o, "shards", p->n_shards);
    cJSON_AddNumberToObject(o, "replicas", p->max_replicas);
    cJSON *own = cJSON_AddArrayToObject(o, "owner");
    for (int l = 0; l < p->n_layers; l++) {
        cJSON *la = cJSON_CreateArray();
        for (int e = 0; e < p->n_experts; e++) {
            cJSON *ea = cJSON_CreateArray();
            const int16_t *ow = dsv32_placement_owners(p, l, e);
            for (int r = 0; r < p->max_replicas; r++)
                if (ow[r] >= 0)
                    cJSON_AddItemToArray(ea, cJSON_CreateNumber(ow[r]));
            cJSON_AddItemToArray(la, ea);
        }
        cJSON_AddItemToArray(own, la);
    }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

int dsv32_placement_from_json(const char *json, struct dsv32_placement *ret)
{
    cJSON *o = cJSON_Parse(json);
    struct dsv32_placement p = {0};
    int r = DSV32_EFORMAT;
    const cJSON *L = cJSON_GetObjectItem(o, "layers"), *E = cJSON_GetObjectItem(o, "experts"),
                *S = cJSON_GetObjectItem(o, "shards"), *R = cJSON_GetObjectItem(o, "replicas"),
                *own = cJSON_GetObjectItem(o, "owner");
    if (!cJSON_IsNumber(L) || !cJSON_IsNumber(E) || !cJSON_IsNumber(S) || !cJSON_IsNumber(R) ||
        !cJSON_IsArray(own) || L->valueint < 0 || L->valueint > 4096 || E->valueint < 0 ||
        E->valueint > 65536 || S->valueint < 1 || S->valueint > 32767 || R->valueint < 1 ||
        R->valueint > 8 || cJSON_GetArraySize(own) != L->valueint)
        goto out;
    p = (struct dsv32_placement){.n_layers = L->valueint, .n_experts = E->valueint,
                                 .n_shards = S->valueint, .max_replicas = R->valueint};
    p.owner = malloc(sizeof(int16_t) * (size_t)p.n_layers * (size_t)(p.n_experts ? p.n_experts : 1) *
                     p.max_replicas);
    if (!p.owner) {
        r = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < (size_t)p.n_layers * p.n_experts * p.max_replicas; i++)
        p.owner[i] = -1;
    for (int l = 0; l < p.n_layers; l++) {
        const cJSON *la = cJSON_GetArrayItem(own, l);
        if (!cJSON_IsArray(la) || cJSON_GetArraySize(la) != p.n_experts)
            goto out;
        for (int e = 0; e < p.n_experts; e++) {
            const cJSON *ea = cJSON_GetArrayItem(la, e);
            if (!cJSON_IsArray(ea) || cJSON_GetArraySize(ea) > p.max_replicas)
                goto out;
            for (int k = 0; k < cJSON_GetArraySize(ea); k++) {
                const cJSON *v = cJSON_GetArrayItem(ea, k);
                if (!cJSON_IsNumber(v) || v->valueint < 0 || v->valueint >= p.n_shards)
                    goto out;
                p.owner[((size_t)l * p.n_experts + e) * p.max_replicas + k] = (int16_t)v->valueint;
            }
        }
    }
    *ret = p;
    p.owner = NULL;
    r = 0;
out:
    free(p.owner);
    cJSON_Delete(o);
    return r;
}

/* ---- shared helpers ---- */

/* A buffer that grows to the largest size asked for and then stays (contents not kept across
 * growth). With a backend that has host_alloc, page-locked: the copies to and from the GPU and
 * the nccl transport's staging then run at the link's rate. With `dev` set, backend memory
 * (alloc/dealloc): blocks that stay where the backend's rows are. */
struct growbuf {
    uint8_t *p;
    size_t cap;
    struct dsv32_backend *be; /* host_alloc's or alloc's backend, or NULL: malloc */
    int dev;
};

static void gb_free(struct growbuf *b)
{
    if (b->p && b->be && b->dev)
        b->be->ops->dealloc(b->be, b->p);
    else if (b->p && b->be && b->be->ops->host_free)
        b->be->ops->host_free(b->be, b->p);
    else
        free(b->p);
    b->p = NULL;
    b->cap = 0;
}

static void *grow(struct growbuf *b, size_t n)
{
    if (n > b->cap) {
        size_t want = n + n / 2;
        gb_free(b);
        if (b->be && b->dev)
            b->p = b->be->ops->alloc(b->be, want);
        else
            b->p = b->be && b->be->ops->host_alloc ? b->be->ops->host_alloc(b->be, want)
                                                   : malloc(want);
        if (!b->p)
            return NULL;
        b->cap = want;
    }
    return b->p;
}

/* 1 if the backend's memory is host memory (the cpu backend): its rows and a tcp transport's
 * blocks are in the same place */
static int host_backend(const struct dsv32_backend *be)
{
    return strcmp(be->ops->name, "cpu") == 0;
}

/* The blocks can be packed and unpacked by the backend where its rows are: the transport's
 * blocks are in the backend's memory (device blocks with a GPU backend, host blocks with the cpu
 * backend) and the backend has the ops. Else rows go through host memory (a GPU backend on tcp
 * or on nccl with host buffers). */
static int blocks_inplace(const struct dsv32_comm *comm, const struct dsv32_backend *be)
{
    return comm->device_blocks == !host_backend(be) && be->ops->rows_pack && be->ops->rows_unpack;
}

int dsv32_ep_device_blocks(const struct dsv32_backend *be)
{
    return !host_backend(be) && be->ops->rows_pack && be->ops->rows_unpack;
}

/* Row packing runs on a few threads when the block is large (prefill: tens of megabytes). */
static int ep_threads(void)
{
#ifdef _OPENMP
    static int n;
    if (!n) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c >= 16 ? 8 : c >= 4 ? (int)(c / 2) : 1;
    }
    return n;
#else
    return 1;
#endif
}

static size_t wire_elem(enum dsv32_ep_wire w) { return w == DSV32_EP_WIRE_BF16 ? 2 : 4; }

static int moe_layers(const struct dsv32_config *cfg, int **ret)
{
    int n = 0;
    int *v = malloc(sizeof(int) * (size_t)cfg->num_hidden_layers);
    if (!v)
        return -ENOMEM;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        if (dsv32_config_is_moe_layer(cfg, l))
            v[n++] = l;
    *ret = v;
    return n;
}

/* ---- attention side ---- */

struct dsv32_ep_client {
    struct dsv32_comm *comm;
    int n_attn, n_shards;
    struct dsv32_placement pl;
    const struct dsv32_config *cfg;
    struct dsv32_backend *be;
    enum dsv32_ep_wire wire;
    int timeout_ms;
    int inplace;         /* blocks_inplace for the current communicator */
    int *moe;            /* MoE layer ids in order */
    int n_moe, pos;      /* position of the next MoE layer in the current step */
    int step_rows;       /* the rows of the current step (its first MoE layer's) */
    struct growbuf *out; /* (n_shards) dispatch blocks (backend memory when inplace) */
    struct growbuf rows; /* per shard, the local row of each dispatched row */
    struct growbuf xh, yh;
    struct growbuf drows; /* inplace: rows, in backend memory */
    struct growbuf hst;   /* inplace: each shard's header and pairs, staged for the copies */
    struct dsv32_ep_stats st;
    uint64_t *expert_pairs;                        /* (n_layers, n_experts) */
    uint64_t shard_pairs[DSV32_COMM_MAX_WORLD];    /* per shard of the current placement */
};

static void client_out_free(struct dsv32_ep_client *c)
{
    for (int s = 0; c->out && s < c->n_shards; s++)
        gb_free(&c->out[s]);
    free(c->out);
    c->out = NULL;
}

/* The dispatch blocks for the current communicator: backend memory when inplace. */
static int client_out_new(struct dsv32_ep_client *c)
{
    c->inplace = blocks_inplace(c->comm, c->be);
    c->out = calloc((size_t)c->n_shards, sizeof(*c->out));
    if (!c->out)
        return -ENOMEM;
    for (int s = 0; s < c->n_shards; s++) {
        c->out[s].be = c->inplace || !host_backend(c->be) ? c->be : NULL;
        c->out[s].dev = c->inplace;
    }
    return 0;
}

void dsv32_ep_client_free(struct dsv32_ep_client *c)
{
    if (!c)
        return;
    client_out_free(c);
    gb_free(&c->rows);
    gb_free(&c->xh);
    gb_free(&c->yh);
    gb_free(&c->drows);
    gb_free(&c->hst);
    free(c->moe);
    free(c->expert_pairs);
    dsv32_placement_done(&c->pl);
    free(c);
}

static int copy_placement(struct dsv32_placement *dst, const struct dsv32_placement *src)
{
    size_t n = (size_t)src->n_layers * src->n_experts * src->max_replicas;
    int16_t *o = malloc(sizeof(int16_t) * (n ? n : 1));
    if (!o)
        return -ENOMEM;
    memcpy(o, src->owner, sizeof(int16_t) * n);
    dsv32_placement_done(dst);
    *dst = *src;
    dst->owner = o;
    return 0;
}

int dsv32_ep_client_new(struct dsv32_comm *comm, int n_attn, const struct dsv32_placement *pl,
                        const struct dsv32_config *cfg, struct dsv32_backend *be,
                        enum dsv32_ep_wire wire, int timeout_ms, struct dsv32_ep_client **ret)
{
    if (n_attn < 1 || comm->world <= n_attn || comm->rank >= n_attn ||
        pl->n_shards != comm->world - n_attn || pl->n_layers != cfg->num_hidden_layers ||
        pl->n_experts != cfg->n_routed_experts)
        return -EINVAL;
    struct dsv32_ep_client *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->comm = comm;
    c->n_attn = n_attn;
    c->n_shards = comm->world - n_attn;
    c->cfg = cfg;
    c->be = be;
    c->wire = wire;
    c->timeout_ms = timeout_ms;
    c->expert_pairs = calloc((size_t)pl->n_layers * (size_t)(pl->n_experts ? pl->n_experts : 1),
                             sizeof(uint64_t));
    int r = moe_layers(cfg, &c->moe);
    if (!c->expert_pairs || r < 0 || client_out_new(c) < 0 || copy_placement(&c->pl, pl) < 0) {
        dsv32_ep_client_free(c);
        return -ENOMEM;
    }
    c->n_moe = r;
    if (!host_backend(be)) /* page-locked where the backend copies them */
        c->xh.be = c->yh.be = c->rows.be = c->hst.be = be;
    c->drows.be = be;
    c->drows.dev = 1;
    *ret = c;
    return 0;
}

int dsv32_ep_client_rebind(struct dsv32_ep_client *c, struct dsv32_comm *comm, int n_attn,
                           const struct dsv32_placement *pl)
{
    if (n_attn < 1 || comm->rank >= n_attn || comm->world <= n_attn ||
        (pl && pl->n_shards != comm->world - n_attn) ||
        (!pl && c->pl.n_shards != comm->world - n_attn))
        return -EINVAL;
    if (pl) {
        int r = copy_placement(&c->pl, pl);
        if (r < 0)
            return r;
    }
    if (pl || c->n_shards != comm->world - n_attn) /* other shards: their counts start again */
        memset(c->shard_pairs, 0, sizeof(c->shard_pairs));
    client_out_free(c);
    c->comm = comm;
    c->n_attn = n_attn;
    c->n_shards = comm->world - n_attn;
    c->pos = 0;
    return client_out_new(c);
}

/* The shard replica that serves pair (row r, slot j) of expert e: the replicas take turns by
 * r + j. -1 when nobody holds e. */
static int pair_owner(const struct dsv32_ep_client *c, int layer, int e, int r, int j)
{
    const int16_t *ow = dsv32_placement_owners(&c->pl, layer, e);
    int n_rep = 0;
    while (n_rep < c->pl.max_replicas && ow[n_rep] >= 0)
        n_rep++;
    return n_rep ? ow[(r + j) % n_rep] : -1;
}

/* Shard s's (expert, weight) pairs of its n rows rm (expert -1 where another shard serves it). */
static void put_pairs(struct dsv32_ep_client *c, int layer, int s, const int32_t *rm, int n,
                      const int32_t *ids, const float *w, int k, uint8_t *pairs)
{
    for (int i = 0; i < n; i++) {
        const int r = rm[i];
        for (int j = 0; j < k; j++) {
            int32_t e = ids[r * k + j];
            float wt = w[r * k + j];
            if (e >= 0) {
                if (pair_owner(c, layer, e, r, j) != s) {
                    e = -1;
                } else {
                    c->shard_pairs[s]++;
                    c->expert_pairs[(size_t)layer * c->pl.n_experts + e]++;
                }
            }
            memcpy(pairs + ((size_t)i * k + j) * 8, &e, 4);
            memcpy(pairs + ((size_t)i * k + j) * 8 + 4, &wt, 4);
        }
    }
}

/* One MoE layer: dispatch rows (x: backend memory when inplace, else host; rows may be 0),
 * combine into y (the same memory as x). Returns the group-active flag from the combine, or
 * <0. */
static int client_layer(struct dsv32_ep_client *c, int layer, float *y, const float *x, int rows,
                        const int32_t *ids, const float *w, int k, int active)
{
    const int A = c->n_attn, S = c->n_shards, D = c->cfg->hidden_size;
    const size_t es = wire_elem(c->wire), hs = sizeof(struct ep_hdr), stride = rows ? rows : 1;
    const int bf16 = c->wire == DSV32_EP_WIRE_BF16;
    const struct dsv32_backend_ops *ops = c->be->ops;
    if (c->moe[c->pos] != layer)
        return DSV32_EFORMAT; /* the engine skipped or reordered a MoE layer */
    if (c->pos == 0)
        c->step_rows = rows;
    else if (rows != c->step_rows)
        return DSV32_EFORMAT; /* the step's rows changed between its MoE layers */
    /* every row to every shard, the sizes known on both sides (EP_KNOWN_BLOCKS) */
    const int all_rows = c->pos > 0 && known_sizes(rows, S);
    const uint64_t t_pack = dsv32_mono_ns();
    /* rows going to each shard: a row goes to s when one of its experts' chosen replica is s */
    int32_t *rowmap = grow(&c->rows, sizeof(int32_t) * stride * S);
    if (!rowmap)
        return -ENOMEM;
    int cnt[DSV32_COMM_MAX_WORLD] = {0};
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < S; s++) {
            int hit = 0;
            for (int j = 0; j < k && (!hit || all_rows); j++) {
                if (ids[r * k + j] < 0)
                    continue;
                const int o = pair_owner(c, layer, ids[r * k + j], r, j);
                if (o < 0)
                    return DSV32_ECONFIG; /* an expert nobody holds */
                hit |= o == s;
            }
            if (hit || all_rows)
                rowmap[(size_t)s * stride + cnt[s]++] = r;
        }
    int32_t *drows = rowmap;
    uint8_t *hst = NULL;
    if (c->inplace) {
        /* the rows map, headers and pairs go to the backend; the rows never leave it */
        drows = grow(&c->drows, sizeof(int32_t) * stride * S);
        hst = grow(&c->hst, (hs + stride * k * 8) * S);
        if (!drows || !hst)
            return -ENOMEM;
        /* all rows: each shard's are 0..rows-1 (no map) */
        int r = rows && !all_rows
                    ? ops->to_device(c->be, drows, rowmap, sizeof(int32_t) * stride * S)
                    : 0;
        if (r < 0)
            return r;
    }
    const void *send[DSV32_COMM_MAX_WORLD] = {0};
    size_t sb[DSV32_COMM_MAX_WORLD] = {0}, rb[DSV32_COMM_MAX_WORLD];
    uint8_t from[DSV32_COMM_MAX_WORLD] = {0};
    void *recv[DSV32_COMM_MAX_WORLD], *head[DSV32_COMM_MAX_WORLD];
    for (int s = 0; s < S; s++) {
        const int n = cnt[s];
        const size_t bytes = hs + (size_t)n * D * es + (size_t)n * k * 8;
        uint8_t *b = grow(&c->out[s], bytes);
        if (!b)
            return -ENOMEM;
        struct ep_hdr h = {
            EP_DISPATCH,       (uint32_t)layer,        (uint32_t)n,   (uint32_t)k, (uint32_t)D,
            (uint32_t)c->wire, active ? EP_ACTIVE : 0, (uint32_t)rows};
        const int32_t *rm = rowmap + (size_t)s * stride;
        const int32_t *idx = all_rows ? NULL : c->inplace ? drows + (size_t)s * stride : rm;
        if (c->inplace) {
            uint8_t *hp = hst + (hs + stride * k * 8) * s;
            memcpy(hp, &h, hs);
            put_pairs(c, layer, s, rm, n, ids, w, k, hp + hs);
            int r;
            if ((r = ops->to_device(c->be, b, hp, hs)) < 0 ||
                (r = ops->to_device(c->be, b + hs + (size_t)n * D * es, hp + hs,
                                    (size_t)n * k * 8)) < 0 ||
                (r = ops->rows_pack(c->be, b + hs, x, idx, n, D, bf16)) < 0)
                return r;
        } else {
            memcpy(b, &h, hs);
            dsv32_rows_pack_host(b + hs, x, idx, n, D, bf16, ep_threads());
            put_pairs(c, layer, s, rm, n, ids, w, k, b + hs + (size_t)n * D * es);
        }
        send[A + s] = b;
        sb[A + s] = bytes;
        c->st.rows_sent += (uint64_t)n;
    }
    int r;
    if (c->inplace && (r = ops->sync(c->be)) < 0) /* the blocks are written before they go */
        return r;
    uint8_t known[DSV32_COMM_MAX_WORLD] = {0};
    for (int s = 0; s < S; s++)
        known[A + s] = (uint8_t)all_rows;
    struct dsv32_comm_xchg x1 = {.send = send,
                                 .send_bytes = sb,
                                 .recv_from = from,
                                 .recv = recv,
                                 .recv_bytes = rb,
                                 .send_known = known};
    const uint64_t t_dispatch = dsv32_mono_ns();
    c->st.pack_ns += t_dispatch - t_pack;
    if ((r = dsv32_comm_exchange(c->comm, &x1, c->timeout_ms)) < 0)
        return r;
    const uint64_t t_combine = dsv32_mono_ns();
    c->st.dispatch_ns += t_combine - t_dispatch;
    size_t expect[DSV32_COMM_MAX_WORLD] = {0};
    for (int s = 0; s < S; s++) {
        from[A + s] = 1;
        expect[A + s] = hs + (size_t)cnt[s] * D * es;
    }
    if ((r = recv_round(c->comm, from, expect, hs, recv, rb, head, c->timeout_ms)) < 0)
        return r;
    const uint64_t t_unpack = dsv32_mono_ns();
    c->st.combine_ns += t_unpack - t_combine;
    c->st.exchanges += 2;
    int group_active = 0;
    for (int s = 0; s < S; s++) {
        struct ep_hdr h;
        if (rb[A + s] < hs)
            return DSV32_EFORMAT;
        memcpy(&h, head[A + s], hs);
        if (h.magic != EP_COMBINE || h.layer != (uint32_t)layer || h.rows != (uint32_t)cnt[s] ||
            h.dim != (uint32_t)D || rb[A + s] != hs + (size_t)cnt[s] * D * es)
            return DSV32_EFORMAT;
        group_active |= (h.flags & EP_ACTIVE) != 0;
    }
    if (rows > 0) {
        /* every shard's sums added into y, shard after shard (a shard's rows are distinct); in
         * place, the engine's next op waits for them */
        if (c->inplace && (r = ops->memset0(c->be, y, sizeof(float) * (size_t)rows * D)) < 0)
            return r;
        if (!c->inplace)
            memset(y, 0, sizeof(float) * (size_t)rows * D);
        for (int s = 0; s < S; s++) {
            const uint8_t *res = (const uint8_t *)recv[A + s] + hs;
            const int32_t *idx = all_rows     ? NULL
                                 : c->inplace ? drows + (size_t)s * stride
                                              : rowmap + (size_t)s * stride;
            if (!c->inplace)
                dsv32_rows_unpack_host(y, res, idx, cnt[s], D, bf16, 1, ep_threads());
            else if ((r = ops->rows_unpack(c->be, y, res, idx, cnt[s], D, bf16, 1)) < 0)
                return r;
        }
    }
    c->st.unpack_ns += dsv32_mono_ns() - t_unpack;
    return group_active;
}

static void advance(struct dsv32_ep_client *c)
{
    if (++c->pos == c->n_moe) {
        c->pos = 0;
        c->st.steps++;
    }
}

int dsv32_ep_moe_routed(void *ctx, int layer, float *y, const float *x, int rows,
                        const int32_t *ids, const float *w, int k)
{
    struct dsv32_ep_client *c = ctx;
    const int D = c->cfg->hidden_size;
    const struct dsv32_backend_ops *ops = c->be->ops;
    const int via_host = !c->inplace && !host_backend(c->be);
    const uint64_t t0 = dsv32_mono_ns();
    float *xh = (float *)x, *yh = y;
    if (via_host) {
        xh = grow(&c->xh, sizeof(float) * (size_t)rows * D);
        yh = grow(&c->yh, sizeof(float) * (size_t)rows * D);
        if (!xh || !yh)
            return -ENOMEM;
        int r = ops->to_host(c->be, xh, x, sizeof(float) * (size_t)rows * D);
        if (r < 0)
            return r;
    }
    c->st.copy_ns += dsv32_mono_ns() - t0;
    int r = client_layer(c, layer, yh, xh, rows, ids, w, k, 1);
    if (r < 0)
        return r;
    advance(c);
    const uint64_t t1 = dsv32_mono_ns();
    if (via_host && (r = ops->to_device(c->be, y, yh, sizeof(float) * (size_t)rows * D)) < 0)
        return r;
    c->st.copy_ns += dsv32_mono_ns() - t1;
    c->st.moe_calls++;
    c->st.moe_ns += dsv32_mono_ns() - t0;
    return 0;
}

int dsv32_ep_client_idle_step(struct dsv32_ep_client *c)
{
    if (c->n_moe == 0)
        return 0;
    const int k = c->cfg->num_experts_per_tok;
    for (int i = 0; i < c->n_moe; i++) {
        int r = client_layer(c, c->moe[i], NULL, NULL, 0, NULL, NULL, k, 0);
        if (r < 0)
            return r;
        if (i == 0 && r == 0) {
            c->st.idle_steps++;
            return 0; /* nobody was active: the step ends after its first layer */
        }
        advance(c);
    }
    return 1;
}

void dsv32_ep_client_step_failed(struct dsv32_ep_client *c)
{
    if (c->pos != 0) {
        log_warn("EP step abandoned after %d of %d MoE layers: aborting epoch %llu", c->pos,
                 c->n_moe, (unsigned long long)c->comm->epoch);
        c->comm->ops->abort(c->comm);
        c->pos = 0;
    }
}

void dsv32_ep_client_get_stats(const struct dsv32_ep_client *c, struct dsv32_ep_stats *out)
{
    *out = c->st;
}

char *dsv32_ep_client_stats_json(const struct dsv32_ep_client *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "steps", (double)c->st.steps);
    cJSON_AddNumberToObject(o, "idle_steps", (double)c->st.idle_steps);
    cJSON_AddNumberToObject(o, "rows_sent", (double)c->st.rows_sent);
    cJSON_AddNumberToObject(o, "exchanges", (double)c->st.exchanges);
    cJSON_AddNumberToObject(o, "moe_calls", (double)c->st.moe_calls);
    cJSON_AddNumberToObject(o, "moe_us", (double)(c->st.moe_ns / 1000));
    cJSON *ph = cJSON_AddObjectToObject(o, "moe_phase_us");
    if (ph) {
        cJSON_AddNumberToObject(ph, "copy", (double)(c->st.copy_ns / 1000));
        cJSON_AddNumberToObject(ph, "pack", (double)(c->st.pack_ns / 1000));
        cJSON_AddNumberToObject(ph, "dispatch", (double)(c->st.dispatch_ns / 1000));
        cJSON_AddNumberToObject(ph, "combine", (double)(c->st.combine_ns / 1000));
        cJSON_AddNumberToObject(ph, "unpack", (double)(c->st.unpack_ns / 1000));
    }
    cJSON_AddNumberToObject(o, "layers", c->pl.n_layers);
    cJSON_AddNumberToObject(o, "experts", c->pl.n_experts);
    cJSON *sp = cJSON_AddArrayToObject(o, "shard_pairs");
    for (int s = 0; sp && s < c->n_shards; s++)
        cJSON_AddItemToArray(sp, cJSON_CreateNumber((double)c->shard_pairs[s]));
    cJSON *ep = cJSON_AddArrayToObject(o, "expert_pairs");
    for (int l = 0; ep && l < c->pl.n_layers; l++) {
        cJSON *la = cJSON_CreateArray();
        int moe = 0;
        for (int i = 0; i < c->n_moe; i++)
            moe |= c->moe[i] == l;
        for (int e = 0; moe && la && e < c->pl.n_experts; e++)
            cJSON_AddItemToArray(la, cJSON_CreateNumber(
                                         (double)c->expert_pairs[(size_t)l * c->pl.n_experts + e]));
        cJSON_AddItemToArray(ep, la);
    }
    char *t = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return t;
}

int dsv32_ep_load_add_json(const char *json, const struct dsv32_config *cfg, double *load)
{
    const int L = cfg->num_hidden_layers, E = cfg->n_routed_experts;
    cJSON *o = cJSON_Parse(json);
    const cJSON *ep = cJSON_GetObjectItem(o, "expert_pairs");
    int r = DSV32_EFORMAT;
    if (!cJSON_IsArray(ep) || cJSON_GetArraySize(ep) != L)
        goto out;
    for (int l = 0; l < L; l++) { /* checked whole before anything is added */
        const cJSON *la = cJSON_GetArrayItem(ep, l);
        int n = cJSON_IsArray(la) ? cJSON_GetArraySize(la) : -1;
        if (n != (dsv32_config_is_moe_layer(cfg, l) ? E : 0))
            goto out;
        for (int e = 0; e < n; e++) {
            const cJSON *v = cJSON_GetArrayItem(la, e);
            if (!cJSON_IsNumber(v) || v->valuedouble < 0)
                goto out;
        }
    }
    for (int l = 0; l < L; l++) {
        const cJSON *la = cJSON_GetArrayItem(ep, l);
        for (int e = 0; e < cJSON_GetArraySize(la); e++)
            load[(size_t)l * E + e] += cJSON_GetArrayItem(la, e)->valuedouble;
    }
    r = 0;
out:
    cJSON_Delete(o);
    return r;
}

/* ---- shard side ---- */

struct dsv32_ep_server {
    struct dsv32_comm *comm;
    int n_attn, shard;
    const struct dsv32_placement *pl;
    const struct dsv32_model *model;
    struct dsv32_backend *be;
    int timeout_ms;
    int inplace; /* blocks_inplace for the current communicator */
    int wire;    /* the current step's, from its first MoE layer */
    uint32_t step_rows[DSV32_COMM_MAX_WORLD]; /* each attention rank's rows in this step */
    int *moe;
    int n_moe;
    struct growbuf x, ids, w, y, out, pairs, hdrs; /* host (out: backend memory when inplace) */
    struct growbuf dx, dy, dids, dw;               /* backend memory */
    uint64_t *expert_rows; /* (layers, experts) */
    struct dsv32_ep_server_stats st;
    int trace; /* DSV32_EP_TRACE: small layers still to log step by step */
    unsigned trace_seen;
};

void dsv32_ep_server_free(struct dsv32_ep_server *s)
{
    if (!s)
        return;
    struct growbuf *b[] = {&s->x,    &s->ids, &s->w,  &s->y,    &s->out, &s->pairs,
                           &s->hdrs, &s->dx,  &s->dy, &s->dids, &s->dw};
    for (size_t i = 0; i < sizeof(b) / sizeof(b[0]); i++)
        gb_free(b[i]);
    free(s->moe);
    free(s->expert_rows);
    free(s);
}

/* The buffers' memory for the current communicator. */
static void server_bind(struct dsv32_ep_server *s)
{
    s->inplace = blocks_inplace(s->comm, s->be);
    gb_free(&s->out);
    s->out.be = s->inplace || !host_backend(s->be) ? s->be : NULL;
    s->out.dev = s->inplace;
}

int dsv32_ep_server_new(struct dsv32_comm *comm, int n_attn, int shard,
                        const struct dsv32_placement *pl, const struct dsv32_model *model,
                        struct dsv32_backend *be, int timeout_ms, struct dsv32_ep_server **ret)
{
    const struct dsv32_config *cfg = &model->cfg;
    if (n_attn < 1 || comm->rank != n_attn + shard || shard < 0 || shard >= pl->n_shards ||
        pl->n_layers != cfg->num_hidden_layers || pl->n_experts != cfg->n_routed_experts)
        return -EINVAL;
    for (int l = 0; l < cfg->num_hidden_layers; l++)
        for (int e = 0; e < cfg->n_routed_experts; e++)
            if (dsv32_config_is_moe_layer(cfg, l) && dsv32_placement_has(pl, shard, l, e) &&
                !dsv32_weight_loaded(&model->layers[l].experts[e].w1))
                return dsv32_load_fail(DSV32_EMISSING, "expert shard %d: the placement gives it "
                                       "layer %d expert %d, which is not loaded", shard, l, e);
    struct dsv32_ep_server *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->comm = comm;
    s->n_attn = n_attn;
    s->shard = shard;
    s->pl = pl;
    s->model = model;
    s->be = be;
    s->timeout_ms = timeout_ms;
    const char *tr = getenv("DSV32_EP_TRACE");
    s->trace = tr ? atoi(tr) : 0;
    s->expert_rows = calloc((size_t)cfg->num_hidden_layers * (cfg->n_routed_experts ? cfg->n_routed_experts : 1),
                            sizeof(uint64_t));
    int r = moe_layers(cfg, &s->moe);
    if (r < 0 || !s->expert_rows) {
        dsv32_ep_server_free(s);
        return -ENOMEM;
    }
    s->n_moe = r;
    if (!host_backend(be)) /* page-locked where the backend copies them */
        s->x.be = s->ids.be = s->w.be = s->y.be = s->pairs.be = s->hdrs.be = be;
    struct growbuf *d[] = {&s->dx, &s->dy, &s->dids, &s->dw};
    for (int i = 0; i < 4; i++) {
        d[i]->be = be;
        d[i]->dev = 1;
    }
    server_bind(s);
    *ret = s;
    return 0;
}

int dsv32_ep_server_rebind(struct dsv32_ep_server *s, struct dsv32_comm *comm)
{
    if (comm->rank != s->n_attn + s->shard)
        return -EINVAL;
    s->comm = comm;
    server_bind(s);
    return 0;
}

const uint64_t *dsv32_ep_server_expert_rows(const struct dsv32_ep_server *s) { return s->expert_rows; }

void dsv32_ep_server_get_stats(const struct dsv32_ep_server *s, struct dsv32_ep_server_stats *out)
{
    *out = s->st;
}

static int server_layer(struct dsv32_ep_server *s, int layer, int first, int *ret_active)
{
    const int A = s->n_attn, W = s->comm->world;
    const struct dsv32_config *cfg = &s->model->cfg;
    const int D = cfg->hidden_size, K = cfg->num_experts_per_tok;
    const size_t hs = sizeof(struct ep_hdr);
    const struct dsv32_backend_ops *ops = s->be->ops;
    const int host = host_backend(s->be);
    size_t sb[DSV32_COMM_MAX_WORLD] = {0}, rb[DSV32_COMM_MAX_WORLD];
    uint8_t from[DSV32_COMM_MAX_WORLD] = {0};
    void *recv[DSV32_COMM_MAX_WORLD], *head[DSV32_COMM_MAX_WORLD];
    /* after the first layer, the blocks of the senders whose step is small have known sizes:
     * all their rows (EP_KNOWN_BLOCKS) */
    size_t expect[DSV32_COMM_MAX_WORLD];
    for (int a = 0; a < W; a++)
        expect[a] = DSV32_COMM_SIZE_UNKNOWN;
    for (int a = 0; a < A; a++) {
        from[a] = 1;
        if (!first && known_sizes((int)s->step_rows[a], W - A))
            expect[a] = hs + (size_t)s->step_rows[a] *
                                 (D * wire_elem((enum dsv32_ep_wire)s->wire) + (size_t)K * 8);
    }
    const uint64_t t_wait = dsv32_mono_ns();
    int r = recv_round(s->comm, from, expect, hs, recv, rb, head, s->timeout_ms);
    if (r < 0)
        return r;
    const uint64_t t_unpack = dsv32_mono_ns();
    /* gather every attention rank's rows: all rows of one expert then go through one GEMM */
    int total = 0, active = 0, wire = -1, offs[DSV32_COMM_MAX_WORLD];
    struct ep_hdr h[DSV32_COMM_MAX_WORLD];
    for (int a = 0; a < A; a++) {
        if (rb[a] < hs)
            return DSV32_EFORMAT;
        memcpy(&h[a], head[a], hs);
        size_t es = h[a].wire == DSV32_EP_WIRE_BF16 ? 2 : 4;
        if (h[a].magic != EP_DISPATCH || h[a].layer != (uint32_t)layer || h[a].dim != (uint32_t)D ||
            h[a].k != (uint32_t)K || h[a].wire > 1 ||
            rb[a] != hs + (size_t)h[a].rows * (D * es + (size_t)K * 8) ||
            (wire >= 0 && (int)h[a].wire != wire) || h[a].rows > h[a].step_rows ||
            (!first && (h[a].step_rows != s->step_rows[a] || (int)h[a].wire != s->wire)))
            return DSV32_EFORMAT;
        if (first)
            s->step_rows[a] = h[a].step_rows;
        wire = (int)h[a].wire;
        active |= (h[a].flags & EP_ACTIVE) != 0;
        offs[a] = total;
        total += (int)h[a].rows;
    }
    if (first)
        s->wire = wire;
    const size_t es = wire_elem((enum dsv32_ep_wire)wire), n1 = total ? (size_t)total : 1;
    const int bf16 = wire == DSV32_EP_WIRE_BF16;
    int32_t *ids = grow(&s->ids, sizeof(int32_t) * n1 * K);
    float *w = grow(&s->w, sizeof(float) * n1 * K);
    uint8_t *pairs = grow(&s->pairs, n1 * K * 8);
    if (!ids || !w || !pairs)
        return -ENOMEM;
    /* the (expert, weight) pairs are read on the host (checked, counted); the rows stay where
     * they arrived when inplace */
    float *X = NULL, *Y = NULL, *dx = NULL, *dy = NULL;
    if (s->inplace) {
        dx = grow(&s->dx, sizeof(float) * n1 * D);
        dy = grow(&s->dy, sizeof(float) * n1 * D);
        if (!dx || !dy)
            return -ENOMEM;
    } else {
        X = grow(&s->x, sizeof(float) * n1 * D);
        Y = grow(&s->y, sizeof(float) * n1 * D);
        if (!X || !Y)
            return -ENOMEM;
    }
    for (int a = 0; a < A; a++) {
        const uint8_t *p = (const uint8_t *)recv[a] + hs;
        const int n = (int)h[a].rows;
        uint8_t *pa = pairs + (size_t)offs[a] * K * 8;
        if (s->inplace) {
            if (n &&
                ((r = ops->to_host(s->be, pa, p + (size_t)n * D * es, (size_t)n * K * 8)) < 0 ||
                 (r = ops->rows_unpack(s->be, dx + (size_t)offs[a] * D, p, NULL, n, D, bf16, 0)) <
                     0))
                return r;
        } else {
            dsv32_rows_unpack_host(X + (size_t)offs[a] * D, p, NULL, n, D, bf16, 0, ep_threads());
            memcpy(pa, p + (size_t)n * D * es, (size_t)n * K * 8);
        }
    }
    for (size_t i = 0; i < (size_t)total * K; i++) {
        int32_t e;
        memcpy(&e, pairs + i * 8, 4);
        memcpy(&w[i], pairs + i * 8 + 4, 4);
        if (e >= cfg->n_routed_experts ||
            (e >= 0 && !dsv32_placement_has(s->pl, s->shard, layer, e)))
            return DSV32_EFORMAT; /* a row for an expert this shard does not hold */
        if (e >= 0)
            s->expert_rows[(size_t)layer * cfg->n_routed_experts + e]++;
        ids[i] = e;
    }
    const uint64_t t_work = dsv32_mono_ns();
    /* a GPU backend's layer: copies enqueued, synced (the GEMMs' start), GEMMs enqueued, synced;
     * the copy back ends at t_pack. 0 on the cpu backend. Inplace, the copies are the pairs' (the
     * rows' unpacking is in the GEMMs' time). */
    uint64_t t_h2d = 0, t_gemm0 = 0, t_gemm_enq = 0, t_gemm1 = 0;
    /* a traced layer (DSV32_EP_TRACE) on the cuda backend: the copies' and the GEMMs' device
     * time too (events; -1: not measured), against the host's time to see them done */
    const int small = s->trace > 0 && total > 0 && total <= 64; /* a traceable layer */
    const int traced = small && s->trace_seen % 25 == 0;
    float dev_copy = -1.0f, dev_gemm = -1.0f;
#ifdef DSV32_HAVE_CUDA
    const int dev_timer = traced && strcmp(s->be->ops->name, "cuda") == 0;
#endif
    if (total > 0) {
        const struct dsv32_ffn_weights *ex = s->model->layers[layer].experts;
        if (host && !s->inplace) {
            r = ops->moe_experts(s->be, Y, X, total, ids, w, K, ex, cfg->n_routed_experts, cfg->ue8m0);
        } else {
            if (!s->inplace) {
                dx = grow(&s->dx, sizeof(float) * (size_t)total * D);
                dy = grow(&s->dy, sizeof(float) * (size_t)total * D);
            }
            int32_t *di = grow(&s->dids, sizeof(int32_t) * (size_t)total * K);
            float *dw = grow(&s->dw, sizeof(float) * (size_t)total * K);
            if (!dx || !dy || !di || !dw)
                return -ENOMEM;
#ifdef DSV32_HAVE_CUDA
            if (dev_timer && (r = dsv32_cuda_timer_start(s->be)) < 0)
                return r;
#endif
            if ((!s->inplace &&
                 (r = ops->to_device(s->be, dx, X, sizeof(float) * (size_t)total * D)) < 0) ||
                (r = ops->to_device(s->be, di, ids, sizeof(int32_t) * (size_t)total * K)) < 0 ||
                (r = ops->to_device(s->be, dw, w, sizeof(float) * (size_t)total * K)) < 0)
                return r;
            t_h2d = dsv32_mono_ns();
#ifdef DSV32_HAVE_CUDA
            if (dev_timer && (r = dsv32_cuda_timer_stop(s->be, &dev_copy)) < 0)
                return r;
#endif
            if ((r = ops->sync(s->be)) < 0)
                return r;
            t_gemm0 = dsv32_mono_ns();
#ifdef DSV32_HAVE_CUDA
            if (dev_timer && (r = dsv32_cuda_timer_start(s->be)) < 0)
                return r;
#endif
            if ((r = ops->moe_experts(s->be, dy, dx, total, di, dw, K, ex, cfg->n_routed_experts,
                                      cfg->ue8m0)) < 0)
                return r;
            t_gemm_enq = dsv32_mono_ns();
#ifdef DSV32_HAVE_CUDA
            if (dev_timer && (r = dsv32_cuda_timer_stop(s->be, &dev_gemm)) < 0)
                return r;
#endif
            if ((r = ops->sync(s->be)) < 0)
                return r;
            t_gemm1 = dsv32_mono_ns();
            if (!s->inplace)
                r = ops->to_host(s->be, Y, dy, sizeof(float) * (size_t)total * D);
        }
        if (r < 0)
            return r;
    }
    const uint64_t t_pack = dsv32_mono_ns();
    const uint64_t compute_ns = t_gemm1 ? t_gemm1 - t_gemm0 : t_pack - t_work;
    const uint64_t copy_ns = t_gemm1 ? (t_gemm0 - t_work) + (t_pack - t_gemm1) : 0;
    int group_active = first ? active : 1;
    const void *send[DSV32_COMM_MAX_WORLD] = {0};
    size_t off = 0, need = 0;
    for (int a = 0; a < A; a++)
        need += hs + (size_t)h[a].rows * D * es;
    uint8_t *out = grow(&s->out, need ? need : 1);
    struct ep_hdr *ch = grow(&s->hdrs, hs * A); /* staged for the copies when inplace */
    if (!out || !ch)
        return -ENOMEM;
    for (int a = 0; a < A; a++) {
        ch[a] = (struct ep_hdr){EP_COMBINE,
                                (uint32_t)layer,
                                h[a].rows,
                                (uint32_t)K,
                                (uint32_t)D,
                                (uint32_t)wire,
                                group_active ? EP_ACTIVE : 0,
                                0};
        const size_t n = h[a].rows;
        if (s->inplace) {
            if ((r = ops->to_device(s->be, out + off, &ch[a], hs)) < 0 ||
                (r = ops->rows_pack(s->be, out + off + hs, dy + (size_t)offs[a] * D, NULL, (int)n,
                                    D, bf16)) < 0)
                return r;
        } else {
            memcpy(out + off, &ch[a], hs);
            dsv32_rows_pack_host(out + off + hs, Y + (size_t)offs[a] * D, NULL, (int)n, D, bf16,
                                 ep_threads());
        }
        send[a] = out + off;
        sb[a] = hs + n * D * es;
        off += sb[a];
    }
    if (s->inplace && (r = ops->sync(s->be)) < 0) /* the blocks are written before they go */
        return r;
    memset(from, 0, sizeof(from));
    /* the attention side knows these sizes from its dispatch: no sizes round */
    static const size_t known[DSV32_COMM_MAX_WORLD];
    struct dsv32_comm_xchg x2 = {.send = send, .send_bytes = sb, .recv_from = from, .recv = recv,
                                 .recv_bytes = rb, .recv_expect = known};
    const uint64_t t_send = dsv32_mono_ns();
    if ((r = dsv32_comm_exchange(s->comm, &x2, s->timeout_ms)) < 0)
        return r;
    if (small)
        s->trace_seen++;
    if (traced) {
        /* DSV32_EP_TRACE=N: N of the small (decode) layers, one in 25, step by step (microseconds) */
        const uint64_t t_end = dsv32_mono_ns();
        s->trace--;
        log_info(
            "EP trace: layer %d, %d rows: waited %.0f, unpack %.0f, copies enqueued %.0f, copies "
            "synced %.0f, "
            "experts enqueued %.0f, experts synced %.0f, to host %.0f, pack %.0f, combine %.0f; "
            "on the device: copies %.0f, experts %.0f",
            layer, total, (t_unpack - t_wait) / 1e3, (t_work - t_unpack) / 1e3,
            t_h2d ? (t_h2d - t_work) / 1e3 : 0.0, t_h2d ? (t_gemm0 - t_h2d) / 1e3 : 0.0,
            t_gemm1 ? (t_gemm_enq - t_gemm0) / 1e3 : 0.0,
            t_gemm1 ? (t_gemm1 - t_gemm_enq) / 1e3 : 0.0, t_gemm1 ? (t_pack - t_gemm1) / 1e3 : 0.0,
            (t_send - t_pack) / 1e3, (t_end - t_send) / 1e3, dev_copy < 0 ? -1.0 : dev_copy * 1e3,
            dev_gemm < 0 ? -1.0 : dev_gemm * 1e3);
    }
    if (total > 0) {
        s->st.layers++;
        s->st.rows += (uint64_t)total;
        s->st.wait_ns += t_unpack - t_wait;
        s->st.unpack_ns += t_work - t_unpack;
        s->st.copy_ns += copy_ns;
        s->st.compute_ns += compute_ns;
        s->st.pack_ns += t_send - t_pack;
        s->st.send_ns += dsv32_mono_ns() - t_send;
    }
    (void)W;
    *ret_active = group_active;
    return 0;
}

int dsv32_ep_server_step(struct dsv32_ep_server *s)
{
    for (int i = 0; i < s->n_moe; i++) {
        int active, r = server_layer(s, s->moe[i], i == 0, &active);
        if (r < 0)
            return r;
        if (i == 0 && !active)
            return 0;
    }
    return 1;
}
