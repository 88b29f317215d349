"""Layers shared by the architectures: attention over the slot cache, RMSNorm, rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, Step, causal_step
from ..errors import UnsupportedModelError


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int, step: Step,
              scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention for flat tokens: q [1, Hq, N, D] and k, v [1, Hkv, N, D] -> [1, N, Hq*D].

    With a cache, the new keys and values are written first (the kernel writes lone tokens' itself); each lone
    token then attends over its slot up to its position, and each longer span causally over its slot. With a
    `window` W, a query at position p sees only positions p-W+1..p (a sliding-window layer; the cache keeps all).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, hq, d = q.shape[2], q.shape[1], q.shape[3]
    if cache is None:
        mask = None if window is None or n <= window else _span_mask(0, n, 0, window, q.device)
        out = _sdpa(q, k, v, mask, scale, causal=mask is None)
        return out.transpose(1, 2).reshape(1, n, hq * d)
    if step.write_index is not None:
        cache.write(layer, step, k, v)
    if step.all_lone:
        return _lone(q, k, v, cache, layer, step, scale, window).view(1, n, hq * d)
    out = q.new_empty(1, n, hq, d)
    if step.lone is not None:
        out[0, step.lone] = _lone(q[:, :, step.lone], k[:, :, step.lone], v[:, :, step.lone], cache, layer, step,
                                  scale, window)[:, :, 0]
    for span in step.spans:
        if span.count > 1:
            end = span.first + span.count
            lo = 0 if window is None else max(0, span.first - window + 1)  # the first key any of its queries sees
            rows = slice(span.start, span.start + span.count)
            keys = cache.k[layer, span.slot:span.slot + 1, :, lo:end]
            values = cache.v[layer, span.slot:span.slot + 1, :, lo:end]
            # a bfloat16 cache is read as it is (the CPU computes in it); any other, in the queries' dtype
            dtype = keys.dtype if keys.dtype == torch.bfloat16 else q.dtype
            causal = span.first == 0 and (window is None or end <= window)
            mask = None if causal else _span_mask(span.first, end, lo, window, q.device)
            part = _sdpa(q[:, :, rows].to(dtype), keys.to(dtype), values.to(dtype), mask, scale, causal=causal)
            out[0, rows] = part[0].transpose(0, 1).to(q.dtype)
    return out.view(1, n, hq * d)


def _span_mask(first: int, end: int, lo: int, window: int | None, device) -> torch.Tensor:
    """Which keys at positions lo..end-1 each query at first..end-1 sees: causal, within the window if any."""
    keys, queries = torch.arange(lo, end, device=device)[None, :], torch.arange(first, end, device=device)[:, None]
    mask = keys <= queries
    return mask if window is None else mask & (keys > queries - window)


def _lone(q, k, v, cache: KVCache, layer: int, step: Step, scale: float, window: int | None) -> torch.Tensor:
    """Attention of B lone tokens (q [1, Hq, B, D]) over their slots -> [B, Hq, 1, D]."""
    q = q.transpose(0, 2)  # [1, H, B, D] -> [B, H, 1, D], one view
    if step.kernel:
        return torch.ops.lmgen.decode_attention(q, k.transpose(0, 2), v.transpose(0, 2),
                                                cache.k, cache.v, layer, step.lone_slots, step.lone_positions, scale,
                                                window or 0)
    mask = step.lone_mask
    length = mask.shape[-1]
    if window is not None:  # the same keys, fewer of them seen
        seen = torch.arange(length, device=mask.device) > step.lone_positions.view(-1, 1, 1, 1) - window
        mask = mask & seen
    keys = cache.k[layer][step.lone_slots, :, :length].to(q.dtype)
    values = cache.v[layer][step.lone_slots, :, :length].to(q.dtype)
    return _sdpa(q, keys, values, mask, scale)


def _sdpa(q, k, v, mask, scale, causal=False):
    if q.is_cuda and q.shape[1] != k.shape[1] and not causal:
        return grouped_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal and mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


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


class CausalLM(nn.Module):
    """The forward both architectures share: embed, the decoder blocks over the cache, then the head.

    A subclass provides `embed(tokens, step) -> (x, context)`, `blocks` (each called as
    block(x, context, cache, layer, step)) and `head(x)`. `fused`, when set, runs all the blocks at once
    (models/fused.py: the int4 Llama layers as native calls).
    """

    fused = None

    def forward(self, tokens: torch.Tensor, step: Step | None = None, cache: KVCache | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] for flat tokens [1, N] placed by `step` (one causal sequence without it); with
        `rows`, only at those rows."""
        step = step if step is not None else causal_step(tokens.shape[1], tokens.device)
        x, context = self.embed(tokens, step)
        if self.fused is not None and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            x = self.fused(x, context, cache, step)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, context, cache, i, step)
        if rows is not None:
            if not len(rows):  # a prompt piece short of its end: keys and values only
                return x.new_empty(0, self.config.vocab_size)
            x = x[:, rows]
        return self.head(x)[0]


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
    """Rotary inverse frequencies, with Llama 3 (or a GGUF's per-frequency factors) and linear scaling applied
    (built on the CPU)."""
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
    elif kind == "freqs":  # llama.cpp's rope_freqs: llama3 scaling as each frequency's divisor
        inv_freq = inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
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
