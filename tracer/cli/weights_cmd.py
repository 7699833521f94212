"""``circuit-atlas weights``: the transcoder's prompt-independent virtual weights
(tracer.analyses.global_weights), written to a Parquet file and the store."""

from __future__ import annotations

from pathlib import Path

from tracer.cli import CLIError
from tracer.cli.graph_args import (
    add_corpus_args,
    add_store_args,
    corpus_tokens,
    open_store,
    replacement_for,
)
from tracer.cli.store_cmd import format_result
from tracer.cli.validate_cmd import model_args
from transcoders.device import setting_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="prompt-independent virtual weights between transcoder features",
        description="Global weights along the direct path (decoder of the source times the "
        "encoder of the target through the residual stream, attention excluded), the top-k "
        "inputs and outputs of every feature (tracer.analyses.global_weights). For an mlp_in "
        "transcoder the norm denominator is the corpus mean (or 1 with --corpus none).",
    )
    model_args(p)
    p.add_argument("--top-k", type=int, default=16, help="partners kept per feature")
    add_corpus_args(p, "the MLP-input norm denominators")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights Parquet file (default runs/weights/<transcoder>.parquet)",
    )
    p.add_argument("--top", type=int, default=10, help="strongest pairs printed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_store_args(p, "the weights, as [:VIRTUAL] between (:Feature) nodes")
    p.set_defaults(func=_weights)


def _weights(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from tracer.analyses.global_weights import global_weights, typical_norm_scales
    from tracer.batch import slug

    setting_from_args(args)
    if args.top_k < 1:
        raise CLIError(f"--top-k {args.top_k}: give at least 1")
    store = open_store(args)
    try:
        rm = replacement_for(args)
        name = rm.transcoder.identity.id
        tokens = corpus_tokens(args, rm.model)
        scales = None
        if tokens is not None and rm.transcoder.cfg.input_site == "mlp_in":
            scales = typical_norm_scales(rm, tokens, progress=not args.quiet)
        gw = global_weights(rm.transcoder, rm.model, top_k=args.top_k, norm_scales=scales,
                            name=name, progress=not args.quiet)  # fmt: skip
        path = gw.save(args.out or Path("runs/weights") / f"{slug(name, 64)}.parquet")
        where = str(path)
        if store is not None:
            with tqdm(total=len(gw), desc="storing weights", unit="pair",
                      disable=args.quiet) as bar:  # fmt: skip
                store.add_global_weights(
                    gw.to_table(),
                    model=rm.model.facts.name,
                    progress=lambda done, _: bar.update(done - bar.n),
                )
            where += " and the store"
    finally:
        if store is not None:
            store.close()
    order = np.argsort(-np.abs(gw.weight), kind="stable")[: args.top]
    rows = [[f"L{gw.source_layer[k]}/F{gw.source_index[k]}",
             f"L{gw.target_layer[k]}/F{gw.target_index[k]}", float(gw.weight[k]),
             int(gw.rank_in[k]), int(gw.rank_out[k])] for k in order]  # fmt: skip
    print(f"transcoder {name}: {len(gw)} pairs (top {gw.top_k} inputs and outputs of each "
          f"feature), norm convention {gw.norm!r}")  # fmt: skip
    print(format_result(["source", "target", "weight", "rank in", "rank out"], rows, "table"))
    print(f"wrote {where}; beside a stored graph's edges: circuit-atlas query edge-vs-weight "
          "--graph GRAPH_ID")  # fmt: skip
    return 0
