/* The DeepSeek-V3.2 chat format: OpenAI-style messages (system, developer, user, assistant, tool)
 * rendered into the prompt text the model expects, thinking and non-thinking modes, tools as a
 * "## Tools" section with the DSML calling convention; and the way back: the model's reply split
 * into reasoning, content and DSML tool calls. Held to DeepSeek's own test vectors
 * (tests/chat-format). dsv32_chat_tokenize() turns the prompt into ids without letting text from
 * the messages become control tokens. */
#ifndef DSV32_CHAT_H
#define DSV32_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "tokenizer.h"

/* Limits on what a caller controls. */
#define DSV32_CHAT_MAX_MESSAGES 100000
#define DSV32_CHAT_MAX_PROMPT_BYTES (256u << 20)
#define DSV32_CHAT_MAX_CALLS 1024 /* tool calls parsed from one reply */

struct dsv32_chat_opts {
    /* Thinking mode: the last user (or developer) turn ends with "<think>" and assistant turns
     * after it carry their reasoning_content; otherwise user turns end with "</think>". */
    bool thinking;
    bool add_bos; /* start with <｜begin▁of▁sentence｜> */
    /* OpenAI tools array ([{"type": "function", "function": {...}}]) for the whole conversation,
     * or NULL. It joins the first message when that is a system or developer message (as its
     * "tools"); otherwise an empty system turn carrying them is put first. */
    const cJSON *tools;
};

/* Renders messages (a JSON array of OpenAI-style message objects: role, content,
 * reasoning_content, tool_calls with function.name / function.arguments, tools on a system or
 * developer message) into *ret_prompt (malloc'd, NUL-terminated, *ret_len bytes). Tool-call
 * arguments (a JSON object or its text) are written as DSML parameters: strings as they are,
 * other values as Python's json.dumps writes them. Errors: DSV32_EFORMAT (not an array of
 * messages, unknown role, a tool message without an assistant tool call to answer, arguments
 * that are not a JSON object), DSV32_EUNSUPPORTED (content parts other than text), -E2BIG,
 * -ENOMEM. */
int dsv32_chat_encode(const cJSON *messages, const struct dsv32_chat_opts *opts, char **ret_prompt,
                      size_t *ret_len);

/* The same prompt, plus the byte ranges of it that the template wrote (sorted, disjoint; malloc'd,
 * free() them): role markers, BOS/EOS, think tags, DSML framing. Everything else came from the
 * messages. ret_spans may be NULL. */
int dsv32_chat_render(const cJSON *messages, const struct dsv32_chat_opts *opts, char **ret_prompt,
                      size_t *ret_len, struct dsv32_tok_span **ret_spans, size_t *ret_n_spans);

/* Renders and tokenizes the prompt: added tokens are recognised only in the template's own text,
 * so a message containing "<｜User｜>" or "<｜end▁of▁sentence｜>" cannot forge a turn. Where the
 * messages hold no such text, the ids equal encoding the whole prompt with PARSE_SPECIAL (which
 * is what DeepSeek's reference does). Errors: those of both steps. */
int dsv32_chat_tokenize(const struct dsv32_tok *tok, const cJSON *messages,
                        const struct dsv32_chat_opts *opts, int32_t **ret_ids, size_t *ret_n);

struct dsv32_chat_tool_call {
    char *name;
    char *arguments; /* a JSON object, e.g. {"location": "Hangzhou", "days": 3} */
};

/* A model reply taken apart. */
struct dsv32_chat_reply {
    char *reasoning;     /* the thinking part; NULL when there is none */
    bool reasoning_open; /* the reply ended inside the thinking part (no "</think>") */
    char *content;       /* the answer text ("" when empty); malformed DSML stays here verbatim */
    struct dsv32_chat_tool_call *calls;
    size_t n_calls;
    bool calls_malformed; /* a DSML block was cut off or broken: it was left in content */
};

/* Splits the text a model generated after the prompt. thinking says whether the prompt ended
 * with "<think>" (the reply then starts inside the reasoning). Never fails on what the model
 * wrote: an unfinished think block leaves reasoning_open set, a broken or unfinished DSML block
 * stays in content with calls_malformed set. Errors: -EINVAL (text NULL), -E2BIG, -ENOMEM. */
int dsv32_chat_parse_reply(const char *text, size_t len, bool thinking,
                           struct dsv32_chat_reply **ret_reply);
void dsv32_chat_reply_free(struct dsv32_chat_reply *r);

#endif
