"""Transcoder identity in the store: two CLTs of one model traced on the same prompts keep
disjoint (:Feature) sets and per-transcoder query answers; a store written under bare names is
refused until migrated, and the migration loses nothing."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np
import pytest
from model_fixtures import make_random_clt, make_tiny_model

from graphstore import GraphStore, LegacyStoreError, graph_id, ingest
from graphstore.errors import IdentityError
from tests.graphstore.conftest import recurring_expected, small_graph, wipe
from tracer.attribution import attribute
from tracer.graph import FEATURE
from tracer.prune import prune
from tracer.replacement import ReplacementModel

PROMPTS = ("abcab", "hello there", "abcab bc")


@pytest.fixture(scope="module")
def two_clts_stored(server_auth, tmp_path_factory):
    model = make_tiny_model("llama", n_layers=2)
    graphs = {}
    for seed in (1, 2):  # two CLTs of the same model and shape: a "retrain"
        clt = make_random_clt(2, 32, 12, seed=seed)
        rm = ReplacementModel(model, clt)
        graphs[clt.identity.id] = [
            prune(attribute(rm, p, progress=False), 0.95, 0.99) for p in PROMPTS
        ]
    store = GraphStore(**server_auth, archive_dir=tmp_path_factory.mktemp("idarchive"))
    wipe(store)
    for gs in graphs.values():
        for g in gs:
            store.add(g)
    yield store, graphs
    wipe(store)
    store.close()


def _feature_set(graphs) -> set[tuple[int, int]]:
    """(layer, index) of every feature node in ``graphs``."""
    return {(r[0], r[1]) for r in recurring_expected(graphs, 1)}


def test_two_clts_keep_disjoint_features(two_clts_stored):
    store, graphs = two_clts_stored
    (a, ga), (b, gb) = graphs.items()
    assert a != b and a.split("@")[0] == b.split("@")[0]  # same readable name, other weights
    fa, fb = _feature_set(ga), _feature_set(gb)
    assert fa & fb, "the two CLTs share (layer, index) pairs: the old keys merged them"
    rows = store.cypher(
        "MATCH (g:Graph)-[:HAS_FEATURE]->(f:Feature) WHERE g.complete = true "
        "RETURN DISTINCT f.transcoder AS t, f.layer AS l, f.index AS i, f.key AS k"
    ).rows
    got = defaultdict(set)
    for t, layer, index, key in rows:
        assert key == f"{t}/{layer}/{index}"
        got[t].add((layer, index))
    assert dict(got) == {a: fa, b: fb}
    tcs = store.cypher(
        "MATCH (t:Transcoder) WHERE t.name IN $names RETURN t.name, t.readable, t.fingerprint",
        {"names": [a, b]},
    ).rows
    assert sorted(tcs) == sorted([[x, *x.split("@")] for x in (a, b)])


def test_canned_queries_per_transcoder_match_networkx(two_clts_stored):
    store, graphs = two_clts_stored
    for tc, gs in graphs.items():
        exp = recurring_expected(gs, 1)
        res = store.query("recurring-features", min_prompts=1, transcoder=tc, limit=500)
        assert all(r[0] == tc for r in res.rows)
        assert [r[1:6] for r in res.rows] == exp
        # feature-feeds for this transcoder's strongest recurring feature -> feature edge,
        # against a networkx multigraph of its graphs' feature edges.
        G = nx.MultiDiGraph()
        for g in gs:
            for t, s, w in zip(g.target, g.source, g.weight, strict=True):
                if g.kind[s] == FEATURE and g.kind[t] == FEATURE:
                    G.add_edge((int(g.layer[s]), int(g.feature[s])),
                               (int(g.layer[t]), int(g.feature[t])), weight=float(w),
                               graph=graph_id(g))  # fmt: skip
        if G.number_of_edges() == 0:
            continue
        (u, v) = max(G.edges(), key=lambda e: (G.number_of_edges(*e), e))
        want = sorted(abs(d["weight"]) for d in G.get_edge_data(u, v).values())
        res = store.query("feature-feeds", source_layer=u[0], source_index=u[1],
                          target_layer=v[0], target_index=v[1], transcoder=tc)  # fmt: skip
        np.testing.assert_allclose(sorted(abs(r[4]) for r in res.rows), want, rtol=1e-6)


def test_bare_transcoder_name_refused(store):
    g = small_graph(7, transcoder_name="smollm2-135m-instruct")
    with pytest.raises(IdentityError, match="without a content fingerprint.*re-trace"):
        store.add(g)


def test_legacy_store_refused_then_migrated(server_auth, tmp_path):
    """A store written before identities (features keyed by a bare model name) is refused with
    the command that migrates it; migration renames keys and keeps every graph and count."""
    first = GraphStore(**server_auth, archive_dir=tmp_path / "a")
    wipe(first)
    legacy = [small_graph(40 + i, transcoder_name="smollm2-135m-instruct") for i in range(3)]
    with first._session() as s:  # written as the old code wrote them: bare names
        for g in legacy:
            ingest.write_rows(s, ingest.graph_rows(g, graph_id(g), None))
    before = first.cypher(
        "MATCH (f:Feature) WHERE f.transcoder = 'smollm2-135m-instruct' "
        "RETURN f.layer, f.index, f.prompts, f.graphs ORDER BY f.layer, f.index"
    ).rows
    first.close()
    store = GraphStore(**server_auth, archive_dir=tmp_path / "b")
    try:
        assert store.legacy_transcoders() == {"smollm2-135m-instruct": "model-test"}
        with pytest.raises(LegacyStoreError, match="store migrate --transcoder smollm2"):
            store.query("recurring-features")
        with pytest.raises(LegacyStoreError):
            store.add(small_graph(50))
        new = "smollm2-135m-instruct-clt-256@0123456789abcdef"
        (res,) = store.migrate_identities({"smollm2-135m-instruct": new})
        assert res.graphs == 3 and res.features == len(before)
        assert store.legacy_transcoders() == {}
        after = store.cypher(
            "MATCH (f:Feature) WHERE f.transcoder = $t "
            "RETURN f.layer, f.index, f.prompts, f.graphs ORDER BY f.layer, f.index",
            {"t": new},
        ).rows
        assert after == before and len(before) > 0
        keys = store.cypher("MATCH (f:Feature {transcoder: $t}) RETURN f.key", {"t": new}).rows
        assert all(k.startswith(new + "/") for (k,) in keys)
        assert sorted(store.graph_ids()) == sorted(graph_id(g) for g in legacy)
        assert store.query("recurring-features", min_prompts=1).rows  # usable again
    finally:
        with store._session() as s:  # never leave a legacy store for the other tests
            s.run("MATCH (t:Transcoder {name: 'smollm2-135m-instruct'}) DETACH DELETE t")
            s.run("MATCH (f:Feature {transcoder: 'smollm2-135m-instruct'}) DETACH DELETE f")
        wipe(store)
        store.close()


def test_migrate_command_computes_identity_from_files(server_auth, tmp_path, capsys):
    from tests.graphstore.test_cli import _conn
    from tracer.cli import main
    from transcoders.formats import save_transcoder

    store = GraphStore(**server_auth, archive_dir=tmp_path / "a")
    wipe(store)
    g = small_graph(60, transcoder_name="model-test")
    with store._session() as s:
        ingest.write_rows(s, ingest.graph_rows(g, graph_id(g), None))
    store.close()
    clt = make_random_clt(6, 16, 40, seed=9)
    clt.cfg.model_name = "model-test"
    save_transcoder(clt, tmp_path / "clt")
    conn = _conn(server_auth, tmp_path)
    try:
        assert main(["store", "migrate", *conn]) == 2
        assert "no transcoder given for 'model-test'" in capsys.readouterr().err
        assert main(["store", "migrate", "--transcoder", f"nope={tmp_path}", *conn]) == 2
        assert "not a bare transcoder name of this store" in capsys.readouterr().err
        assert main(["store", "migrate", "--transcoder", f"model-test={tmp_path / 'clt'}",
                     *conn]) == 0  # fmt: skip
        assert f"model-test -> {clt.identity.id}: " in capsys.readouterr().out
        with GraphStore(**server_auth, archive_dir=tmp_path / "b") as after:
            assert after.legacy_transcoders() == {}
            (row,) = after.cypher("MATCH (g:Graph) RETURN g.transcoder").rows
            assert row == [clt.identity.id]
        assert main(["store", "migrate", *conn]) == 0
        assert "nothing to migrate" in capsys.readouterr().out
    finally:
        with GraphStore(**server_auth, archive_dir=tmp_path / "c") as s2:
            with s2._session() as s:
                s.run("MATCH (t:Transcoder {name: 'model-test'}) DETACH DELETE t")
                s.run("MATCH (f:Feature {transcoder: 'model-test'}) DETACH DELETE f")
            wipe(s2)
