"""Streaming MLP input/output activations from a model into a shuffling buffer.

The model is reached only through a callable ``activations(tokens [B, P]) -> (inputs [L, B*P, d],
outputs [L, B*P, d])`` (the CLI builds it from the model; this package never imports one), so
nothing but one buffer of activations is ever held: SmolLM2's inputs + outputs for all 30
layers are about 138 KB per token in float32.

Training proceeds in *rounds*. In round r each data shard (one per data-parallel rank, or
several in one process) harvests its own block of corpus sequences into a :class:`ShuffleBuffer`,
and training draws minibatches from a seeded permutation of that buffer, ``passes`` times over.
Everything is a function of (seed, round, shard), so a run resumes exactly from a step number:
the round's buffer is simply harvested again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from transcoders.device import parse_device

ActivationFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StreamPlan:
    """seqs_per_shard sequences per data shard per round, harvested ``harvest_batch`` at a time;
    ``skip_bos`` drops position 0 (the BOS token's MLP outputs are huge outliers that attention
    sinks rely on; the splice keeps the model's own MLP there)."""

    seqs_per_shard: int
    n_shards: int = 1
    harvest_batch: int = 8
    skip_bos: bool = True
    passes: int = 1

    def shard_sequences(self, n_train: int, round_: int, shard: int) -> np.ndarray:
        """Indices of the training sequences shard ``shard`` harvests in round ``round_``."""
        start = (round_ * self.n_shards + shard) * self.seqs_per_shard
        return (start + np.arange(self.seqs_per_shard)) % n_train

    def tokens_per_shard(self, seq_len: int) -> int:
        return self.seqs_per_shard * (seq_len - int(self.skip_bos))


class ShuffleBuffer:
    """One round's activations for one data shard: inputs, outputs [N, L, d] in ``dtype``."""

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

    def order(self, seed: int, round_: int, shard: int, passes: int) -> torch.Tensor:
        """The buffer's shuffled visiting order: ``passes`` seeded permutations, concatenated."""
        g = torch.Generator().manual_seed(_mix(seed, round_, shard))
        return torch.cat([torch.randperm(len(self), generator=g) for _ in range(passes)])

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


def _mix(*xs: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
