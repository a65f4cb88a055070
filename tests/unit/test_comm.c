/* Tests of the tcp transport with real processes on 127.0.0.1: all-to-all-v exchanges of random
 * sizes (empty and 8 MiB blocks included) whose contents are checked, point-to-point transfers, a
 * peer that dies mid-exchange (the others fail fast with EPEER instead of hanging), a peer that
 * stops answering (ETIMEOUT), and the epoch handshake. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "error.h"

#define W 4

static struct dsv32_comm_listener *lis[W];
static char addr_buf[W][32];
static const char *addrs[W];

static uint8_t byte_at(int from, int to, int round, size_t i)
{
    return (uint8_t)(from * 31 + to * 7 + round * 13 + (int)(i * 2654435761u >> 13));
}

static size_t size_of(int from, int to, int round)
{
    unsigned h = (unsigned)(from * 977 + to * 131 + round * 71);
    switch (h % 5) {
    case 0: return 0;
    case 1: return 1;
    case 2: return 8u << 20;
    default: return (h * 2654435761u) % 100000;
    }
}

/* child body: returns the exit status */
typedef int (*body_fn)(int rank);

static pid_t spawn(int rank, body_fn fn)
{
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < W; i++)
            if (i != rank)
                dsv32_comm_tcp_listener_free(lis[i]);
        _exit(fn(rank));
    }
    return pid;
}

static void run_group(body_fn fn, const int *want_status)
{
    pid_t pids[W];
    for (int r = 0; r < W; r++)
        pids[r] = spawn(r, fn);
    for (int r = 0; r < W; r++) {
        int st;
        assert_int_equal(waitpid(pids[r], &st, 0), pids[r]);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (code != want_status[r])
            fail_msg("rank %d exited with %d, expected %d", r, code, want_status[r]);
    }
}

static int alltoall_body(int rank)
{
    struct dsv32_comm *c;
    if (dsv32_comm_tcp_new(lis[rank], rank, W, addrs, 1, 10000, &c) < 0)
        return 10;
    for (int round = 0; round < 3; round++) {
        void *send[W] = {0}, *recv[W];
        size_t sb[W] = {0}, rb[W];
        uint8_t from[W] = {0};
        for (int p = 0; p < W; p++) {
            if (p == rank)
                continue;
            sb[p] = size_of(rank, p, round);
            send[p] = malloc(sb[p] ? sb[p] : 1);
            for (size_t i = 0; i < sb[p]; i++)
                ((uint8_t *)send[p])[i] = byte_at(rank, p, round, i);
            from[p] = 1;
        }
        /* rounds 1 and 2 ask for the blocks' heads too (host blocks: the blocks themselves) */
        void *head[W];
        struct dsv32_comm_xchg x = {.send = (const void *const *)send,
                                    .send_bytes = sb,
                                    .recv_from = from,
                                    .recv = recv,
                                    .recv_bytes = rb,
                                    .head_bytes = round == 2 ? DSV32_COMM_MAX_HEAD : 16,
                                    .recv_head = round ? head : NULL};
        if (round == 1) { /* a head past the bound is refused before anything moves */
            x.head_bytes = DSV32_COMM_MAX_HEAD + 1;
            if (dsv32_comm_exchange(c, &x, 20000) != -EINVAL || c->failed)
                return 16;
            x.head_bytes = 16;
        }
        int r = dsv32_comm_exchange(c, &x, 20000);
        if (r < 0)
            return 11;
        for (int p = 0; p < W; p++) {
            if (p == rank)
                continue;
            if (rb[p] != size_of(p, rank, round))
                return 12;
            if (round && head[p] != recv[p])
                return 17;
            for (size_t i = 0; i < rb[p]; i++)
                if (((uint8_t *)recv[p])[i] != byte_at(p, rank, round, i))
                    return 13;
            free(send[p]);
        }
    }
    /* point to point: a ring */
    uint32_t out = 1000u + (uint32_t)rank, in = 0;
    int next = (rank + 1) % W, prev = (rank + W - 1) % W;
    if (rank % 2 == 0) {
        if (c->ops->send(c, next, &out, 4, 5000) < 0 || c->ops->recv(c, prev, &in, 4, 5000) < 0)
            return 14;
    } else {
        if (c->ops->recv(c, prev, &in, 4, 5000) < 0 || c->ops->send(c, next, &out, 4, 5000) < 0)
            return 14;
    }
    if (in != 1000u + (uint32_t)prev)
        return 15;
    dsv32_comm_free(c);
    return 0;
}

static void test_alltoall(void **state)
{
    const int ok[W] = {0, 0, 0, 0};
    run_group(alltoall_body, ok);
}

/* rank 3 joins, then dies (SIGKILL) before the exchange: the others must fail with EPEER fast */
static int death_body(int rank)
{
    struct dsv32_comm *c;
    if (dsv32_comm_tcp_new(lis[rank], rank, W, addrs, 2, 10000, &c) < 0)
        return 10;
    if (rank == 3)
        raise(SIGKILL);
    void *send[W] = {0}, *recv[W];
    size_t sb[W] = {0}, rb[W];
    uint8_t from[W] = {0};
    char payload[16] = "x";
    for (int p = 0; p < W; p++)
        if (p != rank) {
            send[p] = payload;
            sb[p] = sizeof(payload);
            from[p] = 1;
        }
    struct dsv32_comm_xchg x = {.send = (const void *const *)send, .send_bytes = sb,
                                .recv_from = from, .recv = recv, .recv_bytes = rb};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int r = dsv32_comm_exchange(c, &x, 30000);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    if (r != DSV32_EPEER)
        return 20;
    if (s > 5.0)
        return 21; /* noticed by EOF/RST, not by the 30 s deadline */
    if (dsv32_comm_exchange(c, &x, 1000) != DSV32_EPEER)
        return 22; /* dead stays dead */
    dsv32_comm_free(c);
    return 0;
}

static void test_peer_death(void **state)
{
    const int want[W] = {0, 0, 0, 128 + SIGKILL};
    run_group(death_body, want);
}

/* rank 2 stays connected but never takes part: the others time out */
static int silent_body(int rank)
{
    struct dsv32_comm *c;
    if (dsv32_comm_tcp_new(lis[rank], rank, W, addrs, 3, 10000, &c) < 0)
        return 10;
    if (rank == 2) {
        sleep(3);
        return 0;
    }
    void *send[W] = {0}, *recv[W];
    size_t sb[W] = {0}, rb[W];
    uint8_t from[W] = {0};
    char payload[4] = "abc";
    for (int p = 0; p < W; p++)
        if (p != rank) {
            send[p] = payload;
            sb[p] = 4;
            from[p] = 1;
        }
    struct dsv32_comm_xchg x = {.send = (const void *const *)send, .send_bytes = sb,
                                .recv_from = from, .recv = recv, .recv_bytes = rb};
    return dsv32_comm_exchange(c, &x, 500) == DSV32_ETIMEOUT ? 0 : 30;
}

static void test_silent_peer(void **state)
{
    const int ok[W] = {0, 0, 0, 0};
    run_group(silent_body, ok);
}

/* rank 1 is already at epoch 5 while the others build epoch 4: nobody forms a group with it */
static int epoch_body(int rank)
{
    struct dsv32_comm *c;
    int r = dsv32_comm_tcp_new(lis[rank], rank, W, addrs, rank == 1 ? 5 : 4, 1500, &c);
    if (r == 0)
        return 40;
    return r == DSV32_ETIMEOUT || r == DSV32_EEPOCH ? 0 : 41;
}

static void test_epoch_mismatch(void **state)
{
    const int ok[W] = {0, 0, 0, 0};
    run_group(epoch_body, ok);
}

static int setup(void **state)
{
    for (int r = 0; r < W; r++) {
        int port;
        if (dsv32_comm_tcp_listen("127.0.0.1", 0, &lis[r], &port) < 0)
            return -1;
        snprintf(addr_buf[r], sizeof(addr_buf[r]), "127.0.0.1:%d", port);
        addrs[r] = addr_buf[r];
    }
    return 0;
}

static int teardown(void **state)
{
    for (int r = 0; r < W; r++)
        dsv32_comm_tcp_listener_free(lis[r]);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_alltoall, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peer_death, setup, teardown),
        cmocka_unit_test_setup_teardown(test_silent_peer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_epoch_mismatch, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
