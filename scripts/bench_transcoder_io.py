"""Benchmark transcoder weight I/O: save, lazy vs eager load, and a sparse decode that reads only
the decoder rows of active features, on a random CLT of SmolLM2-135M's shape.

    .venv/bin/python scripts/bench_transcoder_io.py [--features 1024] [--threads 1] [--out FILE]

Writes a JSON file of timings (seconds), sizes (bytes) and resident-memory growth (bytes,
from /proc/self/statm), and prints a summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from transcoders import CrossLayerTranscoder, TranscoderConfig, load_transcoder, save_transcoder


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, *args, **kwargs):
    gc.collect()
    r0, t0 = rss(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, rss() - r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--active", type=int, default=256, help="active features to decode")
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--out", default="artifacts/bench/transcoder_io.json")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, d, F = args.layers, args.d_model, args.features
    cfg = TranscoderConfig(n_layers=L, d_model=d, n_features=F, model_name="random")
    clt = CrossLayerTranscoder(cfg)
    clt.requires_grad_(False)
    res: dict = {
        "n_layers": L,
        "d_model": d,
        "n_features": F,
        "torch_threads": torch.get_num_threads(),
    }

    out_file = Path(args.out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp:
        path = Path(tmp) / "clt"
        _, res["save_s"], _ = timed(save_transcoder, clt, path)
        res["disk_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        res["decoder_bytes"] = sum(f.stat().st_size for f in path.glob("W_dec_*"))
        layers = torch.randint(0, L, (args.active,))
        pos = torch.randint(0, args.positions, (args.active,))
        feats = torch.randint(0, F, (args.active,))
        vals = torch.rand(args.active)
        expected = clt.decode_sparse(layers, pos, feats, vals, args.positions)
        del clt
        gc.collect()

        lazy, res["lazy_load_s"], res["lazy_load_rss"] = timed(load_transcoder, path)
        out, res["lazy_sparse_decode_s"], res["lazy_sparse_decode_rss"] = timed(
            lazy.decode_sparse, layers, pos, feats, vals, args.positions
        )
        assert torch.equal(out, expected)
        # Again, with the rows now in the OS page cache: the cost without disk reads.
        _, res["lazy_sparse_decode_warm_s"], _ = timed(
            lazy.decode_sparse, layers, pos, feats, vals, args.positions
        )
        res["decoders_in_memory_after_sparse_decode"] = sum(
            lazy.decoder_loaded(i) for i in range(L)
        )
        del lazy, out
        gc.collect()
        eager, res["eager_load_s"], res["eager_load_rss"] = timed(load_transcoder, path, lazy=False)
        out, res["eager_sparse_decode_s"], _ = timed(
            eager.decode_sparse, layers, pos, feats, vals, args.positions
        )
        assert torch.equal(out, expected)
        del eager
        gc.collect()
        _, res["save_bf16_s"], _ = timed(
            save_transcoder, load_transcoder(path), Path(tmp) / "bf16", dtype="bfloat16"
        )
        res["disk_bytes_bf16"] = sum(f.stat().st_size for f in (Path(tmp) / "bf16").iterdir())

    out_file.write_text(json.dumps(res, indent=2))
    mib = 2**20
    print(f"CLT {L} layers x {F} features, d_model {d}: {res['disk_bytes'] / mib:.0f} MiB on disk "
          f"({res['decoder_bytes'] / mib:.0f} MiB decoders; bf16 "
          f"{res['disk_bytes_bf16'] / mib:.0f} MiB)")  # fmt: skip
    print(f"save {res['save_s']:.2f} s; save as bf16 (lazy source) {res['save_bf16_s']:.2f} s")
    print(f"lazy load  {res['lazy_load_s']:.2f} s, {res['lazy_load_rss'] / mib:+.0f} MiB resident")
    print(
        f"eager load {res['eager_load_s']:.2f} s, {res['eager_load_rss'] / mib:+.0f} MiB resident"
    )
    print(f"sparse decode of {args.active} features: lazy (rows only) "
          f"{res['lazy_sparse_decode_s'] * 1e3:.0f} ms (again: "
        f"{res['lazy_sparse_decode_warm_s'] * 1e3:.0f} ms), "
        f"{res['lazy_sparse_decode_rss'] / mib:+.0f} "
          f"MiB, {res['decoders_in_memory_after_sparse_decode']} decoders kept; eager "
          f"{res['eager_sparse_decode_s'] * 1e3:.0f} ms")  # fmt: skip
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
