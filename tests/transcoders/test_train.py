"""The trainer: learning happens, exact resume after kill -9, data-parallel equality, and bad
input (budget too small, failing checkpoint writes, broken configs)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.transcoders import train_worker as tw
from transcoders.training.planner import StepPlan, lr_at, sparsity_at
from transcoders.training.run import (
    CHECKPOINT,
    BudgetError,
    CheckpointError,
    TrainConfig,
    fit_skip,
    load_checkpoint,
    read_log,
    save_checkpoint,
    train,
)

WORKER = Path(tw.__file__)
ROOT = WORKER.parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is many times faster than two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_worker(out: Path, *extra: str, torchrun: int = 0, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(torchrun),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(WORKER),
            str(out),
            *extra,
        ]
    else:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def _finish(p: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out.decode()[-3000:]


def _tiny(tmp_path, cfg: TrainConfig, **kw):
    from tests.conftest import make_tiny_model
    from tracer.spliced_metrics import activation_fn

    model = make_tiny_model("llama", n_layers=3)
    tr, held = tw.tokens()
    return train(
        cfg,
        activations=activation_fn(model),
        train_tokens=tr,
        heldout_tokens=held,
        n_layers=3,
        d_model=32,
        out_dir=tmp_path,
        progress=False,
        plot=False,
        **kw,
    )


@pytest.mark.slow
def test_training_reduces_reconstruction_error(tmp_path):
    cfg = tw.config()
    cfg.steps, cfg.eval_every, cfg.lr = 48, 24, 1e-2
    res = _tiny(tmp_path, cfg)
    evals = [r for r in res.log if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 24, 48]
    assert evals[-1]["nmse"] < 0.8 * evals[0]["nmse"]
    assert res.metrics["l0"] <= cfg.topk
    # The exported weights carry the folded normalisation and the training record.
    assert res.clt.cfg.normalization["folded"] is True
    assert res.clt.cfg.training["steps"] == 48
    assert (tmp_path / "transcoder" / "circuit_atlas.json").exists()


def test_jumprelu_objective_trains_thresholds(tmp_path):
    cfg = tw.config()
    cfg.activation, cfg.steps, cfg.sparsity_coef, cfg.threshold_init = "jumprelu", 12, 0.05, 0.3
    res = _tiny(tmp_path, cfg)
    theta = res.clt.threshold
    assert not torch.allclose(theta, torch.full_like(theta, 0.3))  # STE moved them
    assert all("sparsity" in r and "preact" in r for r in res.log if "loss" in r)


@pytest.mark.slow
def test_resume_after_kill_gives_identical_weights(tmp_path):
    """Uninterrupted run vs. a run SIGKILLed after a checkpoint and resumed: same weights."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _run_worker(full)
    victim = _run_worker(killed, "--sleep", "0.4")  # killed before the reference is awaited
    deadline = time.time() + 200
    step = 0
    while time.time() < deadline and victim.poll() is None:
        if (killed / CHECKPOINT).exists():
            step = load_checkpoint(killed / CHECKPOINT)["step"]
            if step >= 6:
                break
        time.sleep(0.1)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "final.pt").exists()
    assert 6 <= load_checkpoint(killed / CHECKPOINT)["step"] < tw.STEPS
    _finish(ref)
    _finish(_run_worker(killed))  # same command: resumes from the checkpoint
    a = torch.load(full / "final.pt")
    b = torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The resumed log continues the interrupted one: one start event, steps in order.
    steps = [r["step"] for r in read_log(killed / "log.jsonl") if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == tw.STEPS and len(set(steps)) == len(steps)


@pytest.mark.slow
def test_resume_after_kill_during_harvest_gives_identical_weights(tmp_path):
    """A run SIGKILLed while harvesting (some cache chunks complete, no checkpoint yet) and run
    again continues the harvest from its complete chunks, then trains to the same weights."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _run_worker(full)
    victim = _run_worker(killed, "--harvest-sleep", "0.4")
    manifest = killed / "activations" / "manifest.json"
    deadline, chunks = time.time() + 200, {}
    while time.time() < deadline and victim.poll() is None:
        if manifest.exists():
            sets = json.loads(manifest.read_text())["sets"]
            chunks = sets.get("train", {}).get("chunks", {})
            if len(chunks) >= 2:
                break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    kept = json.loads(manifest.read_text())["sets"]["train"]["chunks"]
    assert 2 <= len(kept) < 10  # 38 sequences in chunks of 4: the harvest was cut short
    assert not (killed / CHECKPOINT).exists()
    _finish(ref)
    _finish(_run_worker(killed))
    after = json.loads(manifest.read_text())["sets"]["train"]["chunks"]
    assert len(after) == 10 and all(after[k] == v for k, v in kept.items())  # not re-harvested
    a, b = torch.load(full / "final.pt"), torch.load(killed / "final.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """torchrun with 2 gloo ranks == one process holding both data shards (same global batch)."""
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = _run_worker(one, "--shards", "2")
    p2 = _run_worker(two, torchrun=2)
    _finish(p1)
    _finish(p2)
    a, b = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    for k in a:
        # All-reduce sums in another order than one process's batch mean: float rounding only.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(a["W_enc"], torch.zeros_like(a["W_enc"]))


def test_budget_too_small_for_one_step(tmp_path):
    cfg = tw.config()
    cfg.steps, cfg.budget_minutes = None, 0.0005
    with pytest.raises(BudgetError, match="too small to train one step"):
        _tiny(tmp_path, cfg)
    assert not (tmp_path / CHECKPOINT).exists()


def test_zero_budget_and_missing_length_are_refused(tmp_path):
    cfg = tw.config()
    cfg.steps, cfg.budget_minutes = None, None
    with pytest.raises(ValueError, match="steps or a time budget"):
        _tiny(tmp_path, cfg)
    cfg.budget_minutes = 0
    with pytest.raises(BudgetError, match="positive budget"):
        _tiny(tmp_path, cfg)


def _failing_save(monkeypatch, after: int = 0):
    """Make the checkpoint write fail (partial bytes, then ENOSPC) after ``after`` good ones."""
    real = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] > after:
            f.write(b"partial checkpoint bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"step": 3, "w": torch.arange(5)})
    _failing_save(monkeypatch)
    with pytest.raises(CheckpointError, match="previous checkpoint .* is intact"):
        save_checkpoint(path, {"step": 6, "w": torch.zeros(5)})
    monkeypatch.undo()
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temp file left


def test_disk_full_during_training_then_resume(tmp_path, monkeypatch):
    """A failing write mid-run stops training with a clear error; the last good checkpoint
    resumes to the same weights as an uninterrupted run."""
    cfg = tw.config()
    cfg.steps = 9
    _failing_save(monkeypatch, after=1)  # the checkpoint at step 3 succeeds, step 6 fails
    with pytest.raises(CheckpointError, match="intact"):
        _tiny(tmp_path / "a", cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "a" / CHECKPOINT)["step"] == 3
    resumed = _tiny(tmp_path / "a", cfg)
    fresh = _tiny(tmp_path / "b", cfg)
    for k, v in fresh.clt.state_dict().items():
        assert torch.equal(v, resumed.clt.state_dict()[k]), k


def test_resume_refuses_a_different_recipe(tmp_path):
    cfg = tw.config()
    cfg.steps = 3
    _tiny(tmp_path, cfg)
    cfg.lr = cfg.lr * 2
    with pytest.raises(ValueError, match="different recipe"):
        _tiny(tmp_path, cfg)


def test_bad_shapes_from_activations_are_named(tmp_path):
    tr, held = tw.tokens()

    def bad(tokens):
        return torch.zeros(3, 5, 32), torch.zeros(3, 5, 32)

    with pytest.raises(ValueError, match="expected two"):
        train(
            tw.config(),
            activations=bad,
            train_tokens=tr,
            heldout_tokens=held,
            n_layers=3,
            d_model=32,
            out_dir=tmp_path,
            progress=False,
            plot=False,
        )


def test_lr_and_sparsity_schedules():
    """A plan of 100 steps (progress p = step / 99): warm-up linear in the progress after the
    step up to 0.1, constant to p = 0.2, linear decay to the final fraction at the last step;
    sparsity linear in p up to 0.5."""
    plan = StepPlan(100)
    assert lr_at(0, plan, 1.0, 0.1, 0.1) == pytest.approx((1 / 99) / 0.1)
    assert lr_at(8, plan, 1.0, 0.1, 0.1) == pytest.approx((9 / 99) / 0.1)
    assert lr_at(15, plan, 1.0, 0.1, 0.1) == 1.0
    assert lr_at(60, plan, 1.0, 0.1, 0.1) == pytest.approx(1 - 0.9 * (60 / 99 - 0.2) / 0.8)
    assert lr_at(99, plan, 1.0, 0.1, 0.1) == pytest.approx(0.1)  # the last step: final lr
    assert sparsity_at(0, plan, 2.0, 0.5) == 0.0
    assert sparsity_at(33, plan, 2.0, 0.5) == pytest.approx(2.0 * (33 / 99) / 0.5)
    assert sparsity_at(80, plan, 2.0, 0.5) == 2.0


def test_budget_run_whose_steps_slow_down_replans_and_finishes_its_schedule(tmp_path):
    """A fake clock: every step costs 0.05 s for 30 steps, then 0.25 s (plus 1 ms per clock
    reading, the only time that passes otherwise). The planner sized the
    run from the fast probe; re-planning shrinks it so that the learning-rate schedule still
    reaches its final value at the last step, inside the budget, with no emergency stop."""
    cfg = tw.config()
    cfg.steps, cfg.budget_minutes, cfg.reserve_seconds = None, 0.5, 3.0
    cfg.replan_every, cfg.eval_every, cfg.log_every, cfg.checkpoint_every = 5, 1000, 1, 1000
    offset = [0.0]

    def clock() -> float:  # deterministic: 1 ms per reading plus the injected step times
        offset[0] += 0.001
        return offset[0]

    def slow(done: int) -> None:
        offset[0] += 0.05 if done <= 30 else 0.25

    res = _tiny(tmp_path, cfg, on_step=slow, clock=clock)
    start = next(r for r in res.log if r.get("event") == "start")
    replans = [r for r in res.log if r.get("event") == "replan"]
    steps = [r for r in res.log if "lr" in r]
    assert not [r for r in res.log if r.get("event") == "budget_stop"]
    assert replans and res.steps == replans[-1]["planned_steps"] < start["n_steps"]
    assert steps[-1]["step"] == res.steps
    assert steps[-1]["lr"] == pytest.approx(cfg.lr * cfg.lr_final_frac)
    assert steps[-1]["elapsed_s"] <= 0.5 * 60
    lrs = [r["lr"] for r in steps]
    peak = lrs.index(cfg.lr)  # warm-up to the peak, then the decay never jumps back up
    assert lrs[:peak] == sorted(lrs[:peak])
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))
    assert res.clt.cfg.training["steps"] == res.steps


def test_budget_stops_a_run_whose_step_stalls(tmp_path):
    """One step stalls past the budget (fake clock): the run stops there, exports what it has,
    checkpoints, and a rerun would resume the plan."""
    cfg = tw.config()
    cfg.steps, cfg.budget_minutes, cfg.reserve_seconds = None, 0.4, 5.0
    offset = [0.0]

    def stall(done: int) -> None:
        if done == 4:
            offset[0] += 1000.0

    res = _tiny(tmp_path, cfg, on_step=stall, clock=lambda: time.perf_counter() + offset[0])
    stop = [r for r in res.log if r.get("event") == "budget_stop"]
    assert len(stop) == 1 and res.steps == stop[0]["step"] == 4 < stop[0]["planned_steps"]
    assert stop[0]["budget_s"] == pytest.approx(0.4 * 60)
    assert res.clt.cfg.training["steps"] == 4
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    assert (tmp_path / "transcoder" / "circuit_atlas.json").exists()


def test_fit_skip_matches_numpy_least_squares():
    """Without ridge, fit_skip is ordinary least squares with an intercept, per layer."""
    import numpy as np

    g = torch.Generator().manual_seed(41)
    L, N, d = 2, 200, 5
    x = torch.randn(L, N, d, generator=g)
    y = torch.einsum("lnd,led->lne", x, torch.randn(L, d, d, generator=g)) + torch.randn(
        L, N, d, generator=g
    )
    w, b = fit_skip(x, y, ridge=0.0)
    for l in range(L):
        design = np.concatenate([x[l].double().numpy(), np.ones((N, 1))], axis=1)
        sol = np.linalg.lstsq(design, y[l].double().numpy(), rcond=None)[0]  # [d + 1, d]
        np.testing.assert_allclose(w[l].numpy(), sol[:d].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b[l].numpy(), sol[d], rtol=1e-4, atol=1e-5)
    # A ridge shrinks the map towards zero.
    w_r, _ = fit_skip(x, y, ridge=10.0)
    assert w_r.norm() < w.norm()


def test_fit_skip_at_model_size_and_singular_inputs():
    """The solve works at SmolLM2's size with two threads (MKL's batched LU does not), and a
    layer whose inputs span fewer than d directions, with no ridge, is a clear error."""
    import numpy as np

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(43)
        x = torch.randn(30, 1200, 576, generator=g)
        y = torch.randn(30, 1200, 576, generator=g)
        w, b = fit_skip(x, y, ridge=0.1)
    finally:
        torch.set_num_threads(threads)
    # Layer 7 against numpy's solve of the same ridge system.
    x7, y7 = x[7].double().numpy(), y[7].double().numpy()
    xc, yc = x7 - x7.mean(0), y7 - y7.mean(0)
    cxx, cxy = xc.T @ xc / len(xc), xc.T @ yc / len(xc)
    lam = 0.1 * np.diag(cxx).mean()
    ref = np.linalg.solve(cxx + lam * np.eye(576), cxy)  # [d_in, d_out]
    np.testing.assert_allclose(w[7].numpy(), ref.T, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(b[7].numpy(), y7.mean(0) - x7.mean(0) @ ref, atol=1e-4)

    flat = torch.randn(2, 50, 8, generator=g)
    flat[1, :, 3] = 0.5  # layer 1: a constant input coordinate (zero variance)
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\].*--buffer-tokens"):
        fit_skip(flat, torch.randn(2, 50, 8, generator=g), ridge=0.0)
