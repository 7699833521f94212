"""Transcoders: cross-layer and per-layer transcoder modules, their activation functions, and
their weight formats (circuit-tracer, SAELens, GemmaScope; see ``transcoders.formats``).

Training: ``transcoders.train(cfg, ...)`` with a :class:`TrainConfig` (the function is
re-exported here, so ``transcoders.train`` names the function; its module is
``sys.modules["transcoders.train"]``, and ``from transcoders.train import X`` works as usual).

This package knows nothing of ``tracer`` or ``graphstore``."""

from transcoders.activations import (
    ActivationKind,
    apply_activation,
    jumprelu,
    step,
    topk,
)
from transcoders.clt import CrossLayerTranscoder, InputSite, TranscoderConfig
from transcoders.device import CPU, DeviceError, DeviceSetting, parse_device, parse_dtype
from transcoders.formats import (
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
from transcoders.train import TrainConfig, TrainResult, train  # noqa: E402  (after formats)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "CPU",
    "DeviceError",
    "DeviceSetting",
    "parse_device",
    "parse_dtype",
    "FORMATS",
    "WRITABLE_FORMATS",
    "ActivationKind",
    "CrossLayerTranscoder",
    "InputSite",
    "TranscoderConfig",
    "TranscoderFormatError",
    "TranscoderInfo",
    "apply_activation",
    "convert_transcoder",
    "detect_format",
    "jumprelu",
    "load_transcoder",
    "save_transcoder",
    "step",
    "topk",
    "transcoder_info",
]
