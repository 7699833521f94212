"""``circuit-atlas validate GRAPH`` and ``circuit-atlas steer "PROMPT" --set L/F=VALUE``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tracer.cli import CLIError
from transcoders.device import add_device_arguments, setting_from_args


def register(sub) -> None:
    v = sub.add_parser(
        "validate",
        help="check a graph's edges by perturbing the model",
        description="Ablate a sample of the graph's nodes: in the frozen model every target must "
        "move by minus the node's edges; in the free model, report the rank correlation of "
        "predicted influence and observed effect, sign agreement, and circuit sufficiency and "
        "necessity. Results go into the graph file (extra['validation']) and a JSON beside it.",
    )
    v.add_argument("graph", help="full (unpruned) graph Parquet file written by attribution")
    model_args(v)
    v.add_argument("--out", help="write the validated graph here (default: update GRAPH)")
    v.add_argument("--json", help="report JSON path (default: <graph>.validation.json)")
    v.add_argument("--max-circuit", type=_count, default=48, help="circuit features to ablate")
    v.add_argument("--n-random", type=_count, default=48, help="other features to ablate")
    v.add_argument("--node-threshold", type=float, default=0.8, help="circuit pruning")
    v.add_argument("--edge-threshold", type=float, default=0.98, help="circuit pruning")
    v.add_argument("--batch-size", type=_positive, default=16, help="ablations per forward pass")
    v.add_argument("--seed", type=int, default=0, help="sampling seed")
    v.add_argument(
        "--ratio-floor", type=float, default=0.1, metavar="K",
        help="sufficiency and necessity are undefined when ablating every feature moves the "
        "logit metric by less than K standard deviations of the logits (default 0.1)",
    )  # fmt: skip
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=_validate)

    s = sub.add_parser(
        "steer",
        help="generate text with transcoder features clamped",
        description="Continue PROMPT with features set (--set L/F=VALUE), scaled (--scale "
        "L/F=FACTOR) or ablated (--ablate L/F) on every position (or only at --at POS), next to "
        "the unsteered continuation. The real model runs; each edit adds the decoded change.",
    )
    s.add_argument("prompt")
    model_args(s)
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="L/F=VALUE",
                   help="clamp feature F of layer L to VALUE (repeatable)")  # fmt: skip
    s.add_argument("--scale", dest="scales", action="append", default=[], metavar="L/F=FACTOR",
                   help="multiply feature F of layer L by FACTOR (repeatable)")  # fmt: skip
    s.add_argument("--ablate", dest="ablates", action="append", default=[], metavar="L/F",
                   help="zero feature F of layer L (repeatable)")  # fmt: skip
    s.add_argument("--at", type=int, help="only at this prompt position (default: every "
                   "position, generated ones included)")  # fmt: skip
    s.add_argument("--max-new-tokens", type=_count, default=30)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-k", type=_positive, help="sample only among the k likeliest tokens")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-baseline", action="store_true", help="skip the unsteered continuation")
    s.set_defaults(func=_steer)


def model_args(p) -> None:
    """``--model``, ``--transcoders``, ``--keep-bos``, ``--device``, ``--dtype``."""
    p.add_argument("--model", default="smollm2", help="model folder, hub id or 'smollm2' (default)")
    p.add_argument("--transcoders", required=True, help="transcoder folder (any known format)")
    p.add_argument("--keep-bos", action="store_true",
                   help="start-token features are nodes (default: excluded)")  # fmt: skip
    add_device_arguments(p)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def replacement(args, exclude_bos: bool):
    """The ReplacementModel of model_args, on the device and dtype they name."""
    from tracer.batch import load_replacement

    setting = setting_from_args(args)
    return load_replacement(args.model, args.transcoders, setting, exclude_bos=exclude_bos)


def _validate(args) -> int:
    from tracer.analyses.validate import save_report, validate, validation_path
    from tracer.graph import Graph

    setting_from_args(args)  # a bad --device/--dtype fails first, with one line
    graph = Graph.load(args.graph)  # then a bad file fails before the model loads
    exclude_bos = bool(graph.params.get("exclude_bos", not args.keep_bos))
    rm = replacement(args, exclude_bos)
    report = validate(
        rm, graph, max_circuit=args.max_circuit, n_random=args.n_random,
        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
        batch_size=args.batch_size, seed=args.seed, ratio_floor_std=args.ratio_floor,
        progress=not args.quiet,
    )  # fmt: skip
    out = Path(args.out or args.graph)
    graph.save(out)
    js = save_report(report, args.json or validation_path(out))
    print("\n".join(report.lines()))
    print(f"wrote {out} and {js}")
    return 0


_FEATURE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_edit(text: str, op: str, position: int | None):
    """``L/F=VALUE`` (or ``L/F`` for ablate) -> a FeatureEdit; clear errors otherwise."""
    from tracer.interventions import FeatureEdit

    what, eq, value = text.partition("=")
    m = _FEATURE.fullmatch(what)
    if m is None or (op == "ablate") == bool(eq):
        example = "12/3456" if op == "ablate" else "12/3456=8.0"
        form = "L/F" if op == "ablate" else "L/F=VALUE"
        raise CLIError(f"{text!r}: write {form} (layer/feature), e.g. {example}")
    try:
        val = float(value) if op != "ablate" else 0.0
    except ValueError:
        raise CLIError(f"{text!r}: {value!r} is not a number") from None
    return FeatureEdit(int(m.group(1)), int(m.group(2)), position, op, val)


def _steer(args) -> int:
    from tracer.steer import generate_batch

    setting_from_args(args)  # a bad --device/--dtype fails first, with one line
    edits = [parse_edit(t, "clamp", args.at) for t in args.sets]
    edits += [parse_edit(t, "scale", args.at) for t in args.scales]
    edits += [parse_edit(t, "ablate", args.at) for t in args.ablates]
    if not edits:
        raise CLIError("nothing to steer: give --set L/F=VALUE, --scale L/F=FACTOR or --ablate L/F")
    rm = replacement(args, exclude_bos=not args.keep_bos)
    batch = [edits] if args.no_baseline else [[], edits]
    gens = generate_batch(
        rm, args.prompt, batch, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    if not args.no_baseline:
        print(f"baseline: {args.prompt}{gens[0].text}")
    print(f"steered:  {args.prompt}{gens[-1].text}")
    return 0
