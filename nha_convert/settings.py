"""NHA hyper-parameters of one converted model, and the per-layer window schedule.

The saved config stores the resolved form (`NHASettings.to_config()`): one window per layer, so a
checkpoint describes itself completely and never depends on how the schedule was written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import NHAError

GATE_INITS = ("pooled-k", "constant")


@dataclass
class NHASettings:
    """How to turn each attention layer into an NHA layer.

    window: sliding-window size w of the NHA layers (0 = pure gated-slot RNN).
    slots: number of long-term memory slots m per KV head (0 = plain sliding-window attention).
    sinks: first tokens of a sequence that stay visible forever and never enter the slots.
    full_layers / full_every: layers that keep full attention (window = None = unbounded).
    gate_temperature: tau in log(alpha) = logsigmoid(W_g x) / tau.
    gate_init: "pooled-k" (W_g pooled from W_k) or "constant" (W_g = 0, bias giving `gate_decay`).
    chunk_size: query block of the chunked parallel form (memory vs speed; never changes results).
    """

    window: int = 64
    slots: int = 64
    sinks: int = 0
    full_layers: list[int] = field(default_factory=list)
    full_every: int | None = None
    gate_temperature: float = 8.0
    gate_init: str = "pooled-k"
    gate_decay: float = 0.99
    chunk_size: int = 16

    def validate(self, num_layers: int, max_positions: int | None = None) -> None:
        if self.window < 0:
            raise NHAError(f"window must be >= 0, got {self.window}; use --window 64 (or 0 for a pure slot RNN)")
        if self.slots < 0:
            raise NHAError(f"slots must be >= 0, got {self.slots}; use --slots 64 (or 0 for sliding-window only)")
        if self.sinks < 0:
            raise NHAError(f"sinks must be >= 0, got {self.sinks}")
        if self.window == 0 and self.slots == 0:
            raise NHAError("window 0 with 0 slots leaves nothing to attend to; give --window or --slots a positive value")
        if max_positions is not None and self.window > max_positions:
            raise NHAError(
                f"window {self.window} exceeds the model's context length {max_positions}; "
                "use a smaller --window, or --full-layers to keep layers fully attentive"
            )
        if self.full_every is not None and self.full_every <= 0:
            raise NHAError(f"full_every must be a positive layer stride, got {self.full_every}")
        bad = [i for i in self.full_layers if not 0 <= i < num_layers]
        if bad:
            raise NHAError(f"full layer index {bad[0]} is out of range: the model has layers 0..{num_layers - 1}")
        if not self.gate_temperature > 0:
            raise NHAError(f"gate_temperature must be > 0, got {self.gate_temperature}")
        if self.gate_init not in GATE_INITS:
            raise NHAError(f"unknown gate init {self.gate_init!r}; choose one of {', '.join(GATE_INITS)}")
        if not 0.0 < self.gate_decay < 1.0:
            raise NHAError(f"gate_decay must be in (0, 1), got {self.gate_decay}")
        if self.chunk_size <= 0:
            raise NHAError(f"chunk_size must be positive, got {self.chunk_size}")

    def windows(self, num_layers: int) -> list[int | None]:
        """Per-layer window: None marks a full-attention layer (`--full-every k` keeps layers 0, k, 2k, ...)."""
        full = set(self.full_layers)
        if self.full_every:
            full |= set(range(0, num_layers, self.full_every))
        return [None if i in full else self.window for i in range(num_layers)]

    def to_config(self, num_layers: int) -> dict[str, Any]:
        """The resolved dict stored as `config.nha` in a converted checkpoint."""
        d = asdict(self)
        d["windows"] = self.windows(num_layers)
        return d


def layer_settings(nha: dict[str, Any], layer_idx: int) -> tuple[int | None, dict[str, Any]]:
    """Window of one layer plus the shared settings, read from a saved `config.nha` dict."""
    return nha["windows"][layer_idx], nha
