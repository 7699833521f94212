"""Graphviz rendering: labels, layout (rows = layers, columns = positions), sizes, edge colours."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest
from report_fixtures import LOGITS, PROMPT_TOKENS, make_feature_dict, make_graph

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN
from tracer.reports.feature_book import load_features
from tracer.reports.render import (
    NEGATIVE,
    POSITIVE,
    RenderConfig,
    build_dot,
    layout,
    pipe,
    render_graph,
    select,
)

SVG = "{http://www.w3.org/2000/svg}"


def _svg_nodes(svg: bytes) -> dict[str, ET.Element]:
    """Graphviz node groups by their id (we set id='g-<node id>')."""
    root = ET.fromstring(svg)
    return {
        g.get("id")[2:]: g
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "node" and (g.get("id") or "").startswith("g-")
    }


def _texts(el) -> list[str]:
    return [t.text or "" for t in el.iter(f"{SVG}text")]


def test_svg_and_png_written_with_logit_and_token_labels(tmp_path):
    g = make_graph()
    book = load_features(make_feature_dict(g))
    res = render_graph(g, tmp_path / "graph", book)
    assert set(res.files) == {"svg", "png"}
    png = res.files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    svg = res.files["svg"].read_bytes()
    nodes = _svg_nodes(svg)
    # every drawn node is in the SVG, under its graph node id
    assert set(nodes) == {g.node_id(i) for i in range(g.n_nodes)}
    for pos, tok in enumerate(PROMPT_TOKENS):
        assert tok in _texts(nodes[f"t_{pos}"]), tok
    for text, vid, p in LOGITS:
        texts = _texts(nodes[f"l_{vid}"])
        assert text in texts and f"p={p:.3f}" in texts
    # a feature with information is labelled by its promoted tokens
    f0 = int(np.flatnonzero(g.kind == FEATURE)[0])
    assert any(t.startswith("→") and "Austin" in t for t in _texts(nodes[g.node_id(f0)]))


@pytest.mark.parametrize("cell_width", [6, 2])
def test_rows_are_layers_and_columns_positions(cell_width):
    g = make_graph(n_layers=5, n_features=30)
    nodes, _ = select(g, RenderConfig(max_nodes=10_000))
    coords, bands = layout(g, nodes, cell_width=cell_width)
    assert len(coords) == g.n_nodes

    def row(i):
        k = int(g.kind[i])
        return -1 if k == TOKEN else (g.n_layers if k == LOGIT else int(g.layer[i]))

    # each node lies in its row's band; bands are disjoint and rise from tokens to logits
    for i, (_, y) in coords.items():
        lo, hi = bands[row(i)]
        assert lo <= y <= hi
    spans = [bands[r] for r in sorted(bands)]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert min(bands) == -1 and max(bands) == g.n_layers
    # columns: every node at a smaller position lies left of every node at a larger position
    # (logits excepted: they spread out over the last column)
    inner = [i for i in coords if int(g.kind[i]) != LOGIT]
    for a in inner:
        for b in inner:
            if g.position[a] < g.position[b]:
                assert coords[a][0] < coords[b][0]
    # no two nodes share a spot, and no cell line holds more than cell_width nodes
    assert len({coords[i] for i in coords}) == len(coords)
    per_line = Counter((row(i), int(g.position[i]), coords[i][1]) for i in inner)
    assert max(per_line.values()) <= cell_width
    if cell_width == 2:
        assert any(hi > lo for lo, hi in bands.values())  # busy cells wrapped


def _assert_widths_follow(g, values):
    dot, _, _ = build_dot(g, config=RenderConfig(max_nodes=10_000))
    widths = _node_attr(dot.source, "width")
    feats = np.flatnonzero(g.kind == FEATURE)
    order = feats[np.argsort(values[feats], kind="stable")]
    got = [widths[g.node_id(i)] for i in order]
    assert got == sorted(got) and got[0] < got[-1]


def test_node_size_grows_with_influence():
    from tracer.prune import node_influence

    g = make_graph()
    _assert_widths_follow(g, np.asarray(g.extra["influence"]))
    # not recorded: computed from the graph (as pruning computes it)
    del g.extra["influence"]
    _assert_widths_follow(g, node_influence(g))
    # no logit weights to measure influence by: |activation|
    g.logit_weights[:] = 0
    _assert_widths_follow(g, np.abs(g.activation))


def _node_attr(source: str, attr: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(r"^\s*(\w+) \[(.*)\]$", source, re.M):
        a = re.search(rf"\b{attr}=\"?([\d.]+)", m.group(2))
        if a:
            out[m.group(1)] = float(a.group(1))
    return out


def test_edges_coloured_by_sign_and_sized_by_weight():
    g = make_graph()
    dot, _, edges = build_dot(g, config=RenderConfig(max_nodes=10_000, max_edges=10_000))
    assert len(edges) == g.n_edges
    ids = [g.node_id(i) for i in range(g.n_nodes)]
    drawn = {}
    for m in re.finditer(r"^\s*(\w+) -> (\w+) \[(.*)\]$", dot.source, re.M):
        color = re.search(r'color="(#[0-9a-f]{6})', m.group(3)).group(1)
        width = float(re.search(r"penwidth=\"?([\d.]+)", m.group(3)).group(1))
        drawn[(m.group(1), m.group(2))] = (color, width)
    assert len(drawn) == g.n_edges
    pairs = []
    for t, s, w in zip(g.target.tolist(), g.source.tolist(), g.weight.tolist(), strict=True):
        color, width = drawn[(ids[s], ids[t])]
        assert color == (POSITIVE if w >= 0 else NEGATIVE)
        pairs.append((abs(w), width))
    pairs.sort()
    assert [p[1] for p in pairs] == sorted(p[1] for p in pairs)
    assert pairs[0][1] < pairs[-1][1]


def test_edge_paths_run_upward_from_source_to_target():
    g = make_graph()
    dot, nodes, _ = build_dot(g)
    coords, _ = layout(g, nodes)
    ids = {g.node_id(i): i for i in range(g.n_nodes)}
    n = 0
    for m in re.finditer(r"^\s*(\w+) -> (\w+) \[(.*)\]$", dot.source, re.M):
        pos = re.search(r'pos="e,([-\d.]+),([-\d.]+) ([^"]*)"', m.group(3))
        pts = [tuple(map(float, p.split(","))) for p in pos.group(3).split()]
        s, t = coords[ids[m.group(1)]], coords[ids[m.group(2)]]
        assert pts[0][0] == pytest.approx(s[0], abs=0.05) and pts[0][1] > s[1]
        assert float(pos.group(1)) == pytest.approx(t[0], abs=0.05) and float(pos.group(2)) < t[1]
        assert pts[-1][1] > pts[0][1]
        n += 1
    assert n > 50


def test_selection_keeps_tokens_logits_and_highest_influence():
    g = make_graph(n_features=40)
    cfg = RenderConfig(max_nodes=25, max_edges=30)
    nodes, edges = select(g, cfg)
    kinds = g.kind[nodes]
    assert (kinds == TOKEN).sum() == g.count("token") and (kinds == LOGIT).sum() == 3
    assert len(nodes) == 25
    infl = np.asarray(g.extra["influence"])
    inner = np.flatnonzero((g.kind == FEATURE) | (g.kind == ERROR))
    kept = np.intersect1d(inner, nodes)
    dropped = np.setdiff1d(inner, nodes)
    assert infl[kept].min() >= infl[dropped].max()
    assert len(edges) == 30
    keep = np.isin(np.arange(g.n_nodes), nodes)
    eligible = np.flatnonzero(keep[g.target] & keep[g.source])
    rest = np.setdiff1d(eligible, edges)
    assert np.abs(g.weight[edges]).min() >= np.abs(g.weight[rest]).max()


def test_awkward_token_text_is_drawn_literally(tmp_path):
    g = make_graph()
    g.token_strings[3] = 'a\\b "q" <x> &\n'
    dot, _, _ = build_dot(g)
    svg = pipe(dot, "svg")
    texts = _texts(_svg_nodes(svg)["t_3"])
    assert 'a\\b "q" <x> &⏎' in texts


def test_unwritable_output_is_a_clear_error(tmp_path):
    from tracer.reports.render import RenderError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RenderError, match="cannot write .*writable"):
        render_graph(make_graph(), blocker / "graph", config=RenderConfig(formats=("svg",)))
