"""The training recipe (:class:`TrainConfig`), what a run returns (:class:`TrainResult`) and the
checks a recipe must pass before anything is harvested."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from transcoders.clt import CrossLayerTranscoder
from transcoders.training.activation_cache import CacheDtype
from transcoders.training.planner import BudgetError

OutlierUse = Literal["loss", "skip", "scales"]
OUTLIER_USES: tuple[OutlierUse, ...] = ("loss", "skip", "scales")


@dataclass
class TrainConfig:
    """A training recipe. Token counts are global (summed over data-parallel ranks)."""

    kind: Literal["clt", "plt"] = "clt"
    n_features: int = 512
    activation: Literal["jumprelu", "topk"] = "topk"
    topk: int = 32
    skip: bool = False
    # A skip transcoder's W_skip starts at the ridge-regression fit of outputs on inputs
    # (round 0's buffer), so features only have to learn what a linear map cannot.
    skip_init: Literal["lstsq", "zero"] = "lstsq"
    # Ridge, relative to the mean input variance. On SmolLM2 (d=576) held-out NMSE of the fit
    # from 8,192 tokens: 0.533 at 1e-3, 0.518 at 0.1; from 16,000: 0.507 at 1e-3, 0.501 at 0.03.
    skip_ridge: float = 0.1
    input_site: Literal["resid_mid", "mlp_in"] = "mlp_in"
    seed: int = 0
    # Length: a fixed number of steps, or as many as fit in the budget (measured at start).
    steps: int | None = None
    budget_minutes: float | None = None
    batch_tokens: int = 1024
    lr: float = 2e-3
    lr_warmup_frac: float = 0.05
    lr_final_frac: float = 0.1  # linear decay to this fraction of lr over the last 80% of steps
    # JumpReLU objective
    sparsity_coef: float = 0.02
    sparsity_c: float = 1.0
    sparsity_warmup_frac: float = 0.8
    preact_coef: float = 3e-6
    threshold_init: float = 0.5
    decoder_init_scale: float = 0.1  # small random decoders: the start adds little noise
    bandwidth: float = 0.1
    # TopK objective
    # Row-sparse updates (TopK only; transcoders.training.sparse_adam): the encoder's and decoders'
    # gradients name only the features selected in the batch and a lazy Adam (a step count per
    # row) updates those rows alone, so a step's cost follows the active features, not the
    # width. False: dense gradients and torch.optim.Adam over every weight.
    sparse_updates: bool = True
    auxk: int = 64
    auxk_coef: float = 1 / 32
    dead_window_tokens: int = 50_000
    # Data: harvested once into an activation cache (see transcoders.training.activation_cache).
    # The normaliser and the skip fit use the first buffer_tokens tokens of the cache (at most
    # cache_tokens).
    buffer_tokens: int = 8192
    # Distinct training tokens to hold in the cache. None: a step-count run holds
    # steps * batch_tokens / passes; a budgeted run sizes the harvest so that each token is
    # used about `passes` times (a cache already holding more is used whole: more passes).
    cache_tokens: int | None = None
    passes: int = 4
    harvest_batch: int = 8  # sequences per forward pass
    chunk_sequences: int = 16  # sequences per cache chunk (the unit a killed harvest resumes by)
    cache_dtype: CacheDtype = "float16"
    skip_bos: bool = True
    data_shards: int | None = None  # default: number of data-parallel ranks
    # Massive outputs (transcoders.training.outliers): positions whose MLP-output norm exceeds
    # outlier_factor x the layer's median ("ratio"; or median + factor x MAD, "mad"), with
    # thresholds fixed from round 0, get loss weight outlier_weight and are left out of the
    # skip fit and the normalisation scales. "none" turns this off.
    outlier_rule: Literal["none", "ratio", "mad"] = "ratio"
    outlier_factor: float = 50.0
    outlier_weight: float = 0.0
    # Where the rule acts (any of OUTLIER_USES): the loss weight (and AuxK), the ridge fit that
    # starts the skip connection (and b_dec), the normalisation scales. The loss alone by
    # default: measured in transcoders.training.outliers (module doc).
    outlier_uses: tuple[OutlierUse, ...] = ("loss",)
    n_heldout_seqs: int = 32  # evaluation rows (transcoders.evaluation); the caller picks them
    # Bookkeeping
    eval_every: int = 50
    log_every: int = 5
    checkpoint_every: int = 50
    checkpoint_minutes: float = 5.0
    reserve_seconds: float = 15.0  # kept free at the end of a budget for final eval + export
    replan_every: int = 25  # a budgeted run re-sizes its plan from recent step times this often


def parse_outlier_uses(text: str) -> tuple[OutlierUse, ...]:
    """ "loss,skip" -> ("loss", "skip") (empty text: the rule acts nowhere); unknown names
    raise one clear ValueError."""
    uses = tuple(u.strip() for u in text.split(",") if u.strip())
    unknown = sorted(set(uses) - set(OUTLIER_USES))
    if unknown:
        raise ValueError(
            f"--outlier-uses {','.join(unknown)} is not a place the outlier rule acts: give a "
            f"comma-separated subset of {','.join(OUTLIER_USES)}"
        )
    return uses  # type: ignore[return-value]


@dataclass
class TrainResult:
    clt: CrossLayerTranscoder  # exported: raw activations in, raw outputs out
    metrics: dict
    out_dir: Path
    steps: int
    harvest_tokens_per_s: float = float("nan")
    train_tokens_per_s: float = float("nan")
    log: list[dict] = field(default_factory=list)


def check_config(cfg: TrainConfig, world: int, tokens: torch.Tensor) -> None:
    """Refuse a recipe that cannot run (clear errors naming the field)."""
    shards = cfg.data_shards or world
    if shards % world:
        raise ValueError(f"data_shards {shards} must be a multiple of the world size {world}")
    if cfg.batch_tokens % shards:
        raise ValueError(f"batch_tokens {cfg.batch_tokens} must divide evenly over {shards} shards")
    if cfg.steps is None and cfg.budget_minutes is not None and cfg.budget_minutes <= 0:
        raise BudgetError(f"budget of {cfg.budget_minutes} minutes: give a positive budget")
    if cfg.steps is None and not cfg.budget_minutes:
        raise ValueError("give either a number of steps or a time budget (budget_minutes)")
    if tokens.dim() != 2 or tokens.shape[1] < 2 or len(tokens) == 0:
        raise ValueError(
            f"train tokens must be [n_seq >= 1, seq_len >= 2], got {tuple(tokens.shape)}"
        )
    parse_outlier_uses(",".join(cfg.outlier_uses))
    if cfg.activation == "topk" and not 0 < cfg.topk <= cfg.n_features:
        raise ValueError(f"topk {cfg.topk} must be in 1..n_features ({cfg.n_features})")
