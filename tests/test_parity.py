"""Our models against transformers on tiny random GPT-2, Llama, Qwen2, Qwen3, Mistral and Gemma 3 folders: logits,
cached steps, greedy tokens."""

from __future__ import annotations

import pytest
import torch

import lmgen
from lmgen.cache import KVCache, Span

from .conftest import (
    make_tiny_gemma3,
    make_tiny_gpt2,
    make_tiny_llama,
    make_tiny_mistral,
    make_tiny_qwen2,
    make_tiny_qwen3,
)

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "gpt2-safetensors": lambda d: make_tiny_gpt2(d),
    "gpt2-bin": lambda d: make_tiny_gpt2(d, safetensors=False),
    "llama-safetensors": lambda d: make_tiny_llama(d),
    "llama-bin": lambda d: make_tiny_llama(d, safetensors=False),
    "llama-tied-llama3-rope": lambda d: make_tiny_llama(
        d, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": lambda d: make_tiny_qwen2(d),
    "qwen3": lambda d: make_tiny_qwen3(d),
    # a window of 6 positions, shorter than every test's sequence: prompts, cached steps and decoding all cut it
    "mistral-sliding-window": lambda d: make_tiny_mistral(d, sliding_window=6),
    # sliding (a window of 8, which every test's sequence outgrows) and full layers, each with its rotary base
    "gemma3": lambda d: make_tiny_gemma3(d),
    # the 4.x config.json the Hub ships (sliding_window_pattern, rope_local_base_freq, rope_scaling for the full
    # layers), a window of 5 and soft-capped logits
    "gemma3-legacy-config-softcap": lambda d: make_tiny_gemma3(
        d, legacy_config=True, sliding_window=5, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = VARIANTS[request.param](tmp_path_factory.mktemp(request.param))
    if request.param.endswith("-bin"):  # really the old format, read with weights_only=True
        assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return lmgen.load(folder), ref


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


def test_prompt_logits_match(pair):
    lm, ref = pair
    ids = prompt_ids(20, 1)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(lm.logits(ids), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm.next_token_logits(ids), expected[-1], atol=1e-4, rtol=1e-4)


def test_each_cached_step_matches(pair):
    lm, ref = pair
    ids = prompt_ids(24, 2)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    cache = KVCache.for_model(lm.model, n_slots=2, max_len=32)
    slot = 1  # not slot 0, so the slot index is really used
    with torch.inference_mode():
        first = lm.model(torch.tensor([ids[:8]]), cache.plan([Span(0, 8, slot, 0)]), cache)[-1]
        torch.testing.assert_close(first, expected[7], atol=1e-4, rtol=1e-4)
        for pos in range(8, len(ids)):
            step = lm.model(torch.tensor([[ids[pos]]]), cache.plan([Span(0, 1, slot, pos)]), cache)[0]
            torch.testing.assert_close(step, expected[pos], atol=1e-4, rtol=1e-4)


def test_greedy_32_tokens_identical(pair):
    lm, ref = pair
    ids = prompt_ids(10, 3)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = out[0, len(ids):].tolist()
    got = lm.generate(ids, max_new_tokens=32)[0]
    assert got.token_ids == expected
    assert len(expected) == 32 or expected[-1] in lm.eos_token_ids


def test_batch_of_different_lengths_matches_each_alone(pair):
    lm, _ = pair
    prompts = [prompt_ids(n, 10 + n) for n in (3, 17, 9, 30)]
    batched = lm.generate(prompts, max_new_tokens=16)
    alone = [lm.generate(p, max_new_tokens=16)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.prompt_token_ids for g in batched] == prompts


def test_sharded_safetensors_load(tmp_path):
    import transformers as tf

    folder = make_tiny_llama(tmp_path / "src")
    sharded = tmp_path / "sharded"
    tf.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for name in ("vocab.json", "merges.txt"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    ids = prompt_ids(12, 4)
    torch.testing.assert_close(lmgen.load(sharded).logits(ids), lmgen.load(folder).logits(ids))


def test_weights_are_assigned_not_copied(tiny_llama_dir):
    lm = lmgen.load(tiny_llama_dir)
    assert not any(p.is_meta for p in lm.model.parameters())
    assert not any(b.is_meta for b in lm.model.buffers())
