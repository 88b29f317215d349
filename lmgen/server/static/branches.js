// Generation and branching: Generate streams n seeded samples of the prompt; any generated token, clicked or
// Entered, lists its step's alternatives, and choosing one forks a branch there that goes on with the same
// parameters and seed. Each finished branch is scored (POST /v1/score) for its entropy plot.
import { $, el, visible, pct, level, fixed, rovingArrows } from "./util.js";
import { postJSON, showError, clearError } from "./api.js";
import { samplingParams } from "./params.js";
import { promptIds } from "./lab.js";
import { streamCompletion } from "./stream.js";
import { entropyPlot } from "./plot.js";
import { tipsFor } from "./tip.js";
import { tree, newTree, addBranch, branchById, fullTokens, ownStart, totalLogprob, rememberTexts, fetchTexts,
  textOf, branchName, renderTree, downloadTree, exportTree } from "./tree.js";

const LOGPROBS = 5;
const MAX_N = 16;
const outputs = $("outputs");
const fork = $("fork");
let shown = []; // the ids of the branches #outputs shows
let running = null; // the AbortController of the generation in flight
let started = 0;

const number = (id) => {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
};

export function newSeed() { // six digits at most: easy to read back and type again
  $("seed").value = String(Math.floor(Math.random() * 1e6));
}

// ---- the outputs: one box per branch shown
function show(ids) {
  closeFork();
  shown = ids;
  outputs.replaceChildren(...ids.map((id) => box(branchById(id))));
  for (const id of ids) drawPlot(branchById(id)); // once placed: a plot is drawn at its box's width
  renderTree(shown, (id) => show([id]));
}

function box(branch) {
  const out = el("div", "output");
  out.dataset.branch = branch.id;
  out.append(el("div", "output-head", headText(branch)));
  const text = el("div", "output-text");
  const gen = el("span", "gen");
  gen.dataset.row = "";
  text.append(el("span", "echo", tree.prompt.text), gen);
  out.append(text, el("div", "output-plot"));
  fullTokens(branch).forEach((t, i) => gen.append(tokenSpan(branch, t, i)));
  if (branch.finish) text.append(el("span", "finish", branch.finish));
  return out;
}

function headText(branch) {
  const parent = branch.parent === null ? null : branchById(branch.parent);
  const where = parent ? ` · from ${branchName(parent)} at step ${branch.forkStep}` : "";
  return `${branchName(branch)}${where} · seed ${branch.seed} · Σ logprob ${fixed(totalLogprob(branch), 2)}`;
}

function tokenSpan(branch, t, i) {
  const span = el("span", `t p${level(Math.exp(t.logprob))}`, t.text);
  const start = ownStart(branch);
  if (i < start) span.classList.add("inherited");
  if (i === start && branch.parent !== null) span.classList.add("fork");
  if (t.text === "") span.classList.add("held"); // its text came with a later token
  if (t.text.includes("\n")) span.classList.add("nl"); // a newline token, made visible
  Object.assign(span.dataset, { step: i + 1, tokenId: t.id, logprob: t.logprob, probability: Math.exp(t.logprob) });
  span.tabIndex = i === 0 ? 0 : -1; // one tab stop per text; arrow keys move along it
  span.setAttribute("role", "button");
  span.setAttribute("aria-label", `step ${i + 1}: ${JSON.stringify(t.text)}, ${pct(Math.exp(t.logprob))}; ` +
    "Enter lists its alternatives");
  return span;
}

function boxOf(branch) {
  return outputs.querySelector(`.output[data-branch="${branch.id}"]`);
}

// A streamed event: its tokens join the branch (and its box), its text goes to the branch's latest token.
function receive(branch, tokens, text, finish) {
  const gen = boxOf(branch)?.querySelector(".gen");
  for (const t of tokens) {
    const full = fullTokens(branch).length;
    const token = { ...t, text: "" };
    branch.tokens.push(token);
    if (gen) gen.append(tokenSpan(branch, token, full));
  }
  const last = branch.tokens[branch.tokens.length - 1];
  if (text && last) {
    last.text += text;
    const span = gen && gen.lastElementChild;
    if (span) span.replaceWith(tokenSpan(branch, last, fullTokens(branch).length - 1));
  }
  if (finish) branch.finish = finish;
}

// ---- generating: the samples of a prompt, or a branch's continuation
function completionBody(promptIdsList, maxTokens, n, seed) {
  return { model: tree.model || undefined, prompt: promptIdsList, max_tokens: maxTokens, n, seed,
    logprobs: LOGPROBS, ...tree.params };
}

async function run(branches, body, focusAfter) {
  if (running) running.abort();
  const ctl = (running = new AbortController());
  setRunning(true);
  started = performance.now();
  const count0 = branches.reduce((s, b) => s + b.tokens.length, 0);
  try {
    if (body) {
      await streamCompletion(body, ctl.signal, (index, tokens, text, finish) => {
        const branch = branches[index] || branches[0];
        receive(branch, tokens, text, finish);
        speed(branches.reduce((s, b) => s + b.tokens.length, 0) - count0);
      });
    }
    for (const b of branches) await scoreBranch(b, ctl.signal);
    clearError("generate");
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message, "generate");
  } finally {
    if (running === ctl) {
      running = null;
      setRunning(false);
      show(shown);
      if (focusAfter) focusAfter();
    }
  }
}

function setRunning(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  outputs.dataset.state = on ? "running" : "done";
}

function speed(count) {
  const seconds = (performance.now() - started) / 1000;
  $("speed").textContent = `${count} tokens in ${seconds.toFixed(2)} s · ${(count / seconds).toFixed(1)} tokens/s`;
}

// The whole sequence scored: each generated token's entropy for the plot, and the texts of its alternatives.
async function scoreBranch(branch, signal) {
  const ids = [...tree.prompt.token_ids, ...fullTokens(branch).map((t) => t.id)];
  if (ids.length < 2) return;
  const score = await postJSON("/v1/score", { token_ids: ids, top_n: LOGPROBS }, signal);
  rememberTexts(score.tokens);
  await fetchTexts(fullTokens(branch).flatMap((t) => t.top.map((alt) => alt.id)), signal);
  const generated = score.tokens.slice(tree.prompt.token_ids.length);
  branch.entropies = generated.map((t) => t.entropy);
  if (branch.parent !== null && branch.tokens[0]) branch.tokens[0].text = generated[ownStart(branch)].text;
}

function drawPlot(branch) {
  const place = boxOf(branch)?.querySelector(".output-plot");
  if (!place || !branch.entropies) return;
  const points = fullTokens(branch).map((t, i) => ({ entropy: branch.entropies[i], text: t.text }));
  place.replaceChildren(el("div", "plot-title muted", "entropy per generated token (nats)"),
    entropyPlot(points, place.clientWidth, `entropy of ${branchName(branch)}'s tokens`));
}

async function generate(e) {
  e.preventDefault();
  closeFork();
  outputs.dataset.state = "running"; // at once: the prompt's ids may take a request first
  if ($("seed").value.trim() === "") newSeed(); // always seeded, and the seed shown
  const seed = number("seed");
  const n = number("n");
  try {
    const ids = await promptIds();
    newTree({ model: tree.model, prompt: { text: $("prompt").value, token_ids: ids }, params: samplingParams(),
      maxTokens: number("max_tokens") ?? null, seed });
  } catch (err) {
    showError(err.message, "generate");
    outputs.dataset.state = "done";
    return;
  }
  const count = Number.isInteger(n) && n > 0 && n <= MAX_N ? n : 1;
  const roots = Array.from({ length: count }, (_, i) => addBranch({ seed: seed + i })); // sample i: seed + i
  show(roots.map((b) => b.id));
  await run(roots, completionBody(tree.prompt.token_ids, tree.maxTokens ?? undefined, n, seed));
}

// Fork `parent` at `step` with the token `choice` ({id, logprob}): it and a continuation make the branch, which
// ends where its parent's generation would (max_tokens from the prompt on).
async function branchFrom(parent, step, choice) {
  const before = fullTokens(parent).slice(0, step - 1);
  const replaced = fullTokens(parent)[step - 1]; // the chosen token has the same alternatives
  const first = { id: choice.id, text: textOf(choice.id), logprob: choice.logprob, top: replaced.top };
  const branch = addBranch({ parent: parent.id, forkStep: step, seed: parent.seed, tokens: [first] });
  show([branch.id]);
  const budget = (tree.maxTokens ?? fullTokens(parent).length) - step;
  const prompt = [...tree.prompt.token_ids, ...before.map((t) => t.id), choice.id];
  const body = budget > 0 ? completionBody(prompt, budget, 1, branch.seed) : null;
  await run([branch], body, () => boxOf(branch)?.querySelector(".t.fork")?.focus());
}

// ---- the alternatives of one step, as buttons that fork there
function openFork(span, focus) {
  const branch = branchById(span.closest(".output").dataset.branch);
  const step = Number(span.dataset.step);
  const token = fullTokens(branch)[step - 1];
  $("fork-title").textContent = `${branchName(branch)}, step ${step}: ${visible(token.text)} ` +
    `(${pct(Math.exp(token.logprob))}). Branch with another token:`;
  $("fork-options").replaceChildren(...token.top.map((alt) => option(branch, step, token, alt)));
  closeFork();
  fork.returnTo = span;
  span.classList.add("open"); // the token whose alternatives these are
  span.closest(".output").after(fork); // below the text it belongs to
  fork.hidden = false;
  if (focus) $("fork-options").querySelector("button")?.focus();
}

function option(branch, step, token, alt) {
  const li = el("li");
  const b = el("button", "alt");
  b.type = "button";
  b.disabled = running !== null;
  Object.assign(b.dataset, { tokenId: alt.id, logprob: alt.logprob });
  b.append(el("span", "tok", visible(textOf(alt.id))), el("span", "p", pct(Math.exp(alt.logprob))));
  if (alt.id === token.id) {
    b.setAttribute("aria-current", "true");
    b.append(el("span", "muted", "chosen"));
  }
  b.addEventListener("click", () => {
    closeFork();
    branchFrom(branch, step, alt);
  });
  li.append(b);
  return li;
}

function closeFork() {
  fork.returnTo?.classList.remove("open");
  fork.hidden = true;
  outputs.after(fork); // out of the boxes, which are redrawn
}

function forkKeys(e) {
  const buttons = [...fork.querySelectorAll("button.alt")];
  const i = buttons.indexOf(document.activeElement);
  if ((e.key === "ArrowDown" || e.key === "ArrowUp") && i >= 0) {
    buttons[Math.max(0, Math.min(buttons.length - 1, i + (e.key === "ArrowDown" ? 1 : -1)))].focus();
  } else if (e.key === "Escape") {
    const back = fork.returnTo;
    closeFork();
    if (back && back.isConnected) back.focus();
  } else {
    return;
  }
  e.preventDefault();
}

function describe(span) {
  const branch = branchById(span.closest(".output").dataset.branch);
  const token = fullTokens(branch)[Number(span.dataset.step) - 1];
  if (!token) return null;
  return { head: `${visible(token.text)}  ${pct(Math.exp(token.logprob))}`,
    notes: [`step ${span.dataset.step} · click or Enter to branch here`],
    rows: token.top.map((alt) => ({ text: textOf(alt.id), probability: Math.exp(alt.logprob),
      chosen: alt.id === token.id })) };
}

export function setupBranches() {
  $("gen-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("new-seed").addEventListener("click", newSeed);
  $("export-tree").addEventListener("click", downloadTree);
  $("fork-close").addEventListener("click", closeFork);
  fork.addEventListener("keydown", forkKeys);
  outputs.addEventListener("click", (e) => e.target.matches(".t") && openFork(e.target, false));
  outputs.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target.matches(".t")) {
      e.preventDefault();
      openFork(e.target, true);
    }
  });
  rovingArrows(outputs, ".t");
  tipsFor(outputs, ".t", describe);
  window.lmgenExplorer = { ...(window.lmgenExplorer || {}), tree: exportTree }; // for tests and the console
}

// The served model's id, which every completion names.
export const setModel = (model) => { tree.model = model; };
