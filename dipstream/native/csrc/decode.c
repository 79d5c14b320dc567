/* The lean engine's decode loop per token and layer: the attention block (norm, q/k/v, RoPE, the
 * KV cache write and one token's attention over it, grouped-query heads, float32 or float16 cache,
 * the output product) and the RAM-resident MLP block, one call each; plus the RMS norm and gated
 * activation the offloaded MLP calls on their own. */
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

/* a . b over n floats (8-wide partial sums where AVX2 is built, so not the sequential order). */
static inline float dot(const float* restrict a, const float* restrict b, int64_t n)
{
    int64_t j = 0;
    float r = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    r = _mm_cvtss_f32(h);
#endif
    for (; j < n; ++j) r += a[j] * b[j];
    return r;
}

/* out[h*hd:(h+1)*hd] = softmax_t(s_t) . V[kv, t] over t in [lo, hi), s_t = scale * q_h . K[kv, t]
 * (softcap > 0: softcap * tanh(s_t / softcap), Gemma 2), for every query head h (kv = h / (H / Hkv)).
 * K and V: (Hkv, ld_seq, hd) of 4-byte floats (f16 = 0) or halves (f16 = 1).  Scores in float32,
 * max-subtracted; each cache row is read (and widened) once for the query heads that share it.
 * Returns 0, or -1 when the arguments are inconsistent or memory runs out. */
static int ds_attend(const float* q, const void* K, const void* V, int64_t H, int64_t Hkv, int64_t hd,
                     int64_t ld_seq, int64_t lo, int64_t hi, float scale, float softcap, int f16, float* out)
{
    if (H <= 0 || Hkv <= 0 || H % Hkv || hd <= 0 || lo < 0 || hi <= lo || hi > ld_seq) return -1;
    const int64_t n = hi - lo, g = H / Hkv;
    float* s = (float*)malloc((size_t)(g * n + hd) * sizeof(float));
    if (!s) return -1;
    float* row = s + g * n;
    for (int64_t kv = 0; kv < Hkv; ++kv) {
        for (int64_t t = 0; t < n; ++t) {  /* scores of the g heads that share this kv head */
            const int64_t at = (kv * ld_seq + lo + t) * hd;
            const float* kr;
            if (f16) { row_f16_to_f32((const uint16_t*)K + at, row, hd); kr = row; }
            else kr = (const float*)K + at;
            for (int64_t a = 0; a < g; ++a) s[a * n + t] = dot(q + (kv * g + a) * hd, kr, hd) * scale;
        }
        if (softcap > 0.0f)
            for (int64_t i = 0; i < g * n; ++i) s[i] = softcap * tanhf(s[i] / softcap);
        for (int64_t a = 0; a < g; ++a) {  /* softmax per head */
            float* sa = s + a * n;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t t = 0; t < n; ++t) mx = sa[t] > mx ? sa[t] : mx;
            for (int64_t t = 0; t < n; ++t) { sa[t] = expf(sa[t] - mx); sum += sa[t]; }
            const float inv = 1.0f / sum;
            for (int64_t t = 0; t < n; ++t) sa[t] *= inv;
            float* o = out + (kv * g + a) * hd;
            for (int64_t j = 0; j < hd; ++j) o[j] = 0.0f;
        }
        for (int64_t t = 0; t < n; ++t) {
            const int64_t at = (kv * ld_seq + lo + t) * hd;
            const float* vr;
            if (f16) { row_f16_to_f32((const uint16_t*)V + at, row, hd); vr = row; }
            else vr = (const float*)V + at;
            for (int64_t a = 0; a < g; ++a) {
                const float p = s[a * n + t];
                float* restrict o = out + (kv * g + a) * hd;
                for (int64_t j = 0; j < hd; ++j) o[j] += p * vr[j];
            }
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

/* RoPE (rotate-half) of the first `rot` values of each of n heads of hd, in place, with this
 * position's cos / sin rows of rot values (rot < hd: partial rotary, Phi-3's factor). */
static void rope(float* x, int64_t n, int64_t hd, int64_t rot, const float* cs, const float* sn)
{
    const int64_t h = rot / 2;
    for (int64_t a = 0; a < n; ++a) {
        float* v = x + a * hd;
        for (int64_t j = 0; j < h; ++j) {
            const float x0 = v[j], x1 = v[j + h];
            v[j] = x0 * cs[j] - x1 * sn[j];
            v[j + h] = x1 * cs[j + h] + x0 * sn[j + h];
        }
    }
}

/* One layer's attention for the token at `pos`: RoPE on q (in place) and k (none where cs is NULL:
 * a NoPE layer), k and v written to the cache row `pos` (float32 or, f16 = 1, half), then ds_attend
 * over [lo, pos].  Returns 0 or -1. */
static int ds_attend_token(float* q, float* k, const float* v, const float* cs, const float* sn, int64_t rot,
                           void* K, void* V, int64_t H, int64_t Hkv, int64_t hd, int64_t ld_seq,
                           int64_t pos, int64_t lo, float scale, float softcap, int f16, float* out)
{
    if (pos < 0 || pos >= ld_seq || rot % 2 || rot > hd || rot < 0) return -1;
    if (cs) {
        rope(q, H, hd, rot, cs, sn);
        rope(k, Hkv, hd, rot, cs, sn);
    }
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
    return ds_attend(q, K, V, H, Hkv, hd, ld_seq, lo, pos + 1, scale, softcap, f16, out);
}

/* h[j] = act(gu[j]) * gu[D + j] for j < D: act 0 = SiLU (x / (1 + e^-x)), 1 = tanh-GELU,
 * 2 = exact GELU (x / 2 (1 + erf(x / sqrt 2))) (native/__init__.py: ACTIVATION_CODES). */
DS_API int ds_glu(const float* gu, int64_t D, int act, float* h)
{
    if (D < 0 || act < 0 || act > 2) return -1;
    for (int64_t j = 0; j < D; ++j) {
        const float x = gu[j];
        const float a = act == 0 ? x / (1.0f + expf(-x))
                      : act == 1 ? 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)))
                                 : 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
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

/* ---------------------------------------------------------------- whole blocks, one call each
 * A token's pass through one layer in two calls (attention block, RAM-resident MLP block)
 * instead of a dozen small ones: the same kernels in the same order as the step-by-step path. */

/* One weight matrix as records by input (dipstream.engine.qmatrix): bits 32 (float32 records),
 * 8, 4, 5 or 6 (input-grouped; headers hd / hm of kind hk, zero point zp: gemv.c's qmat_t). */
typedef struct {
    const uint8_t* rec; const void* hd; const uint16_t* hm;
    int64_t rows, m, stride, group, gi;
    int32_t bits, act8, hk, zp;
} ds_mat_t;

/* out = the top-k |v| records' combination (k >= rows: the dense product); returns the count. */
static int64_t mat_select(const ds_mat_t* w, const float* v, int64_t k, int64_t* idx, float* coef,
                          float* out, int nthreads)
{
    if (w->bits == 32)
        return ds_select_gemv(v, w->rows, k, (const float*)w->rec, w->stride / 4, w->m, idx, coef, out, nthreads);
    return ds_select_gemv_qg(v, w->rows, k, w->rec, w->stride, w->group, w->bits, w->hd, w->hm, w->gi, w->hk, w->zp, w->m,
                             idx, coef, out, nthreads, w->act8);
}

/* What every block of a model shares: shapes, norm rule, thread count and work buffers. */
typedef struct {
    int64_t d, H, Hkv, hd, max_seq;
    float eps, scale;
    int32_t gemma, f16, nthreads, act;
    float *h, *qkv, *att, *o;   /* work: d, (H + 2 Hkv) hd, H hd, max(d, H hd) */
    int64_t* idx; float* coef;  /* work: max(d, H hd) + 1 */
} ds_ctx_t;

/* One layer's attention: its matrices (q, k, v side by side in qkv[0] when qkv[1].rec is NULL),
 * norms and biases (NULL where the family has none), RoPE tables (max_seq, rot; NULL: no RoPE) and
 * KV cache. */
typedef struct {
    ds_mat_t qkv[3], o;
    const float *norm, *post_norm, *q_bias, *k_bias, *v_bias, *q_norm, *k_norm, *cos, *sin;
    void *K, *V;
    int64_t window;  /* sliding window in tokens (0: global attention) */
    int64_t rot;     /* rotated values per head (the tables' width) */
    float softcap;   /* attention logit soft-capping (0: none) */
} ds_attn_t;

/* RMS norm over each of n heads of hd values, in place (q / k norms). */
static void head_norm(float* x, int64_t n, int64_t hd, const float* w, float eps, int plus_one)
{
    for (int64_t a = 0; a < n; ++a)
        ds_rmsnorm(x + a * hd, hd, w, eps, plus_one, x + a * hd);
}

static void add_to(float* restrict x, const float* restrict y, int64_t n)
{
    for (int64_t j = 0; j < n; ++j) x[j] += y[j];
}

/* x += [post-norm] o(attention(norm(x))) for the token at `pos` (its k and v enter the cache).
 * Returns 0, or -1 when a kernel fails. */
DS_API int ds_attention_block(const ds_ctx_t* c, const ds_attn_t* a, float* x, int64_t pos)
{
    const int64_t nq = c->H * c->hd, nk = c->Hkv * c->hd;
    if (ds_rmsnorm(x, c->d, a->norm, c->eps, c->gemma, c->h)) return -1;
    if (a->qkv[1].rec == NULL) {
        if (mat_select(&a->qkv[0], c->h, a->qkv[0].rows, c->idx, c->coef, c->qkv, c->nthreads) < 0) return -1;
    } else {
        for (int t = 0; t < 3; ++t)
            if (mat_select(&a->qkv[t], c->h, a->qkv[t].rows, c->idx, c->coef, c->qkv + (t ? nq + (t - 1) * nk : 0),
                           c->nthreads) < 0) return -1;
    }
    float *q = c->qkv, *k = q + nq, *v = k + nk;
    if (a->q_bias) { add_to(q, a->q_bias, nq); add_to(k, a->k_bias, nk); add_to(v, a->v_bias, nk); }
    if (a->q_norm) {
        head_norm(q, c->H, c->hd, a->q_norm, c->eps, c->gemma);
        head_norm(k, c->Hkv, c->hd, a->k_norm, c->eps, c->gemma);
    }
    const int64_t lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
    if (ds_attend_token(q, k, v, a->cos ? a->cos + pos * a->rot : NULL, a->sin ? a->sin + pos * a->rot : NULL,
                        a->rot, a->K, a->V, c->H, c->Hkv, c->hd, c->max_seq, pos, lo, c->scale, a->softcap, c->f16,
                        c->att)) return -1;
    if (mat_select(&a->o, c->att, a->o.rows, c->idx, c->coef, c->o, c->nthreads) < 0) return -1;
    if (a->post_norm && ds_rmsnorm(c->o, c->d, a->post_norm, c->eps, c->gemma, c->o)) return -1;
    add_to(x, c->o, c->d);
    return 0;
}

/* One layer's MLP with its records in RAM: the top-k_in |norm(x)| records of `in` ([gate | up]
 * per unit), h = act(gate) * up, the top-k_out |h| records of `out`; idx_in / idx_out receive the
 * selections (ascending) and got[0..1] their sizes. */
typedef struct {
    ds_mat_t in, out;
    const float *norm, *post_norm;
    int64_t k_in, k_out;
    float *gu, *h, *y;            /* work: 2 D, D, d */
    int64_t *idx_in, *idx_out;    /* work: d, D */
    float* coef;                  /* work: max(d, D) */
} ds_mlp_t;

/* x += [post-norm] MLP(norm(x)).  Returns 0, or -1 when a kernel fails. */
DS_API int ds_mlp_block(const ds_ctx_t* c, const ds_mlp_t* l, float* x, int64_t* got)
{
    const int64_t D = l->out.rows;
    if (ds_rmsnorm(x, c->d, l->norm, c->eps, c->gemma, c->h)) return -1;
    got[0] = mat_select(&l->in, c->h, l->k_in, l->idx_in, l->coef, l->gu, c->nthreads);
    if (got[0] < 0 || ds_glu(l->gu, D, c->act, l->h)) return -1;
    got[1] = mat_select(&l->out, l->h, l->k_out, l->idx_out, l->coef, l->y, c->nthreads);
    if (got[1] < 0) return -1;
    if (l->post_norm && ds_rmsnorm(l->y, c->d, l->post_norm, c->eps, c->gemma, l->y)) return -1;
    add_to(x, l->y, c->d);
    return 0;
}
