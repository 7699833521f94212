"""JumpReLU and step against hand-computed values; each loss term against an independent loop;
normalisation folding; the training layout's exact conversion and decodes."""

from __future__ import annotations

import math

import pytest
import torch

from transcoders.activations import jumprelu, step
from transcoders.metrics import FireTracker, l0_per_layer, nmse_per_layer
from transcoders.normalize import Normalizer, fold
from transcoders.training import losses
from transcoders.training.trainable import TrainableTranscoder


def test_jumprelu_forward_backward_hand_values():
    # theta = 1.0, bandwidth eps = 0.5: the rectangle kernel K((z - theta)/eps) is 1 for
    # |z - theta| < 0.25.
    z = torch.tensor([[0.5, 0.9, 1.1, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    y = jumprelu(z, theta, bandwidth=0.5)
    assert y.tolist() == [[0.0, 0.0, pytest.approx(1.1), 2.0]]
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    # dy/dz = H(z - theta); dy/dtheta = -(theta/eps) K((z-theta)/eps) = -2 inside the window.
    assert z.grad.tolist() == [[0.0, 0.0, 3.0, 4.0]]
    assert theta.grad.tolist() == [0.0, -4.0, -6.0, 0.0]


def test_jumprelu_threshold_grad_sums_over_batch():
    z = torch.tensor([[0.95], [1.05], [3.0]])
    theta = torch.tensor([1.0], requires_grad=True)
    jumprelu(z, theta, bandwidth=0.2).sum().backward()
    # two rows inside the window, each -(1/0.2) * 1
    assert theta.grad.item() == pytest.approx(-10.0)


def test_step_forward_backward_hand_values():
    z = torch.tensor([0.5, 0.9, 1.1, 2.0], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    h = step(z, theta, bandwidth=0.5)
    assert h.tolist() == [0.0, 0.0, 1.0, 1.0]
    h.backward(torch.ones(4))
    assert z.grad is None or torch.all(z.grad == 0)
    # -(1/eps) K = -2 inside the window
    assert theta.grad.tolist() == [0.0, -2.0, -2.0, 0.0]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_reconstruction_loss_matches_loop():
    pred, target = _rand(3, 5, 4, seed=1), _rand(3, 5, 4, seed=2)
    total, per_layer = losses.reconstruction_loss(pred, target)
    for l in range(3):
        expect = (
            sum(
                sum((pred[l, n, j] - target[l, n, j]).item() ** 2 for j in range(4))
                for n in range(5)
            )
            / 5
            / 4
        )
        assert per_layer[l].item() == pytest.approx(expect, rel=1e-6)
    assert total.item() == pytest.approx(per_layer.sum().item(), rel=1e-6)


def test_tanh_sparsity_and_preact_losses_match_loops():
    L, N, F = 2, 3, 4
    acts = torch.relu(_rand(L, N, F, seed=3))
    pre = _rand(L, N, F, seed=4)
    norms = _rand(L, F, seed=5).abs()
    theta = _rand(L, F, seed=6).abs()
    c = 0.7
    tanh_expect = sum(
        sum(
            math.tanh(c * acts[l, n, f].item() * norms[l, f].item())
            for f in range(F)
            for n in range(N)
        )
        / N
        for l in range(L)
    )
    pre_expect = sum(
        sum(
            max(0.0, theta[l, f].item() - pre[l, n, f].item()) * norms[l, f].item()
            for f in range(F)
            for n in range(N)
        )
        / N
        for l in range(L)
    )
    assert losses.tanh_sparsity_loss(acts, norms, c).item() == pytest.approx(tanh_expect, rel=1e-6)
    assert losses.preact_loss(pre, theta, norms).item() == pytest.approx(pre_expect, rel=1e-6)


def test_decoder_norms_cover_all_targets():
    w = [_rand(4, 3, 5, seed=7), _rand(4, 2, 5, seed=8), _rand(4, 1, 5, seed=9)]
    got = losses.decoder_norms(w)
    for i in range(3):
        for f in range(4):
            expect = math.sqrt(
                sum(w[i][f, t, j].item() ** 2 for t in range(3 - i) for j in range(5))
            )
            assert got[i, f].item() == pytest.approx(expect, rel=1e-6)


def test_auxk_loss_matches_formula():
    r, a = _rand(2, 3, 4, seed=10), _rand(2, 3, 4, seed=11)
    num = sum((r.flatten()[i] - a.flatten()[i]).item() ** 2 for i in range(24))
    den = sum(v.item() ** 2 for v in r.flatten())
    assert losses.auxk_loss(r, a).item() == pytest.approx(num / den, rel=1e-6)


def test_l0_step_loss_counts_active_features():
    pre = torch.tensor([[[0.2, 2.0, 3.0], [0.0, 0.0, 5.0]]])
    theta = torch.tensor([[1.0, 1.0, 1.0]])
    assert losses.l0_step_loss(pre, theta, 0.1).item() == pytest.approx(1.5)


def test_metrics_nmse_l0_and_dead_tracking():
    y = _rand(2, 6, 3, seed=12)
    pred = y.clone()
    pred[1] = y[1].mean(0)  # predicting the mean explains nothing
    nm = nmse_per_layer(pred, y)
    assert nm[0].item() == pytest.approx(0.0, abs=1e-9)
    assert nm[1].item() == pytest.approx(1.0, rel=1e-6)
    acts = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert l0_per_layer(acts).tolist() == [1.5]
    tr = FireTracker(1, 2, window=10)
    tr.update(torch.tensor([[True, False]]), 6)
    assert tr.dead_fraction().tolist() == [0.0]  # under a full window: nothing dead yet
    tr.update(torch.tensor([[True, False]]), 6)
    assert tr.dead_mask().tolist() == [[False, True]]


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", False), ("clt", True)])
def test_normalisation_folding_is_exact(kind, skip):
    from model_fixtures import make_random_clt

    L, d = 3, 8
    # float64 so that "identical" can be checked to 1e-12 whatever the scales.
    clt = make_random_clt(L, d, n_features=6, kind=kind, skip=skip, seed=3).double()
    x = _rand(L, 10, d, seed=13).double() * torch.tensor([0.5, 3.0, 20.0]).double()[:, None, None]
    norm = Normalizer(
        torch.tensor([2.0, 0.3, 0.05]).double(), torch.tensor([0.7, 1.5, 0.01]).double()
    )
    # The trained transcoder sees normalised inputs; its outputs are normalised outputs.
    x_n = x * norm.in_scale[:, None, None]
    rec_n, acts_n = clt(x_n)
    exported = fold(clt, norm)
    rec_raw, acts_raw = exported(x)
    assert torch.equal(acts_n > 0, acts_raw > 0)
    torch.testing.assert_close(acts_raw, acts_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        rec_raw, rec_n / norm.out_scale[:, None, None], rtol=1e-12, atol=1e-12
    )
    assert exported.cfg.normalization["folded"] is True


def test_normalizer_estimate_gives_unit_mean_square():
    x = _rand(2, 50, 4, seed=14) * torch.tensor([3.0, 0.1])[:, None, None]
    n = Normalizer.estimate(x, x)
    ms = (x * n.in_scale[:, None, None]).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(ms, torch.full((2,), 4.0))


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_trainable_layout_round_trip_and_decodes(kind):
    from model_fixtures import make_random_clt

    L, d, F = 4, 8, 6
    clt = make_random_clt(L, d, n_features=F, kind=kind, seed=5, activation="topk")
    m = TrainableTranscoder.from_clt(clt)
    back = m.to_clt()
    for a, b in zip(clt.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = _rand(L, 7, d, seed=15)
    rec_ref, acts_ref = clt(x)
    pre = m.pre_activations(x)
    idx, vals = m.topk(pre, clt.cfg.topk)
    torch.testing.assert_close(m.decode_sparse(idx, vals), rec_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.decode_dense(acts_ref), rec_ref, rtol=1e-5, atol=1e-6)
    norms = torch.stack([w.flatten(1).norm(dim=1) for w in clt.W_dec])
    torch.testing.assert_close(m.decoder_norms(), norms)


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_block_sparse_decode_gradients_match_dense_autograd(kind):
    """The hand-written backward of the sparse decode equals autograd through a dense decode
    (activations scattered into [L, N, F], one matmul per (source, target) pair)."""
    from model_fixtures import make_random_clt

    L, d, F, N, k = 4, 8, 6, 9, 3
    clt = make_random_clt(L, d, n_features=F, kind=kind, seed=21, activation="topk")
    m = TrainableTranscoder.from_clt(clt)
    g = torch.Generator().manual_seed(22)
    idx = torch.stack([torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(N)])
                       for _ in range(L)])  # fmt: skip
    vals = torch.rand(L, N, k, generator=g, dtype=torch.float64).float().requires_grad_()
    upstream = torch.randn(L, N, d, generator=g)

    rec = m.decode_sparse(idx, vals, bias=False)
    (rec * upstream).sum().backward()
    got_vals, got_d = vals.grad.clone(), [w.grad.clone() for w in m.D]

    # Independent: dense activations and plain matmuls on copies of the weights.
    vals2 = vals.detach().clone().requires_grad_()
    w_dec = [w.detach().clone().requires_grad_() for w in clt.W_dec]  # [F, T_i, d]
    acts = torch.zeros(L, N, F).scatter(2, idx, vals2)
    ref = torch.stack([
        sum(acts[i] @ w_dec[i][:, l - i] for i in range(L) if 0 <= l - i < w_dec[i].shape[1])
        for l in range(L)
    ])  # fmt: skip
    (ref * upstream).sum().backward()
    torch.testing.assert_close(rec, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_vals, vals2.grad, rtol=1e-5, atol=1e-6)
    for l in range(L):
        for j, i in enumerate(m.sources(l)):
            torch.testing.assert_close(
                got_d[l][j * F : (j + 1) * F], w_dec[i].grad[:, l - i], rtol=1e-5, atol=1e-6
            )


def test_topk_objective_auxk_on_a_skip_transcoder_matches_independent_terms():
    """AuxK decodes only the dead features (no bias, no skip term), also for skip transcoders."""
    from model_fixtures import make_random_clt

    from transcoders.training.run import TrainConfig, objective

    L, d, F, N, k = 3, 8, 10, 6, 3
    clt = make_random_clt(L, d, n_features=F, kind="clt", seed=31, activation="topk", skip=True)
    m = TrainableTranscoder.from_clt(clt)
    x, y = _rand(L, N, d, seed=32), _rand(L, N, d, seed=33)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, :4] = True
    cfg = TrainConfig(n_features=F, topk=k, auxk=2, auxk_coef=0.5)
    out = objective(m, x, y, cfg, 0.0, dead)

    # Independent: dense activations, the CLT's own decode (bias + skip), explicit top-k masks.
    pre = torch.einsum("lnd,lfd->lnf", x, clt.W_enc) + clt.b_enc[:, None, :]
    top = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    rec = clt.decode(acts, x)
    mse = (rec - y).pow(2).sum(-1).mean(-1).div(d).sum()
    dead_pre = pre.masked_fill(~dead[:, None, :], -1e30)
    aux_top = dead_pre.topk(2, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, aux_top.indices, aux_top.values.relu())
    aux_rec = clt.decode(aux_acts, x) - clt.affine((N,), x)  # features only
    resid = y - rec
    aux = 0.5 * (resid - aux_rec).pow(2).sum() / resid.pow(2).sum()
    assert out.parts["mse"] == pytest.approx(float(mse), rel=1e-5)
    assert out.parts["auxk"] == pytest.approx(float(aux), rel=1e-5)
