/* Loading a Hugging Face tokenizer.json (+ tokenizer_config.json) into the immutable tables the
 * encoder and decoder read: id -> text and id -> bytes, text -> id, (left, right) -> merge, the
 * added-token trie and the compiled pre-tokenizer regexes. */
#include "tok_internal.h"

#include "error.h"
#include "log.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define TOK_MAX_IDS (1 << 24) /* sanity bound on ids found in a file */

/* GPT-2's ByteLevel alphabet: printable Latin-1 bytes stand for themselves, the 68 others are
 * shifted to U+0100 and up, in byte order. */
static uint32_t byte_cp[256];
static int16_t cp_byte[324];
static pthread_once_t alphabet_once = PTHREAD_ONCE_INIT;

static void alphabet_init(void)
{
    uint32_t next = 256;
    for (int i = 0; i < 324; i++)
        cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_cp[b] = printable ? (uint32_t)b : next++;
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

uint32_t tok_byte_to_cp(uint8_t b)
{
    pthread_once(&alphabet_once, alphabet_init);
    return byte_cp[b];
}

int tok_cp_to_byte(uint32_t cp)
{
    pthread_once(&alphabet_once, alphabet_init);
    return cp < 324 ? cp_byte[cp] : -1;
}

uint64_t tok_hash(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t h = 0x243F6A8885A308D3ull ^ (n * 0x9E3779B97F4A7C15ull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 32;
    return h;
}

int32_t tok_map_find(const struct dsv32_tok *t, const char *s, size_t n)
{
    uint32_t i = (uint32_t)tok_hash(s, n) & t->map_mask;
    for (;;) {
        int32_t id = t->map[i];
        if (id < 0)
            return -1;
        uint32_t len = t->text_off[id + 1] - t->text_off[id];
        if (len == n && memcmp(t->arena + t->text_off[id], s, n) == 0)
            return id;
        i = (i + 1) & t->map_mask;
    }
}

static void map_insert(struct dsv32_tok *t, int32_t id)
{
    const char *s = t->arena + t->text_off[id];
    size_t n = t->text_off[id + 1] - t->text_off[id];
    if (tok_map_find(t, s, n) >= 0)
        return; /* the first id with a text wins (vocabulary before added tokens) */
    uint32_t i = (uint32_t)tok_hash(s, n) & t->map_mask;
    while (t->map[i] >= 0)
        i = (i + 1) & t->map_mask;
    t->map[i] = id;
}

static uint32_t pow2_at_least(uint64_t n)
{
    uint32_t p = 16;
    while (p < n)
        p <<= 1;
    return p;
}

/* Reads a whole file (at most max bytes) into a NUL-terminated buffer. */
static int read_file(const char *path, size_t max, char **ret_buf, size_t *ret_len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    int r = 0;
    char *buf = NULL;
    if (fstat(fd, &st) < 0) {
        r = -errno;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        r = -EISDIR;
        goto out;
    }
    if ((uint64_t)st.st_size > max) {
        r = -EFBIG;
        goto out;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        r = -ENOMEM;
        goto out;
    }
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t k = read(fd, buf + got, (size_t)st.st_size - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            r = k < 0 ? -errno : DSV32_ETRUNC;
            goto out;
        }
        got += (size_t)k;
    }
    buf[got] = 0;
    *ret_buf = buf;
    *ret_len = got;
    buf = NULL;
out:
    free(buf);
    close(fd);
    return r;
}

static int load_json(const char *path, size_t max, cJSON **ret)
{
    char *buf = NULL;
    size_t len = 0;
    int r = read_file(path, max, &buf, &len);
    if (r < 0)
        return r;
    cJSON *j = cJSON_ParseWithLength(buf, len);
    free(buf);
    if (!j) {
        log_error("tokenizer: %s is not valid JSON", path);
        return DSV32_EFORMAT;
    }
    *ret = j;
    return 0;
}

static bool json_true(const cJSON *o, const char *key)
{
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, key));
}

/* Whether a field is absent, null, false or "". */
static bool json_unset(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return !v || cJSON_IsNull(v) || cJSON_IsFalse(v) ||
           (cJSON_IsString(v) && v->valuestring[0] == 0);
}

static const char *json_type(const cJSON *o)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* Compiles a split pattern: {"Regex": "..."} or {"String": "..."}. */
static int compile_pattern(const cJSON *pattern, bool literal_ok, struct tok_split *ret)
{
    const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pattern, "Regex");
    const cJSON *lit = cJSON_GetObjectItemCaseSensitive(pattern, "String");
    uint32_t opts = PCRE2_UTF | PCRE2_UCP;
    const char *src;
    char *quoted = NULL;
    if (cJSON_IsString(rx)) {
        src = rx->valuestring;
    } else if (literal_ok && cJSON_IsString(lit)) {
        /* a String pattern matches itself: every ASCII punctuation character escaped */
        size_t n = strlen(lit->valuestring), k = 0;
        if (!(quoted = malloc(2 * n + 1)))
            return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)lit->valuestring[i];
            if (c < 0x80 && !((c | 0x20) >= 'a' && (c | 0x20) <= 'z') && !(c >= '0' && c <= '9'))
                quoted[k++] = '\\';
            quoted[k++] = (char)c;
        }
        quoted[k] = 0;
        src = quoted;
    } else {
        log_error("tokenizer: Split pattern is neither Regex nor String");
        return DSV32_EFORMAT;
    }
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)src, PCRE2_ZERO_TERMINATED, opts, &err, &off, NULL);
    free(quoted);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof(msg));
        log_error("tokenizer: pattern does not compile at offset %zu: %s", (size_t)off, msg);
        return DSV32_EFORMAT;
    }
    ret->re = re;
    /* Without JIT the interpreter still gives the same pieces, four to six times slower. */
    ret->jit = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE) == 0;
    if (!ret->jit)
        log_warn("tokenizer: PCRE2 JIT unavailable, regexes run interpreted");
    return 0;
}

static int parse_split(const cJSON *step, struct tok_split *ret)
{
    static const struct {
        const char *name;
        enum tok_split_behavior b;
    } behaviors[] = {
        {"Isolated", TOK_SPLIT_ISOLATED},
        {"Removed", TOK_SPLIT_REMOVED},
        {"MergedWithPrevious", TOK_SPLIT_MERGED_PREV},
        {"MergedWithNext", TOK_SPLIT_MERGED_NEXT},
        {"Contiguous", TOK_SPLIT_CONTIGUOUS},
    };
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(step, "behavior");
    int found = -1;
    for (size_t i = 0; cJSON_IsString(b) && i < sizeof(behaviors) / sizeof(behaviors[0]); i++)
        if (strcmp(b->valuestring, behaviors[i].name) == 0)
            found = (int)i;
    if (found < 0) {
        log_error("tokenizer: Split step with an unknown behavior");
        return DSV32_EFORMAT;
    }
    struct tok_split s = {.behavior = behaviors[found].b, .invert = json_true(step, "invert")};
    int r = compile_pattern(cJSON_GetObjectItemCaseSensitive(step, "pattern"), true, &s);
    if (r < 0)
        return r;
    *ret = s;
    return 0;
}

/* The GPT-2 pattern ByteLevel uses when use_regex is true. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int parse_byte_level(struct dsv32_tok *t, const cJSON *step)
{
    t->bl_prefix_space = json_true(step, "add_prefix_space");
    const cJSON *use_regex = cJSON_GetObjectItemCaseSensitive(step, "use_regex");
    if (use_regex && !cJSON_IsBool(use_regex))
        return DSV32_EFORMAT;
    if (!use_regex || cJSON_IsTrue(use_regex)) {
        cJSON *p = cJSON_CreateObject();
        if (!p || !cJSON_AddStringToObject(p, "Regex", gpt2_pattern)) {
            cJSON_Delete(p);
            return -ENOMEM;
        }
        int r = compile_pattern(p, false, &t->bl_re);
        cJSON_Delete(p);
        t->bl_re.behavior = TOK_SPLIT_ISOLATED;
        return r;
    }
    return 0;
}

/* Supported: ByteLevel alone, or a Sequence of Split steps ending with ByteLevel. The byte-level
 * alphabet is what lets BPE start from the 256 byte tokens. */
static int parse_pre_tokenizer(struct dsv32_tok *t, const cJSON *pt)
{
    const char *type = json_type(pt);
    if (strcmp(type, "ByteLevel") == 0)
        return parse_byte_level(t, pt);
    if (strcmp(type, "Sequence") != 0) {
        log_error("tokenizer: pre-tokenizer '%s' is not supported (byte-level BPE only)", type);
        return DSV32_EUNSUPPORTED;
    }
    const cJSON *steps = cJSON_GetObjectItemCaseSensitive(pt, "pretokenizers");
    int n = cJSON_GetArraySize(steps);
    if (!cJSON_IsArray(steps) || n < 1)
        return DSV32_EFORMAT;
    for (int i = 0; i < n; i++) {
        const cJSON *s = cJSON_GetArrayItem(steps, i);
        const char *st = json_type(s);
        if (strcmp(st, "ByteLevel") == 0 && i == n - 1)
            return parse_byte_level(t, s);
        if (strcmp(st, "Split") != 0) {
            log_error("tokenizer: pre-tokenizer step '%s' is not supported (Split... ByteLevel)",
                      st);
            return DSV32_EUNSUPPORTED;
        }
        if (t->n_split == TOK_MAX_SPLIT_STEPS)
            return DSV32_EUNSUPPORTED;
        int r = parse_split(s, &t->split[t->n_split]);
        if (r < 0)
            return r;
        t->n_split++;
    }
    log_error("tokenizer: the pre-tokenizer does not end with ByteLevel (byte-level BPE only)");
    return DSV32_EUNSUPPORTED;
}

static int check_normalizer(const cJSON *n)
{
    if (!n || cJSON_IsNull(n))
        return 0;
    if (strcmp(json_type(n), "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (cJSON_IsArray(list) && cJSON_GetArraySize(list) == 0)
            return 0;
    }
    log_error("tokenizer: normalizer '%s' is not supported", json_type(n));
    return DSV32_EUNSUPPORTED;
}

static int check_model(const cJSON *m)
{
    if (!cJSON_IsObject(m))
        return DSV32_EFORMAT;
    const char *type = json_type(m);
    if (type[0] && strcmp(type, "BPE") != 0) {
        log_error("tokenizer: model '%s' is not supported (BPE only)", type);
        return DSV32_EUNSUPPORTED;
    }
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (!json_unset(m, "continuing_subword_prefix") || !json_unset(m, "end_of_word_suffix") ||
        json_true(m, "byte_fallback") || (dropout && !cJSON_IsNull(dropout))) {
        log_error("tokenizer: BPE options (dropout, affixes, byte_fallback) are not supported");
        return DSV32_EUNSUPPORTED;
    }
    if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(m, "vocab")) ||
        !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(m, "merges")))
        return DSV32_EFORMAT;
    return 0;
}

/* Bytes a token decodes to under the ByteLevel decoder: every character mapped back to its byte;
 * a token with a character outside the alphabet (an added token such as "<｜User｜>") decodes to
 * its own UTF-8, as the Hugging Face decoder does. */
static size_t decode_token(const char *s, size_t n, bool byte_level, uint8_t *out)
{
    if (byte_level && dsv32_utf8_valid(s, n)) {
        size_t k = 0, i = 0;
        while (i < n) {
            size_t cl;
            int b = tok_cp_to_byte(tok_utf8_next((const uint8_t *)s + i, n - i, &cl));
            if (b < 0)
                goto raw;
            out[k++] = (uint8_t)b;
            i += cl;
        }
        return k;
    }
raw:
    memcpy(out, s, n);
    return n;
}

static int parse_added(struct dsv32_tok *t, const cJSON *list, int32_t *max_id)
{
    int n = cJSON_GetArraySize(list);
    if (list && !cJSON_IsArray(list))
        return DSV32_EFORMAT;
    if (n == 0)
        return 0;
    size_t bytes = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *a = cJSON_GetArrayItem(list, i);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(a, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(c) || id->valuedouble < 0 ||
            id->valuedouble >= TOK_MAX_IDS || id->valuedouble != (double)id->valueint)
            return DSV32_EFORMAT;
        bytes += strlen(c->valuestring) + 1;
        if (id->valueint > *max_id)
            *max_id = id->valueint;
    }
    t->added = calloc((size_t)(unsigned)n, sizeof(*t->added));
    t->added_arena = malloc(bytes);
    if (!t->added || !t->added_arena)
        return -ENOMEM;
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *a = cJSON_GetArrayItem(list, i);
        const char *c = cJSON_GetObjectItemCaseSensitive(a, "content")->valuestring;
        size_t len = strlen(c);
        if (!dsv32_utf8_valid(c, len))
            return DSV32_EFORMAT;
        memcpy(t->added_arena + off, c, len + 1);
        t->added[i] = (struct tok_added){
            .text = t->added_arena + off,
            .len = (uint32_t)len,
            .id = cJSON_GetObjectItemCaseSensitive(a, "id")->valueint,
            .special = json_true(a, "special"),
            .lstrip = json_true(a, "lstrip"),
            .rstrip = json_true(a, "rstrip"),
            .single_word = json_true(a, "single_word"),
        };
        off += len + 1;
    }
    t->n_added = n;
    return 0;
}

/* Builds id -> text, id -> bytes and text -> id from the vocabulary and the added tokens. */
static int build_ids(struct dsv32_tok *t, const cJSON *vocab, int32_t max_id, bool byte_level)
{
    t->n_ids = max_id + 1;
    size_t n = (size_t)t->n_ids;
    const char **text = calloc(n, sizeof(*text));
    t->kind = calloc(n, 1);
    t->text_off = calloc(n + 1, sizeof(*t->text_off));
    t->dec_off = calloc(n + 1, sizeof(*t->dec_off));
    int r = 0;
    if (!text || !t->kind || !t->text_off || !t->dec_off) {
        r = -ENOMEM;
        goto out;
    }
    for (const cJSON *v = vocab->child; v; v = v->next) {
        int32_t id = v->valueint;
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > max_id ||
            v->valuedouble != (double)id || !dsv32_utf8_valid(v->string, strlen(v->string))) {
            log_error("tokenizer: bad vocabulary entry");
            r = DSV32_EFORMAT;
            goto out;
        }
        text[id] = v->string;
        t->kind[id] = TOK_ID_VOCAB;
    }
    for (int i = 0; i < t->n_added; i++) {
        text[t->added[i].id] = t->added[i].text;
        t->kind[t->added[i].id] = t->added[i].special ? TOK_ID_SPECIAL : TOK_ID_ADDED;
    }
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++)
        if (text[i])
            bytes += strlen(text[i]);
    if (bytes >= UINT32_MAX) {
        r = DSV32_EFORMAT;
        goto out;
    }
    t->arena = malloc(bytes + 1);
    t->dec = malloc(bytes + 1);
    t->map_mask = pow2_at_least(2 * n) - 1;
    t->map = malloc(((size_t)t->map_mask + 1) * sizeof(*t->map));
    if (!t->arena || !t->dec || !t->map) {
        r = -ENOMEM;
        goto out;
    }
    uint32_t off = 0, doff = 0;
    for (size_t i = 0; i < n; i++) {
        t->text_off[i] = off;
        t->dec_off[i] = doff;
        if (text[i]) {
            size_t len = strlen(text[i]);
            memcpy(t->arena + off, text[i], len);
            doff += (uint32_t)decode_token(text[i], len, byte_level, t->dec + doff);
            off += (uint32_t)len;
        }
    }
    t->text_off[n] = off;
    t->dec_off[n] = doff;
    memset(t->map, 0xff, ((size_t)t->map_mask + 1) * sizeof(*t->map));
    for (size_t i = 0; i < n; i++)
        if (t->kind[i] == TOK_ID_VOCAB)
            map_insert(t, (int32_t)i);
    for (size_t i = 0; i < n; i++)
        if (t->kind[i] == TOK_ID_ADDED || t->kind[i] == TOK_ID_SPECIAL)
            map_insert(t, (int32_t)i);
out:
    free(text);
    return r;
}

static int parse_merges(struct dsv32_tok *t, const cJSON *merges)
{
    uint32_t n = (uint32_t)cJSON_GetArraySize(merges);
    t->merges_mask = pow2_at_least(2 * (uint64_t)n + 1) - 1;
    t->merges = calloc((size_t)t->merges_mask + 1, sizeof(*t->merges));
    if (!t->merges)
        return -ENOMEM;
    char *buf = NULL;
    size_t cap = 0;
    int r = 0;
    uint32_t rank = 0;
    for (const cJSON *m = merges->child; m; m = m->next, rank++) {
        const char *a, *b;
        size_t la, lb;
        if (cJSON_IsString(m)) { /* "left right" (tokenizers < 0.20) */
            a = m->valuestring;
            const char *sp = strchr(a, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                r = DSV32_EFORMAT;
                break;
            }
            la = (size_t)(sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) &&
                   cJSON_IsString(m->child->next)) {
            a = m->child->valuestring;
            b = m->child->next->valuestring;
            la = strlen(a);
            lb = strlen(b);
        } else {
            r = DSV32_EFORMAT;
            break;
        }
        if (la + lb > cap) {
            cap = 2 * (la + lb);
            char *nb = realloc(buf, cap);
            if (!nb) {
                r = -ENOMEM;
                break;
            }
            buf = nb;
        }
        memcpy(buf, a, la);
        memcpy(buf + la, b, lb);
        int32_t left = tok_map_find(t, a, la), right = tok_map_find(t, b, lb);
        int32_t merged = tok_map_find(t, buf, la + lb);
        if (left < 0 || right < 0 || merged < 0) {
            log_error("tokenizer: merge %u names a token outside the vocabulary", rank);
            r = DSV32_EFORMAT;
            break;
        }
        uint32_t old_rank;
        int32_t old_id;
        if (tok_merge_find(t, left, right, &old_rank, &old_id))
            continue; /* a repeated merge keeps its first (best) rank */
        uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
        uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & t->merges_mask;
        while (t->merges[i].key)
            i = (i + 1) & t->merges_mask;
        t->merges[i] = (struct tok_merge_slot){.key = key, .rank = rank, .id = merged};
        t->n_merges++;
    }
    free(buf);
    return r;
}

static int build_trie(struct dsv32_tok *t)
{
    size_t nodes = 1;
    for (int i = 0; i < t->n_added; i++)
        nodes += t->added[i].len;
    if (nodes > INT32_MAX)
        return DSV32_EFORMAT;
    t->trie = malloc(nodes * sizeof(*t->trie));
    if (!t->trie)
        return -ENOMEM;
    t->trie[0] = (struct tok_trie_node){.child = -1, .sibling = -1, .added = -1};
    t->n_trie = 1;
    for (int i = 0; i < t->n_added; i++) {
        const struct tok_added *a = &t->added[i];
        if (a->len == 0)
            continue;
        t->first_byte[(uint8_t)a->text[0]] = 1;
        int32_t node = 0;
        for (uint32_t k = 0; k < a->len; k++) {
            uint8_t c = (uint8_t)a->text[k];
            int32_t ch = t->trie[node].child;
            while (ch >= 0 && t->trie[ch].byte != c)
                ch = t->trie[ch].sibling;
            if (ch < 0) {
                ch = t->n_trie++;
                t->trie[ch] = (struct tok_trie_node){
                    .child = -1, .sibling = t->trie[node].child, .added = -1, .byte = c};
                t->trie[node].child = ch;
            }
            node = ch;
        }
        if (t->trie[node].added < 0)
            t->trie[node].added = i;
    }
    return 0;
}

/* bos_token / eos_token: a string or an AddedToken object {"content": ...}. */
static int32_t config_token(const struct dsv32_tok *t, const cJSON *cfg, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v))
        v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v))
        return -1;
    int32_t id = tok_map_find(t, v->valuestring, strlen(v->valuestring));
    if (id < 0)
        log_warn("tokenizer: %s '%s' is not a token", key, v->valuestring);
    return id;
}

static int load_config(struct dsv32_tok *t, const char *path)
{
    cJSON *cfg;
    int r = load_json(path, 16u << 20, &cfg);
    if (r == -ENOENT)
        return 0; /* optional: no BOS/EOS then */
    if (r < 0) {
        log_error("tokenizer: %s: %s", path, dsv32_strerror(r));
        return r;
    }
    t->bos = config_token(t, cfg, "bos_token");
    t->eos = config_token(t, cfg, "eos_token");
    cJSON_Delete(cfg);
    return 0;
}

static int parse_tokenizer(struct dsv32_tok *t, const cJSON *j)
{
    int r;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(j, "model");
    if ((r = check_model(model)) < 0 ||
        (r = check_normalizer(cJSON_GetObjectItemCaseSensitive(j, "normalizer"))) < 0)
        return r;
    if ((r = parse_pre_tokenizer(t, cJSON_GetObjectItemCaseSensitive(j, "pre_tokenizer"))) < 0)
        return r;
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(j, "decoder");
    bool byte_level = dec && strcmp(json_type(dec), "ByteLevel") == 0;
    if (dec && !cJSON_IsNull(dec) && !byte_level) {
        log_error("tokenizer: decoder '%s' is not supported (ByteLevel only)", json_type(dec));
        return DSV32_EUNSUPPORTED;
    }
    t->ignore_merges = json_true(model, "ignore_merges");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    int32_t max_id = -1;
    for (const cJSON *v = vocab->child; v; v = v->next) {
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= TOK_MAX_IDS) {
            log_error("tokenizer: vocabulary id out of range");
            return DSV32_EFORMAT;
        }
        if (v->valueint > max_id)
            max_id = v->valueint;
    }
    if ((r = parse_added(t, cJSON_GetObjectItemCaseSensitive(j, "added_tokens"), &max_id)) < 0)
        return r;
    if (max_id < 0)
        return DSV32_EFORMAT;
    if ((r = build_ids(t, vocab, max_id, byte_level)) < 0)
        return r;
    for (int b = 0; b < 256; b++) {
        char s[4];
        uint32_t cp = tok_byte_to_cp((uint8_t)b);
        size_t n = cp < 0x80 ? 1 : 2; /* the alphabet stays below U+0800 */
        if (n == 1)
            s[0] = (char)cp;
        else {
            s[0] = (char)(0xC0 | (cp >> 6));
            s[1] = (char)(0x80 | (cp & 0x3F));
        }
        if ((t->byte_id[b] = tok_map_find(t, s, n)) < 0) {
            log_error("tokenizer: byte 0x%02x has no token: not a byte-level vocabulary", b);
            return DSV32_EFORMAT;
        }
    }
    if ((r = parse_merges(t, cJSON_GetObjectItemCaseSensitive(model, "merges"))) < 0)
        return r;
    return build_trie(t);
}

int dsv32_tok_load(const char *path, struct dsv32_tok **ret_tok)
{
    struct stat st;
    char file[PATH_MAX], cfg[PATH_MAX];
    if (stat(path, &st) < 0) {
        log_error("tokenizer: %s: %s", path, strerror(errno));
        return -errno;
    }
    if (S_ISDIR(st.st_mode)) {
        snprintf(file, sizeof(file), "%s/tokenizer.json", path);
        snprintf(cfg, sizeof(cfg), "%s/tokenizer_config.json", path);
    } else {
        snprintf(file, sizeof(file), "%s", path);
        const char *slash = strrchr(path, '/');
        int dirlen = slash ? (int)(slash - path) : 1;
        snprintf(cfg, sizeof(cfg), "%.*s/tokenizer_config.json", dirlen, slash ? path : ".");
    }
    struct dsv32_tok *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->bos = t->eos = -1;
    cJSON *j = NULL;
    int r = load_json(file, DSV32_TOK_MAX_FILE_BYTES, &j);
    if (r < 0) {
        log_error("tokenizer: %s: %s", file, dsv32_strerror(r));
        goto fail;
    }
    if ((r = parse_tokenizer(t, j)) < 0) {
        log_error("tokenizer: %s: %s", file, dsv32_strerror(r));
        goto fail;
    }
    if ((r = load_config(t, cfg)) < 0)
        goto fail;
    if (!(t->cache = calloc(1, sizeof(*t->cache)))) {
        r = -ENOMEM;
        goto fail;
    }
    for (int i = 0; i < TOK_CACHE_SHARDS; i++)
        pthread_mutex_init(&t->cache->lock[i], NULL);
    cJSON_Delete(j);
    *ret_tok = t;
    return 0;
fail:
    cJSON_Delete(j);
    dsv32_tok_free(t);
    return r;
}

void dsv32_tok_free(struct dsv32_tok *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->n_split; i++)
        pcre2_code_free(t->split[i].re);
    pcre2_code_free(t->bl_re.re);
    free(t->kind);
    free(t->text_off);
    free(t->dec_off);
    free(t->arena);
    free(t->dec);
    free(t->map);
    free(t->merges);
    free(t->added);
    free(t->added_arena);
    free(t->trie);
    if (t->cache)
        for (int i = 0; i < TOK_CACHE_SHARDS; i++)
            pthread_mutex_destroy(&t->cache->lock[i]);
    free(t->cache);
    free(t);
}

int32_t dsv32_tok_vocab_size(const struct dsv32_tok *t)
{
    return t->n_ids;
}
int32_t dsv32_tok_bos_id(const struct dsv32_tok *t)
{
    return t->bos;
}
int32_t dsv32_tok_eos_id(const struct dsv32_tok *t)
{
    return t->eos;
}

int32_t dsv32_tok_token_id(const struct dsv32_tok *t, const char *text)
{
    int32_t id = text ? tok_map_find(t, text, strlen(text)) : -1;
    return id < 0 ? DSV32_ETOKEN : id;
}

bool dsv32_tok_is_special(const struct dsv32_tok *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && t->kind[id] == TOK_ID_SPECIAL;
}

int dsv32_tok_id_bytes(const struct dsv32_tok *t, int32_t id, const char **ret_bytes,
                       size_t *ret_len)
{
    if (id < 0 || id >= t->n_ids || t->kind[id] == TOK_ID_NONE)
        return DSV32_ETOKEN;
    *ret_bytes = (const char *)t->dec + t->dec_off[id];
    *ret_len = t->dec_off[id + 1] - t->dec_off[id];
    return 0;
}
