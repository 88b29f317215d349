"""Constrained decoding: JSON schema, regex, choice and grammar constraints as token masks, from llguidance.

A model's Constraints (made at load: the tokenizer's set-up for the mask library) compiles a config's constraint
once per distinct source and gives each continuation its own Matcher. The batched sampler masks every constrained
row in one pass, before any other processor (vLLM's order); EOS is allowed exactly where the constraint accepts.
Why llguidance: BENCHMARKS.md ("Issue 16"), measured against xgrammar and outlines-core on our tokenizers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time

import llguidance
import numpy as np
import torch

from . import kernels
from .params import CONSTRAINT_FIELDS, GenerationConfig, ParameterError
from .sampling import InvalidScoresError

# One way to write JSON: no free whitespace (a small model fills free whitespace with newlines until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 64


class InvalidConstraint(ParameterError):
    """A schema, regex, choice or grammar that does not compile; `detail` is the library's reason."""

    def __init__(self, field: str, detail: str):
        # One line: the library's first line and its "error:" lines, not its pictures of where (carets, echoes).
        lines = [line.strip() for line in detail.strip().splitlines()]
        self.detail = " ".join(lines[:1] + [line for line in lines[1:] if line.startswith("error:")])
        super().__init__(field, "valid", None)

    def describe(self, name: str) -> str:
        """The message, calling the constraint `name` (an API field or a CLI flag)."""
        return f"{name} is invalid: {self.detail}"


class ConstraintDeadEnd(InvalidScoresError):
    """The constraint allows no token of the vocabulary where generation stands; `fields` names the constraint."""

    def __init__(self, field: str, text: str, detail: str = ""):
        self.fields, self.problem = (field,), "allow no token"
        ValueError.__init__(self, f"the {field} constraint allows no token of this model's vocabulary after "
                                  f"{text[-80:]!r}" + (f" ({detail})" if detail else ""))


def closed(schema):
    """The schema with objects that list their properties closed to others (additionalProperties false unless it
    says otherwise), as llama.cpp and xgrammar read schemas: a small model otherwise invents keys until max_tokens."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_source(field: str, value) -> str:
    """llguidance's grammar for one constraint field's value (not yet checked)."""
    if field == "json_schema":
        schema = json.loads(value) if isinstance(value, str) else value
        return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=JSON_OPTIONS)
    if field == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if field == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    # A grammar is GBNF (llama.cpp's) or llguidance's Lark; any_to_lark tells them apart.
    return llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.any_to_lark(value))


def constraint_of(config: GenerationConfig) -> tuple[str, object] | None:
    """The config's one constraint as (field, value), or None."""
    for field in CONSTRAINT_FIELDS:
        if getattr(config, field) is not None:
            return field, getattr(config, field)
    return None


class Constraints:
    """The mask library's view of one tokenizer, and the grammars compiled for it (cached by source)."""

    def __init__(self, tokenizer, vocab_size: int):
        start = time.perf_counter()
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                eos_token=list(tokenizer.eos_token_ids) or None)
        self.setup_seconds = time.perf_counter() - start
        self.decode = tokenizer.decode
        self._grammars: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()

    def describe(self) -> str:
        """The mask library and its set-up time, in words (`lmgen info`)."""
        return f"{llguidance.get_version()}, tokenizer set up in {self.setup_seconds * 1000:.0f} ms"

    def compile(self, field: str, value) -> llguidance.LLMatcher:
        """A fresh matcher for a constraint; ParameterError naming the field when it is invalid."""
        try:
            grammar = grammar_source(field, value)
        except Exception as e:  # a malformed JSON string, or GBNF that does not convert
            raise InvalidConstraint(field, str(e)) from None
        matcher = self._grammars.get(grammar)
        if matcher is None:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if matcher.is_error():
                raise InvalidConstraint(field, matcher.get_error())
            self._grammars[grammar] = matcher
            if len(self._grammars) > CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(grammar)
        return matcher.deep_copy()

    def matchers(self, config: GenerationConfig, eos_ids, n: int) -> list[Matcher | None]:
        """One matcher per continuation of a request (None each when it has no constraint)."""
        found = constraint_of(config)
        if found is None:
            return [None] * n
        first = self.compile(*found)
        return [Matcher(first if j == 0 else first.deep_copy(), found[0], eos_ids, self) for j in range(n)]


class Matcher:
    """One continuation's place in its constraint."""

    def __init__(self, matcher: llguidance.LLMatcher, field: str, eos_ids, constraints: Constraints):
        self.matcher, self.field, self.eos = matcher, field, list(eos_ids)
        self.library_eos = constraints.tokenizer.eos_tokens  # the library allows these where it accepts
        self.vocab = constraints.vocab_size
        self.decode, self.tokens = constraints.decode, []
        self.ahead: concurrent.futures.Future | None = None  # the next mask, being filled while the forward runs

    def fill(self, bits: torch.Tensor, row: int) -> None:
        """Write the library's mask for the next token into bits[row] (from the one filled ahead when it is)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            done, words = ahead.result()
            if done == len(self.tokens):
                bits[row] = words
                return
        _fill_mask(self.matcher, bits[row])

    def _fill_ahead(self) -> tuple[int, torch.Tensor]:
        words = torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        _fill_mask(self.matcher, words[0])
        return len(self.tokens), words[0]

    def accept(self, token: int) -> bool:
        """Advance past a chosen token; True when the constraint is complete (only EOS could follow)."""
        self.ahead = None
        if token in self.eos:
            return True
        self.tokens.append(token)
        if not self.matcher.consume_token(token):  # the mask allowed it: a library error, never passed off as done
            raise self.dead_end()
        return self.matcher.is_stopped()

    def dead_end(self) -> ConstraintDeadEnd:
        """The error for a row whose constraint allows nothing."""
        return ConstraintDeadEnd(self.field, self.decode(self.tokens), self.matcher.get_error())


_BYTE_BITS = torch.tensor([[0.0 if (b >> i) & 1 else float("-inf") for i in range(8)] for b in range(256)])
_ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmgen-masks")
FILL_AHEAD: bool | None = None  # None: when a core is free during the forward; the benchmark forces it either way


def fill_ahead(matchers: list[Matcher], device: torch.device) -> None:
    """Start filling these matchers' next masks on a worker thread (the library drops the GIL) while the forward
    computes their logits, where a core is free for it: the forward runs on a GPU, or on fewer threads than the
    CPU has cores. Where it is not, the worker only slows the forward (BENCHMARKS.md), so masks fill inline."""
    if not matchers:  # (every step calls this)
        return
    ahead = FILL_AHEAD
    if ahead is None:
        ahead = device.type != "cpu" or (os.cpu_count() or 1) > torch.get_num_threads()
    for m in matchers if ahead else ():
        m.ahead = _ahead.submit(m._fill_ahead)


def token_bitmask(matchers: list[Matcher], vocab: int) -> torch.Tensor:
    """The tokens each matcher allows next, as llguidance's bitmask int32 [n, words] (bit j of a row: token j);
    EOS exactly where its constraint accepts."""
    bits = torch.full((len(matchers), (matchers[0].vocab + 31) // 32), -1, dtype=torch.int32)
    # One row after another, not the library's parallel fill: that hands rows to threads that wait for cores the
    # forward's OpenMP threads still spin on (5x slower at batch 16 on 2 cores, BENCHMARKS.md).
    for i, m in enumerate(matchers):
        m.fill(bits, i)
    words = bits.numpy().view(np.uint32)
    for r, m in enumerate(matchers):
        accepting = m.matcher.is_accepting()
        for e in m.library_eos:
            words[r, e >> 5] &= ~_bit(e)
        for e in m.eos:
            if e < vocab and accepting:
                words[r, e >> 5] |= _bit(e)
            elif e < vocab:
                words[r, e >> 5] &= ~_bit(e)
    return bits


def _bit(token: int) -> np.uint32:
    return np.uint32(1 << (token & 31))


def apply_bitmask(scores: torch.Tensor, bits: torch.Tensor) -> list[int]:
    """Set scores [n, V] to -inf where bits [n, words] disallow, in place; each row's count of allowed tokens."""
    if kernels.native():
        return torch.ops.lmgen.apply_token_bitmask(scores, bits).tolist()
    return apply_bitmask_torch(scores, bits)


def apply_bitmask_torch(scores: torch.Tensor, bits: torch.Tensor) -> list[int]:
    """apply_bitmask without the native kernels."""
    vocab = scores.shape[-1]
    bias = _BYTE_BITS[bits.view(torch.uint8).long()].view(len(scores), -1)[:, :vocab]  # 0 or -inf a token
    scores += bias
    return torch.isfinite(bias).sum(-1).tolist()


def allowed_tokens(matchers: list[Matcher], vocab: int) -> torch.Tensor:
    """Which tokens each matcher allows next, as bool [n, vocab]."""
    bias = _BYTE_BITS[token_bitmask(matchers, vocab).view(torch.uint8).long()].view(len(matchers), -1)
    return torch.isfinite(bias[:, :vocab])


def mask_rows(matchers: list[Matcher | None], logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
    """The logits with each constrained row's disallowed tokens at -inf (a copy; `logits` itself when no row is
    constrained), and a dead-end error for each row whose constraint allows nothing."""
    rows = [r for r, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits, {}
    active = [matchers[r] for r in rows]
    bits = token_bitmask(active, logits.shape[-1])
    scores = logits.clone()
    whole = len(rows) == len(matchers)
    sub = scores if whole else scores[rows]  # (indexing copies)
    counts = apply_bitmask(sub, bits)
    if not whole:
        scores[rows] = sub
    return scores, {rows[j]: m.dead_end() for j, (m, n) in enumerate(zip(active, counts)) if n == 0}


def _fill_mask(matcher: llguidance.LLMatcher, words: torch.Tensor) -> None:
    """The library's next-token mask into one contiguous int32 CPU row (what llguidance.torch does, without
    importing it: its module-level torch.compile costs a second of every lmgen import)."""
    assert words.dtype == torch.int32 and words.is_cpu and words.is_contiguous()
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
