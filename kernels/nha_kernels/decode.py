"""One decode step of NHA for a batch, as `NHAState.step` computes it, updating the state in place.

Two launches:
- `_decode_kernel`, one program per (batch row, KV head) with the G query heads as rows of one tile: folds the token
  that leaves the window into the fp32 slots, attends over [slots ; ring buffer ; sinks] with one online softmax
  (the new token is substituted into the ring in registers), then writes the new ring entry, sink and slots.
- `_decode_flags_kernel`, one program for all rows: the per-row bookkeeping (ring validity/sink flags, slot
  count, real-token count, sink positions), which every head of the first kernel must read in its old state, then
  the position counter.
Full-attention layers (window None) keep a fixed-capacity buffer, written by the torch step; their attention is
`full_decode_attention`: flash-decoding, the buffer split into chunks read once each by parallel programs (the G
query heads of a KV head as rows of one tile), then a small torch merge of the chunks' partial softmaxes.

Graph-safe: the position comes from the state's device counter `pos` (read by both kernels; the second advances
it), so a captured step replays correctly at every later position.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fwd_common import _online
from .precision import _mm_state, precisions, split_products
from .prep import next_pow2
from .triton_utils import expm1, slot_bias_rows

# nha_convert.ops.NHAState, the state the torch step updates: used by its fields (the kernels import nothing from
# nha_convert, so the type is not named here).
NHAState = Any


# Slots / ring entries per block and launch shape. The G query heads of a KV head are the rows of one tile, padded
# to 16 for the tensor cores (H200, B = 64, Llama-3-8B layer, graph-replayed step: 46.0 us; one pipeline stage 52.8,
# 8 warps 61.2, 16-slot blocks 53.7; kernels/tools/decode_sweep.py, docs/performance.md). Until session 13 the
# products were fp32 FMAs over (G, N, D) blocks, whose broadcasts held 128-255 registers a thread: 111-220 us at
# every setting.
DECODE_TILES = {"slots": 32, "ring": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _attend(m_i, l_i, acc, q, keys, vals, ok, scale, SPLIT: tl.constexpr):
    """One block of the online softmax on the tensor cores: q (GP >= 16, DP) and keys (N >= 16, DP), vals (N, DVP),
    ok (N,) or (GP, N) visibility; fp32 operands (slot states, probabilities) in fp32 accuracy (`fwd_common._mm_state`)."""
    sc = _mm_state(q, tl.trans(keys), SPLIT) * scale
    sc = tl.where(ok, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _mm_state(p, vals, SPLIT)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q, qr, k, kr, v, la, valid, n_real, slot_count, slot_k, slot_v,
    win_kr, win_k, win_v, win_la, win_valid, win_sink,
    sink_kr, sink_v, sink_pos, sink_present, o, slot_bias,
    pos, W, S, H, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr, SP: tl.constexpr, NB: tl.constexpr, NBW: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SLOT_BIAS: tl.constexpr = False, SPLIT: tl.constexpr = True,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    b64 = b.to(tl.int64)
    t = tl.load(pos)
    bh = b64 * H + h
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    d_ok = dd < D
    dv_ok = dv < DV

    valid_b = tl.load(valid + b) != 0
    nr = tl.load(n_real + b)
    is_sink = valid_b & (nr < S)
    writes = valid_b & (nr >= S)
    k_new = tl.load(k + bh * D + dd, mask=d_ok, other=0.0)
    kr_new = tl.load(kr + bh * D + dd, mask=d_ok, other=0.0)
    v_new = tl.load(v + bh * DV + dv, mask=dv_ok, other=0.0)

    # The token folded into the slots: the new one itself when w = 0, else the ring entry it replaces (if any).
    i = t % tl.maximum(W, 1)
    has_out = (W > 0) & (t >= W)
    flag_v = tl.load(win_valid + b64 * W + i, mask=has_out, other=0) != 0
    flag_s = tl.load(win_sink + b64 * W + i, mask=has_out, other=0) != 0
    out_writes = has_out & flag_v & (flag_s == 0)
    ring_i = bh * W + i
    k_out = tl.load(win_k + ring_i * D + dd, mask=d_ok & has_out, other=0.0)
    v_out = tl.load(win_v + ring_i * DV + dv, mask=dv_ok & has_out, other=0.0)
    fold_new = (W == 0) & writes
    fold_old = (W > 0) & out_writes
    k_f = tl.where(W == 0, k_new, k_out).to(tl.float32)
    v_f = tl.where(W == 0, v_new, v_out).to(tl.float32)
    count = tl.load(slot_count + b) + (fold_new | fold_old).to(tl.int64)

    rr = tl.arange(0, GP)
    r_ok = rr < G
    hq = bh * G + rr
    qu = tl.load(q + hq[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    qrot = tl.load(qr + hq[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)

    # Slots, NB at a time: fold, write back, attend.
    for c0 in range(0, MP, NB):
        ic = c0 + tl.arange(0, NB)
        m_ok = ic < M
        la_f = tl.load(la + bh * M + ic, mask=m_ok & fold_new, other=0.0) + tl.load(
            win_la + ring_i * M + ic, mask=m_ok & fold_old, other=0.0)
        tile_k = bh * M * D + ic[:, None] * D + dd[None, :]
        tile_v = bh * M * DV + ic[:, None] * DV + dv[None, :]
        mk = m_ok[:, None] & d_ok[None, :]
        mv = m_ok[:, None] & dv_ok[None, :]
        s_f = -expm1(la_f)
        sk = tl.exp(la_f)[:, None] * tl.load(slot_k + tile_k, mask=mk, other=0.0) + s_f[:, None] * k_f[None, :]
        sv = tl.exp(la_f)[:, None] * tl.load(slot_v + tile_v, mask=mv, other=0.0) + s_f[:, None] * v_f[None, :]
        tl.store(slot_k + tile_k, sk, mask=mk)
        tl.store(slot_v + tile_v, sv, mask=mv)
        m_i, l_i, acc = _attend(m_i, l_i, acc, qu, sk, sv, (m_ok & (count > 0))[None, :], scale, SPLIT)
    if HAS_SLOT_BIAS:
        # The slots came first into the online softmax, so adding b_h to all of a row's slot logits only moves its
        # running maximum (p = exp(l + b - (max + b)) is unchanged); -inf (empty slots) stays -inf.
        m_i += slot_bias_rows(slot_bias, hq, H * G, r_ok)

    # Ring buffer, with the new token in entry i (substituted in registers; memory is written at the end).
    for c0 in range(0, W, NBW):
        widx = c0 + tl.arange(0, NBW)
        w_ok = widx < W
        is_new = widx == i
        wv = tl.load(win_valid + b64 * W + widx, mask=w_ok, other=0) != 0
        wv = tl.where(is_new, valid_b, wv) & w_ok
        kt = tl.load(win_kr + (bh * W + widx)[:, None] * D + dd[None, :], mask=w_ok[:, None] & d_ok[None, :],
                     other=0.0)
        vt = tl.load(win_v + (bh * W + widx)[:, None] * DV + dv[None, :], mask=w_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        kt = tl.where(is_new[:, None], kr_new[None, :], kt)
        vt = tl.where(is_new[:, None], v_new[None, :], vt)
        m_i, l_i, acc = _attend(m_i, l_i, acc, qrot, kt, vt, wv[None, :], scale, SPLIT)

    if HAS_SINKS:
        si = tl.arange(0, SP)
        s_ok = si < S
        new = is_sink & (si == nr)
        pres = (tl.load(sink_present + b64 * S + si, mask=s_ok, other=0) != 0) | new
        pos = tl.where(new, t, tl.load(sink_pos + b64 * S + si, mask=s_ok, other=0))
        ks = tl.load(sink_kr + (bh * S + si)[:, None] * D + dd[None, :], mask=s_ok[:, None] & d_ok[None, :],
                     other=0.0)
        vs = tl.load(sink_v + (bh * S + si)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        ks = tl.where(new[:, None], kr_new[None, :], ks)
        vs = tl.where(new[:, None], v_new[None, :], vs)
        m_i, l_i, acc = _attend(m_i, l_i, acc, qrot, ks, vs, (pres & (pos <= t - W))[None, :], scale, SPLIT)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o + hq[:, None] * DV + dv[None, :], out.to(o.dtype.element_ty), mask=r_ok[:, None] & dv_ok[None, :])

    tl.debug_barrier()  # every thread has read the old ring entry before it is overwritten
    has_ring = W > 0
    la_new = tl.load(la + bh * M + tl.arange(0, MP), mask=(tl.arange(0, MP) < M) & writes, other=0.0)
    tl.store(win_kr + ring_i * D + dd, kr_new, mask=d_ok & has_ring)
    tl.store(win_k + ring_i * D + dd, k_new, mask=d_ok & has_ring)
    tl.store(win_v + ring_i * DV + dv, v_new, mask=dv_ok & has_ring)
    tl.store(win_la + ring_i * M + tl.arange(0, MP), la_new, mask=(tl.arange(0, MP) < M) & has_ring)
    if HAS_SINKS:
        nr_c = tl.minimum(nr, S - 1)
        tl.store(sink_kr + (bh * S + nr_c) * D + dd, kr_new, mask=d_ok & is_sink)
        tl.store(sink_v + (bh * S + nr_c) * DV + dv, v_new, mask=dv_ok & is_sink)


@triton.jit
def _decode_flags_kernel(valid, n_real, slot_count, win_valid, win_sink, sink_pos, sink_present, pos, B, W, S,
                         BP: tl.constexpr):
    """All B rows in one program, which then advances the position counter (every program of `_decode_kernel` has
    read it by now; one program, so no row of this kernel reads it after the write)."""
    b = tl.arange(0, BP).to(tl.int64)
    ok = b < B
    t = tl.load(pos)
    valid_b = (tl.load(valid + b, mask=ok, other=0) != 0) & ok
    nr = tl.load(n_real + b, mask=ok, other=0)
    is_sink = valid_b & (nr < S)
    writes = valid_b & (nr >= S)
    i = t % tl.maximum(W, 1)
    has_out = (W > 0) & (t >= W)
    out_writes = has_out & (tl.load(win_valid + b * W + i, mask=ok & has_out, other=0) != 0) & (
        tl.load(win_sink + b * W + i, mask=ok & has_out, other=0) == 0)
    fold_w = tl.where(W == 0, writes, out_writes)
    tl.store(slot_count + b, tl.load(slot_count + b, mask=ok, other=0) + fold_w.to(tl.int64), mask=ok)
    tl.store(win_valid + b * W + i, valid_b.to(tl.uint8), mask=ok & (W > 0))
    tl.store(win_sink + b * W + i, is_sink.to(tl.uint8), mask=ok & (W > 0))
    nr_c = tl.minimum(nr, tl.maximum(S - 1, 0))
    tl.store(sink_pos + b * S + nr_c, nr_c * 0 + t, mask=ok & is_sink)
    tl.store(sink_present + b * S + nr_c, is_sink.to(tl.uint8), mask=ok & is_sink)
    tl.store(n_real + b, nr + valid_b.to(tl.int64), mask=ok)
    tl.debug_barrier()  # every thread has read pos
    tl.store(pos, t + 1)


# Keys per block and how many programs to aim for when splitting a full layer's buffer (H100: 132 SMs).
FULL_TILES = {"block": 64, "programs": 2048, "min_split": 512, "num_warps": 4, "num_stages": 3}


@triton.jit
def _full_decode_kernel(q, k, v, valid, acc_out, m_out, l_out, C, SPLIT, H, NS, scale,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        DV: tl.constexpr, DVP: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    """Program (b*H + h, split): online softmax of the G query rows over keys [split*SPLIT, (split+1)*SPLIT)."""
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    b = bh // H
    rr = tl.arange(0, GP)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    r_ok = rr < G
    qt = tl.load(q + (bh * G + rr)[:, None] * D + dd[None, :], mask=r_ok[:, None] & (dd < D)[None, :], other=0.0)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DVP), tl.float32)
    start = sp * SPLIT
    for c0 in range(0, SPLIT, BLOCK):
        idx = start + c0 + tl.arange(0, BLOCK)
        ok = idx < C
        vis = (tl.load(valid + b * C + idx, mask=ok, other=0) != 0) & ok
        kt = tl.load(k + (bh * C + idx)[:, None] * D + dd[None, :], mask=ok[:, None] & (dd < D)[None, :], other=0.0)
        sc = tl.dot(qt, tl.trans(kt), input_precision=PREC) * scale
        vt = tl.load(v + (bh * C + idx)[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :],
                     other=0.0)
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis[None, :], sc, float("-inf")), vt, PREC)
    row = (bh * NS + sp) * G + rr
    tl.store(acc_out + row[:, None] * DV + dv[None, :], acc, mask=r_ok[:, None] & (dv < DV)[None, :])
    tl.store(m_out + row, m_i, mask=r_ok)
    tl.store(l_out + row, l_i, mask=r_ok)


def full_decode_attention(state: NHAState, q_rot: Tensor, scale: float) -> Tensor:
    """A full layer's decode attention over its whole fixed-capacity buffer (unused entries masked by win_valid):
    what `NHAState._full_attention` computes, reading keys and values once. q_rot (B, Hq, D) -> (B, Hq, Dv).
    The buffer must be contiguous (nha_decode_step makes the state so before stepping it)."""
    b, hq, d = q_rot.shape
    _, h, c, dv = state.win_v.shape
    g = hq // h
    blk = FULL_TILES["block"]
    ns = max(1, min(triton.cdiv(c, FULL_TILES["min_split"]), triton.cdiv(FULL_TILES["programs"], b * h)))
    split = triton.cdiv(triton.cdiv(c, ns), blk) * blk
    ns = triton.cdiv(c, split)
    acc = torch.empty(b * h, ns, g, dv, dtype=torch.float32, device=q_rot.device)
    m = torch.empty(b * h, ns, g, dtype=torch.float32, device=q_rot.device)
    l_ = torch.empty_like(m)
    q = q_rot.to(state.win_k_rot.dtype).contiguous()
    _full_decode_kernel[(b * h, ns)](
        q, state.win_k_rot, state.win_v, _u8(state.win_valid), acc, m, l_, c, split, h, ns, scale,
        G=g, GP=max(16, next_pow2(g)), D=d, DP=max(16, next_pow2(d)), DV=dv, DVP=max(16, next_pow2(dv)),
        BLOCK=blk, PREC=precisions(q.dtype)[0], num_warps=FULL_TILES["num_warps"],
        num_stages=FULL_TILES["num_stages"],
    )
    # Merge the splits' partial softmaxes (a split that saw nothing has m = -inf and weight 0).
    top = m.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wgt = torch.exp(m - top)
    den = (l_ * wgt).sum(dim=1)
    out = (acc * wgt[..., None]).sum(dim=1) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out.reshape(b, hq, dv).to(q_rot.dtype)


def _u8(x: Tensor) -> Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def nha_decode_step(
    state: NHAState, q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor,
    valid: Tensor, *, scale: float, slot_bias: Tensor | None = None,
) -> Tensor:
    """Same contract as `NHAState.step`: q (B,Hq,D); k, k_rot (B,H,D); v (B,H,Dv); log_alpha (B,H,M); valid (B,);
    slot_bias (Hq,) the optional slot-logit bias."""
    for f in fields(state):  # the kernels index flat memory (a no-op after the first step: done before any capture)
        x = getattr(state, f.name)
        if isinstance(x, Tensor) and not x.is_contiguous():
            setattr(state, f.name, x.contiguous())
    if state.window is None:
        return state.step(q, q_rot, k, k_rot, v, log_alpha, valid, scale=scale, full_attention=full_decode_attention,
                          slot_bias=slot_bias)
    b, hq, d = q.shape
    h, dv, m = k.shape[1], v.shape[-1], log_alpha.shape[-1]
    g = hq // h
    gp = next_pow2(g)
    w, s = state.window, state.num_sinks
    q, q_rot, k, k_rot, v = (x.contiguous() for x in (q, q_rot, k, k_rot, v))
    la = log_alpha.float().contiguous()
    valid_u8 = _u8(valid.contiguous()) if valid.dtype == torch.bool else valid.to(torch.uint8).contiguous()
    o = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    mp = max(16, next_pow2(m))
    tiles = DECODE_TILES
    gp, nb, nbw = max(16, gp), max(16, min(tiles["slots"], mp)), max(16, min(tiles["ring"], next_pow2(max(w, 1))))
    _decode_kernel[(b, h)](
        q, q_rot, k, k_rot, v, la, valid_u8, state.n_real, state.slot_count, state.slot_k, state.slot_v,
        state.win_k_rot, state.win_k, state.win_v, state.win_la, _u8(state.win_valid), _u8(state.win_sink),
        state.sink_k_rot, state.sink_v, state.sink_pos, _u8(state.sink_present), o,
        la if slot_bias is None else slot_bias.detach().float().contiguous(),
        state.pos, w, s, h, scale,
        G=g, GP=gp, D=d, DV=dv, M=m, DP=max(16, next_pow2(d)), DVP=max(16, next_pow2(dv)),
        MP=mp, SP=max(16, next_pow2(s)), NB=nb, NBW=nbw, HAS_SINKS=s > 0, HAS_SLOT_BIAS=slot_bias is not None,
        SPLIT=split_products(q.dtype), num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"], **({"maxnreg": tiles["maxnreg"]} if tiles.get("maxnreg") else {}),
    )
    _decode_flags_kernel[(1,)](
        valid_u8, state.n_real, state.slot_count, _u8(state.win_valid), _u8(state.win_sink), state.sink_pos,
        _u8(state.sink_present), state.pos, b, w, s, BP=next_pow2(b), num_warps=4,
    )
    state.seen += 1
    return o
