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


# --- the arithmetic memory plan ----------------------------------------------------------------


def test_arithmetic_estimate_counts_from_l0_without_running(monkeypatch):
    """With an L0 the estimate never runs the model (its forward raises here), counts
    L0 x layers x (tokens - 1) active features, and equals the shape-only plan of the same
    numbers; the exact count runs one encoder pass and matches a record of the prompt."""
    from tracer.attribution.memory import (
        ModelShapes,
        TranscoderShapes,
        estimate_from_shapes,
        estimate_memory,
    )

    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 16)
    rm = ReplacementModel(model, clt)
    exact = estimate_memory(model, clt, TOKENS, 20, exact=True, baseline_host_bytes=0)
    assert exact.workload.n_active == rm.record(TOKENS).n_active
    with pytest.raises(ValueError, match="estimate exact"):
        estimate_memory(model, clt, TOKENS, 20, exact=False)

    def no_forward(*a, **k):
        raise AssertionError("the arithmetic estimate ran the model")

    monkeypatch.setattr(model.hf, "forward", no_forward)
    kw = dict(baseline_host_bytes=0, available_host_bytes=4e9, available_disk_bytes=1e12)
    est = estimate_memory(model, clt, TOKENS, 20, l0=2.5, **kw)
    assert est.workload.n_active == round(2.5 * 9) * 3
    clt.cfg.training["metrics"] = {"l0": 2.5}  # measured L0: the default is arithmetic
    assert estimate_memory(model, clt, TOKENS, 20, **kw).workload.n_active == est.workload.n_active
    shapes = estimate_from_shapes(ModelShapes.of(model), TranscoderShapes(16, 2.5), len(TOKENS),
                                  20, **kw)  # fmt: skip
    assert shapes.peak_host_bytes == est.peak_host_bytes
    assert shapes.workload.active_targets == est.workload.active_targets


SMOLLM2 = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64, vocab_size=49152,
               max_positions=8192)  # fmt: skip


def test_longest_prompt_is_the_edge_of_what_fits():
    """The plan's longest prompt fits at its budget and one token more does not; at SmolLM2's
    shapes the patterns go from memory to recomputed as the prompt grows, and recomputing them
    keeps the state linear in the prompt: doubling a long prompt about doubles it."""
    from tracer.attribution.memory import ModelShapes, TranscoderShapes, estimate_from_shapes

    ms, ts = ModelShapes(**SMOLLM2), TranscoderShapes(256, l0=20)
    kw = dict(baseline_host_bytes=0, available_host_bytes=6e9, available_disk_bytes=1e12)
    est = estimate_from_shapes(ms, ts, 1024, 1024, **kw)
    n = est.longest_prompt
    assert 1024 < n < 8192 and est.limiting_part
    assert estimate_from_shapes(ms, ts, n, 1024, **kw).fits
    assert not estimate_from_shapes(ms, ts, n + 1, 1024, **kw).fits
    assert estimate_from_shapes(ms, ts, 128, 1024, **kw).pattern_placement == "memory"
    a, b = (estimate_from_shapes(ms, ts, p, 1024, **kw) for p in (4096, 8192))
    assert a.pattern_placement == b.pattern_placement == "recompute"
    assert 1.9 < b.state_bytes / a.state_bytes < 2.3
    # In memory the patterns alone would grow with the square of the prompt.
    held = estimate_from_shapes(ms, ts, 8192, 1024, patterns="memory", **kw)
    assert held.pattern_bytes == 30 * 9 * 8192**2 * 4 and not held.fits


def test_spill_without_space_is_refused_with_what_fits():
    """Rows that must spill to a folder without the space: the plan does not fit, and its one
    line names the spill, the free space and the budget that fits in memory."""
    from tracer.attribution.memory import (
        ModelShapes,
        TranscoderShapes,
        estimate_from_shapes,
        suggested_budget_line,
    )

    ms, ts = ModelShapes(**SMOLLM2), TranscoderShapes(256, l0=20)
    kw = dict(baseline_host_bytes=0, available_host_bytes=6e9)
    roomy = estimate_from_shapes(ms, ts, 2048, 4096, available_disk_bytes=1e12, **kw)
    assert roomy.fits and roomy.row_store_placement == "disk" and roomy.spill_bytes > 1e9
    full = estimate_from_shapes(ms, ts, 2048, 4096, available_disk_bytes=1e8, **kw)
    assert not full.fits
    line = suggested_budget_line(full)
    assert "spills" in line and "0.10 GB free" in line
    assert f"--max-feature-nodes {full.suggested_max_feature_nodes}" in line
    assert 0 < full.suggested_max_feature_nodes < 4096


def errors(capsys) -> list[str]:
    """The error lines on stderr (progress bars of the model load left out); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("circuit-atlas: error")]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """trace --estimate: a prompt longer than the model's context and a budget that cannot fit
    are each one line naming the problem and what fits, exit 2; a plan that fits exits 0."""
    from model_fixtures import save_tiny_folder

    from tracer.cli import main

    root = save_tiny_folder(tmp_path)
    base = ["trace", "--model", str(root / "model"), "--transcoders", str(root / "clt")]
    assert main([*base, "the cat sat on the mat", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "longest" in out and "counted by an encoder pass" in out  # no L0 recorded
    assert main([*base, " ".join(["word"] * 80), "--estimate"]) == 2  # context: 64
    err = errors(capsys)
    assert len(err) == 1 and "context is 64" in err[0]
    rc = main([*base, "the cat sat on the mat", "--estimate", "exact", "--max-feature-nodes",
               "50", "--memory-limit", "0.00001"])  # fmt: skip
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and "feature budget" in err[0] and "GB" in err[0]
