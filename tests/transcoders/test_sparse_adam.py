"""Row-sparse training: the lazy Adam against torch.optim.Adam and its own formula, the sparse
gradients against the dense ones, and the sparse training step against the dense step."""

from __future__ import annotations

import copy

import pytest
import torch

from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.training.config import TrainConfig
from transcoders.training.objective import objective
from transcoders.training.sparse_adam import SparseRowAdam, row_sparse
from transcoders.training.trainable import TrainableTranscoder
from transcoders.training.trainer import make_optimizer


def _rows_grad(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return row_sparse(rows[None], g[rows], g.shape)


def test_every_row_touched_equals_torch_adam():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(6, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = SparseRowAdam([p1], lr=0.05)
    o2 = torch.optim.Adam([p2], lr=0.05)
    for _ in range(7):
        g = torch.randn(6, 4)
        p1.grad = _rows_grad(g, torch.arange(6))
        p2.grad = g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o1.state[p1]["exp_avg_sq"], o2.state[p2]["exp_avg_sq"])


def test_untouched_rows_stay_and_each_row_has_its_own_bias_correction():
    torch.manual_seed(1)
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = torch.nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    opt = SparseRowAdam([p], lr=lr, betas=(b1, b2), eps=eps)
    gs = [torch.randn(5, 3) for _ in range(3)]
    p.grad = _rows_grad(gs[0], torch.tensor([0, 2]))
    opt.step()
    p.grad = _rows_grad(gs[1], torch.tensor([2]))
    opt.step()
    p.grad = _rows_grad(gs[2], torch.tensor([2, 4]))
    opt.step()
    st = opt.state[p]
    assert st["step"].tolist() == [1.0, 0.0, 3.0, 0.0, 1.0]
    # Rows 1 and 3 never had a gradient: weights and moments untouched.
    for r in (1, 3):
        assert torch.equal(p[r].detach(), start[r])
        assert not st["exp_avg"][r].any() and not st["exp_avg_sq"][r].any()
    # Row 4's first update is Adam's first step (bias-corrected by t=1): -lr * sign-ish.
    g = gs[2][4].double()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    want = start[4].double() - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    torch.testing.assert_close(p[4].detach().double(), want, rtol=1e-6, atol=1e-6)
    # Row 2: three steps of ordinary Adam.
    w, m, v = start[2].double(), torch.zeros(3).double(), torch.zeros(3).double()
    for t, gg in enumerate(gs, 1):
        gg = gg[2].double()
        m, v = b1 * m + (1 - b1) * gg, b2 * v + (1 - b2) * gg * gg
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(p[2].detach().double(), w, rtol=1e-5, atol=1e-6)


def test_uncoalesced_gradients_add_and_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = SparseRowAdam([p], lr=0.1)
    idx = torch.tensor([[1, 1, 3]])
    vals = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.5, 0.5]])
    p.grad = torch.sparse_coo_tensor(idx, vals, (4, 2), check_invariants=True)  # row 1 twice
    opt.step()
    assert opt.state[p]["step"].tolist() == [0.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(opt.state[p]["exp_avg"][1], torch.tensor([0.2, 0.2]))
    other = SparseRowAdam([torch.nn.Parameter(torch.zeros(4, 2))], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(next(iter(other.state.values()))["step"], opt.state[p]["step"])


def _model(kind: str, F: int, L: int = 3, d: int = 8, seed: int = 0) -> TrainableTranscoder:
    torch.manual_seed(seed)
    cfg = TranscoderConfig(
        n_layers=L, d_model=d, n_features=F, kind=kind, activation="topk", topk=4, skip=True
    )
    return TrainableTranscoder.from_clt(CrossLayerTranscoder(cfg))


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_sparse_step_equals_dense_step_when_every_row_fires(kind):
    """k = F: every feature is selected at every token, so lazy Adam is Adam; with AuxK on
    (a feature marked dead) the two paths give the same parameters after several steps."""
    F, L, d, N = 12, 3, 8, 30
    sparse_m = _model(kind, F)
    dense_m = copy.deepcopy(sparse_m)
    torch.manual_seed(5)
    x, y = torch.randn(L, N, d), torch.randn(L, N, d)
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, 2] = True
    kw = {"kind": kind, "n_features": F, "topk": F, "skip": True, "lr": 1e-2, "auxk": 3}
    cs, cd = TrainConfig(**kw), TrainConfig(**kw, sparse_updates=False)
    os_, od = make_optimizer(sparse_m, cs), make_optimizer(dense_m, cd)
    assert isinstance(os_, SparseRowAdam) and type(od) is torch.optim.Adam
    for _ in range(6):
        for m, c, o in ((sparse_m, cs, os_), (dense_m, cd, od)):
            r = objective(m, x, y, c, 0.0, dead)
            assert "auxk" in r.parts
            o.zero_grad(set_to_none=True)
            r.loss.backward()
            o.step()
    for (name, a), (_, b) in zip(
        sparse_m.named_parameters(), dense_m.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(sparse_m.D[2], _model(kind, F).D[2])  # it did train


def test_sparse_gradients_are_the_dense_gradients_rows_and_untouched_rows_stay():
    F, L, d, N = 64, 3, 8, 5  # 5 tokens x k=4 per layer: at most 20 of 64 rows selected
    m = _model("clt", F)
    dense = copy.deepcopy(m)
    torch.manual_seed(7)
    x, y = torch.randn(L, N, d), torch.randn(L, N, d)
    cs = TrainConfig(kind="clt", n_features=F, topk=4, skip=True)
    cd = TrainConfig(kind="clt", n_features=F, topk=4, skip=True, sparse_updates=False)
    objective(m, x, y, cs, 0.0, None).loss.backward()
    objective(dense, x, y, cd, 0.0, None).loss.backward()
    g_enc = m.W_enc.grad
    assert g_enc.is_sparse
    sel = torch.zeros(L, F, dtype=torch.bool)
    sel[tuple(g_enc.coalesce().indices())] = True
    assert 0 < sel.sum() <= L * N * 4
    torch.testing.assert_close(g_enc.to_dense(), dense.W_enc.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.b_enc.grad.to_dense(), dense.b_enc.grad, rtol=1e-5, atol=1e-7)
    assert not dense.W_enc.grad[~sel].any()  # the dense gradient is zero off the selected rows
    for l in range(L):
        assert m.D[l].grad.is_sparse
        torch.testing.assert_close(m.D[l].grad.to_dense(), dense.D[l].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.W_skip.grad, dense.W_skip.grad)
    # A step moves only the selected rows of encoders and decoders.
    before = copy.deepcopy(m)
    opt = SparseRowAdam(m.parameters(), lr=1e-2)
    opt.step()
    moved = (m.W_enc != before.W_enc).any(-1)
    assert torch.equal(moved, sel)
    assert torch.equal(m.b_enc != before.b_enc, sel)
    for l in range(L):
        rows = (m.D[l] != before.D[l]).any(-1).view(l + 1, F)  # [source, feature]
        assert torch.equal(rows, sel[: l + 1])
