/* dsv32-run: runs the engine from the command line.
 *   dsv32-run --model DIR --golden FILE     teacher-forced comparison with DeepSeek's reference
 *   dsv32-run --model DIR --prompt-ids 5,17,42 --max-tokens N     greedy generation, prints ids */
#include "engine.h"
#include "error.h"
#include "golden.h"
#include "log.h"
#include "safetensors.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PROMPT 65536

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsv32-run --model DIR --golden FILE [--schedule sequential|batched|staggered|all]\n"
            "       dsv32-run --model DIR --prompt-ids ID,ID,... [--max-tokens N]\n"
            "options: --backend cpu|cuda  --kv-layout production|reference  --quiet  --tol X\n"
            "         --no-tie-search (do not resolve FP8 rounding ties, see tests/golden/README.md)\n"
            "         --tie-rel X (how close to a rounding midpoint counts as a tie; default 1e-6)\n");
}

static int parse_ids(const char *s, int32_t *ids, int cap, int vocab)
{
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab) {
            fprintf(stderr, "dsv32-run: --prompt-ids: '%s' is not a token id in [0, %d)\n", p, vocab);
            return -EINVAL;
        }
        if (n == cap) {
            fprintf(stderr, "dsv32-run: --prompt-ids: more than %d ids\n", cap);
            return -E2BIG;
        }
        ids[n++] = (int32_t)v;
        p = end;
        if (*p == ',')
            p++;
        else if (*p) {
            fprintf(stderr, "dsv32-run: --prompt-ids: unexpected '%c'\n", *p);
            return -EINVAL;
        }
    }
    if (n == 0) {
        fprintf(stderr, "dsv32-run: --prompt-ids: empty\n");
        return -EINVAL;
    }
    return n;
}

static int generate(struct dsv32_engine *e, const int32_t *prompt, int n, int max_tokens)
{
    const int V = e->cfg->vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)V);
    int seq = dsv32_kv_seq_new(e->kv), r = 0;
    if (!logits || seq < 0) {
        free(logits);
        return seq < 0 ? seq : -ENOMEM;
    }
    int32_t tok;
    struct dsv32_seq_input in = {.seq = seq, .n_tokens = n, .tokens = prompt,
                                 .logits = DSV32_LOGITS_LAST};
    for (int i = 0; i < max_tokens; i++) {
        if ((r = dsv32_engine_step(e, &in, 1, logits, NULL)) < 0)
            break;
        int b = 0;
        for (int v = 1; v < V; v++)
            if (logits[v] > logits[b])
                b = v;
        tok = b;
        printf(i ? ",%d" : "%d", tok);
        fflush(stdout);
        if (tok == e->cfg->eos_token_id)
            break;
        in = (struct dsv32_seq_input){.seq = seq, .n_tokens = 1, .tokens = &tok,
                                      .logits = DSV32_LOGITS_LAST};
    }
    printf("\n");
    dsv32_kv_seq_free(e->kv, seq);
    free(logits);
    return r;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},     {"golden", required_argument, 0, 'g'},
        {"prompt-ids", required_argument, 0, 'p'}, {"max-tokens", required_argument, 0, 'n'},
        {"backend", required_argument, 0, 'b'},   {"schedule", required_argument, 0, 's'},
        {"kv-rope-f32", no_argument, 0, 'f'},     {"quiet", no_argument, 0, 'q'},
        {"tol", required_argument, 0, 't'},       {"help", no_argument, 0, 'h'},
        {"kv-layout", required_argument, 0, 'k'}, {"no-tie-search", no_argument, 0, 'T'},
        {"tie-rel", required_argument, 0, 'r'},
        {0, 0, 0, 0},
    };
    const char *model = NULL, *golden = NULL, *ids = NULL, *backend = "cpu", *schedule = "sequential";
    int max_tokens = 16, rope_f32 = -1, quiet = 0, resolve_ties = 1, c;
    double tol = 5e-3, tie_rel = 0;
    dsv32_log_set_ident("dsv32-run");
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'g': golden = optarg; break;
        case 'p': ids = optarg; break;
        case 'n': max_tokens = atoi(optarg); break;
        case 'b': backend = optarg; break;
        case 's': schedule = optarg; break;
        case 'f': rope_f32 = 1; break;
        case 'T': resolve_ties = 0; break;
        case 'k':
            if (strcmp(optarg, "production") == 0)
                rope_f32 = 0;
            else if (strcmp(optarg, "reference") == 0)
                rope_f32 = 1;
            else {
                fprintf(stderr, "dsv32-run: --kv-layout is production or reference\n");
                return 2;
            }
            break;
        case 'q': quiet = 1; break;
        case 't': tol = atof(optarg); break;
        case 'r': tie_rel = atof(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!model || (!golden == !ids) || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (max_tokens < 1 || max_tokens > 1000000) {
        fprintf(stderr, "dsv32-run: --max-tokens must be in [1, 1000000]\n");
        return 2;
    }
    static const char *const scheds[] = {"sequential", "batched", "staggered"};
    int sched_first = -1, sched_last = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(schedule, scheds[i]) == 0)
            sched_first = sched_last = i;
    if (strcmp(schedule, "all") == 0) {
        sched_first = 0;
        sched_last = 2;
    }
    if (sched_first < 0) {
        fprintf(stderr, "dsv32-run: unknown --schedule '%s'\n", schedule);
        return 2;
    }

    struct dsv32_model *m;
    int r = dsv32_model_load(model, NULL, &m);
    if (r < 0) {
        fprintf(stderr, "dsv32-run: %s\n", dsv32_load_error());
        return 1;
    }
    /* The golden vectors come from a run with f32 activations, whose rope cache was f32: compare
     * in that layout unless asked otherwise. Serving uses the production layout (bf16 rope). */
    if (rope_f32 < 0)
        rope_f32 = golden != NULL;
    struct dsv32_engine *e;
    struct dsv32_engine_opts eo = {.backend = backend, .kv_rope_f32 = rope_f32,
                                   .max_seq_len = m->cfg.max_position_embeddings < 8192
                                                      ? m->cfg.max_position_embeddings : 8192,
                                   .max_seqs = 16, .max_batch_tokens = 2048};
    if ((r = dsv32_engine_new(m, &eo, &e)) < 0) {
        fprintf(stderr, "dsv32-run: %s\n", dsv32_load_error());
        dsv32_model_free(m);
        return 1;
    }
    int status = 0;
    if (ids) {
        int32_t *prompt = malloc(sizeof(int32_t) * MAX_PROMPT);
        int n = prompt ? parse_ids(ids, prompt, MAX_PROMPT, m->cfg.vocab_size) : -ENOMEM;
        if (n < 0)
            status = 2;
        else if ((r = generate(e, prompt, n, max_tokens)) < 0) {
            fprintf(stderr, "dsv32-run: generation failed: %s\n", dsv32_strerror(r));
            status = 1;
        }
        free(prompt);
    } else {
        struct golden_set *g;
        if ((r = golden_open(golden, m->cfg.num_hidden_layers, m->cfg.vocab_size,
                             m->cfg.hidden_size, &g)) < 0) {
            fprintf(stderr, "dsv32-run: %s\n", dsv32_load_error());
            status = 1;
        } else {
            int all_pass = 1;
            for (int s = sched_first; s <= sched_last; s++) {
                struct golden_opts go = {.tol = tol, .gap = 0.02, .schedule = (enum golden_schedule)s,
                                         .verbose = !quiet, .out = stdout,
                                         .resolve_ties = resolve_ties, .tie_rel = tie_rel};
                struct golden_result res;
                printf("== %s: %d cases, schedule %s, backend %s, KV layout %s (rope %s)\n",
                       golden, g->n_cases, scheds[s], e->be->ops->name,
                       rope_f32 ? "reference" : "production", rope_f32 ? "f32" : "bf16");
                if ((r = golden_run(e, g, &go, &res)) < 0) {
                    fprintf(stderr, "dsv32-run: step failed: %s\n", dsv32_strerror(r));
                    all_pass = 0;
                    break;
                }
                int pass = golden_passed(&res);
                printf("logit rows %d (failed %d, max rel %.3e); argmax checked %d (failed %d); "
                       "selections %d (failed %d); hidden rows %d (failed %d, max rel %.3e)\n",
                       res.rows, res.rows_failed, res.max_rel_logits, res.argmax_checked,
                       res.argmax_failed, res.sel_checked, res.sel_failed, res.hidden_checked,
                       res.hidden_failed, res.max_rel_hidden);
                if (res.ties_resolved)
                    printf("FP8 rounding ties resolved: %d (search runs: %d)\n", res.ties_resolved,
                           res.tie_trials);
                printf("%s\n", pass ? "PASS" : "FAIL");
                all_pass &= pass;
            }
            status = all_pass ? 0 : 1;
            golden_close(g);
        }
    }
    dsv32_engine_free(e);
    dsv32_model_free(m);
    return status;
}
