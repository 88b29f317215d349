"""Generation over the slot cache: stopping, streaming, seeds across batches, slot reuse."""

from __future__ import annotations

import pytest
import torch

from lmgen.cache import KVCache, Span
from lmgen.core import EngineCore, Generate
from lmgen.generate import Continuation
from lmgen.lm import LM
from lmgen.params import GenerationConfig

from .conftest import SEED_IDS, SEED_PROMPT


def test_stream_pieces_equal_the_generated_text(tiny_gpt2):
    pieces = list(tiny_gpt2.stream(SEED_PROMPT, max_new_tokens=20))
    assert "".join(pieces) == tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=20)[0].text
    assert all(pieces) and all("\ufffd" not in p for p in pieces if "\ufffd" not in "".join(pieces))


def test_eos_stops_the_sequence(tiny_gpt2):
    free = tiny_gpt2.generate(SEED_IDS, max_new_tokens=6)[0].token_ids
    eos = free[2]
    lm = LM(tiny_gpt2.model, tiny_gpt2.tokenizer, eos_token_ids=(eos,))
    out = lm.generate(SEED_IDS, max_new_tokens=6)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[: free.index(eos) + 1]
    assert out.text == tiny_gpt2.tokenizer.decode(free[: free.index(eos)])
    assert "".join(lm.stream(SEED_IDS, max_new_tokens=6)) == out.text


def test_zero_new_tokens(tiny_gpt2):
    out = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=0)[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"


def test_generation_stops_at_the_context_length(tiny_gpt2):
    out = tiny_gpt2.generate([464] * 250, max_new_tokens=20)[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_greedy_return_sequences_share_one_prefill_and_agree(tiny_gpt2):
    outs = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=10, num_return_sequences=3)
    assert len(outs) == 3 and outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_list_of_prompts_in_order(tiny_gpt2):
    outs = tiny_gpt2.generate(["Hello", SEED_PROMPT], max_new_tokens=5, num_return_sequences=2)
    assert [o.prompt_token_ids for o in outs] == [tiny_gpt2.tokenizer.encode("Hello")] * 2 + [SEED_IDS] * 2


def run_to_the_end(model, cache, seqs, max_length=64):
    """Each continuation as its own request on one core, all at once."""
    core = EngineCore(model, cache)
    for s in seqs:
        core.add(Generate(s.prompt, [s], max_length))
    while core.has_work():
        core.step()


def run_alone_and_batched(lm, seqs_factory, index):
    cache = KVCache.for_model(lm.model, n_slots=8, max_len=64)
    alone = seqs_factory()[index]
    run_to_the_end(lm.model, cache, [alone])
    batch = seqs_factory()
    run_to_the_end(lm.model, cache, batch)
    assert cache.free_slots == 8
    return alone, batch[index]


def test_seeded_sequence_gives_the_same_tokens_alone_and_batched_with_seven_others(tiny_gpt2):
    def factory():
        seqs = []
        for i in range(8):
            cfg = GenerationConfig(max_new_tokens=10 + 3 * i, do_sample=i != 5, temperature=0.7 + 0.1 * i,
                                   top_k=[None, 50][i % 2], top_p=[None, 0.9][i % 3 == 0])
            prompt = tiny_gpt2.encode(["Once upon a time", SEED_PROMPT, "A"][i % 3] + " x" * i)
            seqs.append(Continuation(prompt, cfg, torch.Generator().manual_seed(100 + i), tiny_gpt2.eos_token_ids))
        return seqs

    for index in (0, 3, 7):
        alone, batched = run_alone_and_batched(tiny_gpt2, factory, index)
        assert alone.tokens == batched.tokens and len(alone.tokens) == 10 + 3 * index


def test_stopping_a_stream_early_frees_its_slot(tiny_gpt2):
    stream = tiny_gpt2.stream(SEED_PROMPT, max_new_tokens=50)
    next(stream)
    stream.close()
    cache = tiny_gpt2._core.cache
    assert cache.free_slots == cache.n_slots


def test_cache_slots_allocate_release_and_reuse():
    cache = KVCache(n_layers=1, n_slots=2, max_len=8, n_kv_heads=1, head_dim=4)
    a, b = cache.allocate(), cache.allocate()
    assert {a, b} == {0, 1} and cache.free_slots == 0
    with pytest.raises(RuntimeError, match="all 2 KV cache slots are in use"):
        cache.allocate()
    cache.release(a)
    assert cache.allocate() == a
    with pytest.raises(ValueError, match="not allocated"):
        cache.release(5)


def test_a_position_beyond_the_cache_is_an_error_naming_it():
    cache = KVCache(n_layers=1, n_slots=2, max_len=8, n_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="position 8 is beyond the cache length 8"):
        cache.plan([Span(0, 1, 0, 3), Span(1, 1, 1, 8)])
    assert cache.plan([Span(0, 1, 0, 3), Span(1, 1, 1, 7)]).kv_len == 8


def test_a_freed_slot_is_reused_without_leaking_old_keys(tiny_gpt2):
    # Fill slot 0 with a long sequence, free it, then run a short one there: same tokens as in a fresh cache.
    cache = KVCache.for_model(tiny_gpt2.model, n_slots=1, max_len=64)
    cfg = GenerationConfig(max_new_tokens=8)
    long, short = Continuation([464] * 40, cfg), Continuation(list(SEED_IDS), cfg)
    for seq in (long, short):
        run_to_the_end(tiny_gpt2.model, cache, [seq])
    assert short.tokens == tiny_gpt2.generate(SEED_IDS, max_new_tokens=8)[0].token_ids
