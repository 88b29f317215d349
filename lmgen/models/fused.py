"""Llama decoder layers on 4-bit (or Q8_0) weights as native calls (lmgen/kernels/ops.cpp): the default path's layers.

A step of lone tokens (every sequence decoding) runs all the layers in one call, decode_layers, with no Python
between them; any other step (prompt pieces among them) runs each layer as layer_in, the shared attention
(layers.attention) and layer_out. Both chain the same kernels, so a row's numbers do not depend on which kind of
step it is in, nor on its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..cache import KVCache, Step
from .layers import RMSNorm, attention
from .llama import DecoderLayer
from .quant import Int4Linear, Int8Linear


def _linear_parts(linear: Int4Linear | Int8Linear) -> list[torch.Tensor]:
    bias = torch.empty(0) if linear.bias is None else linear.bias.detach().float().contiguous()
    if isinstance(linear, Int8Linear):
        return [linear.qweight, linear.scales, torch.empty(0), bias]
    return [linear.qs, linear.d, linear.m, bias]


def _native_linear(m: nn.Module) -> bool:
    return isinstance(m, Int4Linear) or (isinstance(m, Int8Linear) and m.native)


def _fits(b: nn.Module) -> bool:
    norms = (getattr(b, "input_layernorm", None), getattr(b, "post_attention_layernorm", None))
    attn = getattr(b, "self_attn", None)
    plain = getattr(attn, "q_norm", None) is None and getattr(attn, "window", None) is None  # native calls take neither
    return (isinstance(b, DecoderLayer) and plain
            and all(isinstance(n, RMSNorm) and n.weight.dtype == torch.float32 and n.weight.is_cpu for n in norms)
            and all(map(_native_linear, (b.self_attn.qkv_proj, b.self_attn.o_proj, b.mlp.gate_up_proj,
                                         b.mlp.down_proj))))


class FusedLayers:
    """x [1, N, hidden] -> x after every decoder layer of a Llama model on 4-bit or 8-bit block linears."""

    def __init__(self, model: nn.Module, ops=None):
        self.ops = ops or torch.ops.lmgen  # a test passes another build's namespace
        c = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.layers = [[block.input_layernorm.weight.detach(), *_linear_parts(block.self_attn.qkv_proj),
                        *_linear_parts(block.self_attn.o_proj), block.post_attention_layernorm.weight.detach(),
                        *_linear_parts(block.mlp.gate_up_proj), *_linear_parts(block.mlp.down_proj)]
                       for block in model.blocks]
        self.flat = [t for parts in self.layers for t in parts]

    @staticmethod
    def fits(model: nn.Module) -> bool:
        """Whether `model` (a Llama, weights loaded) can run on these calls: block linears, native kernels, CPU."""
        blocks = getattr(model, "blocks", None)
        if not blocks or not kernels.native():
            return False
        return all(_fits(b) for b in blocks)

    def __call__(self, x: torch.Tensor, rope, cache: KVCache | None, step: Step) -> torch.Tensor:
        if cache is not None and step.kernel and step.all_lone:
            cos, sin = rope[0][0, 0], rope[1][0, 0]
            return self.ops.decode_layers(x[0], self.flat, self.eps, cos, sin, self.n_heads, cache.k, cache.v,
                                         step.lone_slots, step.lone_positions, self.head_dim ** -0.5)[None]
        return self.layer_by_layer(x, rope, cache, step)

    def layer_by_layer(self, x: torch.Tensor, rope, cache: KVCache | None, step: Step) -> torch.Tensor:
        """The same layers a native call each, around the shared attention: any step."""
        ops, (n, hq, hkv, d) = self.ops, (x.shape[1], self.n_heads, self.n_kv_heads, self.head_dim)
        x2, cos, sin = x[0], rope[0][0, 0], rope[1][0, 0]
        for i, parts in enumerate(self.layers):
            qkv = ops.layer_in(x2, parts, self.eps, cos, sin, hq + hkv).view(1, n, -1, d).transpose(1, 2)
            out = attention(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], cache, i, step)
            x2 = ops.layer_out(x2, out[0], parts, self.eps)
        return x2[None]
