"""Chunk-parallel NHA forward main kernel: no state carried from block to block.

The slot state at the start of every chunk of CK shifted positions comes from the state pass in chunk_fwd.py: by
default `_chunk_walk_kernel` (below) walks each span of up to 1024 positions from its start state (the serial
forward's span pass + scan); with NHA_FWD_STATE_SPAN=0, `_span_local_kernel` with spans of CK tokens and one
`span_scan` over all chunks. Each program then owns one query block of BM
positions of one chunk and one KV head (G query heads as rows g * BM + t), and computes, from the chunk-start state
K0/V0 and the chunk's own tokens up to its block (the same chunk form as chunk_fwd.py, with A the cumulative log
decay since the chunk start):
    l_t  = scale * exp(A_t) * (K0 q_t + sum_{j <= t} (q_t . k_j) s_j exp(-A_j))        (slot logits, per slot)
    o_t += (p_t exp(A_t)) V0 + sum_{j <= t} [(p_t exp(A_t)) . (s_j exp(-A_j))] v_j      (slot output)
then sinks and the band under the same online softmax. Programs are independent (no dependency chain, no barrier),
so several run per SM and hide each other's latencies; this is the GLA/GSA "chunk" form (fla) with the token shift.
Blocks whose decay since the chunk start falls below FAST_LIMIT take the exact per-token path, as in chunk_fwd.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd_common import _seq_of_span, _sinks_band_store, _slot_kv, _slot_writers
from .precision import _mm_state
from .triton_utils import expm1, group_rows, pick_col, pick_row, rows_of, slot_bias_rows


@triton.jit
def _nha_fwd_par_kernel(
    q, qr, k, kr, v, la, tok, sink_pos, span_table, st_k, st_v, o, o_lo, lse, slot_bias,
    T, W, S, L, SPANS_PER_ROW, H, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CK: tl.constexpr, NSUB: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr, SP: tl.constexpr, SPLIT: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_SINKS: tl.constexpr, VARLEN: tl.constexpr, STORE_LO: tl.constexpr,
    PREC: tl.constexpr, PREC_SLOT: tl.constexpr, FAST_LIMIT: tl.constexpr, EXACT: tl.constexpr = True,
    HAS_SLOT_BIAS: tl.constexpr = False,
):
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    chunk = pid // NSUB
    sub = pid % NSUB
    b, n, seq_start, seq_end, c0, c_end = _seq_of_span(span_table, chunk, T, L, SPANS_PER_ROW, VARLEN)
    t0 = c0 + sub * BM
    if t0 < c_end:
        b64 = b.to(tl.int64)
        bh = b64 * H + h
        tok_b = tok + b64 * T
        tt, hq, g_ok = group_rows(bh, G, BM, ROWS)
        dd = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        ii = tl.arange(0, MP)
        d_ok = (dd < D)[None, :]
        dv_ok = (dv < DV)[None, :]
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        qoff = (hq * T + t)[:, None] * D + dd[None, :]
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DVP), tl.float32)

        if HAS_SLOTS:
            jc = tl.arange(0, CK)
            tc = c0 + jc  # the chunk's shifted positions; those after this block are masked
            js, jok, writes = _slot_writers(tok_b, tc, (tc < seq_end) & (tc < t0 + BM), W, S, seq_start)
            js64, ks, vs = _slot_kv(k, v, bh, T, js, jok, dd, dv, d_ok, dv_ok, D, DV)
            qu = tl.load(q + qoff, mask=row_ok[:, None] & d_ok, other=0.0)
            causal = tc[None, :] <= t[:, None]  # (ROWS, CK)
            qk = tl.where(causal, tl.dot(qu, tl.trans(ks), input_precision=PREC), 0.0)
            jr = t - W  # empty-slot mask: nothing has entered the slots yet at shifted position t
            code_r = tl.load(tok_b + jr, mask=row_ok & (jr >= seq_start), other=0)
            row_has = (code_r >> 1) > S
            lab = tl.load(la + (bh * T + js64)[:, None] * M + ii[None, :], mask=writes[:, None] & (ii < M)[None, :],
                          other=0.0)
            s = -expm1(lab)
            a = tl.cumsum(lab, axis=0)  # (CK, MP) log decay since the chunk start, through key j
            aend = tl.sum(lab, axis=0)
            if NSUB == 1:
                a_q = a
            else:  # the block's own rows of a, bit for bit (the exact path needs a_t - a_t == 0)
                sel = (tl.arange(0, NSUB) == sub)[:, None, None]
                a_q = tl.sum(tl.where(sel, tl.reshape(a, (NSUB, BM, MP)), 0.0), axis=0)
            a_rows = rows_of(a_q, GP, BM, MP)
            ea_rows = tl.exp(a_rows)
            fast = (tl.min(aend, axis=0) > FAST_LIMIT) | (not EXACT)
            st_off = (chunk * H + h).to(tl.int64)
            sk = tl.load(st_k + st_off * MP * DP + ii[:, None] * DP + dd[None, :])  # (MP, DP) fp32
            q_s = _mm_state(qu, tl.trans(sk), SPLIT)  # (ROWS, MP)
            if fast:
                shat = s * tl.exp(-a)  # (CK, MP), <= exp(-FAST_LIMIT)
                ls = ea_rows * (q_s + tl.dot(qk, shat, input_precision=PREC_SLOT))
            else:
                shat = tl.zeros((CK, MP), tl.float32)
                inner = tl.zeros((ROWS, MP), tl.float32)
                for j in range(0, CK):
                    e = tl.exp(tl.where((t >= c0 + j)[:, None], a_rows - pick_row(a, jc, j)[None, :], float("-inf")))
                    inner += pick_col(qk, jc, j)[:, None] * e * pick_row(s, jc, j)[None, :]
                ls = ea_rows * q_s + inner
            if HAS_SLOT_BIAS:
                ls = ls * scale + slot_bias_rows(slot_bias, hq, H * G, g_ok)[:, None]
            else:
                ls = ls * scale
            ls = tl.where(row_has[:, None] & (ii < M)[None, :], ls, float("-inf"))
            m_i = tl.max(ls, axis=1)
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp(ls - m_safe[:, None])
            l_i = tl.sum(p, axis=1)
            pt = p * ea_rows
            if fast:
                p2 = tl.dot(pt, tl.trans(shat), input_precision=PREC_SLOT)  # (ROWS, CK)
            else:
                p2 = tl.zeros((ROWS, CK), tl.float32)
                for j in range(0, CK):
                    e = tl.exp(tl.where((t >= c0 + j)[:, None], a_rows - pick_row(a, jc, j)[None, :], float("-inf")))
                    col = tl.sum(p * e * pick_row(s, jc, j)[None, :], axis=1)
                    p2 = tl.where((jc == j)[None, :], col[:, None], p2)
            p2 = tl.where(causal, p2, 0.0)
            sv = tl.load(st_v + st_off * MP * DVP + ii[:, None] * DVP + dv[None, :])
            acc = _mm_state(pt.to(vs.dtype), sv, SPLIT)
            acc += tl.dot(p2.to(vs.dtype), vs, input_precision=PREC)

        _sinks_band_store(m_i, l_i, acc, qr, qoff, kr, v, o, o_lo, lse, sink_pos, tok_b, n, bh, hq, T, t, t0, W,
                          seq_start, seq_end, scale, row_ok, d_ok, dv_ok, dd, dv,
                          D, DV, BM, BN, SP, HAS_SINKS, STORE_LO, PREC)


@triton.jit
def _chunk_walk_kernel(
    k, v, la, tok, span_table, chunk_first, init_k, init_v, out_k, out_v,
    T, W, S, L, SPANS_PER_ROW, CHUNKS_PER_ROW, H,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr,
    CK: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """Chunk states from span states: per span of L positions (a multiple of CK), start from the exact state at the
    span start and walk its chunks, storing the state at each chunk start (the chunk update of `_span_local_kernel`).
    Replaces the per-chunk local pass + scan over all chunks (fp32 states written, read and written again)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    if VARLEN:
        c_base = tl.load(chunk_first + n * 4) + (span_start - seq_start) // CK
    else:
        c_base = b * CHUNKS_PER_ROW + span_start // CK
    bh = (b * H + h).to(tl.int64)
    tok_b = tok + b.to(tl.int64) * T
    la_bh = la + bh * T * M
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    ii = tl.arange(0, MP)
    tile_k = ii[:, None] * DP + dd[None, :]
    tile_v = ii[:, None] * DVP + dv[None, :]
    src = (pid * H + h).to(tl.int64)
    sk = tl.load(init_k + src * MP * DP + tile_k)
    sv = tl.load(init_v + src * MP * DVP + tile_v)
    for i in range(0, tl.cdiv(span_end - span_start, CK)):
        c0 = span_start + i * CK
        dst = ((c_base + i) * H + h).to(tl.int64)
        tl.store(out_k + dst * MP * DP + tile_k, sk)
        tl.store(out_v + dst * MP * DVP + tile_v, sv)
        tb = c0 + tl.arange(0, CK)
        js = tb - W
        ok = (tb < span_end) & (js >= seq_start)
        code = tl.load(tok_b + js, mask=ok, other=0)
        writes = ok & ((code & 1) == 1) & ((code >> 1) > S)
        lab = tl.load(la_bh + js.to(tl.int64)[:, None] * M + ii[None, :], mask=writes[:, None] & (ii < M)[None, :],
                      other=0.0)
        a = tl.cumsum(lab, axis=0)
        aend = tl.sum(lab, axis=0)
        wt = -expm1(lab) * tl.exp(aend[None, :] - a)
        kk = tl.load(k + (bh * T + js.to(tl.int64))[:, None] * D + dd[None, :], mask=ok[:, None] & (dd < D)[None, :],
                     other=0.0)
        vv = tl.load(v + (bh * T + js.to(tl.int64))[:, None] * DV + dv[None, :],
                     mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
        decay = tl.exp(aend)[:, None]
        sk = decay * sk + tl.dot(tl.trans(wt), kk.to(tl.float32), input_precision=PREC)
        sv = decay * sv + tl.dot(tl.trans(wt), vv.to(tl.float32), input_precision=PREC)
