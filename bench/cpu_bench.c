/* CPU engine benchmark: prefill and decode tokens/s on a model directory (the tiny golden models
 * by default), for 1 and 8 sequences. Prints a table; docs/BENCHMARKS.md records the results.
 *   cpu_bench [--model DIR]... [--prompt N] [--decode N] [--repeat N] */
#include "engine.h"
#include "error.h"
#include "safetensors.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One trial: n_seq sequences prefill `prompt` tokens each in one step, then decode `decode`
 * steps of one token each (greedy on the returned logits). Returns the two times. */
static int trial(struct dsv32_engine *e, int n_seq, int prompt, int decode, double *t_prefill,
                 double *t_decode)
{
    const int V = e->cfg->vocab_size;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)n_seq * prompt), next[8];
    float *lg = malloc(sizeof(float) * (size_t)n_seq * V);
    struct dsv32_seq_input in[8];
    int seq[8], r = 0;
    if (!tok || !lg) {
        free(tok);
        free(lg);
        return -ENOMEM;
    }
    for (int i = 0; i < n_seq * prompt; i++)
        tok[i] = (int32_t)((i * 7919u + 13u) % (unsigned)(V - 2)) + 2;
    for (int s = 0; s < n_seq; s++) {
        seq[s] = dsv32_kv_seq_new(e->kv);
        in[s] = (struct dsv32_seq_input){.seq = seq[s], .n_tokens = prompt,
                                         .tokens = tok + (size_t)s * prompt,
                                         .logits = DSV32_LOGITS_LAST};
    }
    double t0 = now_s();
    if ((r = dsv32_engine_step(e, in, n_seq, lg, NULL)) < 0)
        goto out;
    double t1 = now_s();
    for (int d = 0; d < decode; d++) {
        for (int s = 0; s < n_seq; s++) {
            const float *l = lg + (size_t)s * V;
            int b = 0;
            for (int v = 1; v < V; v++)
                if (l[v] > l[b])
                    b = v;
            next[s] = b;
            in[s] = (struct dsv32_seq_input){.seq = seq[s], .n_tokens = 1, .tokens = &next[s],
                                             .logits = DSV32_LOGITS_LAST};
        }
        if ((r = dsv32_engine_step(e, in, n_seq, lg, NULL)) < 0)
            goto out;
    }
    double t2 = now_s();
    *t_prefill = t1 - t0;
    *t_decode = t2 - t1;
out:
    for (int s = 0; s < n_seq; s++)
        dsv32_kv_seq_free(e->kv, seq[s]);
    free(tok);
    free(lg);
    return r;
}

int main(int argc, char **argv)
{
    const char *models[8];
    int n_models = 0, prompt = 256, decode = 64, repeat = 5, c;
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"decode", required_argument, 0, 'd'}, {"repeat", required_argument, 0, 'r'},
        {0, 0, 0, 0}};
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': if (n_models < 8) models[n_models++] = optarg; break;
        case 'p': prompt = atoi(optarg); break;
        case 'd': decode = atoi(optarg); break;
        case 'r': repeat = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: cpu_bench [--model DIR]... [--prompt N] [--decode N] [--repeat N]\n");
            return 2;
        }
    }
    if (n_models == 0) {
        models[n_models++] = DSV32_SOURCE_DIR "/tests/golden/tiny-bf16";
        models[n_models++] = DSV32_SOURCE_DIR "/tests/golden/tiny-fp8";
    }
    if (prompt < 1 || decode < 1 || repeat < 1 || repeat > 100) {
        fprintf(stderr, "cpu_bench: --prompt, --decode, --repeat must be positive\n");
        return 2;
    }
    printf("%-40s %5s %8s %14s %14s\n", "model", "seqs", "prompt", "prefill tok/s", "decode tok/s");
    for (int mi = 0; mi < n_models; mi++) {
        struct dsv32_model *m;
        struct dsv32_engine *e;
        if (dsv32_model_load(models[mi], NULL, &m) < 0) {
            fprintf(stderr, "cpu_bench: %s\n", dsv32_load_error());
            return 1;
        }
        int ctx = prompt + decode + 1;
        struct dsv32_engine_opts eo = {.max_seqs = 8, .max_seq_len = ctx,
                                       .max_batch_tokens = 8 * prompt};
        if (ctx > m->cfg.max_position_embeddings || dsv32_engine_new(m, &eo, &e) < 0) {
            fprintf(stderr, "cpu_bench: %s: %s\n", models[mi],
                    ctx > m->cfg.max_position_embeddings ? "prompt + decode exceed the context"
                                                         : dsv32_load_error());
            dsv32_model_free(m);
            return 1;
        }
        const int seqs[2] = {1, 8};
        for (int si = 0; si < 2; si++) {
            double tp[100], td[100];
            double w1, w2;
            if (trial(e, seqs[si], prompt, decode, &w1, &w2) < 0) /* warm-up */
                return 1;
            for (int r = 0; r < repeat; r++)
                if (trial(e, seqs[si], prompt, decode, &tp[r], &td[r]) < 0)
                    return 1;
            qsort(tp, (size_t)repeat, sizeof(double), cmp_d);
            qsort(td, (size_t)repeat, sizeof(double), cmp_d);
            double p50 = tp[repeat / 2], d50 = td[repeat / 2];
            printf("%-40s %5d %8d %14.0f %14.0f\n", models[mi], seqs[si], prompt,
                   seqs[si] * prompt / p50, seqs[si] * decode / d50);
        }
        dsv32_engine_free(e);
        dsv32_model_free(m);
    }
    return 0;
}
