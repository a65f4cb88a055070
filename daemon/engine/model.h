/* A DeepSeek-V3.2 model in memory: its config and every weight tensor, pointing into the mapped
 * checkpoint. Loading checks each tensor's presence, dtype and shape against the config and can
 * take a subset: some layers, some routed experts (an expert shard reads only its own), with or
 * without the attention side. Backends turn these host views into their own form (dequantized
 * f32 on the CPU, device copies on CUDA) through dsv32_backend_ops.prepare_weight. */
#ifndef DSV32_MODEL_H
#define DSV32_MODEL_H

#include <stdint.h>

#include "config.h"
#include "dtype.h"

struct dsv32_ckpt;

/* One weight matrix (rows = output features, cols = input features) or vector (rows = 1). */
struct dsv32_weight {
    const char *name;        /* checkpoint name; NULL: not loaded */
    enum dsv32_dtype dtype;  /* as stored: BF16, F32, F16 or F8_E4M3 */
    int64_t rows, cols;
    const void *data;        /* into the mapping, maybe unaligned */
    float *scale;            /* F8_E4M3 only: weight_scale_inv (ceil(rows/128), ceil(cols/128)), owned */
    void *be;                /* the backend's prepared form, owned by the backend */
};

/* Expert FFN: w1 = gate_proj, w3 = up_proj (moe_inter, D); w2 = down_proj (D, moe_inter). */
struct dsv32_ffn_weights {
    struct dsv32_weight w1, w2, w3;
};

struct dsv32_layer_weights {
    struct dsv32_weight attn_norm, ffn_norm;                 /* (D) */
    /* MLA */
    struct dsv32_weight wq_a;                                /* (q_lora, D) */
    struct dsv32_weight q_norm;                              /* (q_lora) */
    struct dsv32_weight wq_b;                                /* (H*(nope+rope), q_lora) */
    struct dsv32_weight wkv_a;                               /* (kv_lora+rope, D) */
    struct dsv32_weight kv_norm;                             /* (kv_lora) */
    struct dsv32_weight wkv_b;                               /* (H*(nope+v), kv_lora) */
    struct dsv32_weight wo;                                  /* (D, H*v) */
    /* DSA lightning indexer */
    struct dsv32_weight idx_wq_b;                            /* (IH*128, q_lora) */
    struct dsv32_weight idx_wk;                              /* (128, D) */
    struct dsv32_weight idx_k_norm_w, idx_k_norm_b;          /* (128) LayerNorm */
    struct dsv32_weight idx_weights_proj;                    /* (IH, D) */
    /* FFN: dense layers use `dense`; MoE layers gate + shared + experts */
    int is_moe;
    struct dsv32_ffn_weights dense;
    struct dsv32_weight gate;                                /* (E, D) */
    struct dsv32_weight gate_bias;                           /* (E) e_score_correction_bias */
    struct dsv32_ffn_weights shared;                         /* moe_inter * n_shared */
    struct dsv32_ffn_weights *experts;                       /* (E); .w1.name NULL if not loaded */
};

struct dsv32_model {
    struct dsv32_config cfg;
    struct dsv32_ckpt *ckpt;
    char *dir;
    struct dsv32_weight embed;                               /* (vocab, D) */
    struct dsv32_weight norm;                                /* (D) */
    struct dsv32_weight head;                                /* (vocab, D) */
    struct dsv32_layer_weights *layers;                      /* (num_hidden_layers) */
    int64_t n_weights_loaded;
    int64_t bytes_loaded;                                    /* tensor bytes referenced */
};

/* What to load. Zero-initialized means everything. */
struct dsv32_load_opts {
    int skip_attention;  /* 1: no embedding, attention, dense FFN, gate, shared, norm, head */
    int skip_experts;    /* 1: no routed experts (an attention daemon in expert-parallel mode) */
    int layer_begin, layer_end; /* [begin, end); both 0 = all layers */
    /* expert filter: NULL = all; else want_expert(ctx, layer, expert) != 0 selects */
    int (*want_expert)(void *ctx, int layer, int expert);
    void *want_ctx;
    /* progress: called after each tensor with bytes done / total estimate (may be NULL) */
    void (*progress)(void *ctx, int64_t done, int64_t total);
    void *progress_ctx;
};

/* Loads config.json and the tensors from a Hugging Face directory. On failure the message of
 * dsv32_load_error() names the file and tensor. */
int dsv32_model_load(const char *dir, const struct dsv32_load_opts *opts, struct dsv32_model **ret);
void dsv32_model_free(struct dsv32_model *m);

/* Values of a loaded weight as f32 (dequantized with its 128x128 block scales); out has
 * rows*cols floats. Used by backends to prepare weights. */
void dsv32_weight_to_f32(const struct dsv32_weight *w, float *out);
/* Rows [r0, r0+n) only. */
void dsv32_weight_rows_to_f32(const struct dsv32_weight *w, int64_t r0, int64_t n, float *out);
static inline int dsv32_weight_loaded(const struct dsv32_weight *w) { return w->name != NULL; }

#endif
