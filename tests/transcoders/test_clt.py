"""CrossLayerTranscoder: encode/decode/decode_sparse against independent dense computations, and
lazy decoders (read on first use; sparse decodes read only the rows they need)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_random_clt

L, D, F = 4, 12, 24


def dense_reference(clt, x: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """out[t] = b_dec[t] + sum over source layers s feeding t of acts[s] @ W_dec[s][:, t - s]
    (+ x[t] @ W_skip[t].T), computed in float64 with explicit loops."""
    cfg = clt.cfg
    out = torch.zeros(L, *x.shape[1:-1], D, dtype=torch.float64)
    for t in range(L):
        out[t] += clt.b_dec[t].double()
        for s in range(L):
            if cfg.kind == "clt" and s <= t:
                w = clt.decoder(s)[:, t - s, :]
            elif cfg.kind == "plt" and s == t:
                w = clt.decoder(s)[:, 0, :]
            else:
                continue
            out[t] += acts[s].double() @ w.double()
        if clt.W_skip is not None:
            out[t] += x[t].double() @ clt.W_skip[t].double().T
    return out


@pytest.mark.parametrize(
    "kind,activation,skip",
    [("clt", "jumprelu", False), ("clt", "relu", True), ("clt", "topk", False),
     ("plt", "jumprelu", True), ("plt", "topk", False)],
)  # fmt: skip
def test_decode_matches_dense_reference(kind, activation, skip):
    clt = make_random_clt(L, D, F, kind=kind, activation=activation, skip=skip, seed=3)
    x = torch.randn(L, 2, 5, D)
    acts = clt.encode(x)
    assert acts.shape == (L, 2, 5, F)
    assert 0 < (acts != 0).float().mean() < 1  # some, not all, features fire
    expected = dense_reference(clt, x, acts)
    torch.testing.assert_close(clt.decode(acts, x).double(), expected, rtol=1e-5, atol=1e-6)
    recon, acts2 = clt(x)
    assert torch.equal(acts2, acts)
    torch.testing.assert_close(recon.double(), expected, rtol=1e-5, atol=1e-6)


def test_encode_matches_definitions():
    x = torch.randn(L, 7, D)
    jr = make_random_clt(L, D, F, activation="jumprelu")
    for i in range(L):
        pre = x[i] @ jr.W_enc[i].T + jr.b_enc[i]
        assert torch.equal(jr.encode(x)[i], pre * (pre > jr.threshold[i]))
    tk = make_random_clt(L, D, F, activation="topk")
    acts = tk.encode(x)
    assert ((acts > 0).sum(-1) <= tk.cfg.topk).all()
    for i in range(L):
        pre = x[i] @ tk.W_enc[i].T + tk.b_enc[i]
        kth = pre.topk(tk.cfg.topk, dim=-1).values[:, -1:]
        assert torch.equal(acts[i], torch.where(pre >= kth, pre.clamp(min=0), 0.0))


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_decode_sparse_matches_dense_decode(kind):
    clt = make_random_clt(L, D, F, kind=kind, seed=5)
    x = torch.randn(L, 6, D)
    acts = clt.encode(x)
    layer, pos, feat = acts.nonzero(as_tuple=True)
    sparse = clt.decode_sparse(layer, pos, feat, acts[layer, pos, feat], n_pos=6)
    without_bias = clt.decode(acts) - clt.b_dec[:, None, :]
    torch.testing.assert_close(sparse, without_bias, rtol=1e-5, atol=1e-6)
    # A feature repeated at several positions is decoded at each of them.
    two = clt.decode_sparse(
        torch.tensor([1, 1]), torch.tensor([0, 3]), torch.tensor([2, 2]),
        torch.tensor([1.5, -2.0]), n_pos=4,
    )  # fmt: skip
    w = clt.decoder(1)[2]  # [T, d]
    T = w.shape[0]
    assert torch.equal(two[1 : 1 + T, 0], 1.5 * w)
    assert torch.equal(two[1 : 1 + T, 3], -2.0 * w)
    assert two[0].abs().sum() == 0 and two[:, [1, 2]].abs().sum() == 0


def test_decode_sparse_in_chunks_is_bit_identical(monkeypatch):
    """Long prompts decode their active features in bounded chunks; the sums are unchanged."""
    import transcoders.clt as clt_mod

    clt = make_random_clt(L, D, F, kind="clt", seed=6)
    acts = clt.encode(torch.randn(L, 40, D))
    layer, pos, feat = acts.nonzero(as_tuple=True)
    args = (layer, pos, feat, acts[layer, pos, feat])
    whole = clt.decode_sparse(*args, n_pos=40)
    monkeypatch.setattr(clt_mod, "DECODE_CHUNK_BYTES", 3 * L * D * 4)  # about 3 features a chunk
    assert (layer == 0).sum() > 10  # so layer 0 takes several chunks
    assert torch.equal(clt.decode_sparse(*args, n_pos=40), whole)
    without_bias = clt.decode(acts) - clt.b_dec[:, None, :]
    torch.testing.assert_close(whole, without_bias, rtol=1e-5, atol=1e-6)


class CountingSource:
    """A lazy decoder source that counts full reads and row reads."""

    def __init__(self, w: torch.Tensor):
        self.w, self.full, self.rows = w.clone(), 0, []

    def load(self):
        self.full += 1
        return self.w.clone()

    def read_rows(self, idx):
        self.rows.append(idx.tolist())
        return self.w[idx].clone()


def lazy_copy(clt):
    sources = []
    lazy = make_random_clt(L, D, F, kind=clt.cfg.kind, seed=5)
    lazy.load_state_dict(clt.state_dict())
    for i in range(L):
        src = CountingSource(clt.decoder(i))
        sources.append(src)
        lazy.set_lazy_decoder(i, src.load, src.read_rows)
    return lazy, sources


def test_lazy_decoders_read_on_first_use_and_sparse_reads_rows_only():
    clt = make_random_clt(L, D, F, seed=5)
    lazy, sources = lazy_copy(clt)
    assert not any(lazy.decoder_loaded(i) for i in range(L))
    x = torch.randn(L, 6, D)
    acts = lazy.encode(x)
    layer, pos, feat = acts.nonzero(as_tuple=True)
    sparse = lazy.decode_sparse(layer, pos, feat, acts[layer, pos, feat], n_pos=6)
    expected = clt.decode_sparse(layer, pos, feat, acts[layer, pos, feat], n_pos=6)
    assert torch.equal(sparse, expected)
    assert all(s.full == 0 for s in sources)  # no full decoder was read
    for i, s in enumerate(sources):
        assert s.rows == [sorted(set(feat[layer == i].tolist()))]  # each row read once
    assert not any(lazy.decoder_loaded(i) for i in range(L))

    w = lazy.decoder(2, cache=False)
    assert torch.equal(w, clt.decoder(2)) and not lazy.decoder_loaded(2)
    assert torch.equal(lazy.decoder(2), clt.decoder(2)) and lazy.decoder_loaded(2)
    lazy.decoder(2)
    assert sources[2].full == 2  # once uncached, once cached, then from memory
    assert torch.equal(lazy.decode(acts), clt.decode(acts))
    assert all(lazy.decoder_loaded(i) for i in range(L))


def test_lazy_decoder_with_wrong_shape_is_a_clear_error():
    clt = make_random_clt(L, D, F)
    clt.set_lazy_decoder(1, lambda: torch.zeros(F, 2, D))
    with pytest.raises(ValueError, match=r"decoder of layer 1 has shape \(24, 2, 12\)"):
        clt.decoder(1)


def test_check_model_names_the_mismatch():
    clt = make_random_clt(L, D, F)
    clt.check_model(L, D)
    with pytest.raises(ValueError, match="d_model 12 but tiny has 16"):
        clt.check_model(L, 16, "tiny")
    with pytest.raises(ValueError, match="covers 4 layers but tiny has 6"):
        clt.check_model(6, D, "tiny")
