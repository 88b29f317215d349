"""Gemma 3 text models (gemma3_text: 270M, 1B) and the language model of the multimodal ones (gemma3: 4B and up, a
Gemma3ForConditionalGeneration whose config holds a text_config; its vision tower is not loaded, so they read text
alone): Hugging Face parameter names, so weights load strictly.

What differs from Llama: embeddings scaled by sqrt(hidden_size); RMSNorms that scale by (1 + weight), computed in
float32; a norm after attention and around the MLP too; GeGLU; q and k normed per head before the rotary
embedding; scores scaled by query_pre_attn_scalar ** -0.5; sliding-window layers (their own rotary base) between
global ones; optional tanh soft-capping of the final logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, Step
from ..errors import ConfigError, UnsupportedModelError
from ..weights.hf import config_value
from . import llama
from .gpt2 import ACTIVATIONS
from .layers import CausalLM, attention, embedding, rope_inv_freq
from .llama import EMBEDDING, FUSED_LINEARS, ROPE_FACTORS  # noqa: F401 (the module API)

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer types
# Gemma3TextConfig's defaults: a multimodal config's text_config lists only what differs from them
DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
            "query_pre_attn_scalar": 256, "sliding_window": 4096}
# A multimodal checkpoint's language model, as transformers saves it (and 5.x names it in memory); the rest is vision.
_LANGUAGE_MODEL = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                   "model.language_model.": "model."}
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@dataclass(frozen=True)
class Config:
    """The fields of a Hugging Face Gemma3TextConfig that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope_theta: float  # full-attention layers'
    rope_scaling: dict | None
    rope_local_theta: float  # sliding-window layers'
    rope_local_scaling: dict | None
    hidden_activation: str
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> "Config":
        """Read a config.json dict (transformers 4.x or 5.x form; a multimodal one's text_config), checking each
        key's type; errors name `path`."""
        if d.get("model_type") == "gemma3":  # the language model's config, tied as the whole model says
            text = config_value(d, "text_config", dict, path=path)
            d = dict(text, tie_word_embeddings=d.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
        d = {**DEFAULTS, **d}  # (a key present but null stays null: no window, say)
        get = partial(config_value, d, path=path)
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if d.get(key):
                raise UnsupportedModelError(f"{path or 'model config'}: {key} is not supported", path)
        act = get("hidden_activation", str, None) or get("hidden_act", str, "gelu_pytorch_tanh")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"{path or 'model config'}: hidden_activation {act!r} is not supported "
                                        f"(supported: {', '.join(ACTIVATIONS)})", path)
        heads, hidden = get("num_attention_heads", int), get("hidden_size", int)
        n_layers = get("num_hidden_layers", int)
        head_dim = get("head_dim", int, None) or hidden // heads
        full, local = _rope(d, path)
        return cls(
            vocab_size=get("vocab_size", int), hidden_size=hidden, intermediate_size=get("intermediate_size", int),
            num_hidden_layers=n_layers, num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int, None) or heads, head_dim=head_dim,
            max_position_embeddings=get("max_position_embeddings", int, 131072),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            query_pre_attn_scalar=get("query_pre_attn_scalar", float, 256.0),
            sliding_window=get("sliding_window", int, None), layer_types=_layer_types(d, n_layers, path),
            rope_theta=full[0], rope_scaling=full[1], rope_local_theta=local[0], rope_local_scaling=local[1],
            hidden_activation=act, final_logit_softcapping=get("final_logit_softcapping", float, None),
            tie_word_embeddings=get("tie_word_embeddings", bool, True),
            attention_bias=get("attention_bias", bool, False))


def _layer_types(d: dict, n_layers: int, path: object) -> tuple[str, ...]:
    """`layer_types`, or from the older `sliding_window_pattern` (every n-th layer global), as transformers does."""
    types = d.get("layer_types")
    if types is None:
        n = config_value(d, "sliding_window_pattern", int, None, path=path) or \
            config_value(d, "_sliding_window_pattern", int, 6, path=path)
        return tuple(SLIDING if (i + 1) % n else FULL for i in range(n_layers))
    if not (isinstance(types, list) and len(types) == n_layers and all(t in (SLIDING, FULL) for t in types)):
        raise ConfigError(path, "layer_types", f"must be {n_layers} of {SLIDING!r} and {FULL!r}")
    return tuple(types)


def _rope(d: dict, path: object) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """(theta, scaling) of the full-attention and of the sliding-window layers: transformers 5.x writes
    rope_parameters keyed by layer type, 4.x rope_theta, rope_local_base_freq and rope_scaling (full layers')."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        return (_rope_kind(params, FULL, 1_000_000.0, path), _rope_kind(params, SLIDING, 10_000.0, path))
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    flat = dict(config_value(d, key, dict, None, path=path) or {})
    theta = config_value(d, "rope_theta", float, None, path=path)
    flat.setdefault("rope_theta", theta if theta is not None else 1_000_000.0)
    local = config_value(d, "rope_local_base_freq", float, 10_000.0, path=path)
    return _rope_kind({key: flat}, key, None, path), (local, None)


def _rope_kind(params: dict, key: str, theta: float | None, path: object) -> tuple[float, dict | None]:
    """(theta, scaling or None) from params[key], its keys checked under dotted names (errors say where)."""
    rope = config_value(params, key, dict, None, path=path) or {}
    get = partial(config_value, {f"{key}.{k}": v for k, v in rope.items()}, path=path)
    kind = get(f"{key}.rope_type", str, None) or get(f"{key}.type", str, "default")
    for factor in ROPE_FACTORS.get(kind, ()):
        get(f"{key}.{factor}", float)
    return get(f"{key}.rope_theta", float, theta), None if kind == "default" else rope


def checkpoint_name(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor, or None for tensors we don't use (a multimodal model's vision
    tower and projector, old rotary buffers)."""
    if name.startswith(_VISION):
        return None
    for prefix, ours in _LANGUAGE_MODEL.items():
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return llama.checkpoint_name(name)


def ties_embeddings(config: Config) -> bool:
    """Whether lm_head reuses the input embedding."""
    return config.tie_word_embeddings


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x normalized, times (1 + weight), in float32 before the cast back (unlike Llama's)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self._scale: tuple | None = None  # (weight, its data and version, 1 + weight): see scale()

    def scale(self) -> torch.Tensor:
        """1 + weight in float32, made once: the weights are assigned after construction, so it is cached on first
        use and made again when the weight changes."""
        w = self.weight
        if torch.compiler.is_compiling():  # (the compiled graph folds it)
            return 1.0 + w.float()
        key = (w.data_ptr(), w._version)  # a new weight, new data (moved, cast) or an in-place change
        if self._scale is None or self._scale[0] is not w or self._scale[1] != key:
            with torch.inference_mode(False):  # an ordinary tensor, whatever mode it is first made in
                self._scale = (w, key, 1.0 + w.detach().float())
        return self._scale[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(x, self.scale(), self.eps)


def norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x normalized over its last dim, times scale ([D], or [heads, D] for x [..., heads, D]), in float32 and cast
    back: transformers' products, in one or two calls."""
    y = x if x.dtype == torch.float32 else x.float()
    y = F.rms_norm(y, y.shape[-1:], scale, eps) if scale.dim() == 1 else F.rms_norm(y, y.shape[-1:], None, eps) * scale
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Config, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        self.qkv_proj = nn.Linear(c.hidden_size, heads * c.head_dim, bias=c.attention_bias)  # q, k, v rows
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.scale, self.window = c.query_pre_attn_scalar ** -0.5, window
        self._qk_scale: tuple | None = None  # (q_norm's scale, k_norm's, theirs per head): see qk_scale()

    def qk_scale(self) -> torch.Tensor:
        """q_norm's and k_norm's (1 + weight) for each q and k head, [heads, head_dim]: both norms in one call."""
        q, k = self.q_norm.scale(), self.k_norm.scale()
        if torch.compiler.is_compiling():
            return torch.cat((q.expand(self.n_heads, -1), k.expand(self.n_kv_heads, -1)))
        if self._qk_scale is None or self._qk_scale[0] is not q or self._qk_scale[1] is not k:
            with torch.inference_mode(False):
                self._qk_scale = (q, k, torch.cat((q.expand(self.n_heads, -1), k.expand(self.n_kv_heads, -1))))
        return self._qk_scale[2]

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, step: Step):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, -1, self.head_dim)  # [b, t, heads, head_dim]
        kv = self.n_heads + self.n_kv_heads
        qk = rotate(norm(qkv[:, :, :kv], self.qk_scale(), self.q_norm.eps), cos, sin).transpose(1, 2)
        q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, :, kv:].transpose(1, 2)
        return self.o_proj(attention(q, k, v, cache, layer, step, self.scale, self.window))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """layers.apply_rope's products and sum for x [b, t, heads, D] in fewer calls: rotate-half is x's halves swapped
    (one roll) with the first negated, and that sign comes in `sin` [b, t, 1, D]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # gate, up rows
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.hidden_activation]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: Config, kind: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, c.sliding_window if kind == SLIDING else None)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, ropes, cache, layer, step):
        h = self.self_attn(self.input_layernorm(x), *ropes[self.kind], cache, layer, step)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, kind) for kind in c.layer_types)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Model(CausalLM):
    """Gemma 3 causal LM: forward(tokens, step, cache, rows) -> logits."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        # the full layers' and the sliding ones' rotary frequencies, computed together each step
        freqs = (rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
                 rope_inv_freq(c.head_dim, c.rope_local_theta, c.rope_local_scaling))
        self.register_buffer("inv_freqs", torch.stack(freqs), persistent=False)
        half = c.head_dim // 2
        self.register_buffer("rope_sign", torch.cat((-torch.ones(half, device="cpu"), torch.ones(half, device="cpu"))),
                             persistent=False)  # rotate-half's signs, carried by sin
        # a float32 scalar cast to the embeddings' dtype, as transformers does (in bfloat16, sqrt(640) is 25.25)
        self.register_buffer("embed_scale", torch.tensor(c.hidden_size ** 0.5, device="cpu"), persistent=False)

    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) for sizing a KVCache."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, tokens: torch.Tensor, step: Step):
        """Scaled token embeddings, and the rotary cos and sin of each layer type."""
        x = self.model.embed_tokens(tokens)
        x = x * (self.embed_scale if x.dtype == torch.float32 else self.embed_scale.to(x.dtype))
        # cos and sin [b, t, kind, D] as layers.rope_cos_sin makes them (halves repeated), sin signed for rotate()
        freqs = step.positions[..., None, None].float() * self.inv_freqs
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin() * self.rope_sign
        if x.dtype != torch.float32:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x, {FULL: (cos[:, :, :1], sin[:, :, :1]), SLIDING: (cos[:, :, 1:], sin[:, :, 1:])}

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(x))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
