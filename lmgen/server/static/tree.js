// The branch tree: every generation and every branch forked from one, as data, as a nested list with "compare"
// checkboxes, as up to four columns side by side, and as the JSON "Export JSON" downloads.
import { $, el, visible, level, fixed } from "./util.js";
import { postJSON } from "./api.js";

export const MAX_COMPARED = 4;

// prompt: {text, token_ids}; params: the sampling parameters every branch of this tree uses.
export const tree = { model: null, prompt: null, params: {}, maxTokens: null, seed: null, branches: [] };
const compared = new Set();
const tokenTexts = new Map(); // token id -> its own text (from /v1/score), for alternatives shown by id

export function newTree(fields) {
  Object.assign(tree, fields, { branches: [] });
  compared.clear();
}

// A branch: its parent's id (null for a generation's sample), the 1-based step it replaces in its parent, its
// seed, and its own tokens [{id, text, logprob, top}] (the chosen token, then the continuation).
export function addBranch({ parent = null, forkStep = null, seed, tokens = [] }) {
  const branch = { id: tree.branches.length + 1, parent, forkStep, seed, tokens, finish: null, entropies: null };
  tree.branches.push(branch);
  return branch;
}

export const branchById = (id) => tree.branches.find((b) => b.id === Number(id));

// Every generated token of a branch, from the prompt on: its parent's first forkStep - 1, then its own.
export function fullTokens(branch) {
  if (branch.parent === null) return branch.tokens;
  return fullTokens(branchById(branch.parent)).slice(0, branch.forkStep - 1).concat(branch.tokens);
}

// Where a branch's own tokens start in fullTokens (0 for a sample).
export const ownStart = (branch) => (branch.parent === null ? 0 : branch.forkStep - 1);

export const totalLogprob = (branch) => branch.tokens.reduce((s, t) => s + (t.logprob ?? 0), 0);

export function rememberTexts(scored) {
  for (const t of scored) {
    tokenTexts.set(t.id, t.text);
    for (const alt of t.top || []) tokenTexts.set(alt.id, alt.text);
  }
}
export const textOf = (id) => tokenTexts.get(id) ?? `#${id}`;

// Texts for ids no score listed (a top list's last place can differ between a decoding step and the scoring
// pass by rounding): each decoded alone.
export async function fetchTexts(ids, signal) {
  const missing = [...new Set(ids)].filter((id) => !tokenTexts.has(id));
  await Promise.all(missing.map(async (id) => {
    tokenTexts.set(id, (await postJSON("/detokenize", { tokens: [id] }, signal)).prompt);
  }));
}

export const branchName = (b) => (b.parent === null ? `sample ${b.id}` : `branch ${b.id}`);

// ---- the nested list
export function renderTree(shown, onOpen) {
  const roots = tree.branches.filter((b) => b.parent === null);
  $("tree").replaceChildren(...roots.map((b) => node(b, shown, onOpen)));
  $("tree-card").hidden = tree.branches.length === 0;
  renderCompare();
}

function node(branch, shown, onOpen) {
  const li = el("li", "node");
  li.dataset.branch = branch.id;
  const row = el("div", "node-row");
  const open = el("button", "node-open", branchName(branch));
  open.type = "button";
  open.setAttribute("aria-pressed", String(shown.includes(branch.id)));
  open.addEventListener("click", () => onOpen(branch.id));
  const fork = branch.parent === null ? `seed ${branch.seed}` : `step ${branch.forkStep}`;
  const chosen = branch.parent === null ? "" : visible(branch.tokens[0] ? branch.tokens[0].text : "");
  const total = totalLogprob(branch);
  const lp = el("span", "node-lp", `Σ ${fixed(total, 2)}`);
  lp.dataset.totalLogprob = total;
  lp.title = "total logprob of its own generated tokens";
  row.append(open, el("span", "node-fork", fork), el("span", "node-token", chosen), lp, compareBox(branch));
  li.append(row);
  const children = tree.branches.filter((b) => b.parent === branch.id);
  if (children.length) {
    const ul = el("ul");
    ul.append(...children.map((c) => node(c, shown, onOpen)));
    li.append(ul);
  }
  return li;
}

function compareBox(branch) {
  const label = el("label", "node-compare");
  const box = el("input");
  box.type = "checkbox";
  box.checked = compared.has(branch.id);
  box.disabled = !box.checked && compared.size >= MAX_COMPARED; // four side by side at most
  box.setAttribute("aria-label", `compare ${branchName(branch)}`);
  box.addEventListener("change", () => {
    if (box.checked) compared.add(branch.id);
    else compared.delete(branch.id);
    for (const other of $("tree").querySelectorAll("input[type=checkbox]")) {
      other.disabled = !other.checked && compared.size >= MAX_COMPARED;
    }
    renderCompare();
  });
  label.append(box, " compare");
  return label;
}

// ---- side by side
export function renderCompare() {
  const chosen = tree.branches.filter((b) => compared.has(b.id));
  const view = $("compare");
  view.hidden = chosen.length === 0;
  view.replaceChildren(...chosen.map(compareColumn));
}

function compareColumn(branch) {
  const col = el("article", "compare-col");
  col.dataset.branch = branch.id;
  const where = branch.parent === null ? `seed ${branch.seed}` : `from ${branchName(branchById(branch.parent))}, ` +
    `step ${branch.forkStep}`;
  col.append(el("h4", "", `${branchName(branch)} · ${where} · Σ ${fixed(totalLogprob(branch), 2)}`));
  const text = el("div", "compare-text");
  const start = ownStart(branch);
  fullTokens(branch).forEach((t, i) => {
    const span = el("span", i < start ? "ct inherited" : `ct p${level(Math.exp(t.logprob))}`, t.text);
    if (i === start && branch.parent !== null) span.classList.add("fork");
    if (t.text.includes("\n")) span.classList.add("nl");
    text.append(span);
  });
  col.append(text);
  return col;
}

// ---- JSON
export function exportTree() {
  return {
    model: tree.model,
    prompt: tree.prompt,
    params: { ...tree.params, max_tokens: tree.maxTokens, logprobs: 5 },
    seed: tree.seed,
    branches: tree.branches.map((b) => ({
      id: b.id, parent: b.parent, fork_step: b.forkStep, seed: b.seed,
      token_ids: b.tokens.map((t) => t.id), texts: b.tokens.map((t) => t.text),
      logprobs: b.tokens.map((t) => t.logprob), total_logprob: totalLogprob(b), finish_reason: b.finish,
    })),
  };
}

export function downloadTree() {
  const blob = new Blob([JSON.stringify(exportTree(), null, 2)], { type: "application/json" });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = "lmgen-branches.json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
