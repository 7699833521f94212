"""Benchmark transcoder training on this machine: harvest and training throughput, and the
quality the default SmolLM2 recipe reaches in its time budget.

    .venv/bin/python scripts/bench_training.py [--budget-minutes 20] [--out DIR] [-- extra
        `transcoders train` options]
    .venv/bin/python scripts/bench_training.py --widths 256,1024,2048 --budget-minutes 15
        [--harvest-minutes M] [--results benchmarks/training_widths]

With ``--widths`` it first harvests one shared activation cache (training tokens for
``--harvest-minutes``, default the budget, or up to ``--harvest-tokens``, plus the held-out
tokens), then trains each width for ``--budget-minutes`` from exactly those cached tokens
(``--cache-tokens``), so the widths are compared at equal wall time on equal data; it writes one
row per width. ``--variant NAME='OPTIONS'`` (repeatable) does the same for any recipe changes,
e.g. where the outlier rule acts::

    .venv/bin/python scripts/bench_training.py --harvest-tokens 109474 \
        --variant all='--outlier-uses loss,skip,scales' --variant none='--outlier-rule none' \
        --results benchmarks/training_outlier_parts -- --steps 600 --threads 1

Trains with ``circuit-atlas transcoders train`` (default recipe), saves the CLT to
``$CIRCUIT_ATLAS_HOME/transcoders/smollm2-clt-default`` and writes
``benchmarks/training.json`` and ``benchmarks/training.md`` (per-layer NMSE, L0, dead fraction;
spliced KL, top-1 agreement, CE loss recovered; tokens/s). NMSE is reported over the held-out
positions without the start token (the headline), over all of them, and without the start token
and the outlier positions (``transcoders.evaluation`` defines each). With ``--graph-scores``
(default) it also attributes the demo prompts with the trained CLT and reports their replacement
and completeness scores (circuit-tracer convention). Goal for the default recipe: mean NMSE <=
0.25, mean L0 <= 64, dead fraction <= 5%, demo replacement score >= 0.55.

After training (outside the timed budget) it also measures a reference point: the best
*linear* map per layer (ridge regression of MLP outputs on MLP inputs, fitted on
``--baseline-seqs`` training sequences) scored on the same held-out tokens. A transcoder's NMSE
only means something next to it: the features must beat every linear map to be worth having.
Pass ``--baseline-seqs 0`` to skip it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = {"nmse": 0.25, "l0": 64, "dead": 0.05, "replacement": 0.55}
RESULTS = ROOT / "benchmarks" / "training"  # .json / .md (with --widths: training_widths)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-minutes", type=float, default=20.0)
    ap.add_argument(
        "--out", help="weights folder (default: <cache>/transcoders/smollm2-clt-default)"
    )
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument(
        "--baseline-seqs",
        type=int,
        default=128,
        help="training sequences for the linear (ridge) baseline; 0 skips it",
    )
    ap.add_argument("--widths", help="comma-separated features per layer, e.g. 256,1024,2048")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="a recipe variant: `transcoders train` options added to the extra ones (repeatable)",
    )
    ap.add_argument(
        "--harvest-minutes",
        type=float,
        help="with --widths/--variant: harvest time (default: budget)",
    )
    ap.add_argument(
        "--harvest-tokens",
        type=int,
        help="with --widths/--variant: stop the harvest at this many training tokens",
    )
    ap.add_argument(
        "--graph-scores",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attribute the demo prompts after training for their replacement/completeness",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="with --widths/--variant: start every variant over (default: resume checkpoints)",
    )
    ap.add_argument(
        "--add-meaning",
        nargs="+",
        metavar="RESULTS_JSON",
        help="merge the rows of these --variant results into --results, adding each row's "
        "meaning score (meaning.json beside its weights, else computed now)",
    )
    ap.add_argument("extra", nargs="*", help="more `transcoders train` options (after --)")
    args = ap.parse_args()
    if args.add_meaning:
        return add_meaning(args)
    if args.widths or args.variant:
        return bench_variants(args)

    from tracer.cli import build_parser
    from tracer.cli.train_cmd import run_training
    from tracer.fetch import cache_root

    out = Path(args.out) if args.out else cache_root() / "transcoders" / "smollm2-clt-default"
    argv = [
        "transcoders",
        "train",
        "--model",
        "smollm2",
        "--corpus",
        "public",
        "--budget-minutes",
        str(args.budget_minutes),
        "--out",
        str(out),
        *(["--graph-scores"] if args.graph_scores else []),
        *args.extra,
    ]
    targs = build_parser().parse_args(argv)
    load0 = os.getloadavg()
    t0 = time.time()
    result, out = run_training(targs)
    wall = time.time() - t0
    m = result.metrics
    import torch

    report = {
        "command": "circuit-atlas " + " ".join(argv),
        "weights": str(out),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load0,
            "load_average_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "wall_seconds": round(wall, 1),
        "steps": m.get("steps"),
        "harvest_tokens_per_s": m.get("harvest_tokens_per_s"),
        "train_tokens_per_s": m.get("train_tokens_per_s"),
        "recipe": result.clt.cfg.training.get("recipe"),
        "metrics": {k: v for k, v in m.items()},
        "goal": GOAL,
        "goal_met": {
            "nmse": m["nmse"] <= GOAL["nmse"],
            "l0": m["l0"] <= GOAL["l0"],
            "dead": m["dead_heldout"] <= GOAL["dead"],
            **(
                {"replacement": m["graph_scores"]["replacement"] >= GOAL["replacement"]}
                if "graph_scores" in m
                else {}
            ),
        },
    }
    if args.baseline_seqs > 0:
        report["linear_baseline"] = linear_baseline(targs, args.baseline_seqs)
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(report, indent=2))
    res.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def variants_from_args(args) -> list[tuple[str, list[str]]]:
    """(name, extra `transcoders train` options) per width and per ``--variant``."""
    import shlex

    out = [(w, ["--features-per-layer", w]) for w in (args.widths or "").split(",") if w]
    for v in args.variant:
        name, sep, opts = v.partition("=")
        if not sep or not name:
            raise SystemExit(
                f"--variant {v!r}: write NAME='OPTIONS', e.g. none='--outlier-rule none'"
            )
        out.append((name, shlex.split(opts)))
    return out


def bench_variants(args) -> int:
    """Harvest one shared cache, then train every variant (a width, or other recipe options)
    for the same budget (or the same --steps) from it."""
    from tracer.cli import build_parser
    from tracer.cli.train_cmd import run_training
    from tracer.fetch import cache_root
    from transcoders.training.planner import BudgetError

    variants = variants_from_args(args)
    base = ["transcoders", "train", "--model", "smollm2", "--corpus", "public", *args.extra]
    cache, n_tokens, harvest_s = harvest_shared_cache(
        build_parser().parse_args(base),
        60 * (args.harvest_minutes or args.budget_minutes),
        args.harvest_tokens,
    )
    rows = []
    for name, opts in variants:
        out = cache_root() / "transcoders" / f"smollm2-clt-{name}-bench"
        argv = [
            *base, "--budget-minutes", str(args.budget_minutes), *opts,
            "--cache", str(cache), "--cache-tokens", str(n_tokens), "--out", str(out),
            *(["--no-resume"] if args.fresh else []),
            *(["--graph-scores"] if args.graph_scores else []),
        ]  # fmt: skip
        load0 = os.getloadavg()
        t0 = time.time()
        targs = build_parser().parse_args(argv)
        try:
            result, _ = run_training(targs)
        except BudgetError as err:  # this variant does not fit the budget here: say so, go on
            rows.append({"variant": name, "features": targs.features_per_layer,
                         "command": "circuit-atlas " + " ".join(argv),
                         "load_average_start": load0, "error": str(err)})  # fmt: skip
            continue
        m = result.metrics
        rate = m.get("train_tokens_per_s")
        rows.append({
            "variant": name, "features": targs.features_per_layer,
            "kind": targs.kind, "weights": str(out),
            "command": "circuit-atlas " + " ".join(argv),
            "wall_seconds": round(time.time() - t0, 1), "load_average_start": load0,
            "load_average_end": os.getloadavg(),
            "step_seconds": round(targs.batch_tokens / rate, 3) if rate else None,
            "frequency": {k: v for k, v in (m.get("frequency") or {}).items()
                          if k not in ("median_per_layer", "share_dense_per_layer")},
            "meaning": m.get("meaning_summary"),
            **{k: m.get(k) for k in ("steps", "planned_steps", "replans", "cache_tokens",
                                     "passes", "train_tokens_per_s", "nmse", "nmse_all",
                                     "nmse_inliers", "l0", "dead_heldout", "nmse_per_layer",
                                     "graph_scores")},
            "spliced": m.get("spliced", {}),
        })  # fmt: skip
        write_variants(args, cache, n_tokens, harvest_s, rows)  # a later failure keeps these
    print(variants_markdown(write_variants(args, cache, n_tokens, harvest_s, rows)))
    return 0


def write_variants(args, cache, n_tokens: int, harvest_s: float, rows: list[dict]) -> dict:
    import torch

    report = {
        "harvest": {"cache": str(cache), "tokens": n_tokens, "seconds": round(harvest_s, 1)},
        "budget_minutes_per_variant": args.budget_minutes,
        "extra_options": args.extra,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "variants": rows,
    }
    res = Path(args.results if args.results != str(RESULTS) else str(RESULTS) + "_widths")
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(portable(json.dumps(report, indent=2)))
    res.with_suffix(".md").write_text(portable(variants_markdown(report)))
    return report


def add_meaning(args) -> int:
    """Merge the variant rows of ``args.add_meaning`` result files into ``args.results``, each
    with its meaning score (:mod:`transcoders.meaning`): read from ``meaning.json`` beside its
    weights or ``training_metrics.json``, else computed now and saved there. Rows are written as
    they are scored, so the command resumes."""
    from tracer.cli.train_cmd import tokenizer_spec
    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn
    from transcoders.formats import load_transcoder
    from transcoders.meaning import (
        MeaningConfig,
        build_probe,
        load_meaning,
        probe_inputs,
        save_meaning,
        score_probe,
    )

    reports = [json.loads(Path(p).read_text()) for p in args.add_meaning]
    merged = dict(reports[0])
    merged["variants"] = [w for r in reports for w in r["variants"]]
    merged["sources"] = [portable(str(p)) for p in args.add_meaning]
    home = str(cache_root())
    model = probe = inputs = None
    cfg = MeaningConfig()
    for w in merged["variants"]:
        if "error" in w or (w.get("meaning") or {}).get("mean_best_auroc") is not None:
            continue
        weights = Path(w["weights"].replace("$CIRCUIT_ATLAS_HOME", home))
        result = load_meaning(weights)
        if result is None:
            if model is None:  # one probe forward pass serves every transcoder (same site)
                model = LanguageModel.load("smollm2")
                probe = build_probe(
                    tokenizer_spec(model), seq_len=cfg.seq_len, per_category=cfg.per_category,
                    background=cfg.background,
                )  # fmt: skip
                inputs = probe_inputs(activation_fn(model, "mlp_in"), probe.tokens, cfg.batch, True)
            clt = load_transcoder(weights, model=model)
            result = score_probe(clt, None, probe, cfg, progress=True, inputs=inputs)
            save_meaning(result, weights)
        w["meaning"] = result.summary()
        _write_merged(args, merged)
    _write_merged(args, merged)
    print(variants_markdown(merged))
    return 0


def _write_merged(args, report: dict) -> None:
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(portable(json.dumps(report, indent=2)))
    res.with_suffix(".md").write_text(portable(variants_markdown(report)))


def portable(text: str) -> str:
    """Results are read on other machines: the cache root becomes $CIRCUIT_ATLAS_HOME."""
    from tracer.fetch import cache_root

    return text.replace(str(cache_root()), "$CIRCUIT_ATLAS_HOME")


def harvest_shared_cache(targs, seconds: float, max_tokens: int | None = None):
    """Harvest the default cache's training set chunk by chunk for ``seconds`` or up to
    ``max_tokens`` training tokens, whichever comes first (plus the held-out set); returns
    (cache folder, training tokens cached, harvest seconds)."""
    import torch

    from tracer.cli.train_cmd import cache_spec, default_threads, load_corpus, split_tokens
    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn
    from transcoders.device import setting_from_args
    from transcoders.training.activation_cache import ActivationCache, heldout_set
    from transcoders.training.run import TrainConfig

    setting = setting_from_args(targs)
    torch.set_num_threads(targs.threads or default_threads())
    model = LanguageModel.load(targs.model, device=setting)
    corpus = load_corpus(targs.corpus, model)
    train_tokens, eval_tokens, _ = split_tokens(corpus, targs)
    cfg = TrainConfig(input_site=targs.input_site, cache_dtype=targs.cache_dtype)
    spec = cache_spec(model, corpus, cfg, setting)
    folder = Path(targs.cache) if targs.cache else cache_root() / "activations" / spec.folder_name()
    cache = ActivationCache(folder, spec)
    acts = activation_fn(model, cfg.input_site)
    t0 = time.time()
    cache.harvest(heldout_set(eval_tokens), eval_tokens, acts, chunk_sequences=cfg.chunk_sequences)
    keep = train_tokens.shape[1] - int(cfg.skip_bos)
    limit = len(train_tokens) if max_tokens is None else min(len(train_tokens), max_tokens // keep)
    n = cache.complete_sequences("train", train_tokens)
    while time.time() - t0 < seconds and n < limit:
        n = min(limit, n + cfg.chunk_sequences)
        cache.harvest("train", train_tokens, acts, n, chunk_sequences=cfg.chunk_sequences)
        print(f"harvested {n} sequences, {time.time() - t0:.0f} s", file=sys.stderr)
    n = min(n, limit)  # a cache harvested earlier may hold more: use the first `limit` rows
    return folder, n * keep, time.time() - t0


def variants_markdown(r: dict) -> str:
    h = r["harvest"]
    lines = [
        "## Recipe variants at equal wall time or steps (one shared activation cache)",
        "",
        f"- harvest once: {h['tokens']} training tokens in {h['seconds'] / 60:.1f} min "
        f"(cache `{h['cache']}`); each variant then trains "
        f"{r.get('budget_minutes_per_variant', r.get('budget_minutes_per_width'))} min (unless "
        f"the options give --steps) from exactly those tokens; options for all: "
        f"`{' '.join(r.get('extra_options') or [])}`",
        f"- machine: {r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads",
        "",
        "NMSE: held-out, start token excluded (all positions / outliers also excluded in "
        "brackets); replacement and completeness: mean over the demo prompts, circuit-tracer "
        "convention.",
        "",
        "| variant | kind | features/layer | steps | passes | train tok/s | s/step "
        "| held-out NMSE | L0 | dead | median freq | > 10% | KL | top-1 | replacement "
        "| completeness | meaning | token-level | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|",
    ]
    for w in r.get("variants", r.get("widths", [])):
        name = w.get("variant", w["features"])
        if "error" in w:
            lines.append(f"| {name} | | {w['features']} | did not run: {w['error']} ||||||||||")
            continue
        sp, nan = w["spliced"], float("nan")
        gs = w.get("graph_scores") or {}
        fr = w.get("frequency") or {}
        mn = w.get("meaning") or {}
        lines.append(
            f"| {name} | {w.get('kind', 'clt')} | {w['features']} | {w['steps']} | {w['passes']} "
            f"| {w['train_tokens_per_s'] or 0:.0f} | {w.get('step_seconds') or nan:.2f}"
            f" | {w['nmse']:.3f} ({w.get('nmse_all') or nan:.3f} / "
            f"{w.get('nmse_inliers') or nan:.3f}) | {w['l0']:.1f} | {w['dead_heldout']:.1%} | "
            f"{fr.get('median', nan):.2%} | {fr.get('share_dense', nan):.1%} | "
            f"{sp.get('kl', nan):.3f} | {sp.get('top1', nan):.1%} | "
            f"{gs.get('replacement', nan):.3f} | {gs.get('completeness', nan):.3f} "
            f"| {mn.get('mean_best_auroc', nan):.3f} | {mn.get('token_level_share', nan):.1%} "
            f"| {w['load_average_start'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def linear_baseline(targs, n_seqs: int, ridge: float = 1e-3) -> dict:
    """Held-out NMSE per layer of the ridge fit y ~ W x + b per layer (MLP out on MLP in),
    on the non-start positions of ``n_seqs`` training sequences without their outliers (the
    trainer's rule and factor), scored on the held-out sequences the trainer evaluates on, over
    the same three position sets. (The ridge is smaller than the trainer's skip_ridge, which is
    sized for its 8,192-token first buffer; with 16k tokens it hardly matters: 0.507 at 1e-3,
    0.501 at 0.03.)"""

    from tracer.cli.train_cmd import load_corpus, split_tokens
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn
    from transcoders.evaluation import Heldout
    from transcoders.metrics import nmse_per_layer
    from transcoders.training import outliers
    from transcoders.training.harvest import ShuffleBuffer
    from transcoders.training.run import fit_skip

    model = LanguageModel.load(targs.model)
    train_tokens, eval_tokens, _ = split_tokens(load_corpus(targs.corpus, model), targs)
    fit_tokens = train_tokens[:n_seqs]
    acts = activation_fn(model, targs.input_site)
    x, y = ShuffleBuffer.harvest(acts, fit_tokens).get(slice(None))  # [L, N, d]
    thr = outliers.norm_thresholds(
        outliers.output_norms(y), targs.outlier_rule, targs.outlier_factor
    )
    keep = ~outliers.outlier_mask(y, thr)
    held = Heldout.harvest(acts, eval_tokens)
    w, b = fit_skip(x, y, ridge, weight=keep.float())  # w [L, d_out, d_in], b [L, d]
    pred = held.x @ w.transpose(1, 2) + b[:, None, :]
    out = {
        "fit_tokens": x.shape[1],
        "fit_outliers_excluded": int((~keep).sum()),
        "heldout_tokens": held.x.shape[1],
        "ridge": ridge,
    }
    for name, mask in held.masks().items():
        nmse = nmse_per_layer(pred, held.y, mask)
        out[name] = round(float(nmse.mean()), 6)
        out[name + "_per_layer"] = [round(float(v), 6) for v in nmse]
    return out


def markdown(r: dict) -> str:
    m = r["metrics"]
    sp = m.get("spliced", {})
    rec = r["recipe"] or {}
    base = r.get("linear_baseline")
    gs = m.get("graph_scores")
    nan = float("nan")
    lines = [
        "## Transcoder training benchmark (default SmolLM2 recipe)",
        "",
        f"`{r['command']}`",
        "",
        f"- recipe: {rec.get('kind')}{' + skip' if rec.get('skip') else ''} "
        f"{rec.get('activation')} k={rec.get('topk')}, "
        f"{rec.get('n_features')} features/layer, batch {rec.get('batch_tokens')} tokens, "
        f"lr {rec.get('lr')}, buffer {rec.get('buffer_tokens')} tokens x "
        f"{rec.get('passes')} passes; outliers: {rec.get('outlier_rule')} rule, factor "
        f"{rec.get('outlier_factor')}"
        + (f", acting in: {', '.join(rec['outlier_uses'])}" if rec.get("outlier_uses") else ""),
        f"- machine: {r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads, "
        f"load average at start {r['machine']['load_average_start'][0]:.1f} (shared machine)",
        f"- wall time {r['wall_seconds'] / 60:.1f} min, {r['steps']} steps; harvest "
        f"{r['harvest_tokens_per_s']:.0f} tokens/s, training {r['train_tokens_per_s'] or 0:.0f} "
        "tokens/s",
        f"- held-out ({rec.get('n_heldout_seqs')} sequences): mean NMSE **{m['nmse']:.3f}** "
        f"without the start token, {m.get('nmse_all', nan):.3f} over all positions, "
        f"{m.get('nmse_inliers', nan):.3f} without the start token and outliers "
        f"({m.get('outlier_frac', nan):.2%} of positions, mean over layers); mean L0 "
        f"**{m['l0']:.1f}**, dead (never fired on held-out) **{m['dead_heldout']:.1%}**",
        f"- spliced (all 30 MLPs replaced, BOS kept): KL **{sp.get('kl', nan):.3f}** "
        f"nats, top-1 agreement **{sp.get('top1', nan):.1%}**, CE clean "
        f"{sp.get('ce_clean', nan):.3f} / spliced {sp.get('ce_spliced', nan):.3f}"
        f" / MLPs zeroed {sp.get('ce_ablated', nan):.3f}, CE loss recovered "
        f"{sp.get('ce_recovered', nan):.1%}",
    ]
    if gs:
        lines.append(
            f"- demo prompts' graphs ({gs['convention']} convention, {gs['max_feature_nodes']} "
            f"feature nodes): mean replacement **{gs['replacement']:.3f}**, completeness "
            f"**{gs['completeness']:.3f}** ("
            + "; ".join(
                f"{p['prompt']!r} {p['replacement']:.2f} / {p['completeness']:.2f}"
                for p in gs["prompts"]
            )
            + f"; {gs['seconds']:.0f} s)"
        )
        tops = [p for p in gs["prompts"] if p.get("error_shares")]
        if tops:  # where the unexplained influence sits: the largest error nodes
            lines.append(
                "- largest error nodes (share of token + error influence, layer @ position): "
                + "; ".join(
                    f"{p['prompt'][:24]!r} "
                    + ", ".join(
                        f"L{t['layer']}@{t['position']} {t['share']:.2f}"
                        for t in p["error_shares"]["top"][:3]
                    )
                    for p in tops
                )
            )
    lines.append(
        f"- goal (NMSE <= {GOAL['nmse']} without the start token, L0 <= {GOAL['l0']}, dead <= "
        f"{GOAL['dead']:.0%}, replacement >= {GOAL['replacement']}): "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in r["goal_met"].items())
    )
    if base:
        lines.append(
            f"- linear baseline (ridge per layer, {base['fit_tokens']} training tokens without "
            f"{base.get('fit_outliers_excluded', 0)} outlier (layer, position) pairs, same "
            f"held-out tokens): mean NMSE **{base['nmse']:.3f}** without the start token, "
            f"{base.get('nmse_all', nan):.3f} all, {base.get('nmse_inliers', nan):.3f} inliers"
        )
    lines += [
        "",
        "NMSE per layer over held-out positions: without the start token / all / without the "
        "start token and outliers (transcoders.evaluation).",
        "",
        "| layer | NMSE | NMSE all | NMSE inliers | outliers | L0 | dead (held-out) |"
        + (" linear NMSE | linear inliers |" if base else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if base else ""),
    ]
    n_l = len(m["nmse_per_layer"])

    def col(d, k):
        return d.get(k + "_per_layer", [nan] * n_l) if d else [None] * n_l

    for i in range(n_l):
        row = (
            f"| {i} | {m['nmse_per_layer'][i]:.3f} | {col(m, 'nmse_all')[i]:.3f} | "
            f"{col(m, 'nmse_inliers')[i]:.3f} | {col(m, 'outlier_frac')[i]:.2%} | "
            f"{m['l0_per_layer'][i]:.1f} | {m['dead_heldout_per_layer'][i]:.1%} |"
        )
        if base:
            row += f" {col(base, 'nmse')[i]:.3f} | {col(base, 'nmse_inliers')[i]:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
