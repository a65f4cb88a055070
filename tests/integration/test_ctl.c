/* dsv32ctl against a real local cluster, every process real and on 127.0.0.1: `cluster up --local`
 * (etcd, router, 2 attention daemons, 2 expert shards, the built-in model) refuses a second up;
 * status, nodes, cordon/uncordon, placement (router and etcd agree), generate, chat, drain (an
 * attention daemon finishes the request it runs and takes no new one; an expert shard leaves its
 * group's next epoch; the last shard is refused), Admin without the token is refused; `cluster
 * down` leaves no process and no runtime state, and a new up reuses the model; a cluster tied to
 * a process (--watch-pid) goes down by itself when that process ends. */
#define _GNU_SOURCE 1
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "dsv32.pb-c.h"
#include "rpc.h"

static char dir[64], state[128];
static char out[1 << 20], err[1 << 16];
static char router[64];

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = 0;
    if (f)
        fclose(f);
}

/* Runs dsv32ctl in the test's directory (where no ./.dsv32-local is), with `--dir STATE` when
 * with_dir; stdout in out, stderr in err; the exit status. */
static int vrun(int with_dir, const char *fmt, va_list ap)
{
    char args[2048], cmd[4096], o[192], e[192], d[160] = "";
    vsnprintf(args, sizeof(args), fmt, ap);
    snprintf(o, sizeof(o), "%s/out", dir);
    snprintf(e, sizeof(e), "%s/err", dir);
    if (with_dir)
        snprintf(d, sizeof(d), "--dir %s", state);
    snprintf(cmd, sizeof(cmd), "cd %s && %s %s %s >%s 2>%s", dir, DSV32CTL, d, args, o, e);
    int st = system(cmd);
    slurp(o, out, sizeof(out));
    slurp(e, err, sizeof(err));
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int ctl(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int ctl_nodir(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int ctl(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vrun(1, fmt, ap);
    va_end(ap);
    return r;
}

static int ctl_nodir(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vrun(0, fmt, ap);
    va_end(ap);
    return r;
}

static cJSON *json_out(void)
{
    cJSON *j = cJSON_Parse(out);
    if (!j)
        print_error("not JSON: %s\n%s\n", out, err);
    assert_non_null(j);
    return j;
}

struct rec {
    char name[64];
    int pid;
    unsigned long long start;
};

/* The processes `cluster up` recorded, alive or not. */
static int recorded(struct rec *r, int cap)
{
    char p[256];
    snprintf(p, sizeof(p), "%s/pids", state);
    DIR *d = opendir(p);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)) && n < cap) {
        char f[512];
        snprintf(f, sizeof(f), "%s/%s", p, de->d_name);
        FILE *fp = de->d_name[0] != '.' ? fopen(f, "r") : NULL;
        if (fp && fscanf(fp, "%d %llu", &r[n].pid, &r[n].start) == 2) {
            snprintf(r[n].name, sizeof(r[n].name), "%.63s", de->d_name);
            n++;
        }
        if (fp)
            fclose(fp);
    }
    if (d)
        closedir(d);
    return n;
}

/* Alive and the same process (start time, field 22 of /proc/<pid>/stat), not a zombie. */
static int alive(const struct rec *r)
{
    char p[64], buf[1024];
    snprintf(p, sizeof(p), "/proc/%d/stat", r->pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *s = strrchr(buf, ')');
    if (!s || s[2] == 'Z')
        return 0;
    s += 2;
    for (int field = 3; field < 22 && s; field++)
        s = strchr(s, ' ') ? strchr(s, ' ') + 1 : NULL;
    return s && strtoull(s, NULL, 10) == r->start;
}

/* Whatever a failed test left running: SIGKILL (the test never leaves a process behind). */
static void kill_leftovers(void)
{
    struct rec r[64];
    int n = recorded(r, 64);
    for (int i = 0; i < n; i++)
        if (alive(&r[i]))
            kill(r[i].pid, SIGKILL);
}

static int setup(void **st)
{
    unsetenv("DSV32_ADMIN_TOKEN");
    snprintf(dir, sizeof(dir), "/tmp/dsv32-ctl-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(state, sizeof(state), "%s/state", dir);
    atexit(kill_leftovers);
    return 0;
}

static int teardown(void **st)
{
    ctl("cluster down");
    kill_leftovers();
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static cJSON *node(cJSON *nodes, const char *id)
{
    cJSON *n;
    cJSON_ArrayForEach(n, nodes)
    {
        if (!strcmp(cJSON_GetObjectItem(n, "id")->valuestring, id))
            return n;
    }
    fail_msg("no node %s", id);
    return NULL;
}

static const char *str(cJSON *o, const char *k) { return cJSON_GetObjectItem(o, k)->valuestring; }
static double num(cJSON *o, const char *k) { return cJSON_GetObjectItem(o, k)->valuedouble; }

static const char *const ids[] = {"router-0", "attn-0", "attn-1", "expert-0", "expert-1"};

static void up(void)
{
    /* --watch-pid: if this test dies without its teardown (a timeout's SIGKILL), the cluster
     * goes down by itself */
    int rc = ctl("cluster up --local --attn 2 --experts 2 --timeout 120 --watch-pid %d",
                 (int)getpid());
    if (rc != 0)
        print_error("cluster up: %s\n%s\n", out, err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "meaningless")); /* the built-in model says what it is */
    assert_int_equal(sscanf(out, "router %63s", router), 1);
    assert_int_equal(strncmp(router, "127.0.0.1:", 10), 0);
}

/* ---- one long test: the cluster is shared by the steps, brought up once ---- */

struct stream_ctx {
    int rc, n_tokens;
    Dsv32__V1__FinishReason why;
    atomic_int done;
};

/* A 400-token stream (about 10 s here) through the router (its own client, on a thread). */
static void *long_stream(void *arg)
{
    struct stream_ctx *s = arg;
    struct dsv32_rpc_client_config cc = {.target = router};
    struct dsv32_rpc_client *c;
    s->rc = dsv32_rpc_client_new(&cc, &c);
    if (s->rc < 0)
        return NULL;
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = "a request that runs while its daemon drains";
    sp.max_tokens = 400;
    sp.ignore_eos = 1;
    req.sampling = &sp;
    struct dsv32_rpc_stream *st;
    s->rc = dsv32_rpc_stream_open_msg(c, "/dsv32.v1.Generate/Generate", &req.base, 120000,
                                      DSV32_RPC_WAIT_FOR_READY, &st);
    while (s->rc == 0) {
        ProtobufCMessage *m;
        int r = dsv32_rpc_stream_read_msg(st, &dsv32__v1__generate_response__descriptor, 120000, &m);
        if (r <= 0) {
            s->rc = r;
            break;
        }
        Dsv32__V1__GenerateResponse *g = (Dsv32__V1__GenerateResponse *)m;
        s->n_tokens += (int)g->n_token_ids;
        if (g->finish_reason)
            s->why = g->finish_reason;
        protobuf_c_message_free_unpacked(m, NULL);
    }
    if (s->rc >= 0)
        dsv32_rpc_stream_free(st);
    dsv32_rpc_client_free(c);
    atomic_store(&s->done, 1);
    return NULL;
}

static void check_status_and_nodes(void)
{
    /* status: from etcd, with leases */
    assert_int_equal(ctl("status"), 0);
    for (size_t i = 0; i < 5; i++)
        assert_non_null(strstr(out, ids[i]));
    assert_non_null(strstr(out, "serving"));
    assert_int_equal(ctl("status --json"), 0);
    cJSON *j = json_out();
    assert_string_equal(str(j, "cluster"), "local");
    assert_string_equal(str(j, "source"), "etcd");
    assert_int_equal(num(j, "ready"), 5);
    cJSON *nodes = cJSON_GetObjectItem(j, "nodes");
    assert_int_equal(cJSON_GetArraySize(nodes), 5);
    for (size_t i = 0; i < 5; i++) {
        cJSON *n = node(nodes, ids[i]);
        assert_string_equal(str(n, "state"), "ready");
        double ttl = num(n, "lease_ttl_s"), granted = num(n, "lease_granted_ttl_s");
        assert_true(ttl > 0 && ttl <= granted && granted == 5);
    }
    cJSON *g = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "groups"), 0);
    assert_string_equal(str(g, "name"), "g0");
    assert_int_equal(num(g, "attn"), 2);
    assert_int_equal(num(g, "shards"), 2);
    cJSON_Delete(j);
    /* nodes: through the router's Admin service (the token from the state directory) */
    assert_int_equal(ctl("nodes --json"), 0);
    j = json_out();
    assert_string_equal(str(j, "source"), "router");
    nodes = cJSON_GetObjectItem(j, "nodes");
    assert_int_equal(cJSON_GetArraySize(nodes), 5);
    cJSON *a0 = node(nodes, "attn-0");
    assert_string_equal(str(a0, "role"), "both");
    assert_true(num(cJSON_GetObjectItem(a0, "load"), "total_kv_blocks") > 0);
    cJSON_Delete(j);
    assert_int_equal(ctl("nodes --kind expert --json"), 0);
    j = json_out();
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "nodes")), 2);
    cJSON_Delete(j);
}

static void check_admin_token(void)
{
    /* the router without a token, and with a wrong one: refused, and said why */
    assert_int_equal(ctl_nodir("--router %s nodes", router), 1);
    assert_non_null(strstr(err, "UNAUTHENTICATED"));
    assert_int_equal(ctl_nodir("--router %s --admin-token wrong nodes", router), 1);
    assert_non_null(strstr(err, "UNAUTHENTICATED"));
    /* the right one through the environment, and from a file */
    char tok[128], tp[192];
    snprintf(tp, sizeof(tp), "%s/admin-token", state);
    slurp(tp, tok, sizeof(tok));
    tok[strcspn(tok, "\n")] = 0;
    setenv("DSV32_ADMIN_TOKEN", tok, 1);
    int rc = ctl_nodir("--router %s nodes", router);
    unsetenv("DSV32_ADMIN_TOKEN");
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "expert-1"));
    assert_int_equal(ctl_nodir("--router %s --admin-token-file %s nodes", router, tp), 0);
    assert_non_null(strstr(out, "expert-1"));
    /* status with only the router: the nodes, no lease times (those come from etcd) */
    assert_int_equal(ctl_nodir("--router %s --admin-token-file %s status --json", router, tp), 0);
    cJSON *j = json_out();
    assert_string_equal(str(j, "source"), "router");
    assert_string_equal(str(cJSON_GetObjectItem(j, "router"), "health"), "serving");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "nodes")), 5);
    assert_null(cJSON_GetObjectItem(node(cJSON_GetObjectItem(j, "nodes"), "attn-0"), "lease_ttl_s"));
    cJSON_Delete(j);
}

static void check_cordon(void)
{
    assert_int_equal(ctl("cordon attn-1 --reason 'disk check'"), 0);
    assert_int_equal(ctl("nodes --json"), 0);
    cJSON *j = json_out();
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(node(cJSON_GetObjectItem(j, "nodes"), "attn-1"),
                                                 "cordoned")));
    assert_false(cJSON_IsTrue(cJSON_GetObjectItem(node(cJSON_GetObjectItem(j, "nodes"), "attn-0"),
                                                  "cordoned")));
    cJSON_Delete(j);
    assert_int_equal(ctl("status"), 0);
    assert_non_null(strstr(out, "cordoned (disk check)"));
    assert_int_equal(ctl("uncordon attn-1"), 0);
    assert_non_null(strstr(out, "uncordoned"));
    assert_int_equal(ctl("uncordon attn-1"), 0);
    assert_non_null(strstr(out, "was not cordoned"));
    assert_int_equal(ctl("nodes --json"), 0);
    j = json_out();
    assert_false(cJSON_IsTrue(cJSON_GetObjectItem(node(cJSON_GetObjectItem(j, "nodes"), "attn-1"),
                                                  "cordoned")));
    cJSON_Delete(j);
}

/* placement --json (router, or etcd with etcd_args) for group g0: checks members and that every
 * routed expert of every MoE layer (1..3 of the small model) has exactly one of `shards`. */
static double check_placement(const char *etcd_args, const char *const *shards, int n_shards)
{
    assert_int_equal(etcd_args[0] ? ctl_nodir("placement --json %s", etcd_args)
                                  : ctl("placement --json"), 0);
    cJSON *j = json_out();
    cJSON *g = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "groups"), 0);
    assert_non_null(g);
    assert_string_equal(str(g, "name"), "g0");
    double epoch = num(g, "epoch");
    assert_true(epoch >= 1);
    cJSON *mem = cJSON_GetObjectItem(g, "members");
    assert_int_equal(cJSON_GetArraySize(mem), 2 + n_shards);
    for (int i = 0; i < 2 + n_shards; i++) {
        cJSON *m = cJSON_GetArrayItem(mem, i);
        assert_int_equal(num(m, "rank"), i);
        assert_string_equal(str(m, "id"), i < 2 ? (i ? "attn-1" : "attn-0") : shards[i - 2]);
    }
    cJSON *ex = cJSON_GetObjectItem(g, "experts"), *x;
    assert_int_equal(cJSON_GetArraySize(ex), 3 * 16);
    int per_shard[4] = {0};
    cJSON_ArrayForEach(x, ex)
    {
        int layer = (int)num(x, "layer");
        assert_true(layer >= 1 && layer <= 3); /* layer 0 is dense */
        cJSON *s = cJSON_GetObjectItem(x, "shards");
        assert_int_equal(cJSON_GetArraySize(s), 1);
        int found = -1;
        for (int k = 0; k < n_shards; k++)
            if (!strcmp(cJSON_GetArrayItem(s, 0)->valuestring, shards[k]))
                found = k;
        assert_true(found >= 0);
        per_shard[found]++;
    }
    for (int k = 0; k < n_shards; k++)
        assert_int_equal(per_shard[k], 48 / n_shards); /* balanced */
    cJSON_Delete(j);
    return epoch;
}

static void check_generate(void)
{
    assert_int_equal(ctl("generate --text 'Hello, DeepSeek' --max-tokens 8 --json"), 0);
    int lines = 0, tokens = 0;
    char *save = NULL, *copy = strdup(out);
    const char *finish = NULL;
    unsigned completion = 0;
    for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        cJSON *j = cJSON_Parse(l);
        assert_non_null(j);
        tokens += cJSON_GetArraySize(cJSON_GetObjectItem(j, "token_ids"));
        cJSON *f = cJSON_GetObjectItem(j, "finish_reason");
        if (f) {
            finish = strcmp(f->valuestring, "length") == 0 ? "length" : "other";
            completion = (unsigned)num(j, "completion_tokens");
        }
        cJSON_Delete(j);
        lines++;
    }
    free(copy);
    assert_true(lines >= 2); /* streamed: token messages, then the last one */
    assert_int_equal(tokens, 8);
    assert_string_equal(finish, "length");
    assert_int_equal(completion, 8);
    assert_int_equal(ctl("generate --text 'Hello' --max-tokens 8"), 0);
    assert_true(strlen(out) > 1);
    /* chat: the reply, or (until the router renders chat input) a clear message */
    int rc = ctl("chat --max-tokens 8 'Hi there'");
    if (rc == 0)
        assert_true(strlen(out) > 0);
    else
        assert_non_null(strstr(err, "does not take chat input"));
}

static void check_drain(void)
{
    /* a request runs on one attention daemon; draining that daemon lets it finish */
    struct stream_ctx s = {0};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, long_stream, &s), 0);
    char busy[16] = "";
    for (int i = 0; i < 200 && !busy[0]; i++) {
        sleep_ms(50);
        if (ctl("nodes --kind attn --json") != 0)
            continue;
        cJSON *j = json_out(), *n;
        cJSON_ArrayForEach(n, cJSON_GetObjectItem(j, "nodes"))
        {
            if (num(cJSON_GetObjectItem(n, "load"), "running") > 0)
                snprintf(busy, sizeof(busy), "%s", str(n, "id"));
        }
        cJSON_Delete(j);
    }
    assert_true(busy[0]);
    const char *other = strcmp(busy, "attn-0") ? "attn-0" : "attn-1";
    /* the daemon says DRAINING while the request still runs */
    assert_int_equal(ctl("drain %s --no-wait", busy), 0);
    assert_non_null(strstr(out, "drain requested"));
    int draining = 0;
    for (int i = 0; i < 100 && !draining; i++) {
        assert_int_equal(ctl("nodes --kind attn --json"), 0);
        cJSON *j = json_out();
        draining = !strcmp(str(node(cJSON_GetObjectItem(j, "nodes"), busy), "state"), "draining");
        cJSON_Delete(j);
        if (!draining)
            sleep_ms(50);
    }
    assert_true(draining);
    assert_false(atomic_load(&s.done));
    /* drain again (no harm) and wait until it has nothing left */
    int rc = ctl("drain %s --timeout 120 --json", busy);
    if (rc != 0)
        print_error("drain: %s\n%s\n", out, err);
    assert_int_equal(rc, 0);
    cJSON *j = json_out();
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "drained")));
    assert_string_equal(str(j, "state"), "draining");
    cJSON_Delete(j);
    pthread_join(t, NULL);
    /* the request finished whole: no token lost to the drain */
    assert_int_equal(s.rc, 0);
    assert_int_equal(s.n_tokens, 400);
    assert_int_equal(s.why, DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    /* new work goes to the other daemon; the drained one stays DRAINING with nothing to do */
    assert_int_equal(ctl("generate --text 'after the drain' --max-tokens 4"), 0);
    assert_int_equal(ctl("status --json"), 0);
    j = json_out();
    cJSON *d = node(cJSON_GetObjectItem(j, "nodes"), busy);
    assert_string_equal(str(d, "state"), "draining");
    assert_int_equal(num(cJSON_GetObjectItem(d, "load"), "running"), 0);
    assert_string_equal(str(node(cJSON_GetObjectItem(j, "nodes"), other), "state"), "ready");
    cJSON_Delete(j);
    /* a router is not drained; an unknown node is not found */
    assert_int_equal(ctl("drain router-0"), 1);
    assert_non_null(strstr(err, "INVALID_ARGUMENT"));
    assert_int_equal(ctl("drain no-such-node"), 1);
    assert_non_null(strstr(err, "NOT_FOUND"));
}

static void check_expert_drain(void)
{
    static const char *const both[] = {"expert-0", "expert-1"}, *const one[] = {"expert-0"};
    char etcd_args[160], etcd[64] = "", envp[192], line[256];
    snprintf(envp, sizeof(envp), "%s/cluster.env", state);
    FILE *f = fopen(envp, "r");
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, "etcd=", 5))
            snprintf(etcd, sizeof(etcd), "%.*s", (int)strcspn(line + 5, "\n"), line + 5);
    if (f)
        fclose(f);
    assert_true(etcd[0]);
    snprintf(etcd_args, sizeof(etcd_args), "--etcd %s --cluster local", etcd);
    double e1 = check_placement("", both, 2);
    assert_true(check_placement(etcd_args, both, 2) == e1); /* etcd and the router agree */
    assert_int_equal(ctl("placement"), 0);
    assert_non_null(strstr(out, "L1[")); /* the text form lists the shards' experts */
    /* a drained shard leaves: the next epoch holds one shard with every expert */
    assert_int_equal(ctl("drain expert-1 --timeout 60"), 0);
    double e2 = 0;
    for (int i = 0; i < 100; i++) {
        assert_int_equal(ctl("placement --json"), 0);
        cJSON *j = json_out();
        e2 = num(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "groups"), 0), "epoch");
        cJSON_Delete(j);
        if (e2 > e1)
            break;
        sleep_ms(100);
    }
    assert_true(e2 > e1);
    check_placement("", one, 1);
    assert_int_equal(ctl("generate --text 'one shard left' --max-tokens 4"), 0);
    /* the last shard of the group: refused, through the router and through etcd */
    assert_int_equal(ctl("drain expert-0"), 1);
    assert_non_null(strstr(err, "last expert shard"));
    assert_int_equal(ctl_nodir("drain expert-0 %s", etcd_args), 1);
    assert_non_null(strstr(err, "last expert shard"));
}

static void test_ctl_cluster(void **st)
{
    up();
    /* a second up refuses and changes nothing */
    assert_int_equal(ctl("cluster up --local"), 1);
    assert_non_null(strstr(err, "already up"));
    check_status_and_nodes();
    check_admin_token();
    check_cordon();
    check_generate();
    check_drain();
    check_expert_drain();

    /* down: every recorded process gone, the runtime state removed, the model kept */
    struct rec r[64];
    int n = recorded(r, 64);
    assert_int_equal(n, 6); /* etcd, router, 2 attn, 2 expert */
    /* and the watcher of --watch-pid */
    char wp[192];
    snprintf(wp, sizeof(wp), "%s/watch.pid", state);
    FILE *wf = fopen(wp, "r");
    assert_non_null(wf);
    assert_int_equal(fscanf(wf, "%d %llu", &r[n].pid, &r[n].start), 2);
    fclose(wf);
    snprintf(r[n].name, sizeof(r[n].name), "watcher");
    assert_true(alive(&r[n]));
    n++;
    assert_int_equal(ctl("cluster down"), 0);
    assert_non_null(strstr(out, "6 processes stopped"));
    for (int i = 0; i < n; i++)
        if (alive(&r[i]))
            fail_msg("%s (pid %d) still runs after down", r[i].name, r[i].pid);
    char p[256];
    struct stat sb;
    snprintf(p, sizeof(p), "%s/cluster.env", state);
    assert_int_not_equal(stat(p, &sb), 0);
    snprintf(p, sizeof(p), "%s/etcd", state);
    assert_int_not_equal(stat(p, &sb), 0);
    snprintf(p, sizeof(p), "%s/model/config.json", state);
    assert_int_equal(stat(p, &sb), 0);
    assert_int_equal(ctl("status"), 2); /* nothing up there now */
    assert_int_equal(ctl("cluster down"), 0);
    assert_non_null(strstr(out, "0 processes stopped"));
    /* up again: the model is reused, not made again */
    assert_int_equal(ctl("cluster up --local --timeout 120 --watch-pid %d", (int)getpid()), 0);
    assert_null(strstr(err, "making it"));
    assert_int_equal(ctl("generate --text 'again' --max-tokens 2"), 0);
    assert_int_equal(ctl("cluster down"), 0);
    assert_non_null(strstr(out, "3 processes stopped"));
}

/* A cluster tied to a process (--watch-pid) goes down by itself when that process ends: what a
 * test killed at its timeout must not leave behind. */
static void test_ctl_watch_pid(void **st)
{
    pid_t child = fork();
    if (child == 0) {
        pause(); /* the process the cluster is tied to */
        _exit(0);
    }
    assert_true(child > 0);
    int rc = ctl("cluster up --local --timeout 120 --watch-pid %d", (int)child);
    if (rc != 0)
        kill(child, SIGKILL);
    assert_int_equal(rc, 0);
    struct rec r[64];
    int n = recorded(r, 64);
    assert_int_equal(n, 3);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    int left = n;
    for (int i = 0; i < 200 && left; i++) {
        sleep_ms(100);
        left = 0;
        for (int k = 0; k < n; k++)
            left += alive(&r[k]);
    }
    assert_int_equal(left, 0);
    char p[256];
    struct stat sb;
    snprintf(p, sizeof(p), "%s/cluster.env", state);
    for (int i = 0; i < 50 && stat(p, &sb) == 0; i++)
        sleep_ms(100);
    assert_int_not_equal(stat(p, &sb), 0); /* its runtime state removed too */
}

int main(void)
{
    if (access("/usr/bin/etcd", X_OK) != 0 && !getenv("DSV32_ETCD")) {
        fprintf(stderr, "no etcd binary: skipped\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ctl_cluster, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ctl_watch_pid, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
