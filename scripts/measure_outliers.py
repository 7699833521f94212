"""Where SmolLM2's massive MLP outputs are, and what leaving them out does to a ridge fit (the
skip connection's start) and to the normalisation scales: the numbers behind
``transcoders.training.outliers``.

    nice -n 10 .venv/bin/python scripts/measure_outliers.py [--train-seqs 192] [--factor 50]

Harvests ``--train-seqs`` training rows and the 32 held-out rows ``transcoders train`` evaluates
on (public corpus), every position kept, and writes ``benchmarks/outliers.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-seqs", type=int, default=192)
    ap.add_argument("--factor", type=float, default=50.0, help="ratio rule's factor")
    ap.add_argument("--ridge", type=float, default=0.1, help="as TrainConfig.skip_ridge")
    ap.add_argument("--first-buffer", type=int, default=8192, help="tokens of round 0")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "outliers"))
    args = ap.parse_args()

    from tracer.cli import build_parser
    from tracer.cli.train_cmd import load_corpus, split_tokens
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn
    from transcoders.evaluation import Heldout
    from transcoders.metrics import nmse_per_layer
    from transcoders.training import outliers
    from transcoders.training.harvest import ShuffleBuffer
    from transcoders.training.run import fit_skip

    targs = build_parser().parse_args(["transcoders", "train"])  # the default split
    load0 = os.getloadavg()
    t0 = time.time()
    model = LanguageModel.load(args.model)
    train_tokens, eval_tokens, _ = split_tokens(load_corpus(targs.corpus, model), targs)
    acts = activation_fn(model, targs.input_site)
    held = Heldout.harvest(acts, eval_tokens)
    # Training rows: non-start positions only, float16 (a fit reads one layer at a time).
    buf = ShuffleBuffer.harvest(
        acts, train_tokens[: args.train_seqs], skip_bos=True, dtype=torch.float16
    )
    harvest_s = time.time() - t0
    L = held.y.shape[0]
    P = eval_tokens.shape[1]
    tr_norms = torch.stack([buf.outputs[:, l].float().norm(dim=-1) for l in range(L)])
    tr_pos = torch.arange(tr_norms.shape[1]) % (P - 1) + 1
    held_norms = outliers.output_norms(held.y)
    stats = {
        "heldout": outliers.norm_stats(held_norms, held.positions, args.factor),
        "train": outliers.norm_stats(tr_norms, tr_pos, args.factor),
    }
    # The largest non-start outputs per layer: which position and token.
    largest = {}
    tr_flat = train_tokens[: args.train_seqs, 1:].reshape(-1)
    for name, n, pos, flat in (
        ("heldout", held_norms, held.positions, eval_tokens.reshape(-1)),
        ("train", tr_norms, tr_pos, tr_flat),
    ):
        later = pos > 0
        med = n[:, later].median(dim=1).values
        rows = []
        for l in range(L):
            top = (n[l] / med[l]).masked_fill(~later, 0).topk(3)
            rows.append([
                {"ratio": round(float(v), 1), "position": int(pos[i]),
                 "token": model.decode([int(flat[i])])}
                for v, i in zip(top.values, top.indices, strict=True)
            ])  # fmt: skip
        largest[name] = rows

    # Ridge fits on the non-start training positions: all of them, or without outliers.
    thr = outliers.norm_thresholds(tr_norms, "ratio", args.factor)
    keep = tr_norms <= thr[:, None]  # [L, N]
    later_h = held.positions > 0
    inl = held.masks(args.factor)["nmse_inliers"]
    k = max(1, int(0.01 * int(later_h.sum())))
    fits = {"all": [], "robust": []}
    for l in range(L):
        x = buf.inputs[:, l].float()[None]
        y = buf.outputs[:, l].float()[None]
        hx, hy = held.x[l : l + 1], held.y[l : l + 1]
        sq = held_norms[l].pow(2)
        top = sq.masked_fill(~later_h, -1).topk(k).indices
        for name, wt in (("all", None), ("robust", keep[l : l + 1].float())):
            w, b = fit_skip(x, y, args.ridge, weight=wt)
            pred = hx @ w.transpose(1, 2) + b[:, None]
            err = (pred - hy).pow(2).sum(-1)[0]
            fits[name].append({
                "nmse": float(nmse_per_layer(pred, hy, later_h)[0]),
                "nmse_inliers": float(nmse_per_layer(pred, hy, inl[l : l + 1])[0]),
                "top1pct_err_share": float(err[top].sum() / err[later_h].sum()),
            })  # fmt: skip
    # Normalisation: the first buffer's mean squared output norm with and without outliers.
    first = slice(0, min(args.first_buffer, tr_norms.shape[1]))
    sq, kf = tr_norms[:, first].pow(2), keep[:, first]
    ms_inflation = sq.mean(1) / ((sq * kf).sum(1) / kf.sum(1))
    report = {
        "command": "scripts/measure_outliers.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_start": load0,
                    "load_average_end": os.getloadavg(), "harvest_seconds": round(harvest_s)},
        "train_positions": int(tr_norms.shape[1]),
        "heldout_positions": int(later_h.sum()),
        "factor": args.factor,
        "ridge_coef": args.ridge,
        "stats": stats,
        "largest": largest,
        "excluded_train": (~keep).sum(1).tolist(),
        "ridge": fits,
        "first_buffer_ms_inflation": [round(float(v), 3) for v in ms_inflation],
        "top1pct_sq_share_train": stats["train"]["top1pct_sq_share"],
    }  # fmt: skip
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    res.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    h, t = r["stats"]["heldout"], r["stats"]["train"]
    f = r["factor"]
    lines = [
        "## Massive MLP outputs of SmolLM2 (transcoders.training.outliers)",
        "",
        f"`{r['command']}`: {r['train_positions']} training and {r['heldout_positions']} held-out"
        f" non-start positions; load average {r['machine']['load_average_start'][0]:.1f} at the "
        "start (shared 2-core machine). Ratios are ||mlp_out|| over the layer's median over "
        "non-start positions; 'start' and 'first' are the medians of that ratio at positions 0 "
        f"and 1. Outliers: ratio > {f:g}. Ridge fits (ridge {r['ridge_coef']:g}) on the training "
        "positions, scored on the held-out ones.",
        "",
        "| layer | start (held-out) | first | max non-start (held-out) | max non-start (train) "
        "| top 1% share of sq. norm (held-out) | outliers in train | ridge NMSE inliers: all / "
        "robust fit | ridge NMSE non-start: all / robust | first-buffer mean-square inflation "
        "| largest non-start (held-out) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    fa, fr = r["ridge"]["all"], r["ridge"]["robust"]
    for l in range(len(h["median_norm"])):
        big = r["largest"]["heldout"][l][0]
        lines.append(
            f"| {l} | {h['start_ratio'][l]:.1f} | {h['first_ratio'][l]:.2f} | "
            f"{h['max_ratio'][l]:.1f} | {t['max_ratio'][l]:.1f} | "
            f"{h['top1pct_sq_share'][l]:.3f} | {r['excluded_train'][l]} | "
            f"{fa[l]['nmse_inliers']:.3f} / {fr[l]['nmse_inliers']:.3f} | "
            f"{fa[l]['nmse']:.3f} / {fr[l]['nmse']:.3f} | "
            f"{r['first_buffer_ms_inflation'][l]:.2f} | "
            f"{big['ratio']}x at p{big['position']} {big['token']!r} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
