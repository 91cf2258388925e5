"""Pieces of the NHA op shared by its naive, chunked and recurrent forms (see ../shared/docs/NHA.md).

Shapes: q, q_rot (B, Hq, T, D); k, k_rot (B, Hkv, T, D); v (B, Hkv, T, Dv); log_alpha (B, Hkv, T, M) in fp32;
valid (B, T) bool (False = padding). Query heads are grouped per KV head as (B, Hkv, G, T, D): GQA never
repeats keys, values or gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gate_log_alpha(gate_logits: Tensor, temperature: float) -> Tensor:
    """log(alpha) = logsigmoid(W_g x) / tau, in fp32 (the one definition every form uses)."""
    return F.logsigmoid(gate_logits.float()) / temperature


def sink_mask(valid: Tensor, num_sinks: int) -> Tensor:
    """(B, T) bool: the first `num_sinks` real (non-padding) tokens of each sequence."""
    if num_sinks == 0:
        return torch.zeros_like(valid)
    return valid & (valid.long().cumsum(-1) <= num_sinks)


def slot_writes(log_alpha: Tensor, valid: Tensor, num_sinks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (log decay, write weight, writes?) once padding and sinks are taken out.

    Padding and sink tokens never enter the slots: their write weight is 0 and their decay 1 (log 0).
    Returns la (B, H, T, M), s = 1 - alpha (B, H, T, M), writes (B, T) bool.
    """
    writes = valid & ~sink_mask(valid, num_sinks)
    keep = writes[:, None, :, None]
    la = torch.where(keep, log_alpha, torch.zeros_like(log_alpha))
    s = -torch.expm1(la)  # exactly 0 where la == 0
    return la, s, writes


def joint_softmax(*logits: Tensor) -> list[Tensor]:
    """One softmax over the concatenated last dims, in fp32; rows with nothing visible give all zeros."""
    cat = torch.cat(logits, dim=-1)
    mx = cat.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(cat - mx)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return list(p.split([x.shape[-1] for x in logits], dim=-1))


def add_slot_bias(slot_logits: Tensor, slot_bias: Tensor | None) -> Tensor:
    """Slot logits (B, Hkv, G, T, M) plus the optional per-query-head bias b_h (Hq,) (NHA.md, "Slot-logit bias").

    None returns the logits untouched (the paper's layer, bit for bit). Apply before the empty-slot mask, so masked
    slots stay -inf."""
    if slot_bias is None:
        return slot_logits
    _, hkv, g = slot_logits.shape[:3]
    return slot_logits + slot_bias.float().view(hkv, g)[None, :, :, None, None]


def group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """(B, Hq, T, D) -> (B, Hkv, G, T, D) view: query heads of one KV group side by side."""
    b, hq, t, d = q.shape
    return q.view(b, num_kv_heads, hq // num_kv_heads, t, d)


def ungroup(o: Tensor) -> Tensor:
    b, h, g, t, d = o.shape
    return o.reshape(b, h * g, t, d)


NEG_INF = float("-inf")
