"""Graph files validated on load (tracer.graph.Graph.load): every damaged file gives one
GraphFormatError line naming the file and what is wrong; a good file loads unchanged."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.graphstore.conftest import assert_graphs_equal, small_graph
from tracer.graph import Graph, GraphFormatError


def _rewrite(src, dst, table=None, meta=None):
    """Write ``dst``: the graph file ``src`` with ``table(t)`` / ``meta(head)`` applied."""
    t = pq.read_table(src)
    head = json.loads(t.schema.metadata[b"circuit_atlas"])
    if table is not None:
        t = table(t)
    if meta is not None:
        meta(head)
    t = t.replace_schema_metadata({b"circuit_atlas": json.dumps(head).encode()})
    pq.write_table(t, dst)
    return dst


def _set(t: pa.Table, name: str, row: int, value) -> pa.Table:
    """``t`` with column ``name`` at table row ``row`` set to ``value``."""
    i = t.column_names.index(name)
    values = t.column(name).to_pylist()
    values[row] = value
    return t.set_column(i, name, pa.array(values, t.schema.field(name).type))


@pytest.fixture
def good(tmp_path):
    g = small_graph(501)
    return g, g.save(tmp_path / "good.parquet")


def test_good_file_round_trips_and_records_counts(good):
    g, path = good
    assert_graphs_equal(Graph.load(path), g)
    head = json.loads(pq.read_table(path).schema.metadata[b"circuit_atlas"])
    assert (head["n_nodes"], head["n_edges"]) == (g.n_nodes, g.n_edges)


def _edge_row(g, k: int) -> int:
    return g.n_nodes + k  # node rows first, then edge rows


CASES = {
    "missing metadata key": (
        dict(meta=lambda h: h.pop("tokens")),
        "metadata lacks key(s) 'tokens'",
    ),
    "missing column": (
        dict(table=lambda t: t.drop_columns(["weight"])),
        "the table lacks column(s) 'weight'",
    ),
    "NaN weight": (
        "nan",
        "edge 3 has weight nan (not finite)",
    ),
    "node count": (
        dict(meta=lambda h: h.update(n_nodes=h["n_nodes"] + 1)),
        "metadata says n_nodes = ",
    ),
    "token strings": (
        dict(meta=lambda h: h["token_strings"].pop()),
        "tokens but",
    ),
    "bad JSON type": (
        dict(meta=lambda h: h.update(n_layers="six")),
        "metadata n_layers 'six' is not an integer",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_files_give_one_line_naming_file_and_fault(good, tmp_path, case):
    g, path = good
    how, expected = CASES[case]
    if how == "nan":
        how = dict(table=lambda t: _set(t, "weight", _edge_row(g, 3), float("nan")))
    bad = _rewrite(path, tmp_path / "bad.parquet", **how)
    with pytest.raises(GraphFormatError) as err:
        Graph.load(bad)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(bad) in msg and expected in msg, msg


def test_out_of_range_source_is_named_with_the_node_count(good, tmp_path):
    g, path = good
    k = 5
    bad = _rewrite(
        path, tmp_path / "bad.parquet", table=lambda t: _set(t, "source", _edge_row(g, k), 332)
    )
    with pytest.raises(GraphFormatError, match=f"edge {k} has source 332, outside the "
                       f"{g.n_nodes} nodes"):  # fmt: skip
        Graph.load(bad)


def test_nulls_and_unknown_row_kinds(good, tmp_path):
    g, path = good
    null_target = _rewrite(
        path, tmp_path / "a.parquet", table=lambda t: _set(t, "target", _edge_row(g, 0), None)
    )
    with pytest.raises(GraphFormatError, match="column 'target' has nulls in edge rows"):
        Graph.load(null_target)
    null_layer = _rewrite(path, tmp_path / "b.parquet", table=lambda t: _set(t, "layer", 2, None))
    with pytest.raises(GraphFormatError, match="column 'layer' has nulls in node rows"):
        Graph.load(null_layer)
    kind = _rewrite(path, tmp_path / "c.parquet", table=lambda t: _set(t, "kind", 1, 7))
    with pytest.raises(GraphFormatError, match="node kind 7 is not one of 0..3"):
        Graph.load(kind)


def test_old_files_without_counts_still_load(good, tmp_path):
    g, path = good

    def drop(h):
        h.pop("n_nodes")
        h.pop("n_edges")

    old = _rewrite(path, tmp_path / "old.parquet", meta=drop)
    assert_graphs_equal(Graph.load(old), g)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    g = small_graph(502)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(OSError):
        g.save(tmp_path / "g.parquet")
    assert list(tmp_path.iterdir()) == []
