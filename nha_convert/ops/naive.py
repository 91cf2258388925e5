"""Dense NHA: every (query, key) pair materialised. O(T^2 * M) memory: the readable ground truth for tests."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import NEG_INF, add_slot_bias, group_queries, joint_softmax, sink_mask, slot_writes, ungroup


def nha_naive(
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
    slot_bias: Tensor | None = None,
) -> Tensor:
    """NHA output (B, Hq, T, Dv) straight from the definition in NHA.md.

    Query t sees: slots holding every real non-sink token j <= t - w (decayed by the gates of later slot tokens),
    window keys j in (t - w, t], and sink keys j <= t; all through one softmax. `slot_bias` (Hq,): b_h added to
    every slot logit of query head h (None: no bias).
    """
    b, hkv, t_len, _ = k.shape
    dtype = q.dtype
    q, q_rot, k, k_rot, v = (x.float() for x in (q, q_rot, k, k_rot, v))
    if valid is None:
        valid = torch.ones(b, t_len, dtype=torch.bool, device=q.device)
    la, s, writes = slot_writes(log_alpha.float(), valid, num_sinks)
    sinks = sink_mask(valid, num_sinks)
    pos = torch.arange(t_len, device=q.device)
    ti, ji = pos[:, None], pos[None, :]

    # Slots: D[t, j, i] = prod_{j < n <= t-w} alpha_n[i] * s_j[i]  for slot tokens j <= t - w.
    w_slot = t_len if window is None else window
    in_slots = (ji <= ti - w_slot)[None] & writes[:, None, :]  # (B, T, T)
    cum = la.cumsum(dim=2)  # A_n = sum_{n' <= n} log alpha
    shift = (pos - w_slot).clamp(min=0)
    a_t = cum[:, :, shift]  # A_{t-w}
    expo = a_t[:, :, :, None, :] - cum[:, :, None, :, :]  # (B, H, T, T, M)
    expo = torch.where(in_slots[:, None, :, :, None], expo, torch.full_like(expo, NEG_INF))
    decay = torch.exp(expo) * s[:, :, None, :, :]

    qg, qg_rot = group_queries(q, hkv), group_queries(q_rot, hkv)
    qk = torch.einsum("bhgtd,bhjd->bhgtj", qg, k)
    slot_logits = add_slot_bias(scale * torch.einsum("bhgtj,bhtji->bhgti", qk, decay), slot_bias)
    slot_nonempty = in_slots.any(-1)  # (B, T): the empty-slot mask
    slot_logits = slot_logits.masked_fill(~slot_nonempty[:, None, None, :, None], NEG_INF)

    # Window and sinks: exact softmax attention on RoPE'd q/k.
    causal = ji <= ti
    in_window = causal if window is None else causal & (ji > ti - window)
    visible = valid[:, None, :] & (in_window[None] | (causal[None] & sinks[:, None, :]))
    win_logits = scale * torch.einsum("bhgtd,bhjd->bhgtj", qg_rot, k_rot)
    win_logits = win_logits.masked_fill(~visible[:, None, None], NEG_INF)

    p_slot, p_win = joint_softmax(slot_logits, win_logits)
    o = torch.einsum("bhgti,bhtji->bhgtj", p_slot, decay) @ v[:, :, None] + p_win @ v[:, :, None]
    return ungroup(o).to(dtype)
