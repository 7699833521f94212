"""Validation by perturbation: the constrained check reproduces every sampled column (and
fails on a corrupted graph), free-mode numbers match independent computations, results are
saved flat, bad requests get clear errors; the validate and steer commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.validate import (
    ValidationError,
    linear_total_effect,
    save_report,
    validate,
    validation_path,
)
from tracer.attribution import attribute
from tracer.graph import FEATURE, LOGIT, Graph
from tracer.interventions import FeatureEdit, intervene
from tracer.prune import node_influence, prune
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13])
FLAT_KEYS = ("spearman", "sign_agreement", "sufficiency", "necessity",
             "constrained_max_rel_error", "n_sampled")  # fmt: skip


def build(arch="llama", n_features=32, seed=0, **attr):
    model = make_tiny_model(arch)
    rm = ReplacementModel(model, make_random_clt(3, 32, n_features, seed=seed))
    return rm, attribute(rm, TOKENS, progress=False, **attr)


def test_constrained_check_covers_every_node(tiny_model):
    rm = ReplacementModel(tiny_model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False)
    n_feat = graph.count("feature")
    rep = validate(rm, graph, max_circuit=n_feat, n_random=n_feat, n_error=100, n_token=100,
                   batch_size=128, progress=False)  # fmt: skip
    assert rep.n_sampled == n_feat > 20
    assert rep.n_constrained_columns == n_feat + graph.count("error") + graph.count("token")
    assert rep.constrained_max_rel_error <= 1e-5
    # Spearman and sign agreement recomputed from the free-mode ablations, one node at a time.
    from scipy.stats import spearmanr

    state = rm.record(TOKENS)
    base = intervene(rm, state, [], "free")
    base_m = metric_from_logits(graph, base.logits)
    A = graph.adjacency().toarray()
    index = {graph.node_id(i): i for i in range(graph.n_nodes)}
    feats = np.where(graph.kind == FEATURE)[0]
    loc = [(int(graph.layer[t]), int(graph.position[t]), int(graph.feature[t])) for t in feats]
    infl, effects, agree = [], [], []
    for row in rep.nodes:
        s = index[row["node"]]
        edit = FeatureEdit(int(graph.layer[s]), int(graph.feature[s]), int(graph.position[s]))
        res = intervene(rm, state, [edit], "free")
        infl.append(row["influence"])
        effects.append(abs(metric_from_logits(graph, res.logits) - base_m))
        for t, (tl, tp, tf) in zip(feats, loc, strict=True):
            if A[t, s] != 0:
                change = float(res.pre[tl, tp, tf] - base.pre[tl, tp, tf])
                agree.append(np.sign(-A[t, s]) == np.sign(change))
    # near-tied effects may swap ranks at float precision: a small tolerance
    assert rep.spearman == pytest.approx(spearmanr(infl, effects).statistic, abs=5e-3)
    assert rep.n_sign_edges == len(agree) > 50
    assert rep.sign_agreement == pytest.approx(np.mean(agree), abs=1e-9)


def test_smollm2_truncated(smollm2):
    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    rm = ReplacementModel(smollm2, clt)
    # atlas convention: its circuit keeps features of a random CLT (circuit-tracer's all-node
    # ranking keeps only error and token nodes here, leaving sufficiency undefined)
    graph = attribute(rm, "The capital of the state containing Dallas is", progress=False,
                      convention="atlas")  # fmt: skip
    rep = validate(rm, graph, max_circuit=12, n_random=12, batch_size=32, progress=False)
    assert rep.n_circuit_features > 0 and rep.n_random_sampled == 12
    assert rep.n_sampled == 12 + min(12, rep.n_circuit_features)
    assert rep.constrained_max_rel_error <= 1e-5
    assert rep.spearman is not None
    # The ratios follow their floor: defined exactly when |m_full - m_none| reaches it.
    d = rep.logit_metric - rep.logit_metric_no_features
    assert (rep.sufficiency is None) == (abs(d) < rep.ratio_floor)
    if rep.sufficiency is None:
        assert "below floor" in rep.ratios_undefined


def test_check_fails_on_a_wrong_edge():
    rm, graph = build()
    feats = np.where(graph.kind == FEATURE)[0]
    k = int(np.argmax(np.isin(graph.source, feats)))  # an edge out of a feature
    s = int(graph.source[k])
    node = (int(graph.layer[s]), int(graph.position[s]), int(graph.feature[s]))
    graph.weight[k] += 0.5 * np.abs(graph.weight).max()
    rep = validate(rm, graph, nodes=[node], progress=False)
    assert rep.constrained_max_rel_error == pytest.approx(0.5, rel=1e-3)


def metric_from_logits(graph, logits):
    """The logit metric from the model's logits: sum_k w_k (logit_k - mean logit)."""
    last = logits[-1].double()
    ids = graph.feature[graph.kind == LOGIT]
    w = graph.logit_weights[graph.kind == LOGIT]
    return float(((last[ids] - last.mean()).numpy() * w).sum())


def test_free_numbers_match_independent_computation():
    rm, graph = build("llama")
    rep = validate(rm, graph, max_circuit=6, n_random=6, progress=False)
    state = rm.record(TOKENS)
    base = metric_from_logits(graph, state.logits)
    assert rep.logit_metric == pytest.approx(base, abs=1e-5)
    infl = node_influence(graph)
    index = {graph.node_id(i): i for i in range(graph.n_nodes)}
    for row in rep.nodes:
        i = index[row["node"]]
        l, p, f = int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i])
        after = intervene(rm, state, [FeatureEdit(l, f, p)], "free").logits
        assert row["observed"] == pytest.approx(metric_from_logits(graph, after) - base, abs=1e-5)
        assert row["influence"] == pytest.approx(infl[i])
    from scipy.stats import spearmanr

    x = [r["influence"] for r in rep.nodes]
    y = [abs(r["observed"]) for r in rep.nodes]
    assert rep.spearman == pytest.approx(spearmanr(x, y).statistic)
    # Necessity by hand: ablate the circuit's features, and every feature.
    circuit = prune(graph, 0.8, 0.98)
    cf = np.where(circuit.kind == FEATURE)[0]
    ablate = [FeatureEdit(int(circuit.layer[i]), int(circuit.feature[i]),
                          int(circuit.position[i])) for i in cf]  # fmt: skip
    # Every feature of every layer at every position: none may fire, not even newly.
    every = [FeatureEdit(l, f, None) for l in range(3) for f in range(32)]
    m_abl = metric_from_logits(graph, intervene(rm, state, ablate, "free").logits)
    m_none = metric_from_logits(graph, intervene(rm, state, every, "free").logits)
    assert rep.logit_metric_no_features == pytest.approx(m_none, abs=1e-5)
    assert rep.necessity == pytest.approx((base - m_abl) / (base - m_none), rel=1e-3)
    assert rep.n_circuit_features == len(cf)


def test_whole_graph_circuit():
    """With thresholds of one the circuit keeps every feature that can reach a logit; features
    it drops have no path to the last position. So keeping only the circuit changes nothing
    (sufficiency 1), and ablating it equals ablating every recorded active feature (features
    that newly fire stay live)."""
    rm, graph = build("qwen2")
    rep = validate(rm, graph, node_threshold=1.0, edge_threshold=1.0, max_circuit=4, n_random=4,
                   progress=False)  # fmt: skip
    assert rep.sufficiency == pytest.approx(1.0, abs=1e-4)
    state = rm.record(TOKENS)
    active = [FeatureEdit(int(a), int(c), int(b)) for a, b, c in
              zip(state.feat_layer, state.feat_pos, state.feat_index, strict=True)]  # fmt: skip
    m_abl = metric_from_logits(graph, intervene(rm, state, active, "free").logits)
    total = rep.logit_metric - rep.logit_metric_no_features
    assert rep.necessity == pytest.approx((rep.logit_metric - m_abl) / total, rel=1e-3)


def test_linear_total_effect_on_a_hand_graph():
    """Two features in a chain a -> b -> logit, plus a -> logit directly."""
    g = Graph(
        prompt="x", tokens=[1, 2], token_strings=["a", "b"], model_name="m", transcoder_name="t",
        n_layers=2,
        kind=np.array([FEATURE, FEATURE, LOGIT], np.int8),
        layer=np.array([0, 1, 2], np.int32), position=np.array([1, 1, 1], np.int32),
        feature=np.array([0, 0, 5]), activation=np.array([2.0, 4.0, 1.0], np.float32),
        probability=np.array([0, 0, 1.0], np.float32),
        target=np.array([1, 2, 2], np.int32), source=np.array([0, 0, 1], np.int32),
        weight=np.array([3.0, 0.5, 2.0], np.float32),
        logit_weights=np.array([0, 0, 1.0], np.float32),
    )  # fmt: skip
    # Removing a: b's pre-activation drops by 3 (relative change -3/4), logit by 0.5 + 2 * 3/4.
    # Removing b: the logit drops by its edge, 2.
    np.testing.assert_allclose(linear_total_effect(g, np.array([0, 1])), [-2.0, -2.0])


def test_saved_flat_and_round_trips(tmp_path):
    rm, graph = build("gpt2")
    rep = validate(rm, graph, max_circuit=5, n_random=5, seed=3, progress=False)
    val = graph.extra["validation"]
    for key in FLAT_KEYS:
        assert key in val and (val[key] is None or isinstance(val[key], (int, float)))
    assert isinstance(val["nodes"], list) and len(val["nodes"]) == rep.n_sampled
    path = graph.save(tmp_path / "g.parquet")
    assert Graph.load(path).extra["validation"] == val
    js = save_report(rep, validation_path(path))
    assert js.name == "g.validation.json" and json.loads(js.read_text()) == val
    again = validate(rm, graph, max_circuit=5, n_random=5, seed=3, progress=False)
    assert again.nodes == rep.nodes  # seeded sample


def test_bad_inputs():
    rm, graph = build()
    with pytest.raises(ValidationError, match="not a feature node of this graph"):
        validate(rm, graph, nodes=[(0, 3, 31)] if not _has(graph, 0, 3, 31) else [(2, 0, 0)],
                 progress=False)  # fmt: skip
    with pytest.raises(ValidationError, match="pruned"):
        validate(rm, prune(graph), progress=False)
    other = ReplacementModel(rm.model, make_random_clt(3, 32, 32, seed=7))
    with pytest.raises(ValidationError, match="not an active feature of this model"):
        validate(other, graph, progress=False)
    narrow = ReplacementModel(rm.model, make_random_clt(3, 32, 8))
    with pytest.raises(ValidationError, match="8 features per layer"):
        validate(narrow, graph, progress=False)
    deeper = ReplacementModel(make_tiny_model("llama", n_layers=4), make_random_clt(4, 32, 32))
    with pytest.raises(ValidationError, match="layers"):
        validate(deeper, graph, progress=False)


def _has(graph, layer, pos, feat):
    return bool(((graph.kind == FEATURE) & (graph.layer == layer) & (graph.position == pos)
                 & (graph.feature == feat)).any())  # fmt: skip


# --- the commands end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a model folder, and a random
    CLT for it saved in the circuit-tracer layout."""
    from model_fixtures import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("cli"))


def test_validate_command(tiny_folder, tmp_path, capsys):
    from tracer.cli import main
    from tracer.model import LanguageModel
    from transcoders.formats import load_transcoder

    model = LanguageModel.load(tiny_folder / "model")
    rm = ReplacementModel(model, load_transcoder(tiny_folder / "clt", model=model))
    graph = attribute(rm, "The cat sat on the mat", progress=False)
    path = graph.save(tmp_path / "g.parquet")
    args = ["validate", str(path), "--model", str(tiny_folder / "model"),
            "--transcoders", str(tiny_folder / "clt"), "--quiet", "--n-random", "4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "constrained" in out and "sufficiency" in out
    val = Graph.load(path).extra["validation"]
    assert val["constrained_max_rel_error"] <= 1e-5
    assert json.loads(validation_path(path).read_text()) == val
    # A missing graph file: one clear line, exit status 2.
    assert main(["validate", str(tmp_path / "nope.parquet"), "--model", "x",
                 "--transcoders", "y"]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_steer_command(tiny_folder, capsys):
    from tracer.cli import main

    common = ["steer", "The cat sat on", "--model", str(tiny_folder / "model"),
              "--transcoders", str(tiny_folder / "clt"), "--max-new-tokens", "5"]  # fmt: skip
    assert main(common + ["--set", "1/3=300", "--scale", "0/2=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    base, steered = lines[0].removeprefix("baseline: "), lines[1].removeprefix("steered:  ")
    assert base.startswith("The cat sat on") and base != steered
    for bad, msg in [(["--set", "1/3"], "L/F=VALUE"), (["--set", "1/3=big"], "not a number"),
                     (["--ablate", "1/3=0"], "write L/F"), ([], "nothing to steer"),
                     (["--set", "1/99=1"], "out of range"),
                     (["--set", "1/3=1", "--at", "40"], "past the prompt")]:  # fmt: skip
        assert main(common + bad) == 2
        assert msg in capsys.readouterr().err
