"""Layers shared by the architectures: attention over the slot cache, RMSNorm, rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, Step
from ..errors import UnsupportedModelError


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cache: KVCache | None, layer: int, step: Step, scale: float | None = None) -> torch.Tensor:
    """Causal attention for q [B, Hq, T, D] and k, v [B, Hkv, T, D] -> [B, T, Hq*D].

    With a cache, the new keys and values are written first and the attention
    reads every earlier position of each row's slot.
    """
    if step.kernel:  # lone new tokens on the CPU: the kernel writes k, v too
        out = torch.ops.lmgen.decode_attention(q, k, v, cache.k, cache.v, layer, step.slots, step.positions,
                                               q.shape[-1] ** -0.5 if scale is None else scale)
        return out.view(q.shape[0], 1, -1)
    if cache is not None:
        k, v = cache.update(layer, step, k, v)
    if q.is_cuda and q.shape[1] != k.shape[1]:
        out = grouped_attention(q, k, v, step.mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention as plain attention: each key head's query heads become extra query rows.

    CUDA's fused kernels take a mask or grouped heads, not both (that falls back to a copy of every
    key per query head); as rows, the groups need neither. q [B, Hq, T, D], k, v [B, Hkv, S, D],
    mask [B, 1, T, S] or None -> [B, Hq, T, D].
    """
    b, hq, t, d = q.shape
    groups = hq // k.shape[1]
    q = q.reshape(b, k.shape[1], groups * t, d)  # query head h = kv head h // groups; rows (group, t)
    if mask is not None:
        mask = mask.repeat(1, 1, groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(b, hq, t, d)


def embedding(rows: int, dim: int) -> nn.Embedding:
    """An uninitialized embedding (its weights are assigned at load): on the meta device, nn.Embedding's
    random init would import torch._dynamo, about a second of load time."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3 and linear scaling applied (built on the CPU)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
                                .float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, smoothed, inv_freq)
    elif kind != "default":
        raise UnsupportedModelError(
            f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin [B, 1, T, D] for the given positions [B, T] (halves repeated, HF layout)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the position angles (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
