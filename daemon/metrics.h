/* Prometheus metrics: a GET /metrics endpoint in the text exposition format (version 0.0.4), on
 * its own thread, as vLLM, SGLang and Dynamo serve theirs. The daemon fills the text on each
 * scrape from a callback; nothing is kept between scrapes. */
#ifndef DSV32_METRICS_H
#define DSV32_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct dsv32_metrics;
struct dsv32_metrics_text;

/* Called on the endpoint's thread for each scrape: adds the current values. */
typedef void (*dsv32_metrics_fill_fn)(void *ctx, struct dsv32_metrics_text *t);

/* Listens on HOST:PORT (PORT 0: any free one) and, when port_file is not NULL, writes the bound
 * port there. 0 or <0. */
int dsv32_metrics_start(const char *listen, const char *port_file, dsv32_metrics_fill_fn fill,
                        void *ctx, struct dsv32_metrics **ret);
void dsv32_metrics_stop(struct dsv32_metrics *m);

/* One family: its # HELP and # TYPE lines (type "counter" or "gauge"), then its samples. */
void dsv32_metrics_family(struct dsv32_metrics_text *t, const char *name, const char *type,
                          const char *help);
/* A sample of the last family; labels like `phase="pack"` or NULL. */
void dsv32_metrics_sample(struct dsv32_metrics_text *t, const char *labels, double value);
/* Both at once, for a family of one unlabelled sample. */
void dsv32_metrics_one(struct dsv32_metrics_text *t, const char *name, const char *type,
                       const char *help, double value);

/* A latency histogram that threads observe into without a lock. */
#define DSV32_HIST_MAX_BUCKETS 24
struct dsv32_histogram {
    const double *bounds; /* upper bounds in seconds, ascending; +Inf implied */
    int n;
    atomic_uint_fast64_t counts[DSV32_HIST_MAX_BUCKETS + 1]; /* per bucket, not cumulative */
    atomic_uint_fast64_t sum_ns;
};
/* bounds must outlive h; n <= DSV32_HIST_MAX_BUCKETS */
void dsv32_histogram_init(struct dsv32_histogram *h, const double *bounds, int n);
void dsv32_histogram_observe(struct dsv32_histogram *h, double seconds);
/* A histogram family: _bucket (cumulative, le labels), _sum and _count. */
void dsv32_metrics_histogram(struct dsv32_metrics_text *t, const char *name, const char *help,
                             struct dsv32_histogram *h);

#endif
