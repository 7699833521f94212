"""EleutherAI sparsify transcoders: folders written by hand in sparsify's layout (from its format
description: per-hookpoint cfg.json + sae.safetensors in a run folder), loaded and checked
against a forward pass computed here from that description. sparsify itself is not needed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from transcoders import TranscoderFormatError, detect_format, load_transcoder

D, F, K = 6, 10, 3


def sparsify_cfg(**over) -> dict:
    """cfg.json as sparsify writes it: SparseCoderConfig's fields plus d_in."""
    return {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": F,
        "k": K,
        "multi_topk": False,
        "skip_connection": True,
        "transcode": True,
        "d_in": D,
        **over,
    }


def random_weights(seed: int, skip: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": torch.randn(F, D, generator=g) / D**0.5,
        "encoder.bias": 0.2 * torch.randn(F, generator=g),
        "W_dec": torch.randn(F, D, generator=g) / F**0.5,
        "b_dec": 0.1 * torch.randn(D, generator=g),
    }
    if skip:
        t["W_skip"] = 0.3 * torch.randn(D, D, generator=g)
    return t


def write_hookpoint(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae.safetensors"))


def reference_forward(x: torch.Tensor, t: dict, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's transcoder, token by token: ReLU(W x + b), keep the k largest, decode, add the
    skip term x W_skip^T. x [N, d] -> (activations [N, F], output [N, d])."""
    acts = torch.zeros(x.shape[0], F)
    out = torch.zeros(x.shape[0], D)
    for n in range(x.shape[0]):
        pre = torch.relu(t["encoder.weight"] @ x[n] + t["encoder.bias"])
        for j in sorted(range(F), key=lambda j: -float(pre[j]))[:k]:
            acts[n, j] = pre[j]
            out[n] += pre[j] * t["W_dec"][j]
        out[n] += t["b_dec"]
        if "W_skip" in t:
            out[n] += t["W_skip"] @ x[n]
    return acts, out


def write_run(root) -> dict[int, dict]:
    """A sparsify run folder: hookpoints layers.0.mlp and layers.2.mlp of a 3-layer model, with
    the trainer's other files beside them and a best/ copy that must not be read."""
    weights = {0: random_weights(0), 2: random_weights(2)}
    for layer, t in weights.items():
        write_hookpoint(root / f"layers.{layer}.mlp", sparsify_cfg(), t)
    write_hookpoint(root / "best" / "layers.1.mlp", sparsify_cfg(), random_weights(9))
    (root / "config.json").write_text(json.dumps({"model": "tiny-llama", "batch_size": 2}))
    (root / "state.pt").write_bytes(b"not read")
    return weights


def test_run_folder_placed_at_model_layers_matches_reference(tmp_path):
    weights = write_run(tmp_path / "run")
    assert detect_format(tmp_path / "run") == "sparsify"
    tc = load_transcoder(tmp_path / "run", n_layers=3, d_model=D)
    cfg = tc.cfg
    assert (cfg.kind, cfg.activation, cfg.topk, cfg.skip) == ("plt", "topk", K, True)
    assert cfg.input_site == "mlp_in" and cfg.model_name == "tiny-llama"
    assert cfg.n_layers == 3 and cfg.empty_layers == [1]
    assert not any(tc.decoder_loaded(i) for i in (0, 2))  # lazy: decoders read on first use
    x = torch.randn(3, 7, D)
    acts = tc.encode(x)
    out = tc.decode(acts, x)
    for layer, t in weights.items():
        ref_acts, ref_out = reference_forward(x[layer], t)
        torch.testing.assert_close(acts[layer], ref_acts)
        torch.testing.assert_close(out[layer], ref_out)
        assert int((acts[layer] > 0).sum(-1).max()) == K
    assert acts[1].abs().sum() == 0 and out[1].abs().sum() == 0
    # Compact placement (no n_layers): the two hookpoints stacked, naming their model layers.
    compact = load_transcoder(tmp_path / "run")
    assert compact.cfg.n_layers == 2 and compact.cfg.model_layers == [0, 2]
    torch.testing.assert_close(compact.encode(x[[0, 2]]), acts[[0, 2]])


def test_sparse_decode_reads_rows_and_device_dtype(tmp_path):
    weights = write_run(tmp_path / "run")
    tc = load_transcoder(tmp_path / "run", n_layers=3, dtype="bfloat16")
    assert tc.dtype == torch.bfloat16 and tc.device.type == "cpu"
    t = torch.tensor
    out = tc.decode_sparse(t([0, 2]), t([1, 0]), t([4, 7]), t([2.0, 3.0]), n_pos=2)
    assert not tc.decoder_loaded(0) and not tc.decoder_loaded(2)  # rows only
    expected = torch.zeros(3, 2, D)
    expected[0, 1] = 2.0 * weights[0]["W_dec"][4].bfloat16().float()
    expected[2, 0] = 3.0 * weights[2]["W_dec"][7].bfloat16().float()
    torch.testing.assert_close(out, expected)
    assert tc.decoder(2).dtype == torch.bfloat16


def test_single_hookpoint_folder_and_its_files(tmp_path):
    t = random_weights(4, skip=False)
    write_hookpoint(tmp_path / "tc", sparsify_cfg(skip_connection=False, k=2), t)
    assert detect_format(tmp_path / "tc") == "sparsify"
    with pytest.raises(TranscoderFormatError, match="part of a sparsify folder: load"):
        detect_format(tmp_path / "tc" / "sae.safetensors")
    with pytest.raises(TranscoderFormatError, match="part of a sparsify folder"):
        detect_format(tmp_path / "tc" / "cfg.json")
    tc = load_transcoder(tmp_path / "tc", layer=1, n_layers=2)  # the name does not say
    assert not tc.cfg.skip and tc.cfg.topk == 2 and tc.cfg.empty_layers == [0]
    x = torch.randn(2, 5, D)
    ref_acts, ref_out = reference_forward(x[1], t, k=2)
    acts = tc.encode(x)
    torch.testing.assert_close(acts[1], ref_acts)
    torch.testing.assert_close(tc.decode(acts)[1], ref_out)
    with pytest.raises(TranscoderFormatError, match="does not say which model layer"):
        load_transcoder(tmp_path / "tc", n_layers=2)


@pytest.mark.parametrize(
    "name,cfg,tensors,match",
    [
        ("layers.0.mlp", {"transcode": False}, {}, "SAE .*not a transcoder"),
        ("layers.0.mlp", {"activation": "groupmax"}, {}, "'groupmax' is not supported"),
        ("layers.3", {}, {}, "hookpoint 'layers.3' is not an MLP"),
        ("layers.3.self_attn", {}, {}, "is not an MLP"),
        ("layers.0.mlp", {"num_latents": F + 1}, {}, r"encoder.weight has shape \(10, 6\)"),
        ("layers.0.mlp", {}, {"W_skip": None}, "has no tensor .W_skip."),
    ],
)
def test_what_is_refused(tmp_path, name, cfg, tensors, match):
    t = {k: v for k, v in {**random_weights(5), **tensors}.items() if v is not None}
    write_hookpoint(tmp_path / "run" / name, sparsify_cfg(**cfg), t)
    with pytest.raises(TranscoderFormatError, match=match):
        load_transcoder(tmp_path / "run")
