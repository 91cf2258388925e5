"""The gate gradient of the NHA backward (its last step) as two Triton passes instead of ~25 torch ops.

What it computes, per KV head and slot (the torch form is `gate_grad_torch`, the reference this is tested against):
token j enters the slots at the shifted position t = j + w, with la_s[t] = log alpha_j where j writes (a real token
past the sinks), else 0. With xg[t] = rowdot(dK~_t, K~_t) + rowdot(dV~_t, V~_t) and dss[t] = the gradient of the
write weight s_t (its K and V parts; chunk_bwd.py's docstring has the recurrence),

    y[t]      = xg[t] - (1 - exp(la_s[t])) * dss[t]
    dla_s[t]  = sum_{t <= t' < seq_end(t)} y[t']  -  exp(la_s[t]) * dss[t]
    dla[j]    = dla_s[j + w] * writes_j   (0 where j + w is past the end of j's sequence)

The reverse sum restarts at every packed sequence. Positions are cut into chunks of CT: pass 1 sums each chunk's
first segment; a few torch ops on those (n_chunks x m) sums give each chunk the carry from later chunks of its last
sequence; pass 2 takes the in-chunk reverse sums as one masked (CT x CT) @ (CT x m) product in fp32 and writes dla.
On an H200 at 64K packed tokens the torch form is about 2.3 ms a layer (session 7 profile), most of it traffic of
(T x m) fp32 intermediates that these passes keep in registers; the two passes take 0.24 ms (session 8), and are the
default (NHA_GATE_GRAD=torch runs the reference instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prep import Layout
from .triton_utils import expm1


@triton.jit
def _y_tile(xg, dss, la, tok, seq_start_at, bh, b, T, BHTM, t, mm, w, num_sinks,
            M: tl.constexpr):
    """y, exp(la_s) and dss at positions t (CT,) for slots mm (MP,) of flat KV head bh, and whether each t's token
    j = t - w writes (zeros where t is past T)."""
    ok_t = t < T
    j = t - w
    src = ok_t & (j >= tl.load(seq_start_at + t, mask=ok_t, other=0))
    tk = tl.load(tok + b * T + j, mask=src, other=0)
    writes = src & ((tk & 1) == 1) & ((tk >> 1) > num_sinks)
    ok_m = mm < M
    base = bh.to(tl.int64) * T  # int64 before the products: B * H * T * M can pass 2^31
    row = (base + t)[:, None] * M + mm[None, :]
    okt = ok_t[:, None] & ok_m[None, :]
    la_s = tl.load(la + (base + j)[:, None] * M + mm[None, :], mask=writes[:, None] & ok_m[None, :], other=0.0)
    d = tl.load(dss + row, mask=okt, other=0.0) + tl.load(dss + BHTM + row, mask=okt, other=0.0)
    y = tl.load(xg + row, mask=okt, other=0.0) + expm1(la_s) * d  # the write weight is s = -expm1(la_s)
    return y, tl.exp(la_s), d, writes


@triton.jit
def _gate_grad_kernel(xg, dss, la, tok, seq_start_at, seq_end_at, head, carry, dla, T, H, NC, BHTM, w, num_sinks,
                      CT: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, HEAD_PASS: tl.constexpr):
    """Chunk c of flat KV head bh. HEAD_PASS: head[bh, c] = the sum of y over the chunk's first segment,
    [c0, min(c1, seq_end(c0))). Otherwise dla at the tokens j = t - w of the chunk's positions t: the in-chunk reverse
    sums (a masked product) plus the carry from later chunks."""
    c, bh = tl.program_id(0), tl.program_id(1)
    t = c * CT + tl.arange(0, CT)
    mm = tl.arange(0, MP)
    y, ea, d, writes = _y_tile(xg, dss, la, tok, seq_start_at, bh, bh // H, T, BHTM, t, mm, w, num_sinks, M)
    if HEAD_PASS:
        end0 = tl.load(seq_end_at + c * CT)
        tl.store(head + (bh * NC + c) * MP + mm, tl.sum(tl.where((t < end0)[:, None], y, 0.0), axis=0))
    else:
        end = tl.load(seq_end_at + t, mask=t < T, other=0)
        c1 = c * CT + CT
        # U[t, t'] = 1 where t <= t' < seq_end(t) inside the chunk: the reverse sum restarted at sequence ends.
        u = ((t[None, :] >= t[:, None]) & (t[None, :] < end[:, None])).to(tl.float32)
        r = tl.dot(u, y, input_precision="ieee")
        cin = tl.load(carry + (bh * NC + c) * MP + mm)
        r = tl.where((end > c1)[:, None], r + cin[None, :], r)
        out = (r - ea * d) * writes[:, None].to(tl.float32)
        # Only where j = t - w is in t's sequence (writes implies it): the rest of dla stays zero.
        ok = writes[:, None] & (mm < M)[None, :]
        tl.store(dla + (bh.to(tl.int64) * T + t - w)[:, None] * M + mm[None, :], out, mask=ok)


def gate_grad_triton(xg: Tensor, dss: Tensor, la: Tensor, lay: Layout, w: int, num_sinks: int,
                     chunk: int = 64) -> Tensor:
    """dL/d log alpha (B, H, T, M) fp32 from xg (B, H, T, M), dss (2, B, H, T, M) (the K and V parts) and la
    (B, H, T, M), all fp32 and contiguous; `lay` gives the tokens' kinds and sequence bounds."""
    b, h, t_len, m = xg.shape
    mp = max(16, triton.next_power_of_2(m))
    nc = triton.cdiv(t_len, chunk)
    dev = xg.device
    xg, dss, la = xg.contiguous(), dss.contiguous(), la.contiguous()
    bhtm = b * h * t_len * m
    grid = (nc, b * h)
    head = torch.empty(b * h, nc, mp, dtype=torch.float32, device=dev)
    args = (xg, dss, la, lay.tok, lay.seq_start_at, lay.seq_end_at)
    _gate_grad_kernel[grid](*args, head, head, head, t_len, h, nc, bhtm, w, num_sinks, CT=chunk, M=m, MP=mp,
                            HEAD_PASS=True, num_warps=4)
    # carry[c] = sum of y over [c1, seq_end(c1 - 1)): the first segments of the chunks c+1 .. k, where chunk k holds
    # that sequence's last position (a difference of prefix sums over chunks; nothing when the sequence ends at c1).
    # k and that mask depend on the layout only: built once per layout, not in every layer's backward.
    key = ("gate_grad", chunk)
    if key not in lay.derived:
        c1 = torch.clamp(torch.arange(1, nc + 1, device=dev) * chunk, max=t_len)
        ends = lay.seq_end_at[c1 - 1]
        lay.derived[key] = (torch.div(ends - 1, chunk, rounding_mode="floor"), (ends > c1).float()[None, :, None])
    k, later = lay.derived[key]
    pre = head.cumsum(1)
    carry = (pre[:, k] - pre).mul_(later)
    dla = torch.zeros(b, h, t_len, m, dtype=torch.float32, device=dev)
    _gate_grad_kernel[grid](*args, head, carry, dla, t_len, h, nc, bhtm, w, num_sinks, CT=chunk, M=m,
                            MP=mp, HEAD_PASS=False, num_warps=4)
    return dla
