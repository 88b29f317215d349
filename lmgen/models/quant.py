"""Weight-only quantized layers for fast CPU decoding, and the swap that puts them into a model.

`int4`: each decoder-layer linear keeps 4-bit weights in blocks of 32 inputs, w = d * q + m with float16 d
and m, which holds GGUF Q4_0 and Q4_1 blocks exactly. Any number of rows (decoding or a prompt) goes
through lmgen's native kernel (lmgen/kernels/matmul.c: 8-bit activations, integer dot products, as llama.cpp
does). The embedding and the output layer keep 8-bit rows with a scale per block of 32 (a GGUF's Q8_0 blocks
exactly), multiplied by the same native kernel, as do a decoder's linears that the file stores as Q8_0. A
file's Q5_0 and K-quant matrices keep their blocks too (models/kquant.py). Without a C compiler, torch does it all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .kquant import BlockParts, KBlocks, KEmbedding, KQuantLinear, KRows, PartsLinear, dequantize_k

GROUP = 32  # inputs per 4-bit block: the GGUF block size
ROWS = 8  # weight rows the native 4-bit kernel reads together
TORCH_INT8_ROWS = 128  # without native kernels: up to this many rows torch's int8 kernel, then float32
QUANTIZATIONS = ("int4",)


class Q4Blocks(NamedTuple):
    """4-bit weights [N, K] as codes 0..15 with a scale and offset per block of 32: w = d * q + m."""

    q: torch.Tensor  # uint8 [N, K]
    d: torch.Tensor  # float32 [N, K // GROUP]
    m: torch.Tensor  # float32 [N, K // GROUP]

    def map_rows(self, fn) -> "Q4Blocks":
        """The same blocks with `fn` applied to the row order of each part (e.g. un-permuting heads)."""
        return Q4Blocks(fn(self.q), fn(self.d), fn(self.m))


def quantize_q4(w: torch.Tensor) -> Q4Blocks:
    """Asymmetric 4-bit blocks from float weights [N, K], by each block's min and max (as GGUF Q4_1 does).

    The scale and offset are rounded to float16 first (as they are stored), and the codes chosen for them.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    q = ((g - m[..., None]) / torch.where(d == 0, 1, d)[..., None]).round_().clamp_(0, 15)
    return Q4Blocks(q.to(torch.uint8).reshape(n, k), d, m)


def dequantize_q4(blocks: Q4Blocks) -> torch.Tensor:
    """Float32 weights [N, K] from 4-bit blocks."""
    n, k = blocks.q.shape
    q = blocks.q.float().view(n, k // GROUP, GROUP)
    return q.mul_(blocks.d[..., None]).add_(blocks.m[..., None]).view(n, k)


class Int4Linear(nn.Module):
    """A linear layer with 4-bit block weights: codes `qs` two per byte, float16 `d`, `m`, rows interleaved by 8."""

    def __init__(self, in_features: int, out_features: int, bias: bool, checkpoint_transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.checkpoint_transposed = checkpoint_transposed  # GPT-2's Conv1D checkpoints store [in, out]
        self.native = kernels.native()  # decided here, not per call: torch.compile sees a constant
        blocks = in_features // GROUP
        self.register_buffer("qs", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("d", torch.empty(out_features, blocks, dtype=torch.float16))
        self.register_buffer("m", torch.empty(out_features, blocks, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @staticmethod
    def state(blocks: Q4Blocks) -> dict[str, torch.Tensor]:
        """The buffers for `blocks`, keyed by buffer name, in the native kernel's layout (lmgen/kernels/matmul.c).

        Rows come in groups of 8, interleaved block by block: `qs` holds 128 bytes for each group and block
        (byte 32j + 4r + t holds codes 4j + t and 16 + 4j + t of the group's row r), and `d` and `m` the 8
        rows' scales and offsets, in the same group and block order.
        """
        n, k = blocks.q.shape
        q = blocks.q.view(n // ROWS, ROWS, k // GROUP, 2, 4, 4)  # group, row, block, half, j, t
        qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # group, block, j, row, t
        return {"qs": qs.reshape(n, k // 2).contiguous(), "d": _interleave(blocks.d.half()),
                "m": _interleave(blocks.m.half())}

    def blocks(self) -> Q4Blocks:
        """The codes and scales these buffers hold."""
        n, k = self.out_features, self.in_features
        qs = self.qs.view(n // ROWS, k // GROUP, 4, ROWS, 4).permute(0, 3, 1, 2, 4)  # group, row, block, j, t
        q = torch.stack((qs & 15, qs >> 4), 3).reshape(n, k)
        return Q4Blocks(q, _interleave(self.d, back=True).float(), _interleave(self.m, back=True).float())

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] these buffers hold."""
        return dequantize_q4(self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.native:  # any number of rows: at 512 (a prompt) it beats dequantize-then-float32 too
            bias = None if self.bias is None else self.bias.float()
            y = torch.ops.lmgen.q4_matmul(x2.float(), self.qs, self.d, self.m, bias).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def _interleave(t: torch.Tensor, back: bool = False) -> torch.Tensor:
    """Per-block values [N, B] in (or, with `back`, out of) the kernel's order: group, block, row in group."""
    n, b = t.shape
    shape = (n // ROWS, b, ROWS) if back else (n // ROWS, ROWS, b)
    return t.reshape(shape).transpose(1, 2).reshape(n, b).contiguous()


class Q8Blocks(NamedTuple):
    """8-bit weights [N, K] with a scale per block of 32 inputs: w = d * q (GGUF's Q8_0)."""

    q: torch.Tensor  # int8 [N, K]
    d: torch.Tensor  # float32 [N, K // GROUP], or float16 as a GGUF file holds them

    def map_rows(self, fn) -> "Q8Blocks":
        """The same blocks with `fn` applied to the row order of each part."""
        return Q8Blocks(fn(self.q), fn(self.d))


def quantize_q8(w: torch.Tensor) -> Q8Blocks:
    """Symmetric 8-bit blocks of 32 from float weights [N, K], a slice of rows at a time (low peak memory); one
    block per row when K is not a multiple of 32."""
    n, k = w.shape
    group = GROUP if k % GROUP == 0 else k
    q, d = torch.empty(w.shape, dtype=torch.int8), torch.empty(n, k // group)
    for start in range(0, n, 4096):
        rows = w[start:start + 4096].float().reshape(-1, k // group, group)
        s = (rows.abs().amax(-1) / 127).clamp_(min=1e-12)
        q[start:start + 4096] = (rows / s[..., None]).round_().clamp_(-127, 127).reshape(-1, k)
        d[start:start + 4096] = s
    return Q8Blocks(q, d)


class Int8Rows(nn.Module):
    """8-bit weight rows [N, K] with a scale per block of 32 inputs (a GGUF's Q8_0 blocks kept as they are):
    an embedding table, an output layer, or both (tied)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.register_buffer("qweight", torch.empty(rows, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(rows, dim // GROUP if dim % GROUP == 0 else 1))

    @staticmethod
    def state(w: "torch.Tensor | Q8Blocks") -> dict[str, torch.Tensor]:
        """The buffers for float weights [N, K] (quantized in blocks of 32) or a file's 8-bit blocks (exactly)."""
        blocks = w if isinstance(w, Q8Blocks) else quantize_q8(w)
        d = blocks.d if blocks.d.dtype == torch.float16 else blocks.d.float()  # a file's float16: fewer bytes a step
        return {"qweight": blocks.q, "scales": d.contiguous()}

    def dequantized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight, or only the given rows."""
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        blocks = s.shape[-1]
        return (q.float().unflatten(-1, (blocks, -1)) * s[..., None]).flatten(-2)


class Int8Embedding(Int8Rows):
    """An embedding lookup on 8-bit rows, giving vectors of the model's dtype."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__(rows, dim)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantized(tokens).to(self.dtype)


class Int8Linear(Int8Rows):
    """A linear layer on 8-bit rows: an output layer, or a decoder layer's Q8_0 matrix as the file has it."""

    def __init__(self, rows: int, dim: int, bias: bool = False):
        super().__init__(rows, dim)
        self.native = dim % 32 == 0 and kernels.native()  # the kernel takes blocks of 32 inputs
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.native:
            y = torch.ops.lmgen.q8_matmul(x2.float(), self.qweight, self.scales).to(x.dtype)
        elif x2.shape[0] <= TORCH_INT8_ROWS and self.scales.shape[1] == 1:  # torch's kernel takes a scale per row
            scales = self.scales[:, 0].bfloat16()
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.qweight, scales).to(x.dtype)
        else:
            y = x2 @ self.dequantized().to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], -1)


def quantize_modules(model: nn.Module, embedding: str, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Swap in the int4 layers (on the meta device, before weights are assigned); return them by name.

    Decoder-layer linears whose sizes fit the int4 kernel (inputs a multiple of 32, outputs of 8) become
    Int4Linear; the embedding and lm_head become 8-bit rows. Anything else (norms, position embeddings,
    odd-sized layers) stays as it is.
    """
    embed_module = embedding.rsplit(".", 1)[0]
    swaps: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name == embed_module and isinstance(module, nn.Embedding):
            swaps[name] = Int8Embedding(module.num_embeddings, module.embedding_dim, dtype)
        elif name == "lm_head" and isinstance(module, nn.Linear) and module.bias is None:
            swaps[name] = Int8Linear(module.out_features, module.in_features)
        elif name != "lm_head":
            shape = _linear_shape(module)
            if shape and shape[0] % GROUP == 0 and shape[1] % ROWS == 0:
                swaps[name] = Int4Linear(*shape, bias=module.bias is not None,
                                         checkpoint_transposed=not isinstance(module, nn.Linear))
    with torch.device("meta"):
        for name, new in swaps.items():
            _put(model, name, new)
    return swaps


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    # (in, out) of a linear layer: nn.Linear, or GPT-2's Conv1D whose weight is stored [in, out]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def for_blocks(model: nn.Module, name: str, module: nn.Module, weight) -> nn.Module:
    """The module to hold checkpoint `weight` at `name` as the file has it: a swapped-in layer given blocks it does
    not hold (Q8_0 for an int4 layer, Q5_0 or K-quants, mixed parts) is replaced, on the meta device, so they are
    kept exactly rather than rounded to 4 bits."""
    with torch.device("meta"):
        new = _block_module(module, weight)
    if new is not module:
        _put(model, name, new)
    return new


def _block_module(module: nn.Module, weight) -> nn.Module:
    if isinstance(module, Int8Embedding):
        is_k = isinstance(weight, KBlocks)
        return KEmbedding(weight.kind, len(weight.raw), weight.k, module.dtype) if is_k else module
    if not isinstance(module, (Int4Linear, Int8Linear)):
        return module
    bias = module.bias is not None
    if isinstance(weight, KBlocks):
        return KQuantLinear(weight.kind, len(weight.raw), weight.k, bias)
    if isinstance(module, Int8Linear):
        return module
    if isinstance(weight, Q8Blocks) and module.in_features % GROUP == 0:
        return Int8Linear(*weight.q.shape, bias=bias)
    if isinstance(weight, BlockParts):
        parts = [_part_module(p) for p in weight.parts]
        if all(parts):
            return PartsLinear(parts, module.in_features, module.out_features, bias)
    return module


def _part_module(part) -> nn.Module | None:
    # a bias-free layer for one part of a fused matrix: None when no layer holds it as it is
    if isinstance(part, KBlocks):
        return KQuantLinear(part.kind, len(part.raw), part.k)
    if isinstance(part, Q8Blocks) and part.q.shape[1] % GROUP == 0:
        return Int8Linear(*part.q.shape)
    if isinstance(part, Q4Blocks) and part.q.shape[0] % ROWS == 0:
        return Int4Linear(part.q.shape[1], part.q.shape[0], bias=False)
    return None


def tie_head(model: nn.Module, head: nn.Module, embedding: nn.Module) -> nn.Module:
    """The output layer that shares a swapped-in embedding's buffers (tied): a KQuantLinear on K-quant rows."""
    if not isinstance(embedding, KEmbedding) or not isinstance(head, Int8Linear):
        return head
    with torch.device("meta"):
        new = KQuantLinear(embedding.kind, embedding.out_features, embedding.in_features)
    _put(model, "lm_head", new)
    return new


def quantized_state(module: nn.Module, name: str, weight) -> dict[str, torch.Tensor]:
    """The state entries for a swapped-in module `name` from its checkpoint weight (float, or blocks of any kind,
    blocks always [out, in])."""
    if isinstance(module, PartsLinear):
        return {k: v for i, (m, w) in enumerate(zip(module.parts, weight.parts))
                for k, v in quantized_state(m, f"{name}.parts.{i}", w).items()}
    if isinstance(module, KRows):
        parts = KRows.state(weight)
    elif isinstance(module, Int4Linear):
        if isinstance(weight, torch.Tensor) and module.checkpoint_transposed:
            weight = weight.t()  # GPT-2's float Conv1D weights are [in, out]
        parts = Int4Linear.state(weight if isinstance(weight, Q4Blocks) else quantize_q4(dequantized(weight)))
    else:
        parts = Int8Rows.state(weight if isinstance(weight, Q8Blocks) else dequantized(weight))
    return {f"{name}.{k}": v for k, v in parts.items()}


def dequantize_q8(blocks: Q8Blocks) -> torch.Tensor:
    """Float32 weights [N, K] from 8-bit blocks."""
    n, k = blocks.q.shape
    return (blocks.q.float().view(n, -1, k // blocks.d.shape[1]) * blocks.d[..., None]).view(n, k)


def dequantized(weight) -> torch.Tensor:
    """Float32 weights [N, K] from blocks of any kind; a float tensor as it is."""
    if isinstance(weight, BlockParts):
        return torch.cat([dequantized(p) for p in weight.parts])
    decode = {Q4Blocks: dequantize_q4, Q8Blocks: dequantize_q8, KBlocks: dequantize_k}.get(type(weight))
    return weight if decode is None else decode(weight)


def cat_rows(parts: list) -> "torch.Tensor | Q4Blocks | Q8Blocks | KBlocks | BlockParts":
    """Stack weights along their output rows: blocks stay blocks (of one kind joined, else as BlockParts); with a
    float part among them, all become float."""
    if not all(isinstance(p, (Q4Blocks, Q8Blocks, KBlocks)) for p in parts):
        return torch.cat([dequantized(p) for p in parts])
    joined = [parts[0]]
    for p in parts[1:]:
        last = joined[-1]
        if isinstance(p, KBlocks) and isinstance(last, KBlocks) and (p.kind, p.k) == (last.kind, last.k):
            joined[-1] = KBlocks(p.kind, torch.cat([last.raw, p.raw]), p.k)
        elif type(p) is type(last) and not isinstance(p, KBlocks):
            joined[-1] = type(p)(*(torch.cat(c) for c in zip(last, p)))
        else:
            joined.append(p)
    return joined[0] if len(joined) == 1 else BlockParts(tuple(joined))
