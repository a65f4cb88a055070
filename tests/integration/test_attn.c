/* dsv32-attn as a real process on 127.0.0.1, called through gRPC: streamed greedy tokens equal an
 * in-process engine's, eight concurrent streams, logprobs, bad requests refused with
 * INVALID_ARGUMENT (and the daemon keeps serving), and a client that goes away frees its KV
 * blocks. The daemon is stopped with SIGTERM at the end, whatever happened. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cluster.pb-c.h"
#include "engine.h"
#include "error.h"
#include "procs.h"
#include "procs.h"
#include "rpc.h"
#include "safetensors.h"

static char dir[64];
static char model[128];
static pid_t daemon_pid = -1;
static struct dsv32_rpc_client *cli;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int setup(void **state)
{
    snprintf(dir, sizeof(dir), "/tmp/dsv32-attn-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(model, sizeof(model), "%s/m", dir);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s --out %s --layers 2 >/dev/null 2>&1", MKMODEL, model);
    if (system(cmd) != 0)
        return -1;
    char portfile[128];
    snprintf(portfile, sizeof(portfile), "%s/port", dir);
    daemon_pid = fork();
    if (daemon_pid == 0) {
        char mportfile[128];
        snprintf(mportfile, sizeof(mportfile), "%s/mport", dir);
        execl(ATTN, ATTN, "--model", model, "--port-file", portfile, "--max-seq-len", "512",
              "--max-seqs", "16", "--max-queue", "64", "--log-level", "warn", "--metrics-listen",
              "127.0.0.1:0", "--metrics-port-file", mportfile, (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 600 && port == 0; i++) {
        FILE *f = fopen(portfile, "r");
        if (f) {
            if (fscanf(f, "%d", &port) != 1)
                port = 0;
            fclose(f);
        }
        if (!port)
            sleep_ms(50);
    }
    if (!port)
        return -1;
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    struct dsv32_rpc_client_config cc = {.target = target, .max_recv_bytes = 64u << 20};
    return dsv32_rpc_client_new(&cc, &cli);
}

static int teardown(void **state)
{
    dsv32_rpc_client_free(cli);
    if (daemon_pid > 0) {
        kill(daemon_pid, SIGTERM);
        int st;
        for (int i = 0; i < 100; i++) {
            if (waitpid(daemon_pid, &st, WNOHANG) == daemon_pid) {
                daemon_pid = -1;
                break;
            }
            sleep_ms(100);
        }
        if (daemon_pid > 0) {
            kill(daemon_pid, SIGKILL);
            waitpid(daemon_pid, &st, 0);
        }
    }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

struct result {
    int32_t tok[600];
    int n;
    int n_logprobs, n_prompt_logprobs;
    int out_of_order; /* messages whose offset is not the number of tokens before them */
    Dsv32__V1__FinishReason why;
    uint32_t prompt_tokens, completion_tokens;
    struct dsv32_rpc_status st;
    int rc;
};

static int run(const char *rid, const int32_t *prompt, size_t n, Dsv32__V1__SamplingParams *sp,
               struct result *res, int stop_after)
{
    Dsv32__Cluster__V1__RunRequest req = DSV32__CLUSTER__V1__RUN_REQUEST__INIT;
    req.request_id = (char *)rid;
    req.prompt_token_ids = (int32_t *)prompt;
    req.n_prompt_token_ids = n;
    req.sampling = sp;
    memset(res, 0, sizeof(*res));
    struct dsv32_rpc_stream *s;
    int r = dsv32_rpc_stream_open_msg(cli, "/dsv32.cluster.v1.Attn/Run", &req.base, 60000,
                                      DSV32_RPC_WAIT_FOR_READY, &s);
    if (r < 0)
        return r;
    for (;;) {
        ProtobufCMessage *m;
        r = dsv32_rpc_stream_read_msg(s, &dsv32__cluster__v1__run_response__descriptor, 60000, &m);
        if (r <= 0)
            break;
        Dsv32__Cluster__V1__RunResponse *rr = (Dsv32__Cluster__V1__RunResponse *)m;
        if (!rr->n_prompt_logprobs && rr->offset != (uint32_t)res->n)
            res->out_of_order++;
        for (size_t i = 0; i < rr->n_token_ids && res->n < 600; i++)
            res->tok[res->n++] = rr->token_ids[i];
        res->n_logprobs += (int)rr->n_logprobs;
        res->n_prompt_logprobs += (int)rr->n_prompt_logprobs;
        if (rr->finish_reason) {
            res->why = rr->finish_reason;
            res->prompt_tokens = rr->usage ? rr->usage->prompt_tokens : 0;
            res->completion_tokens = rr->usage ? rr->usage->completion_tokens : 0;
        }
        protobuf_c_message_free_unpacked(m, NULL);
        if (stop_after && res->n >= stop_after) {
            dsv32_rpc_stream_cancel(s);
            r = 0;
            break;
        }
    }
    dsv32_rpc_stream_status(s, &res->st);
    dsv32_rpc_stream_free(s);
    res->rc = r;
    return r;
}

static Dsv32__Cluster__V1__StatusResponse *status(void)
{
    Dsv32__Cluster__V1__StatusRequest req = DSV32__CLUSTER__V1__STATUS_REQUEST__INIT;
    ProtobufCMessage *m = NULL;
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.cluster.v1.Attn/Status", &req.base,
                                         &dsv32__cluster__v1__status_response__descriptor, 10000,
                                         DSV32_RPC_WAIT_FOR_READY, &m, NULL), 0);
    return (Dsv32__Cluster__V1__StatusResponse *)m;
}

static const int32_t prompt[6] = {0, 1000, 2000, 3000, 4000, 5000};

static void test_greedy_matches_engine(void **state)
{
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = 0;
    sp.max_tokens = 12;
    sp.ignore_eos = 1;
    sp.logprobs_opt_case = DSV32__V1__SAMPLING_PARAMS__LOGPROBS_OPT_LOGPROBS;
    sp.logprobs = 3;
    sp.prompt_logprobs_opt_case = DSV32__V1__SAMPLING_PARAMS__PROMPT_LOGPROBS_OPT_PROMPT_LOGPROBS;
    sp.prompt_logprobs = 2;
    struct result res;
    assert_int_equal(run("greedy-1", prompt, 6, &sp, &res, 0), 0);
    assert_int_equal(res.st.code, DSV32_RPC_OK);
    assert_int_equal(res.n, 12);
    assert_int_equal(res.why, DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.prompt_tokens, 6);
    assert_int_equal(res.completion_tokens, 12);
    assert_int_equal(res.n_logprobs, 12);
    assert_int_equal(res.n_prompt_logprobs, 5);
    assert_int_equal(res.out_of_order, 0); /* the tokens, then the end, in order */
    /* the same greedy run in this process */
    struct dsv32_model *m;
    struct dsv32_engine *e;
    assert_int_equal(dsv32_model_load(model, NULL, &m), 0);
    struct dsv32_engine_opts eo = {.max_seqs = 2, .max_seq_len = 64, .max_batch_tokens = 64};
    assert_int_equal(dsv32_engine_new(m, &eo, &e), 0);
    int seq = dsv32_kv_seq_new(e->kv);
    float *lg = malloc(sizeof(float) * (size_t)m->cfg.vocab_size);
    int32_t t = 0;
    struct dsv32_seq_input in = {.seq = seq, .n_tokens = 6, .tokens = prompt, .logits = DSV32_LOGITS_LAST};
    for (int i = 0; i < 12; i++) {
        assert_int_equal(dsv32_engine_step(e, &in, 1, lg, NULL), 0);
        t = 0;
        for (int v = 1; v < m->cfg.vocab_size; v++)
            if (lg[v] > lg[t])
                t = v;
        assert_int_equal(res.tok[i], t);
        in = (struct dsv32_seq_input){.seq = seq, .n_tokens = 1, .tokens = &t, .logits = DSV32_LOGITS_LAST};
    }
    free(lg);
    dsv32_engine_free(e);
    dsv32_model_free(m);
}

static void test_bad_requests(void **state)
{
    struct result res;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    /* empty prompt */
    run("bad-1", prompt, 0, NULL, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(res.st.message, "empty"));
    /* top_p outside (0, 1] */
    sp.top_p = 1.5f;
    run("bad-2", prompt, 6, &sp, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(res.st.message, "top_p"));
    /* negative temperature */
    sp.top_p = 0;
    sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = -1;
    run("bad-3", prompt, 6, &sp, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(res.st.message, "temperature"));
    /* a token id beyond the vocabulary */
    int32_t badp[2] = {5, 999999};
    run("bad-4", badp, 2, NULL, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* max_tokens beyond the context */
    Dsv32__V1__SamplingParams sp2 = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp2.max_tokens = 100000;
    run("bad-5", prompt, 6, &sp2, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(res.st.message, "context"));
    /* a bad request id */
    run("bad id with spaces", prompt, 6, NULL, &res, 0);
    assert_int_equal(res.st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* an unknown method */
    uint8_t *resp;
    size_t rl;
    struct dsv32_rpc_status st;
    dsv32_rpc_unary(cli, "/dsv32.cluster.v1.Attn/Nope", "", 0, 5000, 0, &resp, &rl, &st);
    assert_int_equal(st.code, DSV32_RPC_UNIMPLEMENTED);
    /* still serving */
    Dsv32__V1__SamplingParams ok = DSV32__V1__SAMPLING_PARAMS__INIT;
    ok.max_tokens = 3;
    assert_int_equal(run("after-bad", prompt, 6, &ok, &res, 0), 0);
    assert_int_equal(res.st.code, DSV32_RPC_OK);
    assert_true(res.why != DSV32__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED && res.n <= 3);
}

static void test_client_goes_away(void **state)
{
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 400;
    sp.ignore_eos = 1;
    struct result res;
    run("goes-away", prompt, 6, &sp, &res, 3);
    assert_true(res.n >= 3);
    /* the daemon notices, cancels, and frees the request's blocks */
    int freed = 0;
    for (int i = 0; i < 100 && !freed; i++) {
        Dsv32__Cluster__V1__StatusResponse *s = status();
        freed = s->running == 0 && s->waiting == 0 && s->free_kv_blocks == s->total_kv_blocks;
        protobuf_c_message_free_unpacked(&s->base, NULL);
        if (!freed)
            sleep_ms(50);
    }
    assert_true(freed);
}

struct par {
    pthread_t th;
    char rid[32];
    struct result res;
};

static void *par_main(void *arg)
{
    struct par *p = arg;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 10;
    sp.ignore_eos = 1;
    sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = 1234;
    run(p->rid, prompt, 6, &sp, &p->res, 0);
    return NULL;
}

static void test_concurrent_streams(void **state)
{
    struct par p[8];
    for (int i = 0; i < 8; i++) {
        snprintf(p[i].rid, sizeof(p[i].rid), "par-%d", i);
        pthread_create(&p[i].th, NULL, par_main, &p[i]);
    }
    for (int i = 0; i < 8; i++)
        pthread_join(p[i].th, NULL);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(p[i].res.st.code, DSV32_RPC_OK);
        assert_int_equal(p[i].res.n, 10);
        assert_int_equal(p[i].res.out_of_order, 0);
        /* same seed, same prompt: same tokens, whatever the batch they ran in */
        assert_memory_equal(p[i].res.tok, p[0].res.tok, 10 * sizeof(int32_t));
    }
}

static int metrics_get(const char *path, char *buf, size_t cap)
{
    char f[128];
    snprintf(f, sizeof(f), "%s/mport", dir);
    return http_get(read_port_file(f), path, buf, cap);
}

static void test_metrics(void **state)
{
    static char before[65536], after[65536];
    assert_int_equal(metrics_get("/metrics", before, sizeof(before)), 200);
    assert_non_null(strstr(before, "# TYPE dsv32_generation_tokens_total counter"));
    assert_true(metric_value(before, "dsv32_kv_blocks") > 0);
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 7;
    sp.ignore_eos = 1;
    struct result res;
    assert_int_equal(run("metrics-1", prompt, 6, &sp, &res, 0), 0);
    assert_int_equal(res.st.code, DSV32_RPC_OK);
    assert_int_equal(metrics_get("/metrics", after, sizeof(after)), 200);
    assert_true(metric_value(after, "dsv32_generation_tokens_total") >= metric_value(before, "dsv32_generation_tokens_total") + 7);
    assert_true(metric_value(after, "dsv32_prompt_tokens_total") >= metric_value(before, "dsv32_prompt_tokens_total") + 6);
    assert_true(metric_value(after, "dsv32_engine_step_seconds_total") > metric_value(before, "dsv32_engine_step_seconds_total"));
    /* the request's blocks are freed at a step boundary: soon, not necessarily yet */
    for (int i = 0; i < 100 && metric_value(after, "dsv32_kv_blocks_free") != metric_value(after, "dsv32_kv_blocks"); i++) {
        sleep_ms(20);
        assert_int_equal(metrics_get("/metrics", after, sizeof(after)), 200);
    }
    assert_true(metric_value(after, "dsv32_kv_blocks_free") == metric_value(after, "dsv32_kv_blocks"));
    assert_int_equal(metrics_get("/other", after, sizeof(after)), 404);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_matches_engine),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_client_goes_away),
        cmocka_unit_test(test_concurrent_streams),
        cmocka_unit_test(test_metrics),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
