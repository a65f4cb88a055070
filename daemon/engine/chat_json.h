/* JSON text the way DeepSeek's prompt encoder writes it: Python's json.dumps(ensure_ascii=False)
 * over cJSON trees (", " and ": " separators, key order kept, non-ASCII written raw, Python's
 * shortest float repr), plus exact JSON string literals in both directions (NUL and all) for
 * dsv32-tokenize. A growable byte buffer with a sticky error keeps the writers short. */
#ifndef DSV32_CHAT_JSON_H
#define DSV32_CHAT_JSON_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

/* A growable, always NUL-terminated byte buffer. After a failed allocation err is -ENOMEM and
 * further appends do nothing. */
struct dsv32_buf {
    char *p;
    size_t len, cap;
    int err;
};

void dsv32_buf_put(struct dsv32_buf *b, const char *s, size_t n);
void dsv32_buf_puts(struct dsv32_buf *b, const char *s);
/* Hands the text over (the caller frees it) and empties b; NULL after an error. */
char *dsv32_buf_take(struct dsv32_buf *b, size_t *ret_len);
void dsv32_buf_done(struct dsv32_buf *b);

/* Writes s[0..n) as a JSON string literal: '"' and '\\' escaped, \n \r \t \b \f, other control
 * characters as \u00XX, everything else (UTF-8) as is; Python's ensure_ascii=False output. */
void dsv32_json_put_string(struct dsv32_buf *b, const char *s, size_t n);

/* Writes v as Python's json.dumps(v, ensure_ascii=False) would. A cJSON number keeps no literal, so
 * an integral one within +-2^63 is written as an integer ("10", not "10.0") and any other as
 * Python's repr of the double; trees from dsv32_json_parse_py carry the exact text instead. */
void dsv32_json_dump_py(struct dsv32_buf *b, const cJSON *v);

/* Parses the JSON string literal at s[0..n) (optional white space around it, nothing else):
 * *ret_text is malloc'd, may contain NUL bytes, *ret_len excludes the added terminating NUL.
 * Errors: DSV32_EFORMAT (not a string literal), DSV32_EUTF8 (invalid UTF-8 or a lone surrogate
 * escape), -ENOMEM. */
int dsv32_json_parse_string(const char *s, size_t n, char **ret_text, size_t *ret_len);

/* Parses JSON text the way Python's json.loads reads it, for json.dumps to write it back: key order
 * kept, a repeated key keeps its first place and its last value, and every number becomes a
 * cJSON_Raw node holding Python's rendering of it ("10", "1.0", "1e-05"), which
 * dsv32_json_dump_py writes as is. Errors: DSV32_EFORMAT (not JSON, nesting deeper than 256, a
 * NUL character in a string), DSV32_EUTF8, -ENOMEM. */
int dsv32_json_parse_py(const char *s, size_t n, cJSON **ret);

#endif
