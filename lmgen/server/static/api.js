// Talking to the server: JSON posts with the tab's API key, and its errors shown in the page's #error alert.
import { $ } from "./util.js";

// The server's {"error": {"message", "param", ...}} is shown as it is, never swallowed or replaced by a guess.
let errorSource = null;
export function showError(message, source) {
  $("error-text").textContent = message;
  $("error").hidden = false;
  errorSource = source;
}
export function clearError(source) {
  if (errorSource === source) $("error").hidden = true;
}
$("error-close").addEventListener("click", () => { $("error").hidden = true; });

// A server started with --api-key wants it on /v1: asked for after a 401, kept for this tab only; in memory
// where the browser denies the page its storage (a cross-site frame, as in a notebook on another site).
const KEY = "lmgen-api-key";
let keyInMemory = null;
function storedKey() {
  try {
    return sessionStorage.getItem(KEY) ?? keyInMemory;
  } catch {
    return keyInMemory;
  }
}
function storeKey(key) {
  keyInMemory = key;
  try {
    sessionStorage.setItem(KEY, key);
  } catch { /* denied: memory it is */ }
}

export function headers() {
  const key = storedKey();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

export async function post(path, body, signal) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await errorOf(res);
  return res;
}

export async function postJSON(path, body, signal) {
  return (await post(path, body, signal)).json();
}

export async function errorOf(res) {
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

// Runs `restart` once the key is given.
export function onApiKey(restart) {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    storeKey($("api-key").value.trim());
    $("key-form").hidden = true;
    $("error").hidden = true;
    restart();
  });
}
