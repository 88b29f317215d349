"""lmgen.weights.quants must match gguf-py's numpy reference dequantization bit for bit."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from lmgen.errors import CorruptFileError, UnsupportedModelError
from lmgen.weights.quants import SUPPORTED_TYPES, dequantize

SHAPES = [(3, 256), (7, 512), (1, 1024)]
# types gguf-py can quantize, so we can start from real float data
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# byte offsets of f16 scale fields in each block (f32 for Q8_K); random bytes there can be NaN/inf
SCALE_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
BLOCK_TYPES = list(SCALE_FIELDS) + ["Q8_K"]


def random_blocks(name: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random bytes of a valid `name` tensor: every bit pattern, but finite scales."""
    qt = T[name]
    block, type_size = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    n = raw.shape[0]
    if name == "Q8_K":
        raw[:, 0:4] = rng.uniform(-0.05, 0.05, size=(n, 1)).astype(np.float32).view(np.uint8)
    for off in SCALE_FIELDS.get(name, []):
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=(n, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * type_size)


def reference(raw: np.ndarray, name: str) -> np.ndarray:
    if name == "Q8_K":  # gguf-py cannot decode Q8_K: {f32 d, int8 qs[256], int16 bsums[16]}, x = d * q
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[T.Q8_K][1])
        d = blocks[:, :4].copy().view(np.float32)
        return (blocks[:, 4:260].view(np.int8).astype(np.float32) * d).reshape(raw.shape[0], -1)
    return gguf.quants.dequantize(raw, T[name])


def assert_same(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_supported_types_listed():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= set(SUPPORTED_TYPES)
    assert set(BLOCK_TYPES) | {"F32", "F16", "BF16"} == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_float_data_matches_gguf(name, shape):
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    raw = gguf.quants.quantize(data, T[name])
    assert_same(dequantize(raw, T[name], shape), gguf.quants.dequantize(raw, T[name]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_random_blocks_match_reference(name, shape):
    raw = random_blocks(name, shape, seed=shape[0])
    assert_same(dequantize(raw, T[name], shape), reference(raw, name))


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_accepts_torch_flat_and_readonly_inputs(name):
    shape = (4, 512)
    raw = random_blocks(name, shape)
    ref = reference(raw, name)
    readonly = raw.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning may leak out
        assert_same(dequantize(readonly, int(T[name]), shape), ref)
    assert_same(dequantize(torch.from_numpy(raw), T[name], shape), ref)
    assert_same(dequantize(raw.reshape(-1), T[name], list(shape)), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(dtype):
    raw = random_blocks("Q4_K", (2, 256))
    out = dequantize(raw, T.Q4_K, (2, 256), dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.from_numpy(reference(raw, "Q4_K")).to(dtype))


@pytest.mark.parametrize("shape", [(3, 5), (7, 512), (11,)])
def test_float_types(shape):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = dequantize(x, T.F32, shape)
    np.testing.assert_array_equal(out.numpy(), x)
    out.fill_(0)  # the result must be a copy, never a view of the (maybe memory-mapped) input
    assert np.any(x != 0)

    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(h, T.F16, shape).numpy(), h.astype(np.float32))
    assert dequantize(h, T.F16, shape, dtype=torch.float16).dtype == torch.float16

    b = torch.from_numpy(x).to(torch.bfloat16)
    as_bytes = b.view(torch.int16).numpy().view(np.uint8).reshape(*shape[:-1], -1)  # as GGUFReader gives
    expected = gguf.quants.dequantize(as_bytes, T.BF16)
    np.testing.assert_array_equal(dequantize(as_bytes, T.BF16, shape).numpy(), expected)
    np.testing.assert_array_equal(dequantize(b, T.BF16, shape).numpy(), expected)


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS") as err:
        dequantize(np.zeros(66, np.uint8), T.IQ2_XXS, (1, 256))
    assert "Q4_K" in str(err.value) and "Q8_0" in str(err.value)
    with pytest.raises(UnsupportedModelError, match="999"):
        dequantize(np.zeros(4, np.uint8), 999, (1, 1))


def test_wrong_byte_count_is_corrupt():
    raw = random_blocks("Q4_1", (2, 64))  # 4 blocks of 20 bytes
    with pytest.raises(CorruptFileError, match="expected 80 bytes, got 60"):
        dequantize(raw.reshape(-1)[:60], T.Q4_1, (2, 64))
    with pytest.raises(CorruptFileError, match="expected 160 bytes, got 80"):
        dequantize(raw, T.Q4_1, (4, 64))
    with pytest.raises(CorruptFileError, match="multiple of 32"):
        dequantize(raw, T.Q4_1, (5, 16))
    with pytest.raises(CorruptFileError):
        dequantize(np.zeros(3, np.float32), T.F32, (2, 2))


def _smollm2_path() -> str:
    from lmgen.loading import default_model_path

    return str(default_model_path())


def test_real_model_tensors_match_gguf():
    reader = gguf.GGUFReader(_smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    for name, qtype in [("token_embd.weight", T.Q8_0), ("blk.0.ffn_down.weight", T.Q4_1),
                        ("blk.3.attn_k.weight", T.Q4_1), ("blk.0.attn_norm.weight", T.F32)]:
        t = tensors[name]
        assert t.tensor_type == qtype
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF ne order -> PyTorch order
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the read-only memmap must not trigger a torch warning
            ours = dequantize(t.data, t.tensor_type, shape)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert_same(ours, ref)
    assert tuple(dequantize(tensors["token_embd.weight"].data, T.Q8_0, (49152, 576)).shape) == (49152, 576)
