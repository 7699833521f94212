"""The graph-score training metric: each prompt's scores are those of the graph the demo would
trace (same budget, targets, convention), and the reported means are their means."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.prompt_scores import PromptScoreConfig, prompt_graph_scores
from tracer.attribution import attribute
from tracer.graph import FEATURE
from tracer.prune import graph_scores
from tracer.replacement import ReplacementModel


@pytest.mark.slow
@pytest.mark.parametrize("convention", ["circuit-tracer", "atlas"])
def test_prompt_scores_are_the_demo_graphs_scores(convention):
    torch.set_num_threads(1)
    model = make_tiny_model("llama", n_layers=3)
    clt = make_random_clt(3, 32, 16, seed=2)
    prompts = ("The capital of France is", "one two three four")
    cfg = PromptScoreConfig(prompts=prompts, max_feature_nodes=20, convention=convention)
    got = prompt_graph_scores(model, clt, cfg)
    assert got["convention"] == convention and got["max_feature_nodes"] == 20
    rm = ReplacementModel(model, clt)
    for prompt, row in zip(prompts, got["prompts"], strict=True):
        graph = attribute(rm, prompt, max_feature_nodes=20, convention=convention, progress=False)
        ref = graph_scores(graph, convention)
        assert row["prompt"] == prompt
        assert row["replacement"] == pytest.approx(ref["replacement"], rel=1e-9)
        assert row["completeness"] == pytest.approx(ref["completeness"], rel=1e-9)
        assert row["n_features"] == int((graph.kind == FEATURE).sum()) <= 20
        assert 0.0 <= row["replacement"] <= 1.0 and 0.0 <= row["completeness"] <= 1.0
        # The error shares account for exactly what the replacement score leaves out.
        unexplained = sum(row["error_shares"]["by_position"])
        assert unexplained == pytest.approx(1 - row["replacement"], rel=1e-9)
    for k in ("replacement", "completeness"):
        assert got[k] == pytest.approx(sum(r[k] for r in got["prompts"]) / 2)
