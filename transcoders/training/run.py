"""Train a cross-layer (or per-layer / skip) transcoder: :func:`train` and its recipe,
:class:`TrainConfig`.

The run itself is :class:`transcoders.training.trainer.Trainer` (read it top to bottom); its parts
live
in small modules: the activation cache it reads batches from (:mod:`.activation_cache`), the
objective and held-out evaluation (:mod:`.objective`), the skip fit (:mod:`.skip_fit`), the
step plan and schedules (:mod:`.planner`), checkpoints (:mod:`.checkpoint`), the log and curves
(:mod:`.trainlog`), data parallelism (:mod:`.distributed`) and the export (:mod:`.export`).
This module re-exports the names callers use.

Exactness: a run resumes to the same final weights as an uninterrupted run, whether it was
killed while harvesting (it continues from the last complete cache chunk) or while training
(from the last checkpoint, written atomically). See :mod:`.trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from transcoders.clt import CrossLayerTranscoder
from transcoders.device import DeviceSetting
from transcoders.training.activation_cache import ActivationCache
from transcoders.training.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from transcoders.training.config import TrainConfig, TrainResult
from transcoders.training.distributed import Dist, init_distributed
from transcoders.training.export import export, save_export
from transcoders.training.harvest import ActivationFn
from transcoders.training.log import LOG, plot_curves, read_log
from transcoders.training.objective import StepOut, objective
from transcoders.training.planner import BudgetError, StepPlan, lr_at, sparsity_at
from transcoders.training.skip_fit import fit_skip
from transcoders.training.trainer import Trainer

__all__ = [
    "CHECKPOINT",
    "LOG",
    "BudgetError",
    "CheckpointError",
    "Dist",
    "StepOut",
    "StepPlan",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "export",
    "fit_skip",
    "init_distributed",
    "load_checkpoint",
    "lr_at",
    "numpy_tokens",
    "objective",
    "plot_curves",
    "read_log",
    "save_checkpoint",
    "save_export",
    "sparsity_at",
    "train",
]


def train(
    cfg: TrainConfig,
    *,
    activations: ActivationFn,
    train_tokens: torch.Tensor,
    heldout_tokens: torch.Tensor,
    n_layers: int,
    d_model: int,
    out_dir: str | os.PathLike,
    model_name: str | None = None,
    model_id: str = "",
    corpus: str = "",
    cache: str | os.PathLike | ActivationCache | None = None,
    spliced_eval: Callable[[CrossLayerTranscoder], dict] | None = None,
    resume: bool = True,
    progress: bool = True,
    plot: bool = True,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | DeviceSetting | None = "cpu",
    clock: Callable[[], float] | None = None,
) -> TrainResult:
    """Train on ``train_tokens`` [S, P] (rows start with BOS), evaluating on ``heldout_tokens``.

    ``activations(tokens [B, P]) -> (inputs, outputs)``, each [L, B*P, d], raw model activations.
    They are harvested once into the activation cache ``cache`` (a folder; default
    ``out_dir/activations``), whose manifest must name the same model (``model_name``,
    ``model_id``), sites, corpus (``corpus``) and dtype, else a clear error. Several recipes can
    share one cache. ``spliced_eval(exported_clt) -> dict`` (optional) measures the model with
    every MLP replaced. Writes ``checkpoint.pt``, ``log.jsonl``, ``curves.png``,
    ``metrics.json`` and the exported weights (``transcoder/``) into ``out_dir``.

    ``device`` (``"cpu"``, ``"cuda[:N]"``, ``"auto"`` or a :class:`DeviceSetting`): where the
    transcoder trains, in float32 whatever the model's dtype; cached activations are memory-
    mapped in host memory and each batch is copied there. The exported transcoder is on the
    CPU. Under torchrun call :func:`init_distributed` first (NCCL on CUDA, gloo on CPU).
    ``on_step(done)`` runs after each step; ``clock`` (seconds, default ``time.perf_counter``)
    times the budget.
    """
    import time

    return Trainer(
        cfg,
        activations=activations,
        train_tokens=train_tokens,
        heldout_tokens=heldout_tokens,
        n_layers=n_layers,
        d_model=d_model,
        out_dir=out_dir,
        model_name=model_name,
        model_id=model_id,
        corpus=corpus,
        cache=cache,
        spliced_eval=spliced_eval,
        resume=resume,
        progress=progress,
        plot=plot,
        on_step=on_step,
        device=device,
        clock=clock or time.perf_counter,
    ).run()


def numpy_tokens(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens), dtype=torch.long)
