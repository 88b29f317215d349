"""The embedded SmolLM2-135M-Instruct GGUF against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from .conftest import SEED_PROMPT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(embedded_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        embedded_path.parent, gguf_file=embedded_path.name, dtype=torch.float32).eval()


def test_embedded_model_loads_from_its_gguf(smollm):
    c = smollm.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert smollm.tokenizer.bos_token_id == 1 and 2 in smollm.eos_token_ids
    assert smollm.tokenizer.chat_template and "<|im_start|>" in smollm.tokenizer.chat_template
    assert smollm.dtype == torch.float32


def test_next_token_logits_match_transformers(smollm, reference):
    ids = smollm.tokenizer.encode(SEED_PROMPT)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    got = smollm.next_token_logits(SEED_PROMPT)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    assert int(got.argmax()) == int(expected.argmax())


def test_float32_greedy_is_token_identical_for_128_tokens(smollm, reference):
    ids = smollm.tokenizer.encode(SEED_PROMPT)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=128, min_new_tokens=128, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ours = smollm.generate(SEED_PROMPT, max_new_tokens=128, min_new_tokens=128)[0]
    assert len(ours.token_ids) == 128
    assert ours.token_ids == out[0, len(ids):].tolist()


def test_stream_matches_generate_on_the_real_tokenizer(smollm):
    prompt = "Write three emoji and a Japanese word:"
    text = smollm.generate(prompt, max_new_tokens=24)[0].text
    assert "".join(smollm.stream(prompt, max_new_tokens=24)) == text
