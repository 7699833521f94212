"""The README's Python walkthrough runs as written (against a real SmolLM2, a transcoder at the
path the demo uses, the embedded graph store)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from model_fixtures import make_random_clt

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    part = text.split("## Python walkthrough", 1)[1]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path, monkeypatch, smollm2_full):
    from graphstore import LocalServer
    from tracer.cli.train_cmd import unembed_for_contexts
    from tracer.fetch import cache_root, default_transcoder_path
    from tracer.spliced_metrics import activation_fn
    from transcoders.contexts import ContextConfig, feature_contexts, save_contexts
    from transcoders.formats import save_transcoder

    real_model = cache_root() / "models" / "smollm2-135m-instruct"
    home = tmp_path / "home"
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(home))
    (home / "models").mkdir(parents=True)
    (home / "models" / "smollm2-135m-instruct").symlink_to(real_model)
    # A CLT where the walkthrough expects the demo's, with feature contexts beside it.
    clt = make_random_clt(30, 576, 64, seed=5)
    with torch.no_grad():
        clt.threshold.fill_(0.45)  # a few active features per layer and token
    clt_path = default_transcoder_path("smollm2")
    save_transcoder(clt, clt_path, format="circuit-tracer")
    ids = smollm2_full.tokenize("The river ran past the old mill and the wheel turned.")
    table = feature_contexts(
        clt, activation_fn(smollm2_full, "mlp_in"), ids[None], smollm2_full.token_strings,
        unembed=unembed_for_contexts(smollm2_full), cfg=ContextConfig(top_k=2),
    )  # fmt: skip
    save_contexts(table, clt_path)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    try:
        exec(compile(walkthrough(), str(README), "exec"), ns)
        # What the walkthrough claims: a pruned circuit of the full graph, stored with its
        # scores (read back from the store), and a report page of that circuit.
        from graphstore import GraphStore

        graph, circuit = ns["graph"], ns["circuit"]
        assert 0 < circuit.n_nodes < graph.n_nodes and 0 < circuit.n_edges < graph.n_edges
        with GraphStore() as store:
            rows = store.cypher(
                "MATCH (g:Graph) RETURN g.prompt AS p, g.score_replacement AS r, "
                "g.validation_spearman AS s"
            ).rows
        assert len(rows) == 1 and rows[0][0] == graph.prompt
        assert rows[0][1] == pytest.approx(circuit.scores["replacement"], rel=1e-6)
        assert rows[0][2] == pytest.approx(ns["report"].spearman, rel=1e-6)
    finally:
        LocalServer(home / "store").stop()
    html = Path(ns["files"].html).read_text(encoding="utf-8")
    assert "The capital of the state containing Dallas is" in html
    assert html.count("<tr") > circuit.count("feature")  # the node table lists the circuit
