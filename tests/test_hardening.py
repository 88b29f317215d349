"""Defects outside tests found, each reproduced: bad text, tiny temperatures, the bounds table, a local server that
only its own pages and clients can use, and OpenAI's logprobs and legacy-field rules."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from lmgen.generate import Continuation
from lmgen.params import BOUNDS, GenerationConfig, ParameterError
from lmgen.sampling import InvalidScoresError, check_scores

from .conftest import SEED_IDS, SEED_PROMPT, make_tiny_llama
from .test_server import API_KEY, ROOT, Server

# ------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_a_tiny_temperature_is_greedy(tiny_gpt2, temperature):
    config = GenerationConfig(do_sample=True, temperature=temperature, max_new_tokens=8, seed=1, logprobs=0)
    assert not config.sampling
    out = tiny_gpt2.generate(SEED_IDS, config)[0]
    greedy = tiny_gpt2.generate(SEED_IDS, max_new_tokens=8)[0]
    assert out.token_ids == greedy.token_ids
    assert all(lp.logprob > -20 for lp in out.logprobs)  # not the last id at logprob -32, as before


def test_the_smallest_sampling_temperature_still_samples(tiny_gpt2):
    config = GenerationConfig(do_sample=True, temperature=1e-5, max_new_tokens=4, seed=1)
    assert config.sampling
    greedy = tiny_gpt2.generate(SEED_IDS, max_new_tokens=4)[0]
    assert tiny_gpt2.generate(SEED_IDS, config)[0].token_ids == greedy.token_ids


@pytest.mark.parametrize("value", [1e-300, 0.001, 1000.0])
def test_repetition_penalty_bounds(value):
    with pytest.raises(ParameterError) as info:
        GenerationConfig(repetition_penalty=value)
    assert info.value.field == "repetition_penalty"
    assert str(info.value) == f"repetition_penalty must be None or a number in [0.01, 100], got {value!r}"
    GenerationConfig(repetition_penalty=0.01)  # the bound itself is allowed


def test_a_lone_surrogate_in_a_python_prompt_is_a_value_error(tiny_gpt2):
    with pytest.raises(ValueError, match=r"prompt holds a lone UTF-16 surrogate \('\\ud800'\) at character 1"):
        tiny_gpt2.generate("a\ud800b", max_new_tokens=2)
    assert tiny_gpt2.generate("fox \U0001f98a", max_new_tokens=2)[0].token_ids  # a real astral character is fine


def _sequence(config: GenerationConfig, vocab: int = 8) -> Continuation:
    return Continuation([1, 2, 3], config, torch.Generator().manual_seed(0), eos_ids=[vocab - 1])


def test_scores_that_overflow_fail_the_sequence_naming_the_parameters():
    config = GenerationConfig(do_sample=True, temperature=1e-5, repetition_penalty=1.5, seed=0)
    seq = _sequence(config)
    logits = torch.tensor([3e34, 1.0, -1.0, 0.0, 2.0, 0.5, 0.1, 0.2])  # / 1e-5 overflows float32 to +inf
    with pytest.raises(InvalidScoresError) as info:
        seq.advance(logits, 100)
    assert info.value.fields == ("repetition_penalty", "temperature")
    assert "hold NaN or +inf after repetition_penalty=1.5, temperature=1e-05" in str(info.value)
    assert seq.tokens == [] and seq.finish_reason is None  # no token was chosen


def test_nan_logits_and_fully_masked_scores_fail_too():
    seq = _sequence(GenerationConfig())
    with pytest.raises(InvalidScoresError) as info:
        seq.advance(torch.tensor([0.0, float("nan"), 1.0, 0, 0, 0, 0, 0]), 100)
    assert info.value.fields == () and "in the model's own logits" in str(info.value)
    assert seq.tokens == []
    masked = torch.full((8,), float("-inf"))
    with pytest.raises(InvalidScoresError, match="mask every token after no_repeat_ngram_size=2"):
        check_scores(torch.zeros(8), masked, GenerationConfig(no_repeat_ngram_size=2), 0)
    check_scores(torch.zeros(8), torch.zeros(8), GenerationConfig(), 0)  # finite: fine
    # bad_words_ids bans all but EOS (id 7), min_new_tokens bans EOS: a uniform draw has nothing to draw from.
    uniform = _sequence(GenerationConfig(do_sample=True, weighted=False, bad_words_ids=[[i] for i in range(7)],
                                         min_new_tokens=2))
    with pytest.raises(InvalidScoresError, match="mask every token after bad_words_ids=.*min_new_tokens=2"):
        uniform.advance(torch.zeros(8), 100)
    assert uniform.tokens == []
    # Sampling checks the whole row: a sampled token can be finite while another score is NaN.
    sampled = GenerationConfig(do_sample=True, top_k=4)
    row = torch.tensor([0.0, float("nan"), 1.0, 0, 0, 0, 0, 0])
    with pytest.raises(InvalidScoresError, match=r"hold NaN or \+inf after top_k=4"):
        check_scores(torch.zeros(8), row, sampled)


def test_bounds_feed_the_schema_and_the_cli():
    from lmgen.server.protocol import CompletionRequest

    schema = CompletionRequest.model_json_schema()["properties"]
    temperature = next(s for s in schema["temperature"]["anyOf"] if s.get("type") == "number")
    assert temperature["minimum"] == BOUNDS["temperature"].low
    penalty = next(s for s in schema["repetition_penalty"]["anyOf"] if s.get("type") == "number")
    assert (penalty["minimum"], penalty["maximum"]) == (0.01, 100)
    out = subprocess.run([sys.executable, "-m", "lmgen", "generate", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert "a number in [0.01, 100]" in " ".join(out.stdout.split())
    out = subprocess.run([sys.executable, "-m", "lmgen", "generate", "x", "--repetition-penalty", "0.001"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr == "lmgen: error: --repetition-penalty must be None or a number in [0.01, 100], got 0.001\n"


# ------------------------------------------------------------------ the server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-hardening")
    model = make_tiny_llama(tmp / "model")
    server = Server(tmp, "--model", str(model), "--allowed-hosts", "lmgen.test", api_key=API_KEY)
    yield server
    server.stop()


def post(server, path: str, body, **headers) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **server.headers, **headers}
    return httpx.post(server.url + path, content=data, headers=headers, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udc00"}]}, "messages[0].content"),
    ("/v1/next_token", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": "a", "model": "x\ud800"}, "model"),
], ids=["completion prompt", "chat content", "next_token prompt", "model name"])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    error = error_of(post(server, path, body), 400)
    assert error["param"] == param
    assert f"Invalid value for '{param}': the text holds a lone UTF-16 surrogate" in error["message"]
    # A surrogate pair is a valid character and goes through.
    ok = post(server, "/v1/completions", {"prompt": "fox \ud83e\udd8a", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_tiny_temperatures_through_the_server_are_greedy(server, temperature):
    body = {"prompt": SEED_PROMPT, "max_tokens": 8, "seed": 1, "logprobs": 0}
    sampled = post(server, "/v1/completions", dict(body, temperature=temperature)).json()["choices"][0]
    greedy = post(server, "/v1/completions", dict(body, temperature=0)).json()["choices"][0]
    assert sampled["text"] == greedy["text"] and sampled["logprobs"] == greedy["logprobs"]


def test_tiny_repetition_penalty_is_a_400(server):
    error = error_of(post(server, "/v1/completions", {"prompt": "x", "repetition_penalty": 1e-300}), 400)
    assert error["param"] == "repetition_penalty" and "0.01" in error["message"]


def test_whole_number_floats_are_integers(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3.0, "min_tokens": 0.0, "n": 1.0,
                                         "seed": 5.0, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    assert error_of(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2.5}), 400)["param"] == "max_tokens"
    assert error_of(post(server, "/v1/completions", {"prompt": "x", "max_tokens": True}), 400)["param"] == "max_tokens"
    ids = post(server, "/v1/next_token", {"token_ids": [464.0, 2068], "top_n": 2.0})
    assert ids.status_code == 200 and ids.json()["prompt_token_ids"] == [464, 2068]


def test_next_token_states_prompt_or_token_ids_in_its_schema(server):
    schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["NextTokenRequest"]
    assert schema["oneOf"] == [{"required": ["prompt"]}, {"required": ["token_ids"]}]
    error = error_of(post(server, "/v1/next_token", {"prompt": "x", "token_ids": [1]}), 400)
    assert error["param"] == "prompt" and "not both" in error["message"]


def test_only_json_bodies_are_run(server):
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        error = error_of(post(server, "/v1/completions", body, **{"Content-Type": content_type}), 415)
        assert error["param"] == "Content-Type" and content_type in error["message"]
    r = httpx.post(server.url + "/v1/completions", content=body, headers=server.headers)  # no Content-Type
    assert error_of(r, 415)["message"] == "The Content-Type header must be application/json, got missing."
    ok = post(server, "/v1/completions", body, **{"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_only_loopback_and_allowed_hosts_are_answered(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host, **server.headers})
        error = error_of(r, 403)
        assert error["param"] == "Host" and host in error["message"] and "--allowed-hosts" in error["message"]
        assert error_of(post(server, "/v1/completions", {"prompt": "x"}, Host=host), 403)["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/", headers={"Host": "evil.example"}).status_code == 403  # the page too
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "lmgen.test",
                 f"LMGEN.test:{port}"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host, **server.headers})
        assert r.status_code == 200, (host, r.text)


def test_a_non_ascii_api_key_is_refused_at_start():
    out = subprocess.run([sys.executable, "-m", "lmgen", "serve", "--api-key", "clé"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("lmgen: error: the API key must be printable ASCII")


def test_stream_options_need_stream(server):
    error = error_of(post(server, "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}),
                     400)
    assert error["param"] == "stream_options" and "stream: true" in error["message"]
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True,
                                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and '"usage":{"prompt_tokens"' in r.text


def test_logprobs_0_still_returns_the_chosen_token(server):
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 2
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top == {token: value}


def test_the_chosen_token_is_added_when_beyond_the_top_n(server):
    r = post(server, "/v1/completions", {"prompt": SEED_PROMPT, "max_tokens": 24, "temperature": 2.0, "seed": 3,
                                         "logprobs": 1, "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    beyond = 0
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and 1 <= len(top) <= 2
        best = max(top.values())
        beyond += len(top) == 2
        assert (len(top) == 2) == (value < best)  # a second entry only for a chosen token outside the top 1
    assert beyond > 0  # at temperature 2 some tokens are not the most likely


@pytest.mark.parametrize("body, param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"function_call": {"name": "f"}}, "function_call"),
])
def test_legacy_functions_are_refused(server, body, param):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **body})
    error = error_of(r, 400)
    assert error["param"] == param and "not supported" in error["message"]


def test_echo_with_logprobs_scores_the_prompt(server, tiny_llama_dir):
    import lmgen

    r = post(server, "/v1/completions", {"prompt": SEED_PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = r.json()["choices"][0]
    assert choice["text"] == SEED_PROMPT and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    lm = lmgen.load(tiny_llama_dir)  # the same random weights (seed 0) as the server's model
    expected = lm.prompt_logprobs(SEED_PROMPT)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([e.logprob for e in expected[1:]], abs=1e-4)
    assert lp["text_offset"] == [len(lm.tokenizer.decode(lm.encode(SEED_PROMPT)[:i])) for i in range(len(expected))]
    assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])
    # A character split over tokens: offsets never point inside it, and the token after it starts after it.
    fox = post(server, "/v1/completions", {"prompt": "fox 🦊 ok", "max_tokens": 0, "echo": True, "logprobs": 0})
    fox = fox.json()["choices"][0]["logprobs"]
    assert fox["text_offset"] == sorted(fox["text_offset"]) and fox["text_offset"][-1] == len("fox 🦊")
    assert fox["tokens"][-1] == " ok"
    # max_tokens 1: the prompt's entries, then the generated token's.
    one = post(server, "/v1/completions", {"prompt": SEED_PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1,
                                           "temperature": 0}).json()["choices"][0]
    assert len(one["logprobs"]["tokens"]) == len(expected) + 1
    assert one["logprobs"]["text_offset"][-1] == len(SEED_PROMPT)
    streamed = post(server, "/v1/completions", {"prompt": SEED_PROMPT, "max_tokens": 0, "echo": True,
                                                "logprobs": 0, "stream": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == SEED_PROMPT and events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_model_id_with_slashes_is_found(server):
    model_id = httpx.get(server.url + "/v1/models", headers=server.headers).json()["data"][0]["id"]
    assert model_id.startswith("/")  # a folder path
    r = httpx.get(f"{server.url}/v1/models/{model_id}", headers=server.headers)
    assert r.status_code == 200 and r.json()["id"] == model_id
    assert httpx.get(f"{server.url}/v1/models{model_id}", headers=server.headers).status_code == 404


def test_unusable_scores_become_a_400_naming_the_api_field():
    from types import SimpleNamespace

    from lmgen.server.app import ServerState

    state = SimpleNamespace(shutting_down=False)
    error = ServerState.failure(state, InvalidScoresError({"min_new_tokens": 3, "temperature": 1e-5}, "hold NaN"))
    assert (error.status, error.param, error.code) == (400, "min_tokens", "invalid_scores")
    assert error.message == ("Generation failed: the next-token scores hold NaN after min_new_tokens=3, "
                             "temperature=1e-05: no token can be chosen; choose other values.")
    model_fault = ServerState.failure(state, InvalidScoresError({}, "hold NaN or +inf"))
    assert model_fault.status == 500 and "in the model's own logits" in model_fault.message
