/* See metrics.h. One thread: accept, read the request head (2 s at most), answer, close. */
#define _GNU_SOURCE 1
#include "metrics.h"

#include "error.h"
#include "log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct dsv32_metrics_text {
    char *p;
    size_t len, cap;
    int oom;
    char family[128];
};

struct dsv32_metrics {
    int fd;
    pthread_t thread;
    atomic_int stop;
    dsv32_metrics_fill_fn fill;
    void *ctx;
};

static void put(struct dsv32_metrics_text *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = t->oom ? 0 : vsnprintf(t->p + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (t->oom || n < 0)
            return;
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap * 2 + (size_t)n + 1;
        char *np = realloc(t->p, cap);
        if (!np) {
            t->oom = 1;
            return;
        }
        t->p = np;
        t->cap = cap;
    }
}

void dsv32_metrics_family(struct dsv32_metrics_text *t, const char *name, const char *type,
                          const char *help)
{
    snprintf(t->family, sizeof(t->family), "%s", name);
    put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void dsv32_metrics_sample(struct dsv32_metrics_text *t, const char *labels, double value)
{
    if (labels)
        put(t, "%s{%s} %.17g\n", t->family, labels, value);
    else
        put(t, "%s %.17g\n", t->family, value);
}

void dsv32_metrics_one(struct dsv32_metrics_text *t, const char *name, const char *type,
                       const char *help, double value)
{
    dsv32_metrics_family(t, name, type, help);
    dsv32_metrics_sample(t, NULL, value);
}

void dsv32_histogram_init(struct dsv32_histogram *h, const double *bounds, int n)
{
    h->bounds = bounds;
    h->n = n < DSV32_HIST_MAX_BUCKETS ? n : DSV32_HIST_MAX_BUCKETS;
    for (int i = 0; i <= DSV32_HIST_MAX_BUCKETS; i++)
        atomic_init(&h->counts[i], 0);
    atomic_init(&h->sum_ns, 0);
}

void dsv32_histogram_observe(struct dsv32_histogram *h, double seconds)
{
    if (!(seconds >= 0)) /* NaN or negative: not a duration */
        return;
    int b = 0;
    while (b < h->n && seconds > h->bounds[b])
        b++;
    atomic_fetch_add(&h->counts[b], 1);
    atomic_fetch_add(&h->sum_ns, (uint_fast64_t)(seconds * 1e9));
}

void dsv32_metrics_histogram(struct dsv32_metrics_text *t, const char *name, const char *help,
                             struct dsv32_histogram *h)
{
    put(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int b = 0; b <= h->n; b++) {
        cum += atomic_load(&h->counts[b]);
        if (b < h->n)
            put(t, "%s_bucket{le=\"%.17g\"} %llu\n", name, h->bounds[b], (unsigned long long)cum);
        else
            put(t, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    }
    put(t, "%s_sum %.17g\n%s_count %llu\n", name, (double)atomic_load(&h->sum_ns) * 1e-9, name,
        (unsigned long long)cum);
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void serve(struct dsv32_metrics *m, int fd)
{
    char req[4096];
    size_t n = 0;
    /* the request head, 2 s at most */
    while (n < sizeof(req) - 1 && !memmem(req, n, "\r\n\r\n", 4)) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, 2000) <= 0)
            return;
        ssize_t r = recv(fd, req + n, sizeof(req) - 1 - n, 0);
        if (r <= 0)
            return;
        n += (size_t)r;
    }
    req[n] = 0;
    const char *status = "200 OK";
    struct dsv32_metrics_text t = {0};
    if (strncmp(req, "GET ", 4) != 0) {
        status = "405 Method Not Allowed";
        put(&t, "only GET\n");
    } else if (strncmp(req + 4, "/metrics ", 9) != 0 && strncmp(req + 4, "/metrics?", 9) != 0) {
        status = "404 Not Found";
        put(&t, "the metrics are at /metrics\n");
    } else {
        m->fill(m->ctx, &t);
    }
    if (t.oom) {
        free(t.p);
        t = (struct dsv32_metrics_text){0};
        status = "500 Internal Server Error";
        put(&t, "out of memory\n");
    }
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "HTTP/1.1 %s\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                      status, t.len);
    send_all(fd, head, (size_t)hn);
    send_all(fd, t.p ? t.p : "", t.len);
    free(t.p);
}

static void *metrics_main(void *arg)
{
    struct dsv32_metrics *m = arg;
    while (!atomic_load(&m->stop)) {
        struct pollfd pf = {.fd = m->fd, .events = POLLIN};
        if (poll(&pf, 1, 200) <= 0)
            continue;
        int c = accept(m->fd, NULL, NULL);
        if (c < 0)
            continue;
        serve(m, c);
        close(c);
    }
    return NULL;
}

int dsv32_metrics_start(const char *listen_addr, const char *port_file, dsv32_metrics_fill_fn fill,
                        void *ctx, struct dsv32_metrics **ret)
{
    char host[256];
    const char *colon = strrchr(listen_addr, ':');
    if (!colon || colon == listen_addr || (size_t)(colon - listen_addr) >= sizeof(host) || !colon[1]) {
        log_error("metrics: listen address %s is not HOST:PORT", listen_addr);
        return -EINVAL;
    }
    memcpy(host, listen_addr, (size_t)(colon - listen_addr));
    host[colon - listen_addr] = 0;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai;
    int g = getaddrinfo(host, colon + 1, &hints, &ai);
    if (g != 0) {
        log_error("metrics: %s: %s", listen_addr, gai_strerror(g));
        return -EINVAL;
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 16) < 0) {
        int e = errno;
        log_error("metrics: cannot listen on %s: %s", listen_addr, strerror(e));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -e;
    }
    freeaddrinfo(ai);
    struct sockaddr_storage sa;
    socklen_t sl = sizeof(sa);
    int port = 0;
    if (getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&sa)->sin_port);
    if (port_file) {
        FILE *f = fopen(port_file, "w");
        if (!f || fprintf(f, "%d\n", port) < 0 || fclose(f) != 0) {
            log_error("%s: cannot write the metrics port", port_file);
            close(fd);
            return -EIO;
        }
    }
    struct dsv32_metrics *m = calloc(1, sizeof(*m));
    if (!m) {
        close(fd);
        return -ENOMEM;
    }
    m->fd = fd;
    m->fill = fill;
    m->ctx = ctx;
    if (pthread_create(&m->thread, NULL, metrics_main, m) != 0) {
        close(fd);
        free(m);
        return -EAGAIN;
    }
    log_info("metrics on http://%s:%d/metrics", host, port);
    *ret = m;
    return 0;
}

void dsv32_metrics_stop(struct dsv32_metrics *m)
{
    if (!m)
        return;
    atomic_store(&m->stop, 1);
    pthread_join(m->thread, NULL);
    close(m->fd);
    free(m);
}
