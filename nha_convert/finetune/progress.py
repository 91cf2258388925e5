"""Progress display (rich bar per stage on a terminal, plain lines in logs) and the metrics JSONL log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..io import atomic_write


class StageProgress:
    """Shows step, tokens/s, loss and ETA for one stage; silent on non-main processes."""

    def __init__(self, console: Console, name: str, total: int, start: int, enabled: bool, log_every: int):
        self.console, self.name, self.total, self.enabled = console, name, total, enabled
        self.log_every = max(1, log_every)
        self.start_step = start
        self.t0 = time.perf_counter()
        self._first: tuple[int, float] | None = None  # (step, time) when the first step after (re)start ended
        self.tokens = 0
        self.bar: Progress | None = None
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[tps]} tok/s  loss {task.fields[loss]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.task = self.bar.add_task(name, total=total or None, completed=start, tps="-", loss="-")

    def __enter__(self) -> "StageProgress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def tokens_per_s(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else 0.0

    def _eta(self, step: int) -> float:
        """Seconds left at the pace since the first step: the first one after a start or a resume carries the
        warm-up (after a resume not even the stage's first evaluation came before it) and alone gave ~20x."""
        now = time.perf_counter()
        if self._first is None or step - self._first[0] == 0:
            done, elapsed = step - self.start_step, now - self.t0
        else:
            done, elapsed = step - self._first[0], now - self._first[1]
        return elapsed / done * (self.total - step) if done and self.total else math.nan

    def update(self, step: int, loss: float, tokens: int) -> None:
        if self._first is None:
            self._first = (step, time.perf_counter())
        self.tokens += tokens
        if not self.enabled:
            return
        tps = self.tokens_per_s()
        if self.bar is not None:
            self.bar.update(self.task, completed=step, tps=f"{tps:,.0f}", loss=f"{loss:.4g}")
        elif step % self.log_every == 0 or step == self.total:
            eta = self._eta(step)
            self.console.print(f"{self.name}: step {step}/{self.total or '?'}  loss {loss:.4g}  {tps:,.0f} tok/s  "
                               f"ETA {eta:,.0f} s", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)


class MetricsLog:
    """Append-only JSONL (main process only). On resume, records past the checkpoint are dropped first."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, global_step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
