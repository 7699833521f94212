"""Benchmark one transcoder training step against width: tokens/s, FLOPs per token and the
measured GFLOP/s beside this CPU's arithmetic limit, for dense and row-sparse updates.

    .venv/bin/python scripts/bench_train_speed.py [--widths 256,1024,2048,4096]
        [--kinds clt,plt] [--modes sparse,dense] [--threads 1] [--steps 5] [--max-gb 9]
        [--results benchmarks/train_speed]

Each case builds a randomly initialised SmolLM2-135M-shaped transcoder (30 layers, d 576;
``--kinds``: a cross-layer transcoder, ``clt``, or per-layer skip transcoders, ``plt``; TopK
k=32, skip connection) and times ``--steps`` optimisation steps (after two warm-up steps) of the
trainer's own objective and optimiser (:func:`transcoders.training.objective.objective`,
:func:`transcoders.training.trainer.make_optimizer`) on batches of ``--batch-tokens`` real SmolLM2
MLP
activations (harvested once from the public corpus; ``--data random`` uses Gaussian inputs).
``sparse``: row-sparse gradients and the lazy Adam (the default recipe); ``dense``: dense
gradients and ``torch.optim.Adam`` (the recipe before). A case whose estimated memory exceeds
``--max-gb`` is reported, not run.

FLOPs per token (multiply-adds count 2; B = decoder blocks, L(L+1)/2 for a CLT, L for per-layer
transcoders; k = top-k): encoder forward 2LFd (every feature's pre-activation: the top-k needs
them all), decode 2kdB, decoder gradient 2kdB, value gradient 2kdB, encoder gradient 2kdL
(sparse) or 2LFd (dense), skip forward and gradient 4Ld^2. Adam is counted apart, as bytes: it
reads and writes each updated weight and both moments (7 x 4 bytes per weight).
The arithmetic limit is measured (float32 matrix products at the encoder's shape and a large
square one, same thread count) and stated nominally (cores x clock x 32 float32 FLOPs per cycle
per core for two 256-bit FMA pipes; AVX-512 parts may do 64).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "train_speed"
L, D = 30, 576


def flops_per_token(kind: str, F: int, k: int, sparse: bool) -> dict:
    B = L * (L + 1) // 2 if kind == "clt" else L
    parts = {
        "encoder_forward": 2 * L * F * D,
        "decode": 2 * k * D * B,
        "decoder_grad": 2 * k * D * B,
        "value_grad": 2 * k * D * B,
        "encoder_grad": 2 * k * D * L if sparse else 2 * L * F * D,
        "skip": 4 * L * D * D,
    }
    parts["total"] = sum(parts.values())
    return parts


def n_params(kind: str, F: int) -> dict:
    B = L * (L + 1) // 2 if kind == "clt" else L
    enc = L * F * D + 2 * L * F
    dec = B * F * D
    return {
        "encoder": enc,
        "decoder": dec,
        "skip": L * D * D + L * D,
        "total": enc + dec + L * D * D,
    }


def memory_gb(kind: str, F: int) -> float:
    """Weights, two Adam moments and a gradient (dense or, at worst, every row): 16 bytes per
    weight, plus 1 GB of activations and workspace."""
    return n_params(kind, F)["total"] * 16 / 1e9 + 1.0


def matmul_gflops(threads: int, F: int = 2048, N: int = 256, reps: int = 5) -> dict:
    """float32 matmul GFLOP per CPU second of this process (CPU time, not wall time: the
    machine is shared, and with one thread CPU time is the time the work itself took)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, (m, kk, n) in {
        "encoder_shape": (N, D, F),
        "square_2048": (2048, 2048, 2048),
    }.items():
        a, b = torch.randn(m, kk), torch.randn(kk, n)
        a @ b
        t = time.process_time()
        for _ in range(reps):
            a @ b
        dt = (time.process_time() - t) / reps / threads
        out[name] = round(2 * m * kk * n / dt / 1e9, 1)
    return out


def nominal_gflops() -> dict:
    cores = os.cpu_count() or 1
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    per_cycle = 64 if " avx512f" in flags else 32
    return {
        "cores": cores,
        "mhz": mhz,
        "fp32_flops_per_cycle_per_core": per_cycle,
        "gflops": round(cores * (mhz or 0) * per_cycle / 1e3, 1),
        "gflops_per_core": round((mhz or 0) * per_cycle / 1e3, 1),
    }


def real_activations(n_tokens: int):
    """Raw SmolLM2 MLP inputs and outputs [L, n, d] of the first sequences of the public corpus,
    start tokens dropped (what the trainer trains on)."""
    import torch

    from tracer.cli.train_cmd import load_corpus
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn

    model = LanguageModel.load("smollm2")
    corpus = load_corpus("public", model)
    train_np, _ = corpus.split(48)
    P = train_np.shape[1]
    n_seq = -(-n_tokens // (P - 1))
    tokens = torch.as_tensor(train_np[:n_seq], dtype=torch.long)
    fn = activation_fn(model, "mlp_in")
    xs, ys = [], []
    with torch.no_grad():
        for s in range(0, n_seq, 8):
            x, y = fn(tokens[s : s + 8])
            b = x.shape[1] // P
            keep = (torch.arange(b * P) % P) > 0
            xs.append(x[:, keep].float())
            ys.append(y[:, keep].float())
    return torch.cat(xs, 1)[:, :n_tokens], torch.cat(ys, 1)[:, :n_tokens]


def build(kind: str, F: int, k: int):
    """A randomly initialised TrainableTranscoder built in place (no second copy of the
    decoders): encoders ~ N(0, 1/d), decoders ~ N(0, 0.1^2/F)."""
    import torch

    from transcoders.clt import TranscoderConfig
    from transcoders.training.trainable import TrainableTranscoder

    cfg = TranscoderConfig(
        n_layers=L, d_model=D, n_features=F, kind=kind, activation="topk", topk=k, skip=True
    )
    m = TrainableTranscoder(cfg)
    with torch.no_grad():
        m.W_enc.normal_(0, D**-0.5)
        for w in m.D:
            w.normal_(0, 0.1 / F**0.5)
    return m


def time_case(kind, F, mode, x_all, y_all, args) -> dict:
    import torch

    from transcoders.training.config import TrainConfig
    from transcoders.training.objective import objective
    from transcoders.training.trainer import make_optimizer

    torch.manual_seed(0)
    k, B = args.topk, args.batch_tokens
    cfg = TrainConfig(
        kind=kind, n_features=F, topk=k, skip=True, lr=1e-3, sparse_updates=mode == "sparse"
    )
    model = build(kind, F, k)
    opt = make_optimizer(model, cfg)
    n = x_all.shape[1]
    times, walls, touched = [], [], []
    for s in range(2 + args.steps):
        rows = torch.arange(s * B, (s + 1) * B) % n
        x, y = x_all[:, rows], y_all[:, rows]
        t, w = time.process_time(), time.perf_counter()
        res = objective(model, x, y, cfg, 0.0, None)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        dt, dw = time.process_time() - t, time.perf_counter() - w
        if s >= 2:
            times.append(dt)
            walls.append(dw)
            g = torch.zeros(L, F, dtype=torch.bool)
            with torch.no_grad():
                idx = model.pre_activations(x).topk(k, dim=-1).indices
            g.scatter_(1, idx.reshape(L, -1), True)
            touched.append(float(g.float().sum(1).mean()))
    del model, opt
    gc.collect()
    step_s = sorted(times)[len(times) // 2]
    fl = flops_per_token(kind, F, k, mode == "sparse")
    rows = sum(touched) / len(touched) if mode == "sparse" else F
    B_blocks = L * (L + 1) // 2 if kind == "clt" else L
    adam_weights = rows * D * (L + B_blocks) + L * D * D
    return {
        "kind": kind,
        "features": F,
        "mode": mode,
        "step_seconds_median": round(step_s, 4),  # CPU seconds of this process
        "step_seconds": [round(t, 4) for t in times],
        "step_wall_seconds": [round(t, 4) for t in walls],
        "tokens_per_s": round(B / step_s, 1),
        "flops_per_token": fl,
        "gflops_per_s": round(fl["total"] * B / step_s / 1e9, 2),
        "features_touched_per_layer": round(rows, 1),
        "adam_gb_per_step": round(adam_weights * 28 / 1e9, 3),
        "params": n_params(kind, F),
        "memory_gb_estimate": round(memory_gb(kind, F), 2),
        "load_average": os.getloadavg(),
    }


def markdown(r: dict) -> str:
    lim = r["arithmetic_limit"]
    lines = [
        "## Transcoder training step against width (SmolLM2-135M shape: 30 layers, d 576)",
        "",
        f"`{r['command']}`",
        "",
        f"- commit {r['commit']}, {r['date']}; machine: {r['machine']['cpus']} CPUs "
        f"({r['machine']['cpu']}), {r['threads']} torch thread(s), shared with other work "
        f"(load average {r['load_average_start'][0]:.1f} at start, per row below)",
        f"- TopK k={r['topk']}, skip connection, batch {r['batch_tokens']} tokens of "
        f"{r['data']} activations; median of {r['steps']} timed steps after 2 warm-up steps, "
        "timed in CPU seconds of the process (the machine is shared: wall times in the json); "
        "random initial weights (no dead features yet, so no AuxK term)",
        f"- arithmetic limit at {r['threads']} thread(s): float32 matmul measured "
        f"{lim['measured']['encoder_shape']} GFLOP/s at the encoder's shape "
        f"(256 x 576 x 2048), {lim['measured']['square_2048']} GFLOP/s at 2048^3; nominal "
        f"{lim['nominal']['gflops_per_core']} GFLOP/s per core "
        f"({lim['nominal']['mhz']:.0f} MHz x {lim['nominal']['fp32_flops_per_cycle_per_core']} "
        "FLOPs/cycle)",
        "",
        "| kind | features/layer | update | step (CPU s) | tokens/CPU s | GFLOP/token | GFLOP/s "
        "| share of measured matmul rate | features touched/layer | Adam GB/step | memory GB "
        "| load |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peak = lim["measured"]["encoder_shape"]
    for c in r["cases"]:
        name = "CLT" if c["kind"] == "clt" else "per-layer skip"
        if "skipped" in c:
            lines.append(
                f"| {name} | {c['features']} | {c['mode']} | not run: {c['skipped']} |||||||||"
            )
            continue
        lines.append(
            f"| {name} | {c['features']} | {c['mode']} | {c['step_seconds_median']:.3f} "
            f"| {c['tokens_per_s']:.0f} | {c['flops_per_token']['total'] / 1e9:.4f} "
            f"| {c['gflops_per_s']:.1f} | {c['gflops_per_s'] / peak:.0%} "
            f"| {c['features_touched_per_layer']:.0f} | {c['adam_gb_per_step']:.2f} "
            f"| {c['memory_gb_estimate']:.1f} | {c['load_average'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="256,1024,2048,4096")
    ap.add_argument("--kinds", default="clt,plt")
    ap.add_argument("--modes", default="sparse,dense")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--max-gb", type=float, default=9.0)
    ap.add_argument("--data", choices=["model", "random"], default="model")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    n_tok = args.batch_tokens * 4
    if args.data == "model":
        x_all, y_all = real_activations(n_tok)
        # The trainer's normalisation: E||x||^2 = d per layer.
        x_all = x_all * (D / x_all.pow(2).sum(-1).mean(-1)).sqrt()[:, None, None]
        y_all = y_all * (D / y_all.pow(2).sum(-1).mean(-1)).sqrt()[:, None, None]
    else:
        torch.manual_seed(0)
        x_all, y_all = torch.randn(L, n_tok, D), torch.randn(L, n_tok, D)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "command": "scripts/bench_train_speed.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "threads": args.threads,
        "steps": args.steps,
        "batch_tokens": args.batch_tokens,
        "topk": args.topk,
        "data": "SmolLM2 (public corpus)" if args.data == "model" else "Gaussian",
        "load_average_start": load0,
        "arithmetic_limit": {
            "measured": matmul_gflops(args.threads),
            "nominal": nominal_gflops(),
        },
        "cases": [],
    }
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds.split(","):
        for F in [int(w) for w in args.widths.split(",")]:
            for mode in args.modes.split(","):
                est = memory_gb(kind, F)
                if est > args.max_gb:
                    report["cases"].append({
                        "kind": kind, "features": F, "mode": mode,
                        "memory_gb_estimate": round(est, 2),
                        "skipped": f"needs about {est:.1f} GB (limit --max-gb {args.max_gb:g})",
                    })  # fmt: skip
                else:
                    case = time_case(kind, F, mode, x_all, y_all, args)
                    report["cases"].append(case)
                    print(
                        f"{kind} F={F} {mode}: {case['step_seconds_median']:.3f} s/step, "
                        f"{case['tokens_per_s']:.0f} tok/s, {case['gflops_per_s']:.1f} GFLOP/s",
                        file=sys.stderr,
                    )
                res.with_suffix(".json").write_text(json.dumps(report, indent=2))
                res.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
