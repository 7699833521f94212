"""The step plan and the budget planner, driven by a fake clock and injected step times."""

from __future__ import annotations

import pytest

from transcoders.training.planner import BudgetPlanner, StepPlan, lr_at


def test_replan_keeps_progress_continuous_and_ends_at_one():
    plan = StepPlan(101)  # p = step / 100
    assert plan.progress(40) == pytest.approx(0.4)
    plan.replan(40, 61)  # 21 steps left (40..60) for the remaining 0.6
    assert plan.progress(40) == pytest.approx(0.4)
    assert plan.progress(50) == pytest.approx(0.4 + 0.6 * 10 / 20)
    assert plan.progress(60) == 1.0 and plan.total == 61
    assert plan.progress(39) == pytest.approx(0.39)  # the past is unchanged
    again = StepPlan.from_dict(plan.to_dict())
    assert [again.progress(s) for s in range(61)] == [plan.progress(s) for s in range(61)]
    plan.replan(55, 10)  # nothing fits any more: step 55 becomes the last
    assert plan.total == 56 and plan.progress(55) == 1.0


def test_budget_planner_with_slowing_steps_ends_schedule_within_budget():
    """Simulated run: 100 s budget, 5 s reserve; steps take 0.5 s, then 1.0 s from step 50,
    then 2.0 s from step 80. Re-planning every 10 steps (window 10) ends the learning-rate
    schedule (final value at the last step) inside the budget."""
    now = [0.0]
    planner = BudgetPlanner(100.0, 0.0, 5.0, every=10, window=10, clock=lambda: now[0])
    plan = StepPlan(planner.steps_that_fit(0.5))
    assert plan.total == 190
    step, lrs = 0, []
    while step < plan.total:
        planner.replan(plan, step)
        lrs.append(lr_at(step, plan, 1.0, 0.1, 0.05))
        seconds = 0.5 if step < 50 else 1.0 if step < 80 else 2.0
        now[0] += seconds
        planner.observe(seconds)
        step += 1
    assert now[0] <= 100.0
    assert plan.replans >= 2 and plan.total == step < 190
    assert lrs[-1] == pytest.approx(0.1)
    peak = lrs.index(1.0)
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


def test_harvest_size_balances_harvest_and_passes():
    """N tokens cost N / rate to harvest and passes * N / batch steps of step_s each."""
    planner = BudgetPlanner(1000.0, 0.0, 0.0, clock=lambda: 0.0)
    n = planner.harvest_size(0, 10**9, harvest_rate=100.0, step_s=1.0, batch_tokens=100, passes=4)
    assert n == 1000 * 100 // (1 + 4)  # N/100 + 4N/100 = 1000 s
    # A cache that already covers the budget's passes is used whole (no harvest).
    assert planner.harvest_size(50_000, 10**9, 100.0, 1.0, 100, 4) == 50_000
    # Tokens already cached are free: more fit.
    assert planner.harvest_size(10_000, 10**9, 100.0, 1.0, 100, 4) > n
    assert planner.harvest_size(0, 500, 100.0, 1.0, 100, 4) == 500  # capped by the corpus
