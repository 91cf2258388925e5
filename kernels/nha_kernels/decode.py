"""One decode step of NHA for a batch, as `NHAState.step` computes it, updating the state in place.

Two launches:
- `_decode_kernel`, one program per (batch row, KV head) with the G query heads as rows of one tile: folds the token
  that leaves the window into the fp32 slots, attends over [slots ; ring buffer ; sinks] with one online softmax
  (the new token is substituted into the ring in registers), then writes the new ring entry, sink and slots.
- `_decode_flags_kernel`, one program per batch row: the per-row bookkeeping (ring validity/sink flags, slot
  count, real-token count, sink positions), which every head of the first kernel must read in its old state.
Full-attention layers (window None) keep a growing buffer and stay on the torch path.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import triton
import triton.language as tl
from torch import Tensor

from nha_convert.ops.recurrent import NHAState

from .prep import next_pow2
from .triton_utils import expm1


@triton.jit
def _online(m_i, l_i, acc, sc, vals):
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, vals.to(tl.float32), input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q, qr, k, kr, v, la, valid, n_real, slot_count, slot_k, slot_v,
    win_kr, win_k, win_v, win_la, win_valid, win_sink,
    sink_kr, sink_v, sink_pos, sink_present, o,
    t, W, S, H, scale,
    G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr, SP: tl.constexpr, BN: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    ii = tl.arange(0, MP)
    d_ok = dd < D
    dv_ok = dv < DV
    m_ok = ii < M

    valid_b = tl.load(valid + b) != 0
    nr = tl.load(n_real + b)
    is_sink = valid_b & (nr < S)
    writes = valid_b & (nr >= S)
    la_new = tl.load(la + bh * M + ii, mask=m_ok & writes, other=0.0)
    k_new = tl.load(k + bh * D + dd, mask=d_ok, other=0.0)
    kr_new = tl.load(kr + bh * D + dd, mask=d_ok, other=0.0)
    v_new = tl.load(v + bh * DV + dv, mask=dv_ok, other=0.0)

    # The token folded into the slots: the new one itself when w = 0, else the ring entry it replaces (if any).
    wpos = tl.maximum(W, 1)
    i = t % wpos
    has_out = (W > 0) & (t >= W)
    flag_v = tl.load(win_valid + b64 * W + i, mask=has_out, other=0) != 0
    flag_s = tl.load(win_sink + b64 * W + i, mask=has_out, other=0) != 0
    out_writes = has_out & flag_v & (flag_s == 0)
    ring_i = bh * W + i
    k_out = tl.load(win_k + ring_i * D + dd, mask=d_ok & has_out, other=0.0)
    v_out = tl.load(win_v + ring_i * DV + dv, mask=dv_ok & has_out, other=0.0)
    la_out = tl.load(win_la + ring_i * M + ii, mask=m_ok & out_writes, other=0.0)
    fold_w = tl.where(W == 0, writes, out_writes)
    la_f = tl.where(fold_w, tl.where(W == 0, la_new, la_out), 0.0)
    k_f = tl.where(W == 0, k_new, k_out).to(tl.float32)
    v_f = tl.where(W == 0, v_new, v_out).to(tl.float32)
    sk = tl.load(slot_k + bh * M * D + ii[:, None] * D + dd[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    sv = tl.load(slot_v + bh * M * DV + ii[:, None] * DV + dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                 other=0.0)
    s_f = -expm1(la_f)
    sk = tl.exp(la_f)[:, None] * sk + s_f[:, None] * k_f[None, :]
    sv = tl.exp(la_f)[:, None] * sv + s_f[:, None] * v_f[None, :]
    count = tl.load(slot_count + b) + fold_w.to(tl.int64)

    rr = tl.arange(0, ROWS)
    r_ok = rr < G
    hq = bh * G + rr
    qu = tl.load(q + hq[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qrot = tl.load(qr + hq[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)

    ls = tl.dot(qu, tl.trans(sk), input_precision="ieee") * scale
    ls = tl.where(m_ok[None, :] & (count > 0), ls, float("-inf"))
    m_i = tl.max(ls, axis=1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.exp(ls - m_safe[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p, sv, input_precision="ieee")

    for c0 in range(0, W, BN):
        widx = c0 + tl.arange(0, BN)
        w_ok = widx < W
        is_new = widx == i
        wv = tl.load(win_valid + b64 * W + widx, mask=w_ok, other=0) != 0
        wv = tl.where(is_new, valid_b, wv) & w_ok
        kt = tl.load(win_kr + (bh * W + widx)[:, None] * D + dd[None, :], mask=w_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        vt = tl.load(win_v + (bh * W + widx)[:, None] * DV + dv[None, :], mask=w_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(tl.float32)
        kt = tl.where(is_new[:, None], kr_new.to(tl.float32)[None, :], kt)
        vt = tl.where(is_new[:, None], v_new.to(tl.float32)[None, :], vt)
        sc = tl.dot(qrot, tl.trans(kt), input_precision="ieee") * scale
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(wv[None, :], sc, float("-inf")), vt)

    if HAS_SINKS:
        si = tl.arange(0, SP)
        s_ok = si < S
        new = is_sink & (si == nr)
        pres = (tl.load(sink_present + b64 * S + si, mask=s_ok, other=0) != 0) | new
        pos = tl.where(new, t, tl.load(sink_pos + b64 * S + si, mask=s_ok, other=0))
        ks = tl.load(sink_kr + (bh * S + si)[:, None] * D + dd[None, :], mask=s_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        vs = tl.load(sink_v + (bh * S + si)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(tl.float32)
        ks = tl.where(new[:, None], kr_new.to(tl.float32)[None, :], ks)
        vs = tl.where(new[:, None], v_new.to(tl.float32)[None, :], vs)
        sc = tl.dot(qrot, tl.trans(ks), input_precision="ieee") * scale
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where((pres & (pos <= t - W))[None, :], sc, float("-inf")), vs)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o + hq[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty), mask=r_ok[:, None] & dv_ok[None, :])

    tl.debug_barrier()  # every thread has read the old ring entry and slots before they are overwritten
    tl.store(slot_k + bh * M * D + ii[:, None] * D + dd[None, :], sk, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(slot_v + bh * M * DV + ii[:, None] * DV + dv[None, :], sv, mask=m_ok[:, None] & dv_ok[None, :])
    has_ring = W > 0
    tl.store(win_kr + ring_i * D + dd, kr_new, mask=d_ok & has_ring)
    tl.store(win_k + ring_i * D + dd, k_new, mask=d_ok & has_ring)
    tl.store(win_v + ring_i * DV + dv, v_new, mask=dv_ok & has_ring)
    tl.store(win_la + ring_i * M + ii, la_new, mask=m_ok & has_ring)
    if HAS_SINKS:
        nr_c = tl.minimum(nr, S - 1)
        tl.store(sink_kr + (bh * S + nr_c) * D + dd, kr_new, mask=d_ok & is_sink)
        tl.store(sink_v + (bh * S + nr_c) * DV + dv, v_new, mask=dv_ok & is_sink)


@triton.jit
def _decode_flags_kernel(valid, n_real, slot_count, win_valid, win_sink, sink_pos, sink_present, t, W, S):
    b = tl.program_id(0).to(tl.int64)
    valid_b = tl.load(valid + b) != 0
    nr = tl.load(n_real + b)
    is_sink = valid_b & (nr < S)
    writes = valid_b & (nr >= S)
    i = t % tl.maximum(W, 1)
    has_out = (W > 0) & (t >= W)
    out_writes = has_out & (tl.load(win_valid + b * W + i, mask=has_out, other=0) != 0) & (
        tl.load(win_sink + b * W + i, mask=has_out, other=0) == 0)
    fold_w = tl.where(W == 0, writes, out_writes)
    tl.store(slot_count + b, tl.load(slot_count + b) + fold_w.to(tl.int64))
    tl.store(win_valid + b * W + i, valid_b.to(tl.uint8), mask=W > 0)
    tl.store(win_sink + b * W + i, is_sink.to(tl.uint8), mask=W > 0)
    nr_c = tl.minimum(nr, tl.maximum(S - 1, 0))
    tl.store(sink_pos + b * S + nr_c, nr_c * 0 + t, mask=is_sink)
    tl.store(sink_present + b * S + nr_c, is_sink.to(tl.uint8), mask=is_sink)
    tl.store(n_real + b, nr + valid_b.to(tl.int64))


def _u8(x: Tensor) -> Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def nha_decode_step(
    state: NHAState, q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor,
    valid: Tensor, *, scale: float,
) -> Tensor:
    """Same contract as `NHAState.step`: q (B,Hq,D); k, k_rot (B,H,D); v (B,H,Dv); log_alpha (B,H,M); valid (B,)."""
    if state.window is None:
        return state.step(q, q_rot, k, k_rot, v, log_alpha, valid, scale=scale)
    b, hq, d = q.shape
    h, dv, m = k.shape[1], v.shape[-1], log_alpha.shape[-1]
    g = hq // h
    w, s = state.window, state.num_sinks
    for f in fields(state):  # the kernels index flat memory (prefill can leave a strided view, e.g. sink_pos)
        x = getattr(state, f.name)
        if isinstance(x, Tensor) and not x.is_contiguous():
            setattr(state, f.name, x.contiguous())
    q, q_rot, k, k_rot, v = (x.contiguous() for x in (q, q_rot, k, k_rot, v))
    la = log_alpha.float().contiguous()
    valid_i = valid.to(torch.int32).contiguous()
    o = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    mp = max(16, next_pow2(m))
    _decode_kernel[(b, h)](
        q, q_rot, k, k_rot, v, la, valid_i, state.n_real, state.slot_count, state.slot_k, state.slot_v,
        state.win_k_rot, state.win_k, state.win_v, state.win_la, _u8(state.win_valid), _u8(state.win_sink),
        state.sink_k_rot, state.sink_v, state.sink_pos, _u8(state.sink_present), o,
        state.seen, w, s, h, scale,
        G=g, ROWS=max(16, next_pow2(g)), D=d, DV=dv, M=m, DP=max(16, next_pow2(d)), DVP=max(16, next_pow2(dv)),
        MP=mp, SP=max(16, next_pow2(s)), BN=64 if w >= 64 else 16, HAS_SINKS=s > 0, num_warps=4,
    )
    _decode_flags_kernel[(b,)](
        valid_i, state.n_real, state.slot_count, _u8(state.win_valid), _u8(state.win_sink), state.sink_pos,
        _u8(state.sink_present), state.seen, w, s, num_warps=1,
    )
    state.seen += 1
    return o
