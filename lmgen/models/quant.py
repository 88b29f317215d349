"""Weight-only quantized layers for fast CPU decoding, and the swap that puts them into a model.

`int4`: each decoder-layer linear keeps 4-bit weights in groups of 32 inputs, w = (q - 8) * scale + zero,
which holds GGUF Q4_0 and Q4_1 blocks exactly (up to bfloat16 scales). The embedding and the output
layer keep 8-bit rows with one scale each. A few rows at a time (decoding) go through torch's int4 and
int8 kernels with bfloat16 inputs; many rows (a prompt) dequantize the weight and use the float32 matmul.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # inputs per 4-bit group: the GGUF block size
KERNEL_ROWS = 32  # up to this many rows the quantized kernels beat dequantize-then-matmul on the CPU
QUANTIZATIONS = ("int4",)


class Q4Blocks(NamedTuple):
    """4-bit weights [N, K] as codes 0..15 with a float scale and zero per group: w = (q - 8) * scale + zero."""

    q: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # float32 [N, K // GROUP]
    zero: torch.Tensor  # float32 [N, K // GROUP]

    def map_rows(self, fn) -> "Q4Blocks":
        """The same blocks with `fn` applied to the row order of each part (e.g. un-permuting heads)."""
        return Q4Blocks(fn(self.q), fn(self.scale), fn(self.zero))


def quantize_q4(w: torch.Tensor) -> Q4Blocks:
    """Asymmetric 4-bit groups from float weights [N, K], by each group's min and max (as GGUF Q4_1 does)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = ((g - lo[..., None]) / torch.where(scale == 0, 1, scale)[..., None]).round_().clamp_(0, 15)
    return Q4Blocks(q.to(torch.uint8).reshape(n, k), scale, lo + 8 * scale)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (N a multiple of 32) in torch's CPU int4 layout: per 32 rows and input, bytes of rows i, i+16."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def unpack_int4(packed: torch.Tensor, n: int, k: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The codes [N, K] back from `pack_int4`, as `dtype` (tests check it against torch's packer)."""
    block = packed.view(n // 32, k, 16)
    out = torch.empty(n // 32, 32, k, dtype=dtype)
    out[:, :16] = (block & 15).transpose(1, 2)  # rows i and i + 16 of each 32 share a byte
    out[:, 16:] = (block >> 4).transpose(1, 2)
    return out.view(n, k)


class Int4Linear(nn.Module):
    """A linear layer with 4-bit grouped weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool, checkpoint_transposed: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.checkpoint_transposed = checkpoint_transposed  # GPT-2's Conv1D checkpoints store [in, out]
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(in_features // GROUP, out_features, 2,
                                                         dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @staticmethod
    def state(blocks: Q4Blocks) -> dict[str, torch.Tensor]:
        """The buffers for `blocks`, keyed by buffer name."""
        sz = torch.stack((blocks.scale, blocks.zero), -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return {"packed": pack_int4(blocks.q), "scales_zeros": sz}

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] these buffers hold."""
        n, k = self.out_features, self.in_features
        scale, zero = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # [N, K/G] each
        w = unpack_int4(self.packed, n, k, torch.float32).view(n, k // GROUP, GROUP)
        w = w.mul_(scale[..., None]).add_((zero - 8 * scale)[..., None])
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= KERNEL_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), self.packed, GROUP,
                                                          self.scales_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.dequantized().to(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Rows(nn.Module):
    """8-bit weight rows [N, K] with one scale per row: an embedding table, an output layer, or both (tied)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.register_buffer("qweight", torch.empty(rows, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(rows, dtype=torch.bfloat16))

    @staticmethod
    def state(w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric per-row quantization of float weights [N, K], a slice of rows at a time (low peak memory)."""
        q = torch.empty(w.shape, dtype=torch.int8)
        scales = torch.empty(w.shape[0], dtype=torch.bfloat16)
        for start in range(0, w.shape[0], 4096):
            rows = w[start:start + 4096].float()
            s = (rows.abs().amax(-1) / 127).clamp_(min=1e-12).bfloat16()
            q[start:start + 4096] = (rows / s.float()[:, None]).round_().clamp_(-127, 127)
            scales[start:start + 4096] = s
        return {"qweight": q, "scales": scales}

    def dequantized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight, or only the given rows."""
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return q.float() * s.float()[..., None]


class Int8Embedding(Int8Rows):
    """An embedding lookup on 8-bit rows, giving vectors of the model's dtype."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__(rows, dim)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantized(tokens).to(self.dtype)


class Int8Linear(Int8Rows):
    """An output layer (no bias) on 8-bit rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.qweight, self.scales).to(x.dtype)
        else:
            y = x2 @ self.dequantized().to(x.dtype).t()
        return y.view(*x.shape[:-1], -1)


def quantize_modules(model: nn.Module, embedding: str, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Swap in the int4 layers (on the meta device, before weights are assigned); return them by name.

    Decoder-layer linears whose sizes fit the int4 kernel become Int4Linear; the embedding and lm_head
    become 8-bit rows. Anything else (norms, position embeddings, odd-sized layers) stays as it is.
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
            if shape and shape[0] % GROUP == 0 and shape[1] % 32 == 0:
                swaps[name] = Int4Linear(*shape, bias=module.bias is not None,
                                         checkpoint_transposed=not isinstance(module, nn.Linear))
    with torch.device("meta"):
        for name, new in swaps.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return swaps


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    # (in, out) of a linear layer: nn.Linear, or GPT-2's Conv1D whose weight is stored [in, out]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def quantized_state(module: nn.Module, name: str, weight) -> dict[str, torch.Tensor]:
    """The state entries for a swapped-in module `name` from its checkpoint weight (float or Q4Blocks)."""
    if isinstance(module, Int4Linear):
        if not isinstance(weight, Q4Blocks):  # GGUF blocks are always [out, in]
            weight = quantize_q4(weight.t() if module.checkpoint_transposed else weight)
        parts = Int4Linear.state(weight)
    else:
        if isinstance(weight, Q4Blocks):
            weight = dequantize_q4(weight)
        parts = Int8Rows.state(weight)
    return {f"{name}.{k}": v for k, v in parts.items()}


def cat_rows(parts: list) -> "torch.Tensor | Q4Blocks":
    """Stack weights along their output rows; 4-bit blocks stay blocks when every part is one."""
    if all(isinstance(p, Q4Blocks) for p in parts):
        return Q4Blocks(*(torch.cat(c) for c in zip(*parts)))
    return torch.cat([dequantize_q4(p) if isinstance(p, Q4Blocks) else p for p in parts])


def dequantize_q4(blocks: Q4Blocks) -> torch.Tensor:
    """Float32 weights [N, K] from 4-bit blocks."""
    n, k = blocks.q.shape
    q = blocks.q.float().view(n, k // GROUP, GROUP)
    return q.sub_(8).mul_(blocks.scale[..., None]).add_(blocks.zero[..., None]).view(n, k)
