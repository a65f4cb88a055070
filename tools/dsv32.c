/* dsv32: the single-process front end.
 *   dsv32 generate --model DIR --prompt TEXT [--chat] [--thinking] [--system TEXT]
 *                  [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P]
 *                  [--seed S] [--stop STR]... [--backend cpu|cuda] [--ignore-eos]
 * Loads the model (a progress bar on stderr while the weights load), renders the prompt (raw text
 * with BOS, or a one-turn chat in DeepSeek-V3.2's format), and streams the generated text to
 * stdout as it is made; in thinking mode the reasoning goes to stderr and the answer to stdout.
 * No cluster: the engine, the scheduler and the tokenizer in this process. */
#define _GNU_SOURCE 1 /* memmem */
#include "chat.h"
#include "engine.h"
#include "error.h"
#include "log.h"
#include "safetensors.h"
#include "scheduler.h"
#include "textgen.h"
#include "tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int tty_err;

static void progress(void *ctx, int64_t done, int64_t total)
{
    if (!tty_err || total <= 0)
        return;
    int w = 40, f = (int)(w * done / total);
    fprintf(stderr, "\rloading weights [%.*s%*s] %3d%%", f,
            "########################################", w - f, "", (int)(100 * done / total));
    if (done == total)
        fprintf(stderr, "\n");
}

struct out {
    int thinking;          /* still inside the reasoning */
    char hold[16];         /* reasoning bytes that could begin "</think>" */
    size_t n_hold;
    int n_tokens;
    enum dsv32_finish why;
    int err;
};

/* Writes text, routing reasoning (before "</think>") to stderr when thinking. */
static void emit(struct out *o, const char *t, size_t n)
{
    static const char end[] = "</think>";
    const size_t ml = sizeof(end) - 1;
    if (!o->thinking) {
        fwrite(t, 1, n, stdout);
        fflush(stdout);
        return;
    }
    char *buf = malloc(o->n_hold + n + 1);
    if (!buf)
        return;
    memcpy(buf, o->hold, o->n_hold);
    memcpy(buf + o->n_hold, t, n);
    size_t len = o->n_hold + n;
    const char *p = memmem(buf, len, end, ml);
    if (p) {
        fwrite(buf, 1, (size_t)(p - buf), stderr);
        fputs("\n", stderr);
        o->thinking = 0;
        o->n_hold = 0;
        fwrite(p + ml, 1, len - (size_t)(p - buf) - ml, stdout);
        fflush(stdout);
    } else {
        size_t keep = len < ml - 1 ? len : ml - 1, out = len - keep;
        while (out > 0 && out < len && ((unsigned char)buf[out] & 0xC0) == 0x80)
            out--;
        fwrite(buf, 1, out, stderr);
        o->n_hold = len - out;
        memcpy(o->hold, buf + out, o->n_hold);
    }
    free(buf);
}

static void on_token(void *ctx, int32_t t, const char *text, size_t len,
                     const struct dsv32_logprobs *lp)
{
    struct out *o = ctx;
    o->n_tokens++;
    emit(o, text, len);
}

static void on_finish(void *ctx, enum dsv32_finish why, const char *text, size_t len,
                      const struct dsv32_usage *u, int err)
{
    struct out *o = ctx;
    emit(o, text, len);
    if (o->thinking && o->n_hold)
        fwrite(o->hold, 1, o->n_hold, stderr);
    o->why = why;
    o->err = err;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: dsv32 generate --model DIR --prompt TEXT [--chat] [--thinking]\n"
               "                      [--system TEXT] [--max-tokens N] [--temperature T]\n"
               "                      [--top-p P] [--top-k K] [--min-p P] [--seed S]\n"
               "                      [--stop STR]... [--ignore-eos] [--backend cpu|cuda]\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "generate") != 0) {
        usage(argc < 2 ? stderr : (strcmp(argv[1], "--help") == 0 ? stdout : stderr));
        return argc >= 2 && strcmp(argv[1], "--help") == 0 ? 0 : 2;
    }
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"prompt", required_argument, 0, 'p'},
        {"chat", no_argument, 0, 'c'},             {"thinking", no_argument, 0, 't'},
        {"system", required_argument, 0, 's'},     {"max-tokens", required_argument, 0, 'n'},
        {"temperature", required_argument, 0, 1},  {"top-p", required_argument, 0, 2},
        {"top-k", required_argument, 0, 3},        {"min-p", required_argument, 0, 4},
        {"seed", required_argument, 0, 5},         {"stop", required_argument, 0, 6},
        {"ignore-eos", no_argument, 0, 7},         {"backend", required_argument, 0, 8},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    const char *model = NULL, *prompt = NULL, *system = NULL, *backend = "cpu";
    const char *stops[DSV32_MAX_STOP_STRINGS];
    int n_stops = 0, chat = 0, thinking = 0, max_tokens = 256, ignore_eos = 0, c;
    struct dsv32_sampling_params sp;
    dsv32_sampling_defaults(&sp);
    sp.temperature = 0.6f; /* DeepSeek's recommended default */
    sp.top_p = 0.95f;
    dsv32_log_set_ident("dsv32");
    optind = 2;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'p': prompt = optarg; break;
        case 'c': chat = 1; break;
        case 't': thinking = chat = 1; break;
        case 's': system = optarg; chat = 1; break;
        case 'n': max_tokens = atoi(optarg); break;
        case 1: sp.temperature = strtof(optarg, NULL); break;
        case 2: sp.top_p = strtof(optarg, NULL); break;
        case 3: sp.top_k = atoi(optarg); break;
        case 4: sp.min_p = strtof(optarg, NULL); break;
        case 5: sp.seed = strtoull(optarg, NULL, 10); sp.has_seed = 1; break;
        case 6:
            if (n_stops == DSV32_MAX_STOP_STRINGS) {
                fprintf(stderr, "dsv32: at most %d --stop strings\n", DSV32_MAX_STOP_STRINGS);
                return 2;
            }
            stops[n_stops++] = optarg;
            break;
        case 7: ignore_eos = 1; break;
        case 8: backend = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    char err[256];
    if (!model || !prompt || optind != argc) {
        usage(stderr);
        return 2;
    }
    if (dsv32_sampling_validate(&sp, err, sizeof(err)) < 0 || max_tokens < 1) {
        fprintf(stderr, "dsv32: %s\n", max_tokens < 1 ? "--max-tokens must be at least 1" : err);
        return 2;
    }
    tty_err = isatty(STDERR_FILENO);
    struct dsv32_tok *tok = NULL;
    struct dsv32_model *m = NULL;
    struct dsv32_engine *e = NULL;
    struct dsv32_sched *s = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int status = 1, r;
    if ((r = dsv32_tok_load(model, &tok)) < 0) {
        fprintf(stderr, "dsv32: no tokenizer in %s: %s\n", model, dsv32_strerror(r));
        goto out;
    }
    if (chat) {
        cJSON *msgs = cJSON_CreateArray();
        if (system) {
            cJSON *sm = cJSON_CreateObject();
            cJSON_AddStringToObject(sm, "role", "system");
            cJSON_AddStringToObject(sm, "content", system);
            cJSON_AddItemToArray(msgs, sm);
        }
        cJSON *um = cJSON_CreateObject();
        cJSON_AddStringToObject(um, "role", "user");
        cJSON_AddStringToObject(um, "content", prompt);
        cJSON_AddItemToArray(msgs, um);
        struct dsv32_chat_opts co = {.thinking = thinking, .add_bos = true};
        r = dsv32_chat_tokenize(tok, msgs, &co, &ids, &n_ids);
        cJSON_Delete(msgs);
    } else {
        r = dsv32_tok_encode(tok, prompt, strlen(prompt), DSV32_TOK_ADD_BOS, &ids, &n_ids);
    }
    if (r < 0) {
        fprintf(stderr, "dsv32: the prompt: %s\n",
                r == DSV32_EUTF8 ? "not valid UTF-8" : dsv32_strerror(r));
        status = 2;
        goto out;
    }
    double t0 = now_s();
    struct dsv32_load_opts lo = {.progress = progress};
    if ((r = dsv32_model_load(model, &lo, &m)) < 0) {
        fprintf(stderr, "dsv32: %s\n", dsv32_load_error());
        goto out;
    }
    int ctx = (int)n_ids + max_tokens;
    if (ctx > m->cfg.max_position_embeddings) {
        fprintf(stderr, "dsv32: %zu prompt tokens + --max-tokens %d exceed the context length %d\n",
                n_ids, max_tokens, m->cfg.max_position_embeddings);
        status = 2;
        goto out;
    }
    struct dsv32_engine_opts eo = {.backend = backend, .max_seqs = 1, .max_seq_len = ctx,
                                   .max_batch_tokens = ctx < 2048 ? ctx : 2048};
    if ((r = dsv32_engine_new(m, &eo, &e)) < 0) {
        fprintf(stderr, "dsv32: %s\n", dsv32_load_error());
        goto out;
    }
    /* a model written by dsv32-mkmodel says so in its config: say it too */
    char cfgp[4096];
    snprintf(cfgp, sizeof(cfgp), "%s/config.json", model);
    FILE *cf = fopen(cfgp, "r");
    if (cf) {
        char line[512];
        while (fgets(line, sizeof(line), cf))
            if (strstr(line, "dsv32_note"))
                fprintf(stderr, "dsv32: note: random weights (written by dsv32-mkmodel): the text "
                                "is meaningless\n");
        fclose(cf);
    }
    fprintf(stderr, "dsv32: %s loaded in %.1f s (%s backend); %zu prompt tokens\n", model,
            now_s() - t0, e->be->ops->name, n_ids);
    if ((r = dsv32_sched_new(e, NULL, &s)) < 0)
        goto out;
    struct out o = {.thinking = thinking};
    struct dsv32_text_request tr = {.ctx = &o, .on_token = on_token, .on_finish = on_finish,
                                    .stop_strings = stops, .n_stop_strings = n_stops};
    tr.r = (struct dsv32_request){.id = 1, .prompt = ids, .n_prompt = (int)n_ids, .sp = sp,
                                  .max_tokens = max_tokens, .ignore_eos = ignore_eos};
    if ((r = dsv32_textgen_submit(s, tok, &tr)) < 0) {
        fprintf(stderr, "dsv32: %s\n", dsv32_strerror(r));
        status = 2;
        goto out;
    }
    double t1 = now_s();
    if ((r = dsv32_sched_drain(s)) < 0) {
        fprintf(stderr, "dsv32: generation failed: %s\n", dsv32_strerror(r));
        goto out;
    }
    double dt = now_s() - t1;
    printf("\n");
    fprintf(stderr, "dsv32: %d tokens in %.2f s (%.1f tokens/s), finish: %s\n", o.n_tokens, dt,
            dt > 0 ? o.n_tokens / dt : 0.0, dsv32_finish_name(o.why));
    status = o.why == DSV32_FINISH_ERROR ? 1 : 0;
out:
    dsv32_sched_free(s);
    dsv32_engine_free(e);
    dsv32_model_free(m);
    dsv32_tok_free(tok);
    free(ids);
    return status;
}
