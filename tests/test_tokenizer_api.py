"""vLLM's tokenizer endpoints on `lmgen serve`: /tokenize, /detokenize and /tokenizer_info, behind the API key."""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import make_tiny_llama
from .test_server import API_KEY, Server

EOS = "<|endoftext|>"  # the GPT-2 BPE's one special token: BOS and EOS of the tiny Llama (id 50256)
TEMPLATE = ("{% for m in messages %}" + EOS + "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
TEXTS = ["Hello world", "  two  spaces and a\ttab\n", "héllo wörld ✓ 日本語 🙂", f"a{EOS}b", "12345.678"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokenizer-api")
    model = make_tiny_llama(tmp / "model")
    # A tokenizer that adds BOS (so add_special_tokens shows) and has a chat template.
    (model / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": TEMPLATE}))
    server = Server(tmp, "--model", str(model), "--max-model-len", "128", api_key=API_KEY)
    yield server
    server.stop()


def tokenize(server: Server, **body) -> dict:
    r = server.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def detokenize(server: Server, tokens: list[int]) -> str:
    r = server.post("/detokenize", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_tokenize_round_trips_and_counts_as_completions_do(tiny):
    for text in TEXTS:
        full = tokenize(tiny, prompt=text, return_token_strs=True)
        assert set(full) == {"count", "max_model_len", "tokens", "token_strs"}
        assert full["count"] == len(full["tokens"]) == len(full["token_strs"]) and full["max_model_len"] == 128
        assert full["tokens"][0] == 50256 and full["token_strs"][0] == EOS  # add_special_tokens defaults to true
        # /v1/completions tokenizes a text prompt the same way.
        used = tiny.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()["usage"]
        assert used["prompt_tokens"] == full["count"]
        plain = tokenize(tiny, prompt=text, add_special_tokens=False)
        assert plain["tokens"] == full["tokens"][1:] and plain["token_strs"] is None
        assert detokenize(tiny, plain["tokens"]) == text
        assert detokenize(tiny, full["tokens"]) == EOS + text
    assert tokenize(tiny, prompt="", add_special_tokens=False)["tokens"] == []


def test_tokenizer_info_tokens_tokenize_to_their_ids(tiny):
    info = httpx.get(tiny.url + "/tokenizer_info", headers=tiny.headers).json()
    assert info["eos_token"] == info["bos_token"] == EOS and info["eos_token_id"] == info["bos_token_id"] == 50256
    assert info["eos_token_ids"] == [50256] and info["vocab_size"] == 50257 and info["model_max_length"] == 128
    assert info["chat_template"] == TEMPLATE
    # lm-eval's remote tokenizer finds the ids this way: the token's text through /tokenize.
    for name in ("bos", "eos"):
        assert tokenize(tiny, prompt=info[f"{name}_token"], add_special_tokens=False)["tokens"] == [50256]


def test_tokenize_messages_as_chat_completions_do(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}]
    chat = tokenize(tiny, messages=messages)
    used = tiny.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == used["prompt_tokens"]
    opened = detokenize(tiny, chat["tokens"])
    assert opened == f"{EOS}system: Be brief.\n{EOS}user: Say hi.\nassistant:"
    closed = tokenize(tiny, messages=messages, add_generation_prompt=False)
    assert detokenize(tiny, closed["tokens"]) + "assistant:" == opened
    # add_special_tokens defaults to false for messages (the template has them), as in vLLM.
    assert tokenize(tiny, messages=messages, add_special_tokens=True)["tokens"] == [50256] + chat["tokens"]


BAD = [
    ("/detokenize", {"tokens": [5, 50257]}, 400, "tokens", "[0, 50257)"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]", "-1"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens[0]", "integer"),
    ("/detokenize", {"tokens": "12"}, 400, "tokens", "list"),
    ("/detokenize", {}, 400, "tokens", "Missing"),
    ("/tokenize", {}, 400, "prompt", "either prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "prompt", "not both"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens", "boolean"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text"),
    ("/tokenize", {"prompt": "x", "model": "gpt-9"}, 404, "model", "gpt-9"),
    ("/tokenize", b'{"prompt": "a\\ud800b"}', 400, "prompt", "surrogate"),  # not Unicode: no tokenizer takes it
]


@pytest.mark.parametrize("path,body,status,param,text", BAD, ids=[f"{b[0]} {b[1]!s}" for b in BAD])
def test_bad_requests_name_the_field(tiny, path, body, status, param, text):
    kw = {"content": body, "headers": dict(tiny.headers, **{"Content-Type": "application/json"})} \
        if isinstance(body, bytes) else {"json": body}
    r = tiny.post(path, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_tokenizer_routes_need_the_api_key(tiny):
    for method, path, body in (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/tokenizer_info", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, tiny.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    schema = httpx.get(tiny.url + "/openapi.json").json()
    assert {"/tokenize", "/detokenize", "/tokenizer_info"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["TokenizeRequest"]["properties"]["add_special_tokens"]["description"]
