"""Files of an evaluation run: atomic writes (io.atomic_write) and JSON reads that fail as one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import NHAError
from ..io import atomic_write  # noqa: F401  (the shared helper, imported from here by eval/)


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """A JSON file's content; a missing file or bad JSON is a one-line NHAError (`missing` names the fix)."""
    p = Path(path)
    if not p.is_file():
        raise NHAError(missing)
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise NHAError(f"{p} is not valid JSON ({e})") from None


def json_default(x: Any) -> Any:
    """Paths and numpy / torch scalars that reach a results object, as JSON."""
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
