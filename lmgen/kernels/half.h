/* float16 -> float32 for the kernels: F16C where the build has it (SIMD), else by the bits. */
#ifndef LMGEN_HALF_H
#define LMGEN_HALF_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

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
#endif
