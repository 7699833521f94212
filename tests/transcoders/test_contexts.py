"""Feature contexts against a brute-force computation over the same tokens."""

from __future__ import annotations

import torch

from transcoders.contexts import ContextConfig, feature_contexts, load_contexts, save_contexts

L, D, F = 2, 6, 5


def _setup():
    from model_fixtures import make_random_clt

    clt = make_random_clt(L, D, n_features=F, seed=4)
    emb = torch.randn(50, L, D, generator=torch.Generator().manual_seed(2))

    def activations(tokens):
        x = emb[tokens.reshape(-1)].transpose(0, 1)  # [L, B*P, D]
        return x, x

    tokens = torch.randint(3, 50, (5, 7), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 1
    return clt, activations, tokens


def test_contexts_match_brute_force(tmp_path):
    clt, activations, tokens = _setup()
    unembed = torch.randn(50, D, generator=torch.Generator().manual_seed(5))
    cfg = ContextConfig(top_k=3, before=2, after=1, n_bins=4, n_promoted=2, batch=2)
    table = feature_contexts(
        clt, activations, tokens, lambda ids: [f"<{i}>" for i in ids], unembed=unembed, cfg=cfg
    )
    rows = table.to_pylist()
    assert len(rows) == L * F
    x, _ = activations(tokens)
    acts = torch.stack([clt.activate(l, clt.pre_activations(l, x[l])) for l in range(L)])
    acts = acts.view(L, 5, 7, F)
    acts[:, :, 0] = 0  # BOS skipped
    acts = acts.reshape(L, 35, F)
    for r in rows:
        l, f = r["layer"], r["feature"]
        a = acts[l, :, f]
        assert r["frequency"] == (a > 0).sum().item() / 30
        top = a.topk(3)
        live = top.values > 0
        assert r["top_activations"] == [round(v, 5) for v in top.values[live].tolist()]
        for ctx, tok, g in zip(
            r["top_contexts"], r["top_tokens"], top.indices[live].tolist(), strict=True
        ):
            s, p = divmod(g, 7)
            assert tok == f"<{tokens[s, p].item()}>"
            assert f"«{tok}»" in ctx
        if r["max_activation"] > 0:
            assert sum(r["hist_counts"]) == (a > 0).sum().item()
            assert r["hist_edges"][-1] == round(a.max().item(), 5)
        logits = clt.W_dec[l][f].sum(0) @ unembed.T
        assert r["promoted_tokens"] == [f"<{i}>" for i in logits.topk(2).indices.tolist()]
        assert r["suppressed_tokens"] == [f"<{i}>" for i in (-logits).topk(2).indices.tolist()]
    save_contexts(table, tmp_path)
    assert load_contexts(tmp_path).equals(table)


def test_contexts_record_their_source(tmp_path):
    from transcoders.contexts import contexts_source

    clt, activations, tokens = _setup()
    cfg = ContextConfig(top_k=2, batch=5)
    plain = feature_contexts(clt, activations, tokens, lambda ids: [str(i) for i in ids], cfg=cfg)
    assert contexts_source(plain) is None
    src = {"corpus": "mix-generated-wordnet-public-abc", "rows": "held out", "sequences": 5}
    table = feature_contexts(
        clt, activations, tokens, lambda ids: [str(i) for i in ids], cfg=cfg, source=src
    )
    save_contexts(table, tmp_path)
    assert contexts_source(load_contexts(tmp_path)) == src
    assert table.drop_columns([]).to_pylist() == plain.to_pylist()
