"""The losses of fine-tuning (finetune/objectives.py) and of the `auto:K` calibration (layer_selection.py), below
both. Every function returns SUMS over tokens; the trainer divides by the token count of the whole global batch, so
the loss (and gradient) does not depend on how the batch is split over micro-steps and GPUs.

The language-model losses never hold full-vocabulary logits for the whole batch: the valid positions' hidden
states go through the LM head `chunk` rows at a time, and each chunk is recomputed in backward
(torch.utils.checkpoint), so only one chunk's logits exist at any moment, forward or backward. That torch form
(`chunked_lm_loss`) runs on CPU and is the reference; on CUDA, `lm_objective` hands the same sums to liger-kernel's
fused linear losses when installed (`NHA_LOSS=auto|torch|liger`): they compute each chunk's gradient in the
forward (no recomputation) with compiled / Triton elementwise work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .backend import loss_choice
from .errors import NHAError
from .ops.packed import sequence_starts

Head = Callable[[Tensor], Tensor]


def next_token_targets(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """(B, T) targets: the next token where both it and the current one are real and, in packed rows (position_ids
    given), the next one belongs to the same sequence; else -100."""
    targets = torch.full_like(input_ids, -100)
    real = attention_mask.bool()
    keep = real[:, :-1] & real[:, 1:]
    if position_ids is not None:
        keep = keep & ~sequence_starts(position_ids.expand_as(input_ids))[:, 1:]
    targets[:, :-1] = torch.where(keep, input_ids[:, 1:], targets[:, :-1])
    return targets


def _kl_ce_chunk(h: Tensor, th: Tensor | None, tgt: Tensor, head: Head, teacher_head: Head | None,
                 temperature: float, want_kl: bool, want_ce: bool, wt: Tensor | None = None) -> Tensor:
    logits = head(h).float()
    out = []
    if want_kl:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher_head(th).float() / temperature, dim=-1)
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        out.append((kl if wt is None else kl * wt).sum() * temperature**2)
    else:
        out.append(logits.new_zeros(()))
    if not want_ce:
        out.append(logits.new_zeros(()))
    elif wt is None:
        out.append(F.cross_entropy(logits, tgt, reduction="sum"))
    else:
        out.append((F.cross_entropy(logits, tgt, reduction="none") * wt).sum())
    return torch.stack(out)


def chunked_lm_loss(hidden: Tensor, targets: Tensor, head: Head, *, teacher_hidden: Tensor | None = None,
                    teacher_head: Head | None = None, temperature: float = 1.0, want_kl: bool = False,
                    want_ce: bool = True, chunk: int = 1024,
                    target_weight: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """(KL sum, CE sum, number of positions) over positions with a target.

    KL is the forward KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton), so
    its gradient scale does not change with the temperature. `target_weight` (shaped like targets): each
    position's term is multiplied by it (the sums become weighted sums; the count stays the number of positions).
    """
    pos = (targets != -100).flatten().nonzero().squeeze(1)
    h = hidden.flatten(0, 1).index_select(0, pos)
    th = teacher_hidden.flatten(0, 1).index_select(0, pos) if want_kl else None
    tgt = targets.flatten().index_select(0, pos)
    wt = None if target_weight is None else target_weight.flatten().index_select(0, pos).float()
    total = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, pos.numel(), chunk):
        sl = slice(start, start + chunk)
        args = (h[sl], th[sl] if th is not None else None, tgt[sl], head, teacher_head, temperature, want_kl,
                want_ce, wt[sl] if wt is not None else None)
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_kl_ce_chunk, *args, use_reentrant=False)
        else:
            total = total + _kl_ce_chunk(*args)
    return total[0], total[1], int(pos.numel())


def liger_losses(x: Tensor) -> "LigerLosses | None":
    """liger-kernel's fused losses when they should run on `x` (CUDA, installed), else None.
    NHA_LOSS=auto (the default) uses liger where it can run; torch is the chunked torch form (the CPU path and the
    reference liger is tested against); liger fails loudly where liger cannot run. H200 (2026-11-30): distillation
    51.4k -> 63.6k real tokens/s (docs/performance.md)."""
    choice = loss_choice()  # NHA_LOSS, read once (backend.py)
    if choice == "torch" or (choice == "auto" and not x.is_cuda):
        return None
    lib = import_liger()
    if choice == "liger" and lib is None:
        raise NHAError("NHA_LOSS=liger but liger-kernel is not importable; pip install liger-kernel "
                       "(offline: pip install --no-deps .whl-loss/liger_kernel-*.whl)")
    if choice == "liger" and not x.is_cuda:
        raise NHAError("NHA_LOSS=liger needs CUDA tensors; use NHA_LOSS=auto or torch on CPU")
    return lib


def import_liger() -> "LigerLosses | None":
    try:
        import liger_kernel.chunked_loss.functional as chunked
        import liger_kernel.transformers.functional as functional
    except ImportError:
        return None
    return LigerLosses(chunked.liger_fused_linear_jsd, functional.liger_fused_linear_cross_entropy)


@dataclass(frozen=True)
class LigerLosses:
    jsd: Callable  # chunked_loss: fused linear (generalised) JSD + hard CE, beta = 0 is the forward KL
    cross_entropy: Callable  # Triton fused linear cross-entropy


def _weight_of(head: Head | None) -> Tensor | None:
    """The weight of a bias-free linear LM head (what the fused losses take), else None."""
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head.weight


def lm_objective(hidden: Tensor, targets: Tensor, head: Head, *, teacher_hidden: Tensor | None = None,
                 teacher_head: Head | None = None, temperature: float = 1.0, ce_weight: float = 1.0,
                 want_kl: bool = False, chunk: int = 1024,
                 target_weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """(loss sum, KL sum, CE sum, positions): loss = (1 - ce_weight) * KL + ce_weight * CE with KL as in
    `chunked_lm_loss`; without want_kl the loss is the CE sum. KL and CE come back detached (statistics).
    The fused form runs only where it pays: CUDA, a gradient wanted, bias-free linear heads. liger's losses take no
    per-position weights, so a weighted batch runs fused without them plus `weight_excess` (torch, on the few
    positions whose weight is not 1): sum w f = sum f + sum (w - 1) f, exactly."""
    fusable = torch.is_grad_enabled() and hidden.requires_grad
    lib = liger_losses(hidden) if fusable else None
    w, tw = _weight_of(head), _weight_of(teacher_head) if want_kl else None
    if lib is not None and w is not None and (tw is not None or not want_kl):
        loss, kl, ce, n = fused_lm_objective(lib, hidden, targets, w, teacher_hidden=teacher_hidden,
                                             teacher_weight=tw, temperature=temperature, ce_weight=ce_weight,
                                             want_kl=want_kl, chunk=chunk)
        if target_weight is None:
            return loss, kl, ce, n
        x_loss, x_kl, x_ce = weight_excess(hidden, targets, head, target_weight, teacher_hidden=teacher_hidden,
                                           teacher_head=teacher_head, temperature=temperature, ce_weight=ce_weight,
                                           want_kl=want_kl, chunk=chunk)
        return loss + x_loss, kl + x_kl, ce + x_ce, n
    kl, ce, n = chunked_lm_loss(hidden, targets, head, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                                temperature=temperature, want_kl=want_kl, want_ce=True, chunk=chunk,
                                target_weight=target_weight)
    loss = (1 - ce_weight) * kl + ce_weight * ce if want_kl else ce
    return loss, kl.detach(), ce.detach(), n


def weight_excess(hidden: Tensor, targets: Tensor, head: Head, target_weight: Tensor, *,
                  teacher_hidden: Tensor | None = None, teacher_head: Head | None = None, temperature: float = 1.0,
                  ce_weight: float = 1.0, want_kl: bool = False, chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, KL, CE) of `lm_objective` weighted by (target_weight - 1) over the positions whose weight is not 1,
    in the chunked torch form: what turns an unweighted loss into the weighted one. The retrieval documents' answer
    tokens (weight 20) are a few per thousand, so this costs a few LM-head rows (KL and CE come back detached)."""
    excess = target_weight - 1
    kl, ce, _ = chunked_lm_loss(hidden, torch.where(excess != 0, targets, -100), head, teacher_hidden=teacher_hidden,
                                teacher_head=teacher_head, temperature=temperature, want_kl=want_kl, want_ce=True,
                                chunk=chunk, target_weight=excess)
    loss = (1 - ce_weight) * kl + ce_weight * ce if want_kl else ce
    return loss, kl.detach(), ce.detach()


def fused_lm_objective(lib: LigerLosses, hidden: Tensor, targets: Tensor, weight: Tensor, *,
                       teacher_hidden: Tensor | None, teacher_weight: Tensor | None, temperature: float,
                       ce_weight: float, want_kl: bool, chunk: int, compiled: bool = True
                       ) -> tuple[Tensor, Tensor, Tensor, int]:
    """`lm_objective` through liger-kernel (`compiled=False` runs its chunked form eagerly, e.g. on CPU)."""
    # Every row goes in, ignored targets included (liger masks them out of both losses and of its count), padded
    # to whole chunks: the shapes are then those of the batch, the same at every step of a stage. liger compiles its
    # chunk step with the whole target tensor closed over; when the valid rows were selected, each packed step had
    # a new length, torch.compile recompiled with dynamic shapes, and under torch 2.11 crashed in its guards
    # (H200, sessions 4 and 7: base-as-student distillation, step 2).
    tgt = targets.flatten()
    n = int((tgt != -100).sum())
    zero = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return hidden.sum() * 0, zero, zero, 0
    h = hidden.flatten(0, 1)
    if not want_kl:
        ce = lib.cross_entropy(h, weight, tgt, reduction="sum")
        return ce, zero, ce.detach().float(), n
    th = teacher_hidden.flatten(0, 1)
    pad = -tgt.numel() % chunk
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[-1])])
        th = torch.cat([th, th.new_zeros(pad, th.shape[-1])])
        tgt = torch.cat([tgt, tgt.new_full((pad,), -100)])
    # liger returns means over the n positions: (w_hard * CE + w_soft * KL) / n, then KL / n and CE / n unweighted.
    # beta = 0 is the forward KL(teacher || student); the T^2 factor goes into the soft weight.
    # A stage with another batch shape compiles again, statically: automatic dynamic shapes are what crashed.
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        mean, kl_mean, ce_mean = lib.jsd(h, weight, th, teacher_weight.detach(), tgt, None, None, ce_weight,
                                         (1 - ce_weight) * temperature**2, 0.0, -100, temperature, compiled, chunk,
                                         True)
    return mean * n, (kl_mean * n * temperature**2).detach().float(), (ce_mean * n).detach().float(), n


def direct_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Reference KL sum from full logits (tests compare the chunked version against it)."""
    keep = targets != -100
    t = F.log_softmax(teacher_logits[keep].float() / temperature, -1)
    s = F.log_softmax(student_logits[keep].float() / temperature, -1)
    return (t.exp() * (t - s)).sum() * temperature**2


def attention_mse(student: list[Tensor], teacher: list[Tensor], attention_mask: Tensor) -> Tensor:
    """(L,) per-layer sums over real tokens of the mean squared difference over the hidden features (fp32)."""
    # Selected with where rather than a boolean index (a host sync, one per layer per step); the where comes before
    # the square so that whatever padded positions hold never reaches the loss or its gradient.
    real = attention_mask.bool()[..., None]
    out = []
    for s, t in zip(student, teacher):
        diff = torch.where(real, s.float() - t.float(), 0.0)
        out.append(diff.pow(2).mean(-1).sum())
    return torch.stack(out)
