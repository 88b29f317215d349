// matmul.c's and attention.c's kernels as torch operators (lmgen::q4_matmul, q8_matmul, decode_attention): one
// dispatcher call from eager code or from a torch.compile graph, with shape checks, and Meta kernels so the
// compiler can trace them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#ifndef LMGEN_OPS
#define LMGEN_OPS lmgen
#endif

extern "C" {
int simd(void);
int q4_matmul(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K);
int q8_matmul(const float *x, const int8_t *q8, const float *block_scale, float *y, int64_t M, int64_t N, int64_t K);
int decode_attention(const float *q, const float *k, const float *v, const int64_t *slots, const int64_t *positions,
                     float *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale);
}

namespace {

void check_input(const char *op, const at::Tensor &x) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0, op,
                ": x must be float32 [M, K] with K a multiple of 32, got ", x.scalar_type(), " ", x.sizes());
}

void check_weight(const char *op, const at::Tensor &w, at::ScalarType type, int64_t n, int64_t cols) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == type && w.dim() == 2 && w.size(0) == n && w.size(1) == cols,
                op, ": expected a contiguous ", type, " [", n, ", ", cols, "] weight part, got ", w.scalar_type(),
                " ", w.sizes());
}

at::Tensor q4_meta(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m,
                   const std::optional<at::Tensor> &bias) {
    return at::empty({x.size(0), d.size(0)}, x.options());
}

at::Tensor q4(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m,
              const std::optional<at::Tensor> &bias) {
    check_input("q4_matmul", x);
    const int64_t n = d.size(0), k = x.size(1);
    TORCH_CHECK(n % 8 == 0, "q4_matmul: the weight's rows come in groups of 8, got ", n, " rows");
    check_weight("q4_matmul", qs, at::kByte, n, k / 2);
    check_weight("q4_matmul", d, at::kHalf, n, k / 32);
    check_weight("q4_matmul", m, at::kHalf, n, k / 32);
    if (bias) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == n,
                          "q4_matmul: bias must be float32 [", n, "]");
    at::Tensor xc = x.contiguous(), y = q4_meta(xc, qs, d, m, bias);
    const int rc = q4_matmul(xc.data_ptr<float>(), qs.data_ptr<uint8_t>(), (const uint16_t *)d.data_ptr(),
                             (const uint16_t *)m.data_ptr(), bias ? bias->data_ptr<float>() : nullptr,
                             y.data_ptr<float>(), xc.size(0), n, k);
    TORCH_CHECK(rc == 0, "q4_matmul: out of memory");
    return y;
}

at::Tensor q8_meta(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scales) {
    return at::empty({x.size(0), q.size(0)}, x.options());
}

at::Tensor q8(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scales) {
    check_input("q8_matmul", x);
    const int64_t n = q.size(0), k = x.size(1);
    check_weight("q8_matmul", q, at::kChar, n, k);
    TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat && scales.numel() == n * (k / 32),
                "q8_matmul: scales must be float32 [", n, ", ", k / 32, "], one per block of 32");
    at::Tensor xc = x.contiguous(), y = q8_meta(xc, q, scales);
    const int rc = q8_matmul(xc.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                             y.data_ptr<float>(), xc.size(0), n, k);
    TORCH_CHECK(rc == 0, "q8_matmul: out of memory");
    return y;
}

at::Tensor attention_meta(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                          at::Tensor &v_cache, int64_t layer, const at::Tensor &slots, const at::Tensor &positions,
                          double scale) {
    return at::empty(q.sizes(), q.options());
}

// Writes each row's new keys and values k, v [B, Hkv, 1, D] into layer `layer` of the cache at its slot and
// position, then attends over that slot's positions up to and including it.
at::Tensor attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                     at::Tensor &v_cache, int64_t layer, const at::Tensor &slots, const at::Tensor &positions,
                     double scale) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat,
                "decode_attention: q must be float32 [B, Hq, 1, D], got ", q.scalar_type(), " ", q.sizes());
    const int64_t b = q.size(0), hq = q.size(1), d = q.size(3);
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat &&
                    k_cache.size(4) == d && hq % k_cache.size(2) == 0 && v_cache.sizes() == k_cache.sizes() &&
                    v_cache.is_contiguous() && v_cache.scalar_type() == at::kFloat,
                "decode_attention: the caches must be contiguous float32 [layers, slots, Hkv, S, ", d,
                "] with Hkv dividing ", hq, ", got ", k_cache.sizes(), " and ", v_cache.sizes());
    const int64_t slots_n = k_cache.size(1), hkv = k_cache.size(2), len = k_cache.size(3);
    TORCH_CHECK(layer >= 0 && layer < k_cache.size(0), "decode_attention: layer ", layer, " is outside the cache's ",
                k_cache.size(0), " layers");
    const std::vector<int64_t> kv_shape{b, hkv, 1, d};
    TORCH_CHECK(k.sizes() == kv_shape && v.sizes() == kv_shape && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat,
                "decode_attention: the new k and v must be float32 [", b, ", ", hkv, ", 1, ", d, "], got ", k.sizes(),
                " and ", v.sizes());
    TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.numel() == b &&
                    positions.numel() == b,
                "decode_attention: slots and positions must be int64 with ", b, " entries");
    at::Tensor s = slots.contiguous(), p = positions.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const int64_t *sp = s.data_ptr<int64_t>(), *pp = p.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; i++)
        TORCH_CHECK(sp[i] >= 0 && sp[i] < slots_n && pp[i] >= 0 && pp[i] < len, "decode_attention: row ", i,
                    " reads slot ", sp[i], " at position ", pp[i], ", outside the cache's ", slots_n, " slots of ",
                    len, " positions");
    float *kl = k_cache.data_ptr<float>() + layer * slots_n * hkv * len * d;
    float *vl = v_cache.data_ptr<float>() + layer * slots_n * hkv * len * d;
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < hkv; h++) {
            const int64_t at = ((sp[i] * hkv + h) * len + pp[i]) * d;
            std::memcpy(kl + at, kc.data_ptr<float>() + (i * hkv + h) * d, sizeof(float) * d);
            std::memcpy(vl + at, vc.data_ptr<float>() + (i * hkv + h) * d, sizeof(float) * d);
        }
    at::Tensor qc = q.contiguous(), out = at::empty(q.sizes(), q.options());
    const int rc = decode_attention(qc.data_ptr<float>(), kl, vl, sp, pp, out.data_ptr<float>(), b, hq, hkv, len, d,
                                    (float)scale);
    TORCH_CHECK(rc == 0, "decode_attention: out of memory");
    return out;
}

bool vectorized() { return simd() != 0; }

}  // namespace

TORCH_LIBRARY(LMGEN_OPS, lib) {
    lib.def("q4_matmul(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? bias) -> Tensor");
    lib.def("q8_matmul(Tensor x, Tensor q, Tensor scales) -> Tensor");
    lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, "
            "Tensor slots, Tensor positions, float scale) -> Tensor");
    lib.def("simd() -> bool", &vectorized);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, CPU, lib) {
    lib.impl("q4_matmul", &q4);
    lib.impl("q8_matmul", &q8);
    lib.impl("decode_attention", &attention);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, Meta, lib) {
    lib.impl("q4_matmul", &q4_meta);
    lib.impl("q8_matmul", &q8_meta);
    lib.impl("decode_attention", &attention_meta);
}
