/* The tokenizer's internals, shared by its three files: tokenizer.c (loading tokenizer.json, the
 * lookup tables), tok_encode.c (added tokens, pre-tokenizer, BPE) and tok_decode.c (UTF-8,
 * decode, streaming decode). Not a public interface. */
#ifndef DSV32_TOK_INTERNAL_H
#define DSV32_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TOK_MAX_SPLIT_STEPS 8

/* Cache of BPE results for short pieces ("the", " of", "，"...), which make up most of any text.
 * Direct-mapped, shared by all threads, one lock per shard; a slot simply gets overwritten. */
#define TOK_CACHE_BITS 16
#define TOK_CACHE_SHARDS 64
#define TOK_CACHE_MAX_BYTES 46
#define TOK_CACHE_MAX_IDS 12

struct tok_cache_slot {
    uint32_t hash; /* high half of the piece's hash */
    uint8_t len;   /* 0 = empty */
    uint8_t n_ids;
    uint8_t bytes[TOK_CACHE_MAX_BYTES];
    int32_t ids[TOK_CACHE_MAX_IDS];
};

struct tok_cache {
    pthread_mutex_t lock[TOK_CACHE_SHARDS];
    struct tok_cache_slot slot[1 << TOK_CACHE_BITS];
};

/* How a Split step treats the pieces its pattern matches (tokenizers' SplitDelimiterBehavior). */
enum tok_split_behavior {
    TOK_SPLIT_ISOLATED,    /* matches and the gaps between them are pieces */
    TOK_SPLIT_REMOVED,     /* matches are dropped */
    TOK_SPLIT_MERGED_PREV, /* a match joins the gap before it */
    TOK_SPLIT_MERGED_NEXT, /* a match joins the gap after it */
    TOK_SPLIT_CONTIGUOUS,  /* consecutive matches form one piece */
};

struct tok_split {
    pcre2_code *re; /* compiled pattern (a String pattern is compiled as a literal) */
    bool jit;       /* JIT compiled: match with pcre2_jit_match */
    enum tok_split_behavior behavior;
    bool invert; /* matches and gaps swap roles */
};

/* Kind of each id. */
enum { TOK_ID_NONE = 0, TOK_ID_VOCAB = 1, TOK_ID_ADDED = 2, TOK_ID_SPECIAL = 3 };

struct tok_added {
    const char *text; /* content, in the string arena */
    uint32_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word;
};

/* Trie over the added tokens' bytes: leftmost-longest matching in the input text. */
struct tok_trie_node {
    int32_t child;   /* first child, -1 if none */
    int32_t sibling; /* next sibling, -1 if none */
    int32_t added;   /* index in tok->added ending here, -1 if none */
    uint8_t byte;
};

/* (left id, right id) -> (rank, merged id): open addressing, linear probing. */
struct tok_merge_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    uint32_t rank;
    int32_t id;
};

struct dsv32_tok {
    int32_t n_ids;      /* largest id + 1 */
    uint8_t *kind;      /* (n_ids) TOK_ID_* */
    uint32_t *text_off; /* (n_ids + 1) token text as tokenizer.json spells it, in arena */
    uint32_t *dec_off;  /* (n_ids + 1) bytes the token decodes to, in dec */
    char *arena;        /* token texts */
    uint8_t *dec;       /* decoded bytes */

    int32_t *map; /* text -> id: open addressing over ids, -1 = empty */
    uint32_t map_mask;

    struct tok_merge_slot *merges;
    uint32_t merges_mask;
    uint32_t n_merges;

    int32_t byte_id[256]; /* id of each single byte (ByteLevel alphabet) */
    bool ignore_merges;   /* a piece that is a vocabulary token as a whole is not merged */

    struct tok_added *added; /* (n_added) */
    int n_added;
    char *added_arena;
    struct tok_trie_node *trie; /* node 0 is the root */
    int n_trie;
    uint8_t first_byte[256]; /* bytes an added token can start with */

    struct tok_split split[TOK_MAX_SPLIT_STEPS];
    int n_split;            /* Split steps before the ByteLevel step */
    struct tok_split bl_re; /* ByteLevel's own GPT-2 regex when use_regex, else re == NULL */
    bool bl_prefix_space;   /* ByteLevel add_prefix_space */

    int32_t bos, eos;
    struct tok_cache *cache; /* the one mutable part, behind its locks */
};

/* Pieces shorter than this merge by rescanning, longer ones through a heap (tests change it). */
extern int tok_bpe_heap_min;
/* Whether encode uses the piece cache (tests turn it off to exercise the merge loops). */
extern bool tok_piece_cache;

/* The GPT-2 byte <-> character bijection of the ByteLevel pre-tokenizer and decoder. */
uint32_t tok_byte_to_cp(uint8_t b);
/* Byte for a code point of that alphabet, or -1. */
int tok_cp_to_byte(uint32_t cp);

uint64_t tok_hash(const void *p, size_t n);
/* Id whose tokenizer.json text is s[0..n), or -1. */
int32_t tok_map_find(const struct dsv32_tok *t, const char *s, size_t n);
/* Merge of (left, right): returns true and fills rank/id when the pair merges. */
static inline bool tok_merge_find(const struct dsv32_tok *t, int32_t left, int32_t right,
                                  uint32_t *rank, int32_t *id)
{
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    uint32_t i = (uint32_t)(h >> 32) & t->merges_mask;
    for (;;) {
        const struct tok_merge_slot *s = &t->merges[i];
        if (s->key == key) {
            *rank = s->rank;
            *id = s->id;
            return true;
        }
        if (s->key == 0)
            return false;
        i = (i + 1) & t->merges_mask;
    }
}

/* Decodes one UTF-8 character at s (n bytes available, n >= 1, already validated). */
uint32_t tok_utf8_next(const uint8_t *s, size_t n, size_t *ret_len);
/* Whether code point cp has the Unicode White_Space property. */
bool tok_is_white_space(uint32_t cp);

#endif
