"""Train a cross-layer (or per-layer / skip) transcoder from cached MLP activations.

Read :class:`Trainer` top to bottom. :meth:`Trainer.run`: harvest the held-out set and the
first ``buffer_tokens`` of training activations into the activation cache
(:mod:`.activation_cache`), then either start (normalise, initialise, size the run to its budget
and harvest the rest) or resume from the checkpoint; then loop (batch from the cache -> loss ->
Adam step -> metrics -> eval -> checkpoint, a budgeted run re-planning from its recent step
times, :mod:`.planner`) and finish (export with normalisation folded in, metrics, curves).

Data order: the training rows (the first ``n_sequences`` cached sequences) are visited as an
endless stream of seeded permutations, one per epoch; global batch k is stream positions
[k * batch_tokens, (k + 1) * batch_tokens), and rank r of W data-parallel ranks takes the r-th
of W equal slices of it. Everything random is a function of (seed, step).

A run resumes exactly (same final weights as an uninterrupted run) from its last checkpoint, or
from its last complete cache chunk when it was killed while harvesting: the checkpoint holds the
model, the optimiser, the dead-feature counters, the step plan and the step, written atomically
(:mod:`.checkpoint`); cached activations are the same bytes whichever run harvested them. A
budgeted run sizes itself from measured times, so only its continuation, not its plan, is
reproducible.

Data parallel: run one process per rank under torchrun (gloo on CPU, NCCL on GPU) with a cache
folder the ranks share (one machine, or a shared filesystem): ranks harvest disjoint chunks,
gradients are averaged, so W ranks give the result of one process on the same global batch.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.device import DeviceSetting
from transcoders.evaluation import Heldout, evaluate_heldout
from transcoders.frequency import firing_counts, frequency_report, frequency_summary
from transcoders.metrics import FireTracker, summarize
from transcoders.normalize import Normalizer, from_mean_squares, mean_square_norms
from transcoders.training import log as trainlog
from transcoders.training import outliers
from transcoders.training.activation_cache import ActivationCache, CacheSpec, check_spec
from transcoders.training.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from transcoders.training.config import TrainConfig, TrainResult, check_config
from transcoders.training.distributed import Dist
from transcoders.training.export import export, save_export
from transcoders.training.harvest import ActivationFn, seed_mix
from transcoders.training.objective import objective
from transcoders.training.planner import BudgetError, BudgetPlanner, StepPlan, lr_at, sparsity_at
from transcoders.training.skip_fit import fit_skip
from transcoders.training.sparse_adam import SparseRowAdam, densify_mean
from transcoders.training.trainable import TrainableTranscoder

TRAIN_SET = "train"


class Trainer:
    """One training run of recipe ``cfg`` on ``train_tokens`` [S, P] (rows start with BOS),
    evaluated on ``heldout_tokens``; see :func:`transcoders.training.run.train` for the arguments.
    ``clock`` (seconds) times the budget, the plan and the steps (a fake one in tests)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        activations: ActivationFn,
        train_tokens: torch.Tensor,
        heldout_tokens: torch.Tensor,
        n_layers: int,
        d_model: int,
        out_dir: str | os.PathLike,
        model_name: str | None = None,
        model_id: str = "",
        corpus: str = "",
        cache: str | os.PathLike | ActivationCache | None = None,
        spliced_eval: Callable[[CrossLayerTranscoder], dict] | None = None,
        resume: bool = True,
        progress: bool = True,
        plot: bool = True,
        on_step: Callable[[int], None] | None = None,
        device: str | torch.device | DeviceSetting | None = "cpu",
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg
        self.activations = activations
        self.train_tokens = train_tokens
        self.heldout_tokens = heldout_tokens
        self.n_layers, self.d_model = n_layers, d_model
        self.model_name = model_name
        self.spliced_eval = spliced_eval
        self.resume, self.progress, self.plot = resume, progress, plot
        self.on_step = on_step
        self.clock = clock
        self.dev = DeviceSetting.parse(device).device
        self.dist = Dist.from_env(self.dev)
        self.main = self.dist.rank == 0
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / CHECKPOINT
        self.log_path = self.out / trainlog.LOG
        self.keep = train_tokens.shape[-1] - int(cfg.skip_bos)
        self.budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
        spec = CacheSpec(
            model=model_name or "model",
            n_layers=n_layers,
            d_model=d_model,
            input_site=cfg.input_site,
            skip_bos=cfg.skip_bos,
            model_id=model_id,
            corpus=corpus,
            dtype=cfg.cache_dtype,
        )
        if isinstance(cache, ActivationCache):
            check_spec(cache.folder, cache.manifest(), spec)
            self.cache = cache
        else:
            self.cache = ActivationCache(self.out / "activations" if cache is None else cache, spec)
        self.harvest_rate = float("nan")  # tokens/s
        self.step_s = float("nan")  # probed seconds per optimisation step

    # --- the run, top to bottom --------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        check_config(cfg, self.dist.world, self.train_tokens)
        torch.manual_seed(cfg.seed)
        self.t_start = self.clock()
        self.planner = (
            BudgetPlanner(
                self.budget_s,
                self.t_start,
                cfg.reserve_seconds,
                cfg.replan_every,
                cfg.replan_every,
                self.clock,
            )
            if self.budget_s is not None and cfg.steps is None
            else None
        )
        self.held = self.heldout_activations()
        # Initialised on the CPU (the same random start on every device), then moved.
        self.clt = TrainableTranscoder.from_clt(CrossLayerTranscoder(self.clt_config()))
        self.clt = self.clt.to(self.dev)
        self.opt = make_optimizer(self.clt, cfg)
        self.fire = FireTracker(
            self.n_layers, cfg.n_features, cfg.dead_window_tokens, device=self.dev
        )
        if self.resume and self.ckpt_path.exists():
            start = self.restore()
        else:
            start = self.start_fresh()
        done = self.loop(start)
        return self.finish(done)

    def heldout_activations(self) -> Heldout | None:
        """Raw held-out activations with every position, start token included (rank 0, which
        evaluates; :class:`transcoders.evaluation.Heldout`), on the device."""
        if not self.main:
            return None
        return Heldout.harvest(
            self.activations, self.heldout_tokens, batch=self.cfg.harvest_batch, device=self.dev
        )

    def start_fresh(self) -> int:
        """Normalise and initialise from the first buffer, size the run, harvest its tokens."""
        cfg = self.cfg
        fit_tokens = min(cfg.buffer_tokens, cfg.cache_tokens or cfg.buffer_tokens)
        n_fit = min(len(self.train_tokens), math.ceil(fit_tokens / self.keep))
        self.harvest_training(n_fit, guard=True)
        xs, ys = self.cache.read(TRAIN_SET, n_fit).get(slice(None))  # raw [L, N, d]
        self.initialise(xs.to(self.dev), ys.to(self.dev))
        if cfg.steps is not None:
            n_steps = cfg.steps
            want = cfg.cache_tokens or math.ceil(cfg.steps * cfg.batch_tokens / cfg.passes)
            n_seqs = math.ceil(want / self.keep)
        else:
            self.step_s = self.probe_step_seconds(xs, ys)
            cached = self.cache.complete_sequences(TRAIN_SET, self.train_tokens) * self.keep
            n_tok = cfg.cache_tokens or self.planner.harvest_size(
                cached,
                len(self.train_tokens) * self.keep,
                self.harvest_rate,
                self.step_s,
                cfg.batch_tokens,
                cfg.passes,
            )
            n_seqs = int(self.dist.broadcast(math.ceil(n_tok / self.keep)))
        del xs, ys
        _release_freed_memory()  # the first buffer's float32 copies (GBs at model size)
        self.n_seqs = min(len(self.train_tokens), max(n_fit, n_seqs))
        self.harvest_training(self.n_seqs)
        # The baseline evaluation (a spliced forward pass too) before the steps are sized.
        baseline = self.eval_record(0) if self.main else {}
        if self.planner is not None:
            n_steps = int(self.dist.broadcast(self.planner.steps_that_fit(self.step_s)))
            if n_steps < 1:
                raise BudgetError(
                    f"a budget of {cfg.budget_minutes:.2f} minutes is too small to train one "
                    f"step: setup used {self.clock() - self.t_start:.0f} s, a step takes "
                    f"{self.step_s:.2f} s and {cfg.reserve_seconds:.0f} s are kept for the final "
                    "evaluation. Give a larger budget"
                )
        self.plan = StepPlan(n_steps)
        self.open_data()
        if self.main:
            self.log_path.unlink(missing_ok=True)
            trainlog.append(
                self.log_path, {"step": 0, "event": "start", **self.meta(), "config": asdict(cfg)}
            )
            trainlog.append(self.log_path, baseline)
        return 0

    def restore(self) -> int:
        """Continue from the checkpoint (its recipe must be this one)."""
        state = load_checkpoint(self.ckpt_path)
        if state["config"] != asdict(self.cfg):
            raise ValueError(
                f"{self.ckpt_path} was written by a run with a different recipe; give another "
                "output folder, or pass --no-resume to start over"
            )
        self.clt.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.fire.load_state_dict(state["fire"])
        norm = Normalizer.from_dict(state["normalizer"])
        self.thr = torch.tensor(state["outlier_thresholds"], device=self.dev)
        self.norm = Normalizer(norm.in_scale.to(self.dev), norm.out_scale.to(self.dev))
        self.plan = StepPlan.from_dict(state["plan"])
        self.n_seqs = state["n_sequences"]
        self.harvest_rate, self.step_s = state["harvest_rate"], state["step_seconds"]
        torch.set_rng_state(state["torch_rng"])
        self.harvest_training(self.n_seqs)  # a no-op unless the cache lost chunks
        self.open_data()
        if self.main:
            trainlog.truncate(self.log_path, state["step"])
        return state["step"]

    def loop(self, start: int) -> int:
        """Steps ``start`` .. the plan's end (which a budgeted run moves); returns steps done."""
        cfg, dist, plan = self.cfg, self.dist, self.plan
        bar = trainlog.progress_bar(plan.total, start, self.progress and self.main)
        last_ckpt = t_prev = self.clock()
        self.last_eval: dict = {}
        self.tokens_done, self.opt_s = 0, 0.0
        step = start
        while step < plan.total:
            self.maybe_replan(step, bar)
            t_opt = self.clock()
            x, y = self.batch(step)
            lr = lr_at(step, plan, cfg.lr, cfg.lr_final_frac, cfg.lr_warmup_frac)
            for g in self.opt.param_groups:
                g["lr"] = lr
            lam = sparsity_at(step, plan, cfg.sparsity_coef, cfg.sparsity_warmup_frac)
            wt = (
                outliers.batch_weights(y, self.thr * self.norm.out_scale, cfg.outlier_weight)
                if "loss" in cfg.outlier_uses
                else None
            )
            res = objective(self.clt, x, y, cfg, lam, self.fire.dead_mask(), wt)
            self.opt.zero_grad(set_to_none=True)
            res.loss.backward()
            mean_grads(self.clt, dist)
            self.opt.step()
            if cfg.activation == "jumprelu":
                with torch.no_grad():
                    self.clt.threshold.clamp_(min=1e-4)
            self.fire.update(dist.any(res.fired), cfg.batch_tokens)
            self.tokens_done += cfg.batch_tokens
            self.opt_s += self.clock() - t_opt  # optimisation only (no eval / saving)

            done = step + 1
            last = done == plan.total
            if done % cfg.log_every == 0 or last:
                # Collective first (every rank), then rank 0 writes.
                mse_all = float(dist.mean(res.mse_per_layer.clone()).mean())
                if self.main:
                    trainlog.append(self.log_path, self.step_record(done, lr, lam, res, mse_all))
            if self.main and (done % cfg.eval_every == 0 or last):
                self.last_eval = self.eval_record(done)
                trainlog.append(self.log_path, self.last_eval)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(trainlog.postfix(res, self.fire, self.last_eval), refresh=False)
            if not last and (
                done % cfg.checkpoint_every == 0
                or self.clock() - last_ckpt > 60 * cfg.checkpoint_minutes
            ):
                self.checkpoint(done)
                last_ckpt = self.clock()
            if self.on_step is not None:
                self.on_step(done)
            now = self.clock()
            if self.planner is not None:
                self.planner.observe(now - t_prev)
            t_prev = now
            if not last and self.over_budget():
                # The plan is re-sized as steps slow down, but a step that stalls past the
                # budget still stops the run here; the same command resumes the plan.
                if self.main:
                    trainlog.append(self.log_path, {
                        "step": done, "event": "budget_stop", "planned_steps": plan.total,
                        "elapsed_s": round(now - self.t_start, 3), "budget_s": self.budget_s,
                    })  # fmt: skip
                self.checkpoint(done)
                step = done
                break
            step = done
        if bar is not None:
            bar.close()
        return step

    def finish(self, done: int) -> TrainResult:
        """Export (normalisation folded in), write weights, metrics and curves."""
        cfg, plan = self.cfg, self.plan
        extra = {
            "steps": done,
            "planned_steps": plan.total,
            "batch_tokens": cfg.batch_tokens,
            "recipe": asdict(cfg),
        }
        exported = export(self.clt, self.norm, extra)
        if done == plan.total:
            self.checkpoint(done)
        metrics: dict = {}
        train_rate = self.tokens_done / self.opt_s if self.tokens_done else float("nan")
        if self.main:
            final = self.last_eval if self.last_eval.get("step") == done else self.eval_record(done)
            metrics = {k: v for k, v in final.items() if k != "event"}
            metrics["frequency"] = self.frequency()
            exported.cfg.training["metrics"] = {
                k: v for k, v in metrics.items() if not k.endswith("_per_layer")
            }
            exported.cfg.training["metrics"]["frequency"] = frequency_summary(metrics["frequency"])
            save_export(exported, self.out / "transcoder")
            metrics.update(
                harvest_tokens_per_s=self.harvest_rate,
                train_tokens_per_s=train_rate if self.tokens_done else None,
                steps=done,
                planned_steps=plan.total,
                replans=plan.replans,
                cache_tokens=len(self.data),
                passes=round(done * cfg.batch_tokens / max(1, len(self.data)), 3),
                wall_s=round(self.clock() - self.t_start, 1),
            )
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            if self.plot:
                trainlog.plot_curves(self.log_path, self.out / "curves.png")
        self.dist.barrier()
        return TrainResult(
            exported,
            metrics,
            self.out,
            done,
            self.harvest_rate,
            train_rate,
            trainlog.read_log(self.log_path) if self.main else [],
        )

    def frequency(self) -> dict:
        """Firing frequency of every feature on the held-out positions (start token excluded):
        :func:`transcoders.frequency.frequency_report`."""
        cfg = self.cfg
        with torch.no_grad():
            counts, n = firing_counts(
                self.clt, self.held, self.norm.in_scale, cfg.activation, cfg.topk, cfg.bandwidth
            )
        return frequency_report(counts.cpu(), n)

    # --- data --------------------------------------------------------------------------------

    def harvest_training(self, n_seqs: int, guard: bool = False) -> None:
        """Make training sequences [0, n_seqs) complete in the cache (ranks share the chunks);
        records the harvest rate. ``guard``: fail fast when the budget cannot fit it."""
        have = self.cache.complete_sequences(TRAIN_SET, self.train_tokens)
        need_tokens = max(0, n_seqs - have) * self.keep
        got = [0, 0.0]
        bar = trainlog.harvest_bar(need_tokens, self.progress and self.main)

        def on_chunk(chunk: int, n_tokens: int, seconds: float) -> None:
            got[0] += n_tokens
            got[1] += seconds
            if bar is not None:
                bar.update(n_tokens)
            if guard and self.budget_s is not None:
                need = got[1] / got[0] * need_tokens  # estimated time of the whole harvest
                if self.clock() - self.t_start + need - got[1] > self.budget_s:
                    raise BudgetError(
                        f"a budget of {self.budget_s / 60:.2f} minutes is too small to train one "
                        f"step: harvesting the first buffer of {need_tokens} tokens alone needs "
                        f"about {need / 60:.2f} minutes at {got[0] / got[1]:.0f} tokens/s. Give a "
                        "larger budget or a smaller buffer (buffer_tokens)"
                    )

        self.cache.harvest(
            TRAIN_SET,
            self.train_tokens,
            self.activations,
            n_seqs,
            chunk_sequences=self.cfg.chunk_sequences,
            batch=self.cfg.harvest_batch,
            rank=self.dist.rank,
            world=self.dist.world,
            on_chunk=on_chunk,
        )
        if bar is not None:
            bar.close()
        self.dist.barrier()  # every rank's chunks are complete before anyone reads them
        if got[0]:
            rate = got[0] / max(got[1], 1e-9)
        else:  # nothing harvested now: the rate the cache recorded (this model, this machine)
            n, s = self.cache.harvest_seconds(TRAIN_SET)
            rate = n / s if s > 0 else float("nan")
        self.harvest_rate = float(self.dist.broadcast(rate))

    def open_data(self) -> None:
        self.data = self.cache.read(TRAIN_SET, self.n_seqs)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of global batch ``step``, normalised, on the device."""
        B, W, r = self.cfg.batch_tokens, self.dist.world, self.dist.rank
        lo = step * B + r * B // W
        rows = stream_rows(self.cfg.seed, len(self.data), lo, lo + B // W)
        return self.normalised(*self.data.get(rows))

    def normalised(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = x.to(self.dev), y.to(self.dev)
        return x * self.norm.in_scale[:, None, None], y * self.norm.out_scale[:, None, None]

    # --- start -------------------------------------------------------------------------------

    def clt_config(self) -> TranscoderConfig:
        cfg = self.cfg
        return TranscoderConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_features=cfg.n_features,
            kind=cfg.kind,
            activation=cfg.activation,
            topk=cfg.topk if cfg.activation == "topk" else None,
            skip=cfg.skip,
            input_site=cfg.input_site,
            model_name=self.model_name,
        )

    @torch.no_grad()
    def initialise(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """Normaliser, skip fit (or b_dec at the mean output), small decoders, thresholds from
        raw activations xs, ys [L, N, d] (every rank reads the same cached rows)."""
        cfg, clt = self.cfg, self.clt
        # Outlier thresholds (raw units; transcoders.training.outliers) averaged over the data
        # shards of
        # these rows, so any number of ranks gets the same; outliers count in neither the
        # scales nor the skip fit nor b_dec (each where cfg.outlier_uses names it).
        shards = cfg.data_shards or self.dist.world
        self.thr = outliers.buffer_thresholds(
            [c.transpose(0, 1) for c in ys.chunk(shards, dim=1)],
            cfg.outlier_rule,
            cfg.outlier_factor,
        ).to(self.dev)
        inlier = (~outliers.outlier_mask(ys, self.thr)).float()  # [L, N]
        everyone = torch.ones_like(inlier)
        keep = inlier if "scales" in cfg.outlier_uses else everyone
        kept = keep.mean(1)  # [L] share kept
        ms_in = mean_square_norms(xs * keep[..., None]) / kept
        ms_out = mean_square_norms(ys * keep[..., None]) / kept
        self.norm = from_mean_squares(ms_in, ms_out, self.d_model)
        y_norm = ys.float() * self.norm.out_scale[:, None, None]
        keep = inlier if "skip" in cfg.outlier_uses else everyone
        if clt.W_skip is not None and cfg.skip_init == "lstsq":
            x_norm = xs.float() * self.norm.in_scale[:, None, None]
            w, b = fit_skip(x_norm, y_norm, cfg.skip_ridge, weight=keep)
            clt.W_skip.copy_(w)
            clt.b_dec.copy_(b)
        else:
            clt.b_dec.copy_((y_norm * keep[..., None]).mean(1) / keep.mean(1)[:, None])
        for w in clt.D:
            w.mul_(cfg.decoder_init_scale)
        if cfg.activation == "jumprelu":
            clt.threshold.fill_(cfg.threshold_init)

    def probe_step_seconds(self, xs: torch.Tensor, ys: torch.Tensor) -> float:
        """Time a few optimisation steps on a throwaway copy (the real run is untouched)."""
        n = self.cfg.batch_tokens // self.dist.world
        rows = torch.arange(n) % xs.shape[1]
        x, y = self.normalised(xs[:, rows], ys[:, rows])
        probe = copy.deepcopy(self.clt)
        opt = make_optimizer(probe, self.cfg, lr=0.0)
        times = []
        for _ in range(3):
            t = self.clock()
            res = objective(probe, x, y, self.cfg, 0.0, self.fire.dead_mask())
            opt.zero_grad()
            res.loss.backward()
            mean_grads(probe, self.dist)
            opt.step()
            if self.dist.device.type == "cuda":
                torch.cuda.synchronize(self.dist.device)  # GPU work is asynchronous
            times.append(self.clock() - t)
        return float(self.dist.broadcast(min(times[1:])))

    # --- the loop's helpers ------------------------------------------------------------------

    def maybe_replan(self, step: int, bar) -> None:
        """A budgeted run re-sizes its plan every ``replan_every`` steps (rank 0 decides)."""
        if self.planner is None or step == 0 or step % self.cfg.replan_every:
            return
        proposal = copy.deepcopy(self.plan)
        self.planner.replan(proposal, step)
        total = int(self.dist.broadcast(proposal.total))
        if total != self.plan.total:
            old = self.plan.total
            self.plan.replan(step, total)
            if self.main:
                trainlog.append(self.log_path, {
                    "step": step, "event": "replan", "planned_steps": self.plan.total,
                    "previous": old, "elapsed_s": round(self.clock() - self.t_start, 3),
                })  # fmt: skip
            if bar is not None:
                bar.total = self.plan.total
                bar.refresh()

    def over_budget(self) -> bool:
        over = (
            self.budget_s is not None
            and self.clock() - self.t_start > self.budget_s - self.cfg.reserve_seconds
        )
        return self.dist.broadcast(float(over)) > 0

    def checkpoint(self, step: int) -> None:
        if self.main:
            save_checkpoint(self.ckpt_path, self.state(step))
        self.dist.barrier()

    def state(self, step: int) -> dict:
        return {
            "model": self.clt.state_dict(),
            "optim": self.opt.state_dict(),
            "fire": self.fire.state_dict(),
            "normalizer": self.norm.to_dict(),
            "config": asdict(self.cfg),
            "step": step,
            "plan": self.plan.to_dict(),
            "n_sequences": self.n_seqs,
            "harvest_rate": self.harvest_rate,
            "step_seconds": self.step_s,
            "torch_rng": torch.get_rng_state(),
            "clt_config": asdict(self.clt.cfg),
            "outlier_thresholds": self.thr.tolist(),  # raw units, fixed at initialisation
        }

    def meta(self) -> dict:
        return {
            "n_steps": self.plan.total,
            "n_sequences": self.n_seqs,
            "cache_tokens": len(self.data),
            "cache": str(self.cache.folder),
            "harvest_tokens_per_s": self.harvest_rate,
            "step_seconds": self.step_s,
            "batch_tokens": self.cfg.batch_tokens,
            "world": self.dist.world,
        }

    def step_record(self, done: int, lr: float, lam: float, res, mse_all: float) -> dict:
        return {
            "step": done,
            "lr": lr,
            "sparsity_coef": lam,
            "loss": float(res.loss.detach()),
            **{k: round(v, 6) for k, v in res.parts.items()},
            "train_nmse": mse_all,
            "l0": float(res.l0.mean()),
            "dead": float(self.fire.dead_fraction().mean()),
            "elapsed_s": round(self.clock() - self.t_start, 2),
        }

    def eval_record(self, step: int) -> dict:
        """An eval record (transcoders.evaluation): NMSE over all / non-start / inlier held-out
        positions, outlier share, L0, dead (training window and held-out), spliced run."""
        cfg = self.cfg
        ev = evaluate_heldout(
            self.clt,
            self.held,
            self.norm.in_scale,
            self.norm.out_scale,
            cfg.activation,
            cfg.topk,
            cfg.bandwidth,
        )
        fired = ev.pop("fired")
        per_layer = {
            **ev,
            "dead": self.fire.dead_fraction(),
            "dead_heldout": (~fired).float().mean(-1),
        }
        rec = {"step": step, "event": "eval", **summarize(per_layer)}
        if self.spliced_eval is not None:
            with torch.no_grad():
                # On the device the transcoder trains on (the export itself is a CPU copy).
                rec["spliced"] = self.spliced_eval(export(self.clt, self.norm).to(self.dev))
        return rec


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so the resident
    memory of a run would stay at its initialisation peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_optimizer(
    model: TrainableTranscoder, cfg: TrainConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """Adam over the model's parameters: the lazy row-sparse one (:mod:`.sparse_adam`) when
    the recipe asks for sparse updates (TopK), else ``torch.optim.Adam``."""
    lr = cfg.lr if lr is None else lr
    if cfg.activation == "topk" and cfg.sparse_updates:
        return SparseRowAdam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


def mean_grads(model: TrainableTranscoder, dist: Dist) -> None:
    """Average every gradient over the data-parallel ranks (sparse ones over the union of the
    rows the ranks touched; a no-op for one process)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = densify_mean(dist, p.grad)


def stream_rows(seed: int, n_rows: int, lo: int, hi: int) -> np.ndarray:
    """Rows at positions [lo, hi) of the endless stream of seeded permutations of
    range(n_rows), one per epoch (epoch e's permutation is seeded by (seed, e))."""
    pos = np.arange(lo, hi)
    epochs, within = pos // n_rows, pos % n_rows
    out = np.empty(len(pos), dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_order(seed, int(e), n_rows)[within[sel]]
    return out


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed_mix(seed, epoch))
    return torch.randperm(n_rows, generator=g).numpy()
