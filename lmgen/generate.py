"""One continuation being generated (the per-row reference sampler), and what generation returns."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from . import sampling
from .params import GenerationConfig
from .stopping import TextTracker


@dataclass
class TokenLogprob:
    """A token's log-probability, the most likely tokens at its step as (token_id, logprob), its rank there (1: the
    most likely) and the entropy of that step's distribution in nats, both over the whole vocabulary."""

    token_id: int
    logprob: float | None  # None: an echoed prompt's first token, which nothing predicts
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None
    entropy: float | None = None


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
    token_text = None  # not a field: LM.generate sets it (token id -> text) for a notebook's display


class Continuation:
    """One continuation being generated: its tokens, sampling state, text and stop conditions."""

    def __init__(self, prompt: list[int], config: GenerationConfig, generator: torch.Generator | None = None,
                 eos_ids: Seq[int] = (), text: TextTracker | None = None, matcher=None):
        self.prompt, self.config, self.generator = prompt, config, generator
        self.matcher = matcher  # its place in a constraint (constraints.Matcher), when it has one
        eos = config.stop_token_ids(eos_ids)
        self.eos = set(eos)
        self.processors = sampling.build_processors(config, len(prompt), eos)
        self.text = text
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
        return self.accept(*self.choose(logits), max_length)

    def choose(self, logits: torch.Tensor, masked: torch.Tensor | None = None) -> tuple[int, TokenLogprob | None]:
        """The next token from logits [V] (`masked`: with its constraint's mask applied) through this sequence's own
        processors (the per-row reference), and its logprob entry when asked for; InvalidScoresError when no token
        can be chosen."""
        scores = logits if masked is None else masked
        if self.processors:
            ids = torch.tensor([self.prompt + self.tokens], device=logits.device)
            scores = sampling.apply_processors(self.processors, ids, scores[None])[0]
        c = self.config
        token = None if c.sampling else int(sampling.greedy(scores))
        sampling.check_scores(logits, scores, c, token)  # before a draw: it cannot draw from NaN
        if token is None:
            sample = sampling.sample if c.weighted else sampling.sample_uniform
            token = sample(scores, self.generator)
        return token, self.logprob_entry(logits, scores, token)

    def logprob_entry(self, logits: torch.Tensor, scores: torch.Tensor, token: int) -> TokenLogprob | None:
        """The logprob entry for `token` (raw or processed, per logprobs_mode), or None when not asked for."""
        c = self.config
        if self.logprobs is None:
            return None
        return token_logprob(scores if c.logprobs_mode == "processed" else logits, token, c.logprobs)

    def accept(self, token: int, logprob: TokenLogprob | None, max_length: int) -> str:
        """Append the chosen token; check EOS, stop strings and length; return the text it releases."""
        c = self.config
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        self.tokens.append(token)
        piece = ""
        complete = self.matcher is not None and self.matcher.accept(token)
        if token in self.eos:
            self.finish_reason, self.stop_reason = "stop", token
        elif self.text is not None:
            piece = self.text.add(token)
            if self.text.matched is not None:
                self.finish_reason, self.stop_reason = "stop", self.text.matched
        if complete and self.finish_reason is None:  # the constraint is satisfied and allows nothing more
            self.finish_reason = "stop"
        if self.finish_reason is None and (len(self.tokens) >= c.max_new_tokens or self.length >= max_length):
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.finish()
        return piece

    def result(self) -> Generation:
        """The Generation this continuation has produced so far."""
        return Generation(self.text.text if self.text else "", list(self.tokens), self.finish_reason, self.prompt,
                          stop_reason=self.stop_reason, logprobs=self.logprobs)


def token_logprob(scores: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The log-probability of `token` under scores [V], with the top_n alternatives, its rank and the entropy."""
    return token_logprobs(scores[None], [token], top_n)[0]


def token_logprobs(scores: torch.Tensor, tokens: list[int], top_n: int, rows: int = 64) -> list[TokenLogprob]:
    """token_logprob for each row of scores [N, V] and its token, `rows` rows at a time (a whole prompt's
    float32 copies would take N * V * 8 bytes)."""
    out = []
    for start in range(0, len(tokens), rows):
        logprobs = torch.log_softmax(scores[start:start + rows].float(), dim=-1)
        chosen = torch.tensor(tokens[start:start + rows], device=logprobs.device)[:, None]
        own = logprobs.gather(1, chosen)
        ranks = ((logprobs > own).sum(1) + 1).tolist()  # ties share the better rank
        entropies = entropy(logprobs).tolist()
        tops = [[]] * len(ranks)
        if top_n:
            values, ids = torch.topk(logprobs, top_n)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        out += [TokenLogprob(t, lp, top, rank, h) for t, lp, top, rank, h in
                zip(chosen[:, 0].tolist(), own[:, 0].tolist(), tops, ranks, entropies)]
    return out


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """The entropy in nats of distributions given as log-probabilities [..., V] (masked -inf entries count 0)."""
    return -(logprobs.exp() * logprobs).nansum(-1) + 0.0  # (+ 0.0: no -0.0 for one sure token)
