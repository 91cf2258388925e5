"""Training objectives. Every function returns SUMS over tokens; the trainer divides by the token count of the
whole global batch, so the loss (and gradient) does not depend on how the batch is split over micro-steps and GPUs.

The language-model losses never hold full-vocabulary logits for the whole batch: the valid positions' hidden
states go through the LM head `chunk` rows at a time, and each chunk is recomputed in backward
(torch.utils.checkpoint), so only one chunk's logits exist at any moment, forward or backward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Head = Callable[[Tensor], Tensor]


def next_token_targets(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) targets: the next token where both it and the current one are real, else -100."""
    targets = torch.full_like(input_ids, -100)
    real = attention_mask.bool()
    keep = real[:, :-1] & real[:, 1:]
    targets[:, :-1] = torch.where(keep, input_ids[:, 1:], targets[:, :-1])
    return targets


def _kl_ce_chunk(h: Tensor, th: Tensor | None, tgt: Tensor, head: Head, teacher_head: Head | None,
                 temperature: float, want_kl: bool, want_ce: bool) -> Tensor:
    logits = head(h).float()
    out = []
    if want_kl:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher_head(th).float() / temperature, dim=-1)
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).sum() * temperature**2
        out.append(kl)
    else:
        out.append(logits.new_zeros(()))
    out.append(F.cross_entropy(logits, tgt, reduction="sum") if want_ce else logits.new_zeros(()))
    return torch.stack(out)


def chunked_lm_loss(hidden: Tensor, targets: Tensor, head: Head, *, teacher_hidden: Tensor | None = None,
                    teacher_head: Head | None = None, temperature: float = 1.0, want_kl: bool = False,
                    want_ce: bool = True, chunk: int = 1024) -> tuple[Tensor, Tensor, int]:
    """(KL sum, CE sum, number of positions) over positions with a target.

    KL is the forward KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton), so
    its gradient scale does not change with the temperature.
    """
    pos = (targets != -100).flatten().nonzero().squeeze(1)
    h = hidden.flatten(0, 1).index_select(0, pos)
    th = teacher_hidden.flatten(0, 1).index_select(0, pos) if want_kl else None
    tgt = targets.flatten().index_select(0, pos)
    total = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, pos.numel(), chunk):
        sl = slice(start, start + chunk)
        args = (h[sl], th[sl] if th is not None else None, tgt[sl], head, teacher_head, temperature, want_kl,
                want_ce)
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_kl_ce_chunk, *args, use_reentrant=False)
        else:
            total = total + _kl_ce_chunk(*args)
    return total[0], total[1], int(pos.numel())


def direct_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference KL sum from full logits (tests compare the chunked version against it)."""
    keep = targets != -100
    t = F.log_softmax(teacher_logits[keep].float() / temperature, -1)
    s = F.log_softmax(student_logits[keep].float() / temperature, -1)
    return (t.exp() * (t - s)).sum() * temperature**2


def attention_mse(student: list[Tensor], teacher: list[Tensor], attention_mask: Tensor) -> Tensor:
    """(L,) per-layer sums over real tokens of the mean squared difference over the hidden features (fp32)."""
    real = attention_mask.bool()
    out = []
    for s, t in zip(student, teacher):
        diff = (s.float() - t.float())[real]
        out.append(diff.pow(2).mean(-1).sum())
    return torch.stack(out)
