// Small helpers shared by the panels.

export function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

export function el(id) {
  return document.getElementById(id);
}

let messageTimer = null;
// A one-line message in the page header: errors stay until the next message, info fades.
export function showMessage(text, kind = "info") {
  const m = el("message");
  m.textContent = text;
  m.className = kind;
  m.title = text;
  clearTimeout(messageTimer);
  if (kind !== "error") messageTimer = setTimeout(() => { m.textContent = ""; m.className = ""; }, 4000);
}

export function clearMessage() {
  const m = el("message");
  m.textContent = "";
  m.className = "";
}

// Token text with its spaces and line breaks visible ("␣Paris", "⏎"): tokens that differ only
// by a leading space look different.
export function tokenText(text) {
  return String(text ?? "").replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "").replace(/ /g, "␣");
}
