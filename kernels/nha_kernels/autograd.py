"""`nha_chunk_triton`: the Triton NHA op with the contract of `nha_convert.ops.nha_chunk` (+ packed sequences).

Forward: the fused kernel (chunk_fwd.py). Backward: see `_NHAFunction.backward`.
Full-attention calls (window None or >= T) without padding or packing go to torch SDPA (flash), as the issue allows.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from nha_convert.backend import environment
from nha_convert.ops.chunk import SlotState, nha_chunk
from nha_convert.ops.packed import nha_chunk_varlen

from .chunk_bwd import nha_bwd
from .chunk_fwd import FwdConfig, nha_fwd


def _reference_per_sequence(q, q_rot, k, k_rot, v, log_alpha, slot_bias=None, *, window, num_sinks, scale, valid,
                            cu_seqlens):
    """The torch reference, applied to each packed sequence separately (or once when not packed)."""
    kw = dict(window=window, num_sinks=num_sinks, scale=scale, slot_bias=slot_bias, valid=valid)
    if cu_seqlens is None:
        return nha_chunk(q, q_rot, k, k_rot, v, log_alpha, **kw)[0]
    return nha_chunk_varlen(q, q_rot, k, k_rot, v, log_alpha, cu_seqlens=cu_seqlens, **kw)[0]


class _NHAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q_rot, k, k_rot, v, log_alpha, slot_bias, window, num_sinks, scale, valid, cu_seqlens, config,
                holder):
        out = nha_fwd(q, q_rot, k, k_rot, v, log_alpha, window=window, num_sinks=num_sinks, scale=scale,
                      valid=valid, cu_seqlens=cu_seqlens, config=config, store_lo=True, slot_bias=slot_bias)
        # The output goes through save_for_backward, never onto ctx: a ctx attribute holding the output would be
        # a reference cycle (output -> grad_fn -> ctx -> output) that frees each step's activations only when
        # Python's cycle collector runs: a training run grew to 78 GB and ran out of memory.
        ctx.save_for_backward(q, q_rot, k, k_rot, v, log_alpha, slot_bias, out.o)
        ctx.extra = (window, num_sinks, scale, valid, cu_seqlens)
        ctx.fwd = dataclasses.replace(out, o=None)
        holder.append(out)  # lets the caller read the final slot state without a second forward
        return out.o

    @staticmethod
    def backward(ctx, do):
        window, num_sinks, scale, valid, cu_seqlens = ctx.extra
        *saved, slot_bias, o = ctx.saved_tensors
        # w = 0 with a slot bias: the Triton d slot_bias was wrong on an H200 (bf16, 2026-11-29; correct under the CPU
        # interpreter, cause not found), so that rare case takes the reference backward rather than a wrong gradient.
        bias_w0 = slot_bias is not None and window == 0
        if environment().triton_bwd != "reference" and not bias_w0:
            fwd = dataclasses.replace(ctx.fwd, o=o)
            grads = nha_bwd(fwd, do, *saved, window=window, num_sinks=num_sinks, scale=scale, slot_bias=slot_bias)
            return (*grads, None, None, None, None, None, None, None)
        # Debug path (NHA_TRITON_BWD=reference): differentiate the torch reference, recomputed under autograd.
        inputs = [x.detach().requires_grad_(True) for x in saved]
        bias = None if slot_bias is None else slot_bias.detach().requires_grad_(True)
        with torch.enable_grad():
            o = _reference_per_sequence(*inputs, bias, window=window, num_sinks=num_sinks, scale=scale, valid=valid,
                                        cu_seqlens=cu_seqlens)
            grads = torch.autograd.grad(o, inputs + ([bias] if bias is not None else []), do, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs + [bias], grads)]
        return (*grads, *([None] if bias is None else []), None, None, None, None, None, None, None)


def _final_state(fwd, k: Tensor, v: Tensor, m: int, window: int | None, num_sinks: int) -> SlotState:
    lay = fwd.layout
    n, hkv, d, dv, dev = lay.n_seqs, k.shape[1], k.shape[-1], v.shape[-1], k.device
    if fwd.final_k is None:
        return SlotState(k=torch.zeros(n, hkv, m, d, device=dev), v=torch.zeros(n, hkv, m, dv, device=dev),
                         count=torch.zeros(n, dtype=torch.long, device=dev))
    # Slot tokens so far: real non-sink tokens at or before seq_end - 1 - w.
    rows = torch.tensor([r for r, _, _ in lay.seq_bounds], device=dev)
    starts = torch.tensor([a for _, a, _ in lay.seq_bounds], device=dev)
    last = torch.tensor([e - 1 - window for _, _, e in lay.seq_bounds], device=dev)
    cv = (lay.tok >> 1)[rows, last.clamp(min=0)].long()
    count = torch.where(last >= starts, (cv - num_sinks).clamp(min=0), torch.zeros_like(cv))
    return SlotState(k=fwd.final_k[:, :, :m, :d].clone(), v=fwd.final_v[:, :, :m, :dv].clone(), count=count)


def nha_chunk_triton(
    q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, *,
    window: int | None, num_sinks: int = 0, scale: float, valid: Tensor | None = None, chunk_size: int = 64,
    return_state: bool = False, cu_seqlens: Tensor | None = None, config: FwdConfig | None = None,
    full_attention_sdpa: bool = True, slot_bias: Tensor | None = None,
) -> tuple[Tensor, SlotState | None]:
    """NHA output (B, Hq, T, Dv) and, if asked, the slot state after the sequence (per packed sequence when
    cu_seqlens is given: then B must be 1 and the state has one row per sequence). `chunk_size` is accepted for
    signature compatibility with `nha_chunk`; the kernels pick their own tiles. `slot_bias` (Hq,): the optional
    slot-logit bias b_h, differentiable."""
    b, hq, t_len, _ = q.shape
    m = log_alpha.shape[-1]
    full = window is None or window >= t_len
    if (full and full_attention_sdpa and q.is_cuda and cu_seqlens is None
            and (valid is None or bool(valid.all()))):
        o = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, scale=scale,
                                           enable_gqa=hq != k.shape[1])
        state = None
        if return_state:
            dev = q.device
            state = SlotState(k=torch.zeros(b, k.shape[1], m, k.shape[-1], device=dev),
                              v=torch.zeros(b, k.shape[1], m, v.shape[-1], device=dev),
                              count=torch.zeros(b, dtype=torch.long, device=dev))
        return o, state
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, q_rot, k, k_rot, v, log_alpha, slot_bias))
    if needs_grad:
        holder: list = []
        o = _NHAFunction.apply(q, q_rot, k, k_rot, v, log_alpha, slot_bias, window, num_sinks, scale, valid,
                               cu_seqlens, config, holder)
        fwd = holder[0]
    else:
        fwd = nha_fwd(q, q_rot, k, k_rot, v, log_alpha, window=window, num_sinks=num_sinks, scale=scale,
                      valid=valid, cu_seqlens=cu_seqlens, config=config, slot_bias=slot_bias)
        o = fwd.o
    state = None
    if return_state:
        w = t_len if window is None else min(window, t_len)
        state = _final_state(fwd, k, v, m, w, num_sinks)
    return o, state
