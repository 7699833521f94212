"""How well a model continues the shipped prompt set: per prompt the rank and probability of the
expected next token, per category the top-1 / top-5 agreement. Writes JSON.

    .venv/bin/python scripts/eval_prompts.py [--model smollm2] [--out artifacts/prompt_eval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from tracer.model import LanguageModel
from tracer.prompts import load_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", default=None, help="prompt file (default: the shipped set)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/prompt_eval.json"))
    args = ap.parse_args()
    model = LanguageModel.load(args.model)
    prompts = load_prompts(args.prompts)
    rows, t0 = [], time.perf_counter()
    for p in tqdm(prompts, desc="prompts", unit="prompt"):
        with torch.no_grad():
            probs = model.run(model.tokenize(p.prompt), record=False).logits[0, -1].softmax(-1)
        answer = model.tokenizer(p.answer, add_special_tokens=False)["input_ids"][0]
        top = int(probs.argmax())
        rows.append({
            "prompt": p.prompt, "category": p.category, "answer": p.answer,
            "answer_rank": int((probs > probs[answer]).sum()),
            "answer_prob": round(float(probs[answer]), 4),
            "top_token": model.decode([top]), "top_prob": round(float(probs[top]), 4),
        })  # fmt: skip
    by_cat: dict[str, list] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["answer_rank"])
    summary = {
        c: {"n": len(v), "top1": sum(x == 0 for x in v), "top5": sum(x < 5 for x in v)}
        for c, v in by_cat.items()
    }
    summary["all"] = {
        "n": len(rows),
        "top1": sum(r["answer_rank"] == 0 for r in rows),
        "top5": sum(r["answer_rank"] < 5 for r in rows),
    }
    result = {
        "model": model.facts.name,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "prompts": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    for c, s in summary.items():
        print(f"{c:14s} {s['n']:4d} prompts  top-1 {s['top1']:4d}  top-5 {s['top5']:4d}")
    print(args.out)


if __name__ == "__main__":
    main()
