"""Qwen3: a Llama with an RMSNorm over each q and k head before rope (self_attn.q_norm, k_norm) and its own head_dim.

Only the config differs; the model and its weight names are llama.py's. The native fused layers (fused.py) do not
take the q/k norms, so an int4 Qwen3 runs each linear through the int4 kernels instead.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import UnsupportedModelError
from . import llama
from .llama import EMBEDDING, FUSED_LINEARS, Model, checkpoint_name, ties_embeddings  # noqa: F401 (the module API)


class Config(llama.Config):
    """A Hugging Face Qwen3Config's fields: LlamaConfig's, with q/k norms."""

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> Config:
        """Read a config.json dict; a sliding window (use_sliding_window) is refused, naming the file."""
        if d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{path or 'model config'}: use_sliding_window is not supported yet")
        base = llama.Config.from_hf(dict(d, head_dim=d.get("head_dim") or 128), path)  # Qwen3Config's default
        return cls(**dict({f.name: getattr(base, f.name) for f in fields(base)}, qk_norm=True))
