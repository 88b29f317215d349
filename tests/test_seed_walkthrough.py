"""Every step of the seed notebook, through lmgen's API, on a tiny random GPT-2 with the real GPT-2 tokenizer."""

from __future__ import annotations

import bisect
import itertools

import torch

import lmgen

from .conftest import SEED_IDS, SEED_PROMPT

GREEDY_EXAMPLE = [464, 2068, 7586, 21831, 11687, 625, 262, 13990, 290, 4966, 625, 262, 13990, 13]


def test_tokenizer_reproduces_the_notebook():
    tok = lmgen.load_tokenizer("gpt2")
    assert tok.encode(SEED_PROMPT) == SEED_IDS
    assert tok.decode(SEED_IDS) == SEED_PROMPT
    assert tok.decode(GREEDY_EXAMPLE) == "The quick brown fox jumped over the fence and ran over the fence."
    assert tok.decode([262]) == " the" and tok.token_text(262) == " the"
    assert tok.decode([1353]) == " top"
    assert lmgen.load_tokenizer("distilgpt2").encode(SEED_PROMPT) == SEED_IDS


def test_next_token_distribution_and_argmax(tiny_gpt2):
    probs = tiny_gpt2.next_token_probs(SEED_PROMPT)
    assert probs.shape == (50257,)
    assert abs(float(probs.sum()) - 1) < 1e-5 and float(probs.min()) >= 0
    assert torch.equal(probs, tiny_gpt2.next_token_probs(SEED_IDS))
    top = tiny_gpt2.top_tokens(SEED_PROMPT, k=5)
    assert top[0].token_id == int(probs.argmax())
    assert top[0].token_text == tiny_gpt2.tokenizer.decode([top[0].token_id])
    assert [t.probability for t in top] == sorted((t.probability for t in top), reverse=True)
    assert abs(top[0].probability - float(probs.max())) < 1e-7


def notebook_greedy(lm, ids, n=8):
    """The notebook's loop: re-run the whole sequence each step and take the argmax."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(lm.next_token_probs(ids).argmax()))
    return ids


def test_greedy_loop_of_eight_matches_the_notebook_loop(tiny_gpt2):
    out = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=8)[0]
    assert SEED_IDS + out.token_ids == notebook_greedy(tiny_gpt2, SEED_IDS)
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.text == tiny_gpt2.tokenizer.decode(out.token_ids)


def test_forcing_top_and_continuing(tiny_gpt2):
    forced = SEED_IDS + [1353]
    out = tiny_gpt2.generate(forced, max_new_tokens=8)[0]
    assert forced + out.token_ids == notebook_greedy(tiny_gpt2, forced)
    assert tiny_gpt2.tokenizer.decode(forced) == SEED_PROMPT + " top"


def test_weighted_sampling_draws_like_the_notebook(tiny_gpt2):
    out = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, max_new_tokens=8, seed=7)[0]
    gen = torch.Generator().manual_seed(7)
    ids = list(SEED_IDS)
    for _ in range(8):  # random.choices(indices, weights=probs): bisect a uniform draw in the cumulative weights
        cum = list(itertools.accumulate(tiny_gpt2.next_token_probs(ids).double().tolist()))
        u = float(torch.rand((1,), generator=gen, dtype=torch.float64)) * cum[-1]
        ids.append(bisect.bisect(cum, u))
    assert SEED_IDS + out.token_ids == ids
    again = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, max_new_tokens=8, seed=7)[0]
    assert again.token_ids == out.token_ids
    other = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, max_new_tokens=8, seed=8)[0]
    assert other.token_ids != out.token_ids


def test_unweighted_sampling_is_uniform_over_the_vocabulary(tiny_gpt2):
    out = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, weighted=False, max_new_tokens=8, seed=3)[0]
    gen = torch.Generator().manual_seed(3)
    assert out.token_ids == [int(torch.randint(50257, (1,), generator=gen)) for _ in range(8)]
    many = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, weighted=False, max_new_tokens=50,
                              num_return_sequences=4, seed=0)
    ids = torch.tensor([t for g in many for t in g.token_ids]).float()
    assert len(ids) == 200 and abs(float(ids.mean()) - 25128) < 4000  # uniform mean and spread
    assert float(ids.std()) > 12000


def test_pipeline_thirty_tokens_five_sequences(tiny_gpt2):
    generator = lmgen.pipeline("text-generation", model=tiny_gpt2)
    out = generator(SEED_PROMPT, max_new_tokens=30, num_return_sequences=5, seed=1)
    assert len(out) == 5 and all(set(d) == {"generated_text"} for d in out)
    assert all(d["generated_text"].startswith(SEED_PROMPT) for d in out)
    assert len({d["generated_text"] for d in out}) > 1  # sampled, so they differ
    gens = tiny_gpt2.generate(SEED_PROMPT, do_sample=True, max_new_tokens=30, num_return_sequences=5, seed=1)
    assert [d["generated_text"] for d in out] == [SEED_PROMPT + g.text for g in gens]
    assert all(len(g.token_ids) == 30 or g.finish_reason == "stop" for g in gens)
