/* dsv32ctl generate and chat: one Generate stream to the router, the reply's text written to
 * stdout as each message arrives (the thinking part of a chat reply goes to stderr), or with
 * --json one JSON object per message. */
#include "ctl.h"

#include "dsv32.pb-c.h"
#include "error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char *finish_name(Dsv32__V1__FinishReason f)
{
    switch (f) {
    case DSV32__V1__FINISH_REASON__FINISH_REASON_STOP: return "stop";
    case DSV32__V1__FINISH_REASON__FINISH_REASON_LENGTH: return "length";
    case DSV32__V1__FINISH_REASON__FINISH_REASON_STOP_STRING: return "stop_string";
    case DSV32__V1__FINISH_REASON__FINISH_REASON_CANCELLED: return "cancelled";
    case DSV32__V1__FINISH_REASON__FINISH_REASON_ERROR: return "error";
    default: return "";
    }
}

static int stream(const struct ctl_opts *o, Dsv32__V1__GenerateRequest *req, bool chat)
{
    struct ctl_target t;
    if (ctl_target_resolve(o, CTL_NEED_ROUTER, &t) < 0)
        return 2;
    Dsv32__V1__SamplingParams sp = DSV32__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = (uint32_t)(o->max_tokens > 0 ? o->max_tokens : chat ? 128 : 64);
    if (o->has_temperature) {
        sp.temperature_opt_case = DSV32__V1__SAMPLING_PARAMS__TEMPERATURE_OPT_TEMPERATURE;
        sp.temperature = o->temperature;
    }
    if (o->has_seed) {
        sp.seed_opt_case = DSV32__V1__SAMPLING_PARAMS__SEED_OPT_SEED;
        sp.seed = o->seed;
    }
    req->sampling = &sp;
    struct dsv32_rpc_client *c;
    if (ctl_router_client(&t, false, &c) < 0)
        return 1;
    int64_t timeout_ms = (int64_t)(o->timeout_s > 0 ? o->timeout_s : 600) * 1000;
    struct dsv32_rpc_stream *s;
    int r = dsv32_rpc_stream_open_msg(c, "/dsv32.v1.Generate/Generate", &req->base, timeout_ms,
                                      DSV32_RPC_WAIT_FOR_READY, &s);
    if (r < 0) {
        fprintf(stderr, "dsv32ctl: Generate: %s\n", dsv32_strerror(r));
        dsv32_rpc_client_free(c);
        return 1;
    }
    bool ends_with_newline = true, any_text = false, in_reasoning = false;
    Dsv32__V1__FinishReason why = 0;
    char err[512] = "";
    unsigned completion = 0;
    for (;;) {
        ProtobufCMessage *m;
        r = dsv32_rpc_stream_read_msg(s, &dsv32__v1__generate_response__descriptor, timeout_ms, &m);
        if (r <= 0)
            break;
        Dsv32__V1__GenerateResponse *g = (Dsv32__V1__GenerateResponse *)m;
        if (o->json) {
            cJSON *j = cJSON_CreateObject(), *ids = cJSON_AddArrayToObject(j, "token_ids");
            cJSON_AddStringToObject(j, "request_id", g->request_id);
            for (size_t i = 0; i < g->n_token_ids; i++)
                cJSON_AddItemToArray(ids, cJSON_CreateNumber(g->token_ids[i]));
            cJSON_AddStringToObject(j, "text", g->text);
            if (g->reasoning_text[0])
                cJSON_AddStringToObject(j, "reasoning_text", g->reasoning_text);
            if (g->finish_reason)
                cJSON_AddStringToObject(j, "finish_reason", finish_name(g->finish_reason));
            if (g->usage) {
                cJSON_AddNumberToObject(j, "prompt_tokens", g->usage->prompt_tokens);
                cJSON_AddNumberToObject(j, "completion_tokens", g->usage->completion_tokens);
            }
            if (g->error_message[0])
                cJSON_AddStringToObject(j, "error", g->error_message);
            char *line = cJSON_PrintUnformatted(j);
            printf("%s\n", line ? line : "{}");
            free(line);
            cJSON_Delete(j);
            fflush(stdout);
        } else {
            if (g->reasoning_text[0]) {
                if (!in_reasoning)
                    fputs("[thinking] ", stderr);
                in_reasoning = true;
                fputs(g->reasoning_text, stderr);
                fflush(stderr);
            }
            if (g->text[0]) {
                if (in_reasoning) {
                    fputs("\n[answer]\n", stderr);
                    in_reasoning = false;
                }
                fputs(g->text, stdout);
                fflush(stdout);
                any_text = true;
                ends_with_newline = g->text[strlen(g->text) - 1] == '\n';
            }
        }
        if (g->finish_reason) {
            why = g->finish_reason;
            completion = g->usage ? g->usage->completion_tokens : 0;
            snprintf(err, sizeof(err), "%s", g->error_message);
        }
        protobuf_c_message_free_unpacked(m, NULL);
    }
    struct dsv32_rpc_status st;
    dsv32_rpc_stream_status(s, &st);
    dsv32_rpc_stream_free(s);
    dsv32_rpc_client_free(c);
    if (!o->json && in_reasoning)
        fputc('\n', stderr); /* the reply ended inside its thinking */
    if (!o->json && any_text && !ends_with_newline)
        fputc('\n', stdout);
    fflush(stdout);
    if (r < 0) {
        fprintf(stderr, "dsv32ctl: Generate: %s%s%s\n", dsv32_rpc_code_name(st.code),
                st.message[0] ? ": " : "", st.message);
        if (chat && (st.code == DSV32_RPC_UNIMPLEMENTED || st.code == DSV32_RPC_FAILED_PRECONDITION))
            fprintf(stderr, "dsv32ctl: the router at %s does not take chat input yet; "
                            "`dsv32ctl generate --text TEXT` sends raw text\n", t.router);
        else if (st.code == DSV32_RPC_UNAVAILABLE)
            fprintf(stderr, "dsv32ctl: is the router at %s up, with a ready attention daemon?\n",
                    t.router);
        return 1;
    }
    if (why == DSV32__V1__FINISH_REASON__FINISH_REASON_ERROR) {
        fprintf(stderr, "dsv32ctl: the generation failed after %u tokens: %s\n", completion, err);
        return 1;
    }
    return 0;
}

int ctl_cmd_generate(const struct ctl_opts *o)
{
    if (!o->text || o->n_args != 0) {
        fprintf(stderr, "usage: dsv32ctl generate --text TEXT [--max-tokens N] [--temperature T] "
                        "[--seed S] [--json]\n");
        return 2;
    }
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_TEXT;
    req.text = (char *)o->text;
    return stream(o, &req, false);
}

int ctl_cmd_chat(const struct ctl_opts *o)
{
    if (o->n_args != 1) {
        fprintf(stderr, "usage: dsv32ctl chat [--thinking] [--system TEXT] [--max-tokens N] "
                        "[--temperature T] [--seed S] [--json] MESSAGE\n");
        return 2;
    }
    Dsv32__V1__ChatMessage sys = DSV32__V1__CHAT_MESSAGE__INIT, user = DSV32__V1__CHAT_MESSAGE__INIT;
    Dsv32__V1__ChatMessage *msgs[2];
    size_t n = 0;
    if (o->system) {
        sys.role = "system";
        sys.content = (char *)o->system;
        msgs[n++] = &sys;
    }
    user.role = "user";
    user.content = o->args[0];
    msgs[n++] = &user;
    Dsv32__V1__Chat chat = DSV32__V1__CHAT__INIT;
    chat.messages = msgs;
    chat.n_messages = n;
    chat.thinking = o->thinking;
    Dsv32__V1__GenerateRequest req = DSV32__V1__GENERATE_REQUEST__INIT;
    req.input_case = DSV32__V1__GENERATE_REQUEST__INPUT_CHAT;
    req.chat = &chat;
    return stream(o, &req, true);
}
