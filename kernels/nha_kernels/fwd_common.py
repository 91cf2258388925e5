"""@triton.jit helpers shared by the forward kernels (chunk_fwd.py, fwd_parallel.py) and the backward (chunk_bwd.py):
which span and sequence a program owns, which tokens enter the slots and their loads, the online softmax step, the
band walk, and the common end of both forward kernels (sinks, band, store)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN: tl.constexpr):
    if VARLEN:
        seq_start = tl.load(span_table + pid * 4 + 0)
        seq_end = tl.load(span_table + pid * 4 + 1)
        span_start = tl.load(span_table + pid * 4 + 2)
        n = tl.load(span_table + pid * 4 + 3)
        b = n * 0
    else:
        b = pid // SPANS_PER_ROW
        n = b
        seq_start = b * 0
        seq_end = seq_start + T
        span_start = (pid % SPANS_PER_ROW) * L
    span_end = tl.minimum(span_start + L, seq_end)
    return b, n, seq_start, seq_end, span_start, span_end


@triton.jit
def _slot_writers(tok_b, tb, tb_ok, W, S, seq_start):
    """The tokens js = tb - W that enter the slots at shifted positions tb (where tb_ok): inside the sequence, real
    (not padding) and past the S sinks. Returns (js, in sequence, writes). `tok` codes: bit 0 real, bits 1+ count."""
    js = tb - W
    jok = tb_ok & (js >= seq_start)
    code = tl.load(tok_b + js, mask=jok, other=0)
    return js, jok, jok & ((code & 1) == 1) & ((code >> 1) > S)


@triton.jit
def _slot_kv(k, v, bh, T, js, jok, dd, dv, d_ok, dv_ok, D: tl.constexpr, DV: tl.constexpr):
    """Raw keys and values of the tokens js (zero where not jok), the ones a block folds into the slots."""
    js64 = js.to(tl.int64)
    ks = tl.load(k + (bh * T + js64)[:, None] * D + dd[None, :], mask=jok[:, None] & d_ok, other=0.0)
    vs = tl.load(v + (bh * T + js64)[:, None] * DV + dv[None, :], mask=jok[:, None] & dv_ok, other=0.0)
    return js64, ks, vs


@triton.jit
def _online(m_i, l_i, acc, sc, vals, PREC_PV: tl.constexpr):
    """One step of the online softmax: logits sc (rows x N) with -inf where hidden, values vals (N x DV)."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PREC_PV)
    return m_new, l_i, acc


@triton.jit
def _band_range(seq_start, seq_end, t0, W, BM: tl.constexpr):
    """Keys [lo, hi) that some query of the block t0 .. t0 + BM - 1 sees in its window (none when w = 0)."""
    lo = tl.maximum(seq_start, t0 - W + 1)
    hi = tl.minimum(t0 + BM, seq_end)
    return lo, tl.where(W == 0, lo, hi)


@triton.jit
def _band_block(tok_b, kr, v, bh, T, kb, hi, t, W, dd, dv, d_ok, dv_ok, D: tl.constexpr, DV: tl.constexpr,
                BN: tl.constexpr):
    """Keys kb .. kb + BN - 1 of the band: RoPE'd keys, values, and which (query t, key) pairs are visible
    (a real key inside the query's window (t - w, t])."""
    kj = kb + tl.arange(0, BN)
    k_ok = kj < hi
    code = tl.load(tok_b + kj, mask=k_ok, other=0)
    kj64 = kj.to(tl.int64)
    kt = tl.load(kr + (bh * T + kj64)[:, None] * D + dd[None, :], mask=k_ok[:, None] & d_ok, other=0.0)
    vt = tl.load(v + (bh * T + kj64)[:, None] * DV + dv[None, :], mask=k_ok[:, None] & dv_ok, other=0.0)
    vis = (((code & 1) == 1) & k_ok)[None, :] & (kj[None, :] <= t[:, None]) & (kj[None, :] > (t - W)[:, None])
    return kt, vt, vis


@triton.jit
def _sinks_band_store(m_i, l_i, acc, qr, qoff, kr, v, o, o_lo, lse, sink_pos, tok_b, n, bh, hq, T, t, t0, W,
                      seq_start, seq_end, scale, row_ok, d_ok, dv_ok, dd, dv,
                      D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr,
                      HAS_SINKS: tl.constexpr, STORE_LO: tl.constexpr, PREC: tl.constexpr):
    """The end of a row block in both forward kernels: after the slots, the sinks that have left the window and
    the band join the same online softmax; then the output (and its rounding residual) and the log-sum-exp."""
    q_rot = tl.load(qr + qoff, mask=row_ok[:, None] & d_ok, other=0.0)
    if HAS_SINKS:  # sinks that have left the window (inside it they are ordinary band keys)
        spi = tl.arange(0, SP)
        spos = tl.load(sink_pos + n * SP + spi)
        s_ok = spos >= 0
        spos_c = tl.where(s_ok, spos, 0).to(tl.int64)
        k_sink = tl.load(kr + (bh * T + spos_c)[:, None] * D + dd[None, :], mask=s_ok[:, None] & d_ok, other=0.0)
        v_sink = tl.load(v + (bh * T + spos_c)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok,
                         other=0.0)
        sc_s = tl.dot(q_rot, tl.trans(k_sink), input_precision=PREC) * scale
        vis_s = s_ok[None, :] & (spos[None, :] <= (t - W)[:, None])
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis_s, sc_s, float("-inf")), v_sink, PREC)

    lo, hi = _band_range(seq_start, seq_end, t0, W, BM)
    for kb in range(lo, hi, BN):
        kt, vt, vis = _band_block(tok_b, kr, v, bh, T, kb, hi, t, W, dd, dv, d_ok, dv_ok, D, DV, BN)
        sc = tl.dot(q_rot, tl.trans(kt), input_precision=PREC) * scale
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis, sc, float("-inf")), vt, PREC)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_off = (hq * T + t)[:, None] * DV + dv[None, :]
    o_hi = out.to(o.dtype.element_ty)
    tl.store(o + o_off, o_hi, mask=row_ok[:, None] & dv_ok)
    if STORE_LO:  # what the rounding to the input dtype dropped: the backward's delta = dO . O needs it
        tl.store(o_lo + o_off, (out - o_hi.to(tl.float32)).to(o.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(lse + hq * T + t, tl.where(l_i > 0, m_fin + tl.log(l_safe), float("-inf")), mask=row_ok)
