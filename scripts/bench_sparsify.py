"""Side by side with EleutherAI sparsify: skip transcoders of SmolLM2's MLPs trained by sparsify
and by circuit-atlas on the same tokens, with the same width and k, scored on the same held-out
tokens with the same NMSE.

    .venv/bin/python scripts/bench_sparsify.py --setup          # build artifacts/sparsify-venv
    nice -n 10 .venv/bin/python scripts/bench_sparsify.py --layers 0,1,2,3 --tokens 16256
    .venv/bin/python scripts/bench_sparsify.py --layers all --tokens 1000000 --device cuda

sparsify (PyPI ``eai-sparsify``) lives in its own virtual environment (``--venv``, default
``artifacts/sparsify-venv``: CPU torch 2.13.0 first, then eai-sparsify with its own
dependencies); circuit-atlas never imports it. ``scripts/bench_sparsify_runner.py`` trains it
there through its Python API: ``SparseCoderConfig(activation="topk", num_latents=F, k=k,
transcode=True, skip_connection=True)`` (the ``--transcode --skip_connection`` of its command
line) on the hookpoints ``layers.{i}.mlp``, its ``TrainConfig`` defaults otherwise (signum
optimiser with its width-scaled learning rate, no AuxK) except the batch (``--sparsify-batch-
seqs``, default: ours), the BOS token excluded (``exclude_tokens``) and no wandb.

Ours: ``transcoders.training.run`` with the per-layer recipe of
``transcoders.training.recipes.DEFAULT_RECIPE``
(kind ``plt``, skip, TopK) at the same width and k, for ``steps x batch_tokens`` = the same
tokens. The same tokens, exactly: ``--tokens`` is rounded up to whole training rounds (our
trainer harvests ``buffer_tokens`` worth of consecutive sequences per round and draws
``passes`` shuffled passes over them); sparsify gets those sequences, in order, once. With the
defaults (batch 254 tokens = 2 sequences of 127 non-BOS tokens, buffer 8,128 tokens, 1 pass)
both see every non-BOS token of the same sequences exactly once, in batches of the same size.
The sequences are the first of the corpus's training split and the held-out sequences are the
ones ``circuit-atlas transcoders train`` evaluates on (``tracer.cli.train_cmd.split_tokens``).

Only the chosen layers are trained (``--layers``: ``all`` or a list); the model is cut after the
last of them in both, since later layers cannot change earlier activations. Both results are
loaded through ``transcoders.load_transcoder`` (sparsify's by ``transcoders.formats.sparsify``) and
scored by the same code: NMSE per layer (``transcoders.metrics.nmse_per_layer``) over the
held-out positions without BOS (and over all positions), L0, features that never fire on the
held-out tokens. sparsify's own FVU of its weights on the held-out tokens (computed in its
environment by its own forward pass) is reported beside ours as a check of the loader.

Writes ``benchmarks/sparsify.json`` and ``.md`` (``--results``); work files (tokens, both
runs) under ``artifacts/bench/sparsify/`` (``--work``). ``--ours PATH`` / ``--sparsify-run
PATH`` score transcoders trained before instead of training them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from proc_stats import cpu_s  # noqa: E402

SPARSIFY_VERSION = "1.3.3"
TORCH_VERSION = "2.13.0"  # the CPU build on this machine's disk; a looser pin pulls CUDA builds
RUNNER = ROOT / "scripts" / "bench_sparsify_runner.py"
LOG = "log.jsonl"  # our trainer's log (transcoders.training.run.LOG)


# --- the sparsify environment -------------------------------------------------------------------


def setup_venv(venv: Path) -> None:
    """Create the separate sparsify environment: torch first (so that eai-sparsify's unpinned
    torch requirement is already met), then eai-sparsify and its other dependencies, with the
    transformers version circuit-atlas runs (the same model code on both sides)."""
    import transformers

    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(
        [
            *pip,
            f"eai-sparsify=={SPARSIFY_VERSION}",
            f"transformers=={transformers.__version__}",
            f"torch=={TORCH_VERSION}",
        ],
        check=True,
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sparsify, torch; print(torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    version = out.stdout.strip().splitlines()[-1]  # sparsify's import prints a line of its own
    print(f"sparsify environment ready at {venv} (torch {version})")


# --- the token plan -------------------------------------------------------------------------------


@dataclass
class TokenPlan:
    """Which training sequences both trainers see. Token counts exclude BOS (position 0)."""

    seq_len: int
    seqs_per_round: int  # what our trainer harvests per round (one data shard)
    steps_per_round: int
    rounds: int
    batch_tokens: int
    passes: int

    @property
    def n_seqs(self) -> int:
        return self.rounds * self.seqs_per_round

    @property
    def tokens(self) -> int:
        """Distinct training tokens (both trainers)."""
        return self.n_seqs * (self.seq_len - 1)

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def our_presentations(self) -> int:
        """Tokens our optimiser sees: steps x batch (passes x tokens when exact)."""
        return self.steps * self.batch_tokens

    @property
    def exact(self) -> bool:
        return self.our_presentations == self.passes * self.tokens


def plan_tokens(
    tokens: int, seq_len: int, buffer_tokens: int, batch_tokens: int, passes: int
) -> TokenPlan:
    """Round ``tokens`` up to whole rounds of our trainer (``transcoders.training.run``: a round is
    ceil(buffer_tokens / (seq_len - 1)) consecutive sequences, used ``passes`` times)."""
    keep = seq_len - 1
    per_round = math.ceil(buffer_tokens / keep)
    steps_per_round = passes * per_round * keep // batch_tokens
    if steps_per_round < 1:
        raise SystemExit(f"batch of {batch_tokens} tokens is larger than a round's buffer")
    rounds = max(1, math.ceil(tokens / (per_round * keep)))
    return TokenPlan(seq_len, per_round, steps_per_round, rounds, batch_tokens, passes)


# --- training -------------------------------------------------------------------------------------


def layer_list(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    layers = sorted({int(s) for s in spec.split(",")})
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise SystemExit(f"--layers {spec}: the model has layers 0..{n_layers - 1}")
    return layers


def selected_activations(model, layers: list[int]):
    """``activations(tokens)`` of the chosen layers only (MLP input after its norm, MLP output),
    from the model cut after the last of them."""
    from tracer.model import truncate_layers
    from tracer.spliced_metrics import mlp_activations

    cut = truncate_layers(model, layers[-1] + 1) if layers[-1] + 1 < model.facts.n_layers else model
    sel = list(layers)

    def fn(tokens):
        x, y = mlp_activations(cut, tokens, "mlp_in")
        return x[sel], y[sel]

    return fn


def run_sparsify(args, model_dir: Path, plan: TokenPlan, layers, work: Path, bos: int) -> dict:
    py = args.venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no sparsify environment at {args.venv}: run with --setup first")
    run = work / "sparsify-run"
    cmd = [
        str(py), str(RUNNER), "--model-dir", str(model_dir),
        "--train", str(work / "train.npy"), "--heldout", str(work / "heldout.npy"),
        "--layers", ",".join(map(str, layers)), "--num-latents", str(args.features),
        "--k", str(args.topk), "--batch-seqs", str(args.sparsify_batch_seqs),
        "--bos", str(bos), "--optimizer", args.sparsify_optimizer,
        "--device", args.device, "--threads", str(args.threads), "--out", str(run),
    ]  # fmt: skip
    if args.sparsify_lr is not None:
        cmd += ["--lr", str(args.sparsify_lr)]
    print("sparsify:", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    with open(work / "sparsify.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (work / "sparsify.log").read_text().splitlines()[-15:]
        raise SystemExit(f"sparsify failed (exit {proc.returncode}):\n" + "\n".join(tail))
    rep = json.loads(run.with_suffix(".json").read_text())
    rep["process_wall_s"] = round(wall, 1)
    rep["run"] = str(run)
    return rep


def run_ours(args, model, plan: TokenPlan, layers, train_tokens, heldout, work: Path) -> dict:
    import torch

    from transcoders.training.recipes import DEFAULT_RECIPE as R
    from transcoders.training.run import TrainConfig, train

    cfg = TrainConfig(
        kind="plt",
        n_features=args.features,
        activation="topk",
        topk=args.topk,
        skip=True,
        steps=plan.steps,
        batch_tokens=args.batch_tokens,
        lr=R["lr"],
        buffer_tokens=args.buffer_tokens,
        passes=args.passes,
        dead_window_tokens=R["dead_window_tokens"],
        eval_every=R["eval_every"],
        n_heldout_seqs=len(heldout),
        seed=args.seed,
    )
    t0, c0 = time.perf_counter(), cpu_s()
    result = train(
        cfg,
        activations=selected_activations(model, layers),
        train_tokens=train_tokens[: plan.n_seqs],
        heldout_tokens=heldout,
        n_layers=len(layers),
        d_model=model.facts.d_model,
        out_dir=work / "ours",
        model_name=model.facts.name,
        resume=False,
        progress=True,
        plot=False,
        device=args.device,
    )
    wall = time.perf_counter() - t0
    m = result.metrics
    return {
        **eval_curve(work / "ours" / LOG),
        "recipe": asdict(cfg),
        "steps": result.steps,
        "train_tokens": plan.tokens,
        "token_presentations": result.steps * cfg.batch_tokens,
        "wall_s": round(wall, 1),
        "train_tokens_per_s": round(plan.tokens / wall, 1),
        "harvest_tokens_per_s": m.get("harvest_tokens_per_s"),
        "optimizer_tokens_per_s": m.get("train_tokens_per_s"),
        "cpu_s": round(cpu_s() - c0, 1),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "weights": str(work / "ours" / "transcoder"),
    }


def eval_curve(log: Path) -> dict:
    """Our trainer's held-out evaluations (same held-out tokens, BOS excluded): step 0 is the
    ridge-regression skip fit alone, before any feature is trained."""
    from transcoders.training.run import read_log

    evals = [r for r in read_log(log) if r.get("event") == "eval"]
    if not evals:
        return {}
    return {
        "start_nmse": evals[0]["nmse"],
        "start_nmse_per_layer": evals[0]["nmse_per_layer"],
        "eval_curve": [[r["step"], r["nmse"]] for r in evals],
    }


# --- evaluation -----------------------------------------------------------------------------------


def heldout_activations(model, layers, heldout, batch: int = 8):
    """Held-out MLP inputs/outputs of the chosen layers, every position (a
    :class:`transcoders.evaluation.Heldout`)."""
    from transcoders.evaluation import Heldout

    return Heldout.harvest(selected_activations(model, layers), heldout, batch=batch)


def score(tc, held) -> dict:
    """NMSE per layer (without the start token, over all positions, without outliers), L0 and
    the held-out dead fraction: ``transcoders.evaluation.evaluate_transcoder``, the library's one
    evaluator of exported transcoders."""
    from transcoders.evaluation import evaluate_transcoder
    from transcoders.metrics import summarize

    ev = evaluate_transcoder(tc, held)
    return summarize(
        {
            "nmse": ev["nmse"],
            "nmse_all_positions": ev["nmse_all"],
            "nmse_inliers": ev["nmse_inliers"],
            "l0": ev["l0"],
            "dead_heldout": (~ev["fired"]).float().mean(-1),
        }
    )


# --- the report -----------------------------------------------------------------------------------


def taken(path: Path) -> dict:
    """The report entry of a transcoder trained before (nothing measured here)."""
    nan = float("nan")
    return {"taken": str(path), "device": "-", "threads": "-", "steps": "-", "train_tokens": 0,
            "token_presentations": 0, "wall_s": nan, "fit_s": nan, "process_wall_s": nan,
            "train_tokens_per_s": None, "cpu_s": nan}  # fmt: skip


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def markdown(r: dict) -> str:
    s, o, p = r["sparsify"], r["ours"], r["plan"]
    rec = o.get("recipe") or {}
    their_cpu = f"{s['fit_cpu_s']:.0f}" if "fit_cpu_s" in s else f"{s['cpu_s']:.0f} (whole process)"
    so, sc = s.get("options", {}), s.get("options", {}).get("sae", {})
    mine, theirs = r["scores"]["ours"], r["scores"]["sparsify"]
    lines = [
        "## Skip transcoders: circuit-atlas vs EleutherAI sparsify at equal tokens",
        "",
        f"`{r['command']}`",
        "",
        f"- model {r['model']}, layers {r['layers_label']}; width {r['features']} features "
        f"per layer, TopK k={r['topk']}, skip connection, MLP input (after its norm) -> MLP "
        "output",
        f"- training tokens: {p['tokens']:,} (non-BOS tokens of {p['n_seqs']} corpus sequences "
        f"of {p['seq_len']}), the same sequences for both; held-out: {r['heldout_seqs']} "
        f"sequences ({r['heldout_tokens']:,} non-BOS tokens), the training command's held-out "
        "split",
        f"- machine: {r['machine']['cpu']} ({r['machine']['cpus']} CPUs"
        + (f", GPU {r['machine']['gpu']}" if r["machine"]["gpu"] else "")
        + f"), load average {r['load_average_start'][0]:.1f} at the start, "
        f"{r['load_average_end'][0]:.1f} at the end; run under `nice` "
        f"{r['niceness']}",
        "",
        "| | circuit-atlas | sparsify |",
        "|---|---|---|",
        f"| where | {o['device']}, {o['threads']} threads | {s['device']}, {s['threads']} "
        f"threads (own venv: eai-sparsify {s.get('sparsify_version')}, torch {s.get('torch')}) |",
        f"| options | plt + skip (lstsq init), Adam lr {rec.get('lr')}, batch "
        f"{rec.get('batch_tokens')} tokens, buffer {rec.get('buffer_tokens')} x "
        f"{rec.get('passes')} pass(es), AuxK | transcode + skip_connection, "
        f"{so.get('optimizer')} lr {', '.join(f'{v:.3g}' for v in s.get('learning_rates', []))}"
        f", batch {so.get('batch_size')} sequences, auxk_alpha {so.get('auxk_alpha')}, "
        f"exclude_tokens {so.get('exclude_tokens')}, k {sc.get('k')}, num_latents "
        f"{sc.get('num_latents')} |",
        f"| steps | {o['steps']} | {s['steps']} |",
        f"| tokens trained on | {o['train_tokens']:,} ({o['token_presentations']:,} "
        f"presentations) | {s['train_tokens']:,} |",
        f"| wall time (training) | {o['wall_s']:.1f} s | {s['fit_s']:.1f} s (process "
        f"{s['process_wall_s']:.1f} s) |",
        f"| tokens/s | {o['train_tokens_per_s'] or 0:.0f} | {s['train_tokens_per_s'] or 0:.0f} |",
        f"| CPU seconds (training) | {o['cpu_s']:.0f} | {their_cpu} |",
        f"| held-out NMSE, mean over layers (no BOS) | **{mine['nmse']:.3f}** | "
        f"**{theirs['nmse']:.3f}** |",
        f"| held-out NMSE, all positions | {mine['nmse_all_positions']:.3f} | "
        f"{theirs['nmse_all_positions']:.3f} |",
        f"| held-out NMSE before training (ours: the ridge skip fit alone) | "
        f"{o.get('start_nmse', float('nan')):.3f} | about 1 (decoder and skip start at zero, "
        "b_dec at the mean) |",
        f"| L0 | {mine['l0']:.1f} | {theirs['l0']:.1f} |",
        f"| never fire on held-out | {mine['dead_heldout']:.1%} | {theirs['dead_heldout']:.1%} |",
        "",
    ]
    chk = r.get("loader_check")
    if chk:
        lines += [
            f"Loader check: sparsify's own held-out FVU of its weights vs the NMSE circuit-atlas "
            f"computes after loading them: largest difference {chk['max_abs_diff']:.2e} over "
            f"{len(r['layers'])} layers.",
            "",
        ]
    lines += [
        "| layer | NMSE ours | NMSE sparsify | ours at step 0 | all-pos ours | all-pos sparsify | "
        "L0 ours | L0 sparsify |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    start = o.get("start_nmse_per_layer") or [float("nan")] * len(r["layers"])
    for i, layer in enumerate(r["layers"]):
        lines.append(
            f"| {layer} | {mine['nmse_per_layer'][i]:.3f} | {theirs['nmse_per_layer'][i]:.3f} | "
            f"{start[i]:.3f} | "
            f"{mine['nmse_all_positions_per_layer'][i]:.3f} | "
            f"{theirs['nmse_all_positions_per_layer'][i]:.3f} | {mine['l0_per_layer'][i]:.1f} | "
            f"{theirs['l0_per_layer'][i]:.1f} |"
        )
    return "\n".join(lines) + "\n"


# --- driver ---------------------------------------------------------------------------------------


def main() -> int:
    from transcoders.training.recipes import DEFAULT_RECIPE as R

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="build the sparsify venv and stop")
    ap.add_argument("--venv", type=Path, default=ROOT / "artifacts" / "sparsify-venv")
    ap.add_argument("--layers", default="all", help="'all' or comma-separated model layers")
    ap.add_argument("--tokens", type=int, default=16_256, help="training tokens (rounded up)")
    ap.add_argument("--features", type=int, default=R["features_per_layer"])
    ap.add_argument("--topk", type=int, default=R["topk"])
    ap.add_argument("--batch-tokens", type=int, default=254, help="ours: tokens per step")
    ap.add_argument("--buffer-tokens", type=int, default=8128, help="ours: tokens per round")
    ap.add_argument("--passes", type=int, default=1, help="ours: uses of each token")
    ap.add_argument("--sparsify-batch-seqs", type=int, help="default: ours, in sequences")
    ap.add_argument("--sparsify-optimizer", default="signum", choices=["signum", "adam", "muon"])
    ap.add_argument("--sparsify-lr", type=float, help="default: sparsify's own for the width")
    ap.add_argument("--heldout-seqs", type=int, default=32)
    ap.add_argument("--context-seqs", type=int, default=16, help="as the training command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, help="torch threads, both sides (default: as `transcoders train`)"
    )
    ap.add_argument("--ours", type=Path, help="score this trained transcoder instead")
    ap.add_argument("--sparsify-run", type=Path, help="score this sparsify run folder instead")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "sparsify")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "sparsify")
    args = ap.parse_args()
    if args.setup:
        setup_venv(args.venv)
        return 0

    import numpy as np
    import torch

    from tracer.cli.train_cmd import default_threads, load_corpus, split_tokens
    from tracer.fetch import fetch_smollm2
    from tracer.model import LanguageModel
    from transcoders import load_transcoder

    load0 = os.getloadavg()
    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    model_dir = fetch_smollm2(verbose=False)
    model = LanguageModel.load("smollm2", device=args.device)
    layers = layer_list(args.layers, model.facts.n_layers)
    train_tokens, heldout, _ = split_tokens(load_corpus("public", model), args)
    P = train_tokens.shape[1]
    plan = plan_tokens(args.tokens, P, args.buffer_tokens, args.batch_tokens, args.passes)
    if args.sparsify_batch_seqs is None:
        if args.batch_tokens % (P - 1):
            raise SystemExit(
                f"--batch-tokens {args.batch_tokens} is not whole sequences of {P - 1} "
                "tokens: give --sparsify-batch-seqs"
            )
        args.sparsify_batch_seqs = args.batch_tokens // (P - 1)
    if plan.n_seqs > len(train_tokens):
        raise SystemExit(f"{plan.tokens} tokens need {plan.n_seqs} sequences; the corpus has "
                         f"{len(train_tokens)} for training")  # fmt: skip
    tag = f"L{args.layers.replace(',', '-')}-F{args.features}-k{args.topk}-T{plan.tokens}"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "train.npy", train_tokens[: plan.n_seqs].numpy())
    np.save(work / "heldout.npy", heldout.numpy())
    print(f"plan: {asdict(plan)}; {plan.tokens} tokens, {plan.steps} steps", file=sys.stderr)
    if not plan.exact:
        print(f"note: ours sees {plan.our_presentations} token presentations, not "
              f"{plan.passes} x {plan.tokens}", file=sys.stderr)  # fmt: skip

    if args.sparsify_run:
        sp = {**taken(args.sparsify_run), "run": str(args.sparsify_run)}
    else:
        sp = run_sparsify(args, model_dir, plan, layers, work, model.bos_id)
    if args.ours:
        ours = {**taken(args.ours), "weights": str(args.ours), "recipe": {}}
    else:
        ours = run_ours(args, model, plan, layers, train_tokens, heldout, work)

    held = heldout_activations(model, layers, heldout)
    tcs = {
        "ours": load_transcoder(ours["weights"], device=args.device),
        "sparsify": load_transcoder(sp["run"], format="sparsify", device=args.device),
    }
    # Ours is compact (its layer j is model layer layers[j]); sparsify's names its layers.
    if tcs["ours"].cfg.n_layers != len(layers):
        raise SystemExit(f"{ours['weights']} has {tcs['ours'].cfg.n_layers} layers, not "
                         f"{len(layers)}")  # fmt: skip
    got = tcs["sparsify"].cfg.model_layers or list(range(tcs["sparsify"].cfg.n_layers))
    if got != layers:
        raise SystemExit(f"{sp['run']} covers model layers {got}, not {layers}")
    scores = {name: score(tc, held) for name, tc in tcs.items()}
    report = {
        "command": "python scripts/bench_sparsify.py " + " ".join(sys.argv[1:]),
        "model": model.facts.name,
        "layers": layers,
        "layers_label": "all" if len(layers) == model.facts.n_layers else str(layers),
        "features": args.features,
        "topk": args.topk,
        "plan": {
            **asdict(plan),
            "n_seqs": plan.n_seqs,
            "tokens": plan.tokens,
            "steps": plan.steps,
            "exact": plan.exact,
        },  # fmt: skip
        "heldout_seqs": len(heldout),
        "heldout_tokens": int((held.positions > 0).sum()),
        "machine": machine(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "niceness": os.nice(0),
        "ours": ours,
        "sparsify": sp,
        "scores": scores,
    }
    own = sp.get("heldout_fvu_per_layer")
    if own:
        diff = [abs(a - b) for a, b in zip(own, scores["sparsify"]["nmse_per_layer"], strict=True)]
        report["loader_check"] = {"sparsify_own_fvu_per_layer": own, "max_abs_diff": max(diff)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    args.results.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
