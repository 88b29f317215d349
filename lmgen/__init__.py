"""lmgen: generate text with causal language models."""

import sys

from .errors import ConfigError, CorruptFileError, LmgenError, ModelNotFoundError, UnsupportedModelError
from .generate import Generation
from .lm import LM, TokenProb
from .loading import load, load_tokenizer
from .params import GenerationConfig
from .pipeline import pipeline

__all__ = ["LM", "Generation", "GenerationConfig", "TokenProb", "load", "load_tokenizer", "pipeline",
           "LmgenError", "ModelNotFoundError", "UnsupportedModelError", "CorruptFileError", "ConfigError"]
__version__ = "0.1.0"

if "IPython" in sys.modules:  # a notebook or an IPython shell may be running: show results as HTML there
    from .display import register as _register_display

    _register_display()
