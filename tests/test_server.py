"""`lmgen serve` as a subprocess, driven by the official openai client and by httpx: shapes, batching, limits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .browser import free_port
from .conftest import make_tiny_gpt2, make_tiny_llama

openai = pytest.importorskip("openai")

API_KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """A `python -m lmgen serve` subprocess on a free loopback port."""

    def __init__(self, tmp: Path, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        env = dict(os.environ)
        env.pop("LMGEN_API_KEY", None)
        if api_key:
            env["LMGEN_API_KEY"] = api_key  # the key comes from the environment, as documented
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with open(self.log_path, "wb") as log:
            cmd = [sys.executable, "-m", "lmgen", "serve", "-q", "--port", str(self.port), *args]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers=kw.pop("headers", self.headers), timeout=kw.pop("timeout", 120),
                          **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-tiny")
    model = make_tiny_llama(tmp / "model", max_position_embeddings=1024)  # room for streams that outlast a client
    server = Server(tmp, "--model", str(model), "--max-concurrent", "8", "--max-n", "4", api_key=API_KEY)
    server.model_id = str(model)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol(tmp_path_factory, embedded_path):
    tmp = tmp_path_factory.mktemp("serve-smol")
    server = Server(tmp, "--max-concurrent", "4", "--max-model-len", "512")
    server.model_id = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    yield server
    server.stop()


def stream_texts(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    texts, finishes, usage = {}, {}, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    return texts, finishes, usage


# ------------------------------------------------------------------ discovery

def test_models_health_and_openapi(tiny):
    assert httpx.get(tiny.url + "/health").json()["status"] == "ok"
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == [tiny.model_id]
    schema = httpx.get(tiny.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "logit_bias",
                 "stream", "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens"):
        assert props[name].get("description"), name
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "422" not in json.dumps(schema["paths"])


# ------------------------------------------------------------------ completions

def test_completions_n_seed_logprobs_and_stream_match(tiny):
    client = tiny.client()
    args = dict(model=tiny.model_id, prompt="The quick brown fox", max_tokens=10, n=3, seed=7, temperature=0.9,
                logprobs=2)
    full = client.completions.create(**args)
    assert full.object == "text_completion" and len(full.choices) == 3
    assert len({c.text for c in full.choices}) > 1  # choice i is seeded seed + i
    assert full.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in full.choices)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    for c in full.choices:
        assert c.finish_reason in ("stop", "length")
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(len(top) <= 3 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == [c.text for c in full.choices]

    texts, finishes, usage = stream_texts(client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    assert usage.completion_tokens == full.usage.completion_tokens

    # A stop string taken from the middle of the text ends it there.
    c0 = full.choices[0]
    stop = c0.logprobs.tokens[4]
    assert stop in c0.text
    stopped = client.completions.create(**dict(args, n=1), stop=[stop])
    assert stopped.choices[0].text == c0.text[:c0.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_token_prompts_extra_samplers_and_echo(tiny):
    client = tiny.client()
    out = client.completions.create(model=tiny.model_id, prompt=[[464, 2068], [50256]], max_tokens=5,
                                    temperature=0, extra_body={"top_k": 5, "repetition_penalty": 1.2,
                                                               "ignore_eos": True, "min_tokens": 2})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 10
    echoed = client.completions.create(model=tiny.model_id, prompt="Hello there", max_tokens=3, echo=True,
                                       temperature=0)
    assert echoed.choices[0].text.startswith("Hello there")
    # OpenAI sends logit_bias keys as strings; a +100 bias forces the token.
    biased = client.completions.create(model=tiny.model_id, prompt="Hello", max_tokens=3, logit_bias={"262": 100},
                                       extra_body={"ignore_eos": True})
    assert biased.choices[0].text == " the the the"


# ------------------------------------------------------------------ continuous batching

def test_concurrent_streams_share_steps_and_match_lone_runs(tiny):
    before = tiny.metrics()
    requests = [dict(model=tiny.model_id, prompt=p, max_tokens=m, seed=i, temperature=t, extra_body=extra)
                for i, (p, m, t, extra) in enumerate([
                    ("The quick brown fox", 40, 0.8, {}),
                    ("Once upon a time", 25, 1.0, {"top_k": 20}),
                    ("In the beginning", 60, 0.0, {}),
                    ("Hello", 15, 0.7, {"min_p": 0.05}),
                    ("A B C D E F G", 50, 1.2, {"top_p": 0.9}),
                    ("Dear diary,", 35, 0.9, {"repetition_penalty": 1.3}),
                    ("def main():", 45, 0.5, {"presence_penalty": 0.5}),
                    ("1, 2, 3,", 30, 1.0, {"ignore_eos": True})])]
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i):
        start.wait()
        chunks = tiny.client().completions.create(**requests[i], stream=True)
        results[i] = stream_texts(chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = tiny.metrics()
    assert after["lmgen_batched_steps_total"] > before["lmgen_batched_steps_total"]
    assert after["lmgen_max_batch"] > 1
    for req, got in zip(requests, results):
        assert got is not None
        alone = tiny.client().completions.create(**req)
        assert got[0] == {0: alone.choices[0].text}
        assert got[1] == {0: alone.choices[0].finish_reason}


def wait_for(server: Server, done, seconds: float = 5) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        m = server.metrics()
        if done(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_disconnect_frees_the_slot(tiny):
    cancelled = tiny.metrics()["lmgen_requests_cancelled_total"]
    body = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30, headers=tiny.headers) as client:
        with client.stream("POST", tiny.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
    m = wait_for(tiny, lambda m: m["lmgen_requests_cancelled_total"] > cancelled and not m["lmgen_sequences_running"])
    assert m["lmgen_sequences_running"] == 0
    assert m["lmgen_requests_cancelled_total"] == cancelled + 1
    # A non-streaming client that gives up is noticed too.
    with pytest.raises(httpx.TimeoutException):
        tiny.post("/v1/completions", json=dict(body, stream=False), timeout=0.5)
    m = wait_for(tiny, lambda m: m["lmgen_requests_cancelled_total"] > cancelled + 1
                 and not m["lmgen_sequences_running"])
    assert m["lmgen_sequences_running"] == 0
    assert m["lmgen_requests_cancelled_total"] == cancelled + 2


# ------------------------------------------------------------------ bad requests

LONG = "word " * 1100
BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("prompt type", "/v1/completions", {"prompt": 12}, 400, "prompt", "prompt must be"),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "Missing"),
    ("n=0", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("n over --max-n", "/v1/completions", {"prompt": "x", "n": 5}, 400, "n", "at most 4"),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "1000000000"),
    ("long prompt", "/v1/completions", {"prompt": LONG, "max_tokens": 10}, 400, None, "context"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("temperature -1", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater"),
    ("100 stop strings", "/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(100)]}, 400, "stop",
     "at most 16"),
    ("logit_bias key", "/v1/completions", {"prompt": "x", "logit_bias": {"the": 5}}, 400, "logit_bias", "'the'"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     "robot"),
    ("no chat template", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "messages",
     "chat template"),
    ("not an object", "/v1/completions", [1, 2], 400, None, "JSON object"),
]


@pytest.mark.parametrize("name,path,body,status,param,text", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error(tiny, name, path, body, status, param, text):
    kw = {"content": body, "headers": dict(tiny.headers, **{"Content-Type": "application/json"})} \
        if isinstance(body, bytes) else {"json": body}
    r = tiny.post(path, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert text in error["message"]
    if name == "unknown model":
        assert error["code"] == "model_not_found"
    if name == "huge max_tokens":
        assert "1024" in error["message"]  # both numbers: max_tokens and the maximum length


def test_size_and_key_limits_then_still_serving(tiny):
    r = tiny.post("/v1/completions", content=b'{"prompt": "' + b"a" * (10 << 20) + b'"}',
                  headers=dict(tiny.headers, **{"Content-Type": "application/json"}))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    for headers in ({"Authorization": "Bearer wrong"}, {}):
        r = tiny.post("/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        tiny.client().completions.create(model="nope", prompt="x", max_tokens=2)
    ok = tiny.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 4})  # no model: the served one
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    m = tiny.metrics()
    assert m['lmgen_http_requests_total{endpoint="/v1/completions",status="413"}'] >= 1
    assert m['lmgen_http_requests_total{endpoint="/v1/completions",status="401"}'] >= 2
    assert m["lmgen_generated_tokens_total"] > 0 and m["lmgen_prompt_tokens_total"] > 0
    assert m["lmgen_time_to_first_token_seconds_count"] > 0 and m["lmgen_inter_token_latency_seconds_count"] > 0


def test_load_test_script_finds_no_errors(tiny):
    env = dict(os.environ, LMGEN_API_KEY=API_KEY)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--url", tiny.url,
                          "--clients", "4", "--duration", "4", "--max-tokens", "16"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 5xx, 0 lost/truncated" in out.stdout


# ------------------------------------------------------------------ chat (the embedded model has a template)

def test_chat_completions_n_seed_logprobs_and_stream_match(smol):
    client = smol.client()
    args = dict(model=smol.model_id, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, n=3,
                seed=3, temperature=0.8, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**args)
    assert full.object == "chat.completion" and len(full.choices) == 3
    for c in full.choices:
        assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
        for item in c.logprobs.content:
            assert item.logprob <= 0 and len(item.top_logprobs) == 2
            assert bytes(item.bytes).decode("utf-8", "replace") == item.token or item.token.startswith("bytes:")
    assert full.usage.completion_tokens == sum(len(c.logprobs.content) for c in full.choices)
    import lmgen

    tok = lmgen.load_tokenizer()
    prompt = tok.encode(tok.apply_chat_template(args["messages"]), add_special_tokens=False)
    assert full.usage.prompt_tokens == len(prompt)

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    first_seen: dict[int, object] = {}
    for ch in chunks:
        for c in ch.choices:
            first_seen.setdefault(c.index, c.delta)
    assert all(d.role == "assistant" for d in first_seen.values())
    texts, finishes, usage = stream_texts(chunks)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    assert usage.completion_tokens == full.usage.completion_tokens


# ------------------------------------------------------------------ queue limit and shutdown

def test_full_queue_429_then_sigterm_ends_streams(tmp_path):
    model = make_tiny_gpt2(tmp_path / "model")
    server = Server(tmp_path, "--model", str(model), "--max-concurrent", "1", "--max-waiting", "1",
                    "--max-model-len", "256")
    try:
        body = {"prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "stream": True}
        outcomes: dict[int, list[str]] = {}
        started = threading.Event()

        def stream(i):
            lines = []
            try:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            started.set()
            except httpx.HTTPError as e:
                lines.append(f"transport error {e}")
            outcomes[i] = lines

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        threads[0].start()
        assert started.wait(30)
        threads[1].start()
        deadline = time.monotonic() + 10
        while server.metrics()["lmgen_sequences_waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"

        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=15)
        server.proc.wait(timeout=15)
        assert time.monotonic() - t0 < 10
        running = outcomes[0]
        assert running[-1] == "data: [DONE]"
        assert '"error"' in running[-2] and "shutting down" in running[-2]
    finally:
        server.stop()
        if server.proc.returncode not in (0, -signal.SIGTERM, None):
            print(server.log())
