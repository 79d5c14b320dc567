/* Compute kernels of the sparse MLP: the fused gather-GEMV over selected rows (float32, and int8 /
 * 4-bit grouped along the inputs as the engine's model file stores them), top-k |v| selection, and
 * the caller-runs thread pool that shares the work. */
#include "common.h"

/* o[0:n] = sum_i c[i] * W[idx[i]*ld + 0:n]   (W already offset to the first column).
 * Reads each selected row segment exactly once; 4 rows per pass so the accumulator (L1/L2
 * resident) is loaded/stored once per 4 streamed rows. */
static void gg_range(const float* restrict W, int64_t ld, const int64_t* restrict idx,
                     const float* restrict c, int64_t k, float* restrict o, int64_t n)
{
    for (int64_t j = 0; j < n; ++j) o[j] = 0.0f;
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) {
        const float* restrict r0 = W + idx[i] * ld;
        const float* restrict r1 = W + idx[i + 1] * ld;
        const float* restrict r2 = W + idx[i + 2] * ld;
        const float* restrict r3 = W + idx[i + 3] * ld;
        const float c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
        for (int64_t j = 0; j < n; ++j) {
            float a = o[j];
            a += c0 * r0[j];
            a += c1 * r1[j];
            a += c2 * r2[j];
            a += c3 * r3[j];
            o[j] = a;
        }
    }
    for (; i < k; ++i) {
        const float* restrict r0 = W + idx[i] * ld;
        const float c0 = c[i];
        for (int64_t j = 0; j < n; ++j) o[j] += c0 * r0[j];
    }
}

/* Quantized rows grouped along the inputs (GI > 0: the GGUF blocks' grouping), row r at W + r*ldb
 * (bytes).  int8 rows (bits 8) hold signed integers; 4-, 5- and 6-bit rows hold unsigned integers q:
 * in every group of G (= 32 for 5 / 6 bits) columns, column j (j < G/2) in the low nibble of byte j
 * and column j + G/2 in its high nibble (the nibble plane, m/2 bytes), then, for 5 / 6 bits, a plane
 * of the high bits (see unpack32).  Rows carry no scales: the rows of units u in input group
 * g = u / GI share, per column j, a scale D and an offset M, w = D q + M, from the headers HD / HM
 * (see group_scales: float16 pairs, or the K-quants' super-block scales).  `unit[i]` is the unit
 * of selected row i (NULL: idx[i] itself). */
enum { HK_F16 = 0, HK_K45 = 1, HK_Q6K = 2 };
typedef struct {
    const uint8_t* W; int64_t ldb; int64_t G; int bits;
    const void* HD; const uint16_t* HM; int64_t GI; int hk; int zp; int64_t m; const int64_t* unit;
    /* act8 (4-bit input-grouped rows, G = 32): each group's coefficients are quantized to int8
     * (scale max|c| / 127, as llama.cpp's Q8 activations) and summed with integer products.
     * gmax (NULL, or one entry per input group): max|c| over the group's whole activation vector,
     * so a group whose selected rows come in several calls (cached and read rows) is quantized with
     * one scale, as in one call; NULL: the max over the group's selected rows (the same for a
     * top-k or dense selection, whose selected rows hold each group's largest |c|). */
    int act8;
    const float* gmax;
} qmat_t;

/* Half floats -> floats (F16C 8 at a time where there is F16C). */
static inline void halves(const uint16_t* restrict h, int64_t n, float* restrict out)
{
    int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + j))));
#endif
    for (; j < n; ++j) out[j] = h2f(h[j]);
}

/* Half floats given as a row of low bytes and a row of high bytes -> floats. */
static inline void split_halves(const uint8_t* restrict lo, const uint8_t* restrict hi, int64_t n, float* restrict out)
{
    int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8) {
        const __m128i h = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i*)(lo + j)),
                                            _mm_loadl_epi64((const __m128i*)(hi + j)));
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
    }
#endif
    for (; j < n; ++j) out[j] = h2f((uint16_t)(lo[j] | hi[j] << 8));
}

/* D[0:n], M[0:n]: input group g's scale and offset of columns a..a+n (w = D q + M), from
 *  HK_F16: float16 D (HD) and M (HM; NULL: M = -zp D) per (group, column);
 *  HK_K45 (Q4_K / Q5_K, groups of 32 in super-blocks of 256): per super-block a table of 16 rows
 *          of m bytes, row i holding byte i of every column's GGUF block header: rows 0-1 d
 *          (float16: low, high bytes), rows 2-3 dmin, rows 4-15 the 6-bit scales / mins;
 *          D = d sc, M = -(dmin mn);
 *  HK_Q6K (groups of 16 in super-blocks of 256): per super-block 18 rows of m bytes, rows 0-15
 *          the blocks' int8 scales, rows 16-17 d (float16): D = d sc, M = -32 D.
 * These are the float32 operations of gguf's dequantizers (the tables are the GGUF blocks' header
 * bytes, laid out by column so a group's scales are contiguous vectors, and tables of matrices
 * side by side are their rows side by side).  Returns 0 when M is all
 * zero. */
static int group_scales(const qmat_t* q, int64_t g, int64_t a, int64_t n, float* restrict D, float* restrict M)
{
    const int64_t m = q->m;
    if (q->hk == HK_F16) {
        halves((const uint16_t*)q->HD + g * m + a, n, D);
        if (q->HM) {
            halves(q->HM + g * m + a, n, M);
            return 1;
        }
        if (!q->zp) return 0;
        for (int64_t j = 0; j < n; ++j) M[j] = -(float)q->zp * D[j];
        return 1;
    }
    if (q->hk == HK_K45) {
        const uint8_t* t = (const uint8_t*)q->HD + (g / 8) * 16 * m;
        const int sub = (int)(g % 8);
        split_halves(t + a, t + m + a, n, D);
        split_halves(t + 2 * m + a, t + 3 * m + a, n, M);
        const uint8_t* restrict p = t + 4 * m + a;  /* plane i: p + i * m */
        if (sub < 4) {
            const uint8_t* restrict ps = p + sub * m;
            const uint8_t* restrict pm = p + (sub + 4) * m;
            for (int64_t j = 0; j < n; ++j) {
                D[j] *= (float)(ps[j] & 63);
                M[j] = -(M[j] * (float)(pm[j] & 63));
            }
        } else {
            const uint8_t* restrict lo = p + (sub + 4) * m;  /* low nibbles: scale; high: min */
            const uint8_t* restrict hs = p + (sub - 4) * m;  /* top 2 bits: the scale's high bits */
            const uint8_t* restrict hm = p + sub * m;        /* top 2 bits: the min's high bits */
            for (int64_t j = 0; j < n; ++j) {
                D[j] *= (float)((lo[j] & 15) | ((hs[j] >> 6) << 4));
                M[j] = -(M[j] * (float)((lo[j] >> 4) | ((hm[j] >> 6) << 4)));
            }
        }
        return 1;
    }
    const uint8_t* t = (const uint8_t*)q->HD + (g / 16) * 18 * m;
    const int8_t* restrict sc = (const int8_t*)(t + (g % 16) * m + a);
    split_halves(t + 16 * m + a, t + 17 * m + a, n, D);
    for (int64_t j = 0; j < n; ++j) {
        D[j] *= (float)sc[j];
        M[j] = -32.0f * D[j];
    }
    return 1;
}

/* The unsigned integers of columns col..col+31 (col a multiple of 32) of a 4-, 5- or 6-bit row r of
 * m columns: the nibble plane's 16 bytes (low nibbles: columns 0..15, high: 16..31), and above
 * them the high plane at r + m/2: 5 bits, column j's bit 4 in bit j%8 of byte j/8; 6 bits, per 32
 * columns 8 bytes, byte t holding bits 4-5 of columns t, t+8, t+16, t+24 at shifts 0, 2, 4, 6. */
static inline void unpack32(const uint8_t* r, int64_t m, int bits, int64_t col, uint8_t* q)
{
    const uint8_t* nb = r + col / 2;
    for (int t = 0; t < 16; ++t) { q[t] = nb[t] & 15; q[t + 16] = nb[t] >> 4; }
    if (bits == 5) {
        const uint8_t* h = r + m / 2 + col / 8;
        for (int t = 0; t < 32; ++t) q[t] |= (uint8_t)(((h[t >> 3] >> (t & 7)) & 1) << 4);
    } else if (bits == 6) {
        const uint8_t* h = r + m / 2 + col / 4;
        for (int t = 0; t < 32; ++t) q[t] |= (uint8_t)(((h[t & 7] >> (2 * (t >> 3))) & 3) << 4);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256i unpack32_avx(const uint8_t* r, int64_t m, int bits, int64_t col)
{
    const __m128i x = _mm_loadu_si128((const __m128i*)(r + col / 2)), m0f = _mm_set1_epi8(15);
    __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), m0f), _mm_and_si128(x, m0f));
    if (bits == 5) {
        uint32_t h;
        memcpy(&h, r + m / 2 + col / 8, 4);
        __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), _mm256_set_epi64x(
            0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
        b = _mm256_cmpeq_epi8(_mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL)), _mm256_set1_epi64x(-1));
        v = _mm256_or_si256(v, _mm256_and_si256(b, _mm256_set1_epi8(16)));
    } else if (bits == 6) {
        uint64_t h;
        memcpy(&h, r + m / 2 + col / 4, 8);
        __m256i b = _mm256_srlv_epi64(_mm256_set1_epi64x((long long)h), _mm256_set_epi64x(6, 4, 2, 0));
        v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi8(3)), 4));
    }
    return v;
}
#endif

/* o[0:n] += D[0:n] * acc[0:n] + M[0:n] * sc   (M may be NULL: no offsets). */
static void flush_group(float* restrict o, const float* restrict acc, const float* restrict D,
                        const float* restrict M, float sc, int64_t n)
{
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vs = _mm256_set1_ps(sc);
    for (; j + 8 <= n; j += 8) {
        __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(D + j), _mm256_loadu_ps(acc + j), _mm256_loadu_ps(o + j));
        if (M) r = _mm256_fmadd_ps(_mm256_loadu_ps(M + j), vs, r);
        _mm256_storeu_ps(o + j, r);
    }
#endif
    for (; j < n; ++j) o[j] += D[j] * acc[j] + (M ? M[j] * sc : 0.0f);
}

/* o[0:b-a] = sum_i c[i] * (unsigned integers of 5- or 6-bit row idx[i])[a:b] (a, b multiples of 32). */
static void gq_wide(const qmat_t* q, int64_t a, int64_t b, const int64_t* restrict idx,
                    const float* restrict c, int64_t k, float* restrict o)
{
    const int64_t n = b - a;
    for (int64_t j = 0; j < n; ++j) o[j] = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
        const uint8_t* r = q->W + idx[i] * q->ldb;
        const float ci = c[i];
        for (int64_t col = 0; col < n; col += 32) {
            float* restrict oc = o + col;
#if defined(__AVX2__) && defined(__FMA__)
            const __m256i v = unpack32_avx(r, q->m, q->bits, a + col);
            const __m256 vc = _mm256_set1_ps(ci);
            for (int t = 0; t < 4; ++t) {
                const __m128i part = t < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
                const __m256i w = _mm256_cvtepu8_epi32(t & 1 ? _mm_srli_si128(part, 8) : part);
                _mm256_storeu_ps(oc + 8 * t, _mm256_fmadd_ps(vc, _mm256_cvtepi32_ps(w), _mm256_loadu_ps(oc + 8 * t)));
            }
#else
            uint8_t u[32];
            unpack32(r, q->m, q->bits, a + col, u);
            for (int t = 0; t < 32; ++t) oc[t] += ci * (float)u[t];
#endif
        }
    }
}

/* The int8 activations of one input group's selected coefficients: cq = round(c / s) (the first
 * min(k, 64) of them), s = amax / 127 (amax < 0: the max |c| of the selection).  Returns s;
 * *qsum = s * sum(cq), the quantized coefficients' sum, which multiplies the offsets: the product
 * is then exactly the dequantized weights times the quantized activations (as llama.cpp's Q8_1 /
 * Q8_K sums do), not a mix of quantized and exact coefficients, whose error a zero point (Q5_0's
 * 16, Q6_K's 32) would multiply. */
static float quantize_coefs(const float* c, int64_t k, float amax, int8_t* cq, float* qsum)
{
    if (amax < 0.0f) {
        amax = 0.0f;
        for (int64_t i = 0; i < k; ++i) amax = fabsf(c[i]) > amax ? fabsf(c[i]) : amax;
    }
    const int64_t kk = k < 64 ? k : 64;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, s = amax > 0.0f ? amax / 127.0f : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kk; ++i) {
        cq[i] = (int8_t)lrintf(c[i] * inv);
        sum += cq[i];
    }
    *qsum = s * (float)sum;
    return s;
}

/* o[0:b-a] = sum_i c[i] * (raw integers of row idx[i])[a:b].  For 4-bit, a and b are multiples of
 * G (or b = the row length).  Rows 4 at a time; a missing 4th row repeats a selected row with
 * coefficient 0, so only selected rows are ever read. */
static void gq_core(const qmat_t* q, int64_t a, int64_t b, const int64_t* restrict idx,
                    const float* restrict c, int64_t k, float* restrict o)
{
    const int64_t n = b - a, G = q->G;
    for (int64_t j = 0; j < n; ++j) o[j] = 0.0f;
    for (int64_t i = 0; i < k; i += 4) {
        const uint8_t* r[4];
        float cc[4];
        for (int t = 0; t < 4; ++t) {
            int ok = i + t < k;
            int64_t row = idx[ok ? i + t : i];
            r[t] = q->W + row * q->ldb;
            cc[t] = ok ? c[i + t] : 0.0f;
        }
        for (int t = 0; t < 4 && i + 4 + t < k; ++t) {  /* the next rows' bytes: start their loads now */
            const uint8_t* nr = q->W + idx[i + 4 + t] * q->ldb;
            const int64_t lo = q->bits == 8 ? a : a / 2, hi = q->bits == 8 ? b : (b + 1) / 2;
            for (int64_t x = lo; x < hi; x += 64) __builtin_prefetch(nr + x);
        }
        for (int64_t g0 = (a / G) * G; g0 < b; g0 += G) {
            const int64_t lo = g0 > a ? g0 : a, hi = g0 + G < b ? g0 + G : b;
            const float c0 = cc[0], c1 = cc[1], c2 = cc[2], c3 = cc[3];
            float* restrict og = o + (lo - a);
            if (q->bits == 8) {
                const int8_t* restrict p0 = (const int8_t*)r[0] + lo;
                const int8_t* restrict p1 = (const int8_t*)r[1] + lo;
                const int8_t* restrict p2 = (const int8_t*)r[2] + lo;
                const int8_t* restrict p3 = (const int8_t*)r[3] + lo;
                const int64_t len = hi - lo;
                for (int64_t j = 0; j < len; ++j)
                    og[j] += c0 * (float)p0[j] + c1 * (float)p1[j]
                           + c2 * (float)p2[j] + c3 * (float)p3[j];
            } else {
                const int64_t h = G / 2;
                const uint8_t* restrict p0 = r[0] + g0 / 2;
                const uint8_t* restrict p1 = r[1] + g0 / 2;
                const uint8_t* restrict p2 = r[2] + g0 / 2;
                const uint8_t* restrict p3 = r[3] + g0 / 2;
                float* restrict oh = og + h;
                int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
                {
                    const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1);
                    const __m256 v2 = _mm256_set1_ps(c2), v3 = _mm256_set1_ps(c3);
                    const __m256i m15 = _mm256_set1_epi32(15);
                    for (; j + 8 <= h; j += 8) {
                        __m256i w0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p0 + j)));
                        __m256i w1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p1 + j)));
                        __m256i w2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p2 + j)));
                        __m256i w3 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p3 + j)));
                        __m256 lo = _mm256_loadu_ps(og + j);
                        __m256 hi = _mm256_loadu_ps(oh + j);
                        lo = _mm256_fmadd_ps(v0, _mm256_cvtepi32_ps(_mm256_and_si256(w0, m15)), lo);
                        hi = _mm256_fmadd_ps(v0, _mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 4)), hi);
                        lo = _mm256_fmadd_ps(v1, _mm256_cvtepi32_ps(_mm256_and_si256(w1, m15)), lo);
                        hi = _mm256_fmadd_ps(v1, _mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 4)), hi);
                        lo = _mm256_fmadd_ps(v2, _mm256_cvtepi32_ps(_mm256_and_si256(w2, m15)), lo);
                        hi = _mm256_fmadd_ps(v2, _mm256_cvtepi32_ps(_mm256_srli_epi32(w2, 4)), hi);
                        lo = _mm256_fmadd_ps(v3, _mm256_cvtepi32_ps(_mm256_and_si256(w3, m15)), lo);
                        hi = _mm256_fmadd_ps(v3, _mm256_cvtepi32_ps(_mm256_srli_epi32(w3, 4)), hi);
                        _mm256_storeu_ps(og + j, lo);
                        _mm256_storeu_ps(oh + j, hi);
                    }
                }
#endif
                for (; j < h; ++j) {
                    og[j] += c0 * (float)(p0[j] & 15) + c1 * (float)(p1[j] & 15)
                           + c2 * (float)(p2[j] & 15) + c3 * (float)(p3[j] & 15);
                    oh[j] += c0 * (float)(p0[j] >> 4) + c1 * (float)(p1[j] >> 4)
                           + c2 * (float)(p2[j] >> 4) + c3 * (float)(p3[j] >> 4);
                }
            }
        }
    }
}

#define ACC_CHUNK 4096  /* columns of one input group's accumulator (a multiple of 32) */
#define ACC8_COLS ACC_CHUNK
#define PF_ROWS 6   /* software prefetch distance in rows */

/* The run of records that a product kernel's caller does next (its records' columns a..b), which
 * the kernel prefetches into L2 as it goes, one run ahead: a tile walks a group's 16-32 records at
 * once, too many streams for the hardware prefetchers. */
typedef struct { const int64_t* idx; int64_t k, a, b; } nextrun_t;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define DS_VNNI512 1

/* A run's records prefetched into L2 record after record, line after line (the hardware's L2
 * streamer follows), `per` consecutive lines of one record per pfseq_step: region
 * [base, base + bytes) of each. */
typedef struct {
    const uint8_t* W; int64_t ldb; const int64_t* idx; const char* row;
    int64_t nk, r, off, bytes, base, per;
} pfseq_t;

static inline void pfseq_init(pfseq_t* p, const qmat_t* q, const nextrun_t* nr, int64_t base, int64_t bytes, int64_t steps)
{
    p->W = q->W; p->ldb = q->ldb; p->idx = nr ? nr->idx : NULL; p->nk = nr && bytes > 0 ? nr->k : 0; p->r = 0;
    p->off = 0; p->bytes = bytes; p->base = base;
    const int64_t lines = p->nk * ((bytes + 63) / 64);
    p->per = steps > 0 ? (lines + steps - 1) / steps : lines;
    p->row = p->nk ? (const char*)(p->W + p->idx[0] * p->ldb + base) : NULL;
}

static inline void pfseq_step(pfseq_t* p)
{
    if (p->r >= p->nk) return;
    for (int64_t u = 0; u < p->per; ++u) _mm_prefetch(p->row + p->off + 64 * u, _MM_HINT_T1);
    p->off += 64 * p->per;
    if (p->off >= p->bytes) {
        p->off = 0;
        if (++p->r < p->nk) p->row = (const char*)(p->W + p->idx[p->r] * p->ldb + p->base);
    }
}

/* The AVX-512 VNNI counterpart of a 4-row step: 4 records' 64 bytes interleaved per byte position
 * (x[v] lane L dword t: byte 16L + 4v + t of the 4 records), so one vpdpbusd multiplies 4 records'
 * byte at one position by their 4 coefficients (c: 4 int8 per dword). */
static inline void interleave4_512(__m512i x0, __m512i x1, __m512i x2, __m512i x3, __m512i* x)
{
    const __m512i alo = _mm512_unpacklo_epi8(x0, x1), ahi = _mm512_unpackhi_epi8(x0, x1);
    const __m512i blo = _mm512_unpacklo_epi8(x2, x3), bhi = _mm512_unpackhi_epi8(x2, x3);
    x[0] = _mm512_unpacklo_epi16(alo, blo);
    x[1] = _mm512_unpackhi_epi16(alo, blo);
    x[2] = _mm512_unpacklo_epi16(ahi, bhi);
    x[3] = _mm512_unpackhi_epi16(ahi, bhi);
}

/* v[0..3] (interleave4_512's order: v[u] lane L = byte positions 16L + 4u..) -> w[L] = positions
 * 16L..16L+15 in order (a 4 x 4 transpose of 128-bit lanes). */
static inline void untangle4_512(const __m512i* v, __m512i* w)
{
    const __m512i t0 = _mm512_shuffle_i64x2(v[0], v[1], 0x44), t1 = _mm512_shuffle_i64x2(v[0], v[1], 0xEE);
    const __m512i t2 = _mm512_shuffle_i64x2(v[2], v[3], 0x44), t3 = _mm512_shuffle_i64x2(v[2], v[3], 0xEE);
    w[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);
    w[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);
    w[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);
    w[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);
}

/* 16 float16 given as 16 low bytes and 16 high bytes -> floats. */
static inline __m512 halves16_512(const uint8_t* lo, const uint8_t* hi)
{
    const __m128i l = _mm_loadu_si128((const __m128i*)lo), h = _mm_loadu_si128((const __m128i*)hi);
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h)));
}

static inline __m512 neg16(__m512 x)
{
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)));
}

static inline __m512 u8f16(__m128i x) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)); }

/* group_scales for the 16 columns col..col+15 (the same float operations, in registers): *D, *M;
 * returns 0 (M not set) where M is all zero. */
static inline int scales16_512(const qmat_t* q, int64_t g, int64_t col, __m512* D, __m512* M)
{
    const int64_t m = q->m;
    if (q->hk == HK_F16) {
        *D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)q->HD + g * m + col)));
        if (q->HM) {
            *M = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(q->HM + g * m + col)));
            return 1;
        }
        if (!q->zp) return 0;
        *M = _mm512_mul_ps(_mm512_set1_ps(-(float)q->zp), *D);
        return 1;
    }
    if (q->hk == HK_K45) {
        const uint8_t* t = (const uint8_t*)q->HD + (g / 8) * 16 * m + col;
        const uint8_t* p = t + 4 * m;
        const int sub = (int)(g % 8);
        const __m128i m63 = _mm_set1_epi8(63), m0f = _mm_set1_epi8(15), m30 = _mm_set1_epi8(0x30);
        __m128i sc, mn;
        if (sub < 4) {
            sc = _mm_and_si128(_mm_loadu_si128((const __m128i*)(p + sub * m)), m63);
            mn = _mm_and_si128(_mm_loadu_si128((const __m128i*)(p + (sub + 4) * m)), m63);
        } else {
            const __m128i lo = _mm_loadu_si128((const __m128i*)(p + (sub + 4) * m));
            const __m128i hs = _mm_loadu_si128((const __m128i*)(p + (sub - 4) * m));
            const __m128i hm = _mm_loadu_si128((const __m128i*)(p + sub * m));
            sc = _mm_or_si128(_mm_and_si128(lo, m0f), _mm_and_si128(_mm_srli_epi16(hs, 2), m30));
            mn = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(lo, 4), m0f), _mm_and_si128(_mm_srli_epi16(hm, 2), m30));
        }
        *D = _mm512_mul_ps(halves16_512(t, t + m), u8f16(sc));
        *M = neg16(_mm512_mul_ps(halves16_512(t + 2 * m, t + 3 * m), u8f16(mn)));
        return 1;
    }
    const uint8_t* t = (const uint8_t*)q->HD + (g / 16) * 18 * m + col;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(t + (g % 16) * m))));
    *D = _mm512_mul_ps(halves16_512(t + 16 * m, t + 17 * m), sc);
    *M = _mm512_mul_ps(_mm512_set1_ps(-32.0f), *D);
    return 1;
}

/* o[j:j+16] += D * (s * sums) [+ M * sc] with input group g's scales of columns a + j.. (gq_act8's
 * AVX2 order of operations). */
static inline void flush16_512(__m512i sums, const qmat_t* q, int64_t g, int64_t a, int64_t j, __m512 vs, __m512 vsc,
                               float* o)
{
    __m512 D, M;
    const int hm = scales16_512(q, g, a + j, &D, &M);
    __m512 r = _mm512_fmadd_ps(D, _mm512_mul_ps(_mm512_cvtepi32_ps(sums), vs), _mm512_loadu_ps(o + j));
    if (hm) r = _mm512_fmadd_ps(M, vsc, r);
    _mm512_storeu_ps(o + j, r);
}

/* gq_act8's products over columns [0, n128) (n128 a multiple of 128), the accumulators of one tile
 * of 128 columns in registers across all the group's records (4 at a time, zero-coefficient
 * padding rows repeat the first).  A record's 64 bytes of the tile hold columns 32L + t (low
 * nibble of byte 16L + t) and 32L + 16 + t (high nibble): the bytes of 4 records are interleaved
 * whole, and vpdpbusd sums the whole bytes (lo + 16 hi) and the high nibbles in place (16 hi):
 * lo = whole - that, hi = that / 16 (exact integers).  nr: the next run, prefetched (pfseq_t). */
static void act8_q4_512(const qmat_t* q, int64_t g, int64_t a, int64_t n128, const int64_t* restrict idx,
                        const int8_t* cq, int64_t kk, const nextrun_t* nr, float s, float sc, float* restrict o)
{
    const uint8_t* rp[68];
    int32_t c4[17];
    const int64_t kp = (kk + 3) / 4 * 4, nb = n128 / 2;
    for (int64_t i = 0; i < kp; ++i) rp[i] = q->W + idx[i < kk ? i : 0] * q->ldb + a / 2;
    for (int64_t i = 0; i < kp; i += 4)
        c4[i / 4] = (int32_t)((uint32_t)(uint8_t)(i < kk ? cq[i] : 0) | (uint32_t)(uint8_t)(i + 1 < kk ? cq[i + 1] : 0) << 8
                              | (uint32_t)(uint8_t)(i + 2 < kk ? cq[i + 2] : 0) << 16
                              | (uint32_t)(uint8_t)(i + 3 < kk ? cq[i + 3] : 0) << 24);
    const __m512i mhi = _mm512_set1_epi8((char)0xf0);
    const __m512 vs = _mm512_set1_ps(s), vsc = _mm512_set1_ps(sc);
    pfseq_t pf;
    pfseq_init(&pf, q, nr, nr ? nr->a / 2 : 0, nr ? (nr->b - nr->a) / 2 : 0, (nb / 64) * (kp / 4));
    for (int64_t jb = 0; jb < nb; jb += 64) {
        __m512i f[4], h[4];
        for (int u = 0; u < 4; ++u) { f[u] = _mm512_setzero_si512(); h[u] = _mm512_setzero_si512(); }
        for (int64_t i = 0; i < kp; i += 4) {
            pfseq_step(&pf);
            __m512i x[4];
            interleave4_512(_mm512_loadu_si512(rp[i] + jb), _mm512_loadu_si512(rp[i + 1] + jb),
                            _mm512_loadu_si512(rp[i + 2] + jb), _mm512_loadu_si512(rp[i + 3] + jb), x);
            const __m512i cw = _mm512_set1_epi32(c4[i / 4]);
            for (int u = 0; u < 4; ++u) {
                f[u] = _mm512_dpbusd_epi32(f[u], x[u], cw);
                h[u] = _mm512_dpbusd_epi32(h[u], _mm512_and_si512(x[u], mhi), cw);
            }
        }
        for (int u = 0; u < 4; ++u) {
            f[u] = _mm512_sub_epi32(f[u], h[u]);
            h[u] = _mm512_srai_epi32(h[u], 4);
        }
        __m512i lo[4], hi[4];
        untangle4_512(f, lo);
        untangle4_512(h, hi);
        for (int L = 0; L < 4; ++L) {
            const int64_t at = 2 * jb + 32 * L;
            flush16_512(lo[L], q, g, a, at, vs, vsc, o);
            flush16_512(hi[L], q, g, a, at + 16, vs, vsc, o);
        }
    }
}
#endif

/* o[0:b-a] += hd * (s * sum_i cq_i * nibbles(row idx[i])[a:b]) + hm * sc, with cq = round(c / s),
 * s = max|c| / 127 (one input group's rows; 4-bit, G = 32; a, b multiples of 32 or b the row
 * end; hd / hm this group's float16 headers at column a, hm may be NULL).  Integer products are
 * summed exactly (pairs of rows through u8 x i8 multiply-adds, at most 16 rows per int16
 * partial), so the AVX2 and the portable paths give the same numbers; the group's scale and
 * offset are applied in the same pass that widens the last partial.  Where the build targets
 * AVX-512 VNNI, act8_q4_512 does the columns up to the last multiple of 128 (the same integer
 * sums, the same float operations on them: the same numbers). */
static void gq_act8(const qmat_t* q, int64_t g, int64_t a, int64_t b, const int64_t* restrict idx,
                    const float* restrict c, int64_t k, float* restrict o,
                    float* restrict D, float* restrict Mbuf, float amax, const nextrun_t* nr)
{
    int8_t cq[64];
    const int64_t kk = k < 64 ? k : 64;  /* a run is one input group: at most GI (<= 32) rows */
    float sc;
    const float s = quantize_coefs(c, k, amax, cq, &sc);
    (void)nr;
#if defined(DS_VNNI512)
    {
        const int64_t n128 = (b - a) / 128 * 128;
        if (n128 > 0) act8_q4_512(q, g, a, n128, idx, cq, kk, nr, s, sc, o);
        a += n128; o += n128;
        if (a >= b) return;
    }
#endif
    const float* M = group_scales(q, g, a, b - a, D, Mbuf) ? Mbuf : NULL;
    const int64_t n = b - a;
    int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    /* Rows outer, columns inner (each pair of rows streamed once): int16 partials of up to 16
     * rows in `p16` (permuted: lane 0 of vector t holds columns 8t..8t+7 of a 64-column block,
     * lane 1 columns 32+8t..), widened into float sums `f` between batches, and into `o` with
     * the headers after the last. */
    const int64_t n64 = n / 64 * 64;
    if (n64 > 0) {
        __m256i p16[ACC8_COLS / 16];
        float f[ACC8_COLS];
        const __m256i m0f = _mm256_set1_epi8(0x0f);
        const __m256 vs = _mm256_set1_ps(s), vsc = _mm256_set1_ps(sc);
        for (int64_t i0 = 0; i0 < kk || i0 == 0; i0 += 16) {
            const int64_t i1 = i0 + 16 < kk ? i0 + 16 : kk;
            const int first = i0 == 0, last = i1 >= kk;
            for (int64_t v = 0; v < n64 / 16; ++v) p16[v] = _mm256_setzero_si256();
            for (int64_t i = i0; i < i1; i += 2) {
                const int two = i + 1 < i1;
                const uint8_t* ra = q->W + idx[i] * q->ldb + a / 2;
                const uint8_t* rb = q->W + idx[two ? i + 1 : i] * q->ldb + a / 2;
                const __m256i w = _mm256_set1_epi16((short)((uint16_t)(uint8_t)cq[i]
                                                    | ((uint16_t)(uint8_t)(two ? cq[i + 1] : 0) << 8)));
                for (int64_t ahead = i + PF_ROWS; ahead < i + PF_ROWS + 2 && ahead < kk; ++ahead) {
                    /* rows PF_ROWS ahead (scattered rows of a sparse selection need the distance) */
                    const uint8_t* nr = q->W + idx[ahead] * q->ldb + a / 2;
                    for (int64_t j = 0; j < n64 / 2; j += 64) __builtin_prefetch(nr + j);
                }
                if (i == i0)  /* the first pair: also the rows before that distance */
                    for (int64_t ahead = i + 2; ahead < i + PF_ROWS && ahead < kk; ++ahead) {
                        const uint8_t* nr = q->W + idx[ahead] * q->ldb + a / 2;
                        for (int64_t j = 0; j < n64 / 2; j += 64) __builtin_prefetch(nr + j);
                    }
                for (int64_t j = 0, v = 0; j < n64; j += 64, v += 4) {
                    const __m256i va = _mm256_loadu_si256((const __m256i*)(ra + j / 2));
                    const __m256i vb = _mm256_loadu_si256((const __m256i*)(rb + j / 2));
                    const __m256i alo = _mm256_and_si256(va, m0f), ahi = _mm256_and_si256(_mm256_srli_epi16(va, 4), m0f);
                    const __m256i blo = _mm256_and_si256(vb, m0f), bhi = _mm256_and_si256(_mm256_srli_epi16(vb, 4), m0f);
                    p16[v] = _mm256_add_epi16(p16[v], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(alo, blo), w));
                    p16[v + 1] = _mm256_add_epi16(p16[v + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(alo, blo), w));
                    p16[v + 2] = _mm256_add_epi16(p16[v + 2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(ahi, bhi), w));
                    p16[v + 3] = _mm256_add_epi16(p16[v + 3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(ahi, bhi), w));
                }
            }
            for (int64_t j = 0, v = 0; j < n64; j += 64, v += 4)
                for (int t = 0; t < 8; ++t) {
                    const int64_t at = j + (t < 4 ? 8 * t : 32 + 8 * (t - 4));
                    const __m128i half = t < 4 ? _mm256_castsi256_si128(p16[v + t])
                                               : _mm256_extracti128_si256(p16[v + t - 4], 1);
                    __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(half));
                    if (!first) x = _mm256_add_ps(x, _mm256_loadu_ps(f + at));
                    if (!last) { _mm256_storeu_ps(f + at, x); continue; }
                    __m256 r = _mm256_loadu_ps(o + at);
                    r = _mm256_fmadd_ps(_mm256_loadu_ps(D + at), _mm256_mul_ps(x, vs), r);
                    if (M) r = _mm256_fmadd_ps(_mm256_loadu_ps(M + at), vsc, r);
                    _mm256_storeu_ps(o + at, r);
                }
            if (last) break;
        }
        j0 = n64;
    }
#endif
    for (; j0 < n; j0 += 32) {  /* portable: one 32-column block (byte t: columns t and t + 16) */
        int32_t sum[32] = {0};
        for (int64_t i = 0; i < kk; ++i) {
            const uint8_t* r = q->W + idx[i] * q->ldb + (a + j0) / 2;
            for (int t = 0; t < 16; ++t) {
                sum[t] += cq[i] * (int32_t)(r[t] & 15);
                sum[t + 16] += cq[i] * (int32_t)(r[t] >> 4);
            }
        }
        float acc[32];
        const int64_t len = n - j0 < 32 ? n - j0 : 32;
        for (int t = 0; t < len; ++t) acc[t] = s * (float)sum[t];
        flush_group(o + j0, acc, D + j0, M ? M + j0 : NULL, sc, len);
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* acc[0..3] += the u8 x i8 products of four rows' 32 columns (w0..w3) with the four rows'
 * coefficients c (u8 operand `u` first when `weights_signed`: the int8 rows carry the signs),
 * interleaved per column: lane 0 of acc[t] sums columns 4t..4t+3, lane 1 16+4t.. (flush_acc32
 * puts them back in order). */
static inline void acc_rows4(__m256i* acc, __m256i w0, __m256i w1, __m256i w2, __m256i w3, __m256i c, int weights_signed)
{
    const __m256i lo01 = _mm256_unpacklo_epi8(w0, w1), hi01 = _mm256_unpackhi_epi8(w0, w1);
    const __m256i lo23 = _mm256_unpacklo_epi8(w2, w3), hi23 = _mm256_unpackhi_epi8(w2, w3);
    const __m256i x[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                          _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
#if !defined(__AVXVNNI__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int t = 0; t < 4; ++t) {
        const __m256i a = weights_signed ? c : x[t], b = weights_signed ? x[t] : c;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        acc[t] = _mm256_dpbusd_epi32(acc[t], a, b);  /* no pair saturates below: the same sums */
#elif defined(__AVXVNNI__)
        acc[t] = _mm256_dpbusd_avx_epi32(acc[t], a, b);
#else
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
#endif
    }
}

/* o[0:n] += D * (s * sums) [+ M * sc] from acc_rows4's int32 sums (n a multiple of 32). */
static inline void flush_acc32(const __m256i* acc, int64_t n, float s, const float* D, const float* M, float sc,
                               float* o)
{
    const __m256 vs = _mm256_set1_ps(s), vsc = _mm256_set1_ps(sc);
    for (int64_t j = 0, v = 0; j < n; j += 32, v += 4) {
        const __m256i cols[4] = {_mm256_permute2x128_si256(acc[v], acc[v + 1], 0x20),
                                 _mm256_permute2x128_si256(acc[v + 2], acc[v + 3], 0x20),
                                 _mm256_permute2x128_si256(acc[v], acc[v + 1], 0x31),
                                 _mm256_permute2x128_si256(acc[v + 2], acc[v + 3], 0x31)};
        for (int t = 0; t < 4; ++t) {
            const int64_t at = j + 8 * t;
            __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(D + at), _mm256_mul_ps(_mm256_cvtepi32_ps(cols[t]), vs),
                                       _mm256_loadu_ps(o + at));
            if (M) r = _mm256_fmadd_ps(_mm256_loadu_ps(M + at), vsc, r);
            _mm256_storeu_ps(o + at, r);
        }
    }
}
#endif

#if defined(DS_VNNI512)
/* Four coefficients as one dword (vpdpbusd's operand), zero past kk. */
static inline int32_t pack4(const int8_t* cq, int64_t i, int64_t kk)
{
    uint32_t r = 0;
    for (int t = 0; t < 4; ++t) r |= (uint32_t)(uint8_t)(i + t < kk ? cq[i + t] : 0) << (8 * t);
    return (int32_t)r;
}

/* gq_act8_i8's products over columns [0, n128) (a multiple of 128): a tile of 128 columns'
 * accumulators in registers across the group's records, 4 at a time (interleave4_512), each
 * signed byte w read as the unsigned w + 128 (vpdpbusd: u8 x i8) and 128 * sum(cq) taken off
 * the sums (exact integers). */
static void act8_i8_512(const qmat_t* q, int64_t g, int64_t a, int64_t n128, const int64_t* restrict idx,
                        const int8_t* cq, int64_t kk, const nextrun_t* nr, float s, float* restrict o)
{
    const uint8_t* rp[68];
    int32_t c4[17], csum = 0;
    const int64_t kp = (kk + 3) / 4 * 4;
    for (int64_t i = 0; i < kp; ++i) rp[i] = q->W + idx[i < kk ? i : 0] * q->ldb + a;
    for (int64_t i = 0; i < kp; i += 4) c4[i / 4] = pack4(cq, i, kk);
    for (int64_t i = 0; i < kk; ++i) csum += cq[i];
    const __m512i bias = _mm512_set1_epi8((char)0x80), off = _mm512_set1_epi32(128 * csum);
    const __m512 vs = _mm512_set1_ps(s), vsc = _mm512_setzero_ps();
    pfseq_t pf;
    pfseq_init(&pf, q, nr, nr ? nr->a : 0, nr ? nr->b - nr->a : 0, (n128 / 128) * (kp / 4));
    for (int64_t jb = 0; jb < n128; jb += 128) {
        __m512i f[8];
        for (int u = 0; u < 8; ++u) f[u] = _mm512_setzero_si512();
        for (int64_t i = 0; i < kp; i += 4) {
            pfseq_step(&pf);
            const __m512i cw = _mm512_set1_epi32(c4[i / 4]);
            for (int hf = 0; hf < 2; ++hf) {
                __m512i x[4];
                interleave4_512(_mm512_xor_si512(_mm512_loadu_si512(rp[i] + jb + 64 * hf), bias),
                                _mm512_xor_si512(_mm512_loadu_si512(rp[i + 1] + jb + 64 * hf), bias),
                                _mm512_xor_si512(_mm512_loadu_si512(rp[i + 2] + jb + 64 * hf), bias),
                                _mm512_xor_si512(_mm512_loadu_si512(rp[i + 3] + jb + 64 * hf), bias), x);
                for (int u = 0; u < 4; ++u) f[4 * hf + u] = _mm512_dpbusd_epi32(f[4 * hf + u], x[u], cw);
            }
        }
        for (int u = 0; u < 8; ++u) f[u] = _mm512_sub_epi32(f[u], off);
        __m512i w[4];
        for (int hf = 0; hf < 2; ++hf) {
            untangle4_512(f + 4 * hf, w);
            for (int L = 0; L < 4; ++L) flush16_512(w[L], q, g, a, jb + 64 * hf + 16 * L, vs, vsc, o);
        }
    }
}
#endif

/* The int8 rows' counterpart of gq_act8 (Q8_0 x Q8 activations, as llama.cpp's int8 products):
 * o[0:b-a] += hd * (s * sum_i cq_i * row idx[i][a:b]) with cq = round(c / s), s = max|c| / 127,
 * over one input group's rows (no offsets: int8 rows have none).  Rows 4 at a time: their bytes
 * interleaved per column, signed by their coefficient's sign and multiplied by |cq| (u8 x i8
 * multiply-adds, exact int32 sums), so the AVX2 and the portable paths give the same numbers.
 * act8_i8_512 does the columns up to the last multiple of 128 where the build targets AVX-512
 * VNNI (the same numbers). */
static void gq_act8_i8(const qmat_t* q, int64_t g, int64_t a, int64_t b, const int64_t* restrict idx,
                       const float* restrict c, int64_t k, float* restrict o, float* restrict D,
                       float* restrict Mbuf, float amax, const nextrun_t* nr)
{
    const int64_t kk = k < 64 ? k : 64;
    int8_t cq[68];
    float unused;
    const float s = quantize_coefs(c, k, amax, cq, &unused);
    for (int64_t i = kk; i < kk + 4; ++i) cq[i] = 0;  /* padding rows: coefficient 0 */
    (void)nr;
#if defined(DS_VNNI512)
    {
        const int64_t n128 = (b - a) / 128 * 128;
        if (n128 > 0) act8_i8_512(q, g, a, n128, idx, cq, kk, nr, s, o);
        a += n128; o += n128;
        if (a >= b) return;
    }
#endif
    group_scales(q, g, a, b - a, D, Mbuf);
    const int64_t n = b - a;
    int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    const int64_t n32 = n / 32 * 32;
    if (n32 > 0) {
        __m256i acc[ACC_CHUNK / 8];
        for (int64_t v = 0; v < n32 / 8; ++v) acc[v] = _mm256_setzero_si256();
        for (int64_t i = 0; i < kk; i += 4) {
            const uint8_t* r[4];
            for (int t = 0; t < 4; ++t) r[t] = q->W + idx[i + t < kk ? i + t : i] * q->ldb + a;
            for (int64_t ahead = i + PF_ROWS; ahead < i + PF_ROWS + 4 && ahead < kk; ++ahead) {
                const uint8_t* nr = q->W + idx[ahead] * q->ldb + a;
                for (int64_t j = 0; j < n32; j += 64) __builtin_prefetch(nr + j);
            }
            const __m256i sg[4] = {_mm256_set1_epi8(cq[i]), _mm256_set1_epi8(cq[i + 1]),
                                   _mm256_set1_epi8(cq[i + 2]), _mm256_set1_epi8(cq[i + 3])};
            const __m256i u = _mm256_set1_epi32((int)((uint32_t)(uint8_t)abs(cq[i])
                                                      | (uint32_t)(uint8_t)abs(cq[i + 1]) << 8
                                                      | (uint32_t)(uint8_t)abs(cq[i + 2]) << 16
                                                      | (uint32_t)(uint8_t)abs(cq[i + 3]) << 24));
            for (int64_t j = 0, v = 0; j < n32; j += 32, v += 4)
                acc_rows4(acc + v, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(r[0] + j)), sg[0]),
                          _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(r[1] + j)), sg[1]),
                          _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(r[2] + j)), sg[2]),
                          _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(r[3] + j)), sg[3]), u, 1);
        }
        flush_acc32(acc, n32, s, D, NULL, 0.0f, o);
        j0 = n32;
    }
#endif
    for (int64_t j = j0; j < n; ++j) {  /* portable (and the tail): the same integer sums */
        int32_t sum = 0;
        for (int64_t i = 0; i < kk; ++i) sum += cq[i] * (int32_t)((const int8_t*)q->W)[idx[i] * q->ldb + a + j];
        o[j] += D[j] * (s * (float)sum);
    }
}

#if defined(DS_VNNI512)
/* The unsigned integers of a 5- or 6-bit record r's 128 columns col..col+127 (col a multiple of
 * 128) as two vectors in the nibbles' order: lo lane L byte t = column col + 32L + t, hi lane L
 * byte t = column col + 32L + 16 + t (unpack32's planes). */
static inline void unpack128_512(const uint8_t* r, int64_t m, int bits, int64_t col, __m512i* lo, __m512i* hi)
{
    const __m512i nib = _mm512_loadu_si512(r + col / 2), m0f = _mm512_set1_epi8(15);
    __m512i hl, hh;
    if (bits == 6) {  /* byte 8L + t' of the high plane: bits 4-5 of columns 32L + t', +8, +16, +24 */
        const __m512i h = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0),
                                                   _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(r + m / 2 + col / 4))));
        const __m512i m30 = _mm512_set1_epi8(0x30);
        /* per 16-bit word: words 0-3 of a lane (bytes t < 8) take the pair at shift 0 (lo) / 4 (hi),
         * words 4-7 the pair at shift 2 / 6; moved to bits 4-5 */
        hl = _mm512_and_si512(_mm512_sllv_epi16(h, _mm512_set_epi64(0x0002000200020002LL, 0x0004000400040004LL,
                                                                    0x0002000200020002LL, 0x0004000400040004LL,
                                                                    0x0002000200020002LL, 0x0004000400040004LL,
                                                                    0x0002000200020002LL, 0x0004000400040004LL)), m30);
        hh = _mm512_and_si512(_mm512_srlv_epi16(h, _mm512_set_epi64(0x0002000200020002LL, 0,
                                                                    0x0002000200020002LL, 0,
                                                                    0x0002000200020002LL, 0,
                                                                    0x0002000200020002LL, 0)), m30);
    } else {  /* bits 5: column j's bit 4 in bit j % 8 of byte j / 8 (4 bytes per 32 columns) */
        const __m512i h = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(r + m / 2 + col / 8)));
        const __m512i bit = _mm512_set1_epi64(0x8040201008040201LL), b16 = _mm512_set1_epi8(16);
        const __m512i sl = _mm512_set_epi64(0x0d0d0d0d0d0d0d0dLL, 0x0c0c0c0c0c0c0c0cLL, 0x0909090909090909LL, 0x0808080808080808LL,
                                            0x0505050505050505LL, 0x0404040404040404LL, 0x0101010101010101LL, 0);
        const __m512i sh = _mm512_add_epi8(sl, _mm512_set1_epi8(2));
        hl = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(_mm512_shuffle_epi8(h, sl), bit), b16);
        hh = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(_mm512_shuffle_epi8(h, sh), bit), b16);
    }
    *lo = _mm512_ternarylogic_epi32(nib, m0f, hl, 0xEA);                            /* (nib & 15) | hl */
    *hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(nib, 4), m0f, hh, 0xEA);
}

/* gq_act8_wide's products over columns [0, n128): 128-column tiles' accumulators in registers
 * across the group's records, 4 at a time, unpacked to bytes (unpack128_512) and interleaved. */
static void act8_wide_512(const qmat_t* q, int64_t g, int64_t a, int64_t n128, const int64_t* restrict idx,
                          const int8_t* cq, int64_t kk, const nextrun_t* nr, float s, float sc, float* restrict o)
{
    const uint8_t* rp[68];
    int32_t c4[17];
    const int64_t kp = (kk + 3) / 4 * 4, m = q->m, hb = q->bits == 6 ? 4 : 8;  /* columns per high-plane byte */
    for (int64_t i = 0; i < kp; ++i) rp[i] = q->W + idx[i < kk ? i : 0] * q->ldb;
    for (int64_t i = 0; i < kp; i += 4) c4[i / 4] = pack4(cq, i, kk);
    const __m512 vs = _mm512_set1_ps(s), vsc = _mm512_set1_ps(sc);
    pfseq_t pf, pfh;  /* the nibble plane's and the high plane's lines */
    pfseq_init(&pf, q, nr, nr ? nr->a / 2 : 0, nr ? (nr->b - nr->a) / 2 : 0, (n128 / 128) * (kp / 4));
    pfseq_init(&pfh, q, nr, nr ? m / 2 + nr->a / hb : 0, nr ? (nr->b - nr->a) / hb : 0, (n128 / 128) * (kp / 4));
    for (int64_t j = 0; j < n128; j += 128) {
        __m512i fl[4], fh[4];
        for (int u = 0; u < 4; ++u) { fl[u] = _mm512_setzero_si512(); fh[u] = _mm512_setzero_si512(); }
        for (int64_t i = 0; i < kp; i += 4) {
            pfseq_step(&pf);
            pfseq_step(&pfh);
            __m512i lo[4], hi[4], x[4];
            for (int t = 0; t < 4; ++t) unpack128_512(rp[i + t], m, q->bits, a + j, lo + t, hi + t);
            const __m512i cw = _mm512_set1_epi32(c4[i / 4]);
            interleave4_512(lo[0], lo[1], lo[2], lo[3], x);
            for (int u = 0; u < 4; ++u) fl[u] = _mm512_dpbusd_epi32(fl[u], x[u], cw);
            interleave4_512(hi[0], hi[1], hi[2], hi[3], x);
            for (int u = 0; u < 4; ++u) fh[u] = _mm512_dpbusd_epi32(fh[u], x[u], cw);
        }
        __m512i wl[4], wh[4];
        untangle4_512(fl, wl);
        untangle4_512(fh, wh);
        for (int L = 0; L < 4; ++L) {
            flush16_512(wl[L], q, g, a, j + 32 * L, vs, vsc, o);
            flush16_512(wh[L], q, g, a, j + 32 * L + 16, vs, vsc, o);
        }
    }
}
#endif

/* The 5- / 6-bit rows' counterpart of gq_act8: o[0:b-a] += D * (s * sum_i cq_i * q_i[a:b]) + M * sc
 * over one input group's rows (a, b multiples of 32, b - a <= ACC_CHUNK).  Rows 4 at a time,
 * unpacked to bytes and interleaved per column (u8 x i8 multiply-adds: pairs stay below 2^15,
 * int32 sums exact), so the AVX2 and the portable paths give the same numbers.  act8_wide_512
 * does the columns up to the last multiple of 128 where the build targets AVX-512 VNNI (the same
 * numbers). */
static void gq_act8_wide(const qmat_t* q, int64_t g, int64_t a, int64_t b, const int64_t* restrict idx,
                         const float* restrict c, int64_t k, float* restrict o, float* restrict D,
                         float* restrict M, float amax, const nextrun_t* nr)
{
    const int64_t kk = k < 64 ? k : 64;
    int8_t cq[68];
    float sc;
    const float s = quantize_coefs(c, k, amax, cq, &sc);
    for (int64_t i = kk; i < kk + 4; ++i) cq[i] = 0;  /* padding rows: coefficient 0 */
    (void)nr;
#if defined(DS_VNNI512)
    {
        const int64_t n128 = (b - a) / 128 * 128;
        if (n128 > 0) act8_wide_512(q, g, a, n128, idx, cq, kk, nr, s, sc, o);
        a += n128; o += n128;
        if (a >= b) return;
    }
#endif
    group_scales(q, g, a, b - a, D, M);
    const int64_t n = b - a;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256i acc[ACC_CHUNK / 8];
    for (int64_t v = 0; v < n / 8; ++v) acc[v] = _mm256_setzero_si256();
    for (int64_t i = 0; i < kk; i += 4) {
        const uint8_t* r[4];
        for (int t = 0; t < 4; ++t) r[t] = q->W + idx[i + t < kk ? i + t : i] * q->ldb;
        const __m256i cw = _mm256_set1_epi32((int)((uint32_t)(uint8_t)cq[i] | (uint32_t)(uint8_t)cq[i + 1] << 8
                                                   | (uint32_t)(uint8_t)cq[i + 2] << 16
                                                   | (uint32_t)(uint8_t)cq[i + 3] << 24));
        for (int64_t j = 0, v = 0; j < n; j += 32, v += 4)
            acc_rows4(acc + v, unpack32_avx(r[0], q->m, q->bits, a + j), unpack32_avx(r[1], q->m, q->bits, a + j),
                      unpack32_avx(r[2], q->m, q->bits, a + j), unpack32_avx(r[3], q->m, q->bits, a + j), cw, 0);
    }
    flush_acc32(acc, n, s, D, M, sc, o);
#else
    for (int64_t j = 0; j < n; j += 32) {
        int32_t sum[32] = {0};
        uint8_t u[32];
        for (int64_t i = 0; i < kk; ++i) {
            unpack32(q->W + idx[i] * q->ldb, q->m, q->bits, a + j, u);
            for (int t = 0; t < 32; ++t) sum[t] += cq[i] * (int32_t)u[t];
        }
        for (int t = 0; t < 32; ++t) o[j + t] += D[j + t] * (s * (float)sum[t]) + M[j + t] * sc;
    }
#endif
}

/* Input-grouped rows: for each run of selected rows in one input group, acc = sum c q (raw
 * integers), then o += D * acc + M * sum c with the group's scales (group_scales; the int8
 * activations' kernels compute them themselves).  Runs need not be sorted; sorted units make the
 * fewest flushes.  `unit` is offset like idx.  Each run's kernel is told the next run (the next
 * chunk's first after the last), whose records it prefetches. */
static void gq_grouped(const qmat_t* q, int64_t a, int64_t b, const int64_t* restrict idx,
                       const int64_t* restrict unit, const float* restrict c, int64_t k, float* restrict o)
{
    float acc[ACC_CHUNK], D[ACC_CHUNK], M[ACC_CHUNK];
    for (int64_t j = a; j < b; ++j) o[j - a] = 0.0f;
    const int64_t step = q->bits != 8 ? (ACC_CHUNK / q->G) * q->G : ACC_CHUNK;  /* packed rows: whole groups */
    for (int64_t a2 = a; a2 < b; a2 += step) {
        const int64_t b2 = a2 + step < b ? a2 + step : b;
        for (int64_t i0 = 0; i0 < k;) {
            const int64_t g = unit[i0] / q->GI;
            int64_t i1 = i0 + 1;
            float sc = c[i0];
            while (i1 < k && unit[i1] / q->GI == g) sc += c[i1++];
            const float amax = q->gmax ? q->gmax[g] : -1.0f;
            const int wide = q->bits == 5 || q->bits == 6;
#if defined(DS_VNNI512)
            /* the next run (prefetched by the AVX-512 kernels): this chunk's next, or the next chunk's first */
            const int64_t p = i1 < k ? i1 : 0;
            nextrun_t next = {idx + p, 1, i1 < k ? a2 : b2, 0};
            next.b = i1 < k ? b2 : (b2 + step < b ? b2 + step : b);
            while (p + next.k < k && next.k < 64 && unit[p + next.k] / q->GI == unit[p] / q->GI) next.k++;
            const nextrun_t* pnr = k > 0 && next.a < b ? &next : NULL;
#else
            const nextrun_t* pnr = NULL;
#endif
            if (q->act8 && q->bits == 4 && q->G == 32 && i1 - i0 <= 64) {
                gq_act8(q, g, a2, b2, idx + i0, c + i0, i1 - i0, o + (a2 - a), D, M, amax, pnr);
            } else if (q->act8 && q->bits == 8 && i1 - i0 <= 64) {
                gq_act8_i8(q, g, a2, b2, idx + i0, c + i0, i1 - i0, o + (a2 - a), D, M, amax, pnr);
            } else if (q->act8 && wide && i1 - i0 <= 64) {
                gq_act8_wide(q, g, a2, b2, idx + i0, c + i0, i1 - i0, o + (a2 - a), D, M, amax, pnr);
            } else {
                const float* Mg = group_scales(q, g, a2, b2 - a2, D, M) ? M : NULL;
                if (wide) gq_wide(q, a2, b2, idx + i0, c + i0, i1 - i0, acc);
                else gq_core(q, a2, b2, idx + i0, c + i0, i1 - i0, acc);
                flush_group(o + (a2 - a), acc, D, Mg, sc, b2 - a2);
            }
            i0 = i1;
        }
    }
}

static void range_any(const float* W, int64_t ld, const qmat_t* q, int64_t a, int64_t b,
                      const int64_t* idx, const int64_t* unit, const float* c, int64_t k, float* o)
{
    if (q) gq_grouped(q, a, b, idx, unit ? unit : idx, c, k, o);
    else gg_range(W + a, ld, idx, c, k, o, b - a);
}

/* ---------------------------------------------------------------- caller-runs thread pool
 * A job is a grid of chunks (column slice x block of selected rows).  The calling thread
 * publishes the job and works through the chunks itself; helper threads that are awake claim
 * chunks too (lock-free, one CAS per chunk).  The caller never waits for a helper that has not
 * claimed anything, so a descheduled helper (busy machine) costs parallelism, not a stall. */
#define MAX_HELPERS 63
#define SERIAL_WORK (1 << 20)  /* floats to read below which one thread does it all (4 MiB) */
#define COL_CHUNK 8192         /* max floats of a row one chunk streams */
#define SPIN_NS 100000         /* helpers spin this long for the next job before sleeping */
#define CHUNKS_PER_THREAD 16   /* small chunks: a preempted helper delays the end less */

typedef struct {
    const float* W; int64_t ld; const qmat_t* q; int64_t m;
    const int64_t* idx; const float* c; int64_t k;
    float* out; float* partial;
    int64_t col_chunk, row_block;
    int ncol, nrow;
} job_t;

static job_t g_job;
static _Atomic uint64_t g_state;   /* generation:32 | nchunks:16 | next chunk:16 */
static _Atomic int g_done;         /* chunks finished in the current job */
static _Atomic int g_active;       /* helpers with id < g_active may work on it */
static _Atomic int g_sleepers;
static uint32_t g_gen;
static int g_nhelpers;
static int g_atfork;
static pthread_mutex_t g_sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sleep_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_init_mu = PTHREAD_MUTEX_INITIALIZER;

static void run_chunk(const job_t* j, int ch)
{
    int cc = ch % j->ncol, rr = ch / j->ncol;
    int64_t a = (int64_t)cc * j->col_chunk, b = a + j->col_chunk;
    if (b > j->m) b = j->m;
    int64_t r0 = (int64_t)rr * j->row_block, r1 = r0 + j->row_block;
    if (r1 > j->k) r1 = j->k;
    if (r0 > r1) r0 = r1;
    float* dst = j->nrow == 1 ? j->out + a : j->partial + (int64_t)rr * j->m + a;
    range_any(j->W, j->ld, j->q, a, b, j->idx + r0, j->q && j->q->unit ? j->q->unit + r0 : NULL,
              j->c + r0, r1 - r0, dst);
}

static int try_claim(void)
{
    uint64_t s = atomic_load(&g_state);
    for (;;) {
        uint32_t n = (uint32_t)(s >> 16) & 0xffffu, next = (uint32_t)s & 0xffffu;
        if (next >= n) return -1;
        if (atomic_compare_exchange_weak(&g_state, &s, s + 1)) return (int)next;
    }
}

static int has_work(int id)
{
    uint64_t s = atomic_load(&g_state);
    return id < atomic_load(&g_active) &&
           ((uint32_t)s & 0xffffu) < ((uint32_t)(s >> 16) & 0xffffu);
}

static void* helper_main(void* arg)
{
    int id = (int)(intptr_t)arg;
    for (;;) {
        int ch;
        if (id < atomic_load(&g_active) && (ch = try_claim()) >= 0) {
            run_chunk(&g_job, ch);
            atomic_fetch_add(&g_done, 1);
            continue;
        }
        uint64_t s0 = atomic_load(&g_state);
        int64_t t0 = now_ns();
        int changed = 0;
        for (int i = 1; ; ++i) {
            CPU_RELAX();
            if (atomic_load_explicit(&g_state, memory_order_relaxed) != s0) { changed = 1; break; }
            if ((i & 63) == 0 && now_ns() - t0 > SPIN_NS) break;
        }
        if (changed) continue;
        pthread_mutex_lock(&g_sleep_mu);
        atomic_fetch_add(&g_sleepers, 1);
        while (!has_work(id)) pthread_cond_wait(&g_sleep_cv, &g_sleep_mu);
        atomic_fetch_sub(&g_sleepers, 1);
        pthread_mutex_unlock(&g_sleep_mu);
    }
    return NULL;
}

static void atfork_child(void)
{   /* the helpers do not exist in a forked child: start over */
    g_nhelpers = 0;
    atomic_store(&g_active, 0);
    atomic_store(&g_sleepers, 0);
    atomic_store(&g_state, 0);
    pthread_mutex_init(&g_sleep_mu, NULL);
    pthread_cond_init(&g_sleep_cv, NULL);
    pthread_mutex_init(&g_call_mu, NULL);
    pthread_mutex_init(&g_init_mu, NULL);
}

static void ensure_helpers(int nh)
{
    if (g_nhelpers >= nh) return;
    pthread_mutex_lock(&g_init_mu);
    if (!g_atfork) { pthread_atfork(NULL, NULL, atfork_child); g_atfork = 1; }
    while (g_nhelpers < nh && spawn_detached(helper_main, g_nhelpers, 1 << 20) == 0)
        g_nhelpers++;
    pthread_mutex_unlock(&g_init_mu);
}

/* out[0:m] = sum_i c[i] * W[idx[i], 0:m] on up to nthreads threads.  The chunk grid depends only
 * on (m, k, nthreads), and partial sums are added in a fixed order. */
static void gg_parallel_any(const float* W, int64_t ld, const qmat_t* q, int64_t m,
                            const int64_t* idx, const float* c, int64_t k, float* out,
                            int nthreads)
{
    if (m <= 0) return;
    if (nthreads > MAX_HELPERS + 1) nthreads = MAX_HELPERS + 1;
    if (nthreads <= 1 || m * (k > 0 ? k : 1) < SERIAL_WORK || k < 8) {
        range_any(W, ld, q, 0, m, idx, q ? q->unit : NULL, c, k, out);
        return;
    }
    if (pthread_mutex_trylock(&g_call_mu) != 0) {  /* another thread is using the pool */
        range_any(W, ld, q, 0, m, idx, q ? q->unit : NULL, c, k, out);
        return;
    }
    ensure_helpers(nthreads - 1);
    job_t j;
    j.W = W; j.ld = ld; j.q = q; j.m = m; j.idx = idx; j.c = c; j.k = k; j.out = out; j.partial = NULL;
    int64_t ncol = m <= COL_CHUNK ? 1 : (m + COL_CHUNK - 1) / COL_CHUNK;
    {   /* column chunks: multiples of 16 (and of the group size for 4-bit rows) */
        int64_t al = 16;
        if (q && q->bits != 8)
            while (al % q->G) al += 16;  /* lcm(16, G) */
        j.col_chunk = (((m + ncol - 1) / ncol) + al - 1) / al * al;
    }
    j.ncol = (int)((m + j.col_chunk - 1) / j.col_chunk);
    int64_t target = CHUNKS_PER_THREAD * (int64_t)nthreads;
    int64_t nrow = (target + j.ncol - 1) / j.ncol;
    if (nrow > k / 32) nrow = k / 32;
    if (nrow < 1) nrow = 1;
    j.row_block = (k + nrow - 1) / nrow;
    j.nrow = (int)((k + j.row_block - 1) / j.row_block);
    if (j.nrow > 1) {
        j.partial = (float*)malloc((size_t)j.nrow * (size_t)m * sizeof(float));
        if (!j.partial) { j.nrow = 1; j.row_block = k; }
    }
    int nchunks = j.ncol * j.nrow;
    if (nchunks > 0xffff) {  /* cannot happen with the limits above; stay safe */
        free(j.partial);
        pthread_mutex_unlock(&g_call_mu);
        range_any(W, ld, q, 0, m, idx, q ? q->unit : NULL, c, k, out);
        return;
    }
    g_job = j;
    atomic_store(&g_done, 0);
    atomic_store(&g_active, nthreads - 1);
    g_gen++;
    atomic_store(&g_state, ((uint64_t)g_gen << 32) | ((uint64_t)nchunks << 16));
    if (atomic_load(&g_sleepers) > 0) {
        pthread_mutex_lock(&g_sleep_mu);
        pthread_cond_broadcast(&g_sleep_cv);
        pthread_mutex_unlock(&g_sleep_mu);
    }
    int ch;
    while ((ch = try_claim()) >= 0) {
        run_chunk(&g_job, ch);
        atomic_fetch_add(&g_done, 1);
    }
    for (int spins = 0; atomic_load(&g_done) < nchunks; ++spins) {
        if (spins < 4096) CPU_RELAX(); else sched_yield();
    }
    atomic_store(&g_active, 0);
    if (j.nrow > 1) {
        for (int64_t q = 0; q < m; ++q) {
            float s = j.partial[q];
            for (int r = 1; r < j.nrow; ++r) s += j.partial[(int64_t)r * m + q];
            out[q] = s;
        }
        free(j.partial);
    }
    pthread_mutex_unlock(&g_call_mu);
}

#define gg_parallel(W, ld, m, idx, c, k, out, nt) gg_parallel_any(W, ld, NULL, m, idx, c, k, out, nt)

static int check_idx(const int64_t* idx, int64_t k, int64_t n)
{
    for (int64_t i = 0; i < k; ++i)
        if (idx[i] < 0 || idx[i] >= n) return -1;
    return 0;
}

DS_API int ds_gather_gemv(const float* W, int64_t rows, int64_t ld, int64_t m,
                          const int64_t* idx, const float* c, int64_t k, float* out, int nthreads)
{
    if (check_idx(idx, k, rows)) return -1;
    gg_parallel(W, ld, m, idx, c, k, out, nthreads);
    return 0;
}

/* |v| as an order-preserving unsigned key; every NaN maps to one key above +inf. */
static inline uint32_t abs_key(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) u = 0x7f800000u;  /* NaN counts as +inf */
    return u;
}

/* The k entries of largest |v|, ties broken by lower index (= a stable descending sort),
 * written to out in ascending index order.  Radix select on the order-preserving keys: an
 * 11-bit first level (the exponent and 3 mantissa bits, scanned down from the largest key's
 * bin), then two 10-bit levels over the entries that share the threshold's prefix; keys live on
 * the stack up to 4096 entries (a decode step's vectors), so most calls allocate nothing.
 * Returns the count written (min(max(k,0),n)) or -1 when out of memory. */
#define TOPK_STACK 4096
DS_API int64_t ds_topk_abs(const float* v, int64_t n, int64_t k, int64_t* out)
{
    if (k <= 0 || n <= 0) return 0;
    if (k >= n) {
        for (int64_t i = 0; i < n; ++i) out[i] = i;
        return n;
    }
    uint32_t sbuf[TOPK_STACK];
    uint32_t* key = n <= TOPK_STACK ? sbuf : (uint32_t*)malloc((size_t)n * sizeof(uint32_t));
    if (!key) return -1;
    uint32_t h1[2048];
    memset(h1, 0, sizeof(h1));
    uint32_t kmax = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = abs_key(v[i]);
        key[i] = u;
        h1[u >> 20]++;
        kmax = u > kmax ? u : kmax;
    }
    int64_t cum = 0, rem = k;
    int b = (int)(kmax >> 20);
    for (; b > 0; --b) {
        if (cum + h1[b] >= rem) break;
        cum += h1[b];
    }
    rem -= cum;
    uint32_t thr = (uint32_t)b << 20;
    for (int shift = 10; shift >= 0; shift -= 10) {  /* the threshold's lower 20 bits, 10 at a time */
        const uint32_t prefix = ~((1u << (shift + 10)) - 1u);
        uint32_t h2[1024];
        memset(h2, 0, sizeof(h2));
        for (int64_t i = 0; i < n; ++i)
            if ((key[i] & prefix) == thr) h2[(key[i] >> shift) & 1023u]++;
        int c = 1023;
        int64_t cum2 = 0;
        for (; c > 0; --c) {
            if (cum2 + h2[c] >= rem) break;
            cum2 += h2[c];
        }
        rem -= cum2;
        thr |= (uint32_t)c << shift;
    }
    /* rem (>= 1) entries equal to thr are taken, lowest indices first. */
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = key[i];
        if (u > thr) out[m++] = i;
        else if (u == thr && rem > 0) { out[m++] = i; --rem; }
    }
    if (key != sbuf) free(key);
    return m;
}

/* idx = the top-k |v| (ds_topk_abs rule, ascending), coef = v[idx]; returns the count or -1. */
static int64_t select_coefs(const float* v, int64_t n, int64_t k, int64_t* idx, float* coef)
{
    const int64_t got = ds_topk_abs(v, n, k, idx);
    for (int64_t i = 0; i < got; ++i) coef[i] = v[idx[i]];
    return got;
}

/* Top-k_sel of |v| (ds_topk_abs rule) -> idx (ascending), then
 * out[0:m] = sum_{i in idx} v[i] * W[i, 0:m].  One half of a DIP MLP: v = x with W = the
 * [gate|up]^T layout, or v = h with W = W_down^T.  coef: work buffer of >= k floats.
 * Returns the number selected, or -1 when out of memory. */
DS_API int64_t ds_select_gemv(const float* v, int64_t n, int64_t k, const float* W, int64_t ld,
                              int64_t m, int64_t* idx, float* coef, float* out, int nthreads)
{
    const int64_t got = select_coefs(v, n, k, idx, coef);
    if (got < 0) return -1;
    gg_parallel(W, ld, m, idx, coef, got, out, nthreads);
    return got;
}

/* Whether a quantized matrix's description is one the kernels handle, its rows ldb bytes apart
 * holding all m columns (checked at every entry: a bad description is an error code, not a read
 * past a row). */
static int valid_kind(int bits, int64_t G, int64_t GI, int hk, int64_t m, int64_t ldb)
{
    if (m <= 0 || G <= 0 || GI <= 0 || hk < HK_F16 || hk > HK_Q6K) return 0;
    if (ldb < (bits == 8 ? m : m / 2 + (bits == 5 ? m / 8 : bits == 6 ? m / 4 : 0))) return 0;
    if (bits == 8) return hk == HK_F16 && G == m;
    if (bits != 4 && bits != 5 && bits != 6) return 0;
    if (m % G || G % 2 || (bits != 4 && G != 32) || (hk != HK_F16 && G != 32)) return 0;
    return hk == HK_F16 || (hk == HK_K45 && GI == 32 && bits != 6) || (hk == HK_Q6K && GI == 16 && bits == 6);
}

/* Input-grouped variants (qmat_t's HD / HM / GI): select-GEMV over all units, and gather with
 * each selected row's unit given (rows may be cache slots).  unit NULL: the rows are the units. */
DS_API int64_t ds_select_gemv_qg(const float* v, int64_t n, int64_t k, const uint8_t* Wq, int64_t ldb,
                                 int64_t G, int bits, const void* HD, const uint16_t* HM, int64_t GI, int hk,
                                 int zp, int64_t m, int64_t* idx, float* coef, float* out, int nthreads, int act8)
{
    if (GI <= 0 || !valid_kind(bits, G, GI, hk, m, ldb)) return -1;
    const int64_t got = select_coefs(v, n, k, idx, coef);
    if (got < 0) return -1;
    if (m <= 0) return got;
    qmat_t q = {Wq, ldb, G, bits, HD, HM, GI, hk, zp, m, NULL, act8, NULL};
    gg_parallel_any(NULL, 0, &q, m, idx, coef, got, out, nthreads);
    return got;
}

DS_API int ds_gather_gemv_qg(const uint8_t* Wq, int64_t rows, int64_t ldb, int64_t G, int bits,
                             const void* HD, const uint16_t* HM, int64_t GI, int hk, int zp, int64_t units,
                             int64_t m, const int64_t* idx, const int64_t* unit, const float* c,
                             int64_t k, float* out, int nthreads, int act8, const float* gmax,
                             int64_t n_gmax)
{
    if (GI <= 0 || !valid_kind(bits, G, GI, hk, m, ldb) || check_idx(idx, k, rows) || (unit && check_idx(unit, k, units)) || (!unit && rows > units)
        || (gmax && n_gmax < (units + GI - 1) / GI))
        return -1;
    qmat_t q = {Wq, ldb, G, bits, HD, HM, GI, hk, zp, m, unit, act8, gmax};
    gg_parallel_any(NULL, 0, &q, m, idx, c, k, out, nthreads);
    return 0;
}

DS_API int ds_threads(void) { return MAX_HELPERS + 1; }

DS_API int ds_version(void) { return KERNEL_VERSION; }
