/* Which vector paths this build compiles, from the compiler's target macros (-march=native, or none: portable C). */
#ifndef LMGEN_SIMD_H
#define LMGEN_SIMD_H
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SIMD 1
#else
#define SIMD 0
#endif

#if SIMD && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1  /* vpdpbusd, vpdpwssd: byte (word) products summed straight into int32, the same exact sums */
#else
#define VNNI 0
#endif

#if VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define VNNI512 1  /* two blocks of 32 a 512-bit vector */
#else
#define VNNI512 0
#endif

#define INLINE static inline __attribute__((always_inline))

#if SIMD
INLINE float hsum128(__m128 s) {  /* the sum of a vector's lanes */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hsum(__m256 v) {
    return hsum128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}
#endif
#endif
