"""The continuous-batching engine: requests share decode steps, match lone runs, cancel, fail alone, stop."""

from __future__ import annotations

import threading
import time

import pytest

from lmgen import GenerationConfig
from lmgen.engine import Engine, EngineFull

from .conftest import SEED_IDS


def config(**kw) -> GenerationConfig:
    return GenerationConfig(**kw)


REQUESTS = [
    (SEED_IDS, config(max_new_tokens=20, do_sample=True, seed=1)),
    ([464, 2068], config(max_new_tokens=5)),
    (SEED_IDS + [1353], config(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.7, seed=2)),
    ([50256], config(max_new_tokens=9, do_sample=True, top_p=0.8, seed=3, num_return_sequences=2)),
    ([11, 12, 13, 14, 15, 16, 17, 18, 19, 20], config(max_new_tokens=15, repetition_penalty=1.3)),
    ([464] * 30, config(max_new_tokens=3, do_sample=True, min_p=0.1, seed=4)),
    (SEED_IDS, config(max_new_tokens=18, logprobs=2, do_sample=True, seed=5)),
]


@pytest.fixture
def engine(tiny_gpt2):
    e = Engine(tiny_gpt2, max_concurrent=8, max_waiting=16, max_model_len=128)
    e.start()
    yield e
    e.stop()


def collect(request):
    gens = {}
    for event in request.events():
        assert event.error is None, event.error
        if event.generation is not None:
            gens[event.index] = event.generation
    return [gens[i] for i in sorted(gens)]


def test_concurrent_requests_share_steps_and_match_lone_runs(engine, tiny_gpt2):
    results = [None] * len(REQUESTS)

    def run(i):
        results[i] = collect(engine.submit(*REQUESTS[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (prompt, cfg), got in zip(REQUESTS, results):
        alone = tiny_gpt2.generate(prompt, cfg)
        assert [g.token_ids for g in got] == [g.token_ids for g in alone]
        assert [g.text for g in got] == [g.text for g in alone]
    stats = engine.stats()
    assert stats["batched_steps"] > 0 and stats["max_batch"] > 1
    assert stats["requests_finished"] == len(REQUESTS) and stats["running"] == 0
    assert stats["generated_tokens"] == sum(len(g.token_ids) for r in results for g in r)
    assert stats["ttft"]["count"] == sum(c.num_return_sequences for _, c in REQUESTS)
    assert stats["itl"]["count"] == stats["generated_tokens"] - stats["ttft"]["count"]
    assert engine.cache.free_slots == engine.cache.n_slots


def test_streamed_texts_add_up(engine):
    request = engine.submit(SEED_IDS, config(max_new_tokens=25, do_sample=True, seed=9))
    texts, final = [], None
    for event in request.events():
        texts.append(event.text)
        final = event.generation or final
    assert "".join(texts) == final.text


def test_cancel_frees_the_slots(engine):
    request = engine.submit(SEED_IDS, config(max_new_tokens=120, num_return_sequences=3, do_sample=True))
    events = request.events()
    next(events)
    request.cancel()
    list(events)  # ends
    deadline = time.time() + 10
    while engine.cache.free_slots != engine.cache.n_slots and time.time() < deadline:
        time.sleep(0.05)
    assert engine.cache.free_slots == engine.cache.n_slots
    assert engine.stats()["requests_cancelled"] == 1 and engine.stats()["running"] == 0


def test_a_bad_request_fails_alone(engine, tiny_gpt2):
    good = engine.submit(SEED_IDS, config(max_new_tokens=10))
    bad = engine.submit(SEED_IDS, config(max_new_tokens=10, logit_bias={10**6: 5.0}))
    errors = [e.error for e in bad.events() if e.error]
    assert errors and "1000000" in str(errors[0])
    assert [g.token_ids for g in collect(good)] == [tiny_gpt2.generate(SEED_IDS, max_new_tokens=10)[0].token_ids]
    assert engine.stats()["requests_failed"] == 1


def test_limits(tiny_gpt2):
    e = Engine(tiny_gpt2, max_concurrent=2, max_waiting=1, max_model_len=64)  # not started: nothing drains
    with pytest.raises(ValueError, match="60 tokens and max_tokens is 10: together 70.*64"):
        e.submit([464] * 60, config(max_new_tokens=10))
    with pytest.raises(ValueError, match="n=3"):
        e.submit(SEED_IDS, config(num_return_sequences=3, max_new_tokens=4))
    e.submit(SEED_IDS, config(max_new_tokens=4))
    with pytest.raises(EngineFull):
        e.submit(SEED_IDS, config(max_new_tokens=4))


def test_stop_ends_running_streams_with_an_error(tiny_gpt2):
    e = Engine(tiny_gpt2, max_concurrent=2, max_model_len=256)
    e.start()
    request = e.submit(SEED_IDS, config(max_new_tokens=200, ignore_eos=True))
    events = request.events()
    next(events)
    e.stop()
    rest = list(events)
    assert any(str(ev.error) == "engine shutting down" for ev in rest)


def test_calls_run_on_the_engine_thread_between_steps(engine):
    # Forward passes from other threads would each bring an OpenMP team and slow the engine's kernels for good.
    request = engine.submit(SEED_IDS, config(max_new_tokens=30, ignore_eos=True))
    assert engine.call(threading.get_ident).result(timeout=60) == engine._thread.ident
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0).result(timeout=60)
    assert len(collect(request)[0].token_ids) == 30  # the running request was not disturbed
