/* UTF-8 validation, decoding ids to text and the streaming decoder. Invalid byte sequences are
 * replaced the way Rust's String::from_utf8_lossy (Hugging Face's decoder) does: one U+FFFD per
 * maximal subpart of an ill-formed sequence, so the streaming and the one-shot decoders agree. */
#include "tok_internal.h"

#include "error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Length of the well-formed UTF-8 sequence at s[0..n): > 0 when complete and valid; 0 when the
 * bytes present are a valid but unfinished prefix (more input could complete it); < 0 when
 * invalid, -k meaning the maximal invalid subpart is k bytes. */
static int utf8_seq(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c < 0x80)
        return 1;
    if (c < 0xC2)
        return -1;
    if (c < 0xE0)
        need = 1;
    else if (c < 0xF0) {
        need = 2;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c < 0xF5) {
        need = 3;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return -1;
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n)
            return 0;
        uint8_t b = s[i];
        if (b < lo || b > hi)
            return -i;
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

bool dsv32_utf8_valid(const char *str, size_t n)
{
    const uint8_t *s = (const uint8_t *)str;
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) { /* ASCII runs, eight bytes at a time */
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int k = utf8_seq(s + i, n - i);
        if (k <= 0)
            return false;
        i += (size_t)k;
    }
    return true;
}

uint32_t tok_utf8_next(const uint8_t *s, size_t n, size_t *ret_len)
{
    uint8_t c = s[0];
    if (c < 0x80 || n < 2) {
        *ret_len = 1;
        return c;
    }
    if (c < 0xE0) {
        *ret_len = 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
    }
    if (c < 0xF0 || n < 4) {
        *ret_len = n < 3 ? n : 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) |
               (n >= 3 ? (s[2] & 0x3F) : 0);
    }
    *ret_len = 4;
    return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
           ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
}

bool tok_is_white_space(uint32_t cp)
{
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

/* A growable output buffer, always NUL-terminated when it holds anything. */
struct obuf {
    char *p;
    size_t len, cap;
};

static int obuf_reserve(struct obuf *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

static const char replacement[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* Appends s[0..n) to b with invalid sequences replaced; the bytes of an unfinished character at
 * the end are left out unless final (then they become U+FFFD). Returns how many bytes of s were
 * consumed, or -ENOMEM. */
static long utf8_lossy_append(struct obuf *b, const uint8_t *s, size_t n, bool final)
{
    if (obuf_reserve(b, 3 * n) < 0) /* each byte yields at most 3 output bytes */
        return -ENOMEM;
    size_t i = 0;
    while (i < n) {
        int k = utf8_seq(s + i, n - i);
        if (k > 0) {
            memcpy(b->p + b->len, s + i, (size_t)k);
            b->len += (size_t)k;
            i += (size_t)k;
        } else if (k == 0 && !final) {
            break;
        } else {
            memcpy(b->p + b->len, replacement, 3);
            b->len += 3;
            i += k == 0 ? n - i : (size_t)-k;
        }
    }
    b->p[b->len] = 0;
    return (long)i;
}

static bool skip_id(const struct dsv32_tok *t, int32_t id, unsigned flags)
{
    return (flags & DSV32_TOK_SKIP_SPECIAL) && t->kind[id] == TOK_ID_SPECIAL;
}

int dsv32_tok_decode(const struct dsv32_tok *t, const int32_t *ids, size_t n, unsigned flags,
                     char **ret_text, size_t *ret_len)
{
    if (n > DSV32_TOK_MAX_IDS)
        return -E2BIG;
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || t->kind[ids[i]] == TOK_ID_NONE)
            return DSV32_ETOKEN;
        if (!skip_id(t, ids[i], flags))
            bytes += t->dec_off[ids[i] + 1] - t->dec_off[ids[i]];
    }
    uint8_t *raw = malloc(bytes + 1);
    if (!raw)
        return -ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_id(t, ids[i], flags))
            continue;
        size_t len = t->dec_off[ids[i] + 1] - t->dec_off[ids[i]];
        memcpy(raw + k, t->dec + t->dec_off[ids[i]], len);
        k += len;
    }
    struct obuf out = {0};
    int r = 0;
    if (dsv32_utf8_valid((const char *)raw, k)) { /* the common case: hand the bytes over */
        raw[k] = 0;
        out.p = (char *)raw;
        out.len = k;
        raw = NULL;
    } else if (utf8_lossy_append(&out, raw, k, true) < 0) {
        r = -ENOMEM;
    }
    free(raw);
    if (r < 0)
        return r;
    if (!out.p && !(out.p = calloc(1, 1)))
        return -ENOMEM;
    *ret_text = out.p;
    *ret_len = out.len;
    return 0;
}

struct dsv32_tok_stream {
    const struct dsv32_tok *tok;
    unsigned flags;
    uint8_t pending[8]; /* start of a character still missing bytes (at most 3) + room */
    size_t n_pending;
    struct obuf out;
    uint8_t *scratch; /* pending + one token's bytes */
    size_t scratch_cap;
};

int dsv32_tok_stream_new(const struct dsv32_tok *tok, unsigned flags,
                         struct dsv32_tok_stream **ret_stream)
{
    struct dsv32_tok_stream *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->tok = tok;
    s->flags = flags;
    *ret_stream = s;
    return 0;
}

void dsv32_tok_stream_free(struct dsv32_tok_stream *s)
{
    if (!s)
        return;
    free(s->out.p);
    free(s->scratch);
    free(s);
}

static int stream_emit(struct dsv32_tok_stream *s, const uint8_t *bytes, size_t n, bool final,
                       const char **ret_text, size_t *ret_len)
{
    size_t total = s->n_pending + n;
    if (total > s->scratch_cap) {
        size_t cap = total < 64 ? 64 : 2 * total;
        uint8_t *p = realloc(s->scratch, cap);
        if (!p)
            return -ENOMEM;
        s->scratch = p;
        s->scratch_cap = cap;
    }
    if (s->n_pending)
        memcpy(s->scratch, s->pending, s->n_pending);
    if (n)
        memcpy(s->scratch + s->n_pending, bytes, n);
    s->out.len = 0;
    if (obuf_reserve(&s->out, 0) < 0)
        return -ENOMEM;
    long used = total ? utf8_lossy_append(&s->out, s->scratch, total, final) : 0;
    if (used < 0)
        return (int)used;
    s->out.p[s->out.len] = 0;
    /* What is left is an unfinished character: at most 3 bytes by construction. */
    s->n_pending = total - (size_t)used;
    memcpy(s->pending, s->scratch + used, s->n_pending);
    *ret_text = s->out.p;
    *ret_len = s->out.len;
    return 0;
}

int dsv32_tok_stream_push(struct dsv32_tok_stream *s, int32_t id, const char **ret_text,
                          size_t *ret_len)
{
    const struct dsv32_tok *t = s->tok;
    if (id < 0 || id >= t->n_ids || t->kind[id] == TOK_ID_NONE)
        return DSV32_ETOKEN;
    size_t n = skip_id(t, id, s->flags) ? 0 : t->dec_off[id + 1] - t->dec_off[id];
    return stream_emit(s, t->dec + t->dec_off[id], n, false, ret_text, ret_len);
}

int dsv32_tok_stream_flush(struct dsv32_tok_stream *s, const char **ret_text, size_t *ret_len)
{
    return stream_emit(s, NULL, 0, true, ret_text, ret_len);
}
