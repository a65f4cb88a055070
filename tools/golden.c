/* Teacher-forced comparison against DeepSeek's reference outputs; see golden.h. */
#include "golden.h"

#include "error.h"
#include "safetensors.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN_MAX_CASES 64

static const struct dsv32_st_tensor *find(const struct dsv32_st_file *f, const char *name)
{
    for (int i = 0; i < dsv32_st_file_count(f); i++)
        if (strcmp(dsv32_st_file_tensor(f, i)->name, name) == 0)
            return dsv32_st_file_tensor(f, i);
    return NULL;
}

/* Tensors in safetensors files are not necessarily aligned: keep aligned copies. */
static void *aligned_copy(const struct dsv32_st_tensor *t)
{
    void *p = malloc(t->n_bytes ? t->n_bytes : 1);
    if (p)
        memcpy(p, t->data, t->n_bytes);
    return p;
}

void golden_close(struct golden_set *g)
{
    if (!g)
        return;
    for (int c = 0; g->cases && c < g->n_cases; c++) {
        struct golden_case *k = &g->cases[c];
        free((void *)k->prompt);
        free((void *)k->tokens);
        free((void *)k->logits);
        for (int l = 0; l < g->n_layers; l++) {
            if (k->hidden)
                free((void *)k->hidden[l]);
            if (k->topk)
                free((void *)k->topk[l]);
        }
        free(k->hidden);
        free(k->topk);
    }
    free(g->cases);
    dsv32_st_file_close(g->file);
    free(g);
}

int golden_open(const char *path, int n_layers, int vocab, int dim, struct golden_set **ret)
{
    struct golden_set *g = calloc(1, sizeof(*g));
    int r;
    if (!g)
        return -ENOMEM;
    g->n_layers = n_layers;
    g->vocab = vocab;
    g->dim = dim;
    if ((r = dsv32_st_file_open(path, &g->file)) < 0)
        goto fail;
    g->cases = calloc(GOLDEN_MAX_CASES, sizeof(*g->cases));
    if (!g->cases) {
        r = -ENOMEM;
        goto fail;
    }
    for (int c = 0; c < GOLDEN_MAX_CASES; c++) {
        char name[96];
        snprintf(name, sizeof(name), "case%d.prompt", c);
        const struct dsv32_st_tensor *tp = find(g->file, name);
        if (!tp)
            break;
        struct golden_case *k = &g->cases[g->n_cases++];
        snprintf(k->name, sizeof(k->name), "case%d", c);
        snprintf(name, sizeof(name), "case%d.tokens", c);
        const struct dsv32_st_tensor *tt = find(g->file, name);
        snprintf(name, sizeof(name), "case%d.logits", c);
        const struct dsv32_st_tensor *tl = find(g->file, name);
        if (!tt || !tl || tp->dtype != DSV32_DT_I32 || tt->dtype != DSV32_DT_I32 ||
            tl->dtype != DSV32_DT_F32 || tl->n_dims != 2 || tl->shape[1] != vocab ||
            tt->numel != tl->shape[0] || tp->numel < 1) {
            r = dsv32_load_fail(DSV32_EFORMAT, "%s: case%d needs prompt (I32), tokens (I32) and "
                                "logits (F32, [steps, %d])", path, c, vocab);
            goto fail;
        }
        k->prompt_len = (int)tp->numel;
        k->steps = (int)tt->numel;
        k->prompt = aligned_copy(tp);
        k->tokens = aligned_copy(tt);
        k->logits = aligned_copy(tl);
        k->hidden = calloc((size_t)n_layers, sizeof(*k->hidden));
        k->topk = calloc((size_t)n_layers, sizeof(*k->topk));
        if (!k->prompt || !k->tokens || !k->logits || !k->hidden || !k->topk) {
            r = -ENOMEM;
            goto fail;
        }
        for (int l = 0; l < n_layers; l++) {
            snprintf(name, sizeof(name), "case%d.prefill_hidden.layer%d", c, l);
            const struct dsv32_st_tensor *th = find(g->file, name);
            if (th) {
                if (th->dtype != DSV32_DT_F32 || th->n_dims != 2 || th->shape[0] != k->prompt_len ||
                    th->shape[1] != dim) {
                    r = dsv32_load_fail(DSV32_EFORMAT, "%s: %s must be F32 [%d, %d]", path, name,
                                        k->prompt_len, dim);
                    goto fail;
                }
                if (!(k->hidden[l] = aligned_copy(th))) {
                    r = -ENOMEM;
                    goto fail;
                }
            }
            snprintf(name, sizeof(name), "case%d.topk.layer%d", c, l);
            const struct dsv32_st_tensor *ts = find(g->file, name);
            if (ts) {
                if (ts->dtype != DSV32_DT_I32 || ts->n_dims != 2 || ts->shape[0] != k->steps) {
                    r = dsv32_load_fail(DSV32_EFORMAT, "%s: %s must be I32 [%d, k]", path, name,
                                        k->steps);
                    goto fail;
                }
                k->topk_width = (int)ts->shape[1];
                if (!(k->topk[l] = aligned_copy(ts))) {
                    r = -ENOMEM;
                    goto fail;
                }
            }
        }
    }
    if (g->n_cases == 0) {
        r = dsv32_load_fail(DSV32_EFORMAT, "%s: no case0.prompt: not a golden file", path);
        goto fail;
    }
    *ret = g;
    return 0;
fail:
    golden_close(g);
    return r;
}

/* ---- running ---- */

struct active {
    int c;        /* case index */
    int s;        /* local step */
    int row0, n;  /* rows of this input in the step */
};

struct run_ctx {
    const struct golden_set *g;
    const struct golden_opts *o;
    struct golden_result *res;
    struct active *act;
    int n_act;
    const struct dsv32_step_hooks *extra;
    int *sel_ok;  /* (cases, steps) 1 ok, 0 failed, -1 not checked */
    /* the order of checks, for the tie search */
    long check_seq, first_fail_seq;
    uint32_t first_fail_op;
};

static void note_check(struct run_ctx *ctx, int ok)
{
    ctx->check_seq++;
    if (!ok && ctx->first_fail_seq < 0) {
        ctx->first_fail_seq = ctx->check_seq;
        ctx->first_fail_op = dsv32_fp8_probe_cur ? dsv32_fp8_probe_cur->op : 0;
    }
}

static double rel_err(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (isnan(num))
        return INFINITY;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void on_hidden(void *vctx, int layer, const float *x, int rows, int dim)
{
    struct run_ctx *ctx = vctx;
    for (int i = 0; i < ctx->n_act; i++) {
        const struct active *a = &ctx->act[i];
        const struct golden_case *k = &ctx->g->cases[a->c];
        if (a->s != 0 || !k->hidden[layer])
            continue;
        for (int t = 0; t < a->n; t++) {
            double e = rel_err(x + (size_t)(a->row0 + t) * dim, k->hidden[layer] + (size_t)t * dim, dim);
            ctx->res->hidden_checked++;
            note_check(ctx, e <= ctx->o->tol);
            if (e > ctx->res->max_rel_hidden)
                ctx->res->max_rel_hidden = e;
            if (!(e <= ctx->o->tol)) {
                ctx->res->hidden_failed++;
                if (ctx->o->out)
                    fprintf(ctx->o->out, "%s layer %d prefill row %d: hidden rel %.3e > %.1e FAIL\n",
                            k->name, layer, t, e, ctx->o->tol);
            }
        }
    }
    if (ctx->extra && ctx->extra->hidden)
        ctx->extra->hidden(ctx->extra->ctx, layer, x, rows, dim);
}

static void on_selection(void *vctx, int layer, const int32_t *sel, int rows, int topk)
{
    struct run_ctx *ctx = vctx;
    for (int i = 0; i < ctx->n_act; i++) {
        const struct active *a = &ctx->act[i];
        const struct golden_case *k = &ctx->g->cases[a->c];
        if (!k->topk[layer])
            continue;
        const int32_t *mine = sel + (size_t)(a->row0 + a->n - 1) * topk;
        const int32_t *want = k->topk[layer] + (size_t)a->s * k->topk_width;
        int ok = 1;
        for (int j = 0; j < (topk > k->topk_width ? topk : k->topk_width); j++) {
            int32_t m = j < topk ? mine[j] : -1, w = j < k->topk_width ? want[j] : -1;
            ok &= m == w;
        }
        ctx->res->sel_checked++;
        note_check(ctx, ok);
        int *slot = &ctx->sel_ok[a->c * 4096 + a->s];
        if (!ok) {
            ctx->res->sel_failed++;
            *slot = 0;
            if (ctx->o->out) {
                fprintf(ctx->o->out, "%s row %d layer %d: selection differs\n  got ", k->name, a->s, layer);
                for (int j = 0; j < topk; j++)
                    fprintf(ctx->o->out, " %d", mine[j]);
                fprintf(ctx->o->out, "\n  want");
                for (int j = 0; j < k->topk_width; j++)
                    fprintf(ctx->o->out, " %d", want[j]);
                fprintf(ctx->o->out, "\n");
            }
        } else if (*slot != 0) {
            *slot = 1;
        }
    }
    if (ctx->extra && ctx->extra->selection)
        ctx->extra->selection(ctx->extra->ctx, layer, sel, rows, topk);
}

/* The caller's expert-parallel hook, called with the caller's own context. */
static int on_moe(void *vctx, int layer, float *y, const float *x, int rows, const int32_t *ids,
                  const float *w, int k)
{
    struct run_ctx *ctx = vctx;
    return ctx->extra->moe_routed(ctx->extra->ctx, layer, y, x, rows, ids, w, k);
}

static int argmax(const float *v, int n, float *gap)
{
    int b = 0, b2 = -1;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b])
            b = i;
    for (int i = 0; i < n; i++)
        if (i != b && (b2 < 0 || v[i] > v[b2]))
            b2 = i;
    if (gap)
        *gap = b2 >= 0 ? v[b] - v[b2] : INFINITY;
    return b;
}

static void check_row(struct run_ctx *ctx, const struct active *a, const float *logits)
{
    const struct golden_case *k = &ctx->g->cases[a->c];
    const int V = ctx->g->vocab;
    const float *want = k->logits + (size_t)a->s * V;
    double e = rel_err(logits, want, V);
    float gap;
    int want_top = argmax(want, V, &gap), mine = argmax(logits, V, NULL);
    int check_arg = gap >= ctx->o->gap;
    int arg_ok = !check_arg || mine == k->tokens[a->s];
    int row_ok = e <= ctx->o->tol;
    int sel = ctx->sel_ok[a->c * 4096 + a->s];
    struct golden_result *res = ctx->res;
    note_check(ctx, row_ok && arg_ok);
    res->rows++;
    res->rows_failed += !row_ok;
    res->argmax_checked += check_arg;
    res->argmax_failed += !arg_ok;
    if (e > res->max_rel_logits)
        res->max_rel_logits = e;
    (void)want_top;
    if (ctx->o->out && (ctx->o->verbose || !row_ok || !arg_ok || sel == 0))
        fprintf(ctx->o->out, "%-6s row %2d (%s pos %d): rel %.3e %s  argmax %d/%d %s  selection %s\n",
                k->name, a->s, a->s == 0 ? "prefill" : "decode ",
                a->s == 0 ? k->prompt_len - 1 : k->prompt_len + a->s - 1, e, row_ok ? "ok" : "FAIL",
                mine, k->tokens[a->s], !check_arg ? "(gap < tol, not checked)" : arg_ok ? "ok" : "FAIL",
                sel < 0 ? "-" : sel ? "ok" : "FAIL");
}

static int run_once(struct dsv32_engine *e, const struct golden_set *g, const struct golden_opts *o,
                    struct golden_result *res, long *first_fail_seq, uint32_t *first_fail_op)
{
    memset(res, 0, sizeof(*res));
    const int nc = g->n_cases, V = g->vocab;
    int seqs[GOLDEN_MAX_CASES], local[GOLDEN_MAX_CASES], start[GOLDEN_MAX_CASES];
    struct active act[GOLDEN_MAX_CASES];
    struct dsv32_seq_input in[GOLDEN_MAX_CASES];
    int max_steps = 0, r = 0;
    for (int c = 0; c < nc; c++)
        if (g->cases[c].steps > 4096)
            return -E2BIG;
    int *sel_ok = malloc(sizeof(int) * (size_t)nc * 4096);
    float *logits = malloc(sizeof(float) * (size_t)nc * V);
    if (!sel_ok || !logits) {
        free(sel_ok);
        free(logits);
        return -ENOMEM;
    }
    for (int i = 0; i < nc * 4096; i++)
        sel_ok[i] = -1;
    for (int c = 0; c < nc; c++) {
        seqs[c] = -1;
        local[c] = 0;
        if (o->schedule == GOLDEN_SEQUENTIAL)
            start[c] = max_steps;
        else if (o->schedule == GOLDEN_BATCHED)
            start[c] = 0;
        else
            start[c] = c;
        int end = start[c] + g->cases[c].steps;
        if (o->schedule == GOLDEN_SEQUENTIAL)
            max_steps = end;
        else if (end > max_steps)
            max_steps = end;
    }
    struct run_ctx ctx = {.g = g, .o = o, .res = res, .act = act, .extra = o->extra_hooks,
                          .sel_ok = sel_ok, .first_fail_seq = -1};
    struct dsv32_step_hooks hooks = {.ctx = &ctx, .hidden = on_hidden, .selection = on_selection,
                                     .moe_routed = ctx.extra && ctx.extra->moe_routed ? on_moe : NULL};
    for (int step = 0; step < max_steps; step++) {
        int n = 0, row = 0;
        for (int c = 0; c < nc; c++) {
            const struct golden_case *k = &g->cases[c];
            if (step < start[c] || local[c] >= k->steps)
                continue;
            if (seqs[c] < 0 && (r = seqs[c] = dsv32_kv_seq_new(e->kv)) < 0)
                goto out;
            int s = local[c];
            in[n] = (struct dsv32_seq_input){.seq = seqs[c], .logits = DSV32_LOGITS_LAST,
                                             .n_tokens = s == 0 ? k->prompt_len : 1,
                                             .tokens = s == 0 ? k->prompt : &k->tokens[s - 1]};
            act[n] = (struct active){.c = c, .s = s, .row0 = row, .n = in[n].n_tokens};
            row += in[n].n_tokens;
            n++;
        }
        if (n == 0)
            continue;
        ctx.n_act = n;
        r = dsv32_engine_step(e, in, n, logits, &hooks);
        if (r < 0)
            goto out;
        for (int i = 0; i < n; i++) {
            check_row(&ctx, &act[i], logits + (size_t)i * V);
            local[act[i].c]++;
            if (local[act[i].c] == g->cases[act[i].c].steps) {
                dsv32_kv_seq_free(e->kv, seqs[act[i].c]);
                seqs[act[i].c] = -1;
            }
        }
    }
    r = 0;
out:
    for (int c = 0; c < nc; c++)
        if (seqs[c] >= 0)
            dsv32_kv_seq_free(e->kv, seqs[c]);
    free(sel_ok);
    free(logits);
    *first_fail_seq = ctx.first_fail_seq;
    *first_fail_op = ctx.first_fail_op;
    return r;
}

/* ---- FP8 tie search ---- */

struct tie_list {
    struct dsv32_fp8_key *k;
    float *v;
    int n, cap;
};

static void on_near(void *vctx, const struct dsv32_fp8_key *k, float v)
{
    struct tie_list *t = vctx;
    for (int i = t->n - 1; i >= 0 && i >= t->n - 64; i--)
        if (dsv32_fp8_key_cmp(&t->k[i], k) == 0)
            return; /* the same place seen again (an expert input quantized per expert) */
    if (t->n == t->cap) {
        int cap = t->cap ? 2 * t->cap : 64;
        struct dsv32_fp8_key *nk = realloc(t->k, sizeof(*nk) * (size_t)cap);
        if (!nk)
            return;
        t->k = nk;
        float *nv = realloc(t->v, sizeof(*nv) * (size_t)cap);
        if (!nv)
            return;
        t->v = nv;
        t->cap = cap;
    }
    t->k[t->n] = *k;
    t->v[t->n++] = v;
}

static int key_qsort(const void *a, const void *b) { return dsv32_fp8_key_cmp(a, b); }

static int probed_run(struct dsv32_engine *e, const struct golden_set *g,
                      const struct golden_opts *o, struct golden_result *res,
                      const struct dsv32_fp8_key *flips, int n_flips, struct tie_list *near,
                      long *ff_seq, uint32_t *ff_op)
{
    struct dsv32_fp8_key *sorted = malloc(sizeof(*sorted) * (size_t)(n_flips + 1));
    if (!sorted)
        return -ENOMEM;
    memcpy(sorted, flips, sizeof(*sorted) * (size_t)n_flips);
    qsort(sorted, (size_t)n_flips, sizeof(*sorted), key_qsort);
    struct dsv32_fp8_probe probe = {.near_rel = o->tie_rel > 0 ? o->tie_rel : 1e-6,
                                    .flips = sorted, .n_flips = n_flips,
                                    .on_near = near ? on_near : NULL, .ctx = near};
    if (near)
        near->n = 0;
    dsv32_fp8_probe_cur = &probe;
    int r = run_once(e, g, o, res, ff_seq, ff_op);
    dsv32_fp8_probe_cur = NULL;
    free(sorted);
    return r;
}

int golden_run(struct dsv32_engine *e, const struct golden_set *g, const struct golden_opts *o,
               struct golden_result *res)
{
    long ff;
    uint32_t ff_op;
    if (!o->resolve_ties)
        return run_once(e, g, o, res, &ff, &ff_op);
    /* Reports go to the output only for the final run. */
    struct golden_opts quiet = *o;
    quiet.out = NULL;
    struct tie_list near = {0};
    struct dsv32_fp8_key flips[64] = {{0}};
    int n_flips = 0, trials = 0, max_trials = o->max_tie_trials > 0 ? o->max_tie_trials : 200;
    int r = probed_run(e, g, &quiet, res, flips, 0, &near, &ff, &ff_op);
    while (r >= 0 && !golden_passed(res) && n_flips < 64 && trials < max_trials) {
        /* candidates: near-ties before the first failure, latest first */
        int improved = 0;
        struct tie_list cand = {0};
        for (int i = 0; i < near.n; i++)
            if (near.k[i].op <= ff_op)
                on_near(&cand, &near.k[i], near.v[i]);
        for (int i = cand.n - 1; i >= 0 && trials < max_trials && !improved; i--) {
            int dup = 0;
            for (int j = 0; j < n_flips; j++)
                dup |= dsv32_fp8_key_cmp(&flips[j], &cand.k[i]) == 0;
            if (dup)
                continue;
            flips[n_flips] = cand.k[i];
            struct golden_result tr;
            long tff;
            uint32_t top;
            trials++;
            r = probed_run(e, g, &quiet, &tr, flips, n_flips + 1, NULL, &tff, &top);
            if (r < 0)
                break;
            if (golden_passed(&tr) || tff > ff) {
                if (o->out)
                    fprintf(o->out, "FP8 tie resolved: op %u sub %d row %d col %d: %.9g (scaled) "
                            "sits at a rounding midpoint; rounded the other way\n",
                            cand.k[i].op, cand.k[i].sub, cand.k[i].row, cand.k[i].col, cand.v[i]);
                n_flips++;
                improved = 1;
            }
        }
        free(cand.k);
        free(cand.v);
        if (r < 0 || !improved)
            break;
        r = probed_run(e, g, &quiet, res, flips, n_flips, &near, &ff, &ff_op);
    }
    free(near.k);
    free(near.v);
    if (r < 0)
        return r;
    /* the final, reported run with the ties resolved */
    r = probed_run(e, g, o, res, flips, n_flips, NULL, &ff, &ff_op);
    res->ties_resolved = n_flips;
    res->tie_trials = trials;
    return r;
}
