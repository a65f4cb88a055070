/* Python-compatible JSON writing and exact JSON string literals; see chat_json.h. */
#include "chat_json.h"

#include "error.h"
#include "tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dsv32_buf_put(struct dsv32_buf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->err = -ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void dsv32_buf_puts(struct dsv32_buf *b, const char *s)
{
    dsv32_buf_put(b, s, strlen(s));
}

char *dsv32_buf_take(struct dsv32_buf *b, size_t *ret_len)
{
    if (!b->err && !b->p)
        dsv32_buf_put(b, "", 0);
    if (b->err) {
        dsv32_buf_done(b);
        return NULL;
    }
    char *p = b->p;
    if (ret_len)
        *ret_len = b->len;
    *b = (struct dsv32_buf){0};
    return p;
}

void dsv32_buf_done(struct dsv32_buf *b)
{
    free(b->p);
    *b = (struct dsv32_buf){0};
}

void dsv32_json_put_string(struct dsv32_buf *b, const char *s, size_t n)
{
    dsv32_buf_put(b, "\"", 1);
    size_t run = 0; /* bytes copied as they are, written in one go */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        if (c == '"')
            esc = "\\\"";
        else if (c == '\\')
            esc = "\\\\";
        else if (c == '\n')
            esc = "\\n";
        else if (c == '\r')
            esc = "\\r";
        else if (c == '\t')
            esc = "\\t";
        else if (c == '\b')
            esc = "\\b";
        else if (c == '\f')
            esc = "\\f";
        else if (c < 0x20) {
            snprintf(tmp, sizeof(tmp), "\\u%04x", c);
            esc = tmp;
        }
        if (!esc)
            continue;
        dsv32_buf_put(b, s + run, i - run);
        dsv32_buf_puts(b, esc);
        run = i + 1;
    }
    dsv32_buf_put(b, s + run, n - run);
    dsv32_buf_put(b, "\"", 1);
}

/* Python's repr(float): the shortest digits that read back to x, positional notation for
 * decimal exponents in [-4, 16), otherwise d.ddde+XX. */
static void put_py_float(struct dsv32_buf *b, double x)
{
    if (isnan(x)) {
        dsv32_buf_puts(b, "NaN");
        return;
    }
    if (isinf(x)) {
        dsv32_buf_puts(b, x < 0 ? "-Infinity" : "Infinity");
        return;
    }
    if (signbit(x))
        dsv32_buf_put(b, "-", 1);
    x = fabs(x);
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, x);
        if (strtod(tmp, NULL) == x)
            break;
    }
    char digits[24];
    int nd = 0;
    const char *p = tmp;
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9')
            digits[nd++] = *p;
    int exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    char out[64];
    int k = 0;
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            out[k++] = '0';
            out[k++] = '.';
            for (int i = 0; i < -exp - 1; i++)
                out[k++] = '0';
            for (int i = 0; i < nd; i++)
                out[k++] = digits[i];
        } else {
            for (int i = 0; i <= exp; i++)
                out[k++] = i < nd ? digits[i] : '0';
            out[k++] = '.';
            if (nd > exp + 1)
                for (int i = exp + 1; i < nd; i++)
                    out[k++] = digits[i];
            else
                out[k++] = '0';
        }
        out[k] = 0;
    } else {
        out[k++] = digits[0];
        if (nd > 1) {
            out[k++] = '.';
            for (int i = 1; i < nd; i++)
                out[k++] = digits[i];
        }
        snprintf(out + k, sizeof(out) - (size_t)k, "e%c%02d", exp < 0 ? '-' : '+', abs(exp));
    }
    dsv32_buf_puts(b, out);
}

static void put_number(struct dsv32_buf *b, double x)
{
    if (isfinite(x) && x == floor(x) && fabs(x) < 9.2e18) {
        char tmp[32];
        snprintf(tmp, sizeof(tmp), "%lld", (long long)x);
        dsv32_buf_puts(b, tmp);
    } else {
        put_py_float(b, x);
    }
}

void dsv32_json_dump_py(struct dsv32_buf *b, const cJSON *v)
{
    if (!v || cJSON_IsNull(v)) {
        dsv32_buf_puts(b, "null");
    } else if (cJSON_IsTrue(v)) {
        dsv32_buf_puts(b, "true");
    } else if (cJSON_IsFalse(v)) {
        dsv32_buf_puts(b, "false");
    } else if (cJSON_IsNumber(v)) {
        put_number(b, v->valuedouble);
    } else if (cJSON_IsString(v)) {
        dsv32_json_put_string(b, v->valuestring, strlen(v->valuestring));
    } else if (cJSON_IsRaw(v)) {
        dsv32_buf_puts(b, v->valuestring);
    } else if (cJSON_IsArray(v) || cJSON_IsObject(v)) {
        bool obj = cJSON_IsObject(v);
        dsv32_buf_put(b, obj ? "{" : "[", 1);
        for (const cJSON *c = v->child; c; c = c->next) {
            if (c != v->child)
                dsv32_buf_put(b, ", ", 2);
            if (obj) {
                dsv32_json_put_string(b, c->string, strlen(c->string));
                dsv32_buf_put(b, ": ", 2);
            }
            dsv32_json_dump_py(b, c);
        }
        dsv32_buf_put(b, obj ? "}" : "]", 1);
    } else {
        dsv32_buf_puts(b, "null");
    }
}

static int hex4(const char *s, uint32_t *ret)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
            v |= (uint32_t)((c | 0x20) - 'a' + 10);
        else
            return -1;
    }
    *ret = v;
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static bool json_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Reads the string literal at s[*pos] (which is '"') into a malloc'd buffer (NUL-terminated,
 * may hold NUL bytes) and moves *pos past it. */
static int read_string(const char *s, size_t n, size_t *pos, char **ret_text, size_t *ret_len)
{
    size_t i = *pos + 1, end = i;
    while (end < n && s[end] != '"') /* the literal's extent bounds the output size */
        end += s[end] == '\\' ? 2 : 1;
    if (end >= n)
        return DSV32_EFORMAT;
    char *out = malloc(end - i + 1); /* unescaping never grows the text */
    if (!out)
        return -ENOMEM;
    size_t k = 0;
    int r = DSV32_EFORMAT;
    while (i < end) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20)
            goto fail;
        if (c != '\\') {
            out[k++] = (char)c;
            i++;
            continue;
        }
        char e = s[i + 1];
        i += 2;
        switch (e) {
        case '"':
            out[k++] = '"';
            break;
        case '\\':
            out[k++] = '\\';
            break;
        case '/':
            out[k++] = '/';
            break;
        case 'b':
            out[k++] = '\b';
            break;
        case 'f':
            out[k++] = '\f';
            break;
        case 'n':
            out[k++] = '\n';
            break;
        case 'r':
            out[k++] = '\r';
            break;
        case 't':
            out[k++] = '\t';
            break;
        case 'u': {
            uint32_t cp, lo;
            if (i + 4 > end || hex4(s + i, &cp) < 0)
                goto fail;
            i += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                r = DSV32_EUTF8;
                goto fail;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (i + 6 > end || s[i] != '\\' || s[i + 1] != 'u' || hex4(s + i + 2, &lo) < 0 ||
                    lo < 0xDC00 || lo > 0xDFFF) {
                    r = DSV32_EUTF8;
                    goto fail;
                }
                i += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            k += put_utf8(out + k, cp);
            break;
        }
        default:
            goto fail;
        }
    }
    if (!dsv32_utf8_valid(out, k)) {
        r = DSV32_EUTF8;
        goto fail;
    }
    out[k] = 0;
    *pos = end + 1;
    *ret_text = out;
    *ret_len = k;
    return 0;
fail:
    free(out);
    return r;
}

int dsv32_json_parse_string(const char *s, size_t n, char **ret_text, size_t *ret_len)
{
    size_t i = 0;
    while (i < n && json_space(s[i]))
        i++;
    if (i >= n || s[i] != '"')
        return DSV32_EFORMAT;
    char *text;
    size_t len;
    int r = read_string(s, n, &i, &text, &len);
    if (r < 0)
        return r;
    while (i < n && json_space(s[i]))
        i++;
    if (i != n) {
        free(text);
        return DSV32_EFORMAT;
    }
    *ret_text = text;
    *ret_len = len;
    return 0;
}

#define PY_MAX_DEPTH 256

/* A number literal as Python's json.loads + json.dumps gives it back: integers exactly as written
 * ("-0" is 0), anything with a fraction or exponent as the repr of its double. */
static cJSON *py_number(const char *s, size_t n, size_t *pos)
{
    size_t i = *pos, start = i;
    bool is_float = false;
    if (i < n && s[i] == '-')
        i++;
    if (i >= n || s[i] < '0' || s[i] > '9' ||
        (s[i] == '0' && i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '9'))
        return NULL;
    while (i < n && s[i] >= '0' && s[i] <= '9')
        i++;
    if (i < n && s[i] == '.') {
        is_float = true;
        if (++i >= n || s[i] < '0' || s[i] > '9')
            return NULL;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        is_float = true;
        if (++i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= n || s[i] < '0' || s[i] > '9')
            return NULL;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    struct dsv32_buf b = {0};
    if (is_float) {
        char tmp[512];
        if (i - start >= sizeof(tmp))
            return NULL;
        memcpy(tmp, s + start, i - start);
        tmp[i - start] = 0;
        put_py_float(&b, strtod(tmp, NULL));
    } else {
        bool zero = true;
        for (size_t k = start; k < i; k++)
            zero &= s[k] == '-' || s[k] == '0';
        if (zero)
            dsv32_buf_puts(&b, "0");
        else
            dsv32_buf_put(&b, s + start, i - start);
    }
    char *text = dsv32_buf_take(&b, NULL);
    cJSON *v = text ? cJSON_CreateRaw(text) : NULL;
    free(text);
    *pos = i;
    return v;
}

static bool lit(const char *s, size_t n, size_t *pos, const char *word)
{
    size_t k = strlen(word);
    if (n - *pos < k || memcmp(s + *pos, word, k) != 0)
        return false;
    *pos += k;
    return true;
}

static int py_value(const char *s, size_t n, size_t *pos, int depth, cJSON **ret)
{
    size_t i = *pos;
    while (i < n && json_space(s[i]))
        i++;
    if (i >= n || depth > PY_MAX_DEPTH)
        return DSV32_EFORMAT;
    cJSON *v = NULL;
    int r = 0;
    char c = s[i];
    if (c == '"') {
        char *text;
        size_t len;
        if ((r = read_string(s, n, &i, &text, &len)) < 0)
            return r;
        if (strlen(text) != len) { /* a NUL cannot live in a cJSON string */
            free(text);
            return DSV32_EFORMAT;
        }
        v = cJSON_CreateString(text);
        free(text);
        if (!v)
            return -ENOMEM;
    } else if (c == '{' || c == '[') {
        bool obj = c == '{';
        v = obj ? cJSON_CreateObject() : cJSON_CreateArray();
        if (!v)
            return -ENOMEM;
        i++;
        for (bool first = true;; first = false) {
            while (i < n && json_space(s[i]))
                i++;
            if (i < n && s[i] == (obj ? '}' : ']') && first) {
                i++;
                break;
            }
            char *key = NULL;
            size_t klen;
            if (obj) {
                r = DSV32_EFORMAT;
                if (i >= n || s[i] != '"' || (r = read_string(s, n, &i, &key, &klen)) < 0)
                    goto fail_container;
                while (i < n && json_space(s[i]))
                    i++;
                if (i >= n || s[i] != ':' || strlen(key) != klen) {
                    free(key);
                    r = DSV32_EFORMAT;
                    goto fail_container;
                }
                i++;
            }
            cJSON *item;
            if ((r = py_value(s, n, &i, depth + 1, &item)) < 0) {
                free(key);
                goto fail_container;
            }
            if (!obj) {
                cJSON_AddItemToArray(v, item);
            } else if (cJSON_GetObjectItemCaseSensitive(v, key)) {
                /* Python keeps the last value, at the first key's place */
                cJSON_ReplaceItemInObjectCaseSensitive(v, key, item);
            } else {
                cJSON_AddItemToObject(v, key, item);
            }
            free(key);
            while (i < n && json_space(s[i]))
                i++;
            if (i < n && s[i] == ',') {
                i++;
                continue;
            }
            if (i < n && s[i] == (obj ? '}' : ']')) {
                i++;
                break;
            }
            r = DSV32_EFORMAT;
            goto fail_container;
        }
    } else if (lit(s, n, &i, "true")) {
        v = cJSON_CreateTrue();
    } else if (lit(s, n, &i, "false")) {
        v = cJSON_CreateFalse();
    } else if (lit(s, n, &i, "null")) {
        v = cJSON_CreateNull();
    } else {
        v = py_number(s, n, &i);
        if (!v)
            return DSV32_EFORMAT;
    }
    if (!v)
        return -ENOMEM;
    *pos = i;
    *ret = v;
    return 0;
fail_container:
    cJSON_Delete(v);
    return r;
}

int dsv32_json_parse_py(const char *s, size_t n, cJSON **ret)
{
    if (!dsv32_utf8_valid(s, n))
        return DSV32_EUTF8;
    size_t i = 0;
    cJSON *v;
    int r = py_value(s, n, &i, 0, &v);
    if (r < 0)
        return r;
    while (i < n && json_space(s[i]))
        i++;
    if (i != n) {
        cJSON_Delete(v);
        return DSV32_EFORMAT;
    }
    *ret = v;
    return 0;
}
