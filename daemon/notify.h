/* systemd's notify protocol for Type=notify units: READY=1 once serving, STATUS=... for
 * `systemctl status`, STOPPING=1 on the way out, and WATCHDOG=1 from a timer thread at half of
 * WATCHDOG_USEC (only while the daemon says it is healthy, so a stuck daemon gets restarted).
 * Without NOTIFY_SOCKET (not started by systemd) every call does nothing and returns 0. */
#ifndef DSV32_NOTIFY_H
#define DSV32_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>

/* Sends raw state lines ("READY=1\nSTATUS=serving"): 1 when sent, 0 without NOTIFY_SOCKET,
 * negative errno on failure. */
int dsv32_notify(const char *state);
int dsv32_notify_ready(void);
int dsv32_notify_stopping(void);
int dsv32_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int dsv32_notify_watchdog(void);

/* Interval systemd expects WATCHDOG=1 at (WATCHDOG_USEC, when WATCHDOG_PID is unset or ours):
 * 1 and the interval, 0 when the watchdog is off, negative errno when the variables are bad. */
int dsv32_notify_watchdog_enabled(uint64_t *ret_usec);

/* Returns true while the daemon is healthy enough to be kept alive (its loops make progress). */
typedef bool (*dsv32_notify_healthy_fn)(void *arg);

struct dsv32_notify_watchdog;

/* Starts the pinging thread when systemd's watchdog is on (*ret = NULL and 0 when it is off).
 * healthy may be NULL (always healthy). */
int dsv32_notify_watchdog_start(dsv32_notify_healthy_fn healthy, void *arg,
                                struct dsv32_notify_watchdog **ret);
/* Stops the thread; accepts NULL. */
void dsv32_notify_watchdog_stop(struct dsv32_notify_watchdog *w);

#endif
