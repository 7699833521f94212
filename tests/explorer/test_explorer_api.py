"""The explorer's server and its pieces without a browser: saved subgraphs in the store (and
that a refused save writes nothing), the Neuronpedia qParams round trip, the graph JSON,
automatic supernodes offered with a graph, the Cypher console's node highlighting, the token
guard off loopback, the folder source, and clear errors for bad requests and bad command
lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from explorer_client import call

from graphstore import GraphNotFoundError, ReadOnlyViolation, SubgraphNotFoundError, graph_id
from tracer.explorer import ExplorerConfig, ExplorerSetupError, GraphSource, create_app
from tracer.explorer.intervention_jobs import InterventionRequestError, feature_edits
from tracer.explorer.payload import edge_cumulative, graph_payload, supernode_suggestions
from tracer.explorer.server import ServerThread, access_token, is_loopback
from tracer.graph import ERROR, FEATURE
from tracer.reports.neuronpedia import check_document, np_node_id, read_subgraph, to_neuronpedia
from tracer.subgraph import Subgraph, SubgraphError, Supernode


def a_subgraph(g, name="sg") -> Subgraph:
    feats = [np_node_id(g, int(i)) for i in np.flatnonzero(g.kind == FEATURE)[:3]]
    return Subgraph(name, feats, [Supernode("pair", feats[:2])], {feats[2]: "lonely"})


# --- the subgraph type and the Neuronpedia qParams --------------------------------------------


def test_subgraph_round_trips_through_neuronpedia_json(world):
    g = world.graphs[0][0]
    sub = a_subgraph(g, "round-trip")
    doc = to_neuronpedia(g, subgraph=sub)
    check_document(doc)
    q = doc["qParams"]
    assert q["pinnedIds"] == sub.pinned
    assert q["supernodes"] == [["pair", *sub.pinned[:2]]]
    assert q["clerps"] == [[sub.pinned[2], "lonely"]]
    back = read_subgraph(json.loads(json.dumps(doc)), name="round-trip")
    assert back == sub
    # the viewer's URL form of pinnedIds (comma-separated) reads the same
    assert Subgraph.from_qparams({**q, "pinnedIds": ",".join(q["pinnedIds"])}, "x").pinned == (
        sub.pinned
    )
    with pytest.raises(SubgraphError, match="not a node of this graph"):
        to_neuronpedia(g, subgraph=Subgraph("bad", ["99_1_1"]))


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"name": "a/b"}, "is not allowed"),
        ({"name": ""}, "needs a name"),
        ({"name": "x", "pinnedIds": [1, 2]}, "list of node id strings"),
        ({"name": "x", "pinnedIds": ["a"], "supernodes": [["only-label"]]}, r"supernodes\[0\]"),
        ({"name": "x", "pinnedIds": ["a"], "supernodes": [["s", "b"]]}, "not pinned"),
        ({"name": "x", "pinnedIds": ["a", "a"]}, "pinned twice"),
        ({"name": "x", "pinnedIds": ["a", "b"], "supernodes": [["s", "a"], ["t", "a"]]},
         "two supernodes"),
        ({"name": "x", "clerps": [["a"]]}, r"clerps\[0\]"),
        ([1, 2], "JSON object"),
    ],
)  # fmt: skip
def test_malformed_subgraphs_are_refused(doc, message):
    with pytest.raises(SubgraphError, match=message):
        Subgraph.from_dict(doc)


# --- saved subgraphs in the store -------------------------------------------------------------


def test_subgraph_saved_with_its_graph(world):
    g, gid = world.graphs[0][0], world.ids[0]
    store = world.store
    sub = a_subgraph(g, "kept")
    store.save_subgraph(gid, sub)
    assert store.load_subgraph(gid, "kept") == sub
    listed = {s["name"]: s for s in store.subgraphs(gid)}
    assert listed["kept"]["pinned"] == 3 and listed["kept"]["supernodes"] == 1
    # saving under the same name replaces it
    smaller = Subgraph("kept", sub.pinned[:1])
    store.save_subgraph(gid, smaller)
    assert store.load_subgraph(gid, "kept") == smaller
    before = store.cypher("MATCH (s:Subgraph) RETURN s.key, s.doc_json ORDER BY s.key").rows
    # refused saves write nothing: a node the graph lacks, a graph the store lacks
    with pytest.raises(SubgraphError, match="not a node of this graph"):
        store.save_subgraph(gid, Subgraph("kept", [*sub.pinned, "7_7_77"]))
    with pytest.raises(GraphNotFoundError, match="no complete graph"):
        store.save_subgraph("gnothere", sub)
    after = store.cypher("MATCH (s:Subgraph) RETURN s.key, s.doc_json ORDER BY s.key").rows
    assert after == before
    with pytest.raises(SubgraphNotFoundError, match="no saved subgraph 'nope'"):
        store.load_subgraph(gid, "nope")


# --- the server's routes ----------------------------------------------------------------------


def test_graph_json_and_list(world):
    g, gid = world.graphs[0][0], world.ids[0]
    status, doc = call(f"{world.url}/api/graphs/{gid}")
    assert status == 200 and doc["can_save"] is True
    assert doc["nodes"]["id"] == [np_node_id(g, i) for i in range(g.n_nodes)]
    assert doc["edges"]["source"] == g.source.tolist()
    np.testing.assert_allclose(doc["edges"]["weight"], g.weight, atol=1e-6)
    # the full graph is the archived one
    status, full = call(f"{world.url}/api/graphs/{gid}?full=1")
    assert len(full["nodes"]["id"]) == world.graphs[0][1].n_nodes
    # list: all, by prompt text, by a feature only the first graph has
    _, listed = call(f"{world.url}/api/graphs")
    assert [x["id"] for x in listed["graphs"]] == sorted(
        world.ids, key=lambda i: world.graphs[world.ids.index(i)][0].prompt
    )
    _, hit = call(f"{world.url}/api/graphs?q=dallas")
    assert [x["id"] for x in hit["graphs"]] == [gid]
    # the scores name the rules they follow, in the list and in the graph view
    assert g.params["convention"] in ("circuit-tracer", "atlas")
    assert hit["graphs"][0]["scores"]["convention"] == g.params["convention"]
    assert doc["scores"]["convention"] == g.params["convention"]
    assert doc["scores"]["replacement"] == pytest.approx(g.scores["replacement"])
    other = world.graphs[1][0]
    theirs = set(zip(other.layer[other.kind == FEATURE].tolist(),
                     other.feature[other.kind == FEATURE].tolist(), strict=True))  # fmt: skip
    mine = [
        (int(g.layer[i]), int(g.feature[i]))
        for i in np.flatnonzero(g.kind == FEATURE)
        if (int(g.layer[i]), int(g.feature[i])) not in theirs
    ]
    _, by_feature = call(f"{world.url}/api/graphs?feature={mine[0][0]}/{mine[0][1]}")
    assert [x["id"] for x in by_feature["graphs"]] == [gid]


def auto_supernodes(g, k: int = 4) -> list[dict]:
    """Two supernodes of g's first feature nodes (as tracer.analyses.supernodes stores them) and one
    whose members are not nodes of g."""
    feats = [int(i) for i in np.flatnonzero(g.kind == FEATURE)][:k]

    def group(sid, nodes, validation=None):
        members = [[int(g.layer[i]), int(g.position[i]), int(g.feature[i])] for i in nodes]
        return {"id": sid, "name": f"group {sid}", "nodes": nodes, "members": members,
                "influence": 1.0 / (1 + int(sid[1:])), "cohesion": 0.5,
                "validation": validation}  # fmt: skip

    absent = {"id": "s2", "name": "elsewhere", "nodes": [0, 1], "members": [[0, 99, 7], [1, 99, 8]]}
    return [group("s0", feats[:2], {"agreement": 0.75, "effect_rank": 1.0}),
            group("s1", feats[2:k]), absent]  # fmt: skip


def test_graph_json_offers_stored_supernodes(world, tmp_path):
    k = max(range(2), key=lambda j: world.graphs[j][0].count("feature"))  # the bigger circuit
    (g, full), gid = world.graphs[k], world.ids[k]
    sns = auto_supernodes(g)
    assert len(sns[1]["nodes"]) == 2
    world.store.add_supernodes(gid, sns[:2])
    try:
        _, doc = call(f"{world.url}/api/graphs/{gid}")
        _, doc_full = call(f"{world.url}/api/graphs/{gid}?full=1")
    finally:
        world.store.add_supernodes(gid, [])
    want = [
        {"id": "s0", "name": "group s0", "members": [np_node_id(g, i) for i in sns[0]["nodes"]],
         "agreement": 0.75, "effect_rank": 1.0},
        {"id": "s1", "name": "group s1", "members": [np_node_id(g, i) for i in sns[1]["nodes"]],
         "agreement": None, "effect_rank": None},
    ]  # fmt: skip
    assert doc["supernodes"] == want
    # In the full graph the same features are other node indices: matched by identity.
    for s in doc_full["supernodes"]:
        for m in s["members"]:
            i = doc_full["nodes"]["id"].index(m)
            assert m == np_node_id(full, i)
    assert [s["members"] for s in doc_full["supernodes"]] == [s["members"] for s in want]
    # A folder graph offers the supernodes its file holds; members not in the graph drop out.
    g.extra["supernodes"] = sns
    try:
        g.save(tmp_path / "a.parquet")
        src = GraphSource(folder=tmp_path)
        loaded, _ = src.load(graph_id(g))
        got = supernode_suggestions(loaded, src.supernodes(graph_id(g), loaded))
    finally:
        del g.extra["supernodes"]
    assert got == want  # s2 has no member in this graph


def test_edge_cumulative_is_the_running_share_of_weight():
    w = np.array([0.5, -2.0, 1.0, 0.0, -0.5])
    # sorted by |w|: -2.0, 1.0, 0.5, -0.5, 0.0 of total 4.0
    np.testing.assert_allclose(edge_cumulative(w), [2.0 / 4 + 1 / 4 + 0.5 / 4, 0.5, 0.75, 1.0,
                                                   (2 + 1 + 0.5 + 0.5) / 4])  # fmt: skip


def test_cypher_console_highlights_nodes_of_one_graph(world):
    g, gid = world.graphs[0][0], world.ids[0]
    status, res = call(
        f"{world.url}/api/cypher", {"query": f"MATCH (n:Node {{graph: '{gid}'}}) RETURN n"}
    )
    assert status == 200 and len(res["rows"]) == g.n_nodes
    assert res["highlight"] == {
        "graph": gid, "nodes": sorted(np_node_id(g, i) for i in range(g.n_nodes))
    }  # fmt: skip
    status, res = call(f"{world.url}/api/cypher", {"query": "MATCH (n:Node) RETURN n LIMIT 500"})
    assert res["highlight"] is None  # nodes of two graphs
    status, res = call(f"{world.url}/api/cypher", {"query": "MATCH (n:Foo) DELETE n"})
    assert status == 403 and "read-only" in res["error"]
    with pytest.raises(ReadOnlyViolation):
        world.store.cypher("CREATE (x:Foo)")


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(world):
    gid = world.ids[0]
    u = world.url
    cases = [
        (call(f"{u}/api/graphs/gnope"), 404, "no graph with id 'gnope'"),
        (call(f"{u}/api/graphs/{gid}/subgraphs", b"{not json"), 400, "not JSON"),
        (call(f"{u}/api/graphs/{gid}/subgraphs", {"name": "x", "pinnedIds": ["1_2_3"]}),
         400, "not a node of this graph"),
        (call(f"{u}/api/interventions", {"graph": gid, "edits": [{"nodes": ["9_9_99"]}]}),
         400, "is not a node of graph"),
        (call(f"{u}/api/interventions", {"graph": "gnope", "edits": []}), 404, "no graph"),
        (call(f"{u}/api/jobs/j999"), 404, "no intervention job"),
        (call(f"{u}/api/features/1/2"), 400, "transcoder"),
        (call(f"{u}/api/nothing"), 404, "Not Found"),
        (call(f"{u}/api/graphs?feature=abc"), 400, "is not 'layer/index'"),
    ]  # fmt: skip
    for (status, body), want_status, text in cases:
        assert status == want_status, body
        assert text in body["error"] and "\n" not in body["error"]
    assert call(f"{u}/api/info")[0] == 200


def test_feature_edits_from_graph_nodes(world):
    g = world.graphs[0][0]
    f = int(np.flatnonzero(g.kind == FEATURE)[0])
    e = int(np.flatnonzero(g.kind == ERROR)[0])
    (edit,) = feature_edits(g, [{"nodes": [np_node_id(g, f)], "op": "scale", "value": 2}])
    assert (edit.layer, edit.feature, edit.position, edit.op, edit.value) == (
        int(g.layer[f]), int(g.feature[f]), int(g.position[f]), "scale", 2.0)  # fmt: skip
    for edits, message in [
        ([{"nodes": [np_node_id(g, e)]}], "is not a feature node"),
        ([{"nodes": [np_node_id(g, f)], "op": "explode"}], "not one of"),
        ([{"nodes": [np_node_id(g, f)], "op": "clamp", "value": "x"}], "must be a number"),
        ([], "give 'edits'"),
    ]:
        with pytest.raises(InterventionRequestError, match=message):
            feature_edits(g, edits)


# --- serving off loopback, the folder, the command line ---------------------------------------


def test_token_by_default_and_required(world, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    # a token by default on loopback too (no warning there); --no-token on loopback only
    local = access_token("127.0.0.1", None)
    assert local and len(local) >= 32 and capsys.readouterr().err == ""
    assert access_token("127.0.0.1", None) != local  # fresh each start
    assert access_token("127.0.0.1", None, no_token=True) is None
    with pytest.raises(ValueError, match="loopback only"):
        access_token("0.0.0.0", None, no_token=True)
    token = access_token("0.0.0.0", None)
    assert token and "WARNING" in capsys.readouterr().err
    app = create_app(GraphSource(world.store), config=ExplorerConfig(token=token))
    server = ServerThread(app).start()
    try:
        status, body = call(f"{server.url}/api/info")
        assert status == 401 and "access token" in body["error"]
        assert call(f"{server.url}/api/info?token={token}")[0] == 200
        assert call(f"{server.url}/api/info", headers={"X-Explorer-Token": token})[0] == 200
        assert call(f"{server.url}/api/info", headers={"Authorization": f"token {token}"})[0] == 200
        assert call(f"{server.url}/api/info?token=wrong")[0] == 401
        assert call(f"{server.url}/api/info", headers={"X-Explorer-Token": token[:-1]})[0] == 401
    finally:
        server.stop()


def test_folder_source(world, tmp_path):
    (pruned, full), (other, _) = world.graphs
    pruned.save(tmp_path / "a.parquet")
    full.save(tmp_path / "a.full.parquet")
    other.save(tmp_path / "b.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    src = GraphSource(folder=tmp_path)
    listed = src.list()
    assert {x["id"] for x in listed} == {graph_id(pruned), graph_id(other)}
    assert all(x["source"] == "folder" for x in listed)
    assert {x["scores"]["convention"] for x in listed} == {pruned.params["convention"]}
    assert [x["id"] for x in src.list(q="FRANCE")] == [graph_id(other)]
    g, where = src.load(graph_id(pruned), full=True)
    assert where == "folder" and g.n_edges == full.n_edges
    with pytest.raises(GraphNotFoundError, match="has no full graph file"):
        src.load(graph_id(other), full=True)
    doc = graph_payload(pruned, "x", "folder")
    assert len(doc["nodes"]["cum"]) == pruned.n_nodes
    assert not src.has_store(graph_id(pruned))


def test_missing_page_build_names_the_setup_command(world, tmp_path):
    with pytest.raises(ExplorerSetupError, match="bash scripts/setup"):
        create_app(GraphSource(world.store), config=ExplorerConfig(dist=tmp_path))


def test_serve_command_line_errors(tmp_path, capsys):
    from tracer.cli import main

    for argv, text in [
        (["serve", "--graphs", str(tmp_path / "none")], "is not a folder"),
        (["serve", "--graphs", str(tmp_path), "--model", "smollm2"], "--model needs"),
        (["serve", "--graphs", str(tmp_path), "--port", "70000"], "not a port number"),
        (["serve", "--graphs", str(tmp_path), "--transcoders", str(tmp_path / "x")],
         "does not exist"),
    ]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1


def test_demo_prints_the_explorer_command(tmp_path):
    import argparse
    import shlex

    from tracer.cli import build_parser
    from tracer.cli.demo_cmd import explore_command

    demo = argparse.Namespace(no_store=False, store_uri=None, model="smollm2")
    cmd = explore_command(demo, tmp_path / "clt", tmp_path / "demo")
    assert cmd == f"circuit-atlas serve --store --transcoders {tmp_path / 'clt'}"
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.store, args.transcoders, args.model) == ("", str(tmp_path / "clt"), None)
    demo = argparse.Namespace(no_store=True, store_uri=None, model="/m")
    args = build_parser().parse_args(shlex.split(explore_command(demo, tmp_path, tmp_path))[1:])
    assert (args.store, args.graphs, args.model) == (None, str(tmp_path / "graphs"), "/m")
