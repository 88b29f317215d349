"""Vectorized PyTorch dequantization of GGML tensor blocks, as stored in GGUF files.

Bit layouts follow gguf-py's ``gguf/quants.py`` (the reference the tests compare to)
and ggml-quants.c. Each decoder sees a whole tensor as (n_blocks, type_size) uint8
bytes, unpacks bits with integer ops and scales in float32 in the same operation
order as the reference, so results match it bit for bit.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from lmgen.errors import CorruptFileError, UnsupportedModelError

_FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def _unpack(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split (..., k) bytes into (..., 8 // bits * k) bit fields: all lowest fields first, then the next."""
    n, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(*x.shape[:-1], n, x.shape[-1], dtype=torch.uint8)
    # writing each field into a preallocated slice is ~2x faster than broadcasting shifts
    for i in range(n):
        field = x >> (i * bits) if i else x
        if i < n - 1:
            torch.bitwise_and(field, mask, out=out[..., i, :])
        else:  # the top field needs no mask
            out[..., i, :].copy_(field)
    return out.flatten(-2)


def _half(b: torch.Tensor, off: int) -> torch.Tensor:
    # per-block f16 scale at byte `off` -> (n, 1) float16; the copy is only 2 bytes per block
    return b[:, off:off + 2].contiguous().view(torch.float16)


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    return _half(b, off).float()


def _int8(b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return b[:, lo:hi].view(torch.int8)


def _qh_bits(b: torch.Tensor, off: int) -> torch.Tensor:
    # Q5_0/Q5_1 high bits: a little-endian uint32 whose bit i belongs to value i
    return _unpack(b[:, off:off + 4].unsqueeze(-1), 1).flatten(1)


def _q8_0(b):
    return _int8(b, 2, 34).float().mul_(_f16(b, 0))


def _q4_0(b):
    return (_unpack(b[:, 2:], 4).view(torch.int8) - 8).float().mul_(_f16(b, 0))


def _q4_1(b):
    return _unpack(b[:, 4:], 4).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b):
    q = _unpack(b[:, 6:], 4) | (_qh_bits(b, 2) << 4)
    return (q.view(torch.int8) - 16).float().mul_(_f16(b, 0))


def _q5_1(b):
    q = _unpack(b[:, 8:], 4) | (_qh_bits(b, 4) << 4)
    return q.float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_k(b):
    return _int8(b, 4, 260).float().mul_(b[:, :4].contiguous().view(torch.float32))


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 12 bytes -> eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mn.float()


def _scaled_k(b, q, n_sub):
    # shared tail of Q4_K/Q5_K: (d * sc) * q - dmin * m per 32-value sub-block
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)
    dm = (_f16(b, 2) * mn).unsqueeze(-1)
    return q.float().view(-1, n_sub, 32).mul_(d).sub_(dm).flatten(1)


def _q4_k(b):
    return _scaled_k(b, _unpack(b[:, 16:].reshape(-1, 4, 32), 4), 8)


def _q5_k(b):
    ql = _unpack(b[:, 48:].reshape(-1, 4, 32), 4).flatten(1)
    return _scaled_k(b, ql | (_unpack(b[:, 16:48], 1) << 4), 8)


def _q6_k(b):
    ql = _unpack(b[:, :128].reshape(-1, 2, 64), 4).flatten(1)
    qh = _unpack(b[:, 128:192].reshape(-1, 2, 32), 2).flatten(1)
    q = ((ql | (qh << 4)).view(torch.int8) - 32).float().view(-1, 16, 16)
    d = (_f16(b, 208) * _int8(b, 192, 208).float()).unsqueeze(-1)
    return q.mul_(d).flatten(1)


def _q2_k(b):
    s = b[:, :16]
    dl = (_f16(b, 80) * (s & 15).float()).unsqueeze(-1)
    ml = (_f16(b, 82) * (s >> 4).float()).unsqueeze(-1)
    q = _unpack(b[:, 16:80].reshape(-1, 2, 32), 2).float().view(-1, 16, 16)
    return q.mul_(dl).sub_(ml).flatten(1)


def _q3_k(b):
    sc = (_unpack(b[:, 96:104], 4) | (_unpack(b[:, 104:108], 2) << 4)).view(torch.int8) - 32
    dl = (_f16(b, 108) * sc.float()).unsqueeze(-1)
    ql = _unpack(b[:, 32:96].reshape(-1, 2, 32), 2).flatten(1)
    hm = _unpack(b[:, :32], 1)
    # a clear hmask bit means "subtract 4"
    q = (ql.view(torch.int8) - ((hm ^ 1) << 2).view(torch.int8)).float().view(-1, 16, 16)
    return q.mul_(dl).flatten(1)


_DECODERS = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k, T.Q8_K: _q8_k,
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in (*_FLOAT_TYPES, *_DECODERS))


def _as_bytes(data: torch.Tensor | np.ndarray) -> torch.Tensor:
    # flat uint8 view of the input, without copying when it is already contiguous
    if isinstance(data, torch.Tensor):
        return data.detach().contiguous().reshape(-1).view(torch.uint8)
    arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # read-only memmaps are fine: decoders never write to their input
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def dequantize(
    data: torch.Tensor | np.ndarray,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode raw GGML tensor bytes of type `qtype` into a new tensor of `shape` (PyTorch order) and `dtype`."""
    try:
        qt = T(int(qtype))
    except ValueError:
        qt = None
    if qt is None or qt.name not in SUPPORTED_TYPES:
        name = qt.name if qt is not None else f"type id {int(qtype)}"
        raise UnsupportedModelError(
            f"GGML tensor type {name} is not supported; supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(s) for s in shape)
    raw = _checked_bytes(data, qt, shape)
    if qt in _FLOAT_TYPES:
        try:
            values = raw.view(_FLOAT_TYPES[qt])
        except RuntimeError:  # misaligned torch slice: copy to realign
            values = raw.clone().view(_FLOAT_TYPES[qt])
        out = values.reshape(shape).to(dtype)
        # never hand out a view of the caller's (possibly read-only, memory-mapped) buffer
        return out.clone() if out.data_ptr() == raw.data_ptr() else out
    return _DECODERS[qt](raw.view(-1, GGML_QUANT_SIZES[qt][1])).reshape(shape).to(dtype)


def _checked_bytes(data: torch.Tensor | np.ndarray, qt: T, shape: tuple[int, ...]) -> torch.Tensor:
    # the tensor's flat bytes, after checking that they hold whole blocks of exactly `shape`
    block, type_size = GGML_QUANT_SIZES[qt]
    if (shape[-1] if shape else 1) % block:
        raise CorruptFileError(f"{qt.name} tensor of shape {shape}: last dimension is not a multiple of {block}")
    raw = _as_bytes(data)
    expected = math.prod(shape) // block * type_size
    if raw.numel() != expected:
        raise CorruptFileError(f"{qt.name} tensor of shape {shape}: expected {expected} bytes, got {raw.numel()}")
    return raw


Q4_TYPES = (T.Q4_0, T.Q4_1)
K_TYPES = (T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K)  # kept as their bytes (lmgen/kernels/kquant.c)
BLOCK_TYPES = (*Q4_TYPES, T.Q8_0, *K_TYPES)  # the blocks lmgen's native kernels run on as they are


def block_rows(data: torch.Tensor | np.ndarray, qtype: int, shape: tuple[int, int]) -> torch.Tensor:
    """A matrix's blocks as they are: uint8 [N, bytes a row], each row K / block_size blocks (a copy)."""
    qt = T(int(qtype))
    block, type_size = GGML_QUANT_SIZES[qt]
    n, k = (int(s) for s in shape)
    return _checked_bytes(data, qt, (n, k)).view(n, k // block * type_size).clone()


def q8_codes(data: torch.Tensor | np.ndarray, shape: tuple[int, int]):
    """A Q8_0 matrix as (codes int8 [N, K], d float16 [N, K/32], the file's own): w = d * q."""
    block, type_size = GGML_QUANT_SIZES[T.Q8_0]
    n, k = (int(s) for s in shape)
    b = _checked_bytes(data, T.Q8_0, (n, k)).view(-1, type_size)
    return _int8(b, 2, 34).reshape(n, k).clone(), _half(b, 0).reshape(n, k // block)


def q4_codes(data: torch.Tensor | np.ndarray, qtype: int, shape: tuple[int, int]):
    """A Q4_0 or Q4_1 matrix as (codes uint8 [N, K], d, m float32 [N, K/32]): w = d * q + m."""
    qt = T(int(qtype))
    block, type_size = GGML_QUANT_SIZES[qt]
    n, k = (int(s) for s in shape)
    b = _checked_bytes(data, qt, (n, k)).view(-1, type_size)
    d = _f16(b, 0)
    if qt == T.Q4_0:  # w = d * (q - 8)
        codes, m = _unpack(b[:, 2:], 4), -8 * d
    else:
        codes, m = _unpack(b[:, 4:], 4), _f16(b, 2)
    return codes.reshape(n, k), d.reshape(n, k // block), m.reshape(n, k // block)
