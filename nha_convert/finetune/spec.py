"""The base of every recipe model: strict types, the numbers YAML 1.1 reads as strings, and rule errors.

Models are strict (no "1" for 1, no 1 for true) except for numbers: YAML 1.1 reads `1e-3` and `1e6` as strings, so
number fields take such strings, and integer fields take integral floats (`tokens: 1e6`). Rules that break raise
`RuleError`, which carries the location of the offending field (relative to the model that raises it) so that
recipe.py can name its YAML line.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Names other trainers use for our fields: suggested when they appear.
SYNONYMS = {"learning_rate": "lr", "lrate": "lr", "max_steps": "steps", "num_steps": "steps",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "max_seq_length": "seq_len", "max_length": "seq_len", "sequence_length": "seq_len",
            "lr_scheduler_type": "schedule", "scheduler": "schedule", "warmup": "warmup_steps",
            "type": "kind", "window_size": "window", "num_slots": "slots"}


def suggest(key: Any, known: list[str]) -> str:
    """ "did you mean 'x'? " for a mistyped or foreign field name, or "" when nothing is close."""
    close = [SYNONYMS[key]] if SYNONYMS.get(key) in known else difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class RuleError(ValueError):
    """A broken rule at `loc` (relative to the raising model). The message is prefixed with `label` (default: the
    field path of loc, e.g. "data.sources[0]"); label="" for messages that name their field themselves."""

    def __init__(self, message: str, *loc: str | int, label: str | None = None):
        super().__init__(message)
        self.loc, self.label = loc, label


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def yaml_number(value: Any) -> Any:
    """'1e-3' -> 0.001: a number YAML 1.1 read as a string (it wants a dot in the mantissa); anything else as is."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value.strip()) else value


def _integer(value: Any) -> Any:
    value = yaml_number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integer)]
Num = Annotated[float, BeforeValidator(yaml_number)]
Positive = Annotated[int, BeforeValidator(_integer), Field(gt=0)]


class Spec(BaseModel):
    # strict: a recipe value is taken as written (the number strings above aside); forbid: a typo is an error
    model_config = ConfigDict(extra="forbid", strict=True)
