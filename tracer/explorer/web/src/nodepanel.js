// The node tab (a clicked node: its inputs and outputs with weights) and the hover tooltip.
import { el, esc, fmt } from "./util.js";

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
    ${kind === "feature" ? '<button id="feature-button">open feature</button>' : ""}</div>
    <h3>inputs (${v.inEdges[i].length})</h3><table>${edgeRows(app, v.inEdges[i], (e) => g.edges.source[e])}</table>
    <h3>outputs (${v.outEdges[i].length})</h3><table>${edgeRows(app, v.outEdges[i], (e) => g.edges.target[e])}</table>`;
  el("pin-button").addEventListener("click", () => { app.togglePin(id); showNode(app, i); });
  if (kind === "feature") el("feature-button").addEventListener("click", () => app.openFeature(i));
  for (const s of box.querySelectorAll("[data-node]")) s.addEventListener("click", () => app.selectNode(Number(s.dataset.node)));
}
