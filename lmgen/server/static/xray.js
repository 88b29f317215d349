// The text X-ray: a text scored by the model (POST /v1/score), each token coloured by its surprisal (−logprob),
// its rank, probability and the step's likeliest alternatives on hover or focus, and its entropy plotted.
import { $, el, visible, pct, fixed, surprisalLevel, rovingArrows } from "./util.js";
import { postJSON, showError, clearError } from "./api.js";
import { entropyPlot } from "./plot.js";
import { tipsFor } from "./tip.js";

const TOP_N = 5;
const result = $("xray-tokens");
let scored = null; // the latest response
let abort = null;

async function xray(e) {
  e.preventDefault();
  if (abort) abort.abort();
  const ctl = (abort = new AbortController());
  $("xray-run").disabled = true;
  try {
    const body = { prompt: $("xray-text").value, top_n: TOP_N };
    scored = await postJSON("/v1/score", body, ctl.signal);
    render(scored);
    clearError("xray");
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message, "xray");
  } finally {
    if (abort === ctl) $("xray-run").disabled = false;
  }
}

// Each token's piece of the text, cut at the offsets (in code points, as the server counts them): a token that
// ends inside a character has none, and the token that completes it carries it.
function pieces(data) {
  const chars = Array.from(data.text);
  return data.tokens.map((t, i) => {
    const end = i + 1 < data.tokens.length ? data.tokens[i + 1].offset : chars.length;
    return chars.slice(t.offset, end).join("");
  });
}

function render(data) {
  const texts = pieces(data);
  result.replaceChildren(...data.tokens.map((t, i) => tokenSpan(t, i, texts[i])));
  result.dataset.tokenIds = JSON.stringify(data.token_ids);
  const n = data.tokens.length;
  const summary = $("xray-summary");
  summary.dataset.perplexity = data.perplexity;
  summary.dataset.totalLogprob = data.total_logprob;
  summary.textContent = `${n} tokens · perplexity ${fixed(data.perplexity, 2)} · total logprob ` +
    `${fixed(data.total_logprob, 2)} (the first token has nothing before it to be predicted from)`;
  $("xray-result").hidden = false; // first, so the plot is drawn at its place's width
  const points = data.tokens.map((t, i) => ({ entropy: t.entropy, text: t.text, token: i }))
    .filter((p) => p.entropy !== null);
  const place = $("xray-plot");
  place.replaceChildren(el("div", "plot-title muted", "entropy of the model's distribution at each token (nats)"),
    entropyPlot(points, place.clientWidth, "entropy along the X-rayed text"));
}

function tokenSpan(t, i, text) {
  const span = el("span", "xt", text);
  if (text === "") span.classList.add("held");
  span.dataset.index = i;
  span.dataset.tokenId = t.id;
  if (t.logprob === null) {
    span.classList.add("first");
  } else {
    span.classList.add(`s${surprisalLevel(-t.logprob)}`);
    Object.assign(span.dataset, { logprob: t.logprob, rank: t.rank, entropy: t.entropy });
  }
  if (text.includes("\n")) span.classList.add("nl");
  span.tabIndex = i === 0 ? 0 : -1; // one tab stop; arrow keys move along the text
  span.setAttribute("aria-label", t.logprob === null ? `${JSON.stringify(t.text)}: the first token`
    : `${JSON.stringify(t.text)}: rank ${t.rank}, ${pct(Math.exp(t.logprob))}`);
  return span;
}

function describe(span) {
  const t = scored && scored.tokens[Number(span.dataset.index)];
  if (!t) return null;
  if (t.logprob === null) return { above: true, head: visible(t.text), notes: ["the first token: nothing before it"] };
  return {
    above: true, // the entropy plot below stays in view, its dot marked
    head: `${visible(t.text)}  ${pct(Math.exp(t.logprob))}`,
    notes: [`rank ${t.rank} · surprisal ${fixed(-t.logprob, 2)} nats · entropy ${fixed(t.entropy, 2)} nats`],
    rows: t.top.map((alt) => ({ text: alt.text, probability: Math.exp(alt.logprob), chosen: alt.id === t.id })),
  };
}

// The plot's dot of the token hovered or focused, marked.
function markDot(e) {
  const span = e.target.closest(".xt");
  for (const dot of $("xray-plot").querySelectorAll("circle")) {
    dot.classList.toggle("hot", span !== null && e.type !== "mouseout" && dot.dataset.token === span.dataset.index);
  }
}

export function setupXray() {
  $("xray-form").addEventListener("submit", xray);
  for (const type of ["mouseover", "focusin", "mouseout"]) result.addEventListener(type, markDot);
  rovingArrows(result, ".xt");
  tipsFor(result, ".xt", describe);
}
