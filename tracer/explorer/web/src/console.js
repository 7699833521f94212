// The read-only Cypher console: results as a table; nodes of one graph are highlighted in the
// graph view (the graph is opened first when it is another one).
import { api, guarded } from "./api.js";
import { el, esc } from "./util.js";

function cell(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "object") return esc(JSON.stringify(v));
  return esc(v);
}

export function setupConsole(app) {
  el("cypher-run").addEventListener("click", () => guarded(async () => {
    el("cypher-status").textContent = "running…";
    el("cypher-result").innerHTML = "";
    try {
      const r = await api("/api/cypher", { method: "POST", body: { query: el("cypher-text").value } });
      el("cypher-status").textContent = `${r.rows.length} row(s)${r.truncated ? " (capped)" : ""}`;
      el("cypher-result").innerHTML = `<table id="cypher-table"><tr>${r.columns.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>${r.rows.map((row) => `<tr>${row.map((v) => `<td>${cell(v)}</td>`).join("")}</tr>`).join("")}</table>`;
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
