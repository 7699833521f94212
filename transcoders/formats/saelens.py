"""SAELens transcoders (read; write for per-layer transcoders).

One folder per layer: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc`` [d_in, F],
``W_dec`` [F, d_out], ``b_enc`` [F], ``b_dec`` [d_out], ``threshold`` [F] (JumpReLU) and
``W_skip`` [d_out, d_in] (skip transcoders, applied as ``x @ W_skip.T``). ``cfg.json`` names the
``architecture`` (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``; SAE
architectures ``standard``, ``jumprelu``, ``topk`` count as transcoders when they name an
output hook ``hook_name_out``), ``d_in``, ``d_sae``, ``d_out``, and (SAELens 6: inside
``metadata``; before: at the top level) ``model_name``, ``hook_name``, ``hook_name_out``,
``hook_layer``. A set of layers is a parent folder with one such folder per layer.

SAELens's JumpReLU is ``relu(z) * (z > threshold)``; ours is ``z * (z > threshold)``. They agree
exactly when thresholds are >= 0, so negative thresholds are raised to 0 on reading (which
changes nothing in SAELens's function) and refused on writing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import CPU, DeviceSetting
from transcoders.formats.assemble import LayerWeights, assemble_per_layer
from transcoders.formats.files import SafetensorsFile, TranscoderFormatError, write_safetensors
from transcoders.formats.hook_names import (
    OUTPUT_HOOK,
    check_output_hook,
    input_hook,
    site_of_hook,
    split_hook,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The cfg.json schema we write is SAELens 6's (metadata nested); readers key on this version.
SCHEMA_VERSION = "6.0.0"

_ARCH = {  # architecture -> (activation, skip, is a transcoder by itself)
    "standard": ("relu", False, False),
    "transcoder": ("relu", False, True),
    "skip_transcoder": ("relu", True, True),
    "jumprelu": ("jumprelu", False, False),
    "jumprelu_transcoder": ("jumprelu", False, True),
    "topk": ("topk", False, False),
}


def is_saelens_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def saelens_layer_folders(folder: Path) -> list[Path]:
    """Sub-folders (any depth) that each hold one SAELens transcoder."""
    return sorted(p.parent for p in folder.rglob(CFG_FILE) if (p.parent / WEIGHTS_FILE).is_file())


def _read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TranscoderFormatError(f"{path} is not valid JSON ({err}): re-download it") from None
    if not isinstance(cfg, dict):
        raise TranscoderFormatError(f"{path} should hold a JSON object: re-download it")
    # SAELens 6 nests the model/hook facts under "metadata"; older files keep them on top.
    return {**cfg, **(cfg.get("metadata") or {})}


def _sae_layer(folder: Path, input_site: InputSite | None) -> LayerWeights:
    cfg = _read_cfg(folder)
    where = str(folder / CFG_FILE)
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if act_fn == "topk" and arch == "standard":
        arch = "topk"
    if arch not in _ARCH:
        raise TranscoderFormatError(
            f"{where}: SAELens architecture {arch!r} is not supported; supported: {sorted(_ARCH)}"
        )
    activation, skip, is_transcoder = _ARCH[arch]
    hook_in = cfg.get("hook_name") or cfg.get("hook_point")
    hook_out = cfg.get("hook_name_out")
    if not is_transcoder and not hook_out:
        raise TranscoderFormatError(
            f"{where} describes an SAE (it reconstructs its input at {hook_in!r}), not a "
            "transcoder: a transcoder names its output hook (hook_name_out)"
        )
    if hook_out:
        check_output_hook(str(hook_out), where)
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise TranscoderFormatError(
            f"{where}: normalize_activations={norm!r} rescales inputs at run time, which a "
            "transcoder here cannot reproduce; fold the scaling into the weights first"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise TranscoderFormatError(
            f"{where}: rescale_acts_by_decoder_norm is not supported; fold the decoder norms "
            "into the encoder first"
        )
    if activation == "topk" and not k:
        raise TranscoderFormatError(f"{where}: a TopK transcoder needs k, and cfg.json lacks it")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    d_out = cfg.get("d_out", d_in)
    if d_in != d_out:
        raise TranscoderFormatError(
            f"{where}: d_in {d_in} != d_out {d_out}; an MLP transcoder maps d_model to d_model"
        )
    layer = cfg.get("hook_layer", cfg.get("hook_point_layer"))
    if layer is None and hook_in:
        layer = split_hook(str(hook_in))[0]
    site = input_site
    if site is None and hook_in:
        site = site_of_hook(str(hook_in), where)

    path = folder / WEIGHTS_FILE
    f = SafetensorsFile(path)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,),
              "b_dec": (d_out,)}  # fmt: skip
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    for key, shape in shapes.items():
        f.require(key)
        if f.shapes[key] != shape:
            raise TranscoderFormatError(
                f"{path}: {key} has shape {f.shapes[key]}, but cfg.json implies {shape}; "
                "re-download the pair"
            )
    W_enc = f.get("W_enc").float()
    b_enc = f.get("b_enc").float()
    b_dec = f.get("b_dec").float()
    if not is_transcoder and cfg.get("apply_b_dec_to_input", True):
        # The SAE encodes (x - b_dec): fold that shift into the encoder bias.
        b_enc = b_enc - b_dec @ W_enc
    threshold = None
    if activation == "jumprelu":
        if "threshold" in f:
            threshold = f.get("threshold").float()
        elif "log_threshold" in f:
            threshold = f.get("log_threshold").float().exp()
        else:
            raise TranscoderFormatError(f"{path}: a JumpReLU transcoder needs 'threshold'")
        threshold = threshold.clamp(min=0.0)  # see module docstring: exact, not an approximation
    return LayerWeights(
        source=folder,
        model_layer=int(layer) if layer is not None else None,
        W_enc=W_enc.T,
        b_enc=b_enc,
        b_dec=b_dec,
        decoder=lambda: f.get("W_dec").unsqueeze(1),
        decoder_rows=lambda idx: f.rows("W_dec", idx).unsqueeze(1),
        threshold=threshold,
        W_skip=f.get("W_skip") if skip else None,
        activation=activation,
        topk=int(k) if activation == "topk" else None,
        input_site=site,
        model_name=cfg.get("model_name"),
    )


def read_saelens(
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
    """One SAELens transcoder folder, or a parent folder of several (one per model layer)."""
    folders = [path] if is_saelens_folder(path) else saelens_layer_folders(path)
    if not folders:
        raise TranscoderFormatError(f"no SAELens {CFG_FILE} + {WEIGHTS_FILE} folders in {path}")
    if input_site is None and saved:
        input_site = saved.get("input_site")
    layers = [
        _sae_layer(f, input_site)
        for f in tqdm(folders, desc="reading SAELens layers", unit="layer", disable=None)
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


def _architecture(clt: CrossLayerTranscoder) -> str:
    cfg = clt.cfg
    if cfg.skip and cfg.activation != "relu":
        raise TranscoderFormatError(
            f"SAELens has no skip transcoder with {cfg.activation}: save it as "
            "circuit-tracer-plt instead"
        )
    if cfg.activation == "jumprelu" and bool((clt.threshold < 0).any()):
        raise TranscoderFormatError(
            "this transcoder has negative JumpReLU thresholds, which SAELens's JumpReLU "
            "(ReLU first) cannot represent: save it as circuit-tracer-plt instead"
        )
    if cfg.skip:
        return "skip_transcoder"
    return {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "topk": "topk"}[cfg.activation]


def write_saelens(clt: CrossLayerTranscoder, folder: Path, dtype: torch.dtype | None = None):
    """One SAELens folder ``layer_{m}`` per non-empty layer (m = model layer) in ``folder``."""
    cfg = clt.cfg
    if cfg.kind != "plt":
        raise TranscoderFormatError(
            "SAELens stores per-layer transcoders only; a cross-layer transcoder is saved as "
            "circuit-tracer"
        )
    arch = _architecture(clt)
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    for i in tqdm(range(cfg.n_layers), desc="writing SAELens layers", unit="layer", disable=None):
        if i in cfg.empty_layers:
            continue
        m = cfg.model_layers[i] if cfg.model_layers else i
        sub = folder / f"layer_{m}"
        sub.mkdir()
        hooks = {
            "model_name": cfg.model_name,
            "hook_name": f"blocks.{m}.{input_hook(cfg.input_site)}",
            "hook_name_out": f"blocks.{m}.{OUTPUT_HOOK}",
            "hook_layer": m,
            "hook_head_index": None,
            "sae_lens_version": SCHEMA_VERSION,
        }
        sae_cfg = {
            "architecture": arch,
            "d_in": cfg.d_model,
            "d_sae": cfg.n_features,
            "d_out": cfg.d_model,
            "dtype": dtype_name,
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **({"k": cfg.topk} if cfg.activation == "topk" else {}),
            "metadata": hooks,
            # Pre-6 readers look for these at the top level.
            "model_name": cfg.model_name,
            "hook_name": hooks["hook_name"],
            "hook_layer": m,
        }
        (sub / CFG_FILE).write_text(json.dumps(sae_cfg, indent=2))
        t = {
            "W_enc": clt.W_enc[i].T,
            "W_dec": clt.decoder(i, cache=False)[:, 0],
            "b_enc": clt.b_enc[i],
            "b_dec": clt.b_dec[i],
        }
        if cfg.activation == "jumprelu":
            t["threshold"] = clt.threshold[i]
        if clt.W_skip is not None:
            t["W_skip"] = clt.W_skip[i]
        write_safetensors(t, sub / WEIGHTS_FILE, dtype)


def saelens_input_hook(path: Path) -> str | None:
    """The input hook (``hook_name``) the first SAELens folder at ``path`` names."""
    folders = [path] if is_saelens_folder(path) else saelens_layer_folders(path)
    if not folders:
        return None
    cfg = _read_cfg(folders[0])
    hook = cfg.get("hook_name") or cfg.get("hook_point")
    return str(hook) if hook else None
