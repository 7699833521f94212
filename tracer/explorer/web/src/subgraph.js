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
  app.view.request(false);
  app.refreshTargets();
  drawMini(app, groupOf);
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

// The pinned nodes as a small graph: supernodes drawn as one node (edges summed).
function drawMini(app, groupOf) {
  const c = el("subgraph-canvas"), ctx = c.getContext("2d"), g = app.graph;
  const dpr = window.devicePixelRatio || 1, W = c.clientWidth || 360, H = c.clientHeight || 220;
  c.width = W * dpr; c.height = H * dpr;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  if (!app.pinned.length) return;
  const unit = new Map(); // node id -> unit key
  for (const id of app.pinned) unit.set(id, groupOf.has(id) ? `s${groupOf.get(id)}` : id);
  const units = new Map();
  for (const [id, u] of unit) {
    const i = app.index.get(id);
    if (!units.has(u)) units.set(u, { xs: [], ys: [], label: u.startsWith("s") && groupOf.has(id) ? app.supernodes[groupOf.get(id)].label : app.labels[id] || nodeTitle(g, i) });
    units.get(u).xs.push(g.nodes.position[i]);
    units.get(u).ys.push(g.nodes.kind[i] === "token" ? -1 : g.nodes.kind[i] === "logit" ? g.n_layers : g.nodes.layer[i]);
  }
  const P = g.tokens.length, L = g.n_layers;
  for (const u of units.values()) {
    u.x = 30 + ((u.xs.reduce((a, b) => a + b, 0) / u.xs.length) / Math.max(1, P - 1)) * (W - 60);
    u.y = H - 24 - (((u.ys.reduce((a, b) => a + b, 0) / u.ys.length) + 1) / (L + 1)) * (H - 48);
  }
  const sums = new Map();
  for (let e = 0; e < g.edges.source.length; e++) {
    const a = unit.get(g.nodes.id[g.edges.source[e]]), b = unit.get(g.nodes.id[g.edges.target[e]]);
    if (a === undefined || b === undefined || a === b) continue;
    const key = `${a}|${b}`;
    sums.set(key, (sums.get(key) || 0) + g.edges.weight[e]);
  }
  let maxW = 0;
  for (const w of sums.values()) maxW = Math.max(maxW, Math.abs(w));
  for (const [key, w] of sums) {
    const [a, b] = key.split("|"), ua = units.get(a), ub = units.get(b);
    ctx.strokeStyle = w >= 0 ? "rgba(47,111,179,0.7)" : "rgba(196,52,38,0.7)";
    ctx.lineWidth = 0.8 + 4 * Math.abs(w) / (maxW || 1);
    ctx.beginPath(); ctx.moveTo(ua.x, ua.y); ctx.lineTo(ub.x, ub.y); ctx.stroke();
  }
  ctx.font = "10px system-ui, sans-serif";
  ctx.textAlign = "center";
  for (const [key, u] of units) {
    ctx.fillStyle = key.startsWith("s") ? "#c2185b" : "#7a3fa0";
    ctx.beginPath(); ctx.arc(u.x, u.y, key.startsWith("s") ? 7 : 4.5, 0, 2 * Math.PI); ctx.fill();
    ctx.fillStyle = "#1d232b";
    ctx.fillText(u.label.slice(0, 22), u.x, u.y - 9);
  }
}
