/* What the API benchmarks (load_test, scale_client) share: one Generate call read to its end,
 * with its timings, and percentiles. */
#ifndef DSV32_BENCH_GEN_STREAM_H
#define DSV32_BENCH_GEN_STREAM_H

#include "dsv32.pb-c.h"
#include "rpc.h"

#include <stdint.h>

struct gen_result {
    int tokens; /* token ids received */
    int finish; /* the last finish reason the stream carried (0: none) */
    int64_t start_us, first_us, end_us; /* monotonic; first_us 0 when no token came */
    int64_t *arrival; /* optional, the caller's: the arrival time of each token, up to arrival_cap */
    int arrival_cap;
    char error[320]; /* why the call failed; empty when it ended OK */
};

/* Monotonic microseconds. */
int64_t gen_now_us(void);

/* Calls Generate with req (waiting for the server to be ready, deadline timeout_ms) and reads
 * every response. 0 when the call ended OK (whether the tokens are the right ones is the
 * caller's to judge); -1 with r->error set otherwise. r->arrival and r->arrival_cap are kept. */
int gen_stream_run(struct dsv32_rpc_client *client, const Dsv32__V1__GenerateRequest *req, int timeout_ms,
                   struct gen_result *r);

/* The p-quantile (0..1, nearest rank) of v[0:n] (sorted in place); 0 when n is 0. */
double gen_pct(double *v, int n, double p);

#endif
