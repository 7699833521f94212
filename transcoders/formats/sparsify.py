"""EleutherAI sparsify transcoders (read only).

sparsify saves one folder per hookpoint (a module name of the Hugging Face model, relative to
its base model: ``layers.3.mlp`` for Llama, ``h.3.mlp`` for GPT-2), each with ``cfg.json``
(its ``SparseCoderConfig`` fields plus ``d_in``: ``activation``, ``k``, ``num_latents``,
``expansion_factor``, ``transcode``, ``skip_connection``, ...) and ``sae.safetensors``:
``encoder.weight`` [F, d], ``encoder.bias`` [F], ``W_dec`` [F, d], ``b_dec`` [d] and, with a
skip connection, ``W_skip`` [d, d]. A training run's folder holds one such folder per hookpoint
next to its optimiser state and ``config.json`` (the run's config; ``model`` when the command
line trained it).

A transcoder (``transcode: true``) hooked on a model's MLP module reads the MLP's input (after
the pre-MLP norm: our ``mlp_in``) and predicts the MLP's output. Its forward pass is
``a = TopK(ReLU(W_enc x + b_enc))``, ``y = a W_dec + b_dec (+ x W_skip^T)``: our TopK (the k
largest pre-activations, negatives zeroed) and our skip convention, so the tensors map over
unchanged. Refused: SAEs (``transcode: false``: they reconstruct their input), transcoders of
whole blocks or attention modules, and the ``groupmax`` activation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tqdm import tqdm

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import CPU, DeviceSetting
from transcoders.formats.assemble import LayerWeights, assemble_per_layer
from transcoders.formats.files import SafetensorsFile, TranscoderFormatError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG = "config.json"  # the training run's config, in the parent folder

# "layers.3.mlp", "model.layers.3.mlp", "h.3.mlp", "gpt_neox.layers.3.mlp" -> layer 3
_MLP = re.compile(r"(?:^|\.)(\d+)\.mlp$")
# Any other module path with a layer index: a whole block ("layers.3"), its attention, or a
# module inside the MLP ("layers.3.mlp.act_fn").
_OTHER_MODULE = re.compile(r"(?:^|\.)\d+(?:\.|$)")


def is_sparsify_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def sparsify_layer_folders(folder: Path) -> list[Path]:
    """The hookpoint folders directly inside a sparsify run folder (a ``best/`` copy or other
    nested folders are not searched)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and is_sparsify_folder(p))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TranscoderFormatError(f"{path} is not valid JSON ({err}): re-save it") from None
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{path} should hold a JSON object: re-save it")
    return data


def hookpoint_layer(name: str, where: str) -> int | None:
    """The model layer of an MLP hookpoint name (None when the name does not say)."""
    m = _MLP.search(name)
    if m:
        return int(m.group(1))
    if _OTHER_MODULE.search(name):
        raise TranscoderFormatError(
            f"{where}: hookpoint {name!r} is not an MLP; only transcoders of MLP modules "
            "(e.g. layers.3.mlp) replace a model's MLPs"
        )
    return None


def _sparsify_layer(folder: Path, model_name: str | None) -> LayerWeights:
    where = str(folder / CFG_FILE)
    cfg = _read_json(folder / CFG_FILE)
    if not cfg.get("transcode", False):
        raise TranscoderFormatError(
            f"{where} describes a sparsify SAE (transcode: false: it reconstructs its input), "
            "not a transcoder"
        )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise TranscoderFormatError(
            f"{where}: sparsify activation {activation!r} is not supported (only topk)"
        )
    k, d = cfg.get("k"), cfg.get("d_in")
    if not k or not d:
        raise TranscoderFormatError(f"{where} lacks k or d_in: re-save the transcoder")
    n_features = cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)
    skip = bool(cfg.get("skip_connection", False))

    path = folder / WEIGHTS_FILE
    f = SafetensorsFile(path)
    shapes = {
        "encoder.weight": (n_features, d),
        "encoder.bias": (n_features,),
        "W_dec": (n_features, d),
        "b_dec": (d,),
    }
    if skip:
        shapes["W_skip"] = (d, d)
    for key, shape in shapes.items():
        f.require(key)
        if f.shapes[key] != shape:
            raise TranscoderFormatError(
                f"{path}: {key} has shape {f.shapes[key]}, but cfg.json implies {shape}; "
                "the folder mixes two transcoders"
            )
    return LayerWeights(
        source=folder,
        model_layer=hookpoint_layer(folder.name, where),
        W_enc=f.get("encoder.weight").float(),
        b_enc=f.get("encoder.bias").float(),
        b_dec=f.get("b_dec").float(),
        decoder=lambda: f.get("W_dec").unsqueeze(1),
        decoder_rows=lambda idx: f.rows("W_dec", idx).unsqueeze(1),
        W_skip=f.get("W_skip").float() if skip else None,
        activation="topk",
        topk=int(k),
        input_site="mlp_in",
        model_name=model_name,
    )


def read_sparsify(
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
    """One sparsify hookpoint folder, or a run folder of several (one per MLP)."""
    folders = [path] if is_sparsify_folder(path) else sparsify_layer_folders(path)
    if not folders:
        raise TranscoderFormatError(f"no sparsify {CFG_FILE} + {WEIGHTS_FILE} folders in {path}")
    run_cfg = folders[0].parent / RUN_CONFIG
    run_model = _read_json(run_cfg).get("model") if run_cfg.is_file() else None
    layers = [
        _sparsify_layer(f, run_model if isinstance(run_model, str) else None)
        for f in tqdm(folders, desc="reading sparsify layers", unit="layer", disable=None)
    ]
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
