"""Harvesting MLP input/output activations from a model.

The model is reached only through a callable ``activations(tokens [B, P]) -> (inputs [L, B*P, d],
outputs [L, B*P, d])`` (the CLI builds it from the model; this package never imports one).
:func:`harvest_rows` turns one call into token rows (start token dropped when asked); the
trainer writes them to the on-disk activation cache (:mod:`.activation_cache`), and
:class:`ShuffleBuffer` holds them in memory (baselines, feature scans).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from transcoders.device import parse_device

ActivationFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ShuffleBuffer:
    """Harvested activations in memory: inputs, outputs [N, L, d] in ``dtype``."""

    def __init__(self, inputs: torch.Tensor, outputs: torch.Tensor, seconds: float = 0.0):
        self.inputs = inputs
        self.outputs = outputs
        self.seconds = seconds

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def tokens_per_second(self) -> float:
        return len(self) / self.seconds if self.seconds > 0 else float("nan")

    @classmethod
    @torch.no_grad()
    def harvest(
        cls,
        activations: ActivationFn,
        tokens: torch.Tensor,
        *,
        batch: int = 8,
        skip_bos: bool = True,
        dtype: torch.dtype = torch.float32,
        on_batch: Callable[[int, float], None] | None = None,
        device: torch.device | str | None = None,
    ) -> ShuffleBuffer:
        """Run ``activations`` over tokens [S, P] in batches of ``batch`` sequences, into a
        buffer in ``dtype`` on ``device`` (None: host memory; a GPU when training there, so
        batches need no copy).

        ``on_batch(n_tokens, seconds)`` is called after each batch (progress, budget checks)."""
        device = None if device is None else parse_device(device)  # clear error: no such GPU
        S, P = tokens.shape
        n = S * (P - int(skip_bos))
        ins = outs = None
        t0 = time.perf_counter()
        row = 0
        for b in range(0, S, batch):
            tb = time.perf_counter()
            x, y = harvest_rows(activations, tokens[b : b + batch], skip_bos)
            if ins is None:
                ins = torch.empty(n, *x.shape[1:], dtype=dtype, device=device)
                outs = torch.empty(n, *x.shape[1:], dtype=dtype, device=device)
            ins[row : row + len(x)] = x.to(dtype)
            outs[row : row + len(x)] = y.to(dtype)
            row += len(x)
            if on_batch is not None:
                on_batch(len(x), time.perf_counter() - tb)
        return cls(ins, outs, time.perf_counter() - t0)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` as float32 (inputs [L, n, d], outputs [L, n, d])."""
        return (self.inputs[idx].transpose(0, 1).float(), self.outputs[idx].transpose(0, 1).float())


@torch.no_grad()
def harvest_rows(
    activations: ActivationFn, tokens: torch.Tensor, skip_bos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``activations`` call on tokens [B, P] as token rows: inputs, outputs [B*keep, L, d]
    (keep = P - skip_bos; row b*keep + j is sequence b, position j + skip_bos), on the device
    ``activations`` returned them on, in its dtype. Shapes are checked (clear error)."""
    x, y = activations(tokens)
    B, P = tokens.shape
    if x.dim() != 3 or x.shape[1] != tokens.numel() or y.shape != x.shape:
        raise ValueError(
            f"activations() returned {tuple(x.shape)} and {tuple(y.shape)} for tokens "
            f"{tuple(tokens.shape)}: expected two [n_layers, {tokens.numel()}, d] tensors"
        )
    L, d = x.shape[0], x.shape[-1]
    s = int(skip_bos)
    x = x.view(L, B, P, d)[:, :, s:].reshape(L, -1, d).transpose(0, 1)
    y = y.view(L, B, P, d)[:, :, s:].reshape(L, -1, d).transpose(0, 1)
    return x, y


def seed_mix(*xs: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
