"""The NHA op in plain torch: `naive` (dense ground truth), `chunk` (parallel, training/prefill),
`recurrent` (decode). All three compute the same function; tests/ops/test_ops.py holds them to it."""

from .chunk import SlotState, nha_chunk
from .common import gate_log_alpha
from .naive import nha_naive
from .recurrent import NHAState, nha_recurrent

__all__ = ["NHAState", "SlotState", "gate_log_alpha", "nha_chunk", "nha_naive", "nha_recurrent"]
