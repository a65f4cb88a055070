/* dsv32-mkmodel: writes a random-weight DeepSeek-V3.2 model directory in the Hugging Face layout
 * (config.json with the real field names, sharded model-XXXXX-of-YYYYY.safetensors with the real
 * tensor names and model.safetensors.index.json, FP8 e4m3 weights with 128x128 weight_scale_inv
 * or bf16), plus DeepSeek's real tokenizer files. Its text is meaningless: the weights are random.
 * It exists so that the whole system (loader, engine, daemons, cluster) runs end to end without
 * downloading 690 GB, and so that benchmarks can use the real layer dimensions.
 *   dsv32-mkmodel --out DIR [--shape small|tiny|v32] [--layers N] [--dense N] [--experts N]
 *                 [--bf16] [--seed S] [--tokenizer DIR] [--max-position N] */
#include "config.h"
#include "dtype.h"
#include "error.h"
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct shape {
    const char *name;
    int vocab, hidden, inter, moe_inter, layers, dense, heads, experts, shared, topk, groups,
        topk_groups, q_lora, kv_lora, nope, rope, v, idx_heads, idx_topk, max_pos, orig_pos;
    double rope_factor;
};

static const struct shape shapes[] = {
    /* the default: small enough for a laptop, with DeepSeek's real vocabulary and tokenizer */
    {"small", 129280, 256, 512, 128, 4, 1, 8, 16, 1, 4, 4, 2, 128, 128, 64, 64, 64, 16, 64, 4096,
     1024, 40.0},
    /* the golden sets' shape */
    {"tiny", 1024, 256, 512, 128, 4, 1, 8, 16, 1, 4, 4, 2, 128, 128, 64, 64, 64, 16, 16, 512, 128,
     40.0},
    /* DeepSeek-V3.2's real dimensions */
    {"v32", 129280, 7168, 18432, 2048, 61, 3, 128, 256, 1, 8, 8, 4, 1536, 512, 128, 64, 128, 64,
     2048, 163840, 4096, 40.0},
};

/* ---- random numbers ---- */

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t hash_name(const char *s, uint64_t seed)
{
    uint64_t h = 1469598103934665603ull ^ seed;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return mix(h);
}

/* ---- the tensors ---- */

enum kind { K_MATRIX, K_FLOAT, K_ONES, K_ZEROS, K_BIAS };

struct tensor {
    char name[160];
    enum kind kind;
    int64_t rows, cols; /* rows = 1 for vectors */
    int fp8;            /* K_MATRIX stored as F8_E4M3 (+ a _scale_inv companion) */
    int is_scale;       /* this entry is the companion scale of the previous one */
    float amp;          /* uniform(-amp, amp) */
};

struct plan {
    struct tensor *t;
    int n, cap;
    uint64_t seed;
};

static struct tensor *add(struct plan *p, enum kind k, int64_t rows, int64_t cols, int fp8,
                          const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static struct tensor *add(struct plan *p, enum kind k, int64_t rows, int64_t cols, int fp8,
                          const char *fmt, ...)
{
    if (p->n + 2 > p->cap) {
        p->cap = p->cap ? p->cap * 2 : 64;
        p->t = realloc(p->t, sizeof(*p->t) * (size_t)p->cap);
        if (!p->t) {
            fprintf(stderr, "dsv32-mkmodel: out of memory\n");
            exit(1);
        }
    }
    struct tensor *t = &p->t[p->n++];
    memset(t, 0, sizeof(*t));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof(t->name), fmt, ap);
    va_end(ap);
    t->kind = k;
    t->rows = rows;
    t->cols = cols;
    t->fp8 = fp8 && k == K_MATRIX;
    t->amp = (k == K_MATRIX || k == K_FLOAT) ? sqrtf(3.0f / (float)cols) : 0.01f;
    if (t->fp8) {
        struct tensor *s = &p->t[p->n++];
        *s = *t;
        snprintf(s->name, sizeof(s->name), "%.140s_scale_inv", t->name);
        s->is_scale = 1;
        s->rows = (rows + 127) / 128;
        s->cols = (cols + 127) / 128;
    }
    return t;
}

static void add_ffn(struct plan *p, const char *pre, int64_t d, int64_t inter, int fp8)
{
    add(p, K_MATRIX, inter, d, fp8, "%s.gate_proj.weight", pre);
    add(p, K_MATRIX, inter, d, fp8, "%s.up_proj.weight", pre);
    add(p, K_MATRIX, d, inter, fp8, "%s.down_proj.weight", pre);
}

static void add_layer(struct plan *p, const struct shape *s, int l, int fp8)
{
    char pre[64], ffn[96];
    const int64_t D = s->hidden, H = s->heads, qk = s->nope + s->rope;
    snprintf(pre, sizeof(pre), "model.layers.%d", l);
    add(p, K_ONES, 1, D, 0, "%s.input_layernorm.weight", pre);
    add(p, K_ONES, 1, D, 0, "%s.post_attention_layernorm.weight", pre);
    add(p, K_MATRIX, s->q_lora, D, fp8, "%s.self_attn.q_a_proj.weight", pre);
    add(p, K_ONES, 1, s->q_lora, 0, "%s.self_attn.q_a_layernorm.weight", pre);
    add(p, K_MATRIX, H * qk, s->q_lora, fp8, "%s.self_attn.q_b_proj.weight", pre);
    add(p, K_MATRIX, s->kv_lora + s->rope, D, fp8, "%s.self_attn.kv_a_proj_with_mqa.weight", pre);
    add(p, K_ONES, 1, s->kv_lora, 0, "%s.self_attn.kv_a_layernorm.weight", pre);
    add(p, K_MATRIX, H * (s->nope + s->v), s->kv_lora, fp8, "%s.self_attn.kv_b_proj.weight", pre);
    add(p, K_MATRIX, D, H * s->v, fp8, "%s.self_attn.o_proj.weight", pre);
    add(p, K_MATRIX, (int64_t)s->idx_heads * 128, s->q_lora, fp8, "%s.self_attn.indexer.wq_b.weight", pre);
    add(p, K_MATRIX, 128, D, fp8, "%s.self_attn.indexer.wk.weight", pre);
    add(p, K_ONES, 1, 128, 0, "%s.self_attn.indexer.k_norm.weight", pre);
    add(p, K_ZEROS, 1, 128, 0, "%s.self_attn.indexer.k_norm.bias", pre);
    add(p, K_FLOAT, s->idx_heads, D, 0, "%s.self_attn.indexer.weights_proj.weight", pre);
    if (l < s->dense) {
        snprintf(ffn, sizeof(ffn), "%s.mlp", pre);
        add_ffn(p, ffn, D, s->inter, fp8);
        return;
    }
    add(p, K_FLOAT, s->experts, D, 0, "%s.mlp.gate.weight", pre);
    add(p, K_BIAS, 1, s->experts, 0, "%s.mlp.gate.e_score_correction_bias", pre);
    snprintf(ffn, sizeof(ffn), "%s.mlp.shared_experts", pre);
    add_ffn(p, ffn, D, (int64_t)s->moe_inter * s->shared, fp8);
    for (int e = 0; e < s->experts; e++) {
        snprintf(ffn, sizeof(ffn), "%s.mlp.experts.%d", pre, e);
        add_ffn(p, ffn, D, s->moe_inter, fp8);
    }
}

/* FP8 weights: the block scale is the power of two at or above amp/448 (ue8m0, like DeepSeek's
 * checkpoint), and the e4m3 values are uniform within +-amp/scale. */
static float fp8_scale(float amp) { return ldexpf(1.0f, (int)ceilf(log2f(amp / 448.0f))); }

struct fill_ctx {
    const struct tensor *t;
    uint64_t seed;
};

/* Element k of a tensor is mix(s0 + (k + 1) * golden): a counter-based stream, so a chunk of the
 * file is computed from its offset alone, split over threads (OpenMP where the build has it), and
 * the bytes do not depend on the chunking or the thread count. */
#define GOLDEN_GAMMA 0x9e3779b97f4a7c15ull
static inline float unit_of(uint64_t z) /* uniform in [-1, 1) */
{
    return (float)((int64_t)(z >> 11) - (1ll << 52)) * 0x1.0p-52f;
}
static inline float unit_at(uint64_t s0, uint64_t k) { return unit_of(mix(s0 + (k + 1) * GOLDEN_GAMMA)); }

static int fill(void *vctx, int i, size_t offset, void *buf, size_t bytes)
{
    struct fill_ctx *fc = vctx;
    const struct tensor *t = &fc->t[i];
    const uint64_t s0 = hash_name(t->name, fc->seed);
    if (t->is_scale) {
        float s = fp8_scale(t->amp);
        for (size_t k = 0; k < bytes / 4; k++)
            memcpy((uint8_t *)buf + 4 * k, &s, 4);
    } else if (t->fp8) {
        const float lim = t->amp / fp8_scale(t->amp);
        uint8_t *b = buf;
        const int64_t n = (int64_t)bytes;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > (1 << 16))
#endif
        for (int64_t k = 0; k < n; k++)
            b[k] = dsv32_f32_to_fp8(unit_at(s0, offset + (uint64_t)k) * lim);
    } else if (t->kind == K_BIAS) {
        for (size_t k = 0; k < bytes / 4; k++) {
            float v = unit_at(s0, offset / 4 + k) * t->amp;
            memcpy((uint8_t *)buf + 4 * k, &v, 4);
        }
    } else {
        uint16_t *h = buf;
        const int64_t n = (int64_t)(bytes / 2);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > (1 << 16))
#endif
        for (int64_t k = 0; k < n; k++) {
            float v = t->kind == K_ONES    ? 1.0f
                      : t->kind == K_ZEROS ? 0.0f
                                           : unit_at(s0, offset / 2 + (uint64_t)k) * t->amp;
            h[k] = dsv32_f32_to_bf16(v);
        }
    }
    return 0;
}

static int write_shard(const char *dir, const char *file, const struct plan *p, int from, int to,
                       uint64_t seed)
{
    int n = to - from;
    struct dsv32_st_entry *e = calloc((size_t)(n ? n : 1), sizeof(*e));
    if (!e)
        return -ENOMEM;
    for (int i = 0; i < n; i++) {
        const struct tensor *t = &p->t[from + i];
        e[i].name = t->name;
        e[i].dtype = t->is_scale || t->kind == K_BIAS ? DSV32_DT_F32
                     : t->fp8                          ? DSV32_DT_F8_E4M3
                                                       : DSV32_DT_BF16;
        e[i].n_dims = t->rows == 1 && t->kind != K_MATRIX && t->kind != K_FLOAT ? 1 : 2;
        if (e[i].n_dims == 1) {
            e[i].shape[0] = t->cols;
        } else {
            e[i].shape[0] = t->rows;
            e[i].shape[1] = t->cols;
        }
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    struct fill_ctx fc = {.t = p->t + from, .seed = seed};
    int r = dsv32_st_write_stream(path, e, n, 32 << 20, fill, &fc);
    free(e);
    return r;
}

static int write_config(const char *dir, const struct shape *s, int fp8)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(o, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("DeepseekV32ForCausalLM"));
    cJSON_AddStringToObject(o, "model_type", "deepseek_v32");
    const struct { const char *k; double v; } nums[] = {
        {"vocab_size", s->vocab}, {"hidden_size", s->hidden}, {"intermediate_size", s->inter},
        {"moe_intermediate_size", s->moe_inter}, {"num_hidden_layers", s->layers},
        {"first_k_dense_replace", s->dense}, {"moe_layer_freq", 1},
        {"num_attention_heads", s->heads}, {"num_key_value_heads", s->heads},
        {"n_routed_experts", s->experts}, {"n_shared_experts", s->shared},
        {"num_experts_per_tok", s->topk}, {"n_group", s->groups}, {"topk_group", s->topk_groups},
        {"routed_scaling_factor", 2.5}, {"q_lora_rank", s->q_lora}, {"kv_lora_rank", s->kv_lora},
        {"qk_nope_head_dim", s->nope}, {"qk_rope_head_dim", s->rope}, {"v_head_dim", s->v},
        {"index_n_heads", s->idx_heads}, {"index_head_dim", 128}, {"index_topk", s->idx_topk},
        {"rms_norm_eps", 1e-6}, {"rope_theta", 10000.0},
        {"max_position_embeddings", s->max_pos}, {"bos_token_id", 0}, {"eos_token_id", 1},
        {"num_nextn_predict_layers", 0},
    };
    for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++)
        cJSON_AddNumberToObject(o, nums[i].k, nums[i].v);
    cJSON_AddStringToObject(o, "scoring_func", "sigmoid");
    cJSON_AddStringToObject(o, "topk_method", "noaux_tc");
    cJSON_AddBoolToObject(o, "norm_topk_prob", 1);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", 0);
    cJSON_AddStringToObject(o, "torch_dtype", "bfloat16");
    cJSON *rs = cJSON_AddObjectToObject(o, "rope_scaling");
    cJSON_AddStringToObject(rs, "type", "yarn");
    cJSON_AddNumberToObject(rs, "factor", s->rope_factor);
    cJSON_AddNumberToObject(rs, "original_max_position_embeddings", s->orig_pos);
    cJSON_AddNumberToObject(rs, "beta_fast", 32);
    cJSON_AddNumberToObject(rs, "beta_slow", 1);
    cJSON_AddNumberToObject(rs, "mscale", 1.0);
    cJSON_AddNumberToObject(rs, "mscale_all_dim", 1.0);
    if (fp8) {
        cJSON *q = cJSON_AddObjectToObject(o, "quantization_config");
        cJSON_AddStringToObject(q, "quant_method", "fp8");
        cJSON_AddStringToObject(q, "fmt", "e4m3");
        cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
        cJSON *bs = cJSON_AddArrayToObject(q, "weight_block_size");
        cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
        cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
        cJSON_AddStringToObject(q, "scale_fmt", "ue8m0");
    }
    cJSON_AddStringToObject(o, "dsv32_note", "random weights written by dsv32-mkmodel: the text "
                                             "this model generates is meaningless");
    char *txt = cJSON_Print(o);
    cJSON_Delete(o);
    char path[4096];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f || !txt) {
        free(txt);
        if (f)
            fclose(f);
        return dsv32_load_fail(-errno, "%s: cannot write", path);
    }
    fputs(txt, f);
    fputc('\n', f);
    free(txt);
    return fclose(f) == 0 ? 0 : -EIO;
}

static int copy_file(const char *from, const char *to)
{
    FILE *a = fopen(from, "rb"), *b = a ? fopen(to, "wb") : NULL;
    char buf[1 << 16];
    size_t n;
    int r = 0;
    if (!a || !b)
        r = -errno;
    while (r == 0 && (n = fread(buf, 1, sizeof(buf), a)) > 0)
        if (fwrite(buf, 1, n, b) != n)
            r = -EIO;
    if (a)
        fclose(a);
    if (b && fclose(b) != 0)
        r = -EIO;
    return r;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: dsv32-mkmodel --out DIR [--shape small|tiny|v32] [--layers N] [--dense N]\n"
               "                     [--experts N] [--bf16] [--seed S] [--tokenizer DIR]\n"
               "                     [--max-position N]\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"out", required_argument, 0, 'o'},       {"shape", required_argument, 0, 's'},
        {"layers", required_argument, 0, 'l'},    {"dense", required_argument, 0, 'd'},
        {"experts", required_argument, 0, 'e'},   {"bf16", no_argument, 0, 'b'},
        {"seed", required_argument, 0, 'S'},      {"tokenizer", required_argument, 0, 't'},
        {"max-position", required_argument, 0, 'm'}, {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *out = NULL, *shape_name = "small", *tok = DSV32_DEFAULT_TOKENIZER_DIR;
    int layers = -1, dense = -1, experts = -1, bf16 = 0, max_pos = -1, c;
    uint64_t seed = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 's': shape_name = optarg; break;
        case 'l': layers = atoi(optarg); break;
        case 'd': dense = atoi(optarg); break;
        case 'e': experts = atoi(optarg); break;
        case 'b': bf16 = 1; break;
        case 'S': seed = strtoull(optarg, NULL, 10); break;
        case 't': tok = optarg; break;
        case 'm': max_pos = atoi(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    struct shape s = {0};
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        if (strcmp(shapes[i].name, shape_name) == 0)
            s = shapes[i];
    if (!out || !s.name || optind != argc) {
        if (out && !s.name)
            fprintf(stderr, "dsv32-mkmodel: unknown --shape '%s'\n", shape_name);
        usage(stderr);
        return 2;
    }
    if (layers >= 0)
        s.layers = layers;
    if (dense >= 0)
        s.dense = dense;
    if (experts >= 0)
        s.experts = experts;
    if (max_pos > 0) {
        s.max_pos = max_pos;
        if (s.orig_pos > max_pos)
            s.orig_pos = max_pos;
    }
    if (s.layers < 1 || s.dense > s.layers || s.experts < 0 || (s.experts && s.experts % s.groups) ||
        (s.experts && s.topk > s.experts)) {
        fprintf(stderr, "dsv32-mkmodel: --layers must be >= 1, --dense <= --layers, --experts a "
                        "multiple of %d and >= %d\n", s.groups, s.topk);
        return 2;
    }
    if (mkdir(out, 0755) < 0 && errno != EEXIST) {
        fprintf(stderr, "dsv32-mkmodel: %s: %s\n", out, strerror(errno));
        return 1;
    }
    /* check the config we are about to write parses as our loader expects */
    if (write_config(out, &s, !bf16) < 0) {
        fprintf(stderr, "dsv32-mkmodel: %s\n", dsv32_load_error());
        return 1;
    }
    struct dsv32_config cfg;
    if (dsv32_config_load(out, &cfg) < 0) {
        fprintf(stderr, "dsv32-mkmodel: %s\n", dsv32_load_error());
        return 1;
    }
    int n_shards = s.layers + 1;
    char idx_path[4096];
    snprintf(idx_path, sizeof(idx_path), "%s/model.safetensors.index.json", out);
    cJSON *index = cJSON_CreateObject(), *wm = cJSON_CreateObject();
    cJSON_AddItemToObject(cJSON_AddObjectToObject(index, "metadata"), "format", cJSON_CreateString("pt"));
    cJSON_AddItemToObject(index, "weight_map", wm);
    for (int sh = 0; sh < n_shards; sh++) {
        struct plan p = {0};
        if (sh == 0) {
            add(&p, K_FLOAT, s.vocab, s.hidden, 0, "model.embed_tokens.weight")->amp = 1.0f;
            add(&p, K_ONES, 1, s.hidden, 0, "model.norm.weight");
            add(&p, K_FLOAT, s.vocab, s.hidden, 0, "lm_head.weight");
        } else {
            add_layer(&p, &s, sh - 1, !bf16);
        }
        char file[96];
        snprintf(file, sizeof(file), "model-%05d-of-%05d.safetensors", sh + 1, n_shards);
        fprintf(stderr, "\rdsv32-mkmodel: writing %s (%d tensors)   ", file, p.n);
        int r = write_shard(out, file, &p, 0, p.n, seed);
        if (r < 0) {
            fprintf(stderr, "\ndsv32-mkmodel: %s\n", dsv32_load_error());
            return 1;
        }
        for (int i = 0; i < p.n; i++)
            cJSON_AddStringToObject(wm, p.t[i].name, file);
        free(p.t);
    }
    fprintf(stderr, "\n");
    char *txt = cJSON_Print(index);
    cJSON_Delete(index);
    FILE *f = fopen(idx_path, "w");
    if (!f || !txt || fputs(txt, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "dsv32-mkmodel: %s: cannot write\n", idx_path);
        return 1;
    }
    free(txt);
    int have_tok = 0;
    if (s.vocab == 129280 && tok && *tok) {
        const char *files[] = {"tokenizer.json", "tokenizer_config.json"};
        have_tok = 1;
        for (int i = 0; i < 2; i++) {
            char from[4096], to[4096];
            snprintf(from, sizeof(from), "%s/%s", tok, files[i]);
            snprintf(to, sizeof(to), "%s/%s", out, files[i]);
            if (copy_file(from, to) < 0) {
                fprintf(stderr, "dsv32-mkmodel: warning: no tokenizer copied (%s: %s); run "
                                "deploy/setup.sh or pass --tokenizer DIR\n", from, strerror(errno));
                have_tok = 0;
                break;
            }
        }
    }
    printf("%s: DeepSeek-V3.2 shape '%s', %d layers (%d dense), %d experts, %s weights%s.\n"
           "The weights are random: the text this model generates is meaningless.\n",
           out, s.name, s.layers, s.dense, s.experts, bf16 ? "bf16" : "FP8", have_tok
           ? ", DeepSeek's tokenizer" : "");
    return 0;
}
