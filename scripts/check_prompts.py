"""Does SmolLM2 answer the shipped prompts? Per prompt the expected answer's top-1 rank and
probability (tracer.analyses.prompt_check), per category the counts, and the demo prompts chosen
among
those answered top-1 with p >= 0.3 (one per category, the two-hop prompt included).

    nice -n 10 .venv/bin/python scripts/check_prompts.py [--model smollm2] [--prompts FILE]

Writes benchmarks/prompts.json and benchmarks/prompts.md.
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
    from tracer.analyses import prompt_check as pc
    from tracer.model import LanguageModel
    from tracer.prompts import DEMO_PROMPTS, load_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", default=None, help="prompt file (default: the shipped set)")
    ap.add_argument("--min-prob", type=float, default=pc.MIN_PROB)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "prompts"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model = LanguageModel.load(args.model)
    t0 = time.perf_counter()
    la = [round(x, 2) for x in os.getloadavg()]
    rows = pc.check_prompts(
        model, load_prompts(args.prompts), min_prob=args.min_prob, progress=True
    )
    seconds = time.perf_counter() - t0
    # One per category; where the demo's own prompt passes, it is kept (the causal tests of
    # scripts/bench_crossprompt.py are built around France/Germany and hot/cold).
    chosen = pc.choose_demo(rows, preferred_prompts=DEMO_PROMPTS)
    by_prompt = {r.prompt: r for r in rows}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    res = {
        "what": "expected answer's first token at the prompt's last position: rank (0 = top-1) "
        f"and probability; passes = top-1 with p >= {args.min_prob}",
        "commit": commit,
        "command": "python scripts/check_prompts.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; load average {la}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model.facts.name,
        "seconds": round(seconds, 1),
        "summary": pc.summary(rows),
        "chosen_demo_prompts": [r.prompt for r in chosen],
        "demo_prompts_all_pass": all(p in by_prompt and by_prompt[p].passes for p in DEMO_PROMPTS),
        "current_demo_prompts": [
            {
                "prompt": p,
                **(
                    {"answer_prob": by_prompt[p].answer_prob, "passes": by_prompt[p].passes}
                    if p in by_prompt
                    else {}
                ),
            }
            for p in DEMO_PROMPTS
        ],  # fmt: skip
        "prompts": pc.to_json(rows),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    md = [
        f"# Does {model.facts.name} answer the prompt set?",
        "",
        res["what"] + ".",
        "",
        f"Command: `{res['command']}`; commit {commit}; {res['machine']}; {res['date']}; "
        f"{res['seconds']} s.",
        "",
        "Demo prompts chosen (one per category; the demo's own prompt where it passes, else the "
        "most probable passing answer):",
        "",
        *[
            f"- `{r.prompt!r}` -> `{r.answer_token!r}` p = {r.answer_prob:.3f} ({r.category})"
            for r in chosen
        ],  # fmt: skip
        "",
        *pc.markdown(rows, args.min_prob),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    s = res["summary"]["all"]
    print(f"{s['n']} prompts: top-1 {s['top1']}, top-5 {s['top5']}, passing {s['passes']}")
    print("chosen demo prompts:", *[repr(r.prompt) for r in chosen], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
