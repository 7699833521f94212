"""How long a run is: the step plan, its learning-rate and sparsity schedules, and the budget
planner that sizes a run (harvest tokens and steps) and re-sizes it as step times change.

The schedules are functions of *progress* p in [0, 1], not of the step number, and a
:class:`StepPlan` maps steps to progress piecewise linearly. When the planner re-plans at step s
(the steps ran slower or faster than measured at the start), the plan keeps the progress already
made at s and spreads what is left over the new number of remaining steps, so the schedule stays
continuous and always ends: the last planned step has p = 1, where the learning rate is at its
final value, whatever the plan became.

- learning rate: linear warm-up in the progress reached after the step, up to
  ``lr_warmup_frac`` (so the first step's rate is not zero), constant up to p = 0.2, then
  linear decay to ``lr_final_frac`` of ``lr`` at p = 1;
- sparsity coefficient (JumpReLU): linear warm-up to ``sparsity_coef`` at p =
  ``sparsity_warmup_frac``.

Times come from an injectable clock (a fake one in tests), so planning is testable without
waiting.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class BudgetError(ValueError):
    """The time budget cannot fit even one training step."""


@dataclass
class StepPlan:
    """``total`` steps; progress is linear between ``anchors`` (step, progress), the last
    segment ending at (total - 1, 1.0)."""

    total: int
    anchors: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])
    replans: int = 0

    def progress(self, step: int) -> float:
        """p in [0, 1] at ``step`` (0-based): 1.0 at the last planned step and after it."""
        last = self.total - 1
        if step >= last:
            return 1.0
        for (s0, p0), (s1, p1) in zip(self.anchors, [*self.anchors[1:], (last, 1.0)], strict=True):
            if s0 <= step < s1:
                return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
        return self.anchors[-1][1]

    def replan(self, step: int, total: int) -> None:
        """From ``step`` on, run to ``total`` steps (at least step + 1: step is then the last)."""
        total = max(total, step + 1)
        if total == self.total:
            return
        p = self.progress(step)
        self.anchors = [a for a in self.anchors if a[0] < step] + [(step, p)]
        self.total = total
        self.replans += 1

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "anchors": [list(a) for a in self.anchors],
            "replans": self.replans,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        anchors = [(int(s), float(p)) for s, p in d["anchors"]]
        return cls(int(d["total"]), anchors, int(d.get("replans", 0)))


def lr_at(step: int, plan: StepPlan, lr: float, final_frac: float, warmup_frac: float) -> float:
    """The learning rate of ``step``: linear warm-up while the progress after the step is
    below ``warmup_frac``, constant to p = 0.2, then decay to ``final_frac * lr`` at p = 1."""
    warm = plan.progress(step + 1) / max(warmup_frac, 1e-12)
    if warm < 1:
        return lr * warm
    p = plan.progress(step)
    if p < 0.2:
        return lr
    return lr * (1 - (1 - final_frac) * (p - 0.2) / 0.8)


def sparsity_at(step: int, plan: StepPlan, coef: float, warmup_frac: float) -> float:
    """The JumpReLU sparsity coefficient of ``step``: linear in progress up to ``warmup_frac``."""
    return coef * min(1.0, plan.progress(step) / max(warmup_frac, 1e-12))


@dataclass
class BudgetPlanner:
    """Sizes a budgeted run and re-sizes it from the step times it measures.

    ``budget_s``: the whole run's budget (seconds, on ``clock``) from ``t_start``;
    ``reserve_s`` is kept free at the end for the final evaluation and export. Re-planning
    every ``every`` steps uses the mean wall time of the last ``window`` whole loop iterations
    (optimisation, logging, evaluation, checkpoints: everything a step costs)."""

    budget_s: float
    t_start: float
    reserve_s: float = 15.0
    every: int = 25
    window: int = 25
    clock: Callable[[], float] = time.perf_counter
    _times: deque = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        self._times = deque(maxlen=self.window)

    def left(self) -> float:
        """Seconds left for steps (budget minus elapsed minus reserve)."""
        return self.budget_s - (self.clock() - self.t_start) - self.reserve_s

    def steps_that_fit(self, step_s: float) -> int:
        left = self.left()
        return math.floor(left / step_s) if left > 0 and step_s > 0 else 0

    def harvest_size(
        self,
        cached: int,
        available: int,
        harvest_rate: float,
        step_s: float,
        batch_tokens: int,
        passes: float,
    ) -> int:
        """Distinct training tokens to hold when the run starts, ``cached`` of them already in
        the cache (free), at most ``available``: the N >= cached whose harvest plus
        ``passes * N / batch_tokens`` steps just fill what is left of the budget. A cache that
        already covers the budget's passes is used as it is (more passes over it)."""
        left = self.left()
        per_token_train = passes * step_s / batch_tokens
        if cached * per_token_train >= left:
            return cached
        n = (left + cached / harvest_rate) / (1 / harvest_rate + per_token_train)
        return int(min(available, max(cached, math.floor(n))))

    def observe(self, seconds: float) -> None:
        """One loop iteration took ``seconds``."""
        self._times.append(seconds)

    def replan(self, plan: StepPlan, step: int) -> bool:
        """At ``step`` (0-based, about to run), every ``every`` steps: re-size ``plan`` to the
        steps that fit at the recent step time. True when the plan changed."""
        if step == 0 or step % self.every or not self._times or step >= plan.total:
            return False
        step_s = sum(self._times) / len(self._times)
        old = plan.total
        plan.replan(step, step + self.steps_that_fit(step_s))
        return plan.total != old
