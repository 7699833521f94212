// Live interventions: ablate, scale or clamp a pinned node or supernode (constrained or free);
// the engine runs it on the server; the page polls the job (cancel stops it) and shows a
// progress bar, then the mode, the change in the graph's target logit and its rank, the top
// logits before and after, and a greedy (live) continuation without and with the edit.
import { api, guarded } from "./api.js";
import { nodeTitle } from "./nodepanel.js";
import { el, esc, fmt, showMessage, tokenText } from "./util.js";

export function refreshTargets(app) {
  const sel = el("iv-target"), g = app.graph;
  if (!g) return;
  const keep = sel.value;
  const grouped = new Set(app.supernodes.flatMap((s) => s.members));
  const opts = app.supernodes.map((s, k) => `<option value="s:${k}">supernode: ${esc(s.label)}</option>`);
  for (const id of app.pinned) {
    if (grouped.has(id)) continue;
    const i = app.index.get(id);
    if (g.nodes.kind[i] !== "feature") continue;
    opts.push(`<option value="n:${esc(id)}">${esc(app.labels[id] || nodeTitle(g, i))}</option>`);
  }
  sel.innerHTML = opts.join("") || '<option value="">pin a feature node first</option>';
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

export function setupIntervene(app) {
  el("iv-op").addEventListener("change", () => {
    el("iv-value").value = el("iv-op").value === "scale" ? "2" : el("iv-op").value === "clamp" ? "5" : "0";
  });
  el("iv-run").addEventListener("click", () => guarded(async () => {
    const target = el("iv-target").value;
    let nodes;
    if (target.startsWith("s:")) nodes = app.supernodes[Number(target.slice(2))].members.filter((id) => app.graph.nodes.kind[app.index.get(id)] === "feature");
    else if (target.startsWith("n:")) nodes = [target.slice(2)];
    else throw new Error("pin a feature node (or group pinned nodes) to intervene on it");
    await runIntervention(app, nodes, el("iv-op").value, Number(el("iv-value").value), el("iv-mode").value);
  }));
}

const MODE_TEXT = {
  constrained: "constrained: attention, norms and MLP outputs frozen at the prompt's values, so the edit moves the logits exactly as the graph's edges predict",
  free: "live: attention patterns frozen, every MLP and the transcoder recomputed downstream of the edit (the honest test of the graph)",
};
const TABLE_K = 10; // the server's table: the top 10 tokens after the edit and before it

// mode: "constrained", "free" (live) or "both" (one job in each mode, shown side by side).
export async function runIntervention(app, nodes, op, value, mode) {
  const bar = el("iv-progress"), status = el("iv-status"), out = el("iv-result"), cancel = el("iv-cancel");
  out.innerHTML = "";
  bar.hidden = false; bar.value = 0; status.textContent = "queued";
  el("iv-run").disabled = true;
  let job = null, stopped = false;
  cancel.hidden = false;
  cancel.onclick = () => guarded(async () => {
    stopped = true;
    if (job) await api(`/api/jobs/${job.id}/cancel`, { method: "POST" });
    status.textContent = "cancelling…";
  });
  const modes = mode === "both" ? ["constrained", "free"] : [mode];
  try {
    const results = [];
    for (const [j, m] of modes.entries()) {
      if (stopped) { status.textContent = "cancelled"; return; }
      job = await api("/api/interventions", { method: "POST", body: { graph: app.graph.id, edits: [{ nodes, op, value }], mode: m } });
      while (job.state === "queued" || job.state === "running") {
        bar.value = (j + job.progress) / modes.length;
        status.textContent = `${modes.length > 1 ? `${m === "free" ? "live" : m}: ` : ""}${job.message}`;
        await new Promise((r) => setTimeout(r, 200));
        job = await api(`/api/jobs/${job.id}`);
      }
      if (job.state === "cancelled") { status.textContent = "cancelled"; return; }
      if (job.state === "error") { status.textContent = "failed"; showMessage(job.error, "error"); return; }
      results.push(job.result);
    }
    bar.value = 1;
    status.textContent = "done";
    if (results.length === 2) renderBoth(app, results[0], results[1]);
    else renderResult(app, results[0]);
  } finally {
    el("iv-run").disabled = false;
    cancel.hidden = true;
    setTimeout(() => { bar.hidden = true; }, 400);
  }
}

// The graph's target logit (its most probable) in the result's table: logit before and after,
// and its rank among the tokens by probability before and after (exact within the top 10).
export function targetChange(app, r) {
  const top = app.graph.logits[0];
  if (!top) return null;
  const row = r.logits.find((x) => x.token === top.token);
  if (!row) return null;
  const rank = (key) => {
    const sorted = [...r.logits].sort((a, b) => b[key] - a[key] || a.token - b.token);
    const j = sorted.findIndex((x) => x.token === top.token) + 1;
    return j <= TABLE_K ? String(j) : `>${TABLE_K}`;
  };
  return { text: tokenText(row.text), before: row.logit_before, after: row.logit_after, delta: row.logit_after - row.logit_before, rankBefore: rank("prob_before"), rankAfter: rank("prob_after") };
}

function renderResult(app, r) {
  const rows = r.logits.map((x) => `<tr data-token="${x.token}"><td>${esc(tokenText(x.text))}</td><td class="num">${x.token}</td>
    <td class="num logit-before">${x.logit_before.toFixed(4)}</td><td class="num logit-after">${x.logit_after.toFixed(4)}</td>
    <td class="num ${x.logit_after - x.logit_before >= 0 ? "pos" : "neg"}">${(x.logit_after - x.logit_before >= 0 ? "+" : "")}${(x.logit_after - x.logit_before).toFixed(3)}</td>
    <td class="num">${fmt(x.prob_before, 4)}</td><td class="num">${fmt(x.prob_after, 4)}</td></tr>`).join("");
  const tc = targetChange(app, r);
  const mode = r.mode === "free" ? "live" : r.mode;
  el("iv-result").innerHTML = `<div class="meta">${r.edits.length} feature edit(s): ${r.edits.map((e) => `L${e.layer}/F${e.feature}@${e.position} ${e.op}${e.op === "ablate" ? "" : ` ${e.value}`}`).join(", ")}</div>
    ${tc ? `<div id="iv-target-change" class="target-change">target ${esc(tc.text)}: logit ${tc.before.toFixed(3)} → ${tc.after.toFixed(3)} (<b class="${tc.delta >= 0 ? "pos" : "neg"}">${tc.delta >= 0 ? "+" : ""}${tc.delta.toFixed(3)}</b>), rank ${tc.rankBefore} → ${tc.rankAfter} <span class="mode-tag">${esc(mode)}</span></div>` : ""}
    <h3>top logits at the last position <span class="mode-tag" id="iv-table-mode">${esc(mode)}</span></h3>
    <div class="meta">${esc(MODE_TEXT[r.mode] || r.mode)}</div>
    <table id="logit-table"><tr><th>token</th><th class="num">id</th><th class="num">logit before</th><th class="num">logit after</th><th class="num">change</th><th class="num">p before</th><th class="num">p after</th></tr>${rows}</table>
    <h3>continuation <span class="mode-tag" id="iv-cont-mode">live</span></h3>
    <div class="meta">greedy generation by the model with the edit applied at every step (live, whatever the table's mode${r.mode === "constrained" ? ": the constrained table and this continuation can disagree, since here everything downstream of the edit is recomputed" : ""}).</div>
    <div>original</div><div class="cont" id="cont-original">${esc(r.original)}</div>
    <div>steered</div><div class="cont" id="cont-steered">${esc(r.steered)}</div>
    ${r.original === r.steered ? '<p class="hint">the continuation did not change: the edit moves the logits (above) but not the greedy choice of any generated token</p>' : ""}`;
}

// Constrained and live side by side: what the graph predicts and what the model does.
function renderBoth(app, c, f) {
  const byTok = (r) => new Map(r.logits.map((x) => [x.token, x]));
  const mc = byTok(c), mf = byTok(f);
  const tokens = [...new Set([...c.logits.map((x) => x.token), ...f.logits.map((x) => x.token)])];
  const row = (t) => {
    const a = mc.get(t), b = mf.get(t), any = a || b;
    const cell = (x, key, cls) => `<td class="num ${cls}">${x ? x[key].toFixed(4) : "·"}</td>`;
    return `<tr data-token="${t}"><td>${esc(tokenText(any.text))}</td><td class="num">${t}</td>
      <td class="num logit-before">${any.logit_before.toFixed(4)}</td>${cell(a, "logit_after", "logit-after-constrained")}${cell(b, "logit_after", "logit-after-live")}
      <td class="num">${fmt(any.prob_before, 4)}</td><td class="num">${a ? fmt(a.prob_after, 4) : "·"}</td><td class="num">${b ? fmt(b.prob_after, 4) : "·"}</td></tr>`;
  };
  const tcs = [["constrained", targetChange(app, c)], ["live", targetChange(app, f)]];
  el("iv-result").innerHTML = `<div class="meta">${c.edits.length} feature edit(s): ${c.edits.map((e) => `L${e.layer}/F${e.feature}@${e.position} ${e.op}${e.op === "ablate" ? "" : ` ${e.value}`}`).join(", ")}</div>
    ${tcs.filter(([, tc]) => tc).map(([m, tc]) => `<div class="target-change" id="iv-target-change-${m}">target ${esc(tc.text)}: logit ${tc.before.toFixed(3)} → ${tc.after.toFixed(3)} (<b class="${tc.delta >= 0 ? "pos" : "neg"}">${tc.delta >= 0 ? "+" : ""}${tc.delta.toFixed(3)}</b>), rank ${tc.rankBefore} → ${tc.rankAfter} <span class="mode-tag">${m}</span></div>`).join("")}
    <h3>top logits at the last position <span class="mode-tag">constrained</span> <span class="mode-tag">live</span></h3>
    <div class="meta">${esc(MODE_TEXT.constrained)}. ${esc(MODE_TEXT.free)}. Where the two columns differ, the graph's linear picture of the edit misses what the rest of the model does with it.</div>
    <table id="logit-table-both"><tr><th>token</th><th class="num">id</th><th class="num">logit before</th><th class="num">after (constrained)</th><th class="num">after (live)</th><th class="num">p before</th><th class="num">p constrained</th><th class="num">p live</th></tr>${tokens.map(row).join("")}</table>
    <h3>continuation <span class="mode-tag">live</span></h3>
    <div>original</div><div class="cont" id="cont-original">${esc(f.original)}</div>
    <div>steered</div><div class="cont" id="cont-steered">${esc(f.steered)}</div>`;
}
