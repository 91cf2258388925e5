"""What the nha-finetune run behind a model folder trained: the budget that stands next to its numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..run_folder import STATE_FILE, checkpoint_dirs

SMOKE_TOKENS = 1_000_000  # fewer training tokens than this cannot recover a converted model: a pipeline check only
GPU_RESULTS = "docs/results.md"


def training_summary(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the nha-finetune run behind a model folder (<run>/model) trained, from <run>/metrics.jsonl: steps,
    tokens, steps per stage, and the budget named in its newest checkpoint. None for a folder no run wrote."""
    run = Path(model_dir).expanduser().resolve().parent
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    steps, tokens, stages = 0, 0, {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash: the records before it still count
            continue
        if rec.get("event") or "step" not in rec:  # stage starts, evaluations: no training step
            continue
        steps, tokens = max(steps, rec.get("global_step", 0)), max(tokens, rec.get("tokens", 0))
        stages[rec["stage"]] = max(stages.get(rec["stage"], 0), rec["step"])
    budget = None
    for ckpt in reversed(checkpoint_dirs(run)):
        try:
            budget = json.loads((ckpt / STATE_FILE).read_text()).get("budget")
            break
        except (OSError, ValueError):
            continue
    return {"run": str(run), "budget": budget, "steps": steps, "tokens": tokens, "stages": stages}


def is_smoke(training: dict[str, Any]) -> bool:
    return training.get("budget") == "cpu" or training.get("tokens", 0) < SMOKE_TOKENS
