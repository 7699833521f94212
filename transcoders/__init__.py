"""Transcoders: cross-layer and per-layer transcoder modules, their activation functions, and
their weight formats (circuit-tracer, SAELens, GemmaScope; see ``transcoders.formats``).

Training: ``transcoders.train(cfg, ...)`` with a :class:`TrainConfig` (``transcoders.training.run``
names the function; ``from transcoders.training.run import X`` finds its module as usual).

The public names are given lazily (PEP 562): ``import transcoders`` loads no torch until a name
is used, so torch-free helpers (``transcoders.names``) stay light for the graph store.

This package knows nothing of ``tracer`` or ``graphstore``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transcoders.lazy_exports import install

# public name -> the module that holds it
_EXPORTS: dict[str, str] = {
    "ActivationKind": "transcoders.activations",
    "apply_activation": "transcoders.activations",
    "jumprelu": "transcoders.activations",
    "step": "transcoders.activations",
    "topk": "transcoders.activations",
    "CrossLayerTranscoder": "transcoders.clt",
    "InputSite": "transcoders.clt",
    "TranscoderConfig": "transcoders.clt",
    "CPU": "transcoders.device",
    "DeviceError": "transcoders.device",
    "DeviceSetting": "transcoders.device",
    "parse_device": "transcoders.device",
    "parse_dtype": "transcoders.device",
    "FORMATS": "transcoders.formats",
    "WRITABLE_FORMATS": "transcoders.formats",
    "TranscoderFormatError": "transcoders.formats",
    "TranscoderInfo": "transcoders.formats",
    "convert_transcoder": "transcoders.formats",
    "detect_format": "transcoders.formats",
    "load_transcoder": "transcoders.formats",
    "save_transcoder": "transcoders.formats",
    "transcoder_info": "transcoders.formats",
    "TrainConfig": "transcoders.training.run",
    "TrainResult": "transcoders.training.run",
    "train": "transcoders.training.run",
}

install(__name__, _EXPORTS)

if TYPE_CHECKING:  # names for type checkers and editors; nothing is imported at run time
    from transcoders.activations import (  # noqa: F401
        ActivationKind,
        apply_activation,
        jumprelu,
        step,
        topk,
    )
    from transcoders.clt import CrossLayerTranscoder, InputSite, TranscoderConfig  # noqa: F401
    from transcoders.device import (  # noqa: F401
        CPU,
        DeviceError,
        DeviceSetting,
        parse_device,
        parse_dtype,
    )
    from transcoders.formats import (  # noqa: F401
        FORMATS,
        WRITABLE_FORMATS,
        TranscoderFormatError,
        TranscoderInfo,
        convert_transcoder,
        detect_format,
        load_transcoder,
        save_transcoder,
        transcoder_info,
    )
    from transcoders.training.run import TrainConfig, TrainResult, train  # noqa: F401
