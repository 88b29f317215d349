"""GenerationConfig: every decoding parameter, validated; Hugging Face names, else OpenAI/vLLM ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Invalid values raise ValueError naming the field and the allowed range."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    # Warpers, applied in this order when sampling (transformers' order).
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    # Biases, penalties and masks, applied first.
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    # Stopping.
    eos_token_id: int | list[int] | None = None  # None: the model's EOS token(s)
    ignore_eos: bool = False
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    # Several sequences.
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    seed: int | None = None
    weighted: bool = True  # False: draw uniformly among the tokens the processors leave
    # Log-probabilities: how many alternatives per token (0: the chosen token's only).
    logprobs: int | None = None
    logprobs_mode: str = "raw"  # "raw": the model's distribution; "processed": after the processors
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            object.__setattr__(self, "eos_token_id", [self.eos_token_id])
        for f in fields(self):
            check = _CHECKS.get(f.name)
            value = getattr(self, f.name)
            if check and not check[0](value):
                raise ValueError(f"{f.name} must be {check[1]}, got {value!r}")
        if self.num_beams > 1:
            if self.num_return_sequences > self.num_beams:
                raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                                 f"({self.num_beams}) in beam search")
            if self.stop or self.logprobs is not None:
                raise ValueError("stop and logprobs are not supported with num_beams > 1")
            if self.do_sample:
                raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported: "
                                 "use num_beams=1 to sample, or do_sample=False for beam search")

    @classmethod
    def from_params(cls, base: GenerationConfig | None = None, **params) -> GenerationConfig:
        """A config from keyword parameters over an optional base; unknown names raise TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(unknown)}")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        return cls(**{**values, **params})

    def stop_token_ids(self, model_eos: Sequence[int]) -> list[int]:
        """The token ids that end a sequence: eos_token_id, else the model's; none with ignore_eos."""
        if self.ignore_eos:
            return []
        return list(self.eos_token_id if self.eos_token_id is not None else model_eos)

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random (temperature 0 means greedy)."""
        return self.do_sample and self.temperature > 0


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _optional(pred):
    return lambda x: x is None or pred(x)


def _bias(x) -> bool:
    return isinstance(x, dict) and all(_int(k) and _num(v) and -100 <= v <= 100 for k, v in x.items())


def _token_lists(x) -> bool:
    return isinstance(x, list) and all(isinstance(w, list) and w and all(_int(t) and t >= 0 for t in w) for w in x)


def _stops(x) -> bool:
    return isinstance(x, list) and len(x) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in x)


_CHECKS = {
    "max_new_tokens": (lambda x: _int(x) and x >= 0, "an integer >= 0"),
    "min_new_tokens": (lambda x: _int(x) and x >= 0, "an integer >= 0"),
    "do_sample": (lambda x: isinstance(x, bool), "True or False"),
    "temperature": (lambda x: _num(x) and x >= 0, "a number >= 0"),
    "top_k": (_optional(lambda x: _int(x) and x >= 0), "None or an integer >= 0"),
    "top_p": (_optional(lambda x: _num(x) and 0 < x <= 1), "None or a number in (0, 1]"),
    "min_p": (_optional(lambda x: _num(x) and 0 <= x <= 1), "None or a number in [0, 1]"),
    "typical_p": (_optional(lambda x: _num(x) and 0 < x <= 1), "None or a number in (0, 1]"),
    "epsilon_cutoff": (_optional(lambda x: _num(x) and 0 <= x < 1), "None or a number in [0, 1)"),
    "eta_cutoff": (_optional(lambda x: _num(x) and 0 <= x < 1), "None or a number in [0, 1)"),
    "logit_bias": (_optional(_bias), "None or a dict of integer token ids to numbers in [-100, 100]"),
    "repetition_penalty": (_optional(lambda x: _num(x) and x > 0), "None or a number > 0"),
    "frequency_penalty": (lambda x: _num(x) and -2 <= x <= 2, "a number in [-2, 2]"),
    "presence_penalty": (lambda x: _num(x) and -2 <= x <= 2, "a number in [-2, 2]"),
    "no_repeat_ngram_size": (_optional(lambda x: _int(x) and x >= 0), "None or an integer >= 0"),
    "bad_words_ids": (_optional(_token_lists), "None or a list of non-empty lists of token ids"),
    "eos_token_id": (_optional(lambda x: isinstance(x, list) and all(_int(t) and t >= 0 for t in x)),
                     "None, a token id or a list of token ids"),
    "ignore_eos": (lambda x: isinstance(x, bool), "True or False"),
    "stop": (_optional(_stops),
             f"None or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"),
    "include_stop_str_in_output": (lambda x: isinstance(x, bool), "True or False"),
    "num_return_sequences": (lambda x: _int(x) and x >= 1, "an integer >= 1"),
    "num_beams": (lambda x: _int(x) and x >= 1, "an integer >= 1"),
    "length_penalty": (_num, "a finite number"),
    "early_stopping": (lambda x: isinstance(x, bool) or x == "never", "True, False or 'never'"),
    "seed": (_optional(lambda x: _int(x) and -2**63 <= x < 2**63), "None or an integer in [-2**63, 2**63)"),
    "weighted": (lambda x: isinstance(x, bool), "True or False"),
    "logprobs": (_optional(lambda x: _int(x) and 0 <= x <= MAX_LOGPROBS), f"None or an integer in [0, {MAX_LOGPROBS}]"),
    "logprobs_mode": (lambda x: x in ("raw", "processed"), "'raw' or 'processed'"),
    "prompt_logprobs": (_optional(lambda x: _int(x) and 0 <= x <= MAX_LOGPROBS),
                        f"None or an integer in [0, {MAX_LOGPROBS}]"),
}
