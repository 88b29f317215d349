"""Rich displays in a notebook: lmgen's results as self-contained HTML, registered as IPython formatters.

Each renderer returns an HTML string, or None where it has nothing to add (IPython then shows the repr, which stays as
it is in a terminal). Numbers a reader or a test wants are in data attributes at full precision (repr) and in the text
rounded; token text is escaped, with its whitespace made visible as the CLI and the explorer show it.
"""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable

from .batch_sampler import Distribution
from .generate import Generation, TokenLogprob
from .lm import Score, TopTokens
from .tokenizer import VISIBLE

DISTRIBUTION_ROWS = 20  # a Distribution's table lists its most likely tokens
PROMPT_TOKENS = 40  # a Generation shows at most the last this many prompt tokens before its own
MAX_SURPRISAL = 10.0  # nats (p = 4.5e-5): the X-ray's strongest colour
ALTERNATIVES = 5  # hover text: the most likely tokens listed at a step
FONT = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px"
BOX = f"{FONT}; color: #1f2328; background: #fff; padding: 6px 8px; border-radius: 4px"
BAR, PROCESSED_BAR, GREY = "#4f7cff", "#2aa876", "#8c959f"
TOKEN = "border-radius: 3px; padding: 1px 1px; margin: 0 1px; white-space: pre-wrap; color: #1f2328"

TokenText = Callable[[int], str]


def escaped(text: str) -> str:
    """Text for HTML (quotes too, so it fits in an attribute)."""
    return html.escape(text, quote=True)


def shown(text: str) -> str:
    """A token's text with its whitespace visible (∅ for none), escaped."""
    return escaped(text.translate(VISIBLE) or "∅")


def percent(p: float) -> str:
    """A probability as a percentage, small ones in scientific notation so they do not read 0.00%."""
    return f"{100 * p:.2f}%" if p >= 1e-4 or p == 0 else f"{100 * p:.1e}%"


def bar(fraction: float, colour: str) -> str:
    """A horizontal bar filling `fraction` of its cell."""
    width = max(0.0, min(fraction, 1.0)) * 100
    return f'<div style="height: 10px; width: {width:.1f}%; min-width: 1px; background: {colour}"></div>'


def _table(head: list[str], rows: list[str], attrs: str = "") -> str:
    cells = "".join(f'<th style="text-align: left; padding: 2px 8px">{h}</th>' for h in head)
    return (f'<table{attrs} style="{FONT}; border-collapse: collapse"><thead><tr>{cells}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _cell(content: str, style: str = "") -> str:
    return f'<td style="padding: 2px 8px; {style}">{content}</td>'


def top_tokens_html(rows: TopTokens) -> str | None:
    """top_tokens() as a bar table: rank, token (whitespace shown), id, probability and a bar."""
    if not rows:
        return None
    scale = max(r.probability for r in rows) or 1.0  # the most likely fills its bar, as on the CLI
    body = [f'<tr data-token-id="{r.token_id}" data-probability="{r.probability!r}" '
            f'title="p = {r.probability:.4f}">'
            + _cell(str(rank), "text-align: right") + _cell(f"<code>{shown(r.token_text)}</code>")
            + _cell(str(r.token_id), "text-align: right") + _cell(percent(r.probability), "text-align: right")
            + _cell(bar(r.probability / scale, BAR), "width: 220px") + "</tr>"
            for rank, r in enumerate(rows, 1)]
    return _table(["rank", "token", "id", "probability", ""], body, ' class="lmgen-top-tokens"')


def alternatives(entry: TokenLogprob, name: TokenText) -> str:
    """Hover text lines: the most likely tokens at an entry's step, with their probabilities."""
    lines = [f"  {t_text:<12} {math.exp(lp):.4f}"
             for t_text, lp in ((name(t).translate(VISIBLE) or "∅", lp) for t, lp in entry.top[:ALTERNATIVES])]
    return "\n".join(["most likely:", *lines]) if lines else ""


def _token_span(token_id: int, text: str, style: str, title: str, data: dict[str, object]) -> str:
    attrs = "".join(f' data-{k}="{escaped(v if isinstance(v, str) else repr(v))}"' for k, v in data.items()
                    if v is not None)
    return (f'<span data-token-id="{token_id}"{attrs} title="{escaped(title)}" style="{TOKEN}; {style}">'
            f"{escaped(text)}</span>")


def _prompt_spans(ids: list[int], name: TokenText) -> str:
    """The end of a prompt, in grey, before the generated tokens."""
    shown_ids = ids[-PROMPT_TOKENS:]
    lead = "…" if len(ids) > len(shown_ids) else ""
    text = lead + "".join(name(i) for i in shown_ids)
    return f'<span class="prompt" style="color: {GREY}; white-space: pre-wrap">{escaped(text)}</span>'


def probability_colour(p: float) -> str:
    """A background from red (unlikely) through yellow to green (sure)."""
    return f"hsl({round(120 * max(0.0, min(p, 1.0)))}, 75%, 80%)"


def _generated(token_id: int, entry: TokenLogprob | None, name: TokenText) -> str:
    text = name(token_id)
    if entry is None or entry.logprob is None:
        return _token_span(token_id, text, "", text.translate(VISIBLE), {})
    p = math.exp(entry.logprob)
    rank = f" · rank {entry.rank}" if entry.rank is not None else ""
    title = f"{text.translate(VISIBLE) or '∅'} · p {p:.4f}{rank}\n{alternatives(entry, name)}".rstrip()
    data = {"logprob": entry.logprob, "probability": p, "rank": entry.rank}
    return _token_span(token_id, text, f"background: {probability_colour(p)}", title, data)


def generation_html(g: Generation) -> str | None:
    """A generation's tokens coloured by probability, each one's alternatives on hover; None without logprobs or
    token text (LM.generate sets it)."""
    name = g.token_text
    if g.logprobs is None or name is None:
        return None
    tokens = "".join(_generated(t, e, name) for t, e in zip(g.token_ids, g.logprobs))
    known = [e.logprob for e in g.logprobs if e is not None and e.logprob is not None]
    mean = f" · mean logprob {sum(known) / len(known):.4f}" if known else ""
    summary = (f'<div style="color: {GREY}; margin-top: 4px">{len(g.token_ids)} tokens · finish: '
               f"{escaped(str(g.finish_reason))}{mean} · colour: probability (red low, green high)</div>")
    return (f'<div class="lmgen-generation" data-finish-reason="{escaped(str(g.finish_reason))}" style="{BOX}">'
            f'<div style="line-height: 1.9">{_prompt_spans(g.prompt_token_ids, name)}{tokens}</div>{summary}</div>')


def surprisal_colour(surprisal: float) -> str:
    """A red background whose strength grows with surprisal (-logprob), full at MAX_SURPRISAL nats."""
    alpha = max(0.0, min(surprisal / MAX_SURPRISAL, 1.0)) * 0.85
    return f"rgba(229, 57, 53, {alpha:.3f})"


def _scored(token_id: int, entry: TokenLogprob, name: TokenText) -> str:
    text = name(token_id)
    p, surprisal = math.exp(entry.logprob), -entry.logprob
    facts = [f"rank {entry.rank}" if entry.rank is not None else "", f"p {p:.4f}", f"surprisal {surprisal:.2f} nats",
             f"entropy {entry.entropy:.2f} nats" if entry.entropy is not None else ""]
    title = f"{text.translate(VISIBLE) or '∅'}\n{' · '.join(f for f in facts if f)}\n{alternatives(entry, name)}"
    data = {"logprob": entry.logprob, "probability": p, "rank": entry.rank, "entropy": entry.entropy}
    return _token_span(token_id, text, f"background: {surprisal_colour(surprisal)}", title.rstrip(), data)


def score_html(s: Score) -> str | None:
    """The X-ray of a scored text: each token coloured by its surprisal, with its rank, probability and the
    alternatives on hover, and the perplexity; None without token text."""
    name = s.token_text
    if name is None or not s.token_ids:
        return None
    first = _token_span(s.token_ids[0], name(s.token_ids[0]), f"color: {GREY}", "the first token: nothing predicts it",
                        {})
    tokens = first + "".join(_scored(t, e, name) for t, e in zip(s.token_ids[1:], s.tokens))
    summary = (f'<div style="margin-bottom: 4px"><b>perplexity {s.perplexity:.4f}</b> · total logprob '
               f"{s.total_logprob:.4f} · {len(s.token_ids)} tokens · colour: surprisal (-logprob), "
               f"full red at {MAX_SURPRISAL:g} nats</div>")
    return (f'<div class="lmgen-score" data-perplexity="{s.perplexity!r}" data-total-logprob="{s.total_logprob!r}" '
            f'style="{BOX}">{summary}<div style="line-height: 1.9">{tokens}</div></div>')


def _distribution_row(rank: int, row: tuple, scale: float, name: TokenText | None) -> str:
    token_id, p, q, removed_by = row
    text = shown(name(token_id)) if name is not None else f"#{token_id}"
    grey = f"color: {GREY}; opacity: 0.7" if removed_by else ""
    why = f"removed by {escaped(removed_by)}" if removed_by else ""
    return (f'<tr data-token-id="{token_id}" data-probability="{p!r}" data-processed-probability="{q!r}" '
            f'data-removed-by="{escaped(removed_by or "")}" style="{grey}">'
            + _cell(str(rank), "text-align: right") + _cell(f"<code>{text}</code>")
            + _cell(str(token_id), "text-align: right") + _cell(percent(p), "text-align: right")
            + _cell(bar(p / scale, GREY if removed_by else BAR), "width: 160px")
            + _cell(percent(q), "text-align: right") + _cell(bar(q / scale, PROCESSED_BAR), "width: 160px")
            + _cell(why) + "</tr>")


def distribution_html(d: Distribution) -> str:
    """The next-token distribution before and after the sampling parameters: raw and processed bars, removed tokens
    greyed with the stage that removed them, the candidates left, the mass they keep and both entropies."""
    rows = d.top(DISTRIBUTION_ROWS)
    scale = max([p for _, p, _, _ in rows] + [q for _, _, q, _ in rows]) or 1.0  # one scale: bars compare
    name = d.token_text  # set by LM.distribution; ids alone without it
    body = [_distribution_row(rank, row, scale, name) for rank, row in enumerate(rows, 1)]
    stages = " → ".join(d.stages) or "none"
    removed = ", ".join(f"{stage} {n}" for stage, n in d.removed.items() if n) or "none"
    summary = (f'<div style="margin-bottom: 4px">stages: {escaped(stages)} · <b>{d.candidates}</b> candidates keep '
               f"{percent(d.kept_mass)} of the mass · entropy {d.entropy:.4f} → {d.processed_entropy:.4f} nats · "
               f"removed first by: {escaped(removed)}</div>")
    table = _table(["rank", "token", "id", "model", "", "sampled from", "", ""], body)
    return (f'<div class="lmgen-distribution" data-candidates="{d.candidates}" data-kept-mass="{d.kept_mass!r}" '
            f'data-entropy="{d.entropy!r}" data-processed-entropy="{d.processed_entropy!r}" style="{BOX}">'
            f"{summary}{table}</div>")


RENDERERS: dict[type, Callable[[object], str | None]] = {
    TopTokens: top_tokens_html, Generation: generation_html, Score: score_html, Distribution: distribution_html}


def register(shell=None) -> bool:
    """Register the HTML renderers with the running IPython shell (or `shell`); False, doing nothing, without one.
    IPython is never imported here: only a shell that is already running is used."""
    if shell is None:
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False
    formatter = shell.display_formatter.formatters["text/html"]
    for kind, render in RENDERERS.items():
        formatter.for_type(kind, render)
    return True
