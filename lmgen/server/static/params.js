// The sampling parameters: one number field per parameter (what is sent) with a slider beside it (to move it).
// The lab's distribution and every generation read them here, so both always use the same values.
import { $ } from "./util.js";

export const PARAMS = ["temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty"];

const field = (name) => $(name);
const slider = (name) => $(`${name}-range`);

// The values to send: a blank field is left out (the server's default). Nothing is checked here: a value the
// server refuses comes back as its own error message.
export function samplingParams() {
  const params = {};
  for (const name of PARAMS) {
    const v = field(name).value.trim();
    if (v !== "") params[name] = Number(v);
  }
  return params;
}

export function setParams(values) {
  for (const name of PARAMS) {
    field(name).value = values[name] ?? "";
    syncSlider(name);
  }
}

// A slider at its "off" end (top-k 0, top-p 1, ...) blanks the field, which reads "off".
function fromSlider(name) {
  const range = slider(name);
  const off = range.dataset.off;
  field(name).value = off !== undefined && Number(range.value) === Number(off) ? "" : range.value;
}

function syncSlider(name) {
  const v = field(name).value.trim();
  const range = slider(name);
  range.value = v === "" ? range.dataset.off ?? range.defaultValue : v; // out-of-range values rest at an end
}

// Calls onChange after any parameter moves, from either the field or its slider.
export function watchParams(onChange) {
  for (const name of PARAMS) {
    slider(name).addEventListener("input", () => {
      fromSlider(name);
      onChange();
    });
    field(name).addEventListener("input", () => {
      syncSlider(name);
      onChange();
    });
  }
  $("params-reset").addEventListener("click", () => {
    setParams({ temperature: 1 });
    onChange();
  });
  for (const name of PARAMS) syncSlider(name);
}
