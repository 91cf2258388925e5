"""Backward of the fused NHA op: all gradients (q, q_rot, k, k_rot, v, log_alpha) from Triton kernels.

Given the forward's log-sum-exp L per row and delta = rowsum(dO * O), the joint softmax decouples: every logit z
(slot, sink or band) gets dz = p (dp - delta) with p = exp(z - L). So the band/sink part is a flash-attention
backward with a sliding-window mask, and the slot part is the backward of two gated linear recurrences.

Kernels (all GQA-native: the G query heads of a KV head are rows of one tile):
- `_bwd_band_q_kernel`   dq_rot over band + sink keys; sink keys' dk_rot / dv by atomic adds (fp32).
- `_bwd_band_kv_kernel`  dk_rot, dv of the band: per key block, over the query rows that see it.
- `_bwd_slot_q_kernel`   forward sweep per span (state carried as in the forward): slot probabilities p, their
                         dp = dO . V~, dl = p (dp - delta); dq of the slots; per token
                         X = sum_heads(dl * l + p * dp) (= rowdot(dK~, K~) + rowdot(dV~, V~)); stores dl, p per row.
- `_bwd_slot_rlocal_kernel` + reverse `span_scan`: the slot adjoints (dK~, dV~ pulled back through the
                         decays) arriving at each span end from later spans.
- `_bwd_slot_kv_kernel`  reverse sweep per span and side (K or V, grid axis 2): gradients of the slot tokens'
                         k, v and write weights s (ds = K part + V part).
Then dlog_alpha = reverse-cumsum(X - s * ds) - alpha * ds (per sequence), the token shift undone: in torch
in two Triton passes (`gate_grad.py`, the default) or in torch (`gate_grad_torch`, its reference; NHA_GATE_GRAD=torch).

Math of the slot recurrence (one KV head, shifted positions, A = cumulative log decay, s = 1 - alpha):
    K~_t = sum_{j<=t} exp(A_t - A_j) s_j k_j^T,   l_t = scale K~_t q_t,   dK~_t = scale sum_g dl_t q_t^T
    R_t  = sum_{t'>=t} exp(A_t' - A_t) dK~_t'     (reverse recurrence; the same for V~)
    dk_j = sum_i s_j[i] R_j[i, :],   ds_j[i] = R^K_j[i] . k_j + R^V_j[i] . v_j,
    dL/dA_t = rowdot(dK~_t, K~_t) + rowdot(dV~_t, V~_t) - s_t * ds_t.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk_fwd import FwdOut, span_scan
from .fwd_common import _band_block, _band_range, _seq_of_span, _slot_kv, _slot_writers
from .gate_grad import gate_grad_triton
from .options import DEFAULT, KernelOptions
from .precision import FAST_LIMIT, _mm_state, precisions, split_products
from .prep import Layout, next_pow2
from .triton_utils import expm1, group_rows, pick_col, pick_row, rows_of, slot_bias_rows, sum_heads


@triton.jit
def _dot_split(a, b, SPLIT: tl.constexpr):
    """a (fp32 weights such as dS) @ b (input dtype). bf16 (SPLIT): a split into hi + lo bf16 parts, two tensor-core
    products with ~16 mantissa bits instead of the 8 of a plain bf16 cast (the plain cast leaves ~7e-3 relative error
    in the gradients, too close to the 1e-2 bound). fp32 and fp16: one 3-pass tf32 product (no fp16 cast of a, which
    could overflow)."""
    if SPLIT:
        a_hi = a.to(b.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
        return tl.dot(a_hi, b) + tl.dot(a_lo, b)
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="tf32x3")


@triton.jit
def _exact_rows(x, a, s, a_rows, jb, tt, BM: tl.constexpr):
    """sum_{j <= t} x[r, j] * exp(a_t - a_j) * s_j  as (ROWS, MC), exactly (for hard-decaying gates)."""
    out = tl.zeros(a_rows.shape, tl.float32)
    for j in range(0, BM):
        e = tl.exp(tl.where((tt >= j)[:, None], a_rows - pick_row(a, jb, j)[None, :], float("-inf")))
        out += pick_col(x, jb, j)[:, None] * e * pick_row(s, jb, j)[None, :]
    return out


@triton.jit
def _exact_cols(y, a, s, a_rows, jb, tt, BM: tl.constexpr):
    """(ROWS, BM) with column j = sum_i y[r, i] exp(a_t - a_j)_i s_j,i for t >= j (zero above the diagonal)."""
    out = tl.zeros((a_rows.shape[0], BM), tl.float32)
    for j in range(0, BM):
        e = tl.exp(tl.where((tt >= j)[:, None], a_rows - pick_row(a, jb, j)[None, :], float("-inf")))
        col = tl.sum(y * e * pick_row(s, jb, j)[None, :], axis=1)
        out = tl.where((jb == j)[None, :], col[:, None], out)
    return out


@triton.jit
def _bwd_band_q_kernel(
    qr, kr, v, do, lse, delta, tok, sink_pos, span_table, dqr, dkr, dvb,
    T, W, L, SPANS_PER_ROW, H, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, SP: tl.constexpr,
    HAS_SINKS: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """dq_rot over band and sink keys. The sinks seen as sinks (after they left the band) add their dk_rot and dv
    atomically into the band's fp32 gradients dkr / dvb at their positions: `_bwd_band_kv_kernel` must have run."""
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    tok_b = tok + b64 * T
    tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    d_ok = (dd < D)[None, :]
    dv_ok = (dv < DV)[None, :]
    if HAS_SINKS:
        spi = tl.arange(0, SP)
        spos = tl.load(sink_pos + n * SP + spi)
        s_ok = spos >= 0
        spos_c = tl.where(s_ok, spos, 0).to(tl.int64)
        sink_at = bh * T + spos_c

    for t0 in range(span_start, span_end, BM):
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        q_rot = tl.load(qr + (hq * T + t)[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
        d_o = tl.load(do + (hq * T + t)[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok, other=0.0)
        lse_r = tl.load(lse + hq * T + t, mask=row_ok, other=float("-inf"))
        lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)  # nothing visible: p = 0
        dl_r = tl.load(delta + hq * T + t, mask=row_ok, other=0.0)
        dq = tl.zeros((ROWS, DP), tl.float32)
        if HAS_SINKS:
            k_sink = tl.load(kr + (bh * T + spos_c)[:, None] * D + dd[None, :], mask=s_ok[:, None] & d_ok,
                             other=0.0)
            v_sink = tl.load(v + (bh * T + spos_c)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok,
                             other=0.0)
            sc_s = tl.dot(q_rot, tl.trans(k_sink), input_precision=PREC) * scale
            vis_s = s_ok[None, :] & (spos[None, :] <= (t - W)[:, None]) & row_ok[:, None]
            p_s = tl.where(vis_s, tl.exp(sc_s - lse_r[:, None]), 0.0)
            ds_s = p_s * (tl.dot(d_o, tl.trans(v_sink), input_precision=PREC) - dl_r[:, None])
            dq += _dot_split(ds_s, k_sink, SPLIT)
            # absent sinks (position -1, read as 0) add exact zeros: their p_s column is 0
            tl.atomic_add(dkr + sink_at[:, None] * DP + dd[None, :],
                          _dot_split(tl.trans(ds_s), q_rot, SPLIT) * scale)
            tl.atomic_add(dvb + sink_at[:, None] * DVP + dv[None, :],
                          tl.dot(tl.trans(p_s).to(d_o.dtype), d_o, input_precision=PREC))
        lo, hi = _band_range(seq_start, seq_end, t0, W, BM)
        for kb in range(lo, hi, BN):
            kt, vt, vis = _band_block(tok_b, kr, v, bh, T, kb, hi, t, W, dd, dv, d_ok, dv_ok, D, DV, BN)
            sc = tl.dot(q_rot, tl.trans(kt), input_precision=PREC) * scale
            p = tl.where(vis, tl.exp(sc - lse_r[:, None]), 0.0)
            ds = p * (tl.dot(d_o, tl.trans(vt), input_precision=PREC) - dl_r[:, None])
            dq += _dot_split(ds, kt, SPLIT)
        tl.store(dqr + (hq * T + t)[:, None] * D + dd[None, :], (dq * scale).to(dqr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)


@triton.jit
def _bwd_band_kv_kernel(
    qr, kr, v, do, lse, delta, tok, span_table, dkr, dvb,
    T, W, L, SPANS_PER_ROW, H, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    tok_b = tok + b64 * T
    tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    d_ok = (dd < D)[None, :]
    dv_ok = (dv < DV)[None, :]
    for j0 in range(span_start, span_end, BN):
        kj = j0 + tl.arange(0, BN)
        k_ok = kj < seq_end
        code = tl.load(tok_b + kj, mask=k_ok, other=0)
        k_vis = k_ok & ((code & 1) == 1)
        kj64 = kj.to(tl.int64)
        kt = tl.load(kr + (bh * T + kj64)[:, None] * D + dd[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
        vt = tl.load(v + (bh * T + kj64)[:, None] * DV + dv[None, :], mask=k_ok[:, None] & dv_ok, other=0.0)
        dk = tl.zeros((BN, DP), tl.float32)
        dvv = tl.zeros((BN, DVP), tl.float32)
        q_hi = tl.minimum(j0 + BN - 1 + W, seq_end)  # the last query that sees key j is j + w - 1
        q_hi = tl.where(W == 0, j0, q_hi)
        for tq0 in range(j0, q_hi, BM):
            t = tq0 + tt
            row_ok = g_ok & (t < seq_end)
            q_rot = tl.load(qr + (hq * T + t)[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
            d_o = tl.load(do + (hq * T + t)[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok, other=0.0)
            lse_r = tl.load(lse + hq * T + t, mask=row_ok, other=float("-inf"))
            lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
            dl_r = tl.load(delta + hq * T + t, mask=row_ok, other=0.0)
            sc = tl.dot(q_rot, tl.trans(kt), input_precision=PREC) * scale
            vis = k_vis[None, :] & (kj[None, :] <= t[:, None]) & (kj[None, :] > (t - W)[:, None]) & row_ok[:, None]
            p = tl.where(vis, tl.exp(sc - lse_r[:, None]), 0.0)
            ds = p * (tl.dot(d_o, tl.trans(vt), input_precision=PREC) - dl_r[:, None])
            dvv += tl.dot(tl.trans(p).to(d_o.dtype), d_o, input_precision=PREC)
            dk += _dot_split(tl.trans(ds), q_rot, SPLIT)
        tl.store(dkr + (bh * T + kj64)[:, None] * DP + dd[None, :], dk * scale, mask=k_ok[:, None])
        tl.store(dvb + (bh * T + kj64)[:, None] * DVP + dv[None, :], dvv, mask=k_ok[:, None])


@triton.jit
def _slot_gates(la_bh, js64, writes, c0, M, MC: tl.constexpr):
    ic = c0 + tl.arange(0, MC)
    lab = tl.load(la_bh + js64[:, None] * M + ic[None, :], mask=writes[:, None] & (ic < M)[None, :], other=0.0)
    s = -expm1(lab)
    a = tl.cumsum(lab, axis=0)
    aend = tl.sum(lab, axis=0)
    return ic, s, a, aend


@triton.jit
def _bwd_slot_q_kernel(
    q, k, v, la, do, lse, delta, tok, span_table, st_k, st_v, dq, xg, dlb, psb, slot_bias,
    T, W, S, L, SPANS_PER_ROW, H, NSPH, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr,
    MC: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, PREC_SLOT: tl.constexpr,
    FAST_LIMIT: tl.constexpr, HAS_SLOT_BIAS: tl.constexpr = False,
):
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    tok_b = tok + b64 * T
    la_bh = la + bh * T * M
    tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    jb = tl.arange(0, BM)
    d_ok = (dd < D)[None, :]
    dv_ok = (dv < DV)[None, :]
    causal = tt[:, None] >= jb[None, :]
    st_k0 = st_k + (pid * H + h).to(tl.int64) * MP * DP
    st_v0 = st_v + (pid * H + h).to(tl.int64) * MP * DVP
    run_k = NSPH * MP * DP
    run_v = NSPH * MP * DVP
    if HAS_SLOT_BIAS:
        brow = slot_bias_rows(slot_bias, hq, H * G, g_ok)
    for t0 in range(span_start, span_end, BM):
        cur = tl.where(t0 == span_start, 0, 1).to(tl.int64)
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        tb = t0 + jb
        js, jok, writes = _slot_writers(tok_b, tb, tb < seq_end, W, S, seq_start)
        js64, ks, vs = _slot_kv(k, v, bh, T, js, jok, dd, dv, d_ok, dv_ok, D, DV)
        qoff = (hq * T + t)[:, None] * D + dd[None, :]
        qu = tl.load(q + qoff, mask=row_ok[:, None] & d_ok, other=0.0)
        d_o = tl.load(do + (hq * T + t)[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok, other=0.0)
        lse_r = tl.load(lse + hq * T + t, mask=row_ok, other=float("-inf"))
        lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
        dl_r = tl.load(delta + hq * T + t, mask=row_ok, other=0.0)
        qk = tl.where(causal, tl.dot(qu, tl.trans(ks), input_precision=PREC), 0.0)  # (ROWS, BM)
        dvk = tl.where(causal, tl.dot(d_o, tl.trans(vs), input_precision=PREC), 0.0)  # dO . v_j
        jr = t - W
        code_r = tl.load(tok_b + jr, mask=row_ok & (jr >= seq_start), other=0)
        row_has = (code_r >> 1) > S
        dq_acc = tl.zeros((ROWS, DP), tl.float32)
        for c0 in range(0, MP, MC):
            ic, s, a, aend = _slot_gates(la_bh, js64, writes, c0, M, MC)
            wt = s * tl.exp(aend[None, :] - a)
            decay = tl.exp(aend)[:, None]
            off_k = ic[:, None] * DP + dd[None, :]
            off_v = ic[:, None] * DVP + dv[None, :]
            sk = tl.load(st_k0 + cur * run_k + off_k)
            sv = tl.load(st_v0 + cur * run_v + off_v)
            q_s = _mm_state(qu, tl.trans(sk), SPLIT)
            do_s = _mm_state(d_o, tl.trans(sv), SPLIT)
            a_rows = rows_of(a, GP, BM, MC)
            ea_rows = tl.exp(a_rows)
            fast = tl.min(aend, axis=0) > FAST_LIMIT
            if fast:
                shat = s * tl.exp(-a)
                ls = ea_rows * (q_s + tl.dot(qk, shat, input_precision=PREC_SLOT))
                dp = ea_rows * (do_s + tl.dot(dvk, shat, input_precision=PREC_SLOT))
            else:
                shat = tl.zeros((BM, MC), tl.float32)
                ls = ea_rows * q_s + _exact_rows(qk, a, s, a_rows, jb, tt, BM)
                dp = ea_rows * do_s + _exact_rows(dvk, a, s, a_rows, jb, tt, BM)
            vis = row_has[:, None] & (ic < M)[None, :] & row_ok[:, None]
            ls = ls * scale  # without the bias: X below is rowdot(dK~, K~) + rowdot(dV~, V~)
            if HAS_SLOT_BIAS:
                p = tl.where(vis, tl.exp(ls + brow[:, None] - lse_r[:, None]), 0.0)
            else:
                p = tl.where(vis, tl.exp(ls - lse_r[:, None]), 0.0)
            dl = p * (dp - dl_r[:, None])
            xrow = tl.where(vis, dl * ls, 0.0) + p * dp
            xs_tok = sum_heads(xrow, GP, BM, MC)
            tl.store(xg + (bh * T + tb.to(tl.int64))[:, None] * M + ic[None, :], xs_tok,
                     mask=(tb < seq_end)[:, None] & (ic < M)[None, :])
            rows_m = (hq * T + t)[:, None] * M + ic[None, :]
            tl.store(dlb + rows_m, dl, mask=row_ok[:, None] & (ic < M)[None, :])
            tl.store(psb + rows_m, p, mask=row_ok[:, None] & (ic < M)[None, :])
            dle = dl * ea_rows
            if fast:
                p3 = tl.dot(dle, tl.trans(shat), input_precision=PREC_SLOT)
            else:
                p3 = _exact_cols(dl, a, s, a_rows, jb, tt, BM)
            p3 = tl.where(causal, p3, 0.0)
            dq_acc += tl.dot(dle, sk, input_precision=PREC_SLOT)
            dq_acc += _dot_split(p3, ks, SPLIT)
            tl.store(st_k0 + run_k + off_k, decay * sk + _mm_state(tl.trans(wt), ks, SPLIT))
            tl.store(st_v0 + run_v + off_v, decay * sv + _mm_state(tl.trans(wt), vs, SPLIT))
        tl.debug_barrier()
        tl.store(dq + qoff, (dq_acc * scale).to(dq.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def _bwd_slot_rlocal_kernel(
    q, do, la, tok, span_table, dlb, psb, loc_k, loc_v, loc_a,
    T, W, S, L, SPANS_PER_ROW, H, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr,
    SPLIT: tl.constexpr, VARLEN: tl.constexpr,
):
    """Per span: sum_{t in span} exp(A_t - A_start) dK~_t (and dV~), the adjoint the span sends to earlier spans."""
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    tok_b = tok + b64 * T
    la_bh = la + bh * T * M
    tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    ii = tl.arange(0, MP)
    jb = tl.arange(0, BM)
    d_ok = (dd < D)[None, :]
    dv_ok = (dv < DV)[None, :]
    bk = tl.zeros((MP, DP), tl.float32)
    bv = tl.zeros((MP, DVP), tl.float32)
    acum = tl.zeros((MP,), tl.float32)
    for t0 in range(span_start, span_end, BM):
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        tb = t0 + jb
        js, jok, writes = _slot_writers(tok_b, tb, tb < seq_end, W, S, seq_start)
        ic, s, a, aend = _slot_gates(la_bh, js.to(tl.int64), writes, 0, M, MP)
        ea_rows = tl.exp(rows_of(a, GP, BM, MP) + acum[None, :])  # decay from the span start, <= 1
        rows_m = (hq * T + t)[:, None] * M + ii[None, :]
        mm = row_ok[:, None] & (ii < M)[None, :]
        dle = tl.load(dlb + rows_m, mask=mm, other=0.0) * ea_rows
        pe = tl.load(psb + rows_m, mask=mm, other=0.0) * ea_rows
        qu = tl.load(q + (hq * T + t)[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
        d_o = tl.load(do + (hq * T + t)[:, None] * DV + dv[None, :], mask=row_ok[:, None] & dv_ok, other=0.0)
        bk += _mm_state(tl.trans(dle), qu, SPLIT)
        bv += _mm_state(tl.trans(pe), d_o, SPLIT)
        acum += aend
    out = (pid * H + h).to(tl.int64)
    tl.store(loc_k + out * MP * DP + ii[:, None] * DP + dd[None, :], bk * scale)
    tl.store(loc_v + out * MP * DVP + ii[:, None] * DVP + dv[None, :], bv)
    tl.store(loc_a + out * MP + ii, acum)


@triton.jit
def _kv_chunk(xs, yu, xy, r, bx, s, a, aend, a_rows, jb, tt, causal, BM: tl.constexpr, SPLIT: tl.constexpr,
              PREC: tl.constexpr, PREC_SLOT: tl.constexpr, FAST_LIMIT: tl.constexpr, P_SPLIT: tl.constexpr):
    """One side of one slot chunk of the reverse sweep. K side: x = k_j (slot tokens), y = q rows, r = scale * dl;
    V side: x = v_j, y = dO rows, r = p. xy = causal y @ x^T, bx = the adjoint B arriving from after this block.
    Returns (this side's part of ds, its part of dx_j, the adjoint passed to the previous block)."""
    ea_rows = tl.exp(a_rows)
    re = r * ea_rows
    e_end = tl.exp(aend[None, :] - a)
    # From later blocks: exp(aend - a_j) B x_j and s_j exp(aend - a_j) B.
    ds = e_end * _mm_state(xs, tl.trans(bx), SPLIT)
    dx = tl.dot(s * e_end, bx, input_precision=PREC_SLOT)
    if tl.min(aend, axis=0) > FAST_LIMIT:
        ds += tl.exp(-a) * tl.dot(tl.trans(xy), re, input_precision=PREC_SLOT)
        pw = tl.dot(re, tl.trans(s * tl.exp(-a)), input_precision=PREC_SLOT)
    else:
        for j in range(0, BM):
            e = tl.exp(tl.where((tt >= j)[:, None], a_rows - pick_row(a, jb, j)[None, :], float("-inf")))
            row = tl.sum(e * pick_col(xy, jb, j)[:, None] * r, axis=0)
            ds = tl.where((jb == j)[:, None], ds + row[None, :], ds)
        pw = _exact_cols(r, a, s, a_rows, jb, tt, BM)
    pw = tl.where(causal, pw, 0.0)
    if P_SPLIT:
        dx += _dot_split(tl.trans(pw), yu, SPLIT)
    else:
        dx += tl.dot(tl.trans(pw).to(yu.dtype), yu, input_precision=PREC)
    return ds, dx, tl.exp(aend)[:, None] * bx + _mm_state(tl.trans(re), yu, SPLIT)


@triton.jit
def _kv_side_sweep(
    x, y, r, r_scale, rb, dxs, dss, la, tok, span_table,
    T, W, S, L, SPANS_PER_ROW, H, NSPH,
    GP: tl.constexpr, BM: tl.constexpr, G: tl.constexpr, DX: tl.constexpr, M: tl.constexpr, DXP: tl.constexpr,
    MP: tl.constexpr, MC: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    PREC_SLOT: tl.constexpr, FAST_LIMIT: tl.constexpr, P_SPLIT: tl.constexpr, ACC: tl.constexpr,
):
    """The whole reverse sweep of one span for one side (see _kv_chunk): dx of its slot tokens, its part of ds.
    dx goes to the tokens' own positions js = t - w (no shift to undo after), added to what dxs holds there if ACC."""
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    bh = b.to(tl.int64) * H + h
    tok_b = tok + b.to(tl.int64) * T
    la_bh = la + bh * T * M
    tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
    dx = tl.arange(0, DXP)
    jb = tl.arange(0, BM)
    dx_ok = (dx < DX)[None, :]
    causal = tt[:, None] >= jb[None, :]
    rb0 = rb + (pid * H + h).to(tl.int64) * MP * DXP
    run = NSPH * MP * DXP
    n_blocks = tl.cdiv(span_end - span_start, BM)
    for ib in range(0, n_blocks):
        t0 = span_start + (n_blocks - 1 - ib) * BM
        cur = tl.where(ib == 0, 0, 1).to(tl.int64)
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        tb = t0 + jb
        js, jok, writes = _slot_writers(tok_b, tb, tb < seq_end, W, S, seq_start)
        js64 = js.to(tl.int64)
        xs = tl.load(x + (bh * T + js64)[:, None] * DX + dx[None, :], mask=jok[:, None] & dx_ok, other=0.0)
        yu = tl.load(y + (hq * T + t)[:, None] * DX + dx[None, :], mask=row_ok[:, None] & dx_ok, other=0.0)
        xy = tl.where(causal, tl.dot(yu, tl.trans(xs), input_precision=PREC), 0.0)
        acc = tl.zeros((BM, DXP), tl.float32)
        for c0 in range(0, MP, MC):
            ic, s, a, aend = _slot_gates(la_bh, js64, writes, c0, M, MC)
            off = ic[:, None] * DXP + dx[None, :]
            rows_m = (hq * T + t)[:, None] * M + ic[None, :]
            rr_ = tl.load(r + rows_m, mask=row_ok[:, None] & (ic < M)[None, :], other=0.0) * r_scale
            ds, dxc, bnew = _kv_chunk(xs, yu, xy, rr_, tl.load(rb0 + cur * run + off), s, a, aend,
                                      rows_of(a, GP, BM, MC), jb, tt, causal, BM, SPLIT, PREC, PREC_SLOT,
                                      FAST_LIMIT, P_SPLIT)
            acc += dxc
            tl.store(dss + (bh * T + tb.to(tl.int64))[:, None] * M + ic[None, :], ds,
                     mask=(tb < seq_end)[:, None] & (ic < M)[None, :])
            tl.store(rb0 + run + off, bnew)
        tl.debug_barrier()
        # recomputed here rather than kept live from the block's start (that added ~100 bytes of spills)
        js_out = t0 - W + jb
        ok_out = (js_out >= seq_start) & (t0 + jb < seq_end)
        dst = dxs + (bh * T + js_out.to(tl.int64))[:, None] * DXP + dx[None, :]
        if ACC:
            acc += tl.load(dst, mask=ok_out[:, None], other=0.0)
        tl.store(dst, acc, mask=ok_out[:, None])


@triton.jit
def _bwd_slot_kv_kernel(
    q, k, v, la, do, tok, span_table, dlb, psb, rb_k, rb_v, dks, dvb, dss_k, dss_v,
    T, W, S, L, SPANS_PER_ROW, H, NSPH, scale, one,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr,
    MC: tl.constexpr, SPLIT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, PREC_SLOT: tl.constexpr,
    FAST_LIMIT: tl.constexpr, SIDE: tl.constexpr,
):
    """Gradients of the slot tokens' k, v and write weights, one side per program (SIDE 0: K, 1: V, -1: grid axis 2
    picks), so the K-side and V-side adjoint tiles are never live together (one program carrying both spilled 1.8 KB
    per thread and took 10.2 ms at T = 32K against 3.6 ms split: docs/performance.md, bwd v4). ds = dss_k + dss_v.
    `one` = 1.0 passed at run time: with the literal 1.0 folded in, ptxas spills ~10x more on the V side.
    dks (zeros) gets the slot part of dk; dvb (the band's dv, sinks added) gets the slot part of dv added."""
    side = tl.program_id(2) if SIDE < 0 else SIDE
    if side == 0:
        _kv_side_sweep(k, q, dlb, scale, rb_k, dks, dss_k, la, tok, span_table, T, W, S, L, SPANS_PER_ROW, H, NSPH,
                       GP, BM, G, D, M, DP, MP, MC, SPLIT, VARLEN, PREC, PREC_SLOT, FAST_LIMIT, True, False)
    else:
        _kv_side_sweep(v, do, psb, one, rb_v, dvb, dss_v, la, tok, span_table, T, W, S, L, SPANS_PER_ROW, H, NSPH,
                       GP, BM, G, DV, M, DVP, MP, MC, SPLIT, VARLEN, PREC, PREC_SLOT, FAST_LIMIT, False, True)


def _unshift(x: Tensor, w: int, lay, dim: int = 2) -> Tensor:
    """Values at shifted positions t -> the tokens t - w they belong to (within each sequence); zeros elsewhere."""
    t_len = x.shape[dim]
    if w == 0:
        return x
    dev = x.device
    pos = torch.arange(t_len, device=dev)
    src = pos + w
    ok = src < lay.seq_end_at
    shape = [1] * x.dim()
    shape[dim] = t_len
    idx = torch.where(ok, src, 0).view(shape).expand_as(x)
    return torch.where(ok.view(shape), x.gather(dim, idx), torch.zeros((), dtype=x.dtype, device=dev))


def _revcumsum(x: Tensor, lay, dim: int = 2) -> Tensor:
    """Reverse cumulative sum along dim, restarting at every sequence start."""
    # torch's scan is fast only along the innermost dimension (an outer-dim scan took 12 ms at T = 32K).
    rc = x.movedim(dim, -1).flip(-1).contiguous().cumsum(-1).flip(-1).movedim(-1, dim)
    if not lay.varlen:
        return rc
    t_len = x.shape[dim]
    seq_end = lay.seq_end_at
    shape = [1] * x.dim()
    shape[dim] = t_len
    nxt = torch.where(seq_end < t_len, seq_end, 0).view(shape).expand_as(x)
    after = torch.where((seq_end < t_len).view(shape), rc.gather(dim, nxt), torch.zeros((), device=x.device))
    return rc - after


@triton.jit
def _delta_kernel(do, o, o_lo, delta, N, D: tl.constexpr, DP: tl.constexpr, R: tl.constexpr, HAS_LO: tl.constexpr):
    """delta = rowsum(dO * (O + O_lo)) in fp32 for R rows per program (one pass over the three tensors)."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    cols = tl.arange(0, DP)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    at = rows[:, None] * D + cols[None, :]
    out = tl.load(o + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_LO:
        out += tl.load(o_lo + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(delta + rows, tl.sum(tl.load(do + at, mask=ok, other=0.0).to(tl.float32) * out, axis=1), mask=rows < N)


def _delta(do: Tensor, fwd: FwdOut) -> Tensor:
    """rowsum(dO * O) with O at ~16 bits (o + its rounding residual): torch casts and products moved ~2 GB at 32K."""
    b, hq, t_len, dv = do.shape
    delta = torch.empty(b, hq, t_len, dtype=torch.float32, device=do.device)
    n, r = b * hq * t_len, 64
    _delta_kernel[(triton.cdiv(n, r),)](do, fwd.o, fwd.o if fwd.o_lo is None else fwd.o_lo, delta, n, D=dv,
                                        DP=max(16, next_pow2(dv)), R=r, HAS_LO=fwd.o_lo is not None, num_warps=4)
    return delta


def _bwd_kv_launches(mode: str) -> tuple[int, ...]:
    """bwd_kv split (default: the K and V sides as the two values of grid axis 2, one launch) or split2 (two
    launches, one per side: SIDE as a compile-time constant)."""
    return (-1,) if mode == "split" else (0, 1)


def _slot_tile(default: int, d: int, tile: int | None) -> int:
    """Slots per tile of the backward's slot kernels: `tile` (bwd_slot_tile: 16, 32 or 64); else 64 for head dims up to 64
    and the config's default (16) above. On the H200 (session 11, docs/performance.md), at d = 64 (the SmolLM2
    training rows, 64 x 1K and 64 x 4K) tile 64 takes 15 % less forward + backward time than 16, on both GPUs of one
    machine; at d = 128, where a tile holds twice the live registers, 64 passes the GPU gradient tests but is
    untimed."""
    if tile is None:
        return 64 if d <= 64 else default
    return tile


def nha_bwd(fwd: FwdOut, do: Tensor, q, q_rot, k, k_rot, v, log_alpha, *, window, num_sinks, scale,
            slot_bias: Tensor | None = None, options: KernelOptions = DEFAULT):
    """Gradients (dq, dq_rot, dk, dk_rot, dv, dlog_alpha, dslot_bias) of the op whose forward produced `fwd`.
    dslot_bias (None without a bias) = the sum of the slot logits' gradients dl of each query head. `options`:
    bwd_kv, bwd_slot_tile and gate_grad pick the variants (gate_grad triton: gate_grad.py, two passes instead of
    ~25 torch ops; equal to the torch form in the interpreter and GPU tests, faster on the H200)."""
    lay, cfg = fwd.layout, fwd.config
    b, hq, t_len, d = q.shape
    hkv, dv, m = k.shape[1], v.shape[-1], log_alpha.shape[-1]
    g = hq // hkv
    gp = next_pow2(g)
    bm = cfg.rows // gp
    dev = q.device
    q, q_rot, k, k_rot, v = (x.contiguous() for x in (q, q_rot, k, k_rot, v))
    la = log_alpha.float().contiguous()
    do = do.contiguous()
    w_eff = t_len if window is None else min(window, t_len)
    has_slots = fwd.span_k is not None
    has_sinks = num_sinks > 0 and window is not None and window < t_len
    dp_, dvp, mp = max(16, next_pow2(d)), max(16, next_pow2(dv)), max(16, next_pow2(m))
    prec, prec_slot = precisions(q.dtype)
    split = split_products(q.dtype)
    span_table = lay.span_table if lay.varlen else lay.tok
    seq_table = lay.seq_table if lay.varlen else lay.tok
    delta = _delta(do, fwd)
    grid = (lay.n_spans, hkv)
    common = (t_len, w_eff)

    dq_rot = torch.empty_like(q_rot)
    # dk_rot, dv in fp32: the band's (stored), then the sinks' (atomic adds at their positions), then the slots' (dv).
    # Every launch here is host time at the training shapes, where the GPU work is small (session 15: the scatter of
    # the sink gradients and the shift of the slot gradients were 38 of the backward's 67 torch launches).
    dk_rot32 = torch.empty(b, hkv, t_len, dp_, dtype=torch.float32, device=dev)
    dv32 = torch.empty(b, hkv, t_len, dvp, dtype=torch.float32, device=dev)
    if lay.n_spans:
        _bwd_band_kv_kernel[grid](
            q_rot, k_rot, v, do, fwd.lse, delta, lay.tok, span_table, dk_rot32, dv32,
            *common, cfg.span, lay.spans_per_row, hkv, scale,
            G=g, GP=gp, BM=bm, BN=cfg.bn, D=d, DV=dv, DP=dp_, DVP=dvp, VARLEN=lay.varlen, PREC=prec, SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _bwd_band_q_kernel[grid](
            q_rot, k_rot, v, do, fwd.lse, delta, lay.tok, lay.sink_pos, span_table, dq_rot, dk_rot32, dv32,
            *common, cfg.span, lay.spans_per_row, hkv, scale,
            G=g, GP=gp, BM=bm, BN=cfg.bn, D=d, DV=dv, DP=dp_, DVP=dvp, SP=lay.sink_pad, HAS_SINKS=has_sinks,
            VARLEN=lay.varlen, PREC=prec, SPLIT=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if has_slots:
        dq = torch.empty_like(q)
        xg = torch.empty(b, hkv, t_len, m, dtype=torch.float32, device=dev)  # every position written
        # The kernel writes dl only where slots are in reach; d slot_bias sums all of it, so start from zeros then.
        dlb = (torch.empty if slot_bias is None else torch.zeros)(b, hq, t_len, m, dtype=torch.float32, device=dev)
        psb = torch.empty(b, hq, t_len, m, dtype=torch.float32, device=dev)
        st_k = torch.stack([fwd.span_k, torch.empty_like(fwd.span_k)])  # [0] span starts, [1] running
        st_v = torch.stack([fwd.span_v, torch.empty_like(fwd.span_v)])
        mc = min(_slot_tile(cfg.mc_bwd, d, options.bwd_slot_tile), mp)
        nsph = lay.n_spans * hkv
        _bwd_slot_q_kernel[grid](
            q, k, v, la, do, fwd.lse, delta, lay.tok, span_table, st_k, st_v, dq, xg, dlb, psb,
            delta if slot_bias is None else slot_bias.detach().float().contiguous(),
            *common, num_sinks, cfg.span, lay.spans_per_row, hkv, nsph, scale,
            G=g, GP=gp, BM=bm, D=d, DV=dv, M=m, DP=dp_, DVP=dvp, MP=mp, MC=mc, SPLIT=split, VARLEN=lay.varlen,
            PREC=prec, PREC_SLOT=prec_slot, FAST_LIMIT=FAST_LIMIT, HAS_SLOT_BIAS=slot_bias is not None,
            num_warps=cfg.num_warps, num_stages=1,
        )
        if slot_bias is not None:
            dbias = dlb.sum(dim=(0, 2, 3)).to(slot_bias.dtype)
        rb_k = torch.empty(2, lay.n_spans, hkv, mp, dp_, dtype=torch.float32, device=dev)
        rb_v = torch.empty(2, lay.n_spans, hkv, mp, dvp, dtype=torch.float32, device=dev)
        rb_a = torch.empty(lay.n_spans, hkv, mp, dtype=torch.float32, device=dev)
        _bwd_slot_rlocal_kernel[grid](
            q, do, la, lay.tok, span_table, dlb, psb, rb_k, rb_v, rb_a,
            *common, num_sinks, cfg.span, lay.spans_per_row, hkv, scale,
            G=g, GP=gp, BM=bm, D=d, DV=dv, M=m, DP=dp_, DVP=dvp, MP=mp, SPLIT=split, VARLEN=lay.varlen,
            num_warps=cfg.num_warps, num_stages=1,
        )
        fin_k = torch.empty(lay.n_seqs, hkv, mp, dp_, dtype=torch.float32, device=dev)
        fin_v = torch.empty(lay.n_seqs, hkv, mp, dvp, dtype=torch.float32, device=dev)
        for loc, fin, xp in ((rb_k, fin_k, dp_), (rb_v, fin_v, dvp)):
            span_scan(loc, rb_a, seq_table, fin, lay, hkv, mp, xp, reverse=True)
        # zeros: the last w tokens of a sequence never enter the slots; ds: every (shifted) position written
        dks = torch.zeros(b, hkv, t_len, dp_, dtype=torch.float32, device=dev)
        dss = torch.empty(2, b, hkv, t_len, m, dtype=torch.float32, device=dev)  # K part, V part of ds
        args = (q, k, v, la, do, lay.tok, span_table, dlb, psb, rb_k, rb_v, dks, dv32, *dss,
                *common, num_sinks, cfg.span, lay.spans_per_row, hkv, nsph, scale, 1.0)
        for side in _bwd_kv_launches(options.bwd_kv):
            _bwd_slot_kv_kernel[grid + (2 if side < 0 else 1,)](
                *args, G=g, GP=gp, BM=bm, D=d, DV=dv, M=m, DP=dp_, DVP=dvp, MP=mp, MC=mc, SPLIT=split,
                VARLEN=lay.varlen, PREC=prec, PREC_SLOT=prec_slot, FAST_LIMIT=FAST_LIMIT, SIDE=side,
                num_warps=cfg.num_warps, num_stages=1)
        if options.gate_grad == "triton":
            dla = gate_grad_triton(xg, dss, la, lay, w_eff, num_sinks)
        else:
            dla = gate_grad_torch(xg, dss, la, lay, w_eff, num_sinks)
        dk = dks[..., :d].to(k.dtype)
    else:
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        dla = torch.zeros_like(la)
        if slot_bias is not None:  # no slots in reach: the bias changes nothing
            dbias = torch.zeros_like(slot_bias)
    return (dq, dq_rot, dk, dk_rot32[..., :d].to(k_rot.dtype), dv32[..., :dv].to(v.dtype),
            dla.to(log_alpha.dtype), None if slot_bias is None else dbias)


def gate_grad_torch(xg: Tensor, dss: Tensor, la: Tensor, lay: Layout, w: int, num_sinks: int) -> Tensor:
    """dL/d log alpha (B, H, T, M) in torch ops: the reference of `gate_grad.gate_grad_triton` (math there)."""
    dss = dss[0] + dss[1]
    # Gates: shifted log decays la' (0 where a token does not write), then dL/dla'.
    cv, real = lay.tok >> 1, (lay.tok & 1) == 1
    writes = real & (cv > num_sinks)
    la_w = torch.where(writes[:, None, :, None], la, torch.zeros((), device=la.device))
    la_s = _shift(la_w, w, lay)
    s_s = -torch.expm1(la_s)
    dla_s = _revcumsum(xg - s_s * dss, lay) - torch.exp(la_s) * dss
    return _unshift(dla_s, w, lay) * writes[:, None, :, None]


def _shift(x: Tensor, w: int, lay, dim: int = 2) -> Tensor:
    """Token j -> shifted position j + w (within each sequence); zeros where nothing enters."""
    t_len = x.shape[dim]
    if w == 0:
        return x
    dev = x.device
    src = torch.arange(t_len, device=dev) - w
    ok = src >= lay.seq_start_at
    shape = [1] * x.dim()
    shape[dim] = t_len
    idx = torch.where(ok, src, 0).view(shape).expand_as(x)
    return torch.where(ok.view(shape), x.gather(dim, idx), torch.zeros((), dtype=x.dtype, device=dev))
