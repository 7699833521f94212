"""Neuronpedia / circuit-tracer graph JSON: every documented field, node ids, links."""

from __future__ import annotations

import json

import numpy as np
import pytest
from report_fixtures import LOGITS, PROMPT_TOKENS, make_feature_dict, make_graph

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN
from tracer.reports.feature_book import load_features
from tracer.reports.neuronpedia import (
    LINK_FIELDS,
    METADATA_REQUIRED,
    NODE_FIELDS,
    NODE_REQUIRED,
    QPARAMS_FIELDS,
    NeuronpediaFormatError,
    cantor_pair,
    check_document,
    cumulative_influence,
    np_node_id,
    slugify,
    to_neuronpedia,
    write_neuronpedia,
)


def test_cantor_pairing_matches_known_values():
    # Values from the viewer's own example graphs: (0, 35) -> 665, (3, 373) -> 71249.
    assert cantor_pair(0, 35) == 665
    assert cantor_pair(3, 373) == 71249
    assert cantor_pair(0, 18753) == 175865634
    assert len({cantor_pair(x, y) for x in range(40) for y in range(40)}) == 1600


def test_every_node_field_by_kind():
    g = make_graph()
    book = load_features(make_feature_dict(g))
    doc = to_neuronpedia(g, slug="dallas", scan="smollm2-135m", features=book)
    assert list(doc) == ["metadata", "qParams", "nodes", "links"]
    assert len(doc["nodes"]) == g.n_nodes
    infl = np.asarray(g.extra["influence"])
    for i, node in enumerate(doc["nodes"]):
        assert set(node) == set(NODE_FIELDS), node
        k, layer, pos, f = (int(g.kind[i]), int(g.layer[i]), int(g.position[i]),
                            int(g.feature[i]))  # fmt: skip
        assert node["ctx_idx"] == pos
        assert node["run_idx"] == 0 and node["reverse_ctx_idx"] == 0
        if k == FEATURE:
            assert node["node_id"] == f"{layer}_{f}_{pos}"
            assert node["feature"] == (layer + f) * (layer + f + 1) // 2 + f
            assert node["layer"] == str(layer)
            assert node["feature_type"] == "cross layer transcoder"
            assert node["jsNodeId"] == f"{layer}_{f}-0"
            assert node["activation"] == pytest.approx(float(g.activation[i]))
            info = book.get(layer, f)
            assert node["clerp"] == (info.short_label() if info else "")
        elif k == ERROR:
            assert node["node_id"] == f"{layer}_-1_{pos}"
            assert node["feature"] == -1 and node["layer"] == str(layer)
            assert node["feature_type"] == "mlp reconstruction error"
            assert node["jsNodeId"] == f"{layer}_-1-{pos}"
            assert node["activation"] is None and node["clerp"] == ""
        elif k == TOKEN:
            assert node["node_id"] == f"E_{f}_{pos}"
            assert node["feature"] == pos and node["layer"] == "E"
            assert node["feature_type"] == "embedding"
            assert node["jsNodeId"] == f"E_{f}-{pos}"
        else:
            text, _, p = next(x for x in LOGITS if x[1] == f)
            assert node["node_id"] == f"{g.n_layers + 1}_{f}_{pos}"
            assert node["feature"] == f and node["layer"] == str(g.n_layers + 1)
            assert node["feature_type"] == "logit"
            assert node["jsNodeId"] == f"L_{f}-{pos}"
            assert node["token_prob"] == pytest.approx(p)
            assert node["is_target_logit"] == (text == " Austin")
            assert node["clerp"] == f'Output "{text}" (p={p:.3f})'
            assert node["influence"] is None
        if k != LOGIT:
            assert node["token_prob"] == 0.0 and node["is_target_logit"] is False
            assert 0 < node["influence"] <= 1 + 1e-12
    # influence = running share of total in decreasing order, computed independently here
    inner = [i for i in range(g.n_nodes) if g.kind[i] != LOGIT]
    order = sorted(inner, key=lambda i: -infl[i])
    running, total = 0.0, sum(infl[i] for i in inner)
    for i in order:
        running += infl[i]
        assert doc["nodes"][i]["influence"] == pytest.approx(running / total)


def test_links_match_the_graph_edges_one_to_one():
    g = make_graph()
    doc = to_neuronpedia(g)
    assert len(doc["links"]) == g.n_edges
    ids = {n["node_id"]: j for j, n in enumerate(doc["nodes"])}
    for link, t, s, w in zip(doc["links"], g.target, g.source, g.weight, strict=True):
        assert set(link) == set(LINK_FIELDS)
        assert ids[link["source"]] == s and ids[link["target"]] == t
        assert link["weight"] == pytest.approx(float(w))


def test_metadata_and_qparams_fields():
    g = make_graph()
    doc = to_neuronpedia(g, slug="dallas", scan="smollm2-135m", node_threshold=0.8)
    meta = doc["metadata"]
    for key in METADATA_REQUIRED:
        assert key in meta
    assert meta["slug"] == "dallas" and meta["scan"] == "smollm2-135m"
    assert meta["prompt"] == g.prompt and meta["prompt_tokens"] == PROMPT_TOKENS
    assert meta["node_threshold"] == 0.8 and meta["schema_version"] == 1
    assert meta["transcoder_list"] == ["clt-test@00000000c1700001"]
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert meta["generation_settings"] == {"max_n_logits": 3}
    assert meta["info"]["generator"]["name"] == "circuit-atlas"
    assert isinstance(meta["info"]["create_time_ms"], int)
    assert doc["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both",
                              "clickedId": "", "sg_pos": ""}  # fmt: skip
    assert set(doc["qParams"]) == set(QPARAMS_FIELDS)
    # defaults: scan = model name, slug from the prompt, threshold shows every node
    doc = to_neuronpedia(g)
    assert doc["metadata"]["scan"] == g.model_name
    assert doc["metadata"]["slug"] == "the-capital-of-the-state-containing-dallas-is"
    assert doc["metadata"]["node_threshold"] == 1.0


def test_written_json_round_trips_and_is_strict_json(tmp_path):
    g = make_graph()
    path = write_neuronpedia(g, tmp_path / "g.json", slug="x")
    text = path.read_text(encoding="utf-8")
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    check_document(doc)
    assert [n["node_id"] for n in doc["nodes"]] == [
        n["node_id"] for n in to_neuronpedia(g, slug="x")["nodes"]
    ]


def test_check_document_names_each_problem():
    doc = to_neuronpedia(make_graph())
    check_document(doc)
    bad = json.loads(json.dumps(doc))
    del bad["metadata"]["prompt"]
    bad["nodes"][0]["layer"] = 3.5
    bad["nodes"][1]["node_id"] = bad["nodes"][0]["node_id"]
    del bad["nodes"][2]["clerp"]
    bad["links"][0]["target"] = "nowhere"
    bad["links"][1]["weight"] = "1.0"
    with pytest.raises(NeuronpediaFormatError) as err:
        check_document(bad)
    msg = str(err.value)
    expected = [
        "metadata: missing required 'prompt'",
        "nodes[0].layer: float",
        "duplicate node_id",
        "nodes[2]: missing required 'clerp'",
        "links[0]: target 'nowhere' is not a node_id",
        "links[1].weight: str",
    ]
    for part in expected:
        assert part in msg, part
    assert set(NODE_REQUIRED) <= set(NODE_FIELDS)
    with pytest.raises(NeuronpediaFormatError, match="missing top-level 'links'"):
        check_document({"metadata": {}, "qParams": {}, "nodes": []})


def test_cumulative_influence_computed_when_not_recorded():
    from tracer.prune import node_influence

    g = make_graph(influence=False)
    cum = cumulative_influence(g)
    infl = node_influence(g)
    inner = np.flatnonzero(g.kind != LOGIT)
    top = inner[np.argmax(infl[inner])]
    assert cum[top] == pytest.approx(infl[inner].max() / infl[inner].sum())
    assert np.nanmax(cum) == pytest.approx(1.0)
    assert np.isnan(cum[g.kind == LOGIT]).all()


def test_slugify():
    assert slugify("The opposite of hot is") == "the-opposite-of-hot-is"
    assert slugify("def f(x):\n    return") == "def-f-x-return"
    assert slugify("日本") == "graph"


def test_edited_feature_labels_are_the_clerps():
    """A feature with an edited label exports it as its clerp (every node of that feature, at
    every position); the others keep their automatic label; logits and tokens are untouched."""
    g = make_graph()
    book = load_features(make_feature_dict(g))
    feats = np.flatnonzero(g.kind == FEATURE)
    pairs = sorted({(int(g.layer[i]), int(g.feature[i])) for i in feats})
    edited = {pairs[0]: "capital cities", pairs[-1]: "says Austin"}
    plain = to_neuronpedia(g, slug="x", features=book)
    doc = to_neuronpedia(g, slug="x", features=book, feature_labels=edited)
    changed = 0
    for i, (a, b) in enumerate(zip(plain["nodes"], doc["nodes"], strict=True)):
        key = (int(g.layer[i]), int(g.feature[i]))
        if int(g.kind[i]) == FEATURE and key in edited:
            assert b["clerp"] == edited[key]
            changed += 1
        else:
            assert b == a
    assert changed >= 2
    assert plain["links"] == doc["links"] and plain["qParams"] == doc["qParams"]
    check_document(doc)
    # without a feature book the edited labels still apply
    bare = to_neuronpedia(g, slug="x", feature_labels=edited)
    clerps = {n["node_id"]: n["clerp"] for n in bare["nodes"]}
    for i in feats:
        key = (int(g.layer[i]), int(g.feature[i]))
        assert clerps[np_node_id(g, int(i))] == edited.get(key, "")
