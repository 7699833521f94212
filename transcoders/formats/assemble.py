"""Building a CrossLayerTranscoder from what a reader found on disk.

Readers describe each layer's weights (``LayerWeights``) and what the files say about the whole
transcoder; this module checks them against each other and against our own saved config
(``circuit_atlas.json``), places per-layer sources at their model layers, and fills a
transcoder whose decoders stay on disk until used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transcoders.clt import CrossLayerTranscoder, InputSite, TranscoderConfig
from transcoders.device import CPU, DeviceSetting
from transcoders.formats.files import TranscoderFormatError

CONFIG_FILE = "circuit_atlas.json"

# Fields the weight files determine; our saved config must agree with them.
GEOMETRY = ("n_layers", "d_model", "n_features", "kind", "skip")


def new_transcoder(cfg: TranscoderConfig, setting: DeviceSetting = CPU) -> CrossLayerTranscoder:
    """An uninitialised transcoder to be filled from files, its weights on ``setting.device`` in
    ``setting.dtype`` (readers copy each layer's tensors in as they read them); frozen (no
    grads) like any loaded weights: call ``requires_grad_(True)`` to fine-tune.

    Encoders, biases, thresholds and skip matrices are zeros; no decoder is allocated (each
    layer holds an empty placeholder until its reader sets it, lazily or read): a published
    CLT's decoders (26.5 GB for Gemma-2-2B's 426k CLT in bfloat16, 159 GB for the 2.5M one)
    never exist in memory at once, on the host or on a GPU."""
    clt = CrossLayerTranscoder(cfg, init=False, device="meta", dtype=setting.dtype)
    L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
    kw = {"device": setting.device, "dtype": setting.dtype}

    def zeros(*shape):
        return torch.nn.Parameter(torch.zeros(*shape, **kw), requires_grad=False)

    clt.W_enc, clt.b_enc, clt.b_dec, clt.threshold = (
        zeros(L, F, d), zeros(L, F), zeros(L, d), zeros(L, F)
    )  # fmt: skip
    if clt.W_skip is not None:
        clt.W_skip = zeros(L, d, d)
    for i in range(L):
        clt.W_dec[i] = torch.nn.Parameter(torch.empty(0, **kw), requires_grad=False)
    clt.requires_grad_(False)
    return clt


def merge_config(found: dict, saved: dict | None, where: Path) -> TranscoderConfig:
    """Config from the files' facts (``found``) plus our saved config (``saved``): geometry must
    agree; everything else the files do not say comes from ``saved``."""
    merged = dict(saved or {})
    for key in GEOMETRY:
        if saved is not None and key in saved and key in found and saved[key] != found[key]:
            raise TranscoderFormatError(
                f"{where / CONFIG_FILE} says {key}={saved[key]!r} but the weight files hold "
                f"{key}={found[key]!r}: the folder mixes two transcoders; re-convert it"
            )
    merged.update({k: v for k, v in found.items() if v is not None or k not in merged})
    try:
        return TranscoderConfig.from_dict(merged)
    except TypeError as err:
        raise TranscoderFormatError(f"{where}: incomplete transcoder config ({err})") from None


@dataclass
class LayerWeights:
    """One layer of a per-layer transcoder as found on disk. Shapes with F features, d = d_model:
    W_enc [F, d], b_enc [F], b_dec [d], threshold [F] or None, W_skip [d, d] or None (our
    convention: out += x @ W_skip.T). The decoder [F, 1, d] is read by ``decoder()``, and
    ``decoder_rows(idx)`` reads rows [n, 1, d] when the file allows partial reads."""

    source: Path
    model_layer: int | None
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    decoder: Callable[[], torch.Tensor]
    decoder_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    threshold: torch.Tensor | None = None
    W_skip: torch.Tensor | None = None
    activation: str | None = None
    topk: int | None = None
    input_site: InputSite | None = None
    model_name: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.b_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.b_dec.shape[0]


def _agree(layers: list[LayerWeights], attr: str, label: str):
    values = {getattr(lw, attr) for lw in layers if getattr(lw, attr) is not None}
    if len(values) > 1:
        detail = ", ".join(f"{lw.source}: {getattr(lw, attr)!r}" for lw in layers)
        raise TranscoderFormatError(
            f"the per-layer transcoders disagree on {label} ({detail}): load layers trained "
            "together"
        )
    return values.pop() if values else None


def assemble_per_layer(
    layers: list[LayerWeights],
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
    """A per-layer transcoder (kind "plt") from per-layer sources, on ``setting``'s device in its
    dtype.

    Placement: with ``n_layers`` (the model's layer count) each source sits at its model layer
    and layers without a source are inert zeros (listed in ``cfg.empty_layers``). Without it,
    the sources are stacked in model-layer order (transcoder layer j reads model layer
    ``cfg.model_layers[j]``; None when that is simply j). ``layer`` sets the model layer of a
    single source whose files do not name one.
    """
    if not layers:
        raise TranscoderFormatError(f"no transcoder layers found in {where}")
    if layer is not None:
        if len(layers) != 1:
            raise TranscoderFormatError(
                f"{where} holds {len(layers)} layers; layer= applies only to a single-layer file"
            )
        layers[0].model_layer = layer
    d_model = _agree(layers, "d_model", "d_model")
    n_features = _agree(layers, "n_features", "the number of features")
    activation = _agree(layers, "activation", "the activation function")
    topk = _agree(layers, "topk", "k of the TopK activation")
    if len({lw.W_skip is None for lw in layers}) > 1:
        raise TranscoderFormatError(
            f"some layers in {where} have a skip connection and some do not: load layers "
            "trained together"
        )
    skip = layers[0].W_skip is not None
    site = input_site or _agree(layers, "input_site", "the input site")
    saved = dict(saved or {})

    known = [lw.model_layer for lw in layers]
    if len(layers) > 1 and None in known:
        raise TranscoderFormatError(f"cannot tell which model layer each file in {where} reads")
    if len(set(known)) != len(known):
        raise TranscoderFormatError(
            f"{where} has more than one transcoder for model layer(s) "
            f"{sorted({m for m in known if known.count(m) > 1})}: keep one per layer"
        )
    layers = sorted(layers, key=lambda lw: -1 if lw.model_layer is None else lw.model_layer)

    if n_layers is None and saved.get("kind") == "plt" and not saved.get("model_layers"):
        n_layers = saved.get("n_layers")  # our own files: the saved placement
    if n_layers is not None:
        for lw in layers:
            if lw.model_layer is None:
                raise TranscoderFormatError(
                    f"{lw.source} does not say which model layer it reads: pass layer=N (--layer N)"
                )
            if not 0 <= lw.model_layer < n_layers:
                raise TranscoderFormatError(
                    f"{lw.source} reads model layer {lw.model_layer}, but the model has "
                    f"{n_layers} layers: it was trained for another model"
                )
        slots = {lw.model_layer: lw for lw in layers}
        order = [slots.get(i) for i in range(n_layers)]
        model_layers = None
    else:
        order = list(layers)
        ml = [lw.model_layer for lw in layers]
        model_layers = None if ml == list(range(len(ml))) or ml == [None] else ml
    empty = [i for i, lw in enumerate(order) if lw is None]

    found = {
        "n_layers": len(order),
        "d_model": d_model,
        "n_features": n_features,
        "kind": "plt",
        "skip": skip,
        "model_layers": model_layers,
        "empty_layers": empty,
    }
    saved.pop("model_layers", None)
    saved.pop("empty_layers", None)
    if activation is not None:
        found["activation"] = activation
    if topk is not None:
        found["topk"] = topk
    if site is not None:
        found["input_site"] = site
    name = model_name or saved.get("model_name") or _agree(layers, "model_name", "the model")
    found["model_name"] = name
    # A saved config describing a different layer count is about other files: geometry is
    # checked on what matters (width and d_model); the layer count follows the placement.
    saved.pop("n_layers", None)
    cfg = merge_config(found, saved, where)
    if input_site is not None:
        cfg.input_site = input_site
    if cfg.activation == "topk" and not cfg.topk:
        raise TranscoderFormatError(f"{where}: a TopK transcoder needs k, and its files lack it")

    clt = new_transcoder(cfg, setting)
    place = {"device": clt.device, "dtype": clt.dtype}
    with torch.no_grad():
        for i, lw in enumerate(order):
            if lw is None:
                clt.W_dec[i] = torch.nn.Parameter(
                    torch.zeros(n_features, 1, d_model, **place), requires_grad=False
                )
                continue
            # Each layer's tensors are copied onto the device (in its dtype) as they are read.
            clt.W_enc[i] = lw.W_enc
            clt.b_enc[i] = lw.b_enc
            clt.b_dec[i] = lw.b_dec
            if lw.threshold is not None:
                clt.threshold[i] = lw.threshold
            if lw.W_skip is not None:
                clt.W_skip[i] = lw.W_skip
            if lazy:
                clt.set_lazy_decoder(i, lw.decoder, lw.decoder_rows)
            else:
                w = lw.decoder()
                clt.check_decoder_shape(i, tuple(w.shape))
                clt.W_dec[i] = torch.nn.Parameter(w.to(**place), requires_grad=False)
    return clt
