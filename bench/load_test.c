/* load_test: many concurrent Generate streams against a running cluster, in rounds, checking that
 * nothing fails and nothing leaks: every stream ends OK with exactly max_tokens tokens; after each
 * round every attention daemon reports (Admin.ListNodes) no running or waiting request and all its
 * KV blocks free; the daemons' resident memory (VmRSS of the processes a local cluster recorded)
 * does not grow from one round to the next once warm (every round sends the same requests, so
 * pools, scratch buffers and allocator arenas reach their high-water marks in the first rounds;
 * a leak grows with every round). Prints per round: wall time, tokens/s, time to first
 * token (p50/p99), stream time (p50/p99), RSS per daemon. Exit 0 only when every check passed.
 *   load_test --dir STATE [--streams N] [--max-tokens N] [--rounds R] [--rss-slack-kb K]
 * (STATE: a `dsv32ctl cluster up --local` state directory; bench/load.sh runs it all.) */
#define _GNU_SOURCE 1
#include "dsv32.pb-c.h"
#include "error.h"
#include "gen_stream.h"
#include "rpc.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_STREAMS 4096
#define MAX_PROCS 64

struct stream {
    pthread_t thread;
    int index, max_tokens;
    struct dsv32_rpc_client *client;
    struct gen_result res;
    int ok;
};

static void *run_stream(void *arg)
{
    struct stream *s = arg;
    char prompt[128];
    /* different prompts (and lengths) so the batch mixes prefill sizes */
    snprintf(prompt, sizeof(prompt), "Request %d of the load test:%.*s", s->index,
             s->index % 40, "........................................");
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = prompt;
    sp.max_tokens = (uint32_t)s->max_tokens;
    sp.ignore_eos = 1;
    sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = (uint64_t)s->index;
    req.sampling = &sp;
    if (gen_stream_run(s->client, &req, 600000, &s->res) < 0)
        return NULL;
    if (s->res.tokens != s->max_tokens || s->res.finish != DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH)
        snprintf(s->res.error, sizeof(s->res.error), "%d tokens, finish reason %d", s->res.tokens, s->res.finish);
    else
        s->ok = 1;
    return NULL;
}

/* ---- the cluster: state directory, Admin, processes ---- */

static int state_get(const char *dir, const char *key, char *buf, size_t cap)
{
    char path[4200], line[4200];
    snprintf(path, sizeof(path), "%s/cluster.env", dir);
    FILE *f = fopen(path, "r");
    int r = -ENOENT;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, key, kl) && line[kl] == '=') {
            line[strcspn(line, "\n")] = 0;
            snprintf(buf, cap, "%.*s", (int)(cap - 1), line + kl + 1);
            r = 0;
        }
    if (f)
        fclose(f);
    return r;
}

struct proc {
    char name[64];
    int pid;
    long rss_kb[16]; /* per round */
};

static int read_procs(const char *dir, struct proc *p, int cap)
{
    char path[4200];
    snprintf(path, sizeof(path), "%s/pids", dir);
    DIR *d = opendir(path);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)) && n < cap) {
        if (de->d_name[0] == '.' || !strcmp(de->d_name, "etcd"))
            continue;
        char f[4400];
        snprintf(f, sizeof(f), "%.4000s/%.255s", path, de->d_name);
        FILE *fp = fopen(f, "r");
        if (fp && fscanf(fp, "%d", &p[n].pid) == 1) {
            snprintf(p[n].name, sizeof(p[n].name), "%.63s", de->d_name);
            n++;
        }
        if (fp)
            fclose(fp);
    }
    if (d)
        closedir(d);
    return n;
}

static long rss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    while (f && fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmRSS:", 6))
            kb = strtol(line + 6, NULL, 10);
    if (f)
        fclose(f);
    return kb;
}

/* Waits (up to 30 s) until every attention daemon is idle with all KV blocks free; prints them. */
static int check_idle(struct dsv32_rpc_client *admin)
{
    for (int tries = 0; tries < 150; tries++) {
        Dsv32__V1__ListNodesRequest rq = DSV32__V1__LIST_NODES_REQUEST__INIT;
        rq.kind = "attn";
        ProtobufCMessage *m;
        struct dsv32_rpc_status st;
        if (dsv32_rpc_unary_msg(admin, "/dsv32.v1.Admin/ListNodes", &rq.base,
                                &dsv32__v1__list_nodes_response__descriptor, 10000, 0, &m,
                                &st) < 0) {
            fprintf(stderr, "load_test: ListNodes: %s %s\n", dsv32_rpc_code_name(st.code),
                    st.message);
            return -1;
        }
        Dsv32__V1__ListNodesResponse *r = (Dsv32__V1__ListNodesResponse *)m;
        int idle = r->n_nodes > 0;
        for (size_t i = 0; i < r->n_nodes; i++) {
            Dsv32__V1__NodeLoad *l = r->nodes[i]->load;
            idle &= l && l->running == 0 && l->waiting == 0 &&
                    l->free_kv_blocks == l->total_kv_blocks;
        }
        if (idle || tries == 149)
            for (size_t i = 0; i < r->n_nodes; i++) {
                Dsv32__V1__NodeLoad *l = r->nodes[i]->load;
                printf("  %s: %u running, %u waiting, KV blocks %llu/%llu free\n",
                       r->nodes[i]->id, l ? l->running : 0, l ? l->waiting : 0,
                       l ? (unsigned long long)l->free_kv_blocks : 0,
                       l ? (unsigned long long)l->total_kv_blocks : 0);
            }
        protobuf_c_message_free_unpacked(m, NULL);
        if (idle)
            return 0;
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    int n_streams = 200, max_tokens = 32, rounds = 4;
    long slack_kb = 4096;
    static const struct option opts[] = {{"dir", required_argument, 0, 'd'},
                                         {"streams", required_argument, 0, 's'},
                                         {"max-tokens", required_argument, 0, 't'},
                                         {"rounds", required_argument, 0, 'r'},
                                         {"rss-slack-kb", required_argument, 0, 'k'},
                                         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'd': dir = optarg; break;
        case 's': n_streams = atoi(optarg); break;
        case 't': max_tokens = atoi(optarg); break;
        case 'r': rounds = atoi(optarg); break;
        case 'k': slack_kb = atol(optarg); break;
        default:
            fprintf(stderr, "usage: load_test --dir STATE [--streams N] [--max-tokens N] "
                            "[--rounds R] [--rss-slack-kb K]\n");
            return 2;
        }
    }
    if (!dir || n_streams < 1 || n_streams > MAX_STREAMS || max_tokens < 1 || rounds < 3 ||
        rounds > 16) {
        fprintf(stderr, "load_test: --dir STATE, 1..%d streams, 3..16 rounds\n", MAX_STREAMS);
        return 2;
    }
    char router[128], token[256] = "", tpath[4200];
    if (state_get(dir, "router", router, sizeof(router)) < 0) {
        fprintf(stderr, "load_test: no cluster in %s (dsv32ctl cluster up --local --dir %s)\n",
                dir, dir);
        return 2;
    }
    snprintf(tpath, sizeof(tpath), "%s/admin-token", dir);
    FILE *tf = fopen(tpath, "r");
    if (tf) {
        if (fgets(token, sizeof(token), tf))
            token[strcspn(token, "\n")] = 0;
        fclose(tf);
    }
    struct proc procs[MAX_PROCS];
    int n_procs = read_procs(dir, procs, MAX_PROCS);
    struct dsv32_rpc_client_config cc = {.target = router, .max_recv_bytes = 64u << 20};
    struct dsv32_rpc_client_config ac = {.target = router, .bearer_token = token};
    struct dsv32_rpc_client *client, *admin;
    if (dsv32_rpc_client_new(&cc, &client) < 0 || dsv32_rpc_client_new(&ac, &admin) < 0)
        return 1;
    struct stream *s = calloc((size_t)n_streams, sizeof(*s));
    double *a = malloc(sizeof(double) * (size_t)n_streams); /* time to first token, ms */
    double *b = malloc(sizeof(double) * (size_t)n_streams); /* stream time, ms */
    if (!s || !a || !b)
        return 1;
    printf("load_test: %d concurrent Generate streams x %d tokens, %d rounds, router %s\n",
           n_streams, max_tokens, rounds, router);
    int failed = 0;
    for (int round = 0; round < rounds; round++) {
        memset(s, 0, sizeof(*s) * (size_t)n_streams);
        int64_t t0 = gen_now_us();
        for (int i = 0; i < n_streams; i++) {
            s[i].index = i; /* the same requests every round */
            s[i].max_tokens = max_tokens;
            s[i].client = client;
            if (pthread_create(&s[i].thread, NULL, run_stream, &s[i]) != 0) {
                fprintf(stderr, "load_test: no thread for stream %d\n", i);
                return 1;
            }
        }
        for (int i = 0; i < n_streams; i++)
            pthread_join(s[i].thread, NULL);
        int64_t wall = gen_now_us() - t0;
        int ok = 0, n_first = 0, shown = 0;
        long tokens = 0;
        for (int i = 0; i < n_streams; i++) {
            const struct gen_result *g = &s[i].res;
            ok += s[i].ok;
            tokens += g->tokens;
            if (g->first_us)
                a[n_first++] = (double)(g->first_us - g->start_us) / 1e3;
            b[i] = (double)(g->end_us - g->start_us) / 1e3;
            if (!s[i].ok && shown++ < 5)
                fprintf(stderr, "load_test: stream %d: %s\n", i, g->error);
        }
        printf("round %d: %d/%d streams OK, %ld tokens in %.2f s (%.0f tokens/s); first token "
               "p50 %.0f ms p99 %.0f ms; stream p50 %.0f ms p99 %.0f ms\n",
               round + 1, ok, n_streams, tokens, (double)wall / 1e6, (double)tokens * 1e6 / (double)wall,
               gen_pct(a, n_first, 0.5), gen_pct(a, n_first, 0.99), gen_pct(b, n_streams, 0.5),
               gen_pct(b, n_streams, 0.99));
        if (ok != n_streams)
            failed = 1;
        if (ok == 0) {
            printf("  no stream went through: is the cluster up?\n");
            break;
        }
        if (check_idle(admin) < 0) {
            printf("  LEAK: attention daemons not idle with every KV block free after the round\n");
            failed = 1;
        }
        for (int p = 0; p < n_procs; p++) {
            procs[p].rss_kb[round] = rss_kb(procs[p].pid);
            printf("  %s RSS %ld kB\n", procs[p].name, procs[p].rss_kb[round]);
        }
    }
    /* warm rounds: the last one must not grow over the one before */
    for (int p = 0; !failed && p < n_procs; p++) {
        long growth = procs[p].rss_kb[rounds - 1] - procs[p].rss_kb[rounds - 2];
        printf("%s RSS: %+ld kB from round %d to %d, %+ld kB from round 2 to %d\n", procs[p].name,
               growth, rounds - 1, rounds, procs[p].rss_kb[rounds - 1] - procs[p].rss_kb[1],
               rounds);
        if (procs[p].rss_kb[rounds - 2] < 0 || growth > slack_kb) {
            printf("LEAK? %s RSS grew %ld kB from round %d to round %d (slack %ld kB)\n",
                   procs[p].name, growth, rounds - 1, rounds, slack_kb);
            failed = 1;
        }
    }
    printf("%s\n", failed ? "load_test: FAIL" : "load_test: PASS");
    dsv32_rpc_client_free(admin);
    dsv32_rpc_client_free(client);
    free(s);
    free(a);
    free(b);
    return failed;
}
