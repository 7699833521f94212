"""Self-contained HTML reports: one page per prompt and an index across prompts.

A prompt's page holds the rendered graph (SVG inlined; SVG/PNG files beside it), the top
logits, scores and parameters, the validation results (``graph.extra['validation']``), the
graph's supernodes and swap experiments when it has them (``extra['supernodes']``,
``extra['swaps']``), a node table whose inputs/outputs link to the other nodes' rows, and feature
cards with top-activating contexts, an activation histogram and promoted tokens. Nothing is
fetched from the network.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.analyses.validation_report import ratio_text
from tracer.graph import FEATURE, LOGIT, NODE_KINDS, TOKEN, Graph
from tracer.prune import convention_label
from tracer.reports.annotate import (
    display_influence,
    influence_source,
    logit_order,
    neighbours,
    node_heading,
    node_text,
    visible,
)
from tracer.reports.feature_book import FeatureBook, FeatureInfo, load_features
from tracer.reports.neuronpedia import np_node_id, slugify, write_neuronpedia
from tracer.reports.render import RenderConfig, render_graph
from tracer.subgraph import Subgraph, Supernode, diagram, subgraph_scores

_SIZE_NOTE = {
    "recorded": "influence on the logits",
    "computed": "influence on the logits (computed for this report)",
    "activation": "|activation| (the graph has no logit weights to measure influence by)",
}


class ReportError(RuntimeError):
    """A report that cannot be written (unwritable folder, bad inputs)."""


@dataclass
class ReportConfig:
    """What goes into a prompt's report."""

    render: RenderConfig = field(default_factory=RenderConfig)
    links_per_row: int = 6  # strongest inputs / outputs listed per node-table row
    max_table_nodes: int = 2000  # the rest of a huge unpruned graph is left out of the table
    max_feature_cards: int = 300
    neuronpedia: bool = True  # also write the Neuronpedia graph JSON
    scan: str | None = None  # Neuronpedia model id for that JSON (default: the graph's model)


@dataclass
class ReportFiles:
    """Files written for one prompt and the summary the index page lists."""

    slug: str
    html: Path
    svg: Path | None = None
    png: Path | None = None
    json: Path | None = None
    summary: dict = field(default_factory=dict)


@dataclass
class QueryTable:
    """A cross-prompt query result for the index page."""

    title: str
    columns: list[str]
    rows: list[list]
    description: str = ""

    @classmethod
    def from_any(cls, title: str, value) -> QueryTable:
        """Accept a QueryTable, anything with ``columns`` and ``rows`` attributes (such as the
        graph store's query results), a list of row dicts, or {"columns": [...], "rows": [...]}."""
        if isinstance(value, QueryTable):
            return value
        if hasattr(value, "columns") and hasattr(value, "rows"):
            return cls(title, list(value.columns), [list(r) for r in value.rows])
        if isinstance(value, Mapping) and "rows" in value:
            rows = [list(r) for r in value["rows"]]
            width = len(rows[0]) if rows else 0
            cols = list(value.get("columns") or [f"col{j}" for j in range(width)])
            return cls(title, cols, rows, str(value.get("description", "")))
        if isinstance(value, Sequence) and all(isinstance(r, Mapping) for r in value):
            cols: list[str] = []
            for r in value:
                cols += [c for c in r if c not in cols]
            return cls(title, cols, [[r.get(c, "") for c in cols] for r in value])
        raise ReportError(
            f"query result {title!r} must be a QueryTable, a list of row dicts, or a dict with "
            f"'columns' and 'rows' (got {type(value).__name__})"
        )


def ensure_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove it is writable; a clear error otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".circuit-atlas-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ReportError(
            f"cannot write reports to {out}: {err.strerror or err}; pass a writable folder "
            "with --out (or fix its permissions)"
        ) from err
    return out


def write_report(
    graph: Graph,
    out_dir: str | Path,
    features: FeatureBook | Mapping | str | Path | None = None,
    name: str | None = None,
    config: ReportConfig | None = None,
    decode: Callable[[int], str] | None = None,
    subgraph: Subgraph | None = None,
) -> ReportFiles:
    """Write ``<name>.html`` (+ ``.svg``, ``.png``, ``.json``) into ``out_dir``.

    ``subgraph``: pinned nodes and supernodes (a saved explorer subgraph,
    ``GraphStore.load_subgraph``) drawn as the subgraph diagram; without one, the graph's
    automatic supernodes (``extra['supernodes']``) are drawn with the top logit, if it has any
    (:func:`report_subgraph`)."""
    config = config or ReportConfig()
    out = ensure_output_dir(out_dir)
    book = load_features(features)
    slug = name or slugify(graph.prompt)
    rendered = render_graph(graph, out / slug, book, config.render, decode)
    files = ReportFiles(slug=slug, html=out / f"{slug}.html")
    files.svg, files.png = rendered.files.get("svg"), rendered.files.get("png")
    if config.neuronpedia:
        files.json = write_neuronpedia(
            graph, out / f"{slug}.json", slug=slug, scan=config.scan, features=book, decode=decode
        )
    svg_text = files.svg.read_text(encoding="utf-8") if files.svg else ""
    page = _Page(graph, book, config, decode, report_subgraph(graph, subgraph))
    body = page.build(files, svg_text, rendered)
    _write_text(files.html, _document(f"{visible(graph.prompt)} — circuit-atlas", body))
    files.summary = page.summary(files)
    return files


def write_index(
    out_dir: str | Path,
    reports: Sequence[ReportFiles],
    queries: Mapping[str, object] | Sequence[QueryTable] | None = None,
    title: str = "circuit-atlas reports",
) -> Path:
    """Write ``index.html``: one row per prompt report, then each cross-prompt query result."""
    out = ensure_output_dir(out_dir)
    tables = (
        [QueryTable.from_any(k, v) for k, v in queries.items()]
        if isinstance(queries, Mapping)
        else [QueryTable.from_any(q.title, q) for q in (queries or [])]
    )
    parts = [f"<header><h1>{_e(title)}</h1><p>{len(reports)} prompts"]
    if tables:
        parts.append(" · queries: " + ", ".join(
            f'<a href="#query-{j}">{_e(t.title)}</a>' for j, t in enumerate(tables)
        ))  # fmt: skip
    parts.append("</p></header><section id='prompts'><h2>Prompts</h2>")
    cols = ["prompt", "prediction", "p", "nodes", "edges", "features", "replacement",
            "completeness", "convention", "spearman"]  # fmt: skip
    rows = []
    for r in reports:
        s = r.summary
        href = _rel(r.html, out)
        rows.append(
            [f'<a href="{_e(href)}">{_e(s.get("prompt", r.slug))}</a>',
             _e(repr(s.get("prediction", ""))), _num(s.get("probability")),
             _num(s.get("n_nodes")), _num(s.get("n_edges")), _num(s.get("n_features")),
             _num(s.get("replacement")), _num(s.get("completeness")),
             _e(s.get("convention") or "not recorded"), _num(s.get("spearman"))]
        )  # fmt: skip
    parts.append(_table(cols, rows, raw=True, cls="sortable"))
    parts.append("</section>")
    for j, t in enumerate(tables):
        parts.append(f'<section id="query-{j}"><h2>{_e(t.title)}</h2>')
        if t.description:
            parts.append(f"<p>{_e(t.description)}</p>")
        parts.append(_table(t.columns, t.rows) if t.rows else "<p>(no rows)</p>")
        parts.append("</section>")
    path = out / "index.html"
    _write_text(path, _document(title, "".join(parts)))
    return path


# --- the per-prompt page ---------------------------------------------------------------------


class _Page:
    def __init__(self, graph: Graph, book: FeatureBook, config: ReportConfig, decode,
                 subgraph: Subgraph | None = None):  # fmt: skip
        self.g, self.book, self.cfg, self.decode = graph, book, config, decode
        self.subgraph = subgraph
        self.infl = display_influence(graph)
        self.ids = [graph.node_id(i) for i in range(graph.n_nodes)]
        self._id_index = {nid: i for i, nid in enumerate(self.ids)}
        self._np_index = {np_node_id(graph, i): i for i in range(graph.n_nodes)} if subgraph else {}
        self.rows = self._table_nodes()
        self.in_table = set(self.rows)

    # ordering: logits by probability, then features/errors by influence, then tokens
    def _table_nodes(self) -> list[int]:
        g = self.g
        mid = np.flatnonzero((g.kind != LOGIT) & (g.kind != TOKEN))
        mid = mid[np.argsort(-self.infl[mid], kind="stable")]
        toks = np.flatnonzero(g.kind == TOKEN)
        order = np.r_[logit_order(g), mid, toks[np.argsort(g.position[toks], kind="stable")]]
        if len(order) > self.cfg.max_table_nodes:
            keep = set(order[: self.cfg.max_table_nodes].tolist())
            keep |= set(logit_order(g).tolist()) | set(toks.tolist())
            order = np.array([i for i in order.tolist() if i in keep])
        return [int(i) for i in order]

    def short(self, i: int) -> str:
        """Compact link text: ``L4 F467@8``, ``err L5@8``, ``'Dallas'@7``, ``→' Austin'``."""
        g, k = self.g, int(self.g.kind[i])
        pos = int(g.position[i])
        if k == FEATURE:
            return f"L{int(g.layer[i])} F{int(g.feature[i])}@{pos}"
        if k == TOKEN:
            return f"{node_text(g, i)!r}@{pos}"
        if k == LOGIT:
            return f"→{node_text(g, i, None, self.decode)!r}"
        return f"err L{int(g.layer[i])}@{pos}"

    def link(self, i: int, text: str | None = None) -> str:
        text = _e(text if text is not None else self.short(i))
        if i in self.in_table:
            return f'<a href="#node-{_e(self.ids[i])}">{text}</a>'
        return text

    def build(self, files: ReportFiles, svg_text: str, rendered) -> str:
        g = self.g
        parts = [self._header(files)]
        parts.append(self._summary_section())
        parts.append("<section id='graph'><h2>Graph</h2><p class='note'>")
        parts.append(
            f"Showing {rendered.shown_nodes} of {rendered.total_nodes} nodes and "
            f"{rendered.shown_edges} of {rendered.total_edges} edges (largest influence / "
            "|weight|). Rows are layers (tokens at the bottom, logits on top), columns token "
            "positions; blue edges excite, red inhibit; node size grows with "
            + _SIZE_NOTE[influence_source(g)]
            + ". Click a node to jump to its row. Files: "
        )
        parts.append(" · ".join(
            f'<a href="{_e(p.name)}">{_e(p.suffix[1:].upper())}</a>'
            for p in (files.svg, files.png, files.json) if p is not None
        ))  # fmt: skip
        parts.append(
            "</p><p><button id='zoom' type='button'>natural size</button></p><div class='graph'>"
        )
        parts.append(_inline_svg(svg_text))
        parts.append("</div></section>")
        parts.append(self._validation_section())
        parts.append(self._supernode_section())
        parts.append(self._subgraph_section())
        parts.append(self._swap_section())
        parts.append(self._node_section())
        parts.append(self._feature_section())
        return "".join(parts)

    def _header(self, files: ReportFiles) -> str:
        g = self.g
        sections = [("summary", "Summary"), ("graph", "Graph"), ("validation", "Validation")]
        if g.extra.get("supernodes"):
            sections.append(("supernodes", "Supernodes"))
        if self.subgraph is not None:
            sections.append(("subgraph", "Subgraph"))
        if g.extra.get("swaps"):
            sections.append(("swaps", "Swaps"))
        sections += [("nodes", "Nodes"), ("features", "Features")]
        nav = " · ".join(f'<a href="#{s}">{t}</a>' for s, t in sections)
        return (
            f"<header><h1 id='top'>{_e(visible(g.prompt))}</h1>"
            f"<p>model <b>{_e(g.model_name)}</b> · transcoders "
            f"<b>{_e(g.transcoder_name or '(unnamed)')}</b> · "
            f"{g.n_nodes:,} nodes ({g.count('feature'):,} features, {g.count('error'):,} errors, "
            f"{g.count('token')} tokens, {g.count('logit')} logits) · {g.n_edges:,} edges"
            f"{self._pruned_note()}</p>"
            f"<nav>{nav}</nav></header>"
        )

    def _pruned_note(self) -> str:
        full = self.g.extra.get("full_graph")
        if not self.g.params.get("pruned") or not isinstance(full, Mapping):
            return ""
        return (
            f" · pruned from {full.get('n_nodes', 0):,} nodes and {full.get('n_edges', 0):,} edges"
        )

    def _summary_section(self) -> str:
        g = self.g
        toks = np.flatnonzero(g.kind == TOKEN)
        by_pos = {int(g.position[i]): int(i) for i in toks}
        chips = []
        for p, s in enumerate(g.token_strings):
            inner = f"<span class='pos'>{p}</span>{_e(visible(s))}"
            chips.append(
                f"<a class='tok' href='#node-{_e(self.ids[by_pos[p]])}'>{inner}</a>"
                if p in by_pos and by_pos[p] in self.in_table
                else f"<span class='tok'>{inner}</span>"
            )
        logits = [
            [self.link(i, node_text(g, i, self.book, self.decode)), _num(g.probability[i]),
             _num(g.activation[i]), _num(g.logit_weights[i])]
            for i in logit_order(g).tolist()
        ]  # fmt: skip
        parts = ["<section id='summary'><h2>Summary</h2><div class='tokens'>", *chips, "</div>"]
        parts.append("<div class='cols'><div><h3>Top logits</h3>")
        parts.append(_table(["token", "probability", "logit", "logit weight"], logits, raw=True))
        parts.append("</div><div><h3>Scores</h3>")
        if g.scores:
            parts.append(f"<p class='convention'>{_e(convention_label(g.params))}</p>")
        parts.append(_kv_table(g.scores) if g.scores else "<p>(none recorded)</p>")
        parts.append("</div></div><details><summary>Parameters</summary>")
        parts.append(_kv_table(g.params) if g.params else "<p>(none recorded)</p>")
        timing = g.extra.get("timing_s")
        if isinstance(timing, Mapping):
            parts.append("<h3>Timing (s)</h3>" + _kv_table(timing))
        parts.append("</details></section>")
        return "".join(parts)

    def _validation_section(self) -> str:
        val = self.g.extra.get("validation")
        body = (
            (f"<p class='ratios'>{_e(ratio_text(val))}</p>" if "logit_metric" in val else "")
            + self._value_html(val, 3)
            if val
            else "<p>No validation results are stored with this graph (run "
            "<code>circuit-atlas validate</code>).</p>"
        )
        return f"<section id='validation'><h2>Validation</h2>{body}</section>"

    def _supernode_section(self) -> str:
        """The graph's supernodes (tracer.analyses.supernodes): name, members linked to their rows,
        and
        the perturbation check against random groups (tracer.analyses.supernode_check); '' if
        none."""
        found = self.g.extra.get("supernodes") or []
        if not found:
            return ""
        params = self.g.extra.get("supernode_params") or {}
        signals = ", ".join(params.get("signals") or []) or "recorded with the graph"
        rows = []
        for s in found:
            v = s.get("validation") or {}
            nodes = [int(i) for i in s.get("nodes", []) if 0 <= int(i) < self.g.n_nodes]
            members = ", ".join(self.link(i) for i in nodes) or _e(s.get("members"))
            rows.append([
                _e(s.get("id")), _e(s.get("name")), members, _num(len(s.get("nodes", []))),
                _num(s.get("influence")), _num(s.get("cohesion")), _num(v.get("observed")),
                _num(v.get("predicted")), _num(v.get("agreement")),
                _num(v.get("random_mean_agreement")), _num(v.get("effect_rank")),
            ])  # fmt: skip
        checked = next((s["validation"] for s in found if s.get("validation")), None)
        how = (
            f"Each group was ablated at once (free mode) beside {checked.get('n_random')} random "
            "groups of its size: <i>agreement</i> compares the observed change of the logit "
            "metric with the graph's prediction (1: equal, 0: opposite or one of them zero); "
            "<i>effect rank</i> is the share of random groups whose effect is smaller."
            if checked
            else "Not checked by perturbation (run <code>circuit-atlas supernodes</code> "
            "without <code>--no-check</code>)."
        )
        cols = ["supernode", "name", "members", "size", "influence", "cohesion", "observed",
                "predicted", "agreement", "random-group agreement", "effect rank"]  # fmt: skip
        return (
            "<section id='supernodes'><h2>Supernodes</h2><p class='note'>Feature nodes grouped "
            f"by similarity ({_e(signals)}). {how}</p>{_table(cols, rows, raw=True)}</section>"
        )

    def _subgraph_section(self) -> str:
        """The subgraph diagram (tracer.subgraph.diagram: pinned nodes and supernodes, a
        supernode's edges the sums of its members'), the same list as a table, and the
        subgraph's replacement/completeness scores; '' without a subgraph."""
        sub = self.subgraph
        if sub is None:
            return ""
        g = self.g
        d = diagram(g, sub)
        scores = subgraph_scores(g, sub)
        units = {u["id"]: u for u in d["units"]}
        for u in d["units"]:
            if u["kind"] != "supernode":
                i = self._np_index[u["id"]]
                if u["id"] not in sub.labels:
                    u["label"] = node_text(g, i, self.book, self.decode) or self.short(i)
                u["sub"] = self.short(i) if u["label"] != self.short(i) else u["kind"]
        origin = (
            f"the saved subgraph <b>{_e(sub.name)}</b>"
            if sub.name != AUTOMATIC
            else "the graph's automatic supernodes and its top logit"
        )
        rows = [
            [_e(units[e["source"]]["label"]), _e(units[e["target"]]["label"]),
             _num(e["weight"]), _num(e["n"])]
            for e in sorted(d["edges"], key=lambda e: -abs(e["weight"]))
        ]  # fmt: skip
        return (
            "<section id='subgraph'><h2>Subgraph</h2><p class='note'>"
            f"{len(d['units'])} units and {len(d['edges'])} edges of {origin}: rows are "
            "layers (a supernode at its members' mean), columns positions; a supernode's edge "
            "weight is the sum of its members' edges; blue excites, red inhibits. Subgraph "
            f"replacement {_num(scores['replacement'])} · completeness "
            f"{_num(scores['completeness'])} ({_e(scores['convention'])} convention; "
            f"{scores['features']} pinned features kept, every other feature counted as "
            f"error).</p><div class='diagram'>{diagram_svg(d, len(g.token_strings))}</div>"
            f"{_table(['from', 'to', 'weight', 'edges'], rows, raw=True, cls='subgraph-edges')}"
            "</section>"
        )

    def _swap_section(self) -> str:
        """Swap experiments stored with the graph (tracer.analyses.swap); '' if none."""
        swaps = self.g.extra.get("swaps") or []
        if not swaps:
            return ""

        def top(rows):
            return ", ".join(f"{visible(t)!r} {p:.3f}" for t, _, p in (rows or [])[:3])

        rows = []
        for w in swaps:
            lab = w.get("label") or {}
            what = " + ".join(lab.get("remove_names") or lab.get("remove") or []) or "features"
            into = " + ".join(lab.get("insert_names") or lab.get("insert") or []) or "features"
            rows.append([
                _e(visible(w.get("other_prompt", ""))), _e(f"{what} → {into}"),
                _num(len(w.get("removed", []))), _num(len(w.get("inserted", []))),
                _e(w.get("mode")), _e(top(w.get("top_before"))), _e(top(w.get("top_after"))),
                _e(visible(w.get("continuation_after", ""))), _e(w.get("moved")),
            ])  # fmt: skip
        cols = ["features from", "swap", "removed", "inserted", "mode", "top before",
                "top after", "continuation after", "moved"]  # fmt: skip
        return f"<section id='swaps'><h2>Swaps</h2>{_table(cols, rows, raw=True)}</section>"

    def _value_html(self, val, level: int) -> str:
        """Validation results of any shape: scalars as a key/value table, lists of records as
        tables, nested mappings as sub-sections; node ids link to their rows."""
        if isinstance(val, Mapping):
            scalars = {k: v for k, v in val.items() if not isinstance(v, Mapping | list)}
            parts = [self._kv_linked(scalars)] if scalars else []
            for k, v in val.items():
                if isinstance(v, Mapping | list):
                    parts.append(f"<h{min(level, 6)}>{_e(k)}</h{min(level, 6)}>")
                    parts.append(self._value_html(v, level + 1))
            return "".join(parts)
        if isinstance(val, list) and val and all(isinstance(r, Mapping) for r in val):
            t = QueryTable.from_any("", val)
            return _table(t.columns, [[self._cell(v) for v in r] for r in t.rows], raw=True)
        if isinstance(val, list):
            return "<p>" + _e(", ".join(map(str, val))) + "</p>"
        return f"<p>{_e(val)}</p>"

    def _kv_linked(self, d: Mapping) -> str:
        return _table(["name", "value"], [[_e(k), self._cell(v)] for k, v in d.items()], raw=True)

    def _cell(self, v) -> str:
        if isinstance(v, str) and v in self._id_index:
            return self.link(self._id_index[v])
        return _num(v) if isinstance(v, int | float | np.number) else _e(v)

    def _node_section(self) -> str:
        g = self.g
        inputs, outputs = neighbours(g)
        k = self.cfg.links_per_row
        rows = []
        for i in self.rows:
            kind = int(g.kind[i])
            head = _e(node_heading(g, i))
            if kind == FEATURE:
                head = (f"<a href='#feature-{int(g.layer[i])}-{int(g.feature[i])}'>"
                        f"{head}</a>")  # fmt: skip
            cells = [
                f"<tr id='node-{_e(self.ids[i])}' class='k-{NODE_KINDS[kind]}'>",
                f"<td><code>{_e(self.ids[i])}</code></td><td>{head}</td>",
                f"<td>{_e(node_text(g, i, self.book, self.decode))}</td>",
                f"<td class='num'>{_num(g.activation[i])}</td>",
                f"<td class='num'>{_num(self.infl[i])}</td>",
                f"<td>{self._edges_html(inputs[i], k)}</td>",
                f"<td>{self._edges_html(outputs[i], k)}</td></tr>",
            ]
            rows.append("".join(cells))
        left_out = g.n_nodes - len(self.rows)
        note = (
            f"<p class='note'>{left_out} low-influence nodes are not listed.</p>"
            if left_out
            else ""
        )
        head = "".join(
            f"<th>{h}</th>"
            for h in ["id", "node", "text", "activation", "influence", "inputs (strongest)",
                      "outputs (strongest)"]
        )  # fmt: skip
        return (
            "<section id='nodes'><h2>Nodes</h2>" + note
            + "<p><input id='node-filter' type='search' placeholder='filter rows…'></p>"
            + f"<table id='node-table'><thead><tr>{head}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>"
        )  # fmt: skip

    def _edges_html(self, pairs: list, k: int) -> str:
        shown = [
            f"<span class='{'pos' if w >= 0 else 'neg'}'>{self.link(j)}&nbsp;{w:+.3g}</span>"
            for j, w in pairs[:k]
        ]
        more = f" <span class='note'>+{len(pairs) - k} more</span>" if len(pairs) > k else ""
        return "<br>".join(shown) + more

    def _feature_section(self) -> str:
        g = self.g
        fidx = np.flatnonzero(g.kind == FEATURE)
        by_feature: dict[tuple[int, int], list[int]] = {}
        for i in fidx[np.argsort(-self.infl[fidx], kind="stable")].tolist():
            by_feature.setdefault((int(g.layer[i]), int(g.feature[i])), []).append(i)
        cards = []
        for (layer, index), members in list(by_feature.items())[: self.cfg.max_feature_cards]:
            cards.append(self._card(layer, index, members))
        intro = (
            f"<p class='note'>Feature information from {_e(self.book.source)}.</p>"
            if len(self.book)
            else "<p class='note'>No feature contexts were given (pass <code>--features "
            "FILE</code>): cards show this prompt's activations only.</p>"
        )
        left = len(by_feature) - len(cards)
        more = f"<p class='note'>{left} more features not shown.</p>" if left > 0 else ""
        return (f"<section id='features'><h2>Features</h2>{intro}<div class='cards'>"
                + "".join(cards) + f"</div>{more}</section>")  # fmt: skip

    def _card(self, layer: int, index: int, members: list[int]) -> str:
        g = self.g
        info = self.book.get(layer, index)
        here = ", ".join(
            f"{self.link(i, '@' + str(int(g.position[i])))} "
            f"({_e(visible(g.token_strings[int(g.position[i])]))}) "
            f"act {_num(g.activation[i])}"
            for i in members
        )
        parts = [f"<div class='card' id='feature-{layer}-{index}'><h3>L{layer} F{index}"]
        if info and info.label:
            parts.append(f" — {_e(info.label)}")
        parts.append(f"</h3><p>In this prompt: {here}</p>")
        if info:
            parts.append(_card_details(info, [float(g.activation[i]) for i in members]))
        parts.append("</div>")
        return "".join(parts)

    def summary(self, files: ReportFiles) -> dict:
        g = self.g
        lo = logit_order(g)
        val = g.extra.get("validation") if isinstance(g.extra.get("validation"), Mapping) else {}
        top = int(lo[0]) if len(lo) else None
        return {
            "prompt": visible(g.prompt),
            "prediction": node_text(g, top, self.book, self.decode) if top is not None else "",
            "probability": float(g.probability[top]) if top is not None else None,
            "n_nodes": g.n_nodes,
            "n_edges": g.n_edges,
            "n_features": g.count("feature"),
            "replacement": _first(g.scores, "replacement", "replacement_score"),
            "completeness": _first(g.scores, "completeness", "completeness_score"),
            "convention": g.params.get("convention"),
            "spearman": _first(val, "spearman", "spearman_rho"),
            "html": files.html.name,
        }


def _card_details(info: FeatureInfo, here: list[float]) -> str:
    parts = []
    if info.frequency is not None:
        parts.append(f"<p>Fires on {100 * info.frequency:.3g}% of corpus tokens.</p>")
    if info.promoted_tokens:
        parts.append("<p>Promotes: " + " ".join(
            f"<span class='chip pos'>{_e(visible(t))} <small>{w:+.3g}</small></span>"
            for t, w in info.promoted_tokens[:10]
        ) + "</p>")  # fmt: skip
    if info.suppressed_tokens:
        parts.append("<p>Suppresses: " + " ".join(
            f"<span class='chip neg'>{_e(visible(t))} <small>{w:+.3g}</small></span>"
            for t, w in info.suppressed_tokens[:10]
        ) + "</p>")  # fmt: skip
    if info.histogram_counts:
        parts.append(histogram_svg(info.histogram_edges, info.histogram_counts, here))
    if info.top_contexts:
        parts.append("<ol class='contexts'>")
        for ctx in info.top_contexts[:8]:
            peak = max(max(ctx.activations, default=0.0), 1e-9)
            spans = []
            for j, (t, a) in enumerate(zip(ctx.tokens, ctx.activations, strict=True)):
                alpha = max(0.0, min(1.0, a / peak))
                cls = " class='peak'" if j == ctx.peak else ""
                spans.append(
                    f"<span{cls} style='background:rgba(246,145,30,{alpha:.2f})' "
                    f"title='{a:.3g}'>{_e(visible(t))}</span>"
                )
            parts.append(f"<li>{''.join(spans)} <small>max {max(ctx.activations):.3g}</small></li>")
        parts.append("</ol>")
    return "".join(parts)


def histogram_svg(edges: list[float], counts: list[int], marks: Sequence[float] = (),
                  width: int = 280, height: int = 80) -> str:  # fmt: skip
    """A small inline SVG bar chart of an activation histogram (bar heights on a log scale so
    the long tail stays visible), with a red line at each of this prompt's activations."""
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    top = math.log1p(max(counts, default=0)) or 1.0
    plot_h = height - 16
    bars = []
    for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True):
        x = (a - lo) / span * width
        w = max((b - a) / span * width - 1, 0.5)
        h = math.log1p(c) / top * plot_h
        bars.append(f"<rect x='{x:.1f}' y='{plot_h - h:.1f}' width='{w:.1f}' height='{h:.1f}'>"
                    f"<title>{a:.3g}–{b:.3g}: {c}</title></rect>")  # fmt: skip
    lines = [
        f"<line class='mark' x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{plot_h}'>"
        f"<title>this prompt: {m:.3g}</title></line>"
        for m in marks
        for x in [min(max((m - lo) / span, 0.0), 1.0) * width]
    ]
    axis = (f"<text x='0' y='{height - 3}'>{lo:.3g}</text>"
            f"<text x='{width}' y='{height - 3}' text-anchor='end'>{hi:.3g}</text>")  # fmt: skip
    return (
        f"<svg class='hist' xmlns='http://www.w3.org/2000/svg' width='{width}' "
        f"height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='activation histogram'>{''.join(bars)}{''.join(lines)}{axis}</svg>"
    )


# --- HTML helpers ----------------------------------------------------------------------------


AUTOMATIC = "automatic supernodes"  # the name of the subgraph report_subgraph builds


def report_subgraph(graph: Graph, subgraph: Subgraph | None = None) -> Subgraph | None:
    """The subgraph a report draws: ``subgraph`` when given (checked against the graph),
    else the graph's automatic supernodes (``extra['supernodes']``, members by node index)
    pinned with the most probable logit, else None."""
    if subgraph is not None:
        return subgraph.check(np_node_id(graph, i) for i in range(graph.n_nodes))
    found = graph.extra.get("supernodes") or []
    pinned: list[str] = []
    groups = []
    for k, s in enumerate(found):
        nodes = [int(i) for i in s.get("nodes", []) if 0 <= int(i) < graph.n_nodes]
        ids = [np_node_id(graph, i) for i in nodes if np_node_id(graph, i) not in pinned]
        if ids:
            pinned += ids
            groups.append(Supernode(str(s.get("name") or s.get("id") or f"s{k}")[:200], ids))
    if not groups:
        return None
    logits = logit_order(graph)
    if len(logits):
        pinned.append(np_node_id(graph, int(logits[0])))
    return Subgraph(AUTOMATIC, pinned, groups)


def diagram_svg(d: Mapping, n_positions: int) -> str:
    """An SVG of a subgraph diagram (:func:`tracer.subgraph.diagram`'s ``units`` and
    ``edges``; a unit may carry ``sub``, a second line): one row per distinct layer (logits on
    top), boxes placed by position and pushed apart so none overlap, edges as arrows whose
    width grows with |weight| and labelled with their signed weight (blue positive, red
    negative), the layout the explorer's Subgraph tab draws. Each edge's ``<g>`` carries
    ``data-source``, ``data-target``, ``data-weight`` and ``data-n``."""
    W, row_h, box_w, box_h, pad = 380, 64, 92, 30, 10
    levels = sorted({u["layer"] for u in d["units"]}, reverse=True)
    H = len(levels) * row_h + 24
    P = max(1, n_positions - 1)
    pos: dict[str, tuple[float, float]] = {}
    for r, lv in enumerate(levels):
        row = sorted((u for u in d["units"] if u["layer"] == lv),
                     key=lambda u: (u["position"], u["id"]))  # fmt: skip
        xs = [pad + box_w / 2 + (u["position"] / P) * (W - 2 * pad - box_w) for u in row]
        for j in range(1, len(xs)):
            xs[j] = max(xs[j], xs[j - 1] + box_w + 6)
        over = xs[-1] - (W - pad - box_w / 2) if xs else 0
        xs = [max(x - max(over, 0), pad + box_w / 2 + j * (box_w + 6)) for j, x in enumerate(xs)]
        for u, x in zip(row, xs, strict=True):
            pos[u["id"]] = (x, 12 + r * row_h + row_h / 2)
    width = max([W] + [x + box_w / 2 + pad + 36 for x, _ in pos.values()])  # + weight labels
    max_w = max([1e-12] + [abs(e["weight"]) for e in d["edges"]])
    colors = {True: "#2f6fb3", False: "#c43426"}
    parts = []
    for e in d["edges"]:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        a, c = abs(e["weight"]) / max_w, colors[e["weight"] >= 0]
        ya = y1 + (-box_h / 2 if y1 > y2 else box_h / 2)
        yb = y2 + (-box_h / 2 if y2 > y1 else box_h / 2)
        sign = "pos" if e["weight"] >= 0 else "neg"
        text = f"{'+' if e['weight'] >= 0 else '−'}{abs(e['weight']):.3g}"
        # an edge past a row bows sideways around the boxes between its ends
        cx, cy = (x1 + x2) / 2, (ya + yb) / 2
        if abs(y2 - y1) > row_h * 1.5:
            cx += box_w * 0.9 if x2 >= x1 else -box_w * 0.9
        lx, ly = (x1 + x2) / 4 + cx / 2, (ya + yb) / 4 + cy / 2  # the curve's midpoint
        parts.append(
            f'<g class="diagram-edge" data-source="{_e(e["source"])}" '
            f'data-target="{_e(e["target"])}" data-weight="{e["weight"]!r}" data-n="{e["n"]}">'
            f"<title>{_e(e['source'])} → {_e(e['target'])}: {e['weight']:.6g} ({e['n']} "
            f"edge{'' if e['n'] == 1 else 's'})</title>"
            f'<path d="M{x1:.1f},{ya:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{yb:.1f}" fill="none" '
            f'stroke="{c}" stroke-opacity="{0.35 + 0.6 * a:.2f}" stroke-width="{1 + 5 * a:.2f}" '
            f'marker-end="url(#sg-arrow-{sign})"/>'
            f'<text x="{lx + 3:.1f}" y="{ly - 2:.1f}" font-size="9" '
            f'fill="{c}">{text}</text></g>'
        )
    fills = {"supernode": "#fbe4ef", "token": "#e3f1e6", "logit": "#efe6f6"}
    for u in d["units"]:
        x, y = pos[u["id"]]
        sn = u["kind"] == "supernode"
        label = u["label"] if len(u["label"]) <= 18 else u["label"][:17] + "…"
        sub = f"{len(u['members'])} nodes" if sn else u.get("sub", u["kind"])
        members = ": " + ", ".join(u["members"]) if sn else ""
        parts.append(
            f'<g class="diagram-unit" data-id="{_e(u["id"])}"><title>{_e(u["label"])}'
            f"{_e(members)}</title>"
            f'<rect x="{x - box_w / 2:.1f}" y="{y - box_h / 2:.1f}" width="{box_w}" '
            f'height="{box_h}" rx="5" fill="{fills.get(u["kind"], "#eef2f7")}" '
            f'stroke="{"#c2185b" if sn else "#7a8594"}"/>'
            f'<text x="{x:.1f}" y="{y - 2:.1f}" font-size="10" text-anchor="middle" '
            f'fill="#1d232b">{_e(label)}</text>'
            f'<text x="{x:.1f}" y="{y + 10:.1f}" font-size="8.5" text-anchor="middle" '
            f'fill="#5b6573">{_e(sub)}</text></g>'
        )
    markers = "".join(
        f'<marker id="sg-arrow-{k}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        f'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z" '
        f'fill="{colors[k == "pos"]}"/></marker>'
        for k in ("pos", "neg")
    )
    return (
        f'<svg class="subgraph-diagram" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{H}" viewBox="0 0 {width:.0f} {H}" font-family="system-ui, sans-serif">'
        f'<defs>{markers}</defs><rect width="100%" height="100%" fill="#fff"/>'
        + "".join(parts)
        + "</svg>"
    )


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return f"{v:.4g}" if math.isfinite(v) else _e(v)


def _first(d, *keys):
    for k in keys:
        if isinstance(d, Mapping) and k in d:
            return d[k]
    return None


def _table(columns, rows, raw: bool = False, cls: str = "") -> str:
    """A table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _cell_text(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    attr = f" class='{cls}'" if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell_text(v) -> str:
    if isinstance(v, float | np.floating):
        return _num(v)
    if isinstance(v, Mapping | list | tuple):
        return _e(json.dumps(v, default=str))
    return _e(v)


def _kv_table(d: Mapping) -> str:
    return _table(["name", "value"], [[k, v] for k, v in d.items()])


def _inline_svg(svg: str) -> str:
    """Graphviz SVG for inlining: no XML declaration or DOCTYPE (not allowed inside HTML), and
    the fixed width/height moved to data attributes so CSS scales it to the page by its
    viewBox (the page's zoom button restores the natural size)."""
    start = svg.find("<svg")
    if start < 0:
        return ""
    end = svg.find(">", start)
    tag = re.sub(r'\s(width|height)="([^"]*)"', r' data-\1="\2"', svg[start:end])
    return tag + svg[end:]


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        raise ReportError(
            f"cannot write {path}: {err.strerror or err}; choose a writable output folder"
        ) from err


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}"
        f"<footer>Written by circuit-atlas.</footer><script>{_JS}</script></body></html>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 24px 40px;
color:#1d1d1f;background:#fafafa;font-size:14px}
header{border-bottom:1px solid #ddd;margin-bottom:8px}h1{font-size:22px;margin:16px 0 4px}
h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #e4e4e4}h3{font-size:15px;margin:8px 0}
nav a{margin-right:4px}a{color:#1f5fbf;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:6px 0;background:#fff}
th,td{border:1px solid #e0e0e0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f3;cursor:default}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:12px}.graph{overflow:auto;border:1px solid #ddd;background:#fff}
.graph svg{width:100%;height:auto;display:block}
.diagram svg{max-width:100%;height:auto;display:block}.cols{display:flex;gap:32px;flex-wrap:wrap}
.tokens{display:flex;flex-wrap:wrap;gap:4px;margin:6px 0}
.tok{border:1px solid #9ccfae;background:#e8f6ec;border-radius:4px;padding:2px 6px;
white-space:pre;color:#1d1d1f}.tok .pos{color:#888;font-size:10px;margin-right:4px}
.pos{color:#1f5fbf}.neg{color:#c62828}.chip{border:1px solid #ddd;border-radius:10px;
padding:1px 7px;margin:1px;display:inline-block;white-space:pre;background:#fff}
tr:target{background:#fff3c4;outline:2px solid #f0b400}
tr.k-logit td:first-child{border-left:4px solid #9b7fd1}
tr.k-feature td:first-child{border-left:4px solid #f0a64d}
tr.k-error td:first-child{border-left:4px solid #999}
tr.k-token td:first-child{border-left:4px solid #5cb87a}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;
align-items:start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.card:target{outline:2px solid #f0b400}.contexts li{margin:3px 0;white-space:pre-wrap}
.contexts .peak{font-weight:bold;border-bottom:2px solid #c46a00}
.hist rect{fill:#f0a64d}.hist line.mark{stroke:#c62828;stroke-width:2}
.hist text{font-size:10px;fill:#666}footer{margin-top:30px;color:#888;font-size:12px}
"""

# Zoom the graph; filter the node table as you type (no dependencies, nothing fetched).
_JS = """
(function(){var b=document.getElementById('zoom');
var svg=document.querySelector('.graph svg');if(!b||!svg){return;}
b.addEventListener('click',function(){var nat=svg.style.width!=='';
svg.style.width=nat?'':svg.getAttribute('data-width');
b.textContent=nat?'natural size':'fit to page';
});})();
(function(){var box=document.getElementById('node-filter');if(!box){return;}
var rows=document.querySelectorAll('#node-table tbody tr');
box.addEventListener('input',function(){var q=box.value.toLowerCase();
for(var i=0;i<rows.length;i++){var r=rows[i];
r.style.display=(!q||r.textContent.toLowerCase().indexOf(q)>=0)?'':'none';}});})();
"""
