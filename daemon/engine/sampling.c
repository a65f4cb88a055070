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
    s->work = malloc(sizeof(float) * 2 * (size_t)vocab);
    s->idx = malloc(sizeof(int32_t) * (size_t)vocab);
    s->bsum = malloc(sizeof(double) * ((size_t)vocab / 1024 + 1));
    if (!s->out_count || !s->in_prompt || !s->work || !s->idx || !s->bsum) {
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
    free(s->idx);
    free(s->bsum);
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

/* Moves the k largest of w[idx[0..n)] to the front of idx. */
static void select_k(int32_t *idx, int n, int k, const float *w)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        float piv = w[idx[lo + (hi - lo) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (w[idx[i]] > piv)
                i++;
            while (w[idx[j]] < piv)
                j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i++] = idx[j];
                idx[j--] = t;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
}

static int cmp_desc(const void *a, const void *b, void *ctx)
{
    const float *w = ctx;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (w[i] != w[j])
        return w[i] > w[j] ? -1 : 1;
    return (i > j) - (i < j);
}

static void sort_desc(int32_t *idx, int n, const float *w)
{
    qsort_r(idx, (size_t)n, sizeof(int32_t), cmp_desc, (void *)w);
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

/* A draw from softmax(x / T) over the whole vocabulary at the uniform u in two passes: the
 * maximum, then e^((x - max) / T) into e with sums per block of 1024 (four float lanes, then their
 * sum in double); the cumulative sum is then walked over the block sums and inside the one block
 * that holds u * total. The same distribution as the general path below (which normalizes first),
 * not the same float rounding. The cuda backend's sample kernel repeats this arithmetic operation
 * for operation (sampling.c is built without contraction into FMA). */
static int32_t draw_full(const float *x, int V, float temperature, double u01, float *e,
                         double *bsum)
{
    enum { BLK = 1024 };
    const float inv_t = 1.0f / temperature;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int v = 0; v < V; v++)
        mx = x[v] > mx ? x[v] : mx;
    const int nb = (V + BLK - 1) / BLK;
    double total = 0.0;
    for (int b = 0; b < nb; b++) {
        const int v0 = b * BLK, v1 = v0 + BLK < V ? v0 + BLK : V;
        v4sf acc = {0.0f, 0.0f, 0.0f, 0.0f};
        int v = v0;
        for (; v + 4 <= v1; v += 4) {
            v4sf xv;
            memcpy(&xv, x + v, sizeof(xv));
            const v4sf ev = exp_le0_v4((xv - mx) * inv_t);
            memcpy(e + v, &ev, sizeof(ev));
            acc += ev;
        }
        if (v < v1) { /* the vocabulary's last few: the same lanes, the missing ones without mass */
            v4sf xv = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
            for (int l = 0; l < v1 - v; l++)
                xv[l] = x[v + l];
            v4sf ev = exp_le0_v4((xv - mx) * inv_t);
            for (int l = 0; l < 4; l++) {
                ev[l] = l < v1 - v ? ev[l] : 0.0f;
                if (l < v1 - v)
                    e[v + l] = ev[l];
            }
            acc += ev;
        }
        bsum[b] = (double)acc[0] + acc[1] + acc[2] + acc[3];
        total += bsum[b];
    }
    const double u = u01 * total;
    double cum = 0.0;
    int b = 0;
    while (b < nb - 1 && cum + bsum[b] <= u)
        cum += bsum[b++];
    const int v0 = b * BLK, v1 = v0 + BLK < V ? v0 + BLK : V;
    for (int v = v0; v < v1; v++) {
        cum += e[v];
        if (u < cum)
            return v;
    }
    /* u fell past the block's float rounding: its last token with mass */
    for (int v = v1 - 1; v >= v0; v--)
        if (e[v] > 0.0f)
            return v;
    return v1 - 1;
}

int32_t dsv32_sample(struct dsv32_sampler *s, const float *logits, struct dsv32_logprobs *lp)
{
    const struct dsv32_sampling_params *p = &s->p;
    const int V = s->vocab;
    float *w = s->work;
    const int penalties = has_penalties(p);

    int32_t tok;
    if (!sampler_draws(p) && !penalties) {
        tok = argmax(logits, V); /* greedy on the raw logits: no copy */
        goto done;
    }
    if (!penalties && p->top_k <= 0 && p->min_p <= 0.0f && p->top_p >= 1.0f) {
        /* the whole vocabulary, straight from the logits */
        tok = draw_full(logits, V, p->temperature, rng_uniform(s->rng), s->work + V, s->bsum);
        goto done;
    }
    memcpy(w, logits, sizeof(float) * (size_t)V);
    /* penalties, as vLLM applies them: repetition over prompt and output, then frequency and
     * presence over the output */
    if (penalties)
        for (int v = 0; v < V; v++) {
            uint32_t c = s->out_count[v];
            if (p->repetition_penalty != 1.0f && (c || s->in_prompt[v]))
                w[v] = w[v] > 0 ? w[v] / p->repetition_penalty : w[v] * p->repetition_penalty;
            if (c)
                w[v] -= p->frequency_penalty * (float)c + p->presence_penalty;
        }

    if (!sampler_draws(p)) {
        tok = argmax(w, V);
    } else if (p->top_k <= 0 && p->min_p <= 0.0f && p->top_p >= 1.0f) {
        /* e in the work buffer's second half (the first holds w) */
        tok = draw_full(w, V, p->temperature, rng_uniform(s->rng), s->work + V, s->bsum);
    } else {
        int32_t *idx = s->idx;
        int n = V;
        for (int v = 0; v < V; v++)
            idx[v] = v;
        const float inv_t = 1.0f / p->temperature;
        for (int v = 0; v < V; v++)
            w[v] *= inv_t;
        if (p->top_k > 0 && p->top_k < n) {
            select_k(idx, n, p->top_k, w);
            n = p->top_k;
        }
        /* probabilities over the candidates */
        float mx = -INFINITY;
        for (int i = 0; i < n; i++)
            mx = w[idx[i]] > mx ? w[idx[i]] : mx;
        float *pr = w + V; /* pr[token] */
        double sum = 0.0;
        for (int i = 0; i < n; i++)
            sum += (pr[idx[i]] = expf(w[idx[i]] - mx));
        for (int i = 0; i < n; i++)
            pr[idx[i]] = (float)(pr[idx[i]] / sum);
        if (p->min_p > 0.0f) {
            float pmax = 0.0f, cut;
            for (int i = 0; i < n; i++)
                pmax = pr[idx[i]] > pmax ? pr[idx[i]] : pmax;
            cut = p->min_p * pmax;
            int m = 0;
            for (int i = 0; i < n; i++)
                if (pr[idx[i]] >= cut)
                    idx[m++] = idx[i];
            n = m;
        }
        if (p->top_p < 1.0f) {
            /* sort only the head of the distribution when it already holds top_p of the mass */
            int head = n > 1024 ? 1024 : n;
            if (head < n)
                select_k(idx, n, head, pr);
            sort_desc(idx, head, pr);
            double c = 0.0;
            int m = 0;
            while (m < head && c < p->top_p)
                c += pr[idx[m++]];
            if (c < p->top_p && head < n) {
                sort_desc(idx, n, pr);
                c = 0.0;
                m = 0;
                while (m < n && c < p->top_p)
                    c += pr[idx[m++]];
            }
            n = m > 0 ? m : 1;
        }
        double total = 0.0;
        for (int i = 0; i < n; i++)
            total += pr[idx[i]];
        double u = rng_uniform(s->rng) * total, acc = 0.0;
        tok = idx[n - 1];
        for (int i = 0; i < n; i++) {
            acc += pr[idx[i]];
            if (u < acc) {
                tok = idx[i];
                break;
            }
        }
    }
done:
    if (lp)
        dsv32_logprobs_of(logits, V, tok, p->n_logprobs > 0 ? p->n_logprobs : 0, lp);
    dsv32_sampler_accept(s, tok);
    return tok;
}

int dsv32_sampler_device_ok(const struct dsv32_sampler *s)
{
    const struct dsv32_sampling_params *p = &s->p;
    return !has_penalties(p) &&
           (!sampler_draws(p) || (p->top_k <= 0 && p->min_p <= 0.0f && p->top_p >= 1.0f));
}

void dsv32_sampler_draw_params(const struct dsv32_sampler *s, struct dsv32_draw *d)
{
    uint64_t rng[4];
    memcpy(rng, s->rng, sizeof(rng));
    d->temperature = sampler_draws(&s->p) ? s->p.temperature : 0.0f;
    d->u = sampler_draws(&s->p) ? rng_uniform(rng) : 0.0;
    d->n_logprobs = s->p.n_logprobs;
}

void dsv32_sampler_took(struct dsv32_sampler *s, int32_t token)
{
    if (sampler_draws(&s->p))
        (void)rng_next(s->rng);
    dsv32_sampler_accept(s, token);
}

int32_t dsv32_draw_row(const float *logits, int vocab, const struct dsv32_draw *d, float *work,
                       double *bsum)
{
    if (d->temperature == 0.0f)
        return argmax(logits, vocab);
    return draw_full(logits, vocab, d->temperature, d->u, work, bsum);
}
