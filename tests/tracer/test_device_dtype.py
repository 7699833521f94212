"""The device/dtype setting through every public entry point that computes, on the CPU.

Each entry point takes the setting (``device=``/``dtype=`` strings or a DeviceSetting) or follows
the model it is given, and returns results there; ``device="cuda"`` on a machine without a GPU
is the one clear DeviceError line. A bfloat16 SmolLM2 (4 layers) loads, traces, validates and
steers, and its edges match the float32 run of the same bfloat16-rounded weights within a bound
derived from bfloat16's precision (see ``test_bf16_edges_match_float32_of_the_same_weights``).
The same checks on a GPU are in tests/test_cuda.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_fixtures import keyed_edges, make_random_clt

from tracer.analyses.validate import validate
from tracer.attribution import attribute
from tracer.interventions import FeatureEdit, intervene
from tracer.model import LanguageModel
from tracer.replacement import ReplacementModel
from tracer.spliced_metrics import mlp_activations, spliced_metrics
from tracer.steer import generate_batch
from transcoders.contexts import ContextConfig, collect_activations, promoted_tokens
from transcoders.device import DeviceError, DeviceSetting
from transcoders.formats import load_transcoder, save_transcoder
from transcoders.training.harvest import ShuffleBuffer
from transcoders.training.run import TrainConfig, init_distributed, train

PROMPT = "The capital of France is"
BF16 = torch.bfloat16
NO_GPU = not torch.cuda.is_available()
no_gpu_only = pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU error; a GPU is present")


def _clt(n_features=64, seed=0, skip=False):
    return make_random_clt(4, 576, n_features=n_features, seed=seed, skip=skip)


@pytest.fixture(scope="module")
def clt_bf16():
    """A random CLT for the 4-layer SmolLM2, its weights in bfloat16."""
    return _clt().to(dtype=BF16)


@pytest.fixture(scope="module")
def clt_bf16_as_f32(clt_bf16):
    return copy.deepcopy(clt_bf16).to(dtype=torch.float32)


@pytest.fixture(scope="module")
def rm_bf16(smollm2_bf16, clt_bf16):
    return ReplacementModel(smollm2_bf16, clt_bf16)


@pytest.fixture(scope="module")
def rm_bf16_as_f32(smollm2_bf16_as_f32, clt_bf16_as_f32):
    return ReplacementModel(smollm2_bf16_as_f32, clt_bf16_as_f32)


@pytest.fixture(scope="module")
def graphs(rm_bf16, rm_bf16_as_f32):
    """(bfloat16 graph, float32 graph of the same rounded weights) of one prompt."""
    return (
        attribute(rm_bf16, PROMPT, progress=False),
        attribute(rm_bf16_as_f32, PROMPT, progress=False),
    )


# --- model loading ---------------------------------------------------------------------------


def test_language_model_load_in_bfloat16(smollm2_full):
    m = LanguageModel.load("smollm2", device="cpu", dtype="bfloat16")
    assert m.device == torch.device("cpu") and m.dtype == BF16
    assert m.setting == DeviceSetting(torch.device("cpu"), BF16)
    assert {p.dtype for p in m.hf.parameters()} == {BF16}
    # The same weights as the float32 load, rounded once to bfloat16.
    w32 = smollm2_full.hf.model.layers[3].mlp.down_proj.weight
    assert torch.equal(m.hf.model.layers[3].mlp.down_proj.weight, w32.to(BF16))
    run = m.run(m.tokenize(PROMPT), record_sites=("mlp_out",))
    assert run.logits.dtype == BF16 and run.sites["mlp_out"].dtype == BF16
    assert run.logits.device.type == "cpu"
    # bfloat16 still predicts Paris.
    assert m.decode([int(run.logits[0, -1].argmax())]) == " Paris"


@no_gpu_only
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    save_transcoder(_clt(8), tmp_path / "t")
    message = "no CUDA GPU is visible to torch: use --device cpu"
    with pytest.raises(DeviceError, match=message):
        LanguageModel.load("smollm2", device="cuda")
    with pytest.raises(DeviceError, match=message):
        load_transcoder(tmp_path / "t", device="cuda")
    with pytest.raises(DeviceError, match=message):
        train(
            TrainConfig(steps=1),
            activations=None,
            train_tokens=None,
            heldout_tokens=None,
            n_layers=4,
            d_model=576,
            out_dir=tmp_path / "run",
            device="cuda",
        )
    with pytest.raises(DeviceError, match=message):
        ShuffleBuffer.harvest(None, torch.zeros(1, 2, dtype=torch.long), device="cuda:1")
    with pytest.raises(DeviceError, match="unknown dtype 'float8'"):
        LanguageModel.load("smollm2", dtype="float8")


def test_model_and_transcoder_on_different_devices_are_refused(smollm2):
    clt = _clt(8).to("meta")  # a device other than the model's, without a GPU
    with pytest.raises(DeviceError, match="the transcoder is on meta but the model on cpu"):
        ReplacementModel(smollm2, clt)


# --- transcoder loading ----------------------------------------------------------------------


@pytest.mark.parametrize("lazy", [True, False])
@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_load_transcoder_in_bfloat16(tmp_path, lazy, kind):
    src = make_random_clt(3, 32, n_features=16, kind=kind, seed=1, skip=True)
    save_transcoder(src, tmp_path / "t")
    clt = load_transcoder(tmp_path / "t", lazy=lazy, device="cpu", dtype="bfloat16")
    assert clt.dtype == BF16 and clt.device == torch.device("cpu")
    assert clt.W_enc.dtype == BF16 and clt.W_skip.dtype == BF16 and clt.b_dec.dtype == BF16
    assert clt.decoder_loaded(1) is (not lazy)
    rows = clt.decoder_rows(1, torch.tensor([0, 5]))  # a lazy one reads only these rows
    assert rows.dtype == BF16 and torch.equal(rows, src.decoder(1)[[0, 5]].to(BF16))
    assert torch.equal(clt.decoder(2), src.decoder(2).to(BF16))  # read now, in bfloat16
    assert clt.decoder(2).dtype == BF16
    # Products in float32: equal to float32 arithmetic on the rounded weights, exactly.
    x = torch.randn(5, 32).to(BF16)
    pre = clt.pre_activations(1, x)
    assert pre.dtype == torch.float32
    ref = x.float() @ src.W_enc[1].to(BF16).float().T + src.b_enc[1].to(BF16).float()
    assert torch.equal(pre, ref)
    assert clt.affine((5,), torch.randn(3, 5, 32)).dtype == torch.float32
    # A DeviceSetting works as well as the strings.
    same = load_transcoder(tmp_path / "t", device=DeviceSetting.parse("cpu", "bfloat16"))
    assert torch.equal(same.W_enc, clt.W_enc)


# --- recording, attribution, interventions, validation, steering ------------------------------


def test_record_of_a_bf16_model_is_float32(rm_bf16, smollm2_bf16):
    tokens = smollm2_bf16.tokenize(PROMPT)
    state = rm_bf16.record(tokens)
    for t in (
        state.logits,
        state.patterns,
        state.inputs,
        state.pre,
        state.recon,
        state.errors,
        state.feat_value,
        *state.sites.values(),
        *state.scales.values(),
    ):
        assert t.dtype == torch.float32 and t.device.type == "cpu"
    # The recorded values are the bfloat16 run's, exactly (float32 holds every bfloat16).
    run = smollm2_bf16.run(tokens)
    assert torch.equal(state.sites["mlp_out"], run.sites["mlp_out"][0].float())
    assert torch.equal(state.logits, run.logits[0].float())
    # Reconstruction + error is the MLP output (to float32 rounding of the subtraction).
    torch.testing.assert_close(state.recon + state.errors, state.sites["mlp_out"])
    assert state.n_active > 20


def test_bf16_edges_match_float32_of_the_same_weights(graphs):
    """Both runs use the same (bfloat16-rounded) weights; they differ only in the precision
    of the forward pass that produced the recorded activations, attention patterns and norm
    denominators (attribution itself sums in float32 in both).

    The bound: bfloat16 keeps an 8-bit significand, so each rounding of a value is off by at
    most u = 2^-8 (about 0.0039) relative to it. A 4-layer forward rounds the residual stream
    about 4 times per layer (attention output, residual add, MLP output, residual add), so a
    recorded quantity carries at most about 4 * L * u = 16 u relative error (worst case: the
    errors add up along the depth). An edge is a product of such quantities along a path, so
    every common edge must satisfy |A_bf16 - A_fp32| <= 4 * L * u * max|A_fp32| (0.0625 of the
    largest edge); measured: about 0.008. Features whose pre-activation sits within that error
    of its threshold may switch on or off, so the node sets may differ by a few features.
    """
    g_bf, g_32 = graphs
    L, u = 4, 2.0**-8

    nodes_bf, e_bf = keyed_edges(g_bf)
    nodes_32, e_32 = keyed_edges(g_32)
    assert len(nodes_bf ^ nodes_32) <= 0.02 * len(nodes_32)
    common = sorted(set(e_bf) & set(e_32))
    assert len(common) >= 0.95 * len(e_32)
    a = np.array([e_bf[k] for k in common], dtype=np.float64)
    b = np.array([e_32[k] for k in common], dtype=np.float64)
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 4 * L * u * scale
    assert np.corrcoef(a, b)[0, 1] > 0.999
    # The logit targets and their probabilities agree too.
    assert g_bf.feature[g_bf.kind == 3][0] == g_32.feature[g_32.kind == 3][0]


def test_bf16_interventions_validate_and_steer(rm_bf16, graphs, smollm2_bf16):
    g_bf, _ = graphs
    state = rm_bf16.record(smollm2_bf16.tokenize(PROMPT))
    layer, pos, f = (int(t[0]) for t in (state.feat_layer, state.feat_pos, state.feat_index))
    res = intervene(rm_bf16, state, [FeatureEdit(layer, f, op="ablate")])
    assert res.logits.dtype == BF16 and res.pre.dtype == torch.float32
    assert res.acts[layer, pos, f] == 0 and state.feat_value[0] > 0

    report = validate(
        rm_bf16, g_bf, max_circuit=2, n_random=2, n_error=1, n_token=1, batch_size=8, progress=False
    )
    # The frozen bf16 forward reproduces the edge columns to bfloat16 precision (the bound of
    # the test above), where a float32 model does to ~1e-6.
    assert 0 < report.constrained_max_rel_error < 4 * 4 * 2.0**-8
    assert report.n_sampled >= 2 and report.n_constrained_columns == report.n_sampled + 2

    # Steering with no intervention is plain greedy decoding of the bf16 model.
    plain, steered = generate_batch(
        rm_bf16, PROMPT, [[], [FeatureEdit(layer, f, op="set", value=50.0)]], max_new_tokens=3
    )
    ids = smollm2_bf16.tokenize(PROMPT)[None]
    with torch.no_grad():
        for _ in range(3):
            nxt = smollm2_bf16.hf(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert plain.new_tokens == ids[0, -3:].tolist()
    assert len(steered.new_tokens) == 3


def test_splice_harvest_and_contexts_with_bf16(smollm2_bf16, clt_bf16):
    tokens = smollm2_bf16.tokenize("Hello there")[None].repeat(2, 1)
    x, y = mlp_activations(smollm2_bf16, tokens)
    assert x.dtype == torch.float32 and x.shape == (4, 2 * tokens.shape[1], 576)
    m = spliced_metrics(smollm2_bf16, clt_bf16, tokens)
    assert np.isfinite([m.kl, m.top1, m.ce_clean, m.ce_spliced]).all()
    buf = ShuffleBuffer.harvest(
        lambda t: mlp_activations(smollm2_bf16, t), tokens, dtype=BF16, device="cpu"
    )
    assert buf.inputs.dtype == BF16 and buf.get(torch.arange(3))[0].dtype == torch.float32
    got = collect_activations(
        clt_bf16, lambda t: mlp_activations(smollm2_bf16, t), tokens, ContextConfig(top_k=2)
    )
    assert got["top_v"].dtype == torch.float32 and got["count"].sum() > 0
    # Promoted tokens: float32 products of the bf16 decoders, the same as a float32 copy's.
    ti, tv, _, _ = promoted_tokens(clt_bf16, smollm2_bf16.unembed_matrix(), 3)
    ti32, tv32, _, _ = promoted_tokens(clt_bf16.float(), smollm2_bf16.unembed_matrix(), 3)
    assert torch.equal(ti, ti32) and torch.allclose(tv, tv32)


def test_train_on_the_named_device(tmp_path):
    from model_fixtures import tiny_training_run

    from tracer.spliced_metrics import activation_fn

    model, tokens, cfg = tiny_training_run(steps=3)
    res = train(
        cfg,
        activations=activation_fn(model),
        train_tokens=tokens[:10],
        heldout_tokens=tokens[10:],
        n_layers=2,
        d_model=32,
        out_dir=tmp_path / "run",
        device=DeviceSetting.parse("cpu"),
        progress=False,
        plot=False,
    )
    assert res.steps == 3 and res.clt.device.type == "cpu" and res.clt.dtype == torch.float32
    assert init_distributed(DeviceSetting()) is None  # one process: no process group
