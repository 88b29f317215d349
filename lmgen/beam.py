"""Beam search over the slot cache, scored step for step as transformers' `_beam_search` (one sequence)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache
from .generate import prefill
from .params import GenerationConfig

NEG = -1.0e9  # transformers' "impossible" score: finite, so the sums, topk order and ties come out as there


@dataclass
class Beam:
    """A finished beam-search hypothesis."""

    tokens: list[int]  # generated tokens only (after the prompt), including a final EOS if it ended on one
    score: float  # transformers' sequence score: sum of log-probs / generated_length ** length_penalty
    finish_reason: str  # "stop" (ended on EOS) or "length"


def beam_search(model, cache: KVCache, prompt: list[int], config: GenerationConfig,
                eos_ids: Sequence[int], max_length: int,
                processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = ()) -> list[Beam]:
    """Beam search over the slot cache; returns config.num_return_sequences beams, best first."""
    n, lp, early = config.num_beams, config.length_penalty, config.early_stopping
    eos = list(dict.fromkeys(eos_ids))
    plen = len(prompt)
    limit = min(max_length, plen + config.max_new_tokens)  # prompt + generated tokens
    if limit <= plen:
        return [Beam([], 0.0, "length") for _ in range(config.num_return_sequences)]
    device = cache.k.device
    # Keep enough candidates that n of them are still running even if the best ones all end on an EOS.
    keep = max(2, 1 + len(eos)) * n
    slots: list[int] = []
    try:
        for _ in range(n):
            slots.append(cache.allocate())
        logits = prefill(model, cache, [prompt], slots[:1]).expand(n, -1)
        for s in slots[1:]:
            cache.copy_prefix(slots[0], s, plen)
        running: list[list[int]] = [[] for _ in range(n)]  # each running beam's generated tokens
        # The beams start identical: only the first one is live, or all n would pick the same tokens.
        run_scores = torch.full((n,), NEG, device=device)
        run_scores[0] = 0.0
        done_scores = torch.full((n,), NEG, device=device)  # the n best finished hypotheses, best first
        done: list[list[int] | None] = [None] * n  # their tokens; None: a placeholder, not finished
        while True:
            gen = len(running[0])  # tokens generated so far, the same for every running beam
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if processors:
                ids = torch.tensor([prompt + t for t in running], device=device)
                for proc in processors:
                    log_probs = proc(ids, log_probs)
            vocab = log_probs.shape[-1]
            cand_scores, flat = torch.topk((log_probs + run_scores[:, None]).reshape(-1), keep)
            src, tok = (flat // vocab).tolist(), (flat % vocab).tolist()
            at_limit = plen + gen + 1 >= limit
            stops = torch.tensor([at_limit or t in eos for t in tok], device=device)

            # The next running beams: the best n candidates that did not stop.
            masked = cand_scores + stops.float() * NEG
            nxt = torch.topk(masked, n).indices.tolist()
            run_scores = masked[nxt]

            # Candidates that stopped among the best n become hypotheses, with the length penalty.
            # (transformers' extra masks for "batch full" and "no improvement" never fire for a single sequence:
            # either would have ended the loop a step earlier.)
            ended = stops & (torch.arange(keep, device=device) < n)
            penalised = cand_scores / ((gen + 1) ** lp) + (~ended).float() * NEG
            merged = torch.cat((done_scores, penalised))
            best = torch.topk(merged, n).indices.tolist()
            done_scores = merged[best]
            pool = done + [running[s] + [t] if e else None for s, t, e in zip(src, tok, ended.tolist())]
            done = [pool[i] for i in best]

            gen += 1
            all_done = all(d is not None for d in done)
            # Can a running beam still beat the worst hypothesis? transformers' heuristic, per early_stopping.
            best_len = limit - plen if early == "never" and lp > 0.0 else gen
            is_done = torch.tensor([d is not None for d in done], device=device)
            worst = torch.where(is_done, done_scores.min(), NEG)
            improvable = bool((run_scores[0] / (best_len ** lp) > worst).any())
            if not improvable or (all_done and early is True) or bool(stops.all()):
                break

            sources = [src[i] for i in nxt]
            running = [running[s] + [tok[i]] for s, i in zip(sources, nxt)]
            # Beams that changed parent take a copy of its cache rows (all but the newest token, fed next).
            moved = [i for i, s in enumerate(sources) if s != i]
            if moved:
                cache.reorder([slots[i] for i in moved], [slots[sources[i]] for i in moved], plen + gen - 1)
            tokens = torch.tensor([[t[-1]] for t in running], device=device)
            positions = torch.full((n, 1), plen + gen - 1)  # on the CPU: the cache builds its indices there
            logits = model(tokens, positions, cache, slots)[:, -1]
    finally:
        for s in slots:
            cache.release(s)
    eos_set = set(eos)
    return [Beam(t, float(s), "stop" if t and t[-1] in eos_set else "length")
            for t, s in zip(done[:config.num_return_sequences], done_scores.tolist())]
