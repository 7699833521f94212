// The node tab (a clicked node: its inputs and outputs with weights) and the hover tooltip.
import { guarded } from "./api.js";
import { el, esc, fmt } from "./util.js";

// The traced paths as text, strongest first; clicking one shows it alone in the graph.
export function renderPaths(app, data) {
  const box = el("path-list");
  if (!box) return;
  const head = data.direction === "to" ? `paths from the tokens to ${esc(data.target_text)}` : `paths from ${esc(data.target_text)} up to the logits`;
  box.innerHTML = `<h3>${data.paths.length} strongest ${head}</h3>${data.paths.length ? data.paths.map((p, j) => `<div class="path-item" data-j="${j}">
      <span class="score" title="product of the row-normalised |edge weights|">${fmt(p.score, 4)}</span> <span class="path-text">${esc(p.text)}</span></div>`).join("")
    : '<p class="hint">no path: this node does not reach the logits</p>'}
    ${data.paths.length ? '<div class="row"><button id="paths-all">show all</button><button id="paths-clear">clear</button></div>' : ""}`;
  for (const item of box.querySelectorAll(".path-item")) {
    item.addEventListener("click", () => {
      app.view.activePath = Number(item.dataset.j);
      for (const o of box.querySelectorAll(".path-item")) o.classList.toggle("active", o === item);
      app.view.request(false);
    });
  }
  if (data.paths.length) {
    el("paths-all").addEventListener("click", () => { app.view.activePath = -1; app.view.request(false); for (const o of box.querySelectorAll(".path-item")) o.classList.remove("active"); });
    el("paths-clear").addEventListener("click", () => { app.clearPaths(); box.innerHTML = ""; });
  }
}

export function nodeTitle(g, i) {
  const text = g.nodes.text[i];
  return `${g.nodes.heading[i]}${text ? ` — ${text}` : ""}`;
}

function edgeRows(app, list, other) {
  const g = app.graph;
  return list.slice(0, 25).map((e) => {
    const j = other(e), w = g.edges.weight[e];
    return `<tr><td><span class="link" data-node="${j}">${esc(nodeTitle(g, j))}</span></td><td class="num ${w >= 0 ? "pos" : "neg"}">${fmt(w)}</td></tr>`;
  }).join("");
}

export function tooltipHtml(app, i) {
  const g = app.graph, v = app.view;
  const top = (list, other) => list.slice(0, 5).map((e) => `<div>${esc(nodeTitle(g, other(e)).slice(0, 40))} <span class="w">${fmt(g.edges.weight[e])}</span></div>`).join("");
  return `<b>${esc(nodeTitle(g, i))}</b><div>activation ${fmt(g.nodes.activation[i])} · influence ${fmt(g.nodes.influence[i])}</div>
    ${v.inEdges[i].length ? `<div style="margin-top:4px;color:#f5b971">inputs (${v.inEdges[i].length})</div>${top(v.inEdges[i], (e) => g.edges.source[e])}` : ""}
    ${v.outEdges[i].length ? `<div style="margin-top:4px;color:#7fd6bd">outputs (${v.outEdges[i].length})</div>${top(v.outEdges[i], (e) => g.edges.target[e])}` : ""}`;
}

export function showNode(app, i) {
  const g = app.graph, v = app.view, box = el("tab-node");
  const id = g.nodes.id[i], kind = g.nodes.kind[i];
  const pinned = app.pinned.includes(id);
  box.innerHTML = `<h3 id="node-title">${esc(nodeTitle(g, i))}</h3>
    <div>id <code>${esc(id)}</code> · ${esc(kind)} · activation ${fmt(g.nodes.activation[i])} · influence ${fmt(g.nodes.influence[i])}</div>
    <div class="row"><button id="pin-button">${pinned ? "unpin" : "pin"}</button>
    ${kind === "feature" ? '<button id="feature-button">open feature</button>' : ""}
    ${kind === "token" ? "" : `<button id="trace-button" title="${kind === "logit" ? "the strongest paths from the input tokens to this logit" : "the strongest paths from this node up to the logits"}">trace from here</button>`}</div>
    <div id="path-list"></div>
    <h3>inputs (${v.inEdges[i].length})</h3><table>${edgeRows(app, v.inEdges[i], (e) => g.edges.source[e])}</table>
    <h3>outputs (${v.outEdges[i].length})</h3><table>${edgeRows(app, v.outEdges[i], (e) => g.edges.target[e])}</table>`;
  el("pin-button").addEventListener("click", () => { app.togglePin(id); showNode(app, i); });
  if (kind !== "token") el("trace-button").addEventListener("click", () => guarded(async () => { renderPaths(app, await app.tracePaths(i)); }));
  if (app.paths && app.paths.target === id) renderPaths(app, app.paths);
  if (kind === "feature") el("feature-button").addEventListener("click", () => app.openFeature(i));
  for (const s of box.querySelectorAll("[data-node]")) s.addEventListener("click", () => app.selectNode(Number(s.dataset.node)));
}
