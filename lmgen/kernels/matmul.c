/* Quantized-weight matmuls on the CPU, for decoding and prompts: y[M,N] = x[M,K] @ W[N,K]^T (+ bias), K a
 * multiple of 32.
 *
 * q4_matmul: W holds blocks of 32 weights, w = d * q + m with codes q in 0..15 and float16 d, m. The rows
 * are interleaved in groups of 8 (N a multiple of 8), so that one vector holds 4 codes of each of 8 rows and
 * a multiply by 4 broadcast activations gives 8 outputs at once, with no horizontal sums. For row group g
 * and block b (nb = K/32 blocks a row), at (g * nb + b):
 *   qs: 128 bytes; byte 32j + 4r + t (j, t < 4, r < 8) holds code 4j + t of row 8g + r in its low nibble
 *       and code 16 + 4j + t in its high nibble (within a row, GGUF's order: byte i holds codes i, i + 16);
 *   d, m: 8 float16s, the block's scale and offset for rows 8g .. 8g + 7.
 * q8_matmul: W is int8 [N, K] with a scale per block of 32 inputs, float32 or float16 (GGUF's Q8_0 blocks).
 * The activations are quantized to 8 bits per block of 32 (as llama.cpp's Q8_1), so each block's dot
 * product is an integer sum: w . x = d * dx * sum(q * qx) + m * sx, with sx = dx * sum(qx).
 * Plain C, with an AVX2 path. lmgen/kernels/__init__.py builds it at first use (with -ffp-contract=off: the
 * compiler fuses no multiply and add on its own); OpenMP threads are torch's own runtime.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#define PREFETCH 16  /* blocks ahead */
#define AHEAD 2048   /* bytes of int8 rows prefetched ahead: the 4-bit rows' distance (16 blocks of 128) */

int simd(void) { return SIMD + VNNI; }

#include "half.h"

/* int8 rows' scale of block b: float32, or with `half` float16 (as GGUF's Q8_0 blocks hold them) */
INLINE float scale_at(const void *ws, const int half, int64_t b) {
    return half ? half_to_float(((const uint16_t *)ws)[b]) : ((const float *)ws)[b];
}

/* 8-bit blocks of one activation row: codes qx, scales dx, and sx = dx * sum(qx) per block */
static void quantize_row(const float *x, int8_t *qx, float *dx, float *sx, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 32, qx += 32) {
#if SIMD
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j] = _mm256_loadu_ps(x + 8 * j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float a = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = a / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];  /* rounded to nearest, ties to even, as lrintf */
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id)));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        /* pack to bytes: packs interleave 128-bit lanes, the permute puts them back in order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qx, p);
        dx[b] = d;
        sx[b] = d * (float)_mm_cvtsi128_si32(s4);
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)lrintf(x[j] * id);
            qx[j] = (int8_t)q;
            sum += q;
        }
        dx[b] = d;
        sx[b] = d * (float)sum;
#endif
    }
}

#if SIMD
INLINE __m256i broadcast4(const int8_t *x) {  /* 4 activation bytes into every 32-bit lane */
    int32_t v;
    memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

/* out[r * ldo + 0..7] = the 8 rows of group `wq` . x row r, for R activation rows.
 * The int16 sums can't overflow: 8 products of pairs, each at most 2 * 15 * 127. */
INLINE void q4_group(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, const int8_t *qx, const float *dx,
                     const float *sx, int64_t nb, const int R, float *out, int64_t ldo) {
    const int64_t K = nb * 32;
    const __m256i low = _mm256_set1_epi8(15);
#if !VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[R][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, wq += 128) {
        __builtin_prefetch(wq + 128 * PREFETCH);  /* the weights stream from memory once a step */
        __builtin_prefetch(wq + 128 * PREFETCH + 64);
        __m256i sum[R][2];
        for (int r = 0; r < R; r++) sum[r][0] = sum[r][1] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wq + 32 * j));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int r = 0; r < R; r++) {
                const int8_t *x = qx + r * K + b * 32 + 4 * j;
#if VNNI
                /* with 8 rows, one int32 sum a row (exact either way) keeps every vector in a register */
                sum[r][0] = _mm256_dpbusd_epi32(sum[r][0], lo, broadcast4(x));
                sum[r][R < 8] = _mm256_dpbusd_epi32(sum[r][R < 8], hi, broadcast4(x + 16));
#else
                sum[r][0] = _mm256_add_epi16(sum[r][0], _mm256_maddubs_epi16(lo, broadcast4(x)));
                sum[r][1] = _mm256_add_epi16(sum[r][1], _mm256_maddubs_epi16(hi, broadcast4(x + 16)));
#endif
            }
        }
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b * 8)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b * 8)));
        for (int r = 0; r < R; r++) {
#if VNNI
            __m256 dot = _mm256_cvtepi32_ps(R < 8 ? _mm256_add_epi32(sum[r][0], sum[r][1]) : sum[r][0]);
#else
            __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(sum[r][0], sum[r][1]), ones));
#endif
            __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dx[r * nb + b]));
            acc[r][b & 1] = _mm256_fmadd_ps(dot, scale, acc[r][b & 1]);  /* two chains hide the FMA latency */
            acc[r][b & 1] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r * nb + b]), acc[r][b & 1]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * ldo, _mm256_add_ps(acc[r][0], acc[r][1]));
}

/* out[r * ldo] = int8 W row . x row r for R rows, W with a scale per block of 32 (ws: float32, or with `half`
 * float16 as GGUF's Q8_0 has them) */
INLINE void q8_rows(const int8_t *w, const void *ws, const int half, const int8_t *qx, const float *dx, int64_t nb,
                    const int R, const int A, float *out, int64_t ldo) {
    const int64_t K = nb * 32;
#if !VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[R][A];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < A; a++) acc[r][a] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b < nb; b += A) {
        __builtin_prefetch(w + b * 32 + AHEAD);
        for (int a = 0; a < A && b + a < nb; a++) {
            const float d = scale_at(ws, half, b + a);
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (b + a) * 32));
            __m256i wabs = _mm256_sign_epi8(wv, wv);  /* maddubs multiplies unsigned by signed bytes */
            for (int r = 0; r < R; r++) {
                __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qx + r * K + (b + a) * 32)), wv);
#if VNNI
                __m256 p = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, xs));
#else
                __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones));
#endif
                acc[r][a] = _mm256_fmadd_ps(p, _mm256_set1_ps(dx[r * nb + b + a] * d), acc[r][a]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int a = 1; a < A; a++) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
        out[r * ldo] = hsum(acc[r][0]);
    }
}

#if VNNI512
/* 128 * the sums of each 4 activation bytes (the lanes of a block's dot product), and each block's scale in 8
 * lanes: what q8_rows512 takes per activation row, nb blocks */
static void q8_lanes(const int8_t *qx, const float *dx, int32_t *cx, float *dxz, int64_t nb) {
    const __m256i c128 = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(qx + b * 32));
        _mm256_storeu_si256((__m256i *)(cx + b * 8), _mm256_dpbusd_epi32(_mm256_setzero_si256(), c128, x));
        _mm256_storeu_ps(dxz + b * 8, _mm256_set1_ps(dx[b]));
    }
}

/* q8_rows (A = 2) with 512-bit vectors: blocks 2p and 2p + 1 in the low and high halves, which are q8_rows'
 * two accumulators. vpdpbusd takes the weights unsigned, w + 128 (their sign bits flipped), and the activations
 * as they are; taking 128 * the activations' sums back leaves the same integers, so the same floats follow. */
INLINE void q8_rows512(const int8_t *w, const void *ws, const int half, const int8_t *qx, const int32_t *cx,
                       const float *dxz, int64_t nb, const int R, float *out, int64_t ldo) {
    const int64_t K = nb * 32;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __builtin_prefetch(w + b * 32 + AHEAD);
        __builtin_prefetch((const char *)ws + (b + AHEAD / 32) * (half ? 2 : 4));
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + b * 32)), flip);
        __m128 two;  /* the two blocks' scales */
        if (half) {
            uint32_t h;
            memcpy(&h, (const uint16_t *)ws + b, sizeof h);
            two = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h));
        } else {
            double pair;
            memcpy(&pair, (const float *)ws + b, sizeof pair);
            two = _mm_castpd_ps(_mm_set_sd(pair));
        }
        const __m512 wsz = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
        for (int r = 0; r < R; r++) {
            __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu,
                                              _mm512_loadu_si512((const void *)(qx + r * K + b * 32)));
            sum = _mm512_sub_epi32(sum, _mm512_loadu_si512((const void *)(cx + (r * nb + b) * 8)));
            const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(dxz + (r * nb + b) * 8), wsz);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
        }
    }
    if (b < nb) {  /* an odd last block: an even one, the low half's */
        const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + b * 32)),
                                            _mm256_set1_epi8((char)0x80));
        for (int r = 0; r < R; r++) {
            __m256i sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu,
                                              _mm256_loadu_si256((const __m256i *)(qx + r * K + b * 32)));
            sum = _mm256_sub_epi32(sum, _mm256_loadu_si256((const __m256i *)(cx + (r * nb + b) * 8)));
            const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(dxz + (r * nb + b) * 8),
                                               _mm256_set1_ps(scale_at(ws, half, b)));
            acc[r] = _mm512_mask3_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(sum)),
                                           _mm512_zextps256_ps512(scale), acc[r], 0x00FF);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256 lo = _mm512_castps512_ps256(acc[r]);
        const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r]), 1));
        out[r * ldo] = hsum(_mm256_add_ps(lo, hi));
    }
}
#endif
#else
INLINE void q4_group(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, const int8_t *qx, const float *dx,
                     const float *sx, int64_t nb, const int R, float *out, int64_t ldo) {
    for (int r = 0; r < R; r++)
        for (int row = 0; row < 8; row++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *q = wq + b * 128 + 4 * row;
                const int8_t *x = qx + (r * nb + b) * 32;
                int isum = 0;
                for (int j = 0; j < 4; j++)
                    for (int t = 0; t < 4; t++)
                        isum += (q[32 * j + t] & 15) * x[4 * j + t] + (q[32 * j + t] >> 4) * x[16 + 4 * j + t];
                sum += half_to_float(wd[b * 8 + row]) * dx[r * nb + b] * (float)isum +
                       half_to_float(wm[b * 8 + row]) * sx[r * nb + b];
            }
            out[r * ldo + row] = sum;
        }
}

INLINE void q8_rows(const int8_t *w, const void *ws, const int half, const int8_t *qx, const float *dx, int64_t nb,
                    const int R, const int A, float *out, int64_t ldo) {
    (void)A;
    for (int r = 0; r < R; r++) {
        const int8_t *x = qx + r * nb * 32;
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int isum = 0;
            for (int j = 0; j < 32; j++) isum += w[b * 32 + j] * x[b * 32 + j];
            sum += dx[r * nb + b] * scale_at(ws, half, b) * (float)isum;
        }
        out[r * ldo] = sum;
    }
}
#endif

typedef struct {
    const uint8_t *qs;           /* 4-bit codes, or NULL for int8 rows */
    const uint16_t *d, *m;       /* 4-bit block scales and offsets */
    const int8_t *q8;            /* int8 rows */
    const void *block_scale;     /* their scales, one per block of 32: float32, or float16 with half */
    int half;
} weights;

/* the rows [m0, m1) of y for int8 row u */
INLINE void q8_unit(const weights *w, const int half, int64_t u, const int8_t *qx, const float *dx, const int32_t *cx,
                    const float *dxz, int64_t m0, int64_t m1, int64_t N, int64_t K, float *y) {
    const int64_t nb = K / 32;
    const int8_t *wq = w->q8 + u * K;
    const void *ws = (const char *)w->block_scale + u * nb * (half ? 2 : 4);
    int64_t i = m0;
#if VNNI512
    for (; i + 4 <= m1; i += 4)
        q8_rows512(wq, ws, half, qx + i * K, cx + i * nb * 8, dxz + i * nb * 8, nb, 4, y + i * N + u, N);
    for (; i < m1; i++)
        q8_rows512(wq, ws, half, qx + i * K, cx + i * nb * 8, dxz + i * nb * 8, nb, 1, y + i * N + u, N);
#endif
    for (; i + 4 <= m1; i += 4)  /* as one row: the same sums */
        q8_rows(wq, ws, half, qx + i * K, dx + i * nb, nb, 4, 2, y + i * N + u, N);
    for (; i < m1; i++)
        q8_rows(wq, ws, half, qx + i * K, dx + i * nb, nb, 1, 2, y + i * N + u, N);
}

/* the rows [m0, m1) of y for weight unit u: a group of 8 rows (4-bit) or one row (int8) */
static void weight_unit(const weights *w, int64_t u, const int8_t *qx, const float *dx, const float *sx,
                        const int32_t *cx, const float *dxz, int64_t m0, int64_t m1, int64_t N, int64_t K, float *y) {
    const int64_t nb = K / 32;
    int64_t i = m0;
    if (w->qs) {
        const uint8_t *wq = w->qs + u * nb * 128;
        const uint16_t *wd = w->d + u * nb * 8, *wm = w->m + u * nb * 8;
#if VNNI512
        for (; i + 8 <= m1; i += 8)  /* 32 vector registers: 8 rows at a time */
            q4_group(wq, wd, wm, qx + i * K, dx + i * nb, sx + i * nb, nb, 8, y + i * N + u * 8, N);
#endif
        for (; i + 4 <= m1; i += 4)
            q4_group(wq, wd, wm, qx + i * K, dx + i * nb, sx + i * nb, nb, 4, y + i * N + u * 8, N);
        for (; i < m1; i++)
            q4_group(wq, wd, wm, qx + i * K, dx + i * nb, sx + i * nb, nb, 1, y + i * N + u * 8, N);
    } else if (w->half) {
        q8_unit(w, 1, u, qx, dx, cx, dxz, m0, m1, N, K, y);
    } else {
        q8_unit(w, 0, u, qx, dx, cx, dxz, m0, m1, N, K, y);
    }
}

static int matmul(const float *x, const weights *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / 32, rows = w->qs ? 8 : 1, units = N / rows;
    const int lanes = VNNI512 && !w->qs;  /* the 512-bit int8 path's per-lane sums and scales */
    int8_t *qx = malloc((size_t)(M * K) + (2 + (lanes ? 16 : 0)) * sizeof(float) * (size_t)(M * nb));
    if (!qx) return -1;
    float *dx = (float *)(qx + M * K), *sx = dx + M * nb, *dxz = sx + M * nb;
    int32_t *cx = (int32_t *)(dxz + (lanes ? M * nb * 8 : 0));
    const int threads = M * N * K >= (1 << 18);  /* below this, waking a thread costs more than it saves */
#pragma omp parallel for schedule(static) if (threads && M >= 8)
    for (int64_t i = 0; i < M; i++) {
        quantize_row(x + i * K, qx + i * K, dx + i * nb, sx + i * nb, nb);
#if VNNI512
        if (lanes) q8_lanes(qx + i * K, dx + i * nb, cx + i * nb * 8, dxz + i * nb * 8, nb);
#endif
    }
    /* activation rows in tiles that stay in cache while every weight row streams past them */
    const int64_t tile = 64;
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t m1 = m0 + tile < M ? m0 + tile : M;
#pragma omp parallel for schedule(static) if (threads)
        for (int64_t u = 0; u < units; u++) {
            weight_unit(w, u, qx, dx, sx, cx, dxz, m0, m1, N, K, y);
            if (bias)
                for (int64_t i = m0; i < m1; i++)
                    for (int64_t n = u * rows; n < (u + 1) * rows; n++) y[i * N + n] += bias[n];
        }
    }
    free(qx);
    return 0;
}

/* y[M,N] = x[M,K] @ W^T (+ bias, may be NULL) for 4-bit blocks. Returns 0, or -1 when out of memory. */
int q4_matmul(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K) {
    const weights w = {qs, d, m, NULL, NULL, 0};
    return matmul(x, &w, bias, y, M, N, K);
}

/* y[M,N] = x[M,K] @ W^T (+ bias, may be NULL) for int8 rows with a scale per block of 32: float32, or float16
 * where `half` (GGUF's Q8_0, as the file has them: fewer bytes to stream). Returns 0, or -1 when out of memory. */
int q8_matmul(const float *x, const int8_t *q8, const void *block_scale, int half, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K) {
    const weights w = {NULL, NULL, NULL, q8, block_scale, half};
    return matmul(x, &w, bias, y, M, N, K);
}
