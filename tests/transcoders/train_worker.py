"""A tiny, deterministic training run used by the resume-after-kill and data-parallel tests.

    python train_worker.py OUT_DIR [--sleep S] [--harvest-sleep S] [--shards N] [--cache DIR]

Trains a CLT on a tiny random Llama (tests/conftest.py) and saves the exported weights to
OUT_DIR/final.pt. ``--sleep`` waits after each step and ``--harvest-sleep`` after each forward
pass of the harvest (so a test can kill it there). Its activation cache is OUT_DIR/activations
unless ``--cache`` names one. Under torchrun (WORLD_SIZE > 1) it joins a gloo process group
first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest

STEPS = 24


def config(shards: int | None = None):
    from transcoders.training.run import TrainConfig

    return TrainConfig(
        n_features=24,
        activation="topk",
        topk=4,
        steps=STEPS,
        batch_tokens=60,
        buffer_tokens=240,
        passes=2,
        eval_every=12,
        log_every=3,
        checkpoint_every=3,
        n_heldout_seqs=2,
        harvest_batch=4,
        chunk_sequences=4,
        data_shards=shards,
        dead_window_tokens=300,
        auxk=8,
    )


def tokens():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(3, 101, (40, 16), generator=g)
    t[:, 0] = 1
    return t[:38], t[38:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--harvest-sleep", type=float, default=0.0)
    ap.add_argument("--shards", type=int)
    ap.add_argument("--cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    from model_fixtures import make_tiny_model

    from tracer.spliced_metrics import activation_fn
    from transcoders.training.run import train

    model = make_tiny_model("llama", n_layers=3)
    train_t, held_t = tokens()
    acts = activation_fn(model)

    def slow_acts(t):
        time.sleep(args.harvest_sleep)
        return acts(t)

    res = train(
        config(args.shards),
        activations=slow_acts if args.harvest_sleep else acts,
        cache=args.cache,
        train_tokens=train_t,
        heldout_tokens=held_t,
        n_layers=3,
        d_model=32,
        out_dir=args.out,
        progress=False,
        plot=False,
        on_step=(lambda s: time.sleep(args.sleep)) if args.sleep else None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(res.clt.state_dict(), Path(args.out) / "final.pt")


if __name__ == "__main__":
    main()
