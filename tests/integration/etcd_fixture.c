/* The test etcd of etcd_fixture.h: fork + exec with loopback-only URLs, readiness through etcd's
 * HTTP /health on the client port, cleanup on every exit path. */
#define _GNU_SOURCE 1
#include "etcd_fixture.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_LIVE 8
#define READY_TIMEOUT_MS 15000

static struct etcd_fixture *live[MAX_LIVE];
static bool atexit_done;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void stop_all(void)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i])
            etcd_fixture_stop(live[i]);
}

static void track(struct etcd_fixture *f, bool on)
{
    if (!atexit_done) {
        atexit(stop_all);
        atexit_done = true;
    }
    for (int i = 0; i < MAX_LIVE; i++) {
        if (on && !live[i]) {
            live[i] = f;
            return;
        }
        if (!on && live[i] == f) {
            live[i] = NULL;
            return;
        }
    }
}

const char *etcd_fixture_binary(void)
{
    const char *p = getenv("DSV32_ETCD");
    if (!p || !p[0])
        p = "/usr/bin/etcd";
    return access(p, X_OK) == 0 ? p : NULL;
}

/* Two distinct free loopback ports (held together so they differ). */
static int free_ports(int *a, int *b)
{
    int fd[2] = {-1, -1}, port[2] = {0, 0}, r = 0;
    for (int i = 0; i < 2 && r == 0; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(sa);
        fd[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd[i] < 0 || bind(fd[i], (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
            getsockname(fd[i], (struct sockaddr *)&sa, &len) < 0)
            r = -errno;
        else
            port[i] = ntohs(sa.sin_port);
    }
    for (int i = 0; i < 2; i++)
        if (fd[i] >= 0)
            close(fd[i]);
    if (r == 0) {
        *a = port[0];
        *b = port[1];
    }
    return r;
}

/* GET /health answered {"health":"true"}. */
static bool healthy(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    struct timeval tv = {.tv_sec = 1};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bool ok = false;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
        const char req[] = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        if (write(fd, req, sizeof(req) - 1) == (ssize_t)(sizeof(req) - 1)) {
            char buf[1024];
            size_t n = 0;
            ssize_t k;
            while (n < sizeof(buf) - 1 && (k = read(fd, buf + n, sizeof(buf) - 1 - n)) > 0)
                n += (size_t)k;
            buf[n] = 0;
            ok = strstr(buf, "\"health\":\"true\"") != NULL;
        }
    }
    close(fd);
    return ok;
}

static void print_log(const struct etcd_fixture *f)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/etcd.log", f->dir);
    FILE *fp = fopen(path, "r");
    if (!fp)
        return;
    char line[512];
    fprintf(stderr, "etcd_fixture: --- %s ---\n", path);
    while (fgets(line, sizeof(line), fp))
        fputs(line, stderr);
    fclose(fp);
}

static int spawn(struct etcd_fixture *f)
{
    const char *bin = etcd_fixture_binary();
    if (!bin)
        return -ENOENT;
    char data[PATH_MAX + 8], logp[PATH_MAX + 16], curl[64], purl[64], cluster[96];
    snprintf(data, sizeof(data), "%s/data", f->dir);
    snprintf(logp, sizeof(logp), "%s/etcd.log", f->dir);
    snprintf(curl, sizeof(curl), "http://127.0.0.1:%d", f->client_port);
    snprintf(purl, sizeof(purl), "http://127.0.0.1:%d", f->peer_port);
    snprintf(cluster, sizeof(cluster), "default=%s", purl);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(logp, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        /* Short raft timers: a one-member cluster elects itself at once, leases may be 1 s. */
        execl(bin, bin, "--name", "default", "--data-dir", data, "--listen-client-urls", curl,
              "--advertise-client-urls", curl, "--listen-peer-urls", purl,
              "--initial-advertise-peer-urls", purl, "--initial-cluster", cluster,
              "--heartbeat-interval", "50", "--election-timeout", "500", "--logger", "zap",
              "--log-level", "warn", (char *)NULL);
        _exit(127);
    }
    f->pid = pid;
    track(f, true);
    int64_t end = now_ms() + READY_TIMEOUT_MS;
    while (now_ms() < end) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            f->pid = 0;
            track(f, false);
            return -ECHILD; /* died: a port taken, say */
        }
        if (healthy(f->client_port))
            return 0;
        usleep(20000);
    }
    etcd_fixture_kill(f);
    return -ETIMEDOUT;
}

/* A shell that removes the directory once the pipe closes: when the fixture stops (it is gone
 * already then) or when the test dies, however it dies. */
static int start_janitor(struct etcd_fixture *f)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int r = -errno;
        close(p[0]);
        close(p[1]);
        return r;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        dup2(p[0], 0);
        if (null >= 0) {
            dup2(null, 1);
            dup2(null, 2);
        }
        execl("/bin/sh", "sh", "-c", "cat >/dev/null; rm -rf -- \"$0\"", f->dir, (char *)NULL);
        _exit(127);
    }
    close(p[0]);
    f->janitor_fd = p[1];
    f->janitor_pid = pid;
    return 0;
}

int etcd_fixture_start(struct etcd_fixture *f)
{
    memset(f, 0, sizeof(*f));
    f->janitor_fd = -1;
    if (!etcd_fixture_binary())
        return -ENOENT;
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/dsv32-etcd-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(f->dir)) {
        f->dir[0] = 0;
        return -errno;
    }
    int jr = start_janitor(f);
    if (jr < 0) {
        etcd_fixture_stop(f);
        return jr;
    }
    int r = -EINVAL;
    for (int attempt = 0; attempt < 3; attempt++) {
        r = free_ports(&f->client_port, &f->peer_port);
        if (r < 0)
            break;
        snprintf(f->endpoint, sizeof(f->endpoint), "127.0.0.1:%d", f->client_port);
        r = spawn(f);
        if (r == 0)
            return 0;
        print_log(f);
    }
    etcd_fixture_stop(f);
    return r;
}

int etcd_fixture_kill(struct etcd_fixture *f)
{
    if (f->pid <= 0)
        return 0;
    kill(f->pid, SIGKILL);
    int st;
    while (waitpid(f->pid, &st, 0) < 0 && errno == EINTR) {
    }
    f->pid = 0;
    track(f, false);
    return 0;
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    remove(path);
    return 0;
}

int etcd_fixture_restart_empty(struct etcd_fixture *f)
{
    etcd_fixture_kill(f);
    char data[PATH_MAX + 8];
    snprintf(data, sizeof(data), "%s/data", f->dir);
    nftw(data, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return etcd_fixture_restart(f);
}

int etcd_fixture_restart(struct etcd_fixture *f)
{
    etcd_fixture_kill(f);
    int r = -EINVAL;
    /* The old listening sockets may linger a moment: retry a few times on the same ports. */
    for (int attempt = 0; attempt < 20; attempt++) {
        r = spawn(f);
        if (r != -ECHILD)
            break;
        usleep(100000);
    }
    if (r < 0)
        print_log(f);
    return r;
}


void etcd_fixture_stop(struct etcd_fixture *f)
{
    etcd_fixture_kill(f);
    if (f->dir[0]) {
        nftw(f->dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
        f->dir[0] = 0;
    }
    if (f->janitor_pid > 0) {
        close(f->janitor_fd);
        int st;
        while (waitpid(f->janitor_pid, &st, 0) < 0 && errno == EINTR) {
        }
        f->janitor_pid = 0;
        f->janitor_fd = -1;
    }
}
