"""Packed rows: several documents in one row, told apart by position ids that restart at each document.

The boundary rule is transformers' own (masking_utils.find_packed_sequence_indices, 5.17 and 5.24): a token
starts a new sequence unless its position id is the previous token's plus one. Full-attention layers of a base
model get their block-diagonal mask from that rule; NHA layers turn the same boundaries into `cu_seqlens` over the
flattened batch (the Triton kernels' varlen layout) or, in torch, run the reference once per sequence.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .chunk import nha_chunk


def sequence_starts(position_ids: Tensor) -> Tensor:
    """(B, T) bool: True where a token starts a sequence (the first column, and every break in the positions)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


_memo: tuple[weakref.ref, int, int, Tensor | None] | None = None


def cu_seqlens_of(position_ids: Tensor | None, batch: int) -> Tensor | None:
    """int32 boundaries (0, ..., B*T) of the sequences of the flattened batch, or None when every row holds one
    sequence (then the dense path is exact and faster).

    Every layer of a forward is handed the same position-id tensor: the result is kept for it (a weak reference, so
    a new tensor at a recycled address is never mistaken for it), which makes one host sync per forward, not one
    per layer. It lives on the CPU, where the kernels read it."""
    global _memo
    if position_ids is None:
        return None
    if (_memo is not None and _memo[0]() is position_ids and _memo[1] == position_ids._version
            and _memo[2] == batch):
        return _memo[3]
    starts = sequence_starts(position_ids.expand(batch, -1)).flatten()
    flat = starts.nonzero().squeeze(1).cpu()
    cu = None
    if len(flat) > batch:  # every row starts one sequence at column 0; any other start means packing
        cu = torch.cat([flat, flat.new_tensor([starts.numel()])]).to(torch.int32)
    _memo = (weakref.ref(position_ids), position_ids._version, batch, cu)
    return cu


def flatten_rows(x: Tensor) -> Tensor:
    """(B, H, T, ...) -> (1, H, B*T, ...): the rows one after another, as the varlen kernels take them."""
    return x.transpose(0, 1).flatten(1, 2).unsqueeze(0)


def unflatten_rows(x: Tensor, batch: int) -> Tensor:
    """Inverse of flatten_rows."""
    return x.squeeze(0).unflatten(1, (batch, -1)).transpose(0, 1)


def nha_chunk_varlen(q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, *,
                     cu_seqlens: Tensor, valid: Tensor | None = None, return_state: bool = False,
                     **kwargs) -> tuple[Tensor, None]:
    """The torch reference on packed sequences (B == 1, boundaries `cu_seqlens`): `nha_chunk` on each sequence
    alone, so no state (window, slots, sinks) crosses a boundary. Same contract as `nha_chunk_triton(...,
    cu_seqlens=...)`; the final state is not returned (packed rows train, they never prefill a cache)."""
    if return_state:
        raise ValueError("nha_chunk_varlen does not return a decode state; prefill a cache without packing")
    cu = [int(x) for x in cu_seqlens.tolist()]
    outs = []
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        sl = (slice(None), slice(None), slice(a, b))
        part_valid = None if valid is None else valid[:, a:b]
        outs.append(nha_chunk(q[sl], q_rot[sl], k[sl], k_rot[sl], v[sl], log_alpha[sl], valid=part_valid,
                              **kwargs)[0])
    return torch.cat(outs, dim=2), None
