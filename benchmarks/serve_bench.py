"""Serving benchmark: `lmgen serve` against llama.cpp's `llama-server` on the same GGUF, under the same streaming load.

    python benchmarks/serve_bench.py                       # both servers, every case, the embedded model
    python benchmarks/serve_bench.py --only lmgen --cases load
    python benchmarks/serve_bench.py --llama-server PATH   # else benchmarks/build_llama_server.sh's binary

Cases:
- load: 8 and 32 concurrent streaming clients, 64 tokens each (ignore_eos), --rounds requests per client;
  aggregate tokens/s, TTFT p50/p99 and inter-token p50/p99, and the server's RSS idle and at the end of the load.
- long: a 4,000-token prompt arriving among 16 running streams (lmgen: --max-model-len 8192 --max-concurrent 17);
  the streams' longest inter-token gap against their quiet inter-token p99, and the long prompt's TTFT busy
  against idle.
- chat: a 5-turn chat (a 1,000-token system prompt, 100-token user turns): TTFT of turns 2 to 5 with prefix
  caching on against off (lmgen only: llama-server's prompt cache is per slot and always on).
Each server runs with its own default flags plus what a case names; llama-server as `-t 2 -np 8 -c 8192`.
Loopback only; every request is bounded in tokens and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river stone cloud garden lantern pepper violin harbor meadow copper signal orbit candle forest "
         "marble thunder velvet saddle prism glacier").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def text_of(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class Server:
    """A server process on a free loopback port; `kind` is "lmgen" or "llama"."""

    def __init__(self, kind: str, model: Path, extra: list[str], llama_server: Path | None):
        self.kind, self.port = kind, free_port()
        if kind == "lmgen":
            cmd = [sys.executable, "-m", "lmgen", "serve", "-q", "--model", str(model), "--port", str(self.port),
                   *extra]
        else:
            cmd = [str(llama_server), "-m", str(model), "--port", str(self.port), "--host", "127.0.0.1",
                   "-t", "2", "-np", "8", "-c", "8192", *extra]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{kind} did not start")
        self.warm()

    def warm(self) -> None:
        asyncio.run(stream_all(self.url, [("Hello there", 8)]))

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_one(client: httpx.AsyncClient, url: str, prompt, max_tokens: int) -> dict:
    """One streaming completion; when each token's chunk arrived."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("finish_reason")
                                         is None):
                times.append(time.perf_counter())
    return {"start": start, "times": times}


async def stream_all(url: str, jobs: list[tuple[object, int]], concurrency: int | None = None) -> list[dict]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)  # a new connection each: no stale reuse
    async with httpx.AsyncClient(limits=limits) as client:
        sem = asyncio.Semaphore(concurrency or len(jobs))

        async def run(job):
            async with sem:
                return await stream_one(client, url, *job)

        return await asyncio.gather(*(run(j) for j in jobs))


def summarize(results: list[dict], wall: float) -> dict:
    tokens = sum(len(r["times"]) for r in results)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"tokens_per_s": tokens / wall, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99), "tokens": tokens}


def load_case(server: Server, clients: int, rounds: int, tokens: int) -> dict:
    jobs = [(text_of(12, seed=1000 * r + c), tokens) for r in range(rounds) for c in range(clients)]
    start = time.perf_counter()
    results = asyncio.run(stream_all(server.url, jobs, concurrency=clients))
    out = summarize(results, time.perf_counter() - start)
    out["rss_mb"] = server.rss()
    return out


def long_case(server: Server, tokenizer_text: str) -> dict:
    """16 streams running; a 4,000-token prompt arrives: the streams' gaps, and its TTFT busy against idle."""

    async def scenario(with_long: bool, busy: bool):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as client:
            streams = [asyncio.create_task(stream_one(client, server.url, text_of(12, seed=50 + i), 160))
                       for i in range(16 if busy else 0)]
            long = None
            if with_long:
                await asyncio.sleep(2.0 if busy else 0)
                long = await stream_one(client, server.url, tokenizer_text, 4)
            return await asyncio.gather(*streams), long

    idle = asyncio.run(scenario(True, False))[1]
    quiet, _ = asyncio.run(scenario(False, True))
    busy, long = asyncio.run(scenario(True, True))
    quiet_itl = [b - a for r in quiet for a, b in zip(r["times"], r["times"][1:])]
    arrival = long["start"]
    gaps = [b - a for r in busy for a, b in zip(r["times"], r["times"][1:]) if b >= arrival]
    return {"quiet_itl_p99": percentile(quiet_itl, 99), "max_gap_during": max(gaps) if gaps else float("nan"),
            "long_ttft_idle": idle["times"][0] - idle["start"], "long_ttft_busy": long["times"][0] - long["start"]}


def chat_case(server_on: Server, server_off: Server) -> dict:
    system = text_of(780, seed=7)  # about 1,000 tokens
    turns = [text_of(78, seed=100 + t) for t in range(5)]  # about 100 tokens each

    def run(server: Server) -> list[float]:
        messages = [{"role": "system", "content": system}]
        ttfts = []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            body = {"messages": messages, "max_tokens": 16, "stream": True, "temperature": 0}
            start = time.perf_counter()
            first, reply = None, ""
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        if delta and first is None:
                            first = time.perf_counter() - start
                        reply += delta
            ttfts.append(first)
            messages.append({"role": "assistant", "content": reply})
        return ttfts

    on, off = run(server_on), run(server_off)
    return {"ttft_on": on, "ttft_off": off, "ratio_turns_2_5": sum(on[1:]) / sum(off[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    p.add_argument("--llama-server", default=None)
    p.add_argument("--only", choices=["lmgen", "llama"], default=None)
    p.add_argument("--cases", default="load,long,chat")
    p.add_argument("--rounds", type=int, default=2, help="requests per client in the load case")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lmgen.loading import resolve

    model = Path(args.model) if args.model else resolve(None)
    llama = Path(args.llama_server) if args.llama_server else ROOT / ".venv/llama.cpp/build/bin/llama-server"
    kinds = [k for k in ("lmgen", "llama") if args.only in (None, k)]
    if "llama" in kinds and not llama.exists():
        sys.stderr.write(f"no llama-server at {llama}: run benchmarks/build_llama_server.sh (skipping it)\n")
        kinds.remove("llama")
    cases = args.cases.split(",")
    results: dict = {"model": str(model), "cpus": os.cpu_count()}
    long_prompt = text_of(3120, seed=3)  # about 4,000 tokens
    for kind in kinds:
        if "load" in cases:
            server = Server(kind, model, [], llama)
            try:
                results[f"{kind}/idle_rss_mb"] = server.rss()
                for clients in (8, 32):
                    results[f"{kind}/load{clients}"] = r = load_case(server, clients, args.rounds, args.tokens)
                    print(kind, clients, json.dumps(r), flush=True)
            finally:
                server.stop()
            if kind == "lmgen":
                server = Server(kind, model, ["--max-model-len", "8192"], llama)
                results["lmgen/idle_rss_mb_8192"] = server.rss()
                server.stop()
        if "long" in cases:
            extra = ["--max-model-len", "8192", "--max-concurrent", "17"] if kind == "lmgen" else ["-np", "17",
                                                                                                 "-c", "80000"]
            server = Server(kind, model, extra, llama)
            try:
                results[f"{kind}/long"] = r = long_case(server, long_prompt)
                print(kind, "long", json.dumps(r), flush=True)
            finally:
                server.stop()
        if "chat" in cases and kind == "lmgen":
            on = Server(kind, model, ["--max-model-len", "4096"], llama)
            off = Server(kind, model, ["--max-model-len", "4096", "--no-prefix-caching"], llama)
            try:
                results["lmgen/chat"] = r = chat_case(on, off)
                print(kind, "chat", json.dumps(r), flush=True)
            finally:
                on.stop()
                off.stop()
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
