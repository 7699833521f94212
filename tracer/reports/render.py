"""Graphviz pictures of attribution graphs (SVG and PNG).

Layout is a fixed grid computed here, so the picture reads like the model: one row per layer
(token embeddings at the bottom, logits at the top; layers without nodes are left out), one
column per token position, several nodes of the same layer and position side by side. Graphviz
(``neato -n2``, shipped with ``dot``) draws it with node positions pinned and the edges given
as upward S-curves computed here (Graphviz's own routing takes seconds per hundred edges).
Node size grows with influence; edges are blue (positive) or red (negative), width and opacity
by |weight|. Nodes link to ``#node-<id>`` so the SVG inlined in the HTML report jumps to the
node's row when clicked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.reports.annotate import display_influence, node_heading, node_text, visible, vocab_text
from tracer.reports.feature_book import FeatureBook

POSITIVE = "#1f5fbf"  # blue
NEGATIVE = "#c62828"  # red
_FILL = {FEATURE: "#f6c98e", ERROR: "#c8c8c8", TOKEN: "#b9e3c6", LOGIT: "#cdb8ea"}
_SLOT_W = 105.0  # points between node centres within a column
_ROW_H = 110.0  # points between rows
_LINE_H = 55.0  # points between the wrapped lines of one busy row
_MARGIN = 70.0  # left margin for row labels


class RenderError(RuntimeError):
    """Graphviz could not draw the graph (missing binary, bad output path)."""


@dataclass
class RenderConfig:
    """What to draw. The largest-influence nodes are kept (all token and logit nodes always),
    then the strongest edges among them."""

    max_nodes: int = 160
    max_edges: int = 500
    formats: tuple[str, ...] = ("svg", "png")
    dpi: int = 96  # PNG resolution
    label_chars: int = 18  # feature labels are cut to this many characters


@dataclass
class Rendered:
    """Result of :func:`render_graph`: files written and what was left out of the picture."""

    files: dict[str, Path] = field(default_factory=dict)
    shown_nodes: int = 0
    shown_edges: int = 0
    total_nodes: int = 0
    total_edges: int = 0


def select(graph: Graph, config: RenderConfig) -> tuple[np.ndarray, np.ndarray]:
    """Node indices and edge indices to draw (see :class:`RenderConfig`)."""
    infl = display_influence(graph)
    always = np.flatnonzero((graph.kind == TOKEN) | (graph.kind == LOGIT))
    inner = np.flatnonzero((graph.kind == FEATURE) | (graph.kind == ERROR))
    budget = max(0, config.max_nodes - len(always))
    inner = inner[np.argsort(-infl[inner], kind="stable")[:budget]]
    nodes = np.sort(np.r_[always, inner]).astype(np.int64)
    keep = np.zeros(graph.n_nodes, dtype=bool)
    keep[nodes] = True
    edges = np.flatnonzero(keep[graph.target] & keep[graph.source])
    edges = edges[np.argsort(-np.abs(graph.weight[edges]), kind="stable")[: config.max_edges]]
    return nodes, edges


def layout(
    graph: Graph, nodes: np.ndarray, cell_width: int = 6
) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
    """Pinned positions in points for ``nodes`` and the vertical band of each drawn row.

    A row is -1 for tokens, the layer for features and errors, n_layers for logits. Nodes of
    one (row, position) cell sit side by side, strongest in the middle line first; a cell with
    more than ``cell_width`` nodes wraps onto further lines within its row's band, so a busy
    position does not stretch the picture sideways. Returns ({node: (x, y)},
    {row: (y_bottom, y_top)}), y growing upward (tokens lowest).
    """
    infl = display_influence(graph)
    last = max(int(graph.position.max(initial=0)), len(graph.token_strings) - 1)
    cells: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in nodes.tolist():
        k = int(graph.kind[i])
        row = -1 if k == TOKEN else (graph.n_layers if k == LOGIT else int(graph.layer[i]))
        cells[(row, int(graph.position[i]))].append(i)
    for members in cells.values():
        # Strongest first, error nodes after features, stable by node index.
        members.sort(key=lambda i: (int(graph.kind[i]) == ERROR, -infl[i], i))
    width = [1] * (last + 1)
    lines: dict[int, int] = defaultdict(lambda: 1)
    for (row, pos), members in cells.items():
        per_line = min(len(members), cell_width)
        lines[row] = max(lines[row], math.ceil(len(members) / per_line))
        if row != graph.n_layers:  # logits spread out above the last column, not widening it
            width[pos] = max(width[pos], per_line)
    x0 = [_MARGIN]
    for w in width[:-1]:
        x0.append(x0[-1] + w * _SLOT_W)
    bands, y = {}, 0.0
    for row in sorted({row for row, _ in cells}):
        bands[row] = (y, y + (lines[row] - 1) * _LINE_H)
        y = bands[row][1] + _ROW_H
    coords = {}
    for (row, pos), members in cells.items():
        per_line = min(len(members), cell_width)
        centre = x0[pos] + width[pos] * _SLOT_W / 2
        for j, i in enumerate(members):
            line, col = divmod(j, per_line)
            n_here = min(per_line, len(members) - line * per_line)
            # the strongest line on top, nearest the rows its nodes feed
            y_line = bands[row][1] - line * _LINE_H
            coords[i] = (centre + (col - (n_here - 1) / 2) * _SLOT_W, y_line)
    return coords, bands


def build_dot(
    graph: Graph,
    features: FeatureBook | None = None,
    config: RenderConfig | None = None,
    decode: Callable[[int], str] | None = None,
):
    """A ``graphviz.Digraph`` with pinned positions (render with engine neato, no-op 2)."""
    import graphviz

    config = config or RenderConfig()
    nodes, edges = select(graph, config)
    coords, bands = layout(graph, nodes)
    infl = display_influence(graph)
    # Sizes are relative within a kind: logit values, embedding norms and feature
    # influences are different units.
    scale = {k: float(infl[nodes][graph.kind[nodes] == k].max(initial=0.0)) for k in range(4)}
    top_logit = _top_logit(graph, decode)
    dot = graphviz.Digraph(
        "attribution",
        graph_attr={
            "splines": "true",
            "outputorder": "edgesfirst",
            "bgcolor": "white",
            "fontname": "Helvetica",
            "labelloc": "t",
            "fontsize": "14",
            "label": _title(graph, top_logit),
            "pad": "0.3",
        },
        node_attr={"fontname": "Helvetica", "fontsize": "10", "style": "filled,rounded"},
        edge_attr={"arrowsize": "0.4"},
    )
    for row, (lo, hi) in bands.items():
        y = (lo + hi) / 2
        name = "tokens" if row == -1 else ("logits" if row == graph.n_layers else f"L{row}")
        dot.node(
            f"row_{row}", _esc(name), shape="plaintext", style="", pos=f"6,{y:.1f}!",
            fontcolor="#555555", fontsize="11",
        )  # fmt: skip
    half_h: dict[int, float] = {}  # points from a node's centre to its top/bottom edge
    for i in nodes.tolist():
        k = int(graph.kind[i])
        s = math.sqrt(infl[i] / scale[k]) if scale[k] > 0 else 0.0
        x, y = coords[i]
        nid = graph.node_id(i)
        height = (0.3 if k == ERROR else 0.42) + 0.25 * s  # inches; fits a two-line label
        half_h[i] = height * 36.0
        dot.node(
            nid,
            _esc(_label(graph, i, features, decode, config.label_chars)),
            pos=f"{x:.1f},{y:.1f}!",
            shape="diamond" if k == ERROR else "box",
            width=f"{0.55 + 0.75 * s:.2f}",
            height=f"{height:.2f}",
            fillcolor=_FILL[k],
            penwidth=f"{0.6 + 1.4 * s:.2f}",
            id=f"g-{nid}",
            href=f"#node-{nid}",
            tooltip=_esc(_tooltip(graph, i, infl[i], features, decode)),
        )
    wmax = float(np.abs(graph.weight[edges]).max(initial=0.0)) or 1.0
    ids = {i: graph.node_id(i) for i in nodes.tolist()}
    # Weakest first so the strongest edges are drawn on top.
    for e in edges[np.argsort(np.abs(graph.weight[edges]), kind="stable")].tolist():
        w = float(graph.weight[e])
        rel = abs(w) / wmax
        alpha = int(round(255 * (0.25 + 0.75 * rel)))
        s_i, t_i = int(graph.source[e]), int(graph.target[e])
        dot.edge(
            ids[s_i],
            ids[t_i],
            color=f"{POSITIVE if w >= 0 else NEGATIVE}{alpha:02x}",
            penwidth=f"{0.4 + 4.6 * rel:.2f}",
            tooltip=_esc(f"{ids[s_i]} → {ids[t_i]}: {w:+.4g}"),
            pos=_edge_path(coords[s_i], half_h[s_i], coords[t_i], half_h[t_i]),
        )
    return dot, nodes, edges


def render_graph(
    graph: Graph,
    out_stem: str | Path,
    features: FeatureBook | None = None,
    config: RenderConfig | None = None,
    decode: Callable[[int], str] | None = None,
) -> Rendered:
    """Write ``<out_stem>.svg`` / ``.png`` (per ``config.formats``); returns what was drawn."""
    config = config or RenderConfig()
    out_stem = Path(out_stem)
    dot, nodes, edges = build_dot(graph, features, config, decode)
    result = Rendered(
        shown_nodes=len(nodes),
        shown_edges=len(edges),
        total_nodes=graph.n_nodes,
        total_edges=graph.n_edges,
    )
    for fmt in config.formats:
        # dpi only for bitmaps: in SVG Graphviz scales the drawing but not its viewBox.
        dot.graph_attr.pop("dpi", None)
        if fmt in ("png", "jpg", "gif"):
            dot.graph_attr["dpi"] = str(config.dpi)
        data = pipe(dot, fmt)
        path = out_stem.with_name(f"{out_stem.name}.{fmt}")
        try:
            path.write_bytes(data)
        except OSError as err:
            raise RenderError(
                f"cannot write {path}: {err.strerror or err}; choose a writable output folder"
            ) from err
        result.files[fmt] = path
    return result


def pipe(dot, fmt: str) -> bytes:
    """Run Graphviz on ``dot`` (pinned positions) and return the ``fmt`` output."""
    import graphviz

    try:
        return dot.pipe(format=fmt, engine="neato", neato_no_op=2, quiet=True)
    except graphviz.ExecutableNotFound as err:
        raise RenderError(
            "Graphviz is not installed (the 'dot'/'neato' programs are missing): install the "
            "system package 'graphviz' (scripts/setup does this)"
        ) from err
    except graphviz.CalledProcessError as err:
        msg = (err.stderr or b"").decode(errors="replace").strip()
        raise RenderError(f"Graphviz failed to draw the graph as {fmt}: {msg}") from err


def _edge_path(src, src_half_h, tgt, tgt_half_h) -> str:
    """Graphviz edge ``pos``: a vertical S-curve from the source's top to just below the
    target's bottom, where the arrowhead ends. Sources always sit on a lower row than their
    targets (effects run from earlier layers to later ones), so every curve runs upward."""
    (x0, y0), (x1, y1) = src, tgt
    y0 += src_half_h
    end = y1 - tgt_half_h
    y1 = end - 4.0  # arrowhead length at arrowsize 0.4
    dy = max(y1 - y0, 1.0) * 0.5
    pts = [(x0, y0), (x0, y0 + dy), (x1, y1 - dy), (x1, y1)]
    return f"e,{x1:.1f},{end:.1f} " + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)


def _label(graph, i, features, decode, max_chars: int) -> str:
    k = int(graph.kind[i])
    text = node_text(graph, i, features, decode)
    if k == TOKEN:
        return f"{text}\n@{int(graph.position[i])}"
    if k == LOGIT:
        return f"{text}\np={float(graph.probability[i]):.3f}"
    if k == ERROR:
        return f"err L{int(graph.layer[i])}"
    head = f"L{int(graph.layer[i])} F{int(graph.feature[i])}"
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return f"{head}\n{text}" if text else head


def _tooltip(graph, i, influence, features, decode) -> str:
    parts = [node_heading(graph, i), f"influence {influence:.4g}"]
    k = int(graph.kind[i])
    if k == FEATURE:
        parts.append(f"activation {float(graph.activation[i]):.4g}")
        info = features.get(int(graph.layer[i]), int(graph.feature[i])) if features else None
        if info and info.promoted_tokens:
            parts.append("promotes " + ", ".join(repr(t) for t, _ in info.promoted_tokens[:5]))
    elif k == LOGIT:
        parts.append(f"{node_text(graph, i, features, decode)!r} p={graph.probability[i]:.4f}")
    return "; ".join(parts)


def _top_logit(graph: Graph, decode) -> str:
    idx = np.flatnonzero(graph.kind == LOGIT)
    if len(idx) == 0:
        return ""
    best = idx[np.argmax(graph.probability[idx])]
    return visible(vocab_text(graph, int(graph.feature[best]), decode))


def _title(graph: Graph, top_logit: str) -> str:
    prompt = visible(graph.prompt)
    if len(prompt) > 90:
        prompt = prompt[:89] + "…"
    head = f"{prompt} → {top_logit!r}" if top_logit else prompt
    return _esc(f"{head}\nblue: positive edge   red: negative edge   size: influence")


def _esc(text: str) -> str:
    """Graphviz escString: backslashes literal; our own line breaks become centred breaks."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")
