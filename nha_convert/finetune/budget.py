"""How long a stage runs: a step count known up front (steps, tokens) or a time budget fixed after timing; and what
a full run costs, projected from the measured steps of a short one (`--budget smoke`).

One StepBudget per stage is shared by the training loop and the LR schedule: when a time budget turns into a step
count, the schedule's decay follows at once (its lambda reads `budget.steps`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import NHAError
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


# --- what a full run costs, from a short run's measured steps (`--budget smoke`) ------------------------------

SMOKE = "smoke"  # the budget name after which nha-finetune prints the projection
PROJECTED_GPUS = (1, 8)


@dataclass
class StageCost:
    """One stage of the full recipe: its step time measured here, its step count and wall time on each GPU count."""

    stage: str
    s_per_step: float  # mean of the measured steps after the first (which compiles and autotunes)
    steps_timed: int
    peak_mem_gib: float | None
    steps: dict[int, int | None]  # GPUs -> steps of the full recipe (None: a time budget)
    hours: dict[int, float]  # GPUs -> wall hours


Measured = dict[str, tuple[float, int, "float | None", float]]


def measured_step_times(metrics: Path) -> Measured:
    """stage -> (seconds per step, steps timed, peak GiB, seconds of all its steps) from a run's metrics.jsonl (one
    line per step: log_every 1). A stage with fewer than 2 logged steps has no time (the first step warms up)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "event" not in rec and "time_s" in rec and "step" in rec:
            rows.setdefault(rec["stage"], []).append(rec)
    out = {}
    for stage, recs in rows.items():
        if len(recs) >= 2 and recs[-1]["step"] > recs[0]["step"]:
            per_step = (recs[-1]["time_s"] - recs[0]["time_s"]) / (recs[-1]["step"] - recs[0]["step"])
            peaks = [r["peak_mem_gib"] for r in recs if "peak_mem_gib" in r]
            out[stage] = (per_step, recs[-1]["step"] - recs[0]["step"], max(peaks) if peaks else None,
                          recs[-1]["time_s"])
    return out


def project(full: list[StageSpec], measured: Measured,
            gpus: tuple[int, ...] = PROJECTED_GPUS) -> list[StageCost]:
    """The full recipe's stages (as written, no budget) at the measured step times: the per-GPU work of a step
    (batch_size x grad_accum rows of seq_len) is the same on any GPU count, so a step takes as long on N GPUs
    (DDP's gradient all-reduce of LoRA and gates aside) and there are N times fewer of them."""
    from .recipe import stage_name

    costs = []
    for stage in full:
        name = stage_name(stage)
        if name not in measured:
            raise NHAError(f"stage {name}: no step time measured (it needs 2 or more logged steps: log_every 1)")
        per_step, timed, peak, _ = measured[name]
        steps = {n: stage_steps(stage, n) for n in gpus}
        hours = {n: (steps[n] * per_step if steps[n] is not None else stage.minutes * 60) / 3600 for n in gpus}
        costs.append(StageCost(name, per_step, timed, peak, steps, hours))
    return costs


def projection_table(costs: list[StageCost], other_s: float, device: str) -> str:
    """Plain-text table: per stage and in total, steps / wall time / GPU-hours on each GPU count. `other_s`: the
    run's time outside the training steps (loading, conversion and calibration, evaluations, probes, saving),
    counted once per run, as measured here."""
    gpus = list(costs[0].hours) if costs else list(PROJECTED_GPUS)
    head = ["stage", "s/step", "peak GiB"] + [f"{n} GPU{'s' * (n > 1)}: steps, wall, GPU-h" for n in gpus]
    lines = [f"full-run projection on {device} (step times measured here, the recipe's per-GPU settings):",
             " | ".join(head)]
    for c in costs:
        cells = [c.stage, f"{c.s_per_step:.2f}", "-" if c.peak_mem_gib is None else f"{c.peak_mem_gib:.1f}"]
        cells += [f"{c.steps[n] if c.steps[n] is not None else 'timed'}, {_hm(c.hours[n])}, {c.hours[n] * n:.2f}"
                  for n in gpus]
        lines.append(" | ".join(cells))
    total = [sum(c.hours[n] for c in costs) + other_s / 3600 for n in gpus]
    lines.append(" | ".join(["total", "", ""] + [f"{_hm(t)}, {t * n:.2f} GPU-h" for t, n in zip(total, gpus)]))
    lines.append(f"(total includes {other_s / 60:.1f} min measured outside the steps: loading, conversion and "
                 "calibration, evaluations, probes, saving; multi-GPU assumes DDP scales the steps perfectly)")
    return "\n".join(lines)


def _hm(hours: float) -> str:
    minutes = round(hours * 60)
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes >= 60 else f"{hours * 60:.1f} min"


def cost_report(full: list[StageSpec], metrics: Path, run_seconds: float, device: str,
                out: Path | None = None) -> str:
    """The projection of a finished short run (its metrics.jsonl and whole wall time); written as JSON to `out`."""
    measured = measured_step_times(metrics)
    costs = project(full, measured)
    other = max(0.0, run_seconds - sum(m[3] for m in measured.values()))
    if out is not None:
        from ..io import atomic_write

        payload = {"device": device, "other_s": round(other, 1), "stages": [asdict(c) for c in costs]}
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    return projection_table(costs, other, device)


def smoke_cost(recipe_path: Path, overrides: list[str], run_dir: Path, run_seconds: float) -> str:
    """After `nha-finetune RECIPE --budget smoke`: the full recipe (no budget, the same --set) projected from this
    run's steps; also written to RUN/cost.json."""
    import torch

    from .recipe import read_recipe

    full = read_recipe(recipe_path, budget=None, overrides=overrides)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return cost_report(full.stages, run_dir / "metrics.jsonl", run_seconds, device, out=run_dir / "cost.json")
