"""The int4 fast path: exact packing, GGUF Q4 blocks kept as they are, and its documented agreement with float32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

import lmgen
from lmgen import kernels
from lmgen.errors import CorruptFileError
from lmgen.models.quant import (
    GROUP,
    TORCH_INT8_ROWS,
    Int4Linear,
    Int8Linear,
    Int8Rows,
    Q4Blocks,
    dequantize_q4,
    quantize_q4,
)
from lmgen.weights.quants import dequantize, q4_codes

from .conftest import SEED_PROMPT, make_tiny_mistral, make_tiny_qwen3
from .test_gguf import write_gguf

pytest.importorskip("transformers")

# Measured on the embedded model (BENCHMARKS.md): int4 first differs from float32 at greedy token 63 (14
# compiled) and bfloat16 at token 6 on a 2-core AVX2 machine. Other CPUs round differently, so the tests hold a margin.
INT4_AGREES_FOR = 8
BF16_AGREES_FOR = 3


def int4_linear(blocks: Q4Blocks, bias: torch.Tensor | None = None) -> Int4Linear:
    n, k = blocks.q.shape
    layer = Int4Linear(k, n, bias=bias is not None)
    for name, t in Int4Linear.state(blocks).items():
        setattr(layer, name, t)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


def int8_head(w: torch.Tensor) -> Int8Linear:
    head = Int8Linear(*w.shape)
    for name, t in Int8Rows.state(w).items():
        setattr(head, name, t)
    return head


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the native kernels see it: 8 bits per block of 32, scale max|x| / 127 (llama.cpp's Q8_1)."""
    g = x.reshape(*x.shape[:-1], -1, GROUP)
    d = g.abs().amax(-1, keepdim=True) / 127
    q = (g * torch.where(d > 0, 1 / d, 0)).round()
    return (q * d).reshape(x.shape)


def test_int4_buffers_hold_the_codes_and_float16_scales():
    torch.manual_seed(0)
    blocks = quantize_q4(torch.randn(40, 96))
    back = int4_linear(blocks).blocks()
    assert torch.equal(back.q, blocks.q) and torch.equal(back.d, blocks.d) and torch.equal(back.m, blocks.m)
    assert torch.equal(int4_linear(blocks).dequantized(), dequantize_q4(blocks))


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("n,k", [(40, 32), (96, 288), (576, 576)])  # 288: 9 blocks, one past a group of 8
def test_native_matmuls_equal_the_product_of_quantized_operands(ops, rows, n, k):
    torch.manual_seed(rows)
    blocks, x, bias = quantize_q4(torch.randn(n, k)), torch.randn(rows, k), torch.randn(n)
    layer = int4_linear(blocks)
    want = F.linear(quantized_activations(x), dequantize_q4(blocks), bias)
    got = ops.q4_matmul(x, layer.qs, layer.d, layer.m, bias)
    torch.testing.assert_close(got, want, atol=2e-4 * float(want.abs().max()), rtol=1e-4)
    head = int8_head(torch.randn(n, k))
    want = quantized_activations(x) @ head.dequantized().t()
    torch.testing.assert_close(ops.q8_matmul(x, head.qweight, head.scales), want,
                               atol=2e-4 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_rows_take_a_files_float16_scales_as_they_are(ops, rows):
    # GGUF's Q8_0 scales are float16: kept so (fewer bytes per step), they give the bits of their float32 values
    torch.manual_seed(rows)
    for k in (576, 608):  # 608: 19 blocks, the 512-bit path's last one alone
        q, x = torch.randint(-127, 128, (40, k), dtype=torch.int8), torch.randn(rows, k)
        d = (torch.rand(40, k // GROUP) * 0.01 + 1e-4).half()
        assert torch.equal(ops.q8_matmul(x, q, d), ops.q8_matmul(x, q, d.float()))


def test_quantize_q4_recovers_weights_already_on_its_grid():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 96), dtype=torch.uint8)
    q[:, ::GROUP], q[:, 1::GROUP] = 0, 15  # each group spans the full code range, as Q4_1 groups do
    d = (torch.rand(64, 96 // GROUP) + 0.1).half().float()  # scales as stored: float16
    m = torch.randn(64, 96 // GROUP).half().float()
    w = dequantize_q4(Q4Blocks(q, d, m))
    again = quantize_q4(w)
    assert torch.equal(again.q, q)
    torch.testing.assert_close(dequantize_q4(again), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_codes_hold_the_same_values_as_dequantize(qtype):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    blocks = Q4Blocks(*q4_codes(raw, qtype, (64, 128)))
    assert blocks.q.dtype == torch.uint8 and int(blocks.q.max()) <= 15
    torch.testing.assert_close(dequantize_q4(blocks), dequantize(raw, qtype, (64, 128)), atol=1e-6, rtol=1e-6)


def test_q4_codes_name_a_truncated_tensor():
    raw = gguf.quants.quantize(np.zeros((32, 64), np.float32), Q.Q4_1)
    with pytest.raises(CorruptFileError, match="Q4_1 tensor of shape"):
        q4_codes(raw[:-1], Q.Q4_1, (32, 64))
    # cut mid-block, as a truncated file is: the same check as dequantize(), not a reshape error
    with pytest.raises(CorruptFileError, match=r"Q4_1 tensor of shape \(32, 64\): expected 1280 bytes, got 1279"):
        q4_codes(raw.reshape(-1)[:-1], Q.Q4_1, (32, 64))


@pytest.mark.parametrize("use_native", [True, False])
def test_int4_layers_use_the_kernels_for_any_rows_or_torch_without_them(use_native, monkeypatch):
    if not use_native:  # no C compiler: torch's kernels and matmuls on the same weights
        monkeypatch.setattr(kernels, "native", lambda: False)
    torch.manual_seed(0)
    layer = int4_linear(quantize_q4(torch.randn(96, 64)), bias=torch.randn(96))
    head = int8_head(torch.randn(4100, 64))  # more than one 4096-row slice
    assert layer.native == head.native == use_native
    w, hw = layer.dequantized(), head.dequantized()
    few, many = torch.randn(3, 64), torch.randn(TORCH_INT8_ROWS + 8, 64)  # decoding rows; a prompt's
    if use_native:  # 8-bit activations in every case
        for x in (few, many):
            rounded = quantized_activations(x)
            torch.testing.assert_close(layer(x), F.linear(rounded, w, layer.bias), atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(head(x), rounded @ hw.t(), atol=1e-3, rtol=1e-3)
    else:  # float32 on the dequantized weights (the head's blocks have a scale each: not torch's int8 kernel)
        for x in (few, many):
            torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(head(x), x @ hw.t(), atol=1e-4, rtol=1e-4)
    assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 96)


def test_int8_rows_quantize_per_row():
    torch.manual_seed(0)
    w = torch.randn(4100, 64)
    err = (int8_head(w).dequantized() - w).abs().amax(-1)
    assert bool((err <= w.abs().amax(-1) / 254 + 1e-6).all())  # half a step of max|row| / 127


def test_a_missing_compiler_is_a_warning_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not build lmgen's native kernels.*decoding attention run through"):
        assert kernels.build("lmgen_nothing") is None
    assert not any(tmp_path.rglob("*.so"))


def test_no_compiler_at_all_is_a_warning_not_an_error(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find
    with pytest.warns(UserWarning, match="no C and C\\+\\+ compiler found: int4 layers and decoding attention run"):
        assert kernels.build("lmgen_nothing") is None


def test_a_cached_fallback_build_is_used_without_retrying_the_first_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))
    flag_sets = (["-O2", "-fno-such-flag"], ["-O2", "-fopenmp"])  # the first choice can't build here
    built = kernels.build("lmgen_fallback", flag_sets)
    assert built is not None and built.is_file()

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiling)
    assert kernels.build("lmgen_fallback", flag_sets) == built


def test_an_unwritable_kernel_cache_is_a_warning_not_an_error(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path / "file"))  # a file where the cache folder should be
    with pytest.warns(UserWarning, match="could not build lmgen's native kernels"):
        assert kernels.build("lmgen_nowhere") is None


def test_native_ops_name_bad_operands():
    assert kernels.native()
    layer = int4_linear(quantize_q4(torch.randn(64, 64)))
    with pytest.raises(RuntimeError, match=r"q4_matmul: x must be float32 \[M, K\]"):
        torch.ops.lmgen.q4_matmul(torch.randn(2, 64).double(), layer.qs, layer.d, layer.m, None)
    with pytest.raises(RuntimeError, match="q4_matmul: expected a contiguous Byte \\[64, 16\\] weight part"):
        torch.ops.lmgen.q4_matmul(torch.randn(2, 32), layer.qs, layer.d, layer.m, None)
    with pytest.raises(RuntimeError, match="q4_matmul: the weight's rows come in groups of 8, got 60 rows"):
        torch.ops.lmgen.q4_matmul(torch.randn(2, 64), layer.qs[:60], layer.d[:60], layer.m[:60], None)
    with pytest.raises(RuntimeError, match="q8_matmul: scales must be float32"):
        torch.ops.lmgen.q8_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8).half())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "mistral"])
def test_int4_model_from_float_weights_tracks_float32(arch, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    makers = {"qwen3": make_tiny_qwen3, "mistral": lambda d: make_tiny_mistral(d, sliding_window=6)}
    folder = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}.get(arch) or makers[arch](tmp_path / arch)
    fast, ref = lmgen.load(folder, quantize="int4"), lmgen.load(folder)
    assert any(isinstance(m, Int4Linear) for m in fast.model.modules())
    # the native fused layers have neither q/k norms (Qwen3) nor a window (this Mistral's, which the prompt outgrows)
    assert (fast.model.fused is not None) == (arch == "llama")
    ids = fast.encode(SEED_PROMPT + " and the lazy dog slept in the sun")
    # the reference, given the very weights the int4 model holds, differs only by bfloat16 matmul inputs
    for name, m in fast.model.named_modules():
        if isinstance(m, Int4Linear):
            w = m.dequantized()
            target = ref.model.get_submodule(name)
            target.weight.data = w.t().contiguous() if m.checkpoint_transposed else w
    ref.model.lm_head.weight.data = fast.model.lm_head.dequantized()
    emb = "transformer.wte" if arch == "gpt2" else "model.embed_tokens"
    ref.model.get_submodule(emb).weight.data = fast.model.get_submodule(emb).dequantized()
    got, want = fast.logits(ids), ref.logits(ids)
    torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    same_top = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert same_top >= 0.8


def test_gguf_q4_blocks_are_kept_not_requantized(tiny_llama_dir, tmp_path):
    path = tmp_path / "q4.gguf"
    write_gguf(tiny_llama_dir, path, (Q.Q4_1, Q.Q4_0))
    fast, ref = lmgen.load(path, quantize="int4"), lmgen.load(path, dtype="float32")
    for name, m in fast.model.named_modules():
        if not isinstance(m, Int4Linear):
            continue
        # the file's codes and float16 scales, kept exactly: the same floats as dequantizing the file
        assert torch.equal(m.dequantized(), ref.model.get_submodule(name).weight), name


def test_embedded_int4_agrees_with_float32_for_its_documented_prefix(smollm):
    fast = lmgen.load(quantize="int4")
    assert isinstance(fast.model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    want = smollm.generate(SEED_PROMPT, max_new_tokens=32, ignore_eos=True)[0].token_ids
    got = fast.generate(SEED_PROMPT, max_new_tokens=32, ignore_eos=True)[0].token_ids
    assert got[:INT4_AGREES_FOR] == want[:INT4_AGREES_FOR]


def test_embedded_bfloat16_agrees_with_float32_for_its_documented_prefix(smollm):
    fast = lmgen.load(dtype="bfloat16")
    want = smollm.generate(SEED_PROMPT, max_new_tokens=16, ignore_eos=True)[0].token_ids
    got = fast.generate(SEED_PROMPT, max_new_tokens=16, ignore_eos=True)[0].token_ids
    assert got[:BF16_AGREES_FOR] == want[:BF16_AGREES_FOR]


def test_quantize_errors_name_the_problem(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantize must be one of int4, got 'int3'"):
        lmgen.load(tiny_llama_dir, quantize="int3")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        lmgen.load(tiny_llama_dir, quantize="int4", device="cuda")


def test_a_checkpoint_missing_part_of_a_fused_linear_is_named(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(tiny_llama_dir / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=r"model\.layers\.1\.self_attn lacks v_proj"):
        lmgen.load(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int4_runs_with_bfloat16_activations(arch, tiny_llama_dir, tiny_gpt2_dir):
    folder = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[arch]
    lm = lmgen.load(folder, quantize="int4", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    logits = lm.logits(lm.encode(SEED_PROMPT))
    assert bool(torch.isfinite(logits).all())
    assert len(lm.generate(SEED_PROMPT, max_new_tokens=5, ignore_eos=True)[0].token_ids) == 5


def test_a_kernel_library_that_will_not_load_is_a_warning_not_an_error(monkeypatch, tmp_path):
    broken = tmp_path / "lmgen_broken.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(kernels, "build", lambda namespace, flag_sets: broken)
    with pytest.warns(UserWarning, match="could not load .*lmgen_broken.so.*int4 layers and decoding attention run"):
        assert kernels.load("lmgen_broken") is False


@pytest.mark.parametrize("rows", [1, 5, 13, 16])
def test_the_vnni_and_avx2_builds_give_the_same_bits(rows):
    # Both sum a block's byte products exactly (vpdpbusd into int32, maddubs through int16 that cannot overflow),
    # so the two paths a machine may take agree to the bit, and a row does not depend on the batch it is in.
    from lmgen import kernels

    with open("/proc/cpuinfo") as f:
        if "avx2" not in f.read():
            pytest.skip("this CPU has no AVX2")
    assert kernels.native() and kernels.load("lmgen_avx2", (["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],))
    torch.manual_seed(rows)
    layer, x = int4_linear(quantize_q4(torch.randn(96, 576))), torch.randn(rows, 576)
    head = int8_head(torch.randn(72, 576))
    odd, x_odd = int8_head(torch.randn(40, 608)), torch.randn(rows, 608)  # 19 blocks: the 512-bit path's last one alone
    for ops in (torch.ops.lmgen, torch.ops.lmgen_avx2):
        out = (ops.q4_matmul(x, layer.qs, layer.d, layer.m, None), ops.q8_matmul(x, head.qweight, head.scales),
               ops.q8_matmul(x_odd, odd.qweight, odd.scales))
        if ops is torch.ops.lmgen:
            want = out
    assert all(torch.equal(o, w) for o, w in zip(out, want))
    alone = torch.ops.lmgen.q4_matmul(x[:1], layer.qs, layer.d, layer.m, None)
    assert torch.equal(alone[0], want[0][0])
    assert torch.equal(torch.ops.lmgen.q8_matmul(x_odd[-1:], odd.qweight, odd.scales)[0], want[2][-1])


def test_the_default_path_keeps_the_files_q8_0_embedding_blocks_exactly(smollm, smollm_default):
    # SmolLM2's token embedding (also its output layer) is Q8_0: codes and float16 scales per block of 32
    embed = smollm_default.model.model.embed_tokens
    assert embed.scales.shape == (49152, 576 // 32)
    assert torch.equal(embed.dequantized(), smollm.model.model.embed_tokens.weight)  # the file's values, bit for bit
    assert smollm_default.model.lm_head.qweight.data_ptr() == embed.qweight.data_ptr()  # still tied


def test_a_q8_0_gguf_runs_on_its_own_blocks_by_default(tiny_llama_dir, tmp_path):
    path = tmp_path / "q8.gguf"
    write_gguf(tiny_llama_dir, path, Q.Q8_0)
    fast, ref = lmgen.load(path), lmgen.load(path, dtype="float32")
    assert fast.weights.startswith("int8 kernels on the file's own Q8_0 blocks (the default")
    linears = {n: m for n, m in fast.model.named_modules() if isinstance(m, Int8Linear) and n != "lm_head"}
    assert len(linears) == 4 * fast.model.config.num_hidden_layers  # qkv, o, gate_up, down: none rounded to 4 bits
    for name, m in linears.items():  # the file's codes and scales, kept exactly
        assert torch.equal(m.dequantized(), ref.model.get_submodule(name).weight), name
    assert fast.model.fused is not None  # the native layers take 8-bit linears too
    ids = fast.encode(SEED_PROMPT + " and the lazy dog slept in the sun")
    got, want = fast.logits(ids), ref.logits(ids)
    # only the activations' rounding to 8 bits differs (as in the int4 test above)
    torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    explicit = lmgen.load(path, quantize="int4")  # asked for: 4-bit blocks, quantized at load
    assert isinstance(explicit.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert explicit.weights.startswith("int4 kernels on 4-bit blocks quantized at load (quantize int4)")
