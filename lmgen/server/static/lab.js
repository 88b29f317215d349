// The next-token distribution under the sampling parameters (the sampling lab): for each of the most likely
// tokens its raw probability beside its processed one, greyed with the stage that removed it; tokens appended
// to the prompt by click or key. Every number shown is the server's (POST /v1/next_token), none recomputed here.
import { $, el, visible, pct, fixed, debounce } from "./util.js";
import { postJSON, showError, clearError } from "./api.js";
import { samplingParams, watchParams } from "./params.js";

const TOP_N = 20;
const REASONS = { top_k: "top-k", top_p: "top-p", min_p: "min-p", typical_p: "typical-p", greedy: "greedy",
  logit_bias: "logit bias" };

const promptBox = $("prompt");
const bars = $("bars");
const state = {
  ids: null, // exact token ids of the prompt after tokens were appended, while the text is unchanged
  idsText: null,
  last: null, // the latest distribution: {text, prompt_token_ids, tokens}
  undo: [],
  seq: 0,
  abort: null,
};

function currentIds() {
  return state.ids && promptBox.value === state.idsText ? state.ids : null;
}

// The prompt as token ids, as /v1/completions would tokenize it (generations start from exact ids).
export async function promptIds() {
  const ids = currentIds();
  if (ids) return ids;
  if (state.last && state.last.text === promptBox.value) return state.last.prompt_token_ids;
  const text = promptBox.value;
  return (await postJSON("/v1/next_token", { prompt: text, top_n: 1 })).prompt_token_ids;
}

export const refreshLab = debounce(refresh, 250);

function schedule() {
  bars.classList.add("stale");
  refreshLab();
}

function requestBody(text, ids) {
  return { ...(ids ? { token_ids: ids } : { prompt: text }), top_n: TOP_N, ...samplingParams() };
}

async function refresh() {
  const text = promptBox.value;
  const ids = currentIds();
  if (!ids) state.ids = null;
  const seq = ++state.seq;
  if (state.abort) state.abort.abort();
  if (!text && !ids) {
    state.last = null;
    render(null, "");
    $("prompt-info").textContent = "";
    return;
  }
  state.abort = new AbortController();
  const body = requestBody(text, ids);
  bars.setAttribute("aria-busy", "true");
  try {
    const data = await postJSON("/v1/next_token", body, state.abort.signal);
    if (seq !== state.seq) return;
    state.last = { text, prompt_token_ids: data.prompt_token_ids, tokens: data.tokens };
    render(data, JSON.stringify(body));
    const n = data.prompt_token_ids.length;
    $("prompt-info").textContent = `${n} token${n === 1 ? "" : "s"}`;
    clearError("next");
  } catch (e) {
    if (e.name !== "AbortError" && seq === state.seq) showError(e.message, "next");
  } finally {
    if (seq === state.seq) bars.removeAttribute("aria-busy");
  }
}

// The bars and the statistics of one response; `request` (the JSON sent) tells tests which answer is shown.
function render(data, request) {
  bars.classList.remove("stale");
  const tokens = data ? data.tokens : [];
  // One scale for both bars, so a processed probability above its raw one shows as longer.
  const scale = Math.max(1e-9, ...tokens.map((t) => Math.max(t.probability, t.processed_probability)));
  bars.replaceChildren(...tokens.map((t, i) => {
    const li = el("li");
    li.append(bar(t, i, scale));
    return li;
  }));
  renderStats(data);
  if (data) {
    bars.dataset.ids = JSON.stringify(data.prompt_token_ids);
    bars.dataset.request = request;
  } else {
    delete bars.dataset.ids;
    delete bars.dataset.request;
  }
}

function bar(t, i, scale) {
  const processed = t.processed_probability;
  const why = t.removed_by ? REASONS[t.removed_by] || t.removed_by : "";
  const b = el("button", t.removed_by ? "bar removed" : "bar");
  b.type = "button";
  Object.assign(b.dataset, { tokenId: t.id, raw: t.probability, processed, text: t.text });
  if (t.removed_by) b.dataset.removedBy = t.removed_by;
  b.setAttribute("aria-label", `${i + 1}: ${JSON.stringify(t.text)}, raw ${pct(t.probability)}, ` +
    (why ? `removed by ${why}` : `processed ${pct(processed)}`) + "; append it");
  b.title = `token ${t.id}, logprob ${t.logprob.toFixed(3)}`;
  const track = el("span", "track");
  for (const [cls, p] of [["raw", t.probability], ["processed", processed]]) {
    const fill = el("span", `fill ${cls}`);
    fill.style.width = `${p > 0 ? Math.max(0.5, (100 * p) / scale) : 0}%`;
    track.append(fill);
  }
  b.append(el("span", "tok", visible(t.text)), track, el("span", "p raw", pct(t.probability)),
    el("span", "p processed", pct(processed)), el("span", "why", why), el("span", "id", t.id));
  b.addEventListener("click", () => appendToken(t));
  return b;
}

function renderStats(data) {
  const stats = $("lab-stats");
  stats.hidden = !data;
  if (stats.hidden) return;
  const show = (id, value, text) => {
    $(id).dataset.value = value;
    $(id).textContent = text;
  };
  show("stat-kept", data.kept_mass, pct(data.kept_mass));
  show("stat-entropy", data.entropy, `${fixed(data.entropy)} nats`);
  show("stat-processed-entropy", data.processed_entropy, `${fixed(data.processed_entropy)} nats`);
  show("stat-candidates", data.candidates, String(data.candidates));
  const removed = Object.entries(data.removed || {}).filter(([, n]) => n > 0);
  $("stat-stages").textContent = (data.stages || []).join(" → ") || "none";
  $("stat-removed").textContent = removed.map(([s, n]) => `${REASONS[s] || s} ${n}`).join(", ") || "none";
}

function appendToken(t) {
  if (!state.last || state.last.text !== promptBox.value) return; // the bars are for an older prompt
  state.undo.push({ text: promptBox.value, ids: state.ids, idsText: state.idsText });
  promptBox.value = state.last.text + t.text;
  state.ids = [...state.last.prompt_token_ids, t.id];
  state.idsText = promptBox.value;
  $("undo").disabled = false;
  refreshLab.now();
}

export function greedyStep() {
  if (state.last && state.last.tokens.length) appendToken(state.last.tokens[0]);
}

// A draw among the tokens shown, weighted by their processed probability (the raw one without processors).
export function sampleStep() {
  if (!state.last || !state.last.tokens.length) return;
  const tokens = state.last.tokens;
  const weight = (t) => t.processed_probability;
  const total = tokens.reduce((s, t) => s + weight(t), 0);
  if (!total) return appendToken(tokens[0]);
  let r = Math.random() * total;
  for (const t of tokens) {
    r -= weight(t);
    if (r <= 0 && weight(t) > 0) return appendToken(t);
  }
  appendToken(tokens.findLast((t) => weight(t) > 0));
}

export function undo() {
  const prev = state.undo.pop();
  if (!prev) return;
  promptBox.value = prev.text;
  state.ids = prev.ids;
  state.idsText = prev.idsText;
  $("undo").disabled = state.undo.length === 0;
  refreshLab.now();
}

// Digits 1-9 append the bar with that number; up and down move between bars.
function barKeys(e) {
  const buttons = [...bars.querySelectorAll("button")];
  const i = buttons.indexOf(document.activeElement);
  if (/^[1-9]$/.test(e.key) && !e.altKey && !e.ctrlKey && !e.metaKey && buttons[+e.key - 1]) {
    buttons[+e.key - 1].click();
  } else if ((e.key === "ArrowDown" || e.key === "ArrowUp") && i >= 0) {
    const next = buttons[i + (e.key === "ArrowDown" ? 1 : -1)];
    if (next) next.focus();
  } else {
    return;
  }
  e.preventDefault();
}

export function setupLab() {
  promptBox.addEventListener("input", schedule);
  watchParams(schedule);
  $("greedy-step").addEventListener("click", greedyStep);
  $("sample-step").addEventListener("click", sampleStep);
  $("undo").addEventListener("click", undo);
  bars.addEventListener("keydown", barKeys);
}
