/* The teacher-forced golden comparison of tests/golden/README.md, as a library: dsv32-run --golden
 * prints it, and the expert-parallel tests run the same cases through a cluster. */
#ifndef DSV32_GOLDEN_H
#define DSV32_GOLDEN_H

#include <stdint.h>
#include <stdio.h>

#include "engine.h"

struct golden_case {
    char name[32];
    int prompt_len, steps, topk_width;
    const int32_t *prompt;  /* (prompt_len) */
    const int32_t *tokens;  /* (steps) */
    const float *logits;    /* (steps, vocab) */
    const float **hidden;   /* (layers) each (prompt_len, D), NULL when absent */
    const int32_t **topk;   /* (layers) each (steps, topk_width), NULL when absent */
};

struct golden_set {
    struct dsv32_st_file *file;
    int n_cases, n_layers, vocab, dim;
    struct golden_case *cases;
};

/* Reads FILE (golden.safetensors; its sibling golden.json is not needed: cases are found by name). */
int golden_open(const char *path, int n_layers, int vocab, int dim, struct golden_set **ret);
void golden_close(struct golden_set *g);

enum golden_schedule {
    GOLDEN_SEQUENTIAL, /* one case at a time */
    GOLDEN_BATCHED,    /* all cases in the same steps */
    GOLDEN_STAGGERED,  /* case k starts at step k: prefills and decodes mixed in one step */
};

struct golden_opts {
    double tol;           /* relative L2 per row, 5e-3 */
    double gap;           /* argmax checked where top1 - top2 >= gap, 0.02 */
    enum golden_schedule schedule;
    int verbose;          /* print every row */
    FILE *out;            /* report; NULL = silent */
    /* FP8 rounding ties (see dtype.h): when a run fails, look for activations the engine
     * quantized within tie_rel (relative) of a rounding midpoint before the first failing check,
     * and retry with such ties rounded the other way, one more at a time, while the first failure
     * moves later. Both roundings of such a value are faithful executions of the reference in f32
     * (its summation order decides), so a run that passes after resolving ties matches it. */
    int resolve_ties;
    double tie_rel;       /* default 1e-6 (about 8 f32 ulps) */
    int max_tie_trials;   /* default 200 */
    /* Routed experts elsewhere (expert-parallel checks); NULL = local. */
    const struct dsv32_step_hooks *extra_hooks;
};

struct golden_result {
    int rows, rows_failed, argmax_checked, argmax_failed, sel_checked, sel_failed;
    int hidden_checked, hidden_failed;
    double max_rel_logits, max_rel_hidden;
    int ties_resolved;    /* near-ties rounded the other way to match */
    int tie_trials;       /* extra runs the search took */
};

/* Runs every case on the engine (sequences are created and freed here). Returns 0 when it ran
 * (see res for PASS/FAIL), negative on an engine error. */
int golden_run(struct dsv32_engine *e, const struct golden_set *g, const struct golden_opts *o,
               struct golden_result *res);
static inline int golden_passed(const struct golden_result *r)
{
    return r->rows > 0 && r->rows_failed == 0 && r->argmax_failed == 0 && r->sel_failed == 0 &&
           r->hidden_failed == 0;
}

#endif
