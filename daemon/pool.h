/* Memory with limits fixed at start: an arena (bump allocator, reset per step) and a pool of
 * fixed-size objects with a free list. Neither grows: when full they say so (-DSV32_EFULL / NULL),
 * which callers turn into "overloaded" instead of allocating on the hot path. */
#ifndef DSV32_POOL_H
#define DSV32_POOL_H

#include <stddef.h>
#include <stdint.h>

struct dsv32_arena {
    uint8_t *base;
    size_t cap_bytes;
    size_t used_bytes;
    size_t peak_bytes;
};

int dsv32_arena_init(struct dsv32_arena *a, size_t cap_bytes);
void dsv32_arena_done(struct dsv32_arena *a);
/* 64-byte aligned; NULL when the arena cannot hold n bytes more. */
void *dsv32_arena_alloc(struct dsv32_arena *a, size_t n_bytes);
/* Like alloc, zero-filled. */
void *dsv32_arena_calloc(struct dsv32_arena *a, size_t n_bytes);
static inline size_t dsv32_arena_mark(const struct dsv32_arena *a) { return a->used_bytes; }
static inline void dsv32_arena_reset_to(struct dsv32_arena *a, size_t mark) { a->used_bytes = mark; }
static inline void dsv32_arena_reset(struct dsv32_arena *a) { a->used_bytes = 0; }

struct dsv32_pool {
    uint8_t *slots;
    size_t slot_bytes;
    uint32_t n_slots;
    uint32_t n_free;
    uint32_t *free_list; /* (n_slots) stack of free slot ids */
};

int dsv32_pool_init(struct dsv32_pool *p, size_t slot_bytes, uint32_t n_slots);
void dsv32_pool_done(struct dsv32_pool *p);
/* Returns a slot id or -DSV32_EFULL. */
int64_t dsv32_pool_get(struct dsv32_pool *p);
void dsv32_pool_put(struct dsv32_pool *p, uint32_t id);
static inline void *dsv32_pool_slot(const struct dsv32_pool *p, uint32_t id)
{
    return p->slots + (size_t)id * p->slot_bytes;
}

#endif
