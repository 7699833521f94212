"""Train a cross-layer (or per-layer / skip) transcoder on streamed MLP activations.

Read :func:`train` top to bottom: plan the data rounds, harvest round 0, normalise, size the run
to the time budget, then loop: batch -> loss -> Adam step -> metrics -> eval -> checkpoint.

Objectives (normalised space, per-token means, summed over layers; see :mod:`.losses`):

- JumpReLU: MSE + lambda(t) * tanh sparsity weighted by decoder norms + pre-activation loss;
  lambda warms up linearly. Dense decode (the threshold's straight-through gradient needs the
  decoder's gradient at inactive features too).
- TopK: MSE + AuxK on dead features. Decoding uses only the k active rows of each layer
  (``embedding_bag``), which is what makes a 30-layer CLT trainable on a 2-core CPU.

A run resumes exactly (same final weights as an uninterrupted run) from its last checkpoint:
everything random is a function of (seed, round, shard, step), and a checkpoint holds the
model, the optimiser, the dead-feature counters and the step, written atomically (temporary
file, fsync, rename), so a crash or a full disk never leaves a corrupt checkpoint behind.

Data parallel: run one process per rank under torchrun (gloo on CPU, NCCL on GPU); each rank
harvests its own data shards and gradients are averaged, so W ranks give the result of one
process with ``data_shards = W`` on the same global batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from transcoders import losses, outliers
from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.device import DeviceSetting
from transcoders.evaluation import Heldout, evaluate_heldout
from transcoders.metrics import FireTracker, l0_per_layer, summarize
from transcoders.metrics import fired_topk as _fired_topk
from transcoders.normalize import Normalizer, fold, from_mean_squares, mean_square_norms
from transcoders.stream import ActivationFn, ShuffleBuffer, StreamPlan
from transcoders.trainable import TrainableTranscoder

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class BudgetError(ValueError):
    """The time budget cannot fit even one training step."""


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


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
    auxk: int = 64
    auxk_coef: float = 1 / 32
    dead_window_tokens: int = 50_000
    # Data
    buffer_tokens: int = 8192  # harvested per round (all shards together)
    passes: int = 4  # times each harvested token is used
    harvest_batch: int = 8
    skip_bos: bool = True
    buffer_dtype: Literal["float32", "float16"] = "float32"
    data_shards: int | None = None  # default: number of data-parallel ranks
    # Massive outputs (transcoders.outliers): positions whose MLP-output norm exceeds
    # outlier_factor x the layer's median ("ratio"; or median + factor x MAD, "mad"), with
    # thresholds fixed from round 0, get loss weight outlier_weight and are left out of the
    # skip fit and the normalisation scales. "none" turns this off.
    outlier_rule: Literal["none", "ratio", "mad"] = "ratio"
    outlier_factor: float = 50.0
    outlier_weight: float = 0.0
    n_heldout_seqs: int = 32  # evaluation rows (transcoders.evaluation); the caller picks them
    # Bookkeeping
    eval_every: int = 50
    log_every: int = 5
    checkpoint_every: int = 50
    checkpoint_minutes: float = 5.0
    reserve_seconds: float = 15.0  # kept free at the end of a budget for final eval + export


@dataclass
class TrainResult:
    clt: CrossLayerTranscoder  # exported: raw activations in, raw outputs out
    metrics: dict
    out_dir: Path
    steps: int
    harvest_tokens_per_s: float = float("nan")
    train_tokens_per_s: float = float("nan")
    log: list[dict] = field(default_factory=list)


@dataclass
class Dist:
    """Data-parallel context (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collective buffers live (NCCL: a GPU)

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Dist:
        import torch.distributed as dist

        dev = torch.device("cpu") if device is None else torch.device(device)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dev)
        return cls(device=dev)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t

    def any(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            f = t.float()
            dist.all_reduce(f, op=dist.ReduceOp.MAX)
            return f > 0
        return t

    def broadcast(self, value: float) -> float:
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
            dist.broadcast(t, 0)
            return float(t.item())
        return value

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(setting: DeviceSetting) -> str | None:
    """Under torchrun (WORLD_SIZE > 1), join the process group once: NCCL when training on a
    GPU (each rank on its own, ``cuda:LOCAL_RANK``), gloo on the CPU. Returns the backend, or
    None for a single process."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if setting.is_cuda:
            torch.cuda.set_device(setting.device)
        dist.init_process_group("nccl" if setting.is_cuda else "gloo")
    return dist.get_backend()


# --- the objective ---------------------------------------------------------------------------


@dataclass
class StepOut:
    loss: torch.Tensor
    parts: dict[str, float]
    mse_per_layer: torch.Tensor  # [L]
    l0: torch.Tensor  # [L]
    fired: torch.Tensor  # [L, F] bool
    recon: torch.Tensor  # [L, N, d]


def objective(
    model: TrainableTranscoder,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    sparsity_coef: float,
    dead: torch.Tensor | None,
    weight: torch.Tensor | None = None,
) -> StepOut:
    """The training loss on one normalised batch x, y [L, N, d]; ``weight`` [L, N] weights each
    position's reconstruction (and AuxK) term (0 at outliers, :mod:`transcoders.outliers`)."""
    pre = model.pre_activations(x)
    L, N, F = pre.shape
    parts: dict[str, torch.Tensor] = {}
    if cfg.activation == "topk":
        idx, vals = model.topk(pre, cfg.topk)
        recon = model.decode_sparse(idx, vals, x)
        mse, per_layer = losses.reconstruction_loss(recon, y, weight)
        parts["mse"] = mse
        fired = _fired_topk(idx, vals, F)
        l0 = (vals > 0).float().sum(-1).mean(-1)
        if dead is not None and dead.any() and cfg.auxk_coef > 0:
            # AuxK: the dead features' largest pre-activations try to explain the residual.
            k_aux = min(cfg.auxk, int(dead.sum(-1).max()))
            a_idx, a_vals = model.topk(pre.masked_fill(~dead[:, None, :], -1e30), k_aux)
            a_vals = a_vals * dead.gather(1, a_idx.reshape(L, -1)).view_as(a_vals)
            aux = model.decode_sparse(a_idx, a_vals, bias=False)
            resid = (y - recon).detach()
            if weight is not None:
                sw = weight.sqrt()[..., None]
                resid, aux = resid * sw, aux * sw
            parts["auxk"] = cfg.auxk_coef * losses.auxk_loss(resid, aux)
    else:
        acts = model.activate(pre, cfg.bandwidth)
        recon = model.decode_dense(acts, x)
        mse, per_layer = losses.reconstruction_loss(recon, y, weight)
        norms = model.decoder_norms()
        parts["mse"] = mse
        parts["sparsity"] = sparsity_coef * losses.tanh_sparsity_loss(acts, norms, cfg.sparsity_c)
        parts["preact"] = cfg.preact_coef * losses.preact_loss(pre, model.threshold, norms)
        fired = (acts > 0).any(1)
        l0 = l0_per_layer(acts)
    loss = sum(parts.values())
    return StepOut(
        loss,
        {k: float(v.detach()) for k, v in parts.items()},
        per_layer.detach(),
        l0.detach(),
        fired,
        recon.detach(),
    )


@torch.no_grad()
def fit_skip(
    x: torch.Tensor,
    y: torch.Tensor,
    ridge: float,
    dist: Dist | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ridge regression y ~ W x + b on x, y [L, N, d] (moments averaged over ranks),
    each position weighted by ``weight`` [L, N] (0 leaves an outlier out, see
    :mod:`transcoders.outliers`; None: all 1).

    Returns W [L, d_out, d_in] (the W_skip layout) and b [L, d]. The ridge is ``ridge`` times
    the mean input variance, which keeps near-constant input directions from blowing up W."""
    dist = dist or Dist()
    x64, y64 = x.double(), y.double()
    n = x.shape[1]
    if weight is None:
        mw, xw = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device), x64
        mx, my = dist.mean(x64.mean(1)), dist.mean(y64.mean(1))  # [L, d]
    else:
        w64 = weight.to(device=x.device, dtype=torch.float64)  # [L, N]
        mw = dist.mean(w64.mean(1))[:, None]  # [L, 1]
        mx = dist.mean(torch.einsum("ln,lnd->ld", w64, x64) / n) / mw
        my = dist.mean(torch.einsum("ln,lnd->ld", w64, y64) / n) / mw
        xw = x64 * w64[..., None]
    sxx = dist.mean(xw.transpose(1, 2) @ x64 / n) / mw[..., None]  # [L, d, d]
    sxy = dist.mean(xw.transpose(1, 2) @ y64 / n) / mw[..., None]
    del xw
    cxx = sxx - mx[:, :, None] * mx[:, None, :]
    cxy = sxy - mx[:, :, None] * my[:, None, :]
    d = x.shape[-1]
    lam = ridge * torch.diagonal(cxx, dim1=1, dim2=2).mean(-1)  # [L]
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    # Cholesky, not linalg.solve: the system is symmetric positive definite, and MKL's batched
    # LU in torch 2.13 fails on [30, 576, 576] float64 with 2 threads ("Pivots given to lu_solve
    # must all be greater or equal to 1").
    chol, info = torch.linalg.cholesky_ex(cxx + lam[:, None, None] * eye)
    if bool((info != 0).any()):
        bad = [i for i, v in enumerate(info.tolist()) if v]
        raise ValueError(
            f"skip fit: the input covariance of layer(s) {bad} is singular; harvest more tokens "
            "(--buffer-tokens) or raise TrainConfig.skip_ridge"
        )
    w = torch.cholesky_solve(cxy, chol)  # [L, d_in, d_out]
    b = my - (mx[:, None, :] @ w)[:, 0]
    return w.transpose(1, 2).float().contiguous(), b.float()


def lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to lr_final_frac over the last 80%."""
    p = step / max(1, n_steps)
    if p < cfg.lr_warmup_frac:
        return cfg.lr * (step + 1) / max(1, round(cfg.lr_warmup_frac * n_steps))
    if p < 0.2:
        return cfg.lr
    return cfg.lr * (1 - (1 - cfg.lr_final_frac) * (p - 0.2) / 0.8)


def sparsity_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    return cfg.sparsity_coef * min(1.0, step / max(1.0, cfg.sparsity_warmup_frac * n_steps))


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed and
    fsynced, then renamed over the old one. On any failure the old checkpoint stays intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        intact = (
            f"the previous checkpoint {path} is intact"
            if path.exists()
            else ("no earlier checkpoint existed")
        )
        raise CheckpointError(
            f"could not write checkpoint {path} ({err}); {intact}. Free disk space (or fix the "
            "folder's permissions) and run the same command again to resume"
        ) from err


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def export(model: TrainableTranscoder, norm: Normalizer, extra: dict | None = None):
    """The trained transcoder as a CrossLayerTranscoder with normalisation folded in, frozen,
    on the CPU in float32 (whatever device it was trained on)."""
    out = fold(model.to_clt(), Normalizer(norm.in_scale.cpu(), norm.out_scale.cpu()))
    out.cfg.training = {**out.cfg.training, **(extra or {})}
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def save_export(clt: CrossLayerTranscoder, folder: Path) -> Path:
    """Write the exported weights with the project's format functions when present, else as a
    single safetensors file plus ``circuit_atlas.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from transcoders.formats import save_transcoder  # written by the formats module
    except ImportError:
        save_transcoder = None
    if save_transcoder is not None:
        save_transcoder(clt, folder, overwrite=True)
        return folder
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in clt.state_dict().items()}
    save_file(tensors, str(folder / "transcoder.safetensors"))
    (folder / "circuit_atlas.json").write_text(clt.cfg.to_json())
    return folder


# --- the loop --------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    activations: ActivationFn,
    train_tokens: torch.Tensor,
    heldout_tokens: torch.Tensor,
    n_layers: int,
    d_model: int,
    out_dir: str | os.PathLike,
    model_name: str | None = None,
    spliced_eval: Callable[[CrossLayerTranscoder], dict] | None = None,
    resume: bool = True,
    progress: bool = True,
    plot: bool = True,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | DeviceSetting | None = "cpu",
) -> TrainResult:
    """Train on ``train_tokens`` [S, P] (rows start with BOS), evaluating on ``heldout_tokens``.

    ``activations(tokens [B, P]) -> (inputs, outputs)``, each [L, B*P, d], raw model activations.
    ``spliced_eval(exported_clt) -> dict`` (optional) measures the model with every MLP replaced.
    Writes ``checkpoint.pt``, ``log.jsonl``, ``curves.png``, ``metrics.json`` and the exported
    weights (``transcoder/``) into ``out_dir``. Returns the exported transcoder and metrics.

    ``device`` (``"cpu"``, ``"cuda[:N]"``, ``"auto"`` or a :class:`DeviceSetting`): where the
    transcoder trains. It trains in float32 there whatever the model's dtype (activations are
    converted as batches are drawn); harvested buffers stay in host memory and each batch is
    copied to the device. The exported transcoder is on the CPU. Under torchrun call
    :func:`init_distributed` first (NCCL on CUDA, gloo on CPU).
    """
    t_start = time.perf_counter()
    dev = DeviceSetting.parse(device).device
    dist = Dist.from_env(dev)
    main = dist.rank == 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, dist, train_tokens)
    torch.manual_seed(cfg.seed)

    # Data plan: every round, each shard harvests its own block of sequences.
    n_shards = cfg.data_shards or dist.world
    P = train_tokens.shape[1]
    keep = P - int(cfg.skip_bos)
    seqs_per_shard = max(1, math.ceil(cfg.buffer_tokens / (n_shards * keep)))
    plan = StreamPlan(seqs_per_shard, n_shards, cfg.harvest_batch, cfg.skip_bos, cfg.passes)
    my_shards = range(dist.rank * n_shards // dist.world, (dist.rank + 1) * n_shards // dist.world)
    shard_batch = cfg.batch_tokens // n_shards
    steps_per_round = cfg.passes * plan.tokens_per_shard(P) // shard_batch
    dtype = torch.float16 if cfg.buffer_dtype == "float16" else torch.float32
    budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None

    def harvest(round_: int, first: bool = False) -> list[ShuffleBuffer]:
        bufs = []
        for s in my_shards:
            idx = plan.shard_sequences(len(train_tokens), round_, s)
            check = (
                _budget_guard(budget_s, t_start, len(idx) * keep * len(my_shards))
                if first
                else None
            )
            bufs.append(
                ShuffleBuffer.harvest(
                    activations,
                    train_tokens[idx],
                    batch=plan.harvest_batch,
                    skip_bos=cfg.skip_bos,
                    dtype=dtype,
                    on_batch=check,
                    device=dev,
                )
            )
        return bufs

    def batch_at(bufs, orders, step) -> tuple[torch.Tensor, torch.Tensor]:
        k = step % steps_per_round
        xs, ys = zip(
            *(
                b.get(o[k * shard_batch : (k + 1) * shard_batch])
                for b, o in zip(bufs, orders, strict=True)
            ),
            strict=True,
        )
        x, y = torch.cat(xs, 1).to(dev), torch.cat(ys, 1).to(dev)
        return x * norm.in_scale[:, None, None], y * norm.out_scale[:, None, None]

    # Held-out activations for evaluation (rank 0 evaluates).
    if main:
        held = Heldout.harvest(activations, heldout_tokens, batch=cfg.harvest_batch, device=dev)

    clt_cfg = TranscoderConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_features=cfg.n_features,
        kind=cfg.kind,
        activation=cfg.activation,
        topk=cfg.topk if cfg.activation == "topk" else None,
        skip=cfg.skip,
        input_site=cfg.input_site,
        model_name=model_name,
    )
    # Initialised on the CPU (the same random start on every device), then moved.
    clt = TrainableTranscoder.from_clt(CrossLayerTranscoder(clt_cfg)).to(dev)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    fire = FireTracker(n_layers, cfg.n_features, cfg.dead_window_tokens, device=dev)
    ckpt_path = out / CHECKPOINT
    log_path = out / LOG
    bufs: list[ShuffleBuffer] | None = None
    buf_round = -1

    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["config"] != asdict(cfg):
            raise ValueError(
                f"{ckpt_path} was written by a run with a different recipe; give another output "
                "folder, or pass --no-resume to start over"
            )
        clt.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        fire.load_state_dict(state["fire"])
        norm = Normalizer.from_dict(state["normalizer"])
        norm = Normalizer(norm.in_scale.to(dev), norm.out_scale.to(dev))
        start, n_steps = state["step"], state["n_steps"]
        harvest_rate, step_s = state["harvest_rate"], state["step_seconds"]
        torch.set_rng_state(state["torch_rng"])
        thr = torch.tensor(state["outlier_thresholds"], device=dev)
        _truncate_log(log_path, start)
    else:
        # Round 0: harvest, normalise (scales averaged over all ranks), initialise b_dec.
        bufs, buf_round = harvest(0, first=True), 0
        harvest_rate = sum(len(b) for b in bufs) / sum(b.seconds for b in bufs)
        xs = torch.cat([b.inputs for b in bufs]).transpose(0, 1).to(dev)
        ys = torch.cat([b.outputs for b in bufs]).transpose(0, 1).to(dev)
        # Outliers (thresholds in raw units, from this round) count in neither the scales nor
        # the skip fit nor b_dec: kept positions only, the same on any number of ranks.
        thr = outliers.buffer_thresholds(
            [b.outputs for b in bufs], cfg.outlier_rule, cfg.outlier_factor, dist.mean
        ).to(dev)
        keep = (~outliers.outlier_mask(ys, thr)).float()  # [L, N]
        kept = dist.mean(keep.mean(1))  # [L] share kept
        ms_in = dist.mean(mean_square_norms(xs * keep[..., None])) / kept
        ms_out = dist.mean(mean_square_norms(ys * keep[..., None])) / kept
        norm = from_mean_squares(ms_in, ms_out, d_model)
        with torch.no_grad():
            y_norm = ys.float() * norm.out_scale[:, None, None]
            if clt.W_skip is not None and cfg.skip_init == "lstsq":
                x_norm = xs.float() * norm.in_scale[:, None, None]
                w, b = fit_skip(x_norm, y_norm, cfg.skip_ridge, dist, weight=keep)
                clt.W_skip.copy_(w)
                clt.b_dec.copy_(b)
                del x_norm
            else:
                clt.b_dec.copy_(dist.mean((y_norm * keep[..., None]).mean(1)) / kept[:, None])
            del y_norm
            for w in clt.D:
                w.mul_(cfg.decoder_init_scale)
            if cfg.activation == "jumprelu":
                clt.threshold.fill_(cfg.threshold_init)
        del xs, ys
        start = 0
        step_s = float("nan")
        if cfg.steps is not None:
            n_steps = cfg.steps
        else:
            orders = [
                b.order(cfg.seed, 0, s, cfg.passes) for b, s in zip(bufs, my_shards, strict=True)
            ]
            step_s = _probe_step_seconds(clt, cfg, batch_at(bufs, orders, 0), fire, dist)
            n_steps = _plan_steps(
                cfg,
                budget_s,
                t_start,
                step_s,
                steps_per_round,
                len(bufs[0]) * len(bufs) / max(harvest_rate, 1e-9),
                dist,
            )
        log_path.unlink(missing_ok=True)

    meta = {
        "n_steps": n_steps,
        "steps_per_round": steps_per_round,
        "harvest_tokens_per_s": harvest_rate,
        "batch_tokens": cfg.batch_tokens,
        "world": dist.world,
    }
    if main and start == 0:
        _log(log_path, {"step": 0, "event": "start", **meta, "config": asdict(cfg)})
        _log(log_path, _eval_record(clt, held, norm, fire, cfg, None, 0))  # baseline
    bar = _progress(n_steps, start, progress and main)
    last_ckpt = time.perf_counter()
    last_eval: dict = {}
    tokens_done = 0
    opt_s = 0.0

    for step in range(start, n_steps):
        # Data: (re)harvest when entering a new round.
        round_ = step // steps_per_round
        if round_ != buf_round:
            bufs, buf_round = harvest(round_), round_
        orders = [
            b.order(cfg.seed, round_, s, cfg.passes) for b, s in zip(bufs, my_shards, strict=True)
        ]
        t_opt = time.perf_counter()
        x, y = batch_at(bufs, orders, step)

        # Optimisation step.
        lr = lr_at(step, n_steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        lam = sparsity_at(step, n_steps, cfg)
        wt = outliers.batch_weights(y, thr * norm.out_scale, cfg.outlier_weight)
        res = objective(clt, x, y, cfg, lam, fire.dead_mask(), wt)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        for p in clt.parameters():
            if p.grad is not None:
                dist.mean(p.grad)
        opt.step()
        if cfg.activation == "jumprelu":
            with torch.no_grad():
                clt.threshold.clamp_(min=1e-4)
        fire.update(dist.any(res.fired), cfg.batch_tokens)
        tokens_done += cfg.batch_tokens
        opt_s += time.perf_counter() - t_opt  # optimisation only (no harvest / eval / saving)

        # Metrics, evaluation, checkpoint.
        done = step + 1
        if done % cfg.log_every == 0 or done == n_steps:
            # Collective first (every rank), then rank 0 writes.
            mse_all = float(dist.mean(res.mse_per_layer.clone()).mean())
        if main and (done % cfg.log_every == 0 or done == n_steps):
            rec = {
                "step": done,
                "lr": lr,
                "sparsity_coef": lam,
                "loss": float(res.loss.detach()),
                **{k: round(v, 6) for k, v in res.parts.items()},
                "train_nmse": mse_all,
                "l0": float(res.l0.mean()),
                "dead": float(fire.dead_fraction().mean()),
                "elapsed_s": round(time.perf_counter() - t_start, 2),
            }
            _log(log_path, rec)
        if main and (done % cfg.eval_every == 0 or done == n_steps):
            last_eval = _eval_record(clt, held, norm, fire, cfg, spliced_eval, done)
            _log(log_path, last_eval)
        if main and bar is not None:
            bar.update(1)
            bar.set_postfix(_postfix(res, fire, last_eval), refresh=False)
        if done < n_steps and (
            done % cfg.checkpoint_every == 0
            or time.perf_counter() - last_ckpt > 60 * cfg.checkpoint_minutes
        ):
            if main:
                save_checkpoint(
                    ckpt_path,
                    _state(clt, opt, fire, norm, cfg, done, n_steps, harvest_rate, step_s, thr),
                )
            dist.barrier()
            last_ckpt = time.perf_counter()
        if on_step is not None:
            on_step(done)
        # A budget is a promise: when steps ran slower than planned (a busier machine), stop
        # here and export; running the same command again resumes the planned schedule.
        over = (
            budget_s is not None and time.perf_counter() - t_start > budget_s - cfg.reserve_seconds
        )
        if done < n_steps and dist.broadcast(float(over)) > 0:
            if main:
                _log(log_path, {
                    "step": done, "event": "budget_stop", "planned_steps": n_steps,
                    "elapsed_s": round(time.perf_counter() - t_start, 3), "budget_s": budget_s,
                })  # fmt: skip
                save_checkpoint(
                    ckpt_path,
                    _state(clt, opt, fire, norm, cfg, done, n_steps, harvest_rate, step_s, thr),
                )
            break
    else:
        done = n_steps
    if bar is not None:
        bar.close()

    # Final: checkpoint, export with normalisation folded in, plot.
    result_metrics = {}
    exported = export(
        clt,
        norm,
        {
            "steps": done,
            "planned_steps": n_steps,
            "batch_tokens": cfg.batch_tokens,
            "recipe": asdict(cfg),
        },
    )
    if main and done == n_steps:
        save_checkpoint(
            ckpt_path,
            _state(clt, opt, fire, norm, cfg, n_steps, n_steps, harvest_rate, step_s, thr),
        )
    if main:
        final = (
            last_eval
            if last_eval.get("step") == done
            else _eval_record(clt, held, norm, fire, cfg, spliced_eval, done)
        )
        result_metrics = {k: v for k, v in final.items() if k != "event"}
        exported.cfg.training["metrics"] = {
            k: v for k, v in result_metrics.items() if not k.endswith("_per_layer")
        }
        save_export(exported, out / "transcoder")
        result_metrics.update(
            harvest_tokens_per_s=harvest_rate,
            train_tokens_per_s=tokens_done / opt_s if tokens_done else None,
            steps=done,
            planned_steps=n_steps,
            wall_s=round(time.perf_counter() - t_start, 1),
        )
        (out / "metrics.json").write_text(json.dumps(result_metrics, indent=2))
        if plot:
            plot_curves(log_path, out / "curves.png")
    dist.barrier()
    return TrainResult(
        exported,
        result_metrics,
        out,
        done,
        harvest_rate,
        tokens_done / opt_s if tokens_done else float("nan"),
        read_log(log_path) if main else [],
    )


# --- helpers of the loop ---------------------------------------------------------------------


def _check_config(cfg: TrainConfig, dist: Dist, tokens: torch.Tensor) -> None:
    shards = cfg.data_shards or dist.world
    if shards % dist.world:
        raise ValueError(f"data_shards {shards} must be a multiple of the world size {dist.world}")
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
    if cfg.activation == "topk" and not 0 < cfg.topk <= cfg.n_features:
        raise ValueError(f"topk {cfg.topk} must be in 1..n_features ({cfg.n_features})")


def _budget_guard(budget_s: float | None, t_start: float, n_tokens: int):
    """on_batch callback for the first harvest: fail fast when the budget cannot fit it."""
    if budget_s is None:
        return None
    got = [0, 0.0]

    def check(n: int, seconds: float) -> None:
        got[0] += n
        got[1] += seconds
        need = got[1] / got[0] * n_tokens  # estimated time to fill the first buffer
        if time.perf_counter() - t_start + need - got[1] > budget_s:
            raise BudgetError(
                f"a budget of {budget_s / 60:.2f} minutes is too small to train one step: "
                f"harvesting the first buffer of {n_tokens} tokens alone needs about "
                f"{need / 60:.2f} minutes at {got[0] / got[1]:.0f} tokens/s. Give a larger "
                "budget or a smaller buffer (buffer_tokens)"
            )

    return check


def _probe_step_seconds(clt, cfg, batch, fire, dist) -> float:
    """Time a few optimisation steps on a throwaway copy (the real run is untouched)."""
    probe = copy.deepcopy(clt)
    opt = torch.optim.Adam(probe.parameters(), lr=0.0)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        res = objective(probe, *batch, cfg, 0.0, fire.dead_mask())
        opt.zero_grad()
        res.loss.backward()
        for p in probe.parameters():
            if p.grad is not None:
                dist.mean(p.grad)
        opt.step()
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)  # GPU work is asynchronous: time all of it
        times.append(time.perf_counter() - t)
    return min(times[1:])


def _plan_steps(cfg, budget_s, t_start, step_s, steps_per_round, round_s, dist) -> int:
    """As many steps as fit in what is left of the budget (decided on rank 0)."""
    left = budget_s - (time.perf_counter() - t_start) - cfg.reserve_seconds
    per_step = step_s + round_s / steps_per_round
    n = dist.broadcast(math.floor(left / per_step) if left > 0 else 0)
    if n < 1:
        raise BudgetError(
            f"a budget of {cfg.budget_minutes:.2f} minutes is too small to train one step: "
            f"setup used {time.perf_counter() - t_start:.0f} s, a step takes {step_s:.2f} s and "
            f"{cfg.reserve_seconds:.0f} s are kept for the final evaluation. Give a larger budget"
        )
    return int(n)


def _state(clt, opt, fire, norm, cfg, step, n_steps, harvest_rate, step_s, thr) -> dict:
    return {
        "model": clt.state_dict(),
        "optim": opt.state_dict(),
        "fire": fire.state_dict(),
        "normalizer": norm.to_dict(),
        "config": asdict(cfg),
        "step": step,
        "n_steps": n_steps,
        "harvest_rate": harvest_rate,
        "step_seconds": step_s,
        "torch_rng": torch.get_rng_state(),
        "clt_config": asdict(clt.cfg),
        "outlier_thresholds": thr.tolist(),  # raw units, fixed at round 0
    }


def _eval_record(clt, held, norm, fire, cfg, spliced_eval, step) -> dict:
    """An eval record (transcoders.evaluation): NMSE over all / non-start / inlier held-out
    positions, outlier share, L0, dead (training window and held-out), and the spliced run."""
    ev = evaluate_heldout(
        clt, held, norm.in_scale, norm.out_scale, cfg.activation, cfg.topk, cfg.bandwidth
    )
    fired = ev.pop("fired")
    per_layer = {**ev, "dead": fire.dead_fraction(), "dead_heldout": (~fired).float().mean(-1)}
    rec = {"step": step, "event": "eval", **summarize(per_layer)}
    if spliced_eval is not None:
        with torch.no_grad():
            # On the device the transcoder trains on (the export itself is a CPU copy).
            rec["spliced"] = spliced_eval(export(clt, norm).to(clt.W_enc.device))
    return rec


def _postfix(res: StepOut, fire: FireTracker, ev: dict) -> dict:
    pf = {
        "mse": f"{float(res.mse_per_layer.mean()):.3f}",
        "L0": f"{float(res.l0.mean()):.1f}",
        "dead": f"{float(fire.dead_fraction().mean()):.1%}",
    }
    if "nmse" in ev:
        pf["eval_nmse"] = f"{ev['nmse']:.3f}"
    if "spliced" in ev:
        pf["KL"] = f"{ev['spliced'].get('kl', float('nan')):.3f}"
        pf["top1"] = f"{ev['spliced'].get('top1', float('nan')):.2f}"
    return pf


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )


def _log(path: Path, rec: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log consistent with a resumed run: drop records after the checkpoint's step."""
    recs = [r for r in read_log(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def plot_curves(log_path: Path, png: Path) -> Path | None:
    """Training curves (loss, NMSE, L0, dead fraction, spliced KL / top-1) as one PNG."""
    recs = read_log(log_path)
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("event") == "eval"]
    if not train_recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    s = [r["step"] for r in train_recs]
    es = [r["step"] for r in evals]
    panels = [
        ("loss", [(s, [r["loss"] for r in train_recs], "train")], True),
        (
            "NMSE (held-out)",
            [
                (es, [r["nmse"] for r in evals], "mean"),
                (s, [r["train_nmse"] for r in train_recs], "train ~"),
            ],
            True,
        ),
        (
            "L0 per layer",
            [
                (s, [r["l0"] for r in train_recs], "train"),
                (es, [r["l0"] for r in evals], "held-out"),
            ],
            False,
        ),
        ("dead fraction", [(s, [r["dead"] for r in train_recs], "train window")], False),
        (
            "spliced KL (nats)",
            [(es, [r["spliced"]["kl"] for r in evals if "spliced" in r], "KL")]
            if any("spliced" in r for r in evals)
            else [],
            True,
        ),
        (
            "spliced top-1 agreement",
            [(es, [r["spliced"]["top1"] for r in evals if "spliced" in r], "top-1")]
            if any("spliced" in r for r in evals)
            else [],
            False,
        ),
    ]
    for ax, (title, series, logy) in zip(axes.flat, panels, strict=True):
        for xs, ys, label in series:
            if len(xs) == len(ys) and ys:
                ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if logy and series and all(v > 0 for _, ys, _ in series for v in ys):
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def numpy_tokens(tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens), dtype=torch.long)
