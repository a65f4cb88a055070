/* Unit tests of the paged KV cache allocator: limits, all-or-nothing reservations, truncation,
 * freeing, and the geometry of DeepSeek-V3.2's production layout (656 + 132 bytes per token). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>

#include "error.h"
#include "kvcache.h"

static void test_geometry(void **state)
{
    struct dsv32_config c = {.kv_lora_rank = 512, .qk_rope_head_dim = 64, .index_head_dim = 128};
    struct dsv32_kv_geom g;
    dsv32_kv_geom_init(&g, &c, 0);
    assert_int_equal(g.mla_rec_bytes, 656);
    assert_int_equal(g.idx_block_bytes, 64 * 132);
    assert_int_equal(dsv32_kv_block_bytes(&g, 61), 61LL * 64 * (656 + 132));
    dsv32_kv_geom_init(&g, &c, 1);
    assert_int_equal(g.mla_rec_bytes, 512 + 16 + 256);
}

static void test_allocator(void **state)
{
    struct dsv32_config c = {.kv_lora_rank = 128, .qk_rope_head_dim = 64, .index_head_dim = 128,
                             .max_position_embeddings = 512};
    struct dsv32_kv_geom g;
    dsv32_kv_geom_init(&g, &c, 0);
    struct dsv32_backend *be;
    assert_int_equal(dsv32_backend_cpu_new(&c, &g, &be), 0);
    struct dsv32_kvcache *kv;
    assert_int_equal(dsv32_kv_new(be, &g, 2, 5, 2, 256, &kv), 0);
    int a = dsv32_kv_seq_new(kv), b = dsv32_kv_seq_new(kv);
    assert_true(a >= 0 && b >= 0 && a != b);
    assert_int_equal(dsv32_kv_seq_new(kv), DSV32_EFULL);
    assert_int_equal(dsv32_kv_seq_reserve(kv, a, 130), 0); /* 3 blocks */
    assert_int_equal(dsv32_kv_free_blocks(kv), 2);
    assert_int_equal(dsv32_kv_seq_reserve(kv, b, 129), DSV32_EFULL); /* needs 3, 2 free: no change */
    assert_int_equal(dsv32_kv_free_blocks(kv), 2);
    assert_int_equal(kv->seq_blocks[b], 0);
    assert_int_equal(dsv32_kv_seq_reserve(kv, b, 300), DSV32_ECONTEXT); /* past 256 per sequence */
    assert_int_equal(dsv32_kv_seq_reserve(kv, b, 128), 0);
    assert_int_equal(dsv32_kv_free_blocks(kv), 0);
    assert_int_equal(dsv32_kv_blocks_needed(kv, a, 192), 0);
    assert_int_equal(dsv32_kv_blocks_needed(kv, a, 193), 1);
    /* blocks of a sequence are distinct and all within range */
    int seen[5] = {0};
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < kv->seq_blocks[s]; i++) {
            int blk = kv->block_table[s * kv->max_blocks_per_seq + i];
            assert_true(blk >= 0 && blk < 5);
            assert_int_equal(seen[blk]++, 0);
        }
    dsv32_kv_seq_truncate(kv, a, 64);
    assert_int_equal(kv->seq_blocks[a], 1);
    assert_int_equal(dsv32_kv_free_blocks(kv), 2);
    dsv32_kv_seq_free(kv, a);
    dsv32_kv_seq_free(kv, a); /* a free slot: no effect */
    assert_int_equal(dsv32_kv_free_blocks(kv), 3);
    assert_int_equal(dsv32_kv_seq_reserve(kv, a, 1), -EINVAL); /* no longer in use */
    assert_true(dsv32_kv_seq_new(kv) >= 0);
    dsv32_kv_free(kv);
    dsv32_kv_free(NULL);
    dsv32_backend_free(be);
    assert_int_equal(dsv32_kv_new(be, &g, 2, 0, 2, 256, &kv), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_geometry),
        cmocka_unit_test(test_allocator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
