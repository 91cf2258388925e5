"""Windows drawn at random during training (a stage's `windows: [32, 64, 128]`).

Each optimizer step, every NHA layer that has a window trains with one window drawn from the list (the same for all
layers and all processes, seeded by the step, so a resumed run draws the same ones); evaluation, the recall probe and
the saved model keep the converted window. A shorter window than the model's leaves more to the slots, so the loss
of those steps depends on what the slots kept; a longer one keeps the band's attention patterns in use.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Sequence

from torch import nn

from ..errors import NHAError
from ..layer import NHAAttention


def windowed_layers(model: nn.Module) -> list[NHAAttention]:
    """The NHA layers with a window (full-attention layers have none and keep seeing everything)."""
    return [m for m in model.modules() if isinstance(m, NHAAttention) and m.window is not None]


def check_windows(model: nn.Module, stage_name: str, windows: Sequence[int] | None) -> None:
    if windows and not windowed_layers(model):
        raise NHAError(f"stage {stage_name}: `windows` and `window_dropout` need NHA layers with a window, and this model has none "
                       "(model.nha null, or every layer full); remove them from the stage")


def draw_window(windows: Sequence[int], seed: int, global_step: int) -> int:
    return random.Random(seed * 1_000_003 + global_step).choice(list(windows))


def draw_layer_windows(stage: Any, layers: Sequence[NHAAttention], seed: int, global_step: int) -> list[int] | None:
    """Each layer's window for this step (None: every layer keeps its own): one drawn from `windows` for all layers,
    then `window_dropout` replaces it in each layer alone with probability `share`. Seeded by the step, so every
    process and a resumed run draw the same."""
    if not stage.windows and stage.window_dropout is None:
        return None
    base = [draw_window(stage.windows, seed, global_step) if stage.windows else layer.window for layer in layers]
    drop = stage.window_dropout
    if drop is None:
        return base
    rng = random.Random(f"window-dropout-{seed}-{global_step}")
    return [min(drop.window, w) if rng.random() < drop.share else w for w in base]


@contextlib.contextmanager
def training_window(layers: Sequence[NHAAttention], window: int | Sequence[int] | None) -> Iterator[None]:
    """Every layer in `layers` uses `window` (or its own entry of a list) inside the block (None: unchanged); the
    converted windows come back after it, also on an exception."""
    if window is None:
        yield
        return
    windows = [window] * len(layers) if isinstance(window, int) else list(window)
    saved = [layer.window for layer in layers]
    try:
        for layer, w in zip(layers, windows):
            layer.window = w
        yield
    finally:
        for layer, w in zip(layers, saved):
            layer.window = w
