"""A GGUF's Q5_0 and K-quant (Q4_K, Q5_K, Q6_K) matrices kept as the file has them, and linears of mixed block types.

KQuantLinear multiplies by the file's bytes in lmgen's native kernel (lmgen/kernels/kquant.c: 8-bit activations,
integer dot products, as llama.cpp does); KEmbedding dequantizes only the rows it looks up. Without native
kernels, torch multiplies by the dequantized weight. PartsLinear is a fused linear (q, k and v; gate and up) whose
parts a file stores in different block types (Q4_K and Q6_K, Q5_0 and Q8_0): a layer per part gives its rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from .. import kernels
from ..weights.quants import dequantize


class KBlocks(NamedTuple):
    """A matrix [N, K] of one GGML block type (`kind`, its type id) as its bytes: each row K // block blocks."""

    kind: int
    raw: torch.Tensor  # uint8 [N, bytes a row]
    k: int

    def map_rows(self, fn) -> "KBlocks":
        """The same blocks with `fn` applied to the row order (e.g. un-permuting heads)."""
        return KBlocks(self.kind, fn(self.raw), self.k)


def dequantize_k(blocks: KBlocks) -> torch.Tensor:
    """Float32 weights [N, K] from a matrix's blocks."""
    return dequantize(blocks.raw, blocks.kind, (blocks.raw.shape[0], blocks.k))


def _row_bytes(kind: int, k: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    return k // block * size


class KRows(nn.Module):
    """Rows [N, K] of GGML blocks of one type as the file has them, in the buffer `raw`."""

    def __init__(self, kind: int, rows: int, k: int):
        super().__init__()
        self.kind, self.in_features, self.out_features = int(kind), k, rows
        self.register_buffer("raw", torch.empty(rows, _row_bytes(kind, k), dtype=torch.uint8))

    @staticmethod
    def state(blocks: KBlocks) -> dict[str, torch.Tensor]:
        """The buffers for a file's blocks, keyed by buffer name."""
        return {"raw": blocks.raw.contiguous()}

    def dequantized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight, or only the given rows (any shape of indices: [..., K])."""
        raw = self.raw if rows is None else self.raw[rows.reshape(-1)]
        w = dequantize(raw, self.kind, (raw.shape[0], self.in_features))
        return w if rows is None else w.view(*rows.shape, self.in_features)


class KQuantLinear(KRows):
    """A linear layer on a file's Q5_0 or K-quant blocks: a decoder matrix, or an output layer."""

    def __init__(self, kind: int, rows: int, k: int, bias: bool = False):
        super().__init__(kind, rows, k)
        self.native = kernels.native()  # decided here, not per call: torch.compile sees a constant
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.native:
            bias = None if self.bias is None else self.bias.float()
            y = torch.ops.lmgen.kq_matmul(x2.float(), self.raw, self.kind, bias).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class KEmbedding(KRows):
    """An embedding lookup on a file's blocks: only the looked-up rows are dequantized, to the model's dtype."""

    def __init__(self, kind: int, rows: int, k: int, dtype: torch.dtype = torch.float32):
        super().__init__(kind, rows, k)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantized(tokens).to(self.dtype)


class BlockParts(NamedTuple):
    """A fused matrix whose row parts are blocks of different types (Q4Blocks, Q8Blocks or KBlocks), in order."""

    parts: tuple


class PartsLinear(nn.Module):
    """A fused linear made of one linear per row part (each the file's own blocks); the bias is the whole one's."""

    def __init__(self, parts: list[nn.Module], in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)
