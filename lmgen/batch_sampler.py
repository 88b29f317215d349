"""The batched sampler: every row's next token from logits [B, V] in one pass, with per-row parameter tensors.

It applies transformers' processors in their order (logit bias, repetition penalty, frequency and presence
penalties, then while sampling temperature, top-k, top-p, min-p and typical-p), each as one tensor operation over
the rows that use it, then draws every sampled row from its own generator by the inverse CDF, with one read back
to the host for the batch. The arithmetic is the per-row processors' own (sampling.py), so a seeded row gives the
same tokens and logprobs as Continuation.choose, which stays as the reference; rows asking for a processor this
pass has not (no_repeat_ngram_size, bad_words_ids, min_new_tokens, epsilon or eta cutoffs, unweighted draws) go
through that reference alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import constraints, sampling
from .generate import Continuation, TokenLogprob, entropy
from .params import GenerationConfig

NEG_INF = float("-inf")


def batched(c) -> bool:
    """Whether a config's processors are all ones this pass applies."""
    return (c.weighted and not c.no_repeat_ngram_size and not c.bad_words_ids and not c.min_new_tokens
            and not (c.sampling and (c.epsilon_cutoff or c.eta_cutoff)))


def choose(seqs: Sequence[Continuation], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None] | Exception]:
    """Each sequence's next token and logprob entry from its row of logits [B, V]; an exception for a row whose
    scores leave no token to choose (InvalidScoresError, or a bad logit_bias id). Constrained rows are masked
    first, all in one pass; logprobs stay the model's own (raw) unless logprobs_mode is "processed"."""
    masked, dead = constraints.mask_rows([s.matcher for s in seqs], logits)
    out: list = [dead.get(i) for i in range(len(seqs))]
    fast = []
    for i, s in enumerate(seqs):
        if out[i] is not None:
            continue
        if batched(s.config):
            fast.append(i)
        else:
            out[i] = _reference(s, logits[i], None if masked is logits else masked[i])
    if fast:
        whole = len(fast) == len(seqs)  # (indexing copies every row)
        rows = logits if whole else logits[fast]
        masked_rows = rows if masked is logits else masked if whole else masked[fast]
        for i, result in zip(fast, _choose_batched([seqs[i] for i in fast], rows, masked_rows)):
            out[i] = result
    return out


def _reference(s: Continuation, row: torch.Tensor, masked: torch.Tensor | None):
    try:
        return s.choose(row, masked)
    except (sampling.InvalidScoresError, ValueError) as e:
        return e


def _rows(seqs, want) -> list[int]:
    return [r for r, s in enumerate(seqs) if want(s.config)]


def _rewrites(c) -> bool:
    """Whether a row's processors below rewrite its scores (else a pass reads the logits themselves, uncopied)."""
    return bool(c.sampling or c.logit_bias or c.frequency_penalty or c.presence_penalty
                or c.repetition_penalty not in (None, 1.0))


def row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.max(scores, -1) for rows [B, V]: each row's best and where it first is (NaN counting as best), through
    the maxima of chunks of the row, vectorized, where argmax is a scalar loop (~0.35 ms over 262,144 scores)."""
    b, v = scores.shape
    chunk = math.gcd(v, 1024)
    if chunk < 64 or not scores.is_contiguous():
        return scores.max(-1)
    chunks = scores.view(b, v // chunk, chunk)
    best, at = chunks.amax(-1).max(-1)  # the first chunk holding the best
    within = chunks.gather(1, at.view(b, 1, 1).expand(b, 1, chunk)).view(b, chunk).argmax(-1)
    return best, at * chunk + within


def _choose_batched(seqs: list[Continuation], logits: torch.Tensor, masked: torch.Tensor) -> list:
    if masked is not logits:
        scores = masked  # a masked copy is this pass's own
    else:
        scores = logits.clone() if any(_rewrites(s.config) for s in seqs) else logits
    vocab = scores.shape[-1]
    device = scores.device
    results: list = process(seqs, scores)
    sampled = [r for r, s in enumerate(seqs) if s.config.sampling]
    greedy = [r for r, s in enumerate(seqs) if not s.config.sampling]
    if len(greedy) == len(seqs):  # (indexing would copy every row)
        best, tokens = row_max(scores)
    else:
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=device)
        if greedy:  # only where it is used
            tokens[greedy] = row_max(scores[greedy])[1]
        best = scores.amax(-1)
    finite = torch.isfinite(best).tolist()  # a row's best score (a greedy row's chosen one) is finite
    draw = [r for r in sampled if finite[r] and results[r] is None]
    if draw:
        cdf = torch.softmax(scores if len(draw) == len(seqs) else scores[draw], dim=-1, dtype=torch.float64)
        cdf = cdf.cumsum_(-1)
        u = torch.cat([torch.rand((1,), generator=seqs[r].generator, dtype=cdf.dtype, device=device) for r in draw])
        picks = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True).clamp_(max=vocab - 1)
        tokens[draw] = picks[:, 0]
    tokens = tokens.tolist()
    for r, s in enumerate(seqs):
        if results[r] is not None:
            continue
        if not finite[r]:
            try:  # the reference check names the parameters at fault
                sampling.check_scores(logits[r], scores[r], s.config, None if s.config.sampling else tokens[r])
            except sampling.InvalidScoresError as e:
                results[r] = e
                continue
        results[r] = (tokens[r], s.logprob_entry(logits[r], scores[r], tokens[r]))
    return results


def process(seqs, scores: torch.Tensor, observe: Callable[[str], None] | None = None) -> list[Exception | None]:
    """Apply each row's processors to scores [B, V] in place, in transformers' order: logit bias, penalties, then the
    sampled rows' warpers. `seqs` need .config, .prompt and .tokens; observe(stage) is called after each warper that
    ran. Returns per row None, or the error that rules the row out (a logit_bias id outside the vocabulary)."""
    vocab = scores.shape[-1]
    device = scores.device
    results: list = [None] * len(seqs)
    column = _column(seqs, scores)
    if rows := _rows(seqs, lambda c: c.logit_bias):
        bias = torch.zeros(len(rows), vocab, dtype=torch.float, device=device)
        for j, r in enumerate(rows):
            ids = list(seqs[r].config.logit_bias)
            if max(ids) >= vocab:
                results[r] = ValueError(f"logit_bias: token ids {sorted(i for i in ids if i >= vocab)} are outside "
                                        f"the model's vocabulary of {vocab}")
                continue
            bias[j, ids] = torch.tensor([float(v) for v in seqs[r].config.logit_bias.values()], device=device)
        scores[rows] = scores[rows] + bias.to(scores.dtype)
    if rows := _rows(seqs, lambda c: c.repetition_penalty is not None and c.repetition_penalty != 1.0):
        seen = _token_mask(rows, seqs, vocab, device, generated_only=False)
        sub, penalty = scores[rows], column(rows, lambda c: c.repetition_penalty)
        scores[rows] = torch.where(seen, torch.where(sub < 0, sub * penalty, sub / penalty), sub)
    if rows := _rows(seqs, lambda c: c.frequency_penalty or c.presence_penalty):
        counts = _token_counts(rows, seqs, vocab, device)
        freq = column(rows, lambda c: c.frequency_penalty).float()
        pres = column(rows, lambda c: c.presence_penalty).float()
        scores[rows] = (scores[rows].float() - freq * counts - pres * (counts > 0).float()).to(scores.dtype)
    for name, wanted, warp in WARPERS:
        if rows := _rows(seqs, lambda c: c.sampling and wanted(c)):
            scores[rows] = warp(scores[rows], rows, column)
            if observe is not None:
                observe(name)
    return results


def _column(seqs, scores: torch.Tensor):
    """column(rows, value): value(config) of each of those rows, as a [rows, 1] tensor of scores' dtype (or `dtype`)."""
    def column(rows, value, dtype=None) -> torch.Tensor:
        values = [value(seqs[r].config) for r in rows]
        return torch.tensor(values, dtype=dtype or scores.dtype, device=scores.device)[:, None]
    return column


def _temperature(sub, rows, column):
    return sub / column(rows, lambda c: c.temperature)


def _top_k(sub, rows, column):
    ks = column(rows, lambda c: c.top_k, torch.long).clamp(1, sub.shape[-1])
    kth = torch.topk(sub, int(ks.max())).values.gather(1, ks - 1)
    return sub.masked_fill(sub < kth, NEG_INF)


def _top_p(sub, rows, column):
    sorted_scores, order = torch.sort(sub, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - column(rows, lambda c: c.top_p))
    remove[..., -1:] = False
    return sub.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def _min_p(sub, rows, column):
    probs = sub.softmax(dim=-1)
    remove = probs < column(rows, lambda c: c.min_p) * probs.amax(dim=-1, keepdim=True)
    top = torch.topk(probs, 1, dim=-1).indices
    return sub.masked_fill(remove.scatter(-1, top, False), NEG_INF)


def _typical_p(sub, rows, column):
    logp = sub.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-logp - entropy).abs(), descending=False)
    cumulative = sub.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < column(rows, lambda c: c.typical_p)).sum(dim=1).clamp(max=distance.shape[-1] - 1)
    remove = distance > distance.gather(1, last.view(-1, 1))
    remove[..., :1] = False
    return sub.masked_fill(remove.scatter(1, order, remove), NEG_INF)


# The warpers in transformers' order: (stage, whether a sampled row's config asks for it, the warp of its rows).
WARPERS = (
    ("temperature", lambda c: c.temperature != 1.0, _temperature),
    ("top_k", lambda c: c.top_k is not None and c.top_k > 0, _top_k),
    ("top_p", lambda c: c.top_p is not None and c.top_p < 1.0, _top_p),
    ("min_p", lambda c: bool(c.min_p), _min_p),
    ("typical_p", lambda c: c.typical_p is not None and c.typical_p < 1.0, _typical_p),
)


def _padded(rows, seqs, vocab, device, generated_only: bool) -> torch.Tensor:
    ids = [seqs[r].tokens if generated_only else seqs[r].prompt + seqs[r].tokens for r in rows]
    width = max(1, max(len(i) for i in ids))
    return torch.tensor([[min(t, vocab) for t in i] + [vocab] * (width - len(i)) for i in ids], device=device)


def _token_mask(rows, seqs, vocab, device, generated_only: bool) -> torch.Tensor:
    ids = _padded(rows, seqs, vocab, device, generated_only)
    return torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter(1, ids, True)[:, :vocab]


def _token_counts(rows, seqs, vocab, device) -> torch.Tensor:
    ids = _padded(rows, seqs, vocab, device, generated_only=True)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    return counts.scatter_add(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


class History(NamedTuple):
    """A row's tokens and config, as process() reads them from a Continuation."""

    config: GenerationConfig
    prompt: list[int]
    tokens: list[int]


@dataclass
class Distribution:
    """The next-token distribution before and after a config's processors (this pass's own), over the whole
    vocabulary; removed_by[t] indexes `stages` with the first stage that removed token t, -1 where it is kept."""

    prompt_token_ids: list[int]
    raw: torch.Tensor  # [V] the model's probabilities
    processed: torch.Tensor  # [V] the probabilities sampling draws from (0 where removed)
    removed_by: torch.Tensor  # [V] int
    stages: list[str]  # every stage applied, in order
    token_text = None  # not a field: LM.distribution sets it (token id -> text) for a notebook's display

    @property
    def candidates(self) -> int:
        """How many tokens are left to draw from."""
        return int((self.removed_by < 0).sum())

    @property
    def kept_mass(self) -> float:
        """The model's probability mass on the tokens left."""
        return float(self.raw[self.removed_by < 0].sum())

    @property
    def entropy(self) -> float:
        """The entropy (nats) of the model's distribution."""
        return float(entropy(self.raw.log()))

    @property
    def processed_entropy(self) -> float:
        """The entropy (nats) of the distribution sampling draws from."""
        return float(entropy(self.processed.log()))

    @property
    def removed(self) -> dict[str, int]:
        """How many tokens each stage that removes removed first."""
        counts = torch.bincount(self.removed_by[self.removed_by >= 0], minlength=len(self.stages)).tolist()
        return {s: n for s, n in zip(self.stages, counts) if s in REMOVING}

    def top(self, n: int) -> list[tuple[int, float, float, str | None]]:
        """The n most likely tokens (by the model): (token_id, probability, processed probability, the stage that
        removed it or None)."""
        values, ids = torch.topk(self.raw, min(n, self.raw.numel()))
        return [(i, p, float(self.processed[i]), self.stages[r] if (r := int(self.removed_by[i])) >= 0 else None)
                for p, i in zip(values.tolist(), ids.tolist())]


REMOVING = ("top_k", "top_p", "min_p", "typical_p", "greedy")  # the stages that can remove tokens


def explain(logits: torch.Tensor, prompt: list[int], config: GenerationConfig) -> Distribution:
    """The distribution the next token after `prompt` is drawn from under `config`, stage by stage, from logits [V]
    (constraints and the processors the batched pass has not are not shown: `batched(config)` must hold)."""
    scores = logits.float().clone()[None]
    removed_by = torch.full(logits.shape, -1, dtype=torch.long)
    c = config
    stages = [name for name, on in (
        ("logit_bias", c.logit_bias), ("repetition_penalty", c.repetition_penalty not in (None, 1.0)),
        ("frequency_penalty", c.frequency_penalty), ("presence_penalty", c.presence_penalty)) if on]

    def observe(stage: str) -> None:
        gone = (scores[0] == NEG_INF) & (removed_by < 0)
        removed_by[gone] = len(stages)
        stages.append(stage)

    error = process([History(config, list(prompt), [])], scores, observe)[0]
    if error is not None:
        raise error
    if not c.sampling:  # greedy keeps its one token
        scores[0, ~torch.arange(scores.shape[-1]).eq(row_max(scores)[1])] = NEG_INF
        observe("greedy")
    processed = torch.softmax(scores[0].double(), dim=-1)
    return Distribution(list(prompt), torch.softmax(logits.double(), dim=-1), processed, removed_by, stages)
