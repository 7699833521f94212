"""The training record: a JSON-lines log (one record per logged step, evaluation or event),
the progress bar, and the training curves drawn from the log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOG = "log.jsonl"


def postfix(res, fire, ev: dict) -> dict:
    pf = {
        "mse": f"{float(res.mse_per_layer.mean()):.3f}",
        "L0": f"{float(res.l0.mean()):.1f}",
        "dead": f"{float(fire.dead_fraction().mean()):.1%}",
    }
    if "nmse" in ev:
        pf["eval_nmse"] = f"{ev['nmse']:.3f}"
    if "spliced" in ev:
        pf["KL"] = f"{ev['spliced'].get('kl', float('nan')):.3f}"
        pf["top1"] = f"{ev['spliced'].get('top1', float('nan')):.2f}"
    return pf


def harvest_bar(total_tokens: int, enabled: bool):
    """The activation harvest's progress (tokens, with tokens/s), one update per cached chunk:
    a line every chunk (a few seconds) also when stderr is not a terminal. None when disabled
    or when nothing is left to harvest."""
    if not enabled or total_tokens <= 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        desc="harvesting activations",
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )


def append(path: Path, rec: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate(path: Path, step: int) -> None:
    """Keep the log consistent with a resumed run: drop records after the checkpoint's step."""
    recs = [r for r in read_log(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def plot_curves(log_path: Path, png: Path) -> Path | None:
    """Training curves (loss, NMSE, L0, dead fraction, spliced KL / top-1) as one PNG."""
    recs = read_log(log_path)
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("event") == "eval"]
    if not train_recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    s = [r["step"] for r in train_recs]
    es = [r["step"] for r in evals]
    panels = [
        ("loss", [(s, [r["loss"] for r in train_recs], "train")], True),
        (
            "NMSE (held-out)",
            [
                (es, [r["nmse"] for r in evals], "mean"),
                (s, [r["train_nmse"] for r in train_recs], "train ~"),
            ],
            True,
        ),
        (
            "L0 per layer",
            [
                (s, [r["l0"] for r in train_recs], "train"),
                (es, [r["l0"] for r in evals], "held-out"),
            ],
            False,
        ),
        ("dead fraction", [(s, [r["dead"] for r in train_recs], "train window")], False),
        (
            "spliced KL (nats)",
            [(es, [r["spliced"]["kl"] for r in evals if "spliced" in r], "KL")]
            if any("spliced" in r for r in evals)
            else [],
            True,
        ),
        (
            "spliced top-1 agreement",
            [(es, [r["spliced"]["top1"] for r in evals if "spliced" in r], "top-1")]
            if any("spliced" in r for r in evals)
            else [],
            False,
        ),
    ]
    for ax, (title, series, logy) in zip(axes.flat, panels, strict=True):
        for xs, ys, label in series:
            if len(xs) == len(ys) and ys:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if logy and series and all(v > 0 for _, ys, _ in series for v in ys):
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
