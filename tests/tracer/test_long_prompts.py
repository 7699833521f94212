"""Long prompts: the recorded state read one layer at a time (attention patterns in memory or
spilled to disk give the same graph), and the arithmetic memory plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import (
    TinyTokenizer,
    keyed_edges,
    make_random_clt,
    make_tiny_model,
    tiny_config,
)

from tracer.attribution import attribute
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13, 60, 3, 8])


def windowed_gemma3(seed: int = 0):
    """A tiny random Gemma-3 whose sliding window (4 positions) is shorter than the prompt:
    layers 0 and 2 slide, layer 1 is global (two masks in one run)."""
    from transformers import AutoModelForCausalLM

    from tracer.model import LanguageModel

    cfg = tiny_config("gemma3_text")
    cfg.sliding_window = 4
    cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return LanguageModel(hf, TinyTokenizer(), name="tiny-gemma3-windowed")


def test_pattern_is_the_recorded_pattern_of_one_layer():
    """PromptState.pattern(l) is layer l's attention pattern [H, P, P] as the hooked run records
    it (an independent forward), in memory and spilled to disk alike."""
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    want = model.run(TOKENS).patterns[0]  # [L, H, P, P]
    for where in ("memory", "disk"):
        state = rm.record(TOKENS, patterns=where)
        assert state.pattern_store.placement == where
        for l in range(3):
            got = state.pattern(l)
            assert got.shape == (4, len(TOKENS), len(TOKENS)) and got.dtype == torch.float32
            torch.testing.assert_close(got, want[l], atol=0, rtol=0)
            torch.testing.assert_close(state.pattern(l, 4), want[l, :, :4, :4], atol=0, rtol=0)


def test_recomputed_patterns_match_the_recorded_ones():
    """The recompute placement keeps queries and keys only, and its patterns (whole, by prefix,
    by blocks of rows) equal the recorded ones to float rounding, on a Llama and on a Gemma-3
    with sliding windows (a window of 4 here, so the window is in force)."""
    for arch in ("llama", "gemma3_text"):
        model = make_tiny_model(arch) if arch == "llama" else windowed_gemma3()
        rm = ReplacementModel(model, make_random_clt(3, 32, 16))
        want = model.run(TOKENS).patterns[0]
        if arch == "gemma3_text":  # the window is in force on sliding layers only
            assert bool((want[0, :, 9, :5] == 0).all()) and bool((want[1, :, 9, :5] > 0).all())
        state = rm.record(TOKENS, patterns="recompute")
        store = state.pattern_store
        # Linear in P: queries and keys (L x (H + n_kv) x P x d_head float32), one boolean mask
        # per mask kind (Gemma-3: full and sliding) of P x P bytes.
        P = len(TOKENS)
        n_masks = 2 if arch == "gemma3_text" else 1
        assert store.resident_bytes == 3 * (4 + 2) * P * 8 * 4 + n_masks * P * P
        for l in range(3):
            torch.testing.assert_close(state.pattern(l), want[l], atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(state.pattern(l, 5), want[l, :, :5, :5], atol=1e-7,
                                       rtol=1e-6)  # fmt: skip
            torch.testing.assert_close(store.pattern_rows(l, 3, 7, 7), want[l, :, 3:7, :7],
                                       atol=1e-7, rtol=1e-6)  # fmt: skip
        # The blocked record pass reproduces the model's logits.
        torch.testing.assert_close(state.logits, model.run(TOKENS).logits[0], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def assert_same_edges(a, b, rtol: float = 1e-6):
    """Graphs a and b have the same nodes and edges, weights within ``rtol`` relative (an edge
    a hair above zero in one may be a hair below in the other: atol 1e-6 of the largest)."""
    keys_a, edges_a = keyed_edges(a)
    keys_b, edges_b = keyed_edges(b)
    assert keys_a == keys_b
    assert edges_a.keys() == edges_b.keys()
    wa = np.array([edges_a[k] for k in edges_a], dtype=np.float64)
    wb = np.array([edges_b[k] for k in edges_a], dtype=np.float64)
    np.testing.assert_allclose(wb, wa, rtol=rtol, atol=rtol * np.abs(wa).max())


def _placements_agree(model, clt, tokens, monkeypatch, tmp_path, **options):
    """The in-memory graph against the disk-spilled and the recomputed ones, with the pattern
    and attention blocks cut to a row or two (so the blocked reads and the blocked record pass
    run at a short prompt)."""
    import tracer.hooks as hooks
    import tracer.replacement as replacement

    rm = ReplacementModel(model, clt)
    ref = attribute(rm, tokens, progress=False, patterns="memory", **options)
    assert ref.n_edges > 100
    monkeypatch.setattr(replacement, "PATTERN_BLOCK_BYTES", 1)  # one query row per block
    monkeypatch.setattr(hooks, "ATTENTION_BLOCK_BYTES", 2 * 4 * model.facts.n_heads * len(tokens))
    for where in ("disk", "recompute"):
        g = attribute(rm, tokens, progress=False, patterns=where, spill_dir=str(tmp_path),
                      **options)  # fmt: skip
        assert_same_edges(g, ref)
        assert g.scores == pytest.approx(ref.scores, rel=1e-6)
    assert list(tmp_path.iterdir()) == []  # the spill files are gone


@pytest.mark.slow
def test_smollm2_graph_same_with_patterns_spilled_or_recomputed(smollm2, monkeypatch, tmp_path):
    """SmolLM2 cut to 4 layers, every active feature a node: the same edges whether the
    attention patterns are held, spilled to disk or recomputed in blocks of query rows."""
    clt = make_random_clt(4, 576, 24, seed=3)
    tokens = smollm2.tokenize("The capital of the state containing Dallas is")
    _placements_agree(smollm2, clt, tokens, monkeypatch, tmp_path)


def test_gemma3_sliding_window_graph_same_with_patterns_spilled_or_recomputed(
    monkeypatch, tmp_path
):
    """A tiny Gemma-3 with its sliding window (4) shorter than the prompt: the same edges in
    every placement (the recomputed sliding layers use their own mask)."""
    _placements_agree(windowed_gemma3(), make_random_clt(3, 32, 16, seed=2), TOKENS,
                      monkeypatch, tmp_path)  # fmt: skip
