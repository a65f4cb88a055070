/* The monotonic clock, for measuring intervals. */
#ifndef DSV32_CLOCK_H
#define DSV32_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t dsv32_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline double dsv32_mono_s(void) { return (double)dsv32_mono_ns() * 1e-9; }

#endif
