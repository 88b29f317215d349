"""GenerationConfig: every decoding parameter, validated; Hugging Face names, else OpenAI/vLLM ones.

BOUNDS is the one table of the numeric parameters' ranges: GenerationConfig checks it, the server's request models
and the CLI's flags are built from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LOGPROBS = 20
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice", "grammar")  # at most one per request (constraints.py)
GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily, as vLLM does: dividing by it overflows


class ParameterError(ValueError):
    """A parameter with a bad value; `field` names it, `requirement` says what it must be."""

    def __init__(self, field: str, requirement: str, value=None, *, message: str | None = None):
        self.field, self.requirement, self.value, self.message = field, requirement, value, message
        super().__init__(self.describe(field))

    def describe(self, name: str) -> str:
        """The message, calling the parameter `name` (an API field or a CLI flag)."""
        return self.message or f"{name} must be {self.requirement}, got {self.value!r}"


@dataclass(frozen=True)
class Bound:
    """A numeric parameter's range: `low` and `high` are inclusive unless open; None is unbounded."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is allowed (off)

    def ok(self, x) -> bool:
        """Whether x is a value of this kind in range."""
        if x is None:
            return self.optional
        if isinstance(x, bool) or not isinstance(x, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(x):
            return False
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def text(self) -> str:
        """What a value must be, in words: 'a number in (0, 1]', 'an integer >= 0'."""
        noun = "an integer" if self.kind is int else "a number"
        low, high = _show(self.low), _show(self.high)
        if self.low is not None and self.high is not None:
            where = f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            where = f"{noun} {'>' if self.low_open else '>='} {low}"
        elif self.high is not None:
            where = f"{noun} {'<' if self.high_open else '<='} {high}"
        else:
            where = f"a finite {'integer' if self.kind is int else 'number'}"
        return f"None or {where}" if self.optional else where

    def schema(self) -> dict:
        """pydantic Field's keyword arguments for this range (ge/gt/le/lt)."""
        out = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["lt" if self.high_open else "le"] = self.high
        return out


def _show(x) -> str:
    if x is None:
        return ""
    if abs(x) >= 2**32:
        return f"-2**{int(math.log2(-x))}" if x < 0 else f"2**{int(math.log2(x + 1))} - 1"
    return f"{x:g}"


BOUNDS = {
    "max_new_tokens": Bound(int, 0),
    "min_new_tokens": Bound(int, 0),
    "temperature": Bound(float, 0),
    "top_k": Bound(int, -1, optional=True),  # 0 and -1: no limit
    "top_p": Bound(float, 0, 1, low_open=True, optional=True),
    "min_p": Bound(float, 0, 1, optional=True),
    "typical_p": Bound(float, 0, 1, low_open=True, optional=True),
    "epsilon_cutoff": Bound(float, 0, 1, high_open=True, optional=True),
    "eta_cutoff": Bound(float, 0, 1, high_open=True, optional=True),
    "logit_bias": Bound(float, -100, 100),  # each bias
    "repetition_penalty": Bound(float, 0.01, 100, optional=True),
    "frequency_penalty": Bound(float, -2, 2),
    "presence_penalty": Bound(float, -2, 2),
    "no_repeat_ngram_size": Bound(int, 0, optional=True),
    "num_return_sequences": Bound(int, 1),
    "num_beams": Bound(int, 1),
    "length_penalty": Bound(float),
    "seed": Bound(int, -2**63, 2**63 - 1, optional=True),
    "logprobs": Bound(int, 0, MAX_LOGPROBS, optional=True),
    "prompt_logprobs": Bound(int, 0, MAX_LOGPROBS, optional=True),
}


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Invalid values raise ParameterError (a ValueError) naming the field and its range."""

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
    # Constrained output (one of them): a JSON schema (a dict or its JSON text), a regex the whole output matches,
    # one of a list of strings, or a grammar (llama.cpp's GBNF, or llguidance's Lark). Stop strings do not cut it.
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            object.__setattr__(self, "eos_token_id", [self.eos_token_id])
        for f in fields(self):
            value, check, bound = getattr(self, f.name), _CHECKS.get(f.name), BOUNDS.get(f.name)
            if not (check[0](value) if check else bound.ok(value)):
                raise ParameterError(f.name, check[1] if check else bound.text(), value)  # worded only when wrong
        given = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ParameterError(given[1], f"unset with {given[0]}", None,
                                 message=f"{given[0]} and {given[1]} cannot be used together: give one constraint")
        if self.num_beams > 1:
            if given:
                raise ParameterError(given[0], "None with num_beams > 1", None,
                                     message=f"{given[0]} is not supported with num_beams > 1")
            if self.num_return_sequences > self.num_beams:
                raise ParameterError("num_return_sequences", f"<= num_beams ({self.num_beams}) in beam search",
                                     self.num_return_sequences)
            for name in ("stop", "logprobs"):
                if getattr(self, name) not in (None, []):
                    raise ParameterError(name, "None with num_beams > 1", getattr(self, name),
                                         message=f"{name} is not supported with num_beams > 1")
            if self.do_sample:
                raise ParameterError("do_sample", "False with num_beams > 1", True, message=(
                    "do_sample=True with num_beams > 1 (beam sampling) is not supported: "
                    "use num_beams=1 to sample, or do_sample=False for beam search"))

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
        """True when tokens are drawn at random (a temperature below GREEDY_BELOW means greedy)."""
        return self.do_sample and self.temperature >= GREEDY_BELOW


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bias(x) -> bool:
    return isinstance(x, dict) and all(_int(k) and BOUNDS["logit_bias"].ok(v) for k, v in x.items())


def _token_lists(x) -> bool:
    return isinstance(x, list) and all(isinstance(w, list) and w and all(_int(t) and t >= 0 for t in w) for w in x)


def _stops(x) -> bool:
    return x is None or isinstance(x, list) and len(x) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in x)


def _flag(x) -> bool:
    return isinstance(x, bool)


# The parameters that are not numbers in a range: (check, what the value must be).
_CHECKS = {
    "do_sample": (_flag, "True or False"),
    "logit_bias": (lambda x: x is None or _bias(x),
                   f"None or a dict of integer token ids to biases, each {BOUNDS['logit_bias'].text()}"),
    "bad_words_ids": (lambda x: x is None or _token_lists(x), "None or a list of non-empty lists of token ids"),
    "eos_token_id": (lambda x: x is None or isinstance(x, list) and all(_int(t) and t >= 0 for t in x),
                     "None, a token id or a list of token ids"),
    "ignore_eos": (_flag, "True or False"),
    "stop": (_stops,
             f"None or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} characters"),
    "include_stop_str_in_output": (_flag, "True or False"),
    "early_stopping": (lambda x: isinstance(x, bool) or x == "never", "True, False or 'never'"),
    "weighted": (_flag, "True or False"),
    "logprobs_mode": (lambda x: x in ("raw", "processed"), "'raw' or 'processed'"),
    "json_schema": (lambda x: x is None or isinstance(x, (dict, str)) and bool(x),
                    "None, a JSON schema (a dict) or its JSON text"),
    "regex": (lambda x: x is None or isinstance(x, str) and bool(x), "None or a non-empty string"),
    "choice": (lambda x: x is None or isinstance(x, list) and x and all(isinstance(c, str) and c for c in x),
               "None or a non-empty list of non-empty strings"),
    "grammar": (lambda x: x is None or isinstance(x, str) and bool(x.strip()), "None or a non-empty grammar text"),
}
