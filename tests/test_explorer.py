"""The token explorer end to end: `lmgen serve` in a subprocess, the page in a real headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .conftest import SEED_PROMPT

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "explorer.png"
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs chromium: scripts/setup.sh --test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lmgen_serve(model: str, tmp_path: Path, api_key: str | None = None):
    """Run `lmgen serve` on a free port until the block ends; yields its base URL."""
    port = free_port()
    log = (tmp_path / f"serve-{port}.log").open("w+")
    env = {k: v for k, v in os.environ.items() if k != "LMGEN_API_KEY"}
    env.update({"HF_HUB_OFFLINE": "1", **({"LMGEN_API_KEY": api_key} if api_key else {})})
    cmd = [sys.executable, "-m", "lmgen", "serve", "--model", model, "--port", str(port), "-q"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"lmgen serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("lmgen serve did not answer within 180 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    with lmgen_serve(str(tiny_gpt2_dir), tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str, wait: bool = True):
    """A page on the explorer, with its console errors and every URL it requested collected."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.problems, page.urls = [], []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("request", lambda r: page.urls.append(r.url))
    page.goto(url + "/")
    if wait:
        page.wait_for_selector("#bars[data-ids] .bar")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    foreign = [u for u in page.urls if not u.startswith(server + "/")]
    page.close()
    assert not foreign, f"the page requested other sites: {foreign}"


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def next_token(url: str, **body) -> dict:
    r = post(url, "/v1/next_token", body)
    assert r.status_code == 200, r.text
    return r.json()


def type_prompt(page, text: str) -> None:
    """Replace the prompt by typing it key by key, as a person would."""
    box = page.locator("#prompt")
    box.fill("")
    box.press_sequentially(text)


def bars_for(page, ids: list[int]) -> list[dict]:
    """Wait for the bars of this prompt (given by its token ids) and read them."""
    page.wait_for_function("ids => document.querySelector('#bars').dataset.ids === JSON.stringify(ids)", arg=ids)
    return page.eval_on_selector_all("#bars .bar", """bars => bars.map(b => ({
        id: +b.dataset.id, probability: +b.dataset.probability, text: b.dataset.text,
        shown: b.querySelector('.tok').textContent, percent: b.querySelector('.p').textContent}))""")


def assert_bars_match(bars: list[dict], api: dict) -> None:
    assert len(bars) == len(api["tokens"]) == 20
    for bar, tok in zip(bars, api["tokens"]):
        assert bar["id"] == tok["id"] and bar["text"] == tok["text"]
        assert bar["probability"] == tok["probability"]  # the same numbers, not merely close ones
        assert bar["shown"] == (tok["text"].translate(VISIBLE) or "∅")
        assert float(bar["percent"].rstrip("%")) == pytest.approx(100 * tok["probability"], rel=0.06)


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
    for name, kind in [("explorer.js", "text/javascript"), ("explorer.css", "text/css")]:
        r = httpx.get(f"{server}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
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
    page.check("input[value=sample]")
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
    # Greedy needs no seed: the API's greedy text.
    page.check("input[value=greedy]")
    page.fill("#n", "1")
    page.click("#generate")
    greedy = post(server, "/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 12}).json()
    assert generated(page) == [greedy["choices"][0]["text"]]
    assert not page.problems


def test_server_errors_appear_in_the_page(page, server):
    assert page.is_hidden("#error")
    page.check("input[value=sample]")
    page.fill("#top_p", "5")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error-text")
    assert "top_p" in message
    assert page.text_content("#outputs .gen") == ""
    page.click("#error-close")
    assert page.is_hidden("#error")
    # The distribution's errors too: a prompt longer than the model's context.
    page.fill("#prompt", "word " * 300)
    page.wait_for_selector("#error:not([hidden])")
    assert "maximum length of 256 tokens" in page.text_content("#error-text")


def test_the_page_asks_for_the_api_key_of_a_server_that_wants_one(browser, tiny_gpt2_dir, tmp_path):
    with lmgen_serve(str(tiny_gpt2_dir), tmp_path, api_key="s3cret") as url:
        assert post(url, "/v1/next_token", {"prompt": "hi"}).status_code == 401
        page = open_page(browser, url, wait=False)
        page.wait_for_selector("#key-form:not([hidden])")
        assert "API key" in page.text_content("#error-text")
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#bars[data-ids] .bar")
        assert page.get_attribute("#model-name", "title") == httpx.get(url + "/health").json()["model"]
        assert page.is_hidden("#error") and page.is_hidden("#key-form")
        page.close()


def test_screenshot_of_the_explorer(browser, tmp_path, embedded_path):
    """The embedded model's bars and a generated, coloured continuation; LMGEN_WRITE_DOCS=1 writes it to
    docs/explorer.png (a plain run leaves the committed picture alone)."""
    shot = SCREENSHOT if os.environ.get("LMGEN_WRITE_DOCS") == "1" else tmp_path / "explorer.png"
    with lmgen_serve(str(embedded_path), tmp_path) as url:
        page = open_page(browser, url)
        ids = json.loads(page.get_attribute("#bars", "data-ids"))
        second = page.locator("#bars .bar").nth(1)  # force the second most likely token, " the"
        forced = ids + [int(second.get_attribute("data-id"))]
        second.click()
        bars_for(page, forced)
        page.check("input[value=sample]")
        for field, value in [("#temperature", "0.8"), ("#top_p", "0.95"), ("#max_tokens", "32"), ("#n", "2"),
                             ("#seed", "4")]:
            page.fill(field, value)
        page.click("#generate")
        texts = generated(page)
        api = post(url, "/v1/completions", {"prompt": forced, "temperature": 0.8, "top_p": 0.95, "max_tokens": 32,
                                            "n": 2, "seed": 4}).json()
        assert texts == [c["text"] for c in api["choices"]]
        page.locator("#outputs .t").nth(6).hover()
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        assert not page.problems, page.problems
        page.close()
    assert shot.stat().st_size > 20_000
