"""A GGUF's Q5_0 and K-quant (Q4_K, Q5_K, Q6_K) matrices run as the file has them (lmgen/kernels/kquant.c): the
kernel equals the product of its documented activation rounding and the exact dequantized weights in every build,
and the default load path of a K-quant GGUF keeps every matrix's blocks and tracks its float32 path."""

from __future__ import annotations

import itertools
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

import lmgen
from lmgen import kernels
from lmgen.errors import CorruptFileError
from lmgen.models import quant
from lmgen.models.kquant import BlockParts, KBlocks, KEmbedding, KQuantLinear, PartsLinear, dequantize_k
from lmgen.models.quant import Int4Linear, Int8Linear, Q8Blocks, quantize_q8
from lmgen.weights.quants import block_rows, dequantize

from .conftest import SEED_PROMPT, make_tiny_llama
from .test_gguf import write_gguf

KINDS = (Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# inputs per kind: odd block counts; 640 is Gemma 3 270M's width (20 blocks of 32)
WIDTHS = {Q.Q5_0: (640, 96), Q.Q4_K: (768, 256), Q.Q5_K: (768, 1280), Q.Q6_K: (1280, 256)}


def random_blocks(kind: Q, n: int, k: int, gen: torch.Generator, scale: float = 0.2) -> torch.Tensor:
    """Valid blocks of `kind` for an [n, k] matrix, as bytes [n, bytes a row], with weights of about +-scale: Q5_0
    quantized by gguf-py, the K-quants random bytes (every code and 6-bit scale) with sane float16 scales."""
    if kind == Q.Q5_0:
        w = torch.randn(n, k, generator=gen).numpy() * scale
        return torch.from_numpy(gguf.quants.quantize(w, Q.Q5_0))
    block, size = GGML_QUANT_SIZES[kind]
    raw = torch.randint(0, 256, (n, k // block, size), dtype=torch.uint8, generator=gen)

    def put(offset: int, value: float):  # a float16 per block, uniform in value * [0.5, 1.5]
        v = (torch.rand(n, k // block, generator=gen) + 0.5) * value
        raw[..., offset:offset + 2] = v.half().view(torch.uint8).view(n, k // block, 2)

    if kind == Q.Q6_K:  # w = d sc (q - 32): sc in -128..127, q - 32 in -32..31
        put(208, scale / 2048)
    else:  # w = d sc q - dmin m, centred: dmin m's mean is d sc q's
        top = 15 if kind == Q.Q4_K else 31
        d = 2 * scale / (63 * top)
        put(0, d)
        put(2, d * top / 2)
    return raw.view(n, -1)


def rounded_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as kquant.c sees it: per block of the weights' size, codes x / dx rounded to nearest (ties to even), with
    dx = max|x| / 127, in float32 as the kernel computes them."""
    g = x.reshape(*x.shape[:-1], -1, block)
    d = g.abs().amax(-1, keepdim=True) / 127
    q = (g * torch.where(d > 0, 1 / d, 0)).round()
    return (q * d).reshape(x.shape)


def reference(x: torch.Tensor, raw: torch.Tensor, kind: Q, k: int, bias=None) -> torch.Tensor:
    """The float64 product of the rounded activations and the exact dequantized weights."""
    w = dequantize(raw, kind, (raw.shape[0], k)).double()
    y = rounded_activations(x, GGML_QUANT_SIZES[kind][0]).double() @ w.T
    return y if bias is None else y + bias.double()


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    # float32 accumulation error only: within rtol of each row's largest output
    err = (got.double() - want).abs().amax(-1)
    bound = rtol * want.abs().amax(-1)
    assert (err <= bound).all(), f"rows off by {(err / bound).max().item() * rtol:.2e} of their size"


# --- the kernel -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_kernel_equals_the_product_of_rounded_activations_and_dequantized_weights(ops, kind, rows):
    gen = torch.Generator().manual_seed(int(kind) * 100 + rows)
    for k in WIDTHS[kind]:
        raw = random_blocks(kind, 40, k, gen)
        # the reference's weights are gguf-py's own dequantization of these blocks
        assert np.array_equal(dequantize(raw, kind, (40, k)).numpy(), gguf.quants.dequantize(raw.numpy(), kind))
        x, bias = torch.randn(rows, k, generator=gen), torch.randn(40, generator=gen)
        assert_rows_close(ops.kq_matmul(x, raw, int(kind), None), reference(x, raw, kind, k))
        assert_rows_close(ops.kq_matmul(x, raw, int(kind), bias), reference(x, raw, kind, k, bias))


def test_the_vnni_and_avx2_builds_give_the_same_bits_and_rows_do_not_depend_on_their_batch():
    # Both builds sum the same integers (vpdpwssd / vpdpbusd, or madd through int16 that cannot overflow) and take
    # the same float steps, so the paths a machine may take agree to the bit, for a row alone or in any batch.
    with open("/proc/cpuinfo") as f:
        if "avx2" not in f.read():
            pytest.skip("this CPU has no AVX2")
    assert kernels.native() and kernels.load("lmgen_avx2", (["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],))
    gen = torch.Generator().manual_seed(0)
    for kind in KINDS:
        for k in (*WIDTHS[kind], 256):
            raw, x = random_blocks(kind, 24, k, gen), torch.randn(13, k, generator=gen)
            got = torch.ops.lmgen.kq_matmul(x, raw, int(kind), None)
            assert torch.equal(got, torch.ops.lmgen_avx2.kq_matmul(x, raw, int(kind), None)), (kind.name, k)
            for i in (0, 5, 12):
                assert torch.equal(torch.ops.lmgen.kq_matmul(x[i:i + 1], raw, int(kind), None)[0], got[i])


def test_the_kernel_names_bad_operands():
    assert kernels.native()
    raw = random_blocks(Q.Q4_K, 8, 512, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"kq_matmul: kind 2 is none of the GGML types it runs"):
        torch.ops.lmgen.kq_matmul(torch.randn(1, 512), raw, int(Q.Q4_0), None)
    with pytest.raises(RuntimeError, match=r"kq_matmul: x must be float32 \[M, K\] with K a multiple of 256"):
        torch.ops.lmgen.kq_matmul(torch.randn(1, 480), raw, int(Q.Q4_K), None)
    with pytest.raises(RuntimeError, match=r"kq_matmul: expected a contiguous Byte \[8, 144\] weight part"):
        torch.ops.lmgen.kq_matmul(torch.randn(1, 256), raw, int(Q.Q4_K), None)
    with pytest.raises(RuntimeError, match=r"kq_matmul: bias must be float32 \[8\]"):
        torch.ops.lmgen.kq_matmul(torch.randn(1, 512), raw, int(Q.Q4_K), torch.zeros(7))


def test_block_rows_name_a_truncated_tensor():
    raw = random_blocks(Q.Q6_K, 4, 512, torch.Generator().manual_seed(0))
    assert torch.equal(block_rows(raw.numpy(), Q.Q6_K, (4, 512)), raw)
    with pytest.raises(CorruptFileError, match=r"Q6_K tensor of shape \(4, 512\): expected 1680 bytes, got 1679"):
        block_rows(raw.reshape(-1)[:-1].numpy(), Q.Q6_K, (4, 512))
    with pytest.raises(CorruptFileError, match=r"Q6_K tensor of shape \(4, 500\): last dimension is not a multiple"):
        block_rows(raw.numpy(), Q.Q6_K, (4, 500))


# --- the layers -------------------------------------------------------------------------------------------------


def k_linear(raw: torch.Tensor, kind: Q, k: int, bias: torch.Tensor | None = None) -> KQuantLinear:
    layer = KQuantLinear(int(kind), raw.shape[0], k, bias=bias is not None)
    layer.raw = raw
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer


@pytest.mark.parametrize("use_native", [True, False])
def test_k_quant_layers_use_the_kernel_or_torch_without_it(use_native, monkeypatch):
    if not use_native:  # LMGEN_NO_NATIVE, or no C compiler: float32 on the dequantized weight
        monkeypatch.setattr(kernels, "native", lambda: False)
    gen = torch.Generator().manual_seed(1)
    raw, bias = random_blocks(Q.Q4_K, 48, 512, gen), torch.randn(48, generator=gen)
    layer, x = k_linear(raw, Q.Q4_K, 512, bias), torch.randn(2, 5, 512, generator=gen)
    assert layer.native == use_native and torch.equal(layer.dequantized(), dequantize(raw, Q.Q4_K, (48, 512)))
    want = reference(x, raw, Q.Q4_K, 512, bias) if use_native else F.linear(x.double(), layer.dequantized().double(),
                                                                             bias.double())
    got = layer(x)
    assert got.shape == (2, 5, 48)
    assert_rows_close(got, want)
    embedding = KEmbedding(int(Q.Q4_K), 48, 512)
    embedding.raw = raw
    tokens = torch.tensor([[3, 0, 47], [3, 3, 1]])
    assert torch.equal(embedding(tokens), layer.dequantized()[tokens])  # only these rows, exactly


def test_k_blocks_permute_their_rows_as_the_matrix_does():
    raw = random_blocks(Q.Q5_K, 16, 256, torch.Generator().manual_seed(2))
    blocks = KBlocks(int(Q.Q5_K), raw, 256)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dequantize_k(blocks.map_rows(lambda t: t[order])), dequantize_k(blocks)[order])


def test_fused_parts_of_one_kind_join_and_mixed_kinds_stay_native():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (KBlocks(int(t), random_blocks(t, n, 256, gen), 256) for t, n in
               [(Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32)])
    g = Q8Blocks(*quantize_q8(torch.randn(32, 256, generator=gen)))
    joined = quant.cat_rows([q, k])
    assert isinstance(joined, KBlocks) and torch.equal(joined.raw, torch.cat([q.raw, k.raw]))
    mixed = quant.cat_rows([q, k, v, g])  # Q4_K files: q, k Q4_K and v Q6_K; Gemma's: v Q8_0 among Q5_0
    assert isinstance(mixed, BlockParts) and [type(p) for p in mixed.parts] == [KBlocks, KBlocks, Q8Blocks]
    floats = quant.cat_rows([q, torch.zeros(8, 256)])  # a float part: all float
    assert torch.equal(floats, torch.cat([dequantize_k(q), torch.zeros(8, 256)]))

    holder = torch.nn.Module()
    holder.proj = Int4Linear(256, 160, bias=True)
    layer = quant.for_blocks(holder, "proj", holder.proj, mixed)
    assert isinstance(layer, PartsLinear) and holder.proj is layer
    assert [type(p) for p in layer.parts] == [KQuantLinear, KQuantLinear, Int8Linear]
    bias = torch.randn(160, generator=gen)
    holder.load_state_dict({**quant.quantized_state(layer, "proj", mixed), "proj.bias": bias}, assign=True)
    x = torch.randn(3, 256, generator=gen)
    want = F.linear(x, quant.dequantized(mixed), bias)
    torch.testing.assert_close(layer(x), want, atol=0.02 * float(want.abs().max()), rtol=0.02)
    parts = torch.cat([p(x) for p in layer.parts], -1) + bias
    assert torch.equal(layer(x), parts)  # each part's own native rows


# --- a K-quant GGUF end to end ----------------------------------------------------------------------------------

# A Q4_K_M-like Llama: per 2-D tensor in file order (token_embd, output, then each layer's q, k, v, o, gate, up,
# down): layer 0 as llama.cpp's Q4_K_M writes Llama and Qwen, layer 1 as it writes Gemma 3 270M.
LAYER_TYPES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q4_K, Q.Q6_K),
               (Q.Q5_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_0, Q.Q5_0, Q.Q6_K)]
WEIGHTS = 0.1  # their size: a tiny random model whose layers neither fade nor saturate its attention
LONG_PROMPT = (SEED_PROMPT + " and the lazy dog slept in the sun while the children played by the river, laughing."
               " Later that evening, the old fisherman told a story about the storm that nearly sank his boat")


def assert_tracks(got: torch.Tensor, want: torch.Tensor) -> None:
    """Logits as close as test_quant's int4 models are to float32: only the activations' rounding to 8 bits
    differs, and a random tiny model's logits have many near-ties."""
    torch.testing.assert_close(got, want, atol=0.1 * float(want.abs().max()), rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def write_k_gguf(folder, path, types, monkeypatch, seed: int = 5) -> dict:
    """write_gguf with random matrices of about +-WEIGHTS (the folder's own are not needed): the K-quants as random
    valid blocks (gguf-py quantizes none), the other types quantized by gguf-py."""
    gen, quantize = torch.Generator().manual_seed(seed), gguf.quants.quantize

    def blocks(w: np.ndarray, qt: Q) -> np.ndarray:
        if qt == Q.F32:
            return quantize(w, qt)
        if qt in KINDS[1:]:
            return random_blocks(qt, *w.shape, gen, WEIGHTS).numpy()
        return quantize(torch.randn(w.shape, generator=gen).numpy() * WEIGHTS, qt)

    with monkeypatch.context() as m:
        m.setattr(gguf.quants, "quantize", blocks)
        return write_gguf(folder, path, types)


@pytest.fixture(scope="module")
def k_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("k-gguf")
    folder = make_tiny_llama(root / "hf", hidden_size=256, intermediate_size=512, seed=3)
    with pytest.MonkeyPatch.context() as m:
        write_k_gguf(folder, root / "k.gguf", [Q.Q4_K, Q.Q6_K, *itertools.chain(*LAYER_TYPES)], m)
    return root / "k.gguf"


def test_a_k_quant_gguf_runs_on_its_own_blocks_by_default(k_llama):
    fast, ref = lmgen.load(k_llama), lmgen.load(k_llama, dtype="float32")
    assert fast.weights.startswith("k-quant and int8 kernels on the file's own Q4_K/Q5_0/Q5_K/Q6_K/Q8_0 blocks "
                                   "(the default")
    layers = fast.model.model.layers
    assert isinstance(fast.model.model.embed_tokens, KEmbedding) and isinstance(fast.model.lm_head, KQuantLinear)
    assert [type(p) for p in layers[0].self_attn.qkv_proj.parts] == [KQuantLinear, KQuantLinear]  # q+k, v
    assert [type(p) for p in layers[1].self_attn.qkv_proj.parts] == [KQuantLinear, Int8Linear]
    assert isinstance(layers[1].mlp.gate_up_proj, KQuantLinear)  # gate and up, both Q5_0: one matrix
    for name, m in fast.model.named_modules():  # the file's values, exactly
        if isinstance(m, PartsLinear):
            w = torch.cat([p.dequantized() for p in m.parts])
        elif isinstance(m, (KQuantLinear, KEmbedding)) and ".parts." not in name:
            w = m.dequantized()
        else:
            continue
        assert torch.equal(w, ref.model.get_submodule(name).weight), name
    ids = fast.encode(LONG_PROMPT)
    assert_tracks(fast.logits(ids), ref.logits(ids))
    explicit = lmgen.load(k_llama, quantize="int4")  # asked for: every matrix rounded to 4-bit blocks
    assert isinstance(explicit.model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert explicit.weights.startswith("int4 kernels on 4-bit blocks quantized at load (quantize int4)")


def test_a_tied_k_quant_embedding_is_also_the_native_output_layer(tmp_path, monkeypatch):
    folder = make_tiny_llama(tmp_path / "hf", hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    path = tmp_path / "tied.gguf"
    written = write_k_gguf(folder, path, [Q.Q6_K, *LAYER_TYPES[0]], monkeypatch)
    assert "output.weight" not in written
    fast, ref = lmgen.load(path), lmgen.load(path, dtype="float32")
    head, embed = fast.model.lm_head, fast.model.model.embed_tokens
    assert isinstance(head, KQuantLinear) and head.raw.data_ptr() == embed.raw.data_ptr()
    ids = fast.encode(LONG_PROMPT)
    assert_tracks(fast.logits(ids), ref.logits(ids))


def test_a_k_quant_tensor_of_the_wrong_size_names_the_tensor(k_llama, tmp_path):
    path = tmp_path / "bad.gguf"
    shutil.copy(k_llama, path)
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)  # its tensor info: dims, then type
    assert int.from_bytes(data[at + 4:at + 12], "little") == 256  # ne0: the row length
    data[at + 4:at + 12] = (250).to_bytes(8, "little")  # no longer whole Q4_K blocks
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"bad\.gguf: tensor blk\.0\.attn_q\.weight: Q4_K tensor of shape "
                                               r"\(256, 250\): last dimension is not a multiple of 256"):
        lmgen.load(path)
