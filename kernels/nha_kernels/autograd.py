"""`nha_chunk_triton`: the Triton NHA op with the contract of `nha_convert.ops.nha_chunk` (+ packed sequences).

Forward: the fused kernel (chunk_fwd.py). Backward: see `_NHAFunction.backward`.
Full-attention calls (window None or >= T) without padding or packing go to torch SDPA (flash), as the issue allows.
Nothing here imports nha_convert: the variants and the torch reference op come in as `KernelOptions`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunk_bwd import nha_bwd
from .chunk_fwd import FwdConfig, nha_fwd
from .options import DEFAULT, KernelOptions
from .prep import to_device


@dataclass
class SlotState:
    """The slot memory after the sequence, with the fields of nha_convert.ops.SlotState (which the kernels cannot
    import): keys (B,H,M,D), values (B,H,M,Dv) in fp32, count (B,)."""

    k: Tensor
    v: Tensor
    count: Tensor


class _NHAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, q_rot, k, k_rot, v, log_alpha, slot_bias, window, num_sinks, scale, valid, cu_seqlens, config,
                options, holder):
        out = nha_fwd(q, q_rot, k, k_rot, v, log_alpha, window=window, num_sinks=num_sinks, scale=scale,
                      valid=valid, cu_seqlens=cu_seqlens, config=config, store_lo=True, slot_bias=slot_bias,
                      options=options)
        # The output goes through save_for_backward, never onto ctx: a ctx attribute holding the output would be
        # a reference cycle (output -> grad_fn -> ctx -> output) that frees each step's activations only when
        # Python's cycle collector runs: a training run grew to 78 GB and ran out of memory.
        ctx.save_for_backward(q, q_rot, k, k_rot, v, log_alpha, slot_bias, out.o)
        ctx.extra = (window, num_sinks, scale, valid, cu_seqlens, options)
        ctx.fwd = dataclasses.replace(out, o=None)
        holder.append(out)  # lets the caller read the final slot state without a second forward
        return out.o

    @staticmethod
    def backward(ctx, do):
        window, num_sinks, scale, valid, cu_seqlens, options = ctx.extra
        *saved, slot_bias, o = ctx.saved_tensors
        # w = 0 with a slot bias: the Triton d slot_bias was wrong on an H200 (bf16, 2026-11-29; correct under the CPU
        # interpreter, cause not found), so that rare case takes the reference backward rather than a wrong gradient.
        bias_w0 = slot_bias is not None and window == 0
        rest = (None,) * 8  # window, num_sinks, scale, valid, cu_seqlens, config, options, holder
        if options.triton_bwd != "reference" and not bias_w0:
            fwd = dataclasses.replace(ctx.fwd, o=o)
            grads = nha_bwd(fwd, do, *saved, window=window, num_sinks=num_sinks, scale=scale, slot_bias=slot_bias,
                            options=options)
            return (*grads, *rest)
        # Debug path (triton_bwd reference): differentiate the torch reference, recomputed under autograd.
        if options.reference is None:
            raise ValueError("this backward (NHA_TRITON_BWD=reference, or window 0 with a slot bias) differentiates the "
                             "torch op: pass options=KernelOptions(reference=...) (nha_convert.backend.kernel_options())")
        inputs = [x.detach().requires_grad_(True) for x in saved]
        bias = None if slot_bias is None else slot_bias.detach().requires_grad_(True)
        with torch.enable_grad():
            o = options.reference(*inputs, window=window, num_sinks=num_sinks, scale=scale, slot_bias=bias,
                                  valid=valid, cu_seqlens=cu_seqlens)[0]
            grads = torch.autograd.grad(o, inputs + ([bias] if bias is not None else []), do, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs + [bias], grads)]
        return (*grads, *([None] if bias is None else []), *rest)


def _final_state(fwd, k: Tensor, v: Tensor, m: int, window: int | None, num_sinks: int) -> SlotState:
    lay = fwd.layout
    n, hkv, d, dv, dev = lay.n_seqs, k.shape[1], k.shape[-1], v.shape[-1], k.device
    if fwd.final_k is None:
        return SlotState(k=torch.zeros(n, hkv, m, d, device=dev), v=torch.zeros(n, hkv, m, dv, device=dev),
                         count=torch.zeros(n, dtype=torch.long, device=dev))
    # Slot tokens so far: real non-sink tokens at or before seq_end - 1 - w. The bounds come from the host: one
    # asynchronous copy per layout and window (three blocking ones per layer of every prefill before).
    key = ("final_state", window)
    if key not in lay.derived:
        lay.derived[key] = to_device(dev, [[r for r, _, _ in lay.seq_bounds], [a for _, a, _ in lay.seq_bounds],
                                            [e - 1 - window for _, _, e in lay.seq_bounds]])
    rows, starts, last = lay.derived[key]
    cv = (lay.tok >> 1)[rows, last.clamp(min=0)].long()
    count = torch.where(last >= starts, (cv - num_sinks).clamp(min=0), torch.zeros_like(cv))
    return SlotState(k=fwd.final_k[:, :, :m, :d].clone(), v=fwd.final_v[:, :, :m, :dv].clone(), count=count)


def nha_chunk_triton(
    q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, *,
    window: int | None, num_sinks: int = 0, scale: float, valid: Tensor | None = None, chunk_size: int = 64,
    return_state: bool = False, cu_seqlens: Tensor | None = None, config: FwdConfig | None = None,
    full_attention_sdpa: bool = True, slot_bias: Tensor | None = None, options: KernelOptions = DEFAULT,
) -> tuple[Tensor, SlotState | None]:
    """NHA output (B, Hq, T, Dv) and, if asked, the slot state after the sequence (per packed sequence when
    cu_seqlens is given: then B must be 1 and the state has one row per sequence). `chunk_size` is accepted for
    signature compatibility with `nha_chunk`; the kernels pick their own tiles. `slot_bias` (Hq,): the optional
    slot-logit bias b_h, differentiable. `options`: the kernel variants (nha_convert.backend.kernel_options() reads
    them from the NHA_* variables) and the torch op the reference backward differentiates."""
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
                               cu_seqlens, config, options, holder)
        fwd = holder[0]
    else:
        fwd = nha_fwd(q, q_rot, k, k_rot, v, log_alpha, window=window, num_sinks=num_sinks, scale=scale,
                      valid=valid, cu_seqlens=cu_seqlens, config=config, slot_bias=slot_bias, options=options)
        o = fwd.o
    state = None
    if return_state:
        w = t_len if window is None else min(window, t_len)
        state = _final_state(fwd, k, v, m, w, num_sinks)
    return o, state
