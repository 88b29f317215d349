"""Beam search: same hypotheses and sequence scores as transformers' beam search, over the slot cache."""

from __future__ import annotations

import pytest
import torch

import lmgen
from lmgen.beam import Beam
from lmgen.cache import KVCache
from lmgen.core import beam_search
from lmgen.params import GenerationConfig

from .conftest import SEED_IDS

transformers = pytest.importorskip("transformers")

OTHER_PROMPT = [23465, 38232, 14315, 33075, 9127]  # with four EOS tokens, the early_stopping modes disagree here
PAD = 1
MAX_NEW = 8


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    transformers.logging.set_verbosity_error()
    return lmgen.load(folder), transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def reference(ref, prompt, eos, **kw):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=eos,
                            pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **kw)


def ours(lm, prompt, eos, max_length=64, processors=(), n_slots=4, **kw) -> list[Beam]:
    cache = KVCache.for_model(lm.model, n_slots=n_slots, max_len=64)
    config = GenerationConfig(num_beams=4, max_new_tokens=MAX_NEW, **kw)
    with torch.inference_mode():
        beams = beam_search(lm.model, cache, prompt, config, eos, max_length, processors)
    assert cache.free_slots == cache.n_slots
    return beams


def assert_same(beams: list[Beam], out, prompt, eos, max_new=MAX_NEW):
    assert len(beams) == len(out.sequences)
    for beam, seq, score in zip(beams, out.sequences.tolist(), out.sequences_scores.tolist()):
        n = len(prompt) + len(beam.tokens)
        assert seq[:n] == prompt + beam.tokens and all(t == PAD for t in seq[n:])
        assert beam.score == pytest.approx(score, abs=1e-4)
        ended = bool(beam.tokens) and beam.tokens[-1] in eos
        assert beam.finish_reason == ("stop" if ended else "length")
        assert ended or len(beam.tokens) == max_new


def greedy(ref, prompt, n=3):
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def first_tokens(ref, prompt, k):
    """The k likeliest first tokens after the prompt."""
    with torch.no_grad():
        return ref(torch.tensor([prompt])).logits[0, -1].topk(k).indices.tolist()


def many_eos(ref, prompt):
    """Four EOS tokens that beams meet early: the 3rd greedy token and three strong first tokens."""
    top = first_tokens(ref, prompt, 6)
    return [greedy(ref, prompt)[2], top[1], top[2], top[5]]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_matches_transformers(models, early_stopping, length_penalty):
    lm, ref = models
    kw = dict(length_penalty=length_penalty, early_stopping=early_stopping)
    scenarios = [
        (SEED_IDS, [greedy(ref, SEED_IDS)[2]], 2),  # the 3rd greedy token as EOS: some beams end on it
        (OTHER_PROMPT, many_eos(ref, OTHER_PROMPT), 1),  # several EOS tokens: 3 * num_beams candidates a step
        (OTHER_PROMPT, many_eos(ref, OTHER_PROMPT), 2),
        # The 5 likeliest first tokens are EOS: 4 hypotheses at once, and fewer than num_beams non-EOS candidates
        # in the top 2 * num_beams; "never" with length_penalty > 0 must go on to max length.
        (OTHER_PROMPT, first_tokens(ref, OTHER_PROMPT, 5), 2),
        (SEED_IDS, [50256], 2),  # an EOS no beam reaches: all run to max_new_tokens
    ]
    for prompt, eos, nrs in scenarios:
        out = reference(ref, prompt, eos, num_beams=4, max_new_tokens=MAX_NEW, num_return_sequences=nrs, **kw)
        assert_same(ours(lm, prompt, eos, num_return_sequences=nrs, **kw), out, prompt, eos)


def test_scenarios_exercise_eos_and_early_stopping(models):
    lm, ref = models
    seed_eos = [greedy(ref, SEED_IDS)[2]]
    stops = [b.finish_reason for lp in (1.0, 0.0) for b in ours(lm, SEED_IDS, seed_eos, num_return_sequences=2,
                                                                  length_penalty=lp)]
    assert "stop" in stops and "length" in stops
    assert all(b.finish_reason == "length" for b in ours(lm, SEED_IDS, [50256], num_return_sequences=4))
    # The three early_stopping modes must not all agree, or the parity test would not tell them apart.
    eos = many_eos(ref, OTHER_PROMPT)
    results = [ours(lm, OTHER_PROMPT, eos, num_return_sequences=2, early_stopping=es) for es in (True, False, "never")]
    assert results[0] != results[1] or results[1] != results[2]


def test_max_length_caps_prompt_plus_generated(models):
    lm, ref = models
    eos, cap = many_eos(ref, OTHER_PROMPT), 5
    for early_stopping in (False, "never"):
        kw = dict(length_penalty=2.0, early_stopping=early_stopping, num_return_sequences=2)
        out = reference(ref, OTHER_PROMPT, eos, num_beams=4, max_new_tokens=cap, **kw)
        beams = ours(lm, OTHER_PROMPT, eos, max_length=len(OTHER_PROMPT) + cap, **kw)
        assert_same(beams, out, OTHER_PROMPT, eos, max_new=cap)


def test_repetition_penalty_processor(models):
    lm, ref = models

    def repetition_penalty(input_ids, scores):
        seen = scores.gather(1, input_ids)
        return scores.scatter(1, input_ids, torch.where(seen < 0, seen * 1.5, seen / 1.5))

    eos = [50256]
    # Extend the prompt with the start of its best beam: the model's favourite tokens, which it tends to repeat.
    prompt = SEED_IDS + ours(lm, SEED_IDS, eos)[0].tokens[:4]
    processors = transformers.LogitsProcessorList([transformers.RepetitionPenaltyLogitsProcessor(1.5)])
    out = reference(ref, prompt, eos, num_beams=4, max_new_tokens=MAX_NEW, num_return_sequences=2,
                    logits_processor=processors)
    beams = ours(lm, prompt, eos, processors=[repetition_penalty], num_return_sequences=2)
    assert_same(beams, out, prompt, eos)
    assert beams != ours(lm, prompt, eos, num_return_sequences=2)  # the penalty changed something


def test_prefills_once_then_one_batched_step_per_token(models):
    lm, _ = models
    calls = []

    def model(tokens, step, cache, rows):
        calls.append((tuple(tokens.shape), [s.first + s.count - 1 for s in step.spans]))
        return lm.model(tokens, step, cache, rows)

    cache = KVCache.for_model(lm.model, n_slots=4, max_len=64)
    with torch.inference_mode():
        beam_search(model, cache, SEED_IDS, GenerationConfig(num_beams=4, max_new_tokens=MAX_NEW), [50256], 64)
    p = len(SEED_IDS)
    assert calls == [((1, p), [p - 1])] + [((1, 4), [p + i] * 4) for i in range(MAX_NEW - 1)]


def test_slots_released_on_error(models):
    lm, _ = models
    cache = KVCache.for_model(lm.model, n_slots=6, max_len=64)
    other = cache.allocate()  # someone else's sequence: must stay allocated
    seen = []

    def failing(input_ids, scores):
        seen.append(input_ids.shape[1])
        if len(seen) == 3:
            raise RuntimeError("processor failed")
        return scores

    with torch.inference_mode(), pytest.raises(RuntimeError, match="processor failed"):
        beam_search(lm.model, cache, SEED_IDS, GenerationConfig(num_beams=4), [50256], 64, [failing])
    assert seen == [len(SEED_IDS) + i for i in range(3)]
    assert cache.free_slots == 5
    cache.release(other)
    assert cache.free_slots == cache.n_slots


def test_too_few_slots_raises_and_releases(models):
    lm, _ = models
    cache = KVCache.for_model(lm.model, n_slots=3, max_len=64)
    with pytest.raises(RuntimeError, match="slots are in use"):
        beam_search(lm.model, cache, SEED_IDS, GenerationConfig(num_beams=4), [50256], 64)
    assert cache.free_slots == 3


def test_nothing_to_generate(models):
    lm, _ = models
    beams = ours(lm, SEED_IDS, [50256], max_length=len(SEED_IDS), num_return_sequences=2)
    assert beams == [Beam([], 0.0, "length")] * 2
