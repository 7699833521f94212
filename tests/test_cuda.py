"""The engine on a CUDA GPU: the same results as on the CPU.

Runs when torch sees a GPU (``scripts/device_check.sh`` runs it on one: ``pytest -m cuda``);
otherwise every test here is reported as skipped with the reason. Uses the 4-layer SmolLM2 and
small random transcoders, so it takes seconds on a GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_fixtures import keyed_edges, make_random_clt, tiny_training_run

from tracer.analyses.validate import validate
from tracer.attribution import attribute
from tracer.interventions import FeatureEdit, intervene
from tracer.model import LanguageModel, truncate_layers
from tracer.replacement import ReplacementModel
from tracer.spliced_metrics import activation_fn, spliced_metrics
from tracer.steer import generate_batch
from transcoders.contexts import ContextConfig, collect_activations
from transcoders.device import DeviceSetting
from transcoders.formats import load_transcoder, save_transcoder
from transcoders.training.run import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch"),
]

PROMPT = "The capital of France is"
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def clt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "clt"
    save_transcoder(make_random_clt(4, 576, n_features=64, seed=0, skip=True), path)
    return path


@pytest.fixture(scope="module")
def rm_cpu(smollm2, clt_dir):
    return ReplacementModel(smollm2, load_transcoder(clt_dir))


@pytest.fixture(scope="module")
def rm_cuda(smollm2, clt_dir):
    model = truncate_layers(smollm2, 4).to(CUDA)
    return ReplacementModel(model, load_transcoder(clt_dir, device=model.setting))


def test_load_on_cuda(clt_dir):
    m = LanguageModel.load("smollm2", device="cuda", dtype="bfloat16")
    assert m.device == CUDA and m.dtype == torch.bfloat16
    assert {p.device for p in m.hf.parameters()} == {CUDA}
    clt = load_transcoder(clt_dir, device="cuda", dtype="bfloat16")
    assert clt.device == CUDA and clt.W_enc.dtype == torch.bfloat16
    assert not clt.decoder_loaded(2)
    rows = clt.decoder_rows(2, torch.tensor([1, 3]))  # rows read from disk, moved to the GPU
    assert rows.device == CUDA and rows.dtype == torch.bfloat16
    assert clt.decoder(3).device == CUDA  # a lazy decoder lands on the GPU when read
    run = m.run(m.tokenize(PROMPT), record=False)
    assert run.logits.device == CUDA
    assert m.decode([int(run.logits[0, -1].argmax())]) == " Paris"


def test_record_matches_cpu(rm_cpu, rm_cuda, smollm2):
    tokens = smollm2.tokenize(PROMPT)
    a, b = rm_cpu.record(tokens), rm_cuda.record(tokens)
    assert b.errors.device == CUDA and b.feat_value.device == CUDA
    assert b.errors.dtype == torch.float32
    torch.testing.assert_close(b.sites["mlp_out"].cpu(), a.sites["mlp_out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.logits.cpu(), a.logits, atol=1e-3, rtol=1e-4)


def test_attribution_on_cuda_matches_cpu(rm_cpu, rm_cuda):
    g_cpu = attribute(rm_cpu, PROMPT, progress=False)
    g_gpu = attribute(rm_cuda, PROMPT, progress=False)
    e_cpu, e_gpu = keyed_edges(g_cpu)[1], keyed_edges(g_gpu)[1]
    common = sorted(set(e_cpu) & set(e_gpu))
    assert len(common) >= 0.99 * len(e_cpu)
    a = np.array([e_gpu[k] for k in common])
    b = np.array([e_cpu[k] for k in common])
    # Same float32 arithmetic in another order (cuBLAS vs MKL, TF32 off by default for matmuls).
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_interventions_validate_steer_on_cuda(rm_cuda, smollm2):
    state = rm_cuda.record(smollm2.tokenize(PROMPT))
    l, f = int(state.feat_layer[0]), int(state.feat_index[0])
    res = intervene(rm_cuda, state, [FeatureEdit(l, f, op="ablate")])
    assert res.logits.device == CUDA and res.pre.device == CUDA
    graph = attribute(rm_cuda, PROMPT, progress=False)
    report = validate(rm_cuda, graph, max_circuit=4, n_random=4, progress=False)
    assert report.constrained_max_rel_error < 1e-4
    plain, steered = generate_batch(
        rm_cuda, PROMPT, [[], [FeatureEdit(l, f, op="set", value=50.0)]], max_new_tokens=4
    )
    cpu_model = smollm2
    ids = cpu_model.tokenize(PROMPT)[None]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, cpu_model.hf(input_ids=ids).logits[0, -1].argmax().view(1, 1)], 1)
    assert plain.new_tokens == ids[0, -4:].tolist()  # greedy decoding agrees with the CPU
    assert len(steered.new_tokens) == 4


def test_splice_and_contexts_on_cuda(rm_cuda, smollm2):
    tokens = smollm2.tokenize(PROMPT)[None].repeat(2, 1)
    m = spliced_metrics(rm_cuda.model, rm_cuda.transcoder, tokens)
    assert np.isfinite([m.kl, m.top1]).all()
    got = collect_activations(
        rm_cuda.transcoder, activation_fn(rm_cuda.model), tokens, ContextConfig(top_k=2)
    )
    assert got["top_v"].device.type == "cpu" and got["count"].sum() > 0


def test_training_steps_on_cuda(tmp_path):
    model, tokens, cfg = tiny_training_run(steps=4)
    model.to(CUDA)
    common = dict(
        activations=activation_fn(model),
        train_tokens=tokens[:10],
        heldout_tokens=tokens[10:],
        n_layers=2,
        d_model=32,
        progress=False,
        plot=False,
        spliced_eval=lambda clt: spliced_metrics(model, clt, tokens[10:]).as_dict(),
    )
    gpu = train(cfg, out_dir=tmp_path / "gpu", device=DeviceSetting.parse("cuda"), **common)
    assert gpu.steps == 4 and np.isfinite(gpu.metrics["nmse"])
    # The same run on the CPU (the model moved back) lands on nearly the same weights.
    cpu_model = copy.deepcopy(model).to("cpu")
    common["activations"] = activation_fn(cpu_model)
    common["spliced_eval"] = None
    cpu = train(cfg, out_dir=tmp_path / "cpu", device="cpu", **common)
    torch.testing.assert_close(gpu.clt.W_enc, cpu.clt.W_enc, atol=1e-3, rtol=1e-3)
