/* sd_notify through libsystemd, plus the watchdog thread of notify.h. */
#define _GNU_SOURCE 1
#include "notify.h"

#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#define MAX_STATUS_BYTES 512

int dsv32_notify(const char *state)
{
    int r = sd_notify(0, state);
    if (r < 0)
        log_warn("notify: cannot send '%s': %s", state, strerror(-r));
    return r;
}

int dsv32_notify_ready(void) { return dsv32_notify("READY=1"); }

int dsv32_notify_stopping(void) { return dsv32_notify("STOPPING=1"); }

int dsv32_notify_watchdog(void) { return dsv32_notify("WATCHDOG=1"); }

int dsv32_notify_status(const char *fmt, ...)
{
    char buf[MAX_STATUS_BYTES];
    int n = snprintf(buf, sizeof(buf), "STATUS=");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
    va_end(ap);
    /* One line: a newline would start another assignment. */
    for (char *p = buf; *p; p++)
        if (*p == '\n')
            *p = ' ';
    return dsv32_notify(buf);
}

int dsv32_notify_watchdog_enabled(uint64_t *ret_usec)
{
    uint64_t usec = 0;
    int r = sd_watchdog_enabled(0, &usec);
    if (r > 0)
        *ret_usec = usec;
    return r;
}

struct dsv32_notify_watchdog {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;
    uint64_t interval_us;
    dsv32_notify_healthy_fn healthy;
    void *arg;
};

static void *watchdog_thread(void *arg)
{
    struct dsv32_notify_watchdog *w = arg;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    bool was_healthy = true;
    pthread_mutex_lock(&w->mu);
    while (!w->stop) {
        pthread_mutex_unlock(&w->mu);
        bool ok = !w->healthy || w->healthy(w->arg);
        if (ok)
            dsv32_notify_watchdog();
        if (ok != was_healthy)
            log_warn("notify: %s", ok ? "healthy again, feeding the watchdog"
                                      : "unhealthy: watchdog not fed (systemd will restart us)");
        was_healthy = ok;
        pthread_mutex_lock(&w->mu);
        next.tv_sec += (time_t)(w->interval_us / 1000000);
        next.tv_nsec += (long)(w->interval_us % 1000000) * 1000;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_sec++;
            next.tv_nsec -= 1000000000L;
        }
        while (!w->stop && pthread_cond_timedwait(&w->cond, &w->mu, &next) != ETIMEDOUT) {
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int dsv32_notify_watchdog_start(dsv32_notify_healthy_fn healthy, void *arg,
                                struct dsv32_notify_watchdog **ret)
{
    uint64_t usec;
    int r = dsv32_notify_watchdog_enabled(&usec);
    if (r < 0)
        return r;
    if (r == 0) {
        *ret = NULL;
        return 0;
    }
    struct dsv32_notify_watchdog *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->interval_us = usec / 2 > 1000 ? usec / 2 : 1000;
    w->healthy = healthy;
    w->arg = arg;
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cond, &ca);
    pthread_condattr_destroy(&ca);
    r = pthread_create(&w->thread, NULL, watchdog_thread, w);
    if (r != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cond);
        free(w);
        return -r;
    }
    log_debug("notify: watchdog every %llu ms", (unsigned long long)(w->interval_us / 1000));
    *ret = w;
    return 0;
}

void dsv32_notify_watchdog_stop(struct dsv32_notify_watchdog *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    free(w);
}
