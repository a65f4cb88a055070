/* config.json of DeepSeek-V3.2 -> struct dsv32_config; see config.h. */
#include "config.h"

#include "error.h"
#include "safetensors.h" /* dsv32_load_fail */

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CONFIG_MAX_BYTES (1 << 20)

/* Table of integer fields: name, offset, required, default, minimum. */
struct int_field {
    const char *name;
    size_t off;
    int required;
    int def;
    int min;
};
#define F(n, req, def, min) {#n, offsetof(struct dsv32_config, n), req, def, min}
static const struct int_field int_fields[] = {
    F(vocab_size, 1, 0, 1),
    F(hidden_size, 1, 0, 1),
    F(intermediate_size, 1, 0, 1),
    F(moe_intermediate_size, 1, 0, 1),
    F(num_hidden_layers, 1, 0, 1),
    F(first_k_dense_replace, 0, 0, 0),
    F(moe_layer_freq, 0, 1, 1),
    F(num_attention_heads, 1, 0, 1),
    F(n_routed_experts, 1, 0, 0),
    F(n_shared_experts, 0, 0, 0),
    F(num_experts_per_tok, 1, 0, 0),
    F(n_group, 0, 1, 1),
    F(topk_group, 0, 1, 1),
    F(q_lora_rank, 1, 0, 1),
    F(kv_lora_rank, 1, 0, 1),
    F(qk_nope_head_dim, 1, 0, 1),
    F(qk_rope_head_dim, 1, 0, 2),
    F(v_head_dim, 1, 0, 1),
    F(index_n_heads, 1, 0, 1),
    F(index_head_dim, 1, 0, 1),
    F(index_topk, 1, 0, 1),
    F(max_position_embeddings, 1, 0, 1),
    F(bos_token_id, 0, 0, 0),
    F(eos_token_id, 0, 1, 0),
    F(num_nextn_predict_layers, 0, 0, 0),
};
#undef F

static int get_int(const cJSON *o, const char *src, const struct int_field *f, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, f->name);
    if (!v || cJSON_IsNull(v)) {
        if (f->required)
            return dsv32_load_fail(DSV32_ECONFIG, "%s: required field \"%s\" is missing", src,
                                   f->name);
        *out = f->def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < f->min || v->valuedouble > 1e9)
        return dsv32_load_fail(DSV32_ECONFIG, "%s: field \"%s\" must be an integer >= %d", src,
                               f->name, f->min);
    *out = (int)v->valuedouble;
    return 0;
}

static int get_num(const cJSON *o, const char *src, const char *name, int required, double def,
                   double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return dsv32_load_fail(DSV32_ECONFIG, "%s: required field \"%s\" is missing", src,
                                   name);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return dsv32_load_fail(DSV32_ECONFIG, "%s: field \"%s\" must be a number", src, name);
    *out = v->valuedouble;
    return 0;
}

static int check(int ok, const char *src, const char *what)
{
    return ok ? 0 : dsv32_load_fail(DSV32_ECONFIG, "%s: unsupported configuration: %s", src, what);
}

int dsv32_config_parse(const char *json, const char *src, struct dsv32_config *c)
{
    struct dsv32_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cJSON *o = cJSON_Parse(json);
    int r = 0;
    double d;
    if (!cJSON_IsObject(o)) {
        r = dsv32_load_fail(DSV32_ECONFIG, "%s: not a JSON object", src);
        goto out;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(o, "model_type");
    if (cJSON_IsString(mt) && strcmp(mt->valuestring, "deepseek_v32") != 0 &&
        strcmp(mt->valuestring, "deepseek_v3") != 0) {
        r = dsv32_load_fail(DSV32_ECONFIG, "%s: model_type \"%s\" is not deepseek_v32", src,
                            mt->valuestring);
        goto out;
    }
    for (size_t i = 0; i < sizeof(int_fields) / sizeof(int_fields[0]); i++)
        if ((r = get_int(o, src, &int_fields[i], (int *)((char *)&cfg + int_fields[i].off))) < 0)
            goto out;
    if ((r = get_num(o, src, "routed_scaling_factor", 0, 1.0, &d)) < 0)
        goto out;
    cfg.routed_scaling_factor = (float)d;
    if ((r = get_num(o, src, "rms_norm_eps", 0, 1e-6, &d)) < 0)
        goto out;
    cfg.rms_norm_eps = (float)d;
    if ((r = get_num(o, src, "rope_theta", 0, 10000.0, &cfg.rope_theta)) < 0)
        goto out;
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(o, "norm_topk_prob");
    cfg.norm_topk_prob = b ? cJSON_IsTrue(b) : 1;
    b = cJSON_GetObjectItemCaseSensitive(o, "tie_word_embeddings");
    cfg.tie_word_embeddings = b ? cJSON_IsTrue(b) : 0;
    const cJSON *sf = cJSON_GetObjectItemCaseSensitive(o, "scoring_func");
    cfg.scoring_sigmoid = !cJSON_IsString(sf) || strcmp(sf->valuestring, "sigmoid") == 0;
    if (cJSON_IsString(sf) && !cfg.scoring_sigmoid && strcmp(sf->valuestring, "softmax") != 0) {
        r = dsv32_load_fail(DSV32_ECONFIG, "%s: scoring_func \"%s\" is not sigmoid or softmax",
                            src, sf->valuestring);
        goto out;
    }
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(o, "topk_method");
    if (cJSON_IsString(tm) && strcmp(tm->valuestring, "noaux_tc") != 0 &&
        strcmp(tm->valuestring, "greedy") != 0 && strcmp(tm->valuestring, "group_limited_greedy")) {
        r = dsv32_load_fail(DSV32_ECONFIG, "%s: topk_method \"%s\" is not supported", src,
                            tm->valuestring);
        goto out;
    }

    /* rope_scaling: YaRN as DeepSeek uses it, or none. */
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(o, "rope_scaling");
    cfg.rope_factor = 1.0;
    cfg.original_max_position_embeddings = cfg.max_position_embeddings;
    if (cJSON_IsObject(rs)) {
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
        if (!ty)
            ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
        if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "yarn") != 0) {
            r = dsv32_load_fail(DSV32_ECONFIG, "%s: rope_scaling type must be \"yarn\"", src);
            goto out;
        }
        char rsrc[512];
        snprintf(rsrc, sizeof(rsrc), "%s: rope_scaling", src);
        cfg.yarn = 1;
        double omp;
        if ((r = get_num(rs, rsrc, "factor", 1, 1, &cfg.rope_factor)) < 0 ||
            (r = get_num(rs, rsrc, "original_max_position_embeddings", 1, 0, &omp)) < 0 ||
            (r = get_num(rs, rsrc, "beta_fast", 0, 32, &cfg.beta_fast)) < 0 ||
            (r = get_num(rs, rsrc, "beta_slow", 0, 1, &cfg.beta_slow)) < 0 ||
            (r = get_num(rs, rsrc, "mscale", 0, 1, &cfg.mscale)) < 0 ||
            (r = get_num(rs, rsrc, "mscale_all_dim", 0, cfg.mscale, &cfg.mscale_all_dim)) < 0)
            goto out;
        cfg.original_max_position_embeddings = (int)omp;
        if ((r = check(cfg.rope_factor >= 1 && omp >= 1, src, "rope_scaling factor < 1")) < 0)
            goto out;
    } else if (rs && !cJSON_IsNull(rs)) {
        r = dsv32_load_fail(DSV32_ECONFIG, "%s: rope_scaling must be an object", src);
        goto out;
    }

    const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "quantization_config");
    cfg.fp8_block = 128;
    if (cJSON_IsObject(q)) {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(q, "quant_method");
        const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(q, "fmt");
        const cJSON *bs = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
        const cJSON *sfmt = cJSON_GetObjectItemCaseSensitive(q, "scale_fmt");
        if (!cJSON_IsString(m) || strcmp(m->valuestring, "fp8") != 0) {
            r = dsv32_load_fail(DSV32_ECONFIG, "%s: quantization_config.quant_method must be "
                                "\"fp8\"", src);
            goto out;
        }
        if (cJSON_IsString(fmt) && strcmp(fmt->valuestring, "e4m3") != 0) {
            r = dsv32_load_fail(DSV32_ECONFIG, "%s: quantization_config.fmt \"%s\" is not e4m3",
                                src, fmt->valuestring);
            goto out;
        }
        if (bs && (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2 ||
                   cJSON_GetArrayItem(bs, 0)->valuedouble != 128 ||
                   cJSON_GetArrayItem(bs, 1)->valuedouble != 128)) {
            r = dsv32_load_fail(DSV32_ECONFIG, "%s: quantization_config.weight_block_size must "
                                "be [128, 128]", src);
            goto out;
        }
        cfg.fp8 = 1;
        cfg.ue8m0 = cJSON_IsString(sfmt) && strcmp(sfmt->valuestring, "ue8m0") == 0;
        if (cJSON_IsString(sfmt) && !cfg.ue8m0) {
            r = dsv32_load_fail(DSV32_ECONFIG, "%s: quantization_config.scale_fmt \"%s\" is not "
                                "ue8m0", src, sfmt->valuestring);
            goto out;
        }
    }

    /* What the forward relies on. */
    if ((r = check(cfg.qk_rope_head_dim % 2 == 0, src, "qk_rope_head_dim must be even")) < 0 ||
        (r = check(cfg.kv_lora_rank % 128 == 0, src,
                   "kv_lora_rank must be a multiple of 128 (FP8 KV blocks)")) < 0 ||
        (r = check(cfg.index_head_dim == 128, src, "index_head_dim must be 128")) < 0 ||
        (r = check(cfg.qk_rope_head_dim <= cfg.index_head_dim, src,
                   "qk_rope_head_dim > index_head_dim")) < 0 ||
        (r = check(cfg.hidden_size % 128 == 0, src, "hidden_size must be a multiple of 128")) < 0 ||
        (r = check(cfg.n_routed_experts == 0 ||
                       (cfg.n_routed_experts % cfg.n_group == 0 && cfg.topk_group <= cfg.n_group &&
                        cfg.num_experts_per_tok >= 1 &&
                        cfg.num_experts_per_tok <= cfg.topk_group * (cfg.n_routed_experts / cfg.n_group)),
                   src, "expert groups (n_group, topk_group, num_experts_per_tok)")) < 0 ||
        (r = check(cfg.n_routed_experts == 0 || cfg.n_routed_experts / cfg.n_group >= 2, src,
                   "fewer than 2 experts per group")) < 0 ||
        (r = check(cfg.first_k_dense_replace <= cfg.num_hidden_layers, src,
                   "first_k_dense_replace > num_hidden_layers")) < 0 ||
        (r = check(cfg.eos_token_id < cfg.vocab_size && cfg.bos_token_id < cfg.vocab_size, src,
                   "bos/eos token id outside the vocabulary")) < 0)
        goto out;
    *c = cfg;
out:
    cJSON_Delete(o);
    return r;
}

int dsv32_config_load(const char *path, struct dsv32_config *ret)
{
    char file[4096];
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(file, sizeof(file), "%s/config.json", path);
    else
        snprintf(file, sizeof(file), "%s", path);
    FILE *fp = fopen(file, "rb");
    if (!fp)
        return dsv32_load_fail(-errno, "%s: cannot open: %s", file, strerror(errno));
    char *buf = malloc(CONFIG_MAX_BYTES + 1);
    if (!buf) {
        fclose(fp);
        return -ENOMEM;
    }
    size_t n = fread(buf, 1, CONFIG_MAX_BYTES + 1, fp);
    fclose(fp);
    if (n > CONFIG_MAX_BYTES) {
        free(buf);
        return dsv32_load_fail(DSV32_ECONFIG, "%s: larger than %d bytes", file, CONFIG_MAX_BYTES);
    }
    buf[n] = 0;
    int r = dsv32_config_parse(buf, file, ret);
    free(buf);
    return r;
}

double dsv32_config_softmax_scale(const struct dsv32_config *c)
{
    /* the reference's Python arithmetic, in its order: qk_head_dim ** -0.5 * mscale * mscale */
    double s = pow((double)dsv32_config_qk_head_dim(c), -0.5);
    if (c->yarn && c->max_position_embeddings > c->original_max_position_embeddings &&
        c->rope_factor > 1.0) {
        double m = 0.1 * c->mscale_all_dim * log(c->rope_factor) + 1.0;
        s = s * m * m;
    }
    return s;
}
