"""`nha-eval --ablate slots`: the same model with its slot path masked, i.e. run as its own sliding window.

Inside `slots_masked(model)` every windowed NHA layer runs the op with m = 0 slots, which is exactly sliding-window
attention (+ its sinks): the outputs equal those of the same base model converted with `slots=0` (tested). What a
probe loses under the mask is what the slots carry.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import NHAError

ABLATIONS = ("slots",)


def check_ablations(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise NHAError(f"--ablate takes {', '.join(ABLATIONS)}; got {', '.join(bad)}")
    return names


def has_slots(model: Any) -> bool:
    """Whether any windowed NHA layer of the model has slots (else masking them changes nothing)."""
    from ..layer import NHAAttention

    return any(isinstance(m, NHAAttention) and m.window is not None and m.num_slots > 0 for m in model.modules())


@contextmanager
def slots_masked(model: Any) -> Iterator[Any]:
    """Every NHA layer of `model` runs with zero slots until the block ends (restored even on an error)."""
    from ..layer import NHAAttention

    layers = [m for m in model.modules() if isinstance(m, NHAAttention)]
    for m in layers:
        m.slots_masked = True
    try:
        yield model
    finally:
        for m in layers:
            m.slots_masked = False
