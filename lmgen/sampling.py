"""Logits processors and samplers: small pure functions with transformers' `(input_ids, scores) -> scores` contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def temperature_warper(t: float) -> Processor:
    """Divide the scores by t (transformers' TemperatureLogitsWarper)."""
    return lambda input_ids, scores: scores / t


def top_k_warper(k: int, min_tokens_to_keep: int = 1) -> Processor:
    """Keep the k highest scores (transformers' TopKLogitsWarper)."""

    def apply(input_ids, scores):
        kk = min(max(k, min_tokens_to_keep), scores.shape[-1])
        kth = torch.topk(scores, kk).values[..., -1, None]
        return scores.masked_fill(scores < kth, NEG_INF)

    return apply


def top_p_warper(p: float, min_tokens_to_keep: int = 1) -> Processor:
    """Keep the smallest set of tokens whose probability reaches p (transformers' TopPLogitsWarper)."""

    def apply(input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p)
        remove[..., -min_tokens_to_keep:] = False
        return scores.masked_fill(remove.scatter(-1, order, remove), NEG_INF)

    return apply


def warpers(temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None) -> list[Processor]:
    """The sampling warpers in transformers' order: temperature, top_k, top_p."""
    out: list[Processor] = []
    if temperature != 1.0:
        out.append(temperature_warper(temperature))
    if top_k:
        out.append(top_k_warper(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(top_p_warper(top_p))
    return out


def apply_processors(processors: Sequence[Processor], input_ids: torch.Tensor,
                     scores: torch.Tensor) -> torch.Tensor:
    """Run the processors in order over scores [B, V]."""
    for proc in processors:
        scores = proc(input_ids, scores)
    return scores


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token of each row [B, V] -> [B]."""
    return scores.argmax(dim=-1)


def sample(scores: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token from a single row of scores [V], weighted by its softmax."""
    probs = torch.softmax(scores.float(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_uniform(scores: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Draw one token uniformly among those not masked to -inf in a row of scores [V]."""
    allowed = torch.nonzero(scores > NEG_INF).flatten()
    pick = torch.randint(len(allowed), (1,), generator=generator, device=scores.device)
    return int(allowed[pick])
