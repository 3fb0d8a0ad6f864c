/* Fused encoder activations for the transfer kernel (layerflow/fused_encode.py).

   Given one pre-activation matrix P = x W_enc [T, F] and m affine variants
       z_v = (alpha_v P + bias_v) * scale          (scale: TopK decoder-norm rescaling, or ones)
   select each variant's active latents without writing z_v to memory:
     - topk:      the k largest z per row, values after a ReLU (SAELens' TopK);
     - threshold: every z > threshold[f] (ReLU: 0; JumpReLU: its thresholds, clamped at 0).
   z is rounded as torch rounds (alpha P + bias) * scale (a fused multiply-add, then a multiply),
   so the selected latents and their values equal torch's, up to ties at the k-th value.

   A row of P is read once from memory: it is processed in chunks of 1024 latents, every
   variant in turn while the chunk is in L1, 16 latents at a time (vectorised), comparing z with
   a per-variant threshold and appending only the latents above it. Top-k then needs no
   data-dependent branching, which dominates a quickselect on a CPU:
     1. the threshold is a little below the previous row's k-th value, so usually between k
        and a few k latents are candidates (fewer than k: lower it and redo that variant);
     2. the exact k-th value among the candidates comes from a bisection on the bits of the
        floats, counting with vectorisable loops, and the k largest are kept.
   The result is exact whatever the guess; ties at the k-th value go to the lower indices.

   Rows are split between threads with OpenMP when the library is built with it (it then uses
   torch's own OpenMP runtime and threads); otherwise fused_encode.py calls it on row ranges
   from a thread pool (ctypes drops the GIL). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 16
#define CHUNK 1024 /* latents of a row computed for every variant in turn, while they are in L1 */
#define PREFETCH_AHEAD 512 /* floats: 2 KiB ahead, so the next page's lines are on their way */

/* Bitmask of z[j] > thr[j * thr_step], j < 16. */
static inline uint32_t block_above(const float *z, const float *thr, int thr_step) {
#if defined(__AVX512F__)
    __m512 t = thr_step ? _mm512_loadu_ps(thr) : _mm512_set1_ps(*thr);
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(z), t, _CMP_GT_OQ);
#elif defined(__AVX2__)
    __m256 t_lo = thr_step ? _mm256_loadu_ps(thr) : _mm256_set1_ps(*thr);
    __m256 t_hi = thr_step ? _mm256_loadu_ps(thr + 8) : t_lo;
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z), t_lo, _CMP_GT_OQ))
         | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + 8), t_hi, _CMP_GT_OQ)) << 8;
#else
    uint32_t mask = 0;
    for (int j = 0; j < BLOCK; j++) mask |= (uint32_t)(z[j] > thr[j * thr_step]) << j;
    return mask;
#endif
}

/* z = fma(alpha, p, bias) * scale for 16 latents (the rounding of torch's add(bias, P, alpha)
   then mul), into z; returns the bitmask of z > thr[j * thr_step]. */
static inline uint32_t block_variant(const float *p, const float *bias, const float *scale, float alpha,
                                     const float *thr, int thr_step, float *z) {
#if defined(__AVX512F__)
    __m512 v = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(alpha), _mm512_loadu_ps(p), _mm512_loadu_ps(bias)),
                             _mm512_loadu_ps(scale));
    _mm512_storeu_ps(z, v);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(z, _mm256_mul_ps(_mm256_fmadd_ps(a, _mm256_loadu_ps(p), _mm256_loadu_ps(bias)),
                                      _mm256_loadu_ps(scale)));
    _mm256_storeu_ps(z + 8, _mm256_mul_ps(_mm256_fmadd_ps(a, _mm256_loadu_ps(p + 8), _mm256_loadu_ps(bias + 8)),
                                          _mm256_loadu_ps(scale + 8)));
#else
    for (int j = 0; j < BLOCK; j++) z[j] = fmaf(alpha, p[j], bias[j]) * scale[j];
#endif
    return block_above(z, thr, thr_step);
}

/* Append the z > t of latents [begin, end) (a multiple of 16 long, or the row's end) to cv/ci. */
static int64_t append_above(const float *p, const float *bias, const float *scale, float alpha, float t,
                            int64_t begin, int64_t end, float *cv, int64_t *ci, int64_t n) {
    float z[BLOCK];
    int64_t f0 = begin;
    for (; f0 + BLOCK <= end; f0 += BLOCK) {
        __builtin_prefetch(p + f0 + PREFETCH_AHEAD);
        for (uint32_t mask = block_variant(p + f0, bias + f0, scale + f0, alpha, &t, 0, z); mask; mask &= mask - 1) {
            int j = __builtin_ctz(mask);
            cv[n] = z[j]; ci[n] = f0 + j; n++;
        }
    }
    for (; f0 < end; f0++) {
        float value = fmaf(alpha, p[f0], bias[f0]) * scale[f0];
        if (value > t) { cv[n] = value; ci[n] = f0; n++; }
    }
    return n;
}

/* A uint32 that orders as the float does (NaN aside). */
static inline uint32_t order_key(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float from_order_key(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Write the k largest of cv[0..n) to out_v (after a ReLU) and out_i, lowest indices first among
   ties; return the k-th largest. `keys` has room for n rounded up to 16. n < k happens only
   when NaNs leave fewer than k comparable values: the rest of the output is (index 0, value 0). */
static float keep_top(const float *cv, const int64_t *ci, int64_t n, int64_t k, uint32_t *keys,
                      float *out_v, int64_t *out_i) {
    if (n < k) {
        for (int64_t i = 0; i < k; i++) {
            out_v[i] = i < n && cv[i] > 0.0f ? cv[i] : 0.0f;
            out_i[i] = i < n ? ci[i] : 0;
        }
        return NAN;
    }
    int64_t padded = (n + BLOCK - 1) / BLOCK * BLOCK;
    uint32_t lo = UINT32_MAX, hi = 0;
    for (int64_t i = 0; i < n; i++) {
        keys[i] = order_key(cv[i]);
        lo = keys[i] < lo ? keys[i] : lo;
        hi = keys[i] > hi ? keys[i] : hi;
    }
    for (int64_t i = n; i < padded; i++) keys[i] = 0;  /* below every trial key: lo >= 1 */
    /* The largest K with #(key >= K) >= k is the k-th largest key. It lies in [lo, hi], so it
       shares their common leading bits; bisect on the bits below. */
    int free_bits = lo == hi ? 0 : 32 - __builtin_clz(lo ^ hi);
    uint32_t K = free_bits == 32 ? 0 : (lo >> free_bits) << free_bits;
    for (int bit = free_bits - 1; bit >= 0; bit--) {
        uint32_t trial = K | (1u << bit);
        int32_t c = 0;
        for (int64_t i = 0; i < padded; i++) c += keys[i] >= trial;
        if (c >= k) K = trial;
    }
    int32_t ties = (int32_t)k;
    for (int64_t i = 0; i < n; i++) ties -= keys[i] > K;  /* how many of the k equal K */
    int64_t out = 0;
    for (int64_t i = 0; i < n && out < k; i++) {
        int take = keys[i] > K || (keys[i] == K && ties > 0);
        ties -= keys[i] == K;
        if (take) {
            out_v[out] = cv[i] > 0.0f ? cv[i] : 0.0f;
            out_i[out] = ci[i];
            out++;
        }
    }
    return from_order_key(K);
}

/* Work space of one thread: candidates of each variant, and its threshold guess. */
typedef struct {
    float *values, *guess;
    int64_t *indices, *count;
    uint32_t *keys;
} TopkWork;

/* Row r's top-k for every variant. */
static void topk_row(const float *p, int64_t r, int64_t T, int64_t F, int64_t m, const float *alphas,
                     const float *biases, const float *scale, int64_t k, TopkWork *w, float *out_values,
                     int64_t *out_indices) {
    int64_t room = F + BLOCK, *n = w->count;
    float t[m];
    /* candidates: z above a little less than the previous row's k-th value (all z at first) */
    for (int64_t v = 0; v < m; v++) {
        n[v] = 0;
        t[v] = isnan(w->guess[v]) ? -INFINITY : w->guess[v] - (0.1f * fabsf(w->guess[v]) + 1e-6f);
    }
    for (int64_t c0 = 0; c0 < F; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < F ? c0 + CHUNK : F;
        for (int64_t v = 0; v < m; v++)
            n[v] = append_above(p, biases + v * F, scale, alphas[v], t[v], c0, c1, w->values + v * room,
                                w->indices + v * room, n[v]);
    }
    for (int64_t v = 0; v < m; v++) {
        float *cv = w->values + v * room, step = 0.1f * fabsf(w->guess[v]) + 1e-6f;
        int64_t *ci = w->indices + v * room;
        while (n[v] < k) {  /* the guess was too high: lower it (rare), at last to -inf */
            step *= 4;
            t[v] = isfinite(t[v] - step) && step < 1e30f ? t[v] - step : -INFINITY;
            n[v] = append_above(p, biases + v * F, scale, alphas[v], t[v], 0, F, cv, ci, 0);
            if (isinf(t[v])) break;
        }
        w->guess[v] = keep_top(cv, ci, n[v], k, w->keys, out_values + (v * T + r) * k, out_indices + (v * T + r) * k);
    }
}

/* Top-k of m variants for rows [row_begin, row_end) of P (row stride ld).
   alphas [m]; biases [m, F]; scale [F]; out_values, out_indices [m, T, k] (T = rows of P).
   Returns 0, or -1 if the work space could not be allocated. */
int64_t topk_variants(const float *P, int64_t ld, int64_t T, int64_t F, int64_t row_begin, int64_t row_end,
                      int64_t m, const float *alphas, const float *biases, const float *scale, int64_t k,
                      float *out_values, int64_t *out_indices) {
    int64_t room = F + BLOCK, status = 0;
#pragma omp parallel
    {
        TopkWork w = {malloc(sizeof(float) * room * m), malloc(sizeof(float) * m),
                      malloc(sizeof(int64_t) * room * m), malloc(sizeof(int64_t) * m), malloc(sizeof(uint32_t) * room)};
        int ok = w.values && w.guess && w.indices && w.count && w.keys;
        if (!ok) {
#pragma omp atomic write
            status = -1;
        }
        for (int64_t v = 0; ok && v < m; v++) w.guess[v] = NAN;
#pragma omp for schedule(static)  /* contiguous rows per thread: each row's guess comes from the one before */
        for (int64_t r = row_begin; r < row_end; r++)
            if (ok) topk_row(P + r * ld, r, T, F, m, alphas, biases, scale, k, &w, out_values, out_indices);
        free(w.values); free(w.guess); free(w.indices); free(w.count); free(w.keys);
    }
    return status;
}

/* Latents above threshold [F] (the same for every variant) for rows [row_begin, row_end).
   Variant v's rows write at most `cap` (value, index) pairs each into their slots of out_*
   (slot of row r: (v * T + r) * cap); counts[v * T + r] receives the full count. Then each
   variant's pairs are packed to the start of the first row's slot, rows ascending, unless a
   count exceeds cap: the caller then retries with a larger cap. Returns the largest count. */
int64_t threshold_variants(const float *P, int64_t ld, int64_t T, int64_t F, int64_t row_begin, int64_t row_end,
                           int64_t m, const float *alphas, const float *biases, const float *scale,
                           const float *thresholds, int64_t cap, float *out_values, int64_t *out_indices,
                           int64_t *counts) {
    int64_t widest = 0;
#pragma omp parallel for schedule(static) reduction(max:widest)
    for (int64_t r = row_begin; r < row_end; r++) {
        float z[BLOCK];
        const float *p = P + r * ld;
        for (int64_t v = 0; v < m; v++) counts[v * T + r] = 0;
        for (int64_t c0 = 0; c0 < F; c0 += CHUNK) {
            int64_t c1 = c0 + CHUNK < F ? c0 + CHUNK : F;
            for (int64_t v = 0; v < m; v++) {
                const float *bias = biases + v * F;
                float *ov = out_values + (v * T + r) * cap;
                int64_t *oi = out_indices + (v * T + r) * cap, n = counts[v * T + r], f0 = c0;
                for (; f0 + BLOCK <= c1; f0 += BLOCK) {
                    __builtin_prefetch(p + f0 + PREFETCH_AHEAD);
                    uint32_t mask = block_variant(p + f0, bias + f0, scale + f0, alphas[v], thresholds + f0, 1, z);
                    for (; mask; mask &= mask - 1) {
                        int j = __builtin_ctz(mask);
                        if (n < cap) { ov[n] = z[j]; oi[n] = f0 + j; }
                        n++;
                    }
                }
                for (; f0 < c1; f0++) {
                    float value = fmaf(alphas[v], p[f0], bias[f0]) * scale[f0];
                    if (value > thresholds[f0]) {
                        if (n < cap) { ov[n] = value; oi[n] = f0; }
                        n++;
                    }
                }
                counts[v * T + r] = n;
            }
        }
        for (int64_t v = 0; v < m; v++) widest = counts[v * T + r] > widest ? counts[v * T + r] : widest;
    }
    if (widest > cap) return widest;
    for (int64_t v = 0; v < m; v++) {  /* pack: each row moves left, never over a row not yet moved */
        int64_t to = (v * T + row_begin) * cap;
        for (int64_t r = row_begin; r < row_end; r++) {
            int64_t from = (v * T + r) * cap, n = counts[v * T + r];
            memmove(out_values + to, out_values + from, sizeof(float) * n);
            memmove(out_indices + to, out_indices + from, sizeof(int64_t) * n);
            to += n;
        }
    }
    return widest;
}
