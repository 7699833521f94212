"""GemmaScope and Gemma Scope 2 transcoders (read only).

GemmaScope (Gemma-2): ``params.npz`` with ``W_enc`` [d, F], ``W_dec`` [F, d], ``b_enc`` [F],
``b_dec`` [d], ``threshold`` [F], float32, one file per layer published as
``layer_{i}/width_{w}/average_l0_{n}/params.npz`` (google/gemma-scope-2b-pt-transcoders); the
model layer is read from the ``layer_{i}`` part of the path, or from the file's place in a
config.yaml's ``transcoders:`` list. circuit-tracer reads them at TransformerLens's
``ln2.hook_normalized`` (the pre-MLP norm's output before its gain: see
``transcoders.formats.hook_names``) and writes ``hook_mlp_out``. Its JumpReLU is
``relu(z) * (z > threshold)``, equal to ours once negative thresholds are raised to 0.

Gemma Scope 2 (Gemma-3) uses safetensors with lower-case keys: ``w_enc`` [d, F], ``w_dec``,
``b_enc`` [F], ``b_dec`` [d], ``threshold`` [F] and, for ``_affine`` variants,
``affine_skip_connection`` [d, d] applied as ``out += x @ affine_skip_connection``.

- per-layer transcoders: ``transcoder_all/layer_{i}_width_{w}_l0_{s}[_affine]/params.safetensors``
  with ``w_dec`` [F, d];
- CLTs: ``clt/width_{w}_l0_{s}[_affine]/params_layer_{i}.safetensors`` with ``w_dec``
  [F, L, d] (decoders to every layer; source layer i uses targets i..L-1).

circuit-tracer's JumpReLU for these is ``z * (z > threshold)``, ours exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import CPU, DeviceSetting
from transcoders.formats.assemble import (
    LayerWeights,
    assemble_per_layer,
    merge_config,
    new_transcoder,
)
from transcoders.formats.files import NpzFile, SafetensorsFile, TranscoderFormatError

PARAMS_FILE = "params.npz"
GS2_PARAMS = "params.safetensors"
GS2_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
GS2_SKIP = "affine_skip_connection"
_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")
_GS2_CLT = re.compile(r"^params_layer_(\d+)\.safetensors$")


def gemmascope_files(path: Path) -> list[Path]:
    """The params.npz files under ``path`` (itself when it is one)."""
    if path.is_file():
        return [path]
    return sorted(path.rglob("*.npz"))


def _layer_of(path: Path) -> int | None:
    if m := _GS2_CLT.match(path.name):
        return int(m.group(1))
    for part in reversed(path.parts):
        if m := _LAYER.match(part):
            return int(m.group(1))
    return None


def npz_layer(path: Path, layer: int | None = None) -> LayerWeights:
    """One GemmaScope params.npz layer (model layer ``layer``, else read from its path)."""
    lw = _npz_layer(path)
    if layer is not None:
        lw.model_layer = layer
    return lw


def _npz_layer(path: Path) -> LayerWeights:
    f = NpzFile(path)
    arrays = {k: f.get(k).float() for k in ("W_enc", "b_enc", "b_dec", "threshold")}
    d, F = arrays["W_enc"].shape
    if arrays["b_enc"].shape != (F,) or arrays["b_dec"].shape != (d,):
        raise TranscoderFormatError(
            f"{path}: b_enc {tuple(arrays['b_enc'].shape)} / b_dec "
            f"{tuple(arrays['b_dec'].shape)} do not fit W_enc [{d}, {F}]: re-download it"
        )

    def decoder():
        w = NpzFile(path).get("W_dec")
        if tuple(w.shape) != (F, d):
            raise TranscoderFormatError(
                f"{path}: W_dec has shape {tuple(w.shape)}, expected [{F}, {d}]: re-download it"
            )
        return w.unsqueeze(1)

    def decoder_rows(idx):
        # params.npz is stored uncompressed: only these rows are read (a memory map).
        w = NpzFile(path).rows("W_dec", idx).float()
        if tuple(w.shape) != (len(idx), d):
            raise TranscoderFormatError(
                f"{path}: W_dec rows have shape {tuple(w.shape)}, expected [{len(idx)}, {d}]: "
                "re-download it"
            )
        return w.unsqueeze(1)

    return LayerWeights(
        source=path,
        model_layer=_layer_of(path),
        W_enc=arrays["W_enc"].T,
        b_enc=arrays["b_enc"],
        b_dec=arrays["b_dec"],
        decoder=decoder,
        decoder_rows=decoder_rows,
        threshold=arrays["threshold"].clamp(min=0.0),
        activation="jumprelu",
        input_site="mlp_in",
    )


def read_gemmascope(
    path: Path,
    *,
    saved: dict | None,
    lazy: bool,
    n_layers: int | None,
    layer: int | None,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    files = gemmascope_files(path)
    if not files:
        raise TranscoderFormatError(f"no GemmaScope {PARAMS_FILE} files under {path}")
    layers = [_npz_layer(f) for f in tqdm(files, desc="reading GemmaScope layers", disable=None)]
    return assemble_per_layer(
        layers,
        where=path,
        saved=saved,
        lazy=lazy,
        n_layers=n_layers,
        layer=layer,
        input_site=input_site,
        model_name=model_name,
        setting=setting,
    )


# --- Gemma Scope 2 ---------------------------------------------------------------------------


def is_gemmascope2_file(path: Path) -> bool:
    """A safetensors file with Gemma Scope 2's lower-case keys."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    return "w_enc" in SafetensorsFile(path)


def gemmascope2_files(folder: Path) -> list[Path]:
    """Gemma Scope 2 files under ``folder``: a CLT's ``params_layer_{i}.safetensors`` (in layer
    order) or per-layer ``layer_{i}_.../params.safetensors``."""
    if not folder.is_dir():
        return [folder] if is_gemmascope2_file(folder) else []
    clt = sorted(
        (p for p in folder.iterdir() if _GS2_CLT.match(p.name)), key=lambda p: _layer_of(p) or 0
    )
    if clt:
        return clt if is_gemmascope2_file(clt[0]) else []
    plt = sorted(folder.rglob(GS2_PARAMS))
    return plt if plt and is_gemmascope2_file(plt[0]) else []


def _gs2_open(path: Path) -> SafetensorsFile:
    f = SafetensorsFile(path)
    for key in GS2_KEYS:
        f.require(key)
    d, F = f.shapes["w_enc"]
    want = {"b_enc": (F,), "b_dec": (d,), "threshold": (F,), GS2_SKIP: (d, d)}
    for key, shape in want.items():
        if key in f and f.shapes[key] != shape:
            raise TranscoderFormatError(
                f"{path}: {key} has shape {f.shapes[key]}, expected {shape} (from w_enc "
                f"[{d}, {F}]): re-download it"
            )
    return f


def gemmascope2_layer(path: Path, layer: int | None = None) -> LayerWeights:
    """One Gemma Scope 2 per-layer transcoder (``w_dec`` [F, d])."""
    f = _gs2_open(path)
    d, F = f.shapes["w_enc"]
    if f.shapes["w_dec"] != (F, d):
        raise TranscoderFormatError(
            f"{path}: w_dec has shape {f.shapes['w_dec']}, expected [{F}, {d}] for a per-layer "
            "transcoder (a CLT's params_layer_{i} file has [F, L, d]): re-download it"
        )
    return LayerWeights(
        source=path,
        model_layer=layer if layer is not None else _layer_of(path),
        W_enc=f.get("w_enc").float().T,
        b_enc=f.get("b_enc").float(),
        b_dec=f.get("b_dec").float(),
        decoder=lambda: f.get("w_dec").unsqueeze(1),
        decoder_rows=lambda idx: f.rows("w_dec", idx).unsqueeze(1),
        threshold=f.get("threshold").float(),
        W_skip=f.get(GS2_SKIP).float().T if GS2_SKIP in f else None,
        activation="jumprelu",
    )


def read_gemmascope2_clt(
    files: list[Path],
    *,
    where: Path,
    saved: dict | None,
    lazy: bool,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    """A Gemma Scope 2 CLT from its ``params_layer_{i}`` files in layer order (file i holds
    source layer i; its ``w_dec`` [F, L, d] has decoders to every layer, of which i..L-1 are
    used)."""
    opened = [_gs2_open(p) for p in files]
    L = len(opened)
    d, F = opened[0].shapes["w_enc"]
    skip = GS2_SKIP in opened[0]
    for p, f in zip(files, opened, strict=True):
        if f.shapes["w_enc"] != (d, F) or f.shapes["w_dec"] != (F, L, d):
            raise TranscoderFormatError(
                f"{p}: w_enc {f.shapes['w_enc']} / w_dec {f.shapes['w_dec']} do not fit a "
                f"{L}-layer CLT with w_enc [{d}, {F}] (expected w_dec [{F}, {L}, {d}]): the files "
                "mix two transcoders, or some layers are missing; re-download them"
            )
        if (GS2_SKIP in f) != skip:
            raise TranscoderFormatError(f"{p}: some layers have {GS2_SKIP} and some do not")
    found = {
        "n_layers": L,
        "d_model": d,
        "n_features": F,
        "kind": "clt",
        "skip": skip,
        "activation": "jumprelu",
        "input_site": input_site or (saved or {}).get("input_site") or "resid_mid",
        "model_name": model_name or (saved or {}).get("model_name"),
    }
    cfg = merge_config(found, saved, where)
    clt = new_transcoder(cfg, setting)
    with torch.no_grad():
        for i, f in enumerate(tqdm(opened, desc="reading Gemma Scope 2 CLT", disable=None)):
            clt.W_enc[i] = f.get("w_enc").T
            clt.b_enc[i] = f.get("b_enc")
            clt.b_dec[i] = f.get("b_dec")
            clt.threshold[i] = f.get("threshold")
            if skip:
                clt.W_skip[i] = f.get(GS2_SKIP).T
    for i, f in enumerate(opened):
        whole = lambda f=f, i=i: f.get("w_dec")[:, i:]  # noqa: E731
        rows = lambda idx, f=f, i=i: f.rows("w_dec", idx)[:, i:]  # noqa: E731
        if lazy:
            clt.set_lazy_decoder(i, whole, rows)
        else:
            w = whole()
            clt.check_decoder_shape(i, tuple(w.shape))
            clt.W_dec[i] = torch.nn.Parameter(
                w.to(device=clt.device, dtype=clt.dtype), requires_grad=False
            )
    return clt


def read_gemmascope2(
    path: Path,
    *,
    saved: dict | None,
    lazy: bool,
    n_layers: int | None,
    layer: int | None,
    input_site: InputSite | None,
    model_name: str | None,
    setting: DeviceSetting = CPU,
) -> CrossLayerTranscoder:
    """A Gemma Scope 2 folder (or file): a CLT when it holds ``params_layer_{i}`` files, else
    per-layer transcoders placed at the layers their folder names say."""
    files = gemmascope2_files(path)
    if not files:
        raise TranscoderFormatError(f"no Gemma Scope 2 safetensors files under {path}")
    if _GS2_CLT.match(files[0].name):
        if layer is not None:
            raise TranscoderFormatError("layer= applies to single-layer sources, not a CLT")
        return read_gemmascope2_clt(
            files, where=path, saved=saved, lazy=lazy, input_site=input_site,
            model_name=model_name, setting=setting,
        )  # fmt: skip
    layers = [gemmascope2_layer(f) for f in files]
    return assemble_per_layer(
        layers, where=path, saved=saved, lazy=lazy, n_layers=n_layers, layer=layer,
        input_site=input_site, model_name=model_name, setting=setting,
    )  # fmt: skip
