"""Outlier handling on planted outliers: thresholds against numpy, the loss ignores them, the
skip fit on data with planted outliers equals the fit on the clean data, and a training run
leaves them out of its scales and skip fit and evaluates with and without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transcoders.training import outliers
from transcoders.training.run import TrainConfig, fit_skip, objective
from transcoders.training.trainable import TrainableTranscoder

PLANTED = [3, 17, 40, 41, 77]  # positions given 100x the typical output norm


def _planted(L=3, N=120, d=6, seed=0):
    """x, y [L, N, d] with y a noisy linear map of x, and y_out: y with PLANTED positions
    replaced by random vectors of 100x the median norm (not following the map)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, d, generator=g, dtype=torch.float64)
    w = torch.randn(L, d, d, generator=g, dtype=torch.float64)
    y = torch.einsum("lnd,led->lne", x, w) + 0.3 * torch.randn(L, N, d, generator=g)
    y = y + torch.randn(L, 1, d, generator=g, dtype=torch.float64)  # an offset
    y_out = y.clone()
    med = y.norm(dim=-1).median(dim=1).values
    v = torch.randn(L, len(PLANTED), d, generator=g, dtype=torch.float64)
    y_out[:, PLANTED] = 100 * med[:, None, None] * v / v.norm(dim=-1, keepdim=True)
    return x.float(), y.float(), y_out.float()


def test_thresholds_against_numpy():
    g = torch.Generator().manual_seed(1)
    norms = torch.rand(2, 51, generator=g) * 3 + 0.5
    n = norms.numpy().astype(np.float64)
    med = np.median(n, axis=1)
    mad = np.median(np.abs(n - med[:, None]), axis=1)
    np.testing.assert_allclose(outliers.norm_thresholds(norms, "ratio", 50.0), 50 * med, rtol=1e-6)
    np.testing.assert_allclose(
        outliers.norm_thresholds(norms, "mad", 8.0), med + 8 * mad, rtol=1e-6
    )
    assert torch.isinf(outliers.norm_thresholds(norms, "none", 50.0)).all()
    with pytest.raises(ValueError, match="unknown outlier rule"):
        outliers.norm_thresholds(norms, "quantile", 3.0)


def test_planted_outliers_are_found_and_only_they():
    _, _, y_out = _planted()
    thr = outliers.norm_thresholds(outliers.output_norms(y_out), "ratio", 50.0)
    mask = outliers.outlier_mask(y_out, thr)
    for l in range(3):
        assert mask[l].nonzero().ravel().tolist() == PLANTED
    w = outliers.loss_weights(mask, 0.25)
    assert set(w[mask].tolist()) == {0.25} and set(w[~mask].tolist()) == {1.0}
    assert outliers.batch_weights(y_out, torch.full((3,), float("inf"))) is None


def test_buffer_thresholds_average_shards_like_ranks():
    """Per-shard thresholds are averaged: one process with two shards gives what two ranks
    (each one shard, then the all-reduce mean) give."""
    _, y, _ = _planted()
    a, b = y[:, :60].transpose(0, 1), y[:, 60:].transpose(0, 1)  # buffers store [N, L, d]
    both = outliers.buffer_thresholds([a, b], "ratio", 50.0)
    per = [outliers.buffer_thresholds([s], "ratio", 50.0) for s in (a, b)]
    torch.testing.assert_close(both, (per[0] + per[1]) / 2)
    srt = np.sort(a.transpose(0, 1).norm(dim=-1).numpy(), axis=1)
    med_a = srt[:, (srt.shape[1] - 1) // 2]  # the lower middle value of an even count
    np.testing.assert_allclose(per[0], 50 * med_a, rtol=1e-6)


def test_skip_fit_with_planted_outliers_equals_clean_fit():
    x, y, y_out = _planted()
    keep = torch.ones(y.shape[:2], dtype=torch.bool)
    keep[:, PLANTED] = False
    thr = outliers.norm_thresholds(outliers.output_norms(y_out), "ratio", 50.0)
    weight = (~outliers.outlier_mask(y_out, thr)).float()
    w_rob, b_rob = fit_skip(x, y_out, ridge=0.1, weight=weight)
    w_clean, b_clean = fit_skip(x[:, keep[0]], y[:, keep[0]], ridge=0.1)  # outliers never seen
    torch.testing.assert_close(w_rob, w_clean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_rob, b_clean, rtol=1e-5, atol=1e-6)
    # Without the weights the planted positions wreck the fit (what the weights are for).
    w_raw, _ = fit_skip(x, y_out, ridge=0.1)
    assert (w_raw - w_clean).norm() > 10 * (w_clean.norm() * 1e-3)
    assert (w_raw - w_clean).norm() / w_clean.norm() > 0.5


def test_skip_fit_weights_are_moments_numpy():
    """A weighted fit solves the ridge system of the weighted moments (numpy by hand)."""
    x, _, y_out = _planted(L=1, N=80, d=4, seed=5)
    g = torch.Generator().manual_seed(6)
    wt = torch.rand(1, 80, generator=g)
    w, b = fit_skip(x, y_out, ridge=0.05, weight=wt)
    X, Y, W = (t[0].double().numpy() for t in (x, y_out, wt))
    mx, my = (W[:, None] * X).sum(0) / W.sum(), (W[:, None] * Y).sum(0) / W.sum()
    cxx = ((X - mx) * W[:, None]).T @ (X - mx) / W.sum()
    cxy = ((X - mx) * W[:, None]).T @ (Y - my) / W.sum()
    ref = np.linalg.solve(cxx + 0.05 * np.diag(cxx).mean() * np.eye(4), cxy)
    np.testing.assert_allclose(w[0].numpy(), ref.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[0].numpy(), my - mx @ ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_loss_ignores_planted_outliers(activation):
    """With outlier weights the loss and its gradients do not depend on the outlier targets,
    and equal the clean positions' loss (mean over all N positions)."""
    from model_fixtures import make_random_clt

    x, y, y_out = _planted(L=3, N=120, d=8, seed=2)
    clt = make_random_clt(3, 8, n_features=10, seed=3, activation=activation, skip=True)
    cfg = TrainConfig(n_features=10, topk=4, activation=activation, auxk=3)
    dead = torch.zeros(3, 10, dtype=torch.bool)
    dead[:, :5] = True
    thr = outliers.norm_thresholds(outliers.output_norms(y_out), "ratio", 50.0)
    wt = outliers.batch_weights(y_out, thr)

    def run(target, weight):
        m = TrainableTranscoder.from_clt(clt)
        out = objective(m, x, target, cfg, 0.01, dead, weight)
        out.loss.backward()
        return out, [p.grad.clone() for p in m.parameters() if p.grad is not None]

    a, ga = run(y_out, wt)
    y_other = y_out.clone()
    y_other[:, PLANTED] *= -3.0  # different outliers: nothing may change
    b, gb = run(y_other, wt)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q)
    # The weighted reconstruction term is the clean positions' squared error over all N.
    keep = wt[0] > 0
    rec = a.recon
    mse = ((rec - y_out).pow(2).sum(-1) * keep).sum(-1).div(120 * 8).sum()
    assert a.parts["mse"] == pytest.approx(float(mse), rel=1e-5)
    c, _ = run(y_out, None)  # unweighted: the outliers dominate
    assert c.parts["mse"] > 100 * a.parts["mse"]


def _planted_run(tmp_path, **overrides):
    """Train one step (lr 0) on a tiny llama's activations with planted 100x outputs (position 3
    of every third row). Returns the result, the config, the training x, y [L, 216, d] without
    the start token, the outlier mask [L, 216] and the thresholds [L], recomputed here."""
    from model_fixtures import make_tiny_model

    from tracer.spliced_metrics import activation_fn
    from transcoders.training.run import train

    torch.set_num_threads(1)
    model = make_tiny_model("llama", n_layers=2)
    base = activation_fn(model)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, 101, (30, 10), generator=g)
    tokens[:, 0] = 1
    tokens[:, 1] = 31
    tokens[::3, 1] = 30  # the rows whose position 3 gets a planted outlier
    tr, held = tokens[:24], tokens[24:]

    # The planted norm: 100x the median output norm of the training rows (one constant, so a
    # row's activations do not depend on the harvest batch it comes in).
    _, y_tr = base(tr)
    med = y_tr.view(2, 24, 10, -1)[:, :, 1:].norm(dim=-1).reshape(2, -1).median(dim=1).values

    def planted(tok):
        x, y = base(tok)
        B, P = tok.shape
        y = y.view(2, B, P, -1).clone()
        rows = [b for b in range(B) if int(tok[b, 1]) == 30]
        y[:, rows, 3] *= 100 * med[:, None, None] / y[:, rows, 3].norm(dim=-1, keepdim=True)
        return x, y.view(2, B * P, -1)

    opts = dict(
        n_features=16, topk=4, skip=True, steps=1, lr=0.0, batch_tokens=24,
        buffer_tokens=24 * 9, passes=1, eval_every=1, log_every=1, harvest_batch=4, auxk=4,
        n_heldout_seqs=6, cache_dtype="float32",  # float16 would round the fit's inputs
    )  # fmt: skip
    cfg = TrainConfig(**{**opts, **overrides})
    res = train(
        cfg, activations=planted, train_tokens=tr, heldout_tokens=held, n_layers=2,
        d_model=32, out_dir=tmp_path, progress=False, plot=False,
    )  # fmt: skip
    # Round 0 holds every training row: recompute the thresholds independently.
    x, y = planted(tr)
    x = x.view(2, 24, 10, -1)[:, :, 1:].reshape(2, 216, -1)
    y = y.view(2, 24, 10, -1)[:, :, 1:].reshape(2, 216, -1)
    thr = 50 * y.norm(dim=-1).median(dim=1).values
    out = y.norm(dim=-1) > thr[:, None]
    return res, cfg, x, y, out, thr


def _assert_skip_fit(res, w, b):
    """The exported skip connection and b_dec equal the fit (w, b) in raw units."""
    tol = 1e-4 * float(w.abs().max())  # float32 through the scales and the fold
    torch.testing.assert_close(res.clt.W_skip, w, rtol=1e-3, atol=tol)
    torch.testing.assert_close(res.clt.b_dec, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def _assert_out_scale(res, y):
    """The exported output scales are those of y [L, N, d] (E||y||^2 = d = 32)."""
    from transcoders.normalize import mean_square_norms

    torch.testing.assert_close(
        torch.tensor(res.clt.cfg.normalization["out_scale"]),
        (32 / mean_square_norms(y)).sqrt(),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.slow
def test_training_leaves_planted_outliers_out(tmp_path):
    """A run on activations with planted 100x outputs: the skip connection starts at the fit
    without them, the scales ignore them, the thresholds are checkpointed, and eval records
    report all / non-start / inlier NMSE."""
    from transcoders.training.run import CHECKPOINT, load_checkpoint

    res, cfg, x, y, out, thr = _planted_run(tmp_path, outlier_uses=("loss", "skip", "scales"))
    assert out.any() and int(out.sum()) < 20
    keep = ~out[0]
    assert torch.equal(out[0], out[1])
    w_clean, b_clean = fit_skip(x[:, keep], y[:, keep], ridge=cfg.skip_ridge)
    _assert_skip_fit(res, w_clean, b_clean)
    w_all, _ = fit_skip(x, y, ridge=cfg.skip_ridge)  # what the outliers would have done
    assert float((w_all - w_clean).abs().max()) > 100 * 1e-4 * float(w_clean.abs().max())
    _assert_out_scale(res, y[:, keep])
    state = load_checkpoint(tmp_path / CHECKPOINT)
    np.testing.assert_allclose(state["outlier_thresholds"], thr.numpy(), rtol=1e-5)
    ev = [r for r in res.log if r.get("event") == "eval"][-1]
    for k in ("nmse_all", "nmse", "nmse_inliers", "outlier_frac"):
        assert len(ev[k + "_per_layer"]) == 2
    assert ev["outlier_frac"] > 0  # the held-out rows have planted outliers too
    assert ev["nmse_inliers"] != ev["nmse"]


@pytest.mark.slow
@pytest.mark.parametrize("uses", [("loss",), ("skip",), ("scales",), ()])
def test_outlier_uses_turn_each_part_on_alone(tmp_path, uses):
    """``outlier_uses`` names where the rule acts, and each part acts alone: the skip fit leaves
    the planted outliers out only with "skip", the scales only with "scales", and the first
    step's loss (one batch holding every training position) ignores them only with "loss"."""
    res, cfg, x, y, out, _ = _planted_run(tmp_path, outlier_uses=uses, batch_tokens=216)
    keep = ~out[0]
    fit_on = keep if "skip" in uses else torch.ones_like(keep)
    _assert_skip_fit(res, *fit_skip(x[:, fit_on], y[:, fit_on], ridge=cfg.skip_ridge))
    _assert_out_scale(res, y[:, keep] if "scales" in uses else y)
    mse = next(r["mse"] for r in res.log if r.get("step") == 1 and "mse" in r)
    # lr 0: the first step's model is the initial one, whose error at a planted position is about
    # the planted output itself. Left in the loss, those 8 of 216 positions hold most of the
    # batch's squared error (measured: 1.7-2.0 with the scales of all positions, 608 with the
    # inliers' scales); weighted 0, the rest is 0.20.
    if "loss" in uses:
        assert mse < 0.5
    else:
        assert mse > 1.0


def test_unknown_outlier_use_is_one_clear_error():
    from transcoders.training.config import parse_outlier_uses

    assert parse_outlier_uses("loss, skip") == ("loss", "skip")
    assert parse_outlier_uses("") == ()
    with pytest.raises(ValueError, match="--outlier-uses scale is not a place"):
        parse_outlier_uses("loss,scale")
