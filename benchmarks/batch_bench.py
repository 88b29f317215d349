"""`lmgen batch` against a plain loop over `lm.generate`, locally and on a Ray instance on this machine.

1,000 prompts, 64 tokens each (ignore_eos, so every row generates exactly 64), temperature 0.8, the embedded model
on its default path. Each run is timed two ways:
- the whole process: imports and the model's load included;
- generating alone: for `lmgen batch`, its own report, from the rows checked to the output joined (for Ray that
  includes connecting to the cluster and the actors' loads); for the plain loop, its `lm.generate` calls, one
  prompt after another.

The ratios use generating alone. Ray's overhead per row is the 1-worker Ray run's time less the local run's on the
same single thread, over the rows.

    .venv/bin/python benchmarks/batch_bench.py [--rows 1000] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ["a lighthouse", "a robot", "the sea", "a city at night", "an old map", "a storm", "a garden", "a train"]


def rows(n: int, tokens: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}):",
             "max_tokens": tokens, "ignore_eos": True, "temperature": 0.8} for i in range(n)]


def run_batch(source: Path, out: Path, *args: str, env=None) -> tuple[float, float]:
    """Seconds for one `lmgen batch` process, start to finish, and its generating alone (its own report: from
    the rows checked to the output joined, so without imports and the model's load)."""
    for stale in (out, out.with_name(out.name + ".errors.jsonl")):
        stale.unlink(missing_ok=True)
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lmgen", "batch", "-q", str(source), str(out), *args], check=True,
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    return wall, float(re.search(r"rows in ([0-9.]+) s", run.stderr)[1])


def plain_loop(data: list[dict]) -> tuple[float, float]:
    """Seconds for the whole (imports, load, loop) and for `lm.generate` on one prompt after another alone."""
    start = time.perf_counter()
    import lmgen
    from lmgen.batch import row_seed

    lm = lmgen.load()
    t = time.perf_counter()
    for r in data:
        lm.generate(r["prompt"], max_new_tokens=r["max_tokens"], ignore_eos=True, do_sample=True,
                    temperature=r["temperature"], seed=row_seed(0, r["id"]))
    seconds = time.perf_counter() - t
    return time.perf_counter() - start, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    data = rows(args.rows, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="lmgen-batch-bench-"))
    source = tmp / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in data))
    ray = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    results = {"lmgen batch (all cores)": run_batch(source, tmp / "local.jsonl"),
               "lmgen batch --threads 1": run_batch(source, tmp / "local1.jsonl", "--threads", "1")}
    subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", "6391", "--num-cpus",
                    str(os.cpu_count()), "--include-dashboard", "false", "--disable-usage-stats"], check=True,
                   env=env, capture_output=True)
    try:
        for workers in (1, 2):
            results[f"lmgen batch --ray, {workers} worker(s) of 1 CPU"] = run_batch(
                source, tmp / f"ray{workers}.jsonl", "--ray", "127.0.0.1:6391", "--workers", str(workers),
                "--cpus-per-worker", "1", env=env)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    results["plain loop over lm.generate"] = plain_loop(data)
    same = (tmp / "ray1.jsonl").read_text() == (tmp / "local1.jsonl").read_text()
    tokens = args.rows * args.tokens
    loop = tokens / results["plain loop over lm.generate"][1]
    print(f"{args.rows} rows x {args.tokens} tokens, {os.cpu_count()} cores\n")
    print("| run | seconds (whole process) | seconds generating | rows/s | tokens/s | against the plain loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, seconds) in results.items():
        print(f"| {name} | {wall:.1f} | {seconds:.1f} | {args.rows / seconds:.2f} | {tokens / seconds:.0f} | "
              f"{tokens / seconds / loop:.2f}x |")
    ray1, local1 = results["lmgen batch --ray, 1 worker(s) of 1 CPU"][1], results["lmgen batch --threads 1"][1]
    overhead = (ray1 - local1) / args.rows
    print(f"\nRay's overhead per row (1 worker against the local run on 1 thread): {overhead * 1000:.1f} ms; "
          f"the Ray run's output equals the local 1-thread run's: {same}")


if __name__ == "__main__":
    main()
