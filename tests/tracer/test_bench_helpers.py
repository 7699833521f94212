"""The attribution benchmark's graph comparison and circuit-tracer model-folder shim
(scripts/bench_attribution.py, scripts/bench_ct_runner.py), on small hand-built graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_scripts import load_script

bench = load_script("bench_attribution")
runner = load_script("bench_ct_runner")

F, E, T, LG = 0, 1, 2, 3


def graph(nodes, edges):
    """nodes: list of (kind, layer, pos, feature); edges: {(target_i, source_i): weight}."""
    a = np.array(nodes)
    t, s = zip(*edges, strict=True) if edges else ((), ())
    return {
        "kind": a[:, 0].astype(np.int8),
        "layer": a[:, 1].astype(np.int32),
        "position": a[:, 2].astype(np.int32),
        "feature": a[:, 3].astype(np.int64),
        "target": np.array(t, dtype=np.int32),
        "source": np.array(s, dtype=np.int32),
        "weight": np.array(list(edges.values()), dtype=np.float32),
    }


# A 1-layer, 2-position graph: feature f_0_1_7, errors e_0_0 (start position) and e_0_1,
# tokens t_0 and t_1, one logit for token 42 (its layer/position differ between engines).
NODES = [(F, 0, 1, 7), (E, 0, 0, -1), (E, 0, 1, -1), (T, -1, 0, 5), (T, -1, 1, 9), (LG, 1, 1, 42)]
EDGES = {(0, 3): 0.5, (0, 4): -2.0, (5, 0): 4.0, (5, 2): 1.0, (5, 1): 0.25, (0, 1): -0.75}


def test_identical_graphs_in_another_node_order_compare_exactly():
    perm = [5, 3, 0, 2, 4, 1]  # new index -> old index
    where = {old: new for new, old in enumerate(perm)}
    other = graph(
        [NODES[i] for i in perm], {(where[t], where[s]): w for (t, s), w in EDGES.items()}
    )
    other["layer"][0] = 7  # a logit is matched by its token alone
    r = bench.compare(graph(NODES, EDGES), other)
    assert r["common_nodes"] == 6
    assert r["nodes_only_ours"] == {} and r["nodes_only_circuit_tracer"] == {}
    assert r["max_abs_edge_diff"] == 0.0
    assert r["largest_abs_edge"] == 4.0
    assert r["edges_compared_ours"] == r["edges_compared_circuit_tracer"] == 4
    assert r["identical_within_1e-4"]


def test_difference_is_measured_relative_to_largest_edge():
    changed = dict(EDGES)
    changed[(0, 4)] = -2.0 + 1e-3  # 2.5e-4 of the largest |edge| (4.0)
    r = bench.compare(graph(NODES, EDGES), graph(NODES, changed))
    assert r["max_abs_edge_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert r["max_abs_edge_diff_relative"] == pytest.approx(2.5e-4, rel=1e-3)
    assert not r["identical_within_1e-4"]


def test_start_position_error_columns_are_reported_apart():
    ct = {k: v for k, v in EDGES.items() if k[1] != 1}  # circuit-tracer zeroes e_0_0
    r = bench.compare(graph(NODES, EDGES), graph(NODES, ct))
    assert r["max_abs_edge_diff"] == 0.0
    assert r["bos_error_columns_max_abs_ours"] == 0.75
    assert r["bos_error_columns_max_abs_circuit_tracer"] == 0.0
    assert r["identical_within_1e-4"]


def test_node_set_differences_are_listed_and_fail_the_check():
    nodes = [*NODES[:5], (F, 0, 1, 8), NODES[5]]  # circuit-tracer has one more feature
    edges = {(t + (t == 5), s + (s == 5)): w for (t, s), w in EDGES.items()}
    edges[(6, 5)] = 3.0
    r = bench.compare(graph(NODES, EDGES), graph(nodes, edges))
    assert r["nodes_only_circuit_tracer"] == {"feature": 1}
    assert r["examples_only_circuit_tracer"] == [[F, 0, 1, 8]]
    assert r["max_abs_edge_diff"] == 0.0  # the common nodes agree
    assert not r["identical_within_1e-4"]


def test_model_folder_for_transformers_4(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0}})
    )
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend", "bos_token": "<s>"})
    )
    (src / "model.safetensors").write_bytes(b"weights")
    dst = runner.model_folder_for_old_transformers(src, tmp_path / "dst" / "M")
    assert json.loads((dst / "config.json").read_text())["rope_theta"] == 100000.0
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    assert (dst / "model.safetensors").is_symlink()
    assert (dst / "model.safetensors").read_bytes() == b"weights"
    # the source folder is untouched
    assert "rope_theta" not in json.loads((src / "config.json").read_text())
