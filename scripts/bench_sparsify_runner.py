"""One EleutherAI sparsify skip-transcoder training run, timed, for scripts/bench_sparsify.py.

Runs ONLY under the separate sparsify virtual environment (eai-sparsify with its own torch /
transformers / datasets); it imports nothing from circuit-atlas, and circuit-atlas never imports
sparsify. The main benchmark script starts it as a subprocess:

    SPARSIFY_VENV/bin/python scripts/bench_sparsify_runner.py --model-dir M --train T.npy \
        --heldout H.npy --layers 0,1,2 --num-latents 256 --k 32 --batch-seqs 2 --out RUN

Trains sparsify's transcoder with skip connection (``SparseCoderConfig(transcode=True,
skip_connection=True)``, the ``--transcode --skip_connection`` of its command line) on the
hookpoints ``layers.{i}.mlp`` (input: the MLP's input after its norm; target: the MLP's output)
through its Python API (``Trainer(cfg, dataset, model).fit()``), on the training sequences in
the order given (sparsify does not shuffle) with the BOS token excluded (``exclude_tokens``).
The model is cut after the last trained layer (later layers cannot change earlier activations).

Writes the trained run folder ``RUN/`` (one ``layers.{i}.mlp`` folder per hookpoint) and
``RUN.json``: timings, CPU seconds, peak memory, the exact options, and sparsify's own held-out
FVU per layer (its ``SparseCoder.forward`` on its own model run over the held-out sequences,
BOS excluded), which the main script compares with what circuit-atlas computes from the same
weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from proc_stats import cpu_s, peak_rss_mb  # noqa: E402

# Nothing may be downloaded: the model folder and the tokens are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def load_model(model_dir: Path, n_layers: int, device: str):
    """The causal LM in float32, cut after its first ``n_layers`` decoder layers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_layers]
    return model.to(device).eval()


def heldout_fvu(model, run: Path, hookpoints: list[str], tokens, bos: int, batch: int) -> list:
    """sparsify's FVU of each saved transcoder on the held-out tokens (BOS positions excluded),
    pooled over all held-out tokens: sum ||y - y_hat||^2 / sum ||y - mean y||^2."""
    import torch
    from sparsify import SparseCoder

    saes = {h: SparseCoder.load_from_disk(run / h, device=model.device) for h in hookpoints}
    got: dict[str, list] = {h: [[], []] for h in hookpoints}
    modules = {model.base_model.get_submodule(h): h for h in hookpoints}

    def hook(module, inputs, output):
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        got[modules[module]][0].append(x.flatten(0, 1))
        got[modules[module]][1].append(output.flatten(0, 1))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            for b in range(0, len(tokens), batch):
                model(tokens[b : b + batch].to(model.device))
    finally:
        for h in handles:
            h.remove()
    keep = (tokens != bos).flatten().to(model.device)
    out = []
    with torch.no_grad():
        for h in hookpoints:
            x, y = torch.cat(got[h][0])[keep], torch.cat(got[h][1])[keep]
            out.append(float(saes[h](x, y).fvu))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--train", type=Path, required=True, help=".npy of input_ids [S, P]")
    ap.add_argument("--heldout", type=Path, help=".npy of held-out input_ids [H, P]")
    ap.add_argument("--layers", required=True, help="comma-separated model layers")
    ap.add_argument("--num-latents", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--batch-seqs", type=int, required=True, help="sequences per step")
    ap.add_argument("--bos", type=int, required=True, help="token id excluded from training")
    ap.add_argument("--optimizer", default="signum", choices=["signum", "adam", "muon"])
    ap.add_argument("--lr", type=float, help="default: sparsify's own choice for the width")
    ap.add_argument("--auxk-alpha", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, required=True, help="run folder to write")
    args = ap.parse_args()

    import numpy as np
    import torch
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    c0 = cpu_s()
    layers = [int(s) for s in args.layers.split(",")]
    hookpoints = [f"layers.{i}.mlp" for i in layers]
    model = load_model(args.model_dir, max(layers) + 1, args.device)
    train = np.load(args.train)
    ds = Dataset.from_dict({"input_ids": train.tolist()}).with_format("torch")
    sae_cfg = SparseCoderConfig(
        activation="topk",
        num_latents=args.num_latents,
        k=args.k,
        transcode=True,
        skip_connection=True,
    )
    cfg = TrainConfig(
        sae_cfg,
        batch_size=args.batch_seqs,
        optimizer=args.optimizer,
        lr=args.lr,
        auxk_alpha=args.auxk_alpha,
        exclude_tokens=[args.bos],
        hookpoints=hookpoints,
        init_seeds=[args.seed],
        log_to_wandb=False,
        save_every=10**9,  # one save, at the end
        save_dir=str(args.out.parent),
        run_name=args.out.name,
    )
    options = asdict(cfg)
    shutil.rmtree(args.out, ignore_errors=True)
    setup_s = time.perf_counter() - t0
    trainer = Trainer(cfg, ds, model)
    t_fit, c_fit = time.perf_counter(), cpu_s()
    trainer.fit()
    fit_s, fit_cpu_s = time.perf_counter() - t_fit, cpu_s() - c_fit
    steps = trainer.global_step
    tokens = int((torch.as_tensor(train) != args.bos).sum()) if steps else 0
    fvu = None
    if args.heldout is not None:
        held = torch.as_tensor(np.load(args.heldout), dtype=torch.long)
        fvu = heldout_fvu(model, args.out, hookpoints, held, args.bos, args.batch_seqs * 4)
    import importlib.metadata as md

    import transformers

    report = {
        "sparsify_version": md.version("eai-sparsify"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "options": {**options, "sae": asdict(sae_cfg)},
        "hookpoints": hookpoints,
        "learning_rates": sorted({g["lr"] for o in trainer.optimizers for g in o.param_groups}),
        "steps": steps,
        "train_sequences": len(train),
        "train_tokens": tokens,
        "setup_s": round(setup_s, 2),
        "fit_s": round(fit_s, 2),
        "train_tokens_per_s": round(tokens / fit_s, 1) if fit_s > 0 else None,
        "fit_cpu_s": round(fit_cpu_s, 1),
        "cpu_s": round(cpu_s() - c0, 1),  # the whole process: model load and held-out FVU too
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "heldout_fvu_per_layer": fvu,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("steps", "train_tokens", "fit_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
