/* Unit tests of the runtime: the error table, log level parsing, arena and pool limits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "error.h"
#include "log.h"
#include "pool.h"

static void test_strerror(void **state)
{
    assert_string_equal(dsv32_strerror(0), "success");
    assert_string_equal(dsv32_strerror(DSV32_EFULL), "cache or pool is full");
    assert_string_equal(dsv32_err_name(DSV32_ESHAPE), "DSV32_ESHAPE");
    assert_string_equal(dsv32_strerror(-ENOENT), strerror(ENOENT));
    assert_string_equal(dsv32_err_name(-ENOENT), "ENOENT");
    assert_true(DSV32_EFORMAT < -DSV32_ERRNO_BASE);
    assert_string_equal(dsv32_strerror(-999999), "unknown error");
}

static void test_log_levels(void **state)
{
    enum dsv32_log_level l;
    assert_int_equal(dsv32_log_parse_level("debug", &l), 0);
    assert_int_equal(l, DSV32_LOG_DEBUG);
    assert_int_equal(dsv32_log_parse_level("loud", &l), -EINVAL);
    dsv32_log_set_level(DSV32_LOG_WARN);
    assert_false(dsv32_log_enabled(DSV32_LOG_INFO));
    assert_true(dsv32_log_enabled(DSV32_LOG_ERROR));
}

static void test_arena_limit(void **state)
{
    struct dsv32_arena a;
    assert_int_equal(dsv32_arena_init(&a, 1000), 0);
    void *p = dsv32_arena_alloc(&a, 100);
    assert_non_null(p);
    assert_int_equal((uintptr_t)p % 64, 0);
    size_t mark = dsv32_arena_mark(&a);
    assert_non_null(dsv32_arena_alloc(&a, 800));
    assert_null(dsv32_arena_alloc(&a, 200)); /* full: says so, does not grow */
    dsv32_arena_reset_to(&a, mark);
    assert_non_null(dsv32_arena_alloc(&a, 200));
    assert_null(dsv32_arena_alloc(&a, SIZE_MAX)); /* overflow is refused */
    dsv32_arena_done(&a);
    dsv32_arena_done(NULL);
}

static void test_pool_limit(void **state)
{
    struct dsv32_pool p;
    assert_int_equal(dsv32_pool_init(&p, 16, 3), 0);
    int64_t a = dsv32_pool_get(&p), b = dsv32_pool_get(&p), c = dsv32_pool_get(&p);
    assert_int_equal(a, 0);
    assert_int_equal(b, 1);
    assert_int_equal(c, 2);
    assert_int_equal(dsv32_pool_get(&p), DSV32_EFULL);
    dsv32_pool_put(&p, 1);
    assert_int_equal(dsv32_pool_get(&p), 1);
    memset(dsv32_pool_slot(&p, 2), 0xab, 16);
    dsv32_pool_done(&p);
    assert_int_equal(dsv32_pool_init(&p, 0, 3), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_log_levels),
        cmocka_unit_test(test_arena_limit),
        cmocka_unit_test(test_pool_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
