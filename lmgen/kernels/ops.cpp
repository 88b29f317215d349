// matmul.c's, kquant.c's and attention.c's kernels as torch operators (lmgen::q4_matmul, q8_matmul, kq_matmul,
// decode_attention): one dispatcher call from eager code or from a torch.compile graph, with shape checks, and
// Meta kernels so the compiler can trace them. With block.c's steps they also make whole Llama decoder layers on
// 4-bit weights (layer_in, layer_out, and decode_layers: every layer of a decoding step in one call, no Python
// between).
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
int q8_matmul(const float *x, const int8_t *q8, const void *block_scale, int half, const float *bias, float *y,
              int64_t M, int64_t N, int64_t K);
int kq_block(int kind, int64_t *bytes);
int kq_matmul(const float *x, const uint8_t *w, int kind, const float *bias, float *y, int64_t M, int64_t N,
              int64_t K);
int decode_attention(const float *q, const void *k, const void *v, const int64_t *slots, const int64_t *positions,
                     float *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale, int kind,
                     int64_t window);
void rms_norm(const float *x, const float *w, float *y, int64_t M, int64_t K, float eps);
void rope(float *x, const float *cos, const float *sin, int64_t M, int64_t stride, int64_t heads, int64_t D);
void silu_mul(const float *gu, float *y, int64_t M, int64_t I);
void add_into(float *y, const float *x, int64_t n);
void apply_bitmask(float *scores, const int32_t *bits, int64_t *counts, int64_t M, int64_t V, int64_t W);
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

void check_bias(const char *op, const std::optional<at::Tensor> &bias, int64_t n) {
    if (bias) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == n, op,
                          ": bias must be float32 [", n, "]");
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
    check_bias("q4_matmul", bias, n);
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

at::Tensor q8(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scales,
              const std::optional<at::Tensor> &bias) {
    check_input("q8_matmul", x);
    const int64_t n = q.size(0), k = x.size(1);
    check_weight("q8_matmul", q, at::kChar, n, k);
    const bool half = scales.scalar_type() == at::kHalf;
    TORCH_CHECK(scales.is_contiguous() && (half || scales.scalar_type() == at::kFloat) &&
                scales.numel() == n * (k / 32),
                "q8_matmul: scales must be float32 or float16 [", n, ", ", k / 32, "], one per block of 32");
    check_bias("q8_matmul", bias, n);
    at::Tensor xc = x.contiguous(), y = q8_meta(xc, q, scales);
    const int rc = q8_matmul(xc.data_ptr<float>(), q.data_ptr<int8_t>(), scales.data_ptr(), half,
                             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), xc.size(0), n, k);
    TORCH_CHECK(rc == 0, "q8_matmul: out of memory");
    return y;
}

at::Tensor q8_op(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scales) {
    return q8(x, q, scales, std::nullopt);
}

at::Tensor kq_meta(const at::Tensor &x, const at::Tensor &w, int64_t kind, const std::optional<at::Tensor> &bias) {
    return at::empty({x.size(0), w.size(0)}, x.options());
}

// x [M, K] @ W^T for a GGUF matrix w [N, bytes a row] of GGML type `kind` (Q5_0, Q4_K, Q5_K, Q6_K), kquant.c
at::Tensor kq(const at::Tensor &x, const at::Tensor &w, int64_t kind, const std::optional<at::Tensor> &bias) {
    int64_t bytes = 0;
    const int64_t block = kq_block((int)kind, &bytes);
    TORCH_CHECK(block, "kq_matmul: kind ", kind, " is none of the GGML types it runs: Q5_0 (6), Q4_K (12), ",
                "Q5_K (13), Q6_K (14)");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % block == 0, "kq_matmul: x must be ",
                "float32 [M, K] with K a multiple of ", block, ", got ", x.scalar_type(), " ", x.sizes());
    TORCH_CHECK(w.dim() == 2, "kq_matmul: the weight must be uint8 [N, bytes a row], got ", w.sizes());
    const int64_t n = w.size(0), k = x.size(1);
    check_weight("kq_matmul", w, at::kByte, n, k / block * bytes);
    check_bias("kq_matmul", bias, n);
    at::Tensor xc = x.contiguous(), y = kq_meta(xc, w, kind, bias);
    const int rc = kq_matmul(xc.data_ptr<float>(), w.data_ptr<uint8_t>(), (int)kind,
                             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), xc.size(0), n, k);
    TORCH_CHECK(rc == 0, "kq_matmul: out of memory");
    return y;
}

at::Tensor attention_meta(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                          at::Tensor &v_cache, int64_t layer, const at::Tensor &slots, const at::Tensor &positions,
                          double scale, int64_t window) {
    return at::empty(q.sizes(), q.options());
}

// Writes each row's new keys and values k, v [B, Hkv, 1, D] into layer `layer` of the cache at its slot and
// position, then attends over that slot's positions up to and including it: the last `window` of them when
// window > 0 (a sliding-window layer), else all.
at::Tensor attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                     at::Tensor &v_cache, int64_t layer, const at::Tensor &slots, const at::Tensor &positions,
                     double scale, int64_t window) {
    TORCH_CHECK(window >= 0, "decode_attention: window must be 0 (none) or a number of positions, got ", window);
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat,
                "decode_attention: q must be float32 [B, Hq, 1, D], got ", q.scalar_type(), " ", q.sizes());
    const int64_t b = q.size(0), hq = q.size(1), d = q.size(3);
    const at::ScalarType kv_type = k_cache.scalar_type();
    const bool kv_ok = kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16;
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && kv_ok &&
                    k_cache.size(4) == d && hq % k_cache.size(2) == 0 && v_cache.sizes() == k_cache.sizes() &&
                    v_cache.is_contiguous() && v_cache.scalar_type() == kv_type,
                "decode_attention: the caches must be contiguous float32, float16 or bfloat16 [layers, slots, Hkv, S, ",
                d,
                "] with Hkv dividing ", hq, ", got ", k_cache.scalar_type(), " ", k_cache.sizes(), " and ",
                v_cache.scalar_type(), " ", v_cache.sizes());
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
    at::Tensor s = slots.contiguous(), p = positions.contiguous();
    at::Tensor kc = k.to(kv_type).contiguous(), vc = v.to(kv_type).contiguous();  // stored as the cache stores them
    const int64_t *sp = s.data_ptr<int64_t>(), *pp = p.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; i++)
        TORCH_CHECK(sp[i] >= 0 && sp[i] < slots_n && pp[i] >= 0 && pp[i] < len, "decode_attention: row ", i,
                    " reads slot ", sp[i], " at position ", pp[i], ", outside the cache's ", slots_n, " slots of ",
                    len, " positions");
    const int64_t size = k_cache.element_size(), layer_at = layer * slots_n * hkv * len * d;
    char *kl = (char *)k_cache.data_ptr() + layer_at * size, *vl = (char *)v_cache.data_ptr() + layer_at * size;
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < hkv; h++) {
            const int64_t at = ((sp[i] * hkv + h) * len + pp[i]) * d * size, from = (i * hkv + h) * d * size;
            std::memcpy(kl + at, (const char *)kc.data_ptr() + from, size * d);
            std::memcpy(vl + at, (const char *)vc.data_ptr() + from, size * d);
        }
    at::Tensor qc = q.contiguous(), out = at::empty(q.sizes(), q.options());
    const int rc = decode_attention(qc.data_ptr<float>(), kl, vl, sp, pp, out.data_ptr<float>(), b, hq, hkv, len, d,
                                    (float)scale, kv_type == at::kFloat ? 0 : kv_type == at::kHalf ? 1 : 2, window);
    TORCH_CHECK(rc == 0, "decode_attention: out of memory");
    return out;
}

// A Llama decoder layer's weights, in this order (lmgen/models/fused.py builds the list): the input norm;
// qkv_proj's qs, d, m and bias (an empty tensor: none), or for 8-bit rows q, scales, (empty), bias; o_proj's four;
// the post-attention norm; gate_up_proj's four; down_proj's four.
constexpr int64_t LAYER_PARTS = 18;
enum { IN_NORM = 0, QKV = 1, O = 5, POST_NORM = 9, GATE_UP = 10, DOWN = 14 };

at::Tensor linear(const at::Tensor &x, const at::Tensor *w) {
    std::optional<at::Tensor> bias;
    if (w[3].numel()) bias = w[3];
    if (w[0].scalar_type() == at::kChar) return q8(x, w[0], w[1], bias);  // 8-bit rows, block scales (w[2] unused)
    return q4(x, w[0], w[1], w[2], bias);
}

void check_rows(const char *op, const char *name, const at::Tensor &t, int64_t rows, int64_t cols) {
    TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kFloat && t.size(0) == rows &&
                    t.size(1) == cols,
                op, ": ", name, " must be contiguous float32 [", rows, ", ", cols, "], got ", t.scalar_type(), " ",
                t.sizes());
}

at::Tensor norm(const at::Tensor &x, const at::Tensor &w, double eps) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.numel() == x.size(1),
                "rms_norm: the weight must be float32 [", x.size(1), "]");
    at::Tensor y = at::empty(x.sizes(), x.options());
    rms_norm(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), (float)eps);
    return y;
}

const at::Tensor *layer_parts(const char *op, at::TensorList w) {
    TORCH_CHECK((int64_t)w.size() >= LAYER_PARTS, op, ": expected ", LAYER_PARTS, " weight parts a layer, got ",
                w.size(), " for layer 0");
    return w.data();
}

// q, k and v [M, (Hq + 2 Hkv) D] for x [M, hidden]: RMSNorm, qkv_proj, then the first `rotated` heads rotated
at::Tensor in_step(const at::Tensor &x, const at::Tensor *w, double eps, const at::Tensor &cos, const at::Tensor &sin,
                   int64_t rotated) {
    check_rows("layer_in", "x", x, x.size(0), x.size(1));
    at::Tensor qkv = linear(norm(x, w[IN_NORM], eps), w + QKV);
    const int64_t d = cos.size(-1);
    check_rows("layer_in", "cos", cos, x.size(0), d);
    check_rows("layer_in", "sin", sin, x.size(0), d);
    TORCH_CHECK(d % 2 == 0 && rotated * d <= qkv.size(1), "layer_in: ", rotated, " heads of ", d,
                " don't fit rows of ", qkv.size(1));
    rope(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0), qkv.size(1), rotated, d);
    return qkv;
}

// the layer's output for its input x and attention output attn [M, Hq D]: x + o_proj(attn), then its MLP
at::Tensor out_step(const at::Tensor &x, const at::Tensor &attn, const at::Tensor *w, double eps) {
    check_rows("layer_out", "x", x, x.size(0), x.size(1));
    at::Tensor h = linear(attn, w + O);
    check_rows("layer_out", "o_proj's output", h, x.size(0), x.size(1));
    add_into(h.data_ptr<float>(), x.data_ptr<float>(), x.numel());
    at::Tensor gu = linear(norm(h, w[POST_NORM], eps), w + GATE_UP);
    const int64_t inner = gu.size(1) / 2;
    at::Tensor act = at::empty({x.size(0), inner}, x.options());
    silu_mul(gu.data_ptr<float>(), act.data_ptr<float>(), x.size(0), inner);
    at::Tensor y = linear(act, w + DOWN);
    add_into(y.data_ptr<float>(), h.data_ptr<float>(), h.numel());
    return y;
}

at::Tensor layer_in(const at::Tensor &x, at::TensorList w, double eps, const at::Tensor &cos, const at::Tensor &sin,
                    int64_t rotated) {
    return in_step(x, layer_parts("layer_in", w), eps, cos, sin, rotated);
}

at::Tensor layer_out(const at::Tensor &x, const at::Tensor &attn, at::TensorList w, double eps) {
    return out_step(x, attn, layer_parts("layer_out", w), eps);
}

// Every layer of a step whose rows are all lone tokens (one per sequence, at slots and positions): each
// layer's in_step, its keys and values written and attended over by decode_attention, then its out_step.
at::Tensor decode_layers(const at::Tensor &x, at::TensorList w, double eps, const at::Tensor &cos,
                         const at::Tensor &sin, int64_t n_heads, at::Tensor &k_cache, at::Tensor &v_cache,
                         const at::Tensor &slots, const at::Tensor &positions, double scale) {
    TORCH_CHECK(w.size() % LAYER_PARTS == 0, "decode_layers: expected ", LAYER_PARTS, " weight parts a layer, got ",
                w.size());
    TORCH_CHECK(k_cache.dim() == 5, "decode_layers: the caches must be [layers, slots, Hkv, S, D]");
    const int64_t b = x.size(0), hkv = k_cache.size(2), d = k_cache.size(4), layers = w.size() / LAYER_PARTS;
    at::Tensor h = x;
    for (int64_t l = 0; l < layers; l++) {
        const at::Tensor *parts = w.data() + l * LAYER_PARTS;
        at::Tensor qkv = in_step(h, parts, eps, cos, sin, n_heads + hkv);
        at::Tensor q = qkv.narrow(1, 0, n_heads * d).view({b, n_heads, 1, d});
        at::Tensor k = qkv.narrow(1, n_heads * d, hkv * d).view({b, hkv, 1, d});
        at::Tensor v = qkv.narrow(1, (n_heads + hkv) * d, hkv * d).view({b, hkv, 1, d});
        at::Tensor a = attention(q, k, v, k_cache, v_cache, l, slots, positions, scale, 0);  // Llama: no window
        h = out_step(h, a.view({b, n_heads * d}), parts, eps);
    }
    return h;
}

// Constrained decoding: scores [M, V] float32 set to -inf where the bitmask [M, W] int32 has a clear bit, in place;
// returns each row's count of allowed tokens.
at::Tensor token_bitmask(at::Tensor &scores, const at::Tensor &bits) {
    TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
                "apply_token_bitmask: scores must be contiguous float32 [M, V]");
    TORCH_CHECK(bits.dim() == 2 && bits.is_contiguous() && bits.scalar_type() == at::kInt &&
                    bits.size(0) == scores.size(0) && bits.size(1) * 32 >= scores.size(1),
                "apply_token_bitmask: bits must be contiguous int32 [M, >= V / 32], got ", bits.sizes());
    at::Tensor counts = at::empty({scores.size(0)}, scores.options().dtype(at::kLong));
    apply_bitmask(scores.data_ptr<float>(), bits.data_ptr<int32_t>(), counts.data_ptr<int64_t>(), scores.size(0),
                  scores.size(1), bits.size(1));
    return counts;
}

bool vectorized() { return simd() != 0; }

}  // namespace

TORCH_LIBRARY(LMGEN_OPS, lib) {
    lib.def("q4_matmul(Tensor x, Tensor qs, Tensor d, Tensor m, Tensor? bias) -> Tensor");
    lib.def("q8_matmul(Tensor x, Tensor q, Tensor scales) -> Tensor");
    lib.def("kq_matmul(Tensor x, Tensor blocks, int kind, Tensor? bias) -> Tensor");
    lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, "
            "Tensor slots, Tensor positions, float scale, int window=0) -> Tensor");
    lib.def("layer_in(Tensor x, Tensor[] layer, float eps, Tensor cos, Tensor sin, int rotated) -> Tensor");
    lib.def("layer_out(Tensor x, Tensor attn, Tensor[] layer, float eps) -> Tensor");
    lib.def("decode_layers(Tensor x, Tensor[] weights, float eps, Tensor cos, Tensor sin, int n_heads, "
            "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions, float scale) -> Tensor");
    lib.def("apply_token_bitmask(Tensor(a!) scores, Tensor bits) -> Tensor");
    lib.def("simd() -> bool", &vectorized);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, CPU, lib) {
    lib.impl("q4_matmul", &q4);
    lib.impl("q8_matmul", &q8_op);
    lib.impl("kq_matmul", &kq);
    lib.impl("decode_attention", &attention);
    lib.impl("layer_in", &layer_in);
    lib.impl("layer_out", &layer_out);
    lib.impl("decode_layers", &decode_layers);
    lib.impl("apply_token_bitmask", &token_bitmask);
}

TORCH_LIBRARY_IMPL(LMGEN_OPS, Meta, lib) {
    lib.impl("q4_matmul", &q4_meta);
    lib.impl("q8_matmul", &q8_meta);
    lib.impl("kq_matmul", &kq_meta);
    lib.impl("decode_attention", &attention_meta);
}
