// A small inline SVG chart of per-token entropy (nats): one circle per token, joined by a line.
import { svg, visible, fixed } from "./util.js";

const HEIGHT = 120;
const PAD = { left: 34, right: 10, top: 10, bottom: 22 };

// points: [{entropy, text, token?}] in order (token: an index the dot keeps as data-token); width: the drawing's
// width in CSS pixels (its container's).
export function entropyPlot(points, width, label) {
  const w = Math.max(280, Math.round(width) || 600);
  const chart = svg("svg", { class: "plot", viewBox: `0 0 ${w} ${HEIGHT}`, role: "img", "aria-label": label });
  const top = Math.max(0.5, ...points.map((p) => p.entropy));
  const x = (i) => PAD.left + (points.length > 1 ? (i * (w - PAD.left - PAD.right)) / (points.length - 1) : 0);
  const y = (v) => PAD.top + (1 - v / top) * (HEIGHT - PAD.top - PAD.bottom);
  chart.append(axes(w, top, points.length));
  if (points.length > 1) {
    const line = points.map((p, i) => `${x(i).toFixed(1)},${y(p.entropy).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: "plot-line", points: line }));
  }
  points.forEach((p, i) => {
    const dot = svg("circle", { class: "plot-dot", cx: x(i).toFixed(1), cy: y(p.entropy).toFixed(1), r: 3,
      "data-index": i, "data-entropy": p.entropy, ...(p.token === undefined ? {} : { "data-token": p.token }) });
    const title = svg("title");
    title.textContent = `${i + 1}: ${visible(p.text)}  entropy ${fixed(p.entropy)} nats`;
    dot.append(title);
    chart.append(dot);
  });
  return chart;
}

function axes(w, top, n) {
  const g = svg("g", { class: "plot-axes" });
  const bottom = HEIGHT - PAD.bottom;
  g.append(svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom }),
    svg("line", { x1: PAD.left, y1: bottom, x2: w - PAD.right, y2: bottom }));
  const label = (text, attributes) => {
    const t = svg("text", attributes);
    t.textContent = text;
    g.append(t);
  };
  label(top.toFixed(1), { x: PAD.left - 4, y: PAD.top + 4, "text-anchor": "end" });
  label("0", { x: PAD.left - 4, y: bottom + 4, "text-anchor": "end" });
  label("nats", { x: 2, y: HEIGHT / 2, "text-anchor": "start" });
  label(`token 1 … ${n}`, { x: w - PAD.right, y: HEIGHT - 6, "text-anchor": "end" });
  return g;
}
