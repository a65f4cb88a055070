/* Unit tests of the systemd notify protocol (daemon/notify.h) through a fake NOTIFY_SOCKET: a
 * datagram socket the test binds (path and abstract), READY/STATUS/STOPPING, the watchdog thread
 * at half of WATCHDOG_USEC, its health gate, WATCHDOG_PID, and silence without a socket. */
#define _GNU_SOURCE 1
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "notify.h"

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct sock {
    int fd;
    char path[108];
};

/* Binds a datagram socket ("@name": abstract) and points NOTIFY_SOCKET at it. */
static void sock_open(struct sock *s, bool abstract)
{
    s->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(s->fd >= 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    socklen_t len;
    if (abstract) {
        snprintf(s->path, sizeof(s->path), "@dsv32-notify-test-%d", (int)getpid());
        memcpy(a.sun_path + 1, s->path + 1, strlen(s->path) - 1);
        len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(s->path));
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(s->path, sizeof(s->path), "%s/dsv32-notify-%d.sock", tmp && tmp[0] ? tmp : "/tmp",
                 (int)getpid());
        unlink(s->path);
        strcpy(a.sun_path, s->path);
        len = sizeof(a);
    }
    assert_int_equal(bind(s->fd, (struct sockaddr *)&a, len), 0);
    struct timeval tv = {.tv_usec = 300000};
    setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setenv("NOTIFY_SOCKET", s->path, 1);
}

static void sock_close(struct sock *s)
{
    close(s->fd);
    if (s->path[0] != '@')
        unlink(s->path);
    unsetenv("NOTIFY_SOCKET");
}

/* Next datagram as a string; "" after the receive timeout. */
static const char *recv_msg(struct sock *s)
{
    static char buf[1024];
    ssize_t n = recv(s->fd, buf, sizeof(buf) - 1, 0);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

static void test_no_socket(void **state)
{
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    assert_int_equal(dsv32_notify_ready(), 0);
    assert_int_equal(dsv32_notify_status("loading %d%%", 10), 0);
    assert_int_equal(dsv32_notify_stopping(), 0);
    uint64_t usec;
    assert_int_equal(dsv32_notify_watchdog_enabled(&usec), 0);
    struct dsv32_notify_watchdog *w = (void *)1;
    assert_int_equal(dsv32_notify_watchdog_start(NULL, NULL, &w), 0);
    assert_null(w);
    dsv32_notify_watchdog_stop(NULL);
}

static void test_messages(void **state)
{
    for (int abstract = 0; abstract < 2; abstract++) {
        struct sock s;
        sock_open(&s, abstract);
        assert_true(dsv32_notify_ready() > 0);
        assert_string_equal(recv_msg(&s), "READY=1");
        assert_true(dsv32_notify_status("loading weights %d/%d", 3, 163) > 0);
        assert_string_equal(recv_msg(&s), "STATUS=loading weights 3/163");
        /* one line: a newline would be read as another assignment */
        assert_true(dsv32_notify_status("a\nREADY=1") > 0);
        assert_string_equal(recv_msg(&s), "STATUS=a READY=1");
        assert_true(dsv32_notify_stopping() > 0);
        assert_string_equal(recv_msg(&s), "STOPPING=1");
        assert_true(dsv32_notify("RELOADING=1\nSTATUS=x") > 0);
        assert_string_equal(recv_msg(&s), "RELOADING=1\nSTATUS=x");
        sock_close(&s);
    }
}

static atomic_int healthy_flag;

static bool healthy(void *arg) { return atomic_load(&healthy_flag) != 0; }

static int count_pings(struct sock *s, int64_t ms)
{
    int n = 0;
    int64_t end = now_ms() + ms;
    while (now_ms() < end) {
        const char *m = recv_msg(s);
        if (strcmp(m, "WATCHDOG=1") == 0)
            n++;
        else
            assert_string_equal(m, "");
    }
    return n;
}

static void test_watchdog(void **state)
{
    struct sock s;
    sock_open(&s, false);
    char pid[32];
    snprintf(pid, sizeof(pid), "%d", (int)getpid());
    setenv("WATCHDOG_USEC", "100000", 1);
    setenv("WATCHDOG_PID", pid, 1);
    uint64_t usec = 0;
    assert_int_equal(dsv32_notify_watchdog_enabled(&usec), 1);
    assert_int_equal(usec, 100000);

    atomic_store(&healthy_flag, 1);
    struct dsv32_notify_watchdog *w;
    assert_int_equal(dsv32_notify_watchdog_start(healthy, NULL, &w), 0);
    assert_non_null(w);
    /* every 50 ms: about 12 in 600 ms */
    int n = count_pings(&s, 600);
    assert_true(n >= 8 && n <= 14);
    /* an unhealthy daemon stops feeding the watchdog, so systemd restarts it */
    atomic_store(&healthy_flag, 0);
    usleep(60000);
    while (strcmp(recv_msg(&s), "") != 0) { /* drain what was sent before */
    }
    assert_int_equal(count_pings(&s, 300), 0);
    atomic_store(&healthy_flag, 1);
    assert_true(count_pings(&s, 300) >= 3);
    dsv32_notify_watchdog_stop(w);
    usleep(120000);
    while (strcmp(recv_msg(&s), "") != 0) {
    }
    assert_int_equal(count_pings(&s, 200), 0);

    /* the watchdog is meant for another process */
    setenv("WATCHDOG_PID", "1", 1);
    assert_int_equal(dsv32_notify_watchdog_enabled(&usec), 0);
    assert_int_equal(dsv32_notify_watchdog_start(NULL, NULL, &w), 0);
    assert_null(w);
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    sock_close(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_socket),
        cmocka_unit_test(test_messages),
        cmocka_unit_test(test_watchdog),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
