"""How long a stage runs: a step count known up front (steps, tokens) or a time budget fixed after timing.

One StepBudget per stage is shared by the training loop and the LR schedule: when a time budget turns into a step
count, the schedule's decay follows at once (its lambda reads `budget.steps`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from .schema import StageSpec

TIMED_STEPS = 5  # a time budget is turned into steps after timing 4 steps (the first one warms up)
PROVISIONAL = 10**9  # the step count of a time budget until it is fixed


def stage_steps(stage: StageSpec, world: int) -> int | None:
    """Steps of a stage, or None for a time budget (fixed once steps are timed)."""
    if stage.steps is not None:
        return stage.steps
    if stage.tokens is None:
        return None
    per_step = stage.batch_size * stage.grad_accum * world * stage.seq_len
    return max(1, math.ceil(stage.tokens / per_step))


class StepBudget:
    """steps: the count the loop runs to (PROVISIONAL while a time budget is being timed); planned: the count
    known before the stage starts (None for a time budget); the clock starts with start()."""

    def __init__(self, stage: StageSpec, world: int):
        self.minutes = stage.minutes
        self.max_minutes = stage.max_minutes  # a safety cap: stops the stage, leaves the schedule as it is
        self.planned = stage_steps(stage, world)
        self.steps = self.planned if self.planned is not None else PROVISIONAL
        self.t_start = 0.0
        self._timed: tuple[float, int] | None = None  # (clock, step) when timing began

    def fix(self, steps: int) -> None:
        self.steps = steps

    def left(self, step: int) -> int:
        return self.steps - step

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def timing_done(self, step: int) -> bool:
        """Called after each step of a time budget: True at the step whose time fixes the count."""
        if self._timed is None:
            self._timed = (time.perf_counter(), step)
            return False
        return step == self._timed[1] + TIMED_STEPS - 1

    def seconds_per_step(self) -> float:
        """Mean time of the timed steps (2..5: the first warms up)."""
        return (time.perf_counter() - self._timed[0]) / (TIMED_STEPS - 1)

    def steps_for_time(self, per_step: float, done: int) -> int:
        """Step count that fills the time budget at `per_step` seconds a step."""
        left = self.minutes * 60 - self.elapsed()
        return done + max(0, int(left / per_step))

    def past_deadline(self) -> bool:
        return self.max_minutes is not None and self.elapsed() / 60 > self.max_minutes


def lr_factor(stage: StageSpec, budget: StepBudget) -> Callable[[int], float]:
    """LR multiplier. A closure, not a callable object: LambdaLR would save an object's attributes into the
    scheduler state of every checkpoint."""
    def f(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.schedule == "constant":
            return 1.0
        span = max(1, budget.steps - stage.warmup_steps)
        progress = min(1.0, (step - stage.warmup_steps) / span)
        shape = 1 - progress if stage.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * shape
    return f
