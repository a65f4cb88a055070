/* registry.h: a registration is a lease keeper plus a writer thread that puts the node's JSON
 * record whenever it changed or the lease was replaced; a view is two snapshot watches (nodes/,
 * cordon/) applied to sorted arrays under one lock. */
#define _GNU_SOURCE 1
#include "registry.h"

#include "error.h"
#include "log.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KEY_MAX 512
#define RETRY_MIN_MS 100
#define RETRY_MAX_MS 1000

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void abstime_at_ms(struct timespec *ts, int64_t at_ms)
{
    ts->tv_sec = at_ms / 1000;
    ts->tv_nsec = (long)(at_ms % 1000) * 1000000L;
}

static void cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

static const char *const state_names[] = {"loading", "ready", "draining"};

const char *dsv32_node_state_name(enum dsv32_node_state s)
{
    return s >= DSV32_NODE_LOADING && s <= DSV32_NODE_DRAINING ? state_names[s] : "unknown";
}

int dsv32_node_state_parse(const char *s, enum dsv32_node_state *ret)
{
    for (int i = 0; i < 3; i++) {
        if (s && strcmp(s, state_names[i]) == 0) {
            *ret = (enum dsv32_node_state)i;
            return 0;
        }
    }
    return -EINVAL;
}

int dsv32_node_name_check(const char *name)
{
    if (!name || !name[0])
        return -EINVAL;
    size_t n = 0;
    for (const char *p = name; *p; p++, n++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok || n >= DSV32_NODE_NAME_MAX - 1)
            return -EINVAL;
    }
    /* "." and ".." would read as path steps in a key */
    return strcmp(name, ".") == 0 || strcmp(name, "..") == 0 ? -EINVAL : 0;
}

static int printable(const char *s, size_t max)
{
    if (!s)
        return -EINVAL;
    size_t n = strlen(s);
    if (n >= max)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return -EINVAL;
    return 0;
}

int dsv32_registry_node_key(const char *cluster, const char *kind, const char *id, char *buf,
                            size_t cap)
{
    if (dsv32_node_name_check(cluster) < 0 || dsv32_node_name_check(kind) < 0 ||
        dsv32_node_name_check(id) < 0)
        return -EINVAL;
    int n = snprintf(buf, cap, "/dsv32/%s/nodes/%s/%s", cluster, kind, id);
    return n < 0 || (size_t)n >= cap ? -ENOBUFS : 0;
}

static int cordon_key(const char *cluster, const char *id, char *buf, size_t cap)
{
    if (dsv32_node_name_check(cluster) < 0 || (id && dsv32_node_name_check(id) < 0))
        return -EINVAL;
    int n = snprintf(buf, cap, "/dsv32/%s/cordon/%s", cluster, id ? id : "");
    return n < 0 || (size_t)n >= cap ? -ENOBUFS : 0;
}

int dsv32_node_info_to_json(const struct dsv32_node_info *n, char **ret_json)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *l = cJSON_CreateObject();
    if (!o || !l) {
        cJSON_Delete(o);
        cJSON_Delete(l);
        return -ENOMEM;
    }
    cJSON_AddStringToObject(o, "address", n->address);
    cJSON_AddStringToObject(o, "role", n->role);
    cJSON_AddNumberToObject(o, "gpu", n->gpu);
    cJSON_AddStringToObject(o, "state", dsv32_node_state_name(n->state));
    cJSON_AddNumberToObject(l, "running", n->load.running);
    cJSON_AddNumberToObject(l, "waiting", n->load.waiting);
    cJSON_AddNumberToObject(l, "free_kv_blocks", (double)n->load.free_kv_blocks);
    cJSON_AddNumberToObject(l, "total_kv_blocks", (double)n->load.total_kv_blocks);
    cJSON_AddItemToObject(o, "load", l);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s)
        return -ENOMEM;
    *ret_json = s;
    return 0;
}

static bool get_str(const cJSON *o, const char *name, char *dst, size_t cap)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsString(it) || printable(it->valuestring, cap) < 0)
        return false;
    strcpy(dst, it->valuestring);
    return true;
}

static bool get_num(const cJSON *o, const char *name, double lo, double hi, double *ret)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(it) || it->valuedouble < lo || it->valuedouble > hi)
        return false;
    *ret = it->valuedouble;
    return true;
}

int dsv32_node_info_from_json(const char *json, size_t len, struct dsv32_node_info *ret)
{
    cJSON *o = cJSON_ParseWithLength(json, len);
    if (!o)
        return DSV32_EFORMAT;
    struct dsv32_node_info n = *ret;
    char state[16];
    double gpu, running, waiting, free_b, total_b;
    const cJSON *l = cJSON_GetObjectItemCaseSensitive(o, "load");
    bool ok = cJSON_IsObject(o) && get_str(o, "address", n.address, sizeof(n.address)) &&
              get_str(o, "role", n.role, sizeof(n.role)) &&
              get_num(o, "gpu", -1, 1 << 20, &gpu) && get_str(o, "state", state, sizeof(state)) &&
              dsv32_node_state_parse(state, &n.state) == 0 && cJSON_IsObject(l) &&
              get_num(l, "running", 0, UINT32_MAX, &running) &&
              get_num(l, "waiting", 0, UINT32_MAX, &waiting) &&
              get_num(l, "free_kv_blocks", 0, 9007199254740992.0, &free_b) &&
              get_num(l, "total_kv_blocks", 0, 9007199254740992.0, &total_b);
    cJSON_Delete(o);
    if (!ok)
        return DSV32_EFORMAT;
    n.gpu = (int)gpu;
    n.load.running = (uint32_t)running;
    n.load.waiting = (uint32_t)waiting;
    n.load.free_kv_blocks = (uint64_t)free_b;
    n.load.total_kv_blocks = (uint64_t)total_b;
    *ret = n;
    return 0;
}

/* ---- Registration ---- */

struct dsv32_registry {
    struct dsv32_etcd *e;
    char key[KEY_MAX];
    int64_t load_interval_ms;
    struct dsv32_etcd_keeper *keeper;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    struct dsv32_node_info info; /* under mu */
    uint64_t gen;                /* bumped by every change */
    uint64_t state_gen;          /* gen of the last state change (not rate-limited) */
    uint64_t written_gen;        /* what etcd holds, on written_lease */
    int64_t written_lease;
    int64_t lease;          /* the keeper's lease as last reported */
    int64_t last_write_ms;
};

static void reg_on_lease(void *arg, enum dsv32_etcd_lease_event ev, int64_t lease)
{
    struct dsv32_registry *r = arg;
    pthread_mutex_lock(&r->mu);
    if (ev == DSV32_ETCD_LEASE_GRANTED) {
        r->lease = lease; /* the record must go on the new lease */
    } else if (ev == DSV32_ETCD_LEASE_LOST) {
        r->lease = 0;
        r->written_lease = 0;
        log_warn("registry: %s: lease lost; registering again", r->key);
    }
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

static void *reg_thread(void *arg)
{
    struct dsv32_registry *r = arg;
    int64_t backoff = RETRY_MIN_MS, retry_at = 0;
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        bool need = r->lease != 0 && (r->written_lease != r->lease || r->written_gen != r->gen);
        int64_t at = retry_at;
        /* load-only changes wait for their interval; state changes and new leases do not */
        if (need && r->written_lease == r->lease && r->state_gen <= r->written_gen) {
            int64_t due = r->last_write_ms + r->load_interval_ms;
            if (due > at)
                at = due;
        }
        if (!need || now_ms() < at) {
            struct timespec ts;
            abstime_at_ms(&ts, need ? at : now_ms() + 60000);
            pthread_cond_timedwait(&r->cond, &r->mu, &ts);
            continue;
        }
        uint64_t gen = r->gen;
        int64_t lease = r->lease;
        char *json;
        int rc = dsv32_node_info_to_json(&r->info, &json);
        pthread_mutex_unlock(&r->mu);
        if (rc == 0) {
            rc = dsv32_etcd_put(r->e, r->key, json, strlen(json), lease, NULL);
            free(json);
        }
        pthread_mutex_lock(&r->mu);
        if (rc == 0) {
            if (r->written_lease != lease)
                log_info("registry: %s registered (%s, lease %lx)", r->key,
                         dsv32_node_state_name(r->info.state), (unsigned long)lease);
            r->written_gen = gen;
            r->written_lease = lease;
            r->last_write_ms = now_ms();
            backoff = RETRY_MIN_MS;
            retry_at = 0;
            pthread_cond_broadcast(&r->cond);
        } else {
            /* etcd away (keep serving, try again) or the lease gone (the keeper replaces it) */
            log_debug("registry: %s: put failed: %s", r->key, dsv32_strerror(rc));
            retry_at = now_ms() + backoff;
            backoff = backoff * 2 < RETRY_MAX_MS ? backoff * 2 : RETRY_MAX_MS;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

int dsv32_registry_new(struct dsv32_etcd *e, const struct dsv32_registry_config *cfg,
                       struct dsv32_registry **ret)
{
    const char *role = cfg && cfg->role ? cfg->role : "";
    if (!cfg || printable(cfg->address, DSV32_NODE_ADDR_MAX) < 0 || !cfg->address[0] ||
        printable(role, DSV32_NODE_ROLE_MAX) < 0 || cfg->gpu < -1 || cfg->ttl_s < 0 ||
        cfg->load_interval_ms < 0)
        return -EINVAL;
    struct dsv32_registry *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    int rc = dsv32_registry_node_key(cfg->cluster, cfg->kind, cfg->id, r->key, sizeof(r->key));
    if (rc < 0) {
        free(r);
        return rc;
    }
    r->e = e;
    r->load_interval_ms = cfg->load_interval_ms ? cfg->load_interval_ms : 1000;
    strcpy(r->info.kind, cfg->kind);
    strcpy(r->info.id, cfg->id);
    strcpy(r->info.address, cfg->address);
    strcpy(r->info.role, role);
    r->info.gpu = cfg->gpu;
    r->info.state = DSV32_NODE_LOADING;
    r->gen = 1;
    r->state_gen = 1;
    pthread_mutex_init(&r->mu, NULL);
    cond_init_monotonic(&r->cond);
    rc = pthread_create(&r->thread, NULL, reg_thread, r);
    if (rc == 0) {
        rc = dsv32_etcd_keeper_new(e, cfg->ttl_s ? cfg->ttl_s : 5, reg_on_lease, r, &r->keeper);
        if (rc < 0) {
            pthread_mutex_lock(&r->mu);
            r->stop = true;
            pthread_cond_broadcast(&r->cond);
            pthread_mutex_unlock(&r->mu);
            pthread_join(r->thread, NULL);
        }
    } else {
        rc = -rc;
    }
    if (rc < 0) {
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cond);
        free(r);
        return rc;
    }
    *ret = r;
    return 0;
}

int dsv32_registry_set_state(struct dsv32_registry *r, enum dsv32_node_state st)
{
    if (st != DSV32_NODE_READY && st != DSV32_NODE_DRAINING)
        return -EINVAL; /* LOADING is where a node starts, never where it goes back to */
    pthread_mutex_lock(&r->mu);
    if (r->info.state != st) {
        log_info("registry: %s: %s -> %s", r->key, dsv32_node_state_name(r->info.state),
                 dsv32_node_state_name(st));
        r->info.state = st;
        r->state_gen = ++r->gen;
        pthread_cond_broadcast(&r->cond);
    }
    pthread_mutex_unlock(&r->mu);
    return 0;
}

void dsv32_registry_set_load(struct dsv32_registry *r, const struct dsv32_node_load *load)
{
    pthread_mutex_lock(&r->mu);
    if (memcmp(&r->info.load, load, sizeof(*load)) != 0) {
        r->info.load = *load;
        r->gen++;
        pthread_cond_broadcast(&r->cond);
    }
    pthread_mutex_unlock(&r->mu);
}

enum dsv32_node_state dsv32_registry_state(struct dsv32_registry *r)
{
    pthread_mutex_lock(&r->mu);
    enum dsv32_node_state s = r->info.state;
    pthread_mutex_unlock(&r->mu);
    return s;
}

bool dsv32_registry_synced(struct dsv32_registry *r)
{
    pthread_mutex_lock(&r->mu);
    bool s = r->lease != 0 && r->written_lease == r->lease && r->written_gen == r->gen;
    pthread_mutex_unlock(&r->mu);
    return s;
}

int dsv32_registry_flush(struct dsv32_registry *r, int64_t timeout_ms)
{
    struct timespec ts;
    abstime_at_ms(&ts, now_ms() + (timeout_ms > 0 ? timeout_ms : 0));
    pthread_mutex_lock(&r->mu);
    uint64_t want = r->gen;
    /* a pending load update need not wait for its interval when someone waits for it */
    r->last_write_ms = 0;
    pthread_cond_broadcast(&r->cond);
    int rc = 0;
    while (!(r->lease != 0 && r->written_lease == r->lease && r->written_gen >= want)) {
        if (pthread_cond_timedwait(&r->cond, &r->mu, &ts) == ETIMEDOUT) {
            rc = DSV32_ETIMEOUT;
            break;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int64_t dsv32_registry_lease(struct dsv32_registry *r)
{
    pthread_mutex_lock(&r->mu);
    int64_t l = r->written_lease;
    pthread_mutex_unlock(&r->mu);
    return l;
}

void dsv32_registry_free(struct dsv32_registry *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    /* Revoking the lease deletes the record at once, so routers stop placing work here. */
    dsv32_etcd_keeper_free(r->keeper, true);
    log_info("registry: %s deregistered", r->key);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r);
}

int dsv32_registry_cordon(struct dsv32_etcd *e, const char *cluster, const char *id,
                          const char *reason)
{
    char key[KEY_MAX];
    int rc = cordon_key(cluster, id, key, sizeof(key));
    if (rc < 0 || (reason && printable(reason, 1024) < 0))
        return rc < 0 ? rc : -EINVAL;
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return -ENOMEM;
    cJSON_AddStringToObject(o, "reason", reason ? reason : "");
    cJSON_AddNumberToObject(o, "since_unix", (double)time(NULL));
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s)
        return -ENOMEM;
    rc = dsv32_etcd_put(e, key, s, strlen(s), 0, NULL);
    free(s);
    return rc;
}

int dsv32_registry_uncordon(struct dsv32_etcd *e, const char *cluster, const char *id)
{
    char key[KEY_MAX];
    int rc = cordon_key(cluster, id, key, sizeof(key));
    if (rc < 0)
        return rc;
    int64_t deleted;
    rc = dsv32_etcd_delete(e, key, 0, &deleted);
    return rc < 0 ? rc : deleted ? 0 : -ENOENT;
}

/* ---- The view ---- */

struct cordon_entry {
    char id[DSV32_NODE_NAME_MAX];
};

struct dsv32_registry_view {
    char nodes_prefix[KEY_MAX], cordon_prefix[KEY_MAX];
    dsv32_registry_view_fn fn;
    void *arg;
    struct dsv32_etcd_watch *w_nodes, *w_cordon;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    struct dsv32_node_info *nodes; /* (DSV32_REGISTRY_MAX_NODES) sorted by kind, id */
    size_t n_nodes;
    struct cordon_entry *cordons; /* (DSV32_REGISTRY_MAX_NODES) sorted by id */
    size_t n_cordons;
    bool nodes_synced, cordons_synced;
    uint64_t version;
};

static int node_cmp(const char *kind_a, const char *id_a, const struct dsv32_node_info *b)
{
    int c = strcmp(kind_a, b->kind);
    return c ? c : strcmp(id_a, b->id);
}

/* Index of (kind, id) or where it would go; *found says which. */
static size_t node_find(const struct dsv32_registry_view *v, const char *kind, const char *id,
                        bool *found)
{
    size_t lo = 0, hi = v->n_nodes;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = node_cmp(kind, id, &v->nodes[mid]);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    *found = false;
    return lo;
}

static size_t cordon_find(const struct dsv32_registry_view *v, const char *id, bool *found)
{
    size_t lo = 0, hi = v->n_cordons;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(id, v->cordons[mid].id);
        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    *found = false;
    return lo;
}

/* Splits "<prefix><kind>/<id>" (nodes) into its names; false for keys of another shape. */
static bool split_node_key(const char *key, const char *prefix, char *kind, char *id)
{
    size_t pl = strlen(prefix);
    if (strncmp(key, prefix, pl) != 0)
        return false;
    const char *k = key + pl, *slash = strchr(k, '/');
    if (!slash || (size_t)(slash - k) >= DSV32_NODE_NAME_MAX)
        return false;
    memcpy(kind, k, (size_t)(slash - k));
    kind[slash - k] = 0;
    if (strlen(slash + 1) >= DSV32_NODE_NAME_MAX)
        return false;
    strcpy(id, slash + 1);
    return dsv32_node_name_check(kind) == 0 && dsv32_node_name_check(id) == 0;
}

/* Under v->mu. */
static void view_put_node(struct dsv32_registry_view *v, const struct dsv32_etcd_kv *kv)
{
    struct dsv32_node_info n;
    memset(&n, 0, sizeof(n));
    if (!split_node_key(kv->key, v->nodes_prefix, n.kind, n.id))
        return;
    if (dsv32_node_info_from_json((const char *)kv->value, kv->value_len, &n) < 0) {
        log_warn("registry: %s: malformed record ignored", kv->key);
        return;
    }
    n.lease = kv->lease;
    n.mod_revision = kv->mod_revision;
    bool found;
    size_t i = node_find(v, n.kind, n.id, &found);
    if (!found) {
        if (v->n_nodes >= DSV32_REGISTRY_MAX_NODES) {
            log_warn("registry: more than %d nodes; %s ignored", DSV32_REGISTRY_MAX_NODES,
                     kv->key);
            return;
        }
        memmove(&v->nodes[i + 1], &v->nodes[i], (v->n_nodes - i) * sizeof(v->nodes[0]));
        v->n_nodes++;
    }
    v->nodes[i] = n;
}

static void view_del_node(struct dsv32_registry_view *v, const char *key)
{
    char kind[DSV32_NODE_NAME_MAX], id[DSV32_NODE_NAME_MAX];
    if (!split_node_key(key, v->nodes_prefix, kind, id))
        return;
    bool found;
    size_t i = node_find(v, kind, id, &found);
    if (!found)
        return;
    memmove(&v->nodes[i], &v->nodes[i + 1], (v->n_nodes - i - 1) * sizeof(v->nodes[0]));
    v->n_nodes--;
}

static void view_changed(struct dsv32_registry_view *v)
{
    v->version++;
    pthread_cond_broadcast(&v->cond);
}

static void view_on_nodes(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_registry_view *v = arg;
    pthread_mutex_lock(&v->mu);
    if (b->reset) {
        v->n_nodes = 0;
        v->nodes_synced = true;
    }
    for (size_t i = 0; i < b->n; i++) {
        if (b->events[i].type == DSV32_ETCD_EVENT_PUT)
            view_put_node(v, &b->events[i].kv);
        else
            view_del_node(v, b->events[i].kv.key);
    }
    view_changed(v);
    pthread_mutex_unlock(&v->mu);
    if (v->fn)
        v->fn(v->arg);
}

static void view_on_cordons(void *arg, const struct dsv32_etcd_watch_batch *b)
{
    struct dsv32_registry_view *v = arg;
    size_t pl = strlen(v->cordon_prefix);
    pthread_mutex_lock(&v->mu);
    if (b->reset) {
        v->n_cordons = 0;
        v->cordons_synced = true;
    }
    for (size_t i = 0; i < b->n; i++) {
        const char *id = b->events[i].kv.key + pl;
        if (dsv32_node_name_check(id) < 0)
            continue;
        bool found;
        size_t at = cordon_find(v, id, &found);
        if (b->events[i].type == DSV32_ETCD_EVENT_PUT && !found &&
            v->n_cordons < DSV32_REGISTRY_MAX_NODES) {
            memmove(&v->cordons[at + 1], &v->cordons[at],
                    (v->n_cordons - at) * sizeof(v->cordons[0]));
            strcpy(v->cordons[at].id, id);
            v->n_cordons++;
        } else if (b->events[i].type == DSV32_ETCD_EVENT_DELETE && found) {
            memmove(&v->cordons[at], &v->cordons[at + 1],
                    (v->n_cordons - at - 1) * sizeof(v->cordons[0]));
            v->n_cordons--;
        }
    }
    view_changed(v);
    pthread_mutex_unlock(&v->mu);
    if (v->fn)
        v->fn(v->arg);
}

int dsv32_registry_view_new(struct dsv32_etcd *e, const char *cluster, dsv32_registry_view_fn fn,
                            void *arg, struct dsv32_registry_view **ret)
{
    if (dsv32_node_name_check(cluster) < 0)
        return -EINVAL;
    struct dsv32_registry_view *v = calloc(1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    snprintf(v->nodes_prefix, sizeof(v->nodes_prefix), "/dsv32/%s/nodes/", cluster);
    snprintf(v->cordon_prefix, sizeof(v->cordon_prefix), "/dsv32/%s/cordon/", cluster);
    v->fn = fn;
    v->arg = arg;
    v->nodes = calloc(DSV32_REGISTRY_MAX_NODES, sizeof(*v->nodes));
    v->cordons = calloc(DSV32_REGISTRY_MAX_NODES, sizeof(*v->cordons));
    pthread_mutex_init(&v->mu, NULL);
    cond_init_monotonic(&v->cond);
    int rc = v->nodes && v->cordons ? 0 : -ENOMEM;
    unsigned flags = DSV32_ETCD_PREFIX | DSV32_ETCD_SNAPSHOT;
    if (rc == 0)
        rc = dsv32_etcd_watch_new(e, v->nodes_prefix, flags, 0, view_on_nodes, v, &v->w_nodes);
    if (rc == 0)
        rc = dsv32_etcd_watch_new(e, v->cordon_prefix, flags, 0, view_on_cordons, v,
                                  &v->w_cordon);
    if (rc < 0) {
        dsv32_registry_view_free(v);
        return rc;
    }
    *ret = v;
    return 0;
}

void dsv32_registry_view_free(struct dsv32_registry_view *v)
{
    if (!v)
        return;
    dsv32_etcd_watch_free(v->w_nodes);
    dsv32_etcd_watch_free(v->w_cordon);
    pthread_mutex_destroy(&v->mu);
    pthread_cond_destroy(&v->cond);
    free(v->nodes);
    free(v->cordons);
    free(v);
}

bool dsv32_registry_view_synced(struct dsv32_registry_view *v)
{
    pthread_mutex_lock(&v->mu);
    bool s = v->nodes_synced && v->cordons_synced;
    pthread_mutex_unlock(&v->mu);
    return s;
}

/* Under v->mu. */
static void copy_out(struct dsv32_registry_view *v, size_t i, struct dsv32_node_info *out)
{
    bool found;
    *out = v->nodes[i];
    cordon_find(v, out->id, &found);
    out->cordoned = found;
}

int dsv32_registry_view_get(struct dsv32_registry_view *v, const char *kind, const char *id,
                            struct dsv32_node_info *ret)
{
    if (!kind || !id)
        return -EINVAL;
    pthread_mutex_lock(&v->mu);
    bool found;
    size_t i = node_find(v, kind, id, &found);
    if (found)
        copy_out(v, i, ret);
    pthread_mutex_unlock(&v->mu);
    return found ? 0 : -ENOENT;
}

size_t dsv32_registry_view_list(struct dsv32_registry_view *v, const char *kind,
                                struct dsv32_node_info *out, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&v->mu);
    for (size_t i = 0; i < v->n_nodes; i++) {
        if (kind && strcmp(v->nodes[i].kind, kind) != 0)
            continue;
        if (n < cap)
            copy_out(v, i, &out[n]);
        n++;
    }
    pthread_mutex_unlock(&v->mu);
    return n;
}

bool dsv32_registry_view_cordoned(struct dsv32_registry_view *v, const char *id)
{
    bool found = false;
    pthread_mutex_lock(&v->mu);
    if (id)
        cordon_find(v, id, &found);
    pthread_mutex_unlock(&v->mu);
    return found;
}

uint64_t dsv32_registry_view_version(struct dsv32_registry_view *v)
{
    pthread_mutex_lock(&v->mu);
    uint64_t ver = v->version;
    pthread_mutex_unlock(&v->mu);
    return ver;
}

int dsv32_registry_view_wait(struct dsv32_registry_view *v, uint64_t seen, int64_t timeout_ms)
{
    struct timespec ts;
    abstime_at_ms(&ts, now_ms() + (timeout_ms > 0 ? timeout_ms : 0));
    pthread_mutex_lock(&v->mu);
    int rc = 0;
    while (v->version == seen) {
        if (pthread_cond_timedwait(&v->cond, &v->mu, &ts) == ETIMEDOUT) {
            rc = v->version == seen ? DSV32_ETIMEOUT : 0;
            break;
        }
    }
    pthread_mutex_unlock(&v->mu);
    return rc;
}
