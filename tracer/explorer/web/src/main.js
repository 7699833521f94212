// The explorer's page: wires the graph view, the graph list and the side panels together.
// State lives in the URL (?graph=ID&full=1&subgraph=NAME&node=NODE_ID), so a reload or a
// shared link opens the same view.
import { api, guarded } from "./api.js";
import { setupConsole } from "./console.js";
import { showFeature } from "./feature.js";
import { GraphView } from "./graphview.js";
import { refreshTargets, runIntervention, setupIntervene } from "./intervene.js";
import { setupList } from "./list.js";
import { showNode, tooltipHtml } from "./nodepanel.js";
import { applySubgraph, refreshSaved, renderSubgraph, setupSubgraph } from "./subgraph.js";
import { clearMessage, el, esc, fmt } from "./util.js";

const app = {
  graph: null,
  index: new Map(),
  pinned: [],
  supernodes: [],
  labels: {},
  savedName: null,
};

app.view = new GraphView(el("base"), el("overlay"), el("tooltip"), {
  onHover(i) {
    const tip = el("tooltip");
    if (i < 0 || !app.graph) { tip.hidden = true; return; }
    tip.innerHTML = tooltipHtml(app, i);
    tip.hidden = false;
  },
  onClick(i) { app.selectNode(i); },
});

app.showTab = (name) => {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.id === `tab-${name}`);
};
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => app.showTab(b.dataset.tab));

app.setUrl = (changes) => {
  const url = new URL(window.location.href);
  for (const [k, v] of Object.entries(changes)) {
    if (v === null || v === undefined || v === false) url.searchParams.delete(k);
    else url.searchParams.set(k, v === true ? "1" : v);
  }
  if ("subgraph" in changes) app.savedName = changes.subgraph || null;
  history.replaceState(null, "", url);
  if (app.graph) renderSubgraph(app);
};

app.selectNode = (i) => {
  app.view.selected = i;
  app.view.update(false);
  showNode(app, i);
  app.showTab("node");
};

app.togglePin = (id) => {
  if (app.pinned.includes(id)) {
    app.pinned = app.pinned.filter((p) => p !== id);
    for (const s of app.supernodes) s.members = s.members.filter((m) => m !== id);
    app.supernodes = app.supernodes.filter((s) => s.members.length);
  } else app.pinned.push(id);
  renderSubgraph(app);
};

app.openFeature = (i) => guarded(() => showFeature(app, i));
app.refreshTargets = () => refreshTargets(app);
app.runIntervention = (nodes, op, value, mode) => guarded(() => runIntervention(app, nodes, op, value, mode));

app.setHighlight = (ids) => {
  app.view.highlight = new Set(ids.map((id) => app.index.get(id)).filter((i) => i !== undefined));
  app.view.update(false);
};

// The readable default: features holding 0.8 of the features' influence, at most 100 of them,
// and the 150 strongest background edges (a stored circuit's edges are pruned already: all of
// them within the threshold; a full graph's: 0.98 of the |weight|).
function thresholds(full) {
  const et = full ? 0.98 : 1;
  el("node-threshold").value = 0.8;
  el("edge-threshold").value = et;
  return readThresholds();
}

function readThresholds() {
  const int = (id, lo, dflt) => { const v = Math.round(Number(el(id).value)); return Number.isFinite(v) && v >= lo ? v : dflt; };
  return {
    nodeThreshold: Number(el("node-threshold").value),
    edgeThreshold: Number(el("edge-threshold").value),
    maxFeatures: int("max-features", 1, 100),
    maxEdges: int("max-edges", 0, 150),
  };
}

function updateCounts() {
  const c = app.view.counts;
  el("counts").textContent = c ? `${c.features} of ${c.totalFeatures} features · ${c.errors} error nodes · ${c.edges} of ${c.edgesInThreshold} edges drawn` : "";
  el("node-threshold-value").textContent = Number(el("node-threshold").value).toFixed(2);
  el("edge-threshold-value").textContent = Number(el("edge-threshold").value).toFixed(2);
}
app.updateCounts = updateCounts;

for (const id of ["node-threshold", "edge-threshold", "max-features", "max-edges"]) {
  el(id).addEventListener("input", () => {
    app.view.setThresholds(readThresholds());
    updateCounts();
  });
}
el("reset-view").addEventListener("click", () => app.view.fit());
// the full-graph toggle keeps the pinned nodes, supernodes and labels (those the other graph has)
el("full-graph").addEventListener("change", () => {
  if (!app.graph) return;
  const keep = { pinnedIds: [...app.pinned], supernodes: app.supernodes.map((s) => [s.label, ...s.members]), clerps: Object.entries(app.labels) };
  guarded(() => app.openGraph(app.graph.id, { full: el("full-graph").checked, keep }));
});

// Feature labels kept in the store (per feature identity) replace the automatic ones.
app.applyLabels = (labels) => {
  const g = app.graph;
  for (let i = 0; i < g.nodes.id.length; i++) {
    if (g.nodes.kind[i] !== "feature") continue;
    const edited = labels[g.nodes.id[i]];
    g.nodes.text[i] = edited || g.nodes.autoText[i];
    g.nodes.edited[i] = Boolean(edited);
  }
  app.view.request(true);
};

app.setFeatureLabel = async (layer, index, label) => {
  const g = app.graph;
  const saved = await api("/api/labels", { method: "POST", body: { transcoder: g.transcoder, layer, index, label } });
  for (let i = 0; i < g.nodes.id.length; i++) {
    if (g.nodes.kind[i] === "feature" && g.nodes.layer[i] === layer && g.nodes.feature[i] === index) {
      g.nodes.text[i] = saved.label || g.nodes.autoText[i];
      g.nodes.edited[i] = Boolean(saved.label);
    }
  }
  app.view.request(true);
  renderSubgraph(app);
  return saved;
};

// "trace from here": the strongest paths from the tokens to a logit, or from a node up.
app.tracePaths = async (i, k = 5) => {
  const g = app.graph;
  const data = await api(`/api/graphs/${encodeURIComponent(g.id)}/paths?node=${encodeURIComponent(g.nodes.id[i])}&k=${k}${g.full ? "&full=1" : ""}`);
  const list = data.paths.map((p) => ({ ...p, nodes: p.nodes.map((id) => app.index.get(id)) }));
  app.paths = data;
  app.view.setPaths(list);
  updateCounts();
  return data;
};
app.clearPaths = () => { app.paths = null; app.view.setPaths([]); updateCounts(); };

app.openGraph = async (id, { full = false, subgraph = null, node = null, keep = null } = {}) => {
  const g = await api(`/api/graphs/${encodeURIComponent(id)}${full ? "?full=1" : ""}`);
  app.graph = g;
  app.index = new Map(g.nodes.id.map((nid, i) => [nid, i]));
  g.nodes.autoText = [...g.nodes.text];
  g.nodes.edited = g.nodes.text.map(() => false);
  app.pinned = []; app.supernodes = []; app.labels = {}; app.paths = null;
  el("full-graph").checked = full;
  el("empty").hidden = true;
  el("graph-title").textContent = g.prompt;
  // the footer first: the graph is fitted to the canvas that is left
  const sc = g.scores || {}, v = g.validation || {};
  el("scores").innerHTML = `<b>${esc(g.model)}</b> · ${esc(g.transcoder)} · replacement ${fmt(sc.replacement)} · completeness ${fmt(sc.completeness)}${sc.convention ? ` (${esc(sc.convention)} convention)` : ""}${v.spearman !== undefined ? ` · validation: spearman ${fmt(v.spearman)}, sign agreement ${fmt(v.sign_agreement)}, sufficiency ${fmt(v.sufficiency)}, necessity ${fmt(v.necessity)}` : ""} · top logits: ${g.logits.slice(0, 3).map((l) => `${esc(l.text)} ${fmt(l.probability, 2)}`).join(", ")}`;
  app.view.setGraph(g, thresholds(full));
  updateCounts();
  for (const item of document.querySelectorAll(".graph-item")) item.classList.toggle("active", item.dataset.id === id);
  app.setUrl({ graph: id, full, subgraph, node });
  const labels = await api(`/api/graphs/${encodeURIComponent(id)}/labels${full ? "?full=1" : ""}`);
  app.canEditLabels = labels.can_edit;
  app.applyLabels(labels.labels);
  await refreshSaved(app);
  if (subgraph) {
    const doc = await api(`/api/graphs/${encodeURIComponent(id)}/subgraphs/${encodeURIComponent(subgraph)}`);
    applySubgraph(app, doc);
    app.savedName = doc.name;
  } else if (keep) {
    const known = new Set(g.nodes.id);
    applySubgraph(app, {
      pinnedIds: keep.pinnedIds.filter((p) => known.has(p)),
      supernodes: keep.supernodes.map((s) => [s[0], ...s.slice(1).filter((m) => known.has(m))]).filter((s) => s.length > 1),
      clerps: keep.clerps.filter(([nid]) => known.has(nid)),
    });
  }
  renderSubgraph(app);
  if (node !== null && app.index.has(node)) {
    app.selectNode(app.index.get(node));
    if (g.nodes.kind[app.index.get(node)] === "feature") await showFeature(app, app.index.get(node));
  }
  clearMessage();
  document.body.dataset.graph = id;
};

// shift-click pins
el("overlay").addEventListener("click", (e) => {
  if (!e.shiftKey || !app.graph) return;
  const i = app.view.pick(e);
  if (i >= 0) app.togglePin(app.graph.nodes.id[i]);
});

async function start() {
  const refreshList = setupList(app);
  setupSubgraph(app);
  setupIntervene(app);
  setupConsole(app);
  await guarded(async () => {
    app.info = await api("/api/info");
    el("tab-cypher").dataset.enabled = app.info.store ? "1" : "0";
  });
  await refreshList();
  const p = new URLSearchParams(window.location.search);
  if (p.get("graph")) {
    await guarded(() => app.openGraph(p.get("graph"), { full: p.get("full") === "1", subgraph: p.get("subgraph"), node: p.get("node") }));
  }
  document.body.dataset.ready = "1";
}

window.__explorer = app; // for the browser tests and the benchmark
start();
