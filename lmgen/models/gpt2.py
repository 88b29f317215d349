"""The GPT-2 family (gpt2, distilgpt2): Hugging Face parameter names, so weights load strictly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Step
from ..errors import UnsupportedModelError
from ..weights.hf import config_value
from .layers import CausalLM, attention, embedding

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class Config:
    """The fields of a Hugging Face GPT2Config that the model uses."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> "Config":
        """Read a config.json dict, checking each key's type; errors name `path`, the file it came from."""
        get = partial(config_value, d, path=path)
        act = get("activation_function", str, "gelu_new")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation_function {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if get("reorder_and_upcast_attn", bool, False):
            raise UnsupportedModelError("reorder_and_upcast_attn=True is not supported")
        n_embd = get("n_embd", int)
        return cls(
            vocab_size=get("vocab_size", int), n_positions=get("n_positions", int, 1024), n_embd=n_embd,
            n_layer=get("n_layer", int), n_head=get("n_head", int), n_inner=get("n_inner", int, None) or 4 * n_embd,
            layer_norm_epsilon=get("layer_norm_epsilon", float, 1e-5), activation_function=act,
            scale_attn_weights=get("scale_attn_weights", bool, True),
            scale_attn_by_inverse_layer_idx=get("scale_attn_by_inverse_layer_idx", bool, False))

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions


EMBEDDING = "transformer.wte.weight"
FUSED_LINEARS: dict[str, tuple[str, ...]] = {}  # c_attn already holds q, k and v


def checkpoint_name(name: str) -> str | None:
    """Our parameter name for a checkpoint tensor, or None for tensors we don't use.

    OpenAI-era checkpoints (gpt2, distilgpt2 on the Hub) lack the "transformer." prefix and
    carry the causal mask as attn.bias / attn.masked_bias buffers.
    """
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def ties_embeddings(config: Config) -> bool:
    """GPT-2 always shares its input embedding with the output layer."""
    return True


class Conv1D(nn.Module):
    """GPT-2's linear layer, weight stored [in, out] as in its checkpoints."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.n_head, self.head_dim = c.n_head, c.n_embd // c.n_head
        self.c_attn = Conv1D(c.n_embd, 3 * c.n_embd)
        self.c_proj = Conv1D(c.n_embd, c.n_embd)
        self.scale = 1 / math.sqrt(self.head_dim) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(self, x, cache, layer, step):
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
                   for y in self.c_attn(x).split(self.n_head * self.head_dim, dim=2))
        return self.c_proj(attention(q, k, v, cache, layer, step, scale=self.scale))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_fc = Conv1D(c.n_embd, c.n_inner)
        self.c_proj = Conv1D(c.n_inner, c.n_embd)
        self.act = ACTIVATIONS[c.activation_function]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = Attention(c, layer)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x, context, cache, layer, step):
        x = x + self.attn(self.ln_1(x), cache, layer, step)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.wte = embedding(c.vocab_size, c.n_embd)
        self.wpe = embedding(c.n_positions, c.n_embd)
        self.h = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)


class Model(CausalLM):
    """GPT-2 causal LM: forward(tokens, step, cache, rows) -> logits; lm_head tied to wte."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) for sizing a KVCache."""
        c = self.config
        return c.n_layer, c.n_head, c.n_embd // c.n_head

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def embed(self, tokens: torch.Tensor, step: Step):
        """Token plus position embeddings (no per-layer context)."""
        return self.transformer.wte(tokens) + self.transformer.wpe(step.positions), None

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))
