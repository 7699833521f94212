"""``circuit-atlas trace``: attribute prompts, prune, save to Parquet (and the graph store).

One prompt: ``circuit-atlas trace "PROMPT" --transcoders T`` prints a one-screen summary.
Many: ``circuit-atlas trace --prompts FILE --workers N --store`` traces in worker processes,
stores each graph as it completes, and skips prompts already traced with the same settings.
The same command under ``torchrun --nproc_per_node N`` spreads the prompts over ranks and
their devices (see tracer.batch.ranks).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tracer.batch.job import (
    TraceJob,
    load_replacement,
    read_prompts,
    trace_one,
    transcoder_identity_at,
)
from tracer.batch.run import SinkError, trace_many
from tracer.cli.graph_args import open_store  # the one store opener (demo_cmd imports it here)
from transcoders.device import add_device_arguments, setting_from_args


def register(sub) -> None:
    p = sub.add_parser("trace", help="attribution graph for a prompt")
    p.add_argument("prompt", nargs="?", help="the prompt text (or use --prompts FILE)")
    p.add_argument("--prompts", help="file of prompts: one per line, or JSONL with 'prompt'")
    p.add_argument("--workers", type=int, default=1, help="worker processes for --prompts")
    p.add_argument("--store", action="store_true", help="write graphs to the graph store")
    p.add_argument("--store-uri", help="bolt:// URI (default: the embedded local store)")
    p.add_argument("--model", default="smollm2", help="local folder, hub id or 'smollm2'")
    p.add_argument(
        "--transcoders", required=True,
        help="transcoder folder or file (any format), config.yaml, hub id org/name[@rev] or "
        "circuit-tracer preset (gemma, llama); resolved via the Hugging Face cache",
    )  # fmt: skip
    p.add_argument("--out", default="runs/graphs", help="folder for the graph files")
    p.add_argument(
        "--max-feature-nodes", type=int, default=None,
        help="feature budget (default 8192, lowered to what fits in memory; 0 = every feature)",
    )  # fmt: skip
    p.add_argument(
        "--estimate", nargs="?", const="arithmetic", choices=("arithmetic", "exact"),
        help="print the memory plan (peak host/device memory, a budget that fits, the longest "
        "prompt that fits) and stop: arithmetic from the prompt's length and the transcoder's "
        "L0 (nothing runs), or 'exact' (one encoder pass counts the active features)",
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
    p.add_argument("--heads", action="store_true", help="also split each circuit edge by the "
                   "attention heads carrying it (head loadings, kept in both graph files; read "
                   "them with 'circuit-atlas qk GRAPH --edge T S')")  # fmt: skip
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


class StoreSink:
    """The graph store as the batch runner's sink (:class:`tracer.batch.run.GraphSink`): its
    errors become one-line :class:`SinkError`s."""

    def __init__(self, store):
        self.store = store
        self._ids: set[str] | None = None

    def has(self, graph) -> bool:
        from graphstore import graph_id

        if self._ids is None:
            self._ids = set(self.store.graph_ids())
        return graph_id(graph) in self._ids

    def add(self, graph, full) -> None:
        from graphstore.errors import StoreError

        try:
            self.store.add(graph, full)
        except StoreError as err:
            raise SinkError(str(err).splitlines()[0]) from err

    def close(self) -> None:
        self.store.close()


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
        return _estimate(job, args.prompt, rm, exact=args.estimate == "exact" or None)
    pruned, graph, pruned_path, full_path = trace_one(job, args.prompt, rm, progress=True)
    print(summary(graph, pruned, time.perf_counter() - t0))
    print(budget_line(job, graph))
    if job.heads:
        from tracer.attention import heads_summary

        print(heads_summary(pruned))
    print(f"wrote {full_path} (full) and {pruned_path} (pruned)")
    return 0


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


def _estimate(job: TraceJob, prompt: str, rm, exact: bool | None = None) -> int:
    """``--estimate``: the memory plan of one prompt (arithmetic, or with ``exact`` one
    encoder pass), then stop; exit 2 when it does not fit."""
    from tracer.attribution import GB, estimate_memory
    from tracer.attribution.memory import suggested_budget_line

    limit = None if job.memory_limit_gb is None else int(job.memory_limit_gb * GB)
    est = estimate_memory(
        rm.model, rm.transcoder, prompt, job.max_feature_nodes, max_n_logits=job.max_n_logits,
        batch_size=job.batch_size, available_host_bytes=limit, exact=exact,
    )  # fmt: skip
    print("\n".join(est.lines()))
    if not est.fits and not (job.fit_budget and est.suggested_max_feature_nodes > 0):
        print(f"circuit-atlas: error: {suggested_budget_line(est)}", file=sys.stderr)
        return 2
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
        heads=args.heads,
    )


def _trace_file(args) -> int:
    """``--prompts FILE``: in this process (with --workers), or as one rank of a torchrun job.
    Exit status 0 when every prompt was traced (or skipped) and stored, 1 when some failed."""
    import torch

    from tracer.batch.collect import Summary, summary_text
    from tracer.batch.ranks import RankGroup, RankInfo, rank_setting

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
        store = group.on_writer(
            lambda: StoreSink(open_store(args.store_uri)) if want_store else None
        )
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
