"""Fused NHA forward: slot logits from the gated-slot recurrence (token shift w), banded window logits on RoPE'd
q/k, sinks, and ONE online softmax over all of them in registers; the T x (w + m) probabilities never reach memory.

Work split (per KV head h; the G query heads of the group are stacked as rows g * BM + t of one tile, so keys,
values and gates are loaded once per group, never repeated):
1. `_span_local_kernel`  : per span of L shifted positions, the slot state its tokens add (from zero), and its
                           total log decay. All spans in parallel.
2. `span_scan`          : per sequence, a scan over its spans (one parallel associative scan; a sequential loop
                           beyond 4096 spans): the exact slot state at every span start (written over the local
                           states) and the final state (for the decode cache).
3. `_nha_fwd_kernel`     : per span, walk its query blocks of BM tokens; for each block
                           - slot logits  l_t = scale * K~_t q_t from the carried state and the block's own
                             tokens (exact chunk form, see below), empty-slot mask;
                           - sinks that left the window, then the band (t - w, t] in key blocks of BN;
                           - one online softmax; output; log-sum-exp (for the backward);
                           - carry the slot state past the block.
   The default is the chunk-parallel form instead (fwd_parallel.py): the slot state at every 64-position chunk,
   walked from the span states of steps 1-2, then one independent program per query block (NHA_FWD=serial: this).

Chunk form of the slot part for a block of shifted positions t0..t0+BM-1 (A_t = cumulative log decay since the
block start, per slot; s_j = 1 - alpha_j):
    K~_t = exp(A_t) * K~_start + sum_{j<=t} exp(A_t - A_j) s_j k_j^T
The fast path factors exp(A_t - A_j) = exp(A_t) exp(-A_j) to use matrix products; it is exact in fp32 while the
block's total decay stays above -80 (exp(80) is far from overflow). Blocks whose gates decay harder take an exact
token-by-token path (rare; the test suite forces it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compat import interpreting
from .fwd_common import _seq_of_span, _sinks_band_store, _slot_kv, _slot_writers
from .fwd_parallel import _chunk_walk_kernel, _nha_fwd_par_kernel
from .options import DEFAULT, KernelOptions
from .precision import FAST_LIMIT, _mm_state, precisions, split_products
from .prep import Layout, make_layout, next_pow2
from .triton_utils import expm1, group_rows, pick_col, pick_row, rows_of, slot_bias_rows

LAST_COMPILED: dict = {}  # name -> the last compiled kernel launched (n_regs, n_spills for the notes)


@triton.jit
def _slot_tokens(tok_b, la_bh, t_block, seq_start, seq_end, W, S, M, MP: tl.constexpr):
    """Gates of the tokens entering the slots at shifted positions t_block: (log decay, write weight, in-seq)."""
    js, ok, writes = _slot_writers(tok_b, t_block, t_block < seq_end, W, S, seq_start)
    ii = tl.arange(0, MP)
    la = tl.load(la_bh + js.to(tl.int64)[:, None] * M + ii[None, :], mask=writes[:, None] & (ii < M)[None, :],
                 other=0.0)
    return la, -expm1(la), ok, js


@triton.jit
def _span_local_kernel(
    k, v, la, tok, span_table, loc_k, loc_v, loc_a,
    T, W, S, L, SPANS_PER_ROW, H,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr, CS: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    bh = (b * H + h).to(tl.int64)
    tok_b = tok + b.to(tl.int64) * T
    la_bh = la + bh * T * M
    k_bh = k + bh * T * D
    v_bh = v + bh * T * DV
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    ii = tl.arange(0, MP)
    sk = tl.zeros((MP, DP), tl.float32)
    sv = tl.zeros((MP, DVP), tl.float32)
    atot = tl.zeros((MP,), tl.float32)
    for c0 in range(span_start, span_end, CS):
        tb = c0 + tl.arange(0, CS)
        lab, s, ok, js = _slot_tokens(tok_b, la_bh, tb, seq_start, span_end, W, S, M, MP)
        a = tl.cumsum(lab, axis=0)
        aend = tl.sum(lab, axis=0)
        wt = s * tl.exp(aend[None, :] - a)
        kk = tl.load(k_bh + js.to(tl.int64)[:, None] * D + dd[None, :], mask=ok[:, None] & (dd < D)[None, :], other=0.0)
        vv = tl.load(v_bh + js.to(tl.int64)[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :],
                     other=0.0)
        decay = tl.exp(aend)[:, None]
        sk = decay * sk + tl.dot(tl.trans(wt), kk.to(tl.float32), input_precision=PREC)
        sv = decay * sv + tl.dot(tl.trans(wt), vv.to(tl.float32), input_precision=PREC)
        atot += aend
    out = (pid * H + h).to(tl.int64)
    tl.store(loc_k + out * MP * DP + ii[:, None] * DP + dd[None, :], sk)
    tl.store(loc_v + out * MP * DVP + ii[:, None] * DVP + dv[None, :], sv)
    tl.store(loc_a + out * MP + ii, atot)


@triton.jit
def _spans_of_seq(seq_table, n, SPANS_PER_ROW, VARLEN: tl.constexpr):
    """(first span, span count) of sequence n: from the table for packed sequences, else one row of spans."""
    if VARLEN:
        first = tl.load(seq_table + n * 4 + 0)
        count = tl.load(seq_table + n * 4 + 1)
    else:
        first = n * SPANS_PER_ROW
        count = SPANS_PER_ROW + n * 0
    return first, count


@triton.jit
def _span_scan_kernel(
    loc, loc_a, seq_table, final, SPANS_PER_ROW, H,
    MP: tl.constexpr, XP: tl.constexpr, E: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr = False,
):
    """Turn per-span local states into the state at each span start (in place) and the final state.

    The recurrence S <- exp(a_row) S + local is elementwise, so each program owns E of the MP x XP entries of one
    (sequence, KV head): many programs walk the spans side by side (a whole tile per program made this loop, 512
    steps at 64-token spans, latency-bound). REVERSE (backward pass): walk the spans from the last, so each span
    gets the adjoint arriving from later spans."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    cb = tl.program_id(2)
    first, count = _spans_of_seq(seq_table, n, SPANS_PER_ROW, VARLEN)
    ee = cb * E + tl.arange(0, E)
    row = ee // XP
    st = tl.zeros((E,), tl.float32)
    for i in range(0, count):
        if REVERSE:
            sp = first + count - 1 - i
        else:
            sp = first + i
        idx = (sp * H + h).to(tl.int64)
        lk = tl.load(loc + idx * MP * XP + ee)
        la = tl.load(loc_a + idx * MP + row)
        tl.store(loc + idx * MP * XP + ee, st)
        st = tl.exp(la) * st + lk
    tl.store(final + (n * H + h).to(tl.int64) * MP * XP + ee, st)


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    """Compose x -> a1 x + b1, then x -> a2 x + b2."""
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _span_scan_tree_kernel(
    loc, loc_a, seq_table, final, SPANS_PER_ROW, H,
    MP: tl.constexpr, XP: tl.constexpr, E: tl.constexpr, NCP: tl.constexpr, VARLEN: tl.constexpr,
    REVERSE: tl.constexpr = False,
):
    """`_span_scan_kernel` as one parallel scan over all spans of a sequence (no sequential loop): position c of the
    walk takes the pair (decay, local state) of the span before it, so the inclusive scan of the pairs is the state at
    each span start. Each program owns E entries of the state tile for all (up to NCP) spans."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    cb = tl.program_id(2)
    first, count = _spans_of_seq(seq_table, n, SPANS_PER_ROW, VARLEN)
    cc = tl.arange(0, NCP)  # position in the walk (reversed order for REVERSE)
    ee = cb * E + tl.arange(0, E)
    row = ee // XP
    if REVERSE:
        span_of = first + count - 1 - cc
        src = span_of + 1
        last = first
    else:
        span_of = first + cc
        src = span_of - 1
        last = first + count - 1
    src_ok = (cc >= 1) & (cc < count)
    src_idx = tl.where(src_ok, src * H + h, 0).to(tl.int64)
    bb = tl.load(loc + src_idx[:, None] * MP * XP + ee[None, :], mask=src_ok[:, None], other=0.0)
    aa = tl.exp(tl.load(loc_a + src_idx[:, None] * MP + row[None, :], mask=src_ok[:, None], other=0.0))
    # The last span's own pair continues the walk to the final state; read it before the in-place stores.
    has = count > 0
    last_idx = tl.where(has, last * H + h, 0).to(tl.int64)
    b_last = tl.load(loc + last_idx * MP * XP + ee, mask=(ee >= 0) & has, other=0.0)
    a_last = tl.exp(tl.load(loc_a + last_idx * MP + row, mask=(ee >= 0) & has, other=0.0))
    _, st = tl.associative_scan((aa, bb), 0, _lin_combine)
    out_idx = tl.where(cc < count, span_of * H + h, 0).to(tl.int64)
    tl.store(loc + out_idx[:, None] * MP * XP + ee[None, :], st, mask=(cc < count)[:, None])
    st_last = tl.sum(tl.where((cc == count - 1)[:, None], st, 0.0), axis=0)
    fin = tl.where(has, a_last * st_last + b_last, 0.0)
    tl.store(final + (n * H + h).to(tl.int64) * MP * XP + ee, fin)


def span_scan(loc: Tensor, loc_a: Tensor, seq_table: Tensor, final: Tensor, lay: Layout, hkv: int, mp: int, xp: int,
              reverse: bool = False) -> None:
    """State at every span start (in place over the local states in `loc`) and after the last span (`final`)."""
    if "max_spans" not in lay.derived:  # a loop over the documents on the host: once per layout
        lay.derived["max_spans"] = lay.spans_per_row if not lay.varlen else max(
            (-(-(e - a) // lay.span) for _, a, e in lay.seq_bounds), default=1)
    max_spans = lay.derived["max_spans"]
    ncp = next_pow2(max(2, max_spans))
    if ncp <= 4096:  # the whole walk of E entries in registers: E x NCP <= 32K values
        e = max(8, min(mp * xp, 4096 // ncp))
        warps = min(32, max(4, ncp * e // 256))
        _span_scan_tree_kernel[(lay.n_seqs, hkv, mp * xp // e)](
            loc, loc_a, seq_table, final, lay.spans_per_row, hkv, MP=mp, XP=xp, E=e, NCP=ncp, VARLEN=lay.varlen,
            REVERSE=reverse, num_warps=warps,
        )
        return
    e = min(512, mp * xp)
    _span_scan_kernel[(lay.n_seqs, hkv, mp * xp // e)](
        loc, loc_a, seq_table, final, lay.spans_per_row, hkv, MP=mp, XP=xp, E=e, VARLEN=lay.varlen,
        REVERSE=reverse, num_warps=4, num_stages=3,
    )


@triton.jit
def _nha_fwd_kernel(
    q, qr, k, kr, v, la, tok, sink_pos, span_table, st_k, st_v, o, o_lo, lse, slot_bias,
    T, W, S, L, SPANS_PER_ROW, H, NSPH, scale,
    G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    DP: tl.constexpr, DVP: tl.constexpr, MP: tl.constexpr, MC: tl.constexpr, SP: tl.constexpr, SPLIT: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_SINKS: tl.constexpr, VARLEN: tl.constexpr, STORE_LO: tl.constexpr,
    PREC: tl.constexpr, PREC_SLOT: tl.constexpr, FAST_LIMIT: tl.constexpr, HAS_SLOT_BIAS: tl.constexpr = False,
):
    ROWS: tl.constexpr = GP * BM
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b, n, seq_start, seq_end, span_start, span_end = _seq_of_span(span_table, pid, T, L, SPANS_PER_ROW, VARLEN)
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    tok_b = tok + b64 * T
    tt, hq, g_ok = group_rows(b64 * H + h, G, BM, ROWS)
    if HAS_SLOT_BIAS:
        brow = slot_bias_rows(slot_bias, hq, H * G, g_ok)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    ii = tl.arange(0, MP)
    jb = tl.arange(0, BM)
    d_ok = (dd < D)[None, :]
    dv_ok = (dv < DV)[None, :]
    causal = tt[:, None] >= jb[None, :]

    # The slot state is carried from block to block through a per-program scratch tile (L2-resident: 64 KB per
    # program) rather than in registers, where two fp32 (M x D) tiles would not fit beside the attention tiles.
    # Copy 0 holds the state at the span start (kept for the backward), copy 1 is the running state.
    st_tile_k = ii[:, None] * DP + dd[None, :]
    st_tile_v = ii[:, None] * DVP + dv[None, :]
    st_k0 = st_k + (pid * H + h).to(tl.int64) * MP * DP
    st_v0 = st_v + (pid * H + h).to(tl.int64) * MP * DVP
    run_k = NSPH * MP * DP  # offset of the running copy
    run_v = NSPH * MP * DVP

    for t0 in range(span_start, span_end, BM):
        t = t0 + tt
        row_ok = g_ok & (t < seq_end)
        qoff = (hq * T + t)[:, None] * D + dd[None, :]
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)
        l_i = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, DVP), tl.float32)

        if HAS_SLOTS:
            # Slots are attended chunk by chunk (MC slots at a time), as blocks of the one online softmax: the
            # (MC x D) state tiles stay small enough to live in registers beside the output accumulator.
            cur = tl.where(t0 == span_start, 0, 1).to(tl.int64)
            tb = t0 + jb
            js, jok, writes = _slot_writers(tok_b, tb, tb < seq_end, W, S, seq_start)
            js64, ks, vs = _slot_kv(k, v, bh, T, js, jok, dd, dv, d_ok, dv_ok, D, DV)
            qu = tl.load(q + qoff, mask=row_ok[:, None] & d_ok, other=0.0)
            qk = tl.where(causal, tl.dot(qu, tl.trans(ks), input_precision=PREC), 0.0)  # (ROWS, BM)
            # Empty-slot mask: nothing has entered the slots yet at shifted position t.
            jr = t - W
            code_r = tl.load(tok_b + jr, mask=row_ok & (jr >= seq_start), other=0)
            row_has = (code_r >> 1) > S
            la_bh = la + bh * T * M
            for c0 in range(0, MP, MC):
                ic = c0 + tl.arange(0, MC)
                lab = tl.load(la_bh + js64[:, None] * M + ic[None, :], mask=writes[:, None] & (ic < M)[None, :],
                              other=0.0)
                s = -expm1(lab)
                a = tl.cumsum(lab, axis=0)  # (BM, MC) log decay since the block start, through token t
                aend = tl.sum(lab, axis=0)
                wt = s * tl.exp(aend[None, :] - a)  # weight of each block token in the block-end state (<= 1)
                decay = tl.exp(aend)[:, None]
                st_off_k = (c0 + tl.arange(0, MC))[:, None] * DP + dd[None, :]
                sk = tl.load(st_k0 + cur * run_k + st_off_k)  # (MC, DP) fp32
                q_s = _mm_state(qu, tl.trans(sk), SPLIT)  # (ROWS, MC)
                sk = decay * sk + _mm_state(tl.trans(wt), ks, SPLIT)
                tl.store(st_k0 + run_k + st_off_k, sk)
                ea_rows = tl.exp(rows_of(a, GP, BM, MC))
                fast = tl.min(aend, axis=0) > FAST_LIMIT
                if fast:
                    shat = s * tl.exp(-a)  # (BM, MC), <= exp(80)
                    ls = ea_rows * (q_s + tl.dot(qk, shat, input_precision=PREC_SLOT))
                else:
                    shat = tl.zeros((BM, MC), tl.float32)
                    a_rows = rows_of(a, GP, BM, MC)
                    inner = tl.zeros((ROWS, MC), tl.float32)
                    for j in range(0, BM):
                        e = tl.exp(tl.where((tt >= j)[:, None], a_rows - pick_row(a, jb, j)[None, :], float("-inf")))
                        inner += pick_col(qk, jb, j)[:, None] * e * pick_row(s, jb, j)[None, :]
                    ls = ea_rows * q_s + inner
                if HAS_SLOT_BIAS:
                    ls = ls * scale + brow[:, None]
                else:
                    ls = ls * scale
                ls = tl.where(row_has[:, None] & (ic < M)[None, :], ls, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(ls, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(ls - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
                pt = p * ea_rows
                if fast:
                    p2 = tl.dot(pt, tl.trans(shat), input_precision=PREC_SLOT)
                else:
                    a_rows = rows_of(a, GP, BM, MC)
                    p2 = tl.zeros((ROWS, BM), tl.float32)
                    for j in range(0, BM):
                        e = tl.exp(tl.where((tt >= j)[:, None], a_rows - pick_row(a, jb, j)[None, :], float("-inf")))
                        col = tl.sum(p * e * pick_row(s, jb, j)[None, :], axis=1)
                        p2 = tl.where((jb == j)[None, :], col[:, None], p2)
                p2 = tl.where(causal, p2, 0.0)
                st_off_v = (c0 + tl.arange(0, MC))[:, None] * DVP + dv[None, :]
                sv = tl.load(st_v0 + cur * run_v + st_off_v)
                acc = acc * alpha[:, None] + _mm_state(pt.to(vs.dtype), sv, SPLIT)
                acc += tl.dot(p2.to(vs.dtype), vs, input_precision=PREC)
                sv = decay * sv + _mm_state(tl.trans(wt), vs, SPLIT)
                tl.store(st_v0 + run_v + st_off_v, sv)
            tl.debug_barrier()  # the next block reads the running state that other threads just wrote

        _sinks_band_store(m_i, l_i, acc, qr, qoff, kr, v, o, o_lo, lse, sink_pos, tok_b, n, bh, hq, T, t, t0, W,
                          seq_start, seq_end, scale, row_ok, d_ok, dv_ok, dd, dv,
                          D, DV, BM, BN, SP, HAS_SINKS, STORE_LO, PREC)


@dataclass
class FwdConfig:
    rows: int  # GP * BM: query rows per tile
    bn: int  # band key block
    span: int  # L
    cs: int  # token chunk of the span-state pass
    num_warps: int
    num_stages: int
    mc: int = 64  # slots per chunk of the slot phase (forward)
    mc_bwd: int = 16  # the same in the backward kernels above head dim 64 (chunk_bwd._slot_tile: 64 up to d = 64)
    parallel: bool = False  # chunk-parallel main kernel (fwd_parallel.py): `span` is then the state chunk CK
    maxnreg: int | None = None  # register cap per thread for the parallel main kernel (more programs per SM)
    exact: bool = True  # False drops the exact hard-decay path (timing experiments only: wrong for such gates)
    state_span: int = 0  # parallel only: > 0 builds chunk states from span states of this length (chunk walk)


SMS = 132  # H100 streaming multiprocessors: below this many programs a pass leaves SMs idle


def state_span(chunk: int, programs: Callable[[int], int], longest: int, chosen: int | None = None) -> int:
    """Span length whose start states the parallel forward walks to its chunk states (a multiple of the chunk).

    `chosen` (KernelOptions.fwd_state_span, NHA_FWD_STATE_SPAN) overrides it (0: a scan over all chunks instead of the
    walk). Otherwise the longest span, shortened while the span passes would have fewer programs than SMs (H100,
    T = 32K, B = 1, w = 64: chunk states by a scan over 512 chunks 2.63 ms, walked from spans of 1024 2.01 ms)."""
    if chosen is not None:
        span = chosen
        if span and span % chunk:
            raise ValueError(f"NHA_FWD_STATE_SPAN={span} must be a multiple of the state chunk {chunk}")
        return span
    span = longest
    while span > 2 * chunk and programs(span) < SMS:
        span //= 2
    return span


def default_config(batch: int, hkv: int, t_len: int, gp: int, dtype: torch.dtype = torch.bfloat16,
                   options: KernelOptions = DEFAULT) -> FwdConfig:
    """The tiles for this shape; `options.fwd` picks the main kernel: parallel (fwd_parallel.py) runs one program per
    query block from chunk states walked out of span states; serial walks each span in one program."""
    par = options.fwd == "parallel"
    chosen = options.fwd_state_span

    def programs(span: int) -> int:  # programs of a pass with one program per (span, KV head)
        return batch * hkv * -(-t_len // span)

    if interpreting():
        rows = max(16, 16 * gp)
        chunk = 2 * (rows // gp)
        return FwdConfig(rows=rows, bn=16, span=chunk, cs=16, num_warps=4, num_stages=1, mc=16,
                         parallel=par, state_span=state_span(chunk, programs, 2 * chunk, chosen) if par else 0)
    if dtype != torch.bfloat16:  # fp32 tiles take twice the shared memory; fp16 enters its products as fp32 too
        rows = max(64, 16 * gp)
        span = max(64, rows // gp) if par else 512
        return FwdConfig(rows=rows, bn=32, span=span, cs=32, num_warps=4, num_stages=1, mc=16, parallel=par,
                         state_span=state_span(span, programs, 512, chosen) if par else 0)
    rows = max(128, 16 * gp)
    if par:  # state chunks of 64 positions (at least one query block)
        chunk = max(64, rows // gp)
        return FwdConfig(rows=rows, bn=64, span=chunk, cs=64, num_warps=8, num_stages=1, parallel=True,
                         state_span=state_span(chunk, programs, 1024, chosen))
    # Long spans keep the slot-state traffic low (measured on an H100, T = 32K, B = 1: L = 1024 2.64 ms,
    # L = 512 2.82 ms, L = 256 3.50 ms); shorten them only when there would be fewer programs than SMs.
    span = 1024
    while span > 128 and programs(span) < SMS:
        span //= 2
    return FwdConfig(rows=rows, bn=64, span=span, cs=64, num_warps=8, num_stages=1)


@dataclass
class FwdOut:
    o: Tensor  # (B, Hq, T, Dv) in the input dtype
    o_lo: Tensor | None  # rounding residual of o (training only)
    lse: Tensor  # (B, Hq, T) fp32 log-sum-exp of the joint softmax (-inf where nothing is visible)
    layout: Layout
    span_k: Tensor | None  # (n_spans, H, MP, DP) fp32: slot keys at each span start
    span_v: Tensor | None
    final_k: Tensor | None  # (n_seqs, H, MP, DP) fp32 slot state after the whole sequence
    final_v: Tensor | None
    config: FwdConfig


def nha_fwd(
    q: Tensor, q_rot: Tensor, k: Tensor, k_rot: Tensor, v: Tensor, log_alpha: Tensor, *,
    window: int | None, num_sinks: int, scale: float, valid: Tensor | None, cu_seqlens: Tensor | None,
    config: FwdConfig | None = None, store_lo: bool = False, slot_bias: Tensor | None = None,
    options: KernelOptions = DEFAULT,
) -> FwdOut:
    """`slot_bias` (Hq,): the optional slot-logit bias b_h (nha_convert/ops/common.add_slot_bias)."""
    b, hq, t_len, d = q.shape
    hkv, dv, m = k.shape[1], v.shape[-1], log_alpha.shape[-1]
    g = hq // hkv
    gp = next_pow2(g)
    cfg = config or default_config(b, hkv, t_len, gp, q.dtype, options)
    bm = cfg.rows // gp
    assert bm >= 16 and cfg.span % bm == 0 and cfg.span % min(cfg.cs, cfg.span) == 0, cfg
    dev = q.device
    q, q_rot, k, k_rot, v = (x.contiguous() for x in (q, q_rot, k, k_rot, v))
    la = log_alpha.float().contiguous()
    w_eff = t_len if window is None else min(window, t_len)
    has_slots = m > 0 and window is not None and window < t_len
    has_sinks = num_sinks > 0 and window is not None and window < t_len
    lay = make_layout(valid, cu_seqlens, b, t_len, num_sinks, cfg.span, dev)
    dp, dvp, mp = max(16, next_pow2(d)), max(16, next_pow2(dv)), max(16, next_pow2(m))
    prec, prec_slot = precisions(q.dtype)
    span_table = lay.span_table if lay.varlen else lay.tok
    seq_table = lay.seq_table if lay.varlen else lay.tok
    o = torch.empty(b, hq, t_len, dv, dtype=q.dtype, device=dev)
    store_lo = store_lo and q.dtype != torch.float32
    o_lo = torch.empty_like(o) if store_lo else None
    lse = torch.empty(b, hq, t_len, dtype=torch.float32, device=dev)
    span_k = span_v = final_k = final_v = walk_states = None
    if has_slots and lay.n_spans > 0:
        # [0]: slot state at each span start; [1]: scratch for the running state of the serial forward kernel.
        copies = 1 if cfg.parallel else 2
        walk = cfg.parallel and cfg.state_span > 0
        lay_s = make_layout(valid, cu_seqlens, b, t_len, num_sinks, cfg.state_span, dev) if walk else lay
        st_table = lay_s.span_table if lay_s.varlen else lay_s.tok
        span_k = torch.empty(copies, lay_s.n_spans, hkv, mp, dp, dtype=torch.float32, device=dev)
        span_v = torch.empty(copies, lay_s.n_spans, hkv, mp, dvp, dtype=torch.float32, device=dev)
        span_a = torch.empty(lay_s.n_spans, hkv, mp, dtype=torch.float32, device=dev)
        _span_local_kernel[(lay_s.n_spans, hkv)](
            k, v, la, lay_s.tok, st_table, span_k, span_v, span_a,
            t_len, w_eff, num_sinks, lay_s.span, lay_s.spans_per_row, hkv,
            D=d, DV=dv, M=m, DP=dp, DVP=dvp, MP=mp, CS=min(cfg.cs, cfg.span), VARLEN=lay.varlen, PREC=prec_slot,
            num_warps=cfg.num_warps,
        )
        final_k = torch.empty(lay.n_seqs, hkv, mp, dp, dtype=torch.float32, device=dev)
        final_v = torch.empty(lay.n_seqs, hkv, mp, dvp, dtype=torch.float32, device=dev)
        for loc, fin, xp in ((span_k, final_k, dp), (span_v, final_v, dvp)):
            span_scan(loc, span_a, lay_s.seq_table if lay_s.varlen else lay_s.tok, fin, lay_s, hkv, mp, xp)
        if walk:
            assert cfg.state_span % cfg.span == 0, cfg
            chunk_k = torch.empty(1, lay.n_spans, hkv, mp, dp, dtype=torch.float32, device=dev)
            chunk_v = torch.empty(1, lay.n_spans, hkv, mp, dvp, dtype=torch.float32, device=dev)
            _chunk_walk_kernel[(lay_s.n_spans, hkv)](
                k, v, la, lay.tok, st_table, seq_table, span_k, span_v, chunk_k, chunk_v,
                t_len, w_eff, num_sinks, lay_s.span, lay_s.spans_per_row, lay.spans_per_row, hkv,
                D=d, DV=dv, M=m, DP=dp, DVP=dvp, MP=mp, CK=cfg.span, VARLEN=lay.varlen, PREC=prec_slot,
                num_warps=cfg.num_warps,
            )
            walk_states = span_k, span_v, lay_s
            span_k, span_v = chunk_k, chunk_v
    dummy = lse
    has_bias = slot_bias is not None and has_slots
    bias = slot_bias.detach().float().contiguous() if has_bias else dummy
    if lay.n_spans > 0 and cfg.parallel:
        nsub = cfg.span // bm
        LAST_COMPILED["fwd"] = _nha_fwd_par_kernel[(lay.n_spans * nsub, hkv)](
            q, q_rot, k, k_rot, v, la, lay.tok, lay.sink_pos, span_table,
            span_k if span_k is not None else dummy, span_v if span_v is not None else dummy, o,
            o_lo if store_lo else o, lse, bias,
            t_len, w_eff, num_sinks, cfg.span, lay.spans_per_row, hkv, scale,
            G=g, GP=gp, BM=bm, BN=cfg.bn, CK=cfg.span, NSUB=nsub, D=d, DV=dv, M=m, DP=dp, DVP=dvp, MP=mp,
            SP=lay.sink_pad, SPLIT=split_products(q.dtype),
            HAS_SLOTS=has_slots, HAS_SINKS=has_sinks, VARLEN=lay.varlen, STORE_LO=store_lo,
            PREC=prec, PREC_SLOT=prec_slot, FAST_LIMIT=FAST_LIMIT, EXACT=cfg.exact, HAS_SLOT_BIAS=has_bias,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        )
    elif lay.n_spans > 0:
        LAST_COMPILED["fwd"] = _nha_fwd_kernel[(lay.n_spans, hkv)](
            q, q_rot, k, k_rot, v, la, lay.tok, lay.sink_pos, span_table,
            span_k if span_k is not None else dummy, span_v if span_v is not None else dummy, o,
            o_lo if store_lo else o, lse, bias,
            t_len, w_eff, num_sinks, cfg.span, lay.spans_per_row, hkv, lay.n_spans * hkv, scale,
            G=g, GP=gp, BM=bm, BN=cfg.bn, D=d, DV=dv, M=m, DP=dp, DVP=dvp, MP=mp, MC=min(cfg.mc, mp), SP=lay.sink_pad,
            SPLIT=split_products(q.dtype),
            HAS_SLOTS=has_slots, HAS_SINKS=has_sinks, VARLEN=lay.varlen, STORE_LO=store_lo,
            PREC=prec, PREC_SLOT=prec_slot, FAST_LIMIT=FAST_LIMIT, HAS_SLOT_BIAS=has_bias,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if walk_states is not None:
        # The backward walks spans in one program each, like the serial forward: hand it the span states (32 spans
        # at T = 32K instead of 512 chunks, so its reverse scan is short too).
        span_k, span_v, lay = walk_states
        cfg = replace(cfg, span=cfg.state_span, parallel=False, state_span=0)
    if span_k is not None:
        span_k, span_v = span_k[0], span_v[0]
    return FwdOut(o=o, o_lo=o_lo, lse=lse, layout=lay, span_k=span_k, span_v=span_v, final_k=final_k, final_v=final_v,
                  config=cfg)
