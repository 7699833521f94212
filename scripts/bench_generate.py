"""Generation throughput of the sampling loop (transcoders.corpora.generate.sample_batch, KV cache,
batched) against a plain Hugging Face ``generate`` call, on SmolLM2 on this machine's CPU.

    nice -n 10 .venv/bin/python scripts/bench_generate.py [--batches 1,8,32] [--max-new 128]

Writes benchmarks/generate.json and benchmarks/generate.md (commit, command, machine, load
average beside each number: the CPU is shared).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes to time")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hf-baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "generate"))
    args = ap.parse_args(argv)

    from tracer.model import LanguageModel
    from transcoders.corpora.generate import OPENINGS, sample_batch

    torch.set_num_threads(args.threads)
    model = LanguageModel.load(args.model)
    tok = model.tokenizer
    prompts = [[model.bos_id, *tok(o, add_special_tokens=False)["input_ids"]] for o in OPENINGS]
    eos = {int(tok.eos_token_id)}
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    res = {
        "what": "tokens/s of sampling continuations of the topic openings (temperature 0.8, "
        "top-p 0.95); generated tokens only (prompts not counted); model in float32",
        "commit": commit,
        "command": "python scripts/bench_generate.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model.facts.name,
        "max_new": args.max_new,
        "rows": rows,
    }
    out = Path(args.out)

    def write():
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(markdown(res))

    if args.hf_baseline:
        # Baseline: Hugging Face generate, one prompt at a time (what a plain loop does).
        gen = torch.Generator().manual_seed(0)
        n, t0, la = 0, time.perf_counter(), load_avg()
        for p in prompts[:2]:
            torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
            with torch.no_grad():
                o = model.hf.generate(
                    torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                    do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new,
                    pad_token_id=tok.eos_token_id,
                )  # fmt: skip
            n += o.shape[1] - len(p)
        dt = time.perf_counter() - t0
        rows.append({"method": "HF generate, batch 1", "batch": 1, "tokens": n,
                     "seconds": round(dt, 2), "tokens_per_s": round(n / dt, 1),
                     "load_avg": la})  # fmt: skip
        print(rows[-1], file=sys.stderr)
        write()
    for b in [int(x) for x in args.batches.split(",")]:
        gen = torch.Generator().manual_seed(b)
        batch = [prompts[i % len(prompts)] for i in range(b)]
        la = load_avg()
        t0 = time.perf_counter()
        conts = sample_batch(model.hf, batch, max_new=args.max_new, temperature=0.8, top_p=0.95,
                             gen=gen, eos_ids=eos, pad_id=int(tok.eos_token_id))  # fmt: skip
        dt = time.perf_counter() - t0
        n = sum(len(c) for c in conts)
        rows.append({"method": f"sample_batch (KV cache), batch {b}", "batch": b, "tokens": n,
                     "seconds": round(dt, 2), "tokens_per_s": round(n / dt, 1),
                     "load_avg": la})  # fmt: skip
        print(rows[-1], file=sys.stderr)
        write()
    return 0


def markdown(res: dict) -> str:
    lines = [
        "# Generation throughput (corpus generate)",
        "",
        res["what"] + ".",
        "",
        f"Model {res['model']}, up to {res['max_new']} new tokens per sequence; machine "
        f"{res['machine']}; commit {res['commit']}; {res['date']}.",
        f"Command: `{res['command']}`",
        "",
        "| method | batch | tokens | seconds | tokens/s | load average (1/5/15 min) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['method']} | {r['batch']} | {r['tokens']} | {r['seconds']} | "
        f"{r['tokens_per_s']} | {' / '.join(map(str, r['load_avg']))} |"
        for r in res["rows"]
    ]
    lines += [
        "",
        "The CPU is shared by several processes (see the load average): compare rows measured "
        "at similar load only.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
