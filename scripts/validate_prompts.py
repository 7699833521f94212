"""Validate attribution graphs of real SmolLM2 prompts by perturbation, and tabulate the results.

    .venv/bin/python scripts/validate_prompts.py                       # the default trained CLT
    .venv/bin/python scripts/validate_prompts.py --transcoders PATH    # another transcoder
    .venv/bin/python scripts/validate_prompts.py --random-clt          # random CLT (a control)

For one prompt per category of the shipped prompt set (``--n-prompts``), the full graph is
attributed and :func:`tracer.analyses.validate.validate` ablates a sample of its features (circuit
and
others), in the frozen model (columns must match) and the free model (Spearman correlation of
predicted influence with observed |logit effect|, sign agreement on edges, circuit sufficiency
and necessity). Writes ``benchmarks/validation.json`` and ``benchmarks/validation.md``.

``--random-clt`` uses the random CLT of ``scripts/bench_attribution.py`` (thresholds set for
about 20 active features per layer and token): a baseline for what validation reports when the
transcoder has learned nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def pick_prompts(n: int) -> list:
    """The first prompt of each category of the shipped set, then the next ones, n in all."""
    from tracer.prompts import load_prompts

    seen, first, rest = set(), [], []
    for p in load_prompts():
        (rest if p.category in seen else first).append(p)
        seen.add(p.category)
    return (first + rest)[:n]


def load(args):
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    if args.random_clt:
        from tracer.random_clt import write_random_clt as make_clt  # one recipe for all

        name = f"clt-Lall-F{args.features}-a20-s{args.seed}"  # shared with bench_attribution
        path = make_clt(ROOT / "artifacts" / "bench" / "attribution" / name, None, args.seed,
                        args.features, 20.0)  # fmt: skip
        label = f"random CLT ({args.features} features/layer, ~20 active per layer and token)"
    else:
        from tracer.fetch import cache_root, default_transcoder_path

        trained = [cache_root() / "transcoders" / "smollm2-clt-default",
                   default_transcoder_path("smollm2")]  # fmt: skip
        path = Path(args.transcoders or next((p for p in trained if p.exists()), trained[0]))
        if not path.exists():
            raise SystemExit(
                f"no transcoder at {path}: train the default CLT first, give --transcoders, or "
                "use --random-clt for the random baseline"
            )
        label = str(path)
    model = LanguageModel.load("smollm2")
    clt = load_transcoder(path, model=model)
    return ReplacementModel(model, clt), label


def markdown(rows: list[dict], label: str) -> str:
    def f(x, nd=2):
        return "n/a" if x is None else f"{x:.{nd}f}"

    lines = [
        f"Transcoder: {label}",
        "",
        "| prompt | top token | features | sampled | Spearman | Spearman (linear) | "
        "sign agreement | sufficiency | necessity | constrained rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']!r} | {r['top_token']!r} | {r['n_features']} | {r['n_sampled']} | "
            f"{f(r['spearman'])} | {f(r['spearman_linear'])} | {f(r['sign_agreement'])} | "
            f"{f(r['sufficiency'])} | {f(r['necessity'])} | "
            f"{r['constrained_max_rel_error']:.1e} |"
        )
    vals = [r["spearman"] for r in rows if r["spearman"] is not None]
    if vals:
        lines += ["", f"Mean Spearman over {len(vals)} prompts: {sum(vals) / len(vals):.2f} "
                  "(Anthropic report 0.72 for influence vs ablation effect)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcoders", help="transcoder folder (default: the demo's trained CLT)")
    ap.add_argument("--random-clt", action="store_true", help="random CLT baseline")
    ap.add_argument("--features", type=int, default=256, help="random CLT features per layer")
    ap.add_argument("--n-prompts", type=int, default=6)
    ap.add_argument("--max-feature-nodes", type=int, default=None, help="attribution budget")
    ap.add_argument("--max-circuit", type=int, default=48)
    ap.add_argument("--n-random", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "validation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tracer.analyses.validate import validate
    from tracer.attribution import attribute

    rm, label = load(args)
    rows = []
    for p in pick_prompts(args.n_prompts):
        t0 = time.perf_counter()
        graph = attribute(rm, p.prompt, max_feature_nodes=args.max_feature_nodes, progress=False)
        t1 = time.perf_counter()
        rep = validate(rm, graph, max_circuit=args.max_circuit, n_random=args.n_random,
                       batch_size=args.batch_size, seed=args.seed, progress=False)  # fmt: skip
        t2 = time.perf_counter()
        top = int(graph.feature[graph.kind == 3][0])
        row = {
            "prompt": p.prompt,
            "category": p.category,
            "top_token": rm.model.decode([top]),
            "n_features": graph.count("feature"),
            "attribution_s": round(t1 - t0, 1),
            "validation_s": round(t2 - t1, 1),
            **{k: v for k, v in rep.to_dict().items() if k != "nodes"},
        }
        rows.append(row)
        print(f"{p.prompt!r}: " + "; ".join(rep.lines()), flush=True)
        write(args, label, rows)  # after every prompt: a long run leaves its results so far
    print(markdown(rows, label))


def write(args, label: str, rows: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "what": "validation by perturbation, SmolLM2-135M-Instruct",
        "transcoder": label,
        "machine": f"{platform.machine()}, {args.threads} torch threads",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "prompts": rows,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(rows, label))


if __name__ == "__main__":
    main()
