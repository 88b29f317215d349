// Small helpers every part of the explorer shares: elements, how tokens and numbers are shown.

export const $ = (id) => document.getElementById(id);

const VISIBLE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
// A token's text with its white space made visible (a token of nothing shows as ∅).
export const visible = (s) => (s === "" ? "∅" : s.replace(/[ \n\t\r]/g, (c) => VISIBLE[c]));

export const pct = (p) => (p === 0 ? "0" : p >= 0.01 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2)) + "%";

// A probability's colour class p0..p4 (low to high), as the legend shows them.
export const level = (p) => (p < 0.05 ? 0 : p < 0.2 ? 1 : p < 0.5 ? 2 : p < 0.8 ? 3 : 4);

// A surprisal's (−logprob, nats) colour class s0..s4 (expected to surprising).
export const SURPRISAL_STEPS = [1, 2.5, 5, 8];
export const surprisalLevel = (s) => SURPRISAL_STEPS.filter((step) => s >= step).length;

export const fixed = (x, digits = 3) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attributes = {}) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) e.setAttribute(name, value);
  return e;
}

// Calls fn once the calls stop for `delay` ms (typing, a slider dragged).
export function debounce(fn, delay) {
  let timer = 0;
  const call = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), delay);
  };
  call.now = (...args) => {
    clearTimeout(timer);
    return fn(...args);
  };
  return call;
}

// Arrow keys move focus along a row of tokens that has one tab stop (a roving tabindex).
export function rovingArrows(container, selector) {
  container.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowRight" && e.key !== "ArrowLeft") return;
    if (!e.target.matches(selector)) return;
    const row = e.target.closest("[data-row]") || container;
    const items = [...row.querySelectorAll(selector)];
    const next = items[items.indexOf(e.target) + (e.key === "ArrowRight" ? 1 : -1)];
    if (!next) return;
    e.preventDefault();
    e.target.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  });
}
