"""Constrained decoding's cost on the default fast path: per-token step time with a JSON schema against the same
run's unconstrained decoding, at batch 1 and batch 16, and what a schema's first use adds.

Each mode runs the same prompts on one engine core (`lmgen.load()`, no flags), timing every step; only steps where
every row of the batch is decoding count, so a row that finished early never makes a batch look cheaper. Modes
alternate over ROUNDS rounds and each figure is the median over rounds (the spread is printed too): a shared
machine's noise is then the same for both.

    .venv/bin/python benchmarks/structured_bench.py [--tokens 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lmgen
from lmgen import GenerationConfig

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "role": {"enum": ["admin", "user", "guest"]},
    "email": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"]},
    "friends": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "years": {"type": "integer"}}, "required": ["name", "years"]}}},
    "required": ["name", "age", "role", "email", "address", "friends"]}
CITIES = ["Oslo", "Paris", "Rome", "Lima", "Kyiv", "Cairo", "Quito", "Seoul", "Hanoi", "Dakar", "Perth", "Tunis",
          "Sofia", "Minsk", "Accra", "Doha"]


def prompts(lm, n: int) -> list[list[int]]:
    out = []
    for city in CITIES[:n]:
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": f"Describe a person from {city}, "
                                                  "with their address and friends, as JSON."}])
        out.append(lm.tokenizer.encode(text, add_special_tokens=False))
    return out


def step_times(lm, batch: int, tokens: int, constrained: bool) -> list[float]:
    """Seconds of each step in which all `batch` rows decode (after their prompts are in)."""
    extra = dict(json_schema=SCHEMA) if constrained else dict(ignore_eos=True)
    config = GenerationConfig(max_new_tokens=tokens, **extra)
    core = lm.core(batch)
    works = [lm.work(ids, config, lm.context_length, k) for k, ids in enumerate(prompts(lm, batch))]
    for w in works:
        core.add(w)
    times = []
    while core.has_work():
        t = time.perf_counter()
        events = core.step()
        dt = time.perf_counter() - t
        if sum(e.token_id is not None for _, e in events) == batch and all(w.seqs[0].tokens for w in works):
            times.append(dt)
    return times


def first_use(lm, n: int = 20) -> tuple[float, float]:
    """Median ms to compile a schema never seen before, and to compute its first mask."""
    from lmgen.constraints import Matcher, allowed_tokens

    compile_ms, mask_ms = [], []
    for i in range(n):
        schema = dict(SCHEMA, title=f"Person{i}")  # a new schema each time: no cache hit
        t = time.perf_counter()
        m = lm.constraints.compile("json_schema", schema)
        t1 = time.perf_counter()
        allowed_tokens([Matcher(m, "json_schema", lm.eos_token_ids, lm.constraints)], lm.vocab_size)
        compile_ms.append((t1 - t) * 1000)
        mask_ms.append((time.perf_counter() - t1) * 1000)
    return statistics.median(compile_ms), statistics.median(mask_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lm = lmgen.load()
    print(f"model: {lm.name}; weights: {lm.weights}; {lm.constraints.describe()}")
    rows = []
    for batch in (1, 16):
        step_times(lm, batch, 8, True)  # warm: kernels, the schema's grammar, the cache's pages
        per_round = {False: [], True: []}
        for _ in range(args.rounds):
            for constrained in (False, True):
                per_round[constrained].append(statistics.median(step_times(lm, batch, args.tokens, constrained)))
        free, con = (statistics.median(per_round[c]) for c in (False, True))
        ratios = [c / f for f, c in zip(per_round[False], per_round[True])]
        rows.append((batch, free * 1000, con * 1000, con / free, min(ratios), max(ratios)))
    compile_ms, mask_ms = first_use(lm)
    print("\n| batch | unconstrained ms/step | json_schema ms/step | ratio | ratio spread over rounds |")
    print("|---:|---:|---:|---:|---|")
    for batch, free, con, ratio, low, high in rows:
        print(f"| {batch} | {free:.2f} | {con:.2f} | {ratio:.3f} | {low:.3f} to {high:.3f} |")
    setup = lm.constraints.setup_seconds * 1000
    print(f"\nA new schema's first use: compile {compile_ms:.2f} ms + first mask {mask_ms:.2f} ms "
          f"(median of 20 distinct schemas); the tokenizer's set-up at load: {setup:.0f} ms")
    print(json.dumps({"rows": rows, "compile_ms": compile_ms, "first_mask_ms": mask_ms}))


if __name__ == "__main__":
    main()
