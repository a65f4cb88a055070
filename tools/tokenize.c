/* dsv32-tokenize: encodes JSON lines of text into JSON arrays of token ids, or decodes them back
 * (--decode), with any byte-level BPE tokenizer.json. Used by the tokenizer's oracle test and for
 * looking at how prompts tokenize. Exit status: 0 ok, 1 a bad input line or I/O error, 2 usage. */
#include "chat_json.h"
#include "error.h"
#include "log.h"
#include "tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LINE_BYTES (6 * (size_t)DSV32_TOK_MAX_INPUT_BYTES + 2)

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsv32-tokenize --tokenizer DIR|FILE --jsonl FILE [options]\n"
            "  Each input line is a JSON string; each output line the JSON array of its ids.\n"
            "  --decode        input lines are JSON arrays of ids; output lines JSON strings\n"
            "  --add-bos       prepend the BOS token (encode)\n"
            "  --special       turn the text of added tokens (<｜User｜>, <think>...) into them\n"
            "  --skip-special  leave special tokens out of decoded text\n"
            "  FILE may be - for standard input.\n");
}

static int encode_line(const struct dsv32_tok *tok, const char *line, size_t len, unsigned flags,
                       struct dsv32_buf *out)
{
    char *text;
    size_t n;
    int r = dsv32_json_parse_string(line, len, &text, &n);
    if (r < 0)
        return r;
    int32_t *ids;
    size_t n_ids;
    r = dsv32_tok_encode(tok, text, n, flags, &ids, &n_ids);
    free(text);
    if (r < 0)
        return r;
    dsv32_buf_put(out, "[", 1);
    for (size_t i = 0; i < n_ids; i++) {
        char tmp[16];
        int k = snprintf(tmp, sizeof(tmp), i ? ",%" PRId32 : "%" PRId32, ids[i]);
        dsv32_buf_put(out, tmp, (size_t)k);
    }
    dsv32_buf_put(out, "]\n", 2);
    free(ids);
    return out->err;
}

static int decode_line(const struct dsv32_tok *tok, const char *line, size_t len, unsigned flags,
                       struct dsv32_buf *out)
{
    cJSON *arr = cJSON_ParseWithLength(line, len);
    int r = 0;
    int32_t *ids = NULL;
    char *text = NULL;
    if (!cJSON_IsArray(arr)) {
        r = DSV32_EFORMAT;
        goto out;
    }
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    ids = malloc((n ? n : 1) * sizeof(*ids));
    if (!ids) {
        r = -ENOMEM;
        goto out;
    }
    for (const cJSON *v = arr->child; v; v = v->next, i++) {
        if (!cJSON_IsNumber(v) || v->valuedouble != (double)(int32_t)v->valuedouble) {
            r = DSV32_EFORMAT;
            goto out;
        }
        ids[i] = (int32_t)v->valuedouble;
    }
    size_t tlen;
    if ((r = dsv32_tok_decode(tok, ids, n, flags, &text, &tlen)) < 0)
        goto out;
    dsv32_json_put_string(out, text, tlen);
    dsv32_buf_put(out, "\n", 1);
    r = out->err;
out:
    cJSON_Delete(arr);
    free(ids);
    free(text);
    return r;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"tokenizer", required_argument, NULL, 't'},
        {"jsonl", required_argument, NULL, 'j'},
        {"decode", no_argument, NULL, 'd'},
        {"add-bos", no_argument, NULL, 'b'},
        {"special", no_argument, NULL, 's'},
        {"skip-special", no_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {0},
    };
    const char *tok_path = NULL, *jsonl = NULL;
    bool decode = false;
    unsigned enc_flags = 0, dec_flags = 0;
    int c;
    dsv32_log_set_ident("dsv32-tokenize");
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            tok_path = optarg;
            break;
        case 'j':
            jsonl = optarg;
            break;
        case 'd':
            decode = true;
            break;
        case 'b':
            enc_flags |= DSV32_TOK_ADD_BOS;
            break;
        case 's':
            enc_flags |= DSV32_TOK_PARSE_SPECIAL;
            break;
        case 'k':
            dec_flags |= DSV32_TOK_SKIP_SPECIAL;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!tok_path || !jsonl || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct dsv32_tok *tok;
    int r = dsv32_tok_load(tok_path, &tok);
    if (r < 0) {
        fprintf(stderr, "dsv32-tokenize: cannot load tokenizer %s: %s\n", tok_path,
                dsv32_strerror(r));
        return 1;
    }
    FILE *in = strcmp(jsonl, "-") == 0 ? stdin : fopen(jsonl, "r");
    if (!in) {
        fprintf(stderr, "dsv32-tokenize: %s: %s\n", jsonl, strerror(errno));
        dsv32_tok_free(tok);
        return 1;
    }
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t len;
    int status = 0;
    struct dsv32_buf out = {0};
    while ((len = getline(&line, &cap, in)) >= 0) {
        lineno++;
        if ((size_t)len > MAX_LINE_BYTES) {
            fprintf(stderr, "dsv32-tokenize: %s:%zu: line longer than %zu bytes\n", jsonl, lineno,
                    MAX_LINE_BYTES);
            status = 1;
            break;
        }
        out.len = 0;
        r = decode ? decode_line(tok, line, (size_t)len, dec_flags, &out)
                   : encode_line(tok, line, (size_t)len, enc_flags, &out);
        if (r < 0) {
            const char *what = r == DSV32_EFORMAT ? (decode ? "not a JSON array of integer ids"
                                                            : "not a JSON string")
                                                  : dsv32_strerror(r);
            fprintf(stderr, "dsv32-tokenize: %s:%zu: %s\n", jsonl, lineno, what);
            status = 1;
            break;
        }
        if (fwrite(out.p, 1, out.len, stdout) != out.len) {
            fprintf(stderr, "dsv32-tokenize: write error: %s\n", strerror(errno));
            status = 1;
            break;
        }
    }
    if (status == 0 && ferror(in)) {
        fprintf(stderr, "dsv32-tokenize: %s: read error\n", jsonl);
        status = 1;
    }
    if (fflush(stdout) != 0) {
        fprintf(stderr, "dsv32-tokenize: write error: %s\n", strerror(errno));
        status = 1;
    }
    free(line);
    dsv32_buf_done(&out);
    if (in != stdin)
        fclose(in);
    dsv32_tok_free(tok);
    return status;
}
