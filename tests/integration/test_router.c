/* The cluster through its public API: a real etcd, two dsv32-attn processes and dsv32-router, all
 * on 127.0.0.1. Streams carry token ids and their text (equal to Detokenize of the ids), bad
 * input gets INVALID_ARGUMENT with a reason, the in-flight limit gives RESOURCE_EXHAUSTED, and a
 * SIGKILLed attention daemon costs the client nothing: the request continues on the other daemon
 * and the client's token sequence equals an unbroken run with the same seed, no token lost or
 * repeated. Everything started is stopped at the end. */
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
#include <time.h>
#include <unistd.h>

#include "dsv32.pb-c.h"
#include "error.h"
#include "etcd_fixture.h"
#include "procs.h"
#include "rpc.h"

static char dir[64], model[128];
static struct etcd_fixture etcd;
static struct proc attn[2], router;
static struct dsv32_rpc_client *cli;

static int start_attn(int i)
{
    char id[16], name[16];
    snprintf(id, sizeof(id), "attn-%d", i);
    snprintf(name, sizeof(name), "attn%d", i);
    char *argv[] = {ATTN, "--model", model, "--etcd", etcd.endpoint, "--cluster", "t",
                    "--id", id, "--max-seq-len", "512", "--max-seqs", "16", "--lease-ttl", "2",
                    NULL};
    return proc_start(&attn[i], name, dir, argv, 60000);
}

static int setup(void **state)
{
    if (!etcd_fixture_binary()) {
        print_message("no etcd binary: skipped\n");
        exit(77);
    }
    snprintf(dir, sizeof(dir), "/tmp/dsv32-router-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(model, sizeof(model), "%s/m", dir);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s --out %s --layers 2 >/dev/null 2>&1", MKMODEL, model);
    if (system(cmd) != 0 || etcd_fixture_start(&etcd) < 0)
        return -1;
    if (start_attn(0) < 0 || start_attn(1) < 0)
        return -1;
    char mport[128];
    snprintf(mport, sizeof(mport), "%s/router.mport", dir);
    char *argv[] = {ROUTER, "--model", model, "--etcd", etcd.endpoint, "--cluster", "t",
                    "--listen", "127.0.0.1:0", "--max-inflight", "6", "--admin-token", "secret",
                    "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", mport, NULL};
    if (proc_start(&router, "router", dir, argv, 30000) < 0)
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
    proc_stop(&attn[0], 5000);
    proc_stop(&attn[1], 5000);
    etcd_fixture_stop(&etcd);
    if (getenv("DSV32_TEST_KEEP")) {
        print_message("logs kept in %s\n", dir);
        return 0;
    }
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

struct gen {
    int32_t tok[1024];
    int n, msgs;
    char text[16384];
    char reasoning[16384];
    Dsv32__V1__FinishReason why;
    uint32_t completion;
    struct dsv32_rpc_status st;
    int kill_after;          /* kill the daemon that serves us after this many tokens */
};

static Dsv32__V1__SamplingParams seeded(int max_tokens)
{
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = (uint32_t)max_tokens;
    sp.ignore_eos = 1;
    sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = 77;
    sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
    sp.temperature = 0.9f;
    return sp;
}

/* Which attention daemon has a request running (from its Status), -1 if none. */
static int busy_attn(void);

static int generate(Dsv32__V1__GenerateRequest *req, struct gen *g)
{
    struct dsv32_rpc_stream *s;
    g->n = g->msgs = 0;
    g->text[0] = 0;
    g->reasoning[0] = 0;
    g->why = 0;
    int r = dsv32_rpc_stream_open_msg(cli, "/dsv32.v1.Generate/Generate", &req->base, 120000,
                                      DSV32_RPC_WAIT_FOR_READY, &s);
    if (r < 0)
        return r;
    int killed = 0;
    for (;;) {
        ProtobufCMessage *m;
        r = dsv32_rpc_stream_read_msg(s, &dsv32__v1__generate_response__descriptor, 120000, &m);
        if (r <= 0)
            break;
        Dsv32__V1__GenerateResponse *gr = (Dsv32__V1__GenerateResponse *)m;
        g->msgs++;
        for (size_t i = 0; i < gr->n_token_ids && g->n < 1024; i++)
            g->tok[g->n++] = gr->token_ids[i];
        strncat(g->text, gr->text, sizeof(g->text) - strlen(g->text) - 1);
        strncat(g->reasoning, gr->reasoning_text, sizeof(g->reasoning) - strlen(g->reasoning) - 1);
        if (gr->finish_reason) {
            g->why = gr->finish_reason;
            g->completion = gr->usage ? gr->usage->completion_tokens : 0;
        }
        protobuf_c_message_free_unpacked(m, NULL);
        if (g->kill_after && !killed && g->n >= g->kill_after) {
            int b = busy_attn();
            if (b >= 0) {
                proc_kill(&attn[b]);
                killed = 1;
            }
        }
    }
    dsv32_rpc_stream_status(s, &g->st);
    dsv32_rpc_stream_free(s);
    return r;
}

#include "cluster.pb-c.h"

static int busy_attn(void)
{
    for (int i = 0; i < 2; i++) {
        if (attn[i].pid <= 0)
            continue;
        char target[64];
        snprintf(target, sizeof(target), "127.0.0.1:%d", attn[i].port);
        struct dsv32_rpc_client_config cc = {.target = target};
        struct dsv32_rpc_client *c;
        if (dsv32_rpc_client_new(&cc, &c) < 0)
            continue;
        Dsv32__Cluster__V1__StatusRequest req = DSV32__CLUSTER__V1__STATUS_REQUEST__INIT;
        ProtobufCMessage *m = NULL;
        int running = 0;
        if (dsv32_rpc_unary_msg(c, "/dsv32.cluster.v1.Attn/Status", &req.base,
                                &dsv32__cluster__v1__status_response__descriptor, 5000, 0, &m,
                                NULL) == 0) {
            running = (int)((Dsv32__Cluster__V1__StatusResponse *)m)->running;
            protobuf_c_message_free_unpacked(m, NULL);
        }
        dsv32_rpc_client_free(c);
        if (running > 0)
            return i;
    }
    return -1;
}

static void test_generate_text(void **state)
{
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = "Hello, DeepSeek! 你好。";
    Dsv32__V1__SamplingParams sp = seeded(16);
    req.sampling = &sp;
    struct gen *g = calloc(1, sizeof(*g));
    assert_int_equal(generate(&req, g), 0);
    assert_int_equal(g->st.code, DSV32_RPC_OK);
    assert_int_equal(g->n, 16);
    assert_int_equal(g->why, DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(g->completion, 16);
    /* the streamed text is the text of the streamed ids */
    Dsv32__V1__DetokenizeRequest dr = DSV32__V1__DETOKENIZE_REQUEST__INIT;
    dr.token_ids = g->tok;
    dr.n_token_ids = (size_t)g->n;
    ProtobufCMessage *m;
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.v1.Generate/Detokenize", &dr.base,
                                         &dsv32__v1__detokenize_response__descriptor, 10000, 0, &m,
                                         NULL), 0);
    assert_string_equal(((Dsv32__V1__DetokenizeResponse *)m)->text, g->text);
    protobuf_c_message_free_unpacked(m, NULL);
    /* Tokenize and GetModelInfo */
    Dsv32__V1__TokenizeRequest tr = DSV32__V1__TOKENIZE_REQUEST__INIT;
    tr.input_case = DSV32__V1__TOKENIZE_REQUEST__INPUT_TEXT;
    tr.text = "Hello";
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.v1.Generate/Tokenize", &tr.base,
                                         &dsv32__v1__tokenize_response__descriptor, 10000, 0, &m,
                                         NULL), 0);
    assert_true(((Dsv32__V1__TokenizeResponse *)m)->n_token_ids >= 1);
    protobuf_c_message_free_unpacked(m, NULL);
    Dsv32__V1__GetModelInfoRequest mr = DSV32__V1__GET_MODEL_INFO_REQUEST__INIT;
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.v1.Generate/GetModelInfo", &mr.base,
                                         &dsv32__v1__model_info__descriptor, 10000, 0, &m, NULL), 0);
    assert_int_equal(((Dsv32__V1__ModelInfo *)m)->vocab_size, 129280);
    protobuf_c_message_free_unpacked(m, NULL);
    free(g);
}

/* Chat input: rendered with the V3.2 format; in thinking mode the reply starts as reasoning. */
static void test_chat(void **state)
{
    Dsv32__V1__ChatMessage sys = DSV32__V1__CHAT_MESSAGE__INIT, user = DSV32__V1__CHAT_MESSAGE__INIT;
    sys.role = "system";
    sys.content = "You are terse.";
    user.role = "user";
    user.content = "Say hi <｜end▁of▁sentence｜> (that marker is text here).";
    Dsv32__V1__ChatMessage *msgs[2] = {&sys, &user};
    Dsv32__V1__Chat chat = DSV32__V1__CHAT__INIT;
    chat.messages = msgs;
    chat.n_messages = 2;
    chat.thinking = 1;
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_CHAT;
    req.chat = &chat;
    Dsv32__V1__SamplingParams sp = seeded(12);
    req.sampling = &sp;
    struct gen *g = calloc(1, sizeof(*g));
    assert_int_equal(generate(&req, g), 0);
    assert_int_equal(g->st.code, DSV32_RPC_OK);
    assert_int_equal(g->n, 12);
    /* reasoning + answer is the text of the ids (random weights rarely close the think block) */
    Dsv32__V1__DetokenizeRequest dr = DSV32__V1__DETOKENIZE_REQUEST__INIT;
    dr.token_ids = g->tok;
    dr.n_token_ids = (size_t)g->n;
    ProtobufCMessage *m;
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.v1.Generate/Detokenize", &dr.base,
                                         &dsv32__v1__detokenize_response__descriptor, 10000, 0, &m,
                                         NULL), 0);
    const char *all = ((Dsv32__V1__DetokenizeResponse *)m)->text;
    const char *end = strstr(all, "</think>");
    if (!end) {
        assert_string_equal(g->reasoning, all);
        assert_string_equal(g->text, "");
    } else {
        assert_int_equal(strlen(g->reasoning), (size_t)(end - all));
        assert_string_equal(g->text, end + strlen("</think>"));
    }
    protobuf_c_message_free_unpacked(m, NULL);
    /* Tokenize: BOS first, and the end-of-sentence text in the message did not become EOS */
    Dsv32__V1__TokenizeRequest tr = DSV32__V1__TOKENIZE_REQUEST__INIT;
    tr.input_case = DSV32__V1__TOKENIZE_REQUEST__INPUT_CHAT;
    tr.chat = &chat;
    assert_int_equal(dsv32_rpc_unary_msg(cli, "/dsv32.v1.Generate/Tokenize", &tr.base,
                                         &dsv32__v1__tokenize_response__descriptor, 10000, 0, &m,
                                         NULL), 0);
    Dsv32__V1__TokenizeResponse *t = (Dsv32__V1__TokenizeResponse *)m;
    assert_true(t->n_token_ids > 5);
    assert_int_equal(t->token_ids[0], 0);
    for (size_t i = 0; i < t->n_token_ids; i++)
        assert_int_not_equal(t->token_ids[i], 1);
    protobuf_c_message_free_unpacked(m, NULL);
    /* a bad role */
    user.role = "wizard";
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(g->st.message, "wizard"));
    free(g);
}

static void test_bad_input(void **state)
{
    struct gen *g = calloc(1, sizeof(*g));
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    /* no input */
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* empty text */
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = "";
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* invalid UTF-8 */
    req.text = "abc\xff\xfe";
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(g->st.message, "UTF-8"));
    /* max_tokens <= 0 is "up to the context"; beyond the context is refused */
    req.text = "hi";
    Dsv32__V1__SamplingParams sp = seeded(100000);
    req.sampling = &sp;
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(g->st.message, "context"));
    /* top_p outside (0, 1], negative temperature */
    sp = seeded(4);
    sp.top_p = 2.0f;
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    sp = seeded(4);
    sp.temperature = -0.1f;
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* a token id outside the vocabulary */
    Dsv32__V1__TokenIds ids = DSV32__V1__TOKEN_IDS__INIT;
    int32_t bad[2] = {1, 1 << 30};
    ids.ids = bad;
    ids.n_ids = 2;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
    req.token_ids = &ids;
    generate(&req, g);
    assert_int_equal(g->st.code, DSV32_RPC_INVALID_ARGUMENT);
    /* the Admin service is closed without the token */
    Dsv32__V1__ListNodesRequest lr = DSV32__V1__LIST_NODES_REQUEST__INIT;
    struct dsv32_rpc_status st;
    ProtobufCMessage *m = NULL;
    dsv32_rpc_unary_msg(cli, "/dsv32.v1.Admin/ListNodes", &lr.base,
                        &dsv32__v1__list_nodes_response__descriptor, 10000, 0, &m, &st);
    assert_int_equal(st.code, DSV32_RPC_UNAUTHENTICATED);
    free(g);
}

struct par {
    pthread_t th;
    struct gen g;
};

static void *par_main(void *arg)
{
    struct par *p = arg;
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = "long";
    Dsv32__V1__SamplingParams sp = seeded(120);
    req.sampling = &sp;
    generate(&req, &p->g);
    return NULL;
}

static void test_overload(void **state)
{
    /* the router takes 6 requests at once; the 7th and 8th are refused */
    struct par *p = calloc(8, sizeof(*p));
    for (int i = 0; i < 8; i++)
        pthread_create(&p[i].th, NULL, par_main, &p[i]);
    int ok = 0, exhausted = 0;
    for (int i = 0; i < 8; i++) {
        pthread_join(p[i].th, NULL);
        ok += p[i].g.st.code == DSV32_RPC_OK && p[i].g.n == 120;
        exhausted += p[i].g.st.code == DSV32_RPC_RESOURCE_EXHAUSTED;
    }
    assert_true(ok >= 6);
    assert_int_equal(ok + exhausted, 8);
    free(p);
}

static void test_failover(void **state)
{
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = "Tell me a long story about a cluster that never stops.";
    Dsv32__V1__SamplingParams sp = seeded(80);
    req.sampling = &sp;
    /* the unbroken run */
    struct gen *whole = calloc(1, sizeof(*whole)), *broken = calloc(1, sizeof(*broken));
    assert_int_equal(generate(&req, whole), 0);
    assert_int_equal(whole->n, 80);
    /* the same request; the daemon serving it is killed after 30 tokens */
    broken->kill_after = 30;
    assert_int_equal(generate(&req, broken), 0);
    assert_int_equal(broken->st.code, DSV32_RPC_OK);
    assert_int_equal(broken->why, DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(broken->n, 80);
    assert_memory_equal(broken->tok, whole->tok, sizeof(int32_t) * 80);
    assert_string_equal(broken->text, whole->text);
    assert_true(attn[0].pid == 0 || attn[1].pid == 0); /* one really died */
    /* the cluster keeps serving on the survivor */
    assert_int_equal(generate(&req, whole), 0);
    assert_int_equal(whole->n, 80);
    free(whole);
    free(broken);
}

/* after the tests above: the router's metrics counted what they did */
static void test_metrics(void **state)
{
    static char m[65536];
    char f[128];
    snprintf(f, sizeof(f), "%s/router.mport", dir);
    const int port = read_port_file(f);
    /* a call's bookkeeping ends just after its last message reaches the client: the running gauge
     * may lag the tests above by a moment, and must reach 0 (a request that never ends would not) */
    for (int i = 0; i < 100; i++) {
        assert_int_equal(http_get(port, "/metrics", m, sizeof(m)), 200);
        if (metric_value(m, "dsv32_router_requests_running") == 0)
            break;
        usleep(50 * 1000);
    }
    assert_true(metric_value(m, "dsv32_router_requests_total{outcome=\"ok\"}") >= 10);
    assert_true(metric_value(m, "dsv32_router_requests_total{outcome=\"invalid\"}") >= 1); /* test_bad_input */
    assert_true(metric_value(m, "dsv32_router_failovers_total") >= 1);                       /* test_failover */
    assert_true(metric_value(m, "dsv32_router_generation_tokens_total") >= 80 * 3);
    assert_true(metric_value(m, "dsv32_router_requests_running") == 0);
    /* histograms: the +Inf bucket is the count, every request with tokens is in the first token's */
    const double n_ttft = metric_value(m, "dsv32_router_time_to_first_token_seconds_count");
    assert_true(n_ttft >= 10);
    assert_true(metric_value(m, "dsv32_router_time_to_first_token_seconds_bucket{le=\"+Inf\"}") == n_ttft);
    assert_true(metric_value(m, "dsv32_router_time_to_first_token_seconds_sum") > 0);
    assert_true(metric_value(m, "dsv32_router_time_per_output_token_seconds_count") >= 10);
    assert_true(metric_value(m, "dsv32_router_request_seconds_count") >=
                metric_value(m, "dsv32_router_requests_total{outcome=\"ok\"}"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generate_text),
        cmocka_unit_test(test_chat),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_overload),
        cmocka_unit_test(test_failover),
        cmocka_unit_test(test_metrics),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
