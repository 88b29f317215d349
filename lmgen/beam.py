"""Beam search, scored step for step as transformers' `_beam_search` (one sequence): a policy the core drives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .params import GenerationConfig

NEG = -1.0e9  # transformers' "impossible" score: finite, so the sums, topk order and ties come out as there


@dataclass
class Beam:
    """A finished beam-search hypothesis."""

    tokens: list[int]  # generated tokens only (after the prompt), including a final EOS if it ended on one
    score: float  # transformers' sequence score: sum of log-probs / generated_length ** length_penalty
    finish_reason: str  # "stop" (ended on EOS) or "length"


class BeamState:
    """Beam search for one prompt, one step at a time: give it the running beams' logits, it picks the next beams.

    `advance` returns, for each next running beam, the beam it continues (its cache rows are that beam's), or
    None once the search is over; `running` then holds each beam's generated tokens and `results()` the best.
    """

    def __init__(self, prompt: list[int], config: GenerationConfig, eos_ids: Sequence[int], max_length: int,
                 processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = ()):
        self.n, self.config, self.processors = config.num_beams, config, processors
        self.eos = list(dict.fromkeys(eos_ids))
        self.prompt, self.plen = prompt, len(prompt)
        self.limit = min(max_length, self.plen + config.max_new_tokens)  # prompt + generated tokens
        # Keep enough candidates that n of them are still running even if the best ones all end on an EOS.
        self.keep = max(2, 1 + len(self.eos)) * self.n
        self.running: list[list[int]] = [[] for _ in range(self.n)]  # each running beam's generated tokens
        # The beams start identical: only the first one is live, or all n would pick the same tokens.
        self.run_scores = torch.full((self.n,), NEG)
        self.run_scores[0] = 0.0
        self.done_scores = torch.full((self.n,), NEG)  # the n best finished hypotheses, best first
        self.done: list[list[int] | None] = [None] * self.n  # their tokens; None: a placeholder, not finished
        self.over = self.limit <= self.plen

    def advance(self, logits: torch.Tensor) -> list[int] | None:
        """Score a step from the running beams' logits [n, V]; each next beam's source beam, or None when done."""
        n, lp, early = self.n, self.config.length_penalty, self.config.early_stopping
        device = logits.device
        run_scores = self.run_scores.to(device)
        gen = len(self.running[0])  # tokens generated so far, the same for every running beam
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if self.processors:
            ids = torch.tensor([self.prompt + t for t in self.running], device=device)
            for proc in self.processors:
                log_probs = proc(ids, log_probs)
        vocab = log_probs.shape[-1]
        cand_scores, flat = torch.topk((log_probs + run_scores[:, None]).reshape(-1), self.keep)
        src, tok = (flat // vocab).tolist(), (flat % vocab).tolist()
        at_limit = self.plen + gen + 1 >= self.limit
        stops = torch.tensor([at_limit or t in self.eos for t in tok], device=device)

        # The next running beams: the best n candidates that did not stop.
        masked = cand_scores + stops.float() * NEG
        nxt = torch.topk(masked, n).indices.tolist()
        run_scores = masked[nxt]

        # Candidates that stopped among the best n become hypotheses, with the length penalty.
        # (transformers' extra masks for "batch full" and "no improvement" never fire for a single sequence:
        # either would have ended the loop a step earlier.)
        ended = stops & (torch.arange(self.keep, device=device) < n)
        penalised = cand_scores / ((gen + 1) ** lp) + (~ended).float() * NEG
        merged = torch.cat((self.done_scores.to(device), penalised))
        best = torch.topk(merged, n).indices.tolist()
        self.done_scores = merged[best]
        pool = self.done + [self.running[s] + [t] if e else None for s, t, e in zip(src, tok, ended.tolist())]
        self.done = [pool[i] for i in best]

        gen += 1
        all_done = all(d is not None for d in self.done)
        # Can a running beam still beat the worst hypothesis? transformers' heuristic, per early_stopping.
        best_len = self.limit - self.plen if early == "never" and lp > 0.0 else gen
        is_done = torch.tensor([d is not None for d in self.done], device=device)
        worst = torch.where(is_done, self.done_scores.min(), NEG)
        improvable = bool((run_scores[0] / (best_len ** lp) > worst).any())
        if not improvable or (all_done and early is True) or bool(stops.all()):
            self.over = True
            return None
        self.run_scores = run_scores
        sources = [src[i] for i in nxt]
        self.running = [self.running[s] + [tok[i]] for s, i in zip(sources, nxt)]
        return sources

    def results(self) -> list[Beam]:
        """The num_return_sequences best hypotheses, best first."""
        if self.limit <= self.plen:
            return [Beam([], 0.0, "length") for _ in range(self.config.num_return_sequences)]
        eos_set = set(self.eos)
        k = self.config.num_return_sequences
        return [Beam(t, float(s), "stop" if t and t[-1] in eos_set else "length")
                for t, s in zip(self.done[:k], self.done_scores.tolist())]
