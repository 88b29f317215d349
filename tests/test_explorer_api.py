"""The explorer's numbers: /v1/next_token's raw and processed distributions, /v1/score, and the Python twins they
come from (lm.distribution, lm.score), checked against the per-row reference processors and the model's logits."""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient

from lmgen import batch_sampler, sampling
from lmgen.engine import Engine
from lmgen.params import GenerationConfig, ParameterError
from lmgen.server.app import create_app

from .conftest import SEED_PROMPT

SETTINGS = [  # each alone, then together, as the page's controls send them
    dict(temperature=0.7), dict(top_k=3), dict(top_p=0.5), dict(min_p=0.1), dict(typical_p=0.5),
    dict(repetition_penalty=1.3), dict(temperature=1.5, top_k=10, top_p=0.8, min_p=0.02),
    dict(repetition_penalty=1.2, temperature=0.8, typical_p=0.9),
]


@pytest.fixture(scope="module")
def lm():
    import lmgen

    return lmgen.load()  # the default path, as `lmgen serve` runs it


@pytest.fixture(scope="module")
def client(lm):
    app = create_app(Engine(lm, max_concurrent=2))
    with TestClient(app) as c:  # runs the lifespan: the engine's thread starts and stops with it
        yield c


def reference(lm, prompt: str, **params) -> torch.Tensor:
    """The scores the per-row reference processors (transformers' order) leave for the next token."""
    config = GenerationConfig(do_sample=True, **params)
    ids = lm.encode(prompt)
    processors = sampling.build_processors(config, len(ids), lm.eos_token_ids)
    return sampling.apply_processors(processors, torch.tensor([ids]), lm.next_token_logits(ids)[None])[0]


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_processed_distribution_is_the_reference_processors(lm, params):
    d = lm.distribution(SEED_PROMPT, **params)
    scores = reference(lm, SEED_PROMPT, **params)
    assert torch.equal(d.removed_by >= 0, scores == float("-inf"))
    torch.testing.assert_close(d.processed, torch.softmax(scores.double(), -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d.raw, torch.softmax(lm.next_token_logits(SEED_PROMPT).double(), -1))
    assert d.candidates == int((scores > float("-inf")).sum())
    assert d.kept_mass == pytest.approx(float(d.raw[scores > float("-inf")].sum()))
    assert sum(d.removed.values()) == d.raw.numel() - d.candidates


def test_a_removed_token_names_the_first_stage_that_removed_it(lm):
    d = lm.distribution(SEED_PROMPT, top_k=5, top_p=0.6)
    order = torch.argsort(d.raw, descending=True)
    top5 = set(order[:5].tolist())
    reasons = {i: d.stages[r] if r >= 0 else None for i, r in enumerate(d.removed_by.tolist())}
    assert all(reasons[i] == "top_k" for i in order[5:].tolist())
    assert {i for i in top5 if reasons[i] == "top_p"} == {i for i in top5 if reasons[i] is not None}
    assert d.removed["top_k"] == d.raw.numel() - 5
    assert d.removed["top_p"] == 5 - d.candidates > 0  # the test's setting makes top_p remove some of the five


def test_greedy_keeps_the_most_likely_token(lm):
    d = lm.distribution(SEED_PROMPT, temperature=0.0)
    assert d.candidates == 1 and d.processed_entropy == 0.0
    assert int(d.processed.argmax()) == int(d.raw.argmax()) and float(d.processed.max()) == 1.0
    assert d.top(3)[1][3] == "greedy"


def test_sampled_tokens_are_only_the_candidates_left(lm):
    d = lm.distribution(SEED_PROMPT, top_k=3)
    left = set(torch.nonzero(d.removed_by < 0).flatten().tolist())
    drawn = {g.token_ids[0] for g in lm.generate([SEED_PROMPT] * 24, do_sample=True, top_k=3, max_new_tokens=1,
                                                 seed=5)}
    assert len(left) == 3 and drawn <= left and len(drawn) > 1


def test_next_token_endpoint_serves_the_distribution(client, lm):
    params = dict(temperature=1.3, top_p=0.95)
    body = client.post("/v1/next_token", json=dict(prompt=SEED_PROMPT, top_n=5, **params)).json()
    d = lm.distribution(SEED_PROMPT, **params)
    assert d.candidates > 5 and body["candidates"] == d.candidates  # a top_p that leaves more than top_n tokens
    for row, (i, p, q, why) in zip(body["tokens"], d.top(5), strict=True):
        assert (row["id"], row["removed_by"]) == (i, why)
        assert row["probability"] == pytest.approx(p, abs=1e-6)
        assert row["processed_probability"] == pytest.approx(q, abs=1e-6)
        assert row["text"] == lm.tokenizer.token_text(i)
    for name in ("kept_mass", "entropy", "processed_entropy"):
        assert body[name] == pytest.approx(getattr(d, name), abs=1e-6)
    assert body["stages"] == ["temperature", "top_p"] and body["removed"] == d.removed
    assert body["processed_entropy"] > body["entropy"] > 0  # temperature 1.3 flattens more than top_p 0.95 cuts


def test_next_token_without_parameters_is_the_models_softmax(client, lm):
    body = client.post("/v1/next_token", json=dict(prompt=SEED_PROMPT, top_n=3)).json()
    probs = lm.next_token_probs(SEED_PROMPT)
    assert [t["probability"] for t in body["tokens"]] == pytest.approx(torch.topk(probs, 3).values.tolist(), abs=1e-5)
    assert all(t["processed_probability"] == pytest.approx(t["probability"], abs=1e-6) for t in body["tokens"])
    assert body["candidates"] == lm.vocab_size and body["stages"] == [] and body["kept_mass"] == pytest.approx(1.0)


def test_score_endpoint_equals_lm_score(client, lm):
    text = "The quick brown fox jumped over the lazy dog."
    body = client.post("/v1/score", json=dict(prompt=text, top_n=4)).json()
    s = lm.score(text, top_n=4)
    assert body["token_ids"] == s.token_ids and body["text"] == text
    assert body["tokens"][0]["logprob"] is None and body["tokens"][0]["rank"] is None
    for row, entry in zip(body["tokens"][1:], s.tokens, strict=True):
        assert row["id"] == entry.token_id and row["rank"] == entry.rank
        assert row["logprob"] == pytest.approx(entry.logprob, abs=1e-4)
        assert row["entropy"] == pytest.approx(entry.entropy, abs=1e-4)
        assert [a["id"] for a in row["top"]] == [t for t, _ in entry.top]
        assert text[row["offset"]:].startswith(row["text"])
    assert body["perplexity"] == pytest.approx(s.perplexity, rel=1e-4)
    assert body["total_logprob"] == pytest.approx(s.total_logprob, abs=1e-3)


def test_score_ranks_and_entropies_are_over_the_whole_vocabulary():
    import lmgen

    lm = lmgen.load(dtype="float32")  # one forward path: the int4 kernels round activations by the rows they get
    text = "Paris is the capital of France"
    s = lm.score(text, top_n=2)
    logprobs = torch.log_softmax(lm.logits(text), -1)
    for step, entry in enumerate(s.tokens):
        row = logprobs[step]
        assert entry.rank == 1 + int((row > row[entry.token_id]).sum())
        assert entry.entropy == pytest.approx(-float((row.exp() * row).sum()), abs=1e-4)
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
    assert s.perplexity == pytest.approx(math.exp(-s.total_logprob / len(s.tokens)))


@pytest.mark.parametrize("path, body, param", [
    ("/v1/next_token", dict(prompt="Hi", top_p=0), "top_p"),
    ("/v1/next_token", dict(prompt="Hi", temperature=-1), "temperature"),
    ("/v1/next_token", dict(prompt="Hi", top_k=-2), "top_k"),
    ("/v1/next_token", dict(prompt="Hi", repetition_penalty=0), "repetition_penalty"),
    ("/v1/next_token", dict(prompt="word " * 3000), "prompt"),
    ("/v1/score", dict(prompt="word " * 3000), "prompt"),
    ("/v1/score", dict(prompt="Hi"), "prompt"),
    ("/v1/score", dict(prompt="Hello there", top_n=21), "top_n"),
    ("/v1/score", dict(token_ids=[1, 10**7]), "token_ids"),
])
def test_bad_values_are_400s_naming_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_completions_return_token_ids_and_reproduce_a_seeded_branch(client, lm):
    prefix = lm.encode(SEED_PROMPT) + [lm.tokenizer.encode(" top")[0]]
    params = dict(temperature=0.9, top_k=20, seed=11)
    body = client.post("/v1/completions", json=dict(prompt=prefix, max_tokens=8, logprobs=2,
                                                    return_tokens_as_token_ids=True, **params)).json()
    lp = body["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    assert ids == lm.generate(prefix, do_sample=True, max_new_tokens=8, **params)[0].token_ids
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)


def test_the_page_may_be_framed_only_by_the_origins_given(lm):
    assert "frame-ancestors 'none'" in TestClient(create_app(Engine(lm))).get("/").headers["content-security-policy"]
    app = create_app(Engine(lm), frame_ancestors=["http://localhost:8888"])
    csp = TestClient(app).get("/").headers["content-security-policy"]
    assert csp.endswith("frame-ancestors http://localhost:8888")


@pytest.mark.parametrize("top_n", [-1, 21, "5", None, 2.0])
def test_score_refuses_a_bad_top_n_naming_it(lm, top_n):
    with pytest.raises(ParameterError) as e:
        lm.score("The quick brown fox", top_n=top_n)
    assert e.value.field == "top_n" and "[0, 20]" in str(e.value)


def test_explain_refuses_processors_the_batched_pass_has_not(lm):
    with pytest.raises(ValueError, match="batched sampler"):
        lm.distribution(SEED_PROMPT, no_repeat_ngram_size=2)
    assert not batch_sampler.batched(GenerationConfig(do_sample=True, no_repeat_ngram_size=2))
