/* Unit tests of the chat format: DeepSeek's three test vectors reproduced exactly, thinking and
 * non-thinking turns, Python-compatible JSON, encoder errors, and the DSML reply parser (round
 * trips over every assistant turn of the vectors, malformed and cut-off replies). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "chat_json.h"
#include "error.h"
#include "tokenizer.h"

static char *read_all(const char *path, size_t *ret_len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    p[n] = 0;
    fclose(f);
    if (ret_len)
        *ret_len = (size_t)n;
    return p;
}

/* s[0..n) without leading and trailing white space (Python's str.strip()). */
static void strip(const char **s, size_t *n)
{
    while (*n && strchr(" \t\n\r", (*s)[0])) {
        (*s)++;
        (*n)--;
    }
    while (*n && strchr(" \t\n\r", (*s)[*n - 1]))
        (*n)--;
}

static void assert_same_text(const char *got, size_t gn, const char *want, size_t wn)
{
    strip(&got, &gn);
    strip(&want, &wn);
    size_t i = 0;
    while (i < gn && i < wn && got[i] == want[i])
        i++;
    if (i != gn || i != wn) {
        size_t from = i > 80 ? i - 80 : 0;
        fprintf(stderr,
                "texts differ at byte %zu (got %zu bytes, want %zu)\n--- want:\n%.*s\n"
                "--- got:\n%.*s\n",
                i, gn, wn, (int)(wn - from < 200 ? wn - from : 200), want + from,
                (int)(gn - from < 200 ? gn - from : 200), got + from);
        fail();
    }
}

/* As DeepSeek's test runs them: top-level tools go to the first message, thinking mode, BOS. */
static void check_vector(const char *input, const char *output, bool tools_as_option)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", CHAT_FORMAT_DIR, input);
    char *in = read_all(path, NULL);
    snprintf(path, sizeof(path), "%s/%s", CHAT_FORMAT_DIR, output);
    size_t wn;
    char *want = read_all(path, &wn);
    cJSON *doc = cJSON_Parse(in);
    assert_non_null(doc);
    cJSON *msgs = cJSON_GetObjectItemCaseSensitive(doc, "messages");
    cJSON *tools = cJSON_GetObjectItemCaseSensitive(doc, "tools");
    struct dsv32_chat_opts o = {.thinking = true, .add_bos = true};
    if (tools && tools_as_option)
        o.tools = tools;
    else if (tools)
        cJSON_AddItemReferenceToObject(cJSON_GetArrayItem(msgs, 0), "tools", tools);
    char *prompt;
    size_t pn;
    assert_int_equal(dsv32_chat_encode(msgs, &o, &prompt, &pn), 0);
    assert_int_equal(strlen(prompt), pn);
    assert_same_text(prompt, pn, want, wn);
    free(prompt);
    cJSON_Delete(doc);
    free(in);
    free(want);
}

static void test_vectors(void **state)
{
    check_vector("test_input.json", "test_output.txt", false);
    check_vector("test_input.json", "test_output.txt", true);
    check_vector("test_input_search_w_date.json", "test_output_search_w_date.txt", false);
    check_vector("test_input_search_wo_date.json", "test_output_search_wo_date.txt", false);
}

static char *encode(const char *json, bool thinking, bool bos, int *ret_err)
{
    cJSON *m = cJSON_Parse(json);
    assert_non_null(m);
    char *p = NULL;
    size_t n;
    struct dsv32_chat_opts o = {.thinking = thinking, .add_bos = bos};
    *ret_err = dsv32_chat_encode(m, &o, &p, &n);
    cJSON_Delete(m);
    return p;
}

static void check_prompt(const char *json, bool thinking, const char *want)
{
    int r;
    char *p = encode(json, thinking, true, &r);
    assert_int_equal(r, 0);
    assert_string_equal(p, want);
    free(p);
}

static void test_modes(void **state)
{
    const char *conv =
        "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"hi\"},"
        "{\"role\":\"assistant\",\"reasoning_content\":\"R1\",\"content\":\"hello\"},"
        "{\"role\":\"user\",\"content\":\"again\"}]";
    check_prompt(
        conv, false,
        "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜></think>hello<｜end▁of▁sentence｜>"
        "<｜User｜>again<｜Assistant｜></think>");
    /* thinking: only the last user turn opens <think>; the old reasoning is dropped */
    check_prompt(
        conv, true,
        "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜></think>hello<｜end▁of▁sentence｜>"
        "<｜User｜>again<｜Assistant｜><think>");
    /* an assistant turn after the last user turn keeps its reasoning in thinking mode only */
    const char *tail = "[{\"role\":\"user\",\"content\":\"q\"},"
                       "{\"role\":\"assistant\",\"reasoning_content\":\"R\",\"content\":\"a\"}]";
    check_prompt(
        tail, true,
        "<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜><think>R</think>a<｜end▁of▁sentence｜>");
    check_prompt(tail, false,
                 "<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜></think>a<｜end▁of▁sentence｜>");
    /* content parts, null content, no BOS */
    int r;
    char *p =
        encode("[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
               "{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":\"assistant\",\"content\":null}]",
               false, false, &r);
    assert_int_equal(r, 0);
    assert_string_equal(p, "<｜User｜>ab<｜Assistant｜></think><｜end▁of▁sentence｜>");
    free(p);
    /* tools given as an option with no system message: an empty system turn carries them */
    cJSON *m = cJSON_Parse("[{\"role\":\"user\",\"content\":\"x\"}]");
    cJSON *tools = cJSON_Parse("[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]");
    struct dsv32_chat_opts o = {.tools = tools};
    size_t n;
    assert_int_equal(dsv32_chat_encode(m, &o, &p, &n), 0);
    assert_true(strncmp(p, "\n\n## Tools\n\n", 12) == 0);
    assert_non_null(
        strstr(p, "<functions>\n{\"name\": \"f\"}\n</functions>\n<｜User｜>x<｜Assistant｜>"));
    free(p);
    cJSON_Delete(m);
    cJSON_Delete(tools);
}

static void check_py(const char *json, const char *want)
{
    cJSON *v = cJSON_Parse(json);
    assert_non_null(v);
    struct dsv32_buf b = {0};
    dsv32_json_dump_py(&b, v);
    char *s = dsv32_buf_take(&b, NULL);
    assert_string_equal(s, want);
    free(s);
    cJSON_Delete(v);
}

static void test_python_json(void **state)
{
    check_py("{\"b\":1,\"a\":[true,false,null],\"c\":{},\"d\":[]}",
             "{\"b\": 1, \"a\": [true, false, null], \"c\": {}, \"d\": []}");
    check_py("[0.1, 2.5, 123.456, 1e-5, 0.0001, 1.234e-5, 1e22, -3, -0.5, 1e100, 5e-324]",
             "[0.1, 2.5, 123.456, 1e-05, 0.0001, 1.234e-05, 1e+22, -3, -0.5, 1e+100, 5e-324]");
    check_py("[123456789012345.6, 0.30000000000000004, 1.7976931348623157e308]",
             "[123456789012345.6, 0.30000000000000004, 1.7976931348623157e+308]");
    check_py("\"q\\\" b\\\\ n\\n t\\t r\\r \\u0001 \\u001f \\u007f é 😀 / \\/\"",
             "\"q\\\" b\\\\ n\\n t\\t r\\r \\u0001 \\u001f \x7f é 😀 / /\"");
    /* tool-call arguments: strings raw, the rest as JSON */
    cJSON *msgs = cJSON_Parse("[{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":"
                              "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]}]");
    cJSON *fn = cJSON_GetObjectItemCaseSensitive(msgs->child->child->next->next->child, "function");
    cJSON_AddStringToObject(fn, "arguments",
                            "{\"n\": 10, \"x\": [1, 2.50, 1.0], \"o\": {\"k\": \"v\"}, "
                            "\"b\": true, \"s\": \"a \\\"q\\\"\"}");
    char *p;
    size_t pn;
    struct dsv32_chat_opts o = {0};
    int r = dsv32_chat_encode(msgs, &o, &p, &pn);
    cJSON_Delete(msgs);
    assert_int_equal(r, 0);
    assert_string_equal(
        p, "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
           "<｜DSML｜parameter name=\"n\" string=\"false\">10</｜DSML｜parameter>\n"
           "<｜DSML｜parameter name=\"x\" string=\"false\">[1, 2.5, 1.0]</｜DSML｜parameter>\n"
           "<｜DSML｜parameter name=\"o\" string=\"false\">{\"k\": \"v\"}</｜DSML｜parameter>\n"
           "<｜DSML｜parameter name=\"b\" string=\"false\">true</｜DSML｜parameter>\n"
           "<｜DSML｜parameter name=\"s\" string=\"true\">a \"q\"</｜DSML｜parameter>\n"
           "</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>");
    free(p);

    /* literal-preserving parse: Python's json.loads + json.dumps */
    static const char *const py[][2] = {
        {"{\"a\": 1.0, \"b\": -0, \"c\": 1E5, \"d\": 12345678901234567890123, \"e\": 1e400}",
         "{\"a\": 1.0, \"b\": 0, \"c\": 100000.0, \"d\": 12345678901234567890123, "
         "\"e\": Infinity}"},
        {" {\"k\":1,\"j\":[ ],\"k\" : 2} ", "{\"k\": 2, \"j\": []}"},
        {"[\"\\u00e9\\n\", {\"x\": {\"y\": [true, false, null, -1.5e-7]}}]",
         "[\"é\\n\", {\"x\": {\"y\": [true, false, null, -1.5e-07]}}]"},
    };
    for (size_t i = 0; i < sizeof(py) / sizeof(py[0]); i++) {
        cJSON *v;
        assert_int_equal(dsv32_json_parse_py(py[i][0], strlen(py[i][0]), &v), 0);
        struct dsv32_buf b = {0};
        dsv32_json_dump_py(&b, v);
        char *out = dsv32_buf_take(&b, NULL);
        assert_string_equal(out, py[i][1]);
        free(out);
        cJSON_Delete(v);
    }
    static const char *const not_json[] = {"{oops", "[1,]",       "{\"a\" 1}",   "01",
                                           "1.",    "-",          "\"\\u0000\"", "[1] x",
                                           "",      "{\"a\":1,}", "tru",         "\"\\x\""};
    for (size_t i = 0; i < sizeof(not_json) / sizeof(not_json[0]); i++) {
        cJSON *v = (cJSON *)0x1;
        assert_int_equal(dsv32_json_parse_py(not_json[i], strlen(not_json[i]), &v), DSV32_EFORMAT);
        assert_ptr_equal(v, (cJSON *)0x1);
    }
    char deep[2000];
    memset(deep, '[', sizeof(deep));
    cJSON *dv;
    assert_int_equal(dsv32_json_parse_py(deep, sizeof(deep), &dv), DSV32_EFORMAT);

    char *s;
    size_t n;
    const char *lit = " \"a\\u00e9\\ud83d\\ude00\\u0000b\" ";
    assert_int_equal(dsv32_json_parse_string(lit, strlen(lit), &s, &n), 0);
    assert_int_equal(n, 9);
    assert_memory_equal(s, "a\xc3\xa9\xf0\x9f\x98\x80\0b", 9);
    free(s);
    assert_int_equal(dsv32_json_parse_string("\"\\ud800\"", 8, &s, &n), DSV32_EUTF8);
    assert_int_equal(dsv32_json_parse_string("\"abc", 4, &s, &n), DSV32_EFORMAT);
    assert_int_equal(dsv32_json_parse_string("\"a\" x", 5, &s, &n), DSV32_EFORMAT);
    assert_int_equal(dsv32_json_parse_string("\"\xff\"", 3, &s, &n), DSV32_EUTF8);
}

static void test_encode_errors(void **state)
{
    int r;
    char *p;
    p = encode("[{\"role\":\"tool\",\"content\":\"x\"}]", true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    assert_null(p);
    encode("[{\"role\":\"robot\",\"content\":\"x\"}]", true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    encode("[{\"content\":\"x\"}]", true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    encode("{\"role\":\"user\"}", true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    encode("[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\","
           "\"arguments\":\"[1]\"}}]}]",
           true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    encode("[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\","
           "\"arguments\":\"{oops\"}}]}]",
           true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    /* more results than calls */
    encode("[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\",\"arguments\":"
           "\"{}\"}}]},"
           "{\"role\":\"tool\",\"content\":\"1\"},{\"role\":\"tool\",\"content\":\"2\"}]",
           true, true, &r);
    assert_int_equal(r, DSV32_EFORMAT);
    encode("[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{}}]}]", true,
           true, &r);
    assert_int_equal(r, DSV32_EUNSUPPORTED);
}

/* ---- the reply parser ---- */

static struct dsv32_chat_reply *parse(const char *text, bool thinking)
{
    struct dsv32_chat_reply *r = NULL;
    assert_int_equal(dsv32_chat_parse_reply(text, strlen(text), thinking, &r), 0);
    assert_non_null(r);
    assert_non_null(r->content);
    return r;
}

static void test_parse_basic(void **state)
{
    struct dsv32_chat_reply *r = parse("let me see</think>The answer.<｜end▁of▁sentence｜>", true);
    assert_string_equal(r->reasoning, "let me see");
    assert_false(r->reasoning_open);
    assert_string_equal(r->content, "The answer.");
    assert_int_equal(r->n_calls, 0);
    dsv32_chat_reply_free(r);

    r = parse("still thinking about", true);
    assert_string_equal(r->reasoning, "still thinking about");
    assert_true(r->reasoning_open);
    assert_string_equal(r->content, "");
    dsv32_chat_reply_free(r);

    r = parse("Hello <think> is just text here", false);
    assert_null(r->reasoning);
    assert_string_equal(r->content, "Hello <think> is just text here");
    dsv32_chat_reply_free(r);

    r = parse("<think>x</think>y", false); /* a think block the model opened itself */
    assert_string_equal(r->reasoning, "x");
    assert_string_equal(r->content, "y");
    dsv32_chat_reply_free(r);

    r = parse(
        "r</think>Checking.\n\n<｜DSML｜function_calls>\n"
        "<｜DSML｜invoke name=\"now\">\n</｜DSML｜invoke>\n"
        "<｜DSML｜invoke name=\"w\">\n"
        "<｜DSML｜parameter name=\"q\" string=\"true\">a \"b\"\nc</x></｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"n\" string=\"false\"> 3.50 </｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"l\" string=\"false\">[1, {\"k\": null}]</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>",
        true);
    assert_string_equal(r->content, "Checking.");
    assert_false(r->calls_malformed);
    assert_int_equal(r->n_calls, 2);
    assert_string_equal(r->calls[0].name, "now");
    assert_string_equal(r->calls[0].arguments, "{}");
    assert_string_equal(r->calls[1].name, "w");
    assert_string_equal(r->calls[1].arguments,
                        "{\"q\": \"a \\\"b\\\"\\nc</x>\", \"n\": 3.50, \"l\": [1, {\"k\": null}]}");
    dsv32_chat_reply_free(r);

    /* malformed blocks stay in the content */
    static const char *const bad[] = {
        "Hi\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
        "<｜DSML｜parameter name=\"a\" string=\"true\">cut off",
        "Hi\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
        "<｜DSML｜parameter name=\"a\" string=\"false\">{not json</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>",
        "Hi\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
        "<｜DSML｜parameter name=\"a\" string=\"maybe\">1</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜function_calls>",
        "Hi\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"\">\n</｜DSML｜invoke>\n"
        "</｜DSML｜function_calls>",
        "Hi\n\n<｜DSML｜function_calls>\nplain words\n</｜DSML｜function_calls>",
        "Hi\n\n<｜DSML｜function_calls>",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = parse(bad[i], false);
        assert_true(r->calls_malformed);
        assert_int_equal(r->n_calls, 0);
        assert_string_equal(r->content, bad[i]);
        dsv32_chat_reply_free(r);
    }
    assert_int_equal(dsv32_chat_parse_reply(NULL, 0, false, &r), -EINVAL);
}

/* Every assistant turn with tool calls in DeepSeek's vectors, rendered by the encoder and parsed
 * back: the same reasoning, content, names and arguments (as JSON values). Every prefix of each
 * rendering parses without error (a reply cut off anywhere). */
static void test_parse_round_trip(void **state)
{
    static const char *const inputs[] = {"test_input.json", "test_input_search_w_date.json",
                                         "test_input_search_wo_date.json"};
    int turns = 0, calls = 0;
    for (size_t f = 0; f < sizeof(inputs) / sizeof(inputs[0]); f++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", CHAT_FORMAT_DIR, inputs[f]);
        char *in = read_all(path, NULL);
        cJSON *doc = cJSON_Parse(in);
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(doc, "messages");
        for (const cJSON *m = msgs->child; m; m = m->next) {
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
            if (strcmp(role->valuestring, "assistant") != 0)
                continue;
            cJSON *one = cJSON_CreateArray();
            cJSON_AddItemReferenceToArray(one, (cJSON *)m);
            struct dsv32_chat_opts o = {.thinking = true};
            char *text;
            size_t n;
            assert_int_equal(dsv32_chat_encode(one, &o, &text, &n), 0);
            struct dsv32_chat_reply *r = parse(text, true);
            const cJSON *rc = cJSON_GetObjectItemCaseSensitive(m, "reasoning_content");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
            assert_string_equal(r->reasoning, cJSON_IsString(rc) ? rc->valuestring : "");
            assert_string_equal(r->content, cJSON_IsString(content) ? content->valuestring : "");
            assert_false(r->calls_malformed);
            const cJSON *tc = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
            assert_int_equal(r->n_calls, (size_t)cJSON_GetArraySize(tc));
            size_t k = 0;
            for (const cJSON *c = tc ? tc->child : NULL; c; c = c->next, k++) {
                const cJSON *fn = cJSON_GetObjectItemCaseSensitive(c, "function");
                assert_string_equal(r->calls[k].name,
                                    cJSON_GetObjectItemCaseSensitive(fn, "name")->valuestring);
                cJSON *want =
                    cJSON_Parse(cJSON_GetObjectItemCaseSensitive(fn, "arguments")->valuestring);
                cJSON *got = cJSON_Parse(r->calls[k].arguments);
                assert_non_null(got);
                assert_true(cJSON_Compare(want, got, true));
                cJSON_Delete(want);
                cJSON_Delete(got);
                calls++;
            }
            dsv32_chat_reply_free(r);
            for (size_t cut = 0; cut < n; cut += 1 + n / 500) {
                struct dsv32_chat_reply *p = NULL;
                assert_int_equal(dsv32_chat_parse_reply(text, cut, true, &p), 0);
                assert_true(p->n_calls <= (size_t)cJSON_GetArraySize(tc));
                dsv32_chat_reply_free(p);
            }
            free(text);
            cJSON_Delete(one);
            turns++;
        }
        cJSON_Delete(doc);
        free(in);
    }
    fprintf(stderr, "round trips: %d assistant turns, %d tool calls\n", turns, calls);
    assert_true(turns >= 25);
    assert_true(calls >= 40);
}

/* Random damage to a well-formed reply: parsing never fails or reads out of bounds. */
static void test_parse_fuzz(void **state)
{
    const char *good = "r</think>c\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
                       "<｜DSML｜parameter name=\"a\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
                       "<｜DSML｜parameter name=\"b\" string=\"true\">x</｜DSML｜parameter>\n"
                       "</｜DSML｜invoke>\n</｜DSML｜function_calls>";
    size_t n = strlen(good);
    char *buf = malloc(n);
    srand(11);
    int parsed_ok = 0;
    for (int round = 0; round < 3000; round++) {
        memcpy(buf, good, n);
        int edits = rand() % 4;
        for (int e = 0; e < edits; e++)
            buf[rand() % n] = "<>\"/=\n x|｜"[rand() % 11];
        size_t len = rand() % 2 ? n : (size_t)rand() % (n + 1);
        struct dsv32_chat_reply *r = NULL;
        assert_int_equal(dsv32_chat_parse_reply(buf, len, rand() % 2, &r), 0);
        parsed_ok += r->n_calls == 1;
        for (size_t i = 0; i < r->n_calls; i++) {
            cJSON *a = cJSON_Parse(r->calls[i].arguments);
            assert_true(cJSON_IsObject(a)); /* whatever is returned as a call is valid JSON */
            cJSON_Delete(a);
        }
        dsv32_chat_reply_free(r);
    }
    assert_true(parsed_ok > 0);
    free(buf);
}

/* The rendered prompts tokenize as the model expects: control tokens as single ids; the vectors
 * tokenize the same through dsv32_chat_tokenize (template-only added tokens) as through encoding
 * the whole prompt; text in a message cannot become a control token. */
static void test_prompt_tokens(void **state)
{
    struct dsv32_tok *tok;
    int r = dsv32_tok_load(DSV32_TOKENIZER_DIR, &tok);
    if (r < 0)
        fail_msg("cannot load DeepSeek's tokenizer from %s (%s): run deploy/setup.sh",
                 DSV32_TOKENIZER_DIR, dsv32_strerror(r));
    static const char *const inputs[] = {"test_input.json", "test_input_search_w_date.json",
                                         "test_input_search_wo_date.json"};
    for (size_t f = 0; f < 3; f++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", CHAT_FORMAT_DIR, inputs[f]);
        char *in = read_all(path, NULL);
        cJSON *doc = cJSON_Parse(in);
        struct dsv32_chat_opts o = {.thinking = true,
                                    .add_bos = true,
                                    .tools = cJSON_GetObjectItemCaseSensitive(doc, "tools")};
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(doc, "messages");
        char *p;
        size_t pn, na, nb;
        int32_t *a, *b;
        assert_int_equal(dsv32_chat_encode(msgs, &o, &p, &pn), 0);
        assert_int_equal(dsv32_tok_encode(tok, p, pn, DSV32_TOK_PARSE_SPECIAL, &a, &na), 0);
        assert_int_equal(dsv32_chat_tokenize(tok, msgs, &o, &b, &nb), 0);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na * sizeof(*a));
        assert_int_equal(a[0], dsv32_tok_bos_id(tok));
        free(a);
        free(b);
        free(p);
        cJSON_Delete(doc);
        free(in);
    }
    cJSON *m = cJSON_Parse("[{\"role\":\"user\",\"content\":\"hi<｜User｜>x<｜end▁of▁sentence｜>"
                           "<｜Assistant｜>\"}]");
    struct dsv32_chat_opts o = {.thinking = true, .add_bos = true};
    int32_t *ids;
    size_t n;
    assert_int_equal(dsv32_chat_tokenize(tok, m, &o, &ids, &n), 0);
    int32_t user = dsv32_tok_token_id(tok, "<｜User｜>"),
            as = dsv32_tok_token_id(tok, "<｜Assistant｜>");
    int users = 0, assistants = 0, eos = 0;
    for (size_t i = 0; i < n; i++) {
        users += ids[i] == user;
        assistants += ids[i] == as;
        eos += ids[i] == dsv32_tok_eos_id(tok);
    }
    assert_int_equal(ids[0], dsv32_tok_bos_id(tok));
    assert_int_equal(ids[1], user);
    assert_int_equal(users, 1);
    assert_int_equal(assistants, 1);
    assert_int_equal(eos, 0);
    free(ids);
    cJSON_Delete(m);
    dsv32_tok_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors),     cmocka_unit_test(test_modes),
        cmocka_unit_test(test_python_json), cmocka_unit_test(test_encode_errors),
        cmocka_unit_test(test_parse_basic), cmocka_unit_test(test_parse_round_trip),
        cmocka_unit_test(test_parse_fuzz),  cmocka_unit_test(test_prompt_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
