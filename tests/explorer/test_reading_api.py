"""The reading routes (tracer.explorer.reading_routes) over a folder of graphs: paths as
tracer.analyses.paths finds them, the subgraph diagram as tracer.subgraph.diagram draws it, labels
refused without a store; bad input answered in one line with a 4xx."""

from __future__ import annotations

import pytest
from explorer_client import call

from graphstore import graph_id
from graphstore.synthetic import SyntheticConfig, synthetic_graph
from tracer.analyses.paths import paths
from tracer.reports.neuronpedia import np_node_id
from tracer.subgraph import Subgraph, Supernode, diagram, subgraph_scores

SMALL = SyntheticConfig(n_layers=4, vocab_per_layer=30, prompt_tokens=(5, 5), features=(30, 30),
                        errors=(4, 4), logits=(3, 3), in_degree=(3, 6))  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tracer.explorer import GraphSource, ServerThread, create_app

    folder = tmp_path_factory.mktemp("reading")
    g = synthetic_graph(7, SMALL)
    g.save(folder / "g.parquet")
    server = ServerThread(create_app(GraphSource(folder=folder))).start()
    try:
        yield g, graph_id(g), server.url
    finally:
        server.stop()


def test_paths_route(served):
    g, gid, url = served
    status, doc = call(f"{url}/api/graphs/{gid}/paths?k=4")
    assert status == 200 and doc["direction"] == "to"
    want = paths(g, None, 4)
    assert [p["text"] for p in doc["paths"]] == [p.text(g) for p in want]
    assert [p["score"] for p in doc["paths"]] == pytest.approx([p.score for p in want])
    feature = next(i for i in range(g.n_nodes) if g.kind[i] == 0)
    status, up = call(f"{url}/api/graphs/{gid}/paths?node={np_node_id(g, feature)}&k=3")
    assert status == 200 and up["direction"] == "from"
    assert [p["nodes"] for p in up["paths"]] == [
        p.to_dict(g)["nodes"] for p in paths(g, feature, 3)
    ]
    for query, words in (("k=0", "ask for 1 to"), ("k=x", "whole number"),
                         ("node=nowhere", "names no logit")):  # fmt: skip
        status, err = call(f"{url}/api/graphs/{gid}/paths?{query}")
        assert status == 400 and words in err["error"] and "\n" not in err["error"]


def test_diagram_route(served):
    g, gid, url = served
    feats = [np_node_id(g, i) for i in range(g.n_nodes) if g.kind[i] == 0][:4]
    body = {"pinnedIds": feats, "supernodes": [["pair", feats[0], feats[1]]]}
    status, doc = call(f"{url}/api/graphs/{gid}/diagram", body)
    assert status == 200
    sub = Subgraph("diagram", feats, [Supernode("pair", feats[:2])])
    assert doc == {**diagram(g, sub), "scores": subgraph_scores(g, sub)}
    assert doc["scores"]["features"] == 4
    status, err = call(f"{url}/api/graphs/{gid}/diagram", {"pinnedIds": ["9_9_9"]})
    assert status == 400 and "is not a node of this graph" in err["error"]


def test_labels_need_a_store(served):
    g, gid, url = served
    status, doc = call(f"{url}/api/graphs/{gid}/labels")
    assert status == 200 and doc == {"labels": {}, "can_edit": False}
    body = {"transcoder": g.transcoder_name, "layer": 1, "index": 2, "label": "x"}
    status, err = call(f"{url}/api/labels", body)
    assert status == 400 and "kept in the graph store" in err["error"]
    status, err = call(f"{url}/api/labels", {"transcoder": "t", "layer": "a", "index": 2})
    assert status == 400 and "integer 'layer' and 'index'" in err["error"]
