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
import os
import statistics
import time

import torch

import lmgen
from lmgen import GenerationConfig, constraints

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


# lmgen fills masks ahead (overlapping the forward) only where a core is free for it: both ways are measured.
MODES = {"unconstrained": None, "json_schema, masks filled inline": False,
         "json_schema, masks filled ahead on a worker thread": True}


def step_times(lm, batch: int, tokens: int, mode: str) -> list[float]:
    """Seconds of each step in which all `batch` rows decode (after their prompts are in)."""
    constraints.FILL_AHEAD = MODES[mode]
    extra = dict(ignore_eos=True) if MODES[mode] is None else dict(json_schema=SCHEMA)
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


def openai_test_schemas(lm) -> dict[str, float]:
    """ms to compile each schema tests/test_structured_server.py's parse() calls send (openai's strict form), cold."""
    import sys
    from pathlib import Path

    from openai.lib._pydantic import to_strict_json_schema

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_structured_server import PROMPTS

    out = {}
    for model in dict.fromkeys(m for m, _ in PROMPTS):
        t = time.perf_counter()
        lm.constraints.compile("json_schema", to_strict_json_schema(model))
        out[model.__name__] = (time.perf_counter() - t) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lm = lmgen.load()
    print(f"model: {lm.name}; weights: {lm.weights}; {lm.constraints.describe()}; {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads (masks fill ahead by default: "
          f"{os.cpu_count() > torch.get_num_threads()})")
    rows = []
    for batch in (1, 16):
        step_times(lm, batch, 8, "json_schema, masks filled inline")  # warm: kernels, grammar, cache pages
        per_round = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                per_round[mode].append(statistics.median(step_times(lm, batch, args.tokens, mode)))
        free = per_round["unconstrained"]
        for mode in MODES:
            ratios = [t / f for f, t in zip(free, per_round[mode])]
            rows.append((batch, mode, statistics.median(per_round[mode]) * 1000, statistics.median(ratios),
                         min(ratios), max(ratios)))
    compile_ms, mask_ms = first_use(lm)
    tests_ms = openai_test_schemas(lm)
    print("\n| batch | mode | ms/step | against unconstrained | spread over rounds |")
    print("|---:|---|---:|---:|---|")
    for batch, mode, ms, ratio, low, high in rows:
        print(f"| {batch} | {mode} | {ms:.2f} | {ratio:.3f} | {low:.3f} to {high:.3f} |")
    setup = lm.constraints.setup_seconds * 1000
    print(f"\nA new schema's first use: compile {compile_ms:.2f} ms + first mask {mask_ms:.2f} ms "
          f"(median of 20 distinct schemas); the tokenizer's set-up at load: {setup:.0f} ms")
    print("The openai tests' schemas, compiled cold: " + ", ".join(f"{k} {v:.2f} ms" for k, v in tests_ms.items()))
    print(json.dumps({"rows": rows, "compile_ms": compile_ms, "first_mask_ms": mask_ms, "tests_ms": tests_ms}))


if __name__ == "__main__":
    main()
