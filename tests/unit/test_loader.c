/* Unit tests of the checkpoint loader: config parsing errors, safetensors corruption (truncated,
 * bad header, offsets, sizes), missing tensors, wrong shapes and dtypes, FP8 without scales,
 * sharded checkpoints with an index, and loading a subset (some experts) that maps only the
 * shards it needs. Every error must name the file and the tensor. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"
#include "model.h"
#include "safetensors.h"

#ifndef GOLDEN_DIR
#error GOLDEN_DIR must point at tests/golden
#endif

static char tmpdir[256];

static int setup(void **state)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/dsv32-loader-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static char *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    rewind(f);
    char *b = malloc(*n + 1);
    assert_int_equal(fread(b, 1, *n, f), *n);
    b[*n] = 0;
    fclose(f);
    return b;
}

/* A copy of a golden model in DIR, with tensor `drop` left out and `edit` (if set) applied to
 * the entry named `target`. */
static void copy_model(const char *src, const char *dst, const char *drop, const char *target,
                       void (*edit)(struct dsv32_st_entry *e))
{
    char path[512];
    mkdir(dst, 0755);
    size_t n;
    snprintf(path, sizeof(path), "%s/config.json", src);
    char *cfg = read_file(path, &n);
    snprintf(path, sizeof(path), "%s/config.json", dst);
    write_file(path, cfg, n);
    free(cfg);
    snprintf(path, sizeof(path), "%s/model.safetensors", src);
    struct dsv32_st_file *f;
    assert_int_equal(dsv32_st_file_open(path, &f), 0);
    int cnt = dsv32_st_file_count(f), k = 0;
    struct dsv32_st_entry *e = calloc((size_t)cnt, sizeof(*e));
    for (int i = 0; i < cnt; i++) {
        const struct dsv32_st_tensor *t = dsv32_st_file_tensor(f, i);
        if (drop && strcmp(t->name, drop) == 0)
            continue;
        e[k] = (struct dsv32_st_entry){.name = t->name, .dtype = t->dtype, .n_dims = t->n_dims,
                                       .data = t->data};
        memcpy(e[k].shape, t->shape, sizeof(t->shape));
        if (edit && target && strcmp(t->name, target) == 0)
            edit(&e[k]);
        k++;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dst);
    assert_int_equal(dsv32_st_write(path, e, k), 0);
    free(e);
    dsv32_st_file_close(f);
}

static void expect_load_error(const char *dir, int err, const char *must_contain1,
                              const char *must_contain2)
{
    struct dsv32_model *m = NULL;
    int r = dsv32_model_load(dir, NULL, &m);
    if (r != err)
        fail_msg("expected %s, got %s: %s", dsv32_err_name(err), dsv32_err_name(r), dsv32_load_error());
    assert_null(m);
    const char *msg = dsv32_load_error();
    if (must_contain1 && !strstr(msg, must_contain1))
        fail_msg("error '%s' does not mention '%s'", msg, must_contain1);
    if (must_contain2 && !strstr(msg, must_contain2))
        fail_msg("error '%s' does not mention '%s'", msg, must_contain2);
}

static void test_golden_models_load(void **state)
{
    const char *models[] = {GOLDEN_DIR "/tiny-bf16", GOLDEN_DIR "/tiny-fp8"};
    for (int i = 0; i < 2; i++) {
        struct dsv32_model *m;
        if (dsv32_model_load(models[i], NULL, &m) < 0)
            fail_msg("%s", dsv32_load_error());
        assert_int_equal(m->cfg.hidden_size, 256);
        assert_int_equal(m->cfg.index_topk, 16);
        assert_int_equal(m->cfg.fp8, i == 1);
        assert_int_equal(m->cfg.ue8m0, i == 1);
        assert_true(m->cfg.yarn);
        assert_true(m->layers[1].is_moe && !m->layers[0].is_moe);
        assert_non_null(m->layers[3].experts[15].w2.name);
        if (i == 1) {
            assert_int_equal(m->layers[0].wq_a.dtype, DSV32_DT_F8_E4M3);
            assert_non_null(m->layers[0].wq_a.scale);
            /* dequantization: element (r, c) = fp8 * scale[r/128][c/128] */
            float *w = malloc(sizeof(float) * 128 * 256);
            dsv32_weight_to_f32(&m->layers[0].wq_a, w);
            const uint8_t *raw = m->layers[0].wq_a.data;
            assert_float_equal(w[129], dsv32_fp8_to_f32(raw[129]) * m->layers[0].wq_a.scale[1], 0);
            free(w);
        }
        dsv32_model_free(m);
    }
}

static void test_config_errors(void **state)
{
    struct dsv32_config c;
    assert_int_equal(dsv32_config_parse("[1]", "x", &c), DSV32_ECONFIG);
    assert_int_equal(dsv32_config_parse("{\"hidden_size\": 256}", "cfg.json", &c), DSV32_ECONFIG);
    assert_non_null(strstr(dsv32_load_error(), "cfg.json"));
    char path[512];
    size_t n;
    snprintf(path, sizeof(path), "%s/config.json", GOLDEN_DIR "/tiny-fp8");
    char *txt = read_file(path, &n);
    assert_int_equal(dsv32_config_parse(txt, "ok", &c), 0);
    /* a negative dimension, an unsupported quantization, a broken group layout */
    const struct { const char *from, *to, *mention; } bad[] = {
        {"\"hidden_size\": 256", "\"hidden_size\": -256", "hidden_size"},
        {"\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\"", "quant_method"},
        {"\"n_group\": 4", "\"n_group\": 5", "expert groups"},
        {"\"kv_lora_rank\": 128", "\"kv_lora_rank\": 100", "kv_lora_rank"},
        {"\"type\": \"yarn\"", "\"type\": \"linear\"", "yarn"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *p = strstr(txt, bad[i].from);
        assert_non_null(p);
        char *mod = malloc(n + 64);
        snprintf(mod, n + 64, "%.*s%s%s", (int)(p - txt), txt, bad[i].to, p + strlen(bad[i].from));
        assert_int_equal(dsv32_config_parse(mod, "cfg", &c), DSV32_ECONFIG);
        if (!strstr(dsv32_load_error(), bad[i].mention))
            fail_msg("'%s' does not mention %s", dsv32_load_error(), bad[i].mention);
        free(mod);
    }
    free(txt);
}

static void test_corrupt_files(void **state)
{
    char dir[512], path[600];
    snprintf(dir, sizeof(dir), "%s/corrupt", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-bf16", dir, NULL, NULL, NULL);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    size_t n;
    char *orig = read_file(path, &n);

    /* truncated in the middle of the data */
    write_file(path, orig, n / 2);
    expect_load_error(dir, DSV32_ETRUNC, "model.safetensors", "truncated");
    /* shorter than the 8-byte length */
    write_file(path, orig, 5);
    expect_load_error(dir, DSV32_ETRUNC, "model.safetensors", NULL);
    /* header length beyond the file */
    char *bad = malloc(n);
    memcpy(bad, orig, n);
    bad[0] = (char)0xff;
    bad[1] = (char)0xff;
    bad[2] = (char)0x0f;
    write_file(path, bad, n);
    expect_load_error(dir, DSV32_ETRUNC, "model.safetensors", NULL);
    /* header that is not JSON */
    memcpy(bad, orig, n);
    bad[8] = '#';
    write_file(path, bad, n);
    expect_load_error(dir, DSV32_EFORMAT, "model.safetensors", "JSON");
    /* absurd header length */
    memcpy(bad, orig, n);
    memset(bad, 0xff, 8);
    write_file(path, bad, n);
    expect_load_error(dir, DSV32_EFORMAT, "model.safetensors", "header length");
    /* data_offsets that do not match the dtype and shape: change a shape digit in the header */
    memcpy(bad, orig, n);
    char *hdr = bad + 8, *p = strstr(hdr, "\"model.norm.weight\"");
    assert_non_null(p);
    p = strstr(p, "[256]");
    assert_non_null(p);
    p[1] = '3'; /* [356]: 712 bytes expected, 512 present */
    write_file(path, bad, n);
    expect_load_error(dir, DSV32_EFORMAT, "model.safetensors", "model.norm.weight");
    /* a directory without any checkpoint */
    unlink(path);
    expect_load_error(dir, DSV32_EMISSING, dir, NULL);
    free(bad);
    free(orig);
}

static void shape_bad(struct dsv32_st_entry *e)
{
    /* same bytes, other shape: [256, 512] read as [512, 256] */
    int64_t t = e->shape[0];
    e->shape[0] = e->shape[1];
    e->shape[1] = t;
}

static void dtype_bad(struct dsv32_st_entry *e)
{
    e->dtype = DSV32_DT_I32; /* 2 BF16 per I32: half the elements */
    e->shape[0] /= 2;
}

static void test_model_mismatches(void **state)
{
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/missing", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-bf16", dir, "model.layers.2.self_attn.indexer.wk.weight", NULL, NULL);
    expect_load_error(dir, DSV32_EMISSING, "model.layers.2.self_attn.indexer.wk.weight", dir);

    snprintf(dir, sizeof(dir), "%s/shape", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-bf16", dir, NULL, "model.layers.0.mlp.down_proj.weight", shape_bad);
    expect_load_error(dir, DSV32_ESHAPE, "model.layers.0.mlp.down_proj.weight", "[512, 256]");

    snprintf(dir, sizeof(dir), "%s/dtype", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-bf16", dir, NULL, "model.layers.1.mlp.gate.weight", dtype_bad);
    expect_load_error(dir, DSV32_ESHAPE, "model.layers.1.mlp.gate.weight", "model.safetensors");

    snprintf(dir, sizeof(dir), "%s/noscale", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-fp8", dir, "model.layers.1.self_attn.o_proj.weight_scale_inv", NULL, NULL);
    expect_load_error(dir, DSV32_EMISSING, "model.layers.1.self_attn.o_proj.weight_scale_inv", NULL);
}

static void test_dtype_error(void **state)
{
    /* a norm weight stored as I32 of the right element count */
    char dir[512], path[600];
    snprintf(dir, sizeof(dir), "%s/i32", tmpdir);
    copy_model(GOLDEN_DIR "/tiny-bf16", dir, NULL, NULL, NULL);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    struct dsv32_st_file *f;
    assert_int_equal(dsv32_st_file_open(path, &f), 0);
    int cnt = dsv32_st_file_count(f);
    struct dsv32_st_entry *e = calloc((size_t)cnt, sizeof(*e));
    int32_t norm[256] = {0};
    for (int i = 0; i < cnt; i++) {
        const struct dsv32_st_tensor *t = dsv32_st_file_tensor(f, i);
        e[i] = (struct dsv32_st_entry){.name = t->name, .dtype = t->dtype, .n_dims = t->n_dims,
                                       .data = t->data};
        memcpy(e[i].shape, t->shape, sizeof(t->shape));
        if (strcmp(t->name, "model.norm.weight") == 0) {
            e[i].dtype = DSV32_DT_I32;
            e[i].data = norm;
        }
    }
    char out[600];
    snprintf(out, sizeof(out), "%s/model2.safetensors", dir);
    assert_int_equal(dsv32_st_write(out, e, cnt), 0);
    free(e);
    dsv32_st_file_close(f);
    rename(out, path);
    expect_load_error(dir, DSV32_EDTYPE, "model.norm.weight", "I32");
}

/* Sharded: layers 0-1 in shard 1, layers 2-3 in shard 2, with an index. Loading only layers 0-1
 * must not map shard 2; an expert filter must load only those experts. */
static void test_sharded_subset(void **state)
{
    char dir[512], path[600];
    snprintf(dir, sizeof(dir), "%s/sharded", tmpdir);
    mkdir(dir, 0755);
    size_t n;
    char *cfg = read_file(GOLDEN_DIR "/tiny-fp8/config.json", &n);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    write_file(path, cfg, n);
    free(cfg);
    struct dsv32_st_file *f;
    assert_int_equal(dsv32_st_file_open(GOLDEN_DIR "/tiny-fp8/model.safetensors", &f), 0);
    int cnt = dsv32_st_file_count(f), n1 = 0, n2 = 0;
    struct dsv32_st_entry *a = calloc((size_t)cnt, sizeof(*a)), *b = calloc((size_t)cnt, sizeof(*b));
    FILE *idx;
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    idx = fopen(path, "w");
    fprintf(idx, "{\"metadata\": {}, \"weight_map\": {");
    for (int i = 0; i < cnt; i++) {
        const struct dsv32_st_tensor *t = dsv32_st_file_tensor(f, i);
        int second = strncmp(t->name, "model.layers.2.", 15) == 0 ||
                     strncmp(t->name, "model.layers.3.", 15) == 0;
        struct dsv32_st_entry *e = second ? &b[n2++] : &a[n1++];
        *e = (struct dsv32_st_entry){.name = t->name, .dtype = t->dtype, .n_dims = t->n_dims,
                                     .data = t->data};
        memcpy(e->shape, t->shape, sizeof(t->shape));
        fprintf(idx, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "", t->name,
                second ? 2 : 1);
    }
    fprintf(idx, "}}\n");
    fclose(idx);
    snprintf(path, sizeof(path), "%s/model-00001-of-00002.safetensors", dir);
    assert_int_equal(dsv32_st_write(path, a, n1), 0);
    snprintf(path, sizeof(path), "%s/model-00002-of-00002.safetensors", dir);
    assert_int_equal(dsv32_st_write(path, b, n2), 0);
    free(a);
    free(b);
    dsv32_st_file_close(f);

    struct dsv32_model *m;
    if (dsv32_model_load(dir, NULL, &m) < 0)
        fail_msg("%s", dsv32_load_error());
    assert_int_equal(dsv32_ckpt_n_mapped(m->ckpt), 2);
    dsv32_model_free(m);

    struct dsv32_load_opts lo = {.layer_begin = 0, .layer_end = 2};
    assert_int_equal(dsv32_model_load(dir, &lo, &m), 0);
    assert_int_equal(dsv32_ckpt_n_mapped(m->ckpt), 1);
    assert_null(m->layers[2].wq_a.name);
    dsv32_model_free(m);
}

static int want_odd_l3(void *ctx, int layer, int expert) { return layer == 3 && expert % 2 == 1; }

static void test_expert_subset(void **state)
{
    struct dsv32_load_opts lo = {.skip_attention = 1, .want_expert = want_odd_l3};
    struct dsv32_model *m;
    if (dsv32_model_load(GOLDEN_DIR "/tiny-fp8", &lo, &m) < 0)
        fail_msg("%s", dsv32_load_error());
    assert_null(m->embed.name);
    assert_null(m->layers[3].wq_a.name);
    assert_null(m->layers[3].experts[2].w1.name);
    assert_non_null(m->layers[3].experts[3].w1.name);
    assert_null(m->layers[1].experts[3].w1.name);
    assert_int_equal(m->n_weights_loaded, 8 * 3);
    dsv32_model_free(m);
    struct dsv32_load_opts bad = {.layer_begin = 3, .layer_end = 9};
    assert_int_equal(dsv32_model_load(GOLDEN_DIR "/tiny-fp8", &bad, &m), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_models_load),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_corrupt_files),
        cmocka_unit_test(test_model_mismatches),
        cmocka_unit_test(test_dtype_error),
        cmocka_unit_test(test_sharded_subset),
        cmocka_unit_test(test_expert_subset),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
