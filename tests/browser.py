"""What the browser tests share: Debian's chromium, `lmgen serve` in a subprocess, and reading the explorer's bars."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from lmgen.tokenizer import VISIBLE  # noqa: F401 (the page tests read it from here)

CHROMIUM = "/usr/bin/chromium"
NEEDS_CHROMIUM = pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"),
                                    reason="needs chromium: scripts/setup.sh --test")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

def launch_chromium(playwright):
    """Debian's chromium, headless, with nothing reaching for the network."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


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


def open_page(browser, url: str, wait: bool = True, width: int = 1280, init_script: str | None = None):
    """A page on the explorer, with its console errors and every URL it requested collected."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    if init_script:
        page.add_init_script(init_script)
    page.set_default_timeout(30_000)
    page.problems, page.urls = [], []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("request", lambda r: page.urls.append(r.url))
    page.goto(url + "/")
    if wait:
        page.wait_for_selector("#bars[data-ids] .bar")
    return page


def close_page(page, url: str) -> None:
    """Close it, checking it asked nothing of other sites."""
    foreign = [u for u in page.urls if not u.startswith(url + "/")]
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


BAR_FIELDS = """bars => bars.map(b => ({
    id: +b.dataset.tokenId, raw: +b.dataset.raw, processed: +b.dataset.processed, text: b.dataset.text,
    removed_by: b.dataset.removedBy || null, removed: b.classList.contains('removed'),
    why: b.querySelector('.why').textContent,
    shown: b.querySelector('.tok').textContent, percent: b.querySelector('.p.raw').textContent,
    processed_percent: b.querySelector('.p.processed').textContent}))"""


def bars_for(page, ids: list[int]) -> list[dict]:
    """Wait for the bars of this prompt (given by its token ids) and read them."""
    page.wait_for_function("ids => document.querySelector('#bars').dataset.ids === JSON.stringify(ids)", arg=ids)
    return page.eval_on_selector_all("#bars .bar", BAR_FIELDS)


def assert_bars_match(bars: list[dict], api: dict) -> None:
    assert len(bars) == len(api["tokens"]) == 20
    for bar, tok in zip(bars, api["tokens"]):
        assert bar["id"] == tok["id"] and bar["text"] == tok["text"]
        assert bar["raw"] == tok["probability"]  # the same numbers, not merely close ones
        assert bar["processed"] == tok["processed_probability"] and bar["removed_by"] == tok["removed_by"]
        assert bar["shown"] == (tok["text"].translate(VISIBLE) or "∅")
        assert float(bar["percent"].rstrip("%")) == pytest.approx(100 * tok["probability"], rel=0.06)
