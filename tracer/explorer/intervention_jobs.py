"""Live interventions for the explorer: edits on graph nodes run by the engine on a worker
thread, with progress the page polls.

A request names nodes of a graph by their Neuronpedia ids (a pinned node, or the members of a
supernode) with an op (``ablate``, ``scale`` by a factor, ``clamp`` to a value) and a mode
(``constrained`` or ``free``, see :mod:`tracer.interventions`). Every feature node becomes one
:class:`tracer.interventions.FeatureEdit` at its (layer, position, index); the result holds the
top logits at the last position before and after, and a greedy continuation without and with
the edits (:func:`tracer.steer.generate_batch`, the same edits in the ``live`` mode).

The queue is bounded (``max_pending`` jobs queued or running; more: :class:`QueueFullError`,
429), every job can be cancelled (a queued one never runs, a running one stops at its next
step or generated token), and a finished job's status is kept until it is read (then for
``keep_read_s`` more seconds).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tracer.graph import FEATURE, NODE_KINDS, Graph
from tracer.reports.neuronpedia import np_node_id

OPS = ("ablate", "scale", "clamp")
MODES = ("constrained", "free")
MAX_EDITS = 512
FINAL = ("done", "error", "cancelled")


class InterventionRequestError(ValueError):
    """A request the explorer cannot run (unknown node, non-feature node, bad op)."""


class QueueFullError(RuntimeError):
    """The intervention queue holds its maximum of queued and running jobs (HTTP 429)."""


class JobNotFoundError(LookupError):
    """No job of that id (never made, or finished, read and dropped)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class JobCancelled(Exception):
    """Raised on the worker at the next step of a job whose cancel was asked."""


@dataclass
class Job:
    """One intervention run: state ``queued`` / ``running`` / ``done`` / ``error`` /
    ``cancelled``, progress in [0, 1] with a message naming the step, the result (a JSON-ready
    dict) or the error."""

    id: str
    graph: str
    state: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    result: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    read_at: float | None = None  # monotonic time of the first read once finished
    cancel_asked: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def check_cancel(self) -> None:
        """Raise JobCancelled when a cancel was asked (the worker calls it between steps)."""
        if self.cancel_asked.is_set():
            raise JobCancelled

    def to_dict(self) -> dict:
        from tracer.explorer.security import json_safe

        return json_safe({
            "id": self.id, "graph": self.graph, "state": self.state,
            "progress": round(self.progress, 3), "message": self.message,
            "result": self.result, "error": self.error,
            "cancelling": self.cancel_asked.is_set() and not self.finished,
        })  # fmt: skip


def feature_edits(graph: Graph, edits: list) -> list:
    """The request's ``edits`` (``[{"nodes": [node id, ...], "op", "value"}]``) as a list of
    :class:`~tracer.interventions.FeatureEdit`; InterventionRequestError names the first
    problem."""
    from tracer.interventions import FeatureEdit

    if not isinstance(edits, list) or not edits:
        raise InterventionRequestError(
            "give 'edits': a list of {nodes: [node id, ...], op: ablate|scale|clamp, value}"
        )
    index = {np_node_id(graph, i): i for i in range(graph.n_nodes)}
    out = []
    for j, e in enumerate(edits):
        if not isinstance(e, dict):
            raise InterventionRequestError(f"edits[{j}] must be an object")
        op = e.get("op", "ablate")
        if op not in OPS:
            raise InterventionRequestError(f"edits[{j}]: op {op!r} is not one of {OPS}")
        value = e.get("value", 0.0 if op == "ablate" else 1.0)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InterventionRequestError(f"edits[{j}]: value must be a number")
        if not math.isfinite(value) or abs(value) > 1e6:
            raise InterventionRequestError(
                f"edits[{j}]: value {value!r} is not a finite number of at most 1e6 in size"
            )
        nodes = e.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise InterventionRequestError(f"edits[{j}]: 'nodes' must be a list of node ids")
        for nid in nodes:
            i = index.get(nid) if isinstance(nid, str) else None
            if i is None:
                raise InterventionRequestError(
                    f"node {nid!r} is not a node of graph {graph.prompt[:40]!r}: pick a node "
                    "shown in the graph"
                )
            if int(graph.kind[i]) != FEATURE:
                raise InterventionRequestError(
                    f"node {nid!r} is not a feature node (it is the "
                    f"{NODE_KINDS[int(graph.kind[i])]} node {graph.node_label(i)}): only "
                    "feature nodes can be ablated, scaled or clamped"
                )
            out.append(
                FeatureEdit(
                    layer=int(graph.layer[i]),
                    feature=int(graph.feature[i]),
                    position=int(graph.position[i]),
                    op=op,
                    value=float(value),
                )  # fmt: skip
            )
    if len(out) > MAX_EDITS:
        raise InterventionRequestError(f"{len(out)} node edits: at most {MAX_EDITS} at once")
    return out


def top_logit_table(logits_before, logits_after, decode, k: int = 10) -> list[dict]:
    """Rows for the k most probable tokens after the edit plus those before it: token id,
    text, logit and probability before and after. logits_*: [vocab] float tensors."""
    import torch

    pb, pa = logits_before.double().softmax(-1), logits_after.double().softmax(-1)
    ids = torch.cat([pa.topk(k).indices, pb.topk(k).indices]).unique().tolist()
    rows = [
        {
            "token": int(t),
            "text": decode(int(t)),
            "logit_before": float(logits_before[t]),
            "logit_after": float(logits_after[t]),
            "prob_before": float(pb[t]),
            "prob_after": float(pa[t]),
        }
        for t in ids
    ]
    rows.sort(key=lambda r: (-r["prob_after"], r["token"]))
    return rows


class InterventionService:
    """Runs intervention jobs one at a time on a worker thread.

    ``rm``: a ready ReplacementModel, or ``loader``: a function that builds one (called on the
    worker when the first job runs). With neither, interventions are unavailable and a request
    gets a message naming the ``--model`` / ``--transcoders`` options. ``max_pending``: jobs
    queued or running at once; ``keep_unread``: finished jobs kept unread at most (the oldest
    go first); ``keep_read_s``: seconds a finished job is kept after its first read."""

    def __init__(
        self,
        rm=None,
        loader: Callable[[], object] | None = None,
        n_logits: int = 10,
        max_new_tokens: int = 12,
        max_pending: int = 8,
        keep_unread: int = 256,
        keep_read_s: float = 60.0,
    ):
        self._rm, self._loader = rm, loader
        self.n_logits, self.max_new_tokens = n_logits, max_new_tokens
        self.max_pending, self.keep_unread, self.keep_read_s = max_pending, keep_unread, keep_read_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-intervene")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._states: dict[str, object] = {}

    @property
    def available(self) -> bool:
        return self._rm is not None or self._loader is not None

    def close(self) -> None:
        """Cancel every job and stop the worker (it finishes the step it is in)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel_asked.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, graph: Graph, gid: str, body: dict) -> Job:
        """Check the request now (errors raise InterventionRequestError) and queue the run
        (QueueFullError when ``max_pending`` jobs are queued or running)."""
        if not self.available:
            raise InterventionRequestError(
                "interventions need the model and transcoder: restart with "
                "`circuit-atlas serve --model M --transcoders T`"
            )
        if not isinstance(body, dict):
            raise InterventionRequestError("the request must be a JSON object")
        mode = body.get("mode", "constrained")
        if mode not in MODES:
            raise InterventionRequestError(f"mode {mode!r} is not one of {MODES}")
        edits = feature_edits(graph, body.get("edits"))
        n_new = body.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(n_new, int) or isinstance(n_new, bool) or not 0 <= n_new <= 64:
            raise InterventionRequestError("max_new_tokens must be an integer from 0 to 64")
        with self._lock:
            self._purge()
            pending = [j for j in self._jobs.values() if not j.finished]
            if len(pending) >= self.max_pending:
                raise QueueFullError(
                    f"the intervention queue is full ({len(pending)} jobs queued or running, at "
                    f"most {self.max_pending}): wait for one to finish, or cancel one "
                    "(the Cancel button; POST /api/jobs/ID/cancel)"
                )
            job = Job(id=f"j{next(self._ids)}", graph=gid)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, graph, gid, edits, mode, n_new)
        return job

    def queue(self) -> dict:
        """``{"pending": jobs queued or running, "max": max_pending}``."""
        with self._lock:
            n = sum(not j.finished for j in self._jobs.values())
        return {"pending": n, "max": self.max_pending}

    def job(self, jid: str) -> Job | None:
        """The job (None if unknown), without marking it read."""
        with self._lock:
            return self._jobs.get(jid)

    def read(self, jid: str) -> dict:
        """The job's status as JSON; a finished job counts as read from now on (it is dropped
        ``keep_read_s`` seconds later). JobNotFoundError for an unknown id."""
        with self._lock:
            self._purge()
            job = self._jobs.get(jid)
            if job is None:
                raise JobNotFoundError(_unknown(jid))
            if job.finished and job.read_at is None:
                job.read_at = time.monotonic()
            return job.to_dict()

    def cancel(self, jid: str) -> dict:
        """Cancel a job: a queued one is cancelled at once, a running one stops at its next
        step (its state says ``cancelling`` until then); a finished one is left as it is."""
        with self._lock:
            job = self._jobs.get(jid)
            if job is None:
                raise JobNotFoundError(_unknown(jid))
            if not job.finished:
                job.cancel_asked.set()
                if job.state == "queued":
                    job.state, job.message = "cancelled", "cancelled before it ran"
            return job.to_dict()

    def _purge(self) -> None:
        """Drop finished jobs read over ``keep_read_s`` ago, and the oldest finished unread
        ones past ``keep_unread`` (caller holds the lock)."""
        now = time.monotonic()
        for jid, j in list(self._jobs.items()):
            if j.read_at is not None and now - j.read_at > self.keep_read_s:
                del self._jobs[jid]
        unread = [jid for jid, j in self._jobs.items() if j.finished and j.read_at is None]
        for jid in unread[: max(0, len(unread) - self.keep_unread)]:
            del self._jobs[jid]

    # --- the worker ----------------------------------------------------------------------------

    def _model(self, job: Job):
        if self._rm is None:
            job.message = "loading the model and transcoder"
            self._rm = self._loader()
        return self._rm

    def _run(self, job: Job, graph: Graph, gid: str, edits: list, mode: str, n_new: int):
        import torch

        from tracer.interventions import intervene_batch
        from tracer.steer import generate_batch

        with self._lock:
            if job.cancel_asked.is_set():
                return  # cancelled while queued
            job.state, job.progress = "running", 0.02
        try:
            with torch.no_grad():
                rm = self._model(job)
                check_matches(rm, graph)
                job.check_cancel()
                job.message, job.progress = "recording the prompt", 0.1
                state = self._states.get(gid)
                if state is None:
                    state = rm.record(torch.tensor(graph.tokens, dtype=torch.long))
                    self._states = {gid: state}  # one prompt kept
                job.check_cancel()
                job.message, job.progress = f"running the edit ({mode})", 0.3
                run = intervene_batch(rm, state, [[], edits], mode, record_sites=())
                before, after = run.logits[0, -1], run.logits[1, -1]

                def decode(t: int) -> str:
                    return rm.model.decode([t])

                table = top_logit_table(before, after, decode, self.n_logits)
                job.check_cancel()
                job.message, job.progress = "generating continuations", 0.5

                def on_token(step: int, steps: int) -> None:
                    job.check_cancel()
                    job.progress = 0.5 + 0.5 * step / max(1, steps)
                    job.message = f"generating continuations: token {step}/{steps}"

                base, steered = generate_batch(
                    rm, state.tokens, [[], edits], max_new_tokens=n_new, on_token=on_token
                )
            job.result = {
                "mode": mode,
                "edits": [_edit_dict(e) for e in edits],
                "logits": table,
                "original": base.text,
                "steered": steered.text,
            }
            job.state, job.progress, job.message = "done", 1.0, "done"
        except JobCancelled:
            job.state, job.message = "cancelled", f"cancelled during: {job.message}"
        except Exception as err:  # any failure is shown on the page; the server keeps going
            job.state, job.message = "error", "failed"
            job.error = str(err) or type(err).__name__
            traceback.print_exc()


def _unknown(jid: str) -> str:
    return (
        f"no intervention job {jid!r}: it was never queued, or it finished, was read and has "
        "been dropped; run the intervention again"
    )


def check_matches(rm, graph: Graph) -> None:
    """The loaded model and transcoder are the graph's (else a clear error)."""
    name = rm.model.facts.name
    if graph.model_name and name != graph.model_name:
        raise InterventionRequestError(
            f"graph was traced with model {graph.model_name!r} but the explorer loaded {name!r}: "
            "restart `circuit-atlas serve` with that --model"
        )
    tc = rm.transcoder.identity.id  # name@fingerprint, as graphs record it
    if graph.transcoder_name and tc != graph.transcoder_name:
        raise InterventionRequestError(
            f"graph was traced with transcoder {graph.transcoder_name!r} but the explorer "
            f"loaded {tc!r}: restart `circuit-atlas serve` with that --transcoders"
        )


def _edit_dict(e) -> dict:
    return {"layer": e.layer, "feature": e.feature, "position": e.position, "op": e.op,
            "value": e.value}  # fmt: skip
