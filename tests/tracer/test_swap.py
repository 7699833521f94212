"""Swap experiments: on a tiny model the swapped next-token distribution and continuation equal
a forward computed by hand with plain PyTorch hooks on the MLPs (features recomputed from the
live MLP input, the swapped values put in, the decoded difference added); features absent from
their prompt, unknown supernodes and positions that do not map are clear errors; the batch
form stores each result with its graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.supernodes import SupernodeError, find_supernodes
from tracer.analyses.swap import (
    SwapError,
    active_features,
    concept_positions,
    parse_layers,
    run_swap_file,
    swap,
    swap_supernodes,
)
from tracer.attribution import attribute
from tracer.replacement import ReplacementModel


def setup():
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 16, seed=4)
    return model, clt, ReplacementModel(model, clt)


def hand_acts(model, clt, tokens) -> list[torch.Tensor]:
    """Transcoder activations [P, F] per layer from the plain model's MLP inputs."""
    seen = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
             for layer in model.hf.model.layers]  # fmt: skip
    with torch.no_grad():
        model.hf(tokens[None])
    for h in hooks:
        h.remove()
    return [clt.activate(l, clt.pre_activations(l, x)) for l, x in enumerate(seen)]


def hand_logits(model, clt, tokens, edits) -> torch.Tensor:
    """Last-position logits with ``edits`` {(layer, position, feature): value} applied: at each
    MLP, features are computed from its live input (start position zeroed), edited, and
    (edited - live) decoded into this and later MLP outputs."""
    L = len(model.hf.model.layers)
    pending = [torch.zeros(len(tokens), 32) for _ in range(L)]
    hooks = []
    for l, layer in enumerate(model.hf.model.layers):

        def pre(m, args, l=l):
            acts = clt.activate(l, clt.pre_activations(l, args[0][0]))
            acts[0] = 0.0
            used = acts.clone()
            for (el, p, f), v in edits.items():
                if el == l:
                    used[p, f] = v
            diff = used - acts
            for t in range(clt.W_dec[l].shape[1]):
                pending[l + t] += diff @ clt.W_dec[l][:, t]

        def post(m, args, out, l=l):
            return out + pending[l][None]

        hooks += [layer.mlp.register_forward_pre_hook(pre), layer.mlp.register_forward_hook(post)]
    with torch.no_grad():
        logits = model.hf(tokens[None]).logits[0, -1]
    for h in hooks:
        h.remove()
    return logits


def features_at(acts, pos, n=3):
    """(layer, pos, feature) of up to n active features per layer at ``pos``."""
    out = []
    for l, a in enumerate(acts):
        out += [(l, pos, int(f)) for f in torch.nonzero(a[pos]).flatten()[:n]]
    return out


def test_swap_equals_hand_computed_forward():
    model, clt, rm = setup()
    a, b = "hello world", "hello worle"
    ta, tb = model.tokenize(a), model.tokenize(b)
    acts_a, acts_b = hand_acts(model, clt, ta), hand_acts(model, clt, tb)
    pos = len(ta) - 1  # the token where the prompts differ
    remove, insert = features_at(acts_a, pos), features_at(acts_b, pos)
    assert remove and insert and set(remove) != set(insert)
    res = swap(rm, a, remove, insert, b, top_k=5, max_new_tokens=3)
    edits = {f: 0.0 for f in remove} | {f: float(acts_b[f[0]][f[1], f[2]]) for f in insert}
    assert [v for *_, v in res.inserted] == pytest.approx([edits[f] for f in insert], rel=1e-5)
    for probs, e in ((res.top_after, edits), (res.top_before, {})):
        p = hand_logits(model, clt, ta, e).softmax(-1)
        top = p.topk(5)
        assert [i for _, i, _ in probs] == top.indices.tolist()
        np.testing.assert_allclose([q for *_, q in probs], top.values.numpy(), rtol=1e-5)
    # The continuation: greedy, the edits at their prompt positions on every step.
    seq, new = ta.clone(), []
    for _ in range(3):
        nxt = int(hand_logits(model, clt, seq, edits).argmax())
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    assert res.continuation_after == model.decode(new)
    assert res.to_dict()["moved"] == res.moved


def test_layer_range_swaps_only_those_layers_and_watch_reports_rank():
    model, clt, rm = setup()
    a, b = "hello world", "hello worle"
    ta, tb = model.tokenize(a), model.tokenize(b)
    acts_a, acts_b = hand_acts(model, clt, ta), hand_acts(model, clt, tb)
    pos = concept_positions(model, a, b)
    assert pos == [len(ta) - 1]
    remove, insert = features_at(acts_a, pos[0], n=16), features_at(acts_b, pos[0], n=16)
    # active_features lists exactly the hand-computed active features, per layer range.
    assert sorted(active_features(rm, a, pos)) == sorted(remove)
    assert sorted(active_features(rm, b, pos, (1, 2))) == sorted(f for f in insert if f[0] >= 1)
    assert {f[0] for f in remove} == {f[0] for f in insert} == {0, 1, 2}
    watch = [int(hand_logits(model, clt, tb, {}).argmax()), 3]
    res = swap(rm, a, remove, insert, b, layers=(1, 1), watch=watch, max_new_tokens=0)
    keep_r, keep_i = [f for f in remove if f[0] == 1], [f for f in insert if f[0] == 1]
    assert res.removed == keep_r and res.layers == [1, 1]
    assert [(l, q, f) for l, q, f, _ in res.inserted] == keep_i  # same position: same length
    # The result is the hand-computed forward with only layer 1's features edited.
    edits = {f: 0.0 for f in keep_r} | {f: float(acts_b[f[0]][f[1], f[2]]) for f in keep_i}
    p_after = hand_logits(model, clt, ta, edits).softmax(-1)
    p_before = hand_logits(model, clt, ta, {}).softmax(-1)
    top = p_after.topk(5)
    assert [i for _, i, _ in res.top_after] == top.indices.tolist()
    for w, tok in zip(res.watched, watch, strict=True):
        assert w["id"] == tok and w["token"] == model.decode([tok])
        for name, p in (("before", p_before), ("after", p_after)):
            assert w[f"p_{name}"] == pytest.approx(float(p[tok]), rel=1e-5)
            assert w[f"rank_{name}"] == int((p > p[tok]).sum()) + 1
    # Unrestricted, the same call edits every layer and the distribution differs.
    full = swap(rm, a, remove, insert, b, max_new_tokens=0)
    assert full.removed == remove and full.layers is None and full.watched == []
    assert full.top_after != res.top_after
    # A range holding no layer of the features swaps nothing: the distribution is unchanged.
    none = swap(rm, a, remove, insert, b, layers=(5, 9), max_new_tokens=0)
    assert none.removed == [] and none.inserted == [] and none.top_after == none.top_before


def test_parse_layers_and_concept_positions_errors():
    model, _, _ = setup()
    assert parse_layers("8-20") == (8, 20) and parse_layers(" 12 ") == (12, 12)
    for bad in ("x", "8-", "20-8", "-3"):
        with pytest.raises(SwapError, match="layer range"):
            parse_layers(bad)
    with pytest.raises(SwapError, match="same token length"):
        concept_positions(model, "hello world", "a much longer prompt")


def test_absent_features_and_bad_positions_are_clear_errors():
    model, clt, rm = setup()
    a, b = "hello world", "hello worle"
    acts_a, acts_b = (
        hand_acts(model, clt, model.tokenize(a)),
        hand_acts(model, clt, model.tokenize(b)),
    )
    inactive_a = next((0, 3, f) for f in range(16) if acts_a[0][3, f] == 0)
    inactive_b = next((1, 4, f) for f in range(16) if acts_b[1][4, f] == 0)
    with pytest.raises(SwapError, match=r"not active in the target prompt 'hello world'"):
        swap(rm, a, [inactive_a], [], b, max_new_tokens=0)
    with pytest.raises(SwapError, match=r"not active in the source prompt 'hello worle'"):
        swap(rm, a, [], [inactive_b], b, max_new_tokens=0)
    long_b = "a much longer prompt"
    acts_long = hand_acts(model, clt, model.tokenize(long_b))
    early = features_at(acts_long, 2, n=1)[:1]
    with pytest.raises(SwapError, match="maps to position"):
        swap(rm, "hi", [], early, long_b, max_new_tokens=0)


def test_supernode_swap_and_batch_file(tmp_path):
    model, clt, rm = setup()
    ga = attribute(rm, "ab cd", progress=False)
    gb = attribute(rm, "ab ce", progress=False)
    for g in (ga, gb):
        find_supernodes(g, transcoder=clt, min_similarity=0.3)
    with pytest.raises(SupernodeError, match="no supernode 's99'"):
        swap_supernodes(rm, ga, "s99", gb, "s0", max_new_tokens=0)
    direct = swap_supernodes(rm, ga, "s0", gb, "s1", max_new_tokens=2)
    assert direct.label["remove"] == ["s0"] and direct.label["insert"] == ["s1"]
    pa, pb = ga.save(tmp_path / "a.parquet"), gb.save(tmp_path / "b.parquet")
    lines = [{"graph": str(pa), "remove": "s0", "other_graph": str(pb), "insert": "s1",
              "max_new_tokens": 2}]  # fmt: skip
    (tmp_path / "swaps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = run_swap_file(rm, tmp_path / "swaps.jsonl", progress=False)
    assert len(out) == 1
    from tracer.graph import Graph

    stored = Graph.load(pa).extra["swaps"]
    assert len(stored) == 1 and stored[0]["top_after"][0][1] == direct.top_after[0][1]
    assert stored[0]["continuation_after"] == direct.continuation_after
    (tmp_path / "bad.jsonl").write_text('{"graph": "x"}\n')
    with pytest.raises(SwapError, match="line 1: a swap needs"):
        run_swap_file(rm, tmp_path / "bad.jsonl", progress=False)


def test_concept_swaps_report_the_other_answer():
    from tracer.analyses.swap import SwapVariant, concept_swaps

    model, clt, rm = setup()
    a, b = "hello world", "hello worle"
    ta, tb = model.tokenize(a), model.tokenize(b)
    acts_a, acts_b = hand_acts(model, clt, ta), hand_acts(model, clt, tb)
    variants = [SwapVariant("concept"), SwapVariant("concept", (1, 2)), SwapVariant("last")]
    out = concept_swaps(rm, a, b, variants, max_new_tokens=0)
    other = int(hand_logits(model, clt, tb, {}).argmax())
    assert out["answer"][1] == int(hand_logits(model, clt, ta, {}).argmax())
    assert out["other_answer"][1] == other and out["positions"] == [len(ta) - 1]
    last = len(ta) - 1  # here the concept position is the last one
    for v, e in zip(variants, out["experiments"], strict=True):
        lo, hi = v.layers or (0, 2)
        remove = [f for f in features_at(acts_a, last, n=16) if lo <= f[0] <= hi]
        insert = [f for f in features_at(acts_b, last, n=16) if lo <= f[0] <= hi]
        assert (e["n_removed"], e["n_inserted"]) == (len(remove), len(insert))
        direct = swap(rm, a, remove, insert, b, watch=[other], max_new_tokens=0)
        assert e["top_after"] == direct.top_after and e["other_answer"] == direct.watched[0]
        assert e["moved_to_other"] == (direct.top_after[0][1] == other)
    assert "layers 1-2" in out["experiments"][1]["what"]
    with pytest.raises(SwapError, match="swap positions 'middle'"):
        SwapVariant("middle")
