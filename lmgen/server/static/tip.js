// The one tooltip: a token's numbers and its step's most likely alternatives, beside the token hovered or focused.
import { $, el, visible, pct } from "./util.js";

const tip = $("tip");

// head: the first line; notes: more lines; rows: [{text, probability, chosen}] as a table, most likely first;
// above: placed over the anchor where there is room (to leave what is below it in view).
export function showTip(anchor, { head, notes = [], rows = [], above = false }) {
  tip.replaceChildren(el("div", "tip-head", head), ...notes.map((n) => el("div", "tip-note", n)));
  if (rows.length) {
    const table = el("table");
    for (const row of rows) {
      const tr = el("tr", row.chosen ? "chosen" : "");
      tr.append(el("td", "tok", visible(row.text)), el("td", "p", pct(row.probability)));
      table.append(tr);
    }
    tip.append(table);
  }
  tip.hidden = false;
  const r = anchor.getBoundingClientRect();
  const room = document.documentElement.clientWidth - tip.offsetWidth - 8;
  tip.style.left = `${window.scrollX + Math.max(8, Math.min(r.left, room))}px`;
  const over = above && r.top - tip.offsetHeight - 6 >= 0;
  tip.style.top = `${window.scrollY + (over ? r.top - tip.offsetHeight - 6 : r.bottom + 6)}px`;
  anchor.setAttribute("aria-describedby", "tip");
}

export function hideTip() {
  tip.hidden = true;
}

// Shows describe(token)'s tip while a token matching `selector` in container is hovered or focused.
export function tipsFor(container, selector, describe) {
  const show = (e) => {
    const token = e.target.closest(selector);
    const content = token && describe(token);
    if (content) showTip(token, content);
  };
  container.addEventListener("mouseover", show);
  container.addEventListener("focusin", show);
  container.addEventListener("mouseout", (e) => e.target.closest(selector) && hideTip());
  container.addEventListener("focusout", hideTip);
}
