"""The int4 Llama layers as native calls (models/fused.py): the default path's decoder, checked against the Python
layers on the same 4-bit weights, decode steps against the layer-by-layer path bit for bit, and every build."""

from __future__ import annotations

import pytest
import torch

import lmgen
from lmgen.cache import KVCache, Span, native_cache_dtype
from lmgen.models.fused import FusedLayers

from .conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("fused"), hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=2)
    lm = lmgen.load(folder, quantize="int4")
    assert isinstance(lm.model.fused, FusedLayers)  # a Llama on int4 linears with the native kernels runs fused
    return lm


def prompts_in(model, cache, lengths):
    """Prefill one prompt per slot (one mixed step of spans); return the next position of each."""
    torch.manual_seed(1)
    spans, start = [], 0
    for slot, n in enumerate(lengths):
        spans.append(Span(start, n, slot, 0))
        start += n
    tokens = torch.randint(0, 1000, (1, start))
    model(tokens, cache.plan(spans), cache)
    return lengths


def decode_step(model, cache, positions):
    tokens = torch.tensor([[11 + i for i in range(len(positions))]])
    return cache.plan([Span(i, 1, slot, p) for i, (slot, p) in enumerate(enumerate(positions))]), tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # the native layers' cache on either CPU
def test_a_decode_step_in_one_call_equals_the_layer_by_layer_path_bit_for_bit(tiny_int4, dtype):
    model = tiny_int4.model
    cache = KVCache.for_model(model, 3, 64, dtype=dtype)
    positions = prompts_in(model, cache, [5, 9, 2])
    step, tokens = decode_step(model, cache, positions)
    assert step.all_lone and step.kernel
    x, rope = model.embed(tokens, step)
    whole = model.fused(x, rope, cache, step)  # decode_layers: every layer in one native call
    keys = cache.k.clone()
    by_layer = model.fused.layer_by_layer(x, rope, cache, step)
    assert torch.equal(whole, by_layer)
    assert torch.equal(keys, cache.k)  # both wrote the same keys at the same positions
    assert cache.k[:, 1, :, positions[1]].abs().sum() > 0  # ... and wrote them


def test_the_native_layers_agree_with_the_python_layers_on_the_same_weights(tiny_int4):
    model = tiny_int4.model
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    fused = model(tokens)
    saved, model.fused = model.fused, None  # torch's RMSNorm, rotary and SiLU around the same int4 matmuls
    try:
        python = model(tokens)
    finally:
        model.fused = saved
    # the 8-bit activations round the same values, except where a tiny difference crosses a rounding step
    assert (fused - python).abs().max() < 0.05 * python.abs().max()
    assert (fused.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9


def test_every_build_of_the_native_layers_gives_the_same_logits(tiny_int4, ops):
    model = tiny_int4.model
    results = []
    for fused in (model.fused, FusedLayers(model, ops)):
        cache = KVCache.for_model(model, 2, 32)
        positions = prompts_in(model, cache, [4, 7])
        step, tokens = decode_step(model, cache, positions)
        x, rope = model.embed(tokens, step)
        results.append(fused(x, rope, cache, step))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


def test_the_native_layers_name_a_bad_weight_list(tiny_int4):
    model = tiny_int4.model
    cache = KVCache.for_model(model, 1, 16)
    step, tokens = decode_step(model, cache, [0])
    x, (cos, sin) = model.embed(tokens, step)
    with pytest.raises(RuntimeError, match="decode_layers: expected 18 weight parts a layer, got 17"):
        torch.ops.lmgen.decode_layers(x[0], model.fused.flat[:17], 1e-5, cos[0, 0], sin[0, 0], 4, cache.k, cache.v,
                                      step.lone_slots, step.lone_positions, 0.25)
    with pytest.raises(RuntimeError, match=r"layer_in: cos must be contiguous float32 \[1, 32\], got Double"):
        torch.ops.lmgen.layer_in(x[0], model.fused.layers[0], 1e-5, cos[0, 0].double(), sin[0, 0], 6)


def test_the_native_layers_keep_a_16_bit_cache_and_the_float32_path_a_float32_one(tiny_int4, tiny_llama_dir):
    with open("/proc/cpuinfo") as f:
        bf16 = "avx512_bf16" in f.read()
    want = torch.bfloat16 if bf16 else torch.float16  # bfloat16 where the CPU computes in it, else llama.cpp's f16
    assert native_cache_dtype() == want and KVCache.for_model(tiny_int4.model, 2, 32).k.dtype == want
    reference = lmgen.load(tiny_llama_dir)
    assert reference.model.fused is None
    assert KVCache.for_model(reference.model, 2, 32).k.dtype == torch.float32  # parity tests read float32 keys
    for dtype in (torch.float16, torch.bfloat16):  # a prompt piece's keys written, its logits those of no cache
        cache = KVCache.for_model(tiny_int4.model, 2, 32, dtype=dtype)
        tokens = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(4))
        cached = tiny_int4.model(tokens, cache.plan([Span(0, 6, 0, 0)]), cache)
        assert cache.k[:, 0, :, :6].abs().sum() > 0 and cache.k[:, 0, :, 6:].abs().sum() == 0
        fresh = tiny_int4.model(tokens)  # keys and values kept in float32
        assert (cached - fresh).abs().max() < 0.05 * fresh.abs().max(), dtype
        assert (cached.argmax(-1) == fresh.argmax(-1)).float().mean() >= 0.8, dtype


def test_the_native_layers_add_the_linears_biases(tmp_path):
    folder = make_tiny_llama(tmp_path, hidden_size=128, intermediate_size=256, attention_bias=True, mlp_bias=True)
    lm = lmgen.load(folder, quantize="int4")
    fused_layers = lm.model.fused
    assert fused_layers is not None and lm.model.model.layers[0].self_attn.qkv_proj.bias is not None
    tokens = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(3))
    fused = lm.model(tokens)
    lm.model.fused = None
    python = lm.model(tokens)
    assert (fused - python).abs().max() < 0.05 * python.abs().max()
    assert (fused.argmax(-1) == python.argmax(-1)).float().mean() >= 0.9
    broken = list(fused_layers.layers[0])
    broken[4] = broken[4][:-1]  # qkv_proj's bias one short
    x = torch.randn(2, 128)
    cos, sin = torch.ones(2, 32), torch.zeros(2, 32)
    with pytest.raises(RuntimeError, match=r"q4_matmul: bias must be float32 \[256\]"):
        torch.ops.lmgen.layer_in(x, broken, 1e-5, cos, sin, 6)
    broken[1:4] = torch.zeros(256, 128, dtype=torch.int8), torch.ones(256, 4), torch.empty(0)  # 8-bit rows
    with pytest.raises(RuntimeError, match=r"q8_matmul: bias must be float32 \[256\]"):
        torch.ops.lmgen.layer_in(x, broken, 1e-5, cos, sin, 6)
