"""Transcoder weight formats: detect, load, save, convert, describe.

Formats (``FORMATS``):

- ``circuit-tracer``: circuit-tracer's CLT layout (``W_enc_{i}.safetensors`` +
  ``W_dec_{i}.safetensors``, optional ``config.yaml``). Read and written. Our own layout is this
  plus ``circuit_atlas.json`` (``TranscoderConfig``: model, input site, activation,
  normalisation, training metrics).
- ``circuit-tracer-plt``: circuit-tracer's per-layer layout (``layer_{i}.safetensors``). Read
  and written (+ ``circuit_atlas.json``).
- ``saelens``: SAELens transcoders, a ``cfg.json`` + ``sae_weights.safetensors`` folder, or a
  parent folder of one such folder per layer. Read; written for per-layer transcoders.
- ``gemmascope``: GemmaScope ``params.npz`` transcoders (a file, or a folder tree of them with
  ``layer_{i}`` in their paths). Read only.
- ``gemmascope-2``: Gemma Scope 2 safetensors (``w_enc``, ``w_dec``, ...): per-layer
  ``layer_{i}_.../params.safetensors`` or a CLT's ``params_layer_{i}.safetensors``. Read only.
- ``config-list``: a circuit-tracer ``config.yaml`` whose ``transcoders:`` list names one file
  per layer (local paths or ``hf://`` URIs; any per-layer format above). Read only.

Besides a local path, ``load_transcoder`` takes what circuit-tracer takes (see
``transcoders.formats.hub``): a preset (``gemma``, ``llama``: ``transcoders.formats.presets``), a
hub repository
id ``org/name[/sub/folder][@revision]`` or ``hf://`` URI, resolved through the Hugging Face
cache (``HF_HUB_OFFLINE=1`` honoured). A published transcoder's identity names its repository
and commit.
- ``sparsify``: EleutherAI sparsify TopK transcoders (optionally with skip connection), a
  ``cfg.json`` + ``sae.safetensors`` folder per MLP hookpoint (``layers.{i}.mlp``), or the run
  folder holding them. Read only.

Per-layer sources (SAELens, GemmaScope, sparsify) become a per-layer transcoder (kind ``plt``):
stacked in model-layer order, or, given ``n_layers``, placed at their model layers with inert
zero layers elsewhere (see ``transcoders.formats.assemble.assemble_per_layer``).

With ``lazy=True`` only encoders are read when loading; each layer's decoder is read from disk
on first use (and a sparse decode reads only the rows it needs).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from transcoders.clt import CrossLayerTranscoder, InputSite
from transcoders.device import DTYPE_CHOICES, DeviceSetting, parse_dtype
from transcoders.device import DTYPES as DEVICE_DTYPES
from transcoders.formats.assemble import CONFIG_FILE
from transcoders.formats.circuit_tracer import (
    is_clt_folder,
    is_plt_folder,
    read_clt,
    read_listed,
    read_plt,
    read_yaml,
    write_clt,
    write_plt,
)
from transcoders.formats.files import TranscoderFormatError, atomic_folder, missing
from transcoders.formats.gemmascope import (
    gemmascope2_files,
    gemmascope_files,
    read_gemmascope,
    read_gemmascope2,
)
from transcoders.formats.hook_names import reads_before_gain
from transcoders.formats.hub import resolve as resolve_published
from transcoders.formats.saelens import (
    is_saelens_folder,
    read_saelens,
    saelens_input_hook,
    saelens_layer_folders,
    write_saelens,
)
from transcoders.formats.sparsify import is_sparsify_folder, read_sparsify, sparsify_layer_folders

FORMATS = (
    "circuit-tracer",
    "circuit-tracer-plt",
    "saelens",
    "gemmascope",
    "gemmascope-2",
    "sparsify",
    "config-list",
)
WRITABLE_FORMATS = ("circuit-tracer", "circuit-tracer-plt", "saelens")
# Storage precisions: the one dtype table of transcoders.device.
DTYPES = {name: DEVICE_DTYPES[name] for name in DTYPE_CHOICES}

__all__ = [
    "DTYPES",
    "FORMATS",
    "WRITABLE_FORMATS",
    "TranscoderFormatError",
    "TranscoderInfo",
    "convert_transcoder",
    "detect_format",
    "fold_input_gain",
    "load_transcoder",
    "save_transcoder",
    "transcoder_info",
]


def detect_format(path: str | os.PathLike) -> str:
    """The format of the transcoder at ``path`` (a folder, or a GemmaScope .npz file)."""
    p = Path(path)
    if not p.exists():
        raise missing(p, "path")
    if p.is_file():
        if p.suffix == ".npz":
            return "gemmascope"
        if gemmascope2_files(p):
            return "gemmascope-2"
        if p.suffix in (".yaml", ".yml"):
            return "config-list"
        if p.name in ("cfg.json", "sae_weights.safetensors", "sae.safetensors"):
            kind = "sparsify" if (p.parent / "sae.safetensors").is_file() else "SAELens"
            raise TranscoderFormatError(f"{p} is part of a {kind} folder: load {p.parent}")
        raise TranscoderFormatError(
            f"{p} is a single file; load the folder that holds the transcoder ({p.parent})"
        )
    if is_clt_folder(p):
        return "circuit-tracer"
    if is_plt_folder(p):
        return "circuit-tracer-plt"
    if is_saelens_folder(p) or saelens_layer_folders(p):
        return "saelens"
    if is_sparsify_folder(p) or sparsify_layer_folders(p):
        return "sparsify"
    if (read_yaml(p) if (p / "config.yaml").is_file() else {}).get("transcoders"):
        return "config-list"
    if gemmascope2_files(p):
        return "gemmascope-2"
    if gemmascope_files(p):
        return "gemmascope"
    raise TranscoderFormatError(
        f"{p} holds no transcoder in a format we read: expected W_enc_0.safetensors "
        "(circuit-tracer CLT), layer_0.safetensors (circuit-tracer per-layer), cfg.json + "
        "sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify) or params.npz "
        "(GemmaScope)"
    )


def _saved_config(p: Path) -> dict | None:
    path = (p if p.is_dir() else p.parent) / CONFIG_FILE
    if not p.is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TranscoderFormatError(
            f"{path} is not valid JSON ({err}): fix it, or delete it to load the weights alone"
        ) from None
    if not isinstance(data, dict):
        raise TranscoderFormatError(f"{path} should hold a JSON object: fix or delete it")
    return data


def load_transcoder(
    path: str | os.PathLike,
    *,
    lazy: bool = True,
    format: str | None = None,
    n_layers: int | None = None,
    d_model: int | None = None,
    model_name: str | None = None,
    layer: int | None = None,
    input_site: InputSite | None = None,
    model=None,
    device: str | torch.device | DeviceSetting | None = "cpu",
    dtype: str | torch.dtype | None = None,
    target_model: str | None = None,
    mlp_norm_gain=None,
) -> CrossLayerTranscoder:
    """Load a transcoder in any format of ``FORMATS`` (detected unless ``format`` is given), or
    a published one by preset, hub reference or config.yaml (see the module doc).

    lazy: read only encoders now; each decoder [F, T, d] is opened on first use (and a sparse
        decode reads only its rows). ``lazy=False`` opens and shape-checks every decoder now;
        safetensors memory-maps them, so their pages still come from disk on first touch.
    n_layers, d_model: the model's shape. The transcoder is checked against them (a clear error
        when it was trained for another model), and per-layer sources are placed at their model
        layers of an ``n_layers``-layer transcoder.
    model: instead of n_layers/d_model, anything with ``n_layers`` and ``d_model`` attributes
        (and optionally ``name``), or with a ``facts`` attribute that has them (a
        ``tracer.model.LanguageModel``).
    model_name: recorded in the config (and named in errors) when the files do not say it.
    layer: the model layer of a single-layer source whose files do not name one.
    input_site: override the input site (``resid_mid`` or ``mlp_in``) the files declare.
    device, dtype: where the weights live and their dtype (a :class:`DeviceSetting`, or the
        strings ``--device``/``--dtype`` take: ``"auto"``, ``"cuda:1"``, ``"bfloat16"``; default
        CPU, float32). Encoders and biases are copied onto the device layer by layer as they
        are read; a lazy decoder is moved there (converted to ``dtype``) when first read, and
        row reads move only their rows. Products are computed in float32 whatever the dtype.
    target_model: the name of the model the transcoder will serve (``--model``): a published
        set trained for another hub model is refused before its weights are fetched. Checked,
        never recorded (unlike ``model_name``).
    mlp_norm_gain: ``gain(model_layer) -> [d]``, the model's MLP-input norm gains, folded into a
        source that reads the norm before its gain (GemmaScope's ``ln2.hook_normalized``; see
        :func:`fold_input_gain`). ``model`` supplies it when it has ``mlp_norm_gain``.
    Weights are frozen (no grads).
    """
    setting = DeviceSetting.parse(device, dtype)
    gain = mlp_norm_gain
    if model is not None:
        facts = getattr(model, "facts", model)
        n_layers = facts.n_layers if n_layers is None else n_layers
        d_model = facts.d_model if d_model is None else d_model
        model_name = model_name or getattr(facts, "name", None)
        gain = gain or getattr(model, "mlp_norm_gain", None)
    wanted = target_model or model_name
    local = Path(path).exists()
    pub = resolve_published(path, wanted) if format in (None, "config-list") or not local else None
    args = (lazy, format, n_layers, d_model, model_name, layer, input_site, setting,
            target_model, gain)  # fmt: skip
    if pub is None:
        return _load(path, None, *args)
    try:
        return _load(path, pub, *args)
    except (TranscoderFormatError, ValueError) as err:
        if str(err).startswith(pub.label):
            raise
        trained = f" (trained for {pub.model_name})" if pub.model_name else ""
        raise TranscoderFormatError(f"{pub.label}{trained}: {err}") from None


def _load(path, pub, lazy, format, n_layers, d_model, model_name, layer, input_site, setting,
          target_model, gain) -> CrossLayerTranscoder:  # fmt: skip
    """load_transcoder's work once ``pub`` (a published source, or None) is resolved."""
    if pub is not None and pub.folder is not None:
        path = pub.folder
    p = Path(path)
    fmt = "config-list" if pub is not None and pub.files is not None else format
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise TranscoderFormatError(f"unknown transcoder format {fmt!r}: use one of {FORMATS}")
    if fmt == "config-list" and pub is None:
        raise TranscoderFormatError(f"{p} is not a config.yaml that lists transcoder files")
    if pub is None and not p.exists():
        raise missing(p, "path")
    conf = pub.conf if pub is not None else {}
    saved = _saved_config(p) if p.exists() else None
    recorded = model_name or (pub.model_name if pub is not None else None)
    common = dict(saved=saved, lazy=lazy, input_site=input_site, model_name=recorded,
                  setting=setting)  # fmt: skip
    if fmt == "config-list":
        where = Path(pub.files[0]).parent if pub.name else Path(pub.label)
        clt = read_listed(pub.files, conf, where=where, n_layers=n_layers, layer=layer, **common)
    elif fmt == "circuit-tracer":
        if layer is not None:
            raise TranscoderFormatError("layer= applies to single-layer sources, not a CLT")
        clt = read_clt(p, **common)
    else:
        reader = {
            "circuit-tracer-plt": read_plt,
            "saelens": read_saelens,
            "gemmascope": read_gemmascope,
            "gemmascope-2": read_gemmascope2,
            "sparsify": read_sparsify,
        }[fmt]
        clt = reader(p, n_layers=n_layers, layer=layer, **common)
    for i in range(clt.cfg.n_layers):  # every layer's decoder was set (lazily or read)
        if clt.decoder_loaded(i):
            clt.check_decoder_shape(i, tuple(clt.W_dec[i].shape))
    if pub is not None and pub.name and not (saved or {}).get("name"):
        clt.cfg.name = pub.name  # the repository and commit: graphs say which published set
    label = pub.label if pub is not None else str(p)
    hook = _published_input_hook(fmt, p, conf, saved)
    if input_site is None and reads_before_gain(hook):
        if gain is None:
            warnings.warn(
                f"{label} reads {hook} (the MLP-input norm before its gain): load it with the "
                "model (model=...) so the gain is folded into its encoder; as loaded it reads "
                "the MLP input after the gain",
                stacklevel=3,  # the caller of load_transcoder
            )
        else:
            # The identity is that of the published weights: the same set folded for a model
            # or loaded without one (``transcoder_identity_at``) keeps one identity.
            clt.keep_identity = True
            _ = clt.identity
            fold_input_gain(clt, gain)
    # The identity is computed on first use (it reads a few decoder rows, so a lazy load stays
    # lazy) and then kept: these weights are frozen.
    clt.keep_identity = True
    if n_layers is not None or d_model is not None:
        clt.check_model(
            n_layers if n_layers is not None else clt.cfg.n_layers,
            d_model if d_model is not None else clt.cfg.d_model,
            target_model or model_name or clt.cfg.model_name or "the model",
        )
    return clt


def _published_input_hook(fmt: str, p: Path, conf: dict, saved: dict | None) -> str | None:
    """The TransformerLens hook the source's own files say it reads (None: our own files, or
    not said)."""
    if saved:  # our own circuit_atlas.json: the encoder is already in our convention
        return None
    if conf.get("feature_input_hook"):
        return str(conf["feature_input_hook"])
    if fmt in ("circuit-tracer", "circuit-tracer-plt") and p.is_dir():
        return read_yaml(p).get("feature_input_hook")
    if fmt == "gemmascope":
        return "ln2.hook_normalized"  # circuit-tracer's hook for GemmaScope's params.npz
    if fmt == "saelens":
        return saelens_input_hook(p)
    return None


def fold_input_gain(clt: CrossLayerTranscoder, gain) -> None:
    """Turn a transcoder that reads the MLP-input norm's output before its gain g (TransformerLens
    ``ln2.hook_normalized``) into one reading the MLP input (``mlp_in``): ``W_enc / g`` (and
    ``W_skip / g``), so that ``(W_enc / g) @ (g * x_hat) = W_enc @ x_hat`` exactly up to rounding.

    gain: ``gain(model_layer) -> Tensor [d]`` (``tracer.model.LanguageModel.mlp_norm_gain``).
    Empty layers are left as they are. In place. (``load_transcoder`` computes the identity
    before folding: it names the published weights.)"""
    cfg = clt.cfg
    with torch.no_grad():
        for i in range(cfg.n_layers):
            if i in cfg.empty_layers:
                continue
            m = cfg.model_layers[i] if cfg.model_layers else i
            g = torch.as_tensor(gain(m)).detach().to(device=clt.W_enc.device, dtype=torch.float32)
            if g.shape != (cfg.d_model,):
                raise TranscoderFormatError(
                    f"the model's MLP-norm gain of layer {m} has shape {tuple(g.shape)}, "
                    f"expected [{cfg.d_model}]"
                )
            if bool((g == 0).any()):
                raise TranscoderFormatError(
                    f"layer {m}'s MLP-norm gain has zeros: a transcoder reading the input before "
                    "the gain cannot be expressed on the MLP input; load it with "
                    "input_site='mlp_in' to read the MLP input unchanged"
                )
            clt.W_enc[i] = (clt.W_enc[i].float() / g).to(clt.W_enc.dtype)
            if clt.W_skip is not None:
                clt.W_skip[i] = (clt.W_skip[i].float() / g).to(clt.W_skip.dtype)
    clt.cfg.input_site = "mlp_in"


def default_format(clt: CrossLayerTranscoder) -> str:
    return "circuit-tracer" if clt.cfg.kind == "clt" else "circuit-tracer-plt"


def save_transcoder(
    clt: CrossLayerTranscoder,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``clt`` to the folder ``path`` in a format of ``WRITABLE_FORMATS`` (default:
    circuit-tracer for a CLT, circuit-tracer-plt for a per-layer transcoder), with our config
    ``circuit_atlas.json`` beside the weights.

    The folder is written under a temporary name and renamed into place, so a failed write
    leaves nothing (and an existing folder is replaced only with ``overwrite``). ``dtype``
    (e.g. ``"bfloat16"``) stores the weights in another precision; the default keeps float32,
    which reloads bit for bit.
    """
    fmt = format or default_format(clt)
    if fmt not in WRITABLE_FORMATS:
        raise TranscoderFormatError(
            f"cannot write format {fmt!r}: writable formats are {WRITABLE_FORMATS}"
        )
    kind = clt.cfg.kind
    if fmt == "circuit-tracer" and kind != "clt":
        raise TranscoderFormatError(
            "the circuit-tracer CLT layout needs decoders to every later layer; save a "
            "per-layer transcoder as circuit-tracer-plt or saelens"
        )
    if fmt in ("circuit-tracer-plt", "saelens") and kind != "plt":
        raise TranscoderFormatError(
            f"{fmt} stores per-layer transcoders; save a cross-layer transcoder as circuit-tracer"
        )
    writer = {"circuit-tracer": write_clt, "circuit-tracer-plt": write_plt,
              "saelens": write_saelens}[fmt]  # fmt: skip
    dt = None if dtype is None else parse_dtype(dtype)

    def write(tmp: Path) -> None:
        writer(clt, tmp, dt)
        cfg = replace(clt.cfg, fingerprint=clt.identity.fingerprint)
        (tmp / CONFIG_FILE).write_text(cfg.to_json())

    atomic_folder(path, write, overwrite=overwrite)
    return Path(path)


def convert_transcoder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str | None = None,
    *,
    src_format: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    **load_kwargs,
) -> CrossLayerTranscoder:
    """Load ``src`` (in ``src_format``, detected by default; ``load_kwargs`` go to
    ``load_transcoder``) and save it to ``dst`` in ``format``, reading one decoder at a time.
    Returns the (lazy) loaded transcoder."""
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(
            f"{dst} already exists: choose another destination or allow overwriting (--force)"
        )
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError("source and destination are the same folder: convert into a new one")
    clt = load_transcoder(src, lazy=True, format=src_format, **load_kwargs)
    save_transcoder(clt, dst, format, overwrite=overwrite, dtype=dtype)
    return clt


@dataclass
class TranscoderInfo:
    """A summary of a transcoder on disk (sizes in bytes)."""

    path: Path
    format: str
    has_config: bool
    kind: str
    n_layers: int
    d_model: int
    n_features: int
    activation: str
    topk: int | None
    skip: bool
    input_site: str
    model_name: str | None
    model_layers: list[int] | None
    empty_layers: list[int]
    training: dict
    files: list[tuple[str, int]] = field(default_factory=list)
    identity: str = ""  # name@fingerprint (transcoders.identity), computed from the weights

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def n_parameters(self) -> int:
        L, F, d = self.n_layers, self.n_features, self.d_model
        n_targets = L * (L + 1) // 2 if self.kind == "clt" else L
        return L * F * d + n_targets * F * d + L * (2 * F + d) + (L * d * d if self.skip else 0)

    def lines(self) -> list[str]:
        act = f"topk (k={self.topk})" if self.activation == "topk" else self.activation
        kind = "cross-layer" if self.kind == "clt" else "per-layer"
        out = [
            f"path        {self.path}",
            f"identity    {self.identity}",
            f"format      {self.format}" + (f" + {CONFIG_FILE}" if self.has_config else ""),
            f"kind        {kind} transcoder" + (" with affine skip" if self.skip else ""),
            f"layers      {self.n_layers}",
            f"d_model     {self.d_model}",
            f"features    {self.n_features} per layer, {self.n_features * self.n_layers} total",
            f"activation  {act}",
            f"sites       reads {self.input_site}, writes mlp_out",
            f"model       {self.model_name or '(not recorded)'}",
            f"parameters  {self.n_parameters:,}",
        ]
        if self.model_layers:
            out.append(f"model layers {self.model_layers}")
        if self.empty_layers:
            out.append(f"empty layers {self.empty_layers} (no transcoder in the source)")
        for key, value in self.training.items():
            out.append(f"training    {key}: {value}")
        out.append(f"files       {len(self.files)}, {_human(self.total_bytes)} in all")
        out += [f"  {_human(size):>10}  {name}" for name, size in self.files]
        return out


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def transcoder_info(path: str | os.PathLike, **load_kwargs) -> TranscoderInfo:
    """Describe the transcoder at ``path`` (reads encoders and headers, not decoders): a local
    path, or a preset / hub reference / config.yaml (see :func:`load_transcoder`)."""
    fmt = load_kwargs.pop("format", None)
    pub = resolve_published(path) if fmt in (None, "config-list") else None
    p = pub.folder if pub is not None and pub.folder is not None else Path(path)
    if pub is not None and pub.files is not None:
        fmt = "config-list"
    fmt = fmt or detect_format(p)
    clt = load_transcoder(path if pub is not None else p, lazy=True, format=fmt, **load_kwargs)
    cfg = clt.cfg
    if pub is not None and pub.files is not None:
        files = [(str(f), f.stat().st_size) for f in pub.files]
    elif p.is_file():
        files = [(p.name, p.stat().st_size)]
    else:
        files = sorted(
            (str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*") if f.is_file()
        )
    return TranscoderInfo(
        path=p,
        format=fmt,
        has_config=p.is_dir() and (p / CONFIG_FILE).is_file(),
        kind=cfg.kind,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_features=cfg.n_features,
        activation=cfg.activation,
        topk=cfg.topk,
        skip=cfg.skip,
        input_site=cfg.input_site,
        model_name=cfg.model_name,
        model_layers=cfg.model_layers,
        empty_layers=list(cfg.empty_layers),
        training=dict(cfg.training),
        files=files,
        identity=clt.identity.id,
    )
