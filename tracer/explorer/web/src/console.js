// The read-only Cypher console: results as a table of properties (the server spreads node and
// relationship columns into one column per property: n:labels, n.layer, n.influence, r.weight;
// tracer/explorer/cypher.py), cells cut to the panel with the full value on hover; nodes of one
// graph are highlighted in the graph view (the graph is opened first when it is another one).
import { api, guarded } from "./api.js";
import { el, esc, fmt } from "./util.js";

function cell(v, kind) {
  if (v === null || v === undefined) return `<td class="null"></td>`;
  const full = typeof v === "object" ? JSON.stringify(v) : String(v);
  let shown = full;
  let cls = kind;
  if (typeof v === "number") {
    shown = Number.isInteger(v) ? String(v) : fmt(v, 4);
    cls += " num";
  }
  return `<td class="${cls}" title="${esc(full)}" data-value="${esc(full)}">${esc(shown)}</td>`;
}

export function renderTable(table) {
  const head = table.columns.map((c, j) => `<th class="${table.kinds[j]}" title="${esc(c)}">${esc(c)}</th>`).join("");
  const body = table.rows.map((row) => `<tr>${row.map((v, j) => cell(v, table.kinds[j])).join("")}</tr>`).join("");
  return `<table id="cypher-table"><tr>${head}</tr>${body}</table>`;
}

export function setupConsole(app) {
  el("cypher-run").addEventListener("click", () => guarded(async () => {
    el("cypher-status").textContent = "running…";
    el("cypher-result").innerHTML = "";
    try {
      const r = await api("/api/cypher", { method: "POST", body: { query: el("cypher-text").value } });
      el("cypher-status").textContent = `${r.rows.length} row(s)${r.truncated ? " (capped)" : ""}`;
      el("cypher-result").innerHTML = renderTable(r.table);
      if (r.highlight) {
        if (!app.graph || app.graph.id !== r.highlight.graph) await app.openGraph(r.highlight.graph);
        app.setHighlight(r.highlight.nodes);
        el("cypher-status").textContent += ` · ${r.highlight.nodes.length} node(s) highlighted`;
      }
    } catch (err) {
      el("cypher-status").textContent = "refused";
      throw err;
    }
  }));
}
