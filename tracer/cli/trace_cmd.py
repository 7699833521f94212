"""``circuit-atlas trace``: attribute prompts, prune, save to Parquet (and the graph store).

One prompt: ``circuit-atlas trace "PROMPT" --transcoders T`` prints a one-screen summary.
Many: ``circuit-atlas trace --prompts FILE --workers N --store`` traces in worker processes,
stores each graph as it completes, and skips prompts already traced with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

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
    p.set_defaults(func=_trace)


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
    sc = graph.scores
    lines.append(
        f"scores: replacement {sc.get('replacement', float('nan')):.3f}, "
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


def _worker_init(job: TraceJob, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["rm"] = load_replacement(job.model, job.transcoders, job.setting)


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
        progress=progress,
        fit_budget=job.fit_budget,
        memory_limit_gb=job.memory_limit_gb,
    )
    pruned = prune(graph, job.node_threshold, job.edge_threshold)
    pruned_path, full_path = job.paths(prompt)
    graph.save(full_path)
    pruned.save(pruned_path)
    return pruned, graph, pruned_path, full_path


def _trace_in_worker(job: TraceJob, prompt: str) -> tuple[Path, Path]:
    """Worker-process task: graphs stay on disk, only their paths travel back."""
    return trace_one(job, prompt, _WORKER["rm"])[2:]


def trace_many(job: TraceJob, prompts: list[str], *, workers: int = 1, store=None, rm=None):
    """Trace ``prompts`` (skipping those already traced with the same settings, and stored
    when a store is given), in ``workers`` processes; store each graph as it completes.

    Returns a list of (prompt, pruned_path, full_path, status) with status 'traced' or
    'cached'. A graph whose store write fails stays on disk and the error names the file.
    """
    from tqdm.auto import tqdm

    from tracer.graph import Graph

    stored = set(store.graph_ids()) if store is not None else set()
    todo, results = [], []
    for prompt in prompts:
        pruned_path, full_path = job.paths(prompt)
        if pruned_path.exists() and full_path.exists():
            if store is not None:
                from graphstore import graph_id

                pruned = Graph.load(pruned_path)
                if graph_id(pruned) not in stored:
                    store.add(pruned, Graph.load(full_path))
            results.append((prompt, pruned_path, full_path, "cached"))
        else:
            todo.append(prompt)

    def finish(prompt, paths):
        if store is not None:
            store.add(Graph.load(paths[0]), Graph.load(paths[1]))
        results.append((prompt, paths[0], paths[1], "traced"))

    bar = tqdm(total=len(todo), desc="tracing prompts", unit="prompt")
    if workers <= 1 or len(todo) <= 1:
        rm = (
            rm
            if rm is not None
            else (load_replacement(job.model, job.transcoders, job.setting) if todo else None)
        )
        for prompt in todo:
            finish(prompt, trace_one(job, prompt, rm)[2:])
            bar.update(1)
    else:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(workers, ctx, _worker_init, (job, threads)) as pool:
            futures = {pool.submit(_trace_in_worker, job, p): p for p in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
                bar.update(1)
    bar.close()
    order = {p: i for i, p in enumerate(prompts)}
    return sorted(results, key=lambda r: order[r[0]])


def open_store(uri: str | None = None):
    """The graph store: the embedded local server by default, or a Bolt URI."""
    from graphstore import GraphStore

    return GraphStore(uri) if uri else GraphStore()


def _trace(args) -> int:
    if args.prompts:
        return _trace_file(args)
    if not args.prompt:
        raise ValueError("give a prompt, or --prompts FILE")
    job = _job(args)  # parses --device/--dtype: a bad one fails before any loading
    t0 = time.perf_counter()
    rm = load_replacement(args.model, args.transcoders, job.setting)
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
    )


def _trace_file(args) -> int:
    prompts = read_prompts(args.prompts)
    job = _job(args)
    store = open_store(args.store_uri) if args.store or args.store_uri else None
    t0 = time.perf_counter()
    try:
        results = trace_many(job, prompts, workers=args.workers, store=store)
    finally:
        if store is not None:
            store.close()
    n_new = sum(r[3] == "traced" for r in results)
    budget = job.max_feature_nodes or "all"
    print(f"feature budget: {budget} per prompt"
          + (" (default; lowered where memory is short)" if job.fit_budget else ""),
          file=sys.stderr)  # fmt: skip
    print(
        f"{len(results)} prompts: {n_new} traced, {len(results) - n_new} already done; "
        f"graphs in {args.out}"
        + (" and the graph store" if store is not None else "")
        + f" ({time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
    )
    return 0
