/* Attention for decoding on the CPU: one new query per sequence over its cached keys and values, which are float32
 * float16 (llama.cpp's default cache type, half the memory) or bfloat16 (`kind` 0, 1, 2); the arithmetic is
 * float32 in every case.
 *
 * For batch row b and query head h, with G = Hq / Hkv query heads per key head, E = positions[b] + 1 and
 * F = max(0, E - window) (0 without a window: window 0):
 *   out[b, h] = softmax(scale * q[b, h] . k[slots[b], h / G, F:E]) @ v[slots[b], h / G, F:E]
 * k and v are one layer of the cache, [slots, Hkv, S, D]. Only the E - F positions attended are read, where a
 * masked attention over a fixed-size cache (what a compiled step with static shapes does) reads all S.
 * Plain C, with an AVX2 path; exp is a Cephes-style polynomial (about 1 ulp, as torch's vectorized exp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if SIMD
static inline __m256 exp8(__m256 x) {  /* e^x for x <= 0 (scores minus their max) */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  /* below this e^x is under float's normal range: ~0 */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln 2, in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#include "half.h"

enum { F32 = 0, F16 = 1, BF16 = 2 };

INLINE float kv_at(const void *kv, int64_t i, const int kind) {  /* element i of a cache array of that kind */
    if (kind == F32) return ((const float *)kv)[i];
    if (kind == F16) return half_to_float(((const uint16_t *)kv)[i]);
    const uint32_t bits = (uint32_t)((const uint16_t *)kv)[i] << 16;  /* bfloat16: float32's high half */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if SIMD
INLINE __m256 kv8(const void *kv, int64_t i, const int kind) {  /* elements i..i+7 as floats */
    if (kind == F32) return _mm256_loadu_ps((const float *)kv + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)kv + i));
    if (kind == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* p[0..L) = exp(p - max p) in place; returns their sum */
static float softmax_numerators(float *p, int64_t L) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < L; t++) m = p[t] > m ? p[t] : m;
    int64_t t = 0;
#if SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= L; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), _mm256_set1_ps(m)));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; t < L; t++) sum += p[t] = expf(p[t] - m);
    return sum;
}

#if SIMD
/* one query head over L keys, D a multiple of 8 (a constant where inlined, so the accumulators stay in
 * registers); p is a scratch of L floats */
INLINE void attend(const float *q, const void *k, const void *v, float *o, float *p, int64_t L, const int64_t D,
                   float scale, const int kind) {
    int64_t t = 0;
    for (; t + 8 <= L; t += 8) {  /* 8 keys at a time: their 8 dot products end up in one vector */
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qd, kv8(k, (t + j) * D + d, kind), a[j]);
        }
        /* pairwise sums: lane i of the two halves holds parts of key i's sum */
        const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
        const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
        const __m256 h0 = _mm256_hadd_ps(h01, h23), h1 = _mm256_hadd_ps(h45, h67);
        const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
        _mm256_storeu_ps(p + t, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
    }
    for (; t < L; t++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv8(k, t * D + d, kind), a);
        p[t] = scale * hsum(a);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / softmax_numerators(p, L));
    __m256 acc[D / 8];
    for (int64_t d = 0; d < D / 8; d++) acc[d] = _mm256_setzero_ps();
    for (t = 0; t < L; t++) {
        const __m256 w = _mm256_broadcast_ss(p + t);
        for (int64_t d = 0; d < D / 8; d++) acc[d] = _mm256_fmadd_ps(w, kv8(v, t * D + 8 * d, kind), acc[d]);
    }
    for (int64_t d = 0; d < D / 8; d++) _mm256_storeu_ps(o + 8 * d, _mm256_mul_ps(acc[d], inv));
}
#endif

/* one query head, any D */
static void attend_any(const float *q, const void *k, const void *v, float *o, float *p, int64_t L, int64_t D,
                       float scale, const int kind) {
    for (int64_t t = 0; t < L; t++) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) s += q[d] * kv_at(k, t * D + d, kind);
        p[t] = scale * s;
    }
    const float inv = 1.0f / softmax_numerators(p, L);
    for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
    for (int64_t t = 0; t < L; t++)
        for (int64_t d = 0; d < D; d++) o[d] += p[t] * kv_at(v, t * D + d, kind);
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

static void attend_head(const float *q, const void *k, const void *v, float *o, float *p, int64_t L, int64_t D,
                        float scale, int kind) {
#define ATTEND(D_) (kind == F32 ? attend(q, k, v, o, p, L, D_, scale, F32)    \
                    : kind == F16 ? attend(q, k, v, o, p, L, D_, scale, F16) \
                                  : attend(q, k, v, o, p, L, D_, scale, BF16))
#if SIMD
    if (D == 64) return ATTEND(64);
    if (D == 128) return ATTEND(128);
    if (D == 256) return ATTEND(256);  /* Gemma */
#endif
#undef ATTEND
    kind == F32 ? attend_any(q, k, v, o, p, L, D, scale, F32)
    : kind == F16 ? attend_any(q, k, v, o, p, L, D, scale, F16) : attend_any(q, k, v, o, p, L, D, scale, BF16);
}

/* the first position a query at `pos` attends: a sliding window of `window` positions ends at it */
static int64_t first_key(int64_t pos, int64_t window) { return window > 0 && pos >= window ? pos - window + 1 : 0; }

/* out [B, Hq, D] for q [B, Hq, D]; k, v [slots, Hkv, S, D] of the given kind; slots, positions
 * [B] (each position in 0..S-1); window 0 or the positions each query sees. Returns 0, or -1 when out of memory. */
int decode_attention(const float *q, const void *k, const void *v, const int64_t *slots, const int64_t *positions,
                     float *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale, int kind,
                     int64_t window) {
    const size_t size = kind == F32 ? 4 : 2;
    const int64_t G = Hq / Hkv;
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += positions[b] + 1 - first_key(positions[b], window);
    int failed = 0;
#pragma omp parallel if (work * Hq * D >= (1 << 17)) reduction(| : failed)
    {
        float *p = malloc(sizeof(float) * (size_t)S);
        if (!p) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * Hq; i++) {  /* a query head each */
            if (!p) continue;
            const int64_t b = i / Hq, first = first_key(positions[b], window);
            const int64_t kv = ((slots[b] * Hkv + i % Hq / G) * S + first) * D;
            attend_head(q + i * D, (const char *)k + kv * size, (const char *)v + kv * size, out + i * D, p,
                        positions[b] + 1 - first, D, scale, kind);
        }
        free(p);
    }
    return failed ? -1 : 0;
}
