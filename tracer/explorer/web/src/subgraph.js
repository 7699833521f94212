// The subgraph pane: pinned nodes, supernodes (groups of pinned nodes), labels; saving to and
// loading from the store; the Neuronpedia JSON export carries them in its qParams.
import { api, guarded } from "./api.js";
import { nodeTitle } from "./nodepanel.js";
import { el, esc, showMessage } from "./util.js";

export function subgraphDoc(app, name) {
  return {
    name,
    pinnedIds: [...app.pinned],
    supernodes: app.supernodes.map((s) => [s.label, ...s.members]),
    clerps: Object.entries(app.labels).filter(([, v]) => v),
  };
}

export function applySubgraph(app, doc) {
  const known = new Set(app.graph.nodes.id);
  app.pinned = (doc.pinnedIds || []).filter((id) => known.has(id));
  app.supernodes = (doc.supernodes || []).map((s) => ({ label: s[0], members: s.slice(1) }));
  app.labels = Object.fromEntries(doc.clerps || []);
  el("subgraph-name").value = doc.name || el("subgraph-name").value;
  renderSubgraph(app);
}

export function setupSubgraph(app) {
  setupDiagramExport(app);
  el("group-button").addEventListener("click", () => {
    const checked = [...document.querySelectorAll("#pinned-list input.pick:checked")].map((c) => c.dataset.id);
    if (checked.length < 2) { showMessage("check two or more pinned nodes to group them", "error"); return; }
    const label = el("supernode-label").value.trim() || `supernode ${app.supernodes.length + 1}`;
    for (const s of app.supernodes) s.members = s.members.filter((m) => !checked.includes(m));
    app.supernodes = app.supernodes.filter((s) => s.members.length);
    app.supernodes.push({ label, members: checked });
    el("supernode-label").value = "";
    renderSubgraph(app);
  });
  el("import-file").addEventListener("change", () => guarded(async () => {
    const file = el("import-file").files[0];
    if (!file) return;
    let doc;
    try {
      doc = JSON.parse(await file.text());
    } catch (err) {
      throw new Error(`${file.name} is not JSON: ${err.message}`);
    } finally {
      el("import-file").value = "";
    }
    const sub = await api(`/api/graphs/${encodeURIComponent(app.graph.id)}/qparams`, { method: "POST", body: doc });
    applySubgraph(app, sub);
    showMessage(`imported ${sub.pinnedIds.length} pinned nodes and ${sub.supernodes.length} supernodes from ${file.name}`);
  }));
  el("save-button").addEventListener("click", () => guarded(async () => {
    const name = el("subgraph-name").value.trim();
    const data = await api(`/api/graphs/${encodeURIComponent(app.graph.id)}/subgraphs`, { method: "POST", body: subgraphDoc(app, name) });
    app.setUrl({ subgraph: data.saved });
    renderSaved(app, data.subgraphs);
    showMessage(`saved subgraph "${data.saved}" with the graph in the store`);
  }));
}

export async function refreshSaved(app) {
  const data = await api(`/api/graphs/${encodeURIComponent(app.graph.id)}/subgraphs`);
  renderSaved(app, data.subgraphs, data.can_save);
}

function renderSaved(app, list, canSave = true) {
  el("save-button").disabled = !canSave;
  el("save-button").title = canSave ? "" : "only graphs in the store can have saved subgraphs";
  el("saved-list").innerHTML = list.length
    ? `<h3>saved</h3>${list.map((s) => `<div><span class="link" data-name="${esc(s.name)}">${esc(s.name)}</span> · ${s.pinned} pinned · ${s.supernodes} supernodes</div>`).join("")}`
    : "";
  for (const a of el("saved-list").querySelectorAll("[data-name]")) {
    a.addEventListener("click", () => guarded(async () => {
      const doc = await api(`/api/graphs/${encodeURIComponent(app.graph.id)}/subgraphs/${encodeURIComponent(a.dataset.name)}`);
      applySubgraph(app, doc);
      app.setUrl({ subgraph: doc.name });
    }));
  }
}

export function renderSubgraph(app) {
  const g = app.graph;
  if (!g) return;
  const index = app.index;
  const groupOf = new Map();
  app.supernodes.forEach((s, k) => s.members.forEach((m) => groupOf.set(m, k)));
  el("pinned-list").innerHTML = app.pinned.length
    ? `<h3>pinned (${app.pinned.length})</h3>` + app.pinned.map((id) => {
      const i = index.get(id);
      return `<div class="pinned-item" data-id="${esc(id)}"><input type="checkbox" class="pick" data-id="${esc(id)}">
        <span class="name link" data-node="${i}" title="${esc(nodeTitle(g, i))}">${esc(app.labels[id] || nodeTitle(g, i))}</span>
        <input class="label" data-id="${esc(id)}" placeholder="label" value="${esc(app.labels[id] || "")}">
        <button class="unpin" data-id="${esc(id)}" title="unpin">×</button></div>`;
    }).join("")
    : '<p class="hint">Pin nodes from the node tab (or shift-click them in the graph).</p>';
  el("supernode-list").innerHTML = app.supernodes.map((s, k) => `<div class="supernode" data-k="${k}">
      <input class="sn-label" data-k="${k}" value="${esc(s.label)}"> <button class="ungroup" data-k="${k}">ungroup</button>
      <div class="meta">${s.members.map((m) => esc(app.labels[m] || nodeTitle(g, index.get(m)))).join(" · ")}</div></div>`).join("");
  renderSuggested(app);
  const box = el("tab-subgraph");
  for (const b of box.querySelectorAll("button.unpin")) b.addEventListener("click", () => app.togglePin(b.dataset.id));
  for (const inp of box.querySelectorAll("input.label")) inp.addEventListener("change", () => { app.labels[inp.dataset.id] = inp.value.trim(); renderSubgraph(app); });
  for (const s of box.querySelectorAll("#pinned-list [data-node]")) s.addEventListener("click", () => app.selectNode(Number(s.dataset.node)));
  for (const inp of box.querySelectorAll("input.sn-label")) inp.addEventListener("change", () => { app.supernodes[Number(inp.dataset.k)].label = inp.value.trim() || "supernode"; renderSubgraph(app); });
  for (const b of box.querySelectorAll("button.ungroup")) b.addEventListener("click", () => { app.supernodes.splice(Number(b.dataset.k), 1); renderSubgraph(app); });
  const name = el("subgraph-name").value.trim();
  el("export-link").href = `/api/graphs/${encodeURIComponent(g.id)}/neuronpedia${app.savedName ? `?subgraph=${encodeURIComponent(app.savedName)}` : ""}`;
  el("export-link").title = name;
  app.view.pinned = new Set(app.pinned.map((id) => index.get(id)));
  app.view.grouped = new Map([...groupOf].map(([id, k]) => [index.get(id), k]));
  app.view.update(false);
  app.refreshTargets();
  guarded(() => drawDiagram(app));
}

// Automatic supernodes found for this graph (circuit-atlas supernodes): "use" pins the members
// and groups them under the supernode's name.
function renderSuggested(app) {
  const list = app.graph.supernodes || [];
  const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));
  el("suggested-list").innerHTML = list.length
    ? "<h3>suggested supernodes</h3>" + list.map((s, k) => `<div class="suggested" data-k="${k}">
        <b>${esc(s.id)}</b> ${esc(s.name)} · ${s.members.length} nodes · agreement ${fmt(s.agreement)} · effect rank ${fmt(s.effect_rank)}
        <button class="use-suggested" data-k="${k}">use</button></div>`).join("")
    : "";
  for (const b of el("suggested-list").querySelectorAll("button.use-suggested")) {
    b.addEventListener("click", () => {
      const s = list[Number(b.dataset.k)];
      for (const m of s.members) if (!app.pinned.includes(m)) app.pinned.push(m);
      for (const g of app.supernodes) g.members = g.members.filter((m) => !s.members.includes(m));
      app.supernodes = app.supernodes.filter((g) => g.members.length);
      app.supernodes.push({ label: s.name, members: [...s.members] });
      renderSubgraph(app);
    });
  }
}

// The subgraph diagram: the pinned nodes and supernodes with the edges between them (a
// supernode's edges are the sums of its members', computed by the server: tracer.subgraph.
// diagram), laid out by layer (tokens at the bottom, logits at the top) and position, with
// labels, weights and signs. Drawn as SVG, so it exports as SVG or PNG.
let diagramSeq = 0;
async function drawDiagram(app) {
  const box = el("subgraph-diagram"), g = app.graph, seq = ++diagramSeq;
  if (!app.pinned.length) {
    box.innerHTML = '<p class="hint">Pin nodes to draw them here with the edges between them.</p>';
    el("diagram-note").textContent = "";
    el("diagram-scores").textContent = "";
    app.diagram = null;
    return;
  }
  const doc = subgraphDoc(app, "diagram");
  const d = await api(`/api/graphs/${encodeURIComponent(g.id)}/diagram${g.full ? "?full=1" : ""}`, { method: "POST", body: doc });
  if (seq !== diagramSeq || app.graph !== g) return; // a newer drawing is on its way
  for (const u of d.units) if (u.kind !== "supernode") u.label = app.labels[u.id] || g.nodes.text[app.index.get(u.id)] || u.label;
  app.diagram = d;
  box.innerHTML = diagramSvg(d, g);
  const sc = d.scores;
  el("diagram-note").textContent = `${d.units.length} units · ${d.edges.length} edges`;
  el("diagram-scores").textContent = sc ? `subgraph replacement ${sc.replacement.toFixed(3)} · completeness ${sc.completeness.toFixed(3)} (${sc.convention} convention; the ${sc.features} pinned features kept, every other feature counted as error)` : "";
}

export function diagramSvg(d, g) {
  const W = 380, rowH = 64, boxW = 92, boxH = 30, pad = 10;
  const levels = [...new Set(d.units.map((u) => u.layer))].sort((a, b) => b - a); // top first
  const H = levels.length * rowH + 24;
  const P = Math.max(1, g.tokens.length - 1);
  const pos = new Map();
  for (const [r, lv] of levels.entries()) {
    const row = d.units.filter((u) => u.layer === lv).sort((a, b) => a.position - b.position || (a.id < b.id ? -1 : 1));
    // preferred x by position, then pushed apart so boxes never overlap, kept inside
    const xs = row.map((u) => pad + boxW / 2 + (u.position / P) * (W - 2 * pad - boxW));
    for (let j = 1; j < xs.length; j++) xs[j] = Math.max(xs[j], xs[j - 1] + boxW + 6);
    const over = xs.length ? xs[xs.length - 1] - (W - pad - boxW / 2) : 0;
    if (over > 0) for (let j = 0; j < xs.length; j++) xs[j] -= over;
    for (let j = 0; j < xs.length; j++) xs[j] = Math.max(xs[j], pad + boxW / 2 + j * (boxW + 6));
    row.forEach((u, j) => pos.set(u.id, [xs[j], 12 + r * rowH + rowH / 2]));
  }
  const width = Math.max(W, ...[...pos.values()].map(([x]) => x + boxW / 2 + pad));
  const maxW = Math.max(1e-12, ...d.edges.map((e) => Math.abs(e.weight)));
  // weight labels along their edges where they overlap no box and no other label
  const taken = [...pos.values()].map(([x, y]) => [x - boxW / 2, y - boxH / 2, x + boxW / 2, y + boxH / 2]);
  const free = (b) => taken.every((o) => b[0] >= o[2] || o[0] >= b[2] || b[1] >= o[3] || o[1] >= b[3]);
  const order = [...d.edges.keys()].sort((a, b) => Math.abs(d.edges[b].weight) - Math.abs(d.edges[a].weight));
  const labelAt = new Map();
  for (const j of order) {
    const e = d.edges[j], [x1, y1] = pos.get(e.source), [x2, y2] = pos.get(e.target);
    const text = `${e.weight >= 0 ? "+" : "−"}${fmtW(Math.abs(e.weight))}`, tw = 5.2 * text.length;
    for (const f of [0.5, 0.38, 0.62, 0.28, 0.72]) {
      const mx = x1 + f * (x2 - x1) + 3, my = y1 + f * (y2 - y1) - 2;
      const b = [mx - 1, my - 9, mx + tw + 1, my + 2];
      if (free(b)) { taken.push(b); labelAt.set(j, [mx, my, text]); break; }
    }
  }
  const edges = d.edges.map((e, j) => {
    const [x1, y1] = pos.get(e.source), [x2, y2] = pos.get(e.target);
    const a = Math.abs(e.weight) / maxW, color = e.weight >= 0 ? "#2f6fb3" : "#c43426";
    const [mx, my, wtext] = labelAt.get(j) || [0, 0, ""];
    return `<g class="diagram-edge" data-source="${esc(e.source)}" data-target="${esc(e.target)}" data-weight="${e.weight}" data-n="${e.n}">
      <title>${esc(e.source)} → ${esc(e.target)}: ${e.weight} (${e.n} edge${e.n === 1 ? "" : "s"})</title>
      <line x1="${x1}" y1="${y1 + (y1 > y2 ? -boxH / 2 : boxH / 2)}" x2="${x2}" y2="${y2 + (y2 > y1 ? -boxH / 2 : boxH / 2)}" stroke="${color}" stroke-opacity="${(0.35 + 0.6 * a).toFixed(2)}" stroke-width="${(1 + 5 * a).toFixed(2)}" marker-end="url(#arrow-${e.weight >= 0 ? "pos" : "neg"})"/>
      ${wtext ? `<text x="${mx}" y="${my}" font-size="9" fill="${color}">${wtext}</text>` : ""}</g>`;
  }).join("");
  const units = d.units.map((u) => {
    const [x, y] = pos.get(u.id), sn = u.kind === "supernode";
    const fill = sn ? "#fbe4ef" : u.kind === "token" ? "#e3f1e6" : u.kind === "logit" ? "#efe6f6" : "#eef2f7";
    const label = u.label.length > 18 ? `${u.label.slice(0, 17)}…` : u.label;
    const sub = sn ? `${u.members.length} nodes` : u.kind === "feature" ? (g.nodes.heading[g.nodes.id.indexOf(u.id)] || "") : u.kind;
    return `<g class="diagram-unit" data-id="${esc(u.id)}"><title>${esc(u.label)}${sn ? `: ${u.members.map(esc).join(", ")}` : ""}</title>
      <rect x="${x - boxW / 2}" y="${y - boxH / 2}" width="${boxW}" height="${boxH}" rx="5" fill="${fill}" stroke="${sn ? "#c2185b" : "#7a8594"}"/>
      <text x="${x}" y="${y - 2}" font-size="10" text-anchor="middle" fill="#1d232b">${esc(label)}</text>
      <text x="${x}" y="${y + 10}" font-size="8.5" text-anchor="middle" fill="#5b6573">${esc(sub)}</text></g>`;
  }).join("");
  const marker = (id, color) => `<marker id="arrow-${id}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="${color}"/></marker>`;
  return `<svg id="diagram-svg" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${H}" viewBox="0 0 ${width} ${H}" font-family="system-ui, sans-serif">
    <defs>${marker("pos", "#2f6fb3")}${marker("neg", "#c43426")}</defs><rect width="100%" height="100%" fill="#fff"/>${edges}${units}</svg>`;
}

function fmtW(a) {
  return a >= 100 || a < 0.01 ? a.toExponential(1) : a.toPrecision(2);
}

function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

export function setupDiagramExport(app) {
  const svgText = () => {
    const svg = document.getElementById("diagram-svg");
    if (!svg) throw new Error("pin nodes first: there is no diagram to export");
    return new XMLSerializer().serializeToString(svg);
  };
  const name = () => (el("subgraph-name").value.trim() || "subgraph").replace(/[^\w.-]+/g, "_");
  el("export-svg").addEventListener("click", () => guarded(async () => download(`${name()}.svg`, new Blob([svgText()], { type: "image/svg+xml" }))));
  el("export-png").addEventListener("click", () => guarded(async () => download(`${name()}.png`, await svgPng(svgText()))));
  el("export-np").addEventListener("click", () => guarded(async () => {
    const g = app.graph;
    const doc = await api(`/api/graphs/${encodeURIComponent(g.id)}/neuronpedia${g.full ? "?full=1" : ""}`, { method: "POST", body: subgraphDoc(app, name()) });
    download(`${name()}.json`, new Blob([JSON.stringify(doc)], { type: "application/json" }));
  }));
}

// The diagram rasterised at twice its size (PNG blob).
export async function svgPng(text) {
  const url = URL.createObjectURL(new Blob([text], { type: "image/svg+xml" }));
  try {
    const img = new Image();
    await new Promise((ok, fail) => { img.onload = ok; img.onerror = () => fail(new Error("the diagram could not be drawn as PNG")); img.src = url; });
    const c = document.createElement("canvas");
    c.width = img.width * 2; c.height = img.height * 2;
    const ctx = c.getContext("2d");
    ctx.scale(2, 2);
    ctx.drawImage(img, 0, 0);
    return await new Promise((ok) => c.toBlob(ok, "image/png"));
  } finally {
    URL.revokeObjectURL(url);
  }
}
