"""Firing frequency: counts against a direct count, the report's numbers against hand-computed
ones, and a trained run writing them into its metrics and weights' config."""

from __future__ import annotations

import torch

from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.evaluation import Heldout
from transcoders.frequency import (
    dense_feature_names,
    firing_counts,
    frequency_report,
    frequency_summary,
)
from transcoders.training.trainable import TrainableTranscoder


def test_firing_counts_match_a_direct_count_and_skip_the_start_token():
    torch.manual_seed(0)
    L, F, d, P, S = 2, 10, 6, 5, 4
    cfg = TranscoderConfig(n_layers=L, d_model=d, n_features=F, activation="topk", topk=3)
    m = TrainableTranscoder.from_clt(CrossLayerTranscoder(cfg))
    x = torch.randn(L, S * P, d)
    pos = torch.arange(S * P) % P
    held = Heldout(x, torch.zeros_like(x), pos)
    scale = torch.tensor([2.0, 0.5])
    counts, n = firing_counts(m, held, scale, "topk", 3, chunk=7)  # chunks split sequences
    assert n == S * (P - 1)
    want = torch.zeros(L, F, dtype=torch.long)
    for l in range(L):
        for t in range(S * P):
            if pos[t] == 0:
                continue
            pre = m.b_enc[l] + m.W_enc[l] @ (x[l, t] * scale[l])
            top = pre.topk(3)
            for v, f in zip(top.values, top.indices, strict=True):
                want[l, f] += int(v > 0)
    assert torch.equal(counts, want)


def test_report_numbers():
    # 2 layers x 4 features over 100 tokens.
    counts = torch.tensor([[0, 1, 5, 50], [20, 2, 0, 90]])
    r = frequency_report(counts, 100, top=5)
    freqs = sorted([0, 0.01, 0.05, 0.5, 0.2, 0.02, 0, 0.9])
    assert r["median"] == round((freqs[3] + freqs[4]) / 2, 6)  # 0.02 and 0.05
    assert r["median_alive"] == 0.125  # six alive: 0.01 0.02 0.05 0.2 0.5 0.9
    assert r["n_dense"] == 3 and r["share_dense"] == 3 / 8
    assert r["dense_firing_share"] == round((50 + 20 + 90) / 168, 6)
    assert r["dead"] == 2 / 8
    assert r["histogram"]["counts"] == [2, 0, 0, 1, 2, 3]
    assert sum(r["histogram"]["counts"]) == 8
    assert [(f["layer"], f["feature"]) for f in r["dense_features"]] == [(1, 3), (0, 3), (1, 0)]
    assert r["median_per_layer"] == [0.03, 0.11]
    assert dense_feature_names(r)[0] == "L1/F3 (90.0%)"
    s = frequency_summary(r, top=1)
    assert s["dense_features"] == r["dense_features"][:1] and s["n_dense"] == 3


def test_a_training_run_records_frequency_in_metrics_and_config(tmp_path):
    import json

    from tests.transcoders.test_train import _tiny
    from transcoders.training.run import TrainConfig

    cfg = TrainConfig(n_features=16, topk=4, steps=4, batch_tokens=64, eval_every=100)
    res = _tiny(tmp_path, cfg)
    fr = res.metrics["frequency"]
    on_disk = json.loads((tmp_path / "metrics.json").read_text())["frequency"]
    assert on_disk == fr
    assert sum(fr["histogram"]["counts"]) == 3 * 16
    # Mean frequency x features = mean L0 over the same held-out positions.
    assert abs(fr["mean"] * 16 - res.metrics["l0"]) < 1e-4
    assert res.clt.cfg.training["metrics"]["frequency"]["median"] == fr["median"]
