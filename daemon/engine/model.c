/* Loading a DeepSeek-V3.2 checkpoint into struct dsv32_model: builds the list of tensors the
 * options ask for, then finds and checks each one (presence, dtype, shape, FP8 scales). */
#include "model.h"

#include "error.h"
#include "safetensors.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum want_kind {
    WANT_MATRIX, /* a linear weight: float dtype, or F8_E4M3 + weight_scale_inv */
    WANT_VECTOR, /* norm weights and biases: float dtype, 1-D */
    WANT_FLOAT_MATRIX, /* float dtype only (embedding, head, router gate, weights_proj) */
};

struct want {
    char name[160];
    struct dsv32_weight *w;
    enum want_kind kind;
    int64_t rows, cols;
};

struct plan {
    struct want *v;
    int n, cap;
};

static int plan_add(struct plan *p, struct dsv32_weight *w, enum want_kind kind, int64_t rows,
                    int64_t cols, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static int plan_add(struct plan *p, struct dsv32_weight *w, enum want_kind kind, int64_t rows,
                    int64_t cols, const char *fmt, ...)
{
    if (p->n == p->cap) {
        int cap = p->cap ? p->cap * 2 : 256;
        struct want *v = realloc(p->v, sizeof(*v) * (size_t)cap);
        if (!v)
            return -ENOMEM;
        p->v = v;
        p->cap = cap;
    }
    struct want *x = &p->v[p->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->name, sizeof(x->name), fmt, ap);
    va_end(ap);
    x->w = w;
    x->kind = kind;
    x->rows = rows;
    x->cols = cols;
    return 0;
}

static int is_float(enum dsv32_dtype dt)
{
    return dt == DSV32_DT_F32 || dt == DSV32_DT_BF16 || dt == DSV32_DT_F16;
}

static int load_one(struct dsv32_model *m, const struct want *x)
{
    const struct dsv32_st_tensor *t;
    int r = dsv32_ckpt_get(m->ckpt, x->name, &t);
    if (r < 0)
        return r;
    int64_t rows = t->n_dims == 2 ? t->shape[0] : 1;
    int64_t cols = t->n_dims == 2 ? t->shape[1] : (t->n_dims == 1 ? t->shape[0] : -1);
    int want_dims = x->kind == WANT_VECTOR ? 1 : 2;
    if (t->n_dims != want_dims || rows != x->rows || cols != x->cols) {
        char got[64] = "", exp[64];
        for (int d = 0; d < t->n_dims; d++)
            snprintf(got + strlen(got), sizeof(got) - strlen(got), d ? ", %lld" : "%lld",
                     (long long)t->shape[d]);
        if (want_dims == 1)
            snprintf(exp, sizeof(exp), "%lld", (long long)x->cols);
        else
            snprintf(exp, sizeof(exp), "%lld, %lld", (long long)x->rows, (long long)x->cols);
        return dsv32_load_fail(DSV32_ESHAPE, "%s: tensor '%s' has shape [%s], the config implies [%s]",
                               t->file, x->name, got, exp);
    }
    int fp8 = t->dtype == DSV32_DT_F8_E4M3;
    if (!(is_float(t->dtype) || (fp8 && x->kind == WANT_MATRIX)))
        return dsv32_load_fail(DSV32_EDTYPE, "%s: tensor '%s' has dtype %s, expected %s", t->file,
                               x->name, t->dtype_name,
                               x->kind == WANT_MATRIX ? "F32, BF16, F16 or F8_E4M3" : "F32, BF16 or F16");
    struct dsv32_weight *w = x->w;
    w->dtype = t->dtype;
    w->rows = rows;
    w->cols = cols;
    w->data = t->data;
    w->scale = NULL;
    if (fp8) {
        char sname[192];
        snprintf(sname, sizeof(sname), "%.*s_scale_inv", (int)(strlen(x->name)), x->name);
        const struct dsv32_st_tensor *s;
        if ((r = dsv32_ckpt_get(m->ckpt, sname, &s)) < 0)
            return dsv32_load_fail(DSV32_EMISSING, "%s: FP8 tensor '%s' has no '%s'", t->file,
                                   x->name, sname);
        int64_t sr = (rows + 127) / 128, sc = (cols + 127) / 128;
        if (s->n_dims != 2 || s->shape[0] != sr || s->shape[1] != sc)
            return dsv32_load_fail(DSV32_ESHAPE, "%s: tensor '%s' must have shape [%lld, %lld]",
                                   s->file, sname, (long long)sr, (long long)sc);
        if (!is_float(s->dtype))
            return dsv32_load_fail(DSV32_EDTYPE, "%s: tensor '%s' has dtype %s, expected F32",
                                   s->file, sname, s->dtype_name);
        w->scale = malloc(sizeof(float) * (size_t)(sr * sc));
        if (!w->scale)
            return -ENOMEM;
        struct dsv32_weight sw = {.name = sname, .dtype = s->dtype, .rows = sr, .cols = sc,
                                  .data = s->data};
        dsv32_weight_to_f32(&sw, w->scale);
        m->bytes_loaded += (int64_t)s->n_bytes;
    }
    w->name = strdup(x->name);
    if (!w->name)
        return -ENOMEM;
    m->n_weights_loaded++;
    m->bytes_loaded += (int64_t)t->n_bytes;
    return 0;
}

static int plan_ffn(struct plan *p, struct dsv32_ffn_weights *f, int64_t d, int64_t inter,
                    const char *prefix)
{
    int r;
    if ((r = plan_add(p, &f->w1, WANT_MATRIX, inter, d, "%s.gate_proj.weight", prefix)) < 0 ||
        (r = plan_add(p, &f->w3, WANT_MATRIX, inter, d, "%s.up_proj.weight", prefix)) < 0 ||
        (r = plan_add(p, &f->w2, WANT_MATRIX, d, inter, "%s.down_proj.weight", prefix)) < 0)
        return r;
    return 0;
}

static int build_plan(struct dsv32_model *m, const struct dsv32_load_opts *o, struct plan *p)
{
    const struct dsv32_config *c = &m->cfg;
    const int64_t D = c->hidden_size, H = c->num_attention_heads;
    int r;
    int lb = o->layer_begin, le = o->layer_end ? o->layer_end : c->num_hidden_layers;
    if (lb < 0 || le > c->num_hidden_layers || lb > le)
        return dsv32_load_fail(-EINVAL, "layer range [%d, %d) outside the model's %d layers", lb,
                               le, c->num_hidden_layers);
    if (!o->skip_attention) {
        if ((r = plan_add(p, &m->embed, WANT_FLOAT_MATRIX, c->vocab_size, D,
                          "model.embed_tokens.weight")) < 0 ||
            (r = plan_add(p, &m->norm, WANT_VECTOR, 1, D, "model.norm.weight")) < 0)
            return r;
        if (!c->tie_word_embeddings &&
            (r = plan_add(p, &m->head, WANT_FLOAT_MATRIX, c->vocab_size, D, "lm_head.weight")) < 0)
            return r;
    }
    for (int l = lb; l < le; l++) {
        struct dsv32_layer_weights *L = &m->layers[l];
        char pre[64];
        snprintf(pre, sizeof(pre), "model.layers.%d", l);
        L->is_moe = dsv32_config_is_moe_layer(c, l);
        if (!o->skip_attention) {
            const int64_t qk = dsv32_config_qk_head_dim(c), IH = c->index_n_heads,
                          ID = c->index_head_dim;
            if ((r = plan_add(p, &L->attn_norm, WANT_VECTOR, 1, D, "%s.input_layernorm.weight", pre)) < 0 ||
                (r = plan_add(p, &L->ffn_norm, WANT_VECTOR, 1, D, "%s.post_attention_layernorm.weight", pre)) < 0 ||
                (r = plan_add(p, &L->wq_a, WANT_MATRIX, c->q_lora_rank, D, "%s.self_attn.q_a_proj.weight", pre)) < 0 ||
                (r = plan_add(p, &L->q_norm, WANT_VECTOR, 1, c->q_lora_rank, "%s.self_attn.q_a_layernorm.weight", pre)) < 0 ||
                (r = plan_add(p, &L->wq_b, WANT_MATRIX, H * qk, c->q_lora_rank, "%s.self_attn.q_b_proj.weight", pre)) < 0 ||
                (r = plan_add(p, &L->wkv_a, WANT_MATRIX, c->kv_lora_rank + c->qk_rope_head_dim, D, "%s.self_attn.kv_a_proj_with_mqa.weight", pre)) < 0 ||
                (r = plan_add(p, &L->kv_norm, WANT_VECTOR, 1, c->kv_lora_rank, "%s.self_attn.kv_a_layernorm.weight", pre)) < 0 ||
                (r = plan_add(p, &L->wkv_b, WANT_MATRIX, H * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank, "%s.self_attn.kv_b_proj.weight", pre)) < 0 ||
                (r = plan_add(p, &L->wo, WANT_MATRIX, D, H * c->v_head_dim, "%s.self_attn.o_proj.weight", pre)) < 0 ||
                (r = plan_add(p, &L->idx_wq_b, WANT_MATRIX, IH * ID, c->q_lora_rank, "%s.self_attn.indexer.wq_b.weight", pre)) < 0 ||
                (r = plan_add(p, &L->idx_wk, WANT_MATRIX, ID, D, "%s.self_attn.indexer.wk.weight", pre)) < 0 ||
                (r = plan_add(p, &L->idx_k_norm_w, WANT_VECTOR, 1, ID, "%s.self_attn.indexer.k_norm.weight", pre)) < 0 ||
                (r = plan_add(p, &L->idx_k_norm_b, WANT_VECTOR, 1, ID, "%s.self_attn.indexer.k_norm.bias", pre)) < 0 ||
                (r = plan_add(p, &L->idx_weights_proj, WANT_FLOAT_MATRIX, IH, D, "%s.self_attn.indexer.weights_proj.weight", pre)) < 0)
                return r;
            char ffn[96];
            snprintf(ffn, sizeof(ffn), "%s.mlp", pre);
            if (!L->is_moe) {
                if ((r = plan_ffn(p, &L->dense, D, c->intermediate_size, ffn)) < 0)
                    return r;
            } else {
                if ((r = plan_add(p, &L->gate, WANT_FLOAT_MATRIX, c->n_routed_experts, D, "%s.mlp.gate.weight", pre)) < 0)
                    return r;
                /* noaux_tc routing: the selection bias is part of every MoE layer */
                if ((r = plan_add(p, &L->gate_bias, WANT_VECTOR, 1, c->n_routed_experts,
                                  "%s.mlp.gate.e_score_correction_bias", pre)) < 0)
                    return r;
                if (c->n_shared_experts > 0) {
                    snprintf(ffn, sizeof(ffn), "%s.mlp.shared_experts", pre);
                    if ((r = plan_ffn(p, &L->shared, D,
                                      (int64_t)c->moe_intermediate_size * c->n_shared_experts, ffn)) < 0)
                        return r;
                }
            }
        }
        if (L->is_moe && !o->skip_experts) {
            for (int e = 0; e < c->n_routed_experts; e++) {
                if (o->want_expert && !o->want_expert(o->want_ctx, l, e))
                    continue;
                char ex[96];
                snprintf(ex, sizeof(ex), "%s.mlp.experts.%d", pre, e);
                if ((r = plan_ffn(p, &L->experts[e], D, c->moe_intermediate_size, ex)) < 0)
                    return r;
            }
        }
    }
    return 0;
}

int dsv32_model_load(const char *dir, const struct dsv32_load_opts *opts, struct dsv32_model **ret)
{
    static const struct dsv32_load_opts all;
    const struct dsv32_load_opts *o = opts ? opts : &all;
    struct plan p = {0};
    struct dsv32_model *m = calloc(1, sizeof(*m));
    int r;
    if (!m)
        return -ENOMEM;
    if ((r = dsv32_config_load(dir, &m->cfg)) < 0)
        goto fail;
    m->dir = strdup(dir);
    m->layers = calloc((size_t)m->cfg.num_hidden_layers, sizeof(*m->layers));
    if (!m->dir || !m->layers) {
        r = -ENOMEM;
        goto fail;
    }
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        if (!dsv32_config_is_moe_layer(&m->cfg, l))
            continue;
        m->layers[l].experts = calloc((size_t)m->cfg.n_routed_experts, sizeof(struct dsv32_ffn_weights));
        if (!m->layers[l].experts) {
            r = -ENOMEM;
            goto fail;
        }
    }
    if ((r = dsv32_ckpt_open(dir, &m->ckpt)) < 0)
        goto fail;
    if ((r = build_plan(m, o, &p)) < 0)
        goto fail;
    for (int i = 0; i < p.n; i++) {
        if ((r = load_one(m, &p.v[i])) < 0)
            goto fail;
        if (o->progress)
            o->progress(o->progress_ctx, i + 1, p.n);
    }
    if (m->cfg.tie_word_embeddings && dsv32_weight_loaded(&m->embed)) {
        m->head = m->embed;
        m->head.name = strdup(m->embed.name);
        if (!m->head.name) {
            r = -ENOMEM;
            goto fail;
        }
    }
    free(p.v);
    *ret = m;
    return 0;
fail:
    free(p.v);
    dsv32_model_free(m);
    return r;
}

static void weight_done(struct dsv32_weight *w)
{
    free((char *)w->name);
    free(w->scale);
    w->name = NULL;
    w->scale = NULL;
}

static void ffn_done(struct dsv32_ffn_weights *f)
{
    weight_done(&f->w1);
    weight_done(&f->w2);
    weight_done(&f->w3);
}

void dsv32_model_free(struct dsv32_model *m)
{
    if (!m)
        return;
    weight_done(&m->embed);
    weight_done(&m->norm);
    weight_done(&m->head);
    for (int l = 0; m->layers && l < m->cfg.num_hidden_layers; l++) {
        struct dsv32_layer_weights *L = &m->layers[l];
        struct dsv32_weight *ws[] = {&L->attn_norm, &L->ffn_norm, &L->wq_a, &L->q_norm, &L->wq_b,
                                     &L->wkv_a, &L->kv_norm, &L->wkv_b, &L->wo, &L->idx_wq_b,
                                     &L->idx_wk, &L->idx_k_norm_w, &L->idx_k_norm_b,
                                     &L->idx_weights_proj, &L->gate, &L->gate_bias};
        for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++)
            weight_done(ws[i]);
        ffn_done(&L->dense);
        ffn_done(&L->shared);
        if (L->experts)
            for (int e = 0; e < m->cfg.n_routed_experts; e++)
                ffn_done(&L->experts[e]);
        free(L->experts);
    }
    free(m->layers);
    dsv32_ckpt_close(m->ckpt);
    free(m->dir);
    free(m);
}

static float load_elem(const struct dsv32_weight *w, int64_t i)
{
    const uint8_t *p = w->data;
    switch (w->dtype) {
    case DSV32_DT_F32: {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    case DSV32_DT_BF16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return dsv32_bf16_to_f32(h);
    }
    case DSV32_DT_F16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return dsv32_f16_to_f32(h);
    }
    case DSV32_DT_F8_E4M3:
        return dsv32_fp8_to_f32(p[i]);
    default:
        return 0.0f;
    }
}

void dsv32_weight_rows_to_f32(const struct dsv32_weight *w, int64_t r0, int64_t n, float *out)
{
    const int64_t cols = w->cols, sc = (cols + 127) / 128;
    for (int64_t r = r0; r < r0 + n; r++) {
        float *o = out + (r - r0) * cols;
        for (int64_t c = 0; c < cols; c++)
            o[c] = load_elem(w, r * cols + c);
        if (w->dtype == DSV32_DT_F8_E4M3 && w->scale)
            for (int64_t c = 0; c < cols; c++)
                o[c] *= w->scale[(r / 128) * sc + c / 128];
    }
}

void dsv32_weight_to_f32(const struct dsv32_weight *w, float *out)
{
    dsv32_weight_rows_to_f32(w, 0, w->rows, out);
}
