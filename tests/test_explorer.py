"""The token explorer end to end: `lmgen serve` in a subprocess, the page in a real headless Chromium."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest

from lmgen.server.explorer import STATIC_DIR

from .browser import NEEDS_CHROMIUM, assert_bars_match, bars_for, lmgen_serve, next_token, open_page, post, type_prompt
from .conftest import SEED_PROMPT

pytestmark = NEEDS_CHROMIUM


# ------------------------------------------------------------------ the JSON endpoint


def test_next_token_endpoint_gives_the_models_distribution(server, tiny_gpt2):
    data = next_token(server, prompt=SEED_PROMPT, top_n=5)
    assert data["model"] == httpx.get(server + "/v1/models").json()["data"][0]["id"]
    assert data["prompt_token_ids"] == tiny_gpt2.encode(SEED_PROMPT)
    expected = tiny_gpt2.top_tokens(SEED_PROMPT, k=5)
    assert [t["id"] for t in data["tokens"]] == [r.token_id for r in expected]
    assert [t["text"] for t in data["tokens"]] == [r.token_text for r in expected]
    for t, r in zip(data["tokens"], expected):
        assert t["probability"] == pytest.approx(r.probability, rel=1e-4)
        assert t["logprob"] == pytest.approx(math.log(t["probability"]), abs=1e-6)
    # Token ids give the same answer as the text; top_n defaults to 20.
    by_ids = next_token(server, token_ids=data["prompt_token_ids"])
    assert len(by_ids["tokens"]) == 20 and by_ids["tokens"][:5] == data["tokens"]
    assert len(next_token(server, prompt="x", top_n=100)["tokens"]) == 100


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "token_ids": [1]}, "prompt"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": [1, 50257]}, "token_ids"),
    ({"token_ids": [-1]}, "token_ids[0]"),
    ({"token_ids": [1, "2"]}, "token_ids[1]"),
    ({"token_ids": "1 2"}, "token_ids"),
    ({"prompt": "hi", "top_n": 0}, "top_n"),
    ({"prompt": "hi", "top_n": 101}, "top_n"),
    ({"prompt": "hi", "top_n": 2.5}, "top_n"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "word " * 300}, "prompt"),
    ({"token_ids": [1] * 300}, "token_ids"),
    ({"prompt": "hi", "model": "gpt-4"}, "model"),
])
def test_next_token_rejects_bad_requests_naming_the_field(server, body, param):
    r = post(server, "/v1/next_token", body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"] and "code" in error


def test_next_token_is_documented_in_the_openapi_schema(server):
    schema = httpx.get(server + "/openapi.json").json()
    op = schema["paths"]["/v1/next_token"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    fields = schema["components"]["schemas"][ref]["properties"]
    assert {"prompt", "token_ids", "top_n"} <= set(fields)
    assert all(fields[f].get("description") for f in ("prompt", "token_ids", "top_n"))
    assert fields["top_n"]["default"] == 20 and fields["top_n"]["maximum"] == 100
    out = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"model", "prompt_token_ids", "tokens"} <= set(schema["components"]["schemas"][out]["properties"])


def test_the_page_and_its_files_are_served_from_the_package(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
    files = sorted(STATIC_DIR.iterdir())
    assert {"explorer.js", "explorer.css", "index.html"} <= {f.name for f in files}
    for f in files:  # every module the page imports, each served from the package
        r = httpx.get(f"{server}/static/{f.name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kinds[f.suffix]), f.name
        assert r.text == f.read_text()
        code = r.text.replace('"http://www.w3.org/2000/svg"', "")  # SVG's namespace names, it loads nothing
        assert "http://" not in code and "https://" not in code  # nothing from elsewhere
    assert httpx.get(server + "/static/..%2Fexplorer.py").status_code == 404
    assert httpx.get(server + "/static/missing.js").status_code == 404


# ------------------------------------------------------------------ the page


def test_typed_prompt_shows_the_apis_distribution_as_bars(page, server):
    model = httpx.get(server + "/v1/models").json()["data"][0]["id"]
    assert page.get_attribute("#model-name", "title") == model
    assert page.text_content("#model-name") == Path(model).name
    prompt = "Once upon a time,\nthere"
    type_prompt(page, prompt)
    api = next_token(server, prompt=prompt, top_n=20)
    assert_bars_match(bars_for(page, api["prompt_token_ids"]), api)
    assert page.text_content("#prompt-info") == f"{len(api['prompt_token_ids'])} tokens"
    assert not page.problems


def test_clicking_a_bar_appends_exactly_that_token(page, server):
    api = next_token(server, prompt=SEED_PROMPT, top_n=20)
    bars = bars_for(page, api["prompt_token_ids"])
    chosen = bars[2]
    page.locator("#bars .bar").nth(2).click()
    assert page.input_value("#prompt") == SEED_PROMPT + chosen["text"]
    forced = api["prompt_token_ids"] + [chosen["id"]]
    # The next bars are for the exact token ids, as the notebook's forcing of " top" was.
    assert_bars_match(bars_for(page, forced), next_token(server, token_ids=forced))
    # One greedy step by key appends the most likely token; undo goes back step by step.
    top = next_token(server, token_ids=forced)["tokens"][0]
    page.keyboard.press("Alt+g")
    bars_for(page, forced + [top["id"]])
    assert page.input_value("#prompt") == SEED_PROMPT + chosen["text"] + top["text"]
    page.keyboard.press("Alt+s")  # a sampled step: one of the tokens shown
    page.wait_for_function("n => JSON.parse(document.querySelector('#bars').dataset.ids || '[]').length === n",
                           arg=len(forced) + 2)
    page.click("#undo")
    bars_for(page, forced + [top["id"]])
    page.click("#undo")
    page.click("#undo")
    bars_for(page, api["prompt_token_ids"])
    assert page.input_value("#prompt") == SEED_PROMPT
    assert page.is_disabled("#undo")
    assert not page.problems


def generated(page) -> list[str]:
    page.wait_for_selector("#outputs[data-state=done]")
    return page.eval_on_selector_all("#outputs .gen", "gens => gens.map(g => g.textContent)")


def test_generation_streams_the_apis_text_coloured_by_probability(page, server):
    prompt = "The meaning of life is"
    type_prompt(page, prompt)
    for field, value in [("#temperature", "0.8"), ("#top_k", "50"), ("#top_p", "0.95"), ("#max_tokens", "12"),
                         ("#n", "2"), ("#seed", "11")]:
        page.fill(field, value)
    page.click("#generate")
    texts = generated(page)
    api = post(server, "/v1/completions", {"prompt": prompt, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
                                           "max_tokens": 12, "n": 2, "seed": 11})
    assert api.status_code == 200, api.text
    assert texts == [c["text"] for c in sorted(api.json()["choices"], key=lambda c: c["index"])]
    assert texts[0] != texts[1]
    # Every token is coloured by its probability, and hovering one lists its alternatives.
    spans = page.eval_on_selector_all("#outputs .output:first-child .t", """ts => ts.map(t => ({
        p: +t.dataset.probability, cls: [...t.classList].find(c => /^p[0-4]$/.test(c)), text: t.textContent}))""")
    assert "".join(s["text"] for s in spans) == texts[0]
    coloured = [s for s in spans if s["cls"] is not None]
    assert len(coloured) >= 10  # a token cut inside a character shares its span with the next one
    for s in coloured:
        assert 0 < s["p"] <= 1 and s["cls"] == f"p{sum(s['p'] >= b for b in (0.05, 0.2, 0.5, 0.8))}"
    page.locator("#outputs .t").first.hover()
    # The top 5 alternatives, and the chosen token when it is not among them (logprobs + 1, as OpenAI sends).
    assert page.is_visible("#tip") and len(page.locator("#tip tr").all()) in (5, 6)
    assert re.fullmatch(r"24 tokens in [\d.]+ s · [\d.]+ tokens/s", page.text_content("#speed"))
    # Temperature 0 is greedy: the API's greedy text.
    page.fill("#temperature", "0")
    page.fill("#n", "1")
    page.click("#generate")
    greedy = post(server, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 12}).json()
    assert generated(page) == [greedy["choices"][0]["text"]]
    assert not page.problems


def test_server_errors_appear_in_the_page(page, server):
    assert page.is_hidden("#error")
    with page.expect_response(lambda r: r.url.endswith("/v1/next_token") and r.status == 400):
        page.fill("#top_p", "5")  # the distribution is asked for first, and refused
    page.wait_for_selector("#error:not([hidden])")
    page.click("#error-close")
    assert page.is_hidden("#error")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as info:
        page.click("#generate")
    assert info.value.status == 400
    page.wait_for_selector("#outputs[data-state=done]")
    page.wait_for_selector("#error:not([hidden])")
    error = post(server, "/v1/completions", info.value.request.post_data_json).json()["error"]
    assert page.text_content("#error-text") == f"{error['message']} (parameter: top_p)"
    assert page.text_content("#outputs .gen") == ""
    # The distribution's errors too: a prompt longer than the model's context.
    page.fill("#top_p", "")
    page.fill("#prompt", "word " * 300)
    page.wait_for_function("() => document.querySelector('#error-text').textContent.includes('maximum length')")
    assert "maximum length of 256 tokens" in page.text_content("#error-text")


DENY_STORAGE = """Object.defineProperty(window, "sessionStorage", {
    get() { throw new DOMException("The document is sandboxed", "SecurityError"); }})"""


def test_the_page_asks_for_the_api_key_of_a_server_that_wants_one(browser, tiny_gpt2_dir, tmp_path):
    with lmgen_serve(str(tiny_gpt2_dir), tmp_path, api_key="s3cret") as url:
        assert post(url, "/v1/next_token", {"prompt": "hi"}).status_code == 401
        # A cross-site frame (a notebook on another site) may be denied storage: the key is then kept in memory.
        for script in (None, DENY_STORAGE):
            page = open_page(browser, url, wait=False, init_script=script)
            page.wait_for_selector("#key-form:not([hidden])")
            assert "API key" in page.text_content("#error-text")
            page.fill("#api-key", "s3cret")
            page.press("#api-key", "Enter")
            page.wait_for_selector("#bars[data-ids] .bar")
            assert page.get_attribute("#model-name", "title") == httpx.get(url + "/health").json()["model"]
            assert page.is_hidden("#error") and page.is_hidden("#key-form")
            page.fill("#max_tokens", "4")
            page.click("#generate")  # completions and scores carry the key too
            page.wait_for_selector("#outputs[data-state=done] .plot")
            problems = [p for p in page.problems if "status of 401" not in p]  # the asks before the key
            assert page.is_hidden("#error") and not problems, problems
            page.close()
