"""circuit-tracer's on-disk layouts (read and write).

CLT layout, one pair of files per layer i of an L-layer CLT with F features, d = d_model:

- ``W_enc_{i}.safetensors``: ``W_enc_{i}`` [F, d], ``b_enc_{i}`` [F], ``b_dec_{i}`` [d],
  ``threshold_{i}`` [F] (present for JumpReLU; circuit-tracer infers ReLU without it),
  ``W_skip_{i}`` [d, d] optional, applied as ``x @ W_skip_{i}`` (the transpose of ours).
- ``W_dec_{i}.safetensors``: ``W_dec_{i}`` [F, L - i, d].

Per-layer (transcoder set) layout: ``layer_{i}.safetensors`` with ``W_enc`` [F, d], ``W_dec``
[F, d], ``b_enc`` [F], ``b_dec`` [d], ``activation_function.threshold`` [F] (JumpReLU),
``W_skip`` [d, d] optional, applied as ``x @ W_skip.T`` (same as ours).

Both may carry ``config.yaml``: ``model_kind`` (``cross_layer_transcoder`` or
``transcoder_set``), ``feature_input_hook`` / ``feature_output_hook`` (TransformerLens names,
e.g. ``hook_resid_mid`` / ``hook_mlp_out``), ``model_name``, and for transcoder sets
``activation`` (``relu``/``topk``) and ``k``. Dimensions come from the tensor shapes.
circuit-tracer's TopK keeps the k largest pre-activations as they are; ours also applies a
ReLU, which differs only when fewer than k pre-activations are positive.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import CPU, DeviceSetting
from transcoders.formats.assemble import (
    LayerWeights,
    assemble_per_layer,
    merge_config,
    new_transcoder,
)
from transcoders.formats.files import (
    LazySafetensorsFile,
    SafetensorsFile,
    TranscoderFormatError,
    write_safetensors,
)
from transcoders.formats.hook_names import OUTPUT_HOOK, check_output_hook, input_hook, site_of_hook

YAML_FILE = "config.yaml"
_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")
_PLT = re.compile(r"^layer_(\d+)\.safetensors$")
PLT_THRESHOLD_KEYS = ("activation_function.threshold", "threshold")


def is_clt_folder(folder: Path) -> bool:
    return folder.is_dir() and any(_ENC.match(p.name) for p in folder.iterdir())


def is_plt_folder(folder: Path) -> bool:
    return folder.is_dir() and any(_PLT.match(p.name) for p in folder.iterdir())


def read_yaml(folder: Path) -> dict:
    """The settings of ``folder``'s config.yaml ({} when it has none)."""
    path = folder / YAML_FILE
    if not path.is_file():
        return {}
    return read_yaml_file(path)


def read_yaml_file(path: Path) -> dict:
    """The settings of a circuit-tracer config.yaml file (a mapping)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TranscoderFormatError(f"{path} is not valid YAML ({err}): fix or delete it") from None
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{path} should hold a mapping of settings: fix or delete it")
    return data


def _layer_files(folder: Path, pattern: re.Pattern) -> list[int]:
    idx = sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name)))
    gaps = sorted(set(range(max(idx) + 1)) - set(idx))
    if gaps:
        name = pattern.pattern.strip("^$").replace("(\\d+)", "{i}").replace("\\.", ".")
        raise FileNotFoundError(
            f"{folder} lacks {name} for layer(s) {gaps}: the transcoder is incomplete; "
            "re-download or re-convert it"
        )
    return idx


def _yaml_site(conf: dict, folder: Path) -> InputSite | None:
    if "feature_output_hook" in conf:
        check_output_hook(str(conf["feature_output_hook"]), str(folder / YAML_FILE))
    if "feature_input_hook" in conf:
        return site_of_hook(str(conf["feature_input_hook"]), str(folder / YAML_FILE))
    return None


# --- CLT layout ----------------------------------------------------------------------------


def read_clt(
    folder: Path,
    *,
    saved: dict | None,
    lazy: bool,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    conf = read_yaml(folder)
    layers = _layer_files(folder, _ENC)
    L = len(layers)
    encs = [SafetensorsFile(folder / f"W_enc_{i}.safetensors") for i in layers]
    first = encs[0]
    first.require("W_enc_0")
    F, d = first.shapes["W_enc_0"]
    has_thr = "threshold_0" in first
    has_skip = "W_skip_0" in first
    for i, f in enumerate(encs):
        want = {f"W_enc_{i}": (F, d), f"b_enc_{i}": (F,), f"b_dec_{i}": (d,)}
        if has_thr:
            want[f"threshold_{i}"] = (F,)
        if has_skip:
            want[f"W_skip_{i}"] = (d, d)
        for key, shape in want.items():
            f.require(key)
            if f.shapes[key] != shape:
                raise TranscoderFormatError(
                    f"{f.path}: {key} has shape {f.shapes[key]}, expected {shape} (from "
                    f"W_enc_0 [{F}, {d}]): the files mix two transcoders; re-convert them"
                )
        if (f"W_skip_{i}" in f) != has_skip:
            raise TranscoderFormatError(
                f"{f.path}: some layers have W_skip and some do not; re-convert the transcoder"
            )

    saved_act = (saved or {}).get("activation")
    activation = saved_act or conf.get("activation") or ("jumprelu" if has_thr else "relu")
    if activation == "jump_relu":
        activation = "jumprelu"
    if activation == "jumprelu" and not has_thr:
        raise TranscoderFormatError(
            f"{folder} is a JumpReLU transcoder but W_enc_0.safetensors has no threshold_0: "
            "re-download or re-convert it"
        )
    found = {
        "n_layers": L,
        "d_model": d,
        "n_features": F,
        "kind": "clt",
        "skip": has_skip,
        "activation": activation,
        # circuit-tracer's own default input hook is hook_resid_mid.
        "input_site": input_site
        or (saved or {}).get("input_site")
        or _yaml_site(conf, folder)
        or "resid_mid",
        "model_name": model_name or (saved or {}).get("model_name") or conf.get("model_name"),
    }
    if conf.get("k") is not None and not (saved or {}).get("topk"):
        found["topk"] = int(conf["k"])
    cfg = merge_config(found, saved, folder)
    if cfg.activation == "topk" and not cfg.topk:
        raise TranscoderFormatError(f"{folder}: a TopK transcoder needs k, and its config lacks it")

    clt = new_transcoder(cfg, setting)
    with torch.no_grad():
        # Each layer's tensors are copied onto the device (in its dtype) as they are read.
        for i, f in enumerate(encs):
            clt.W_enc[i] = f.get(f"W_enc_{i}")
            clt.b_enc[i] = f.get(f"b_enc_{i}")
            clt.b_dec[i] = f.get(f"b_dec_{i}")
            if has_thr:
                clt.threshold[i] = f.get(f"threshold_{i}")
            if has_skip:
                clt.W_skip[i] = f.get(f"W_skip_{i}").T
    for i in range(L):
        path, key = folder / f"W_dec_{i}.safetensors", f"W_dec_{i}"
        if lazy:
            # The decoder file is not touched until the decoder is used.
            dec = LazySafetensorsFile(path)
            clt.set_lazy_decoder(
                i,
                lambda dec=dec, key=key: dec.get(key),
                lambda idx, dec=dec, key=key: dec.rows(key, idx),
            )
        else:
            w = SafetensorsFile(path).get(key)
            clt.check_decoder_shape(i, tuple(w.shape))
            clt.W_dec[i] = torch.nn.Parameter(
                w.to(device=clt.device, dtype=clt.dtype), requires_grad=False
            )
    return clt


def _yaml_common(clt: CrossLayerTranscoder, kind: str) -> dict:
    conf = {
        "model_kind": kind,
        "feature_input_hook": input_hook(clt.cfg.input_site),
        "feature_output_hook": OUTPUT_HOOK,
    }
    if clt.cfg.model_name:
        conf["model_name"] = clt.cfg.model_name
    return conf


def write_clt(clt: CrossLayerTranscoder, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write the CLT layout (+ config.yaml) into an existing empty folder."""
    cfg = clt.cfg
    for i in tqdm(range(cfg.n_layers), desc="writing CLT layers", unit="layer", disable=None):
        enc = {
            f"W_enc_{i}": clt.W_enc[i],
            f"b_enc_{i}": clt.b_enc[i],
            f"b_dec_{i}": clt.b_dec[i],
        }
        if cfg.activation == "jumprelu":
            enc[f"threshold_{i}"] = clt.threshold[i]
        if clt.W_skip is not None:
            enc[f"W_skip_{i}"] = clt.W_skip[i].T  # circuit-tracer applies x @ W_skip
        write_safetensors(enc, folder / f"W_enc_{i}.safetensors", dtype)
        w = clt.decoder(i, cache=False)
        write_safetensors({f"W_dec_{i}": w}, folder / f"W_dec_{i}.safetensors", dtype)
    conf = _yaml_common(clt, "cross_layer_transcoder")
    if cfg.activation == "topk":
        conf.update(activation="topk", k=cfg.topk)
    (folder / YAML_FILE).write_text(yaml.safe_dump(conf, sort_keys=False))


# --- per-layer (transcoder set) layout -------------------------------------------------------


def _plt_layer(path: Path, index: int, conf: dict, site, name) -> LayerWeights:
    f = SafetensorsFile(path)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        f.require(key)
    F, d = f.shapes["b_enc"][0], f.shapes["b_dec"][0]
    enc_shape = f.shapes["W_enc"]
    if enc_shape == (F, d):
        W_enc = f.get("W_enc")
    elif enc_shape == (d, F):
        W_enc = f.get("W_enc").T
    else:
        raise TranscoderFormatError(
            f"{path}: W_enc has shape {enc_shape}, expected [{F}, {d}]: re-convert it"
        )
    if f.shapes["W_dec"] != (F, d):
        raise TranscoderFormatError(
            f"{path}: W_dec has shape {f.shapes['W_dec']}, expected [{F}, {d}]: re-convert it"
        )
    thr_key = next((k for k in PLT_THRESHOLD_KEYS if k in f), None)
    activation = conf.get("activation") or ("jumprelu" if thr_key else "relu")
    if activation == "jump_relu":
        activation = "jumprelu"
    k = conf.get("k")
    if k is None and "k" in f:
        k = int(f.get("k").item())
    return LayerWeights(
        source=path,
        model_layer=index,
        W_enc=W_enc,
        b_enc=f.get("b_enc"),
        b_dec=f.get("b_dec"),
        threshold=f.get(thr_key) if thr_key else None,
        W_skip=f.get("W_skip") if "W_skip" in f else None,
        decoder=lambda: f.get("W_dec").unsqueeze(1),
        decoder_rows=lambda idx: f.rows("W_dec", idx).unsqueeze(1),
        activation=activation,
        topk=int(k) if k is not None else None,
        input_site=site,
        model_name=name,
    )


def read_plt(
    folder: Path,
    *,
    saved: dict | None,
    lazy: bool,
    n_layers: int | None,
    layer: int | None,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    conf = read_yaml(folder)
    site = input_site or (saved or {}).get("input_site") or _yaml_site(conf, folder)
    site = site or "resid_mid"
    name = model_name or (saved or {}).get("model_name") or conf.get("model_name")
    if (saved or {}).get("activation"):
        conf = {**conf, "activation": saved["activation"], "k": saved.get("topk")}
    saved_layers = (saved or {}).get("model_layers")
    files = _layer_files(folder, _PLT)
    layers = [
        _plt_layer(folder / f"layer_{i}.safetensors", i, conf, site, name)
        for i in tqdm(files, desc="reading layers", unit="layer", disable=None)
    ]
    if saved_layers and len(saved_layers) == len(layers):
        for lw, m in zip(layers, saved_layers, strict=True):
            lw.model_layer = m
    # Our own files hold zeros for layers without a transcoder; keep them marked empty.
    empty = set((saved or {}).get("empty_layers") or [])
    layers = [lw for lw in layers if lw.model_layer not in empty]
    for lw in layers:
        if lw.activation == "jumprelu" and lw.threshold is None:
            raise TranscoderFormatError(
                f"{lw.source} is a JumpReLU transcoder without a threshold: re-convert it"
            )
    if not saved_layers:
        # A full set (layer_0 .. layer_{L-1}) is checked against the model's layer count by the
        # caller rather than padded; only a compact set is placed at its model layers.
        n_layers = None
    return assemble_per_layer(
        layers,
        where=folder,
        saved=saved,
        lazy=lazy,
        n_layers=n_layers,
        layer=layer,
        input_site=site,
        model_name=name,
        setting=setting,
    )


def write_plt(clt: CrossLayerTranscoder, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write circuit-tracer's per-layer layout (+ config.yaml) into an existing empty folder."""
    cfg = clt.cfg
    for i in tqdm(range(cfg.n_layers), desc="writing layers", unit="layer", disable=None):
        t = {
            "W_enc": clt.W_enc[i],
            "W_dec": clt.decoder(i, cache=False)[:, 0],
            "b_enc": clt.b_enc[i],
            "b_dec": clt.b_dec[i],
        }
        if cfg.activation == "jumprelu":
            t["activation_function.threshold"] = clt.threshold[i]
        if clt.W_skip is not None:
            t["W_skip"] = clt.W_skip[i]
        write_safetensors(t, folder / f"layer_{i}.safetensors", dtype)
    conf = _yaml_common(clt, "transcoder_set")
    if cfg.activation in ("relu", "topk"):
        conf["activation"] = cfg.activation
    if cfg.activation == "topk":
        conf["k"] = cfg.topk
    (folder / YAML_FILE).write_text(yaml.safe_dump(conf, sort_keys=False))


# --- a config.yaml that lists per-layer files (circuit-tracer's ``transcoders:``) ------------


def read_listed(
    files: list[Path],
    conf: dict,
    *,
    where: Path,
    saved: dict | None,
    lazy: bool,
    n_layers: int | None,
    layer: int | None,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    """The transcoder a config.yaml describes by listing one file per layer (``transcoders:``;
    entry i is model layer i, as circuit-tracer enumerates them). Each file is read by its
    format: GemmaScope ``params.npz``, Gemma Scope 2 safetensors (``w_enc`` ...), or
    circuit-tracer's ``layer_{i}.safetensors`` keys. ``model_kind: cross_layer_transcoder``
    with a list is Gemma Scope 2's CLT (``params_layer_{i}`` files)."""
    from transcoders.formats.gemmascope import (
        gemmascope2_layer,
        is_gemmascope2_file,
        npz_layer,
        read_gemmascope2_clt,
    )

    if not files:
        raise TranscoderFormatError(f"{where} lists no transcoder files")
    site = input_site or (saved or {}).get("input_site") or _yaml_site(conf, where)
    name = model_name or (saved or {}).get("model_name") or conf.get("model_name")
    if conf.get("model_kind") == "cross_layer_transcoder":
        return read_gemmascope2_clt(
            files, where=where, saved=saved, lazy=lazy, input_site=site, model_name=name,
            setting=setting,
        )  # fmt: skip
    layers = []
    for i, path in enumerate(tqdm(files, desc="reading layers", unit="layer", disable=None)):
        if path.suffix == ".npz":
            lw = npz_layer(path, i)
        elif is_gemmascope2_file(path):
            lw = gemmascope2_layer(path, i)
        else:
            lw = _plt_layer(path, i, conf, site, name)
        if conf.get("activation") == "topk" and lw.activation != "topk":
            raise TranscoderFormatError(
                f"{where} says activation topk, but {path} is a {lw.activation} transcoder"
            )
        lw.input_site = site or lw.input_site
        lw.model_name = name
        layers.append(lw)
    return assemble_per_layer(
        layers, where=where, saved=saved, lazy=lazy, n_layers=n_layers, layer=layer,
        input_site=site, model_name=name, setting=setting,
    )  # fmt: skip
