/* The model's shape and numerics, read from a Hugging Face config.json of DeepSeek-V3.2
 * (model_type deepseek_v32): every field the forward uses, YaRN rope scaling and the FP8
 * quantization_config. Unknown fields are ignored; missing required ones are errors. */
#ifndef DSV32_CONFIG_H
#define DSV32_CONFIG_H

#include <stdint.h>

struct dsv32_config {
    int vocab_size;
    int hidden_size;           /* D */
    int intermediate_size;     /* dense FFN */
    int moe_intermediate_size; /* per routed / shared expert */
    int num_hidden_layers;
    int first_k_dense_replace; /* layers [0, k) are dense */
    int moe_layer_freq;
    int num_attention_heads;   /* H */
    int n_routed_experts;
    int n_shared_experts;
    int num_experts_per_tok;
    int n_group;
    int topk_group;
    float routed_scaling_factor;
    int norm_topk_prob;
    int scoring_sigmoid; /* scoring_func: 1 sigmoid, 0 softmax */
    int q_lora_rank;
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;
    int index_n_heads;
    int index_head_dim;
    int index_topk;
    float rms_norm_eps;
    double rope_theta;
    /* rope_scaling (type yarn); yarn = 0 means plain RoPE */
    int yarn;
    double rope_factor;
    int original_max_position_embeddings;
    double beta_fast, beta_slow, mscale, mscale_all_dim;
    int max_position_embeddings;
    int bos_token_id;
    int eos_token_id;
    int tie_word_embeddings;
    int num_nextn_predict_layers;
    /* quantization_config */
    int fp8;        /* quant_method fp8: e4m3 weights with weight_scale_inv */
    int fp8_block;  /* weight_block_size (square), 128 */
    int ue8m0;      /* scale_fmt ue8m0: power-of-two activation/KV scales */
};

/* Parses config.json at PATH (a file or a directory holding one). Errors name the file and field. */
int dsv32_config_load(const char *path, struct dsv32_config *ret);
/* Parses config text (for tests); SOURCE names it in error messages. */
int dsv32_config_parse(const char *json, const char *source, struct dsv32_config *ret);

static inline int dsv32_config_is_moe_layer(const struct dsv32_config *c, int layer)
{
    return c->n_routed_experts > 0 && layer >= c->first_k_dense_replace &&
           layer % (c->moe_layer_freq > 0 ? c->moe_layer_freq : 1) == 0;
}
static inline int dsv32_config_qk_head_dim(const struct dsv32_config *c)
{
    return c->qk_nope_head_dim + c->qk_rope_head_dim;
}
/* Attention softmax scale, with YaRN's mscale^2 correction. */
double dsv32_config_softmax_scale(const struct dsv32_config *c);

#endif
