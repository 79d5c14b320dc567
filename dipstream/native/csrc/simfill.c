/* The cache simulator's random over-capacity fill (dipstream/simulator/policies.py,
 * CachePolicy._random_new): per row (hook), the `over` units of a bit-packed set of lowest
 * pseudo-random priority, the units a cache that one token's mask overfills does not keep.
 *
 * A row's set is uint64 words, unit i at word i / 64, bit i % 64 (dipstream/simulator/bits.py).
 * The priority of unit u in a row is splitmix64's finaliser of base + (u + 1) * G2 (wrapping
 * uint64; base: the row's stream, policies._streams), policies.unit_priority bit for bit. Both
 * steps are bijections of uint64, so a row's priorities are distinct: no ties to break.
 *
 * Per row: list the set units and their priorities. The priorities are uniform, so the over-th
 * smallest lies in a window around over / (k + 1) of their range (a few binomial standard
 * deviations wide); the priorities in it (or, where the window misses, all of them) go through a
 * histogram of their top bits, whose bucket that holds the over-th smallest is sorted. The units
 * of priority up to that one are the row's drops. Where the build targets
 * AVX-512 (VBMI2, for the byte compress) and BMI2, the listing, the priorities and the write-back
 * run on vectors and pdep; elsewhere plain loops give the same bits. */
#include "common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI2__) && defined(__BMI2__)
#include <immintrin.h>
#define SIM_AVX512 1
#else
#define SIM_AVX512 0
#endif

#define SIM_M1 0xBF58476D1CE4E5B9ULL
#define SIM_M2 0x94D049BB133111EBULL
#define SIM_G2 0xD6E8FEB86659FD93ULL
#define SIM_SLACK 64  /* entries past a row's units that the vector loops may write */
#ifndef SIM_WINDOW_SD  /* the candidate window's half-width in standard deviations (tests narrow it) */
#define SIM_WINDOW_SD 4.0
#endif

static inline uint64_t sim_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= SIM_M1;
    x ^= x >> 27;
    x *= SIM_M2;
    x ^= x >> 31;
    return x;
}

static int cmp_u64(const void* a, const void* b)
{
    const uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
    return (x > y) - (x < y);
}

/* The rank-th smallest (1-based, 1 <= rank <= n) of the n values v (reordered). */
static uint64_t sim_kth(uint64_t* v, int64_t n, int64_t rank)
{
    if (n <= 32) {  /* insertion sort: a bucket of a uniform histogram holds a handful */
        for (int64_t i = 1; i < n; ++i) {
            const uint64_t x = v[i];
            int64_t j = i - 1;
            for (; j >= 0 && v[j] > x; --j) v[j + 1] = v[j];
            v[j + 1] = x;
        }
    } else {
        qsort(v, (size_t)n, sizeof(uint64_t), cmp_u64);
    }
    return v[rank - 1];
}

/* The rank-th smallest (1-based, 1 <= rank <= n) of the n distinct values v, all in [lo, hi]:
 * a histogram of their top bits above lo (a few values per bucket where they are spread
 * evenly) finds the bucket that holds it, whose values (copied to tmp, n entries) are sorted. */
static uint64_t sim_select(const uint64_t* v, int64_t n, int64_t rank, uint64_t lo, uint64_t hi, uint64_t* tmp)
{
    int hb = 1;
    while (hb < 11 && ((int64_t)1 << (hb + 2)) < n) ++hb;
    const uint64_t span = hi - lo;
    const int width = span ? 64 - __builtin_clzll(span) : 0;
    const int shift = width > hb ? width - hb : 0;  /* (v - lo) >> shift < 2^hb */
    const int64_t nb = (int64_t)(span >> shift) + 1;
    uint32_t hist[2048];
    memset(hist, 0, sizeof(uint32_t) * (size_t)nb);
    for (int64_t i = 0; i < n; ++i) hist[(v[i] - lo) >> shift]++;
    int64_t b, r;  /* the bucket, and the rank there (counted from the nearer end) */
    if (2 * rank <= n) {
        int64_t cum = 0;
        for (b = 0; cum + hist[b] < rank; ++b) cum += hist[b];
        r = rank - cum;
    } else {
        const int64_t need = n - rank + 1;  /* the rank-th smallest is the need-th largest */
        int64_t cum = 0;
        for (b = nb - 1; cum + hist[b] < need; --b) cum += hist[b];
        r = hist[b] - (need - cum) + 1;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i)
        if ((v[i] - lo) >> shift == (uint64_t)b) tmp[m++] = v[i];
    return sim_kth(tmp, m, r);
}

/* units[0:k] = the set units of the row's words x (W of them, the last masked by tail), ascending. */
static void sim_list(const uint64_t* x, int64_t W, uint64_t tail, uint32_t* units)
{
    int64_t j = 0;
#if SIM_AVX512
    static const uint8_t iota[64] = {
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,
        30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
        58, 59, 60, 61, 62, 63};
    const __m512i io = _mm512_loadu_si512(iota);
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t m = w == W - 1 ? x[w] & tail : x[w];
        const __m512i pos = _mm512_maskz_compress_epi8(_cvtu64_mask64(m), io);
        const __m512i wb = _mm512_set1_epi32((int)(w * 64));
        const int c = __builtin_popcountll(m);
        _mm512_storeu_si512(units + j, _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(pos)), wb));
        if (c > 16) {
            _mm512_storeu_si512(units + j + 16,
                                _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(pos, 1)), wb));
            if (c > 32) {
                _mm512_storeu_si512(units + j + 32,
                                    _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(pos, 2)), wb));
                _mm512_storeu_si512(units + j + 48,
                                    _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(pos, 3)), wb));
            }
        }
        j += c;
    }
#else
    for (int64_t w = 0; w < W; ++w) {
        uint64_t m = w == W - 1 ? x[w] & tail : x[w];
        const int c = __builtin_popcountll(m);
        for (int i = 0; i < c; ++i) {
            units[j + i] = (uint32_t)(w * 64 + __builtin_ctzll(m));
            m &= m - 1;
        }
        j += c;
    }
#endif
}

/* pri[i] = mix(b0 + units[i] * G2) for i < k (b0 = base + G2: unit u's stream is base + (u + 1) * G2);
 * also cand[0:nc] = the priorities in [lo, hi] (nc returned), *below = the number below lo. cand
 * holds k + 8 entries. */
static int64_t sim_priorities(const uint32_t* units, int64_t k, uint64_t b0, uint64_t* pri, uint64_t lo, uint64_t hi,
                              uint64_t* cand, int64_t* below)
{
    int64_t i = 0, nc = 0, nb = 0;
#if SIM_AVX512
    const __m512i g2 = _mm512_set1_epi64((long long)SIM_G2), m1 = _mm512_set1_epi64((long long)SIM_M1),
                  m2 = _mm512_set1_epi64((long long)SIM_M2), bv = _mm512_set1_epi64((long long)b0),
                  lov = _mm512_set1_epi64((long long)lo), hiv = _mm512_set1_epi64((long long)hi);
    for (; i < k; i += 8) {
        const __mmask8 t = k - i >= 8 ? 0xFF : (__mmask8)((1u << (k - i)) - 1u);
        __m512i v = _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(t, units + i));
        v = _mm512_add_epi64(_mm512_mullo_epi64(v, g2), bv);
        v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 30)), m1);
        v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 27)), m2);
        v = _mm512_xor_si512(v, _mm512_srli_epi64(v, 31));
        _mm512_mask_storeu_epi64(pri + i, t, v);
        const __mmask8 lt = _mm512_mask_cmplt_epu64_mask(t, v, lov);
        const __mmask8 in = _mm512_mask_cmple_epu64_mask(t & ~lt, v, hiv);
        nb += __builtin_popcount(lt);
        _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi64(in, v));
        nc += __builtin_popcount(in);
    }
#else
    for (; i < k; ++i) {
        const uint64_t p = sim_mix(b0 + (uint64_t)units[i] * SIM_G2);
        pri[i] = p;
        nb += p < lo;
        cand[nc] = p;
        nc += p >= lo && p <= hi;
    }
#endif
    *below = nb;
    return nc;
}

/* out[w] = the units of x[w] (the row's set, W words) whose flag is set: the set units' flags
 * in order, bit j of the bytes flags, one per set unit. */
static void sim_deposit(const uint64_t* x, int64_t W, uint64_t tail, const uint8_t* flags, uint64_t* out)
{
    int64_t j = 0;
    for (int64_t w = 0; w < W; ++w) {
        const uint64_t m = w == W - 1 ? x[w] & tail : x[w];
        uint64_t lo, hi;
        memcpy(&lo, flags + (j >> 3), 8);
        memcpy(&hi, flags + (j >> 3) + 8, 8);
        const int s = (int)(j & 7);
        const uint64_t f = (lo >> s) | ((hi << 1) << (63 - s));  /* flags j, j + 1, ... */
#if SIM_AVX512
        out[w] = _pdep_u64(f, m);
#else
        uint64_t o = 0, mm = m, ff = f;
        while (mm) {
            const uint64_t bit = mm & (~mm + 1);
            o |= (ff & 1) ? bit : 0;
            ff >>= 1;
            mm ^= bit;
        }
        out[w] = o;
#endif
        j += __builtin_popcountll(m);
    }
}

/* Per row r of n_rows: out[r] = the over[r] set units of new[r] of lowest priority
 * mix(base[r] + (unit + 1) * G2). Rows with over[r] == 0 get no units. Bits past n_units are
 * ignored (and never set in out).
 *   new, out: n_rows * n_words uint64 (len_new, len_out: their lengths in words), n_words =
 *             ceil(n_units / 64), n_units < 2^31; over: len_over = n_rows int64; base: len_base =
 *             n_rows uint64.
 * Returns 0; -1 when a length does not match the shapes (or a needed pointer is NULL), -2 when
 * some over[r] is negative or more than row r's set units, -3 when out of memory. On an error
 * out's contents are unspecified. */
DS_API int ds_sim_random_drop(const uint64_t* new_words, int64_t len_new, int64_t n_rows, int64_t n_units,
                              const int64_t* over, int64_t len_over, const uint64_t* base, int64_t len_base,
                              uint64_t* out, int64_t len_out)
{
    if (n_rows < 0 || n_units < 0 || n_units >= ((int64_t)1 << 31)) return -1;
    const int64_t W = (n_units + 63) / 64;
    if (W > 0 && n_rows > INT64_MAX / W) return -1;
    const int64_t total = n_rows * W;
    if (len_new != total || len_out != total || len_over != n_rows || len_base != n_rows) return -1;
    if (total > 0 && (!new_words || !out)) return -1;
    if (n_rows > 0 && (!over || !base)) return -1;
    const uint64_t tail = (n_units % 64) ? (~0ULL >> (64 - n_units % 64)) : ~0ULL;
    const size_t n = (size_t)n_units + SIM_SLACK;
    uint64_t* pri = NULL;  /* scratch: priorities, units, flags (allocated on the first row that needs it) */
    uint32_t* units = NULL;
    uint8_t* flags = NULL;
    int rc = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
        const uint64_t* nw = new_words + r * W;
        uint64_t* ow = out + r * W;
        int64_t k = 0;
        for (int64_t w = 0; w < W; ++w)
            k += __builtin_popcountll(w == W - 1 ? nw[w] & tail : nw[w]);
        const int64_t ov = over[r];
        if (ov < 0 || ov > k) { rc = -2; break; }
        if (ov == 0 || ov == k) {  /* none, or every new unit */
            for (int64_t w = 0; w < W; ++w)
                ow[w] = ov == 0 ? 0 : (w == W - 1 ? nw[w] & tail : nw[w]);
            continue;
        }
        if (!pri) {
            pri = (uint64_t*)malloc(n * (sizeof(uint64_t) * 3 + sizeof(uint32_t)) + n / 8 + 16);
            if (!pri) { rc = -3; break; }
            units = (uint32_t*)(pri + 3 * n);  /* pri: n priorities, then 2 n candidates */
            flags = (uint8_t*)(units + n);
            memset(flags, 0, n / 8 + 16);
        }
        uint64_t* cand = pri + n;  /* 2 n entries */
        sim_list(nw, W, tail, units);
        /* The priorities are uniform: the ov-th smallest is near ov / (k + 1) of their range, within
         * a few standard deviations of the count below a threshold (binomial); the priorities in
         * that window are the candidates, all of them where the window misses. */
        const double q = (double)ov / (double)(k + 1);
        const double d = SIM_WINDOW_SD * sqrt((double)k * q * (1.0 - q)) + 4.0;
        const double qlo = q - d / (double)k, qhi = q + d / (double)k;
        const uint64_t lo = qlo <= 0.0 ? 0 : (uint64_t)ldexp(qlo, 64);
        const uint64_t hi = qhi >= 1.0 ? UINT64_MAX : (uint64_t)ldexp(qhi, 64);
        int64_t below;
        const int64_t nc = sim_priorities(units, k, base[r] + SIM_G2, pri, lo, hi, cand, &below);
        const uint64_t kth = below < ov && ov <= below + nc ? sim_select(cand, nc, ov - below, lo, hi, cand + nc)
                                                            : sim_select(pri, k, ov, 0, UINT64_MAX, cand);
        /* flag the units of priority up to it (exactly ov of them), and write them back */
        int64_t i = 0;
#if SIM_AVX512
        const __m512i kv = _mm512_set1_epi64((long long)kth);
        for (; i + 8 <= k; i += 8)
            flags[i >> 3] = (uint8_t)_mm512_cmple_epu64_mask(_mm512_loadu_si512(pri + i), kv);
#endif
        for (; i < k; i += 8) {
            uint8_t f = 0;
            for (int t = 0; t < 8 && i + t < k; ++t) f |= (uint8_t)((pri[i + t] <= kth) << t);
            flags[i >> 3] = f;
        }
        sim_deposit(nw, W, tail, flags, ow);
    }
    free(pri);
    return rc;
}
