/* Encoding text to ids: added tokens found with a trie (leftmost-longest), the pre-tokenizer's
 * Split steps run with PCRE2 (JIT) piece by piece, then byte-level BPE on every piece. BPE merges
 * the lowest-ranked adjacent pair first (leftmost on ties); short pieces use a plain scan, long
 * ones a binary heap over a linked list of symbols, O(n log n). */
#include "tok_internal.h"

#include "error.h"
#include "log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Pieces shorter than this merge by rescanning (faster for the usual 1-10 byte words); longer
 * ones use the heap. Tests lower it to check that both give the same ids. */
int tok_bpe_heap_min = 48;
bool tok_piece_cache = true;

struct seg {
    uint32_t start, len;
    bool match;
};

struct segv {
    struct seg *v;
    size_t n, cap;
};

struct sym {
    int32_t id, prev, next;
    uint32_t rank;  /* scan path: rank of the pair (this, next), UINT32_MAX if none */
    int32_t merged; /* scan path: what that pair merges into */
};

struct heap_ent {
    uint32_t rank;
    int32_t pos;
    int32_t left, right; /* the pair's ids when pushed: a changed id means a stale entry */
};

struct enc {
    const struct dsv32_tok *t;
    int32_t *ids;
    size_t n, cap;
    pcre2_match_data *md;
    struct segv lv[TOK_MAX_SPLIT_STEPS + 1];
    struct sym *sym;
    size_t sym_cap;
    struct heap_ent *heap;
    size_t heap_n, heap_cap;
    char *scratch; /* a piece with ByteLevel's prefix space */
    size_t scratch_cap;
    char *bltext; /* a piece spelled in the byte alphabet (ignore_merges lookups) */
    size_t bltext_cap;
};

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = c;
    return 0;
}

static int push_id(struct enc *e, int32_t id)
{
    if (e->n == e->cap && grow((void **)&e->ids, &e->cap, e->n + 1, sizeof(*e->ids)) < 0)
        return -ENOMEM;
    e->ids[e->n++] = id;
    return 0;
}

/* ---- BPE ---- */

static bool heap_less(const struct heap_ent *a, const struct heap_ent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct enc *e, struct heap_ent x)
{
    size_t i = e->heap_n++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!heap_less(&x, &e->heap[up]))
            break;
        e->heap[i] = e->heap[up];
        i = up;
    }
    e->heap[i] = x;
}

static struct heap_ent heap_pop(struct enc *e)
{
    struct heap_ent top = e->heap[0], x = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!heap_less(&e->heap[c], &x))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = x;
    return top;
}

static void heap_add_pair(struct enc *e, int32_t pos)
{
    const struct sym *s = e->sym;
    if (pos < 0 || s[pos].next < 0)
        return;
    uint32_t rank;
    int32_t id;
    if (tok_merge_find(e->t, s[pos].id, s[s[pos].next].id, &rank, &id))
        heap_push(e, (struct heap_ent){rank, pos, s[pos].id, s[s[pos].next].id});
}

/* Long pieces: every mergeable pair waits in a heap ordered by (rank, position); entries whose
 * symbols have changed since are skipped when they come up. A symbol's id only ever grows into a
 * longer token, so an unchanged (left, right) id pair means the entry is still current. */
static void bpe_heap(struct enc *e, size_t n)
{
    struct sym *s = e->sym;
    e->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++)
        heap_add_pair(e, (int32_t)i);
    while (e->heap_n) {
        struct heap_ent h = heap_pop(e);
        int32_t l = h.pos, r = s[l].next;
        if (s[l].id != h.left || r < 0 || s[r].id != h.right)
            continue;
        uint32_t rank;
        int32_t merged = -1;
        tok_merge_find(e->t, h.left, h.right, &rank, &merged);
        s[l].id = merged;
        s[l].next = s[r].next;
        if (s[r].next >= 0)
            s[s[r].next].prev = l;
        s[r].id = -1;
        heap_add_pair(e, s[l].prev);
        heap_add_pair(e, l);
    }
}

/* Short pieces: rescan the adjacent pairs for the lowest rank, merge it, repeat. */
static void scan_pair(const struct dsv32_tok *t, struct sym *s, int32_t i)
{
    if (i < 0)
        return;
    if (s[i].next < 0 || !tok_merge_find(t, s[i].id, s[s[i].next].id, &s[i].rank, &s[i].merged))
        s[i].rank = UINT32_MAX;
}

/* Short pieces: each pair's rank is looked up once and kept; a merge refreshes the two pairs it
 * touches, and the next merge is the lowest rank found by walking the list. */
static void bpe_scan(struct enc *e, size_t n)
{
    struct sym *s = e->sym;
    for (size_t i = 0; i < n; i++)
        scan_pair(e->t, s, (int32_t)i);
    for (;;) {
        uint32_t best_rank = UINT32_MAX;
        int32_t best = -1;
        for (int32_t i = 0; i >= 0; i = s[i].next) {
            if (s[i].rank < best_rank) {
                best_rank = s[i].rank;
                best = i;
            }
        }
        if (best < 0)
            return;
        int32_t r = s[best].next;
        s[best].id = s[best].merged;
        s[best].next = s[r].next;
        if (s[r].next >= 0)
            s[s[r].next].prev = best;
        scan_pair(e->t, s, s[best].prev);
        scan_pair(e->t, s, best);
    }
}

/* Looks p[0..n) up in the piece cache; on a hit its ids are pushed. */
static int cache_get(struct enc *e, const uint8_t *p, size_t n, uint64_t h, bool *hit)
{
    struct tok_cache *c = e->t->cache;
    uint32_t i = (uint32_t)h & ((1u << TOK_CACHE_BITS) - 1);
    struct tok_cache_slot *s = &c->slot[i];
    int32_t ids[TOK_CACHE_MAX_IDS];
    int n_ids = 0;
    pthread_mutex_t *lock = &c->lock[i >> (TOK_CACHE_BITS - 6)];
    pthread_mutex_lock(lock);
    if (s->len == n && s->hash == (uint32_t)(h >> 32) && memcmp(s->bytes, p, n) == 0) {
        n_ids = s->n_ids;
        memcpy(ids, s->ids, (size_t)n_ids * sizeof(*ids));
    }
    pthread_mutex_unlock(lock);
    *hit = n_ids > 0;
    for (int k = 0; k < n_ids; k++)
        if (push_id(e, ids[k]) < 0)
            return -ENOMEM;
    return 0;
}

static void cache_put(struct enc *e, const uint8_t *p, size_t n, uint64_t h, const int32_t *ids,
                      size_t n_ids)
{
    if (n_ids > TOK_CACHE_MAX_IDS)
        return;
    struct tok_cache *c = e->t->cache;
    uint32_t i = (uint32_t)h & ((1u << TOK_CACHE_BITS) - 1);
    struct tok_cache_slot *s = &c->slot[i];
    pthread_mutex_t *lock = &c->lock[i >> (TOK_CACHE_BITS - 6)];
    pthread_mutex_lock(lock);
    s->hash = (uint32_t)(h >> 32);
    s->len = (uint8_t)n;
    s->n_ids = (uint8_t)n_ids;
    memcpy(s->bytes, p, n);
    memcpy(s->ids, ids, n_ids * sizeof(*ids));
    pthread_mutex_unlock(lock);
}

static int bpe_merge(struct enc *e, const uint8_t *p, size_t n);

static int bpe(struct enc *e, const uint8_t *p, size_t n)
{
    if (n == 1)
        return push_id(e, e->t->byte_id[p[0]]);
    if (n > TOK_CACHE_MAX_BYTES || !tok_piece_cache)
        return bpe_merge(e, p, n);
    uint64_t h = tok_hash(p, n);
    bool hit;
    int r = cache_get(e, p, n, h, &hit);
    if (r < 0 || hit)
        return r;
    size_t first = e->n;
    if ((r = bpe_merge(e, p, n)) < 0)
        return r;
    cache_put(e, p, n, h, e->ids + first, e->n - first);
    return 0;
}

static int bpe_merge(struct enc *e, const uint8_t *p, size_t n)
{
    const struct dsv32_tok *t = e->t;
    if (t->ignore_merges) { /* the piece may be a whole token of the vocabulary */
        if (grow((void **)&e->bltext, &e->bltext_cap, 2 * n, 1) < 0)
            return -ENOMEM;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t cp = tok_byte_to_cp(p[i]);
            if (cp < 0x80)
                e->bltext[k++] = (char)cp;
            else {
                e->bltext[k++] = (char)(0xC0 | (cp >> 6));
                e->bltext[k++] = (char)(0x80 | (cp & 0x3F));
            }
        }
        int32_t id = tok_map_find(t, e->bltext, k);
        if (id >= 0 && t->kind[id] == TOK_ID_VOCAB)
            return push_id(e, id);
    }
    if (grow((void **)&e->sym, &e->sym_cap, n, sizeof(*e->sym)) < 0)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++)
        e->sym[i] = (struct sym){.id = t->byte_id[p[i]],
                                 .prev = (int32_t)i - 1,
                                 .next = i + 1 < n ? (int32_t)i + 1 : -1};
    if (n >= (size_t)tok_bpe_heap_min) {
        /* each merge adds at most two entries: n + 2n bounds the heap */
        if (grow((void **)&e->heap, &e->heap_cap, 3 * n, sizeof(*e->heap)) < 0)
            return -ENOMEM;
        bpe_heap(e, n);
    } else {
        bpe_scan(e, n);
    }
    for (int32_t i = 0; i >= 0; i = e->sym[i].next)
        if (push_id(e, e->sym[i].id) < 0)
            return -ENOMEM;
    return 0;
}

/* ---- pre-tokenizer ---- */

static int regex_next(const struct tok_split *sp, pcre2_match_data *md, const uint8_t *p, size_t n,
                      size_t from, size_t *ms, size_t *me)
{
    int rc = sp->jit ? pcre2_jit_match(sp->re, p, n, from, 0, md, NULL)
                     : pcre2_match(sp->re, p, n, from, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        log_error("tokenizer: regex match failed: %s", msg);
        return rc == PCRE2_ERROR_NOMEMORY || rc == PCRE2_ERROR_JIT_STACKLIMIT ? -ENOMEM
                                                                              : DSV32_EFORMAT;
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

static int seg_push(struct segv *sv, size_t start, size_t len, bool match)
{
    if (len == 0)
        return 0;
    if (sv->n == sv->cap && grow((void **)&sv->v, &sv->cap, sv->n + 1, sizeof(*sv->v)) < 0)
        return -ENOMEM;
    sv->v[sv->n++] = (struct seg){(uint32_t)start, (uint32_t)len, match};
    return 0;
}

/* Splits p[0..n) into matches and gaps, then applies the step's behavior (the rules of
 * tokenizers' Split: a merged match joins its neighbour only if that one is not a match). */
static int split_piece(struct enc *e, const struct tok_split *sp, const uint8_t *p, size_t n,
                       struct segv *sv)
{
    sv->n = 0;
    size_t last = 0, from = 0, ms = 0, me = 0;
    int r;
    while (from <= n && (r = regex_next(sp, e->md, p, n, from, &ms, &me)) != 0) {
        if (r < 0)
            return r;
        if (me == ms) { /* an empty match splits nothing: step over one character */
            size_t cl = 1;
            if (ms < n)
                tok_utf8_next(p + ms, n - ms, &cl);
            from = ms + cl;
            continue;
        }
        if (seg_push(sv, last, ms - last, sp->invert) < 0 ||
            seg_push(sv, ms, me - ms, !sp->invert) < 0)
            return -ENOMEM;
        last = from = me;
    }
    if (seg_push(sv, last, n - last, sp->invert) < 0)
        return -ENOMEM;
    struct seg *v = sv->v;
    size_t k = 0;
    bool prev_match = false; /* the flag of the previous input segment, as tokenizers folds it */
    switch (sp->behavior) {
    case TOK_SPLIT_ISOLATED:
        return 0;
    case TOK_SPLIT_REMOVED:
        for (size_t i = 0; i < sv->n; i++)
            if (!v[i].match)
                v[k++] = v[i];
        break;
    case TOK_SPLIT_MERGED_PREV:
    case TOK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < sv->n; i++) {
            struct seg cur = v[i];
            bool join = sp->behavior == TOK_SPLIT_MERGED_PREV ? cur.match && !prev_match
                                                              : cur.match == prev_match;
            if (join && k > 0)
                v[k - 1].len = cur.start + cur.len - v[k - 1].start;
            else
                v[k++] = cur;
            prev_match = cur.match;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: /* walk backwards, building the output at the array's end */
        k = sv->n;
        for (size_t i = sv->n; i-- > 0;) {
            struct seg cur = v[i];
            if (cur.match && !prev_match && k < sv->n) {
                v[k].len = v[k].start + v[k].len - cur.start;
                v[k].start = cur.start;
            } else {
                v[--k] = cur;
            }
            prev_match = cur.match;
        }
        memmove(v, v + k, (sv->n - k) * sizeof(*v));
        k = sv->n - k;
        break;
    }
    sv->n = k;
    return 0;
}

static int byte_level(struct enc *e, const uint8_t *p, size_t n)
{
    const struct dsv32_tok *t = e->t;
    if (t->bl_prefix_space && p[0] != ' ') {
        if (grow((void **)&e->scratch, &e->scratch_cap, n + 1, 1) < 0)
            return -ENOMEM;
        e->scratch[0] = ' ';
        memcpy(e->scratch + 1, p, n);
        p = (const uint8_t *)e->scratch;
        n++;
    }
    if (!t->bl_re.re)
        return bpe(e, p, n);
    struct segv *sv = &e->lv[TOK_MAX_SPLIT_STEPS];
    int r = split_piece(e, &t->bl_re, p, n, sv);
    for (size_t i = 0; r == 0 && i < sv->n; i++)
        r = bpe(e, p + sv->v[i].start, sv->v[i].len);
    return r;
}

static int pre_tokenize(struct enc *e, int level, const uint8_t *p, size_t n)
{
    const struct dsv32_tok *t = e->t;
    if (level == t->n_split)
        return byte_level(e, p, n);
    struct segv *sv = &e->lv[level];
    int r = split_piece(e, &t->split[level], p, n, sv);
    /* deeper levels use their own vectors, so sv stays put while they run */
    for (size_t i = 0; r == 0 && i < sv->n; i++)
        r = pre_tokenize(e, level + 1, p + sv->v[i].start, sv->v[i].len);
    return r;
}

static int encode_section(struct enc *e, const uint8_t *p, size_t n)
{
    return n ? pre_tokenize(e, 0, p, n) : 0;
}

/* ---- added tokens ---- */

static bool word_byte(uint8_t c)
{
    return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') ||
           ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

/* The longest added token starting at s[i] and ending by limit, or -1. */
static int match_added(const struct dsv32_tok *t, const uint8_t *s, size_t n, size_t limit,
                       size_t i, size_t *ret_end)
{
    int32_t node = 0;
    int best = -1;
    for (size_t k = i; k < limit; k++) {
        int32_t ch = t->trie[node].child;
        while (ch >= 0 && t->trie[ch].byte != s[k])
            ch = t->trie[ch].sibling;
        if (ch < 0)
            break;
        node = ch;
        int a = t->trie[node].added;
        if (a < 0)
            continue;
        if (t->added[a].single_word &&
            ((i > 0 && word_byte(s[i - 1])) || (k + 1 < n && word_byte(s[k + 1]))))
            continue;
        best = a;
        *ret_end = k + 1;
    }
    return best;
}

/* Start of the UTF-8 character that ends just before s[i]. */
static size_t prev_char(const uint8_t *s, size_t i)
{
    do
        i--;
    while (i > 0 && (s[i] & 0xC0) == 0x80);
    return i;
}

/* Added tokens split the text into sections that are pre-tokenized apart. With spans, a token is
 * only taken where it lies inside one of them. */
static int encode_special(struct enc *e, const uint8_t *s, size_t n,
                          const struct dsv32_tok_span *spans, size_t n_spans)
{
    const struct dsv32_tok *t = e->t;
    size_t last = 0, i = 0, sp = 0;
    while (i < n) {
        if (!t->first_byte[s[i]]) {
            i++;
            continue;
        }
        size_t limit = n;
        if (spans) {
            while (sp < n_spans && spans[sp].start + spans[sp].len <= i)
                sp++;
            if (sp == n_spans)
                break;
            if (spans[sp].start > i) {
                i = spans[sp].start;
                continue;
            }
            limit = spans[sp].start + spans[sp].len;
        }
        size_t end;
        int a = match_added(t, s, n, limit, i, &end);
        if (a < 0) {
            i++;
            continue;
        }
        size_t ms = i, me = end, cl;
        if (t->added[a].lstrip)
            while (ms > last && tok_is_white_space(tok_utf8_next(s + prev_char(s, ms),
                                                                 ms - prev_char(s, ms), &cl)))
                ms = prev_char(s, ms);
        if (t->added[a].rstrip)
            while (me < n && tok_is_white_space(tok_utf8_next(s + me, n - me, &cl)))
                me += cl;
        int r = encode_section(e, s + last, ms - last);
        if (r < 0 || (r = push_id(e, t->added[a].id)) < 0)
            return r;
        last = i = me;
    }
    return encode_section(e, s + last, n - last);
}

int dsv32_tok_encode(const struct dsv32_tok *t, const char *text, size_t len, unsigned flags,
                     int32_t **ret_ids, size_t *ret_n)
{
    return dsv32_tok_encode_spans(t, text, len, flags, NULL, 0, ret_ids, ret_n);
}

int dsv32_tok_encode_spans(const struct dsv32_tok *t, const char *text, size_t len, unsigned flags,
                           const struct dsv32_tok_span *spans, size_t n_spans, int32_t **ret_ids,
                           size_t *ret_n)
{
    if (len > DSV32_TOK_MAX_INPUT_BYTES)
        return -E2BIG;
    for (size_t i = 0; spans && i < n_spans; i++)
        if (spans[i].start > len || spans[i].len > len - spans[i].start ||
            (i > 0 && spans[i].start < spans[i - 1].start + spans[i - 1].len))
            return -EINVAL;
    if (!dsv32_utf8_valid(text, len))
        return DSV32_EUTF8;
    if ((flags & DSV32_TOK_ADD_BOS) && t->bos < 0)
        return DSV32_EMISSING;
    struct enc e = {.t = t};
    int r = -ENOMEM;
    /* one pair is enough: only the whole match is read (rc 0 = "ovector too small" is a match) */
    e.md = pcre2_match_data_create(1, NULL);
    if (!e.md || grow((void **)&e.ids, &e.cap, len / 3 + 16, sizeof(*e.ids)) < 0)
        goto out;
    if ((flags & DSV32_TOK_ADD_BOS) && (r = push_id(&e, t->bos)) < 0)
        goto out;
    const uint8_t *s = (const uint8_t *)text;
    r = (flags & DSV32_TOK_PARSE_SPECIAL) && t->n_added ? encode_special(&e, s, len, spans, n_spans)
                                                        : encode_section(&e, s, len);
    if (r < 0)
        goto out;
    *ret_ids = e.ids;
    *ret_n = e.n;
    e.ids = NULL;
out:
    free(e.ids);
    pcre2_match_data_free(e.md);
    for (int i = 0; i <= TOK_MAX_SPLIT_STEPS; i++)
        free(e.lv[i].v);
    free(e.sym);
    free(e.heap);
    free(e.scratch);
    free(e.bltext);
    return r;
}
