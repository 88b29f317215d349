"""Fuzz `lmgen serve` from its own /openapi.json with schemathesis: no 5xx, and every answer as documented.

Each operation gets schemathesis' examples, coverage (boundary values) and fuzzing (valid and invalid bodies)
phases, on a tiny random Llama with a 128-token context, all on 127.0.0.1. Lone UTF-16 surrogates, which
schemathesis never generates, are test_hardening.py's.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import make_tiny_llama
from .test_server import Server

# positive_data_acceptance is left out on purpose: the server rightly answers 400 to schema-valid requests
# that its flags or model rule out (n above --max-n, prompt + max_tokens past --max-model-len, token ids past
# the vocabulary, best_of != n, a suffix), limits a static schema cannot state.
# A wider sweep by hand, against a running server (all checks, invalid boundary values too):
#   schemathesis run URL/openapi.json --checks all --max-examples 100 --phases examples,coverage,fuzzing -w 1 \
#     --continue-on-failure --output-sanitize false
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
CONFIG = schemathesis.Config.from_dict({
    "seed": 20240611,  # the same requests on every run: a failure here is a regression, never luck
    # The coverage phase's boundary values for valid fields only: its schema-violating ones would add ~670
    # requests (fuzzing still sends invalid bodies). About 490 requests in all, 20 s on 2 cores.
    "phases": {"coverage": {"generation": {"mode": "positive"}}, "stateful": {"enabled": False}},
    "generation": {"database": "none"},
    "output": {"sanitization": {"enabled": False}},  # else "max_tokens" (a "token") prints as "[Filtered]"
})
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_llama(tmp / "model")
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))  # chat too
    server = Server(tmp, "--model", str(model), "--max-model-len", "128", "--max-n", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None)
def test_fuzz(case, server):
    response = case.call_and_validate(checks=CHECKS, timeout=60)
    sent = response.request
    assert sent.url.startswith(server.url + "/")
    if sent.body:  # bodies go as JSON only: the server answers 415 to any other type
        assert sent.headers["Content-Type"] == "application/json", sent.headers

