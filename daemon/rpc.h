/* A thin layer over the gRPC C core for dsv32's daemons and tools. Server: one completion-queue
 * thread per server, registered methods (unary and server-streaming) with per-call state machines,
 * UNIMPLEMENTED for unknown methods, limits on calls, message sizes and queued stream messages,
 * bearer-token + loopback guard for admin methods, and cancellation (client gone, deadline passed,
 * server shutting down) reported to the handler by a callback and a flag. Handlers may answer
 * from any thread. Client: unary calls and streams with deadlines and wait-for-ready, over a
 * channel whose completion queue is always polled by a thread of its own (so reconnects go on
 * while nobody is calling). Messages travel as packed protobuf bytes; the _msg helpers pack and
 * unpack protobuf-c messages. */
#ifndef DSV32_RPC_H
#define DSV32_RPC_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* gRPC status codes (the same numbers as grpc_status_code). */
enum dsv32_rpc_code {
    DSV32_RPC_OK = 0,
    DSV32_RPC_CANCELLED = 1,
    DSV32_RPC_UNKNOWN = 2,
    DSV32_RPC_INVALID_ARGUMENT = 3,
    DSV32_RPC_DEADLINE_EXCEEDED = 4,
    DSV32_RPC_NOT_FOUND = 5,
    DSV32_RPC_ALREADY_EXISTS = 6,
    DSV32_RPC_PERMISSION_DENIED = 7,
    DSV32_RPC_RESOURCE_EXHAUSTED = 8,
    DSV32_RPC_FAILED_PRECONDITION = 9,
    DSV32_RPC_ABORTED = 10,
    DSV32_RPC_OUT_OF_RANGE = 11,
    DSV32_RPC_UNIMPLEMENTED = 12,
    DSV32_RPC_INTERNAL = 13,
    DSV32_RPC_UNAVAILABLE = 14,
    DSV32_RPC_DATA_LOSS = 15,
    DSV32_RPC_UNAUTHENTICATED = 16,
};

/* "OK", "INVALID_ARGUMENT"...; never NULL. */
const char *dsv32_rpc_code_name(int code);
/* The status a handler should answer for an error code (-EINVAL -> INVALID_ARGUMENT,
 * -DSV32_EOVERLOAD -> RESOURCE_EXHAUSTED, -DSV32_ETIMEOUT -> DEADLINE_EXCEEDED...). */
int dsv32_rpc_code_from_err(int err);
/* True for "ipv4:127.x.x.x:port", "ipv6:[::1]:port", "ipv6:[::ffff:127.x.x.x]:port", "unix:...";
 * the form grpc_call_get_peer() reports. */
bool dsv32_rpc_peer_is_loopback(const char *peer);

#define DSV32_RPC_DEFAULT_MAX_MSG_BYTES (4u << 20)
#define DSV32_RPC_STATUS_MSG_MAX 256

/* ---- Server ------------------------------------------------------------------------------- */

struct dsv32_rpc_server_config {
    const char *listen;         /* "127.0.0.1:7001", "[::]:7001", "unix:/run/x.sock"; port 0:
                                   any free port */
    size_t max_recv_bytes;      /* largest request message accepted; 0: 4 MiB */
    size_t max_send_bytes;      /* largest response message; 0: 4 MiB */
    uint32_t max_calls;         /* calls in progress; more get RESOURCE_EXHAUSTED; 0: 1024 */
    uint32_t max_stream_queue;  /* stream messages queued per call before write says overload;
                                   0: 64 */
    const char *admin_token;    /* bearer token of DSV32_RPC_ADMIN methods; NULL/"": they refuse */
    bool admin_allow_remote;    /* admin methods from non-loopback peers too */
};

enum dsv32_rpc_kind {
    DSV32_RPC_UNARY,         /* one request, one response */
    DSV32_RPC_SERVER_STREAM, /* one request, any number of responses */
};

/* Method flags. */
#define DSV32_RPC_ADMIN 1u /* needs `authorization: Bearer <admin_token>` and a loopback peer */

struct dsv32_rpc_server;
struct dsv32_rpc_call;

/* Called on the server's completion-queue thread when a call arrives; req (the packed request)
 * is valid during the call only. The handler owns the call until it calls dsv32_rpc_call_reply or
 * dsv32_rpc_call_finish, exactly once, from any thread, also when the call was cancelled. It must
 * not block: long work goes to another thread. */
typedef void (*dsv32_rpc_handler_fn)(void *arg, struct dsv32_rpc_call *call, const uint8_t *req,
                                     size_t req_len);
/* Called once when a call the handler still owns is cancelled (client gone, deadline passed,
 * server shutdown); on the completion-queue thread, or at once from dsv32_rpc_call_on_cancel when
 * the call was already cancelled. Must not block; the handler still has to finish the call. */
typedef void (*dsv32_rpc_cancel_fn)(void *arg, struct dsv32_rpc_call *call);

int dsv32_rpc_server_new(const struct dsv32_rpc_server_config *cfg,
                         struct dsv32_rpc_server **ret);
/* Before start. path: "/dsv32.v1.Generate/Generate". -EEXIST for a path added twice. */
int dsv32_rpc_server_add_method(struct dsv32_rpc_server *s, const char *path,
                                enum dsv32_rpc_kind kind, unsigned flags, dsv32_rpc_handler_fn fn,
                                void *arg);
/* Binds and starts serving; ret_port (may be NULL) receives the bound port. */
int dsv32_rpc_server_start(struct dsv32_rpc_server *s, int *ret_port);
/* Stops taking calls, lets running calls finish for up to grace_ms, then cancels them and waits
 * until every handler has finished its calls. Idempotent; dsv32_rpc_server_free calls it. */
void dsv32_rpc_server_shutdown(struct dsv32_rpc_server *s, int64_t grace_ms);
/* Shuts down (grace 0) and frees; accepts NULL. */
void dsv32_rpc_server_free(struct dsv32_rpc_server *s);

/* Unary: sends the response and status OK, ends the call. -EMSGSIZE (call ended with INTERNAL)
 * past max_send_bytes; -DSV32_ECANCELLED when the call was cancelled (still ended). */
int dsv32_rpc_call_reply(struct dsv32_rpc_call *c, const void *buf, size_t len);
int dsv32_rpc_call_reply_msg(struct dsv32_rpc_call *c, const ProtobufCMessage *m);
/* Streams: queues one message; writes go out one at a time in order. Never blocks: -DSV32_EOVERLOAD
 * when max_stream_queue messages wait (see wait_writable), -DSV32_ECANCELLED once the call is
 * cancelled or broken, -EMSGSIZE past max_send_bytes. */
int dsv32_rpc_call_write(struct dsv32_rpc_call *c, const void *buf, size_t len);
int dsv32_rpc_call_write_msg(struct dsv32_rpc_call *c, const ProtobufCMessage *m);
/* Blocks until a write would be queued: 0, -DSV32_ECANCELLED, -DSV32_ETIMEOUT; -EDEADLK on the
 * completion-queue thread (which must never wait). timeout_ms < 0: no limit. */
int dsv32_rpc_call_wait_writable(struct dsv32_rpc_call *c, int64_t timeout_ms);
/* Ends the call with a status after the queued messages (OK ends a stream normally); the handler
 * must not touch the call afterwards. 0, or -DSV32_ECANCELLED when the call had been cancelled. */
int dsv32_rpc_call_finish(struct dsv32_rpc_call *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int dsv32_rpc_call_finish_err(struct dsv32_rpc_call *c, int err, const char *what);
void dsv32_rpc_call_on_cancel(struct dsv32_rpc_call *c, dsv32_rpc_cancel_fn fn, void *arg);
bool dsv32_rpc_call_cancelled(const struct dsv32_rpc_call *c);
/* Time left before the client's deadline; INT64_MAX without one, <= 0 past it. */
int64_t dsv32_rpc_call_remaining_ms(const struct dsv32_rpc_call *c);
const char *dsv32_rpc_call_peer(const struct dsv32_rpc_call *c);
const char *dsv32_rpc_call_method(const struct dsv32_rpc_call *c);
/* Copies request metadata `key` (lower case) NUL-terminated into buf: its length, -ENOENT, or
 * -ENOBUFS when cap is too small. */
int dsv32_rpc_call_metadata(const struct dsv32_rpc_call *c, const char *key, char *buf,
                            size_t cap);

/* ---- grpc.health.v1.Health ------------------------------------------------------------------ */

enum dsv32_rpc_health_status {
    DSV32_RPC_HEALTH_UNKNOWN = 0,
    DSV32_RPC_HEALTH_SERVING = 1,
    DSV32_RPC_HEALTH_NOT_SERVING = 2,
    DSV32_RPC_HEALTH_SERVICE_UNKNOWN = 3,
};

struct dsv32_rpc_health;

/* Adds Check and Watch to a server that has not started; service "" (the whole server) starts
 * NOT_SERVING. Free it after the server. */
int dsv32_rpc_health_new(struct dsv32_rpc_server *s, struct dsv32_rpc_health **ret);
/* Sets a service's status (adding it: at most 32 services) and tells its watchers. */
int dsv32_rpc_health_set(struct dsv32_rpc_health *h, const char *service,
                         enum dsv32_rpc_health_status st);
void dsv32_rpc_health_free(struct dsv32_rpc_health *h);

/* ---- Client ------------------------------------------------------------------------------- */

struct dsv32_rpc_client_config {
    const char *target;       /* "127.0.0.1:2379", "dns:///host:port", "unix:/path" */
    size_t max_recv_bytes;    /* 0: 4 MiB */
    size_t max_send_bytes;    /* 0: 4 MiB */
    const char *bearer_token; /* sent as `authorization: Bearer <token>`; NULL: none */
    int64_t max_backoff_ms;   /* reconnect backoff ceiling; 0: 1000 */
    int64_t keepalive_ms;     /* HTTP/2 pings while calls are open; 0: 10000; < 0: off */
};

/* Call flags. */
#define DSV32_RPC_WAIT_FOR_READY 1u /* wait for the channel to connect (up to the deadline) instead
                                       of failing at once with UNAVAILABLE */
#define DSV32_RPC_BIDI 2u           /* streams: keep the sending side open (stream_write) */

struct dsv32_rpc_status {
    int code; /* enum dsv32_rpc_code */
    char message[DSV32_RPC_STATUS_MSG_MAX];
};

struct dsv32_rpc_client;
struct dsv32_rpc_stream;

int dsv32_rpc_client_new(const struct dsv32_rpc_client_config *cfg,
                         struct dsv32_rpc_client **ret);
/* Every stream of the client must have been freed. Accepts NULL. */
void dsv32_rpc_client_free(struct dsv32_rpc_client *c);

/* A unary call; timeout_ms < 0: no deadline. 0 with the response (malloc'ed, free() it) in
 * ret_resp/ret_len; for other statuses -DSV32_ETIMEOUT (DEADLINE_EXCEEDED), -DSV32_ECANCELLED
 * (CANCELLED) or -DSV32_EGRPC; st (may be NULL) always receives the status. */
int dsv32_rpc_unary(struct dsv32_rpc_client *c, const char *method, const void *req,
                    size_t req_len, int64_t timeout_ms, unsigned flags, uint8_t **ret_resp,
                    size_t *ret_len, struct dsv32_rpc_status *st);
/* The same with protobuf-c messages; free the response with protobuf_c_message_free_unpacked.
 * -DSV32_EFORMAT when the response does not unpack. */
int dsv32_rpc_unary_msg(struct dsv32_rpc_client *c, const char *method,
                        const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
                        int64_t timeout_ms, unsigned flags, ProtobufCMessage **ret_resp,
                        struct dsv32_rpc_status *st);

/* Opens a stream. req (may be NULL with DSV32_RPC_BIDI) is the first message; without
 * DSV32_RPC_BIDI the sending side closes after it (server streaming). timeout_ms: the whole
 * call's deadline, < 0 none. */
int dsv32_rpc_stream_open(struct dsv32_rpc_client *c, const char *method, const void *req,
                          size_t req_len, int64_t timeout_ms, unsigned flags,
                          struct dsv32_rpc_stream **ret);
int dsv32_rpc_stream_open_msg(struct dsv32_rpc_client *c, const char *method,
                              const ProtobufCMessage *req, int64_t timeout_ms, unsigned flags,
                              struct dsv32_rpc_stream **ret);
/* Bidi streams: sends one message (waits until it left); -DSV32_ECANCELLED once the call ended. */
int dsv32_rpc_stream_write(struct dsv32_rpc_stream *s, const void *buf, size_t len);
int dsv32_rpc_stream_write_msg(struct dsv32_rpc_stream *s, const ProtobufCMessage *m);
int dsv32_rpc_stream_close_send(struct dsv32_rpc_stream *s);
/* Next message: 1 with it (malloc'ed) in ret_buf/ret_len; 0 at the end with status OK; -EAGAIN
 * when timeout_ms (< 0: none) passed first (the call goes on; read again); otherwise the call
 * failed: -DSV32_ETIMEOUT, -DSV32_ECANCELLED or -DSV32_EGRPC (see dsv32_rpc_stream_status). */
int dsv32_rpc_stream_read(struct dsv32_rpc_stream *s, int64_t timeout_ms, uint8_t **ret_buf,
                          size_t *ret_len);
int dsv32_rpc_stream_read_msg(struct dsv32_rpc_stream *s, const ProtobufCMessageDescriptor *desc,
                              int64_t timeout_ms, ProtobufCMessage **ret);
/* The final status (code UNKNOWN with an empty message while the call runs). */
void dsv32_rpc_stream_status(struct dsv32_rpc_stream *s, struct dsv32_rpc_status *st);
/* Cancels the call (from any thread); a blocked read returns. */
void dsv32_rpc_stream_cancel(struct dsv32_rpc_stream *s);
/* Cancels if still running, waits for gRPC to let go, frees. Accepts NULL. */
void dsv32_rpc_stream_free(struct dsv32_rpc_stream *s);

/* Packs a protobuf-c message into a malloc'ed buffer. */
int dsv32_rpc_pack(const ProtobufCMessage *m, uint8_t **ret_buf, size_t *ret_len);

#endif
