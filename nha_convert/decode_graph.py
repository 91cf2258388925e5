"""Decode steps replayed from a CUDA graph, and `generate_fast`, greedy generation that uses them.

An eager decode step of an 8B model launches ~1500 kernels from Python: on an H100 that costs far more than the
GPU's work (docs/results.md, "Speed and memory"). A CUDA graph records the step's kernels once and replays them with
one launch. That needs a step whose shapes, addresses and positions never change on the host side:
- NHA layers: `NHAState.step` / `nha_kernels.nha_decode_step` work in place and read the position from the state's
  device counter `pos` (ops/recurrent.py); full-attention layers attend over a buffer of fixed capacity, sized up
  front (`NHACache(capacity=...)` / `NHACache.reserve`);
- the model's inputs: token ids and position ids live in static tensors, the position ids advance inside the graph;
  no attention mask is passed (new tokens are real; left padding of the prompt lives in the prefilled state).

`GraphedDecodeStep` works for any transformers cache whose update is in place with device-side positions: NHACache,
and transformers' StaticCache (the benchmark's graphed base model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cache import NHACache
from .compat import CACHE_KWARG
from .errors import NHAError


class GraphedDecodeStep:
    """`step(tokens)` = one decode step of `model` on `cache` for B sequences; returns logits (B, 1, V).

    On CUDA the first `warmup` calls run eagerly (kernels compile, lazy buffers settle), the next one captures the
    step into a CUDA graph, and every later call replays it. The returned logits are a static buffer that the next
    call overwrites. `graph=False` (or a CPU model) runs every step eagerly through the same code.
    Each call is exactly one real decode step, whichever way it runs.
    """

    def __init__(self, model: Any, cache: Any, position_ids: Tensor, *, graph: bool = True, warmup: int = 2):
        self.model, self.cache = model, cache
        self.position_ids = position_ids.clone()  # (B, 1): position of the next token of each row
        self.ids = torch.zeros_like(self.position_ids)
        self.use_graph = graph and self.position_ids.is_cuda
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.length = seq_length(cache)  # host-side count of cached tokens (capacity checks)

    @torch.no_grad()
    def _step(self) -> Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.position_ids, **{CACHE_KWARG: self.cache},
                         use_cache=True, logits_to_keep=1)
        self.position_ids.add_(1)
        return out.logits

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> Tensor:
        self.ids.copy_(tokens.view_as(self.ids))
        if not self.use_graph:
            return self._advance(self._step())
        limit = _capacity(self.cache)
        if self.length >= limit:
            raise NHAError(f"the cache holds {limit} tokens; size it for the whole generation before decoding "
                           "(NHACache(capacity=...) or cache.reserve(n))")
        if self.graph is None:
            if self.calls < self.warmup:  # eager, on a side stream as torch.cuda.graphs asks before a capture
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    logits = self._step()
                torch.cuda.current_stream().wait_stream(side)
                return self._advance(logits)
            self._capture()
        self.graph.replay()
        for state in _nha_states(self.cache):  # the replay advanced the device counters; mirror them on the host
            state.seen += 1
        return self._advance(self.logits)

    def _capture(self) -> None:
        # Capturing runs the step's Python (which advances host counters) but no kernel: undo the host side.
        seen = [state.seen for state in _nha_states(self.cache)]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for state, s in zip(_nha_states(self.cache), seen):
            state.seen = s

    def _advance(self, logits: Tensor) -> Tensor:
        self.calls += 1
        self.length += 1
        return logits


def _nha_states(cache: Any) -> list[Any]:
    """Every NHAState of the cache (a layer with exact heads holds one per head group)."""
    states = [layer.state for layer in getattr(cache, "nha_layers", []) if layer.state is not None]
    return [s for state in states for s in getattr(state, "states", (state,))]


def seq_length(cache: Any) -> int:
    """Tokens in a transformers cache, as a host int."""
    n = cache.get_seq_length()
    return int(n.item()) if isinstance(n, Tensor) else int(n)  # StaticCache counts on the device: read once


def _capacity(cache: Any) -> int | float:
    """Tokens the cache can hold without reallocating (full-attention buffers; a StaticCache's length)."""
    if isinstance(cache, NHACache):
        caps = [s.capacity for s in _nha_states(cache)]
    else:
        caps = [getattr(layer, "max_cache_len", None) for layer in getattr(cache, "layers", [])]
    caps = [c for c in caps if c is not None]
    return min(caps) if caps else float("inf")


@torch.no_grad()
def generate_fast(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    graph: bool = True,
) -> Tensor:
    """Greedy generation of an NHA model with CUDA-graph decode steps: the tokens `model.generate(do_sample=False)`
    returns (left-padded batches included), (B, T + new) ids.

    The prefill runs eagerly into an NHACache sized for T + max_new_tokens; every decode step after two warm-up
    steps is one graph replay (on CUDA; elsewhere, or with graph=False, the same steps run eagerly). Rows that
    produced `eos_token_id` continue with `pad_token_id`; generation stops once every row has.
    """
    if not getattr(model.config, "nha", None):
        raise NHAError("generate_fast drives NHA models; convert or load one with nha_convert first")
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    cache = NHACache(model.config, capacity=t + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    step = GraphedDecodeStep(model, cache, position_ids[:, -1:] + 1, graph=graph)
    new = [tok]
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            finished |= tok[:, 0] == eos_token_id
            if bool(finished.all()):
                break
        tok = step(tok)[:, -1].argmax(-1, keepdim=True)
        if eos_token_id is not None:
            tok = tok.masked_fill(finished[:, None], pad_token_id)
        new.append(tok)
    return torch.cat([input_ids, *new], dim=1)
