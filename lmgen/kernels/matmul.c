/* Quantized-weight matmuls for CPU decoding: y[M,N] = x[M,K] @ W[N,K]^T (+ bias), K a multiple of 32.
 *
 * q4_matmul: W holds blocks of 32 weights, w = d * q + m with codes q in 0..15: `qs` [N, K/2] packs a
 * block's codes as GGUF does (byte j: code j low, code j + 16 high), `d` and `m` [N, K/32] are float16.
 * q8_matmul: W is int8 [N, K] with one float scale per row.
 * The activations are quantized to 8 bits per block of 32 (as llama.cpp's Q8_1), so each block's dot
 * product is an integer sum: w . x = d * dx * sum(q * qx) + m * sx, with sx = dx * sum(qx).
 * q4_dequantize: W back to float32, for prompts (many rows), which the float32 matmul handles faster.
 * Plain C, with an AVX2 path. lmgen/kernels/__init__.py builds it at first use (with -ffp-contract=off, so
 * d * q + m rounds as torch rounds it); OpenMP threads are torch's own runtime.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SIMD 1
#else
#define SIMD 0
#endif

#define INLINE static inline __attribute__((always_inline))

int simd(void) { return SIMD; }

static inline float half_to_float(uint16_t h) {
#if SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    bits = sign | (exp == 0x1f ? 0x7f800000 | (man << 13) : ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* 8-bit blocks of one activation row: codes qx, scales dx, and sx = dx * sum(qx) per block */
static void quantize_row(const float *x, int8_t *qx, float *dx, float *sx, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += 32, qx += 32) {
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
    }
}

#if SIMD
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE __m256i unpack(const uint8_t *qs) {  /* 16 bytes -> 32 codes: low nibbles, then high nibbles */
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
}

INLINE __m256 block_dot(__m256i q, const int8_t *qx) {  /* 8 partial integer sums of q * qx, as floats */
    __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)qx));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* out[r * ldo] = W row . x row r for R rows; A accumulators per row hide the FMA latency */
INLINE void q4_rows(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, const int8_t *qx, const float *dx,
                     const float *sx, int64_t nb, const int R, const int A, float *out, int64_t ldo) {
    const int64_t K = nb * 32;
    __m256 acc[R][A];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < A; a++) acc[r][a] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {  /* 8 blocks at a time: their scales fill one vector */
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + b)));
        __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm + b)));
        float s[R][8];
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(s[r], _mm256_mul_ps(d, _mm256_loadu_ps(dx + r * nb + b)));
            acc[r][0] = _mm256_fmadd_ps(m, _mm256_loadu_ps(sx + r * nb + b), acc[r][0]);
        }
        for (int j = 0; j < 8; j++) {
            __m256i q = unpack(wq + (b + j) * 16);
            for (int r = 0; r < R; r++)
                acc[r][j % A] = _mm256_fmadd_ps(block_dot(q, qx + r * K + (b + j) * 32),
                                                _mm256_broadcast_ss(&s[r][j]), acc[r][j % A]);
        }
    }
    float tail[R];
    for (int r = 0; r < R; r++) tail[r] = 0.0f;
    for (; b < nb; b++) {
        __m256i q = unpack(wq + b * 16);
        float d = _cvtsh_ss(wd[b]), m = _cvtsh_ss(wm[b]);
        for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_fmadd_ps(block_dot(q, qx + r * K + b * 32), _mm256_set1_ps(d * dx[r * nb + b]), acc[r][0]);
            tail[r] += m * sx[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++) {
        for (int a = 1; a < A; a++) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
        out[r * ldo] = hsum(acc[r][0]) + tail[r];
    }
}

/* out[r * ldo] = scale * (int8 W row . x row r) for R rows */
INLINE void q8_rows(const int8_t *w, float scale, const int8_t *qx, const float *dx, int64_t nb, const int R,
                    const int A, float *out, int64_t ldo) {
    const int64_t K = nb * 32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R][A];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < A; a++) acc[r][a] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b < nb; b += A) {
        for (int a = 0; a < A && b + a < nb; a++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (b + a) * 32));
            __m256i wabs = _mm256_sign_epi8(wv, wv);  /* maddubs multiplies unsigned by signed bytes */
            for (int r = 0; r < R; r++) {
                __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qx + r * K + (b + a) * 32)), wv);
                __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones));
                acc[r][a] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(dx + r * nb + b + a), acc[r][a]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int a = 1; a < A; a++) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
        out[r * ldo] = scale * hsum(acc[r][0]);
    }
}
#else
INLINE void q4_rows(const uint8_t *wq, const uint16_t *wd, const uint16_t *wm, const int8_t *qx, const float *dx,
                     const float *sx, int64_t nb, const int R, const int A, float *out, int64_t ldo) {
    (void)A;
    for (int r = 0; r < R; r++) {
        const int8_t *x = qx + r * nb * 32;
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++, x += 32) {
            const uint8_t *q = wq + b * 16;
            int isum = 0;
            for (int j = 0; j < 16; j++) isum += (q[j] & 15) * x[j] + (q[j] >> 4) * x[j + 16];
            sum += half_to_float(wd[b]) * dx[r * nb + b] * (float)isum + half_to_float(wm[b]) * sx[r * nb + b];
        }
        out[r * ldo] = sum;
    }
}

INLINE void q8_rows(const int8_t *w, float scale, const int8_t *qx, const float *dx, int64_t nb, const int R,
                    const int A, float *out, int64_t ldo) {
    (void)A;
    for (int r = 0; r < R; r++) {
        const int8_t *x = qx + r * nb * 32;
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int isum = 0;
            for (int j = 0; j < 32; j++) isum += w[b * 32 + j] * x[b * 32 + j];
            sum += dx[r * nb + b] * (float)isum;
        }
        out[r * ldo] = scale * sum;
    }
}
#endif

typedef struct {
    const uint8_t *qs;           /* 4-bit codes, or NULL for int8 rows */
    const uint16_t *d, *m;       /* 4-bit block scales and offsets */
    const int8_t *q8;            /* int8 rows */
    const float *row_scale;      /* their scales */
} weights;

/* the rows [m0, m1) of y for weight row n */
static void weight_row(const weights *w, int64_t n, const int8_t *qx, const float *dx, const float *sx,
                       int64_t m0, int64_t m1, int64_t N, int64_t K, float *y) {
    const int64_t nb = K / 32;
    int64_t i = m0;
    if (w->qs) {
        const uint8_t *wq = w->qs + n * nb * 16;
        const uint16_t *wd = w->d + n * nb, *wm = w->m + n * nb;
        for (; i + 4 <= m1; i += 4)
            q4_rows(wq, wd, wm, qx + i * K, dx + i * nb, sx + i * nb, nb, 4, 1, y + i * N + n, N);
        for (; i < m1; i++)
            q4_rows(wq, wd, wm, qx + i * K, dx + i * nb, sx + i * nb, nb, 1, 2, y + i * N + n, N);
    } else {
        const int8_t *wq = w->q8 + n * K;
        for (; i + 4 <= m1; i += 4)
            q8_rows(wq, w->row_scale[n], qx + i * K, dx + i * nb, nb, 4, 1, y + i * N + n, N);
        for (; i < m1; i++)
            q8_rows(wq, w->row_scale[n], qx + i * K, dx + i * nb, nb, 1, 2, y + i * N + n, N);
    }
}

static int matmul(const float *x, const weights *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / 32;
    int8_t *qx = malloc((size_t)(M * K) + 2 * sizeof(float) * (size_t)(M * nb));
    if (!qx) return -1;
    float *dx = (float *)(qx + M * K), *sx = dx + M * nb;
    const int threads = M * N * K >= (1 << 18);  /* below this, waking a thread costs more than it saves */
#pragma omp parallel for schedule(static) if (threads && M >= 8)
    for (int64_t i = 0; i < M; i++) quantize_row(x + i * K, qx + i * K, dx + i * nb, sx + i * nb, nb);
    /* activation rows in tiles that stay in cache while every weight row streams past them */
    const int64_t tile = 64;
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t m1 = m0 + tile < M ? m0 + tile : M;
#pragma omp parallel for schedule(static) if (threads)
        for (int64_t n = 0; n < N; n++) {
            weight_row(w, n, qx, dx, sx, m0, m1, N, K, y);
            if (bias)
                for (int64_t r = m0; r < m1; r++) y[r * N + n] += bias[n];
        }
    }
    free(qx);
    return 0;
}

/* y[M,N] = x[M,K] @ W^T (+ bias, may be NULL) for 4-bit blocks. Returns 0, or -1 when out of memory. */
int q4_matmul(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K) {
    const weights w = {qs, d, m, NULL, NULL};
    return matmul(x, &w, bias, y, M, N, K);
}

/* y[M,N] = x[M,K] @ W^T for int8 rows with float scales. Returns 0, or -1 when out of memory. */
int q8_matmul(const float *x, const int8_t *q8, const float *row_scale, float *y, int64_t M, int64_t N, int64_t K) {
    const weights w = {NULL, NULL, NULL, q8, row_scale};
    return matmul(x, &w, NULL, y, M, N, K);
}

/* out[N,K] = d * q + m for 4-bit blocks, in float32 */
void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *out, int64_t N, int64_t K) {
    const int64_t nb = K / 32;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = qs + (n * nb + b) * 16;
            const float scale = half_to_float(d[n * nb + b]), offset = half_to_float(m[n * nb + b]);
            float *o = out + n * K + b * 32;
            for (int j = 0; j < 16; j++) {
                o[j] = scale * (float)(q[j] & 15) + offset;
                o[j + 16] = scale * (float)(q[j] >> 4) + offset;
            }
        }
    }
}
