// lmgen token explorer: the next-token distribution as bars, token by token forcing, and streamed generation.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_N = 20;
const VISIBLE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
const visible = (s) => (s === "" ? "∅" : s.replace(/[ \n\t\r]/g, (c) => VISIBLE[c]));
const pct = (p) => (p >= 0.01 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2)) + "%";
const level = (p) => (p < 0.05 ? 0 : p < 0.2 ? 1 : p < 0.5 ? 2 : p < 0.8 ? 3 : 4);

const promptBox = $("prompt");
const bars = $("bars");
const state = {
  model: null,
  ids: null, // exact token ids of the prompt after tokens were appended, while the text is unchanged
  idsText: null,
  last: null, // the latest distribution: {text, prompt_token_ids, tokens}
  undo: [],
  seq: 0,
  abort: null,
  gen: null, // the running generation's AbortController
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---- errors: the server's {"error": {"message", "param", ...}} shown in the page, never swallowed
let errorSource = null;
function showError(message, source) {
  $("error-text").textContent = message;
  $("error").hidden = false;
  errorSource = source;
}
function clearError(source) {
  if (errorSource === source) $("error").hidden = true;
}
$("error-close").addEventListener("click", () => { $("error").hidden = true; });

// A server started with --api-key wants it on /v1: asked for after a 401, kept for this tab only.
function headers() {
  const key = sessionStorage.getItem("lmgen-api-key");
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function post(path, body, signal) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await errorOf(res);
  return res;
}

async function errorOf(res) {
  if (res.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
  }
  let message = `the server answered ${res.status} ${res.statusText}`;
  try {
    const data = await res.json();
    if (data && data.error && data.error.message) {
      message = data.error.message + (data.error.param ? ` (parameter: ${data.error.param})` : "");
    } else if (data && data.detail) {
      message = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    }
  } catch { /* not JSON: keep the status line */ }
  return new Error(message);
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("lmgen-api-key", $("api-key").value.trim());
  $("key-form").hidden = true;
  $("error").hidden = true;
  start();
});

// ---- the next-token distribution
let timer = 0;
function schedule(delay = 250) {
  clearTimeout(timer);
  bars.classList.add("stale");
  timer = setTimeout(refresh, delay);
}

function currentIds() {
  return state.ids && promptBox.value === state.idsText ? state.ids : null;
}

async function refresh() {
  clearTimeout(timer);
  const text = promptBox.value;
  const ids = currentIds();
  if (!ids) state.ids = null;
  const seq = ++state.seq;
  if (state.abort) state.abort.abort();
  if (!text && !ids) {
    state.last = null;
    renderBars([]);
    $("prompt-info").textContent = "";
    return;
  }
  state.abort = new AbortController();
  const body = ids ? { token_ids: ids, top_n: TOP_N } : { prompt: text, top_n: TOP_N };
  bars.setAttribute("aria-busy", "true");
  try {
    const data = await (await post("/v1/next_token", body, state.abort.signal)).json();
    if (seq !== state.seq) return;
    state.last = { text, prompt_token_ids: data.prompt_token_ids, tokens: data.tokens };
    renderBars(data.tokens);
    bars.dataset.ids = JSON.stringify(data.prompt_token_ids);
    const n = data.prompt_token_ids.length;
    $("prompt-info").textContent = `${n} token${n === 1 ? "" : "s"}`;
    clearError("next");
  } catch (e) {
    if (e.name !== "AbortError" && seq === state.seq) showError(e.message, "next");
  } finally {
    if (seq === state.seq) bars.removeAttribute("aria-busy");
  }
}

function renderBars(tokens) {
  bars.classList.remove("stale");
  delete bars.dataset.ids;
  const top = tokens.length ? tokens[0].probability : 1;
  bars.replaceChildren(...tokens.map((t, i) => {
    const li = el("li");
    const b = el("button", "bar");
    b.type = "button";
    b.dataset.id = t.id;
    b.dataset.probability = t.probability;
    b.dataset.text = t.text;
    b.setAttribute("aria-label", `${i + 1}: ${JSON.stringify(t.text)}, ${pct(t.probability)}; append it`);
    b.title = `token ${t.id}, logprob ${t.logprob.toFixed(3)}`;
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.width = `${Math.max(0.5, (100 * t.probability) / top)}%`;
    track.append(fill);
    b.append(el("span", "tok", visible(t.text)), track, el("span", "p", pct(t.probability)), el("span", "id", t.id));
    b.addEventListener("click", () => appendToken(t));
    li.append(b);
    return li;
  }));
}

function appendToken(t) {
  if (!state.last || state.last.text !== promptBox.value) return; // the bars are for an older prompt
  state.undo.push({ text: promptBox.value, ids: state.ids, idsText: state.idsText });
  promptBox.value = state.last.text + t.text;
  state.ids = [...state.last.prompt_token_ids, t.id];
  state.idsText = promptBox.value;
  $("undo").disabled = false;
  refresh();
}

function greedyStep() {
  if (state.last && state.last.tokens.length) appendToken(state.last.tokens[0]);
}

function sampleStep() { // a draw weighted by probability, among the tokens shown
  if (!state.last || !state.last.tokens.length) return;
  const tokens = state.last.tokens;
  let r = Math.random() * tokens.reduce((s, t) => s + t.probability, 0);
  for (const t of tokens) {
    r -= t.probability;
    if (r <= 0) return appendToken(t);
  }
  appendToken(tokens[tokens.length - 1]);
}

function undo() {
  const prev = state.undo.pop();
  if (!prev) return;
  promptBox.value = prev.text;
  state.ids = prev.ids;
  state.idsText = prev.idsText;
  $("undo").disabled = state.undo.length === 0;
  refresh();
}

promptBox.addEventListener("input", () => schedule());
$("greedy-step").addEventListener("click", greedyStep);
$("sample-step").addEventListener("click", sampleStep);
$("undo").addEventListener("click", undo);
bars.addEventListener("keydown", (e) => {
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
});
document.addEventListener("keydown", (e) => {
  const action = e.altKey && !e.ctrlKey && { KeyG: greedyStep, KeyS: sampleStep, KeyZ: undo }[e.code];
  if (action) {
    e.preventDefault();
    action();
  } else if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
    e.preventDefault();
    $("gen-form").requestSubmit();
  } else if (e.key === "Escape") {
    hideTip();
  }
});

// ---- generation: POST /v1/completions with stream=true, read as server-sent events
const form = $("gen-form");
const mode = () => form.elements.mode.value;
function syncMode() {
  for (const label of form.querySelectorAll(".sampling")) label.classList.toggle("off", mode() === "greedy");
}
form.addEventListener("change", syncMode);

function request() {
  const num = (id) => {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  };
  const ids = currentIds();
  const body = { model: state.model || undefined, prompt: ids || promptBox.value, max_tokens: num("max_tokens"),
    n: num("n"), stream: true, logprobs: 5 };
  if (mode() === "greedy") {
    body.temperature = 0;
  } else {
    for (const k of ["temperature", "top_k", "top_p", "min_p", "seed"]) body[k] = num(k);
  }
  return body;
}

function addTokens(out, choice) {
  const lp = choice.logprobs;
  if (lp && lp.tokens) {
    lp.tokens.forEach((tok, k) => out.pending.push({ tok, logprob: lp.token_logprobs[k],
      top: (lp.top_logprobs && lp.top_logprobs[k]) || {} }));
    out.count += lp.tokens.length;
  }
  if (!choice.text) return; // a token that ends inside a character waits for the rest of it
  const pending = out.pending.splice(0);
  const parts = pending.length > 1 && pending.map((p) => p.tok).join("") === choice.text
    ? pending.map((p) => [p.tok, [p]]) : [[choice.text, pending]];
  for (const [text, toks] of parts) {
    const span = el("span", "t", text);
    if (text.includes("\n")) span.classList.add("nl"); // a newline token, made visible
    if (toks.length) {
      const p = Math.min(...toks.map((t) => Math.exp(t.logprob)));
      span.classList.add(`p${level(p)}`);
      span.dataset.probability = p;
      span.tabIndex = out.gen.querySelector(".t[tabindex]") ? -1 : 0; // arrow keys move from the first one
      span.tokens = toks;
    }
    out.gen.append(span);
  }
}

async function generate(e) {
  e.preventDefault();
  if (state.gen) state.gen.abort();
  const ctl = (state.gen = new AbortController());
  const body = request();
  const n = Number.isInteger(body.n) && body.n > 0 && body.n <= 16 ? body.n : 1;
  const outs = Array.from({ length: n }, () => {
    const box = el("div", "output");
    const gen = el("span", "gen");
    box.append(el("span", "echo", promptBox.value), gen);
    return { box, gen, pending: [], count: 0 };
  });
  $("outputs").replaceChildren(...outs.map((o) => o.box));
  $("outputs").dataset.state = "running";
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("speed").textContent = "";
  const started = performance.now();
  const speed = () => {
    const count = outs.reduce((s, o) => s + o.count, 0);
    const seconds = (performance.now() - started) / 1000;
    $("speed").textContent = `${count} tokens in ${seconds.toFixed(2)} s · ${(count / seconds).toFixed(1)} tokens/s`;
  };
  try {
    const res = await post("/v1/completions", body, ctl.signal);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") finished = true;
        if (!data || data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message || JSON.stringify(msg.error));
        for (const choice of msg.choices || []) {
          const out = outs[choice.index] || outs[0];
          addTokens(out, choice);
          if (choice.finish_reason) out.box.append(el("span", "finish", choice.finish_reason));
        }
        speed();
      }
    }
    if (!finished) throw new Error("the server closed the stream before it finished");
    clearError("generate");
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message, "generate");
  } finally {
    if (state.gen === ctl) {
      state.gen = null;
      $("generate").disabled = false;
      $("stop").disabled = true;
      $("outputs").dataset.state = "done";
    }
  }
}
form.addEventListener("submit", generate);
$("stop").addEventListener("click", () => state.gen && state.gen.abort());

// ---- the tooltip: a generated token's probability and its top alternatives
const tip = $("tip");
function showTip(span) {
  if (!span.tokens) return;
  tip.replaceChildren();
  for (const t of span.tokens) {
    tip.append(el("div", "tip-head", `${visible(t.tok)}  ${pct(Math.exp(t.logprob))}`));
    const rows = Object.entries(t.top).sort((a, b) => b[1] - a[1]);
    const table = el("table");
    for (const [text, lp] of rows) {
      const tr = el("tr", text === t.tok ? "chosen" : "");
      tr.append(el("td", "tok", visible(text)), el("td", "p", pct(Math.exp(lp))));
      table.append(tr);
    }
    if (rows.length) tip.append(table);
  }
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const room = document.documentElement.clientWidth - tip.offsetWidth - 8;
  tip.style.left = `${window.scrollX + Math.max(8, Math.min(r.left, room))}px`;
  tip.style.top = `${window.scrollY + r.bottom + 6}px`;
  span.setAttribute("aria-describedby", "tip");
}
function hideTip() { tip.hidden = true; }
const outputs = $("outputs");
outputs.addEventListener("mouseover", (e) => e.target.classList.contains("t") && showTip(e.target));
outputs.addEventListener("mouseout", (e) => e.target.classList.contains("t") && hideTip());
outputs.addEventListener("focusin", (e) => showTip(e.target));
outputs.addEventListener("focusout", hideTip);
outputs.addEventListener("keydown", (e) => { // arrow keys move between the generated tokens
  if (e.key !== "ArrowRight" && e.key !== "ArrowLeft") return;
  const tokens = [...e.target.parentElement.querySelectorAll(".t[tabindex]")];
  const next = tokens[tokens.indexOf(e.target) + (e.key === "ArrowRight" ? 1 : -1)];
  if (next) {
    e.preventDefault();
    e.target.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }
});

// ---- start: the model's name, then the first distribution
async function start() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw await errorOf(res);
    const data = await res.json();
    state.model = data.data && data.data.length ? data.data[0].id : null;
    $("model-name").textContent = state.model ? state.model.split(/[\\/]/).pop() : "(none)";
    $("model-name").title = state.model || "";
    document.title = `${$("model-name").textContent} · lmgen token explorer`;
  } catch (e) {
    $("model-name").textContent = "(unknown)";
    showError(`could not list the models: ${e.message}`, "models");
  }
  refresh();
}
syncMode();
start();
