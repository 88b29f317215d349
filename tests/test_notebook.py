"""The notebook half: examples/language-generation.ipynb run headless (nbclient) against the API's own numbers,
lmgen.load()'s progress bar, and lm.explore() framed by a "notebook" page from another origin in a real Chromium."""

from __future__ import annotations

import http.server
import io
import json
import re
import runpy
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import lmgen
from lmgen import loading
from lmgen.server.notebook import NOTEBOOK_ORIGINS

from .conftest import SEED_IDS, SEED_PROMPT
from .test_display import Elements

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOK = EXAMPLES / "language-generation.ipynb"
NO_NETWORK = "http://127.0.0.1:9"  # every proxied request fails at once: no cell may need the network


# ------------------------------------------------------------------ the notebook, run headless


@pytest.fixture(scope="module")
def executed(embedded_path):
    """The notebook after a headless run on the venv's python3 kernel, with the network off."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": NO_NETWORK,
               "HTTPS_PROXY": NO_NETWORK, "ALL_PROXY": NO_NETWORK, "NO_PROXY": ""}
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for name, value in offline.items():
            mp.setenv(name, value)
            mp.setenv(name.lower(), value)
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(EXAMPLES)}})
        client.execute()  # raises CellExecutionError, naming the cell, when one fails
    return nb


def cell(nb, needle: str):
    """The one code cell whose source holds `needle`."""
    found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"{len(found)} code cells hold {needle!r}"
    return found[0]


def text_of(c) -> str:
    """A cell's stdout, stderr and plain-text results."""
    parts = [o.text for o in c.outputs if o.output_type == "stream"]
    parts += [o.data.get("text/plain", "") for o in c.outputs if o.output_type in ("execute_result", "display_data")]
    return "\n".join(parts)


def html_of(c) -> Elements:
    (html,) = [o.data["text/html"] for o in c.outputs if "text/html" in o.get("data", {})]
    return Elements(html)


def test_every_cell_runs_without_error(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert len(code) >= 20 and all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    loading_cell = cell(executed, "lmgen.load()")
    assert "Warning" not in text_of(loading_cell) and "ipywidgets" not in text_of(loading_cell)


def test_the_encoding_cell_shows_gpt2s_seed_ids_then_the_models(executed, smollm_default):
    encoding = cell(executed, 'load_tokenizer("gpt2")')
    shown = text_of(encoding)
    assert f"GPT-2's ids: {SEED_IDS}" in shown
    assert f"the model's ids: {smollm_default.tokenizer.encode(SEED_PROMPT)}" in shown
    seed_ids = ", ".join(map(str, SEED_IDS))
    for c in executed.cells:  # GPT-2's ids are that cell's alone: the model is fed its own
        if c is not encoding:
            everything = c.source + json.dumps(c.get("outputs", []))
            assert seed_ids not in everything and "load_tokenizer" not in c.source, c.source


def test_the_top_tokens_table_holds_the_apis_probabilities(executed, smollm_default):
    expected = smollm_default.top_tokens(SEED_PROMPT, k=10)
    rows = html_of(cell(executed, "lm.top_tokens(")).tokens
    assert [int(r["data-token-id"]) for r in rows] == [t.token_id for t in expected]
    assert [float(r["data-probability"]) for r in rows] == pytest.approx([t.probability for t in expected],
                                                                          rel=1e-6, abs=1e-9)
    argmax = text_of(cell(executed, "next_token_probs.argmax()"))
    assert argmax == repr((expected[0].token_id, expected[0].token_text))


def test_the_score_xray_holds_the_apis_numbers(executed, smollm_default):
    s = smollm_default.score(SEED_PROMPT + " the lazy dog.")
    page = html_of(cell(executed, 'lm.score(text + " the lazy dog.")'))
    assert float(page.root["data-perplexity"]) == pytest.approx(s.perplexity, rel=1e-6)
    assert f"perplexity {s.perplexity:.4f}" in page.text
    assert [int(t["data-token-id"]) for t in page.tokens] == s.token_ids
    got = [float(t["data-logprob"]) for t in page.tokens[1:]]
    assert got == pytest.approx(s.logprobs, rel=1e-6, abs=1e-7)
    assert [int(t["data-rank"]) for t in page.tokens[1:]] == [e.rank for e in s.tokens]
    odd = html_of(cell(executed, "lazy cucumber"))
    assert float(odd.root["data-perplexity"]) > s.perplexity  # an odd ending costs more


def test_the_distributions_and_the_generation_hold_the_apis_numbers(executed, smollm_default):
    ids = smollm_default.tokenizer.encode(SEED_PROMPT)
    for needle, params in (("lm.distribution(input_ids)", {}), ("top_k=5", dict(temperature=0.7, top_k=5)),
                           ("top_p=0.9", dict(top_p=0.9)), ("min_p=0.05", dict(min_p=0.05))):
        d = smollm_default.distribution(ids, **params)
        page = html_of(cell(executed, needle))
        assert int(page.root["data-candidates"]) == d.candidates, needle
        rows = d.top(20)
        assert [int(r["data-token-id"]) for r in page.tokens] == [i for i, _, _, _ in rows]
        assert [float(r["data-processed-probability"]) for r in page.tokens] == pytest.approx(
            [q for _, _, q, _ in rows], rel=1e-6, abs=1e-9)
        assert [r["data-removed-by"] for r in page.tokens] == [why or "" for _, _, _, why in rows]
    g = smollm_default.generate(ids, do_sample=True, max_new_tokens=24, seed=2, logprobs=5)[0]
    spans = html_of(cell(executed, "logprobs=5")).tokens
    assert [int(s["data-token-id"]) for s in spans] == g.token_ids
    assert [float(s["data-logprob"]) for s in spans] == pytest.approx([e.logprob for e in g.logprobs], abs=1e-6)


def test_greedy_forcing_and_sampling_cells(executed, smollm_default):
    ids = smollm_default.tokenizer.encode(SEED_PROMPT)
    greedy = smollm_default.generate(ids, max_new_tokens=8)[0]
    assert text_of(cell(executed, "greedy_ids(input_ids)")) == repr(smollm_default.tokenizer.decode(
        ids + greedy.token_ids))
    assert text_of(cell(executed, "== greedy_generated")).endswith("True")  # the loop and generate agree
    forcing = cell(executed, 'lm.tokenizer.encode(" top")')
    top = smollm_default.tokenizer.encode(" top")
    assert f'" top" is {top}' in text_of(forcing)
    forced = smollm_default.generate(ids + top, max_new_tokens=8)[0]
    assert repr(smollm_default.tokenizer.decode(ids + top + forced.token_ids)) in text_of(forcing)
    for c in executed.cells:  # ids are the tokenizer's to give: GPT-2's 1353 is "oun" here
        assert not re.search(r"\b(1353|1466)\b", c.source), c.source
    sampled = text_of(cell(executed, "weighted=weighted"))
    assert sampled.count("unweighted: ") == 2 and sampled.count("  weighted: ") == 2
    pipeline = text_of(cell(executed, 'lmgen.pipeline("text-generation"')).strip().splitlines()
    assert len(pipeline) == 5 and all(line[1:].startswith(SEED_PROMPT) for line in pipeline)  # the prompt's reprs


def test_the_notebook_is_stored_without_outputs_as_its_script_writes_it():
    stored = json.loads(NOTEBOOK.read_text())
    code = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    script = runpy.run_path(str(EXAMPLES / "make_notebook.py"))  # as a module: it writes nothing
    assert script["notebook"]() == stored  # python examples/make_notebook.py after editing its cells


# ------------------------------------------------------------------ the loading bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_shows_a_bar_on_a_terminal_once_it_takes_a_while(tiny_gpt2_dir, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    lmgen.load(tiny_gpt2_dir)  # well under LOAD_BAR_DELAY: a fast load shows nothing
    assert terminal.getvalue() == ""
    monkeypatch.setattr(loading, "LOAD_BAR_DELAY", 0)
    lmgen.load(tiny_gpt2_dir)
    assert "loading model" in terminal.getvalue() and "tensors" in terminal.getvalue()
    shown = len(terminal.getvalue())
    lmgen.load(tiny_gpt2_dir, progress=False)
    assert len(terminal.getvalue()) == shown


def test_loading_off_a_terminal_makes_no_bar_and_a_callable_gets_the_counts(tiny_gpt2_dir, monkeypatch):
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    monkeypatch.setattr(loading, "LOAD_BAR_DELAY", 0)
    made = []
    monkeypatch.setattr(loading, "_loading_bar", lambda *args: made.append(args))
    lmgen.load(tiny_gpt2_dir)
    assert made == [] and piped.getvalue() == ""
    calls = []
    lmgen.load(tiny_gpt2_dir, progress=lambda done, total: calls.append((done, total)))
    assert calls and [d for d, _ in calls] == list(range(1, len(calls) + 1)) and made == []
    with pytest.raises(ValueError, match="progress must be"):
        lmgen.load(tiny_gpt2_dir, progress="yes")


def test_loading_in_a_kernel_shows_the_notebook_widget(tiny_gpt2_dir):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipywidgets")
    source = (f"import lmgen\nfrom lmgen import loading\nloading.LOAD_BAR_DELAY = 0\n"
              f"lm = lmgen.load({str(tiny_gpt2_dir)!r})\nprint(lm.vocab_size)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, outputs  # tqdm.notebook's bar, not text on stderr
    assert not [o for o in outputs if o.get("name") == "stderr"]
    assert "50257" in text_of(nb.cells[0])


# ------------------------------------------------------------------ lm.explore()


def csp_frame_ancestors(response) -> list[str]:
    policy = response.headers["content-security-policy"]
    (directive,) = [d.strip() for d in policy.split(";") if d.strip().startswith("frame-ancestors")]
    return directive.split()[1:]


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def stopped_cleanly():
    """Assert that the threads started in the block (server, engine, stopper) have all ended after it."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.name.startswith("lmgen") and t.is_alive()]
    assert not left, left


def test_explore_serves_the_page_framable_by_a_notebook(tiny_gpt2):
    with stopped_cleanly():
        explorer = tiny_gpt2.explore(frame_ancestors=["https://hub.example.org"])
        try:
            assert explorer.running and re.fullmatch(r"http://127\.0\.0\.1:\d+/", explorer.url)
            page = httpx.get(explorer.url, timeout=30)
            assert page.status_code == 200 and "token explorer" in page.text
            assert csp_frame_ancestors(page) == [*NOTEBOOK_ORIGINS, "https://hub.example.org"]
            assert "http://localhost:*" in NOTEBOOK_ORIGINS and "vscode-webview:" in NOTEBOOK_ORIGINS
            # The frame asks by a loopback name, which the Host check answers; a rebinding page's name it refuses.
            for name in ("localhost", "127.0.0.1"):
                r = httpx.get(explorer.url, headers={"Host": f"{name}:{port_of(explorer.url)}"}, timeout=30)
                assert r.status_code == 200
            assert httpx.get(explorer.url, headers={"Host": "evil.example"}, timeout=30).status_code == 403
            frame = explorer._repr_html_()
            assert f'<iframe class="lmgen-explorer" src="{explorer.url}"' in frame
            assert repr(explorer) == f"Explorer({explorer.url!r}, running)"
        finally:
            explorer.stop()
    assert not explorer.running and not port_is_open(port_of(explorer.url))
    assert "stopped" in explorer._repr_html_() and "<iframe" not in explorer._repr_html_()
    explorer.stop()  # a second stop does nothing


def test_lmgen_serve_keeps_frame_ancestors_none(tiny_gpt2):
    from fastapi.testclient import TestClient

    from lmgen.engine import Engine
    from lmgen.server import create_app

    with TestClient(create_app(Engine(tiny_gpt2, max_concurrent=1))) as client:
        assert csp_frame_ancestors(client.get("/")) == ["'none'"]
        assert csp_frame_ancestors(client.get("/static/explorer.js")) == ["'none'"]


def test_explore_refuses_an_origin_that_would_break_the_policy(tiny_gpt2):
    for bad in ("https://a.example; script-src *", "'unsafe-inline'", "", "a b"):
        with pytest.raises(ValueError, match="frame_ancestors"):
            tiny_gpt2.explore(frame_ancestors=[bad])


def test_explore_as_a_context_manager(tiny_gpt2):
    with stopped_cleanly():
        with tiny_gpt2.explore() as explorer:
            assert httpx.get(explorer.url + "health", timeout=30).status_code == 200
    assert not explorer.running and not port_is_open(port_of(explorer.url))


@contextmanager
def notebook_page(body: str, host: str):
    """A tiny "notebook" page holding `body`, served from `host` on a free port of its own; yields its URL."""
    page = f"<!doctype html><html><head><title>notebook</title></head><body>{body}</body></html>".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1" if host == "localhost" else host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def framed_explorer(browser, notebook_url: str):
    """Open the notebook page; return it and the explorer's frame in it, once the frame has navigated."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.goto(notebook_url)
    page.wait_for_selector("iframe.lmgen-explorer")
    frame = page.frame_locator("iframe.lmgen-explorer")
    return page, frame


# A notebook on 127.0.0.1 frames the explorer from another origin (its own port); one on localhost (Jupyter's usual
# URL) from another site, where the browser denies the frame its storage (the page keeps its key in memory then).
@pytest.mark.parametrize("notebook_host", ["127.0.0.1", "localhost"])
def test_a_notebook_page_shows_the_explorer_in_its_frame(browser, tiny_gpt2, notebook_host):
    with stopped_cleanly():
        explorer = tiny_gpt2.explore()
        try:
            with notebook_page(explorer._repr_html_(), notebook_host) as url:
                assert url.startswith(f"http://{notebook_host}:") and url != explorer.url
                page, frame = framed_explorer(browser, url)
                frame.locator("#bars .bar").first.wait_for(timeout=15_000)
                name = frame.locator("#model-name")
                deadline = time.monotonic() + 30
                while name.text_content() in ("…", "") and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert name.text_content() == Path(tiny_gpt2.name).name
                bars = frame.locator("#bars .bar")
                expected = tiny_gpt2.top_tokens(SEED_PROMPT, k=1)[0]
                first_id = bars.first.evaluate("b => b.dataset.tokenId ?? b.dataset.id")  # the page names it so
                assert bars.count() == 20 and int(first_id) == expected.token_id
                (explorer_frame,) = [f for f in page.frames if f.url == explorer.url]
                assert explorer_frame.evaluate("location.href") == explorer.url  # its own document, not an error
                assert not page.problems, page.problems
                page.close()
        finally:
            explorer.stop()
    assert not explorer.running and not port_is_open(port_of(explorer.url))


def test_a_page_from_another_origin_is_refused_the_frame_until_it_is_named(browser, tiny_gpt2):
    # 127.0.0.2 is the loopback too, but no notebook's origin: the browser must refuse to show the explorer there.
    with tiny_gpt2.explore() as explorer, notebook_page(explorer._repr_html_(), "127.0.0.2") as url:
        page, frame = framed_explorer(browser, url)
        deadline = time.monotonic() + 30
        while not any(f.url.startswith("chrome-error:") for f in page.frames) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [f.url for f in page.frames if f is not page.main_frame] == ["chrome-error://chromewebdata/"]
        assert frame.locator("#bars").count() == 0
        page.close()
    with tiny_gpt2.explore(frame_ancestors=["http://127.0.0.2:*"]) as explorer, \
            notebook_page(explorer._repr_html_(), "127.0.0.2") as url:
        page, frame = framed_explorer(browser, url)
        frame.locator("#model-name").wait_for()  # the page's own document is in the frame now
        assert [f.url for f in page.frames if f is not page.main_frame] == [explorer.url]
        page.close()
