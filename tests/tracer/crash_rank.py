"""``circuit-atlas`` as one rank of a torchrun job that crashes part-way, for the rank tests.

Rank 0 writes graphs to the store in many small edge batches and, after the first committed
batch, touches ``$CRASH_DIR/mid-write`` and stops there (a writer caught in the middle of a
graph). Rank 1 traces its first graph, waits for that file, and exits at once (``os._exit``,
no clean-up): torchrun then kills rank 0, leaving one graph half-written in the store and one
traced graph that was never stored. Usage: torchrun ... crash_rank.py trace --prompts ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from graphstore import GraphStore, ingest
from tracer.batch import run as batch_run
from tracer.cli import main

MARK = Path(os.environ["CRASH_DIR"]) / "mid-write"
RANK = int(os.environ["RANK"])

if RANK == 0:
    ingest.EDGE_BATCH = 10  # several transactions per graph: the kill lands between them
    _add = GraphStore.add

    def add(self, graph, full=None, progress=None):
        def stall(done: int, total: int) -> None:
            MARK.touch()
            time.sleep(600)  # until torchrun kills this rank

        return _add(self, graph, full, progress=stall)

    GraphStore.add = add
else:
    _trace_one = batch_run.trace_one

    def trace_one(*args, **kwargs):
        out = _trace_one(*args, **kwargs)
        deadline = time.monotonic() + 120
        while not MARK.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(17)
        return out  # pragma: no cover

    batch_run.trace_one = trace_one

sys.exit(main(sys.argv[1:]))
