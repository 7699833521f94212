"""GemmaScope transcoders (read only): ``params.npz`` with ``W_enc`` [d, F], ``W_dec`` [F, d],
``b_enc`` [F], ``b_dec`` [d], ``threshold`` [F].

GemmaScope publishes one file per layer as ``layer_{i}/width_{w}/average_l0_{n}/params.npz``;
the model layer is read from the ``layer_{i}`` part of the path. Its transcoders read the MLP
input after the pre-MLP norm (``mlp_in``) and write the MLP output. Its JumpReLU is
``relu(z) * (z > threshold)``, equal to ours once negative thresholds are raised to 0.
"""

from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import CPU, DeviceSetting
from transcoders.io_assemble import LayerWeights, assemble_per_layer
from transcoders.io_files import NpzFile, TranscoderFormatError

PARAMS_FILE = "params.npz"
_LAYER = re.compile(r"^layer_(\d+)$")


def gemmascope_files(path: Path) -> list[Path]:
    """The params.npz files under ``path`` (itself when it is one)."""
    if path.is_file():
        return [path]
    return sorted(path.rglob("*.npz"))


def _layer_of(path: Path) -> int | None:
    for part in reversed(path.parts):
        if m := _LAYER.match(part):
            return int(m.group(1))
    return None


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

    return LayerWeights(
        source=path,
        model_layer=_layer_of(path),
        W_enc=arrays["W_enc"].T,
        b_enc=arrays["b_enc"],
        b_dec=arrays["b_dec"],
        decoder=decoder,
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
