/* sampling_bench: time of one token draw (dsv32_sample) over DeepSeek-V3.2's 129,280-token
 * vocabulary, for the sampling settings that matter (docs/BENCHMARKS.md, "Host time between decode
 * steps"). One thread, the same seeded random logits every run; median of 7 batches of 100 draws.
 * It uses only sampling.h, so it also builds against an older sampling.c for a comparison:
 *   cc -O2 -Idaemon/engine -Idaemon bench/sampling_bench.c OLD/sampling.c -lm */
#include "clock.h"
#include "sampling.h"

#include <stdio.h>
#include <stdlib.h>

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(void)
{
    enum { V = 129280, BATCHES = 7, DRAWS = 100 };
    float *logits = malloc(sizeof(float) * V);
    if (!logits)
        return 1;
    uint64_t z = 12345;
    for (int v = 0; v < V; v++) { /* splitmix64: logits uniform in [-8, 8) */
        uint64_t x = (z += 0x9e3779b97f4a7c15ull);
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        logits[v] = (float)((double)((x ^ (x >> 31)) >> 11) * 0x1.0p-53 * 16.0 - 8.0);
    }
    const struct {
        const char *name;
        float temperature, top_p;
        int top_k;
    } cases[] = {{"temperature 1 (default)", 1.0f, 1.0f, 0},
                 {"greedy (temperature 0)", 0.0f, 1.0f, 0},
                 {"temperature 0.7, top_k 40", 0.7f, 1.0f, 40},
                 {"temperature 0.6, top_p 0.95", 0.6f, 0.95f, 0}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        struct dsv32_sampling_params p;
        dsv32_sampling_defaults(&p);
        p.temperature = cases[c].temperature;
        p.top_p = cases[c].top_p;
        p.top_k = cases[c].top_k;
        p.seed = 1;
        p.has_seed = 1;
        struct dsv32_sampler s;
        const int32_t prompt[1] = {1};
        if (dsv32_sampler_init(&s, &p, V, prompt, 1) < 0)
            return 1;
        double t[BATCHES];
        for (int b = 0; b < BATCHES; b++) {
            double t0 = dsv32_mono_s();
            for (int i = 0; i < DRAWS; i++)
                (void)dsv32_sample(&s, logits, NULL);
            t[b] = (dsv32_mono_s() - t0) / DRAWS * 1e3;
        }
        qsort(t, BATCHES, sizeof(t[0]), cmp);
        printf("%-28s %.3f ms per draw\n", cases[c].name, t[BATCHES / 2]);
        dsv32_sampler_done(&s);
    }
    free(logits);
    return 0;
}
