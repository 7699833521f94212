"""Tracing across ranks: ``circuit-atlas trace --prompts FILE`` under ``torchrun`` (or Slurm or
any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``).

How a job runs (see :func:`tracer.batch.run.trace_many`):

- Rank 0 plans: it opens the graph store (when asked), decides which prompts still need tracing
  (the skip-if-traced check against the graph folder and the store) and broadcasts the plan
  over a gloo process group (CPU only). No rank traces before the plan exists, so every rank
  sees the same plan, and a store that cannot be reached stops every rank before any tracing.
- Each rank traces ``todo[rank::world_size]`` (a deterministic share: no prompt is traced by two
  ranks) on its own device (``cuda:LOCAL_RANK`` when GPUs are present, else the CPU) and writes
  the Parquet files to the shared graph folder.
- One writer: each finished prompt (its file paths, or its failure and reason) is posted to a
  FIFO queue held in a ``TCPStore`` on rank 0, and rank 0's collector thread writes the graphs
  to the store in arrival order, drives one progress line and builds the final summary. Other
  ranks never connect to the store, so the managed ArcadeDB server may stay bound to loopback
  on rank 0's node, and writers never conflict on shared ``(:Feature)`` nodes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


class RankError(ValueError):
    """The launcher's rank variables are missing or inconsistent."""


def _env_int(env, name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise RankError(
                f"RANK is set but {name} is not: launch with torchrun (or set RANK, WORLD_SIZE, "
                "LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise RankError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job. One process (no launcher): rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, env=None) -> RankInfo:
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (torchrun sets
        all four; a launcher that sets only the first three gets local_world_size = world)."""
        env = os.environ if env is None else env
        if "RANK" not in env:
            return cls()
        rank = _env_int(env, "RANK")
        world = _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK", rank)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world:
            raise RankError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        if not 0 <= local < local_world:
            raise RankError(f"LOCAL_RANK={local} is not in 0..LOCAL_WORLD_SIZE-1 ({local_world})")
        return cls(rank, world, local, local_world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 plans, owns the store and collects every rank's results."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's deterministic share of ``items``: every world_size-th from its rank."""
        return items[self.rank :: self.world_size]

    def threads(self) -> int:
        """Torch CPU threads for this rank: ``OMP_NUM_THREADS`` when set (torchrun sets 1),
        else the node's cores divided among its ranks."""
        omp = os.environ.get("OMP_NUM_THREADS")
        if omp and omp.isdigit() and int(omp) > 0:
            return int(omp)
        return max(1, (os.cpu_count() or 1) // self.local_world_size)


def rank_setting(info: RankInfo, device: str | None = "auto", dtype: str | None = None):
    """The DeviceSetting of this rank: ``cuda:LOCAL_RANK`` for ``auto`` or a bare ``cuda`` when
    GPUs are visible (a clear error when the node has fewer GPUs than ranks), the CPU otherwise;
    an explicit ``cuda:N`` or ``cpu`` is kept."""
    import torch

    from transcoders.device import DeviceError, DeviceSetting

    name = "auto" if device is None else str(device)
    if name in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if info.local_rank >= n:
            raise DeviceError(
                f"local rank {info.local_rank} has no GPU: this node has {n} GPU(s); run at most "
                f"{n} ranks per node (torchrun --nproc_per_node {n}) or pass --device cpu"
            )
        name = f"cuda:{info.local_rank}"
    return DeviceSetting.parse(name, dtype)


# --- messages between ranks ------------------------------------------------------------------


class LocalQueue:
    """The results queue of a single process (worker processes report to the main process)."""

    def __init__(self):
        import queue

        self._q = queue.Queue()

    def put(self, msg: dict) -> None:
        self._q.put(msg)

    def get(self, timeout: float) -> dict | None:
        import queue

        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


class StoreQueue:
    """A FIFO of JSON messages in a torch ``TCPStore``: any rank puts, rank 0 gets.

    ``put`` takes a ticket (an atomic counter) and stores the message under it; ``get`` reads
    the tickets in order, so every message is read exactly once.
    """

    def __init__(self, store):
        self._store = store
        self._next = 1

    def put(self, msg: dict) -> None:
        n = self._store.add("queue/tickets", 1)
        self._store.set(f"queue/{n}", json.dumps(msg))

    def get(self, timeout: float) -> dict | None:
        key = f"queue/{self._next}"
        deadline = time.monotonic() + timeout
        while not self._store.check([key]):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        msg = json.loads(self._store.get(key))
        self._store.delete_key(key)
        self._next += 1
        return msg


class RankGroup:
    """The ranks of one job: a gloo process group (plan broadcast, barriers) and the results
    queue hosted by rank 0. For one process every method is local. Use as a context manager.

    ``timeout``: how long a rank waits in a collective (the plan broadcast, where rank 0 may
    be starting the managed store server) and to reach rank 0's queue.
    """

    def __init__(self, info: RankInfo, timeout: timedelta = timedelta(minutes=30)):
        self.info = info
        self.timeout = timeout
        self.queue: LocalQueue | StoreQueue = LocalQueue()
        self._kv = None

    def __enter__(self) -> RankGroup:
        if not self.info.distributed:
            return self
        import torch.distributed as dist

        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise RankError(
                    f"WORLD_SIZE={self.info.world_size} but {name} is not set: launch with "
                    "torchrun, or set MASTER_ADDR and MASTER_PORT (rank 0's host and a free port)"
                )
        dist.init_process_group(
            "gloo", rank=self.info.rank, world_size=self.info.world_size, timeout=self.timeout
        )
        # The queue's store lives in rank 0 (the collector), on a port it picks; the others
        # learn the port from a broadcast. MASTER_ADDR is rank 0's host under torchrun.
        host = os.environ["MASTER_ADDR"]
        if self.info.is_writer:
            self._kv = dist.TCPStore(host, 0, None, True, self.timeout, wait_for_workers=False)
        port = self.broadcast(self._kv.port if self._kv is not None else None)
        if not self.info.is_writer:
            self._kv = dist.TCPStore(host, port, None, False, self.timeout)
        self.queue = StoreQueue(self._kv)
        return self

    def __exit__(self, *exc) -> None:
        if self.info.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.info.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.info.is_writer else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_writer(self, fn, *, share: bool = False) -> Any:
        """Run ``fn`` on rank 0 alone; its value there (and, with ``share``, on every rank,
        broadcast; else None elsewhere). When it raises, rank 0 re-raises and every other rank
        exits with status 2 without a message (rank 0 prints the one line)."""
        if not self.info.distributed:
            return fn()
        value, error = None, None
        if self.info.is_writer:
            try:
                value = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others know
                error = err
        failed = self.broadcast(error is not None)
        if error is not None:
            raise error
        if failed:
            raise SystemExit(2)
        return self.broadcast(value) if share else value
