"""Training checkpoints, written atomically (temporary file, flush, fsync, rename), so a crash
or a full disk never leaves a corrupt checkpoint behind: the previous one stays intact."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, then renamed over the old one. On any failure the old checkpoint stays intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        intact = (
            f"the previous checkpoint {path} is intact"
            if path.exists()
            else ("no earlier checkpoint existed")
        )
        raise CheckpointError(
            f"could not write checkpoint {path} ({err}); {intact}. Free disk space (or fix the "
            "folder's permissions) and run the same command again to resume"
        ) from err


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
