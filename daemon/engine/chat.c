/* The DeepSeek-V3.2 chat format: the prompt encoder and the reply parser (see chat.h). The layout
 * of every turn comes from DeepSeek's test vectors in tests/chat-format:
 *   system     content ["\n\n" tools section]
 *   developer  <｜User｜>["\n\n" tools section]"\n\n# The user's message is:
 * "content<｜Assistant｜> then <think> (last user turn, thinking mode) or </think> user
 * <｜User｜>content<｜Assistant｜> then <think> or </think> as above assistant
 * [reasoning</think>]content["\n\n" DSML function_calls]<｜end▁of▁sentence｜> (reasoning only for
 * turns after the last user turn, in thinking mode) tool       "\n\n<function_results>" before the
 * first result of a call batch,
 *              "\n<result>"content"</result>" each, "\n</function_results>\n\n" + <think> or
 *              </think> after the last one. */
#define _GNU_SOURCE /* memmem */
#include "chat.h"
#include "chat_json.h"

#include "error.h"
#include "log.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BOS "<｜begin▁of▁sentence｜>"
#define EOS "<｜end▁of▁sentence｜>"
#define USER "<｜User｜>"
#define ASSISTANT "<｜Assistant｜>"
#define THINK "<think>"
#define THINK_END "</think>"
#define DSML "｜DSML｜"
#define CALLS_OPEN "<" DSML "function_calls>"
#define CALLS_CLOSE "</" DSML "function_calls>"
#define INVOKE_OPEN "<" DSML "invoke name=\""
#define INVOKE_CLOSE "</" DSML "invoke>"
#define PARAM_OPEN "<" DSML "parameter name=\""
#define PARAM_CLOSE "</" DSML "parameter>"

static const char tools_intro[] =
    "## Tools\n\n"
    "You have access to a set of tools you can use to answer the user's question.\n"
    "You can invoke functions by writing a \"" CALLS_OPEN "\" block like the following as part "
    "of your reply to the user:\n" CALLS_OPEN "\n" INVOKE_OPEN "$FUNCTION_NAME\">\n" PARAM_OPEN
    "$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE" PARAM_CLOSE "\n...\n" INVOKE_CLOSE
    "\n" INVOKE_OPEN "$FUNCTION_NAME2\">\n...\n" INVOKE_CLOSE "\n" CALLS_CLOSE "\n\n"
    "String and scalar parameters should be specified as is without any escaping or quotes, "
    "while lists and objects should use JSON format. The \"string\" attribute should be set to "
    "\"true\" for string type parameters and \"false\" for other types (numbers, booleans, "
    "arrays, objects).\n\n"
    "If the thinking_mode is enabled, then after function results you should strongly consider "
    "outputting a thinking block. Here is an example:\n\n" CALLS_OPEN "\n...\n" CALLS_CLOSE "\n\n"
    "<function_results>\n...\n</function_results>\n\n" THINK "...thinking about results" THINK_END
    "\n\nHere are the functions available in JSONSchema format:\n<functions>\n";

/* The prompt being written, with the byte ranges the template wrote (as opposed to text that came
 * from the messages): only there may the tokenizer turn text into added tokens. */
struct render {
    struct dsv32_buf b;
    struct dsv32_tok_span *spans;
    size_t n_spans, cap;
};

static void txt(struct render *r, const char *s)
{
    dsv32_buf_puts(&r->b, s);
}

static void ctl(struct render *r, const char *s)
{
    size_t start = r->b.len, n = strlen(s);
    dsv32_buf_put(&r->b, s, n);
    if (r->b.err || n == 0)
        return;
    if (r->n_spans && r->spans[r->n_spans - 1].start + r->spans[r->n_spans - 1].len == start) {
        r->spans[r->n_spans - 1].len += n; /* adjacent template text: one span */
        return;
    }
    if (r->n_spans == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 64;
        struct dsv32_tok_span *p = realloc(r->spans, cap * sizeof(*p));
        if (!p) {
            r->b.err = -ENOMEM;
            return;
        }
        r->spans = p;
        r->cap = cap;
    }
    r->spans[r->n_spans++] = (struct dsv32_tok_span){start, n};
}

static const char *str_field(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* content: a string, null, or OpenAI content parts of type "text" (concatenated). */
static int put_content(struct render *b, const cJSON *msg)
{
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(msg, "content");
    if (!c || cJSON_IsNull(c))
        return 0;
    if (cJSON_IsString(c)) {
        txt(b, c->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(c))
        return DSV32_EFORMAT;
    for (const cJSON *part = c->child; part; part = part->next) {
        const char *type = str_field(part, "type"), *text = str_field(part, "text");
        if (!type || strcmp(type, "text") != 0 || !text) {
            log_error("chat: content parts other than text are not supported");
            return DSV32_EUNSUPPORTED;
        }
        txt(b, text);
    }
    return 0;
}

/* The "## Tools" section: one JSON schema (the "function" object) per line. */
static int put_tools(struct render *b, const cJSON *tools)
{
    if (!cJSON_IsArray(tools))
        return DSV32_EFORMAT;
    ctl(b, tools_intro);
    for (const cJSON *t = tools->child; t; t = t->next) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        if (!fn)
            fn = t; /* already the bare function object */
        if (!cJSON_IsObject(fn))
            return DSV32_EFORMAT;
        if (t != tools->child)
            ctl(b, "\n");
        dsv32_json_dump_py(&b->b, fn);
    }
    ctl(b, "\n</functions>\n");
    return 0;
}

static bool has_tools(const cJSON *tools)
{
    return cJSON_IsArray(tools) && cJSON_GetArraySize(tools) > 0;
}

/* One tool call as a DSML invoke: parameters in the order of the arguments object. */
static int put_invoke(struct render *b, const cJSON *call)
{
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
    if (!fn)
        fn = call;
    const char *name = str_field(fn, "name");
    const cJSON *args = cJSON_GetObjectItemCaseSensitive(fn, "arguments");
    cJSON *parsed = NULL;
    if (!name)
        return DSV32_EFORMAT;
    if (cJSON_IsString(args)) {
        /* the arguments text, read as DeepSeek's encoder reads it (json.loads) */
        if (dsv32_json_parse_py(args->valuestring, strlen(args->valuestring), &parsed) < 0)
            parsed = NULL;
        args = parsed;
    } else if (!args || cJSON_IsNull(args)) {
        args = parsed = cJSON_CreateObject();
        if (!parsed)
            return -ENOMEM;
    }
    if (!cJSON_IsObject(args)) {
        log_error("chat: the arguments of tool call '%s' are not a JSON object", name);
        cJSON_Delete(parsed);
        return DSV32_EFORMAT;
    }
    ctl(b, INVOKE_OPEN);
    txt(b, name);
    ctl(b, "\">\n");
    for (const cJSON *a = args->child; a; a = a->next) {
        if (a != args->child)
            ctl(b, "\n");
        ctl(b, PARAM_OPEN);
        txt(b, a->string);
        ctl(b, cJSON_IsString(a) ? "\" string=\"true\">" : "\" string=\"false\">");
        if (cJSON_IsString(a))
            txt(b, a->valuestring);
        else
            dsv32_json_dump_py(&b->b, a);
        ctl(b, PARAM_CLOSE);
    }
    ctl(b, "\n" INVOKE_CLOSE);
    cJSON_Delete(parsed);
    return 0;
}

static int put_assistant(struct render *b, const cJSON *msg, bool with_reasoning)
{
    if (with_reasoning) {
        const char *r = str_field(msg, "reasoning_content");
        txt(b, r ? r : "");
        ctl(b, THINK_END);
    }
    int r = put_content(b, msg);
    if (r < 0)
        return r;
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(msg, "tool_calls");
    if (calls && !cJSON_IsNull(calls) && !cJSON_IsArray(calls))
        return DSV32_EFORMAT;
    if (cJSON_GetArraySize(calls) > 0) {
        ctl(b, "\n\n" CALLS_OPEN "\n");
        for (const cJSON *c = calls->child; c; c = c->next) {
            if (c != calls->child)
                ctl(b, "\n");
            if ((r = put_invoke(b, c)) < 0)
                return r;
        }
        ctl(b, "\n" CALLS_CLOSE);
    }
    ctl(b, EOS);
    return 0;
}

/* A tool result: which call of the assistant turn before it this answers decides the frame. */
static int put_tool(struct render *b, const cJSON *msgs, int i, bool open_thinking)
{
    int a = i - 1;
    const cJSON *am = NULL;
    for (; a >= 0; a--) {
        am = cJSON_GetArrayItem(msgs, a);
        const char *role = str_field(am, "role");
        if (!role || strcmp(role, "tool") != 0)
            break;
    }
    const char *role = a >= 0 ? str_field(am, "role") : NULL;
    const cJSON *calls = a >= 0 ? cJSON_GetObjectItemCaseSensitive(am, "tool_calls") : NULL;
    int order = i - a, n_calls = cJSON_IsArray(calls) ? cJSON_GetArraySize(calls) : 0;
    if (!role || strcmp(role, "assistant") != 0 || order > n_calls) {
        log_error("chat: message %d is a tool result that no assistant tool call asked for", i);
        return DSV32_EFORMAT;
    }
    if (order == 1)
        ctl(b, "\n\n<function_results>");
    ctl(b, "\n<result>");
    const cJSON *m = cJSON_GetArrayItem(msgs, i);
    int r = put_content(b, m);
    if (r < 0)
        return r;
    ctl(b, "</result>");
    if (order == n_calls) {
        ctl(b, "\n</function_results>\n\n");
        ctl(b, open_thinking ? THINK : THINK_END);
    }
    return 0;
}

int dsv32_chat_render(const cJSON *messages, const struct dsv32_chat_opts *opts, char **ret_prompt,
                      size_t *ret_len, struct dsv32_tok_span **ret_spans, size_t *ret_n_spans)
{
    static const struct dsv32_chat_opts defaults = {0};
    if (!opts)
        opts = &defaults;
    if (!cJSON_IsArray(messages))
        return DSV32_EFORMAT;
    int n = cJSON_GetArraySize(messages);
    if (n > DSV32_CHAT_MAX_MESSAGES)
        return -E2BIG;
    if (opts->tools && !cJSON_IsArray(opts->tools))
        return DSV32_EFORMAT;
    int last_user = -1;
    for (int i = 0; i < n; i++) {
        const char *role = str_field(cJSON_GetArrayItem(messages, i), "role");
        if (!role) {
            log_error("chat: message %d has no role", i);
            return DSV32_EFORMAT;
        }
        if (strcmp(role, "user") == 0 || strcmp(role, "developer") == 0)
            last_user = i;
    }
    struct render b = {0};
    int r = 0;
    if (opts->add_bos)
        ctl(&b, BOS);
    const char *first = n ? str_field(messages->child, "role") : "";
    bool tools_to_first =
        has_tools(opts->tools) && (strcmp(first, "system") == 0 || strcmp(first, "developer") == 0);
    if (has_tools(opts->tools) && !tools_to_first) { /* an empty system turn carries them */
        ctl(&b, "\n\n");
        r = put_tools(&b, opts->tools);
    }
    int i = 0;
    for (const cJSON *m = messages->child; m && r == 0; m = m->next, i++) {
        const char *role = str_field(m, "role");
        const cJSON *tools = cJSON_GetObjectItemCaseSensitive(m, "tools");
        if (i == 0 && tools_to_first)
            tools = opts->tools;
        bool open = opts->thinking && i == last_user;
        if (strcmp(role, "system") == 0) {
            r = put_content(&b, m);
            if (r == 0 && has_tools(tools)) {
                ctl(&b, "\n\n");
                r = put_tools(&b, tools);
            }
        } else if (strcmp(role, "developer") == 0) {
            ctl(&b, USER);
            if (has_tools(tools)) {
                ctl(&b, "\n\n");
                r = put_tools(&b, tools);
            }
            ctl(&b, "\n\n# The user's message is: ");
            if (r == 0)
                r = put_content(&b, m);
            ctl(&b, ASSISTANT);
            ctl(&b, open ? THINK : THINK_END);
        } else if (strcmp(role, "user") == 0) {
            ctl(&b, USER);
            r = put_content(&b, m);
            ctl(&b, ASSISTANT);
            ctl(&b, open ? THINK : THINK_END);
        } else if (strcmp(role, "assistant") == 0) {
            /* Reasoning of turns before the last user message is dropped: the model only sees
             * the thinking of the turn it is in. */
            r = put_assistant(&b, m, opts->thinking && i > last_user);
        } else if (strcmp(role, "tool") == 0) {
            r = put_tool(&b, messages, i, opts->thinking && i >= last_user);
        } else {
            log_error("chat: message %d has an unknown role '%s'", i, role);
            r = DSV32_EFORMAT;
        }
        if (r == 0 && b.b.len > DSV32_CHAT_MAX_PROMPT_BYTES)
            r = -E2BIG;
    }
    if (r == 0 && b.b.err)
        r = b.b.err;
    char *prompt = r == 0 ? dsv32_buf_take(&b.b, ret_len) : NULL;
    if (r == 0 && !prompt)
        r = -ENOMEM;
    if (r < 0) {
        dsv32_buf_done(&b.b);
        free(b.spans);
        return r;
    }
    *ret_prompt = prompt;
    if (ret_spans) {
        *ret_spans = b.spans;
        *ret_n_spans = b.n_spans;
    } else {
        free(b.spans);
    }
    return 0;
}

int dsv32_chat_encode(const cJSON *messages, const struct dsv32_chat_opts *opts, char **ret_prompt,
                      size_t *ret_len)
{
    return dsv32_chat_render(messages, opts, ret_prompt, ret_len, NULL, NULL);
}

int dsv32_chat_tokenize(const struct dsv32_tok *tok, const cJSON *messages,
                        const struct dsv32_chat_opts *opts, int32_t **ret_ids, size_t *ret_n)
{
    char *prompt;
    size_t len, n_spans;
    struct dsv32_tok_span *spans;
    int r = dsv32_chat_render(messages, opts, &prompt, &len, &spans, &n_spans);
    if (r < 0)
        return r;
    r = dsv32_tok_encode_spans(tok, prompt, len, DSV32_TOK_PARSE_SPECIAL, spans, n_spans, ret_ids,
                               ret_n);
    free(prompt);
    free(spans);
    return r;
}

/* ---- the reply parser ---- */

static char *dup_range(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

static bool starts(const char *s, const char *end, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)(end - s) >= n && memcmp(s, lit, n) == 0;
}

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && (*s == '\n' || *s == ' ' || *s == '\t' || *s == '\r'))
        s++;
    return s;
}

static const char *find(const char *s, const char *end, const char *lit)
{
    size_t n = strlen(lit);
    return (size_t)(end - s) >= n ? memmem(s, (size_t)(end - s), lit, n) : NULL;
}

/* Reads name="..." (the opening already consumed): the name up to the quote, then lit. */
static const char *read_attr(const char *s, const char *end, const char *lit, const char **ret_v,
                             size_t *ret_n)
{
    const char *q = memchr(s, '"', (size_t)(end - s));
    if (!q || q == s || memchr(s, '\n', (size_t)(q - s)) || !starts(q, end, lit))
        return NULL;
    *ret_v = s;
    *ret_n = (size_t)(q - s);
    return q + strlen(lit);
}

static void free_calls(struct dsv32_chat_tool_call *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(c[i].name);
        free(c[i].arguments);
    }
    free(c);
}

/* Parses one function_calls block starting after CALLS_OPEN. Returns the end of the block (after
 * CALLS_CLOSE) and appends its calls to r, or NULL when the block is malformed or unfinished
 * (r is then left as it was). -ENOMEM is reported through *err. */
static const char *parse_block(const char *s, const char *end, struct dsv32_chat_reply *r, int *err)
{
    size_t n0 = r->n_calls;
    struct dsv32_buf args = {0};
    for (;;) {
        s = skip_ws(s, end);
        if (starts(s, end, CALLS_CLOSE)) {
            dsv32_buf_done(&args);
            return s + strlen(CALLS_CLOSE);
        }
        if (!starts(s, end, INVOKE_OPEN) || r->n_calls >= DSV32_CHAT_MAX_CALLS)
            goto bad;
        const char *name;
        size_t name_len;
        if (!(s = read_attr(s + strlen(INVOKE_OPEN), end, "\">", &name, &name_len)))
            goto bad;
        args.len = 0;
        dsv32_buf_put(&args, "{", 1);
        bool first = true;
        for (;;) {
            s = skip_ws(s, end);
            if (starts(s, end, INVOKE_CLOSE)) {
                s += strlen(INVOKE_CLOSE);
                break;
            }
            if (!starts(s, end, PARAM_OPEN))
                goto bad;
            const char *key, *flag, *val, *close;
            size_t key_len, flag_len;
            if (!(s = read_attr(s + strlen(PARAM_OPEN), end, "\" string=\"", &key, &key_len)) ||
                !(s = read_attr(s, end, "\">", &flag, &flag_len)) ||
                !(close = find(s, end, PARAM_CLOSE)))
                goto bad;
            val = s;
            s = close + strlen(PARAM_CLOSE);
            bool is_str = flag_len == 4 && memcmp(flag, "true", 4) == 0;
            if (!is_str && !(flag_len == 5 && memcmp(flag, "false", 5) == 0))
                goto bad;
            if (!first)
                dsv32_buf_put(&args, ", ", 2);
            first = false;
            dsv32_json_put_string(&args, key, key_len);
            dsv32_buf_put(&args, ": ", 2);
            if (is_str) {
                dsv32_json_put_string(&args, val, (size_t)(close - val));
            } else { /* a JSON value, kept as the model wrote it once it is known to parse */
                const char *v0 = skip_ws(val, close), *v1 = close;
                while (v1 > v0 && (v1[-1] == '\n' || v1[-1] == ' ' || v1[-1] == '\t'))
                    v1--;
                const char *parsed_end = NULL;
                cJSON *j = cJSON_ParseWithLengthOpts(v0, (size_t)(v1 - v0), &parsed_end, false);
                if (j && parsed_end != v1) { /* trailing text after the value */
                    cJSON_Delete(j);
                    j = NULL;
                }
                if (!j)
                    goto bad;
                cJSON_Delete(j);
                dsv32_buf_put(&args, v0, (size_t)(v1 - v0));
            }
        }
        dsv32_buf_put(&args, "}", 1);
        struct dsv32_chat_tool_call *c = realloc(r->calls, (r->n_calls + 1) * sizeof(*c));
        if (!c || args.err)
            goto nomem;
        r->calls = c;
        c[r->n_calls].name = dup_range(name, name_len);
        c[r->n_calls].arguments = dsv32_buf_take(&args, NULL);
        r->n_calls++;
        if (!c[r->n_calls - 1].name || !c[r->n_calls - 1].arguments)
            goto nomem;
    }
nomem:
    *err = -ENOMEM;
bad:
    dsv32_buf_done(&args);
    for (size_t i = n0; i < r->n_calls; i++) {
        free(r->calls[i].name);
        free(r->calls[i].arguments);
    }
    r->n_calls = n0;
    return NULL;
}

void dsv32_chat_reply_free(struct dsv32_chat_reply *r)
{
    if (!r)
        return;
    free(r->reasoning);
    free(r->content);
    free_calls(r->calls, r->n_calls);
    free(r);
}

int dsv32_chat_parse_reply(const char *text, size_t len, bool thinking,
                           struct dsv32_chat_reply **ret_reply)
{
    if (!text)
        return -EINVAL;
    if (len > DSV32_CHAT_MAX_PROMPT_BYTES)
        return -E2BIG;
    struct dsv32_chat_reply *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    const char *s = text, *end = text + len;
    int err = 0;
    size_t eos = strlen(EOS);
    if (len >= eos && memcmp(end - eos, EOS, eos) == 0)
        end -= eos;
    /* reasoning: from the start in thinking mode (the prompt opened it), or after a leading
     * <think> the model wrote itself */
    bool in_think = thinking;
    if (starts(s, end, THINK)) {
        s += strlen(THINK);
        in_think = true;
    }
    if (in_think) {
        const char *close = find(s, end, THINK_END);
        const char *stop = close ? close : end;
        if (!(r->reasoning = dup_range(s, (size_t)(stop - s))))
            goto nomem;
        r->reasoning_open = !close;
        s = close ? close + strlen(THINK_END) : end;
    }
    /* content, with every well-formed function_calls block taken out */
    struct dsv32_buf content = {0};
    dsv32_buf_put(&content, "", 0);
    while (s < end) {
        const char *open = find(s, end, CALLS_OPEN);
        if (!open) {
            dsv32_buf_put(&content, s, (size_t)(end - s));
            break;
        }
        const char *after = parse_block(open + strlen(CALLS_OPEN), end, r, &err);
        if (err < 0) {
            dsv32_buf_done(&content);
            goto nomem;
        }
        if (!after) { /* broken or cut off: it stays in the content as the model wrote it */
            r->calls_malformed = true;
            dsv32_buf_put(&content, s, (size_t)(end - s));
            break;
        }
        /* the encoder writes "\n\n" between the content and the block */
        const char *c_end = open;
        while (c_end > s && c_end[-1] == '\n')
            c_end--;
        dsv32_buf_put(&content, s, (size_t)(c_end - s));
        s = skip_ws(after, end) == end ? end : after;
    }
    if (!(r->content = dsv32_buf_take(&content, NULL)))
        goto nomem;
    *ret_reply = r;
    return 0;
nomem:
    dsv32_chat_reply_free(r);
    return -ENOMEM;
}
