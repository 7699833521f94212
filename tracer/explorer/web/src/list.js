// The graph list: every graph of the store and the folder, searchable by prompt and feature.
import { api, guarded } from "./api.js";
import { el, esc, fmt } from "./util.js";

export function setupList(app) {
  let timer = null;
  const refresh = () => guarded(async () => {
    const q = el("search-text").value.trim(), f = el("search-feature").value.trim();
    const params = new URLSearchParams();
    if (q) params.set("q", q);
    if (f) params.set("feature", f);
    const data = await api(`/api/graphs?${params}`);
    renderList(app, data.graphs);
  });
  for (const id of ["search-text", "search-feature"]) {
    el(id).addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(refresh, 250); });
  }
  el("toggle-list").addEventListener("click", () => el("list-pane").classList.toggle("hidden"));
  return refresh;
}

function renderList(app, graphs) {
  const box = el("graph-list");
  if (!graphs.length) { box.innerHTML = '<p class="hint" style="padding:8px">No graphs match.</p>'; return; }
  box.innerHTML = graphs.map((g) => {
    const sc = g.scores || {}, v = g.validation || {};
    return `<div class="graph-item${app.graph && app.graph.id === g.id ? " active" : ""}" data-id="${esc(g.id)}">
      <div class="prompt">${esc(g.prompt)}</div>
      <div class="meta">${g.n_nodes} nodes · ${g.n_edges} edges · ${esc(g.source)}</div>
      <div class="meta">replacement ${fmt(sc.replacement, 2)} · completeness ${fmt(sc.completeness, 2)}${v.spearman !== undefined ? ` · spearman ${fmt(v.spearman, 2)}` : ""}${sc.convention ? ` · ${esc(sc.convention)}` : ""}</div>
    </div>`;
  }).join("");
  for (const item of box.querySelectorAll(".graph-item")) {
    item.addEventListener("click", () => app.openGraph(item.dataset.id));
  }
}
