"""Data-parallel context for training: one process per rank under torchrun (gloo on the CPU,
NCCL on GPUs), or a single process (rank 0 of 1, every collective a no-op)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from transcoders.device import DeviceSetting


@dataclass
class Dist:
    """Data-parallel context (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collective buffers live (NCCL: a GPU)

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Dist:
        import torch.distributed as dist

        dev = torch.device("cpu") if device is None else torch.device(device)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dev)
        return cls(device=dev)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def any(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            f = t.float()
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
            return f > 0
        return t

    def broadcast(self, value: float) -> float:
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
            dist.broadcast(t, 0)
            return float(t.item())
        return value

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(setting: DeviceSetting) -> str | None:
    """Under torchrun (WORLD_SIZE > 1), join the process group once: NCCL when training on a
    GPU (each rank on its own, ``cuda:LOCAL_RANK``), gloo on the CPU. Returns the backend, or
    None for a single process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if setting.is_cuda:
            torch.cuda.set_device(setting.device)
        dist.init_process_group("nccl" if setting.is_cuda else "gloo")
    return dist.get_backend()
