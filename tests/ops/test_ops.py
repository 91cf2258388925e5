"""The three torch forms of the NHA op compute one function, and its exact limits hold (NHA.md)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nha_convert.ops import nha_chunk, nha_naive, nha_recurrent

T = 37  # not a multiple of any chunk size used below


def make_inputs(b=2, hq=4, h=2, t=T, d=8, m=5, pad=False, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = [r(b, hq, t, d), r(b, hq, t, d), r(b, h, t, d), r(b, h, t, d), r(b, h, t, d)]
    la = F.logsigmoid(2 * r(b, h, t, m)) / 2
    xs = [x.requires_grad_(requires_grad) for x in xs + [la]]
    valid = torch.ones(b, t, dtype=torch.bool)
    if pad:  # left padding of different lengths, plus one hole in the middle
        valid[0, :5] = False
        valid[1, :2] = False
        valid[1, 20] = False
    return xs, valid


CASES = [
    (w, m, s, pad, hq)
    for w, m, s, pad, hq in itertools.product([0, 1, 3, 16, None, T + 5], [0, 1, 16], [0, 4], [False, True], [4, 2])
    if not (w == 0 and m == 0)
]


@pytest.mark.parametrize("window,m,sinks,pad,hq", CASES)
def test_chunk_and_recurrent_equal_naive(window, m, sinks, pad, hq):
    xs, valid = make_inputs(m=m, pad=pad, hq=hq)
    kw = dict(window=window, num_sinks=sinks, scale=0.35, valid=valid)
    ref = nha_naive(*xs, **kw)
    par, _ = nha_chunk(*xs, **kw, chunk_size=8)
    rec, _ = nha_recurrent(*xs, **kw)
    keep = valid[:, None, :, None]  # outputs at padded query positions are unspecified
    assert ((par - ref) * keep).abs().max() <= 1e-5
    assert ((rec - ref) * keep).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_size_never_changes_results(chunk_size):
    xs, valid = make_inputs(m=16, pad=True)
    kw = dict(window=6, num_sinks=2, scale=0.35, valid=valid)
    ref, state_ref = nha_chunk(*xs, **kw, chunk_size=8, return_state=True)
    out, state = nha_chunk(*xs, **kw, chunk_size=chunk_size, return_state=True)
    assert (out - ref).abs().max() <= 1e-5
    assert (state.k - state_ref.k).abs().max() <= 1e-5 and torch.equal(state.count, state_ref.count)


def _softmax_attention(q_rot, k_rot, v, mask, scale):
    g = q_rot.shape[1] // k_rot.shape[1]
    k, v = k_rot.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q_rot, k, v, attn_mask=mask[:, None], scale=scale)


@pytest.mark.parametrize("window", [1, 4, 16])
def test_zero_slots_is_sliding_window_attention(window):
    xs, valid = make_inputs(m=0)
    q, q_rot, k, k_rot, v, la = xs
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    ref = _softmax_attention(q_rot, k_rot, v, band.expand(2, T, T), 0.35)
    out, _ = nha_chunk(*xs, window=window, num_sinks=0, scale=0.35)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [None, T, 100])
def test_window_covering_sequence_is_causal_attention(window):
    xs, valid = make_inputs(m=16, pad=True)
    q, q_rot, k, k_rot, v, la = xs
    i = torch.arange(T)
    causal = (i[None, :] <= i[:, None])[None] & valid[:, None, :]
    ref = _softmax_attention(q_rot, k_rot, v, causal, 0.35)
    out, _ = nha_chunk(*xs, window=window, num_sinks=4, scale=0.35, valid=valid)
    keep = valid[:, None, :, None]
    assert ((out - ref) * keep).abs().max() <= 1e-5


def test_window_zero_is_a_pure_slot_rnn():
    """w = 0: the output is a softmax over the slots alone; with one slot and decay 0 it copies v_t."""
    xs, _ = make_inputs(m=1)
    xs[5] = torch.full_like(xs[5], -1e4)  # alpha ~ 0, s ~ 1: the slot holds exactly the newest token
    out, _ = nha_chunk(*xs, window=0, num_sinks=0, scale=0.35)
    g = xs[0].shape[1] // xs[2].shape[1]
    assert (out - xs[4].repeat_interleave(g, 1)).abs().max() <= 1e-5


def test_gradients_of_chunk_equal_naive():
    xs, valid = make_inputs(m=16, pad=True, requires_grad=True)
    kw = dict(window=5, num_sinks=2, scale=0.35, valid=valid)
    w = torch.randn(2, 4, T, 8) * valid[:, None, :, None]
    g_ref = torch.autograd.grad((nha_naive(*xs, **kw) * w).sum(), xs)
    g_par = torch.autograd.grad((nha_chunk(*xs, **kw, chunk_size=8)[0] * w).sum(), xs)
    for a, b in zip(g_ref, g_par):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


def test_empty_slots_are_masked_not_zero():
    """Before any token leaves the window the slots get no softmax mass (the empty-slot mask)."""
    xs, _ = make_inputs(m=16)
    out_nha, _ = nha_chunk(*xs, window=10, num_sinks=0, scale=0.35)
    out_swa, _ = nha_chunk(*xs[:5], xs[5][..., :0], window=10, num_sinks=0, scale=0.35)
    assert (out_nha[:, :, :10] - out_swa[:, :, :10]).abs().max() <= 1e-6
    assert (out_nha[:, :, 10:] - out_swa[:, :, 10:]).abs().max() > 1e-3  # the slots matter once filled


def make_bias(hq: int, seed: int = 1) -> torch.Tensor:
    """A slot-logit bias b_h per query head, mixed signs and sizes (NHA.md, "Slot-logit bias")."""
    return torch.randn(hq, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("window,m,sinks,pad,hq", CASES)
def test_slot_bias_chunk_and_recurrent_equal_naive(window, m, sinks, pad, hq):
    xs, valid = make_inputs(m=m, pad=pad, hq=hq)
    kw = dict(window=window, num_sinks=sinks, scale=0.35, valid=valid, slot_bias=make_bias(hq))
    ref = nha_naive(*xs, **kw)
    par, _ = nha_chunk(*xs, **kw, chunk_size=8)
    rec, _ = nha_recurrent(*xs, **kw)
    keep = valid[:, None, :, None]
    assert ((par - ref) * keep).abs().max() <= 1e-5
    assert ((rec - ref) * keep).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [4, 16])
def test_slot_bias_changes_only_rows_with_filled_slots(window):
    """The empty-slot mask wins over the bias: before a token leaves the window the bias changes nothing."""
    xs, _ = make_inputs(m=16)
    out, _ = nha_chunk(*xs, window=window, num_sinks=0, scale=0.35)
    biased, _ = nha_chunk(*xs, window=window, num_sinks=0, scale=0.35, slot_bias=make_bias(4))
    assert torch.equal(out[:, :, :window], biased[:, :, :window])  # token 0 leaves at step w
    assert (out[:, :, window:] - biased[:, :, window:]).abs().max() > 1e-3


def test_zero_slot_bias_is_no_bias_exactly():
    xs, valid = make_inputs(m=16, pad=True)
    kw = dict(window=5, num_sinks=2, scale=0.35, valid=valid)
    zero = dict(kw, slot_bias=torch.zeros(4))
    assert torch.equal(nha_naive(*xs, **kw), nha_naive(*xs, **zero))
    assert torch.equal(nha_chunk(*xs, **kw, chunk_size=8)[0], nha_chunk(*xs, **zero, chunk_size=8)[0])
    assert torch.equal(nha_recurrent(*xs, **kw)[0], nha_recurrent(*xs, **zero)[0])


@pytest.mark.parametrize("sinks,pad", [(0, False), (4, True)])
def test_very_negative_slot_bias_is_sliding_window_attention(sinks, pad):
    """b = -1e4: the slots take no softmax mass, so the layer is sliding-window attention (m = 0) with its sinks."""
    xs, valid = make_inputs(m=16, pad=pad)
    kw = dict(window=6, num_sinks=sinks, scale=0.35, valid=valid)
    swa, _ = nha_chunk(*xs[:5], xs[5][..., :0], **kw)
    keep = valid[:, None, :, None]
    bias = torch.full((4,), -1e4)
    for out in (nha_naive(*xs, **kw, slot_bias=bias), nha_chunk(*xs, **kw, slot_bias=bias)[0],
                nha_recurrent(*xs, **kw, slot_bias=bias)[0]):
        assert ((out - swa) * keep).abs().max() <= 1e-6


def test_slot_bias_gradients_of_chunk_equal_naive():
    xs, valid = make_inputs(m=16, pad=True, requires_grad=True)
    bias = make_bias(4).requires_grad_(True)
    kw = dict(window=5, num_sinks=2, scale=0.35, valid=valid, slot_bias=bias)
    w = torch.randn(2, 4, T, 8) * valid[:, None, :, None]
    g_ref = torch.autograd.grad((nha_naive(*xs, **kw) * w).sum(), [*xs, bias])
    g_par = torch.autograd.grad((nha_chunk(*xs, **kw, chunk_size=8)[0] * w).sum(), [*xs, bias])
    assert g_ref[-1].abs().min() > 1e-3  # every head's bias gets a gradient
    for a, b in zip(g_ref, g_par):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
