"""Chunked parallel NHA for training and prefill: memory O(T * (C + w + M)), not O(T^2).

Queries are processed in blocks of C. For each block:
- slots: the token shift makes the slot memory of query t a gated linear recurrence over the sequence shifted
  right by w (token t - w enters at step t). Within a block the recurrence is expanded exactly
  (C x C x M decays, all <= 1, so no overflow); across blocks a (M x D) key state and (M x Dv) value state carry.
- window: a banded causal attention over keys [c0 - w + 1, c1); sinks that left the band are added separately.
- one joint fp32 softmax over [slots, sinks, band].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import NEG_INF, add_slot_bias, group_queries, joint_softmax, sink_mask, slot_writes, ungroup


@dataclass
class SlotState:
    """Slot memory after folding every slot token so far: keys (B,H,M,D), values (B,H,M,Dv) in fp32, count (B,)."""

    k: Tensor
    v: Tensor
    count: Tensor


def _shift(x: Tensor, w: int, dim: int) -> Tensor:
    """x shifted right by w along dim (zeros enter at the front), same length."""
    t_len = x.shape[dim]
    if w == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [w, 0]
    return F.pad(x, pad).narrow(dim, 0, t_len)


def gather_sinks(k_rot: Tensor, v: Tensor, sinks: Tensor, num_sinks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys/values of the first `num_sinks` real tokens per row: k (B,H,S,D), v, positions (B,S), present (B,S)."""
    if k_rot.shape[2] < num_sinks:  # fewer tokens than sinks: pad so the arrays always hold S entries
        extra = num_sinks - k_rot.shape[2]
        k_rot, v = F.pad(k_rot, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
        sinks = F.pad(sinks, (0, extra), value=False)
    b, _, t_len, _ = k_rot.shape
    pos = torch.arange(t_len, device=k_rot.device)
    order = torch.where(sinks, pos, pos + t_len).argsort(dim=-1)[:, :num_sinks]  # sink positions first
    present = sinks.gather(1, order)
    idx = order[:, None, :, None]
    k_s = k_rot.gather(2, idx.expand(-1, k_rot.shape[1], -1, k_rot.shape[-1]))
    v_s = v.gather(2, idx.expand(-1, v.shape[1], -1, v.shape[-1]))
    return k_s, v_s, order, present


def nha_chunk(
    q: Tensor,
    q_rot: Tensor,
    k: Tensor,
    k_rot: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    *,
    window: int | None,
    num_sinks: int = 0,
    scale: float,
    valid: Tensor | None = None,
    chunk_size: int = 64,
    return_state: bool = False,
    slot_bias: Tensor | None = None,
) -> tuple[Tensor, SlotState | None]:
    """NHA output (B, Hq, T, Dv), and optionally the slot state after the whole sequence (for the decode cache).
    `slot_bias` (Hq,): the optional slot-logit bias b_h (see common.add_slot_bias)."""
    b, hkv, t_len, d = k.shape
    dv, m = v.shape[-1], log_alpha.shape[-1]
    dtype, dev = q.dtype, q.device
    q, q_rot, k, k_rot, v = (x.float() for x in (q, q_rot, k, k_rot, v))
    if valid is None:
        valid = torch.ones(b, t_len, dtype=torch.bool, device=dev)
    la, s, writes = slot_writes(log_alpha.float(), valid, num_sinks)
    sinks = sink_mask(valid, num_sinks)
    qg, qg_rot = group_queries(q, hkv), group_queries(q_rot, hkv)
    g = qg.shape[2]

    # Slot stream shifted by w: position t carries token t - w. No slots at all for full layers or m = 0.
    use_slots = m > 0 and window is not None and window < t_len
    w_shift = 0 if window is None else min(window, t_len)
    ks, vs = _shift(k, w_shift, 2), _shift(v, w_shift, 2)
    las, ss = _shift(la, w_shift, 2), _shift(s, w_shift, 2)
    writes_s = _shift(writes.long(), w_shift, 1)

    state = SlotState(
        k=q.new_zeros(b, hkv, m, d), v=q.new_zeros(b, hkv, m, dv), count=torch.zeros(b, dtype=torch.long, device=dev)
    )
    use_sinks = num_sinks > 0 and window is not None
    if use_sinks:
        sink_k, sink_v, sink_pos, sink_present = gather_sinks(k_rot, v, sinks, num_sinks)

    pos = torch.arange(t_len, device=dev)
    out = []
    for c0 in range(0, t_len, chunk_size):
        c1 = min(c0 + chunk_size, t_len)
        tq = pos[c0:c1]
        logits = []

        if use_slots:
            a = las[:, :, c0:c1].cumsum(dim=2)  # (B,H,C,M) log decay since the block start
            tri = tq[:, None] >= tq[None, :]
            expo = a[:, :, :, None, :] - a[:, :, None, :, :]
            expo = torch.where(tri[None, None, :, :, None], expo, torch.full_like(expo, NEG_INF))
            e = torch.exp(expo) * ss[:, :, None, c0:c1, :]  # (B,H,C,C,M) decay * write weight
            a_exp = torch.exp(a)
            qk = torch.einsum("bhgtd,bhjd->bhgtj", qg[:, :, :, c0:c1], ks[:, :, c0:c1])
            slot_logits = torch.einsum("bhgtj,bhtji->bhgti", qk, e)
            slot_logits = slot_logits + a_exp[:, :, None] * torch.einsum("bhgtd,bhid->bhgti", qg[:, :, :, c0:c1], state.k)
            count = state.count[:, None] + writes_s[:, c0:c1].cumsum(-1)  # (B,C) slot tokens so far
            slot_logits = add_slot_bias(scale * slot_logits, slot_bias)
            slot_logits = slot_logits.masked_fill(~(count > 0)[:, None, None, :, None], NEG_INF)
            logits.append(slot_logits)
        else:
            logits.append(q.new_full((b, hkv, g, c1 - c0, 0), NEG_INF))

        if use_sinks:
            # Sinks still inside the band are seen through the band; here only those that left it.
            sink_vis = sink_present[:, None, :] & (sink_pos[:, None, :] <= tq[None, :, None] - window)
            sl = scale * torch.einsum("bhgtd,bhsd->bhgts", qg_rot[:, :, :, c0:c1], sink_k)
            logits.append(sl.masked_fill(~sink_vis[:, None, None], NEG_INF))

        k0 = 0 if window is None else max(0, c0 - window + 1)
        kj = pos[k0:c1]
        band = (kj[None, :] <= tq[:, None])
        if window is not None:
            band = band & (kj[None, :] > tq[:, None] - window)
        band = band[None] & valid[:, None, k0:c1]
        bl = scale * torch.einsum("bhgtd,bhjd->bhgtj", qg_rot[:, :, :, c0:c1], k_rot[:, :, k0:c1])
        logits.append(bl.masked_fill(~band[:, None, None], NEG_INF))

        probs = joint_softmax(*logits)
        o = probs[-1] @ v[:, :, None, k0:c1]
        if use_sinks:
            o = o + probs[1] @ sink_v[:, :, None]
        if use_slots:
            p_slot = probs[0]
            o = o + torch.einsum("bhgti,bhtji->bhgtj", p_slot, e) @ vs[:, :, None, c0:c1]
            o = o + (p_slot * a_exp[:, :, None]) @ state.v[:, :, None]
            # Carry the state to the end of the block.
            a_end = a[:, :, -1]
            wgt = torch.exp(a_end[:, :, None, :] - a) * ss[:, :, c0:c1]  # (B,H,C,M)
            state.k = torch.exp(a_end)[..., None] * state.k + torch.einsum("bhji,bhjd->bhid", wgt, ks[:, :, c0:c1])
            state.v = torch.exp(a_end)[..., None] * state.v + torch.einsum("bhji,bhjd->bhid", wgt, vs[:, :, c0:c1])
            state.count = count[:, -1]
        out.append(o)

    o = ungroup(torch.cat(out, dim=3)).to(dtype)
    return o, (state if return_state else None)
