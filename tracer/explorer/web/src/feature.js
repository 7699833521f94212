// The feature panel: top-activating contexts with token highlighting, the activation
// histogram (this node's activation marked), promoted / suppressed tokens, and the other
// stored graphs where the feature is a node, each a link that opens that graph at the feature.
import { api, guarded } from "./api.js";
import { el, esc, fmt, showMessage } from "./util.js";

// One context as running text, each token shaded by its activation; the activating token (the
// peak) marked.
function contextHtml(c) {
  const max = Math.max(1e-9, ...c.activations);
  return `<div class="ctx">${c.tokens.map((t, k) => {
    const a = c.activations[k] / max;
    const cls = k === c.peak ? ' class="peak"' : "";
    return a > 0 ? `<span${cls} style="background: rgba(232, 140, 20, ${(0.15 + 0.7 * a).toFixed(2)})" title="activation ${fmt(c.activations[k])}">${esc(t)}</span>` : esc(t);
  }).join("")}</div>`;
}

function histogramSvg(h, mark) {
  if (!h || !h.counts.length) return '<p class="hint">no histogram</p>';
  const W = 360, H = 90, n = h.counts.length, max = Math.max(1, ...h.counts);
  const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
  const bars = h.counts.map((c, k) => {
    const bh = (c / max) * (H - 18);
    return `<rect x="${(k * W) / n + 1}" y="${H - 14 - bh}" width="${W / n - 2}" height="${bh}" fill="#8aa4c4"><title>${fmt(h.edges[k])}–${fmt(h.edges[k + 1])}: ${c}</title></rect>`;
  }).join("");
  const mx = mark !== undefined && hi > lo ? Math.max(0, Math.min(W, ((mark - lo) / (hi - lo)) * W)) : null;
  return `<svg id="feature-histogram" width="100%" viewBox="0 0 ${W} ${H}">${bars}
    ${mx !== null ? `<line x1="${mx}" x2="${mx}" y1="0" y2="${H - 14}" stroke="#c2185b" stroke-width="2"><title>this node: ${fmt(mark)}</title></line>` : ""}
    <text x="0" y="${H - 2}" font-size="10">${fmt(lo)}</text><text x="${W}" y="${H - 2}" font-size="10" text-anchor="end">${fmt(hi)}</text></svg>`;
}

function tokenList(pairs) {
  return pairs.length ? `<div class="tokens">${pairs.map(([t, w]) => `<span title="${fmt(w)}">${esc(t)}</span>`).join("")}</div>` : '<p class="hint">none known</p>';
}

export async function showFeature(app, i) {
  const g = app.graph, layer = g.nodes.layer[i], index = g.nodes.feature[i];
  const box = el("tab-feature");
  box.innerHTML = `<p class="hint">loading feature L${layer}/F${index}…</p>`;
  app.showTab("feature");
  const f = await api(`/api/features/${layer}/${index}?transcoder=${encodeURIComponent(g.transcoder)}`);
  const others = f.graphs.filter((r) => r.graph !== g.id);
  const here = f.graphs.find((r) => r.graph === g.id);
  box.innerHTML = `<h3 id="feature-title">feature L${layer}/F${index}${f.label ? ` — ${esc(f.label)}` : ""}</h3>
    <div class="row"><input id="feature-label" value="${esc(f.edited ? f.label : "")}" placeholder="${esc(f.auto_label || "label")}" maxlength="200" ${f.can_edit ? "" : "disabled"}>
      <button id="feature-label-save" ${f.can_edit ? "" : 'disabled title="labels are kept in the graph store: start the explorer with --store"'}>save label</button></div>
    <div class="meta">${f.edited ? "label kept in the store for this feature in every graph" : "automatic label"}${f.auto_label ? ` · automatic: ${esc(f.auto_label)}` : ""}</div>
    <div>${esc(f.transcoder)}${f.frequency !== null ? ` · fires on ${fmt(100 * f.frequency, 2)}% of corpus tokens` : ""} · here ${fmt(g.nodes.activation[i])}</div>
    ${f.note ? `<p class="hint">${esc(f.note)}</p>` : ""}
    <h3>top activating contexts</h3>${f.contexts.length ? f.contexts.map(contextHtml).join("") : '<p class="hint">none saved</p>'}
    <h3>activation histogram</h3>${histogramSvg(f.histogram, g.nodes.activation[i])}
    <h3>promoted tokens</h3>${tokenList(f.promoted)}
    <h3>suppressed tokens</h3>${tokenList(f.suppressed)}
    <h3>other graphs with this feature (${others.length})</h3>
    <div id="feature-graphs">${others.map((r) => `<div><a class="feature-graph-link" href="?graph=${encodeURIComponent(r.graph)}&node=${encodeURIComponent(`${layer}_${index}_${r.positions[0]}`)}">${esc(r.prompt)}</a> <span class="meta">@${r.positions.join(",")} · act ${fmt(r.activation)} · ${esc(r.source)}</span></div>`).join("") || '<p class="hint">only in this graph</p>'}</div>
    ${here ? "" : '<p class="hint">(this graph is not in the store\'s feature index)</p>'}`;
  if (f.can_edit) {
    el("feature-label-save").addEventListener("click", () => guarded(async () => {
      const saved = await app.setFeatureLabel(layer, index, el("feature-label").value);
      showMessage(saved.label ? `label of L${layer}/F${index} saved: shown in every graph with this feature` : `label of L${layer}/F${index} removed`);
      await showFeature(app, i);
    }));
  }
}
