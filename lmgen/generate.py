"""Generation over the slot cache: prefill prompts once, then one batched decode step per token."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from . import sampling
from .cache import KVCache
from .params import GenerationConfig
from .stopping import TextTracker

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds attention memory for long prompts


@dataclass
class TokenLogprob:
    """A token's log-probability, and the most likely tokens at its step as (token_id, logprob)."""

    token_id: int
    logprob: float | None  # None: an echoed prompt's first token, which nothing predicts
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Generation:
    """One generated sequence: the continuation's text and ids, and why it ended.

    finish_reason is "stop" or "length"; stop_reason says what stopped it: the EOS token id
    (an int), the stop string (a str), or None when it ran to its length.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(repr=False, default_factory=list)
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = field(repr=False, default=None)
    prompt_logprobs: list[TokenLogprob | None] | None = field(repr=False, default=None)
    score: float | None = None  # beam search: the sequence score


class Sequence:
    """One sequence being generated: its slot, tokens, sampling state, text and stop conditions."""

    def __init__(self, prompt: list[int], config: GenerationConfig, generator: torch.Generator | None = None,
                 eos_ids: Seq[int] = (), text: TextTracker | None = None):
        self.prompt, self.config, self.generator = prompt, config, generator
        eos = config.stop_token_ids(eos_ids)
        self.eos = set(eos)
        self.processors = sampling.build_processors(config, len(prompt), eos)
        self.text = text
        self.slot = -1
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if config.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far, prompt included."""
        return len(self.prompt) + len(self.tokens)

    def advance(self, logits: torch.Tensor, max_length: int) -> str:
        """Choose and append the next token from this sequence's logits [V]; return the text it releases."""
        scores = logits
        if self.processors:
            ids = torch.tensor([self.prompt + self.tokens], device=logits.device)
            scores = sampling.apply_processors(self.processors, ids, logits[None])[0]
        c = self.config
        token = None if c.sampling else int(sampling.greedy(scores))
        sampling.check_scores(logits, scores, c, token)  # before a draw: it cannot draw from NaN
        if token is None:
            sample = sampling.sample if c.weighted else sampling.sample_uniform
            token = sample(scores, self.generator)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(scores if c.logprobs_mode == "processed" else logits, token, c.logprobs))
        self.tokens.append(token)
        piece = ""
        if token in self.eos:
            self.finish_reason, self.stop_reason = "stop", token
        elif self.text is not None:
            piece = self.text.add(token)
            if self.text.matched is not None:
                self.finish_reason, self.stop_reason = "stop", self.text.matched
        if self.finish_reason is None and (len(self.tokens) >= c.max_new_tokens or self.length >= max_length):
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.finish()
        return piece


def token_logprob(scores: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The log-probability of `token` under scores [V], with the top_n alternatives."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    top = []
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def prefill(model, cache: KVCache, prompts: Seq[list[int]], slots: list[int]) -> torch.Tensor:
    """Run the prompts through the model into their slots; return each one's last logits [B, V]."""
    device = cache.k.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    # Right padding is harmless: a pad token writes keys past its row's length, and every
    # one of those positions is rewritten by the row's own decode step before it is read.
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
    positions = torch.arange(width).expand(len(prompts), width)  # on the CPU: the cache builds its indices there
    out = [None] * len(prompts)
    for start in range(0, width, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, width)
        rows = [i for i, n in enumerate(lengths) if n > start]
        last = torch.tensor([min(lengths[i], end) - 1 - start for i in rows], device=device)
        logits = model(tokens[rows, start:end], positions[rows, start:end], cache,
                       [slots[i] for i in rows], last=last)
        for j, i in enumerate(rows):
            if start < lengths[i] <= end:
                out[i] = logits[j]
    return torch.stack(out)


def decode_step(model, cache: KVCache, seqs: Seq[Sequence], run=None) -> torch.Tensor:
    """Feed each sequence's newest token; return the next logits [B, V].

    `run` (a CompiledDecode) takes a lone sequence's step.
    """
    positions = torch.tensor([[s.length - 1] for s in seqs])  # on the CPU: the cache builds its indices there
    if run is not None and len(seqs) == 1:
        return run(torch.tensor([[seqs[0].tokens[-1]]]), positions, cache, seqs[0].slot)[:, -1]
    tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=cache.k.device)
    return model(tokens, positions, cache, [s.slot for s in seqs])[:, -1]


def generate_tokens(model, cache: KVCache, seqs: list[Sequence], max_length: int,
                    run=None) -> Iterator[list[tuple[Sequence, int, str]]]:
    """Generate for all sequences as one batch; yield each step's (sequence, token, released text).

    Sequences with the same prompt object share one prefill. A sequence ends at an EOS token
    or a stop string ("stop"), or at its max_new_tokens or `max_length` tokens ("length");
    its slot is freed at once.
    """
    for s in seqs:
        if s.config.max_new_tokens == 0 or s.length >= max_length:
            s.finish_reason = "length"
    active = [s for s in seqs if s.finish_reason is None]
    if not active:
        return
    groups: dict[int, list[Sequence]] = {}
    for s in active:
        groups.setdefault(id(s.prompt), []).append(s)
    active = [s for g in groups.values() for s in g]
    try:
        for s in active:
            s.slot = cache.allocate()
        firsts = [g[0] for g in groups.values()]
        first_logits = prefill(model, cache, [s.prompt for s in firsts], [s.slot for s in firsts])
        logits = []
        for g, row in zip(groups.values(), first_logits):
            for s in g[1:]:
                cache.copy_prefix(g[0].slot, s.slot, len(s.prompt))
            logits += [row] * len(g)
        while active:
            step = []
            for s, row in zip(active, logits):
                piece = s.advance(row, max_length)
                step.append((s, s.tokens[-1], piece))
                if s.finish_reason:
                    cache.release(s.slot)
            yield step
            active = [s for s in active if s.finish_reason is None]
            if active:
                logits = decode_step(model, cache, active, run)
    finally:
        for s in active:  # stopped early (an error, or the caller left): give the slots back
            if s.finish_reason is None and s.slot >= 0:
                cache.release(s.slot)
