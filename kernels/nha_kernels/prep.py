"""Host-side bookkeeping shared by the forward and backward kernels: sequences, spans, token codes, sink positions.

A *sequence* is one batch row (dense input) or one packed document (cu_seqlens, B == 1). The kernels never look
across a sequence boundary. A *span* is a run of up to L query positions of one sequence that a single program
walks through sequentially, carrying the slot state in registers; the state at each span start comes from a
small two-step pass (per-span local states in parallel, then a scan over the spans of each sequence).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@dataclass
class Layout:
    """Where the sequences and spans lie, and per-token codes; all device tensors are int32."""

    batch: int
    seq_len: int  # T of the (B, H, T, D) tensors
    span: int  # L
    n_seqs: int
    n_spans: int  # total spans over all sequences
    spans_per_row: int  # dense layout: spans of each batch row (0 in varlen mode)
    varlen: bool
    span_table: Tensor | None  # (n_spans, 4): seq_start, seq_end, span_start, seq index (varlen only)
    seq_table: Tensor | None  # (n_seqs, 4): first span, span count, seq_start, seq_end (varlen only)
    seq_bounds: list[tuple[int, int, int]]  # (row, start, end) per sequence, on the host
    tok: Tensor  # (B, T): 2 * (real tokens of its sequence up to and including it) + is_real
    sink_pos: Tensor  # (n_seqs, SP): positions of the first num_sinks real tokens, -1 where absent
    sink_pad: int  # SP
    seq_rows: Tensor  # (n_seqs,) long: the batch row of each sequence
    seq_start_at: Tensor  # (T,) long: start of the sequence that position t belongs to (0 in dense mode)
    seq_end_at: Tensor  # (T,) long: its end (exclusive; T in dense mode)
    # Device tensors the launchers derive from this layout (e.g. gate_grad's chunk bounds), built once per layout:
    # each build is several small launches, and a layout serves every layer of a step and their backward.
    derived: dict = field(default_factory=dict, repr=False)


# Layouts of all-real inputs (valid None), by boundaries and shape: every layer of a forward and its backward hands
# over the same cu_seqlens object, so one build serves them all. Building one copies host tables to the GPU (a sync
# each); per layer that was 12 syncs x 30 layers x 2 span sizes per training step (H200 sync count, session 5).
_LAYOUTS: OrderedDict[tuple, tuple[weakref.ref | None, Layout]] = OrderedDict()
_LAYOUTS_KEPT = 8


def make_layout(
    valid: Tensor | None,
    cu_seqlens: Tensor | None,
    batch: int,
    seq_len: int,
    num_sinks: int,
    span: int,
    device: torch.device,
) -> Layout:
    """The layout of one call. With valid None (every position real) it is built once per boundaries and shape and
    then shared: a cu_seqlens tensor is recognised by identity (a weak reference, so a new tensor at a recycled
    address never matches) and must not be changed in place after use."""
    if valid is not None:
        return _build_layout(valid, cu_seqlens, batch, seq_len, num_sinks, span, device)
    key = (None if cu_seqlens is None else id(cu_seqlens), batch, seq_len, num_sinks, span, str(device))
    hit = _LAYOUTS.get(key)
    if hit is not None and (hit[0] is None or hit[0]() is cu_seqlens):
        _LAYOUTS.move_to_end(key)
        return hit[1]
    lay = _build_layout(None, cu_seqlens, batch, seq_len, num_sinks, span, device)
    _LAYOUTS[key] = (None if cu_seqlens is None else weakref.ref(cu_seqlens), lay)
    while len(_LAYOUTS) > _LAYOUTS_KEPT:
        _LAYOUTS.popitem(last=False)
    return lay


def _build_layout(valid: Tensor | None, cu_seqlens: Tensor | None, batch: int, seq_len: int, num_sinks: int,
                  span: int, device: torch.device) -> Layout:
    if valid is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    valid = valid.to(device=device, dtype=torch.bool)
    gc = valid.to(torch.int32).cumsum(-1, dtype=torch.int32)  # real tokens up to and including t
    if cu_seqlens is None:
        bounds = [(b, 0, seq_len) for b in range(batch)]
        cv = gc
        per_row = -(-seq_len // span)
        n_spans = batch * per_row
        span_table = seq_table = None
        seq_rows = torch.arange(batch, device=device)
        seq_start_at = torch.zeros(seq_len, dtype=torch.long, device=device)
        seq_end_at = torch.full((seq_len,), seq_len, dtype=torch.long, device=device)
    else:
        if batch != 1:
            raise ValueError("packed sequences (cu_seqlens) need batch size 1")
        cu = [int(x) for x in cu_seqlens.tolist()]  # cu_seqlens_of keeps it on the host: no sync
        if cu[0] != 0 or cu[-1] != seq_len or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={seq_len}, got {cu}")
        bounds = [(0, a, b) for a, b in zip(cu, cu[1:])]
        rows, seqs = [], []
        for n, (_, a, b) in enumerate(bounds):
            first = len(rows)
            for s0 in range(a, b, span):
                rows.append((a, b, s0, n))
            seqs.append((first, len(rows) - first, a, b))
        starts, lens, span_table, seq_table = to_device(
            device, [cu[:-1], [b - a for a, b in zip(cu, cu[1:])], rows or [(0, 0, 0, 0)], seqs])
        span_table, seq_table = span_table.to(torch.int32), seq_table.to(torch.int32)
        before = torch.where(starts > 0, gc[0, (starts - 1).clamp(min=0)], torch.zeros_like(starts, dtype=torch.int32))
        cv = gc - torch.repeat_interleave(before, lens, output_size=seq_len)[None]
        # Per-position sequence bounds for the backward's shifts and scans, built here once per layout rather than
        # from the host list in every backward call (each such copy was a host sync, per layer, per step).
        seq_rows = torch.zeros(len(cu) - 1, dtype=torch.long, device=device)
        seq_start_at = torch.repeat_interleave(starts, lens, output_size=seq_len)
        seq_end_at = torch.repeat_interleave(starts + lens, lens, output_size=seq_len)
        n_spans, per_row = len(rows), 0
    tok = (cv * 2 + valid.to(torch.int32)).to(torch.int32).contiguous()

    sp = max(16, next_pow2(num_sinks))
    sink_pos = torch.full((len(bounds), sp), -1, dtype=torch.int32, device=device)
    if num_sinks > 0 and len(bounds) > 0:
        # The k-th real token of a sequence is the first position whose running count reaches k.
        ks = torch.arange(1, num_sinks + 1, device=device, dtype=torch.int32)
        if cu_seqlens is None:
            pos = torch.searchsorted(cv.contiguous(), ks.expand(batch, -1).contiguous())
            end = torch.full((batch, 1), seq_len, device=device)
            start = torch.zeros((batch, 1), device=device, dtype=torch.long)
            sink_pos[:, :num_sinks] = torch.where(pos < end, pos, -1).to(torch.int32)
        else:
            base = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), gc[0]])
            target = base[starts][:, None] + ks[None, :]  # global running count of the k-th real token
            pos = torch.searchsorted(gc[0].contiguous(), target.reshape(-1).contiguous()).view(len(bounds), -1)
            sink_pos[:, :num_sinks] = torch.where(pos < (starts + lens)[:, None], pos, -1).to(torch.int32)
    return Layout(
        batch=batch, seq_len=seq_len, span=span, n_seqs=len(bounds), n_spans=n_spans, spans_per_row=per_row,
        varlen=cu_seqlens is not None, span_table=span_table, seq_table=seq_table, seq_bounds=bounds,
        tok=tok, sink_pos=sink_pos.contiguous(), sink_pad=sp, seq_rows=seq_rows, seq_start_at=seq_start_at,
        seq_end_at=seq_end_at,
    )


def to_device(device: torch.device, tables: list[list]) -> list[Tensor]:
    """Host-built int tables (lists of ints or of equal-length tuples) on `device` as int64, in one copy. On CUDA the
    copy is from pinned memory and asynchronous: a pageable copy waits for the GPU to drain (a host sync), and a
    layout used to make six of them."""
    host = [torch.tensor(t, dtype=torch.long) for t in tables]
    flat = torch.cat([h.reshape(-1) for h in host])
    if device.type == "cuda":
        flat = flat.pin_memory()
    dev = flat.to(device, non_blocking=True)
    out, at = [], 0
    for h in host:
        out.append(dev[at:at + h.numel()].view(h.shape))
        at += h.numel()
    return out


def dummy(device: torch.device) -> Tensor:
    return torch.zeros(4, dtype=torch.int32, device=device)
