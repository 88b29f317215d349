"""Load-test `lmgen serve`: concurrent streaming and non-streaming completions, checked for lost or wrong answers.

    python benchmarks/load_test.py                          # starts a server on the embedded model
    python benchmarks/load_test.py --model DIR --clients 4 --duration 5
    python benchmarks/load_test.py --url http://127.0.0.1:8000

Bounded in time (--duration) and requests (--max-requests), loopback only. Exits 1 on any 5xx, lost
or truncated response (a stream without [DONE], token counts that disagree with usage), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import httpx

PROMPTS = ["The quick brown fox jumped over", "Once upon a time", "In the beginning", "Here is a list of colors:",
           "The weather today is", "def fibonacci(n):", "My favourite food is", "Dear diary,"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Tally:
    """Counts and latencies, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.server_errors = self.lost = self.rejected = self.tokens = 0
        self.ttft: list[float] = []
        self.problems: list[str] = []

    def fail(self, kind: str, message: str) -> None:
        """Record a 5xx ("server_errors") or a lost/truncated response ("lost")."""
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            if len(self.problems) < 20:
                self.problems.append(message)


def _check_usage(usage: dict | None, max_tokens: int, counted: int, what: str) -> str | None:
    if not usage:
        return f"{what}: no usage"
    if usage["completion_tokens"] != max_tokens or counted != max_tokens:
        return (f"{what}: asked {max_tokens} tokens (ignore_eos), usage says {usage['completion_tokens']}, "
                f"logprobs list {counted}")
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"{what}: total_tokens != prompt_tokens + completion_tokens"
    return None


def one_request(client: httpx.Client, tally: Tally, stream: bool, max_tokens: int, rng: random.Random) -> None:
    """Send one completion and check it; ignore_eos makes its length known in advance."""
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 0,
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1000), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    try:
        if not stream:
            r = client.post("/completions", json=body)
            if r.status_code == 429:
                with tally.lock:
                    tally.rejected += 1
                return
            if r.status_code >= 500:
                return tally.fail("server_errors", f"{r.status_code}: {r.text[:200]}")
            if r.status_code != 200:
                return tally.fail("lost", f"unexpected {r.status_code}: {r.text[:200]}")
            data = r.json()
            choice = data["choices"][0]
            problem = _check_usage(data.get("usage"), max_tokens, len(choice["logprobs"]["tokens"]), "non-stream")
            if problem is None and choice["finish_reason"] != "length":
                problem = f"non-stream: finish_reason {choice['finish_reason']!r} with ignore_eos"
            if problem:
                return tally.fail("lost", problem)
            with tally.lock:
                tally.ok += 1
                tally.tokens += max_tokens
            return
        with client.stream("POST", "/completions", json=body) as r:
            if r.status_code == 429:
                with tally.lock:
                    tally.rejected += 1
                return
            if r.status_code != 200:
                r.read()
                kind = "server_errors" if r.status_code >= 500 else "lost"
                return tally.fail(kind, f"stream {r.status_code}: {r.text[:200]}")
            first, counted, usage, done, finishes = None, 0, None, False, []
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return tally.fail("server_errors", f"stream error chunk: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk["choices"]:
                    if first is None:
                        first = time.perf_counter() - started
                    counted += len((c.get("logprobs") or {}).get("tokens", []))
                    if c.get("finish_reason"):
                        finishes.append(c["finish_reason"])
            problem = None if done else "stream ended without [DONE]"
            problem = problem or _check_usage(usage, max_tokens, counted, "stream")
            if problem is None and finishes != ["length"]:
                problem = f"stream: finish reasons {finishes}"
            if problem:
                return tally.fail("lost", problem)
            with tally.lock:
                tally.ok += 1
                tally.tokens += max_tokens
                if first is not None:
                    tally.ttft.append(first)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        tally.fail("lost", f"{'stream' if stream else 'non-stream'}: {type(e).__name__}: {e}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, max_concurrent: int) -> tuple[subprocess.Popen, str]:
    """Start `lmgen serve` on a free loopback port; return it once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmgen", "serve", "-q", "--port", str(port), "--max-concurrent", str(max_concurrent)]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ)
    env.pop("LMGEN_API_KEY", None)
    log = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads would block the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def run(url: str, clients: int, duration: float, max_tokens: int, max_requests: int, api_key: str | None) -> int:
    """Hold `clients` concurrent clients for `duration` seconds; print the figures; return the exit code."""
    tally, issued, lock = Tally(), [0], threading.Lock()
    deadline = time.monotonic() + duration
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url.rstrip("/") + "/v1", timeout=300, headers=headers) as client:
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                one_request(client, tally, rng.random() < 0.5, rng.randint(4, max_tokens), rng)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    print(f"{clients} clients, {elapsed:.1f} s: {tally.ok} ok, {tally.rejected} rejected (429), "
          f"{tally.server_errors} 5xx, {tally.lost} lost/truncated")
    print(f"requests/s {tally.ok / elapsed:.2f}   tokens/s {tally.tokens / elapsed:.1f}   "
          f"TTFT p50 {percentile(tally.ttft, 50) * 1000:.0f} ms   p99 {percentile(tally.ttft, 99) * 1000:.0f} ms")
    for p in tally.problems:
        print("  problem:", p)
    return 1 if tally.server_errors or tally.lost or tally.ok == 0 else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, start or target a server, run the load, return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (loopback only); default: start one")
    p.add_argument("--model", help="the model the started server loads (default: embedded)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (requests in flight then finish)")
    p.add_argument("--max-tokens", type=int, default=32, help="each request asks 4..N tokens")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--max-concurrent", type=int, default=8, help="slots of the started server")
    p.add_argument("--api-key", default=os.environ.get("LMGEN_API_KEY"))
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 4:
        p.error("--clients >= 1, --duration > 0 and --max-tokens >= 4")
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("--url must be a loopback address (127.0.0.1, localhost or ::1)")
        url = args.url
    else:
        proc, url = start_server(args.model, args.max_concurrent)
    try:
        return run(url, args.clients, args.duration, args.max_tokens, args.max_requests, args.api_key)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
