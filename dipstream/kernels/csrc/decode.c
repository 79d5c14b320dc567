/* Per-token pieces of the lean engine's decode loop that were a handful of numpy operations each:
 * one token's attention over a KV cache (grouped-query heads, float32 or float16 cache) and the
 * gated activation of an MLP. */
#include "common.h"

/* IEEE half -> float for the cache rows (F16C 8 at a time where the build has it). */
static inline void row_f16_to_f32(const uint16_t* restrict src, float* restrict dst, int64_t n)
{
    int64_t j = 0;
#if defined(__F16C__) && defined(__AVX2__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + j))));
#endif
    for (; j < n; ++j) dst[j] = h2f(src[j]);
}

/* out[h*hd:(h+1)*hd] = softmax_t(scale * q_h . K[kv, t]) . V[kv, t] over t in [lo, hi), for every
 * query head h (kv = h / (H / Hkv)).  K and V: (Hkv, ld_seq, hd) of 4-byte floats (f16 = 0) or
 * halves (f16 = 1).  Scores in float32, max-subtracted, as numpy did.  Returns 0, or -1 when the
 * arguments are inconsistent or memory runs out. */
DS_API int ds_attend(const float* q, const void* K, const void* V, int64_t H, int64_t Hkv, int64_t hd,
                     int64_t ld_seq, int64_t lo, int64_t hi, float scale, int f16, float* out)
{
    if (H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0 || lo < 0 || hi <= lo || hi > ld_seq) return -1;
    const int64_t n = hi - lo, g = H / Hkv;
    float* s = (float*)malloc((size_t)(n + 2 * hd) * sizeof(float));
    if (!s) return -1;
    float* krow = s + n;
    float* vrow = krow + hd;
    for (int64_t h = 0; h < H; ++h) {
        const int64_t kv = h / g;
        const float* qh = q + h * hd;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t at = (kv * ld_seq + lo + t) * hd;
            const float* kr;
            if (f16) { row_f16_to_f32((const uint16_t*)K + at, krow, hd); kr = krow; }
            else kr = (const float*)K + at;
            float d = 0.0f;
            for (int64_t j = 0; j < hd; ++j) d += qh[j] * kr[j];
            d *= scale;
            s[t] = d;
            if (d > mx) mx = d;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) { s[t] = expf(s[t] - mx); sum += s[t]; }
        const float inv = 1.0f / sum;
        float* o = out + h * hd;
        for (int64_t j = 0; j < hd; ++j) o[j] = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t at = (kv * ld_seq + lo + t) * hd;
            const float* vr;
            if (f16) { row_f16_to_f32((const uint16_t*)V + at, vrow, hd); vr = vrow; }
            else vr = (const float*)V + at;
            const float p = s[t] * inv;
            for (int64_t j = 0; j < hd; ++j) o[j] += p * vr[j];
        }
    }
    free(s);
    return 0;
}

/* float -> IEEE half, round to nearest even (numpy's astype(float16)); F16C where built. */
static inline uint16_t f2h(float v)
{
    uint32_t x;
    memcpy(&x, &v, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0));  /* inf / nan */
    if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                                 /* overflow */
    if (x < 0x38800000u) {                                                                   /* subnormal */
        if (x < 0x33000000u) return (uint16_t)sign;
        const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((x - 0x38000000u) >> 13);
    const uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
}

/* RoPE (rotate-half) of n heads of hd in place with this position's cos / sin rows. */
static void rope(float* x, int64_t n, int64_t hd, const float* cs, const float* sn)
{
    const int64_t h = hd / 2;
    for (int64_t a = 0; a < n; ++a) {
        float* v = x + a * hd;
        for (int64_t j = 0; j < h; ++j) {
            const float x0 = v[j], x1 = v[j + h];
            v[j] = x0 * cs[j] - x1 * sn[j];
            v[j + h] = x1 * cs[j + h] + x0 * sn[j + h];
        }
    }
}

/* One layer's attention for the token at `pos`: RoPE on q (in place) and k, k and v written to the
 * cache row `pos` (float32 or, f16 = 1, half), then ds_attend over [lo, pos].  Returns 0 or -1. */
DS_API int ds_attend_token(float* q, float* k, const float* v, const float* cs, const float* sn,
                           void* K, void* V, int64_t H, int64_t Hkv, int64_t hd, int64_t ld_seq,
                           int64_t pos, int64_t lo, float scale, int f16, float* out)
{
    if (pos < 0 || pos >= ld_seq || hd % 2) return -1;
    rope(q, H, hd, cs, sn);
    rope(k, Hkv, hd, cs, sn);
    for (int64_t a = 0; a < Hkv; ++a) {
        const int64_t at = (a * ld_seq + pos) * hd;
        for (int64_t j = 0; j < hd; ++j) {
            if (f16) {
                ((uint16_t*)K)[at + j] = f2h(k[a * hd + j]);
                ((uint16_t*)V)[at + j] = f2h(v[a * hd + j]);
            } else {
                ((float*)K)[at + j] = k[a * hd + j];
                ((float*)V)[at + j] = v[a * hd + j];
            }
        }
    }
    return ds_attend(q, K, V, H, Hkv, hd, ld_seq, lo, pos + 1, scale, f16, out);
}

/* h[j] = act(gu[j]) * gu[D + j] for j < D: act 0 = SiLU (x / (1 + e^-x)), 1 = tanh-GELU. */
DS_API int ds_glu(const float* gu, int64_t D, int act, float* h)
{
    if (D < 0 || (act != 0 && act != 1)) return -1;
    for (int64_t j = 0; j < D; ++j) {
        const float x = gu[j];
        const float a = act == 0 ? x / (1.0f + expf(-x))
                                 : 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        h[j] = a * gu[D + j];
    }
    return 0;
}

/* out = x / sqrt(mean(x^2) + eps) * (w + plus_one)   (RMS norm; Gemma adds 1 to its weights). */
DS_API int ds_rmsnorm(const float* x, int64_t n, const float* w, float eps, int plus_one, float* out)
{
    if (n <= 0) return -1;
    double ss = 0.0;
    for (int64_t j = 0; j < n; ++j) ss += (double)x[j] * x[j];
    const float r = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    const float add = plus_one ? 1.0f : 0.0f;
    for (int64_t j = 0; j < n; ++j) out[j] = x[j] * r * (w[j] + add);
    return 0;
}
