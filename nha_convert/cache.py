"""NHACache: the transformers Cache that `generate()` drives for NHA models.

Each layer holds an `NHAState` (ops/recurrent.py): a window ring buffer, sinks and fp32 slots per KV head, so
memory per NHA layer is constant in context length. Layers fill it on their first (prefill) call, then step it.
Full-attention layers keep a buffer of fixed capacity: `capacity` (or `reserve`) sizes it for the whole generation
up front, so decoding never reallocates and one step can be captured in a CUDA graph (decode_graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .ops import NHAState


@dataclass
class HeadGroupsState:
    """The decode state of an NHA layer with exact heads: one NHAState per head group (the full heads' group first,
    a KV buffer like a full layer's; then the NHA heads' window, sinks and slots). The layer steps each group."""

    states: tuple[NHAState, ...]

    @property
    def seen(self) -> int:
        return self.states[0].seen

    @property
    def n_real(self) -> torch.Tensor:
        return self.states[0].n_real

    @property
    def capacity(self) -> int | None:
        return self.states[0].capacity

    def reserve(self, n: int) -> None:
        for state in self.states:
            state.reserve(n)

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.states)

    def select_batch(self, idx: torch.Tensor) -> None:
        for state in self.states:
            state.select_batch(idx)


class NHALayerCache(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.state: NHAState | HeadGroupsState | None = None
        self.capacity = capacity  # tokens a full-attention layer's buffer is sized for once filled (0: as it grows)

    def set_state(self, state: NHAState | HeadGroupsState) -> None:
        """The state after a prefill, its full-attention buffer sized for `capacity` tokens."""
        state.reserve(self.capacity)
        self.state = state

    def reserve(self, n: int) -> None:
        self.capacity = max(self.capacity, n)
        if self.state is not None:
            self.state.reserve(n)

    # The NHA layer reads and writes `state` itself; the key/value `update` of dense caches does not apply.
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:  # noqa: D401
        self.is_initialized = True

    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("NHA layers update their NHAState directly")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.seen

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        # Full length, offset 0: the "nha" mask function then hands layers the whole 2D padding mask.
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            b = self.state.n_real.shape[0]
            self.state.select_batch(torch.arange(b, device=self.state.n_real.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("NHA caches cannot be cropped (slot memory is not invertible)")

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()


class NHACache(Cache):
    """One NHALayerCache per decoder layer. `nbytes()` is the decode state of the whole model."""

    def __init__(self, config: Any = None, num_layers: int | None = None, capacity: int = 0, **kwargs: Any) -> None:
        """`capacity`: total tokens (prompt + new) to size full-attention buffers for; they grow past it if needed."""
        n = num_layers if num_layers is not None else config.num_hidden_layers
        super().__init__(layers=[NHALayerCache(capacity) for _ in range(n)])

    def reserve(self, n: int) -> None:
        """Size every full-attention buffer for `n` tokens in all (before capturing a decode graph)."""
        for layer in self.layers:
            layer.reserve(n)

    @property
    def nha_layers(self) -> list[NHALayerCache]:
        return self.layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
