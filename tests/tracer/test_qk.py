"""QK attributions are exact: the (query node x key node) pairs plus the constant terms equal the
model's own pre-softmax attention score, read from an ordinary forward pass (the query and key
tensors the attention module hands to its attention function, RoPE and q/k norms applied by
transformers itself), on every architecture (Qwen2's q/k biases, Qwen3's and Gemma-3's q/k
norms, Gemma's sliding windows) and on SmolLM2 cut to 4 layers; and the scores' differences
across keys equal the log-ratios of the recorded attention pattern."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from model_fixtures import TINY_TYPES, TinyTokenizer, make_random_clt, tiny_config
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tracer.attention import HeadAnalysisError
from tracer.attention.qk import BIAS, qk_attribution
from tracer.attribution import FrozenLinearModel
from tracer.hooks import ATTN_IMPLEMENTATION
from tracer.model import LanguageModel
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13, 64, 3])
RECORDING = "qk_test_recording"


def _recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own eager attention, keeping the query and key it was given."""
    module._qk_test_seen = (query.detach().clone(), key.detach().clone(), kwargs.get("scaling"))
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(RECORDING, _recording_attention)
AttentionMaskInterface.register(RECORDING, eager_mask)


def model_scores(model, tokens) -> torch.Tensor:
    """Pre-softmax scores [L, H, P, P] (before soft-cap and mask) of an ordinary forward pass."""
    model.hf.set_attn_implementation(RECORDING)
    try:
        with torch.no_grad():
            model.hf(input_ids=tokens[None], use_cache=False)
    finally:
        model.hf.set_attn_implementation(ATTN_IMPLEMENTATION)
    out = []
    groups = model.facts.n_heads // model.facts.n_kv_heads
    for layer in model.layers():
        attn = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        q, k, scaling = attn._qk_test_seen
        k = k.repeat_interleave(groups, dim=1) if k.shape[1] != q.shape[1] else k
        out.append((q[0] @ k[0].transpose(-1, -2)) * scaling)
    return torch.stack(out).double()


def build(model_type, sliding: bool = False, seed: int = 0) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    if sliding:  # windowed layers 0 and 2, a global layer 1
        cfg.sliding_window = 3
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "bias" in name:  # nonzero biases (Qwen2's q/k/v, GPT-2's): constant terms
                p.add_(0.1 * torch.randn_like(p))
    return LanguageModel(hf, TinyTokenizer(), name=f"tiny-{model_type}")


def visible_sample(model, n_pos, n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        l = int(rng.integers(model.facts.n_layers))
        h = int(rng.integers(model.facts.n_heads))
        q = int(rng.integers(1, n_pos))
        k = int(rng.integers(0, q + 1))
        w = getattr(model.layers()[l].self_attn if hasattr(model.layers()[l], "self_attn")
                    else None, "sliding_window", None)  # fmt: skip
        if w and q - k >= w:
            continue
        out.append((l, h, q, k))
    return out


def check_model(rm, tokens, n=6, skip=False):
    model = rm.model
    want = model_scores(model, tokens)
    state = rm.record(tokens)
    lin = FrozenLinearModel(rm, state, dtype=torch.float64)
    worst = 0.0
    for l, h, q, k in visible_sample(model, len(tokens), n):
        res = qk_attribution(rm, tokens, l, h, q, k, top=10**6, state=state, lin=lin)
        ref = float(want[l, h, q, k])
        scale = max(1.0, abs(ref))
        worst = max(worst, abs(res.score - ref) / scale, abs(res.recorded_score - ref) / scale)
        # every pair, bias rows included, sums to the score; so do each side's marginals
        assert sum(v for _, _, v in res.pairs) == pytest.approx(res.score, abs=1e-9 * scale)
        assert sum(v for _, v in res.query_marginals) == pytest.approx(res.score, abs=1e-9 * scale)
        assert sum(v for _, v in res.key_marginals) == pytest.approx(res.score, abs=1e-9 * scale)
        bb = [v for a, b, v in res.pairs if a == BIAS and b == BIAS]
        assert bb == [pytest.approx(res.constants["bias_x_bias"])]
        assert res.n_query_nodes > 0 and res.n_key_nodes > 0
    return worst


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_pairs_plus_constants_equal_model_score(model_type):
    model = build(model_type)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    assert check_model(rm, TOKENS) <= 1e-5


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2"])
def test_sliding_windows_and_skip_transcoder(model_type):
    model = build(model_type, sliding=True)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16, kind="plt", skip=True,
                                                 input_site="resid_mid"))  # fmt: skip
    assert check_model(rm, TOKENS, n=8) <= 1e-5


def test_score_differences_equal_pattern_log_ratios():
    """Independent of any recorded query or key: softmax makes log A[q, k] - log A[q, k']
    the score difference (Gemma-3, sliding windows, q/k norms, RoPE)."""
    model = build("gemma3_text", sliding=True)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    state = rm.record(TOKENS)
    lin = FrozenLinearModel(rm, state, dtype=torch.float64)
    for l, h, q in [(0, 1, 7), (1, 3, 8), (2, 0, 5)]:
        keys = [k for k in range(q + 1) if not (l != 1 and q - k >= 3)]
        s = [qk_attribution(rm, TOKENS, l, h, q, k, state=state, lin=lin) for k in keys]
        logp = torch.log(state.patterns[l, h, q, keys].double())
        got = torch.tensor([r.score for r in s], dtype=torch.float64)
        torch.testing.assert_close(got - got[0], logp - logp[0], atol=1e-4, rtol=0)
        assert s[0].pattern == pytest.approx(float(state.patterns[l, h, q, keys[0]]))


def test_layer_zero_score_is_one_token_pair():
    """Before layer 0 the residual is the embeddings alone (no bias in Llama's norm or q/k
    projections): the whole score is the one (query token, key token) pair."""
    model = build("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    res = qk_attribution(rm, TOKENS, 0, 2, 6, 3, top=10**6)
    assert [(a, b) for a, b, v in res.pairs if v != 0] == [("t_6", "t_3")]
    assert res.pairs[0][2] == pytest.approx(res.score, rel=1e-9)
    assert res.score == pytest.approx(float(model_scores(model, TOKENS)[0, 2, 6, 3]), rel=1e-6)


def test_bad_requests_are_one_clear_line():
    model = build("gemma3_text", sliding=True)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    cases = [
        ((3, 0, 5, 2), "layer 3 is out of range: the model has layers 0..2"),
        ((0, 4, 5, 2), "head 4 is out of range"),
        ((0, 0, 2, 5), "key position 5 is after query position 2"),
        ((0, 0, 9, 2), "query position 9 is out of range"),
        ((0, 0, 7, 2), "outside layer 0's sliding window of 3 positions seen from query 7: "
                       "give a key in 5..7"),
    ]  # fmt: skip
    for args, msg in cases:
        with pytest.raises(HeadAnalysisError, match=msg.replace("(", r"\(")):
            qk_attribution(rm, TOKENS, *args)
    # the global layer sees it
    assert qk_attribution(rm, TOKENS, 1, 0, 7, 2).n_key_nodes > 0


@pytest.mark.slow
def test_smollm2_truncated(smollm2):
    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    rm = ReplacementModel(smollm2, clt)
    tokens = smollm2.tokenize("The capital of the state containing Dallas is")
    assert check_model(rm, tokens, n=4) <= 1e-5


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer and a random CLT (folders), and two graphs of one
    prompt saved from it: with head loadings (full and circuit) and without."""
    from model_fixtures import save_tiny_folder

    from tracer.attribution import attribute
    from tracer.cli.trace_cmd import load_replacement
    from tracer.prune import prune

    root = save_tiny_folder(tmp_path_factory.mktemp("qk"))
    rm = load_replacement(str(root / "model"), str(root / "clt"))  # as the command loads it
    graph = attribute(rm, "The cat sat on the mat", progress=False, head_loadings=True)
    circuit = prune(graph)
    circuit.extra["head_loadings"] = graph.extra["head_loadings"]
    plain = attribute(rm, "The cat sat on the mat", progress=False)
    return {
        "root": root,
        "rm": rm,
        "full": graph.save(root / "g.full.parquet"),
        "circuit": circuit.save(root / "g.parquet"),
        "plain": plain.save(root / "plain.parquet"),
        "graph": graph,
    }


def _args(traced, *extra, graph="full"):
    return ["qk", str(traced[graph]), "--model", str(traced["root"] / "model"),
            "--transcoders", str(traced["root"] / "clt"), *extra]  # fmt: skip


def test_qk_command_prints_the_split(traced, capsys):
    from tracer.cli import main

    assert main(_args(traced, "--layer", "1", "--head", "2", "--query", "5", "--key", "2",
                      "--top", "5")) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "head L1.H2: query 5" in out and "top pairs (query node x key node):" in out
    assert "query-side marginals" in out and "constants: bias x bias" in out
    assert main(_args(traced, "--layer", "1", "--head", "2", "--query", "5", "--key", "2",
                      "--json")) == 0  # fmt: skip
    (res,) = json.loads(capsys.readouterr().out)
    rm = traced["rm"]
    want = model_scores(rm.model, torch.as_tensor(traced["graph"].tokens))[1, 2, 5, 2]
    assert res["score"] == pytest.approx(float(want), abs=1e-5)


def test_qk_edge_reads_the_graphs_head_loadings(traced, capsys):
    from tracer.attention import read_head_loadings
    from tracer.cli import main
    from tracer.graph import Graph

    circuit = Graph.load(traced["circuit"])
    loads = read_head_loadings(circuit)
    pos = {circuit.node_id(i): int(circuit.position[i]) for i in range(circuit.n_nodes)}
    with_heads = [k for k, v in loads.items() if v.heads]
    cross = [k for k in with_heads if pos[k[0]] != pos[k[1]]]
    t, s = (cross or with_heads)[0]
    assert main(_args(traced, "--edge", t, s, "--top-heads", "1", graph="circuit")) == 0
    out = capsys.readouterr().out
    assert out.startswith("edge ") and "residual (no attention hop)" in out
    l, h, _ = loads[(t, s)].heads[0]
    assert f"head L{l}.H{h}" in out


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [x for x in captured.err.strip().splitlines() if x.startswith("circuit-atlas: error")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("extra,msg", [
    (["--layer", "7", "--head", "0", "--query", "3", "--key", "1"], "layer 7 is out of range"),
    (["--layer", "0", "--head", "9", "--query", "3", "--key", "1"], "head 9 is out of range"),
    (["--layer", "0", "--head", "0", "--query", "2", "--key", "4"], "is after query position"),
    (["--layer", "0", "--head", "0"], "give --layer, --head, --query and --key"),
    (["--edge", "f_0_1_2", "t_0"], "is not among the"),
])  # fmt: skip
def test_qk_bad_input_is_one_line_exit_2(traced, capsys, extra, msg):
    from tracer.cli import main

    assert main(_args(traced, *extra)) == 2
    assert msg in _one_line_error(capsys)


def test_qk_edge_on_a_graph_without_loadings(traced, capsys):
    from tracer.cli import main

    assert main(_args(traced, "--edge", "f_0_1_2", "t_0", graph="plain")) == 2
    assert "has no head loadings: trace it with 'circuit-atlas trace ... --heads'" in (
        _one_line_error(capsys)
    )


@pytest.mark.slow
def test_gemma3_270m_truncated(gemma3):
    """The real Gemma-3-270M (6 layers: five sliding-window layers and a global one; per-head
    q/k norms, RoPE with local and global bases, 4 query heads sharing 1 key/value head)."""
    clt = make_random_clt(6, gemma3.facts.d_model, 64, seed=2)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    rm = ReplacementModel(gemma3, clt)
    tokens = gemma3.tokenize("The capital of the state containing Dallas is")
    assert check_model(rm, tokens, n=6) <= 1e-5


def test_trace_heads_writes_loadings_into_both_files(traced, tmp_path, capsys):
    from tracer.attention import read_head_loadings
    from tracer.cli import main
    from tracer.graph import Graph

    root = traced["root"]
    args = ["trace", "The cat sat on the mat", "--model", str(root / "model"), "--transcoders",
            str(root / "clt"), "--out", str(tmp_path), "--max-feature-nodes", "0"]  # fmt: skip
    assert main([*args, "--heads"]) == 0
    out = capsys.readouterr().out
    assert "head loadings: " in out and "circuit edges" in out
    full = Graph.load(next(tmp_path.glob("*.full.parquet")))
    pruned_path = next(p for p in tmp_path.glob("*.parquet") if ".full." not in p.name)
    pruned = Graph.load(pruned_path)
    assert len(read_head_loadings(full)) == len(read_head_loadings(pruned)) == pruned.n_edges
    # without --heads: other files (the cache key differs), no loadings
    assert main(args) == 0
    capsys.readouterr()
    fulls = list(tmp_path.glob("*.full.parquet"))
    assert len(fulls) == 2
    assert sorted("head_loadings" in Graph.load(p).extra for p in fulls) == [False, True]
    assert main(_args({"full": pruned_path, "root": root}, "--edge",
                      *next(iter(read_head_loadings(pruned))))) == 0  # fmt: skip
    assert "residual (no attention hop)" in capsys.readouterr().out
