"""Published transcoders by their published names, offline, from a Hugging Face cache built here
in huggingface_hub's documented layout (``models--org--name/blobs``, ``snapshots/<commit>/``
symlinks, ``refs/<branch>``), holding small synthetic weights with the published key names,
dtypes and config.yaml fields. Each form (repo id, preset, hf:// in config.yaml, GemmaScope npz
set, TopK set, Gemma Scope 2) must give the transcoder that loading the files directly gives."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import make_random_clt, make_tiny_model
from safetensors.torch import save_file

from transcoders.formats import load_transcoder, save_transcoder
from transcoders.formats.files import TranscoderFormatError
from transcoders.formats.hub import HubFileMissing, HubRef, cache_dir, looks_like_reference
from transcoders.identity import hub_name

L, D, F = 3, 32, 16
COMMIT = "a" * 40
COMMIT2 = "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, offline."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Cache(root)


class Cache:
    """Writes repositories into a hub cache the way huggingface_hub lays them out."""

    def __init__(self, root: Path):
        self.root = root

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def publish(self, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
                refs: tuple[str, ...] = ("main",)) -> Path:  # fmt: skip
        """Put ``files`` (repo path -> a local file or bytes) into ``snapshots/<commit>`` as
        symlinks to content-addressed blobs, and point ``refs`` at the commit."""
        repo = self.repo_dir(repo_id)
        snap = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes
        return snap


def _yaml(d: dict) -> bytes:
    return yaml.safe_dump(d, sort_keys=False).encode()


def _same(a, b, atol=0.0):
    """Two loaded transcoders compute the same thing: config, every weight, the fingerprint."""
    for k in ("n_layers", "d_model", "n_features", "kind", "activation", "topk", "skip",
              "input_site", "model_name", "empty_layers"):  # fmt: skip
        assert getattr(a.cfg, k) == getattr(b.cfg, k), k
    for name in ("W_enc", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0)
    if a.W_skip is not None or b.W_skip is not None:
        torch.testing.assert_close(a.W_skip, b.W_skip, atol=atol, rtol=0)
    for i in range(a.cfg.n_layers):
        torch.testing.assert_close(a.decoder(i), b.decoder(i), atol=atol, rtol=0)
    assert a.identity.fingerprint == b.identity.fingerprint


# --- synthetic published layouts --------------------------------------------------------------


def clt_repo(tmp_path, dtype="bfloat16", seed=1, n_layers=L, d=D) -> tuple[Path, dict]:
    """circuit-tracer's CLT layout as published (W_enc_{i}/W_dec_{i} safetensors + config.yaml,
    no circuit_atlas.json) in a plain folder, and its files keyed by repo path."""
    folder = tmp_path / f"clt-{seed}"
    save_transcoder(make_random_clt(n_layers, d, F, seed=seed), folder, dtype=dtype)
    (folder / "circuit_atlas.json").unlink()
    (folder / "config.yaml").write_bytes(_yaml({
        "model_kind": "cross_layer_transcoder", "model_name": "google/gemma-2-2b",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
    }))  # fmt: skip
    return folder, {p.name: p for p in folder.iterdir()}


def npz_set(tmp_path, seed=2, d=D) -> tuple[Path, dict]:
    """GemmaScope transcoders as google/gemma-scope-2b-pt-transcoders publishes them:
    layer_{i}/width_16k/average_l0_{n}/params.npz, float32, W_enc [d, F], W_dec [F, d]."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "gemma-scope"
    files = {}
    for i in range(L):
        rel = f"layer_{i}/width_16k/average_l0_{40 + i}/params.npz"
        path = root / rel
        path.parent.mkdir(parents=True)
        np.savez(path, W_enc=rng.normal(0, 0.2, (d, F)).astype(np.float32),
                 W_dec=rng.normal(0, 0.05, (F, d)).astype(np.float32),
                 b_enc=rng.normal(0, 0.1, F).astype(np.float32),
                 b_dec=rng.normal(0, 0.05, d).astype(np.float32),
                 threshold=rng.uniform(0.0, 0.2, F).astype(np.float32))  # fmt: skip
        files[rel] = path
    return root, files


def gemma_preset_config(files: dict, model="google/gemma-2-2b") -> bytes:
    """mwhanna/gemma-scope-transcoders' config.yaml: hf:// URIs of each layer's params.npz."""
    return _yaml({
        "model_name": model, "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://google/gemma-scope-2b-pt-transcoders/{r}" for r in files],
    })  # fmt: skip


def plt_set(tmp_path, activation, seed=3, name="set", skip=False) -> tuple[Path, dict]:
    """circuit-tracer's per-layer layout: layer_{i}.safetensors (W_enc [F, d], W_dec [F, d],
    b_enc, b_dec, activation_function.threshold for JumpReLU) + config.yaml."""
    clt = make_random_clt(L, D, F, kind="plt", seed=seed, activation=activation, skip=skip)
    folder = tmp_path / name
    save_transcoder(clt, folder, format="circuit-tracer-plt")
    (folder / "circuit_atlas.json").unlink()
    conf = {
        "model_name": "Qwen/Qwen3-0.6B",
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    if activation == "topk":
        conf.update(activation="topk", k=4)
    (folder / "config.yaml").write_bytes(_yaml(conf))
    return folder, {p.name: p for p in folder.iterdir()}


def gs2_set(tmp_path, seed=4, clt=False) -> dict[str, bytes]:
    """Gemma Scope 2 files: transcoder_all/layer_{i}_width_16k_l0_small_affine/params.safetensors
    (w_dec [F, d]) or clt/width_262k_l0_medium_affine/params_layer_{i}.safetensors
    (w_dec [F, L, d]); w_enc [d, F], threshold, affine_skip_connection [d, d]; float32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(L):
        t = {
            "w_enc": torch.randn(D, F, generator=g) * 0.2,
            "w_dec": torch.randn(F, L, D, generator=g) * 0.05 if clt
            else torch.randn(F, D, generator=g) * 0.05,
            "b_enc": torch.randn(F, generator=g) * 0.1,
            "b_dec": torch.randn(D, generator=g) * 0.05,
            "threshold": torch.rand(F, generator=g) * 0.2,
            "affine_skip_connection": torch.randn(D, D, generator=g) * 0.02,
        }  # fmt: skip
        rel = (
            f"clt/width_262k_l0_medium_affine/params_layer_{i}.safetensors"
            if clt
            else f"transcoder_all/layer_{i}_width_16k_l0_small_affine/params.safetensors"
        )
        path = tmp_path / "gs2" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(t, str(path))
        out[rel] = path.read_bytes()
    return out


def quiet_load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the before-gain warning when no model is given
        return load_transcoder(*args, **kwargs)


# --- references --------------------------------------------------------------------------------


def test_reference_parsing():
    assert HubRef.parse("mntss/clt-gemma-2-2b-426k") == HubRef("mntss/clt-gemma-2-2b-426k")
    assert HubRef.parse("mntss/clt@sp10-32k") == HubRef("mntss/clt", None, "sp10-32k")
    r = HubRef.parse("mwhanna/gemma-scope-2-1b-pt/transcoder_all/width_16k_l0_small_affine@v1")
    assert r == HubRef("mwhanna/gemma-scope-2-1b-pt", "transcoder_all/width_16k_l0_small_affine",
                       "v1")  # fmt: skip
    assert r.in_repo("config.yaml") == "transcoder_all/width_16k_l0_small_affine/config.yaml"
    assert looks_like_reference("org/name") and looks_like_reference("hf://org/name/x")
    assert not looks_like_reference("./runs/clt") and not looks_like_reference("/abs/path")
    assert hub_name("mntss/clt-x", None, COMMIT) == "mntss--clt-x+aaaaaaaaaaaa"
    assert hub_name("o/r", "a/b", "v2") == "o--r--a--b+v2"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


# --- each form loads offline and equals the files loaded directly --------------------------


def test_repo_id_clt_equals_folder_and_names_the_repository(hub, tmp_path):
    folder, files = clt_repo(tmp_path)
    snap = hub.publish("mntss/clt-gemma-2-2b-426k", files)
    assert (snap / "W_dec_2.safetensors").is_symlink()
    direct = load_transcoder(folder)
    got = load_transcoder("mntss/clt-gemma-2-2b-426k", n_layers=L, d_model=D)
    # The decoders stay on disk until used (lazy by default).
    assert all(f is not None for f in got._lazy_dec)
    _same(got, direct)
    assert got.W_enc.dtype == torch.float32  # bfloat16 on disk, float32 by default in memory
    assert got.cfg.input_site == "resid_mid" and got.cfg.model_name == "google/gemma-2-2b"
    assert got.identity.name == "mntss--clt-gemma-2-2b-426k+" + COMMIT[:12]
    fp = direct.identity.fingerprint
    assert got.identity.id == f"mntss--clt-gemma-2-2b-426k+{COMMIT[:12]}@{fp}"


def test_revisions_resolve_by_ref_and_commit(hub, tmp_path):
    _, one = clt_repo(tmp_path, seed=1)
    f2, two = clt_repo(tmp_path, seed=5)
    hub.publish("org/clt", one, COMMIT, refs=("main",))
    hub.publish("org/clt", two, COMMIT2, refs=("v2",))
    main = load_transcoder("org/clt")
    v2 = load_transcoder("org/clt@v2")
    by_commit = load_transcoder(f"org/clt@{COMMIT2}")
    _same(v2, load_transcoder(f2))
    _same(by_commit, v2)
    assert main.identity.fingerprint != v2.identity.fingerprint
    assert v2.identity.name.endswith("+" + COMMIT2[:12])
    with pytest.raises(HubFileMissing) as err:
        load_transcoder("org/clt@v3")
    msg = str(err.value)
    assert "\n" not in msg and "revision 'v3' of org/clt" in msg
    assert "main (aaaaaaaaaaaa)" in msg and "v2 (bbbbbbbbbbbb)" in msg
    assert "hf download org/clt --revision v3" in msg


def test_gemma_preset_equals_the_npz_folder(hub, tmp_path):
    root, files = npz_set(tmp_path)
    hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
    direct = quiet_load(root, n_layers=L)
    got = quiet_load("gemma", n_layers=L, d_model=D)
    assert got.cfg.kind == "plt" and got.cfg.activation == "jumprelu"
    assert direct.cfg.model_name is None  # the npz files do not say; the preset's config does
    direct.cfg.model_name = got.cfg.model_name
    direct.keep_identity = False
    _same(got, direct)
    assert got.identity.name == "mwhanna--gemma-scope-transcoders+" + COMMIT[:12]
    # The published keys: W_enc [d, F] transposed into ours [F, d].
    arrays = np.load(files["layer_1/width_16k/average_l0_41/params.npz"])
    torch.testing.assert_close(got.W_enc[1], torch.from_numpy(arrays["W_enc"]).T)
    torch.testing.assert_close(got.threshold[1], torch.from_numpy(arrays["threshold"]))


def test_hf_uris_in_a_local_config_yaml(hub, tmp_path):
    root, files = npz_set(tmp_path)
    hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    conf = tmp_path / "mine" / "config.yaml"
    conf.parent.mkdir()
    conf.write_bytes(gemma_preset_config(files))
    a = quiet_load(conf, n_layers=L)
    b = quiet_load(conf.parent, n_layers=L)
    c = quiet_load("gemma" if False else conf)  # the file itself, no model shape
    direct = quiet_load(root, n_layers=L, model_name="google/gemma-2-2b")
    for x in (a, b, c):
        _same(x, direct)
    assert a.identity.name == direct.identity.name  # local files: no repository to name


def test_topk_set_by_repo_id(hub, tmp_path):
    folder, files = plt_set(tmp_path, "topk")
    hub.publish("mwhanna/qwen3-0.6b-transcoders-lowl0", files)
    got = load_transcoder("mwhanna/qwen3-0.6b-transcoders-lowl0", n_layers=L)
    _same(got, load_transcoder(folder))
    assert got.cfg.activation == "topk" and got.cfg.topk == 4 and got.cfg.input_site == "mlp_in"


def test_gemma_scope_2_sets_and_clt(hub, tmp_path):
    plt = gs2_set(tmp_path)
    clt = gs2_set(tmp_path, seed=6, clt=True)
    hub.publish("google/gemma-scope-2-1b-pt", {**plt, **clt})
    sub = "transcoder_all/width_16k_l0_small_affine"
    listed = [f"hf://google/gemma-scope-2-1b-pt/{r}" for r in plt]
    hub.publish("mwhanna/gemma-scope-2-1b-pt", {f"{sub}/config.yaml": _yaml({
        "model_name": "google/gemma-3-1b-pt", "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": listed})})  # fmt: skip
    got = load_transcoder(f"mwhanna/gemma-scope-2-1b-pt/{sub}", n_layers=L)
    direct = load_transcoder(tmp_path / "gs2" / "transcoder_all", n_layers=L,
                             model_name="google/gemma-3-1b-pt", input_site="mlp_in")  # fmt: skip
    _same(got, direct)
    assert got.cfg.skip and got.identity.name.startswith(
        "mwhanna--gemma-scope-2-1b-pt--transcoder_all--width_16k_l0_small_affine+"
    )
    # Independently from the published keys: out += x @ affine_skip_connection, w_enc [d, F].
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "gs2" / next(iter(plt))))
    x = torch.randn(5, D)
    torch.testing.assert_close(x @ got.W_skip[0].T, x @ raw["affine_skip_connection"])
    torch.testing.assert_close(got.W_enc[0], raw["w_enc"].T)
    # The CLT: params_layer_{i} with w_dec [F, L, d]; source layer i decodes to layers i..L-1.
    c = load_transcoder(tmp_path / "gs2" / "clt" / "width_262k_l0_medium_affine", n_layers=L,
                        model_name="google/gemma-3-1b-pt")  # fmt: skip
    # ... and listed by a repository's config.yaml, relative to it (files of the same repo).
    csub = "clt/width_262k_l0_medium_affine"
    hub.publish("google/gemma-scope-2-1b-pt", {f"{csub}/config.yaml": _yaml({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "transcoders": [r.removeprefix(csub + "/") for r in clt]})})  # fmt: skip
    _same(load_transcoder(f"google/gemma-scope-2-1b-pt/{csub}"), c)
    assert c.cfg.kind == "clt" and c.cfg.skip
    for i in range(L):
        raw = load_file(str(tmp_path / "gs2" / "clt" / "width_262k_l0_medium_affine"
                            / f"params_layer_{i}.safetensors"))  # fmt: skip
        torch.testing.assert_close(c.decoder(i), raw["w_dec"][:, i:])
        rows = torch.tensor([3, 0, 7])
        torch.testing.assert_close(c.decoder_rows(i, rows), raw["w_dec"][rows][:, i:])


# --- errors: one line, naming the fix ----------------------------------------------------------


def test_missing_files_are_one_line_with_the_download_command(hub, tmp_path):
    _, files = npz_set(tmp_path)
    snap = hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
    (snap / "layer_1/width_16k/average_l0_41/params.npz").unlink()
    with pytest.raises(HubFileMissing) as err:
        quiet_load("gemma")
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 file(s) of google/gemma-scope-2b-pt-transcoders@main" in msg
    assert ("hf download google/gemma-scope-2b-pt-transcoders "
            "layer_1/width_16k/average_l0_41/params.npz") in msg  # fmt: skip
    assert "HF_HUB_OFFLINE=1" in msg
    # A repository with nothing cached, and a CLT snapshot lacking its weights.
    with pytest.raises(HubFileMissing, match=r"^mntss/clt-llama-3.2-1b-524k@main is not in"):
        load_transcoder("mntss/clt-llama-3.2-1b-524k")
    hub.publish("org/partial", {"config.yaml": _yaml({"model_kind": "cross_layer_transcoder"})})
    with pytest.raises(HubFileMissing) as err:
        load_transcoder("org/partial")
    assert "org/partial@main are not in the Hugging Face cache: W_enc_*.safetensors" in str(
        err.value
    )
    assert "hf download org/partial --include 'W_enc_*.safetensors'" in str(err.value)


def test_unknown_preset_lists_the_known_ones(hub):
    with pytest.raises(TranscoderFormatError) as err:
        load_transcoder("gema")
    assert "gemma (mwhanna/gemma-scope-transcoders)" in str(err.value)
    assert "llama (mntss/transcoder-Llama-3.2-1B)" in str(err.value)


def test_another_models_set_is_refused_before_download(hub, tmp_path):
    _, files = npz_set(tmp_path)
    # Only the config is cached: the refusal cannot have needed the weights.
    hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
    with pytest.raises(TranscoderFormatError, match="holds transcoders for google/gemma-2-2b, "
                       "but the model is meta-llama/Llama-3.2-1B"):  # fmt: skip
        load_transcoder("gemma", target_model="meta-llama/Llama-3.2-1B")
    # Instruction-tuned variants share their base model's transcoders (as in circuit-tracer).
    with pytest.raises(HubFileMissing):  # passes the name check, then lacks the weights
        load_transcoder("gemma", target_model="google/gemma-2-2b-it")
    # A table entry names the model when the repository has no config.yaml.
    with pytest.raises(TranscoderFormatError, match="Qwen/Qwen3-4B"):
        load_transcoder("mwhanna/qwen3-4b-transcoders", target_model="Qwen/Qwen3-8B")
    with pytest.raises(TranscoderFormatError, match="google/gemma-2-2b"):  # any case, as the hub
        load_transcoder("mntss/clt-gemma-2-2b-2.5m", target_model="Qwen/Qwen3-8B")
    with pytest.raises(TranscoderFormatError, match="google/gemma-3-1b-it"):
        load_transcoder("mwhanna/gemma-scope-2-1b-it/transcoder_all/x", target_model="o/llama")


# --- the before-gain hook, folded with the model's gain ----------------------------------------


@pytest.mark.slow
def test_ln2_hook_normalized_is_folded_exactly():
    """GemmaScope reads x / rms(x) (before the (1 + w) gain): folded, our encoder applied to the
    model's MLP input gives the published pre-activations, computed independently."""
    model = make_tiny_model("gemma2")
    tmp = Path(__import__("tempfile").mkdtemp())
    try:
        root, files = npz_set(tmp)
        got = load_transcoder(root, model=model)
        assert got.cfg.input_site == "mlp_in"
        # The identity names the published weights: the same with or without the fold.
        assert got.identity.id == quiet_load(root, n_layers=L, model_name="tiny-gemma2").identity.id
        torch.manual_seed(0)
        ids = torch.randint(3, 100, (1, 6))
        run = model.run(ids)
        for i, rel in enumerate(files):
            arrays = np.load(files[rel])
            x_in = run.sites["mlp_in"][0, i].float()  # the norm's output, gain applied
            norm = model.layer_module(i, "mlp_norm")
            resid = run.sites["resid_mid"][0, i].float()
            x_hat = resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + norm.eps)
            want = x_hat @ torch.from_numpy(arrays["W_enc"]) + torch.from_numpy(arrays["b_enc"])
            have = x_in @ got.W_enc[i].T + got.b_enc[i]
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    finally:
        shutil.rmtree(tmp)


# --- tiny traces through preset-shaped sets, one per architecture row --------------------------


def _check_columns():
    path = Path(__file__).parents[1] / "tracer" / "test_attribution.py"
    spec = importlib.util.spec_from_file_location("_attribution_checks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.check_columns


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_trace_through_published_sets_is_exact(hub, tmp_path, model_type):
    from tracer.attribution import attribute
    from tracer.replacement import ReplacementModel

    model = make_tiny_model(model_type)
    if model_type == "gemma2":  # the gemma preset: GemmaScope npz, ln2.hook_normalized
        _, files = npz_set(tmp_path)
        hub.publish("google/gemma-scope-2b-pt-transcoders", files)
        hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
        ref = "gemma"
    elif model_type == "gemma3_text":  # Gemma Scope 2 affine set listed by hf:// URIs
        plt = gs2_set(tmp_path)
        hub.publish("google/gemma-scope-2-1b-pt", plt)
        hub.publish("mwhanna/gemma-scope-2-1b-pt", {"t/config.yaml": _yaml({
            "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": [f"hf://google/gemma-scope-2-1b-pt/{r}" for r in plt]})})  # fmt: skip
        ref = "mwhanna/gemma-scope-2-1b-pt/t"
    elif model_type == "qwen3":  # a TopK set reading mlp.hook_in
        _, files = plt_set(tmp_path, "topk")
        hub.publish("mwhanna/qwen3-0.6b-transcoders-lowl0", files)
        ref = "mwhanna/qwen3-0.6b-transcoders-lowl0"
    else:  # the llama preset's layout: layer_{i}.safetensors JumpReLU, with a skip
        _, files = plt_set(tmp_path, "jumprelu", skip=True)
        hub.publish("mntss/transcoder-Llama-3.2-1B", files)
        ref = "llama"
    clt = load_transcoder(ref, model=model)
    rm = ReplacementModel(model, clt)
    graph = attribute(rm, torch.tensor([1, 5, 9, 22, 40, 7, 13]), progress=False)
    assert graph.count("feature") > 10
    assert _check_columns()(rm, graph) <= 1e-4
    assert graph.transcoder_name.startswith(hub_name(HubRef.parse(
        {"llama": "mntss/transcoder-Llama-3.2-1B", "gemma2": "mwhanna/gemma-scope-transcoders"}
        .get(model_type, ref)).repo_id))  # fmt: skip


# --- the command line: bad input is one line, exit 2 ------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from model_fixtures import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("tiny")) / "model"  # llama, 2 layers, d 32


def _cli_error(capsys, *argv) -> str:
    from tracer.cli import main

    rc = main(["trace", "The capital of France is", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1, err
    return lines[0]


def test_cli_refuses_bad_published_names(hub, tmp_path, tiny_folder, capsys):
    model = ["--model", str(tiny_folder), "--out", str(tmp_path / "out")]
    line = _cli_error(capsys, *model, "--transcoders", "gema")
    assert "unknown transcoder preset or path 'gema'" in line and "llama (mntss/" in line
    _, files = clt_repo(tmp_path, n_layers=2)
    hub.publish("org/clt", files)
    line = _cli_error(capsys, *model, "--transcoders", "org/clt@v9")
    assert "revision 'v9' of org/clt is not in the Hugging Face cache" in line
    assert "hf download org/clt --revision v9" in line
    # The gemma preset (Gemma-2-2B's shape, here d_model 16) for a d_model-32 model.
    _, files = npz_set(tmp_path, d=16)
    hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
    line = _cli_error(capsys, *model, "--transcoders", "gemma")
    want = "mwhanna/gemma-scope-transcoders (preset 'gemma') (trained for google/gemma-2-2b)"
    assert want in line
    assert "it was trained for another model" in line


def test_info_describes_a_published_set(hub, tmp_path):
    from transcoders.formats import transcoder_info

    _, files = npz_set(tmp_path)
    hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    hub.publish("mwhanna/gemma-scope-transcoders", {"config.yaml": gemma_preset_config(files)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = transcoder_info("gemma")
    assert info.format == "config-list" and info.n_layers == L and len(info.files) == L
    assert info.identity.startswith("mwhanna--gemma-scope-transcoders+")
    _, files = clt_repo(tmp_path)
    hub.publish("org/clt", files)
    info = transcoder_info("org/clt")
    assert info.format == "circuit-tracer" and info.kind == "clt"
    assert {name for name, _ in info.files} >= {"W_enc_0.safetensors", "config.yaml"}


def test_saelens_release_folder_by_repo_and_subfolder(hub, tmp_path):
    """A repository holding SAELens folders (cfg.json + sae_weights.safetensors per layer)."""
    clt = make_random_clt(L, D, F, kind="plt", seed=7)
    clt.cfg.model_name = "google/gemma-2-2b"
    save_transcoder(clt, tmp_path / "sae", format="saelens")
    (tmp_path / "sae" / "circuit_atlas.json").unlink()
    files = {f"transcoders/{p.relative_to(tmp_path / 'sae')}": p
             for p in (tmp_path / "sae").rglob("*") if p.is_file()}  # fmt: skip
    hub.publish("org/saelens-release", files)
    got = load_transcoder("org/saelens-release/transcoders", n_layers=L)
    _same(got, load_transcoder(tmp_path / "sae", n_layers=L))
    assert got.identity.name == f"org--saelens-release--transcoders+{COMMIT[:12]}"


def test_a_mistyped_local_path_says_so(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="path runs/clt does not exist: check the path"):
        load_transcoder("runs/clt")


def test_a_wide_clt_allocates_no_decoder_before_use():
    """new_transcoder allocates encoders only: decoders (here 2.2 GB in float32) stay
    placeholders until a reader sets them, lazily, so a 2.5M-feature CLT opens on a GPU."""
    from transcoders.clt import TranscoderConfig
    from transcoders.formats.assemble import new_transcoder

    cfg = TranscoderConfig(n_layers=64, d_model=64, n_features=4096, kind="clt")
    clt = new_transcoder(cfg)
    assert clt.W_enc.shape == (64, 4096, 64) and clt.W_enc.device.type == "cpu"
    assert sum(w.numel() for w in clt.W_dec) == 0
    assert not clt.W_enc.requires_grad and float(clt.W_enc.abs().sum()) == 0.0


def test_npz_decoder_rows_are_read_in_place(tmp_path):
    """GemmaScope's params.npz (np.savez, stored uncompressed) is read by rows from a memory
    map; a compressed npz is read whole; both give the rows of the array."""
    from transcoders.formats.files import NpzFile

    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 7)).astype(np.float32)
    np.savez(tmp_path / "a.npz", W_dec=w, b=np.zeros(3))
    np.savez_compressed(tmp_path / "b.npz", W_dec=w)
    idx = torch.tensor([49, 0, 17, 17])
    for name in ("a.npz", "b.npz"):
        torch.testing.assert_close(
            NpzFile(tmp_path / name).rows("W_dec", idx), torch.from_numpy(w)[idx]
        )
    assert NpzFile(tmp_path / "a.npz")._mapped("W_dec") is not None
    assert NpzFile(tmp_path / "b.npz")._mapped("W_dec") is None
    # A lazily loaded GemmaScope set computes its identity without reading whole decoders.
    root, _ = npz_set(tmp_path)
    clt = quiet_load(root, n_layers=L)
    _ = clt.identity
    assert not any(clt.decoder_loaded(i) for i in range(L))


def test_hook_table_names_each_rows_modules():
    """HOOKS_BY_ARCHITECTURE places each TransformerLens hook at the modules the architecture
    table reads our sites from (resid_mid = the MLP norm's input, mlp_in = its output, mlp_out
    = what the MLP block adds)."""
    from tracer.architectures import ARCHITECTURES
    from transcoders.formats.hook_names import HOOKS_BY_ARCHITECTURE, INPUT_HOOKS, reads_before_gain

    for arch in ARCHITECTURES:
        table = HOOKS_BY_ARCHITECTURE.get(arch.name)
        if table is None:
            continue
        assert table["hook_resid_mid"] == f"input of {arch.mlp_norm}"
        assert table["mlp.hook_in"] == f"output of {arch.mlp_norm}"
        assert table["ln2.hook_normalized"].startswith(f"output of {arch.mlp_norm} before")
        assert table["hook_mlp_out"] == f"output of {arch.mlp_out_norm or arch.mlp}"
    assert set(HOOKS_BY_ARCHITECTURE) == {"llama", "gemma"}
    assert INPUT_HOOKS["ln2.hook_normalized"] == "mlp_in"
    assert reads_before_gain("blocks.3.ln2.hook_normalized")
    assert not reads_before_gain("mlp.hook_in")


@pytest.mark.slow
def test_cli_traces_with_a_repository_id(hub, tmp_path, tiny_folder, capsys):
    """circuit-atlas trace --transcoders org/name, offline from the cache: the graph names the
    repository and commit."""
    from tracer.cli import main

    folder = tiny_folder.parent / "clt"  # save_tiny_folder's CLT for the 2-layer model
    files = {p.name: p for p in folder.iterdir() if p.name != "circuit_atlas.json"}
    hub.publish("org/tiny-clt", files)
    rc = main(["trace", "The capital of France is", "--model", str(tiny_folder),
               "--transcoders", "org/tiny-clt", "--out", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"transcoder: org--tiny-clt+{COMMIT[:12]}@" in out


def test_online_a_repository_without_config_needs_its_folder(hub, monkeypatch):
    """Online, a repository with no config.yaml is not fetched whole (GemmaScope's holds every
    width and L0): the folder must be named. (The hub's answer is stubbed: no network here.)"""
    import transcoders.formats.hub as h

    monkeypatch.setattr(h, "offline", lambda: False)
    monkeypatch.setattr(h, "optional_file", lambda ref, name: None)  # the hub: no config.yaml
    with pytest.raises(HubFileMissing, match="has no config.yaml saying which files"):
        load_transcoder("google/gemma-scope-2b-pt-transcoders")


def test_one_published_file_by_hf_uri(hub, tmp_path):
    root, files = npz_set(tmp_path)
    hub.publish("google/gemma-scope-2b-pt-transcoders", files)
    rel = "layer_2/width_16k/average_l0_42/params.npz"
    got = quiet_load(f"hf://google/gemma-scope-2b-pt-transcoders/{rel}")
    direct = quiet_load(root / rel)
    direct.cfg.model_name = got.cfg.model_name
    direct.keep_identity = False
    _same(got, direct)
    assert got.cfg.n_layers == 1 and got.cfg.model_layers == [2]
    assert got.identity.name == (
        "google--gemma-scope-2b-pt-transcoders--layer_2--width_16k--average_l0_42--params+"
        + COMMIT[:12]
    )


@pytest.mark.slow
def test_saelens_transcoders_reading_ln2_hook_normalized_are_folded(tmp_path):
    """SAELens names the hook in cfg.json (hook_name blocks.N.ln2.hook_normalized for Gemma
    Scope's transcoders there): loaded with the model, W_enc / g; without it, unchanged."""
    import json

    model = make_tiny_model("gemma2")
    clt = make_random_clt(L, D, F, kind="plt", seed=8)
    save_transcoder(clt, tmp_path / "sae", format="saelens")
    (tmp_path / "sae" / "circuit_atlas.json").unlink()
    for i in range(L):
        cfg_path = tmp_path / "sae" / f"layer_{i}" / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["metadata"]["hook_name"] = cfg["hook_name"] = f"blocks.{i}.ln2.hook_normalized"
        cfg_path.write_text(json.dumps(cfg))
    plain = quiet_load(tmp_path / "sae", n_layers=L)
    folded = load_transcoder(tmp_path / "sae", model=model)
    for i in range(L):
        g = model.mlp_norm_gain(i)
        torch.testing.assert_close(folded.W_enc[i], plain.W_enc[i] / g)
    assert (
        folded.identity.fingerprint
        == quiet_load(
            tmp_path / "sae", n_layers=L, model_name=model.facts.name
        ).identity.fingerprint
    )
