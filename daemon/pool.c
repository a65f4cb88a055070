/* Arena and fixed-slot pool; see pool.h. */
#include "pool.h"

#include "error.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define ARENA_ALIGN 64

int dsv32_arena_init(struct dsv32_arena *a, size_t cap_bytes)
{
    memset(a, 0, sizeof(*a));
    if (cap_bytes == 0)
        return 0;
    cap_bytes = (cap_bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    a->base = aligned_alloc(ARENA_ALIGN, cap_bytes);
    if (!a->base)
        return -ENOMEM;
    a->cap_bytes = cap_bytes;
    return 0;
}

void dsv32_arena_done(struct dsv32_arena *a)
{
    if (!a)
        return;
    free(a->base);
    memset(a, 0, sizeof(*a));
}

void *dsv32_arena_alloc(struct dsv32_arena *a, size_t n_bytes)
{
    size_t n = (n_bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    if (n < n_bytes || n > a->cap_bytes - a->used_bytes)
        return NULL;
    void *p = a->base + a->used_bytes;
    a->used_bytes += n;
    if (a->used_bytes > a->peak_bytes)
        a->peak_bytes = a->used_bytes;
    return p;
}

void *dsv32_arena_calloc(struct dsv32_arena *a, size_t n_bytes)
{
    void *p = dsv32_arena_alloc(a, n_bytes);
    if (p)
        memset(p, 0, n_bytes);
    return p;
}

int dsv32_pool_init(struct dsv32_pool *p, size_t slot_bytes, uint32_t n_slots)
{
    memset(p, 0, sizeof(*p));
    if (slot_bytes == 0 || n_slots == 0)
        return -EINVAL;
    if (n_slots > SIZE_MAX / slot_bytes)
        return -ENOMEM;
    p->slots = calloc(n_slots, slot_bytes);
    p->free_list = malloc(sizeof(uint32_t) * n_slots);
    if (!p->slots || !p->free_list) {
        dsv32_pool_done(p);
        return -ENOMEM;
    }
    p->slot_bytes = slot_bytes;
    p->n_slots = n_slots;
    /* Hand out low ids first: the stack holds them in reverse. */
    for (uint32_t i = 0; i < n_slots; i++)
        p->free_list[i] = n_slots - 1 - i;
    p->n_free = n_slots;
    return 0;
}

void dsv32_pool_done(struct dsv32_pool *p)
{
    if (!p)
        return;
    free(p->slots);
    free(p->free_list);
    memset(p, 0, sizeof(*p));
}

int64_t dsv32_pool_get(struct dsv32_pool *p)
{
    if (p->n_free == 0)
        return DSV32_EFULL;
    return p->free_list[--p->n_free];
}

void dsv32_pool_put(struct dsv32_pool *p, uint32_t id)
{
    assert(id < p->n_slots && p->n_free < p->n_slots);
    p->free_list[p->n_free++] = id;
}
