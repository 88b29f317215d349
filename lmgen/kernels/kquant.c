/* GGUF's Q5_0 and K-quant matrices as the file has them, times float activations: y[M,N] = x[M,K] @ W^T (+ bias).
 *
 * W is the tensor's bytes, row-major: each of the N rows is K / block consecutive blocks of `kind`, GGML's type id:
 *   Q5_0 (6):  32 values in 22 bytes: float16 d, 32 high bits, 16 bytes of low nibbles; w = d (q - 16)
 *   Q4_K (12): 256 values in 144 bytes: float16 d, dmin, 12 bytes of 6-bit scales sc and mins m of 8 sub-blocks
 *              of 32, 128 bytes of nibbles; w = d sc q - dmin m
 *   Q5_K (13): 256 in 176: Q4_K's head, 32 bytes of high bits, 128 of nibbles; w = d sc q - dmin m
 *   Q6_K (14): 256 in 210: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales of sub-blocks of 16,
 *              float16 d; w = d sc (q - 32)
 * (ggml's layouts; lmgen/weights/quants.py decodes them bit for bit.)
 *
 * The activations are quantized per block of the weights' size (32 for Q5_0, 256 for the K-quants) to codes
 * qx = x * (1 / dx) rounded to nearest, ties to even, dx = max|x| / 127 in float32 (as matmul.c does per 32), with
 * the sums of each 16 codes. Each block's dot product is then integer arithmetic and one float multiply:
 *   Q5_0:        d dx sum((q - 16) qx)
 *   Q4_K, Q5_K:  d dx sum_j sc_j sum(q qx)  -  dmin dx sum_j m_j sum(qx)      (j: the 8 sub-blocks)
 *   Q6_K:        d dx sum_j sc_j (sum(q qx) - 32 sum(qx))                    (j: the 16 sub-blocks)
 * Plain C, and AVX2 paths (with AVX-512 VNNI: vpdpwssd, vpdpbusd, and Q5_0 two blocks a 512-bit vector) giving
 * the same bits. A weight row is read once for up to 4 activation rows (8 for Q5_0 with AVX-512); OpenMP threads
 * share the weight rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
/* bytes of weights prefetched ahead: they stream from memory once a step, a few hundred KB a matrix, too little
 * for the hardware's prefetcher to run ahead of; at 2 KB the real step's matrices come fastest */
#define AHEAD 2048

#include "half.h"

enum { Q5_0 = 6, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* values a block of `kind` holds, and its bytes; 0 for a kind this file does not run */
int kq_block(int kind, int64_t *bytes) {
    switch (kind) {
    case Q5_0: *bytes = 22; return 32;
    case Q4_K: *bytes = 144; return 256;
    case Q5_K: *bytes = 176; return 256;
    case Q6_K: *bytes = 210; return 256;
    default: *bytes = 0; return 0;
    }
}

/* quantized activation rows: row r's codes at q + r K, scales at d + r nb, sums of 16 codes at s + r K / 16 */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *s;
    const float *dz;    /* with VNNI512, for Q5_0: each scale in 8 lanes, at dz + r nb 8 */
    const int32_t *nz;  /* and -16 times the sums of each 4 codes (the lanes of a block's dot), at nz + r nb 8 */
    int64_t K;
} acts;

INLINE acts row_of(acts a, int64_t nb, int64_t i) {
    acts r = {a.q + i * a.K, a.d + i * nb, a.s + i * (a.K / 16), a.dz ? a.dz + i * nb * 8 : NULL,
              a.nz ? a.nz + i * nb * 8 : NULL, a.K};
    return r;
}

#if SIMD
INLINE float block_amax(const float *x, int B) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < B; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* 32 codes x * id rounded to nearest, ties to even (as lrintf), and the sums of each 16 */
INLINE void quantize32(const float *x, float id, int8_t *q, int16_t *s) {
    __m256i v[4];
    for (int j = 0; j < 4; j++)
        v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), _mm256_set1_ps(id)));
    /* pack to bytes: packs interleave 128-bit lanes, the permute puts them back in order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i h = _mm256_hadd_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    const __m256i h2 = _mm256_hadd_epi32(h, h);  /* lanes 0, 1 and 4, 5: the two halves' partial sums */
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h2), _mm256_extracti128_si256(h2, 1));
    s[0] = (int16_t)_mm_cvtsi128_si32(t);
    s[1] = (int16_t)_mm_extract_epi32(t, 1);
}
#else
INLINE float block_amax(const float *x, int B) {
    float amax = 0.0f;
    for (int j = 0; j < B; j++) amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

INLINE void quantize32(const float *x, float id, int8_t *q, int16_t *s) {
    for (int j = 0; j < 32; j++) q[j] = (int8_t)lrintf(x[j] * id);
    for (int j = 0; j < 32; j += 16) {
        int sum = 0;
        for (int t = 0; t < 16; t++) sum += q[j + t];
        s[j / 16] = (int16_t)sum;
    }
}
#endif

static void quantize_row(const float *x, int8_t *q, float *d, int16_t *s, int64_t K, int B) {
    for (int64_t b = 0; b < K / B; b++, x += B, q += B) {
        const float dx = block_amax(x, B) / 127.0f, id = dx > 0.0f ? 1.0f / dx : 0.0f;
        for (int j = 0; j < B; j += 32, s += 2) quantize32(x + j, id, q + j, s);
        d[b] = dx;
    }
}

INLINE float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return half_to_float(h);
}

/* Q4_K's and Q5_K's 12 scale bytes -> bytes 0..7 the sub-blocks' scales, bytes 8..15 their mins (ggml's trick) */
INLINE void k_scales(const uint8_t *p, uint32_t u[4]) {
    uint32_t a[3];
    memcpy(a, p, 12);
    u[0] = a[0] & 0x3f3f3f3f;
    u[1] = (a[2] & 0x0f0f0f0f) | (((a[0] >> 6) & 0x03030303) << 4);
    u[2] = a[1] & 0x3f3f3f3f;
    u[3] = ((a[2] >> 4) & 0x0f0f0f0f) | (((a[1] >> 6) & 0x03030303) << 4);
}

#if SIMD
/* acc + the int16 pairs of a and b multiplied and summed pairwise into int32 (exact) */
INLINE __m256i dot16(__m256i acc, __m256i a, __m256i b) {
#if VNNI
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

INLINE __m256i pair(__m128i lo, __m128i hi) {
    return _mm256_insertf128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* out[r * ldo] = a Q4_K or (five) Q5_K row, nb blocks, . activation row r, for R rows. maddubs' int16 pairs
 * can't saturate (2 * 31 * 127), nor the int32 sums (256 * 31 * 127 * 63). */
INLINE void q45k_rows(const uint8_t *w, const int five, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    const int64_t bytes = five ? 176 : 144;
    const __m256i low = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16);
    __m256 acc[R];
    __m128 accm[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), accm[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        __builtin_prefetch(w + AHEAD);  /* 3 lines: a block's 144 or 176 bytes */
        __builtin_prefetch(w + AHEAD + 64);
        __builtin_prefetch(w + AHEAD + 128);
        uint32_t u[4];
        k_scales(w + 4, u);
        /* 8 scales, 8 mins (from registers: a vector load of u's 4 stores could not be forwarded) */
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m256i sc = _mm256_permute2x128_si256(sm, sm, 0x00);  /* the scales in both halves */
        const __m128i mins = _mm256_extracti128_si256(sm, 1);
        const uint8_t *qs = w + (five ? 48 : 16);
        __m256i hb = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i sum[R][2];  /* two chains: vpdpwssd's latency */
        for (int r = 0; r < R; r++) sum[r][0] = sum[r][1] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {  /* sub-blocks 2j (low nibbles) and 2j + 1 (high) */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            if (five) {  /* bit 2j, 2j + 1 of each high-bit byte: moved to bit 4 */
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
                hb = _mm256_srli_epi16(hb, 2);
            }
            const __m256i sl = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j))));
            const __m256i sh = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j + 1))));
            for (int r = 0; r < R; r++) {
                const int8_t *x = a.q + r * a.K + b * 256 + 64 * j;
                sum[r][0] = dot16(sum[r][0], sl, _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)));
                const __m256i xh = _mm256_loadu_si256((const __m256i *)(x + 32));
                sum[r][1] = dot16(sum[r][1], sh, _mm256_maddubs_epi16(hi, xh));
            }
        }
        const float d = f16_at(w), dmin = f16_at(w + 2);
        for (int r = 0; r < R; r++) {
            const float dx = a.d[r * nb + b];
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a.s + r * (a.K / 16) + b * 16));
            const __m128i s32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(sum[r][0], sum[r][1]));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), dot, acc[r]);
            accm[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * dx), _mm_cvtepi32_ps(_mm_madd_epi16(mins, s32)), accm[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r * ldo] = hsum(acc[r]) - hsum128(accm[r]);
}

/* the same for Q6_K rows: the codes q (0..63) against the activations, 32 sum(qx) taken off per sub-block */
INLINE void q6k_rows(const uint8_t *w, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    const __m256i low = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
    const __m256i m48 = _mm256_set1_epi8(48), m192 = _mm256_set1_epi8((char)192);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 210) {
        __builtin_prefetch(w + AHEAD);
        __builtin_prefetch(w + AHEAD + 64);
        __builtin_prefetch(w + AHEAD + 128);
        __builtin_prefetch(w + AHEAD + 192);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(w + 192));
        __m256i sum[R][2];
        for (int r = 0; r < R; r++) sum[r][0] = sum[r][1] = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++) {  /* values 128n .. 128n + 127, as 4 vectors of 32 */
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + 64 * n));
            const __m256i v2 = _mm256_loadu_si256((const __m256i *)(w + 64 * n + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * n));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(v1, low), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(v2, low), _mm256_slli_epi16(_mm256_and_si256(h, m12), 2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), _mm256_and_si256(h, m48));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v2, 4), low),
                                   _mm256_srli_epi16(_mm256_and_si256(h, m192), 2));
            for (int f = 0; f < 4; f++) {  /* sub-blocks 8n + 2f and 8n + 2f + 1: each half's scale */
                const long long i = 8 * n + 2 * f;
                const __m256i s = _mm256_cvtepi8_epi16(
                    _mm_shuffle_epi8(sc8, _mm_set_epi64x(0x0101010101010101LL * (i + 1), 0x0101010101010101LL * i)));
                for (int r = 0; r < R; r++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(a.q + r * a.K + b * 256 + 128 * n + 32 * f));
                    sum[r][f & 1] = dot16(sum[r][f & 1], s, _mm256_maddubs_epi16(q[f], x));
                }
            }
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        const float d = f16_at(w + 208);
        for (int r = 0; r < R; r++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a.s + r * (a.K / 16) + b * 16));
            const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(sum[r][0], sum[r][1]), off));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[r * nb + b]), dot, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r * ldo] = hsum(acc[r]);
}

/* 32 bytes: 0xff where bit i of x is set (ggml's bytes_from_bits_32) */
INLINE __m256i bit_bytes(uint32_t x) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    return _mm256_cmpeq_epi8(_mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL)),
                             _mm256_set1_epi64x(-1));
}

/* the same for Q5_0 rows: q - 16 as signed bytes, multiplied as |q - 16| by qx with its sign */
INLINE void q50_rows(const uint8_t *w, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    const __m256i low = _mm256_set1_epi8(15), top = _mm256_set1_epi8((char)0xf0);
#if !VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 22) {
        __builtin_prefetch(w + AHEAD);
        uint32_t h;
        memcpy(&h, w + 2, 4);
        const __m128i t = _mm_loadu_si128((const __m128i *)(w + 6));
        __m256i q = _mm256_and_si256(pair(t, _mm_srli_epi16(t, 4)), low);
        q = _mm256_or_si256(q, _mm256_andnot_si256(bit_bytes(h), top));  /* a clear high bit: q - 16 < 0 */
        const __m256i aq = _mm256_sign_epi8(q, q);
        const float d = f16_at(w);
        for (int r = 0; r < R; r++) {
            const __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a.q + r * a.K + b * 32)), q);
#if VNNI
            const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aq, x);
#else
            const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, x), ones);
#endif
            acc[r][b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[r * nb + b]), _mm256_cvtepi32_ps(s), acc[r][b & 1]);
        }
    }
    for (int r = 0; r < R; r++) out[r * ldo] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

#if VNNI512
/* q50_rows with 512-bit vectors: blocks 2p and 2p + 1 in the low and high halves, which are q50_rows' two
 * accumulators, and the same integers and float steps (so the same bits). dz: each block's dx in 8 lanes. One row
 * (a decoding step) takes the codes q (0..31) unsigned, starting each lane from its -16 sum(qx) (a.nz), the same
 * integers as sum((q - 16) qx) in fewer steps than moving q - 16's sign onto the activations, as several do. */
INLINE void q50_rows512(const uint8_t *w, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    const __m512i low = _mm512_set1_epi8(15), sixteen = _mm512_set1_epi8(16), top = _mm512_set1_epi8((char)0xf0);
    const __m512i zero = _mm512_setzero_si512();
    const __m512i spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);  /* the blocks' nibbles: [t0, t0, t1, t1] */
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);   /* low nibbles (codes 0..15), then high */
    const __m256i scales = _mm256_set_epi16(11, 11, 11, 11, 11, 11, 11, 11, 0, 0, 0, 0, 0, 0, 0, 0);  /* d, d' */
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, w += 44) {
        __builtin_prefetch(w + AHEAD);
        uint32_t h[2];
        memcpy(&h[0], w + 2, 4);
        memcpy(&h[1], w + 24, 4);
        const __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w + 6))),
                                                  _mm_loadu_si128((const __m128i *)(w + 28)), 1);
        __m512i q = _mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(t));
        q = _mm512_and_si512(_mm512_srlv_epi64(q, shift), low);
        const __mmask64 high = (__mmask64)h[0] | (__mmask64)h[1] << 32;
        const __m512 wd = _mm512_cvtph_ps(_mm256_permutexvar_epi16(scales, _mm256_loadu_si256((const __m256i *)w)));
        if (R == 1) {
            q = _mm512_mask_add_epi8(q, high, q, sixteen);
            const __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void *)(a.nz + b * 8)), q,
                                                  _mm512_loadu_si512((const void *)(a.q + b * 32)));
            const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(a.dz + b * 8));
            acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[0]);
            continue;
        }
        /* several rows: q - 16 as |q - 16|, its sign moved onto each row's activations (no offsets to load) */
        q = _mm512_mask_blend_epi8(high, _mm512_or_si512(q, top), q);
        const __m512i aq = _mm512_abs_epi8(q);
        const __mmask64 neg = _mm512_movepi8_mask(q);
        for (int r = 0; r < R; r++) {
            const __m512i x = _mm512_loadu_si512((const void *)(a.q + r * a.K + b * 32));
            const __m512i s = _mm512_dpbusd_epi32(zero, aq, _mm512_mask_sub_epi8(x, neg, zero, x));
            const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(a.dz + (r * nb + b) * 8));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    __m256 last[R];  /* an odd last block: an even one, the low half's */
    for (int r = 0; r < R; r++) last[r] = _mm512_castps512_ps256(acc[r]);
    if (b < nb) {
        uint32_t h;
        memcpy(&h, w + 2, 4);
        const __m128i t = _mm_loadu_si128((const __m128i *)(w + 6));
        __m256i q = _mm256_and_si256(pair(t, _mm_srli_epi16(t, 4)), _mm512_castsi512_si256(low));
        q = _mm256_mask_add_epi8(q, (__mmask32)h, q, _mm512_castsi512_si256(sixteen));
        const float d = f16_at(w);
        for (int r = 0; r < R; r++) {
            const __m256i s = _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i *)(a.nz + (r * nb + b) * 8)), q,
                                                  _mm256_loadu_si256((const __m256i *)(a.q + r * a.K + b * 32)));
            last[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[r * nb + b]), _mm256_cvtepi32_ps(s), last[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
        out[r * ldo] = hsum(_mm256_add_ps(last[r], hi));
    }
}
#endif
#else
INLINE void q45k_rows(const uint8_t *w, const int five, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    const int64_t bytes = five ? 176 : 144;
    for (int r = 0; r < R; r++) {
        const uint8_t *blk = w;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++, blk += bytes) {
            uint32_t u[4];
            k_scales(blk + 4, u);
            const uint8_t *sc = (const uint8_t *)u, *mn = sc + 8, *qh = blk + 16, *qs = blk + (five ? 48 : 16);
            const int8_t *x = a.q + r * a.K + b * 256;
            const int16_t *s = a.s + r * (a.K / 16) + b * 16;
            int32_t isum = 0, msum = 0;
            for (int j = 0; j < 8; j++) {
                int dot = 0;
                for (int t = 0; t < 32; t++) {
                    int q = (qs[32 * (j / 2) + t] >> (4 * (j & 1))) & 15;
                    if (five) q |= ((qh[t] >> j) & 1) << 4;
                    dot += q * x[32 * j + t];
                }
                isum += sc[j] * dot;
                msum += mn[j] * (s[2 * j] + s[2 * j + 1]);
            }
            const float dx = a.d[r * nb + b];
            total += f16_at(blk) * dx * (float)isum - f16_at(blk + 2) * dx * (float)msum;
        }
        out[r * ldo] = total;
    }
}

INLINE void q6k_rows(const uint8_t *w, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    for (int r = 0; r < R; r++) {
        const uint8_t *blk = w;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++, blk += 210) {
            const int8_t *x = a.q + r * a.K + b * 256, *sc = (const int8_t *)(blk + 192);
            int32_t isum = 0;
            for (int j = 0; j < 16; j++) {
                int dot = 0;
                for (int t = 0; t < 16; t++) {
                    const int i = 16 * j + t, n = i / 128, v = i % 128;  /* value v of half n */
                    const int q = ((blk[64 * n + v % 64] >> (4 * (v / 64))) & 15) |
                                  (((blk[128 + 32 * n + v % 32] >> (2 * (v / 32))) & 3) << 4);
                    dot += (q - 32) * x[i];
                }
                isum += sc[j] * dot;
            }
            total += f16_at(blk + 208) * a.d[r * nb + b] * (float)isum;
        }
        out[r * ldo] = total;
    }
}

INLINE void q50_rows(const uint8_t *w, acts a, int64_t nb, const int R, float *out, int64_t ldo) {
    for (int r = 0; r < R; r++) {
        const uint8_t *blk = w;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++, blk += 22) {
            uint32_t h;
            memcpy(&h, blk + 2, 4);
            const int8_t *x = a.q + r * a.K + b * 32;
            int dot = 0;
            for (int t = 0; t < 32; t++) {
                const int q = ((blk[6 + t % 16] >> (4 * (t / 16))) & 15) | (((h >> t) & 1) << 4);
                dot += (q - 16) * x[t];
            }
            total += f16_at(blk) * a.d[r * nb + b] * (float)dot;
        }
        out[r * ldo] = total;
    }
}
#endif

#if VNNI512
/* what q50_rows512 takes per activation row of nb blocks: each block's scale in 8 lanes, and -16 times the sums
 * of each 4 codes */
static void q50_lanes(const int8_t *q, const float *d, float *dz, int32_t *nz, int64_t nb) {
    const __m256i sixteen = _mm256_set1_epi8(16), zero = _mm256_setzero_si256();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i sums = _mm256_dpbusd_epi32(zero, sixteen, _mm256_loadu_si256((const __m256i *)(q + 32 * b)));
        _mm256_storeu_si256((__m256i *)(nz + 8 * b), _mm256_sub_epi32(zero, sums));
        _mm256_storeu_ps(dz + 8 * b, _mm256_set1_ps(d[b]));
    }
}
#endif

/* y[i * N] for activation rows [m0, m1) and weight row w: `most` rows a pass, then 4, then one at a time */
#define ROWS(call, most)                                                                        \
    for (; most > 4 && i + most <= m1; i += most) call(row_of(a, nb, i), nb, most, y + i * N, N); \
    for (; i + 4 <= m1; i += 4) call(row_of(a, nb, i), nb, 4, y + i * N, N);                    \
    for (; i < m1; i++) call(row_of(a, nb, i), nb, 1, y + i * N, N)
#if VNNI512
#define Q50(...) q50_rows512(w, __VA_ARGS__)
#define Q50_MOST 8  /* 32 vector registers */
#else
#define Q50(...) q50_rows(w, __VA_ARGS__)
#define Q50_MOST 4
#endif
#define Q4K(...) q45k_rows(w, 0, __VA_ARGS__)
#define Q5K(...) q45k_rows(w, 1, __VA_ARGS__)
#define Q6K(...) q6k_rows(w, __VA_ARGS__)

static void weight_row(int kind, const uint8_t *w, acts a, int64_t nb, int64_t m0, int64_t m1, float *y, int64_t N) {
    int64_t i = m0;
    switch (kind) {
    case Q5_0: ROWS(Q50, Q50_MOST); break;
    case Q4_K: ROWS(Q4K, 4); break;
    case Q5_K: ROWS(Q5K, 4); break;
    default: ROWS(Q6K, 4); break;
    }
}

/* y[M,N] = x[M,K] @ W^T (+ bias, may be NULL) for the GGUF blocks w of `kind`. Returns 0, -1 when out of memory,
 * -2 for a kind it does not run or K not a whole number of blocks. */
int kq_matmul(const float *x, const uint8_t *w, int kind, const float *bias, float *y, int64_t M, int64_t N,
              int64_t K) {
    int64_t bytes;
    const int B = kq_block(kind, &bytes);
    if (!B || K % B) return -2;
    const int64_t nb = K / B, row_bytes = nb * bytes;
    const int64_t lanes = VNNI512 && kind == Q5_0 ? 8 : 0;
    int8_t *q = malloc((size_t)(M * K) + sizeof(float) * (size_t)(M * nb * (1 + 2 * lanes)) +
                       sizeof(int16_t) * (size_t)(M * K / 16));
    if (!q) return -1;
    float *d = (float *)(q + M * K), *dz = d + M * nb;  /* K is a multiple of 32: aligned */
    int32_t *nz = (int32_t *)(dz + M * nb * lanes);
    int16_t *s = (int16_t *)(nz + M * nb * lanes);
    const acts a = {q, d, s, lanes ? dz : NULL, lanes ? nz : NULL, K};
    const int threads = M * N * K >= (1 << 18);  /* below this, waking a thread costs more than it saves */
#pragma omp parallel for schedule(static) if (threads && M >= 8)
    for (int64_t i = 0; i < M; i++) {
        quantize_row(x + i * K, q + i * K, d + i * nb, s + i * (K / 16), K, B);
#if VNNI512
        if (lanes) q50_lanes(q + i * K, d + i * nb, dz + i * nb * lanes, nz + i * nb * lanes, nb);
#endif
    }
    const int64_t tile = 64;  /* activation rows that stay in cache while every weight row streams past them */
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t m1 = m0 + tile < M ? m0 + tile : M;
#pragma omp parallel for schedule(static) if (threads)
        for (int64_t n = 0; n < N; n++) {
            weight_row(kind, w + n * row_bytes, a, nb, m0, m1, y + n, N);
            if (bias)
                for (int64_t i = m0; i < m1; i++) y[i * N + n] += bias[n];
        }
    }
    free(q);
    return 0;
}
