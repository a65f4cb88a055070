/* Token sampling with the controls serving users expect (vLLM / OpenAI semantics): temperature,
 * top-k, top-p, min-p, presence / frequency / repetition penalties, a per-request seed (same seed,
 * same output), and log-probabilities of the top N tokens, for generated tokens and for prompt
 * tokens (prompt_logprobs). Logprobs are those of the model's raw distribution (log-softmax of the
 * logits before penalties and temperature), as vLLM reports by default. */
#ifndef DSV32_SAMPLING_H
#define DSV32_SAMPLING_H

#include <stddef.h>
#include <stdint.h>

#define DSV32_MAX_LOGPROBS 20

struct dsv32_sampling_params {
    float temperature;        /* 0: greedy */
    float top_p;              /* (0, 1]; 1: off */
    int top_k;                /* 0: off */
    float min_p;              /* [0, 1); 0: off */
    float presence_penalty;   /* [-2, 2] */
    float frequency_penalty;  /* [-2, 2] */
    float repetition_penalty; /* (0, 2]; 1: off */
    uint64_t seed;
    int has_seed;
    int n_logprobs;           /* top-N logprobs per generated token, 0..20; -1: none */
    int n_prompt_logprobs;    /* top-N per prompt token, 0..20; -1: none */
};

/* Defaults: temperature 1, top_p 1, top_k 0, min_p 0, no penalties, no seed, no logprobs. */
void dsv32_sampling_defaults(struct dsv32_sampling_params *p);
/* 0, or -EINVAL with a message saying which parameter is out of range. */
int dsv32_sampling_validate(const struct dsv32_sampling_params *p, char *err, size_t err_len);

struct dsv32_token_logprob {
    int32_t token;
    float logprob;
};

struct dsv32_logprobs {
    struct dsv32_token_logprob chosen;                   /* the sampled (or given) token */
    int n_top;
    struct dsv32_token_logprob top[DSV32_MAX_LOGPROBS];  /* descending */
};

/* Per-sequence sampling state: the RNG and the token counts the penalties need. */
struct dsv32_sampler {
    struct dsv32_sampling_params p;
    int vocab;
    uint64_t rng[4];
    uint32_t *out_count;   /* (vocab) occurrences in the generated tokens */
    uint8_t *in_prompt;    /* (vocab) 1 if in the prompt (repetition penalty) */
    float *work;           /* (vocab) the logits with penalties */
    void *dwork;           /* dsv32_draw_work_bytes(vocab): the draw's scratch */
};

int dsv32_sampler_init(struct dsv32_sampler *s, const struct dsv32_sampling_params *p, int vocab,
                       const int32_t *prompt, int n_prompt);
void dsv32_sampler_done(struct dsv32_sampler *s);
/* Records a generated token (for the penalties); dsv32_sample does it for the tokens it returns. */
void dsv32_sampler_accept(struct dsv32_sampler *s, int32_t token);

/* Replays tokens generated earlier (failover): counts them for the penalties and advances the
 * random stream by the draws their sampling took, so the continuation equals an unbroken run. */
void dsv32_sampler_resume(struct dsv32_sampler *s, const int32_t *tokens, int n);

/* Samples the next token from raw logits (not modified). Fills lp when the request wants
 * logprobs (lp may be NULL). */
int32_t dsv32_sample(struct dsv32_sampler *s, const float *logits, struct dsv32_logprobs *lp);

/* A draw a backend can take where the logits are (its sample op, through dsv32_engine_step):
 * greedy, or one draw from softmax(x / T) over what top-k, min-p and top-p leave, with the
 * logprobs of the raw logits; dsv32_sample's arithmetic (dsv32_draw_row), so a backend's token
 * equals the host's. */
struct dsv32_draw {
    float temperature;  /* 0: greedy (the first index of the largest logit) */
    double u;           /* the draw's uniform in [0, 1) (temperature > 0) */
    int top_k;          /* 0: off */
    float top_p, min_p; /* 1 and 0: off */
    int n_logprobs;     /* -1: none; 0..20: the drawn token's logprob and the top n */
};

/* 1 when the sampler's next token is such a draw (no penalties); then dsv32_sampler_draw_params
 * gives its parameters without consuming the random stream, and dsv32_sampler_took records the
 * token the backend drew (the token counted, the stream advanced by the draw), leaving the sampler
 * as dsv32_sample would have. */
int dsv32_sampler_device_ok(const struct dsv32_sampler *s);
void dsv32_sampler_draw_params(const struct dsv32_sampler *s, struct dsv32_draw *d);
void dsv32_sampler_took(struct dsv32_sampler *s, int32_t token);

/* The draw on one row of host logits (the reference of the backends' sample op, and dsv32_sample's
 * draw after its penalties); work: dsv32_draw_work_bytes(vocab) bytes, 8-byte aligned. */
size_t dsv32_draw_work_bytes(int vocab);
int32_t dsv32_draw_row(const float *logits, int vocab, const struct dsv32_draw *d, void *work);

/* Logprob of `token` and the top n under log-softmax(logits): for prompt_logprobs. work holds
 * vocab floats. */
void dsv32_logprobs_of(const float *logits, int vocab, int32_t token, int n_top,
                       struct dsv32_logprobs *out);

#endif
