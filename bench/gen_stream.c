/* See gen_stream.h. */
#include "gen_stream.h"

#include "error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int64_t gen_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int gen_stream_run(struct dsv32_rpc_client *client, const Dsv32__V1__GenerateRequest *req, int timeout_ms,
                   struct gen_result *r)
{
    int64_t *arrival = r->arrival;
    const int cap = r->arrival_cap;
    memset(r, 0, sizeof(*r));
    r->arrival = arrival;
    r->arrival_cap = cap;
    r->start_us = gen_now_us();
    struct dsv32_rpc_stream *st;
    int rc = dsv32_rpc_stream_open_msg(client, "/dsv32.v1.Generate/Generate", &req->base, timeout_ms,
                                       DSV32_RPC_WAIT_FOR_READY, &st);
    if (rc < 0) {
        snprintf(r->error, sizeof(r->error), "open: %s", dsv32_strerror(rc));
        return -1;
    }
    for (;;) {
        ProtobufCMessage *m;
        rc = dsv32_rpc_stream_read_msg(st, &dsv32__v1__generate_response__descriptor, timeout_ms, &m);
        if (rc <= 0)
            break;
        const Dsv32__V1__GenerateResponse *g = (const Dsv32__V1__GenerateResponse *)m;
        const int64_t t = gen_now_us();
        if (g->n_token_ids && !r->first_us)
            r->first_us = t;
        for (size_t i = 0; i < g->n_token_ids; i++, r->tokens++)
            if (r->arrival && r->tokens < r->arrival_cap)
                r->arrival[r->tokens] = t;
        if (g->finish_reason)
            r->finish = (int)g->finish_reason;
        protobuf_c_message_free_unpacked(m, NULL);
    }
    r->end_us = gen_now_us();
    struct dsv32_rpc_status status;
    dsv32_rpc_stream_status(st, &status);
    dsv32_rpc_stream_free(st);
    if (rc < 0) {
        snprintf(r->error, sizeof(r->error), "%s: %.255s", dsv32_rpc_code_name(status.code), status.message);
        return -1;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double gen_pct(double *v, int n, double p)
{
    if (n <= 0)
        return 0;
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return v[(int)(p * (n - 1) + 0.5)];
}
