/* Sampling and logprobs; see sampling.h. */
#define _GNU_SOURCE 1 /* qsort_r */
#include "sampling.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

void dsv32_sampling_defaults(struct dsv32_sampling_params *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
    p->n_logprobs = -1;
    p->n_prompt_logprobs = -1;
}

int dsv32_sampling_validate(const struct dsv32_sampling_params *p, char *err, size_t n)
{
#define BAD(...)                                                                                   \
    do {                                                                                           \
        if (err)                                                                                   \
            snprintf(err, n, __VA_ARGS__);                                                         \
        return -EINVAL;                                                                            \
    } while (0)
    if (!(p->temperature >= 0.0f) || p->temperature > 100.0f)
        BAD("temperature must be in [0, 100], got %g", p->temperature);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        BAD("top_p must be in (0, 1], got %g", p->top_p);
    if (p->top_k < 0)
        BAD("top_k must be >= 0 (0 disables it), got %d", p->top_k);
    if (!(p->min_p >= 0.0f && p->min_p < 1.0f))
        BAD("min_p must be in [0, 1), got %g", p->min_p);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        BAD("presence_penalty must be in [-2, 2], got %g", p->presence_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        BAD("frequency_penalty must be in [-2, 2], got %g", p->frequency_penalty);
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 2.0f))
        BAD("repetition_penalty must be in (0, 2], got %g", p->repetition_penalty);
    if (p->n_logprobs < -1 || p->n_logprobs > DSV32_MAX_LOGPROBS)
        BAD("logprobs must be in [0, %d], got %d", DSV32_MAX_LOGPROBS, p->n_logprobs);
    if (p->n_prompt_logprobs < -1 || p->n_prompt_logprobs > DSV32_MAX_LOGPROBS)
        BAD("prompt_logprobs must be in [0, %d], got %d", DSV32_MAX_LOGPROBS, p->n_prompt_logprobs);
#undef BAD
    return 0;
}

/* xoshiro256**, seeded through splitmix64 */
static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4])
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* uniform in [0, 1) with 53 random bits */
static double rng_uniform(uint64_t s[4]) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

int dsv32_sampler_init(struct dsv32_sampler *s, const struct dsv32_sampling_params *p, int vocab,
                       const int32_t *prompt, int n_prompt)
{
    memset(s, 0, sizeof(*s));
    if (vocab <= 0)
        return -EINVAL;
    s->p = *p;
    s->vocab = vocab;
    s->out_count = calloc((size_t)vocab, sizeof(uint32_t));
    s->in_prompt = calloc((size_t)vocab, 1);
    s->work = malloc(sizeof(float) * (size_t)vocab);
    s->dwork = malloc(dsv32_draw_work_bytes(vocab));
    if (!s->out_count || !s->in_prompt || !s->work || !s->dwork) {
        dsv32_sampler_done(s);
        return -ENOMEM;
    }
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] >= 0 && prompt[i] < vocab)
            s->in_prompt[prompt[i]] = 1;
    uint64_t seed = p->seed;
    if (!p->has_seed && getrandom(&seed, sizeof(seed), 0) != sizeof(seed))
        seed = (uint64_t)(uintptr_t)s ^ 0x5eed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&seed);
    return 0;
}

void dsv32_sampler_done(struct dsv32_sampler *s)
{
    if (!s)
        return;
    free(s->out_count);
    free(s->in_prompt);
    free(s->work);
    free(s->dwork);
    memset(s, 0, sizeof(*s));
}

void dsv32_sampler_accept(struct dsv32_sampler *s, int32_t token)
{
    if (token >= 0 && token < s->vocab && s->out_count[token] < UINT32_MAX)
        s->out_count[token]++;
}

static int has_penalties(const struct dsv32_sampling_params *p)
{
    return p->repetition_penalty != 1.0f || p->frequency_penalty != 0.0f ||
           p->presence_penalty != 0.0f;
}

static int sampler_draws(const struct dsv32_sampling_params *p)
{
    return !(p->temperature == 0.0f || p->top_k == 1);
}

void dsv32_sampler_resume(struct dsv32_sampler *s, const int32_t *tokens, int n)
{
    for (int i = 0; i < n; i++) {
        dsv32_sampler_accept(s, tokens[i]);
        if (sampler_draws(&s->p))
            (void)rng_next(s->rng);
    }
}

/* Keeps the top `n` entries (by value, then lower index) in a descending array of size <= cap. */
static void top_insert(struct dsv32_token_logprob *top, int *n, int cap, int32_t tok, float v)
{
    if (cap <= 0 || (*n == cap && !(v > top[cap - 1].logprob)))
        return;
    int i = *n < cap ? (*n)++ : cap - 1;
    while (i > 0 && v > top[i - 1].logprob) {
        top[i] = top[i - 1];
        i--;
    }
    top[i].token = tok;
    top[i].logprob = v;
}

void dsv32_logprobs_of(const float *logits, int vocab, int32_t token, int n_top,
                       struct dsv32_logprobs *out)
{
    float mx = -INFINITY;
    for (int v = 0; v < vocab; v++)
        mx = logits[v] > mx ? logits[v] : mx;
    double sum = 0.0;
    for (int v = 0; v < vocab; v++)
        sum += exp((double)logits[v] - mx);
    const float lse = mx + (float)log(sum);
    out->n_top = 0;
    if (n_top > DSV32_MAX_LOGPROBS)
        n_top = DSV32_MAX_LOGPROBS;
    for (int v = 0; v < vocab; v++)
        top_insert(out->top, &out->n_top, n_top, v, logits[v]);
    for (int i = 0; i < out->n_top; i++)
        out->top[i].logprob -= lse;
    out->chosen.token = token;
    out->chosen.logprob = (token >= 0 && token < vocab) ? logits[token] - lse : -INFINITY;
}

/* the first index of the largest value (the best so far in a register: no reload per element) */
static int32_t argmax(const float *x, int n)
{
    int32_t best = 0;
    float bv = x[0];
    for (int v = 1; v < n; v++)
        if (x[v] > bv) {
            bv = x[v];
            best = v;
        }
    return best;
}

/* e^x for x <= 0, four at a time in GCC/Clang vector arithmetic (libm's expf is a call per
 * element, and the compiler does not vectorize the bit tricks of a scalar version): Cody-Waite
 * reduction x = n ln2 + r, |r| <= ln2/2, Cephes' polynomial for e^r (about 1 ulp), 2^n built in
 * the exponent bits. x below -87 is taken as -87 (e^-87 ~ 1.6e-38: nothing next to the maximum's
 * e^0 = 1). The scalar tail goes through the same lanes, so every element gets the same
 * arithmetic. */
typedef float v4sf __attribute__((vector_size(16)));
typedef int32_t v4si __attribute__((vector_size(16)));

static inline v4sf exp_le0_v4(v4sf x)
{
    const v4sf lo = {-87.0f, -87.0f, -87.0f, -87.0f};
    const v4si below = x < lo;
    x = (v4sf)(((v4si)lo & below) | ((v4si)x & ~below));
    const v4sf n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const v4sf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v4sf q = r * 1.9875691500e-4f + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    const v4sf er = q * r * r + r + 1.0f;
    const v4si ni = __builtin_convertvector(n, v4si);
    return er * (v4sf)((ni + 127) << 23);
}

/* The canonical order of the candidates: the larger logit first, then the lower token id, as one
 * 64-bit key (the larger key first; keys are distinct) */
static inline uint64_t rank_key(float w, int32_t v)
{
    uint32_t u;
    memcpy(&u, &w, sizeof(u));
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint32_t) ~(uint32_t)v;
}

static inline int32_t key_token(uint64_t k)
{
    return (int32_t) ~(uint32_t)k;
}

/* Moves the k largest of a[0..n) to the front (in no particular order). */
static void select_keys(uint64_t *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const uint64_t piv = a[lo + (hi - lo) / 2];
        size_t i = lo, j = hi;
        for (;;) {
            while (a[i] > piv)
                i++;
            while (a[j] < piv)
                j--;
            if (i >= j)
                break;
            const uint64_t t = a[i];
            a[i++] = a[j];
            a[j--] = t;
        }
        /* a[lo..j] >= piv >= a[j+1..hi] */
        if (k - 1 <= j)
            hi = j;
        else
            lo = j + 1;
    }
}

static int cmp_key_desc(const void *a, const void *b)
{
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x < y) - (x > y);
}

/* the draw's scratch: e (vocab floats, rounded up to 8 bytes), then the rank keys (vocab), then
 * the block sums (vocab / 1024 + 1 doubles) */
static size_t draw_e_bytes(int vocab)
{
    return ((size_t)vocab * sizeof(float) + 7) & ~(size_t)7;
}

size_t dsv32_draw_work_bytes(int vocab)
{
    return draw_e_bytes(vocab) + (size_t)vocab * sizeof(uint64_t) +
           ((size_t)vocab / 1024 + 1) * sizeof(double);
}

/* A draw from softmax(x / T) at the uniform u, over the candidates top_k, min_p and top_p leave:
 *  1. e_v = e^((x_v - max) / T) for every token (the maximum's e is exactly 1);
 *  2. top_k: tokens below the top_k-th in the canonical order (rank_key) get e = 0; min_p:
 *     tokens with e < min_p get e = 0 (min_p of the largest probability);
 *  3. the sums of e per block of 1024 tokens, each in four float lanes (lane l adds the block's
 *     tokens l, l + 4, ... in order), the lanes' sum in double, the blocks' total in double;
 *  4. without top_p: the walk over the block sums and inside the block that holds u * total;
 *     with it: the candidates in the canonical order, the shortest prefix whose mass (summed in
 *     that order) reaches top_p * total, and the walk over that prefix at u * its mass.
 * The cuda backend's sample kernel repeats this arithmetic operation for operation (sampling.c is
 * built without contraction into FMA); only the canonical order, not a sort's permutation, decides
 * which token a uniform picks. */
static int32_t draw_row(const float *x, int V, const struct dsv32_draw *d, uint8_t *work)
{
    enum { BLK = 1024 };
    float *e = (float *)(void *)work;
    uint64_t *keys = (uint64_t *)(void *)(work + draw_e_bytes(V));
    double *bsum = (double *)(void *)(keys + V);
    const float inv_t = 1.0f / d->temperature;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int v = 0; v < V; v++)
        mx = x[v] > mx ? x[v] : mx;
    /* without top-k or min-p, e is computed inside the block sums' loop (one pass over x) */
    const int masked = (d->top_k > 0 && d->top_k < V) || d->min_p > 0.0f;
    if (masked) {
        int v = 0;
        for (; v + 4 <= V; v += 4) {
            v4sf xv;
            memcpy(&xv, x + v, sizeof(xv));
            const v4sf ev = exp_le0_v4((xv - mx) * inv_t);
            memcpy(e + v, &ev, sizeof(ev));
        }
        if (v < V) { /* the last few: the same lanes */
            v4sf xv = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
            for (int l = 0; l < V - v; l++)
                xv[l] = x[v + l];
            const v4sf ev = exp_le0_v4((xv - mx) * inv_t);
            for (int l = 0; l < V - v; l++)
                e[v + l] = ev[l];
        }
        if (d->top_k > 0 && d->top_k < V) {
            for (int t = 0; t < V; t++)
                keys[t] = rank_key(x[t], t);
            select_keys(keys, (size_t)V, (size_t)d->top_k);
            uint64_t kth = keys[0];
            for (int i = 1; i < d->top_k; i++)
                kth = keys[i] < kth ? keys[i] : kth;
            for (int t = 0; t < V; t++)
                if (rank_key(x[t], t) < kth)
                    e[t] = 0.0f;
        }
        if (d->min_p > 0.0f)
            for (int t = 0; t < V; t++)
                if (e[t] < d->min_p)
                    e[t] = 0.0f;
    }
    const int nb = (V + BLK - 1) / BLK;
    double total = 0.0;
    for (int b = 0; b < nb; b++) {
        const int v0 = b * BLK, v1 = v0 + BLK < V ? v0 + BLK : V;
        v4sf acc = {0.0f, 0.0f, 0.0f, 0.0f};
        int t = v0;
        for (; t + 4 <= v1; t += 4) {
            v4sf ev;
            if (masked) {
                memcpy(&ev, e + t, sizeof(ev));
            } else {
                v4sf xv;
                memcpy(&xv, x + t, sizeof(xv));
                ev = exp_le0_v4((xv - mx) * inv_t);
                memcpy(e + t, &ev, sizeof(ev));
            }
            acc += ev;
        }
        if (t < v1) { /* the vocabulary's last few: the same lanes, the missing ones without mass */
            v4sf ev = {0.0f, 0.0f, 0.0f, 0.0f};
            if (masked) {
                for (int l = 0; l < v1 - t; l++)
                    ev[l] = e[t + l];
            } else {
                v4sf xv = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
                for (int l = 0; l < v1 - t; l++)
                    xv[l] = x[t + l];
                const v4sf ex = exp_le0_v4((xv - mx) * inv_t);
                for (int l = 0; l < v1 - t; l++)
                    e[t + l] = ev[l] = ex[l];
            }
            acc += ev;
        }
        bsum[b] = (double)acc[0] + acc[1] + acc[2] + acc[3];
        total += bsum[b];
    }
    if (d->top_p < 1.0f) {
        size_t n = 0;
        for (int t = 0; t < V; t++)
            if (e[t] > 0.0f)
                keys[n++] = rank_key(x[t], t);
        const double target = (double)d->top_p * total;
        /* the head of the order first: usually it holds top_p of the mass */
        size_t head = n > 1024 ? 1024 : n, m = 0;
        if (head < n)
            select_keys(keys, n, head);
        qsort(keys, head, sizeof(uint64_t), cmp_key_desc);
        double c = 0.0;
        while (m < head && c < target)
            c += e[key_token(keys[m++])];
        if (c < target && head < n) {
            qsort(keys, n, sizeof(uint64_t), cmp_key_desc);
            for (c = 0.0, m = 0; m < n && c < target;)
                c += e[key_token(keys[m++])];
        }
        const double u = d->u * c;
        double acc = 0.0;
        for (size_t i = 0; i < m; i++) {
            acc += e[key_token(keys[i])];
            if (u < acc)
                return key_token(keys[i]);
        }
        return key_token(keys[m > 0 ? m - 1 : 0]);
    }
    const double u = d->u * total;
    double cum = 0.0;
    int b = 0;
    while (b < nb - 1 && cum + bsum[b] <= u)
        cum += bsum[b++];
    const int v0 = b * BLK, v1 = v0 + BLK < V ? v0 + BLK : V;
    for (int t = v0; t < v1; t++) {
        cum += e[t];
        if (u < cum)
            return t;
    }
    /* u fell past the block's float rounding: its last token with mass */
    for (int t = v1 - 1; t >= v0; t--)
        if (e[t] > 0.0f)
            return t;
    return v1 - 1;
}

int32_t dsv32_sample(struct dsv32_sampler *s, const float *logits, struct dsv32_logprobs *lp)
{
    const struct dsv32_sampling_params *p = &s->p;
    const int V = s->vocab;
    const float *x = logits;
    if (has_penalties(p)) {
        /* as vLLM applies them: repetition over prompt and output, then frequency and presence
         * over the output */
        float *w = s->work;
        memcpy(w, logits, sizeof(float) * (size_t)V);
        for (int v = 0; v < V; v++) {
            uint32_t c = s->out_count[v];
            if (p->repetition_penalty != 1.0f && (c || s->in_prompt[v]))
                w[v] = w[v] > 0 ? w[v] / p->repetition_penalty : w[v] * p->repetition_penalty;
            if (c)
                w[v] -= p->frequency_penalty * (float)c + p->presence_penalty;
        }
        x = w;
    }
    /* the draw the backends take too: its parameters, then the stream advanced past it */
    struct dsv32_draw d;
    dsv32_sampler_draw_params(s, &d);
    const int32_t tok = dsv32_draw_row(x, V, &d, s->dwork); /* greedy on x itself: no copy */
    if (lp)
        dsv32_logprobs_of(logits, V, tok, p->n_logprobs > 0 ? p->n_logprobs : 0, lp);
    dsv32_sampler_took(s, tok);
    return tok;
}

int dsv32_sampler_device_ok(const struct dsv32_sampler *s)
{
    return !has_penalties(&s->p);
}

/* The cuda backend's sample kernel reads an uploaded array of these as it is: sample.cu asserts
 * the same layout for CUDA C++ */
_Static_assert(sizeof(struct dsv32_draw) == 32 && offsetof(struct dsv32_draw, temperature) == 0 &&
                   offsetof(struct dsv32_draw, u) == 8 &&
                   offsetof(struct dsv32_draw, top_k) == 16 &&
                   offsetof(struct dsv32_draw, top_p) == 20 &&
                   offsetof(struct dsv32_draw, min_p) == 24 &&
                   offsetof(struct dsv32_draw, n_logprobs) == 28,
               "struct dsv32_draw: the layout sample.cu expects");

void dsv32_sampler_draw_params(const struct dsv32_sampler *s, struct dsv32_draw *d)
{
    uint64_t rng[4];
    memcpy(rng, s->rng, sizeof(rng));
    d->temperature = sampler_draws(&s->p) ? s->p.temperature : 0.0f;
    d->u = sampler_draws(&s->p) ? rng_uniform(rng) : 0.0;
    d->top_k = s->p.top_k;
    d->top_p = s->p.top_p;
    d->min_p = s->p.min_p;
    d->n_logprobs = s->p.n_logprobs;
}

void dsv32_sampler_took(struct dsv32_sampler *s, int32_t token)
{
    if (sampler_draws(&s->p))
        (void)rng_next(s->rng);
    dsv32_sampler_accept(s, token);
}

int32_t dsv32_draw_row(const float *logits, int vocab, const struct dsv32_draw *d, void *work)
{
    if (d->temperature == 0.0f)
        return argmax(logits, vocab);
    return draw_row(logits, vocab, d, (uint8_t *)work);
}
