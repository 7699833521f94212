"""The results of a many-prompt trace: one record per prompt, the collector that stores graphs
as they arrive (the one writer), the progress line and the final summary.

The collector runs in a thread of rank 0 (or of the only process). Every rank, and every
worker process, reports each prompt it finished through a queue (see tracer.batch.ranks); the
collector writes the graph to the store, advances one progress bar over all ranks and keeps
the record. Graphs therefore reach the store through one writer in arrival order: concurrent
writers would conflict on the ``(:Feature)`` nodes that many graphs share (see
``benchmarks/trace_ranks.md`` for the measurement).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

TRACED, CACHED, DUPLICATE, FAILED = "traced", "cached", "duplicate", "failed"


@dataclass
class PromptResult:
    """What happened to one prompt of the list.

    status: ``traced`` (now), ``cached`` (traced earlier with the same settings: skipped),
    ``duplicate`` (the same prompt appears earlier in the list: skipped) or ``failed``.
    stored: None without a store (or for a failed prompt), True once the graph is in the store,
    False when its store write failed (``reason`` says why; the graph stays on disk).
    seconds: tracing time on its rank (0 when not traced now).
    """

    index: int
    prompt: str
    status: str
    pruned_path: str | None = None
    full_path: str | None = None
    reason: str = ""
    rank: int = 0
    seconds: float = 0.0
    stored: bool | None = None

    def to_msg(self) -> dict:
        return asdict(self)

    @classmethod
    def from_msg(cls, msg: dict) -> PromptResult:
        return cls(**msg)

    def label(self, n: int = 60) -> str:
        text = self.prompt if len(self.prompt) <= n else self.prompt[: n - 1] + "…"
        return f"prompt #{self.index + 1} {text!r}"


def failure_reason(err: BaseException) -> str:
    """One line naming what went wrong with a prompt."""
    from tracer.model import PromptError

    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, PromptError):
        return msg
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


class Collector:
    """Receive ``expected`` results from ``queue``; store each graph whose ``stored`` is None
    (when ``store`` is given); one progress bar; :meth:`join` returns the results in list order.

    Runs in its own thread (``start``), so rank 0 traces its own share meanwhile.
    """

    def __init__(self, queue, expected: int, *, store=None, world_size: int = 1,
                 show_progress: bool = True):  # fmt: skip
        self.queue = queue
        self.expected = expected
        self.store = store
        self.world_size = world_size
        self.show_progress = show_progress
        self.results: list[PromptResult] = []
        self.per_rank: dict[int, int] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="trace-collector", daemon=True)

    def start(self) -> Collector:
        self._thread.start()
        return self

    def add(self, result: PromptResult) -> None:
        """Record a result that needs no message (decided while planning)."""
        self.results.append(result)

    def join(self) -> list[PromptResult]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return sorted(self.results, key=lambda r: r.index)

    def abandon(self) -> None:
        """Stop waiting (this rank is failing)."""
        self._stop.set()

    def _run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.expected, desc="tracing prompts", unit="prompt",
                   disable=not self.show_progress)  # fmt: skip
        got, failed = 0, 0
        try:
            while got < self.expected and not self._stop.is_set():
                msg = self.queue.get(timeout=0.5)
                if msg is None:
                    continue
                got += 1
                r = PromptResult.from_msg(msg)
                if r.status == FAILED:
                    failed += 1
                else:
                    self._store(r)
                    if r.status == TRACED:
                        self.per_rank[r.rank] = self.per_rank.get(r.rank, 0) + 1
                self.results.append(r)
                post = {}
                if self.world_size > 1:
                    post["ranks"] = "/".join(
                        str(self.per_rank.get(k, 0)) for k in range(self.world_size)
                    )
                if failed:
                    post["failed"] = failed
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        except BaseException as err:  # noqa: BLE001 - re-raised by join
            self._error = err
        finally:
            bar.close()

    def _store(self, r: PromptResult) -> None:
        if self.store is None or r.stored is not None or r.pruned_path is None:
            return
        from tracer.batch.run import SinkError
        from tracer.graph import Graph

        try:
            self.store.add(Graph.load(r.pruned_path), Graph.load(r.full_path))
            r.stored = True
        except (SinkError, OSError) as err:
            r.stored, r.reason = False, str(err).splitlines()[0]


@dataclass
class Summary:
    """Counts of a finished job. ``seconds``: wall time from the start of planning to the last
    stored graph, on rank 0; ``graphs_per_minute`` counts graphs traced now."""

    prompts: int
    traced: int
    skipped: int
    failed: int
    not_stored: int
    seconds: float
    world_size: int
    per_rank: dict[int, int] = field(default_factory=dict)

    @property
    def graphs_per_minute(self) -> float:
        return 60.0 * self.traced / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, results: list[PromptResult], seconds: float, world_size: int) -> Summary:
        per_rank: dict[int, int] = {}
        for r in results:
            if r.status == TRACED:
                per_rank[r.rank] = per_rank.get(r.rank, 0) + 1
        return cls(
            prompts=len(results),
            traced=sum(r.status == TRACED for r in results),
            skipped=sum(r.status in (CACHED, DUPLICATE) for r in results),
            failed=sum(r.status == FAILED for r in results),
            not_stored=sum(r.stored is False for r in results),
            seconds=seconds,
            world_size=world_size,
            per_rank=per_rank,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "graphs_per_minute": self.graphs_per_minute}


def summary_text(results: list[PromptResult], summary: Summary, where: str) -> str:
    """The final report: counts, rate, and one line per failed prompt or failed store write."""
    s = summary
    ranks = f" on {s.world_size} ranks" if s.world_size > 1 else ""
    lines = [
        f"{s.prompts} prompts{ranks}: {s.traced} traced, {s.skipped} skipped (traced before "
        f"or repeated), {s.failed} failed; {s.traced} graphs in {s.seconds:.1f} s "
        f"({s.graphs_per_minute:.1f} graphs/min); graphs in {where}"
    ]
    if s.world_size > 1:
        lines.append(
            "graphs per rank: "
            + ", ".join(f"rank {k}: {s.per_rank.get(k, 0)}" for k in range(s.world_size))
        )
    for r in results:
        if r.status == FAILED:
            lines.append(f"failed: {r.label()}: {r.reason}")
        elif r.stored is False:
            lines.append(f"not stored: {r.label()}: {r.reason}")
    return "\n".join(lines)
