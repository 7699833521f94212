"""``circuit-atlas transcoders ...``: convert and inspect transcoder weights.

Subcommands are added by the functions in ``SUBCOMMANDS`` (each takes the group's subparsers
object). A subcommand living in another module is added by listing that module in
``SUBCOMMAND_MODULES``; it must define ``register_subcommand(subparsers)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from transcoders.formats import FORMATS

# Modules that each add one more ``transcoders`` subcommand (e.g. training).
SUBCOMMAND_MODULES: list[str] = ["tracer.cli.train_cmd"]


def _add_model_args(p) -> None:
    p.add_argument(
        "--model",
        help="check the transcoder against this model (folder, hub id or 'smollm2') and place "
        "per-layer sources at its layers",
    )
    p.add_argument("--n-layers", type=int, help="model layer count (instead of --model)")
    p.add_argument("--d-model", type=int, help="model width (instead of --model)")
    p.add_argument("--layer", type=int, help="model layer of a single-layer source")
    p.add_argument("--input-site", choices=["resid_mid", "mlp_in"], help="override input site")
    p.add_argument("--model-name", help="model name to record when the files lack it")
    p.add_argument(
        "--from", dest="src_format", choices=FORMATS, help="source format (default: detected)"
    )


def _load_kwargs(args) -> dict:
    kw = dict(
        n_layers=args.n_layers,
        d_model=args.d_model,
        layer=args.layer,
        input_site=args.input_site,
        model_name=args.model_name,
    )
    if args.model:
        from tracer.model import LanguageModel

        facts = LanguageModel.load(args.model).facts
        kw.update(n_layers=facts.n_layers, d_model=facts.d_model)
        kw["model_name"] = args.model_name or facts.name
    return kw


def add_convert(tsub) -> None:
    from transcoders.formats import DTYPES, FORMATS, WRITABLE_FORMATS

    p = tsub.add_parser(
        "convert",
        help="convert transcoder weights between formats",
        description=f"Read a transcoder in any of {', '.join(FORMATS)} and write it as "
        f"{' / '.join(WRITABLE_FORMATS)} (with circuit_atlas.json).",
    )
    p.add_argument("src", help="source folder (or GemmaScope params.npz)")
    p.add_argument("dst", help="destination folder (must not exist unless --force)")
    p.add_argument(
        "--format",
        choices=WRITABLE_FORMATS,
        help="output format (default: circuit-tracer for a CLT, circuit-tracer-plt otherwise)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="storage precision (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    _add_model_args(p)
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from transcoders.formats.registry import convert_transcoder, default_format

    clt = convert_transcoder(
        args.src, args.dst, args.format, src_format=args.src_format, overwrite=args.force,
        dtype=args.dtype, **_load_kwargs(args),
    )  # fmt: skip
    cfg = clt.cfg
    print(
        f"wrote {args.dst} ({args.format or default_format(clt)}): {cfg.kind}, "
        f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_features} features per layer, "
        f"{cfg.activation}"
    )
    return 0


def add_info(tsub) -> None:
    p = tsub.add_parser("info", help="describe transcoder weights on disk")
    p.add_argument("path", help="transcoder folder (or GemmaScope params.npz)")
    _add_model_args(p)
    p.set_defaults(func=_info)


def _info(args) -> int:
    from transcoders.formats import transcoder_info
    from transcoders.meaning import load_meaning

    info = transcoder_info(args.path, format=args.src_format, **_load_kwargs(args))
    print("\n".join(info.lines()))
    result = load_meaning(args.path) if Path(args.path).is_dir() else None
    if result is not None:
        print("\n".join(result.lines()))
    else:
        print(f"meaning     not measured (circuit-atlas transcoders meaning {args.path})")
    return 0


def add_meaning(tsub) -> None:
    from transcoders.device import add_device_arguments
    from transcoders.meaning import CATEGORY_NAMES

    p = tsub.add_parser(
        "meaning",
        help="score a transcoder's features for meaning (sparse probing of concept categories)",
        description="SAEBench-style sparse probing: for each concept category (members from "
        "WordNet) and layer, the AUROC of the best single feature at telling member positions "
        "from other positions in held-out text (WordNet's held-out glosses and Python "
        "snippets; the feature is chosen on one half of the text and measured on the other); "
        "also per layer the token-level share, dead share and firing frequencies. Writes "
        "meaning.json beside the weights (shown by 'transcoders info').",
    )
    p.add_argument("path", help="transcoder folder")
    p.add_argument("--model", default="smollm2", help="the model (folder, hub id or 'smollm2')")
    p.add_argument("--categories", help=f"comma-separated subset of: {', '.join(CATEGORY_NAMES)}")
    p.add_argument(
        "--text",
        help="probe in this text file instead (one sentence or paragraph per line); a category "
        "without a member in it is refused",
    )
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--no-save", action="store_true", help="do not write meaning.json")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: all cores, 1 when the CPU is busy)"
    )
    add_device_arguments(p)
    p.set_defaults(func=_meaning)


def _meaning(args) -> int:
    import torch

    from tracer.cli.train_cmd import tokenizer_spec
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn
    from transcoders.device import setting_from_args
    from transcoders.formats import load_transcoder
    from transcoders.meaning import MeaningConfig, build_probe, save_meaning, score_probe

    setting = setting_from_args(args)
    from tracer.cli.train_cmd import default_threads

    torch.set_num_threads(args.threads or default_threads())  # 1 on a busy CPU
    cats = tuple(c.strip() for c in args.categories.split(",")) if args.categories else None
    text = None
    if args.text:
        t = Path(args.text)
        if not t.is_file():
            raise ValueError(f"--text {t}: no such file; give a text file of sentences")
        text = [ln.strip() for ln in t.read_text(errors="replace").splitlines() if ln.strip()]
    cfg = MeaningConfig(categories=cats)
    model = LanguageModel.load(args.model, device=setting)
    probe = build_probe(
        tokenizer_spec(model), categories=cats, seq_len=cfg.seq_len,
        per_category=cfg.per_category, background=cfg.background, text=text,
    )  # fmt: skip
    clt = load_transcoder(args.path, model=model, device=setting)
    result = score_probe(clt, activation_fn(model, clt.cfg.input_site), probe, cfg, progress=True)
    print("\n".join(result.lines()))
    if args.json:
        Path(args.json).write_text(result.to_json())
    if not args.no_save and Path(args.path).is_dir():
        save_meaning(result, args.path)
    return 0


SUBCOMMANDS = [add_convert, add_info, add_meaning]


def register(sub) -> None:
    p = sub.add_parser("transcoders", help="convert and inspect transcoder weights")
    tsub = p.add_subparsers(dest="transcoders_command", required=True)
    for add in SUBCOMMANDS:
        add(tsub)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register_subcommand(tsub)
