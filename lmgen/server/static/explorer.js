// lmgen token explorer: the next-token distribution under sampling parameters (lab.js), generation and its
// branch tree (branches.js, tree.js), the text X-ray (xray.js). This file starts them and holds the page's keys.
import { $ } from "./util.js";
import { errorOf, headers, showError, onApiKey } from "./api.js";
import { setupLab, refreshLab, greedyStep, sampleStep, undo } from "./lab.js";
import { setupBranches, setModel, newSeed } from "./branches.js";
import { setupXray } from "./xray.js";
import { hideTip } from "./tip.js";

function pageKeys(e) {
  const action = e.altKey && !e.ctrlKey && { KeyG: greedyStep, KeyS: sampleStep, KeyZ: undo }[e.code];
  if (action) {
    e.preventDefault();
    action();
  } else if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
    e.preventDefault(); // in the X-ray's text it X-rays; anywhere else it generates
    (e.target.closest && e.target.closest("#xray-form") ? $("xray-form") : $("gen-form")).requestSubmit();
  } else if (e.key === "Escape") {
    hideTip();
  }
}

// The model's name, then the first distribution.
async function start() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw await errorOf(res);
    const data = await res.json();
    const model = data.data && data.data.length ? data.data[0].id : null;
    setModel(model);
    $("model-name").textContent = model ? model.split(/[\\/]/).pop() : "(none)";
    $("model-name").title = model || "";
    document.title = `${$("model-name").textContent} · lmgen token explorer`;
  } catch (e) {
    $("model-name").textContent = "(unknown)";
    showError(`could not list the models: ${e.message}`, "models");
  }
  refreshLab.now();
}

setupLab();
setupBranches();
setupXray();
onApiKey(start);
document.addEventListener("keydown", pageKeys);
newSeed();
start();
