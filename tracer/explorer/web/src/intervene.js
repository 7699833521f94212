// Live interventions: ablate, scale or clamp a pinned node or supernode (constrained or free);
// the engine runs it on the server; the page polls the job and shows a progress bar, then the
// top logits before and after and a greedy continuation without and with the edit.
import { api, guarded } from "./api.js";
import { nodeTitle } from "./nodepanel.js";
import { el, esc, fmt, showMessage } from "./util.js";

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

export async function runIntervention(app, nodes, op, value, mode) {
  const bar = el("iv-progress"), status = el("iv-status"), out = el("iv-result");
  out.innerHTML = "";
  bar.hidden = false; bar.value = 0; status.textContent = "queued";
  el("iv-run").disabled = true;
  try {
    let job = await api("/api/interventions", { method: "POST", body: { graph: app.graph.id, edits: [{ nodes, op, value }], mode } });
    while (job.state === "queued" || job.state === "running") {
      bar.value = job.progress; status.textContent = job.message;
      await new Promise((r) => setTimeout(r, 200));
      job = await api(`/api/jobs/${job.id}`);
    }
    bar.value = 1;
    if (job.state === "error") { status.textContent = "failed"; showMessage(job.error, "error"); return; }
    status.textContent = "done";
    renderResult(job.result);
  } finally {
    el("iv-run").disabled = false;
    setTimeout(() => { bar.hidden = true; }, 400);
  }
}

function renderResult(r) {
  const rows = r.logits.map((x) => `<tr data-token="${x.token}"><td>${esc(x.text)}</td><td class="num">${x.token}</td>
    <td class="num logit-before">${x.logit_before.toFixed(4)}</td><td class="num logit-after">${x.logit_after.toFixed(4)}</td>
    <td class="num">${fmt(x.prob_before, 4)}</td><td class="num">${fmt(x.prob_after, 4)}</td></tr>`).join("");
  el("iv-result").innerHTML = `<div class="meta">${r.edits.length} feature edit(s), mode ${esc(r.mode)}: ${r.edits.map((e) => `L${e.layer}/F${e.feature}@${e.position} ${e.op}${e.op === "ablate" ? "" : ` ${e.value}`}`).join(", ")}</div>
    <h3>top logits at the last position</h3>
    <table id="logit-table"><tr><th>token</th><th class="num">id</th><th class="num">logit before</th><th class="num">logit after</th><th class="num">p before</th><th class="num">p after</th></tr>${rows}</table>
    <h3>continuation</h3><div>original</div><div class="cont" id="cont-original">${esc(r.original)}</div>
    <div>steered</div><div class="cont" id="cont-steered">${esc(r.steered)}</div>`;
}
