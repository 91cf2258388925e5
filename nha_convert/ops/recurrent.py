"""Recurrent NHA: constant-size state, one token per step. Used by the decode cache.

State per layer (GQA-native, per KV head):
- window ring buffer of w entries: RoPE'd key (for attention), raw key (for the slots once it leaves), value,
  log-decay, and flags (real token? sink?). Entry of token j lives at index j % w.
- sinks: RoPE'd key and value of the first S real tokens, with their positions.
- slots: K~ (M x D) and V~ (M x Dv) in fp32, plus how many tokens were folded in (empty-slot mask).
A full-attention layer (window None) keeps a buffer of fixed capacity instead of a ring (token j at index j, unused
entries masked by `win_valid`) and never folds; it grows by whole blocks only when a step would overflow it.

Graph-safe: `step` updates every tensor in place and takes the position from the device counter `pos`, never from a
Python int, so one decode step can be captured in a CUDA graph and replayed (nha_convert/decode_graph.py). The only
host-side decision is growing a full layer's buffer, which `reserve` makes unnecessary ahead of capture.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from .chunk import SlotState, gather_sinks
from .common import NEG_INF, add_slot_bias, group_queries, joint_softmax, sink_mask, slot_writes, ungroup

FULL_GROW = 256  # a full layer's buffer grows by whole blocks of this many tokens when a step would overflow it


@dataclass
class NHAState:
    window: int | None
    num_sinks: int
    seen: int  # tokens processed so far (padding included): the absolute position of the next token
    pos: Tensor  # (1,) int64 on the state's device: `seen` as a device counter (what a graph-captured step reads)
    n_real: Tensor  # (B,) real tokens seen, decides which new tokens are sinks
    slot_k: Tensor  # (B,H,M,D) fp32
    slot_v: Tensor  # (B,H,M,Dv) fp32
    slot_count: Tensor  # (B,)
    win_k_rot: Tensor  # (B,H,W,D); full layers: (B,H,capacity,D)
    win_k: Tensor  # (B,H,W,D)       raw keys, to fold into the slots (empty for full layers)
    win_v: Tensor  # (B,H,W,Dv)
    win_la: Tensor  # (B,H,W,M) fp32 (empty for full layers)
    win_valid: Tensor  # (B,W) bool
    win_sink: Tensor  # (B,W) bool  (empty for full layers)
    sink_k_rot: Tensor  # (B,H,S,D)
    sink_v: Tensor  # (B,H,S,Dv)
    sink_pos: Tensor  # (B,S)
    sink_present: Tensor  # (B,S) bool

    UNBATCHED = ("pos",)  # shared by all rows: not per-sequence state

    def tensors(self) -> list[Tensor]:
        """The per-sequence tensors (batch first)."""
        return [getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor) and f.name not in self.UNBATCHED]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, idx: Tensor) -> None:
        """Reorder / select batch rows (beam search, batch pruning). New tensors: re-capture a graph afterwards."""
        for f in fields(self):
            val = getattr(self, f.name)
            if isinstance(val, Tensor) and f.name not in self.UNBATCHED:
                setattr(self, f.name, val.index_select(0, idx.to(val.device)))

    @property
    def capacity(self) -> int | None:
        """Tokens a full layer's buffer holds before it must grow (None for windowed layers: constant state)."""
        return self.win_valid.shape[1] if self.window is None else None

    def reserve(self, n: int) -> None:
        """Make a full layer's buffer hold at least `n` tokens (a copy; nothing to do for windowed layers)."""
        cap = self.capacity
        if cap is None or n <= cap:
            return
        for name, dim in (("win_k_rot", 2), ("win_v", 2), ("win_valid", 1)):
            x = getattr(self, name)
            shape = list(x.shape)
            shape[dim] = n
            buf = torch.zeros(shape, dtype=x.dtype, device=x.device)
            buf.narrow(dim, 0, cap).copy_(x)
            setattr(self, name, buf)

    @classmethod
    def from_prefill(
        cls,
        k: Tensor,
        k_rot: Tensor,
        v: Tensor,
        log_alpha: Tensor,
        valid: Tensor,
        slots: SlotState,
        *,
        window: int | None,
        num_sinks: int,
    ) -> "NHAState":
        """The state token-by-token decoding would hold after the T prefill tokens (slots from the chunked pass)."""
        b, h, t_len, _ = k.shape
        sinks = sink_mask(valid, num_sinks)
        la, _, _ = slot_writes(log_alpha.float(), valid, num_sinks)
        if window is None:  # full attention: a growing buffer of what attention reads (never folds)
            ring = (k_rot, k[:, :, :0], v, la[:, :, :0], valid, sinks[:, :0])
        else:
            # Ring entry i holds the latest token j < T with j % w == i (or nothing if none is in the window).
            keep = min(window, t_len)
            j = torch.arange(t_len - keep, t_len, device=k.device)
            slot_idx = j % window if window > 0 else j
            def ring_of(x: Tensor, dim: int, fill=0) -> Tensor:
                shape = list(x.shape)
                shape[dim] = window
                buf = x.new_full(shape, fill)
                return buf.index_copy(dim, slot_idx, x.narrow(dim, t_len - keep, keep))
            ring = (ring_of(k_rot, 2), ring_of(k, 2), ring_of(v, 2), ring_of(la, 2),
                    ring_of(valid, 1, False), ring_of(sinks, 1, False))
        sk, sv, spos, spresent = gather_sinks(k_rot, v, sinks, num_sinks)
        return cls(
            window=window, num_sinks=num_sinks, seen=t_len,
            pos=torch.full((1,), t_len, dtype=torch.long, device=k.device), n_real=valid.long().sum(-1),
            slot_k=slots.k, slot_v=slots.v, slot_count=slots.count,
            win_k_rot=ring[0], win_k=ring[1], win_v=ring[2], win_la=ring[3], win_valid=ring[4], win_sink=ring[5],
            sink_k_rot=sk, sink_v=sv, sink_pos=spos.contiguous(), sink_present=spresent,
        )

    @classmethod
    def empty(cls, like_k: Tensor, like_v: Tensor, m: int, *, window: int | None, num_sinks: int) -> "NHAState":
        b, h, _, d = like_k.shape
        z = like_k.new_zeros(b, h, 0, d)
        zero_slots = SlotState(k=torch.zeros(b, h, m, d, device=like_k.device),
                               v=torch.zeros(b, h, m, like_v.shape[-1], device=like_k.device),
                               count=torch.zeros(b, dtype=torch.long, device=like_k.device))
        return cls.from_prefill(z, z, like_v.new_zeros(b, h, 0, like_v.shape[-1]),
                                torch.zeros(b, h, 0, m, device=like_k.device),
                                torch.zeros(b, 0, dtype=torch.bool, device=like_k.device),
                                zero_slots, window=window, num_sinks=num_sinks)

    def _fold(self, k: Tensor, v: Tensor, la: Tensor, writes: Tensor) -> None:
        """Fold one token (k (B,H,D), v (B,H,Dv), la (B,H,M)) into the slots where `writes` (B,) holds, in place.

        Rows that do not write get decay 1 and weight 0, which leaves their slots bit-identical."""
        la = torch.where(writes[:, None, None], la.float(), torch.zeros_like(la, dtype=torch.float32))
        alpha, s = torch.exp(la), -torch.expm1(la)
        self.slot_k.mul_(alpha[..., None]).add_(s[..., None] * k.float()[:, :, None, :])
        self.slot_v.mul_(alpha[..., None]).add_(s[..., None] * v.float()[:, :, None, :])
        self.slot_count.add_(writes.long())

    def step(
        self, q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, valid: Tensor,
        *, scale: float, full_attention: Callable[["NHAState", Tensor, float], Tensor] | None = None,
        slot_bias: Tensor | None = None,
    ) -> Tensor:
        """Consume one token per row and return its output. q: (B,Hq,D); k,k_rot: (B,H,D); log_alpha: (B,H,M).

        In place and free of host syncs: positions come from the device counter `pos` (see the module docstring).
        `full_attention(state, q_rot, scale)` replaces the torch attention of a full layer (the Triton kernel).
        `slot_bias` (Hq,): the optional slot-logit bias (a parameter of the layer, not state)."""
        w, t = self.window, self.pos
        if w is None and self.seen >= self.capacity:  # host ints only: grow by whole blocks, never under a graph
            self.reserve(-(-(self.seen + 1) // FULL_GROW) * FULL_GROW)
        is_sink = valid & (self.n_real < self.num_sinks)
        writes = valid & ~is_sink
        la = torch.where(writes[:, None, None], log_alpha.float(), torch.zeros_like(log_alpha, dtype=torch.float32))

        if w == 0:  # no window: the token enters the slots at once
            self._fold(k, v, la, writes)
        elif w is None:  # token t goes to index t of the buffer
            self.win_k_rot.index_copy_(2, t, k_rot[:, :, None].to(self.win_k_rot.dtype))
            self.win_v.index_copy_(2, t, v[:, :, None].to(self.win_v.dtype))
            self.win_valid.index_copy_(1, t, valid[:, None])
        else:
            # Ring entry i = t % w holds token t - w (if t >= w; else it is empty: valid False, nothing folds).
            # That token leaves the window now and enters the slots (unless padding or a sink).
            i = t % w
            out_writes = self.win_valid.index_select(1, i)[:, 0] & ~self.win_sink.index_select(1, i)[:, 0]
            self._fold(self.win_k.index_select(2, i)[:, :, 0], self.win_v.index_select(2, i)[:, :, 0],
                       self.win_la.index_select(2, i)[:, :, 0], out_writes)
            self.win_k_rot.index_copy_(2, i, k_rot[:, :, None].to(self.win_k_rot.dtype))
            self.win_k.index_copy_(2, i, k[:, :, None].to(self.win_k.dtype))
            self.win_v.index_copy_(2, i, v[:, :, None].to(self.win_v.dtype))
            self.win_la.index_copy_(2, i, la[:, :, None])
            self.win_valid.index_copy_(1, i, valid[:, None])
            self.win_sink.index_copy_(1, i, is_sink[:, None])

        if self.num_sinks:  # write sink number n_real of each row that got one (no host sync: masked selects)
            hit = (torch.arange(self.num_sinks, device=valid.device) == self.n_real[:, None]) & is_sink[:, None]
            self.sink_k_rot.copy_(torch.where(hit[:, None, :, None], k_rot[:, :, None].to(self.sink_k_rot.dtype),
                                              self.sink_k_rot))
            self.sink_v.copy_(torch.where(hit[:, None, :, None], v[:, :, None].to(self.sink_v.dtype), self.sink_v))
            self.sink_pos.copy_(torch.where(hit, t, self.sink_pos))
            self.sink_present.logical_or_(hit)
        self.n_real.add_(valid.long())
        self.seen += 1

        if w is None:
            out = full_attention(self, q_rot, scale) if full_attention else self._full_attention(q_rot, scale)
        else:
            out = self._window_attention(q, q_rot, scale, slot_bias)
        self.pos.add_(1)
        return out

    def _window_attention(self, q: Tensor, q_rot: Tensor, scale: float, slot_bias: Tensor | None = None) -> Tensor:
        """Joint softmax over slots, ring buffer and the sinks that have left the window (state already updated)."""
        w, t = self.window, self.pos
        h = self.slot_k.shape[1]
        qg, qg_rot = group_queries(q.float()[:, :, None], h), group_queries(q_rot.float()[:, :, None], h)  # (B,H,G,1,D)
        slot_logits = add_slot_bias(scale * torch.einsum("bhgtd,bhid->bhgti", qg, self.slot_k), slot_bias)
        slot_logits = slot_logits.masked_fill(~(self.slot_count > 0)[:, None, None, None, None], NEG_INF)
        win_logits = scale * torch.einsum("bhgtd,bhjd->bhgtj", qg_rot, self.win_k_rot.float())
        win_logits = win_logits.masked_fill(~self.win_valid[:, None, None, None, :], NEG_INF)
        logits = [slot_logits, win_logits]
        if self.num_sinks:
            sink_vis = self.sink_present & (self.sink_pos <= t - w)  # sinks that have left the window
            sl = scale * torch.einsum("bhgtd,bhsd->bhgts", qg_rot, self.sink_k_rot.float())
            logits.append(sl.masked_fill(~sink_vis[:, None, None, None, :], NEG_INF))
        probs = joint_softmax(*logits)
        o = probs[0] @ self.slot_v[:, :, None] + probs[1] @ self.win_v.float()[:, :, None]
        if len(probs) == 3:
            o = o + probs[2] @ self.sink_v.float()[:, :, None]
        return ungroup(o)[:, :, 0].to(q.dtype)

    def _full_attention(self, q_rot: Tensor, scale: float) -> Tensor:
        """A full-attention layer reads its buffer like a KV cache, in the model dtype, keys and values once each.

        The whole fixed-capacity buffer, unused entries masked: the shapes do not change from step to step, so the
        step can be graph-captured (the waste is the reserve beyond `seen`, at most FULL_GROW tokens in eager use).

        The G query heads of a KV head are G rows of one product (GQA without repeating K/V). Plain matmuls, not
        SDPA: for one query position they are what SDPA would do, and the cuDNN SDPA backend re-plans at every new
        key length, which cost ~11 ms of CPU per layer per decode step on the H100 (benchmarks/profile_decode.py).
        """
        b, hq, d = q_rot.shape
        h = self.win_k_rot.shape[1]
        q = q_rot.reshape(b, h, hq // h, d).to(self.win_v.dtype)
        scores = (q @ self.win_k_rot.transpose(-1, -2)).float() * scale  # (B, H, G, L)
        scores = scores.masked_fill(~self.win_valid[:, None, None, :], NEG_INF)
        (p,) = joint_softmax(scores)
        return (p.to(self.win_v.dtype) @ self.win_v).reshape(b, hq, -1).to(q_rot.dtype)


def nha_recurrent(
    q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor,
    *, window: int | None, num_sinks: int = 0, scale: float, valid: Tensor | None = None,
    state: NHAState | None = None, slot_bias: Tensor | None = None,
) -> tuple[Tensor, NHAState]:
    """Run `step` over all T tokens (from `state`, or from empty). Same contract as nha_chunk."""
    b, h, t_len, _ = k.shape
    if valid is None:
        valid = torch.ones(b, t_len, dtype=torch.bool, device=k.device)
    if state is None:
        state = NHAState.empty(k, v, log_alpha.shape[-1], window=window, num_sinks=num_sinks)
    outs = [
        state.step(q[:, :, i], q_rot[:, :, i], k[:, :, i], k_rot[:, :, i], v[:, :, i], log_alpha[:, :, i],
                   valid[:, i], scale=scale, slot_bias=slot_bias)
        for i in range(t_len)
    ]
    return torch.stack(outs, dim=2), state
