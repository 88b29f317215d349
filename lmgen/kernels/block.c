/* The small per-row steps of a Llama decoder layer on the CPU, float32: RMSNorm, rotary embedding, SiLU-and-mul.
 *
 * ops.cpp chains them with matmul.c's and attention.c's kernels into whole layers. Every row is computed on its
 * own, in a fixed order, so a row's numbers never depend on how many rows share the call (batch invariance).
 * Plain C that the compiler vectorizes across lanes (no reassociation: built with -ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16  /* partial sums of RMSNorm: lane j sums elements j, j + 16, ... */

/* y[M, K] = x / sqrt(mean(x^2) + eps) * w, row by row */
void rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t K, float eps) {
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * K;
        float acc[LANES] = {0}, sum = 0.0f;
        int64_t k = 0;
        for (; k + LANES <= K; k += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += xi[k + j] * xi[k + j];
        for (int j = 0; j < LANES; j++) sum += acc[j];
        for (; k < K; k++) sum += xi[k] * xi[k];
        const float r = 1.0f / sqrtf(sum / (float)K + eps);
        for (k = 0; k < K; k++) y[i * K + k] = w[k] * (xi[k] * r);
    }
}

/* Rotate, in place, the first `heads` heads of D values in each row of x (rows `stride` floats apart) by the
 * row's cos and sin [M, D] (halves repeated, Hugging Face's rotate-half layout): the same products and sums
 * as x * cos + rotate_half(x) * sin. */
void rope(float *x, const float *cos, const float *sin, int64_t M, int64_t stride, int64_t heads, int64_t D) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (M * heads * D >= (1 << 16))
    for (int64_t i = 0; i < M; i++) {
        const float *c = cos + i * D, *s = sin + i * D;
        for (int64_t h = 0; h < heads; h++) {
            float *xh = x + i * stride + h * D;
            for (int64_t t = 0; t < half; t++) {
                const float a = xh[t], b = xh[t + half];
                xh[t] = a * c[t] + -b * s[t];
                xh[t + half] = b * c[t + half] + a * s[t + half];
            }
        }
    }
}

static inline float exp_nonpositive(float x) {  /* e^x for x <= 0: Cephes' polynomial, as attention.c's */
    x = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* y[M, I] = silu(gate) * up for rows [gate | up] of gu [M, 2I] */
void silu_mul(const float *gu, float *y, int64_t M, int64_t I) {
#pragma omp parallel for schedule(static) if (M * I >= (1 << 16))
    for (int64_t i = 0; i < M; i++) {
        const float *g = gu + i * 2 * I, *u = g + I;
        for (int64_t k = 0; k < I; k++) {
            const float t = exp_nonpositive(-fabsf(g[k]));  /* sigmoid without overflow on either side */
            const float sig = (g[k] >= 0.0f ? 1.0f : t) / (1.0f + t);
            y[i * I + k] = g[k] * sig * u[k];
        }
    }
}

/* y += x, elementwise over n floats */
void add_into(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* Constrained decoding's mask: scores[i, j] = -inf wherever bit j of row i's mask is clear (bits [M, W], 32
   tokens a word, least significant bit first); counts[i] = the tokens row i still allows among its V. */
void apply_bitmask(float *scores, const int32_t *bits, int64_t *counts, int64_t M, int64_t V, int64_t W) {
    for (int64_t i = 0; i < M; i++) {
        float *row = scores + i * V;
        int64_t count = 0;
        for (int64_t w = 0; w < W && w * 32 < V; w++) {
            const uint32_t word = (uint32_t)bits[i * W + w];
            const int64_t n = V - w * 32 < 32 ? V - w * 32 : 32;
            if (word == 0xffffffffu && n == 32) {
                count += 32;
                continue;
            }
            for (int64_t b = 0; b < n; b++) {
                if ((word >> b) & 1u) count++;
                else row[w * 32 + b] = -INFINITY;
            }
        }
        counts[i] = count;
    }
}
