"""Small @triton.jit helpers shared by the NHA kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from ._compat import patch_interpreter

patch_interpreter()


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation near 0 (the slot write weight is s = -expm1(log alpha))."""
    poly = x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * 0.041666666666666664)))
    return tl.where(tl.abs(x) < 1e-2, poly, tl.exp(x) - 1.0)


@triton.jit
def rows_of(x, GP: tl.constexpr, BM: tl.constexpr, N: tl.constexpr):
    """(BM, N) per-token values -> (GP * BM, N): row g * BM + t holds token t (one copy per query head)."""
    return tl.reshape(tl.broadcast_to(x[None, :, :], (GP, BM, N)), (GP * BM, N))


@triton.jit
def sum_heads(x, GP: tl.constexpr, BM: tl.constexpr, N: tl.constexpr):
    """(GP * BM, N) -> (BM, N): sum over the query heads of a KV group."""
    return tl.sum(tl.reshape(x, (GP, BM, N)), axis=0)


@triton.jit
def pick_row(x, idx, j):
    """Row j of a 2D register tile x (idx = arange over its first dim), as a 1D tensor."""
    return tl.sum(tl.where((idx == j)[:, None], x, 0.0), axis=0)


@triton.jit
def pick_col(x, idx, j):
    """Column j of a 2D register tile x (idx = arange over its second dim)."""
    return tl.sum(tl.where((idx == j)[None, :], x, 0.0), axis=1)


@triton.jit
def slot_bias_rows(slot_bias, hq, HQ, ok):
    """The slot-logit bias b_h of each tile row (flat query head hq = batch * HQ + head), 0 where not ok."""
    return tl.load(slot_bias + hq % HQ, mask=ok, other=0.0)


@triton.jit
def group_rows(bh, G: tl.constexpr, BM: tl.constexpr, ROWS: tl.constexpr):
    """The rows g * BM + t of a tile stacking the G query heads of KV head `bh` (= batch * H + h): each row's token
    offset t, its flat query head bh * G + g, and whether g is a real head (the tile pads G up to a power of two)."""
    rr = tl.arange(0, ROWS)
    g = rr // BM
    return rr % BM, bh * G + g, g < G
