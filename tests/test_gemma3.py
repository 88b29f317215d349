"""Gemma 3 beyond test_parity.py's checks: the sliding window really cuts, prompt pieces that start past a window's
start, the fixed-shape (compiled) step's masked window, bfloat16 embeddings scaled as transformers scales them,
configs lmgen refuses (naming the file), and a multimodal checkpoint's language model."""

from __future__ import annotations

import json

import pytest
import torch

import lmgen
from lmgen.cache import KVCache, Span, causal_step

from .conftest import make_tiny_gemma3

transformers = pytest.importorskip("transformers")


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


def reference_logits(folder, ids, dtype=torch.float32) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


def test_the_window_cuts_the_sequences_the_tests_use(tiny_gemma3_dir, tmp_path):
    # the same weights with a window longer than the sequence: equal logits up to the window, different past it
    cfg = json.loads((tiny_gemma3_dir / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in tiny_gemma3_dir.iterdir():
        (wide / f.name).write_bytes(f.read_bytes())
    (wide / "config.json").write_text(json.dumps(dict(cfg, sliding_window=1000)))
    ids = prompt_ids(20)
    cut, whole = lmgen.load(tiny_gemma3_dir).logits(ids), lmgen.load(wide).logits(ids)
    torch.testing.assert_close(cut[:8], whole[:8])
    assert (cut[8:] - whole[8:]).abs().amax(-1).min() > 1e-2


def test_prompt_pieces_past_the_window_start_match_transformers(tiny_gemma3_dir):
    # a second piece at positions 10..23: its keys start at 3, its queries' windows each cut them further
    lm, ids = lmgen.load(tiny_gemma3_dir), prompt_ids(30, 2)
    expected = reference_logits(tiny_gemma3_dir, ids)
    cache = KVCache.for_model(lm.model, n_slots=2, max_len=32)
    with torch.inference_mode():
        for first, end in [(0, 10), (10, 24)]:
            step = cache.plan([Span(0, end - first, 1, first)])
            got = lm.model(torch.tensor([ids[first:end]]), step, cache)
            torch.testing.assert_close(got, expected[first:end], atol=1e-4, rtol=1e-4)
        # a piece and lone tokens in one step, as continuous batching mixes them
        step = cache.plan([Span(0, 4, 1, 24), Span(4, 1, 0, 0)])
        got = lm.model(torch.tensor([ids[24:28] + [ids[0]]]), step, cache)
        torch.testing.assert_close(got[:4], expected[24:28], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[4], expected[0], atol=1e-4, rtol=1e-4)


def test_the_fixed_shape_step_masks_the_window(tiny_gemma3_dir):
    # what a compiled decode step runs: every position of the cache behind a mask, here with the window's cut
    lm, ids = lmgen.load(tiny_gemma3_dir), prompt_ids(20, 3)
    expected = reference_logits(tiny_gemma3_dir, ids)
    for kernel in (False, True):
        cache = KVCache.for_model(lm.model, n_slots=2, max_len=32)
        cache.decode_kernel = kernel and cache.decode_kernel
        with torch.inference_mode():
            lm.model(torch.tensor([ids[:12]]), cache.plan([Span(0, 12, 1, 0)]), cache)
            for pos in range(12, 20):
                step = cache.single_step(1, torch.tensor([[pos]]))
                assert step.kernel == cache.decode_kernel
                got = lm.model(torch.tensor([[ids[pos]]]), step, cache)[0]
                torch.testing.assert_close(got, expected[pos], atol=1e-4, rtol=1e-4)


def test_bfloat16_embeddings_are_scaled_by_the_rounded_factor(tmp_path):
    # sqrt(80) is 8.94...: transformers multiplies bfloat16 embeddings by it rounded to bfloat16 (8.9375)
    folder = make_tiny_gemma3(tmp_path / "g", hidden_size=80)
    lm = lmgen.load(folder, dtype="bfloat16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt_ids(12, 4)])
    with torch.no_grad():
        want = ref.model.embed_tokens(ids)
        got = lm.model.embed(ids, causal_step(12, "cpu"))[0]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        logits, expected = lm.logits(ids[0].tolist()), ref(ids).logits[0]
    torch.testing.assert_close(logits.float(), expected.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("key,value,match", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping is not supported"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention is not supported"),
    ("hidden_activation", "swish2", "hidden_activation 'swish2' is not supported"),
])
def test_unsupported_configs_are_refused_naming_the_file(key, value, match, tiny_gemma3_dir, tmp_path):
    cfg = json.loads((tiny_gemma3_dir / "config.json").read_text())
    with pytest.raises(lmgen.UnsupportedModelError, match=match) as e:
        lmgen.models.gemma3.Config.from_hf(dict(cfg, **{key: value}), path=tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value)


def test_layer_types_that_do_not_fit_name_the_key(tiny_gemma3_dir):
    cfg = json.loads((tiny_gemma3_dir / "config.json").read_text())
    for bad in (["sliding_attention"] * 2, ["sliding_attention", "chunked_attention", "full_attention"]):
        with pytest.raises(lmgen.errors.ConfigError, match="'layer_types' must be 3 of"):
            lmgen.models.gemma3.Config.from_hf(dict(cfg, layer_types=bad), path="config.json")


def test_a_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (model_type gemma3: 4B and up) loads its language model alone, equal
    to transformers' on text; its config.json's text_config lists only what differs from transformers' defaults,
    as the Hub's do (here the 4 key heads and the rotary bases are left to them)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from .conftest import save_random

    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=4)).eval()
    folder = save_random(model, tmp_path / "mm", vectors=(0, 0.3))
    path = folder / "config.json"
    cfg, defaults = json.loads(path.read_text()), Gemma3TextConfig().to_dict()
    cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k == "model_type" or defaults.get(k) != v}
    assert "num_key_value_heads" not in cfg["text_config"] and "rope_parameters" not in cfg["text_config"]
    path.write_text(json.dumps(cfg))

    lm = lmgen.load(folder)
    assert lm.config.num_key_value_heads == 4 and lm.config.rope_local_theta == 10000.0
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    ids = prompt_ids(16, 5)
    ref = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(lm.logits(ids), expected, atol=1e-4, rtol=1e-4)
