"""Weight formats: round trips through every writable format, folders written by independent
reference writers (safetensors / numpy directly, from the format descriptions), lazy decoder
reads, and the errors bad inputs get."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import make_random_clt
from safetensors import safe_open
from safetensors.torch import save_file

from transcoders import (
    TranscoderFormatError,
    detect_format,
    load_transcoder,
    save_transcoder,
    transcoder_info,
)

L, D, F = 3, 8, 16

CASES = [
    ("circuit-tracer", "clt", "jumprelu", False),
    ("circuit-tracer", "clt", "relu", False),
    ("circuit-tracer", "clt", "topk", False),
    ("circuit-tracer", "clt", "jumprelu", True),
    ("circuit-tracer-plt", "plt", "jumprelu", False),
    ("circuit-tracer-plt", "plt", "relu", True),
    ("circuit-tracer-plt", "plt", "topk", False),
    ("saelens", "plt", "jumprelu", False),
    ("saelens", "plt", "relu", False),
    ("saelens", "plt", "topk", False),
    ("saelens", "plt", "relu", True),
]


def assert_same_tensors(a, b):
    assert a.cfg == b.cfg
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if a.cfg.activation == "jumprelu":
        assert torch.equal(a.threshold, b.threshold)
    if a.W_skip is not None:
        assert torch.equal(a.W_skip, b.W_skip)
    for i in range(a.cfg.n_layers):
        assert torch.equal(a.decoder(i), b.decoder(i)), f"decoder {i}"


@pytest.mark.parametrize("fmt,kind,activation,skip", CASES)
@pytest.mark.parametrize("lazy", [True, False])
def test_round_trip_is_exact(tmp_path, fmt, kind, activation, skip, lazy):
    clt = make_random_clt(L, D, F, kind=kind, activation=activation, skip=skip, seed=7)
    clt.cfg.model_name = "tiny-llama"
    clt.cfg.training = {"nmse": [0.1, 0.2, 0.3], "steps": 100}
    save_transcoder(clt, tmp_path / "t", fmt)
    assert detect_format(tmp_path / "t") == fmt
    back = load_transcoder(tmp_path / "t", lazy=lazy)
    assert back.decoder_loaded(0) is not lazy
    x = torch.randn(L, 2, 5, D)
    acts = clt.encode(x)
    assert torch.equal(back.encode(x), acts)
    assert torch.equal(back.decode(acts, x), clt.decode(acts, x))
    layer, pos, feat = acts[:, 0].nonzero(as_tuple=True)
    vals = acts[:, 0][layer, pos, feat]
    fresh = load_transcoder(tmp_path / "t", lazy=lazy)
    assert torch.equal(
        fresh.decode_sparse(layer, pos, feat, vals, 5), clt.decode_sparse(layer, pos, feat, vals, 5)
    )
    assert_same_tensors(back, clt)


def test_bfloat16_storage_rounds_weights_once(tmp_path):
    clt = make_random_clt(L, D, F, seed=1)
    save_transcoder(clt, tmp_path / "bf", dtype="bfloat16")
    with safe_open(str(tmp_path / "bf" / "W_dec_0.safetensors"), "pt") as f:
        assert f.get_slice("W_dec_0").get_dtype() == "BF16"
    back = load_transcoder(tmp_path / "bf")
    assert back.W_enc.dtype == torch.float32
    assert torch.equal(back.W_enc, clt.W_enc.bfloat16().float())
    assert torch.equal(back.decoder(1), clt.decoder(1).bfloat16().float())


# --- independent reference writers --------------------------------------------------------


def write_reference_clt(folder, clt, *, threshold=True, dtype=torch.float32, conf=None):
    """circuit-tracer CLT layout from its description: per layer i, W_enc_{i}.safetensors with
    W_enc_{i} [F, d], b_enc_{i} [F], b_dec_{i} [d], threshold_{i} [F], W_skip_{i} [d, d]
    (applied as x @ W_skip_{i}); W_dec_{i}.safetensors with W_dec_{i} [F, L - i, d]."""
    folder.mkdir()
    for i in range(clt.cfg.n_layers):
        enc = {
            f"W_enc_{i}": clt.W_enc[i].to(dtype).contiguous(),
            f"b_enc_{i}": clt.b_enc[i].to(dtype).contiguous(),
            f"b_dec_{i}": clt.b_dec[i].to(dtype).contiguous(),
        }
        if threshold:
            enc[f"threshold_{i}"] = clt.threshold[i].to(dtype).contiguous()
        if clt.W_skip is not None:
            enc[f"W_skip_{i}"] = clt.W_skip[i].T.to(dtype).contiguous()
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        dec = clt.decoder(i).to(dtype).contiguous()
        save_file({f"W_dec_{i}": dec}, str(folder / f"W_dec_{i}.safetensors"))
    if conf is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(conf))


def test_reference_circuit_tracer_clt_loads_same_tensors(tmp_path):
    ref = make_random_clt(L, D, F, skip=True, seed=11)
    conf = {
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
    }
    write_reference_clt(tmp_path / "ref", ref, conf=conf)
    assert detect_format(tmp_path / "ref") == "circuit-tracer"
    got = load_transcoder(tmp_path / "ref")
    assert got.cfg.kind == "clt" and got.cfg.activation == "jumprelu" and got.cfg.skip
    assert got.cfg.input_site == "mlp_in"
    assert got.cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ref.cfg.input_site, ref.cfg.model_name = "mlp_in", conf["model_name"]
    assert_same_tensors(got, ref)
    x = torch.randn(L, 4, D)
    # circuit-tracer's skip term is x @ W_skip_i as stored; ours reproduces it.
    with safe_open(str(tmp_path / "ref" / "W_enc_1.safetensors"), "pt") as f:
        stored_skip = f.get_tensor("W_skip_1")
    acts = got.encode(x)
    no_skip = got.decode(acts, torch.zeros_like(x))
    torch.testing.assert_close(got.decode(acts, x)[1] - no_skip[1], x[1] @ stored_skip)


def test_reference_clt_without_threshold_or_config_is_relu_at_resid_mid(tmp_path):
    ref = make_random_clt(L, D, F, activation="relu", seed=2)
    write_reference_clt(tmp_path / "ref", ref, threshold=False, dtype=torch.bfloat16)
    got = load_transcoder(tmp_path / "ref", lazy=False)
    # circuit-tracer's defaults: no threshold -> ReLU; no config -> hook_resid_mid.
    assert got.cfg.activation == "relu" and got.cfg.input_site == "resid_mid"
    assert got.cfg.model_name is None and not got.cfg.skip
    assert torch.equal(got.W_enc, ref.W_enc.bfloat16().float())
    assert torch.equal(got.decoder(0), ref.decoder(0).bfloat16().float())


def test_our_clt_files_match_the_format_description(tmp_path):
    clt = make_random_clt(L, D, F, skip=True, seed=4)
    clt.cfg.model_name = "m"
    save_transcoder(clt, tmp_path / "ours")
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(
        [f"W_enc_{i}.safetensors" for i in range(L)]
        + [f"W_dec_{i}.safetensors" for i in range(L)]
        + ["circuit_atlas.json", "config.yaml"]
    )
    for i in range(L):
        with safe_open(str(tmp_path / "ours" / f"W_enc_{i}.safetensors"), "pt") as f:
            assert set(f.keys()) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}",
                                     f"W_skip_{i}"}  # fmt: skip
            assert torch.equal(f.get_tensor(f"W_enc_{i}"), clt.W_enc[i])
            assert torch.equal(f.get_tensor(f"threshold_{i}"), clt.threshold[i])
            assert torch.equal(f.get_tensor(f"W_skip_{i}"), clt.W_skip[i].T)
        with safe_open(str(tmp_path / "ours" / f"W_dec_{i}.safetensors"), "pt") as f:
            assert set(f.keys()) == {f"W_dec_{i}"}
            assert f.get_tensor(f"W_dec_{i}").shape == (F, L - i, D)
    conf = yaml.safe_load((tmp_path / "ours" / "config.yaml").read_text())
    assert conf == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "model_name": "m",
    }
    saved = json.loads((tmp_path / "ours" / "circuit_atlas.json").read_text())
    assert saved["n_layers"] == L and saved["activation"] == "jumprelu" and saved["skip"]


def test_reference_circuit_tracer_per_layer_layout(tmp_path):
    ref = make_random_clt(L, D, F, kind="plt", skip=True, seed=9)
    folder = tmp_path / "plt"
    folder.mkdir()
    for i in range(L):
        save_file(
            {
                "W_enc": ref.W_enc[i].contiguous(),
                "W_dec": ref.decoder(i)[:, 0].contiguous(),
                "b_enc": ref.b_enc[i].contiguous(),
                "b_dec": ref.b_dec[i].contiguous(),
                "activation_function.threshold": ref.threshold[i].contiguous(),
                "W_skip": ref.W_skip[i].contiguous(),
            },
            str(folder / f"layer_{i}.safetensors"),
        )
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\n"
        "feature_output_hook: hook_mlp_out\n"
    )
    got = load_transcoder(folder)
    assert got.cfg.kind == "plt" and got.cfg.input_site == "resid_mid" and got.cfg.skip
    ref.cfg.input_site = "resid_mid"
    assert_same_tensors(got, ref)
    with pytest.raises(ValueError, match="covers 3 layers but the model has 5"):
        load_transcoder(folder, n_layers=5)


# --- SAELens and GemmaScope, written by hand ----------------------------------------------


def saelens_forward(x, W_enc, b_enc, W_dec, b_dec, *, threshold=None, k=None, W_skip=None,
                    b_dec_to_input=False):  # fmt: skip
    """SAELens's transcoder forward pass, from its description."""
    sae_in = x - b_dec if b_dec_to_input else x
    pre = sae_in @ W_enc + b_enc
    acts = torch.relu(pre)
    if threshold is not None:
        acts = acts * (pre > threshold)
    if k is not None:
        vals, idx = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    out = acts @ W_dec + b_dec
    if W_skip is not None:
        out = out + x @ W_skip.T
    return acts, out


def write_saelens(folder, cfg: dict, tensors: dict):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )


def random_sae(seed, d=D, f=F):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, f, generator=g) / d**0.5,
        "W_dec": torch.randn(f, d, generator=g) / f**0.5,
        "b_enc": 0.1 * torch.randn(f, generator=g),
        "b_dec": 0.1 * torch.randn(d, generator=g),
    }


def test_saelens_v6_jumprelu_transcoder_set(tmp_path):
    parent = tmp_path / "saes"
    expected = {}
    for layer in (1, 0):  # written out of order: the hook layer decides the placement
        t = random_sae(layer)
        t["threshold"] = torch.linspace(-0.2, 0.3, F)  # negative thresholds: SAELens ReLUs first
        cfg = {
            "architecture": "jumprelu_transcoder", "d_in": D, "d_sae": F, "d_out": D,
            "dtype": "float32", "apply_b_dec_to_input": False, "normalize_activations": "none",
            "metadata": {"model_name": "gemma-2-2b", "hook_name": f"blocks.{layer}.mlp.hook_in",
                         "hook_name_out": f"blocks.{layer}.hook_mlp_out"},
        }  # fmt: skip
        write_saelens(parent / f"tc_{'ab'[layer]}", cfg, t)
        expected[layer] = t
    assert detect_format(parent) == "saelens"
    got = load_transcoder(parent)
    assert got.cfg.kind == "plt" and got.cfg.n_layers == 2 and got.cfg.activation == "jumprelu"
    assert got.cfg.input_site == "mlp_in" and got.cfg.model_name == "gemma-2-2b"
    x = torch.randn(2, 6, D)
    acts = got.encode(x)
    out = got.decode(acts, x)
    for layer, t in expected.items():
        ref_acts, ref_out = saelens_forward(x[layer], **t)
        assert torch.equal(acts[layer], ref_acts)
        torch.testing.assert_close(out[layer], ref_out)
    assert (acts != 0).any()


def test_saelens_pre6_sae_config_with_output_hook_and_b_dec_shift(tmp_path):
    t = random_sae(3)
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.2.ln2.hook_normalized",
           "hook_point_layer": 2, "hook_name_out": "blocks.2.hook_mlp_out",
           "activation_fn_str": "relu", "model_name": "gpt2"}  # fmt: skip
    write_saelens(tmp_path / "sae", cfg, t)
    got = load_transcoder(tmp_path / "sae")  # compact: one layer, reading model layer 2
    assert got.cfg.n_layers == 1 and got.cfg.model_layers == [2]
    x = torch.randn(1, 5, D)
    ref_acts, ref_out = saelens_forward(x[0], **t, b_dec_to_input=True)
    acts = got.encode(x)
    torch.testing.assert_close(acts[0], ref_acts)
    torch.testing.assert_close(got.decode(acts)[0], ref_out)


def test_saelens_topk_and_skip_transcoders(tmp_path):
    t = random_sae(5)
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F,
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "hook_name": "blocks.0.hook_resid_mid",
        "hook_name_out": "blocks.0.hook_mlp_out",
    }
    write_saelens(tmp_path / "topk", cfg, t)
    got = load_transcoder(tmp_path / "topk")
    assert got.cfg.activation == "topk" and got.cfg.topk == 3 and got.cfg.input_site == "resid_mid"
    x = torch.randn(1, 5, D)
    ref_acts, ref_out = saelens_forward(x[0], **t, k=3)
    assert torch.equal(got.encode(x)[0], ref_acts)
    torch.testing.assert_close(got.decode(got.encode(x))[0], ref_out)

    s = random_sae(6)
    s["W_skip"] = 0.1 * torch.randn(D, D)
    cfg = {
        "architecture": "skip_transcoder",
        "d_in": D,
        "d_sae": F,
        "d_out": D,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.0.mlp.hook_in"},
    }
    write_saelens(tmp_path / "skip", cfg, s)
    got = load_transcoder(tmp_path / "skip")
    assert got.cfg.skip
    ref_acts, ref_out = saelens_forward(x[0], **s)
    torch.testing.assert_close(got.decode(got.encode(x), x)[0], ref_out)


def test_single_layer_source_placed_at_its_model_layer(tmp_path):
    t = random_sae(8)
    t["threshold"] = torch.full((F,), 0.05)
    cfg = {
        "architecture": "jumprelu_transcoder",
        "d_in": D,
        "d_sae": F,
        "d_out": D,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.2.mlp.hook_in"},
    }
    write_saelens(tmp_path / "one", cfg, t)
    placed = load_transcoder(tmp_path / "one", n_layers=4, d_model=D)
    assert placed.cfg.n_layers == 4 and placed.cfg.empty_layers == [0, 1, 3]
    assert placed.cfg.model_layers is None
    x = torch.randn(4, 5, D)
    acts = placed.encode(x)
    out = placed.decode(acts)
    assert acts[[0, 1, 3]].abs().sum() == 0 and out[[0, 1, 3]].abs().sum() == 0
    ref_acts, ref_out = saelens_forward(x[2], **t)
    assert torch.equal(acts[2], ref_acts)
    torch.testing.assert_close(out[2], ref_out)
    # Our own copy keeps the placement, and the SAELens copy skips the empty layers.
    save_transcoder(placed, tmp_path / "copy", "saelens")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["circuit_atlas.json",
                                                                     "layer_2"]  # fmt: skip
    again = load_transcoder(tmp_path / "copy")
    assert again.cfg == placed.cfg
    assert torch.equal(again.decode(again.encode(x)), out)
    with pytest.raises(TranscoderFormatError, match="reads model layer 2, but the model has 2"):
        load_transcoder(tmp_path / "one", n_layers=2)


def write_gemmascope(path, seed):
    g = torch.Generator().manual_seed(seed)
    params = {
        "W_enc": (torch.randn(D, F, generator=g) / D**0.5).numpy(),
        "W_dec": (torch.randn(F, D, generator=g) / F**0.5).numpy(),
        "b_enc": (0.1 * torch.randn(F, generator=g)).numpy(),
        "b_dec": (0.1 * torch.randn(D, generator=g)).numpy(),
        "threshold": np.linspace(-0.1, 0.2, F, dtype=np.float32),
    }
    path.parent.mkdir(parents=True)
    np.savez(path, **params)
    return {k: torch.from_numpy(v) for k, v in params.items()}


def test_gemmascope_npz_file_and_tree(tmp_path):
    root = tmp_path / "gemma-scope"
    p3 = write_gemmascope(root / "layer_3" / "width_16k" / "average_l0_50" / "params.npz", 3)
    p1 = write_gemmascope(root / "layer_1" / "width_16k" / "average_l0_40" / "params.npz", 1)
    one = load_transcoder(root / "layer_3" / "width_16k" / "average_l0_50" / "params.npz")
    assert one.cfg.n_layers == 1 and one.cfg.model_layers == [3]
    assert one.cfg.input_site == "mlp_in" and one.cfg.activation == "jumprelu"
    assert detect_format(root) == "gemmascope"
    both = load_transcoder(root, n_layers=4, lazy=False)
    assert both.cfg.empty_layers == [0, 2]
    x = torch.randn(4, 5, D)
    acts = both.encode(x)
    out = both.decode(acts)
    for layer, p in ((1, p1), (3, p3)):
        ref_acts, ref_out = saelens_forward(x[layer], **p)  # GemmaScope's JumpReLU is the same
        assert torch.equal(acts[layer], ref_acts)
        torch.testing.assert_close(out[layer], ref_out)
    assert acts[1].count_nonzero() > 0
    # A GemmaScope set converts to circuit-tracer's per-layer layout and back exactly.
    save_transcoder(both, tmp_path / "ct")
    back = load_transcoder(tmp_path / "ct")
    assert back.cfg == both.cfg
    assert torch.equal(back.decode(back.encode(x)), out)


# --- lazy loading --------------------------------------------------------------------------


def test_lazy_load_does_not_touch_decoder_files_until_used(tmp_path):
    clt = make_random_clt(L, D, F, seed=12)
    save_transcoder(clt, tmp_path / "t")
    (tmp_path / "t" / "W_dec_1.safetensors").unlink()
    (tmp_path / "t" / "W_dec_2.safetensors").write_bytes(b"not a safetensors file")
    lazy = load_transcoder(tmp_path / "t", lazy=True)  # encoders only: succeeds
    assert not any(lazy.decoder_loaded(i) for i in range(L))
    x = torch.randn(L, 4, D)
    assert torch.equal(lazy.encode(x), clt.encode(x))
    assert torch.equal(lazy.decoder(0), clt.decoder(0))
    with pytest.raises(FileNotFoundError, match=r"W_dec_1\.safetensors does not exist: re-down"):
        lazy.decoder(1)
    with pytest.raises(TranscoderFormatError, match=r"W_dec_2\.safetensors is truncated or corr"):
        lazy.decoder(2)
    with pytest.raises(FileNotFoundError, match=r"W_dec_1\.safetensors"):
        load_transcoder(tmp_path / "t", lazy=False)


def test_lazy_sparse_decode_reads_only_needed_rows(tmp_path):
    clt = make_random_clt(L, D, F, seed=13)
    save_transcoder(clt, tmp_path / "t")
    lazy = load_transcoder(tmp_path / "t")
    t = torch.tensor
    out = lazy.decode_sparse(t([0, 2]), t([1, 0]), t([5, 9]), t([2.0, 3.0]), n_pos=2)
    assert not any(lazy.decoder_loaded(i) for i in range(L))
    expected = torch.zeros(L, 2, D)
    expected[0:3, 1] += 2.0 * clt.decoder(0)[5]
    expected[2:3, 0] += 3.0 * clt.decoder(2)[9]
    assert torch.equal(out, expected)


# --- errors --------------------------------------------------------------------------------


def test_truncated_and_missing_files(tmp_path):
    clt = make_random_clt(L, D, F, seed=14)
    save_transcoder(clt, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="does not exist: check the path"):
        load_transcoder(tmp_path / "nope")
    enc = tmp_path / "t" / "W_enc_1.safetensors"
    data = enc.read_bytes()
    enc.write_bytes(data[: len(data) // 2])
    with pytest.raises(TranscoderFormatError, match=r"W_enc_1\.safetensors is truncated .* re-d"):
        load_transcoder(tmp_path / "t")
    enc.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lacks W_enc_\{i\}\.safetensors for layer\(s\) \[1\]"
    ):
        load_transcoder(tmp_path / "t")
    dec = tmp_path / "t" / "W_dec_0.safetensors"
    enc.write_bytes(data)
    dec.write_bytes(dec.read_bytes()[:-10])
    lazy = load_transcoder(tmp_path / "t")
    with pytest.raises(TranscoderFormatError, match=r"W_dec_0\.safetensors is truncated"):
        lazy.decoder(0)


def test_model_mismatch_and_unknown_format(tmp_path, monkeypatch):
    clt = make_random_clt(L, D, F, seed=15)
    save_transcoder(clt, tmp_path / "t")
    load_transcoder(tmp_path / "t", n_layers=L, d_model=D)
    with pytest.raises(ValueError, match="d_model 8 but tiny has 32"):
        load_transcoder(tmp_path / "t", n_layers=L, d_model=32, model_name="tiny")
    with pytest.raises(ValueError, match="covers 3 layers but the model has 5"):
        load_transcoder(tmp_path / "t", n_layers=5)

    class Facts:  # what tracer.model.LanguageModel.facts offers
        n_layers, d_model, name = L, 32, "tiny-llama"

    class Model:
        facts = Facts()

    with pytest.raises(ValueError, match="d_model 8 but tiny-llama has 32"):
        load_transcoder(tmp_path / "t", model=Model())
    (tmp_path / "pointer").mkdir()
    (tmp_path / "pointer" / "config.yaml").write_text(
        "model_kind: transcoder_set\ntranscoders:\n  - hf://org/repo/layer_0/params.npz\n"
    )
    # A config.yaml listing hub files not in the (empty) cache, offline: one line naming the
    # repository, the file and the command that fetches it (tests/transcoders/test_hub.py).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError, match=r"org/repo@main .*layer_0/params.npz.*hf download"):
        load_transcoder(tmp_path / "pointer")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(TranscoderFormatError, match="holds no transcoder in a format we read"):
        load_transcoder(tmp_path / "junk")
    with pytest.raises(TranscoderFormatError, match="unknown transcoder format 'onnx'"):
        load_transcoder(tmp_path / "t", format="onnx")
    cfg = json.loads((tmp_path / "t" / "circuit_atlas.json").read_text())
    cfg["n_features"] = 99
    (tmp_path / "t" / "circuit_atlas.json").write_text(json.dumps(cfg))
    with pytest.raises(TranscoderFormatError, match="says n_features=99 but the weight files hold"):
        load_transcoder(tmp_path / "t")


def test_saelens_inputs_that_are_not_mlp_transcoders(tmp_path):
    t = random_sae(1)
    base = {"d_in": D, "d_sae": F, "apply_b_dec_to_input": False}
    write_saelens(tmp_path / "sae", {**base, "architecture": "standard",
                                     "hook_name": "blocks.0.hook_resid_pre"}, t)  # fmt: skip
    with pytest.raises(TranscoderFormatError, match="describes an SAE .* not a transcoder"):
        load_transcoder(tmp_path / "sae")
    write_saelens(tmp_path / "gated", {**base, "architecture": "gated"}, t)
    with pytest.raises(TranscoderFormatError, match="architecture 'gated' is not supported"):
        load_transcoder(tmp_path / "gated")
    write_saelens(tmp_path / "resid", {**base, "architecture": "transcoder",
                                       "hook_name": "blocks.0.hook_resid_pre"}, t)  # fmt: skip
    with pytest.raises(TranscoderFormatError, match="not an MLP input"):
        load_transcoder(tmp_path / "resid")
    assert load_transcoder(tmp_path / "resid", input_site="resid_mid").cfg.input_site == "resid_mid"


def test_saving_refuses_what_a_format_cannot_hold_and_leaves_nothing(tmp_path):
    clt = make_random_clt(L, D, F, seed=16)
    plt = make_random_clt(L, D, F, kind="plt", seed=16)
    with pytest.raises(TranscoderFormatError, match="save a per-layer transcoder as circuit-tr"):
        save_transcoder(plt, tmp_path / "a", "circuit-tracer")
    with pytest.raises(TranscoderFormatError, match="save a cross-layer transcoder as circuit"):
        save_transcoder(clt, tmp_path / "a", "saelens")
    with pytest.raises(TranscoderFormatError, match="cannot write format 'gemmascope'"):
        save_transcoder(clt, tmp_path / "a", "gemmascope")
    with torch.no_grad():
        plt.threshold[2, 3] = -0.5
    with pytest.raises(TranscoderFormatError, match="negative JumpReLU thresholds"):
        save_transcoder(plt, tmp_path / "a", "saelens")
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary folder
    save_transcoder(clt, tmp_path / "a")
    with pytest.raises(FileExistsError, match="already exists"):
        save_transcoder(clt, tmp_path / "a")
    # A failed overwrite keeps the old folder intact.
    with pytest.raises(TranscoderFormatError):
        save_transcoder(plt, tmp_path / "a", "saelens", overwrite=True)
    assert torch.equal(load_transcoder(tmp_path / "a").decoder(0), clt.decoder(0))
    save_transcoder(plt, tmp_path / "a", overwrite=True)
    assert load_transcoder(tmp_path / "a").cfg.kind == "plt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- info and the CLI ----------------------------------------------------------------------


def test_info_describes_layers_sites_and_files(tmp_path):
    clt = make_random_clt(L, D, F, kind="plt", activation="topk", seed=17)
    clt.cfg.model_name = "smollm2"
    clt.cfg.training = {"nmse": 0.12}
    save_transcoder(clt, tmp_path / "t", "saelens")
    info = transcoder_info(tmp_path / "t")
    assert (info.format, info.kind, info.n_layers, info.d_model, info.n_features) == (
        "saelens", "plt", L, D, F
    )  # fmt: skip
    assert info.total_bytes == sum(p.stat().st_size for p in (tmp_path / "t").rglob("*")
                                   if p.is_file())  # fmt: skip
    text = "\n".join(info.lines())
    assert "activation  topk (k=4)" in text and "reads mlp_in, writes mlp_out" in text
    assert "layer_2/sae_weights.safetensors" in text and "nmse: 0.12" in text
    assert info.n_parameters == sum(p.numel() for p in clt.parameters())


def test_cli_convert_round_trip_and_errors(tmp_path, capsys):
    from tracer.cli import main

    clt = make_random_clt(L, D, F, skip=True, seed=18)
    save_transcoder(clt, tmp_path / "src")
    dst = tmp_path / "dst"
    assert main(["transcoders", "convert", str(tmp_path / "src"), str(dst),
                 "--format", "circuit-tracer"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    back = load_transcoder(dst)
    x = torch.randn(L, 3, D)
    assert torch.equal(back.decode(back.encode(x), x), clt.decode(clt.encode(x), x))
    assert main(["transcoders", "info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "cross-layer transcoder with affine skip" in out and "W_dec_2.safetensors" in out

    assert main(["transcoders", "convert", str(tmp_path / "src"), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["transcoders", "convert", str(tmp_path / "src"), str(tmp_path / "x"),
                 "--format", "saelens"]) == 2  # fmt: skip
    assert "save a cross-layer transcoder as circuit-tracer" in capsys.readouterr().err
    assert main(["transcoders", "info", str(dst), "--n-layers", "3", "--d-model", "64"]) == 2
    assert "d_model 8 but the model has 64" in capsys.readouterr().err


def test_cli_places_a_gemmascope_file_at_a_model_layer(tmp_path, capsys):
    from tracer.cli import main

    params = write_gemmascope(tmp_path / "gs" / "params.npz", 4)  # no layer_N in the path
    dst = tmp_path / "placed"
    args = ["transcoders", "convert", str(tmp_path / "gs" / "params.npz"), str(dst)]
    assert main(args + ["--n-layers", "3", "--d-model", str(D), "--layer", "1"]) == 0
    got = load_transcoder(dst)
    assert got.cfg.n_layers == 3 and got.cfg.empty_layers == [0, 2]
    assert torch.equal(got.W_enc[1], params["W_enc"].T) and got.W_enc[[0, 2]].abs().sum() == 0
    assert main(["transcoders", "info", str(dst)]) == 0
    assert "empty layers [0, 2]" in capsys.readouterr().out
    assert main(args[:3] + [str(tmp_path / "x"), "--n-layers", "3"]) == 2
    assert "does not say which model layer it reads: pass layer=N" in capsys.readouterr().err
