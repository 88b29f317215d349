"""The engine core: the batched sampler against the per-row reference, chunked prefill under load, prefix reuse,
the server's echo logprobs and beam search on the core, and batch invariance on the default path."""

from __future__ import annotations

import pytest
import torch

import lmgen
from lmgen import batch_sampler
from lmgen.cache import BLOCK, KVCache
from lmgen.core import CHUNK, EngineCore, PromptScore
from lmgen.engine import Engine
from lmgen.generate import Continuation
from lmgen.params import GenerationConfig
from lmgen.sampling import InvalidScoresError

from .conftest import SEED_IDS, SEED_PROMPT, make_tiny_llama
from .test_server import API_KEY, Server

VOCAB = 50257
MIXED = [  # every sampler and penalty, greedy and sampled rows, rows the batched pass takes and rows it hands back
    dict(do_sample=True),
    dict(do_sample=True, temperature=0.7, top_k=40),
    dict(do_sample=True, top_p=0.8, logprobs=3),
    dict(do_sample=True, min_p=0.05, temperature=1.3, logprobs=0, logprobs_mode="processed"),
    dict(do_sample=True, typical_p=0.9),
    dict(do_sample=True, top_k=5, top_p=0.9, min_p=0.01, typical_p=0.95, temperature=0.9, logprobs=2),
    dict(repetition_penalty=1.3, logprobs=1),
    dict(do_sample=True, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=0.9),
    dict(do_sample=True, logit_bias={5: 3.0, 7: -100.0}, top_k=10),
    dict(logit_bias={11: 2.5}, frequency_penalty=1.0),
    dict(do_sample=True, epsilon_cutoff=3e-4),  # reference path
    dict(no_repeat_ngram_size=2, do_sample=True, top_p=0.9),  # reference path
    dict(do_sample=True, weighted=False, top_k=20),  # reference path
    dict(min_new_tokens=3, do_sample=True),  # reference path
]


def continuations():
    return [Continuation([1, 2, 3, 2], GenerationConfig(max_new_tokens=99, **kw),
                         torch.Generator().manual_seed(10 + i), eos_ids=[0]) for i, kw in enumerate(MIXED)]


def test_the_batched_sampler_equals_the_per_row_processors_in_tokens_and_logprobs():
    batched, reference = continuations(), continuations()
    assert sum(batch_sampler.batched(s.config) for s in batched) == 10  # both paths are exercised
    torch.manual_seed(0)
    for step in range(12):
        logits = torch.randn(len(MIXED), VOCAB) * 4
        chosen = batch_sampler.choose(batched, logits)
        for s, r, row, (token, logprob) in zip(batched, reference, logits, chosen):
            want_token, want_logprob = r.choose(row)
            assert token == want_token, (step, s.config)
            if want_logprob is None:
                assert logprob is None
            else:
                assert logprob.token_id == want_logprob.token_id
                assert logprob.logprob == pytest.approx(want_logprob.logprob, abs=1e-5)
                assert [t for t, _ in logprob.top] == [t for t, _ in want_logprob.top]
            s.accept(token, logprob, 10_000)
            r.accept(want_token, want_logprob, 10_000)
    assert [s.tokens for s in batched] == [r.tokens for r in reference]
    assert len({tuple(s.tokens) for s in batched}) > 10  # the rows really differ


def test_a_row_with_no_token_left_fails_alone():
    seqs = continuations()[:3]
    logits = torch.zeros(3, 50)
    logits[1, 3] = float("nan")
    out = batch_sampler.choose(seqs, logits)
    assert isinstance(out[1], InvalidScoresError) and "NaN" in str(out[1])
    assert all(isinstance(o, tuple) for o in (out[0], out[2]))


@pytest.mark.parametrize("vocab", [262_144, 262_208, 151_936, VOCAB])  # chunked by 1024, 64, 128; not chunked
def test_row_max_is_torch_max_first_best_and_nan(vocab):
    torch.manual_seed(vocab)
    rows = torch.randint(-3, 4, (4, vocab)).float()  # many ties: the first best counts
    rows[1, [vocab - 1, 7, vocab // 2]] = float("nan")  # NaN is the best, as argmax takes it
    rows[2] = float("-inf")
    rows[3, [vocab - 5, 9]] = float("inf")
    best, at = batch_sampler.row_max(rows)
    want_best, want_at = torch.max(rows, -1)
    assert torch.equal(at, rows.argmax(-1)) and torch.equal(at, want_at)
    assert torch.equal(best.nan_to_num(0.0), want_best.nan_to_num(0.0)) and best[1].isnan()


def test_all_greedy_rows_take_the_references_tokens_without_touching_the_logits():
    configs = [dict(), dict(logprobs=2), dict(logprobs=0, logprobs_mode="processed")]
    seqs = [Continuation([1, 2], GenerationConfig(max_new_tokens=9, **kw)) for kw in configs]
    torch.manual_seed(1)
    logits = torch.randint(-20, 20, (3, 262_144)).float() / 4  # ties at the top
    before = logits.clone()
    out = batch_sampler.choose(seqs, logits)
    assert torch.equal(logits, before)
    for s, row, (token, logprob) in zip(seqs, logits, out):
        want_token, want_logprob = s.choose(row)
        assert token == want_token == row.argmax().item()
        assert (logprob is None) == (want_logprob is None)
        if logprob is not None:
            assert logprob.logprob == pytest.approx(want_logprob.logprob, abs=1e-6)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    return lmgen.load(make_tiny_llama(tmp_path_factory.mktemp("long-llama"), max_position_embeddings=4096))


def test_running_sequences_keep_decoding_while_a_long_prompt_is_prefilled(long_llama):
    lm = long_llama
    core = EngineCore(lm.model, KVCache.for_model(lm.model, 5, 4096))
    config = GenerationConfig(max_new_tokens=120, ignore_eos=True)
    runners = [lm.work(SEED_IDS + [i], config, 4096) for i in range(4)]
    for w in runners:
        core.add(w)
    for _ in range(3):
        core.step()
    long = lm.work(list(range(100, 2100)), GenerationConfig(max_new_tokens=2, ignore_eos=True), 4096)
    core.add(long)
    prefill_steps = 0
    while not long.seqs[0].tokens:
        events = core.step()
        got = {id(w) for w, e in events if e.token_id is not None}
        assert all(id(w) in got for w in runners)  # every running sequence got a token in this step
        prefill_steps += 1
    assert prefill_steps >= 2000 // CHUNK  # the prompt went in over many steps, not one
    alone = lm.generate(list(range(100, 2100)), max_new_tokens=2, ignore_eos=True)[0].token_ids
    assert long.seqs[0].tokens == alone[:1]
    for w, i in zip(runners, range(4)):  # and the runners' tokens are what they are alone
        while not w.finished:
            core.step()
        assert w.seqs[0].tokens == lm.generate(SEED_IDS + [i], config)[0].token_ids


def first_logprobs(lm, core, prompt):
    work = lm.work(prompt, GenerationConfig(max_new_tokens=1, logprobs=20), 4096)
    core.add(work)
    while not work.finished:
        core.step()
    return work, work.seqs[0].logprobs[0]


def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_run_and_a_freed_slot_is_reused(long_llama):
    lm = long_llama
    prompt = list(range(300, 300 + 5 * BLOCK + 3))
    cold_core = EngineCore(lm.model, KVCache.for_model(lm.model, 2, 4096))
    _, cold = first_logprobs(lm, cold_core, prompt + [9])
    core = EngineCore(lm.model, KVCache.for_model(lm.model, 2, 4096))
    first_logprobs(lm, core, prompt)
    index = core.cache.prefix
    held = [i for i, t in enumerate(index.tokens) if t]
    assert (index.queries, index.hits) == (1, 0) and len(held) == 1  # the finished request's slot keeps its keys
    again, hot = first_logprobs(lm, core, prompt + [9])
    assert (index.hits, index.hit_tokens) == (1, 5 * BLOCK)
    assert again.prompt_hit == 5 * BLOCK
    assert [i for i, t in enumerate(index.tokens) if t] == held  # the freed slot was taken back: no copy
    assert hot.token_id == cold.token_id
    assert hot.logprob == pytest.approx(cold.logprob, abs=1e-5)
    for (t1, v1), (t2, v2) in zip(hot.top, cold.top):
        assert t1 == t2 and v1 == pytest.approx(v2, abs=1e-5)
    # two unrelated requests need both slots: the cached one is evicted and reused
    a, b = (lm.work(list(range(1000 + 50 * i, 1040 + 50 * i)), GenerationConfig(max_new_tokens=2), 4096)
            for i in range(2))
    core.add(a)
    core.add(b)
    while core.has_work():
        core.step()
    assert {a.tracks[0].slot, b.tracks[0].slot} == {-1}
    assert core.cache.prefix.lookup(prompt + [9]) == (set(), 0)


def test_prompt_scoring_through_the_core_matches_one_whole_forward(long_llama):
    lm = long_llama
    ids = list(range(500, 500 + 3 * CHUNK + 5))  # several pieces
    work = PromptScore(ids, top_n=2)
    core = EngineCore(lm.model, KVCache.for_model(lm.model, 1, 4096))
    core.add(work)
    while core.has_work():
        core.step()
    whole = torch.log_softmax(lm.logits(ids), dim=-1)
    want = [float(whole[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert work.logprobs[0] is None
    assert [lp.logprob for lp in work.logprobs[1:]] == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    s = Server(tmp_path_factory.mktemp("core-server"), "--model", str(tiny_llama_dir), "--max-model-len", "128",
               api_key=API_KEY)
    yield s
    s.stop()


def test_server_echo_logprobs_equal_prompt_logprobs(server, tiny_llama_dir):
    lm = lmgen.load(tiny_llama_dir)
    r = server.post("/v1/completions", json={"prompt": SEED_PROMPT, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]
    want = lm.prompt_logprobs(SEED_PROMPT, 2)
    assert got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx([w.logprob for w in want[1:]], abs=1e-4)


def test_server_beam_search_equals_generate_with_num_beams(server, tiny_llama_dir):
    lm = lmgen.load(tiny_llama_dir)
    body = {"prompt": SEED_PROMPT, "use_beam_search": True, "n": 2, "best_of": 4, "max_tokens": 8}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    want = lm.generate(SEED_PROMPT, num_beams=4, num_return_sequences=2, max_new_tokens=8)
    assert [c["text"] for c in r.json()["choices"]] == [g.text for g in want]
    assert r.json()["usage"]["completion_tokens"] == sum(len(g.token_ids) for g in want)
    bad = server.post("/v1/completions", json=dict(body, best_of=1))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of"


def test_a_seeded_request_is_batch_invariant_on_the_default_path(smollm):
    lm = lmgen.load()  # the default: the file's Q4_1 blocks through the int4 kernels
    assert lm.weights.startswith("int4")
    prompts = [SEED_PROMPT, "Once upon a time", "def fibonacci(n):", "The capital of France is"]
    configs = [dict(do_sample=True, seed=7, top_p=0.9), dict(seed=3, do_sample=True, temperature=0.8),
               dict(), dict(do_sample=True, seed=1, top_k=30)]
    alone = [lm.generate(p, max_new_tokens=24, ignore_eos=True, **c)[0].token_ids for p, c in zip(prompts, configs)]
    engine = Engine(lm, max_concurrent=4, max_model_len=512)
    engine.start()
    try:
        long = engine.submit(lm.encode(SEED_PROMPT * 30), GenerationConfig(max_new_tokens=24, ignore_eos=True))
        requests = [engine.submit(lm.encode(p), GenerationConfig(max_new_tokens=24, ignore_eos=True, **c))
                    for p, c in zip(prompts[:3], configs[:3])]
        first = next(iter(requests[0].events()))  # the last one joins a running batch
        assert first.token_id is not None
        requests.append(engine.submit(lm.encode(prompts[3]), GenerationConfig(max_new_tokens=24, ignore_eos=True,
                                                                              **configs[3])))
        got = []
        for r in requests:
            gens = [e.generation for e in r.events() if e.generation is not None]
            got.append(gens[0].token_ids)
        list(long.events())
    finally:
        engine.stop()
    assert got == alone
    assert engine.stats()["batched_steps"] > 0


def test_metrics_count_prefix_cache_queries_and_hits(server):
    prompt = " ".join(["lantern"] * 40)
    for _ in range(2):
        assert server.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
    metrics = server.metrics()
    assert metrics["lmgen_prefix_hits_total"] >= 1
    assert metrics["lmgen_prefix_queries_total"] >= 2 and metrics["lmgen_prefix_hit_tokens_total"] >= 16


@pytest.mark.parametrize("body, param, message", [
    ({"use_beam_search": True, "n": 2, "best_of": 4, "logprobs": 1}, "logprobs",
     "logprobs are not returned with use_beam_search"),
    ({"n": 2, "best_of": 3}, "best_of", "best_of must equal n (or be left out) without use_beam_search, got 3"),
    ({"use_beam_search": True, "n": 3, "best_of": 2}, "best_of",
     "best_of must be at least n (3) with use_beam_search, got 2"),
])
def test_beam_search_requests_the_server_refuses_name_their_field(server, body, param, message):
    r = server.post("/v1/completions", json={"prompt": SEED_PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]
