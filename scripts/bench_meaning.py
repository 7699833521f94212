"""The meaning score (transcoders.meaning) of transcoders on SmolLM2, from one shared forward
pass over the probe text: per category the best layer's AUROC, the mean over categories, and
per layer the token-level share, dead share and firing frequencies.

    nice -n 10 .venv/bin/python scripts/bench_meaning.py [PATH ...] [--random 256:32]
        [--out benchmarks/meaning_baseline]

PATH: trained transcoder folders (e.g. today's default CLT). ``--random F:A``: also a random
CLT of F features per layer calibrated to about A active per layer and token (the control:
what features that learned nothing score on real activations). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="transcoder folders")
    ap.add_argument("--random", action="append", default=[], help="F:A random CLT control")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "meaning_baseline"))
    ap.add_argument(
        "--probe-cache",
        help="file holding (probe, inputs) from torch.save: read if it exists, else written "
        "(the probe's forward pass is most of the cost)",
    )
    args = ap.parse_args(argv)

    import torch

    from tracer.cli.train_cmd import tokenizer_spec
    from tracer.model import LanguageModel
    from tracer.random_clt import calibrated_random_clt
    from tracer.spliced_metrics import activation_fn
    from transcoders.formats import load_transcoder
    from transcoders.meaning import MeaningConfig, build_probe, probe_inputs, score_probe

    torch.set_num_threads(args.threads)
    model = LanguageModel.load(args.model)
    cfg = MeaningConfig()
    t0 = time.perf_counter()
    cache: dict[str, torch.Tensor] = {}  # probe inputs per input site (one forward pass each)
    pc = Path(args.probe_cache) if args.probe_cache else None
    if pc is not None and pc.exists():
        probe, cache["mlp_in"] = torch.load(pc, weights_only=False)
    else:
        probe = build_probe(tokenizer_spec(model), seq_len=cfg.seq_len,
                            per_category=cfg.per_category, background=cfg.background)  # fmt: skip
    t_probe = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    res = {
        "what": "meaning score: per category the AUROC of the best single feature (chosen on "
        "the even probe rows, measured on the odd rows) at its best layer; features: firing "
        "frequency over the probe's positions",
        "commit": commit,
        "command": "python scripts/bench_meaning.py "
        + " ".join(map(_portable, argv or sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "probe": {
            "rows": int(probe.tokens.shape[0]),
            "positions": int(probe.valid.sum()),
            "positives": {c: int(v.sum()) for c, v in probe.positive.items()},
            "build_seconds": round(t_probe, 1),
        },  # fmt: skip
        "results": [],
    }
    out = Path(args.out)

    def run(label: str, clt) -> None:
        site = clt.cfg.input_site
        la = [round(x, 2) for x in os.getloadavg()]
        t = time.perf_counter()
        if site not in cache:
            cache[site] = probe_inputs(activation_fn(model, site), probe.tokens, cfg.batch, True)
            if pc is not None and site == "mlp_in":
                torch.save((probe, cache[site]), pc)
        t_fwd = time.perf_counter() - t
        r = score_probe(clt, None, probe, cfg, progress=True, inputs=cache[site])
        res["results"].append({
            "transcoder": label, "identity": r.transcoder, "summary": r.summary(),
            "forward_seconds": round(t_fwd, 1),
            "score_seconds": round(time.perf_counter() - t - t_fwd, 1), "load_avg": la,
            "result": r.to_dict(),
        })  # fmt: skip
        print("\n".join([label, *r.lines()]), file=sys.stderr)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))

    for p in args.paths:
        run(str(Path(p).name), load_transcoder(p, model=model))
    for spec in args.random:
        f, a = spec.split(":")
        clt = calibrated_random_clt(model, int(f), float(a), seed=0)
        run(f"random CLT ({f} features/layer, ~{a} active per layer and token)", clt)
    return 0


def _portable(arg: str) -> str:
    """A command-line argument without this machine's absolute paths."""
    from tracer.fetch import cache_root

    home = str(cache_root())
    if arg.startswith(home):
        return "$CIRCUIT_ATLAS_HOME" + arg[len(home) :]
    return Path(arg).name if arg.startswith("/") else arg


def markdown(res: dict) -> str:
    rows = res["results"]
    cats = list(rows[0]["summary"]["best_auroc"]) if rows else []
    lines = [
        "# Meaning score",
        "",
        res["what"] + ".",
        "",
        f"Probe: {res['probe']['rows']} rows, {res['probe']['positions']:,} positions "
        "(WordNet held-out glosses + Python snippets). Commit "
        f"{res['commit']}; {res['machine']}; {res['date']}.",
        f"Command: `{res['command']}`",
        "",
        "AUROC of the best single feature (its layer):",
        "",
        "| transcoder | mean | " + " | ".join(cats) + " |",
        "|---|---:|" + "---:|" * len(cats),
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['transcoder']} | {s['mean_best_auroc']:.3f} | "
            + " | ".join(f"{s['best_auroc'][c]:.3f} (L{s['best_layer'][c]})" for c in cats)
            + " |"
        )
    lines += [
        "",
        "F1 of the best single feature's firing (activation > 0) as a member detector: low for "
        "dense features that fire on members and much else:",
        "",
        "| transcoder | mean | " + " | ".join(cats) + " |",
        "|---|---:|" + "---:|" * len(cats),
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['transcoder']} | {s.get('mean_best_f1', float('nan')):.3f} | "
            + " | ".join(f"{s.get('best_f1', {}).get(c, float('nan')):.3f}" for c in cats)
            + " |"
        )
    lines += [
        "",
        "| transcoder | median frequency | share > 10% | dead | token-level share | "
        "forward s | scoring s | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['transcoder']} | {s['median_frequency']:.2%} | {s['share_above_10pct']:.1%} | "
            f"{s['dead_share']:.1%} | {s['token_level_share']:.1%} | {r['forward_seconds']} | "
            f"{r['score_seconds']} | {' / '.join(map(str, r['load_avg']))} |"
        )
    lines += [
        "",
        "Median frequency: the median over layers of each layer's median feature frequency; the "
        "other feature columns are means over layers. The forward pass over the probe is shared "
        "by every transcoder with the same input site.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
