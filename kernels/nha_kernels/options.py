"""The kernel variants a caller picks (all have tested defaults). The kernels read no environment: nha_convert's
backend.py turns the NHA_* variables into a `KernelOptions` and passes it in (`backend.kernel_options()`), so the
kernels import nothing from nha_convert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHOICES = {"fwd": ("parallel", "serial"), "bwd_kv": ("split", "split2"), "triton_bwd": ("triton", "reference"),
           "gate_grad": ("triton", "torch")}
SLOT_TILES = (16, 32, 64)


@dataclass(frozen=True)
class KernelOptions:
    """fwd (NHA_FWD): the forward main kernel, parallel (fwd_parallel.py, one program per query block) or serial
    (one program walks each span). fwd_state_span (NHA_FWD_STATE_SPAN): the span of the parallel forward's
    chunk-state walk, a multiple of the state chunk; 0 = one scan over all chunks; None = the launcher's choice.
    bwd_kv (NHA_BWD_KV): the backward's slot K and V sides in one launch (split) or two (split2).
    bwd_slot_tile (NHA_BWD_SLOT_TILE): slots per tile of the backward's slot kernels, 16, 32 or 64; None = 64 up to
    head dim 64, 16 above. triton_bwd (NHA_TRITON_BWD): reference differentiates the torch op instead (debug).
    gate_grad (NHA_GATE_GRAD): the gate gradient in two Triton passes or its ~25-op torch reference.
    reference: the torch op with `nha_chunk_triton`'s contract (returns (o, state)); the reference backward
    differentiates it, and so does the one case the Triton backward does not take (w = 0 with a slot bias)."""

    fwd: str = "parallel"
    fwd_state_span: int | None = None
    bwd_kv: str = "split"
    bwd_slot_tile: int | None = None
    triton_bwd: str = "triton"
    gate_grad: str = "triton"
    reference: Callable[..., tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"NHA_{name.upper()} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        if self.bwd_slot_tile is not None and self.bwd_slot_tile not in SLOT_TILES:
            raise ValueError(f"NHA_BWD_SLOT_TILE must be 16, 32 or 64, got {self.bwd_slot_tile}")
        if self.fwd_state_span is not None and self.fwd_state_span < 0:
            raise ValueError(f"NHA_FWD_STATE_SPAN must be 0 or a positive multiple of the state chunk, got "
                             f"{self.fwd_state_span}")


DEFAULT = KernelOptions()
