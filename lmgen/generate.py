"""Generation over the slot cache: prefill prompts once, then one batched decode step per token."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from . import sampling
from .cache import KVCache
from .params import GenerationConfig

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds attention memory for long prompts


@dataclass
class Generation:
    """One generated sequence: the continuation's text and ids, and why it ended ("length" or "stop")."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(repr=False, default_factory=list)


@dataclass
class Sequence:
    """One sequence being generated: its slot, tokens and sampling state."""

    prompt: list[int]
    config: GenerationConfig
    generator: torch.Generator | None = None
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self):
        c = self.config
        self.processors = sampling.warpers(c.temperature, c.top_k, c.top_p) if c.sampling else []

    @property
    def length(self) -> int:
        """Tokens in the sequence so far, prompt included."""
        return len(self.prompt) + len(self.tokens)

    def choose(self, scores: torch.Tensor) -> int:
        """Pick the next token from this sequence's row of logits [V]."""
        if self.processors:
            ids = torch.tensor([self.prompt + self.tokens], device=scores.device)
            scores = sampling.apply_processors(self.processors, ids, scores[None])[0]
        if not self.config.sampling:
            return int(sampling.greedy(scores))
        if self.config.weighted:
            return sampling.sample(scores, self.generator)
        return sampling.sample_uniform(scores, self.generator)


def prefill(model, cache: KVCache, prompts: Seq[list[int]], slots: list[int]) -> torch.Tensor:
    """Run the prompts through the model into their slots; return each one's last logits [B, V]."""
    device = cache.k.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    # Right padding is harmless: a pad token writes keys past its row's length, and every
    # one of those positions is rewritten by the row's own decode step before it is read.
    tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
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


def decode_step(model, cache: KVCache, seqs: Seq[Sequence]) -> torch.Tensor:
    """Feed each sequence's newest token; return the next logits [B, V]."""
    device = cache.k.device
    tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=device)
    positions = torch.tensor([[s.length - 1] for s in seqs], device=device)
    return model(tokens, positions, cache, [s.slot for s in seqs])[:, -1]


def generate_tokens(model, cache: KVCache, seqs: list[Sequence], eos_ids: Seq[int],
                    max_length: int) -> Iterator[list[tuple[Sequence, int]]]:
    """Generate for all sequences as one batch; yield the (sequence, token) pairs of each step.

    Sequences with the same prompt object share one prefill. A sequence ends at an EOS
    token ("stop"), at its max_new_tokens or at `max_length` tokens ("length"); its slot
    is freed at once.
    """
    eos = set(eos_ids)
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
                token = s.choose(row)
                s.tokens.append(token)
                step.append((s, token))
                if token in eos:
                    s.finish_reason = "stop"
                elif len(s.tokens) >= s.config.max_new_tokens or s.length >= max_length:
                    s.finish_reason = "length"
                if s.finish_reason:
                    cache.release(s.slot)
            yield step
            active = [s for s in active if s.finish_reason is None]
            if active:
                logits = decode_step(model, cache, active)
    finally:
        for s in active:  # stopped early (an error, or the caller left): give the slots back
            if s.finish_reason is None and s.slot >= 0:
                cache.release(s.slot)
