/* scale_client: the throughput side of the scale benchmark (bench/scale.sh, docs/BENCHMARKS.md
 * "Scale run"). Against a running router it measures, through the public Generate API:
 *   prefill  --prefill-streams requests of --prompt-tokens random token ids with max_tokens 1, all
 *            at once: prompt tokens per second over the wall time of the batch;
 *   decode   for each concurrency N of --streams: N requests of --prompt-tokens ids generating
 *            --max-tokens each (ignore_eos), all at once; per stream the time to first token and
 *            its decode rate (tokens after the first over the time since the first); the
 *            aggregate decode rate counts the tokens that arrived while every stream was past its
 *            first token and none had finished (the steady state), over that window; that rate
 *            per stream is the steady per-user rate (its inverse the decode step). --max-tokens
 *            must outlast the last stream's prefill for there to be such a window.
 * One line per measurement, and with --json FILE the same as JSON. Exit 0 only when every request
 * ended with the tokens it asked for.
 * Every request samples with --temperature (default: the API's, 1) and --top-p (default: off).
 *   scale_client --router HOST:PORT [--prompt-tokens P] [--max-tokens T] [--streams N[,N...]]
 *                [--prefill-streams N] [--gpus G] [--vocab V] [--json FILE] [--temperature T]
 *                [--top-p P] */
#define _GNU_SOURCE 1
#include "dsv32.pb-c.h"
#include "error.h"
#include "gen_stream.h"
#include "rpc.h"

#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_STREAMS 2048
#define MAX_LEVELS 16

struct stream {
    pthread_t thread;
    struct dsv32_rpc_client *client;
    int index, n_prompt, max_tokens, vocab;
    uint64_t seed;
    struct gen_result res; /* res.arrival: per token, monotonic us */
    int ok;
};

/* the requests' sampling (--temperature: < 0 leaves it unset; --top-p: 1 is off) */
static float req_temperature = -1.0f, req_top_p = 1.0f;

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void *run_stream(void *arg)
{
    struct stream *s = arg;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)s->n_prompt);
    if (!ids) {
        snprintf(s->res.error, sizeof(s->res.error), "out of memory");
        return NULL;
    }
    /* ordinary tokens only (ids below the vocabulary's special range), different per stream */
    for (int i = 0; i < s->n_prompt; i++)
        ids[i] = 100 + (int32_t)(mix(s->seed * 1000003u + (uint64_t)i) % (uint64_t)(s->vocab - 100));
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    Dsv32__V1__TokenIds tid = DSV32__V1__TOKEN_IDS__INIT;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    tid.n_ids = (size_t)s->n_prompt;
    tid.ids = ids;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
    req.token_ids = &tid;
    sp.max_tokens = (uint32_t)s->max_tokens;
    if (req_temperature >= 0.0f) {
        sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
        sp.temperature = req_temperature;
    }
    sp.top_p = req_top_p;
    sp.ignore_eos = 1;
    req.sampling = &sp;
    const int rc = gen_stream_run(s->client, &req, 3600000, &s->res);
    free(ids);
    if (rc < 0)
        return NULL;
    if (s->res.tokens != s->max_tokens)
        snprintf(s->res.error, sizeof(s->res.error), "%d of %d tokens", s->res.tokens, s->max_tokens);
    else
        s->ok = 1;
    return NULL;
}

struct level {
    int streams, prompt, max_tokens, failed;
    double wall_s, ttft_p50_ms, ttft_p99_ms, user_p50, user_min, steady_tps, steady_s;
    double steady_user; /* per stream in the steady window: steady_tps / streams */
};

/* Runs n streams at once; fills lv. */
static int run_level(struct dsv32_rpc_client *client, int n, int prompt, int max_tokens, int vocab,
                     uint64_t seed, struct level *lv)
{
    struct stream *s = calloc((size_t)n, sizeof(*s));
    double *ttft = calloc((size_t)n, sizeof(double)), *user = calloc((size_t)n, sizeof(double));
    if (!s || !ttft || !user)
        return -1;
    memset(lv, 0, sizeof(*lv));
    lv->streams = n;
    lv->prompt = prompt;
    lv->max_tokens = max_tokens;
    const int64_t t0 = gen_now_us();
    int started = 0;
    for (int i = 0; i < n; i++) {
        s[i] = (struct stream){.client = client, .index = i, .n_prompt = prompt,
                               .max_tokens = max_tokens, .vocab = vocab,
                               .seed = seed * 7919u + (uint64_t)i};
        s[i].res.arrival = calloc((size_t)max_tokens, sizeof(int64_t));
        s[i].res.arrival_cap = max_tokens;
        if (!s[i].res.arrival || pthread_create(&s[i].thread, NULL, run_stream, &s[i]) != 0) {
            snprintf(s[i].res.error, sizeof(s[i].res.error), "could not start the stream");
            break;
        }
        started++;
    }
    for (int i = 0; i < started; i++)
        pthread_join(s[i].thread, NULL);
    const int64_t t1 = gen_now_us();
    lv->wall_s = (double)(t1 - t0) / 1e6;
    int64_t win_lo = 0, win_hi = INT64_MAX;
    int n_ok = 0;
    for (int i = 0; i < n; i++) {
        const struct gen_result *g = &s[i].res;
        if (!s[i].ok) {
            if (lv->failed++ < 5)
                fprintf(stderr, "scale_client: stream %d: %s\n", i, g->error);
            continue;
        }
        ttft[n_ok] = (double)(g->first_us - g->start_us) / 1e3;
        const int64_t last = g->arrival[g->tokens - 1];
        user[n_ok] = g->tokens > 1 && last > g->first_us
                         ? (double)(g->tokens - 1) / ((double)(last - g->first_us) / 1e6)
                         : 0;
        if (g->first_us > win_lo)
            win_lo = g->first_us;
        if (last < win_hi)
            win_hi = last;
        n_ok++;
    }
    if (n_ok > 0 && win_hi > win_lo) {
        int64_t count = 0;
        for (int i = 0; i < n; i++)
            for (int t = 0; s[i].ok && t < s[i].res.tokens; t++)
                count += s[i].res.arrival[t] > win_lo && s[i].res.arrival[t] <= win_hi;
        lv->steady_s = (double)(win_hi - win_lo) / 1e6;
        lv->steady_tps = (double)count / lv->steady_s;
        lv->steady_user = lv->steady_tps / n_ok;
    }
    lv->ttft_p50_ms = gen_pct(ttft, n_ok, 0.5);
    lv->ttft_p99_ms = gen_pct(ttft, n_ok, 0.99);
    lv->user_p50 = gen_pct(user, n_ok, 0.5);
    lv->user_min = n_ok ? user[0] : 0; /* sorted by gen_pct */
    for (int i = 0; i < n; i++)
        free(s[i].res.arrival);
    free(s);
    free(ttft);
    free(user);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"router", required_argument, 0, 'r'},
                                         {"prompt-tokens", required_argument, 0, 'p'},
                                         {"max-tokens", required_argument, 0, 't'},
                                         {"streams", required_argument, 0, 's'},
                                         {"prefill-streams", required_argument, 0, 'P'},
                                         {"gpus", required_argument, 0, 'g'},
                                         {"vocab", required_argument, 0, 'v'},
                                         {"json", required_argument, 0, 'j'},
                                         {"temperature", required_argument, 0, 'T'},
                                         {"top-p", required_argument, 0, 'o'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *router = NULL, *streams = "1,8,32", *json = NULL;
    int prompt = 4096, max_tokens = 128, prefill_streams = 8, gpus = 1, vocab = 128000, c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'r': router = optarg; break;
        case 'p': prompt = atoi(optarg); break;
        case 't': max_tokens = atoi(optarg); break;
        case 's': streams = optarg; break;
        case 'P': prefill_streams = atoi(optarg); break;
        case 'g': gpus = atoi(optarg); break;
        case 'v': vocab = atoi(optarg); break;
        case 'j': json = optarg; break;
        case 'T':
            req_temperature = strtof(optarg, NULL);
            break;
        case 'o':
            req_top_p = strtof(optarg, NULL);
            break;
        default:
            fprintf(stderr, "usage: scale_client --router HOST:PORT [--prompt-tokens P] "
                            "[--max-tokens T] [--streams N[,N...]] [--prefill-streams N] "
                            "[--gpus G] [--vocab V] [--json FILE] [--temperature T] [--top-p P]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    int levels[MAX_LEVELS], n_levels = 0;
    for (const char *p = streams; *p && n_levels < MAX_LEVELS;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > MAX_STREAMS) {
            n_levels = -1;
            break;
        }
        levels[n_levels++] = (int)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            n_levels = -1;
            break;
        }
    }
    if (!router || optind != argc || n_levels < 1 || prompt < 1 || max_tokens < 2 ||
        prefill_streams < 0 || prefill_streams > MAX_STREAMS || gpus < 1 || vocab < 200 ||
        !(req_temperature < 0.0f || req_temperature <= 100.0f) ||
        !(req_top_p > 0.0f && req_top_p <= 1.0f)) {
        fprintf(
            stderr,
            "scale_client: --router HOST:PORT; --streams 1..%d each (comma-separated); "
            "--max-tokens >= 2; --prompt-tokens >= 1; --temperature 0..100; --top-p in (0, 1]\n",
            MAX_STREAMS);
        return 2;
    }
    struct dsv32_rpc_client *client;
    struct dsv32_rpc_client_config cc = {.target = router, .max_recv_bytes = 64u << 20};
    int r = dsv32_rpc_client_new(&cc, &client);
    if (r < 0) {
        fprintf(stderr, "scale_client: %s: %s\n", router, dsv32_strerror(r));
        return 1;
    }
    FILE *jf = json ? fopen(json, "w") : NULL;
    if (json && !jf) {
        fprintf(stderr, "scale_client: cannot write %s\n", json);
        return 1;
    }
    if (jf)
        fprintf(jf, "{\"prompt_tokens\":%d,\"max_tokens\":%d,\"gpus\":%d", prompt, max_tokens, gpus);
    int failed = 0;
    struct level lv;
    /* warm-up: every daemon's first step pays for lazy allocations */
    if (run_level(client, 2, 16, 2, vocab, 1, &lv) < 0 || lv.failed) {
        fprintf(stderr, "scale_client: the warm-up request failed\n");
        return 1;
    }
    if (prefill_streams > 0) {
        if (run_level(client, prefill_streams, prompt, 2, vocab, 2, &lv) < 0)
            return 1;
        failed += lv.failed;
        double tps = (double)prefill_streams * prompt / lv.wall_s;
        printf("prefill: %d requests x %d tokens in %.2f s: %.0f prompt tokens/s (%.0f per GPU), "
               "time to first token p50 %.0f ms p99 %.0f ms\n",
               prefill_streams, prompt, lv.wall_s, tps, tps / gpus, lv.ttft_p50_ms, lv.ttft_p99_ms);
        if (jf)
            fprintf(jf, ",\"prefill\":{\"requests\":%d,\"wall_s\":%.4f,\"tokens_per_s\":%.1f,"
                        "\"ttft_p50_ms\":%.1f,\"ttft_p99_ms\":%.1f}",
                    prefill_streams, lv.wall_s, tps, lv.ttft_p50_ms, lv.ttft_p99_ms);
    }
    if (jf)
        fprintf(jf, ",\"decode\":[");
    for (int i = 0; i < n_levels; i++) {
        if (run_level(client, levels[i], prompt, max_tokens, vocab, 100 + (uint64_t)i, &lv) < 0)
            return 1;
        failed += lv.failed;
        const double step_ms = lv.steady_user > 0 ? 1e3 / lv.steady_user : 0; /* one stream's step */
        printf("decode: %4d streams: %8.1f tokens/s steady (%.1f per GPU, over %.2f s: %.1f tokens/s "
               "per user, step %.1f ms); whole streams per user p50 %.1f min %.1f tokens/s, time "
               "to first token p50 %.0f ms p99 %.0f ms%s\n",
               lv.streams, lv.steady_tps, lv.steady_tps / gpus, lv.steady_s, lv.steady_user,
               step_ms, lv.user_p50, lv.user_min, lv.ttft_p50_ms, lv.ttft_p99_ms,
               lv.failed ? " (FAILED streams)" : "");
        fflush(stdout);
        if (jf)
            fprintf(jf, "%s{\"streams\":%d,\"steady_tokens_per_s\":%.1f,\"steady_s\":%.3f,"
                        "\"steady_user\":%.2f,\"steady_step_ms\":%.2f,\"user_p50\":%.2f,\"user_min\":%.2f,\"ttft_p50_ms\":%.1f,"
                        "\"ttft_p99_ms\":%.1f,\"failed\":%d}",
                    i ? "," : "", lv.streams, lv.steady_tps, lv.steady_s, lv.steady_user, step_ms,
                    lv.user_p50, lv.user_min,
                    lv.ttft_p50_ms, lv.ttft_p99_ms, lv.failed);
    }
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
    }
    dsv32_rpc_client_free(client);
    if (failed)
        fprintf(stderr, "scale_client: %d requests failed\n", failed);
    return failed ? 1 : 0;
}
