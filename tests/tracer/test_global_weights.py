"""Global virtual weights: equal to a dense computation through the encoder on tiny models (the
stored top-k are the true top-k), and equal to the per-prompt edge, exactly, where attention
adds nothing (its output projection zeroed: attention is then the identity on the residual at
every position, the start position included with exclude_bos=False)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.global_weights import GlobalWeights, global_weights, typical_norm_scales
from tracer.architectures import frozen_norm
from tracer.attribution import attribute
from tracer.graph import FEATURE
from tracer.replacement import ReplacementModel


def dense_weights(model, clt, scales=None) -> np.ndarray:
    """W[(lt, ft), (ls, fs)] [L*F, L*F]: the change of target pre-activations when one unit of
    the source's decoder rows to the layers below lt is added to resid_mid of lt, through the
    encoder (and the MLP-input norm with denominator 1, or ``scales[lt]``)."""
    L, F = clt.cfg.n_layers, clt.cfg.n_features
    W = np.zeros((L * F, L * F))
    for lt in range(1, L):
        norm = model.layer_module(lt, "mlp_norm")
        for ls in range(lt):
            dec = clt.W_dec[ls].detach()  # [F, T, d]
            x = torch.stack([dec[:, l - ls] for l in range(ls, lt) if l - ls < dec.shape[1]]).sum(0)
            if clt.cfg.input_site == "mlp_in":
                s = torch.full((F,), 1.0 if scales is None else float(scales[lt]))
                y = frozen_norm(model.arch.norm_kind, norm, x, s)
                y0 = frozen_norm(model.arch.norm_kind, norm, torch.zeros_like(x), s)
            else:
                y, y0 = x, torch.zeros_like(x)
            pre = clt.pre_activations(lt, y) - clt.pre_activations(lt, y0)  # [F_src, F_tgt]
            W[lt * F : (lt + 1) * F, ls * F : (ls + 1) * F] = pre.T.double().numpy()
    return W


def check_top_k(gw: GlobalWeights, W: np.ndarray, F: int, k: int) -> None:
    src = gw.source_layer * F + gw.source_index
    tgt = gw.target_layer * F + gw.target_index
    np.testing.assert_allclose(gw.weight, W[tgt, src], rtol=1e-4, atol=1e-6)
    assert len(set(zip(src.tolist(), tgt.tolist(), strict=True))) == len(gw)
    for t in range(F, W.shape[0]):  # every target above layer 0 keeps its top-k inputs
        row = np.abs(W[t, : (t // F) * F])
        mine = src[(tgt == t) & (gw.rank_in >= 0)]
        ranks = gw.rank_in[(tgt == t) & (gw.rank_in >= 0)]
        assert len(mine) == min(k, len(row))
        kth = np.sort(row)[-len(mine)]
        assert (row[mine] >= kth - 1e-6).all()
        assert list(mine[np.argsort(ranks)]) == sorted(mine.tolist(), key=lambda s: -row[s])
    for s in range(W.shape[1] - F):  # every source below the top layer keeps its top-k outputs
        col = np.abs(W[:, s])
        mine = tgt[(src == s) & (gw.rank_out >= 0)]
        assert len(mine) == k
        assert (col[mine] >= np.sort(col)[-k] - 1e-6).all()


@pytest.mark.parametrize("arch,site,kind", [("llama", "mlp_in", "clt"), ("gpt2", "mlp_in", "clt"),
                                            ("qwen2", "resid_mid", "plt")])  # fmt: skip
def test_equal_to_dense_computation(arch, site, kind):
    model = make_tiny_model(arch)
    clt = make_random_clt(3, 32, 12, kind=kind, input_site=site)
    W = dense_weights(model, clt)
    gw = global_weights(clt, model, top_k=5, name="tc", progress=False)
    assert gw.norm == ("unit" if site == "mlp_in" else "none") and gw.transcoder == "tc"
    check_top_k(gw, W, 12, 5)
    if kind == "plt":  # a per-layer decoder writes to its own layer only: every layer below
        assert np.abs(W[2 * 12 :, :12]).max() > 0  # still reaches (through the residual)


def test_corpus_mean_convention_and_round_trip(tmp_path):
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 12)
    rm = ReplacementModel(model, clt)
    tokens = torch.randint(3, 100, (3, 8))
    scales = typical_norm_scales(rm, tokens, batch=2)
    expected = torch.stack([model.run(t, record_sites=()).scales["mlp_norm"][0, :, 1:]
                            for t in tokens]).mean((0, 2))  # fmt: skip
    torch.testing.assert_close(scales, expected)
    gw = global_weights(clt, model, top_k=4, norm_scales=scales, progress=False)
    assert gw.norm == "corpus-mean"
    check_top_k(gw, dense_weights(model, clt, scales), 12, 4)
    back = GlobalWeights.load(gw.save(tmp_path / "gw.parquet"))
    np.testing.assert_array_equal(back.weight, gw.weight)
    np.testing.assert_array_equal(back.rank_out, gw.rank_out)
    assert back.norm == "corpus-mean" and back.norm_scales == pytest.approx(scales.tolist())


@pytest.mark.parametrize("site", ["mlp_in", "resid_mid"])
def test_equal_to_per_prompt_edge_when_attention_is_identity(site):
    model = make_tiny_model("llama")
    with torch.no_grad():
        for layer in model.layers():
            layer.self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual
    clt = make_random_clt(3, 32, 12, input_site=site)
    rm = ReplacementModel(model, clt, exclude_bos=False)  # position 0 has feature nodes too
    graph = attribute(rm, torch.tensor([1, 5, 9, 22]), progress=False)
    W = dense_weights(model, clt)  # unit convention
    gw = global_weights(clt, model, top_k=12 * 2, progress=False)  # every pair is stored
    src_t = gw.source_layer * 12 + gw.source_index
    tgt_t = gw.target_layer * 12 + gw.target_index
    stored = dict(zip(zip(src_t.tolist(), tgt_t.tolist(), strict=True), gw.weight.tolist(),
                      strict=True))  # fmt: skip
    state = rm.record(torch.tensor([1, 5, 9, 22]))
    feat = graph.kind == FEATURE
    sel = feat[graph.source] & feat[graph.target]
    n_same, positions = 0, set()
    for k in np.where(sel)[0]:
        s, t = int(graph.source[k]), int(graph.target[k])
        ps, pt = int(graph.position[s]), int(graph.position[t])
        if ps != pt:
            assert abs(graph.weight[k]) < 1e-6  # no path between positions without attention
            continue
        ls, lt = int(graph.layer[s]), int(graph.layer[t])
        s_flat, t_flat = ls * 12 + int(graph.feature[s]), lt * 12 + int(graph.feature[t])
        scale = float(state.scales["mlp_norm"][lt, pt]) if site == "mlp_in" else 1.0
        expected = float(graph.activation[s]) * W[t_flat, s_flat] * scale
        assert graph.weight[k] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        if ls < lt:
            assert stored[(s_flat, t_flat)] == pytest.approx(W[t_flat, s_flat], rel=1e-5, abs=1e-6)
        n_same += 1
        positions.add(pt)
    assert n_same > 30 and 0 in positions


def test_bad_top_k():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        global_weights(make_random_clt(3, 32, 8), model, top_k=0, progress=False)
