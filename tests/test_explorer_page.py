"""The token explorer's second edition in a real headless Chromium: the sampling lab, branching, the text X-ray,
entropy plots, keyboard use and narrow screens. Every number the page shows is checked against the API that
served it and against the in-process model with the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .browser import BAR_FIELDS, NEEDS_CHROMIUM, VISIBLE, close_page, lmgen_serve, next_token, open_page, post
from .conftest import SEED_IDS, SEED_PROMPT

pytestmark = NEEDS_CHROMIUM

DOCS = Path(__file__).resolve().parent.parent / "docs"
COMPLETIONS = "/v1/completions"


def set_fields(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def lab_request(page, action, **expected) -> tuple[dict, dict]:
    """Run action; the /v1/next_token request it led to whose body holds `expected`, and its response, once the
    bars show that response."""
    def wanted(r):
        body = r.post_data_json if r.url.endswith("/v1/next_token") else None
        return body is not None and all(body.get(k) == v for k, v in expected.items())

    with page.expect_request(wanted) as info:
        action()
    request = info.value
    data = request.response().json()
    page.wait_for_function("sent => document.querySelector('#bars').dataset.request === sent", arg=request.post_data)
    return request.post_data_json, data


def read_bars(page) -> list[dict]:
    return page.eval_on_selector_all("#bars .bar", BAR_FIELDS)


def stat(page, name: str) -> float:
    return float(page.get_attribute(f"#stat-{name}", "data-value"))


def finish(page) -> None:
    """Wait for the generation (or branch) in flight and its scoring."""
    page.wait_for_selector("#outputs[data-state=done]")


def generate(page, **fields) -> dict:
    """Set the generation's fields, click Generate; the completion request's body, once all is done."""
    set_fields(page, **fields)
    with page.expect_request(lambda r: r.url.endswith(COMPLETIONS)) as info:
        page.click("#generate")
    finish(page)
    return info.value.post_data_json


def exported(page) -> dict:
    """The branch tree as "Export JSON" downloads it."""
    with page.expect_download() as info:
        page.click("#export-tree")
    assert info.value.suggested_filename == "lmgen-branches.json"
    return json.loads(Path(info.value.path()).read_text())


def alternatives(page) -> list[dict]:
    return page.eval_on_selector_all("#fork-options .alt", """bs => bs.map(b => ({
        id: +b.dataset.tokenId, logprob: +b.dataset.logprob, text: b.querySelector('.tok').textContent}))""")


def tab_to(page, selector: str, presses: int = 80) -> None:
    """Press Tab until the focus is on an element matching selector."""
    for _ in range(presses):
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
        page.keyboard.press("Tab")
    pytest.fail(f"Tab never reached {selector}")


def active(page, script: str):
    return page.evaluate(f"() => {{ const e = document.activeElement; return {script}; }}")


# ------------------------------------------------------------------ the sampling lab


def test_moving_temperature_shows_exactly_the_apis_processed_probabilities(page, server):
    before = read_bars(page)
    page.focus("#temperature-range")  # the slider, moved by keys: 1 -> 0.7 in six steps of 0.05
    body, data = lab_request(page, lambda: [page.keyboard.press("ArrowLeft") for _ in range(6)], temperature=0.7)
    assert body == {"prompt": SEED_PROMPT, "top_n": 20, "temperature": 0.7}
    assert page.input_value("#temperature") == "0.7"
    bars = read_bars(page)
    assert [b["id"] for b in bars] == [t["id"] for t in data["tokens"]] == [b["id"] for b in before]
    assert [b["raw"] for b in bars] == [t["probability"] for t in data["tokens"]] == [b["raw"] for b in before]
    assert [b["processed"] for b in bars] == [t["processed_probability"] for t in data["tokens"]]
    for b in bars:  # and the percentages written beside them
        assert float(b["processed_percent"].rstrip("%")) == pytest.approx(100 * b["processed"], rel=0.06)
    assert bars[0]["processed"] > bars[0]["raw"]  # a lower temperature sharpens the distribution
    assert not any(b["removed"] for b in bars)
    # The same parameters asked of the API directly give the same numbers.
    again = next_token(server, **body)
    assert [b["processed"] for b in bars] == pytest.approx([t["processed_probability"] for t in again["tokens"]],
                                                            rel=1e-9, abs=1e-15)
    for name, key in [("kept", "kept_mass"), ("entropy", "entropy"), ("processed-entropy", "processed_entropy"),
                      ("candidates", "candidates")]:
        assert stat(page, name) == data[key]
    assert page.text_content("#stat-stages") == " → ".join(data["stages"])
    assert not page.problems


def test_top_k_3_leaves_exactly_the_3_most_likely_tokens(page, server, tiny_gpt2):
    body, data = lab_request(page, lambda: page.fill("#top_k", "3"), top_k=3)
    assert body == {"prompt": SEED_PROMPT, "top_n": 20, "temperature": 1, "top_k": 3}
    assert page.input_value("#top_k-range") == "3"  # the slider follows the field
    bars = read_bars(page)
    kept = [b for b in bars if not b["removed"]]
    assert [b["id"] for b in kept] == [r.token_id for r in tiny_gpt2.top_tokens(SEED_PROMPT, k=3)]
    assert kept == bars[:3] and all(b["removed_by"] is None and b["why"] == "" for b in kept)
    assert [b["processed"] for b in kept] == [t["processed_probability"] for t in data["tokens"][:3]]
    assert sum(b["processed"] for b in kept) == pytest.approx(1)
    for b in bars[3:]:  # greyed, with the stage that removed them
        assert b["removed_by"] == "top_k" and b["why"] == "top-k" and b["processed"] == 0
    assert stat(page, "candidates") == 3
    assert stat(page, "kept") == pytest.approx(sum(b["raw"] for b in kept))
    assert page.text_content("#stat-removed") == f"top-k {data['removed']['top_k']}"


def test_bad_values_show_the_servers_own_message(page, server):
    for field, value in [("top_p", "0"), ("temperature", "-1")]:
        with page.expect_response(lambda r: r.url.endswith("/v1/next_token") and r.status == 400) as info:
            page.fill(f"#{field}", value)
        sent = info.value.request.post_data_json
        assert sent[field] == float(value)  # sent as typed: the server judges it
        error = post(server, "/v1/next_token", sent).json()["error"]
        assert error["param"] == field
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error-text") == f"{error['message']} (parameter: {field})"
        lab_request(page, lambda: page.fill(f"#{field}", "1" if field == "temperature" else ""))
        assert page.is_hidden("#error")  # a good value clears it
    # An over-long text for the X-ray: the score endpoint's message.
    text = "word " * 300
    page.fill("#xray-text", text)
    page.click("#xray-run")
    page.wait_for_selector("#error:not([hidden])")
    error = post(server, "/v1/score", {"prompt": text, "top_n": 5}).json()["error"]
    assert page.text_content("#error-text") == f"{error['message']} (parameter: {error['param']})"


# ------------------------------------------------------------------ branching


def test_a_branch_at_step_5_is_lm_generate_from_the_chosen_token(page, server, tiny_gpt2):
    params = {"temperature": 0.9, "top_k": 40}
    root_body = generate(page, **params, max_tokens=10, n=1, seed=1234)
    assert root_body["prompt"] == SEED_IDS and root_body["seed"] == 1234 and root_body["logprobs"] == 5
    assert root_body["return_tokens_as_token_ids"] is True and root_body["temperature"] == 0.9
    root_ids = [int(i) for i in page.eval_on_selector_all("#outputs .t", "ts => ts.map(t => t.dataset.tokenId)")]
    sampled = tiny_gpt2.generate(SEED_IDS, do_sample=True, seed=1234, max_new_tokens=10, **params)[0]
    assert root_ids == sampled.token_ids
    # Step 5's alternatives: the completion's logprobs top list there, most likely first.
    page.click('#outputs .t[data-step="5"]')
    options = alternatives(page)
    api = post(server, COMPLETIONS, dict(root_body, stream=False)).json()["choices"][0]["logprobs"]
    top = sorted(api["top_logprobs"][4].items(), key=lambda kv: -kv[1])
    assert [(o["id"], o["logprob"]) for o in options] == [(int(k.split(":")[1]), v) for k, v in top]
    assert options[1]["text"] == tiny_gpt2.tokenizer.token_text(options[1]["id"]).translate(VISIBLE)
    chosen = options[1]
    with page.expect_request(lambda r: r.url.endswith(COMPLETIONS)) as info:
        page.locator("#fork-options .alt").nth(1).click()
    finish(page)
    prefix = SEED_IDS + root_ids[:4] + [chosen["id"]]
    assert info.value.post_data_json == dict(root_body, prompt=prefix, max_tokens=5, n=1)
    expected = tiny_gpt2.generate(prefix, do_sample=True, seed=1234, max_new_tokens=5, logprobs=5, **params)[0]
    tree = exported(page)
    assert tree["prompt"] == {"text": SEED_PROMPT, "token_ids": SEED_IDS} and tree["seed"] == 1234
    assert tree["params"] == dict(params, max_tokens=10, logprobs=5)
    root, branch = tree["branches"]
    assert root["token_ids"] == root_ids and root["parent"] is None
    assert (branch["parent"], branch["fork_step"], branch["seed"]) == (1, 5, 1234)
    assert branch["token_ids"] == [chosen["id"]] + expected.token_ids
    assert "".join(branch["texts"][1:]) == expected.text
    assert branch["logprobs"][0] == chosen["logprob"]
    assert branch["logprobs"][1:] == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)
    assert branch["total_logprob"] == pytest.approx(sum(branch["logprobs"]))
    # The page: the branch's text (its parent's first 4 tokens, the chosen one marked, the continuation).
    box = page.locator('#outputs .output[data-branch="2"]')
    assert box.locator(".t.inherited").count() == 4
    assert box.locator(".t.fork").get_attribute("data-token-id") == str(chosen["id"])
    assert box.locator(".gen").text_content() == "".join(root["texts"][:4] + branch["texts"])
    # The tree: branch 2 under sample 1, forked at step 5 with the chosen token, and its total logprob.
    node = page.locator('#tree li[data-branch="1"] > ul > li[data-branch="2"]')
    assert node.locator(".node-fork").text_content() == "step 5"
    assert node.locator(".node-token").first.text_content() == chosen["text"]
    assert float(node.locator(".node-lp").first.get_attribute("data-total-logprob")) == branch["total_logprob"]
    assert page.evaluate("() => window.lmgenExplorer.tree()") == tree
    # The entropy plot: one point per generated token, /v1/score's entropies over prompt + generated ids.
    scored = post(server, "/v1/score", {"token_ids": prefix + expected.token_ids, "top_n": 5}).json()
    dots = box.locator(".plot circle")
    assert dots.count() == 10
    entropies = [float(d) for d in dots.evaluate_all("ds => ds.map(d => d.dataset.entropy)")]
    assert entropies == [t["entropy"] for t in scored["tokens"][len(SEED_IDS):]]
    # Both side by side.
    for b in (1, 2):
        page.check(f'#tree li[data-branch="{b}"] > .node-row input[type=checkbox]')
    columns = page.locator("#compare .compare-col")
    assert columns.count() == 2
    assert columns.nth(1).locator(".compare-text").text_content() == box.locator(".gen").text_content()
    assert not page.problems, page.problems


def test_a_branch_made_with_the_keyboard_alone(page, server):
    page.focus("#prompt")  # where the page starts; from here on only keys
    tab_to(page, "#max_tokens")
    page.keyboard.press("Control+a")
    page.keyboard.type("8")
    page.keyboard.press("Control+Enter")  # generates
    finish(page)
    tab_to(page, "#outputs .t")
    assert active(page, "e.dataset.step") == "1"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert active(page, "e.dataset.step") == "3"
    page.keyboard.press("Enter")  # step 3's alternatives, the first one focused
    assert page.is_visible("#fork") and active(page, "e.matches('#fork-options .alt')")
    page.keyboard.press("Escape")  # closes, back on the token
    assert page.is_hidden("#fork") and active(page, "e.dataset.step") == "3"
    page.keyboard.press("Enter")
    page.keyboard.press("ArrowDown")
    second = alternatives(page)[1]
    assert active(page, "+e.dataset.tokenId") == second["id"]
    page.keyboard.press("Enter")  # branches there
    finish(page)
    tree = page.evaluate("() => window.lmgenExplorer.tree()")
    branch = tree["branches"][1]
    assert (branch["parent"], branch["fork_step"], branch["token_ids"][0]) == (1, 3, second["id"])
    assert len(branch["token_ids"]) == 8 - 2
    assert active(page, "e.matches('.output[data-branch=\"2\"] .t.fork')")  # the focus waits on the new branch
    tab_to(page, '#tree input[aria-label="compare branch 2"]')
    page.keyboard.press("Space")
    assert page.locator("#compare .compare-col").count() == 1
    assert not page.problems, page.problems


# ------------------------------------------------------------------ the X-ray


def test_the_xray_shows_lm_score_token_by_token(page, server, tiny_gpt2):
    text = "The quick brown fox 🦊 jumps over the lazy dog.\nIt was the best of times"  # 🦊: three tokens
    page.fill("#xray-text", text)
    page.press("#xray-text", "Control+Enter")
    page.wait_for_selector("#xray-plot .plot")
    spans = page.eval_on_selector_all("#xray-tokens .xt", """ts => ts.map(t => ({text: t.textContent,
        logprob: t.dataset.logprob, rank: t.dataset.rank, entropy: t.dataset.entropy}))""")
    expected = tiny_gpt2.score(text, top_n=5)
    assert len(spans) == len(expected.token_ids) and "".join(s["text"] for s in spans) == text
    assert "" in [s["text"] for s in spans]  # a token inside the fox's bytes shows nothing: the next one has it
    assert spans[0]["logprob"] is None  # the first token: nothing predicts it
    for span, t in zip(spans[1:], expected.tokens, strict=True):
        assert float(span["logprob"]) == pytest.approx(t.logprob, abs=1e-5)
        assert int(span["rank"]) == t.rank
        assert float(span["entropy"]) == pytest.approx(t.entropy, abs=1e-5)
    assert float(page.get_attribute("#xray-summary", "data-perplexity")) == pytest.approx(expected.perplexity,
                                                                                          rel=1e-5)
    # One point per scored token, at its entropy.
    dots = page.eval_on_selector_all("#xray-plot circle", "ds => ds.map(d => +d.dataset.entropy)")
    assert dots == [float(s["entropy"]) for s in spans[1:]]
    # Hover a token: its rank, probability and its step's top 5, as the score has them.
    page.locator("#xray-tokens .xt").nth(3).hover()
    third = expected.tokens[2]
    tip = page.text_content("#tip")
    assert f"rank {third.rank}" in tip
    assert page.eval_on_selector_all("#xray-plot circle.hot", "ds => ds.map(d => d.dataset.token)") == ["3"]
    rows = page.eval_on_selector_all("#tip tr", "rs => rs.map(r => r.querySelector('.tok').textContent)")
    assert rows == [tiny_gpt2.tokenizer.token_text(i).translate(VISIBLE) for i, _ in third.top]
    # Focus moves along the tokens by arrow keys and shows the same.
    page.focus("#xray-tokens .xt >> nth=0")
    page.keyboard.press("ArrowRight")
    assert active(page, "e.dataset.index") == "1" and page.is_visible("#tip")
    assert f"rank {expected.tokens[0].rank}" in page.text_content("#tip")
    assert not page.problems, page.problems


# ------------------------------------------------------------------ layout and labels


@pytest.mark.parametrize("width", [390, 1280])
def test_everything_fits_the_width_and_every_control_is_labelled(browser, server, width):
    page = open_page(browser, server, width=width)
    lab_request(page, lambda: page.fill("#top_k", "5"), top_k=5)
    generate(page, max_tokens=16, n=4, seed=3)
    page.click('#outputs .output[data-branch="1"] .t[data-step="2"]')
    page.locator("#fork-options .alt").nth(2).click()
    finish(page)
    assert page.locator("#tree input[type=checkbox]").count() == 5
    for b in (1, 5, 2, 3):
        page.check(f'#tree li[data-branch="{b}"] > .node-row input')
    assert page.is_disabled('#tree li[data-branch="4"] > .node-row input')  # four side by side at most
    assert page.locator("#compare .compare-col").count() == 4
    page.fill("#xray-text", "A long unbroken token run: " + "x" * 300 + " and more words after it.")
    page.click("#xray-run")
    page.wait_for_selector("#xray-plot .plot")
    assert page.evaluate("() => document.scrollingElement.scrollWidth") <= width
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    assert not page.problems, page.problems
    close_page(page, server)


# ------------------------------------------------------------------ pictures for the README


def test_screenshots_of_the_lab_a_branch_tree_and_an_xray(browser, tmp_path, embedded_path):
    """The embedded model in the sampling lab, a tree of branches compared, and an X-ray; written to docs/ only
    with LMGEN_UPDATE_SCREENSHOTS=1 (a plain run leaves the committed pictures alone)."""
    folder = DOCS if os.environ.get("LMGEN_UPDATE_SCREENSHOTS") == "1" else tmp_path
    with lmgen_serve(str(embedded_path), tmp_path) as url:
        page = open_page(browser, url)
        page.fill("#prompt", "My favourite food is")
        set_fields(page, temperature=0.9, top_k=12, top_p=0.8)
        _, lab = lab_request(page, lambda: page.fill("#min_p", "0.25"), min_p=0.25)
        assert {"top_k", "top_p", "min_p"} <= {t["removed_by"] for t in lab["tokens"]}  # three stages' removals
        page.locator("#lab-card").screenshot(path=str(folder / "lab.png"))
        page.fill("#prompt", SEED_PROMPT)
        set_fields(page, temperature=0.8, top_k="", min_p="")
        lab_request(page, lambda: page.fill("#top_p", "0.95"), top_p=0.95)

        root = generate(page, max_tokens=24, n=2, seed=4)
        page.click('#outputs .output[data-branch="1"] .t[data-step="4"]')
        page.locator("#fork-options .alt").nth(1).click()
        finish(page)
        page.click('#outputs .output[data-branch="3"] .t[data-step="12"]')
        page.locator("#fork-options .alt").nth(2).click()
        finish(page)
        for b in (1, 3, 4):
            page.check(f'#tree li[data-branch="{b}"] > .node-row input[type=checkbox]')
        page.click('#outputs .output[data-branch="4"] .t[data-step="16"]')  # its alternatives, open
        page.mouse.move(0, 0)  # no tooltip over them
        tree = exported(page)
        api = post(url, COMPLETIONS, dict(root, stream=False)).json()["choices"]
        assert [b["token_ids"] for b in tree["branches"][:2]] == [
            [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]] for c in api]
        page.screenshot(path=str(folder / "branches.png"), clip=union(page, "#gen-card", "#tree-card"),
                        full_page=True)

        text = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Lisbon."
        page.fill("#xray-text", text)
        page.click("#xray-run")
        page.wait_for_selector("#xray-plot .plot")
        scored = post(url, "/v1/score", {"prompt": text, "top_n": 5}).json()
        assert page.locator("#xray-plot circle").count() == len(scored["tokens"]) - 1
        tokens = page.locator("#xray-tokens .xt")
        tokens.nth(tokens.count() - 2).hover()  # " Lisbon": the surprise
        assert page.locator("#xray-plot circle.hot").count() == 1
        page.screenshot(path=str(folder / "xray.png"), clip=union(page, "#xray-card", "#tip"), full_page=True)
        assert not page.problems, page.problems
        page.close()
    for name in ("lab.png", "branches.png", "xray.png"):
        assert (folder / name).stat().st_size > 20_000


def union(page, *selectors: str) -> dict:
    """The page-coordinates box around the elements, for a screenshot's clip."""
    boxes = [page.evaluate("""s => { const r = document.querySelector(s).getBoundingClientRect();
        return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; }""", s) for s in selectors]
    left, top = min(b[0] for b in boxes) - 8, min(b[1] for b in boxes) - 8
    right, bottom = max(b[2] for b in boxes) + 8, max(b[3] for b in boxes) + 8
    return {"x": max(0, left), "y": max(0, top), "width": right - max(0, left), "height": bottom - max(0, top)}
