/* The tcp backend of comm.h: one connection per peer pair and epoch, 8-byte length-prefixed
 * frames, every transfer multiplexed with poll() against a deadline (all sends and receives of an
 * exchange progress together, so two peers sending each other large blocks never deadlock). */
#define _GNU_SOURCE 1 /* accept4 */
#include "comm.h"

#include "error.h"
#include "log.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HS_MAGIC 0x64737633u /* "dsv3" */
#define HS_VERSION 1u
#define MAX_FRAME_BYTES (2ull << 30)
#define MAX_STASH 64

struct hello {
    uint32_t magic, version;
    uint64_t epoch;
    uint32_t rank, world;
};

struct stashed {
    int fd;
    uint64_t epoch;
    uint32_t rank, world;
};

struct dsv32_comm_listener {
    int fd;
    struct stashed stash[MAX_STASH]; /* handshaken connections of epochs not built yet */
    int n_stash;
};

struct tcp_comm {
    struct dsv32_comm c;
    int *fd;          /* (world) -1 for self */
    void **rbuf;      /* (world) receive buffers, grown as needed */
    size_t *rcap;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

/* Moves exactly n bytes in one direction before the deadline (non-blocking fd). */
static int xfer_all(int fd, void *buf, size_t n, int out, int64_t deadline)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t k = out ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            continue;
        }
        if (k == 0)
            return DSV32_EPEER;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return errno == ECONNRESET || errno == EPIPE ? DSV32_EPEER : -errno;
        int left = (int)(deadline - now_ms());
        if (left <= 0)
            return DSV32_ETIMEOUT;
        struct pollfd pf = {.fd = fd, .events = out ? POLLOUT : POLLIN};
        if (poll(&pf, 1, left) < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

int dsv32_comm_tcp_listen(const char *host, int port, struct dsv32_comm_listener **ret,
                          int *ret_port)
{
    struct dsv32_comm_listener *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l->fd < 0) {
        free(l);
        return -errno;
    }
    int one = 1, r;
    setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        r = -EINVAL;
        goto fail;
    }
    if (bind(l->fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l->fd, 128) < 0 ||
        set_nonblock(l->fd) < 0) {
        r = -errno;
        goto fail;
    }
    socklen_t len = sizeof(a);
    if (getsockname(l->fd, (struct sockaddr *)&a, &len) < 0) {
        r = -errno;
        goto fail;
    }
    if (ret_port)
        *ret_port = ntohs(a.sin_port);
    *ret = l;
    return 0;
fail:
    close(l->fd);
    free(l);
    return r;
}

void dsv32_comm_tcp_listener_free(struct dsv32_comm_listener *l)
{
    if (!l)
        return;
    for (int i = 0; i < l->n_stash; i++)
        close(l->stash[i].fd);
    close(l->fd);
    free(l);
}

static void tcp_free(struct dsv32_comm *c)
{
    struct tcp_comm *t = (struct tcp_comm *)c;
    if (!t)
        return;
    for (int i = 0; t->fd && i < c->world; i++)
        if (t->fd[i] >= 0)
            close(t->fd[i]);
    for (int i = 0; t->rbuf && i < c->world; i++)
        free(t->rbuf[i]);
    free(t->fd);
    free(t->rbuf);
    free(t->rcap);
    free(t);
}

static void tcp_abort(struct dsv32_comm *c)
{
    struct tcp_comm *t = (struct tcp_comm *)c;
    for (int i = 0; i < c->world; i++)
        if (t->fd[i] >= 0)
            shutdown(t->fd[i], SHUT_RDWR);
    if (!c->failed)
        c->failed = DSV32_EEPOCH; /* torn down on purpose: the group moves to another epoch */
}

static int fail(struct dsv32_comm *c, int err)
{
    if (!c->failed)
        c->failed = err;
    return err;
}

struct xstate {
    uint64_t shdr, rhdr;   /* frame headers: payload length, little-endian on the wire */
    size_t soff, roff;     /* bytes done including the 8-byte header */
    int sending, receiving;
};

static int tcp_exchange(struct dsv32_comm *c, struct dsv32_comm_xchg *x, int timeout_ms)
{
    struct tcp_comm *t = (struct tcp_comm *)c;
    const int W = c->world;
    struct xstate st[DSV32_COMM_MAX_WORLD];
    struct pollfd pf[DSV32_COMM_MAX_WORLD];
    int pending = 0;
    const int64_t deadline = now_ms() + timeout_ms;
    for (int p = 0; p < W; p++) {
        memset(&st[p], 0, sizeof(st[p]));
        x->recv[p] = NULL;
        x->recv_bytes[p] = 0;
        if (p == c->rank)
            continue; /* a rank sends itself nothing: callers handle their own rows locally */
        if (x->send[p]) {
            st[p].sending = 1;
            st[p].shdr = htole64((uint64_t)x->send_bytes[p]);
            pending++;
        }
        if (x->recv_from[p]) {
            st[p].receiving = 1;
            pending++;
        }
    }
    while (pending > 0) {
        int n = 0, idx[DSV32_COMM_MAX_WORLD];
        for (int p = 0; p < W; p++) {
            short ev = (short)((st[p].sending ? POLLOUT : 0) | (st[p].receiving ? POLLIN : 0));
            if (!ev)
                continue;
            pf[n] = (struct pollfd){.fd = t->fd[p], .events = ev};
            idx[n++] = p;
        }
        int left = (int)(deadline - now_ms());
        if (left <= 0)
            return fail(c, DSV32_ETIMEOUT);
        int k = poll(pf, (nfds_t)n, left);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return fail(c, -errno);
        }
        if (k == 0)
            return fail(c, DSV32_ETIMEOUT);
        for (int i = 0; i < n; i++) {
            const int p = idx[i];
            struct xstate *s = &st[p];
            if (pf[i].revents & (POLLERR | POLLNVAL))
                return fail(c, DSV32_EPEER);
            if (s->sending && (pf[i].revents & (POLLOUT | POLLHUP))) {
                const size_t total = 8 + x->send_bytes[p];
                while (s->soff < total) {
                    const uint8_t *src = s->soff < 8 ? (const uint8_t *)&s->shdr + s->soff
                                                     : (const uint8_t *)x->send[p] + (s->soff - 8);
                    size_t len = s->soff < 8 ? 8 - s->soff : total - s->soff;
                    ssize_t w = send(t->fd[p], src, len, MSG_NOSIGNAL);
                    if (w > 0) {
                        s->soff += (size_t)w;
                        c->bytes_sent += (uint64_t)w;
                        continue;
                    }
                    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                        break;
                    return fail(c, DSV32_EPEER);
                }
                if (s->soff == total) {
                    s->sending = 0;
                    pending--;
                }
            }
            if (s->receiving && (pf[i].revents & (POLLIN | POLLHUP))) {
                for (;;) {
                    uint8_t *dst;
                    size_t len;
                    if (s->roff < 8) {
                        dst = (uint8_t *)&s->rhdr + s->roff;
                        len = 8 - s->roff;
                    } else {
                        size_t body = (size_t)le64toh(s->rhdr);
                        if (s->roff - 8 == body)
                            break;
                        dst = (uint8_t *)t->rbuf[p] + (s->roff - 8);
                        len = body - (s->roff - 8);
                    }
                    ssize_t r = recv(t->fd[p], dst, len, 0);
                    if (r == 0)
                        return fail(c, DSV32_EPEER);
                    if (r < 0) {
                        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                            break;
                        return fail(c, DSV32_EPEER);
                    }
                    s->roff += (size_t)r;
                    c->bytes_received += (uint64_t)r;
                    if (s->roff == 8) {
                        uint64_t body = le64toh(s->rhdr);
                        if (body > MAX_FRAME_BYTES)
                            return fail(c, DSV32_EFORMAT);
                        if (body > t->rcap[p]) {
                            void *nb = realloc(t->rbuf[p], (size_t)body);
                            if (!nb)
                                return fail(c, -ENOMEM);
                            t->rbuf[p] = nb;
                            t->rcap[p] = (size_t)body;
                        }
                    }
                }
                if (s->roff >= 8 && x->recv_expect &&
                    x->recv_expect[p] != DSV32_COMM_SIZE_UNKNOWN &&
                    le64toh(s->rhdr) != x->recv_expect[p])
                    return fail(c, DSV32_EFORMAT);
                if (s->roff >= 8 && s->roff - 8 == (size_t)le64toh(s->rhdr)) {
                    s->receiving = 0;
                    x->recv[p] = t->rbuf[p];
                    x->recv_bytes[p] = (size_t)le64toh(s->rhdr);
                    pending--;
                }
            }
        }
    }
    for (int p = 0; x->recv_head && p < W; p++)
        x->recv_head[p] = x->recv[p]; /* host memory already */
    c->exchanges++;
    return 0;
}

static int tcp_send(struct dsv32_comm *c, int peer, const void *buf, size_t bytes, int timeout_ms)
{
    struct tcp_comm *t = (struct tcp_comm *)c;
    if (c->failed)
        return c->failed;
    if (peer < 0 || peer >= c->world || peer == c->rank)
        return -EINVAL;
    int r = xfer_all(t->fd[peer], (void *)buf, bytes, 1, now_ms() + timeout_ms);
    if (r < 0)
        return fail(c, r);
    c->bytes_sent += bytes;
    return 0;
}

static int tcp_recv(struct dsv32_comm *c, int peer, void *buf, size_t bytes, int timeout_ms)
{
    struct tcp_comm *t = (struct tcp_comm *)c;
    if (c->failed)
        return c->failed;
    if (peer < 0 || peer >= c->world || peer == c->rank)
        return -EINVAL;
    int r = xfer_all(t->fd[peer], buf, bytes, 0, now_ms() + timeout_ms);
    if (r < 0)
        return fail(c, r);
    c->bytes_received += bytes;
    return 0;
}

static const struct dsv32_comm_ops tcp_ops = {
    .name = "tcp",
    .exchange = tcp_exchange,
    .send = tcp_send,
    .recv = tcp_recv,
    .abort = tcp_abort,
    .free = tcp_free,
};

static int parse_addr(const char *s, struct sockaddr_in *a)
{
    char host[128];
    const char *colon = strrchr(s, ':');
    if (!colon || colon - s >= (long)sizeof(host))
        return -EINVAL;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    long port = strtol(colon + 1, NULL, 10);
    if (port <= 0 || port > 65535)
        return -EINVAL;
    memset(a, 0, sizeof(*a));
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -EINVAL;
}

static void tune(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Connects to a lower rank and introduces ourselves; retried until the deadline (the peer may
 * still be starting). */
static int connect_peer(const char *addr, const struct hello *h, int64_t deadline, int *ret_fd)
{
    struct sockaddr_in a;
    if (parse_addr(addr, &a) < 0)
        return -EINVAL;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -errno;
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
            tune(fd);
            set_nonblock(fd);
            uint32_t ack[2];
            int r = xfer_all(fd, (void *)h, sizeof(*h), 1, deadline);
            if (r == 0)
                r = xfer_all(fd, ack, sizeof(ack), 0, deadline);
            if (r == 0 && ack[0] == HS_MAGIC && ack[1] == 1) {
                *ret_fd = fd;
                return 0;
            }
            close(fd);
            if (r == DSV32_ETIMEOUT)
                return r;
            if (r == 0)
                return DSV32_EEPOCH; /* refused: the peer is past this epoch */
        } else {
            close(fd);
        }
        if (now_ms() >= deadline)
            return DSV32_ETIMEOUT;
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Accepts connections until every rank in (rank, world) of `epoch` is connected. Connections
 * for a later epoch are kept for later; earlier ones are refused. */
static int accept_peers(struct dsv32_comm_listener *l, struct tcp_comm *t, uint64_t epoch,
                        int64_t deadline)
{
    const int rank = t->c.rank, world = t->c.world;
    int missing = world - 1 - rank;
    for (int i = 0; i < l->n_stash;) {
        struct stashed *s = &l->stash[i];
        if (s->epoch == epoch && (int)s->world == world && (int)s->rank > rank &&
            t->fd[s->rank] < 0) {
            t->fd[s->rank] = s->fd;
            missing--;
            l->stash[i] = l->stash[--l->n_stash];
        } else if (s->epoch < epoch) {
            close(s->fd);
            l->stash[i] = l->stash[--l->n_stash];
        } else {
            i++;
        }
    }
    while (missing > 0) {
        int left = (int)(deadline - now_ms());
        if (left <= 0)
            return DSV32_ETIMEOUT;
        struct pollfd pf = {.fd = l->fd, .events = POLLIN};
        if (poll(&pf, 1, left) <= 0)
            continue;
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0)
            continue;
        tune(fd);
        struct hello h;
        int64_t hs_deadline = now_ms() + 2000 < deadline ? now_ms() + 2000 : deadline;
        if (xfer_all(fd, &h, sizeof(h), 0, hs_deadline) < 0 || h.magic != HS_MAGIC ||
            h.version != HS_VERSION || h.world > DSV32_COMM_MAX_WORLD || h.rank >= h.world) {
            close(fd);
            continue;
        }
        uint32_t ack[2] = {HS_MAGIC, h.epoch >= epoch ? 1u : 0u};
        if (xfer_all(fd, ack, sizeof(ack), 1, hs_deadline) < 0 || !ack[1]) {
            close(fd);
            continue;
        }
        if (h.epoch == epoch && (int)h.world == world && (int)h.rank > rank && t->fd[h.rank] < 0) {
            t->fd[h.rank] = fd;
            missing--;
        } else if (h.epoch > epoch && l->n_stash < MAX_STASH) {
            l->stash[l->n_stash++] = (struct stashed){fd, h.epoch, h.rank, h.world};
        } else {
            close(fd);
        }
    }
    return 0;
}

int dsv32_comm_tcp_new(struct dsv32_comm_listener *l, int rank, int world, const char *const *addrs,
                       uint64_t epoch, int timeout_ms, struct dsv32_comm **ret)
{
    if (world < 1 || world > DSV32_COMM_MAX_WORLD || rank < 0 || rank >= world)
        return -EINVAL;
    struct tcp_comm *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->c = (struct dsv32_comm){.ops = &tcp_ops, .rank = rank, .world = world, .epoch = epoch};
    t->fd = malloc(sizeof(int) * (size_t)world);
    t->rbuf = calloc((size_t)world, sizeof(void *));
    t->rcap = calloc((size_t)world, sizeof(size_t));
    if (!t->fd || !t->rbuf || !t->rcap) {
        tcp_free(&t->c);
        return -ENOMEM;
    }
    for (int i = 0; i < world; i++)
        t->fd[i] = -1;
    const int64_t deadline = now_ms() + timeout_ms;
    struct hello h = {.magic = HS_MAGIC, .version = HS_VERSION, .epoch = epoch,
                      .rank = (uint32_t)rank, .world = (uint32_t)world};
    int r = 0;
    for (int p = 0; p < rank && r == 0; p++)
        r = connect_peer(addrs[p], &h, deadline, &t->fd[p]);
    if (r == 0)
        r = accept_peers(l, t, epoch, deadline);
    if (r < 0) {
        log_warn("tcp comm epoch %llu rank %d/%d: %s", (unsigned long long)epoch, rank, world,
                 dsv32_strerror(r));
        tcp_free(&t->c);
        return r;
    }
    *ret = &t->c;
    return 0;
}
