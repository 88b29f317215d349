// matmul.c's kernels as torch operators (lmgen::q4_matmul, q8_matmul, q4_dequantize): one dispatcher call from eager
// code or from a torch.compile graph, with shape checks, and Meta kernels so the compiler can trace them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifndef LMGEN_OPS
#define LMGEN_OPS lmgen
#endif

extern "C" {
int simd(void);
int q4_matmul(const float *x, const uint8_t *qs, const uint16_t *d, const uint16_t *m, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K);
int q8_matmul(const float *x, const int8_t *q8, const float *row_scale, float *y, int64_t M, int64_t N, int64_t K);
void q4_dequantize(const uint8_t *qs, const uint16_t *d, const uint16_t *m, float *out, int64_t N, int64_t K);
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
    TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kFloat && scales.numel() == n,
                "q8_matmul: scales must be float32 [", n, "]");
    at::Tensor xc = x.contiguous(), y = q8_meta(xc, q, scales);
    const int rc = q8_matmul(xc.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                             y.data_ptr<float>(), xc.size(0), n, k);
    TORCH_CHECK(rc == 0, "q8_matmul: out of memory");
    return y;
}

void q4_dequant(const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m, at::Tensor &out) {
    TORCH_CHECK(d.dim() == 2, "q4_dequantize: d must be [N, K/32], got ", d.sizes());
    const int64_t n = d.size(0), k = d.size(1) * 32;
    check_weight("q4_dequantize", qs, at::kByte, n, k / 2);
    check_weight("q4_dequantize", d, at::kHalf, n, k / 32);
    check_weight("q4_dequantize", m, at::kHalf, n, k / 32);
    check_weight("q4_dequantize", out, at::kFloat, n, k);
    q4_dequantize(qs.data_ptr<uint8_t>(), (const uint16_t *)d.data_ptr(), (const uint16_t *)m.data_ptr(),
                  out.data_ptr<float>(), n, k);
}

bool vectorized() { return simd() != 0; }

}  // namespace

TORCH_LIBRARY(LMGEN_OPS, lib) {
    lib.def("q4_matmul(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? bias) -> Tensor");
    lib.def("q8_matmul(Tensor x, Tensor q, Tensor scales) -> Tensor");
    lib.def("q4_dequantize(Tensor qs, Tensor d, Tensor m, Tensor(a!) out) -> ()");
    lib.def("simd() -> bool", &vectorized);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, CPU, lib) {
    lib.impl("q4_matmul", &q4);
    lib.impl("q8_matmul", &q8);
    lib.impl("q4_dequantize", &q4_dequant);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, Meta, lib) {
    lib.impl("q4_matmul", &q4_meta);
    lib.impl("q8_matmul", &q8_meta);
}
