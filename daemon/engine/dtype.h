/* Number formats of DeepSeek checkpoints and caches: bf16, f16, FP8 e4m3fn, and the block
 * quantization rules of DeepSeek's reference (act_quant): amax clamped below at 1e-4, scale =
 * amax/448 (or the power of two 2^ceil(log2(amax/448)) with scale_fmt ue8m0), values rounded to
 * nearest even on the e4m3 grid and clamped to +-448. */
#ifndef DSV32_DTYPE_H
#define DSV32_DTYPE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum dsv32_dtype {
    DSV32_DT_UNKNOWN = 0,
    DSV32_DT_F32,
    DSV32_DT_BF16,
    DSV32_DT_F16,
    DSV32_DT_F8_E4M3,
    DSV32_DT_I32,
    DSV32_DT_I64,
    DSV32_DT_U8,
};

size_t dsv32_dtype_size(enum dsv32_dtype dt);
const char *dsv32_dtype_name(enum dsv32_dtype dt);
/* Safetensors spelling ("BF16", "F8_E4M3"...) to dtype; DSV32_DT_UNKNOWN if not known. */
enum dsv32_dtype dsv32_dtype_parse(const char *s);

#define DSV32_FP8_MAX 448.0f

static inline float dsv32_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static inline uint16_t dsv32_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float dsv32_f16_to_f32(uint16_t h);

/* e4m3fn byte -> float (table lookup). */
extern float dsv32_fp8_table[256]; /* filled before main, read-only after */
static inline float dsv32_fp8_to_f32(uint8_t b) { return dsv32_fp8_table[b]; }
/* float -> e4m3fn byte: clamp to +-448, round to nearest even (subnormals included). */
uint8_t dsv32_f32_to_fp8(float x);
/* The value dsv32_f32_to_fp8 would store, as a float. */
static inline float dsv32_fp8_round(float x) { return dsv32_fp8_table[dsv32_f32_to_fp8(x)]; }

/* Scale of one quantization block from its absolute maximum, as the reference computes it. */
static inline float dsv32_fp8_block_scale(float amax, int ue8m0)
{
    if (amax < 1e-4f)
        amax = 1e-4f;
    float s = amax / DSV32_FP8_MAX;
    if (ue8m0) {
        uint32_t u;
        memcpy(&u, &s, 4);
        int e = (int)((u >> 23) & 0xff) - 127 + ((u & 0x7fffffu) ? 1 : 0);
        s = ldexpf(1.0f, e);
    }
    return s;
}

/* FP8 rounding ties. A value within a few f32 ulps of the midpoint between two e4m3 grid points
 * rounds one way or the other depending on the summation order that produced it, so two faithful
 * executions of the same model (ours and DeepSeek's, or the cpu and cuda backends) can round it
 * differently. The probe reports such near-ties and can force the other rounding at chosen
 * places; the golden check uses it to resolve ties the way the reference did. A place is named
 * by backend-independent coordinates: the ordinal of the quantizing op call in the step sequence
 * (every backend counts the same calls: linear with an FP8 weight, kv_store, hadamard_quant,
 * mla_prefill, moe_experts), a sub-index (moe_experts: 0 for the expert input, 1 + k for the
 * down-projection input of the token's k-th expert), the logical row and the column. */
struct dsv32_fp8_key {
    uint32_t op;
    int32_t sub, row, col;
};

struct dsv32_fp8_probe {
    double near_rel;                    /* report |v - midpoint| <= near_rel * |v| */
    const struct dsv32_fp8_key *flips;  /* sorted by (op, sub, row, col) */
    int n_flips;
    void (*on_near)(void *ctx, const struct dsv32_fp8_key *k, float v);
    void *ctx;
    uint32_t op;                        /* the op counter, advanced by the backend */
};

/* The probe of this thread, NULL (the normal case) when none is installed. */
extern _Thread_local struct dsv32_fp8_probe *dsv32_fp8_probe_cur;
int dsv32_fp8_key_cmp(const struct dsv32_fp8_key *a, const struct dsv32_fp8_key *b);

/* Quantize n floats (one block) to e4m3 bytes with one scale; writes q[n] and returns the scale.
 * q may be NULL to only get the scale. */
float dsv32_fp8_quant_block(uint8_t *q, const float *x, int n, int ue8m0);
/* The same, with the probe's view of the place: values are x[i] at (op, sub, row, col0 + i). */
float dsv32_fp8_quant_block_at(uint8_t *q, const float *x, int n, int ue8m0, int sub, int row,
                               int col0);
/* In place: x <- dequant(quant(x)) per block of `block` values (the reference's act_quant
 * followed by a multiply by the scale). n must be a multiple of block. */
void dsv32_fp8_simulate(float *x, int n, int block, int ue8m0);
void dsv32_fp8_simulate_at(float *x, int n, int block, int ue8m0, int sub, int row);

#endif
