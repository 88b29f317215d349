"""The Llama family (Llama 2/3, SmolLM2, TinyLlama): Hugging Face parameter names, so weights load strictly.

q/k/v and gate/up are each loaded as one matmul (FUSED_LINEARS), as vLLM names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, Step
from ..errors import ConfigError
from ..weights.hf import config_value
from .layers import CausalLM, RMSNorm, apply_rope, attention, embedding, rope_cos_sin, rope_inv_freq

# The keys each rope scaling type needs (see layers.rope_inv_freq).
ROPE_FACTORS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class Config:
    """The fields of a Hugging Face LlamaConfig that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qkv_bias: bool = False  # biases on q, k and v alone (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each q and k head before rope (Qwen3)
    sliding_window: int | None = None  # every layer attends to this many positions, its own included (Mistral)

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> "Config":
        """Read a config.json dict, checking each key's type; errors name `path`, the file it came from."""
        get = partial(config_value, d, path=path)
        heads, hidden = get("num_attention_heads", int), get("hidden_size", int)
        rope_key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = get(rope_key, dict, None)
        # Its keys are looked up under dotted names, so an error says where they are.
        nested = partial(config_value, {f"{rope_key}.{k}": v for k, v in (rope or {}).items()}, path=path)
        theta = get("rope_theta", float, None) or nested(f"{rope_key}.rope_theta", float, None) or 10000.0
        kind = nested(f"{rope_key}.rope_type", str, None) or nested(f"{rope_key}.type", str, "default")
        for key in ROPE_FACTORS.get(kind, ()):
            nested(f"{rope_key}.{key}", float)
        head_dim = get("head_dim", int, None) or hidden // heads
        if kind == "freqs":  # a GGUF's rope_freqs: each frequency's divisor
            factors = rope.get("factors")
            if not (isinstance(factors, list) and len(factors) == head_dim // 2
                    and all(isinstance(f, (int, float)) and f > 0 for f in factors)):
                raise ConfigError(path, f"{rope_key}.factors", f"must be {head_dim // 2} positive numbers")
        return cls(
            vocab_size=get("vocab_size", int), hidden_size=hidden,
            intermediate_size=get("intermediate_size", int), num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads", int, None) or heads,
            head_dim=head_dim, max_position_embeddings=get("max_position_embeddings", int, 2048),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6), rope_theta=theta,
            rope_scaling=None if kind == "default" else rope,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=get("attention_bias", bool, False), mlp_bias=get("mlp_bias", bool, False))


EMBEDDING = "model.embed_tokens.weight"
# Checkpoint linears we load as one wider matmul (fewer, larger calls per step): fused -> its parts, in order.
FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_name(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor, or None for tensors we don't use (old rotary buffers)."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def ties_embeddings(config: Config) -> bool:
    """Whether lm_head reuses the input embedding."""
    return config.tie_word_embeddings


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        self.qkv_proj = nn.Linear(c.hidden_size, heads * c.head_dim, bias=c.attention_bias or c.qkv_bias)  # q,k,v
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.window = c.sliding_window

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, step: Step):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        rotated = self.n_heads + self.n_kv_heads
        qk = qkv[:, :rotated]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :self.n_heads]), self.k_norm(qk[:, self.n_heads:])), dim=1)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotate together
        q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, rotated:]
        return self.o_proj(attention(q, k, v, cache, layer, step, window=self.window))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)  # gate, up rows
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, rope, cache, layer, step):
        x = x + self.self_attn(self.input_layernorm(x), *rope, cache, layer, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Model(CausalLM):
    """Llama causal LM: forward(tokens, step, cache, rows) -> logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) for sizing a KVCache."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, tokens: torch.Tensor, step: Step):
        """Token embeddings, and the rotary cos and sin every layer uses."""
        x = self.model.embed_tokens(tokens)
        return x, rope_cos_sin(self.inv_freq, step.positions, x.dtype)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))
