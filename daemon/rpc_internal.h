/* Internals shared by the server (rpc.c) and the client (rpc_client.c) of rpc.h: byte buffers,
 * deadlines and monotonic condition variables, and the tags that name what a completion is for. */
#ifndef DSV32_RPC_INTERNAL_H
#define DSV32_RPC_INTERNAL_H

#include "error.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

static inline grpc_byte_buffer *bb_from(const void *buf, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(buf, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Copies a received byte buffer into one malloc'ed block (len + 1 bytes, NUL-terminated). */
static inline int bb_copy(grpc_byte_buffer *bb, uint8_t **ret_buf, size_t *ret_len)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return DSV32_EFORMAT;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    size_t n = GRPC_SLICE_LENGTH(s);
    uint8_t *b = malloc(n + 1);
    if (!b) {
        grpc_slice_unref(s);
        return -ENOMEM;
    }
    memcpy(b, GRPC_SLICE_START_PTR(s), n);
    b[n] = 0;
    grpc_slice_unref(s);
    *ret_buf = b;
    *ret_len = n;
    return 0;
}

static inline gpr_timespec deadline_from_ms(int64_t timeout_ms)
{
    if (timeout_ms < 0)
        return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

static inline void abstime_after_ms(struct timespec *ts, int64_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static inline void cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

/* Waits on cv until *ts (NULL: forever); ETIMEDOUT or 0. */
static inline int cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu,
                                  const struct timespec *ts)
{
    if (!ts) {
        pthread_cond_wait(cv, mu);
        return 0;
    }
    return pthread_cond_timedwait(cv, mu, ts);
}

enum tag_kind {
    TAG_SRV_NEW,      /* a requested call arrived (or the request was dropped at shutdown) */
    TAG_SRV_CLOSE,    /* RECV_CLOSE_ON_SERVER: the call is over for the transport */
    TAG_SRV_SEND,     /* a stream message left */
    TAG_SRV_STATUS,   /* the status (and unary response) left */
    TAG_SRV_SHUTDOWN, /* grpc_server_shutdown_and_notify completed */
    TAG_CLI_SEND,     /* client: initial metadata / message / half-close batch */
    TAG_CLI_RECV,     /* client: a message (or the end) arrived */
    TAG_CLI_STATUS,   /* client: the final status arrived */
};

struct tag {
    enum tag_kind kind;
    void *obj;
};

#endif
