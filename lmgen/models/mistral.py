"""Mistral: a Llama whose every layer may attend within a sliding window (config.json's sliding_window).

Only the config differs; the model and its weight names are llama.py's. llama.cpp converts Mistral to GGUF
architecture "llama" and writes no sliding window, so a Mistral GGUF loads as a Llama and attends over the whole
context, as llama.cpp runs it (a window shorter than the context then gives other logits than the HF folder).
The native fused layers (fused.py) have no window, so an int4 Mistral with one runs each linear through the int4
kernels instead.
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import ConfigError
from ..weights.hf import config_value
from . import llama
from .llama import EMBEDDING, FUSED_LINEARS, Model, checkpoint_name, ties_embeddings  # noqa: F401 (the module API)


class Config(llama.Config):
    """A Hugging Face MistralConfig's fields: LlamaConfig's, with the sliding window (None: none)."""

    @classmethod
    def from_hf(cls, d: dict, path: object = None) -> Config:
        """Read a config.json dict, checking each key's type; errors name `path`."""
        base = llama.Config.from_hf(d, path)
        window = config_value(d, "sliding_window", int, None, path=path)
        if window is not None and window < 1:
            raise ConfigError(path, "sliding_window", f"must be at least 1, got {window}")
        return cls(**dict({f.name: getattr(base, f.name) for f in fields(base)}, sliding_window=window))
