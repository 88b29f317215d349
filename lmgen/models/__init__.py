"""Model architectures, one module each, looked up by Hugging Face `model_type`."""

from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedModelError
from . import gemma3, gpt2, llama, mistral, qwen2, qwen3

ARCHITECTURES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2, "qwen3": qwen3,
                                         "mistral": mistral, "gemma3_text": gemma3,
                                         "gemma3": gemma3}  # multimodal Gemma 3: its language model alone


def architecture(model_type: str | None, source: object = None) -> ModuleType:
    """The module (with `Config` and `Model`) for a model_type, or UnsupportedModelError."""
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:  # a list would not even hash
        where = f" in {source}" if source else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r}{where} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
