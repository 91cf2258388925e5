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
    full_heads: KV heads kept at full attention inside NHA layers ("exact heads", docs/design.md): (layer, kv_head)
        pairs, the text "3:0,5:1", or "auto:K": the K heads chosen from data at conversion (head_selection.py).
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
    full_heads: list[tuple[int, int]] | str = field(default_factory=list)  # or "3:0,5:1" / "auto:K"

    def validate(self, num_layers: int, max_positions: int | None = None, num_kv_heads: int | None = None) -> None:
        """`num_kv_heads` (when known) bounds the full heads' indices and auto:K."""
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
        self._validate_full_heads(num_layers, num_kv_heads)

    def _validate_full_heads(self, num_layers: int, num_kv_heads: int | None) -> None:
        windows = self.windows(num_layers)
        k = self.auto_full_heads()
        if k is not None:
            auto_layers = self.auto_full_layers() or 0
            nha_layers = sum(w is not None for w in windows) - auto_layers
            if num_kv_heads is not None and k > nha_layers * num_kv_heads:
                raise NHAError(f"full_heads auto:{k} asks for more full heads than the {nha_layers * num_kv_heads} "
                               f"KV heads of NHA layers; use auto:1 to auto:{nha_layers * num_kv_heads}")
            return
        pairs = self.full_head_pairs()
        if pairs and self.auto_full_layers() is not None:
            raise NHAError("listed full_heads cannot be combined with full_layers auto:K (a chosen layer may hold "
                           "them); use full_heads auto:K, or list the full layers")
        for layer, head in pairs:
            if not 0 <= layer < num_layers:
                raise NHAError(f"full head {layer}:{head} names layer {layer}; the model has layers "
                               f"0..{num_layers - 1}")
            if num_kv_heads is not None and not 0 <= head < num_kv_heads:
                raise NHAError(f"full head {layer}:{head} names KV head {head}; the model has KV heads "
                               f"0..{num_kv_heads - 1}")
            if windows[layer] is None:
                raise NHAError(f"full head {layer}:{head} is in layer {layer}, which is already full; drop the head "
                               "or the layer from the full layers")

    def auto_full_heads(self) -> int | None:
        """K of full_heads "auto:K" (None for a list); a malformed value is an NHAError."""
        if not (isinstance(self.full_heads, str) and self.full_heads.strip().startswith(AUTO)):
            return None
        return _auto_k(self.full_heads, "full_heads takes layer:head pairs (3:0,5:1) or auto:K with a whole number "
                                        "K >= 1 of full KV heads, e.g. auto:4")

    def full_head_pairs(self) -> list[tuple[int, int]]:
        """The listed (layer, kv_head) pairs, sorted and unique ([] for auto:K); malformed text is an NHAError."""
        if self.auto_full_heads() is not None:
            return []
        items = self.full_heads
        if isinstance(items, str):
            try:
                items = [tuple(int(x) for x in p.split(":")) for p in items.replace(" ", "").split(",") if p]
            except ValueError:
                items = None
        if items is None or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in items):
            raise NHAError(f"full_heads takes layer:head pairs like 3:0,5:1 (or [[3, 0], [5, 1]]) or auto:K; "
                           f"got {self.full_heads!r}")
        return sorted({(int(a), int(b)) for a, b in items})

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
        k = self.auto_full_heads()
        d["full_heads"] = heads_to_config(self.full_head_pairs())  # auto:K: none until head_selection chooses
        if k is not None:
            d["full_heads_auto"] = k
        return d

    @staticmethod
    def from_config(config: Any) -> ResolvedNHA:
        """The resolved settings a converted model's config holds, typed and validated (see ResolvedNHA)."""
        return ResolvedNHA.from_config(config)

    def auto_full_layers(self) -> int | None:
        """K of full_layers "auto:K" (None for an explicit list); a malformed value is an NHAError."""
        if not isinstance(self.full_layers, str):
            return None
        return _auto_k(self.full_layers, "full_layers takes layer indices (0,15,31) or auto:K with a whole number "
                                         "K >= 1 of full layers, e.g. auto:2")

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
    full_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> its full KV heads (exact heads)

    @classmethod
    def from_dict(cls, nha: dict[str, Any], num_layers: int | None = None,
                  num_kv_heads: int | None = None) -> ResolvedNHA:
        """Missing keys take NHASettings' defaults (configs written before the key existed)."""
        if "windows" not in nha:
            raise NHAError("config.nha has no per-layer 'windows'; re-convert the model with nha-convert")
        windows = tuple(nha["windows"])
        if num_layers is not None and len(windows) != num_layers:
            raise NHAError(f"config.nha lists {len(windows)} layer windows for a model of {num_layers} layers; "
                           "re-convert the model with nha-convert")
        known = {k: nha[k] for k in _SETTING_FIELDS
                 if k in nha and k not in ("full_layers", "full_every", "full_heads")}
        settings = NHASettings(**known)
        settings.validate(len(windows))
        if any(w is not None and w < 0 for w in windows):
            raise NHAError(f"config.nha windows must be >= 0 or null, got {list(windows)}")
        full_heads = heads_from_config(nha.get("full_heads") or {})  # absent (older configs): no full heads
        for layer, heads in full_heads.items():
            if not 0 <= layer < len(windows) or windows[layer] is None:
                raise NHAError(f"config.nha full_heads names layer {layer}, which is not an NHA layer; "
                               "re-convert the model with nha-convert")
            if num_kv_heads is not None and not all(0 <= h < num_kv_heads for h in heads):
                raise NHAError(f"config.nha full_heads of layer {layer} ({list(heads)}) name KV heads outside "
                               f"0..{num_kv_heads - 1}; re-convert the model with nha-convert")
        return cls(windows=windows, window=settings.window, slots=settings.slots, sinks=settings.sinks,
                   full_layers=tuple(i for i, w in enumerate(windows) if w is None),
                   gate_temperature=settings.gate_temperature, gate_init=settings.gate_init,
                   gate_decay=settings.gate_decay, chunk_size=settings.chunk_size, slot_bias=settings.slot_bias,
                   slot_bias_trainable=settings.slot_bias_trainable, full_heads=full_heads)

    @classmethod
    def from_config(cls, config: Any) -> ResolvedNHA:
        """The settings of an NHA model's config (NHAError when it has none)."""
        nha = getattr(config, "nha", None)
        if not nha:
            raise NHAError(f"{type(config).__name__} has no NHA settings; convert the model with nha_convert first")
        return cls.from_dict(nha, getattr(config, "num_hidden_layers", None),
                             getattr(config, "num_key_value_heads", None))


_SETTING_FIELDS = tuple(f.name for f in fields(NHASettings))


def _auto_k(value: str, usage: str) -> int:
    """K of "auto:K" (K >= 1); anything else is an NHAError starting with `usage`."""
    text = value.strip()
    head, _, tail = text.partition(":")
    if head != AUTO or not tail.strip().isdigit() or int(tail) < 1:
        raise NHAError(f"{usage}; got {text!r}")
    return int(tail)


def heads_to_config(pairs: list[tuple[int, int]]) -> dict[str, list[int]]:
    """(layer, kv_head) pairs as config.nha stores them: {"layer": [kv heads]} (JSON keys are text)."""
    out: dict[str, list[int]] = {}
    for layer, head in sorted(set(pairs)):
        out.setdefault(str(layer), []).append(head)
    return out


def heads_from_config(heads: dict[Any, list[int]]) -> dict[int, tuple[int, ...]]:
    """config.nha's full_heads read back: {layer: sorted unique KV heads}, layers without heads left out."""
    return {int(layer): tuple(sorted(set(map(int, hs)))) for layer, hs in heads.items() if hs}
