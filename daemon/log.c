/* Line-oriented stderr logger, journald-aware. See log.h. */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static atomic_int log_level = -1;
static const char *log_ident;
static int log_journal = -1; /* 1 when stderr is connected to journald */

int dsv32_log_parse_level(const char *s, enum dsv32_log_level *ret_level)
{
    static const struct { const char *name; enum dsv32_log_level level; } names[] = {
        {"error", DSV32_LOG_ERROR}, {"warn", DSV32_LOG_WARN}, {"warning", DSV32_LOG_WARN},
        {"info", DSV32_LOG_INFO},   {"debug", DSV32_LOG_DEBUG},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i].name) == 0) {
            *ret_level = names[i].level;
            return 0;
        }
    return -EINVAL;
}

void dsv32_log_set_level(enum dsv32_log_level level) { atomic_store(&log_level, (int)level); }
void dsv32_log_set_ident(const char *ident) { log_ident = ident; }

int dsv32_log_enabled(enum dsv32_log_level level)
{
    int cur = atomic_load(&log_level);
    if (cur < 0) {
        enum dsv32_log_level l = DSV32_LOG_INFO;
        const char *env = getenv("DSV32_LOG_LEVEL");
        if (env && dsv32_log_parse_level(env, &l) < 0)
            l = DSV32_LOG_INFO;
        cur = (int)l;
        atomic_store(&log_level, cur);
    }
    return (int)level <= cur;
}

/* journald sets JOURNAL_STREAM=dev:ino of the stream it gave us; compare with stderr. */
static int stderr_is_journal(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(STDERR_FILENO, &st) < 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void dsv32_log_write(enum dsv32_log_level level, const char *file, int line, const char *fmt, ...)
{
    static const char *tags[8] = {"", "", "", "error", "warn", "", "info", "debug"};
    char buf[2048];
    int n = 0, saved = errno;
    if (log_journal < 0)
        log_journal = stderr_is_journal();
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    if (log_journal) {
        n = snprintf(buf, sizeof(buf), "<%d>", (int)level);
    } else {
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        n = snprintf(buf, sizeof(buf), "%02d:%02d:%02d.%03ld ", tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000);
    }
    n += snprintf(buf + n, sizeof(buf) - (size_t)n, "%s%s%s %s:%d: ", log_ident ? log_ident : "",
                  log_ident ? " " : "", tags[level & 7], base, line);
    if (n < (int)sizeof(buf)) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
        va_end(ap);
        n = (m < 0) ? n : n + m;
    }
    if (n > (int)sizeof(buf) - 2)
        n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, buf, (size_t)n);
    (void)w;
    errno = saved;
}
