/* dsv32ctl cluster up --local / cluster down: a whole cluster on this machine, on 127.0.0.1 only.
 * up starts etcd (Debian's /usr/bin/etcd, free ports, data in the state directory), dsv32-router,
 * N dsv32-attn and M dsv32-expert (one EP group "g0" when M > 0), each detached (its own session,
 * stdin from /dev/null, its log under logs/), waits until the router serves and every node is
 * READY (and the group's current epoch holds all N + M members), then prints the router's
 * address. Without --model it makes the small random-weight model once (dsv32-mkmodel) into
 * model/. down stops everything (SIGTERM, SIGKILL after a grace period) and removes the runtime
 * state; model/ and logs/ stay.
 *
 * The state directory (--dir, default ./.dsv32-local):
 *   cluster.env   key=value lines: cluster, etcd, router, model, attn, experts, group
 *   admin-token   the router's Admin bearer token (0600), used by later dsv32ctl --dir calls
 *   pids/<name>   "pid starttime" of each process (starttime: /proc/<pid>/stat field 22, so a
 *                 recycled pid is never signalled)
 *   run/          port files; etcd/ etcd's data; logs/<name>.log; model/ the default model
 *   .lock         flock-ed while up or down works on the directory */
#define _GNU_SOURCE 1
#include "ctl.h"

#include "error.h"
#include "group.h"
#include "ops.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 16
#define UP_TIMEOUT_S 300
#define STOP_GRACE_MS 15000

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* snprintf for paths and names: -ENAMETOOLONG (and a truncated string) when it does not fit. */
static int pathf(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int pathf(char *out, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : n;
}

/* ---- finding the programs ---- */

/* dsv32ctl's own directory. */
static void self_dir(char *buf, size_t cap)
{
    ssize_t n = readlink("/proc/self/exe", buf, cap - 1);
    if (n <= 0) {
        pathf(buf, cap, ".");
        return;
    }
    buf[n] = 0;
    char *slash = strrchr(buf, '/');
    if (slash)
        *slash = 0;
}

/* A program next to dsv32ctl (installed together), in its build-tree directory (build/ctl ->
 * build/<subdir>), or on PATH. 0 with the path, or -ENOENT. */
static int find_program(const char *name, const char *subdir, char *out, size_t cap)
{
    char dir[PATH_MAX];
    self_dir(dir, sizeof(dir));
    pathf(out, cap, "%s/%s", dir, name);
    if (access(out, X_OK) == 0)
        return 0;
    if (subdir) {
        pathf(out, cap, "%s/../%s/%s", dir, subdir, name);
        char real[PATH_MAX];
        if (access(out, X_OK) == 0 && realpath(out, real)) {
            pathf(out, cap, "%s", real);
            return 0;
        }
    }
    const char *path = getenv("PATH");
    if (!path)
        path = "/usr/local/bin:/usr/bin:/bin";
    char *copy = strdup(path), *save = NULL;
    for (char *p = copy ? strtok_r(copy, ":", &save) : NULL; p; p = strtok_r(NULL, ":", &save)) {
        pathf(out, cap, "%s/%s", p[0] ? p : ".", name);
        if (access(out, X_OK) == 0) {
            free(copy);
            return 0;
        }
    }
    free(copy);
    return -ENOENT;
}

static int find_etcd(char *out, size_t cap)
{
    const char *env = getenv("DSV32_ETCD");
    if (env && env[0] && access(env, X_OK) == 0) {
        pathf(out, cap, "%s", env);
        return 0;
    }
    pathf(out, cap, "/usr/bin/etcd");
    if (access(out, X_OK) == 0)
        return 0;
    return find_program("etcd", NULL, out, cap);
}

/* ---- processes ---- */

/* /proc/<pid>/stat: the process's start time (field 22) and state; 0 or -ESRCH. */
static int proc_stat(pid_t pid, unsigned long long *ret_start, char *ret_state)
{
    char path[64], buf[1024];
    pathf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -ESRCH;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p || p[1] != ' ')
        return -ESRCH;
    p += 2;
    char state = *p;
    /* fields 3.. follow: state is 3, starttime is 22 */
    for (int field = 3; field < 22 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    if (!p)
        return -ESRCH;
    *ret_start = strtoull(p, NULL, 10);
    *ret_state = state;
    return 0;
}

/* The process recorded as pid/start lives (a zombie does not). */
static bool proc_alive(pid_t pid, unsigned long long start)
{
    unsigned long long s;
    char st;
    int wst;
    waitpid(pid, &wst, WNOHANG); /* ours (up's children): reap it if it died */
    return pid > 0 && proc_stat(pid, &s, &st) == 0 && s == start && st != 'Z' && st != 'X';
}

struct proc_rec {
    char name[64];
    pid_t pid;
    unsigned long long start;
};

static int read_pids(const char *dir, struct proc_rec *out, int cap)
{
    char path[PATH_MAX + 16];
    pathf(path, sizeof(path), "%s/pids", dir);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < cap) {
        if (de->d_name[0] == '.' || strlen(de->d_name) >= sizeof(out[n].name))
            continue;
        char file[PATH_MAX + 96];
        pathf(file, sizeof(file), "%s/%s", path, de->d_name);
        FILE *f = fopen(file, "r");
        if (!f)
            continue;
        int pid;
        unsigned long long start;
        if (fscanf(f, "%d %llu", &pid, &start) == 2 && pid > 0) {
            pathf(out[n].name, sizeof(out[n].name), "%s", de->d_name);
            out[n].pid = pid;
            out[n].start = start;
            n++;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}

/* Starts argv[0] detached: a session of its own, stdin /dev/null, stdout and stderr to
 * logs/<name>.log; records "pid starttime" in pids/<name> (or in <dir>/<pidfile>). 0 with the pid,
 * or <0. */
static int spawn_as(const char *dir, const char *name, const char *pidfile, char *const argv[],
                    struct proc_rec *ret)
{
    char logp[PATH_MAX + 96], pidp[PATH_MAX + 96];
    pathf(logp, sizeof(logp), "%s/logs/%s.log", dir, name);
    if (pidfile)
        pathf(pidp, sizeof(pidp), "%s/%s", dir, pidfile);
    else
        pathf(pidp, sizeof(pidp), "%s/pids/%s", dir, name);
    int logfd = open(logp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (logfd < 0)
        return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int r = -errno;
        close(logfd);
        return r;
    }
    if (pid == 0) {
        setsid(); /* Ctrl-C at the terminal or the end of this session does not reach it */
        int in = open("/dev/null", O_RDONLY);
        if (in < 0 || dup2(in, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0)
            _exit(127);
        close_range(3, ~0u, 0);
        signal(SIGPIPE, SIG_DFL);
        execv(argv[0], argv);
        dprintf(2, "dsv32ctl: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(logfd);
    unsigned long long start = 0;
    char st;
    /* the child's start time is known as soon as it exists */
    for (int i = 0; i < 100 && proc_stat(pid, &start, &st) < 0; i++)
        sleep_ms(1);
    FILE *f = fopen(pidp, "w");
    if (!f || fprintf(f, "%d %llu\n", (int)pid, start) < 0 || fclose(f) != 0) {
        kill(pid, SIGKILL);
        return -EIO;
    }
    pathf(ret->name, sizeof(ret->name), "%s", name);
    ret->pid = pid;
    ret->start = start;
    return 0;
}

static int spawn(const char *dir, const char *name, char *const argv[], struct proc_rec *ret)
{
    return spawn_as(dir, name, NULL, argv, ret);
}

static void print_log_tail(const char *dir, const char *name, int lines)
{
    char path[PATH_MAX + 96];
    pathf(path, sizeof(path), "%s/logs/%s.log", dir, name);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char (*ring)[512] = calloc((size_t)lines, sizeof(*ring));
    int n = 0;
    while (ring && fgets(ring[n % lines], sizeof(ring[0]), f))
        n++;
    fclose(f);
    fprintf(stderr, "--- last lines of %s ---\n", path);
    for (int i = n > lines ? n - lines : 0; ring && i < n; i++)
        fputs(ring[i % lines], stderr);
    free(ring);
}

/* SIGTERM to every recorded process but etcd, then etcd once they are gone (so they can
 * deregister), SIGKILL after the grace period. Returns how many were running. */
static int stop_all(const char *dir, int grace_ms)
{
    struct proc_rec recs[2 * MAX_NODES + 4];
    int n = read_pids(dir, recs, (int)(sizeof(recs) / sizeof(recs[0]))), running = 0;
    for (int pass = 0; pass < 2; pass++) {
        bool any = false;
        for (int i = 0; i < n; i++) {
            bool is_etcd = strcmp(recs[i].name, "etcd") == 0;
            if (is_etcd != (pass == 1) || !proc_alive(recs[i].pid, recs[i].start))
                continue;
            kill(recs[i].pid, SIGTERM);
            running++;
            any = true;
        }
        int64_t end = now_ms() + (pass == 0 ? grace_ms : 5000);
        while (any) {
            any = false;
            for (int i = 0; i < n; i++) {
                bool is_etcd = strcmp(recs[i].name, "etcd") == 0;
                if (is_etcd == (pass == 1) && proc_alive(recs[i].pid, recs[i].start))
                    any = true;
            }
            if (!any)
                break;
            if (now_ms() > end) {
                for (int i = 0; i < n; i++) {
                    bool is_etcd = strcmp(recs[i].name, "etcd") == 0;
                    if (is_etcd == (pass == 1) && proc_alive(recs[i].pid, recs[i].start)) {
                        fprintf(stderr, "dsv32ctl: %s (pid %d) did not stop: SIGKILL\n",
                                recs[i].name, (int)recs[i].pid);
                        kill(recs[i].pid, SIGKILL);
                    }
                }
                end = now_ms() + 5000; /* SIGKILL is not refused; the wait is for the kernel */
            }
            sleep_ms(50);
        }
    }
    return running;
}

/* Removes a directory tree (no symlinks followed). */
static void rm_tree(const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        char sub[PATH_MAX];
        if (pathf(sub, sizeof(sub), "%s/%s", path, de->d_name) < 0)
            continue;
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(sub);
        else
            unlink(sub);
    }
    closedir(d);
    rmdir(path);
}

/* The runtime state goes; model/ and logs/ stay. */
static void clean_runtime(const char *dir)
{
    static const char *const items[] = {"pids", "run", "etcd", "cluster.env", "admin-token",
                                        "watch.pid"};
    for (size_t i = 0; i < sizeof(items) / sizeof(items[0]); i++) {
        char p[PATH_MAX + 32];
        pathf(p, sizeof(p), "%s/%s", dir, items[i]);
        rm_tree(p);
    }
}

static int lock_dir(const char *dir)
{
    char p[PATH_MAX + 16];
    pathf(p, sizeof(p), "%s/.lock", dir);
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600); /* CLOEXEC: daemons never hold it */
    if (fd < 0)
        return -errno;
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        close(fd);
        return -EBUSY;
    }
    return fd;
}

/* ---- up ---- */

static int free_ports(int *ports, int n)
{
    int fds[4], r = 0;
    for (int i = 0; i < n; i++)
        fds[i] = -1;
    for (int i = 0; i < n && r == 0; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(sa);
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
            getsockname(fds[i], (struct sockaddr *)&sa, &len) < 0)
            r = -errno;
        else
            ports[i] = ntohs(sa.sin_port);
    }
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return r;
}

static int write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return -errno;
    size_t len = strlen(text);
    int r = write(fd, text, len) == (ssize_t)len ? 0 : -EIO;
    if (close(fd) < 0 && r == 0)
        r = -errno;
    return r;
}

static int make_token(const char *dir, char *token, size_t cap)
{
    uint8_t b[24];
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || read(fd, b, sizeof(b)) != (ssize_t)sizeof(b)) {
        if (fd >= 0)
            close(fd);
        return -EIO;
    }
    close(fd);
    for (size_t i = 0; i < sizeof(b) && 2 * i + 2 < cap; i++)
        pathf(token + 2 * i, 3, "%02x", b[i]);
    char path[PATH_MAX + 16], text[80];
    pathf(path, sizeof(path), "%s/admin-token", dir);
    pathf(text, sizeof(text), "%s\n", token);
    return write_file(path, text, 0600);
}

static int read_port(const char *dir, const char *name)
{
    char p[PATH_MAX + 96];
    pathf(p, sizeof(p), "%s/run/%s.port", dir, name);
    FILE *f = fopen(p, "r");
    int port = 0;
    if (f) {
        if (fscanf(f, "%d", &port) != 1)
            port = 0;
        fclose(f);
    }
    return port;
}

/* The default model: made once into <dir>/model. */
static int default_model(const char *dir, char *out, size_t cap)
{
    pathf(out, cap, "%s/model", dir);
    char cfg[PATH_MAX + 32];
    pathf(cfg, sizeof(cfg), "%s/config.json", out);
    fprintf(stderr, "dsv32ctl: no --model: using the built-in small model (random weights: "
                    "its text is meaningless)\n");
    if (access(cfg, R_OK) == 0)
        return 0;
    char mk[PATH_MAX], tmp[PATH_MAX + 16];
    if (find_program("dsv32-mkmodel", "tools", mk, sizeof(mk)) < 0) {
        fprintf(stderr, "dsv32ctl: dsv32-mkmodel not found next to dsv32ctl, in the build tree "
                        "or on PATH\n");
        return -ENOENT;
    }
    pathf(tmp, sizeof(tmp), "%s.tmp", out);
    rm_tree(tmp);
    fprintf(stderr, "dsv32ctl: making it into %s\n", out);
    char *argv[] = {mk, "--out", tmp, "--shape", "small", NULL};
    struct proc_rec p;
    int r = spawn(dir, "mkmodel", argv, &p);
    if (r < 0)
        return r;
    int st = 0;
    waitpid(p.pid, &st, 0);
    char pidp[PATH_MAX + 32];
    pathf(pidp, sizeof(pidp), "%s/pids/mkmodel", dir);
    unlink(pidp);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || rename(tmp, out) < 0) {
        fprintf(stderr, "dsv32ctl: dsv32-mkmodel failed\n");
        print_log_tail(dir, "mkmodel", 20);
        return -EIO;
    }
    return 0;
}

struct up {
    const char *dir;
    struct proc_rec procs[2 * MAX_NODES + 4];
    int n_procs;
    int n_attn, n_experts;
    char etcd_addr[64], router_addr[64], model[PATH_MAX];
};

static int start(struct up *u, const char *name, char *const argv[])
{
    int r = spawn(u->dir, name, argv, &u->procs[u->n_procs]);
    if (r < 0) {
        fprintf(stderr, "dsv32ctl: cannot start %s: %s\n", name, dsv32_strerror(r));
        return r;
    }
    u->n_procs++;
    return 0;
}

/* A started process that died: reported with its log. */
static int check_alive(struct up *u)
{
    for (int i = 0; i < u->n_procs; i++)
        if (!proc_alive(u->procs[i].pid, u->procs[i].start)) {
            fprintf(stderr, "dsv32ctl: %s exited during start-up\n", u->procs[i].name);
            print_log_tail(u->dir, u->procs[i].name, 20);
            return -ECHILD;
        }
    return 0;
}

/* Router answers the health check with SERVING. */
static bool router_serving(const char *addr)
{
    struct dsv32_rpc_client_config cc = {.target = addr};
    struct dsv32_rpc_client *c;
    if (dsv32_rpc_client_new(&cc, &c) < 0)
        return false;
    uint8_t *resp = NULL;
    size_t len = 0;
    bool ok = dsv32_rpc_unary(c, "/grpc.health.v1.Health/Check", "", 0, 2000,
                              DSV32_RPC_WAIT_FOR_READY, &resp, &len, NULL) == 0 &&
              len >= 2 && resp[0] == 0x08 && resp[1] == 1;
    free(resp);
    dsv32_rpc_client_free(c);
    return ok;
}

/* Every node READY, and the EP group's current epoch holds them all. What is missing goes to
 * `missing` for the timeout message. */
static bool cluster_ready(struct up *u, struct dsv32_etcd *e, char *missing, size_t cap)
{
    struct dsv32_ops_node *nodes;
    size_t n;
    if (dsv32_ops_list_nodes(e, CTL_LOCAL_CLUSTER, NULL, false, &nodes, &n, NULL) < 0) {
        pathf(missing, cap, "etcd does not answer");
        return false;
    }
    int want = 1 + u->n_attn + u->n_experts, ready = 0;
    for (size_t i = 0; i < n; i++)
        ready += nodes[i].info.state == DSV32_NODE_READY;
    free(nodes);
    if (ready < want) {
        pathf(missing, cap, "%d of %d nodes ready", ready, want);
        return false;
    }
    if (u->n_experts == 0)
        return true;
    uint64_t epoch;
    char *json;
    size_t len;
    if (dsv32_ops_group_current(e, CTL_LOCAL_CLUSTER, CTL_LOCAL_GROUP, &epoch, &json, &len,
                                NULL) < 0) {
        pathf(missing, cap, "EP group %s has no epoch yet", CTL_LOCAL_GROUP);
        return false;
    }
    static struct dsv32_group_epoch ep;
    bool ok = false;
    if (dsv32_group_epoch_from_json(json, len, &ep) == 0) {
        ok = ep.n_attn == u->n_attn && ep.n_shards == u->n_experts;
        pathf(missing, cap, "EP group %s epoch %llu holds %d attention daemons and %d shards",
                 CTL_LOCAL_GROUP, (unsigned long long)epoch, ep.n_attn, ep.n_shards);
        dsv32_group_epoch_done(&ep);
    }
    free(json);
    return ok;
}

static int bring_up(struct up *u, const struct ctl_opts *o)
{
    char etcd_bin[PATH_MAX], router_bin[PATH_MAX], attn_bin[PATH_MAX], expert_bin[PATH_MAX];
    if (find_etcd(etcd_bin, sizeof(etcd_bin)) < 0) {
        fprintf(stderr, "dsv32ctl: no etcd (install Debian's etcd-server: sudo ./deploy/setup.sh, "
                        "or set DSV32_ETCD)\n");
        return -ENOENT;
    }
    if (find_program("dsv32-router", "router", router_bin, sizeof(router_bin)) < 0 ||
        find_program("dsv32-attn", "attn-shard", attn_bin, sizeof(attn_bin)) < 0 ||
        (u->n_experts > 0 &&
         find_program("dsv32-expert", "expert-shard", expert_bin, sizeof(expert_bin)) < 0)) {
        fprintf(stderr, "dsv32ctl: dsv32-router, dsv32-attn%s not found next to dsv32ctl, in its "
                        "build tree or on PATH (build first: ./deploy/build.sh)\n",
                u->n_experts > 0 ? " or dsv32-expert" : "");
        return -ENOENT;
    }
    int r;
    if (o->model) {
        char cfg[PATH_MAX + 32];
        if (!realpath(o->model, u->model)) {
            fprintf(stderr, "dsv32ctl: --model %s: %s\n", o->model, strerror(errno));
            return -errno;
        }
        pathf(cfg, sizeof(cfg), "%s/config.json", u->model);
        if (access(cfg, R_OK) < 0) {
            fprintf(stderr, "dsv32ctl: --model %s has no config.json\n", o->model);
            return -ENOENT;
        }
    } else if ((r = default_model(u->dir, u->model, sizeof(u->model))) < 0) {
        return r;
    }
    char token[64];
    if ((r = make_token(u->dir, token, sizeof(token))) < 0) {
        fprintf(stderr, "dsv32ctl: cannot write %s/admin-token\n", u->dir);
        return r;
    }

    /* etcd */
    int ports[2];
    if ((r = free_ports(ports, 2)) < 0)
        return r;
    char data[PATH_MAX + 16], curl[64], purl[64], initial[96];
    pathf(data, sizeof(data), "%s/etcd", u->dir);
    pathf(curl, sizeof(curl), "http://127.0.0.1:%d", ports[0]);
    pathf(purl, sizeof(purl), "http://127.0.0.1:%d", ports[1]);
    pathf(initial, sizeof(initial), "default=%s", purl);
    pathf(u->etcd_addr, sizeof(u->etcd_addr), "127.0.0.1:%d", ports[0]);
    char *etcd_argv[] = {etcd_bin, "--name", "default", "--data-dir", data,
                         "--listen-client-urls", curl, "--advertise-client-urls", curl,
                         "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
                         "--initial-cluster", initial, "--heartbeat-interval", "50",
                         "--election-timeout", "500", "--logger", "zap", "--log-level", "warn",
                         NULL};
    fprintf(stderr, "dsv32ctl: starting etcd on %s\n", u->etcd_addr);
    if ((r = start(u, "etcd", etcd_argv)) < 0)
        return r;
    struct dsv32_etcd_config ec = {.endpoint = u->etcd_addr, .timeout_ms = 1000};
    struct dsv32_etcd *e;
    if ((r = dsv32_etcd_new(&ec, &e)) < 0)
        return r;
    int64_t deadline = now_ms() + (int64_t)(o->timeout_s > 0 ? o->timeout_s : UP_TIMEOUT_S) * 1000;
    for (;;) {
        struct dsv32_etcd_kv kv;
        r = dsv32_etcd_get(e, "/dsv32/" CTL_LOCAL_CLUSTER "/probe", &kv, NULL);
        if (r == 0)
            dsv32_etcd_kv_done(&kv);
        if (r == 0 || r == -ENOENT)
            break;
        if ((r = check_alive(u)) < 0)
            goto out;
        if (now_ms() > deadline) {
            fprintf(stderr, "dsv32ctl: etcd did not answer\n");
            print_log_tail(u->dir, "etcd", 20);
            r = -ETIMEDOUT;
            goto out;
        }
        sleep_ms(100);
    }

    /* the router, then the attention daemons and the expert shards */
    char tokfile[PATH_MAX + 16], portfile[PATH_MAX + 64];
    pathf(tokfile, sizeof(tokfile), "%s/admin-token", u->dir);
    pathf(portfile, sizeof(portfile), "%s/run/router.port", u->dir);
    char *router_argv[24] = {router_bin, "--model", u->model, "--etcd", u->etcd_addr,
                             "--cluster", CTL_LOCAL_CLUSTER, "--listen", "127.0.0.1:0",
                             "--admin-token-file", tokfile, "--port-file", portfile};
    int ra = 13;
    if (u->n_experts > 0) {
        router_argv[ra++] = "--ep-group";
        router_argv[ra++] = CTL_LOCAL_GROUP;
    }
    router_argv[ra] = NULL;
    fprintf(stderr, "dsv32ctl: starting dsv32-router, %d dsv32-attn, %d dsv32-expert (model %s)\n",
            u->n_attn, u->n_experts, u->model);
    if ((r = start(u, "router", router_argv)) < 0)
        goto out;
    for (int i = 0; i < u->n_attn; i++) {
        char id[32], pf[PATH_MAX + 64];
        pathf(id, sizeof(id), "attn-%d", i);
        pathf(pf, sizeof(pf), "%s/run/%s.port", u->dir, id);
        char *argv[24] = {attn_bin, "--model", u->model, "--etcd", u->etcd_addr, "--cluster",
                          CTL_LOCAL_CLUSTER, "--id", id, "--listen", "127.0.0.1:0",
                          "--port-file", pf};
        int a = 13;
        if (u->n_experts > 0) {
            argv[a++] = "--ep-group";
            argv[a++] = CTL_LOCAL_GROUP;
        }
        argv[a] = NULL;
        if ((r = start(u, id, argv)) < 0)
            goto out;
    }
    for (int i = 0; i < u->n_experts; i++) {
        char id[32], pf[PATH_MAX + 64];
        pathf(id, sizeof(id), "expert-%d", i);
        pathf(pf, sizeof(pf), "%s/run/%s.port", u->dir, id);
        char *argv[] = {expert_bin, "--model", u->model, "--etcd", u->etcd_addr, "--cluster",
                        CTL_LOCAL_CLUSTER, "--group", CTL_LOCAL_GROUP, "--id", id,
                        "--port-file", pf, NULL};
        if ((r = start(u, id, argv)) < 0)
            goto out;
    }

    /* ready: the router serves, every node READY, the group's epoch complete */
    char missing[256] = "the router's port";
    for (;;) {
        if ((r = check_alive(u)) < 0)
            goto out;
        int port = u->router_addr[0] ? 0 : read_port(u->dir, "router");
        if (port > 0)
            pathf(u->router_addr, sizeof(u->router_addr), "127.0.0.1:%d", port);
        if (u->router_addr[0]) {
            pathf(missing, sizeof(missing), "the router's health check");
            if (router_serving(u->router_addr) && cluster_ready(u, e, missing, sizeof(missing)))
                break;
        }
        if (now_ms() > deadline) {
            fprintf(stderr, "dsv32ctl: the cluster is not up in time: %s (logs in %s/logs)\n",
                    missing, u->dir);
            r = -ETIMEDOUT;
            goto out;
        }
        sleep_ms(200);
    }
    r = 0;
out:
    dsv32_etcd_free(e);
    return r;
}

static int write_env(const struct up *u)
{
    char path[PATH_MAX + 16], text[PATH_MAX + 512];
    pathf(path, sizeof(path), "%s/cluster.env", u->dir);
    pathf(text, sizeof(text),
             "cluster=%s\netcd=%s\nrouter=%s\nmodel=%s\nattn=%d\nexperts=%d\ngroup=%s\n",
             CTL_LOCAL_CLUSTER, u->etcd_addr, u->router_addr, u->model, u->n_attn, u->n_experts,
             u->n_experts > 0 ? CTL_LOCAL_GROUP : "");
    return write_file(path, text, 0644);
}

/* Whether processes of an earlier up still run; their count. */
static int still_running(const char *dir)
{
    struct proc_rec recs[2 * MAX_NODES + 4];
    int n = read_pids(dir, recs, (int)(sizeof(recs) / sizeof(recs[0]))), alive = 0;
    for (int i = 0; i < n; i++)
        alive += proc_alive(recs[i].pid, recs[i].start);
    return alive;
}

/* ---- the watcher: a cluster that lives as long as one process (tests) ---- */

/* The watcher of --watch-pid: `dsv32ctl cluster watch` from the same executable, detached, its
 * "pid starttime" in watch.pid (not in pids/: it is not part of the cluster). */
static int start_watcher(const char *dir, int pid, unsigned long long start)
{
    char self[PATH_MAX], pidarg[16], startarg[32];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return -errno;
    self[n] = 0;
    pathf(pidarg, sizeof(pidarg), "%d", pid);
    pathf(startarg, sizeof(startarg), "%llu", start);
    /* the start time from here: the process may be gone before the watcher looks */
    char *argv[] = {self, "cluster", "watch", "--dir", (char *)dir, "--watch-pid", pidarg,
                    "--watch-start", startarg, NULL};
    struct proc_rec p;
    return spawn_as(dir, "watch", "watch.pid", argv, &p);
}

/* Stops the watcher (cluster down): SIGTERM, up to 2 s. */
static void stop_watcher(const char *dir)
{
    char path[PATH_MAX + 16];
    pathf(path, sizeof(path), "%s/watch.pid", dir);
    FILE *f = fopen(path, "r");
    int pid = 0;
    unsigned long long start = 0;
    if (f) {
        if (fscanf(f, "%d %llu", &pid, &start) != 2)
            pid = 0;
        fclose(f);
    }
    if (pid > 0 && proc_alive(pid, start)) {
        kill(pid, SIGTERM);
        for (int i = 0; i < 100 && proc_alive(pid, start); i++)
            sleep_ms(20);
    }
    unlink(path);
}

int ctl_cmd_cluster_watch(const struct ctl_opts *o)
{
    char dir[PATH_MAX], path[PATH_MAX + 16];
    ctl_state_dir(o, dir, sizeof(dir));
    pathf(path, sizeof(path), "%s/watch.pid", dir);
    unsigned long long start = o->watch_start;
    if (o->watch_pid <= 0 || !start) {
        fprintf(stderr, "usage: dsv32ctl cluster watch --dir STATE --watch-pid PID "
                        "--watch-start STARTTIME (cluster up --watch-pid starts it)\n");
        return 2;
    }
    fprintf(stderr, "dsv32ctl: the cluster in %s goes down when pid %d ends\n", dir, o->watch_pid);
    for (;;) {
        sleep_ms(250);
        /* down stopped the cluster (and us, normally): nothing left to watch */
        FILE *f = fopen(path, "r");
        int me = 0;
        if (f) {
            if (fscanf(f, "%d", &me) != 1)
                me = 0;
            fclose(f);
        }
        if (me != (int)getpid())
            return 0;
        if (proc_alive(o->watch_pid, start))
            continue;
        fprintf(stderr, "dsv32ctl: pid %d ended: bringing the cluster down\n", o->watch_pid);
        int lock;
        while ((lock = lock_dir(dir)) == -EBUSY)
            sleep_ms(100);
        stop_all(dir, STOP_GRACE_MS);
        if (still_running(dir) == 0)
            clean_runtime(dir);
        if (lock >= 0)
            close(lock);
        return 0;
    }
}

int ctl_cmd_cluster_up(const struct ctl_opts *o)
{
    if (!o->local || o->n_args) {
        fprintf(stderr, "usage: dsv32ctl cluster up --local [--model DIR] [--attn N] "
                        "[--experts M] [--dir STATE] [--timeout S]\n"
                        "(only local clusters: every process on this machine, on 127.0.0.1)\n");
        return 2;
    }
    struct up *u = calloc(1, sizeof(*u));
    if (!u)
        return 1;
    u->n_attn = o->n_attn > 0 ? o->n_attn : 1;
    u->n_experts = o->n_experts > 0 ? o->n_experts : 0;
    if (u->n_attn > MAX_NODES || u->n_experts > MAX_NODES) {
        fprintf(stderr, "dsv32ctl: at most %d attention daemons and %d expert shards locally\n",
                MAX_NODES, MAX_NODES);
        free(u);
        return 2;
    }
    char dir[PATH_MAX];
    ctl_state_dir(o, dir, sizeof(dir));
    u->dir = dir;
    char sub[PATH_MAX + 16];
    mkdir(dir, 0700);
    pathf(sub, sizeof(sub), "%s/logs", dir);
    mkdir(sub, 0755);
    pathf(sub, sizeof(sub), "%s/run", dir);
    mkdir(sub, 0755);
    pathf(sub, sizeof(sub), "%s/pids", dir);
    mkdir(sub, 0755);
    int lock = lock_dir(dir);
    if (lock < 0) {
        fprintf(stderr, "dsv32ctl: %s: %s\n", dir,
                lock == -EBUSY ? "another dsv32ctl is bringing this cluster up or down"
                               : dsv32_strerror(lock));
        free(u);
        return 1;
    }
    int rc = 1;
    unsigned long long watch_start = 0;
    char wst;
    if (o->watch_pid > 0 && proc_stat(o->watch_pid, &watch_start, &wst) < 0) {
        fprintf(stderr, "dsv32ctl: --watch-pid %d: no such process\n", o->watch_pid);
        goto out;
    }
    if (still_running(dir) > 0) {
        char router[128] = "?";
        ctl_state_read(dir, "router", router, sizeof(router));
        fprintf(stderr, "dsv32ctl: the cluster in %s is already up (router %s); "
                        "`dsv32ctl cluster down%s%s` stops it\n",
                dir, router, o->dir ? " --dir " : "", o->dir ? o->dir : "");
        goto out;
    }
    clean_runtime(dir); /* what an earlier cluster left without a down */
    pathf(sub, sizeof(sub), "%s/run", dir);
    mkdir(sub, 0755);
    pathf(sub, sizeof(sub), "%s/pids", dir);
    mkdir(sub, 0755);
    int64_t t0 = now_ms();
    int r = bring_up(u, o);
    if (r == 0)
        r = write_env(u);
    if (r < 0) {
        fprintf(stderr, "dsv32ctl: stopping what was started\n");
        stop_all(dir, 5000);
        clean_runtime(dir);
        goto out;
    }
    if (o->watch_pid > 0 && start_watcher(dir, o->watch_pid, watch_start) < 0) {
        fprintf(stderr, "dsv32ctl: cannot watch pid %d: stopping the cluster\n", o->watch_pid);
        stop_all(dir, 5000);
        clean_runtime(dir);
        goto out;
    }
    if (o->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "cluster", CTL_LOCAL_CLUSTER);
        cJSON_AddStringToObject(j, "router", u->router_addr);
        cJSON_AddStringToObject(j, "etcd", u->etcd_addr);
        cJSON_AddStringToObject(j, "dir", dir);
        cJSON_AddStringToObject(j, "model", u->model);
        cJSON_AddNumberToObject(j, "attn", u->n_attn);
        cJSON_AddNumberToObject(j, "experts", u->n_experts);
        ctl_print_json(j);
    } else {
        fprintf(stderr, "dsv32ctl: cluster %s is up in %.1f s: %d attention daemon%s, %d expert "
                        "shard%s, etcd %s; state in %s\n",
                CTL_LOCAL_CLUSTER, (double)(now_ms() - t0) / 1000, u->n_attn,
                u->n_attn == 1 ? "" : "s", u->n_experts, u->n_experts == 1 ? "" : "s",
                u->etcd_addr, dir);
        printf("router %s\n", u->router_addr);
    }
    rc = 0;
out:
    close(lock);
    free(u);
    return rc;
}

int ctl_cmd_cluster_down(const struct ctl_opts *o)
{
    if (o->n_args) {
        fprintf(stderr, "usage: dsv32ctl cluster down [--dir STATE]\n");
        return 2;
    }
    char dir[PATH_MAX];
    ctl_state_dir(o, dir, sizeof(dir));
    struct stat st;
    if (stat(dir, &st) < 0) {
        fprintf(stderr, "dsv32ctl: no cluster state in %s: nothing to stop\n", dir);
        return 0;
    }
    int lock = lock_dir(dir);
    if (lock < 0) {
        fprintf(stderr, "dsv32ctl: %s: %s\n", dir,
                lock == -EBUSY ? "another dsv32ctl is bringing this cluster up or down"
                               : dsv32_strerror(lock));
        return 1;
    }
    stop_watcher(dir);
    int n = stop_all(dir, STOP_GRACE_MS);
    int left = still_running(dir);
    if (left == 0)
        clean_runtime(dir);
    close(lock);
    if (left > 0) {
        fprintf(stderr, "dsv32ctl: %d processes still run; state kept in %s\n", left, dir);
        return 1;
    }
    if (o->json)
    {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddNumberToObject(j, "stopped", n);
        cJSON_AddStringToObject(j, "dir", dir);
        ctl_print_json(j);
    }
    else
        printf("cluster in %s is down (%d process%s stopped)\n", dir, n, n == 1 ? "" : "es");
    return 0;
}
