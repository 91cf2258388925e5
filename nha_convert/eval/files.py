"""Files of an evaluation run: atomic writes and JSON reads that fail as one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import NHAError
from ..io import default_permissions


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        default_permissions(tmp)  # mkstemp made it 0600; others may read a results folder, as the umask says
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
