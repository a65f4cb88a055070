/* stream_bench: what the attention daemon's scheduler thread spends per generated token after the
 * draw (docs/BENCHMARKS.md, "Host time between decode steps"): textgen's incremental
 * detokenization and stop-string matching (tg_on_token) on DeepSeek's tokenizer, the RunResponse
 * of attn.c's on_token packed (with and without 5 top logprobs), and that message written to a
 * gRPC stream of a loopback server as send_msg does it, one message per stream per "step" with a
 * client reading them between steps (the writes alone are timed). Random ordinary token ids
 * (neither added nor special), seeded; median of 7 batches.
 *   stream_bench [--tokenizer DIR] [--tokens N] [--streams S]
 * With --attn HOST:PORT it is instead a client of a running dsv32-attn: S concurrent Run streams
 * of --tokens N tokens each (temperature 1, EOS ignored), all read to the end; the daemon's stats
 * line or its dsv32_engine_post_step_seconds_total then says what the tokens cost it. */
#include "api.h"
#include "clock.h"
#include "cluster.pb-c.h"
#include "error.h"
#include "gen_stream.h"
#include "rpc.h"
#include "textgen.h"
#include "tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { BATCHES = 7, MAX_STREAMS = 256 };

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* n ids drawn uniformly from the ordinary vocabulary */
static int32_t *random_ids(const struct dsv32_tok *tok, int n)
{
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    if (!ids)
        return NULL;
    const int32_t V = dsv32_tok_vocab_size(tok);
    uint64_t z = 2024;
    for (int i = 0; i < n;) {
        int32_t id = (int32_t)(splitmix64(&z) % (uint64_t)V);
        const char *b;
        size_t len;
        if (dsv32_tok_is_special(tok, id) || dsv32_tok_id_bytes(tok, id, &b, &len) < 0 || len == 0)
            continue;
        ids[i++] = id;
    }
    return ids;
}

/* tg_on_token's work for each id: the stream's text, then the stop matcher. us per token. */
static double time_detok(const struct dsv32_tok *tok, const int32_t *ids, int n,
                         const char *const *stops, int n_stops, size_t *ret_bytes)
{
    double t[BATCHES];
    size_t bytes = 0;
    for (int b = 0; b < BATCHES; b++) {
        struct dsv32_tok_stream *st;
        struct dsv32_stop_matcher m;
        if (dsv32_tok_stream_new(tok, DSV32_TOK_SKIP_SPECIAL, &st) < 0 ||
            dsv32_stop_init(&m, stops, n_stops) < 0)
            exit(1);
        bytes = 0;
        const double t0 = dsv32_mono_s();
        for (int i = 0; i < n; i++) {
            const char *text, *out;
            size_t tl, ol;
            if (dsv32_tok_stream_push(st, ids[i], &text, &tl) < 0)
                tl = 0;
            if (dsv32_stop_feed(&m, text, tl, &out, &ol) != 0)
                exit(1); /* the stop strings below never occur in random ids' text */
            bytes += ol;
        }
        t[b] = (dsv32_mono_s() - t0) / n * 1e6;
        dsv32_tok_stream_free(st);
        dsv32_stop_done(&m);
    }
    *ret_bytes = bytes;
    return gen_pct(t, BATCHES, 0.5);
}

/* on_token's message for id: one token id at offset i, with lp when given */
static void run_response(Dsv32__Cluster__V1__RunResponse *m, int32_t *id, int offset,
                         Dsv32__V1__Logprobs **lps)
{
    dsv32__cluster__v1__run_response__init(m);
    m->offset = (uint32_t)offset;
    m->n_token_ids = 1;
    m->token_ids = id;
    if (lps) {
        m->n_logprobs = 1;
        m->logprobs = lps;
    }
}

static void fake_logprobs(const int32_t *ids, int n, int i, struct dsv32_logprobs *lp)
{
    lp->chosen.token = ids[i];
    lp->chosen.logprob = -0.25f;
    lp->n_top = 5;
    for (int k = 0; k < 5; k++) {
        lp->top[k].token = ids[(i + k) % n];
        lp->top[k].logprob = -0.25f - (float)k;
    }
}

/* dsv32_rpc_pack of on_token's RunResponse, freed as send_msg frees it. us per token. */
static double time_pack(const struct dsv32_tok *tok, int32_t *ids, int n, int with_lp)
{
    double t[BATCHES];
    struct dsv32_api_logprobs_store st;
    struct dsv32_logprobs lp;
    Dsv32__V1__Logprobs *lps[1] = {&st.msg};
    for (int b = 0; b < BATCHES; b++) {
        const double t0 = dsv32_mono_s();
        for (int i = 0; i < n; i++) {
            Dsv32__Cluster__V1__RunResponse m;
            if (with_lp) {
                fake_logprobs(ids, n, i, &lp);
                dsv32_api_logprobs_to_pb(tok, &lp, &st);
            }
            run_response(&m, &ids[i], i, with_lp ? lps : NULL);
            uint8_t *buf;
            size_t len;
            if (dsv32_rpc_pack(&m.base, &buf, &len) < 0)
                exit(1);
            free(buf);
        }
        t[b] = (dsv32_mono_s() - t0) / n * 1e6;
    }
    return gen_pct(t, BATCHES, 0.5);
}

/* ---- the gRPC stream write ---- */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct dsv32_rpc_call *calls[MAX_STREAMS];
    int n_calls;
} srv_state = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 0};

static void h_run(void *arg, struct dsv32_rpc_call *c, const uint8_t *req, size_t len)
{
    (void)arg, (void)req, (void)len;
    pthread_mutex_lock(&srv_state.mu);
    srv_state.calls[srv_state.n_calls++] = c;
    pthread_cond_broadcast(&srv_state.cv);
    pthread_mutex_unlock(&srv_state.mu);
}

struct reader {
    struct dsv32_rpc_stream **streams;
    int n_streams, n_steps;
    atomic_int received; /* messages read, all streams */
    int failed;
};

/* The client: one message of each stream per step, in the order they are written. */
static void *reader_main(void *arg)
{
    struct reader *rd = arg;
    for (int step = 0; step < rd->n_steps; step++)
        for (int k = 0; k < rd->n_streams; k++) {
            uint8_t *buf;
            size_t len;
            if (dsv32_rpc_stream_read(rd->streams[k], 10000, &buf, &len) != 1) {
                rd->failed = 1;
                atomic_fetch_add(&rd->received, 1 << 30);
                return NULL;
            }
            free(buf);
            atomic_fetch_add(&rd->received, 1);
        }
    return NULL;
}

/* n_steps steps; each packs and writes one RunResponse to each of n_streams streams (timed), then
 * waits for the client to have read them (not timed: the GPU step would run then). us per write,
 * median over batches of steps. */
static int time_grpc(int32_t *ids, int n, int n_streams, double *ret_us)
{
    struct dsv32_rpc_server_config cfg = {.listen = "127.0.0.1:0",
                                          .max_send_bytes = 64u << 20,
                                          .max_calls = MAX_STREAMS + 8,
                                          .max_stream_queue = 4096};
    struct dsv32_rpc_server *srv = NULL;
    struct dsv32_rpc_client *cli = NULL;
    struct dsv32_rpc_stream *streams[MAX_STREAMS] = {0};
    int port, r;
    char target[64];
    if ((r = dsv32_rpc_server_new(&cfg, &srv)) < 0 ||
        (r = dsv32_rpc_server_add_method(srv, "/b.B/Run", DSV32_RPC_SERVER_STREAM, 0, h_run,
                                         NULL)) < 0 ||
        (r = dsv32_rpc_server_start(srv, &port)) < 0)
        goto out;
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    struct dsv32_rpc_client_config cc = {.target = target};
    if ((r = dsv32_rpc_client_new(&cc, &cli)) < 0)
        goto out;
    for (int k = 0; k < n_streams; k++)
        if ((r = dsv32_rpc_stream_open(cli, "/b.B/Run", "x", 1, 120000, DSV32_RPC_WAIT_FOR_READY,
                                       &streams[k])) < 0)
            goto out;
    pthread_mutex_lock(&srv_state.mu);
    while (srv_state.n_calls < n_streams)
        pthread_cond_wait(&srv_state.cv, &srv_state.mu);
    pthread_mutex_unlock(&srv_state.mu);

    const int steps_per_batch = (n + n_streams - 1) / n_streams;
    struct reader rd = {
        .streams = streams, .n_streams = n_streams, .n_steps = steps_per_batch * BATCHES};
    pthread_t th;
    if (pthread_create(&th, NULL, reader_main, &rd) != 0) {
        r = -ENOMEM;
        goto out;
    }
    double t[BATCHES];
    int sent = 0, offset = 0;
    for (int b = 0; b < BATCHES; b++) {
        double busy = 0;
        for (int step = 0; step < steps_per_batch; step++) {
            const double t0 = dsv32_mono_s();
            for (int k = 0; k < n_streams; k++) {
                Dsv32__Cluster__V1__RunResponse m;
                run_response(&m, &ids[(offset * n_streams + k) % n], offset, NULL);
                if ((r = dsv32_rpc_call_write_msg(srv_state.calls[k], &m.base)) < 0)
                    break;
            }
            busy += dsv32_mono_s() - t0;
            offset++;
            sent += n_streams;
            while (r == 0 && atomic_load(&rd.received) < sent)
                sched_yield();
            if (r < 0 || rd.failed)
                break;
        }
        if (r < 0 || rd.failed)
            break;
        t[b] = busy / ((double)steps_per_batch * n_streams) * 1e6;
    }
    if (r < 0 || rd.failed)
        for (int k = 0; k < n_streams; k++)
            dsv32_rpc_stream_cancel(streams[k]);
    pthread_join(th, NULL);
    if (r == 0 && rd.failed)
        r = -EIO;
    if (r == 0)
        *ret_us = gen_pct(t, BATCHES, 0.5);
    for (int k = 0; k < srv_state.n_calls; k++)
        dsv32_rpc_call_finish(srv_state.calls[k], DSV32_RPC_OK, NULL);
    srv_state.n_calls = 0;
out:
    for (int k = 0; k < n_streams; k++)
        dsv32_rpc_stream_free(streams[k]);
    dsv32_rpc_client_free(cli);
    dsv32_rpc_server_free(srv);
    return r;
}

/* ---- client of a running attention daemon ---- */

struct attn_stream {
    pthread_t th;
    struct dsv32_rpc_client *cli;
    int idx, max_tokens;
    int n_tokens, rc;
};

static void *attn_stream_main(void *arg)
{
    struct attn_stream *as = arg;
    char rid[32];
    int32_t prompt[16];
    snprintf(rid, sizeof(rid), "sb-%d-%d", (int)getpid(), as->idx);
    for (int i = 0; i < 16; i++)
        prompt[i] = 100 + (as->idx * 16 + i) % 800;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = (uint32_t)as->max_tokens;
    sp.ignore_eos = 1;
    sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
    sp.seed = (uint64_t)as->idx + 1;
    Dsv32__Cluster__V1__RunRequest req = DSV32__CLUSTER__V1__RUN_REQUEST__INIT;
    req.request_id = rid;
    req.n_prompt_token_ids = 16;
    req.prompt_token_ids = prompt;
    req.sampling = &sp;
    struct dsv32_rpc_stream *st;
    as->rc = dsv32_rpc_stream_open_msg(as->cli, "/dsv32.cluster.v1.Attn/Run", &req.base, 600000,
                                       DSV32_RPC_WAIT_FOR_READY, &st);
    if (as->rc < 0)
        return NULL;
    for (;;) {
        ProtobufCMessage *m;
        int r =
            dsv32_rpc_stream_read_msg(st, &dsv32__cluster__v1__run_response__descriptor, -1, &m);
        if (r <= 0) {
            as->rc = r;
            break;
        }
        as->n_tokens += (int)((Dsv32__Cluster__V1__RunResponse *)m)->n_token_ids;
        protobuf_c_message_free_unpacked(m, NULL);
    }
    dsv32_rpc_stream_free(st);
    return NULL;
}

static int attn_client(const char *target, int n_streams, int max_tokens)
{
    struct dsv32_rpc_client_config cc = {.target = target, .max_recv_bytes = 64u << 20};
    struct dsv32_rpc_client *cli;
    int r = dsv32_rpc_client_new(&cc, &cli);
    if (r < 0)
        return r;
    struct attn_stream *as = calloc((size_t)n_streams, sizeof(*as));
    if (!as) {
        dsv32_rpc_client_free(cli);
        return -ENOMEM;
    }
    const double t0 = dsv32_mono_s();
    int started = 0;
    for (; started < n_streams; started++) {
        as[started] = (struct attn_stream){.cli = cli, .idx = started, .max_tokens = max_tokens};
        if (pthread_create(&as[started].th, NULL, attn_stream_main, &as[started]) != 0) {
            r = -EAGAIN;
            break;
        }
    }
    long tokens = 0;
    for (int i = 0; i < started; i++) {
        pthread_join(as[i].th, NULL);
        tokens += as[i].n_tokens;
        if (as[i].rc < 0 && r == 0)
            r = as[i].rc;
    }
    const double dt = dsv32_mono_s() - t0;
    printf("%d streams, %ld tokens in %.2f s: %.1f tokens/s\n", started, tokens, dt, tokens / dt);
    free(as);
    dsv32_rpc_client_free(cli);
    return r;
}

int main(int argc, char **argv)
{
    const char *dir = DSV32_TOKENIZER_DIR, *attn = NULL;
    int n = 0, streams[2] = {1, 64}, n_stream_cases = 2; /* n 0: 10,000 (200 with --attn) */
    static const struct option opts[] = {{"tokenizer", required_argument, NULL, 't'},
                                         {"tokens", required_argument, NULL, 'n'},
                                         {"streams", required_argument, NULL, 's'},
                                         {"attn", required_argument, NULL, 'a'},
                                         {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 't')
            dir = optarg;
        else if (c == 'a')
            attn = optarg;
        else if (c == 'n')
            n = atoi(optarg);
        else if (c == 's') {
            streams[0] = atoi(optarg);
            n_stream_cases = 1;
        } else {
            fprintf(stderr,
                    "usage: %s [--tokenizer DIR] [--tokens N] [--streams S] "
                    "[--attn HOST:PORT]\n",
                    argv[0]);
            return 2;
        }
    }
    if (n < 0 || streams[0] <= 0 || streams[0] > MAX_STREAMS) {
        fprintf(stderr, "--tokens > 0, --streams in [1, %d]\n", MAX_STREAMS);
        return 2;
    }
    if (attn) {
        int r = attn_client(attn, n_stream_cases == 1 ? streams[0] : 64, n ? n : 200);
        if (r < 0)
            fprintf(stderr, "%s: %s\n", attn, dsv32_strerror(r));
        return r < 0;
    }
    n = n ? n : 10000;
    struct dsv32_tok *tok;
    int r = dsv32_tok_load(dir, &tok);
    if (r < 0) {
        fprintf(stderr, "%s: %s\n", dir, dsv32_strerror(r));
        return 1;
    }
    int32_t *ids = random_ids(tok, n);
    if (!ids)
        return 1;
    const char *const stops[] = {"\n\nUser:", "</answer>"};
    size_t bytes;
    double us = time_detok(tok, ids, n, NULL, 0, &bytes);
    printf("%d random ordinary ids, %.1f text bytes per token\n", n, (double)bytes / n);
    printf("%-44s %7.3f us per token\n", "detokenize (no stop strings)", us);
    us = time_detok(tok, ids, n, stops, 2, &bytes);
    printf("%-44s %7.3f us per token\n", "detokenize + 2 stop strings (tg_on_token)", us);
    printf("%-44s %7.3f us per token\n", "pack RunResponse", time_pack(tok, ids, n, 0));
    printf("%-44s %7.3f us per token\n", "pack RunResponse + 5 top logprobs",
           time_pack(tok, ids, n, 1));
    for (int k = 0; k < n_stream_cases; k++) {
        if ((r = time_grpc(ids, n, streams[k], &us)) < 0) {
            fprintf(stderr, "gRPC stream: %s\n", dsv32_strerror(r));
            return 1;
        }
        char name[64];
        snprintf(name, sizeof(name), "pack + gRPC stream write (%d stream%s)", streams[k],
                 streams[k] > 1 ? "s" : "");
        printf("%-44s %7.3f us per token\n", name, us);
    }
    free(ids);
    dsv32_tok_free(tok);
    return 0;
}
