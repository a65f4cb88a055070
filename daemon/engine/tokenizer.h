/* Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (DeepSeek-V3.2's, GPT-2 style
 * ones): added and special tokens, a pre-tokenizer made of regex Split steps (PCRE2 with JIT) and
 * ByteLevel, rank-ordered BPE merges, the ByteLevel decoder, and a streaming decoder that only ever
 * hands out whole UTF-8 characters. A loaded tokenizer may be used from many threads at once (its
 * only mutable part, a cache of short pieces, has its own locks); a stream belongs to one thread.
 */
#ifndef DSV32_TOKENIZER_H
#define DSV32_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct dsv32_tok;

/* Encode flags. */
enum {
    /* Prepend the BOS token (tokenizer_config.json's bos_token); DSV32_EMISSING when there is none.
     */
    DSV32_TOK_ADD_BOS = 1 << 0,
    /* Turn the text of added tokens ("<｜User｜>", "<think>", "<｜end▁of▁sentence｜>"...) into
     * those tokens. Without it every byte of the input goes through BPE, so user text can never
     * forge control tokens. Prompts rendered by the chat encoder need it. */
    DSV32_TOK_PARSE_SPECIAL = 1 << 1,
};

/* Decode flags. */
enum {
    /* Leave out the tokens marked "special" in tokenizer.json (BOS, EOS, padding...). */
    DSV32_TOK_SKIP_SPECIAL = 1 << 0,
};

/* Limits on what a caller controls. */
#define DSV32_TOK_MAX_FILE_BYTES (256u << 20) /* tokenizer.json */
#define DSV32_TOK_MAX_INPUT_BYTES (64u << 20) /* one encode call: -E2BIG past it */
#define DSV32_TOK_MAX_IDS (64u << 20)         /* one decode call: -E2BIG past it */

/* Loads a tokenizer. path is a directory holding tokenizer.json (and, optionally,
 * tokenizer_config.json for the BOS/EOS tokens) or the tokenizer.json file itself (the config is
 * then looked for beside it). Errors: -ENOENT, -EFBIG, DSV32_EFORMAT (malformed JSON or fields),
 * DSV32_EUNSUPPORTED (a model, normalizer, pre-tokenizer or decoder we do not implement), -ENOMEM.
 * The reason is logged. */
int dsv32_tok_load(const char *path, struct dsv32_tok **ret_tok);
void dsv32_tok_free(struct dsv32_tok *tok);

/* Number of ids (largest id + 1, counting added tokens). */
int32_t dsv32_tok_vocab_size(const struct dsv32_tok *tok);
/* BOS / EOS ids from tokenizer_config.json, -1 when not configured. */
int32_t dsv32_tok_bos_id(const struct dsv32_tok *tok);
int32_t dsv32_tok_eos_id(const struct dsv32_tok *tok);
/* Id of a token given by its exact text (vocabulary or added token), or DSV32_ETOKEN. */
int32_t dsv32_tok_token_id(const struct dsv32_tok *tok, const char *text);
/* Whether id is an added token marked special; false for out-of-range ids. */
bool dsv32_tok_is_special(const struct dsv32_tok *tok, int32_t id);
/* The bytes id decodes to (not NUL-terminated, may be a fragment of a UTF-8 character), or
 * DSV32_ETOKEN. */
int dsv32_tok_id_bytes(const struct dsv32_tok *tok, int32_t id, const char **ret_bytes,
                       size_t *ret_len);

/* Encodes len bytes of UTF-8 text. *ret_ids is malloc'd (free() it), *ret_n its length; an empty
 * text gives n 0 and a non-NULL array. Errors: DSV32_EUTF8 (invalid UTF-8: nothing is encoded),
 * -E2BIG (len > DSV32_TOK_MAX_INPUT_BYTES), DSV32_EMISSING (ADD_BOS without a BOS), -ENOMEM. */
int dsv32_tok_encode(const struct dsv32_tok *tok, const char *text, size_t len, unsigned flags,
                     int32_t **ret_ids, size_t *ret_n);

/* A byte range of a text. */
struct dsv32_tok_span {
    size_t start, len;
};

/* dsv32_tok_encode() where, with DSV32_TOK_PARSE_SPECIAL, added tokens are recognised only when
 * they lie wholly inside one of spans (sorted by start, disjoint): text outside them is ordinary
 * text even if it spells "<｜User｜>". The chat encoder uses it for prompts mixing its template
 * with user text. Same errors as dsv32_tok_encode(), plus -EINVAL for spans out of order or out of
 * the text. */
int dsv32_tok_encode_spans(const struct dsv32_tok *tok, const char *text, size_t len,
                           unsigned flags, const struct dsv32_tok_span *spans, size_t n_spans,
                           int32_t **ret_ids, size_t *ret_n);

/* Decodes ids to text, a malloc'd NUL-terminated string (*ret_len excludes the NUL). Byte
 * sequences that are not valid UTF-8 come out as U+FFFD, one per maximal invalid subpart (what
 * Hugging Face's decoder does). Errors: DSV32_ETOKEN (an id out of range), -E2BIG, -ENOMEM. */
int dsv32_tok_decode(const struct dsv32_tok *tok, const int32_t *ids, size_t n, unsigned flags,
                     char **ret_text, size_t *ret_len);

/* Streaming decode: push ids one at a time, get back the text they complete. Text is handed out
 * only up to the last whole UTF-8 character; the bytes of a character split across tokens wait
 * for the next push. The concatenation of every push and the final flush equals
 * dsv32_tok_decode() of all the ids. */
struct dsv32_tok_stream;

int dsv32_tok_stream_new(const struct dsv32_tok *tok, unsigned flags,
                         struct dsv32_tok_stream **ret_stream);
void dsv32_tok_stream_free(struct dsv32_tok_stream *s);
/* Feeds one id. *ret_text (NUL-terminated, *ret_len bytes, possibly 0) stays valid until the next
 * call on s. Errors: DSV32_ETOKEN (the stream is left as it was), -ENOMEM. */
int dsv32_tok_stream_push(struct dsv32_tok_stream *s, int32_t id, const char **ret_text,
                          size_t *ret_len);
/* Ends the stream: bytes still waiting for the rest of a character come out as U+FFFD. The stream
 * is then empty and can be reused. */
int dsv32_tok_stream_flush(struct dsv32_tok_stream *s, const char **ret_text, size_t *ret_len);

/* UTF-8 helpers shared with the chat code. dsv32_utf8_valid: whether s[0..len) is valid UTF-8
 * (no surrogates, no overlongs, at most U+10FFFF). */
bool dsv32_utf8_valid(const char *s, size_t len);

#endif
