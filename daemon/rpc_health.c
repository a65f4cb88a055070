/* grpc.health.v1.Health on an rpc.h server: Check answers a service's status (NOT_FOUND for one
 * never set), Watch streams the status at once and then every change until the client leaves. */
#define _GNU_SOURCE 1
#include "rpc.h"

#include "error.h"
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "health.pb-c.h"

#define MAX_SERVICES 32
#define MAX_SERVICE_NAME 128
#define MAX_WATCHERS 256

struct service {
    char name[MAX_SERVICE_NAME];
    enum dsv32_rpc_health_status st;
};

struct watcher {
    struct dsv32_rpc_call *call;
    char name[MAX_SERVICE_NAME];
};

struct dsv32_rpc_health {
    pthread_mutex_t mu;
    struct service services[MAX_SERVICES];
    int n_services;
    struct watcher watchers[MAX_WATCHERS];
    int n_watchers;
};

static struct service *find_service(struct dsv32_rpc_health *h, const char *name)
{
    for (int i = 0; i < h->n_services; i++)
        if (strcmp(h->services[i].name, name) == 0)
            return &h->services[i];
    return NULL;
}

/* Under h->mu: the status a watcher of `name` should see. */
static enum dsv32_rpc_health_status status_of(struct dsv32_rpc_health *h, const char *name)
{
    struct service *sv = find_service(h, name);
    return sv ? sv->st : DSV32_RPC_HEALTH_SERVICE_UNKNOWN;
}

static int send_status(struct dsv32_rpc_call *call, enum dsv32_rpc_health_status st)
{
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
    return dsv32_rpc_call_write_msg(call, &resp.base);
}

/* Under h->mu: drops watcher i and ends its call. */
static void drop_watcher(struct dsv32_rpc_health *h, int i, int code, const char *msg)
{
    struct dsv32_rpc_call *call = h->watchers[i].call;
    h->watchers[i] = h->watchers[--h->n_watchers];
    dsv32_rpc_call_finish(call, code, "%s", msg);
}

static void on_watch_cancel(void *arg, struct dsv32_rpc_call *call)
{
    struct dsv32_rpc_health *h = arg;
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_watchers; i++) {
        if (h->watchers[i].call == call) {
            drop_watcher(h, i, DSV32_RPC_CANCELLED, "cancelled");
            break;
        }
    }
    pthread_mutex_unlock(&h->mu);
}

static Grpc__Health__V1__HealthCheckRequest *unpack_req(struct dsv32_rpc_call *call,
                                                        const uint8_t *req, size_t len)
{
    Grpc__Health__V1__HealthCheckRequest *r =
        grpc__health__v1__health_check_request__unpack(NULL, len, req);
    if (!r) {
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "malformed HealthCheckRequest");
        return NULL;
    }
    if (strlen(r->service) >= MAX_SERVICE_NAME) {
        grpc__health__v1__health_check_request__free_unpacked(r, NULL);
        dsv32_rpc_call_finish(call, DSV32_RPC_INVALID_ARGUMENT, "service name too long");
        return NULL;
    }
    return r;
}

static void on_check(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct dsv32_rpc_health *h = arg;
    Grpc__Health__V1__HealthCheckRequest *r = unpack_req(call, req, len);
    if (!r)
        return;
    pthread_mutex_lock(&h->mu);
    struct service *sv = find_service(h, r->service);
    int st = sv ? (int)sv->st : -1;
    pthread_mutex_unlock(&h->mu);
    if (st < 0) {
        dsv32_rpc_call_finish(call, DSV32_RPC_NOT_FOUND, "unknown service '%s'", r->service);
    } else {
        Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
        dsv32_rpc_call_reply_msg(call, &resp.base);
    }
    grpc__health__v1__health_check_request__free_unpacked(r, NULL);
}

static void on_watch(void *arg, struct dsv32_rpc_call *call, const uint8_t *req, size_t len)
{
    struct dsv32_rpc_health *h = arg;
    Grpc__Health__V1__HealthCheckRequest *r = unpack_req(call, req, len);
    if (!r)
        return;
    pthread_mutex_lock(&h->mu);
    if (h->n_watchers >= MAX_WATCHERS) {
        pthread_mutex_unlock(&h->mu);
        grpc__health__v1__health_check_request__free_unpacked(r, NULL);
        dsv32_rpc_call_finish(call, DSV32_RPC_RESOURCE_EXHAUSTED, "too many health watchers");
        return;
    }
    struct watcher *w = &h->watchers[h->n_watchers++];
    w->call = call;
    strcpy(w->name, r->service);
    grpc__health__v1__health_check_request__free_unpacked(r, NULL);
    int rc = send_status(call, status_of(h, w->name));
    if (rc < 0)
        drop_watcher(h, h->n_watchers - 1, DSV32_RPC_INTERNAL, "cannot send");
    pthread_mutex_unlock(&h->mu);
    if (rc == 0)
        dsv32_rpc_call_on_cancel(call, on_watch_cancel, h);
}

int dsv32_rpc_health_new(struct dsv32_rpc_server *s, struct dsv32_rpc_health **ret)
{
    struct dsv32_rpc_health *h = calloc(1, sizeof(*h));
    if (!h)
        return -ENOMEM;
    pthread_mutex_init(&h->mu, NULL);
    h->n_services = 1; /* "": the server as a whole */
    h->services[0].st = DSV32_RPC_HEALTH_NOT_SERVING;
    int r = dsv32_rpc_server_add_method(s, "/grpc.health.v1.Health/Check", DSV32_RPC_UNARY, 0,
                                        on_check, h);
    if (r == 0)
        r = dsv32_rpc_server_add_method(s, "/grpc.health.v1.Health/Watch",
                                        DSV32_RPC_SERVER_STREAM, 0, on_watch, h);
    if (r < 0) {
        pthread_mutex_destroy(&h->mu);
        free(h);
        return r;
    }
    *ret = h;
    return 0;
}

int dsv32_rpc_health_set(struct dsv32_rpc_health *h, const char *service,
                         enum dsv32_rpc_health_status st)
{
    if (!service || strlen(service) >= MAX_SERVICE_NAME || st < DSV32_RPC_HEALTH_UNKNOWN ||
        st > DSV32_RPC_HEALTH_NOT_SERVING)
        return -EINVAL;
    pthread_mutex_lock(&h->mu);
    struct service *sv = find_service(h, service);
    if (!sv) {
        if (h->n_services >= MAX_SERVICES) {
            pthread_mutex_unlock(&h->mu);
            return DSV32_EFULL;
        }
        sv = &h->services[h->n_services++];
        strcpy(sv->name, service);
    } else if (sv->st == st) {
        pthread_mutex_unlock(&h->mu);
        return 0;
    }
    sv->st = st;
    for (int i = 0; i < h->n_watchers;) {
        if (strcmp(h->watchers[i].name, service) != 0) {
            i++;
            continue;
        }
        int r = send_status(h->watchers[i].call, st);
        if (r == DSV32_EOVERLOAD) /* a watcher that does not read: let it reconnect */
            drop_watcher(h, i, DSV32_RPC_RESOURCE_EXHAUSTED, "watcher too slow");
        else
            i++; /* a cancelled one is dropped by its cancel callback */
    }
    pthread_mutex_unlock(&h->mu);
    return 0;
}

void dsv32_rpc_health_free(struct dsv32_rpc_health *h)
{
    if (!h)
        return;
    pthread_mutex_lock(&h->mu);
    while (h->n_watchers > 0) /* only when freed before its server: end the streams */
        drop_watcher(h, h->n_watchers - 1, DSV32_RPC_UNAVAILABLE, "health service stopped");
    pthread_mutex_unlock(&h->mu);
    pthread_mutex_destroy(&h->mu);
    free(h);
}
