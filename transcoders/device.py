"""The one device/dtype setting of circuit-atlas.

Every command and API that computes takes a :class:`DeviceSetting` (or the ``device=`` /
``dtype=`` strings it is parsed from): model loading, transcoder loading, recording,
attribution, interventions, validation, steering, splice metrics, harvest and training.

- ``device``: where tensors live. ``"auto"`` picks ``cuda`` when a GPU is visible, else ``cpu``;
  ``"cuda:N"`` names one GPU (under torchrun, ``cuda:LOCAL_RANK``).
- ``dtype``: the dtype of the *model's and transcoders' weights* (float32, bfloat16, float16).
- ``compute_dtype``: what attribution and metrics accumulate in, whatever the weights' dtype
  (float32; exactness checks use float64 where they need it).

It lives in ``transcoders`` (the bottom of the dependency chain: transcoders -> tracer ->
graphstore) so that transcoder loading and training can use it; ``tracer`` re-exports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device or dtype that cannot be used here (no GPU, unknown name)."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` / None (float32) -> a torch dtype, or a clear error."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            choices = ", ".join(DTYPE_CHOICES)
            raise DeviceError(f"dtype {dtype} is not supported: use one of {choices}")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def parse_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` / None / ``"cpu"`` / ``"cuda[:N]"`` -> a torch device that exists here, or a
    clear error naming what to pass instead."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return torch.device("cuda", int(local) if local is not None else 0)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r}: use {DEVICE_HELP}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(device)!r} asked for, but no CUDA GPU is visible to torch: "
                "use --device cpu (or auto)"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(
                f"device {str(device)!r} does not exist: this machine has {n} GPU(s), "
                f"cuda:0 .. cuda:{n - 1}"
            )
        if dev.index is None:
            # Under torchrun each rank takes its own GPU.
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported: use {DEVICE_HELP}")
    return dev


@dataclass(frozen=True)
class DeviceSetting:
    """Where to compute and in which dtype. Build with :meth:`parse`; pass it down unchanged.

    device: a concrete torch device (never "auto" once parsed).
    dtype: the dtype weights are loaded and kept in.
    compute_dtype: the dtype attribution, influence and metrics accumulate in (float32).
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def parse(
        cls,
        device: str | torch.device | DeviceSetting | None = "auto",
        dtype: str | torch.dtype | None = None,
    ) -> DeviceSetting:
        """From command-line style strings (or torch objects). A DeviceSetting passes through
        (with ``dtype`` replaced when given)."""
        if isinstance(device, DeviceSetting):
            return device if dtype is None else cls(device.device, parse_dtype(dtype))
        return cls(parse_device(device), parse_dtype(dtype))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        """One line for logs and benchmark records, e.g. ``cuda:0 (NVIDIA H200) bfloat16``."""
        where = str(self.device)
        if self.is_cuda:
            where += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{where} {str(self.dtype).removeprefix('torch.')}"

    def to_dict(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


CPU = DeviceSetting()


def add_device_arguments(parser) -> None:
    """``--device`` and ``--dtype`` on an argparse parser (every computing command has both)."""
    parser.add_argument("--device", default="auto", help=f"where to compute: {DEVICE_HELP}")
    parser.add_argument(
        "--dtype",
        default="float32",
        help=f"dtype of the model's and transcoders' weights: {', '.join(DTYPE_CHOICES)}",
    )


def setting_from_args(args) -> DeviceSetting:
    """The DeviceSetting named by parsed ``--device`` / ``--dtype`` (DeviceError on bad input)."""
    return DeviceSetting.parse(getattr(args, "device", "auto"), getattr(args, "dtype", None))
