/* Unit tests of the gRPC layer (daemon/rpc.h): a real server and client on 127.0.0.1. Unary and
 * streaming calls, statuses, UNIMPLEMENTED, deadlines, cancellation reaching the handler, message
 * size limits, call and queue limits, admin guard, wait-for-ready, the health service, shutdown
 * with calls in progress. */
#define _GNU_SOURCE 1
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "error.h"
#include "health.pb-c.h"
#include "rpc.h"

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* What the handlers saw, for the tests to check. */
static atomic_int n_cancel_cb;       /* cancel callbacks run */
static atomic_int n_stream_done;     /* streaming threads that finished */
static atomic_int last_reply_result; /* result of dsv32_rpc_call_reply in big replies */
static atomic_int overload_accepted; /* writes accepted by the overload handler */
static atomic_int overload_wait_rc;  /* wait_writable on the queue thread */

static bool wait_for(atomic_int *v, int at_least, int64_t ms)
{
    int64_t end = now_ms() + ms;
    while (atomic_load(v) < at_least) {
        if (now_ms() > end)
            return false;
        usleep(2000);
    }
    return true;
}

static void h_echo(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    if (len > 4 && memcmp(req, "big:", 4) == 0) {
        size_t n = strtoul((const char *)req + 4, NULL, 10);
        uint8_t *b = malloc(n);
        memset(b, 'x', n);
        atomic_store(&last_reply_result, dsv32_rpc_call_reply(c, b, n));
        free(b);
        return;
    }
    dsv32_rpc_call_reply(c, req, len);
}

static void h_fail(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    dsv32_rpc_call_finish(c, DSV32_RPC_INVALID_ARGUMENT, "bad thing %d", 42);
}

static void on_cancel(void *arg, struct dsv32_rpc_call *c)
{
    atomic_fetch_add(&n_cancel_cb, 1);
    dsv32_rpc_call_finish(c, DSV32_RPC_CANCELLED, "cancelled");
}

/* Never answers: waits for the client to go away. */
static void h_hang(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    dsv32_rpc_call_on_cancel(c, on_cancel, NULL);
}

/* One message, then waits for the client to go away. */
static void h_hang_stream(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    assert_int_equal(dsv32_rpc_call_write(c, "hello", 5), 0);
    dsv32_rpc_call_on_cancel(c, on_cancel, NULL);
}

struct stream_job {
    struct dsv32_rpc_call *c;
    int n;
};

/* Writes n messages from a thread of its own, waiting when the queue is full, then finishes. */
static void *stream_thread(void *arg)
{
    struct stream_job *j = arg;
    char msg[32];
    int r = 0;
    for (int i = 0; i < j->n && r == 0; i++) {
        int len = snprintf(msg, sizeof(msg), "msg-%d", i);
        while ((r = dsv32_rpc_call_write(j->c, msg, (size_t)len)) == DSV32_EOVERLOAD)
            r = dsv32_rpc_call_wait_writable(j->c, 5000);
    }
    dsv32_rpc_call_finish(j->c, r == 0 ? DSV32_RPC_OK : DSV32_RPC_CANCELLED, NULL);
    free(j);
    atomic_fetch_add(&n_stream_done, 1);
    return NULL;
}

static void h_stream(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    struct stream_job *j = malloc(sizeof(*j));
    j->c = c;
    j->n = atoi((const char *)req);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, stream_thread, j), 0);
    pthread_detach(t);
}

/* Writes 100 messages at once from the queue thread: the queue limit must show. */
static void h_overload(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    int accepted = 0;
    for (int i = 0; i < 100; i++) {
        int r = dsv32_rpc_call_write(c, "m", 1);
        if (r == 0)
            accepted++;
        else
            assert_int_equal(r, DSV32_EOVERLOAD);
    }
    atomic_store(&overload_wait_rc, dsv32_rpc_call_wait_writable(c, 10));
    atomic_store(&overload_accepted, accepted);
    dsv32_rpc_call_finish(c, DSV32_RPC_OK, NULL);
}

struct fixture {
    struct dsv32_rpc_server *srv;
    struct dsv32_rpc_health *health;
    struct dsv32_rpc_client *cli;
    char target[64];
};

static void add_methods(struct dsv32_rpc_server *s)
{
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Echo", DSV32_RPC_UNARY, 0, h_echo, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Echo", DSV32_RPC_UNARY, 0, h_echo, NULL),
                     -EEXIST);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Fail", DSV32_RPC_UNARY, 0, h_fail, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Hang", DSV32_RPC_UNARY, 0, h_hang, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/HangStream", DSV32_RPC_SERVER_STREAM, 0,
                                                 h_hang_stream, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Stream", DSV32_RPC_SERVER_STREAM, 0,
                                                 h_stream, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Overload", DSV32_RPC_SERVER_STREAM, 0,
                                                 h_overload, NULL),
                     0);
    assert_int_equal(dsv32_rpc_server_add_method(s, "/t.T/Admin", DSV32_RPC_UNARY,
                                                 DSV32_RPC_ADMIN, h_echo, NULL),
                     0);
}

static struct dsv32_rpc_server *start_server(const struct dsv32_rpc_server_config *cfg,
                                             struct dsv32_rpc_health **health, int *port)
{
    struct dsv32_rpc_server *s;
    assert_int_equal(dsv32_rpc_server_new(cfg, &s), 0);
    add_methods(s);
    if (health)
        assert_int_equal(dsv32_rpc_health_new(s, health), 0);
    assert_int_equal(dsv32_rpc_server_start(s, port), 0);
    return s;
}

static struct dsv32_rpc_client *new_client(const char *target, size_t max_recv, const char *token)
{
    struct dsv32_rpc_client_config cc = {
        .target = target, .max_recv_bytes = max_recv, .bearer_token = token};
    struct dsv32_rpc_client *c;
    assert_int_equal(dsv32_rpc_client_new(&cc, &c), 0);
    return c;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    struct dsv32_rpc_server_config cfg = {
        .listen = "127.0.0.1:0",
        .max_recv_bytes = 64 << 10,
        .max_send_bytes = 256 << 10,
        .max_calls = 8,
        .max_stream_queue = 4,
        .admin_token = "s3cret",
    };
    int port = 0;
    f->srv = start_server(&cfg, &f->health, &port);
    assert_true(port > 0);
    snprintf(f->target, sizeof(f->target), "127.0.0.1:%d", port);
    f->cli = new_client(f->target, 1 << 20, NULL);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    dsv32_rpc_client_free(f->cli);
    dsv32_rpc_server_free(f->srv);
    dsv32_rpc_health_free(f->health);
    free(f);
    return 0;
}

static void test_codes(void **state)
{
    assert_string_equal(dsv32_rpc_code_name(DSV32_RPC_UNIMPLEMENTED), "UNIMPLEMENTED");
    assert_string_equal(dsv32_rpc_code_name(99), "UNKNOWN");
    assert_int_equal(dsv32_rpc_code_from_err(-EINVAL), DSV32_RPC_INVALID_ARGUMENT);
    assert_int_equal(dsv32_rpc_code_from_err(DSV32_EOVERLOAD), DSV32_RPC_RESOURCE_EXHAUSTED);
    assert_int_equal(dsv32_rpc_code_from_err(DSV32_ECONTEXT), DSV32_RPC_INVALID_ARGUMENT);
    assert_int_equal(dsv32_rpc_code_from_err(DSV32_ETIMEOUT), DSV32_RPC_DEADLINE_EXCEEDED);
    assert_int_equal(dsv32_rpc_code_from_err(DSV32_EPEER), DSV32_RPC_UNAVAILABLE);
    assert_int_equal(dsv32_rpc_code_from_err(-EIO), DSV32_RPC_INTERNAL);

    assert_true(dsv32_rpc_peer_is_loopback("ipv4:127.0.0.1:5000"));
    assert_true(dsv32_rpc_peer_is_loopback("ipv4:127.3.2.1:1"));
    assert_true(dsv32_rpc_peer_is_loopback("ipv6:[::1]:5000"));
    assert_true(dsv32_rpc_peer_is_loopback("ipv6:[::ffff:127.0.0.1]:5000"));
    assert_true(dsv32_rpc_peer_is_loopback("unix:/run/dsv32.sock"));
    assert_false(dsv32_rpc_peer_is_loopback("ipv4:10.0.0.1:5000"));
    assert_false(dsv32_rpc_peer_is_loopback("ipv4:128.0.0.1:5000"));
    assert_false(dsv32_rpc_peer_is_loopback("ipv6:[::2]:5000"));
    assert_false(dsv32_rpc_peer_is_loopback("ipv6:[::ffff:10.1.1.1]:5000"));
    assert_false(dsv32_rpc_peer_is_loopback("ipv6:[fe80::1]:5000"));
    assert_false(dsv32_rpc_peer_is_loopback(""));
    assert_false(dsv32_rpc_peer_is_loopback(NULL));
}

static void test_unary(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_status st;
    uint8_t *resp;
    size_t len;
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Echo", "ping", 4, 2000, 0, &resp, &len, &st), 0);
    assert_int_equal(st.code, DSV32_RPC_OK);
    assert_int_equal(len, 4);
    assert_memory_equal(resp, "ping", 4);
    free(resp);
    /* an empty message is a message */
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Echo", "", 0, 2000, 0, &resp, &len, &st), 0);
    assert_int_equal(len, 0);
    free(resp);

    resp = NULL;
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Fail", "x", 1, 2000, 0, &resp, &len, &st),
                     DSV32_EGRPC);
    assert_null(resp);
    assert_int_equal(st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_string_equal(st.message, "bad thing 42");
}

static void test_unimplemented(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_status st;
    uint8_t *resp;
    size_t len;
    int64_t t0 = now_ms();
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Nope", "x", 1, 5000, 0, &resp, &len, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_UNIMPLEMENTED);
    assert_true(now_ms() - t0 < 2000); /* answered, not left to the deadline */
    /* also for a stream */
    struct dsv32_rpc_stream *s;
    assert_int_equal(dsv32_rpc_stream_open(f->cli, "/x.Y/Z", "x", 1, 5000, 0, &s), 0);
    assert_int_equal(dsv32_rpc_stream_read(s, 5000, &resp, &len), DSV32_EGRPC);
    dsv32_rpc_stream_status(s, &st);
    assert_int_equal(st.code, DSV32_RPC_UNIMPLEMENTED);
    dsv32_rpc_stream_free(s);
}

static void test_deadline(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_status st;
    uint8_t *resp;
    size_t len;
    int before = atomic_load(&n_cancel_cb);
    int64_t t0 = now_ms();
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Hang", "x", 1, 200, 0, &resp, &len, &st),
                     DSV32_ETIMEOUT);
    int64_t took = now_ms() - t0;
    assert_int_equal(st.code, DSV32_RPC_DEADLINE_EXCEEDED);
    assert_true(took >= 190 && took < 2000);
    /* the server's handler learns that its client is gone */
    assert_true(wait_for(&n_cancel_cb, before + 1, 3000));
}

static void test_stream(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_stream *s;
    int done_before = atomic_load(&n_stream_done);
    assert_int_equal(dsv32_rpc_stream_open(f->cli, "/t.T/Stream", "1000", 4, 10000, 0, &s), 0);
    char want[32];
    for (int i = 0; i < 1000; i++) {
        uint8_t *b;
        size_t n;
        assert_int_equal(dsv32_rpc_stream_read(s, 5000, &b, &n), 1);
        int wn = snprintf(want, sizeof(want), "msg-%d", i);
        assert_int_equal(n, (size_t)wn);
        assert_memory_equal(b, want, n);
        free(b);
    }
    uint8_t *b;
    size_t n;
    assert_int_equal(dsv32_rpc_stream_read(s, 5000, &b, &n), 0);
    struct dsv32_rpc_status st;
    dsv32_rpc_stream_status(s, &st);
    assert_int_equal(st.code, DSV32_RPC_OK);
    dsv32_rpc_stream_free(s);
    assert_true(wait_for(&n_stream_done, done_before + 1, 3000));
}

static void test_stream_cancel(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_stream *s;
    int before = atomic_load(&n_cancel_cb);
    assert_int_equal(dsv32_rpc_stream_open(f->cli, "/t.T/HangStream", "x", 1, -1, 0, &s), 0);
    uint8_t *b;
    size_t n;
    assert_int_equal(dsv32_rpc_stream_read(s, 5000, &b, &n), 1);
    assert_memory_equal(b, "hello", 5);
    free(b);
    /* nothing more comes: a read with a timeout says so and the call goes on */
    assert_int_equal(dsv32_rpc_stream_read(s, 100, &b, &n), -EAGAIN);
    assert_int_equal(atomic_load(&n_cancel_cb), before);
    dsv32_rpc_stream_cancel(s);
    assert_int_equal(dsv32_rpc_stream_read(s, 5000, &b, &n), DSV32_ECANCELLED);
    dsv32_rpc_stream_free(s);
    assert_true(wait_for(&n_cancel_cb, before + 1, 3000));

    /* a client that just goes away (frees the stream) stops the handler too */
    assert_int_equal(dsv32_rpc_stream_open(f->cli, "/t.T/HangStream", "x", 1, -1, 0, &s), 0);
    assert_int_equal(dsv32_rpc_stream_read(s, 5000, &b, &n), 1);
    free(b);
    dsv32_rpc_stream_free(s);
    assert_true(wait_for(&n_cancel_cb, before + 2, 3000));
}

static void test_message_size(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_status st;
    uint8_t *resp;
    size_t len;
    /* request above the server's 64 KiB receive limit */
    size_t big = 100 << 10;
    uint8_t *req = calloc(1, big);
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Echo", req, big, 5000, 0, &resp, &len, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_RESOURCE_EXHAUSTED);
    free(req);
    /* just below it passes */
    req = calloc(1, 60 << 10);
    assert_int_equal(
        dsv32_rpc_unary(f->cli, "/t.T/Echo", req, 60 << 10, 5000, 0, &resp, &len, &st), 0);
    assert_int_equal(len, 60 << 10);
    free(resp);
    free(req);

    /* response above the client's receive limit */
    struct dsv32_rpc_client *small = new_client(f->target, 32 << 10, NULL);
    assert_int_equal(dsv32_rpc_unary(small, "/t.T/Echo", "big:40000", 9, 5000, 0, &resp, &len, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_RESOURCE_EXHAUSTED);
    assert_int_equal(dsv32_rpc_unary(small, "/t.T/Echo", "big:30000", 9, 5000, 0, &resp, &len, &st),
                     0);
    assert_int_equal(len, 30000);
    free(resp);
    dsv32_rpc_client_free(small);

    /* response above the server's send limit: the handler is told, the client gets INTERNAL */
    assert_int_equal(
        dsv32_rpc_unary(f->cli, "/t.T/Echo", "big:300000", 10, 5000, 0, &resp, &len, &st),
        DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_INTERNAL);
    /* the handler stores the result after its reply returned: the client may be first */
    int64_t end = now_ms() + 3000;
    while (atomic_load(&last_reply_result) != -EMSGSIZE && now_ms() < end)
        usleep(1000);
    assert_int_equal(atomic_load(&last_reply_result), -EMSGSIZE);
}

static void test_stream_queue_limit(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_stream *s;
    assert_int_equal(dsv32_rpc_stream_open(f->cli, "/t.T/Overload", "x", 1, 5000, 0, &s), 0);
    int got = 0, r;
    uint8_t *b;
    size_t n;
    while ((r = dsv32_rpc_stream_read(s, 5000, &b, &n)) == 1) {
        got++;
        free(b);
    }
    assert_int_equal(r, 0);
    dsv32_rpc_stream_free(s);
    /* one in flight + max_stream_queue (4) queued; everything accepted arrived */
    assert_int_equal(atomic_load(&overload_accepted), 5);
    assert_int_equal(got, 5);
    assert_int_equal(atomic_load(&overload_wait_rc), -EDEADLK);
}

static void test_call_limit(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_stream *s[8];
    uint8_t *b;
    size_t n;
    int before = atomic_load(&n_cancel_cb);
    for (int i = 0; i < 8; i++) { /* max_calls = 8, all held by handlers */
        assert_int_equal(dsv32_rpc_stream_open(f->cli, "/t.T/HangStream", "x", 1, -1, 0, &s[i]),
                         0);
        assert_int_equal(dsv32_rpc_stream_read(s[i], 5000, &b, &n), 1);
        free(b);
    }
    struct dsv32_rpc_status st;
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Echo", "x", 1, 5000, 0, &b, &n, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_RESOURCE_EXHAUSTED);
    for (int i = 0; i < 8; i++)
        dsv32_rpc_stream_free(s[i]);
    assert_true(wait_for(&n_cancel_cb, before + 8, 3000));
    /* the slots come back */
    int64_t end = now_ms() + 3000;
    int r;
    while ((r = dsv32_rpc_unary(f->cli, "/t.T/Echo", "x", 1, 5000, 0, &b, &n, &st)) != 0 &&
           now_ms() < end)
        usleep(5000);
    assert_int_equal(r, 0);
    free(b);
}

static void test_admin(void **state)
{
    struct fixture *f = *state;
    struct dsv32_rpc_status st;
    uint8_t *b;
    size_t n;
    assert_int_equal(dsv32_rpc_unary(f->cli, "/t.T/Admin", "x", 1, 5000, 0, &b, &n, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_UNAUTHENTICATED);
    struct dsv32_rpc_client *wrong = new_client(f->target, 0, "s3cre");
    assert_int_equal(dsv32_rpc_unary(wrong, "/t.T/Admin", "x", 1, 5000, 0, &b, &n, &st),
                     DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_UNAUTHENTICATED);
    dsv32_rpc_client_free(wrong);
    struct dsv32_rpc_client *right = new_client(f->target, 0, "s3cret");
    assert_int_equal(dsv32_rpc_unary(right, "/t.T/Admin", "x", 1, 5000, 0, &b, &n, &st), 0);
    assert_memory_equal(b, "x", 1);
    free(b);
    dsv32_rpc_client_free(right);

    /* a server without a token refuses admin calls whatever the client sends */
    struct dsv32_rpc_server_config cfg = {.listen = "127.0.0.1:0"};
    int port;
    struct dsv32_rpc_server *s = start_server(&cfg, NULL, &port);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    struct dsv32_rpc_client *c = new_client(target, 0, "anything");
    assert_int_equal(dsv32_rpc_unary(c, "/t.T/Admin", "x", 1, 5000, 0, &b, &n, &st), DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_PERMISSION_DENIED);
    assert_int_equal(dsv32_rpc_unary(c, "/t.T/Echo", "x", 1, 5000, 0, &b, &n, &st), 0);
    free(b);
    dsv32_rpc_client_free(c);
    dsv32_rpc_server_free(s);
}

struct late_server {
    int port;
    struct dsv32_rpc_server *srv;
};

static void *start_late(void *arg)
{
    struct late_server *ls = arg;
    usleep(300000);
    char listen[64];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", ls->port);
    struct dsv32_rpc_server_config cfg = {.listen = listen};
    ls->srv = start_server(&cfg, NULL, NULL);
    return NULL;
}

static void test_wait_for_ready(void **state)
{
    int port = free_port();
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    struct dsv32_rpc_client *c = new_client(target, 0, NULL);
    struct dsv32_rpc_status st;
    uint8_t *b;
    size_t n;
    /* fail fast: nobody listens */
    int64_t t0 = now_ms();
    assert_int_equal(dsv32_rpc_unary(c, "/t.T/Echo", "x", 1, 3000, 0, &b, &n, &st), DSV32_EGRPC);
    assert_int_equal(st.code, DSV32_RPC_UNAVAILABLE);
    assert_true(now_ms() - t0 < 2500);
    /* wait-for-ready: waits up to the deadline */
    assert_int_equal(
        dsv32_rpc_unary(c, "/t.T/Echo", "x", 1, 300, DSV32_RPC_WAIT_FOR_READY, &b, &n, &st),
        DSV32_ETIMEOUT);
    assert_int_equal(st.code, DSV32_RPC_DEADLINE_EXCEEDED);
    /* ... and succeeds when the server comes up meanwhile */
    struct late_server ls = {.port = port};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, start_late, &ls), 0);
    assert_int_equal(
        dsv32_rpc_unary(c, "/t.T/Echo", "y", 1, 10000, DSV32_RPC_WAIT_FOR_READY, &b, &n, &st), 0);
    assert_memory_equal(b, "y", 1);
    free(b);
    pthread_join(t, NULL);
    dsv32_rpc_client_free(c);
    dsv32_rpc_server_free(ls.srv);
}

static int health_check(struct dsv32_rpc_client *c, const char *service, int *ret_status)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    ProtobufCMessage *m;
    struct dsv32_rpc_status st;
    int r = dsv32_rpc_unary_msg(c, "/grpc.health.v1.Health/Check", &req.base,
                                &grpc__health__v1__health_check_response__descriptor, 5000, 0, &m,
                                &st);
    if (r < 0)
        return -st.code;
    *ret_status = ((Grpc__Health__V1__HealthCheckResponse *)m)->status;
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

static int health_read(struct dsv32_rpc_stream *s)
{
    ProtobufCMessage *m;
    int r = dsv32_rpc_stream_read_msg(s, &grpc__health__v1__health_check_response__descriptor,
                                      5000, &m);
    assert_int_equal(r, 1);
    int st = ((Grpc__Health__V1__HealthCheckResponse *)m)->status;
    protobuf_c_message_free_unpacked(m, NULL);
    return st;
}

static void test_health(void **state)
{
    struct fixture *f = *state;
    int st;
    assert_int_equal(health_check(f->cli, "", &st), 0);
    assert_int_equal(st, DSV32_RPC_HEALTH_NOT_SERVING);
    assert_int_equal(health_check(f->cli, "dsv32.v1.Generate", &st), -DSV32_RPC_NOT_FOUND);

    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = "dsv32.v1.Generate";
    struct dsv32_rpc_stream *w;
    assert_int_equal(dsv32_rpc_stream_open_msg(f->cli, "/grpc.health.v1.Health/Watch", &req.base,
                                               -1, 0, &w),
                     0);
    assert_int_equal(health_read(w), DSV32_RPC_HEALTH_SERVICE_UNKNOWN);
    assert_int_equal(dsv32_rpc_health_set(f->health, "dsv32.v1.Generate",
                                          DSV32_RPC_HEALTH_SERVING),
                     0);
    assert_int_equal(health_read(w), DSV32_RPC_HEALTH_SERVING);
    assert_int_equal(health_check(f->cli, "dsv32.v1.Generate", &st), 0);
    assert_int_equal(st, DSV32_RPC_HEALTH_SERVING);
    /* a status set twice is announced once */
    assert_int_equal(dsv32_rpc_health_set(f->health, "dsv32.v1.Generate",
                                          DSV32_RPC_HEALTH_SERVING),
                     0);
    assert_int_equal(dsv32_rpc_health_set(f->health, "dsv32.v1.Generate",
                                          DSV32_RPC_HEALTH_NOT_SERVING),
                     0);
    assert_int_equal(health_read(w), DSV32_RPC_HEALTH_NOT_SERVING);
    assert_int_equal(dsv32_rpc_health_set(f->health, "", DSV32_RPC_HEALTH_SERVING), 0);
    assert_int_equal(health_check(f->cli, "", &st), 0);
    assert_int_equal(st, DSV32_RPC_HEALTH_SERVING);
    dsv32_rpc_stream_free(w);
}

/* Freeing a server cancels the calls in progress; their handlers finish and free returns. */
static void test_shutdown_with_calls(void **state)
{
    struct dsv32_rpc_server_config cfg = {.listen = "127.0.0.1:0"};
    int port;
    struct dsv32_rpc_server *s = start_server(&cfg, NULL, &port);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    struct dsv32_rpc_client *c = new_client(target, 0, NULL);
    struct dsv32_rpc_stream *st;
    int before = atomic_load(&n_cancel_cb);
    assert_int_equal(dsv32_rpc_stream_open(c, "/t.T/HangStream", "x", 1, -1, 0, &st), 0);
    uint8_t *b;
    size_t n;
    assert_int_equal(dsv32_rpc_stream_read(st, 5000, &b, &n), 1);
    free(b);
    int64_t t0 = now_ms();
    dsv32_rpc_server_free(s);
    assert_true(now_ms() - t0 < 3000);
    assert_int_equal(atomic_load(&n_cancel_cb), before + 1);
    int r = dsv32_rpc_stream_read(st, 5000, &b, &n);
    assert_true(r < 0 && r != -EAGAIN);
    dsv32_rpc_stream_free(st);
    dsv32_rpc_client_free(c);
}

/* A standard gRPC client (Python's grpcio, another implementation than ours) against our server:
 * statuses, streams, metadata, deadlines as any gRPC user sees them. Skipped without grpcio. */
static const char py_client[] =
    "import sys, grpc\n"
    "ch = grpc.insecure_channel(sys.argv[1])\n"
    "grpc.channel_ready_future(ch).result(timeout=10)\n"
    "def code(f):\n"
    "    try:\n"
    "        f()\n"
    "    except grpc.RpcError as e:\n"
    "        return e.code()\n"
    "    return grpc.StatusCode.OK\n"
    "check = ch.unary_unary('/grpc.health.v1.Health/Check')\n"
    "assert check(b'', timeout=5) == b'\\x08\\x01'\n"
    "assert code(lambda: check(b'\\x0a\\x03abc', timeout=5)) == grpc.StatusCode.NOT_FOUND\n"
    "assert code(lambda: ch.unary_unary('/no.Such/Method')(b'', timeout=5)) == "
    "grpc.StatusCode.UNIMPLEMENTED\n"
    "it = ch.unary_stream('/grpc.health.v1.Health/Watch')(b'', timeout=5)\n"
    "assert next(it) == b'\\x08\\x01'\n"
    "it.cancel()\n"
    "msgs = list(ch.unary_stream('/t.T/Stream')(b'100', timeout=10))\n"
    "assert len(msgs) == 100 and msgs[99] == b'msg-99', len(msgs)\n"
    "admin = ch.unary_unary('/t.T/Admin')\n"
    "assert admin(b'x', timeout=5, metadata=[('authorization', 'Bearer s3cret')]) == b'x'\n"
    "assert code(lambda: admin(b'x', timeout=5)) == grpc.StatusCode.UNAUTHENTICATED\n"
    "assert code(lambda: ch.unary_unary('/t.T/Hang')(b'x', timeout=0.2)) == "
    "grpc.StatusCode.DEADLINE_EXCEEDED\n"
    "e = code(lambda: ch.unary_unary('/t.T/Fail')(b'x', timeout=5))\n"
    "assert e == grpc.StatusCode.INVALID_ARGUMENT, e\n"
    "print('python grpcio client: OK')\n";

/* Debian's python3 (the one with python3-grpcio), else whatever python3 is on PATH. */
static const char *python(void)
{
    return access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/python3" : "python3";
}

static void test_python_client(void **state)
{
    struct fixture *f = *state;
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "%s -c 'import grpc' >/dev/null 2>&1", python());
    if (system(cmd) != 0)
        skip();
    assert_int_equal(dsv32_rpc_health_set(f->health, "", DSV32_RPC_HEALTH_SERVING), 0);
    char path[] = "/tmp/dsv32-rpc-py-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, py_client, sizeof(py_client) - 1), (ssize_t)sizeof(py_client) - 1);
    close(fd);
    snprintf(cmd, sizeof(cmd), "%s %s %s", python(), path, f->target);
    int rc = system(cmd);
    unlink(path);
    assert_int_equal(rc, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_codes),
        cmocka_unit_test_setup_teardown(test_unary, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unimplemented, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_message_size, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_queue_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_call_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_admin, setup, teardown),
        cmocka_unit_test(test_wait_for_ready),
        cmocka_unit_test_setup_teardown(test_health, setup, teardown),
        cmocka_unit_test(test_shutdown_with_calls),
        cmocka_unit_test_setup_teardown(test_python_client, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
