"""Running a :class:`~tracer.batch.job.TraceJob` over many prompts: plan what is left (prompts
traced earlier with the same settings are skipped), trace in worker processes and/or torchrun
ranks, and hand each finished graph to one writer (a :class:`GraphSink`, e.g. the graph store).

This module knows nothing of the graph store: the command line passes an adapter
(``tracer.cli.trace_cmd.StoreSink``) that turns the store's errors into :class:`SinkError`.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Protocol

from tracer.batch.job import TraceJob, load_replacement, trace_one
from tracer.graph import Graph


class SinkError(RuntimeError):
    """A finished graph could not be written to its sink (the reason in one line)."""


class GraphSink(Protocol):
    """Where finished graphs go (rank 0's one writer)."""

    def has(self, graph: Graph) -> bool:
        """Whether this (pruned) graph is already in the sink."""
        ...

    def add(self, graph: Graph, full: Graph) -> None:
        """Write the pruned graph (and its full graph); raise :class:`SinkError` on failure."""
        ...


_WORKER: dict = {}


def _worker_init(job: TraceJob, threads: int, setting=None) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["rm"] = load_replacement(job.model, job.transcoders, setting or job.setting)


def _trace_result(job: TraceJob, index: int, prompt: str, rm, rank: int) -> dict:
    """Trace one prompt of a list; a prompt that cannot be traced becomes a 'failed' result
    with its reason (the other prompts go on). Returns the result as a queue message."""
    from tracer.batch.collect import FAILED, TRACED, PromptResult, failure_reason

    t0 = time.perf_counter()
    try:
        _, _, pruned_path, full_path = trace_one(job, prompt, rm)
    except Exception as err:  # noqa: BLE001 - reported per prompt, the job goes on
        return PromptResult(index, prompt, FAILED, reason=failure_reason(err), rank=rank).to_msg()
    dt = time.perf_counter() - t0
    return PromptResult(
        index, prompt, TRACED, str(pruned_path), str(full_path), rank=rank, seconds=dt
    ).to_msg()


def _trace_in_worker(job: TraceJob, index: int, prompt: str, rank: int) -> dict:
    """Worker-process task: graphs stay on disk, only the result travels back."""
    return _trace_result(job, index, prompt, _WORKER["rm"], rank)


def plan(job: TraceJob, prompts: list[str], store: GraphSink | None = None):
    """Which prompts need tracing: (todo [(index, prompt)], results decided now).

    A prompt whose two graph files exist was traced earlier with the same settings: skipped
    (``cached``; when a store is given and lacks its graph, the collector stores it). A prompt
    that repeats an earlier one of the list is skipped (``duplicate``)."""
    from tracer.batch.collect import CACHED, DUPLICATE, PromptResult

    todo, decided, first = [], [], {}
    for i, prompt in enumerate(prompts):
        key = job.key(prompt)
        pruned_path, full_path = job.paths(prompt)
        paths = (str(pruned_path), str(full_path))
        if key in first:
            why = f"same as prompt #{first[key] + 1}"
            decided.append(PromptResult(i, prompt, DUPLICATE, *paths, reason=why))
            continue
        first[key] = i
        if pruned_path.exists() and full_path.exists():
            in_store = None
            if store is not None and store.has(Graph.load(pruned_path)):
                in_store = True
            decided.append(PromptResult(i, prompt, CACHED, *paths, stored=in_store))
        else:
            todo.append((i, prompt))
    return todo, decided


def trace_many(job: TraceJob, prompts: list[str], *, workers: int = 1,
               store: GraphSink | None = None, rm=None,
               group=None, setting=None, show_progress: bool = True):  # fmt: skip
    """Trace ``prompts`` (skipping those already traced with the same settings, and stored
    when a store is given), in ``workers`` processes per rank; store each graph as it
    completes, through one writer.

    ``group``: the job's :class:`tracer.batch.ranks.RankGroup` under torchrun (None: this process
    alone). Rank 0 plans and broadcasts the plan, every rank traces its share, rank 0's
    collector stores the graphs; ``store`` is used on rank 0 only. ``setting``: this rank's
    DeviceSetting (None: the CPU).

    Returns, on rank 0, a PromptResult for every prompt in list order (on other ranks, the
    results of their own share). A graph whose store write fails stays on disk
    (``stored=False``, the reason names the file).
    """
    from tracer.batch.collect import CACHED, Collector
    from tracer.batch.ranks import RankGroup, RankInfo

    setting = setting if setting is not None else job.setting
    group = group if group is not None else RankGroup(RankInfo())
    info = group.info
    todo, decided = group.on_writer(lambda: plan(job, prompts, store), share=True)
    collector = None
    if info.is_writer:
        # Traced earlier but not in the store: the collector stores them first.
        unstored = {r.index for r in decided if r.status == CACHED and r.stored is None}
        if store is None:
            unstored = set()
        expected = len(todo) + len(unstored)
        collector = Collector(group.queue, expected, store=store, world_size=info.world_size,
                              show_progress=show_progress)  # fmt: skip
        for r in decided:
            if r.index in unstored:
                group.queue.put(r.to_msg())
            else:
                collector.add(r)
        collector.start()
    try:
        own = _trace_share(job, info.share(todo), group, workers, rm, setting)
    except BaseException:
        if collector is not None:
            collector.abandon()
        raise
    return collector.join() if collector is not None else own


def _trace_share(job: TraceJob, items, group, workers: int, rm, setting) -> list:
    """Trace this rank's (index, prompt) items, posting each result to the group's queue; a
    rank that cannot go on (the model does not load) reports its remaining prompts as failed
    before it re-raises, so rank 0 does not wait for them."""
    from tracer.batch.collect import FAILED, PromptResult, failure_reason

    rank = group.info.rank
    results, left = [], list(items)

    def post(msg):
        group.queue.put(msg)
        results.append(PromptResult.from_msg(msg))
        left.pop(next(k for k, (i, _) in enumerate(left) if i == msg["index"]))

    try:
        if not items:
            return results
        if workers <= 1 or len(items) <= 1:
            if rm is None:
                rm = load_replacement(job.model, job.transcoders, setting)
            for index, prompt in items:
                post(_trace_result(job, index, prompt, rm, rank))
        else:
            import multiprocessing as mp

            threads = max(1, group.info.threads() // workers)
            ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
            init = (job, threads, setting)
            with ProcessPoolExecutor(workers, ctx, _worker_init, init) as pool:
                futures = [pool.submit(_trace_in_worker, job, i, p, rank) for i, p in items]
                for fut in as_completed(futures):
                    post(fut.result())
    except BaseException as err:
        why = f"rank {rank} stopped: {failure_reason(err)}"
        for index, prompt in left:
            group.queue.put(PromptResult(index, prompt, FAILED, reason=why, rank=rank).to_msg())
        raise
    return results
