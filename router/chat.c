/* Chat input for the router: the API's messages as the OpenAI-style JSON the chat encoder takes,
 * rendered with DeepSeek-V3.2's format and tokenized so that message text cannot forge control
 * tokens. */
#include "router.h"

#include "chat.h"
#include "dsv32.pb-c.h"
#include "error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static cJSON *message_json(const Dsv32__V1__ChatMessage *m)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "role", m->role);
    cJSON_AddStringToObject(o, "content", m->content);
    if (m->reasoning_content[0])
        cJSON_AddStringToObject(o, "reasoning_content", m->reasoning_content);
    if (m->tool_call_id[0])
        cJSON_AddStringToObject(o, "tool_call_id", m->tool_call_id);
    if (m->name[0])
        cJSON_AddStringToObject(o, "name", m->name);
    if (m->n_tool_calls) {
        cJSON *calls = cJSON_AddArrayToObject(o, "tool_calls");
        for (size_t i = 0; i < m->n_tool_calls; i++) {
            const Dsv32__V1__ToolCall *t = m->tool_calls[i];
            cJSON *c = cJSON_CreateObject(), *f = cJSON_CreateObject();
            if (t->id[0])
                cJSON_AddStringToObject(c, "id", t->id);
            cJSON_AddStringToObject(c, "type", t->type[0] ? t->type : "function");
            cJSON_AddStringToObject(f, "name", t->name);
            cJSON_AddStringToObject(f, "arguments", t->arguments[0] ? t->arguments : "{}");
            cJSON_AddItemToObject(c, "function", f);
            cJSON_AddItemToArray(calls, c);
        }
    }
    return o;
}

int router_render_chat(struct router *r, const struct Dsv32__V1__Chat *chat, int32_t **ret_ids,
                       size_t *ret_n, char *err, size_t err_len)
{
    if (chat->n_messages == 0) {
        snprintf(err, err_len, "chat has no messages");
        return -EINVAL;
    }
    for (size_t i = 0; i < chat->n_messages; i++) {
        const Dsv32__V1__ChatMessage *m = chat->messages[i];
        const char *roles[] = {"system", "developer", "user", "assistant", "tool"};
        int known = 0;
        for (size_t k = 0; k < sizeof(roles) / sizeof(roles[0]); k++)
            known |= strcmp(m->role, roles[k]) == 0;
        if (!known) {
            snprintf(err, err_len, "messages[%zu]: role \"%.32s\" is not system, developer, user, "
                     "assistant or tool", i, m->role);
            return -EINVAL;
        }
        if (!dsv32_utf8_valid(m->content, strlen(m->content)) ||
            !dsv32_utf8_valid(m->reasoning_content, strlen(m->reasoning_content))) {
            snprintf(err, err_len, "messages[%zu]: content is not valid UTF-8", i);
            return -EINVAL;
        }
    }
    cJSON *msgs = cJSON_CreateArray(), *tools = NULL;
    int rc = 0;
    for (size_t i = 0; i < chat->n_messages; i++)
        cJSON_AddItemToArray(msgs, message_json(chat->messages[i]));
    if (chat->tools[0]) {
        tools = cJSON_Parse(chat->tools);
        if (!cJSON_IsArray(tools)) {
            snprintf(err, err_len, "tools must be a JSON array of tool definitions");
            rc = -EINVAL;
            goto out;
        }
    }
    struct dsv32_chat_opts opts = {.thinking = chat->thinking, .add_bos = true, .tools = tools};
    rc = dsv32_chat_tokenize(r->tok, msgs, &opts, ret_ids, ret_n);
    if (rc < 0) {
        snprintf(err, err_len, "%s",
                 rc == DSV32_EFORMAT ? "malformed chat: unknown role, a tool message answering no "
                                       "tool call, or tool-call arguments that are not a JSON object"
                 : rc == DSV32_EUTF8 ? "chat text is not valid UTF-8"
                 : rc == -E2BIG      ? "the chat is too long"
                                     : dsv32_strerror(rc));
        rc = rc == -ENOMEM ? rc : -EINVAL;
    }
out:
    cJSON_Delete(msgs);
    cJSON_Delete(tools);
    return rc;
}
