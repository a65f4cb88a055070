/* Backend selection and what all backends share: the KV cache geometry and the RoPE tables. */
#include "backend.h"

#include "error.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

void dsv32_kv_geom_init(struct dsv32_kv_geom *g, const struct dsv32_config *cfg, int rope_f32)
{
    memset(g, 0, sizeof(*g));
    g->kv_lora = cfg->kv_lora_rank;
    g->rope = cfg->qk_rope_head_dim;
    g->rope_f32 = rope_f32;
    g->mla_rec_bytes = g->kv_lora + 4 * (g->kv_lora / 128) + g->rope * (rope_f32 ? 4 : 2);
    g->idx_block_bytes = DSV32_KV_BLOCK_TOKENS * (cfg->index_head_dim + 4);
}

int dsv32_backend_new(const char *name, const struct dsv32_config *cfg,
                      const struct dsv32_kv_geom *geom, int device, struct dsv32_backend **ret)
{
    if (!name || strcmp(name, "cpu") == 0)
        return dsv32_backend_cpu_new(cfg, geom, ret);
    if (strcmp(name, "cuda") == 0) {
#ifdef DSV32_HAVE_CUDA
        return dsv32_backend_cuda_new(cfg, geom, device, ret);
#else
        return DSV32_EUNSUPPORTED;
#endif
    }
    return -EINVAL;
}

/* DeepSeek's precompute_freqs_cis, in the reference's f32 arithmetic: base frequencies
 * 1 / theta^(2i/d); with YaRN (when the context exceeds the original one) the frequencies
 * between the beta_fast and beta_slow correction dims blend towards freq / factor. */
int dsv32_rope_table(const struct dsv32_config *cfg, int n_pos, float **ret_cos, float **ret_sin)
{
    const int dim = cfg->qk_rope_head_dim, half = dim / 2;
    float *freqs = malloc(sizeof(float) * (size_t)half);
    float *cs = malloc(sizeof(float) * (size_t)n_pos * half);
    float *sn = malloc(sizeof(float) * (size_t)n_pos * half);
    if (!freqs || !cs || !sn) {
        free(freqs);
        free(cs);
        free(sn);
        return -ENOMEM;
    }
    const float base = (float)cfg->rope_theta;
    for (int i = 0; i < half; i++)
        freqs[i] = 1.0f / powf(base, (float)(2 * i) / (float)dim);
    if (cfg->yarn && cfg->max_position_embeddings > cfg->original_max_position_embeddings) {
        const double orig = cfg->original_max_position_embeddings;
        double lo_d = dim * log(orig / (cfg->beta_fast * 2 * M_PI)) / (2 * log(cfg->rope_theta));
        double hi_d = dim * log(orig / (cfg->beta_slow * 2 * M_PI)) / (2 * log(cfg->rope_theta));
        int lo = (int)floor(lo_d), hi = (int)ceil(hi_d);
        if (lo < 0)
            lo = 0;
        if (hi > dim - 1)
            hi = dim - 1;
        float mn = (float)lo, mx = (float)hi;
        if (mn == mx)
            mx += 0.001f;
        const float factor = (float)cfg->rope_factor;
        for (int i = 0; i < half; i++) {
            float ramp = ((float)i - mn) / (mx - mn);
            ramp = ramp < 0 ? 0 : (ramp > 1 ? 1 : ramp);
            float smooth = 1.0f - ramp;
            freqs[i] = freqs[i] / factor * (1.0f - smooth) + freqs[i] * smooth;
        }
    }
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            float a = (float)p * freqs[i];
            cs[(size_t)p * half + i] = (float)cos((double)a);
            sn[(size_t)p * half + i] = (float)sin((double)a);
        }
    free(freqs);
    *ret_cos = cs;
    *ret_sin = sn;
    return 0;
}
