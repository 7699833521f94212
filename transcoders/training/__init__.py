"""Training transcoders: the activation harvest and its on-disk cache, the trainer and
its recipes, losses, outlier handling, checkpoints, export, data parallelism. May
import the transcoders core, never tracer or graphstore."""

from __future__ import annotations

from transcoders.lazy_exports import install

# public name -> the module that holds it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "TrainConfig": "transcoders.training.config",
    "TrainResult": "transcoders.training.config",
    "train": "transcoders.training.run",
    "Trainer": "transcoders.training.trainer",
    "DEFAULT_RECIPE": "transcoders.training.recipes",
    "DEFAULT_CORPUS": "transcoders.training.recipes",
    "ActivationCache": "transcoders.training.activation_cache",
    "CacheSpec": "transcoders.training.activation_cache",
}

install(__name__, _EXPORTS)
