"""Qwen2 and Qwen2.5: a Llama whose q, k and v projections have biases (o_proj has none).

Only the config differs; the model, its weight names and the native layers are llama.py's.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import UnsupportedModelError
from . import llama
from .llama import EMBEDDING, FUSED_LINEARS, Model, checkpoint_name, ties_embeddings  # noqa: F401 (the module API)


class Config(llama.Config):
    """A Hugging Face Qwen2Config's fields: LlamaConfig's, with biases on q, k and v."""

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> Config:
        """Read a config.json dict; a sliding window (use_sliding_window) is refused, naming the file."""
        if d.get("use_sliding_window"):
            raise UnsupportedModelError(f"{path or 'model config'}: use_sliding_window is not supported yet")
        base = llama.Config.from_hf(d, path)
        return cls(**dict({f.name: getattr(base, f.name) for f in fields(base)}, qkv_bias=True))
