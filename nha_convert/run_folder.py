"""The layout of an nha-finetune run folder, which evaluation reads too (the budget behind a fine-tuned model):
<run>/metrics.jsonl, <run>/checkpoints/step-XXXXXXXX-stageS/trainer_state.json, <run>/model."""

from __future__ import annotations

import re
from pathlib import Path

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)-stage(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of a run (intact or not; partial ones are hidden), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(m, p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][1]), int(mp[0][2])))]
