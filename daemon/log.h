/* Logging to stderr for journald: "<N>" syslog priority prefixes when stderr is the journal
 * (JOURNAL_STREAM names it), a timestamp otherwise. The level comes from DSV32_LOG_LEVEL
 * (error, warn, info, debug) or dsv32_log_set_level(). Thread-safe: one write(2) per line. */
#ifndef DSV32_LOG_H
#define DSV32_LOG_H

enum dsv32_log_level { DSV32_LOG_ERROR = 3, DSV32_LOG_WARN = 4, DSV32_LOG_INFO = 6, DSV32_LOG_DEBUG = 7 };

void dsv32_log_set_level(enum dsv32_log_level level);
/* Parses "error", "warn", "info", "debug"; returns 0 or -EINVAL. */
int dsv32_log_parse_level(const char *s, enum dsv32_log_level *ret_level);
int dsv32_log_enabled(enum dsv32_log_level level);
/* Sets the program name printed in each line (default: none). */
void dsv32_log_set_ident(const char *ident);

void dsv32_log_write(enum dsv32_log_level level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define dsv32_log(level, ...)                                                                      \
    do {                                                                                           \
        if (dsv32_log_enabled(level))                                                              \
            dsv32_log_write(level, __FILE__, __LINE__, __VA_ARGS__);                               \
    } while (0)
#define log_error(...) dsv32_log(DSV32_LOG_ERROR, __VA_ARGS__)
#define log_warn(...) dsv32_log(DSV32_LOG_WARN, __VA_ARGS__)
#define log_info(...) dsv32_log(DSV32_LOG_INFO, __VA_ARGS__)
#define log_debug(...) dsv32_log(DSV32_LOG_DEBUG, __VA_ARGS__)

#endif
