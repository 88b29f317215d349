"""lmgen.display: the notebook's HTML views of top_tokens, Generation, Score and Distribution, and their registration
with IPython (only when it is already running)."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from html.parser import HTMLParser

import pytest

from lmgen import display
from lmgen.generate import Generation, TokenLogprob
from lmgen.lm import Score, TokenProb, TopTokens

from .conftest import SEED_PROMPT

EVIL = "<script>alert('x')</script>"


class Elements(HTMLParser):
    """Every element with a data-token-id (its attributes and text), and every attribute of the root element."""

    def __init__(self, text: str):
        super().__init__()
        self.tokens: list[dict] = []
        self.root: dict | None = None
        self._open: dict | None = None
        self.text = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.root is None:
            self.root = attrs
        if "data-token-id" in attrs:
            self._open = dict(attrs, tag=tag, text="")
            self.tokens.append(self._open)

    def handle_endtag(self, tag):
        if self._open is not None and tag == self._open["tag"]:
            self._open = None

    def handle_data(self, data):
        self.text += data
        if self._open is not None:
            self._open["text"] += data


def parsed(html: str) -> Elements:
    assert html and html.lstrip().startswith("<")
    return Elements(html)


# ------------------------------------------------------------------ the renderers


def test_top_tokens_table_holds_each_rows_numbers(tiny_gpt2):
    top = tiny_gpt2.top_tokens(SEED_PROMPT, k=5)
    page = parsed(display.top_tokens_html(top))
    assert [int(r["data-token-id"]) for r in page.tokens] == [t.token_id for t in top]
    assert [float(r["data-probability"]) for r in page.tokens] == [t.probability for t in top]  # exactly
    for row, t in zip(page.tokens, top):
        assert row["title"] == f"p = {t.probability:.4f}"
        cells = row["text"]
        assert t.token_text.replace(" ", "␣") in cells and str(t.token_id) in cells
        assert f"{100 * t.probability:.2f}%" in cells or f"{100 * t.probability:.1e}%" in cells
    assert display.top_tokens_html(TopTokens()) is None


def test_generation_colours_each_token_by_its_logprob(tiny_gpt2):
    g = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=6, logprobs=3)[0]
    page = parsed(display.generation_html(g))
    assert page.root["data-finish-reason"] == g.finish_reason
    assert [int(s["data-token-id"]) for s in page.tokens] == g.token_ids
    for span, entry in zip(page.tokens, g.logprobs):
        assert float(span["data-logprob"]) == entry.logprob
        assert float(span["data-probability"]) == math.exp(entry.logprob)
        assert int(span["data-rank"]) == entry.rank == 1  # greedy: each token was the most likely
        assert span["text"] == tiny_gpt2.tokenizer.token_text(entry.token_id)
        assert "background: hsl(" in span["style"]
        for alternative, logprob in entry.top:  # the alternatives on hover, with their probabilities
            assert f"{math.exp(logprob):.4f}" in span["title"]
            assert tiny_gpt2.tokenizer.token_text(alternative).replace(" ", "␣") in span["title"]
    assert page.text.startswith(SEED_PROMPT)  # the prompt, in grey, before the tokens
    mean = sum(e.logprob for e in g.logprobs) / len(g.logprobs)
    assert f"mean logprob {mean:.4f}" in page.text


def test_generation_without_logprobs_or_token_text_has_no_html(tiny_gpt2):
    plain = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=2)[0]
    assert plain.token_text is not None and display.generation_html(plain) is None
    bare = Generation("x", [1], "length", [0], logprobs=[TokenLogprob(1, -0.5, [], 1, 0.1)])
    assert display.generation_html(bare) is None  # made outside LM.generate: no token text to show


def test_score_xray_holds_each_tokens_surprisal_rank_and_the_perplexity(tiny_gpt2):
    s = tiny_gpt2.score(SEED_PROMPT + " the lazy dog", top_n=3)
    page = parsed(display.score_html(s))
    assert float(page.root["data-perplexity"]) == s.perplexity
    assert float(page.root["data-total-logprob"]) == s.total_logprob
    assert f"perplexity {s.perplexity:.4f}" in page.text
    assert [int(t["data-token-id"]) for t in page.tokens] == s.token_ids
    first, *rest = page.tokens
    assert "data-logprob" not in first  # nothing predicts the first token
    for span, entry, logprob in zip(rest, s.tokens, s.logprobs):
        assert float(span["data-logprob"]) == entry.logprob == logprob
        assert int(span["data-rank"]) == entry.rank and float(span["data-entropy"]) == entry.entropy
        assert f"rank {entry.rank}" in span["title"] and f"p {math.exp(logprob):.4f}" in span["title"]
        assert f"surprisal {-logprob:.2f} nats" in span["title"]
        assert len(entry.top) == 3 and all(f"{math.exp(lp):.4f}" in span["title"] for _, lp in entry.top)
        assert display.surprisal_colour(-logprob) in span["style"]
    assert display.score_html(Score([1, 2], [-1.0], -1.0, math.e, [TokenLogprob(2, -1.0)])) is None


def test_distribution_shows_raw_and_processed_with_the_removed_greyed(tiny_gpt2):
    d = tiny_gpt2.distribution(SEED_PROMPT, top_k=3, temperature=0.8)
    page = parsed(display.distribution_html(d))
    assert int(page.root["data-candidates"]) == d.candidates == 3
    assert float(page.root["data-kept-mass"]) == d.kept_mass
    assert float(page.root["data-entropy"]) == d.entropy
    assert float(page.root["data-processed-entropy"]) == d.processed_entropy
    rows = d.top(display.DISTRIBUTION_ROWS)
    assert len(page.tokens) == len(rows) == 20
    for row, (token_id, p, q, removed_by) in zip(page.tokens, rows):
        assert int(row["data-token-id"]) == token_id
        assert float(row["data-probability"]) == p and float(row["data-processed-probability"]) == q
        assert row["data-removed-by"] == (removed_by or "")
        assert tiny_gpt2.tokenizer.token_text(token_id).replace(" ", "␣") in row["text"]
        if removed_by:
            assert q == 0 and f"removed by {removed_by}" in row["text"] and "opacity" in row["style"]
    assert [r["data-removed-by"] for r in page.tokens[:3]] == [""] * 3
    assert {r["data-removed-by"] for r in page.tokens[3:]} == {"top_k"}
    assert "temperature → top_k" in page.text and f"top_k {d.removed['top_k']}" in page.text
    del d.token_text  # a Distribution made without LM.distribution: its ids alone
    assert f"#{rows[0][0]}" in parsed(display.distribution_html(d)).tokens[0]["text"]


def test_token_text_is_escaped_everywhere(tiny_gpt2):
    evil = lambda token_id: EVIL  # noqa: E731
    top = TopTokens([TokenProb(7, EVIL, 0.5)])
    g = Generation(EVIL, [7], "length", [3], logprobs=[TokenLogprob(7, -0.2, [(7, -0.2), (8, -2.0)], 1, 0.5)])
    g.token_text = evil
    s = Score([3, 7], [-0.2], -0.2, math.exp(0.2), [TokenLogprob(7, -0.2, [(8, -2.0)], 2, 0.5)], evil)
    d = tiny_gpt2.distribution(SEED_PROMPT, top_k=2)
    d.token_text = evil
    for html in (display.top_tokens_html(top), display.generation_html(g), display.score_html(s),
                 display.distribution_html(d)):
        assert "<script" not in html and "&lt;script&gt;" in html
        assert EVIL in Elements(html).text or any(EVIL in t.get("title", "") for t in Elements(html).tokens)


def test_percent_and_colours():
    assert display.percent(0.8245) == "82.45%" and display.percent(0) == "0.00%"
    assert display.percent(3.2e-7) == "3.2e-05%"  # never a misleading 0.00%
    assert display.probability_colour(1.0) == "hsl(120, 75%, 80%)"
    assert display.probability_colour(0.0) == "hsl(0, 75%, 80%)"
    assert display.surprisal_colour(0) == "rgba(229, 57, 53, 0.000)"
    assert display.surprisal_colour(50) == display.surprisal_colour(display.MAX_SURPRISAL)


# ------------------------------------------------------------------ registration and plain text


def test_register_does_nothing_without_a_running_ipython(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert display.register() is False
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert display.register() is False  # imported, but no shell is running


def test_import_lmgen_never_imports_ipython():
    code = "import sys, lmgen; print('IPython' in sys.modules, 'lmgen.display' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_import_lmgen_in_a_running_shell_registers_the_html_views():
    pytest.importorskip("IPython")
    code = ("from IPython.core.interactiveshell import InteractiveShell\n"
            "shell = InteractiveShell.instance()\n"
            "import lmgen\n"
            "from lmgen.lm import TopTokens, TokenProb\n"
            "data, _ = shell.display_formatter.format(TopTokens([TokenProb(1, ' a', 0.25)]))\n"
            "print(sorted(data))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['text/html', 'text/plain']"


def test_ipython_shows_html_and_the_same_plain_text(tiny_gpt2):
    interactiveshell = pytest.importorskip("IPython.core.interactiveshell")
    top = tiny_gpt2.top_tokens(SEED_PROMPT, k=3)
    with_logprobs = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=3, logprobs=2)[0]
    plain = tiny_gpt2.generate(SEED_PROMPT, max_new_tokens=3)[0]
    s = tiny_gpt2.score(SEED_PROMPT)
    d = tiny_gpt2.distribution(SEED_PROMPT, top_k=2)
    objects = [top, with_logprobs, plain, s, d]
    before = [repr(o) for o in objects]
    shell = interactiveshell.InteractiveShell.instance()
    try:
        assert display.register(shell) is True
        formats = [shell.display_formatter.format(o)[0] for o in objects]
    finally:
        interactiveshell.InteractiveShell.clear_instance()
    assert [repr(o) for o in objects] == before  # repr is what a terminal shows: unchanged
    untouched = pytest.importorskip("IPython.core.formatters").PlainTextFormatter()
    assert [f["text/plain"] for f in formats] == [untouched(o) for o in objects]
    assert before[0] == list.__repr__(top) and "TokenProb(token_id=" in formats[0]["text/plain"]
    assert ["text/html" in f for f in formats] == [True, True, False, True, True]
    assert formats[0]["text/html"] == display.top_tokens_html(top)
    assert not any(hasattr(type(o), "_repr_html_") for o in objects)  # only the formatter knows the views
