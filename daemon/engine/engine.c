/* The forward pass of DeepSeek-V3.2 over a batch of sequences, written once against the backend
 * ops (backend.h). Per layer: RMSNorm, MLA with its low-rank q and kv paths (FP8 latent cache),
 * the DSA lightning indexer choosing which cached positions each row attends to, absorbed MLA
 * over those positions, then a dense FFN or the MoE (noaux_tc router, shared expert, routed
 * experts locally or through a hook for expert parallelism). */
#include "engine.h"

#include "error.h"
#include "log.h"
#include "safetensors.h" /* dsv32_load_fail */

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(expr)                                                                                \
    do {                                                                                           \
        int r_ = (expr);                                                                           \
        if (r_ < 0) {                                                                              \
            log_debug("%s failed: %s", #expr, dsv32_strerror(r_));                                 \
            return r_;                                                                             \
        }                                                                                          \
    } while (0)

static void for_each_weight(struct dsv32_model *m,
                            int (*fn)(struct dsv32_backend *, struct dsv32_weight *),
                            void (*rel)(struct dsv32_backend *, struct dsv32_weight *),
                            struct dsv32_backend *be, int *ret)
{
    const struct dsv32_config *c = &m->cfg;
    struct dsv32_weight *top[] = {&m->embed, &m->norm, &m->head};
    for (size_t i = 0; i < 3; i++) {
        if (!dsv32_weight_loaded(top[i]))
            continue;
        if (fn && *ret >= 0)
            *ret = fn(be, top[i]);
        if (rel)
            rel(be, top[i]);
    }
    for (int l = 0; l < c->num_hidden_layers; l++) {
        struct dsv32_layer_weights *L = &m->layers[l];
        struct dsv32_weight *ws[] = {&L->attn_norm, &L->ffn_norm, &L->wq_a, &L->q_norm, &L->wq_b,
                                     &L->wkv_a, &L->kv_norm, &L->wkv_b, &L->wo, &L->idx_wq_b,
                                     &L->idx_wk, &L->idx_k_norm_w, &L->idx_k_norm_b,
                                     &L->idx_weights_proj, &L->gate, &L->gate_bias,
                                     &L->dense.w1, &L->dense.w2, &L->dense.w3, &L->shared.w1,
                                     &L->shared.w2, &L->shared.w3};
        for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++) {
            if (!dsv32_weight_loaded(ws[i]))
                continue;
            if (fn && *ret >= 0)
                *ret = fn(be, ws[i]);
            if (rel)
                rel(be, ws[i]);
        }
        for (int e = 0; L->experts && e < c->n_routed_experts; e++) {
            struct dsv32_weight *ew[] = {&L->experts[e].w1, &L->experts[e].w2, &L->experts[e].w3};
            for (int i = 0; i < 3; i++) {
                if (!dsv32_weight_loaded(ew[i]))
                    continue;
                if (fn && *ret >= 0)
                    *ret = fn(be, ew[i]);
                if (rel)
                    rel(be, ew[i]);
            }
        }
    }
}

int dsv32_model_prepare(struct dsv32_model *m, struct dsv32_backend *be)
{
    int r = 0;
    for_each_weight(m, be->ops->prepare_weight, NULL, be, &r);
    return r;
}

void dsv32_model_release(struct dsv32_model *m, struct dsv32_backend *be)
{
    int dummy = 0;
    for_each_weight(m, NULL, be->ops->release_weight, be, &dummy);
}

void dsv32_engine_free(struct dsv32_engine *e)
{
    if (!e)
        return;
    if (e->be) {
        int dummy = 0;
        if (e->model)
            for_each_weight(e->model, NULL, e->be->ops->release_weight, e->be, &dummy);
        void *dev[] = {e->x, e->xn, e->qr, e->q, e->kva, e->kvn, e->qlat, e->olat, e->ov, e->o,
                       e->iq, e->ik, e->iw, e->g, e->u, e->y, e->logits, e->iq8, e->ik8, e->iqs,
                       e->iks, e->wts, e->sel, e->ids, e->d_tokens, e->d_pos, e->d_seq,
                       e->d_blocks, e->d_logit_rows, e->d_slot, e->d_mha};
        for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
            if (dev[i])
                e->be->ops->dealloc(e->be, dev[i]);
    }
    dsv32_kv_free(e->kv);
    dsv32_backend_free(e->be);
    void *host[] = {e->h_tokens,  e->h_pos,      e->h_seq,       e->h_blocks,   e->h_logit_rows,
                    e->h_sel,     e->h_ids,      e->h_slot,      e->h_x,        e->h_wts,
                    e->h_old_len, e->h_mha,      e->h_draw_rows, e->h_draw_tok, e->h_draws,
                    e->h_draw_lp, e->h_draw_row, e->h_draw_work};
    for (size_t i = 0; i < sizeof(host) / sizeof(host[0]); i++)
        free(host[i]);
    free(e);
}

static int dev_alloc(struct dsv32_engine *e, void **p, size_t bytes)
{
    *p = e->be->ops->alloc(e->be, bytes ? bytes : 64);
    return *p ? 0 : -ENOMEM;
}

int dsv32_engine_new(struct dsv32_model *m, const struct dsv32_engine_opts *opts,
                     struct dsv32_engine **ret)
{
    static const struct dsv32_engine_opts defaults;
    const struct dsv32_engine_opts *o = opts ? opts : &defaults;
    const struct dsv32_config *c = &m->cfg;
    struct dsv32_engine *e = calloc(1, sizeof(*e));
    int r;
    if (!e)
        return -ENOMEM;
    e->model = m;
    e->cfg = c;
    e->max_rows = o->max_batch_tokens > 0 ? o->max_batch_tokens : 1024;
    int max_seqs = o->max_seqs > 0 ? o->max_seqs : 64;
    int max_len = o->max_seq_len > 0 ? o->max_seq_len : c->max_position_embeddings;
    if (!o->max_seq_len && max_len > 32768)
        max_len = 32768;
    if (max_len > c->max_position_embeddings) {
        r = dsv32_load_fail(-EINVAL, "max_seq_len %d exceeds the model's context of %d", max_len,
                            c->max_position_embeddings);
        goto fail;
    }
    struct dsv32_kv_geom geom;
    dsv32_kv_geom_init(&geom, c, o->kv_rope_f32);
    int64_t block_bytes = dsv32_kv_block_bytes(&geom, c->num_hidden_layers);
    int64_t blocks = o->kv_blocks;
    if (blocks <= 0) {
        blocks = (int64_t)max_seqs * ((max_len + DSV32_KV_BLOCK_TOKENS - 1) / DSV32_KV_BLOCK_TOKENS);
        if (blocks * block_bytes > (1ll << 30))
            blocks = (1ll << 30) / block_bytes;
        if (blocks < 1)
            blocks = 1;
    }
    if ((r = dsv32_backend_new(o->backend, c, &geom, o->gpu, &e->be)) < 0) {
        dsv32_load_fail(r, "backend '%s': %s", o->backend ? o->backend : "cpu", dsv32_strerror(r));
        goto fail;
    }
    r = 0;
    for_each_weight(m, e->be->ops->prepare_weight, NULL, e->be, &r);
    if (r < 0) {
        dsv32_load_fail(r, "preparing weights on backend %s: %s", e->be->ops->name, dsv32_strerror(r));
        goto fail;
    }
    if ((r = dsv32_kv_new(e->be, &geom, c->num_hidden_layers, (int)blocks, max_seqs, max_len,
                          &e->kv)) < 0) {
        dsv32_load_fail(r, "KV cache of %lld blocks: %s", (long long)blocks, dsv32_strerror(r));
        goto fail;
    }

    const size_t T = (size_t)e->max_rows, D = (size_t)c->hidden_size, H = (size_t)c->num_attention_heads;
    const size_t qk = (size_t)dsv32_config_qk_head_dim(c), C = (size_t)c->kv_lora_rank;
    const size_t IH = (size_t)c->index_n_heads, K = (size_t)(c->num_experts_per_tok ? c->num_experts_per_tok : 1);
    size_t inter = (size_t)c->intermediate_size;
    if ((size_t)c->moe_intermediate_size * (size_t)c->n_shared_experts > inter)
        inter = (size_t)c->moe_intermediate_size * (size_t)c->n_shared_experts;
    e->max_logit_rows = e->max_rows < 512 ? e->max_rows : 512;
    const size_t F = sizeof(float);
    struct { void **p; size_t bytes; } bufs[] = {
        {(void **)&e->x, T * D * F},
        {(void **)&e->xn, T * D * F},
        {(void **)&e->qr, T * (size_t)c->q_lora_rank * F},
        {(void **)&e->q, T * H * qk * F},
        {(void **)&e->kva, T * (C + (size_t)c->qk_rope_head_dim) * F},
        {(void **)&e->kvn, T * C * F},
        {(void **)&e->qlat, T * H * C * F},
        {(void **)&e->olat, T * H * C * F},
        {(void **)&e->ov, T * H * (size_t)c->v_head_dim * F},
        {(void **)&e->o, T * D * F},
        {(void **)&e->iq, T * IH * 128 * F},
        {(void **)&e->ik, T * 128 * F},
        {(void **)&e->iw, T * IH * F},
        {(void **)&e->g, T * inter * F},
        {(void **)&e->u, T * inter * F},
        {(void **)&e->y, T * D * F},
        {(void **)&e->logits, (size_t)e->max_logit_rows * (size_t)c->vocab_size * F},
        {(void **)&e->iq8, T * IH * 128},
        {(void **)&e->ik8, T * 128},
        {(void **)&e->iqs, T * IH * F},
        {(void **)&e->iks, T * F},
        {(void **)&e->wts, T * K * F},
        {(void **)&e->sel, T * (size_t)c->index_topk * sizeof(int32_t)},
        {(void **)&e->ids, T * K * sizeof(int32_t)},
        {(void **)&e->d_tokens, T * sizeof(int32_t)},
        {(void **)&e->d_pos, T * sizeof(int32_t)},
        {(void **)&e->d_seq, T * sizeof(int32_t)},
        {(void **)&e->d_blocks, (size_t)max_seqs * e->kv->max_blocks_per_seq * sizeof(int32_t)},
        {(void **)&e->d_logit_rows, T * sizeof(int32_t)},
        {(void **)&e->d_slot, T * sizeof(int64_t)},
        {(void **)&e->d_mha, T},
    };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        if ((r = dev_alloc(e, bufs[i].p, bufs[i].bytes)) < 0) {
            dsv32_load_fail(r, "activation buffers for %zu rows: %s", T, dsv32_strerror(r));
            goto fail;
        }
    e->h_tokens = malloc(T * sizeof(int32_t));
    e->h_pos = malloc(T * sizeof(int32_t));
    e->h_seq = malloc(T * sizeof(int32_t));
    e->h_blocks = malloc((size_t)max_seqs * e->kv->max_blocks_per_seq * sizeof(int32_t));
    e->h_logit_rows = malloc(T * sizeof(int32_t));
    e->h_sel = malloc(T * (size_t)c->index_topk * sizeof(int32_t));
    e->h_ids = malloc(T * K * sizeof(int32_t));
    e->h_slot = malloc(T * sizeof(int64_t));
    e->h_x = malloc(T * D * F);
    e->h_wts = malloc(T * K * F);
    e->h_old_len = malloc(sizeof(int32_t) * 2 * (size_t)max_seqs);
    e->h_mha = malloc(T);
    e->h_draw_rows = malloc(sizeof(int32_t) * (size_t)max_seqs);
    e->h_draw_tok = malloc(sizeof(int32_t) * (size_t)max_seqs);
    e->h_draws = malloc(sizeof(*e->h_draws) * (size_t)max_seqs);
    e->h_draw_lp = malloc(sizeof(*e->h_draw_lp) * (size_t)max_seqs);
    e->h_draw_row = malloc(sizeof(float) * (size_t)c->vocab_size);
    e->h_draw_work = malloc(dsv32_draw_work_bytes(c->vocab_size));
    if (!e->h_draw_rows || !e->h_draw_tok || !e->h_draws || !e->h_draw_lp || !e->h_draw_row ||
        !e->h_draw_work || !e->h_old_len || !e->h_mha || !e->h_tokens || !e->h_pos || !e->h_seq ||
        !e->h_blocks || !e->h_logit_rows || !e->h_sel || !e->h_ids || !e->h_slot || !e->h_x ||
        !e->h_wts) {
        r = dsv32_load_fail(-ENOMEM, "host staging buffers: out of memory");
        goto fail;
    }
    *ret = e;
    return 0;
fail:
    dsv32_engine_free(e);
    return r;
}

/* Advances the FP8 tie probe's op counter (dtype.h): called before every op that quantizes
 * activations, whichever backend runs it, so that places get the same names on all backends. */
static inline const struct dsv32_weight *q_op(const struct dsv32_weight *w)
{
    if (dsv32_fp8_probe_cur && (!w || w->dtype == DSV32_DT_F8_E4M3))
        dsv32_fp8_probe_cur->op++;
    return w;
}

/* One layer over all rows of the step. */
static int layer_forward(struct dsv32_engine *e, int l, const struct dsv32_step_meta *meta,
                         const struct dsv32_step_hooks *hooks)
{
    struct dsv32_backend *be = e->be;
    const struct dsv32_backend_ops *ops = be->ops;
    const struct dsv32_config *c = e->cfg;
    const struct dsv32_layer_weights *L = &e->model->layers[l];
    const struct dsv32_kv_layer *kv = &e->kv->layers[l];
    const int T = meta->n_rows, D = c->hidden_size, H = c->num_attention_heads;
    const int qk = dsv32_config_qk_head_dim(c), nope = c->qk_nope_head_dim;
    const int C = c->kv_lora_rank, R = c->qk_rope_head_dim, IH = c->index_n_heads;
    const int ue = c->ue8m0;
    const float eps = c->rms_norm_eps;

    /* attention input */
    CHECK(ops->rmsnorm(be, e->xn, D, e->x, D, &L->attn_norm, T, D, eps));
    CHECK(ops->linear(be, e->qr, c->q_lora_rank, e->xn, D, T, q_op(&L->wq_a), ue));
    CHECK(ops->rmsnorm(be, e->qr, c->q_lora_rank, e->qr, c->q_lora_rank, &L->q_norm, T,
                       c->q_lora_rank, eps));
    CHECK(ops->linear(be, e->q, H * qk, e->qr, c->q_lora_rank, T, q_op(&L->wq_b), ue));
    CHECK(ops->rope(be, e->q + nope, T, H, H * qk, qk, meta->d_row_pos, 1));
    /* kv: latent (normalized, stored as FP8) and the shared rope key */
    CHECK(ops->linear(be, e->kva, C + R, e->xn, D, T, q_op(&L->wkv_a), ue));
    CHECK(ops->rmsnorm(be, e->kvn, C, e->kva, C + R, &L->kv_norm, T, C, eps));
    CHECK(ops->rope(be, e->kva + C, T, 1, C + R, 0, meta->d_row_pos, 1));
    q_op(NULL);
    CHECK(ops->kv_store(be, kv, e->kvn, C, e->kva + C, C + R, meta, ue));

    /* the lightning indexer: q from the q latent, k from x; half-split RoPE on the first R dims,
     * Hadamard, FP8; keys cached; top-k positions per row */
    CHECK(ops->linear(be, e->iq, IH * 128, e->qr, c->q_lora_rank, T, q_op(&L->idx_wq_b), ue));
    CHECK(ops->rope(be, e->iq, T, IH, IH * 128, 128, meta->d_row_pos, 0));
    CHECK(ops->linear(be, e->ik, 128, e->xn, D, T, q_op(&L->idx_wk), ue));
    CHECK(ops->layernorm(be, e->ik, 128, e->ik, 128, &L->idx_k_norm_w, &L->idx_k_norm_b, T, 128,
                         1e-6f));
    CHECK(ops->rope(be, e->ik, T, 1, 128, 0, meta->d_row_pos, 0));
    q_op(NULL);
    CHECK(ops->hadamard_quant(be, e->iq8, e->iqs, e->iq, T * IH, ue));
    q_op(NULL);
    CHECK(ops->hadamard_quant(be, e->ik8, e->iks, e->ik, T, ue));
    CHECK(ops->index_store(be, kv, e->ik8, e->iks, meta));
    CHECK(ops->linear(be, e->iw, IH, e->xn, D, T, q_op(&L->idx_weights_proj), ue));
    /* then sparse MLA in the absorbed form: q_nope through W_uk into latent space (independent
     * of the selection, so first), attention over the selected cached latents, back through
     * W_uv, then o_proj; a backend with the dsa op runs the indexer and the attention in one
     * call (side by side over chunks of rows) */
    const float sm_scale = (float)dsv32_config_softmax_scale(c);
    CHECK(ops->mla_absorb(be, e->qlat, e->q, T, &L->wkv_b));
    if (ops->dsa)
        CHECK(ops->dsa(be, e->olat, e->sel, e->iq8, e->iqs, e->iw, c->index_topk, e->qlat, e->q + nope,
                       H * qk, qk, kv, meta, sm_scale));
    else
        CHECK(ops->indexer(be, e->sel, e->iq8, e->iqs, e->iw, kv, meta, c->index_topk));
    if (hooks && hooks->selection) {
        CHECK(ops->to_host(be, e->h_sel, e->sel, sizeof(int32_t) * (size_t)T * c->index_topk));
        hooks->selection(hooks->ctx, l, e->h_sel, T, c->index_topk);
    }
    if (!ops->dsa)
        CHECK(ops->mla(be, e->olat, e->qlat, e->q + nope, H * qk, qk, e->sel, c->index_topk, kv,
                       meta, sm_scale));
    CHECK(ops->mla_expand(be, e->ov, e->olat, T, &L->wkv_b));
    if (meta->n_mha_rows > 0)
        q_op(NULL);
    if (ops->mla_prefill && meta->n_mha_rows > 0)
        CHECK(ops->mla_prefill(be, e->ov, e->q, e->sel, c->index_topk, kv, meta,
                               sm_scale, &L->wkv_b, ue));
    CHECK(ops->linear(be, e->o, D, e->ov, H * c->v_head_dim, T, q_op(&L->wo), ue));
    CHECK(ops->add(be, e->x, e->o, (size_t)T * D));

    /* FFN */
    CHECK(ops->rmsnorm(be, e->xn, D, e->x, D, &L->ffn_norm, T, D, eps));
    const struct dsv32_ffn_weights *f = L->is_moe ? &L->shared : &L->dense;
    if (L->is_moe) {
        const int K = c->num_experts_per_tok;
        CHECK(ops->moe_gate(be, e->ids, e->wts, e->xn, T, &L->gate, &L->gate_bias));
        q_op(NULL); /* the routed experts, here or on the expert shards */
        if (hooks && hooks->moe_routed) {
            CHECK(ops->to_host(be, e->h_ids, e->ids, sizeof(int32_t) * (size_t)T * K));
            CHECK(ops->to_host(be, e->h_wts, e->wts, sizeof(float) * (size_t)T * K));
            CHECK(hooks->moe_routed(hooks->ctx, l, e->y, e->xn, T, e->h_ids, e->h_wts, K));
        } else {
            CHECK(ops->moe_experts(be, e->y, e->xn, T, e->ids, e->wts, K, L->experts,
                                   c->n_routed_experts, ue));
        }
        CHECK(ops->add(be, e->x, e->y, (size_t)T * D));
    }
    if (dsv32_weight_loaded(&f->w1)) {
        const int I = (int)f->w1.rows;
        CHECK(ops->linear(be, e->g, I, e->xn, D, T, q_op(&f->w1), ue));
        CHECK(ops->linear(be, e->u, I, e->xn, D, T, q_op(&f->w3), ue));
        CHECK(ops->silu_mul(be, e->g, e->g, e->u, T, I));
        CHECK(ops->linear(be, e->o, D, e->g, I, T, q_op(&f->w2), ue));
        CHECK(ops->add(be, e->x, e->o, (size_t)T * D));
    }
    if (hooks && hooks->hidden) {
        CHECK(ops->to_host(be, e->h_x, e->x, sizeof(float) * (size_t)T * D));
        hooks->hidden(hooks->ctx, l, e->h_x, T, D);
    }
    return 0;
}

/* The step's lrow logits rows (e->logits, in the inputs' order): the inputs' draws taken where
 * they are (one sample call), the other rows copied to logits (host), runs of them at once. */
static int step_logits(struct dsv32_engine *e, const struct dsv32_seq_input *in, int n_in,
                       float *logits, int lrow)
{
    const size_t V = (size_t)e->cfg->vocab_size;
    struct dsv32_backend *be = e->be;
    int l = 0, n_draw = 0, run = -1, r;
    for (int i = 0; i < n_in; i++) {
        const int rows =
            in[i].logits == DSV32_LOGITS_ALL ? in[i].n_tokens : in[i].logits == DSV32_LOGITS_LAST;
        if (in[i].draw) {
            e->h_draw_rows[n_draw] = l;
            e->h_draws[n_draw++] = *in[i].draw;
            if (run >= 0 && (r = be->ops->to_host(be, logits + run * V, e->logits + run * V,
                                                  sizeof(float) * (size_t)(l - run) * V)) < 0)
                return r;
            run = -1;
        } else if (rows && run < 0) {
            run = l;
        }
        l += rows;
    }
    if (run >= 0 && (r = be->ops->to_host(be, logits + run * V, e->logits + run * V,
                                          sizeof(float) * (size_t)(lrow - run) * V)) < 0)
        return r;
    if (n_draw == 0)
        return 0;
    if ((r = be->ops->sample(be, e->h_draw_tok, e->h_draw_lp, e->logits, (int)V, e->h_draw_rows,
                             e->h_draws, n_draw)) < 0)
        return r;
    for (int i = 0, k = 0; i < n_in; i++)
        if (in[i].draw) {
            if (e->h_draw_tok[k] < 0) { /* left to the host (a nucleus too large for the device) */
                if ((r = be->ops->to_host(be, e->h_draw_row,
                                          e->logits + (size_t)e->h_draw_rows[k] * V,
                                          sizeof(float) * V)) < 0)
                    return r;
                e->h_draw_tok[k] =
                    dsv32_draw_row(e->h_draw_row, (int)V, in[i].draw, e->h_draw_work);
                if (in[i].draw->n_logprobs >= 0)
                    dsv32_logprobs_of(e->h_draw_row, (int)V, e->h_draw_tok[k],
                                      in[i].draw->n_logprobs, &e->h_draw_lp[k]);
            }
            *in[i].token = e->h_draw_tok[k];
            if (in[i].draw->n_logprobs >= 0)
                *in[i].lp = e->h_draw_lp[k];
            k++;
        }
    return 0;
}

int dsv32_engine_step(struct dsv32_engine *e, const struct dsv32_seq_input *in, int n_in,
                      float *logits, const struct dsv32_step_hooks *hooks)
{
    const struct dsv32_config *c = e->cfg;
    struct dsv32_kvcache *kv = e->kv;
    struct dsv32_backend *be = e->be;
    const struct dsv32_backend_ops *ops = be->ops;
    if (n_in <= 0 || n_in > kv->max_seqs)
        return -EINVAL;
    if (!dsv32_weight_loaded(&e->model->embed) || !dsv32_weight_loaded(&e->model->head))
        return DSV32_EUNSUPPORTED; /* an expert-only model cannot run a step */
    int T = 0, n_logits = 0, n_draw = 0;
    for (int i = 0; i < n_in; i++) {
        if (in[i].seq < 0 || in[i].seq >= kv->max_seqs || !kv->seq_used[in[i].seq] ||
            in[i].n_tokens <= 0)
            return -EINVAL;
        if (in[i].draw &&
            (in[i].logits != DSV32_LOGITS_LAST || !in[i].token || !ops->sample ||
             (in[i].draw->n_logprobs >= 0 && !in[i].lp) || !(in[i].draw->temperature >= 0.0f) ||
             !(in[i].draw->u >= 0.0 && in[i].draw->u < 1.0) || in[i].draw->top_k < 0 ||
             !(in[i].draw->top_p > 0.0f && in[i].draw->top_p <= 1.0f) ||
             !(in[i].draw->min_p >= 0.0f && in[i].draw->min_p < 1.0f) ||
             in[i].draw->n_logprobs > DSV32_MAX_LOGPROBS))
            return -EINVAL;
        n_draw += in[i].draw != NULL;
        for (int j = 0; j < i; j++)
            if (in[j].seq == in[i].seq)
                return -EINVAL;
        for (int t = 0; t < in[i].n_tokens; t++)
            if (in[i].tokens[t] < 0 || in[i].tokens[t] >= c->vocab_size)
                return DSV32_ETOKEN;
        T += in[i].n_tokens;
        n_logits += in[i].logits == DSV32_LOGITS_ALL ? in[i].n_tokens
                    : in[i].logits == DSV32_LOGITS_LAST ? 1 : 0;
        if (kv->seq_tokens[in[i].seq] + in[i].n_tokens > c->max_position_embeddings)
            return DSV32_ECONTEXT;
    }
    if (T > e->max_rows || n_logits > e->max_logit_rows)
        return -E2BIG;
    if (n_logits > n_draw && !logits)
        return -EINVAL;

    /* Reserve cache room for every sequence, all or nothing. */
    int32_t *old_len = e->h_old_len, *old_blocks = e->h_old_len + kv->max_seqs;
    int r = 0, reserved = 0;
    for (int i = 0; i < n_in; i++) {
        old_len[i] = kv->seq_tokens[in[i].seq];
        old_blocks[i] = kv->seq_blocks[in[i].seq];
        if ((r = dsv32_kv_seq_reserve(kv, in[i].seq, old_len[i] + in[i].n_tokens)) < 0)
            break;
        reserved++;
    }
    if (r < 0) {
        for (int i = 0; i < reserved; i++)
            dsv32_kv_seq_rollback(kv, in[i].seq, old_len[i], old_blocks[i]);
        return r;
    }

    /* Row metadata: positions, sequences, cache slots, the step's block table. */
    const int MB = kv->max_blocks_per_seq;
    int row = 0, lrow = 0, max_ctx = 0, n_mha = 0;
    for (int i = 0; i < n_in; i++) {
        const int32_t *bt = kv->block_table + (size_t)in[i].seq * MB;
        memcpy(e->h_blocks + (size_t)i * MB, bt, sizeof(int32_t) * (size_t)MB);
        for (int t = 0; t < in[i].n_tokens; t++, row++) {
            int pos = old_len[i] + t;
            e->h_tokens[row] = in[i].tokens[t];
            e->h_pos[row] = pos;
            e->h_seq[row] = i;
            e->h_mha[row] = in[i].n_tokens > 1;
            n_mha += in[i].n_tokens > 1;
            e->h_slot[row] = (int64_t)bt[pos / DSV32_KV_BLOCK_TOKENS] * DSV32_KV_BLOCK_TOKENS +
                             pos % DSV32_KV_BLOCK_TOKENS;
            if (in[i].logits == DSV32_LOGITS_ALL ||
                (in[i].logits == DSV32_LOGITS_LAST && t == in[i].n_tokens - 1))
                e->h_logit_rows[lrow++] = row;
            if (pos + 1 > max_ctx)
                max_ctx = pos + 1;
        }
    }
    struct dsv32_step_meta meta = {
        .n_rows = T, .n_seqs = n_in, .max_blocks = MB, .max_ctx = max_ctx,
        .d_row_pos = e->d_pos, .h_row_pos = e->h_pos,
        .d_row_seq = e->d_seq, .h_row_seq = e->h_seq,
        .d_blocks = e->d_blocks, .h_blocks = e->h_blocks,
        .d_row_slot = e->d_slot, .h_row_slot = e->h_slot,
        .d_row_mha = e->d_mha, .h_row_mha = e->h_mha, .n_mha_rows = n_mha,
    };
    if ((r = ops->to_device(be, e->d_tokens, e->h_tokens, sizeof(int32_t) * (size_t)T)) < 0 ||
        (r = ops->to_device(be, e->d_pos, e->h_pos, sizeof(int32_t) * (size_t)T)) < 0 ||
        (r = ops->to_device(be, e->d_seq, e->h_seq, sizeof(int32_t) * (size_t)T)) < 0 ||
        (r = ops->to_device(be, e->d_slot, e->h_slot, sizeof(int64_t) * (size_t)T)) < 0 ||
        (r = ops->to_device(be, e->d_mha, e->h_mha, (size_t)T)) < 0 ||
        (r = ops->to_device(be, e->d_blocks, e->h_blocks, sizeof(int32_t) * (size_t)n_in * MB)) < 0 ||
        (r = ops->to_device(be, e->d_logit_rows, e->h_logit_rows, sizeof(int32_t) * (size_t)lrow)) < 0)
        goto fail;

    const int D = c->hidden_size;
    if ((r = ops->embed(be, e->x, e->d_tokens, T, &e->model->embed)) < 0)
        goto fail;
    for (int l = 0; l < c->num_hidden_layers; l++)
        if ((r = layer_forward(e, l, &meta, hooks)) < 0)
            goto fail;
    if (lrow > 0) {
        r = ops->gather_rows(be, e->xn, e->x, e->d_logit_rows, lrow, D);
        if (r >= 0)
            r = ops->rmsnorm(be, e->xn, D, e->xn, D, &e->model->norm, lrow, D, c->rms_norm_eps);
        if (r >= 0)
            r = ops->linear(be, e->logits, c->vocab_size, e->xn, D, lrow, &e->model->head, 0);
        if (r >= 0)
            r = step_logits(e, in, n_in, logits, lrow);
        if (r < 0)
            goto fail;
    }
    if ((r = ops->sync(be)) < 0)
        goto fail;
    for (int i = 0; i < n_in; i++)
        kv->seq_tokens[in[i].seq] = old_len[i] + in[i].n_tokens;
    e->steps++;
    e->rows_done += T;
    return 0;
fail:
    for (int i = 0; i < n_in; i++)
        dsv32_kv_seq_rollback(kv, in[i].seq, old_len[i], old_blocks[i]);
    return r;
}
