"""``circuit-atlas trace``: attribute prompts, prune, save to Parquet (and the graph store).

One prompt: ``circuit-atlas trace "PROMPT" --transcoders T`` prints a one-screen summary.
Many: ``circuit-atlas trace --prompts FILE --workers N --store`` traces in worker processes,
stores each graph as it completes, and skips prompts already traced with the same settings.
The same command under ``torchrun --nproc_per_node N`` spreads the prompts over ranks and
their devices (see tracer.cli.ranks).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tracer.cli.graph_args import open_store  # the one store opener (demo_cmd imports it here)
from transcoders.device import DeviceSetting, add_device_arguments, setting_from_args


def register(sub) -> None:
    p = sub.add_parser("trace", help="attribution graph for a prompt")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompts FILE)")
    p.add_argument("--prompts", help="file of prompts: one per line, or JSONL with 'prompt'")
    p.add_argument("--workers", type=int, default=1, help="worker processes for --prompts")
    p.add_argument("--store", action="store_true", help="write graphs to the graph store")
    p.add_argument("--store-uri", help="bolt:// URI (default: the embedded local store)")
    p.add_argument("--model", default="smollm2", help="local folder, hub id or 'smollm2'")
    p.add_argument("--transcoders", required=True, help="transcoder folder or file (any format)")
    p.add_argument("--out", default="runs/graphs", help="folder for the graph files")
    p.add_argument(
        "--max-feature-nodes", type=int, default=None,
        help="feature budget (default 8192, lowered to what fits in memory; 0 = every feature)",
    )  # fmt: skip
    p.add_argument(
        "--estimate", action="store_true",
        help="print the memory plan (peak host/device memory, a budget that fits) and stop",
    )  # fmt: skip
    p.add_argument(
        "--memory-limit", type=float, default=None, metavar="GB",
        help="plan for at most this much memory (default: what is available)",
    )  # fmt: skip
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--target", action="append", help="target token (repeatable)")
    p.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="trace logit(A) - logit(B)")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--edge-tolerance", type=float, default=0.0)
    add_device_arguments(p)
    add_convention_arg(p)
    p.add_argument("--summary", help="with --prompts: write the job's summary (JSON) here")
    p.set_defaults(func=_trace)


def add_convention_arg(p) -> None:
    """``--convention``: the scoring rules of pruning and scores (tracer.prune)."""
    from tracer.prune import CONVENTIONS, DEFAULT_CONVENTION

    p.add_argument(
        "--convention", choices=CONVENTIONS, default=DEFAULT_CONVENTION,
        help="scoring and pruning rules: circuit-tracer's (default; compare with circuit-tracer "
        "and Neuronpedia) or atlas's (earlier rules of this project)",
    )  # fmt: skip


def slug(text: str, n: int = 48) -> str:
    """A file-name-safe short name for a prompt."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "prompt"


def load_replacement(
    model_src: str,
    transcoder_src: str,
    setting: DeviceSetting | None = None,
    exclude_bos: bool = True,
):
    """The model and transcoder, checked against each other, as a ReplacementModel, both on
    ``setting``'s device in its dtype (default: CPU, float32)."""
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    setting = setting or DeviceSetting()
    model = LanguageModel.load(model_src, device=setting)
    f = model.facts
    clt = load_transcoder(transcoder_src, n_layers=f.n_layers, d_model=f.d_model, device=setting)
    return ReplacementModel(model, clt, exclude_bos=exclude_bos)


def summary(graph, pruned, seconds: float) -> str:
    """One screen: top logits, node counts, scores, time."""
    from tracer.graph import LOGIT

    lines = [
        f"prompt: {graph.prompt!r} ({len(graph.tokens)} tokens)",
        f"transcoder: {graph.transcoder_name}",
        "top logits:",
    ]
    names = graph.extra.get("token_text") or {}
    for i in (graph.kind == LOGIT).nonzero()[0]:
        tok = str(int(graph.feature[i]))
        name = repr(names[tok]) if tok in names else f"#{tok}"
        lines.append(f"  p={graph.probability[i]:.3f}  {name}")
    counts = ", ".join(f"{graph.count(k)} {k}s" for k in ("feature", "error", "token", "logit"))
    lines.append(f"full graph: {graph.n_nodes} nodes ({counts}), {graph.n_edges} edges")
    lines.append(
        f"pruned circuit: {pruned.n_nodes} nodes ({pruned.count('feature')} features), "
        f"{pruned.n_edges} edges"
    )
    sc = pruned.scores or graph.scores
    lines.append(
        f"scores ({pruned.params.get('convention', '?')} convention): replacement "
        f"{sc.get('replacement', float('nan')):.3f}, "
        f"completeness {sc.get('completeness', float('nan')):.3f}"
    )
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; '#' comments) or JSONL ({"prompt": ...})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{path}:{n}: not a JSON object with a 'prompt' field") from err
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


@dataclass(frozen=True)
class TraceJob:
    """Everything a worker needs to trace prompts; hashed into each output's file name so a
    re-run with the same settings finds its earlier results.

    ``transcoder_id`` is the transcoder's identity (``name@fingerprint``, see
    ``transcoders.identity``): the cache key uses it, not the path, so a retrained transcoder
    at the same path never reuses old graphs and a copy at another path does."""

    model: str
    transcoders: str
    out: str
    transcoder_id: str
    max_feature_nodes: int | None = None
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 1024
    edge_tolerance: float = 0.0
    target_tokens: tuple[str, ...] | None = None
    logit_diff: tuple[str, str] | None = None
    device: str = "cpu"
    dtype: str = "float32"
    fit_budget: bool = False  # the default budget: lowered to the memory plan's suggestion
    memory_limit_gb: float | None = None

    @property
    def setting(self) -> DeviceSetting:
        return DeviceSetting.parse(self.device, self.dtype)

    convention: str = "circuit-tracer"

    def key(self, prompt: str) -> str:
        # The device does not change a graph (beyond float rounding); the dtype does. A float32
        # job keeps the key it had before dtypes existed, so earlier results are still found.
        skip = {"out", "transcoders", "device"} | ({"dtype"} if self.dtype == "float32" else set())
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        blob = json.dumps([prompt, settings], sort_keys=True)
        return f"{slug(prompt, 40)}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def paths(self, prompt: str) -> tuple[Path, Path]:
        """(pruned, full) graph files of a prompt."""
        k = self.key(prompt)
        return Path(self.out) / f"{k}.parquet", Path(self.out) / f"{k}.full.parquet"


_WORKER: dict = {}


def _worker_init(job: TraceJob, threads: int, setting=None) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["rm"] = load_replacement(job.model, job.transcoders, setting or job.setting)


def trace_one(job: TraceJob, prompt: str, rm, progress: bool = False):
    """Attribute and prune one prompt and write both graphs (Parquet).

    Returns (pruned graph, full graph, pruned path, full path)."""
    from tracer.attribution import attribute
    from tracer.prune import prune

    graph = attribute(
        rm,
        prompt,
        max_feature_nodes=job.max_feature_nodes,
        max_n_logits=job.max_n_logits,
        desired_logit_prob=job.desired_logit_prob,
        batch_size=job.batch_size,
        edge_tolerance=job.edge_tolerance,
        target_tokens=list(job.target_tokens) if job.target_tokens else None,
        logit_diff=job.logit_diff,
        convention=job.convention,
        progress=progress,
        fit_budget=job.fit_budget,
        memory_limit_gb=job.memory_limit_gb,
    )
    pruned = prune(graph, job.node_threshold, job.edge_threshold, job.convention)
    pruned_path, full_path = job.paths(prompt)
    graph.save(full_path)
    pruned.save(pruned_path)
    return pruned, graph, pruned_path, full_path


def _trace_result(job: TraceJob, index: int, prompt: str, rm, rank: int) -> dict:
    """Trace one prompt of a list; a prompt that cannot be traced becomes a 'failed' result
    with its reason (the other prompts go on). Returns the result as a queue message."""
    from tracer.cli.collect import FAILED, TRACED, PromptResult, failure_reason

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


def plan(job: TraceJob, prompts: list[str], store=None):
    """Which prompts need tracing: (todo [(index, prompt)], results decided now).

    A prompt whose two graph files exist was traced earlier with the same settings: skipped
    (``cached``; when a store is given and lacks its graph, the collector stores it). A prompt
    that repeats an earlier one of the list is skipped (``duplicate``)."""
    from graphstore import graph_id
    from tracer.cli.collect import CACHED, DUPLICATE, PromptResult
    from tracer.graph import Graph

    stored = set(store.graph_ids()) if store is not None else set()
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
            if store is not None and graph_id(Graph.load(pruned_path)) in stored:
                in_store = True
            decided.append(PromptResult(i, prompt, CACHED, *paths, stored=in_store))
        else:
            todo.append((i, prompt))
    return todo, decided


def trace_many(job: TraceJob, prompts: list[str], *, workers: int = 1, store=None, rm=None,
               group=None, setting=None, show_progress: bool = True):  # fmt: skip
    """Trace ``prompts`` (skipping those already traced with the same settings, and stored
    when a store is given), in ``workers`` processes per rank; store each graph as it
    completes, through one writer.

    ``group``: the job's :class:`tracer.cli.ranks.RankGroup` under torchrun (None: this process
    alone). Rank 0 plans and broadcasts the plan, every rank traces its share, rank 0's
    collector stores the graphs; ``store`` is used on rank 0 only. ``setting``: this rank's
    DeviceSetting (None: the CPU).

    Returns, on rank 0, a PromptResult for every prompt in list order (on other ranks, the
    results of their own share). A graph whose store write fails stays on disk
    (``stored=False``, the reason names the file).
    """
    from tracer.cli.collect import CACHED, Collector
    from tracer.cli.ranks import RankGroup, RankInfo

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
    from tracer.cli.collect import FAILED, PromptResult, failure_reason

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


def _trace(args) -> int:
    if args.prompts:
        return _trace_file(args)
    if not args.prompt:
        raise ValueError("give a prompt, or --prompts FILE")
    setting = setting_from_args(args)  # a bad --device/--dtype fails before any loading
    t0 = time.perf_counter()
    rm = load_replacement(args.model, args.transcoders, setting)
    job = _job(args, rm.transcoder.identity.id)  # the loaded transcoder's identity: one load
    if args.estimate:
        return _estimate(job, args.prompt, rm)
    pruned, graph, pruned_path, full_path = trace_one(job, args.prompt, rm, progress=True)
    print(summary(graph, pruned, time.perf_counter() - t0))
    print(budget_line(job, graph))
    print(f"wrote {full_path} (full) and {pruned_path} (pruned)")
    return 0


def transcoder_identity_at(path: str) -> str:
    """The identity string of the transcoder at ``path`` (reads encoders, not decoders)."""
    from transcoders.formats import load_transcoder

    return load_transcoder(path, lazy=True).identity.id


def budget_line(job: TraceJob, graph) -> str:
    """What feature budget the graph used, and why."""
    from tracer.attribution import DEFAULT_MAX_FEATURE_NODES

    used = graph.params.get("max_feature_nodes")
    n = graph.params.get("n_active_features")
    if used is None:
        return f"feature budget: all {n} active features"
    if not job.fit_budget:
        return f"feature budget: {used} of {n} active features (--max-feature-nodes)"
    if used < min(DEFAULT_MAX_FEATURE_NODES, n):
        return (f"feature budget: {used} of {n} active features (the default "
                f"{DEFAULT_MAX_FEATURE_NODES} does not fit in memory: the memory plan's "
                "suggestion; --max-feature-nodes N to choose)")  # fmt: skip
    return (f"feature budget: {min(used, n)} of {n} active features (default "
            f"{DEFAULT_MAX_FEATURE_NODES}; --max-feature-nodes N to change, 0: all)")  # fmt: skip


def _estimate(job: TraceJob, prompt: str, rm) -> int:
    """``--estimate``: the memory plan of one prompt (one encoder pass), then stop."""
    from tracer.attribution import GB, estimate_memory

    limit = None if job.memory_limit_gb is None else int(job.memory_limit_gb * GB)
    est = estimate_memory(
        rm.model, rm.transcoder, prompt, job.max_feature_nodes, max_n_logits=job.max_n_logits,
        batch_size=job.batch_size, available_host_bytes=limit,
    )  # fmt: skip
    print("\n".join(est.lines()))
    return 0


def _job(args, transcoder_id: str | None = None) -> TraceJob:
    from tracer.attribution import DEFAULT_MAX_FEATURE_NODES

    setting = setting_from_args(args)  # resolved once ("auto" -> cuda:0 or cpu) for workers
    budget = args.max_feature_nodes
    return TraceJob(
        model=args.model,
        transcoders=args.transcoders,
        out=args.out,
        transcoder_id=transcoder_id or transcoder_identity_at(args.transcoders),
        max_feature_nodes=DEFAULT_MAX_FEATURE_NODES if budget is None else (budget or None),
        fit_budget=budget is None,
        memory_limit_gb=args.memory_limit,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
        batch_size=args.batch_size,
        edge_tolerance=args.edge_tolerance,
        target_tokens=tuple(args.target) if args.target else None,
        logit_diff=tuple(args.logit_diff) if args.logit_diff else None,
        device=str(setting.device),
        dtype=setting.to_dict()["dtype"],
        convention=args.convention,
    )


def _trace_file(args) -> int:
    """``--prompts FILE``: in this process (with --workers), or as one rank of a torchrun job.
    Exit status 0 when every prompt was traced (or skipped) and stored, 1 when some failed."""
    import torch

    from tracer.cli.collect import Summary, summary_text
    from tracer.cli.ranks import RankGroup, RankInfo, rank_setting

    info = RankInfo.from_env()
    prompts = read_prompts(args.prompts)
    job = _job(args)
    want_store = bool(args.store or args.store_uri)
    setting = None
    if info.distributed:
        setting = rank_setting(info, getattr(args, "device", "auto"), getattr(args, "dtype", None))
        torch.set_num_threads(info.threads())
    with RankGroup(info) as group:
        t0 = time.perf_counter()
        # Rank 0 opens the store before anyone traces: an unreachable store stops every rank.
        store = group.on_writer(lambda: open_store(args.store_uri) if want_store else None)
        try:
            results = trace_many(
                job, prompts, workers=args.workers, store=store, group=group, setting=setting
            )
        finally:
            if store is not None:
                store.close()
        if not info.is_writer:
            return int(any(r.status == "failed" for r in results))
        s = Summary.of(results, time.perf_counter() - t0, info.world_size)
    budget = job.max_feature_nodes or "all"
    print(f"feature budget: {budget} per prompt"
          + (" (default; lowered where memory is short)" if job.fit_budget else ""),
          file=sys.stderr)  # fmt: skip
    where = args.out + (" and the graph store" if want_store else "")
    print(summary_text(results, s, where), file=sys.stderr)
    if args.summary:
        doc = {**s.to_dict(), "results": [r.to_msg() for r in results]}
        Path(args.summary).write_text(json.dumps(doc, indent=1))
    return int(s.failed > 0 or s.not_stored > 0)
