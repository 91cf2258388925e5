"""NHA hyper-parameters of one converted model, and the per-layer window schedule.

The saved config stores the resolved form (`NHASettings.to_config()`): one window per layer, so a
checkpoint describes itself completely and never depends on how the schedule was written. `ResolvedNHA` is
that dict read back, typed and validated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import NHAError

GATE_INITS = ("pooled-k", "constant", "multiscale")
AUTO = "auto"  # full_layers "auto:K"


@dataclass
class NHASettings:
    """How to turn each attention layer into an NHA layer.

    window: sliding-window size w of the NHA layers (0 = pure gated-slot RNN).
    slots: number of long-term memory slots m per KV head (0 = plain sliding-window attention).
    sinks: first tokens of a sequence that stay visible forever and never enter the slots.
    full_layers / full_every: layers that keep full attention (window = None = unbounded); full_layers may be
        "auto:K": K layers chosen from data at conversion (nha_convert/layer_selection.py).
    gate_temperature: tau in log(alpha) = logsigmoid(W_g x) / tau.
    gate_init: "pooled-k" (W_g pooled from W_k), "constant" (W_g = 0, bias giving `gate_decay`) or "multiscale"
        (pooled-k weights, and biases that give the m slots of a head mean memory horizons 1 / (1 - decay) spread
        log-uniformly from 16 to 16384 tokens: convert.MULTISCALE_HORIZONS).
    chunk_size: query block of the chunked parallel form (memory vs speed; never changes results).
    slot_bias: initial slot-logit bias b_h of every query head (NHA.md); None = no bias (the paper's layer). Very
        negative (e.g. -10) starts the model as sliding-window attention; training opens the slots.
    slot_bias_trainable: whether b_h trains (a parameter) or stays fixed (a saved buffer).
    """

    window: int = 64
    slots: int = 64
    sinks: int = 0
    full_layers: list[int] | str = field(default_factory=list)  # or "auto:K" (layer_selection.py)
    full_every: int | None = None
    gate_temperature: float = 8.0
    gate_init: str = "pooled-k"
    gate_decay: float = 0.99
    chunk_size: int = 16
    slot_bias: float | None = None
    slot_bias_trainable: bool = True

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
        k = self.auto_full_layers()
        if k is not None:
            if k > num_layers:
                raise NHAError(f"full_layers auto:{k} asks for more full layers than the model's {num_layers}; "
                               f"use auto:1 to auto:{num_layers}")
            if self.full_every is not None:
                raise NHAError("full_layers auto:K chooses the full layers itself; drop full_every (--full-every)")
        bad = [i for i in self.fixed_full_layers() if not 0 <= i < num_layers]
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
        if self.slot_bias is not None and not math.isfinite(self.slot_bias):
            raise NHAError(f"slot_bias must be a finite number, got {self.slot_bias}; try --slot-bias -10")

    def windows(self, num_layers: int) -> list[int | None]:
        """Per-layer window: None marks a full-attention layer (`--full-every k` keeps layers 0, k, 2k, ...)."""
        full = set(self.fixed_full_layers())
        if self.full_every:
            full |= set(range(0, num_layers, self.full_every))
        return [None if i in full else self.window for i in range(num_layers)]

    def to_config(self, num_layers: int) -> dict[str, Any]:
        """The resolved dict stored as `config.nha` in a converted checkpoint."""
        d = asdict(self)
        d["windows"] = self.windows(num_layers)
        k = self.auto_full_layers()
        if k is not None:  # every layer NHA until layer_selection.apply_selection writes the choice
            d["full_layers"], d["full_layers_auto"] = [], k
        return d

    @staticmethod
    def from_config(config: Any) -> ResolvedNHA:
        """The resolved settings a converted model's config holds, typed and validated (see ResolvedNHA)."""
        return ResolvedNHA.from_config(config)

    def auto_full_layers(self) -> int | None:
        """K of full_layers "auto:K" (None for an explicit list); a malformed value is an NHAError."""
        if not isinstance(self.full_layers, str):
            return None
        text = self.full_layers.strip()
        head, _, tail = text.partition(":")
        if head != AUTO or not tail.strip().isdigit() or int(tail) < 1:
            raise NHAError(f"full_layers takes layer indices (0,15,31) or auto:K with a whole number K >= 1 of "
                           f"full layers, e.g. auto:2; got {text!r}")
        return int(tail)

    def fixed_full_layers(self) -> list[int]:
        """The explicitly listed full layers ([] for auto:K, whose layers are chosen at conversion)."""
        return [] if self.auto_full_layers() is not None else list(self.full_layers)


@dataclass(frozen=True)
class ResolvedNHA:
    """The typed, validated form of a saved `config.nha` dict: what layers, gates and memory formulas read.

    Built from the dict on demand (`from_config`) rather than stored on the config: the dict stays the saved
    format, and layer_selection.py edits it in place after conversion.
    """

    windows: tuple[int | None, ...]  # per layer; None = full attention
    window: int
    slots: int
    sinks: int
    full_layers: tuple[int, ...]
    gate_temperature: float
    gate_init: str
    gate_decay: float
    chunk_size: int
    slot_bias: float | None  # absent from older configs: no bias
    slot_bias_trainable: bool

    @classmethod
    def from_dict(cls, nha: dict[str, Any], num_layers: int | None = None) -> ResolvedNHA:
        """Missing keys take NHASettings' defaults (configs written before the key existed)."""
        if "windows" not in nha:
            raise NHAError("config.nha has no per-layer 'windows'; re-convert the model with nha-convert")
        windows = tuple(nha["windows"])
        if num_layers is not None and len(windows) != num_layers:
            raise NHAError(f"config.nha lists {len(windows)} layer windows for a model of {num_layers} layers; "
                           "re-convert the model with nha-convert")
        known = {k: nha[k] for k in _SETTING_FIELDS if k in nha and k not in ("full_layers", "full_every")}
        settings = NHASettings(**known)
        settings.validate(len(windows))
        if any(w is not None and w < 0 for w in windows):
            raise NHAError(f"config.nha windows must be >= 0 or null, got {list(windows)}")
        return cls(windows=windows, window=settings.window, slots=settings.slots, sinks=settings.sinks,
                   full_layers=tuple(i for i, w in enumerate(windows) if w is None),
                   gate_temperature=settings.gate_temperature, gate_init=settings.gate_init,
                   gate_decay=settings.gate_decay, chunk_size=settings.chunk_size, slot_bias=settings.slot_bias,
                   slot_bias_trainable=settings.slot_bias_trainable)

    @classmethod
    def from_config(cls, config: Any) -> ResolvedNHA:
        """The settings of an NHA model's config (NHAError when it has none)."""
        nha = getattr(config, "nha", None)
        if not nha:
            raise NHAError(f"{type(config).__name__} has no NHA settings; convert the model with nha_convert first")
        return cls.from_dict(nha, getattr(config, "num_hidden_layers", None))


_SETTING_FIELDS = tuple(f.name for f in fields(NHASettings))
