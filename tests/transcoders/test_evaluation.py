"""Held-out evaluation against numpy by hand: NMSE over all, non-start and inlier positions,
L0 and dead features, for TopK and JumpReLU transcoders, in chunks of any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transcoders.evaluation import (
    EVAL_OUTLIER_FACTOR,
    Heldout,
    NMSESums,
    evaluate_heldout,
    evaluate_transcoder,
)
from transcoders.metrics import nmse_per_layer
from transcoders.training.trainable import TrainableTranscoder

L, S, P, D, F = 3, 4, 9, 8, 12


def _held(seed=0) -> Heldout:
    """Random activations of S rows x P positions; the start token (p = 0) 30x larger, and two
    planted outliers (100x) at (layer 1, row 2, p 4) and (layer 2, row 0, p 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, S * P, D, generator=g)
    y = torch.randn(L, S * P, D, generator=g) + 0.5
    positions = torch.arange(S * P) % P
    y[:, positions == 0] *= 30
    y[1, 2 * P + 4] *= 100
    y[2, 0 * P + 1] *= 100
    return Heldout(x, y, positions)


def _nmse_np(pred, y, keep):
    """sum of squared error / sum of squared deviation from the mean, over kept rows."""
    p, t = pred[keep].astype(np.float64), y[keep].astype(np.float64)
    return ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()


def _by_hand(clt, held, activation):
    """Reconstruction, activity and every metric with numpy loops (no evaluation code)."""
    x, y, pos = held.x.numpy(), held.y.numpy(), held.positions.numpy()
    W, b = clt.W_enc.numpy(), clt.b_enc.numpy()
    acts = np.zeros((L, S * P, F))
    for l in range(L):
        pre = x[l] @ W[l].T + b[l]
        if activation == "topk":
            for n in range(S * P):
                top = np.argsort(-pre[n])[:4]
                acts[l, n, top] = np.maximum(pre[n, top], 0)
        else:
            th = clt.threshold.numpy()[l]
            acts[l] = np.where(pre > th, pre, 0)
    rec = clt.decode(torch.tensor(acts, dtype=torch.float32), held.x).numpy()
    out = {"nmse_all": [], "nmse": [], "nmse_inliers": [], "outlier_frac": [], "l0": []}
    fired = np.zeros((L, F), bool)
    for l in range(L):
        later = pos > 0
        norms = np.linalg.norm(y[l], axis=1)
        srt = np.sort(norms[later])
        med = srt[(len(srt) - 1) // 2]  # torch's median: the lower middle value
        outlier = norms > EVAL_OUTLIER_FACTOR * med
        out["nmse_all"].append(_nmse_np(rec[l], y[l], np.ones(S * P, bool)))
        out["nmse"].append(_nmse_np(rec[l], y[l], later))
        out["nmse_inliers"].append(_nmse_np(rec[l], y[l], later & ~outlier))
        out["outlier_frac"].append((later & outlier).sum() / later.sum())
        out["l0"].append((acts[l][later] > 0).sum(1).mean())
        fired[l] = (acts[l][later] > 0).any(0)
    return out, fired


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
@pytest.mark.parametrize("chunk", [5, 512])
def test_heldout_metrics_match_numpy(activation, chunk):
    from model_fixtures import make_random_clt

    clt = make_random_clt(L, D, n_features=F, seed=4, activation=activation, skip=True)
    held = _held()
    m = TrainableTranscoder.from_clt(clt)
    one = torch.ones(L)
    ev = evaluate_heldout(m, held, one, one, activation, topk=4, chunk=chunk)
    ref, fired = _by_hand(clt, held, activation)
    for k, v in ref.items():
        np.testing.assert_allclose(ev[k].numpy(), np.array(v), rtol=2e-5, atol=1e-7, err_msg=k)
    assert np.array_equal(ev["fired"].numpy(), fired)
    # The three position sets really differ here: the start token and the planted outliers.
    assert ref["outlier_frac"][0] == 0 and ref["outlier_frac"][1] == pytest.approx(1 / 32)
    assert abs(ref["nmse_all"][0] - ref["nmse"][0]) > 1e-3
    assert abs(ref["nmse"][1] - ref["nmse_inliers"][1]) > 1e-3


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
@pytest.mark.parametrize("chunk", [5, None])
def test_exported_transcoder_metrics_match_numpy(activation, chunk):
    """The evaluator of exported transcoders (the sparsify comparison's) gives the numbers by
    hand too: one implementation of NMSE, L0 and dead features for both kinds."""
    from model_fixtures import make_random_clt

    clt = make_random_clt(L, D, n_features=F, seed=4, activation=activation, skip=True)
    held = _held()
    ev = evaluate_transcoder(clt, held, chunk=chunk)
    ref, fired = _by_hand(clt, held, activation)
    for k, v in ref.items():
        np.testing.assert_allclose(ev[k].numpy(), np.array(v), rtol=2e-5, atol=1e-7, err_msg=k)
    assert np.array_equal(ev["fired"].numpy(), fired)


def test_scales_leave_nmse_unchanged():
    """A transcoder trained on scaled activations, evaluated with those scales: the same NMSE as
    its folded copy on raw activations (NMSE is scale-free; L0 is unchanged)."""
    from model_fixtures import make_random_clt

    from transcoders.normalize import Normalizer, fold

    clt = make_random_clt(L, D, n_features=F, seed=5, activation="topk", skip=True)
    held = _held(1)
    s_in, s_out = torch.tensor([0.5, 2.0, 3.0]), torch.tensor([0.1, 4.0, 0.7])
    scaled = evaluate_heldout(TrainableTranscoder.from_clt(clt), held, s_in, s_out, "topk", 4)
    raw = fold(clt, Normalizer(s_in, s_out))
    one = torch.ones(L)
    plain = evaluate_heldout(TrainableTranscoder.from_clt(raw), held, one, one, "topk", 4)
    for k in ("nmse_all", "nmse", "nmse_inliers", "l0", "outlier_frac"):
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-4, atol=1e-6)


def test_streaming_sums_and_masked_nmse_match_two_pass():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(2, 50, 4, generator=g) * 10 + 100  # a large mean: the streaming form holds
    pred = y + torch.randn(2, 50, 4, generator=g)
    mask = torch.rand(2, 50, generator=g) > 0.3
    acc = NMSESums(2, 4)
    for s in range(0, 50, 7):
        acc.add(pred[:, s : s + 7], y[:, s : s + 7], mask[:, s : s + 7])
    ref = [_nmse_np(pred[l].numpy(), y[l].numpy(), mask[l].numpy()) for l in range(2)]
    np.testing.assert_allclose(acc.nmse().numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(nmse_per_layer(pred, y, mask).numpy(), ref, rtol=1e-4)
    both = [_nmse_np(pred[l].numpy(), y[l].numpy(), np.ones(50, bool)) for l in range(2)]
    np.testing.assert_allclose(nmse_per_layer(pred, y).numpy(), both, rtol=1e-4)
    assert torch.isnan(NMSESums(1, 4).nmse()).all()  # no positions: undefined, not 0


def test_heldout_harvest_keeps_every_position():
    """Heldout.harvest keeps the start token (row n is sequence n // P, position n % P)."""
    P_, calls = 5, []

    def acts(tok):
        calls.append(tok.shape)
        v = tok.float()[None, :, :, None].expand(2, -1, -1, 3).reshape(2, -1, 3)
        return v, 2 * v

    tokens = torch.arange(3 * P_).view(3, P_)
    held = Heldout.harvest(acts, tokens, batch=2)
    assert held.y.shape == (2, 15, 3) and held.positions.tolist() == [0, 1, 2, 3, 4] * 3
    assert held.x[0, :, 0].tolist() == tokens.reshape(-1).float().tolist()
    assert calls == [(2, P_), (1, P_)]
