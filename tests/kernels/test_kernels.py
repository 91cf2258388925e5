"""The Triton NHA kernels equal the torch reference (nha_chunk / NHAState.step), run on CPU under TRITON_INTERPRET=1.

Sizes are tiny (d = 16, T <= 80) so the whole file runs in a few minutes on 2 cores; tile sizes are scaled down
under the interpreter (16-row tiles, 16-key blocks, spans of 2 blocks) so every code path is still crossed: several
blocks and spans per sequence, the band crossing block edges, the exact fallback for hard-decaying gates.

What the interpreter cannot cover, and tests/gpu/test_kernels_gpu.py does on an H100: the compiled kernels
(register layouts, software pipelining, the barrier of the in-place decode), real tile sizes (64-128 query rows,
64-key blocks, spans of 128-1024 tokens), bf16 tensor-core products, head dim 128 with m = 64, long sequences
(T = 4K) and the SDPA route for full-attention layers.

Needs triton (CPU wheel; `pip install triton`); skipped without it, and skipped where CUDA is present (the GPU
suite covers that machine, and the interpreter must be switched on before the kernels are imported).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/gpu covers the compiled kernels", allow_module_level=True)
pytest.importorskip("triton")


def _fresh_interpreted_triton() -> str | None:
    """Switch Triton to its interpreter. The switch is read when triton.language is first imported, and other
    libraries (transformers, torch) may already have imported it: then drop those modules so that the kernels,
    imported right after, see a fresh, interpreted Triton. Nothing else here uses Triton."""
    import sys

    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    if "nha_kernels" in sys.modules:
        pytest.skip("nha_kernels was imported before the interpreter was switched on", allow_module_level=True)
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        if not name.startswith("triton._C"):
            del sys.modules[name]
    return _previous


def _bool_masks_for_the_interpreter() -> None:
    """triton 3.9's interpreter (CPU only) turns `block_mask & scalar_condition` into an int32 array and then its C++
    load/store refuse it ("mask has unsupported dtype"); 3.6-3.8 kept it bool. Compiled kernels are unaffected
    (the GPU suite), so cast such masks back to bool here instead of rewriting every mask in the kernels."""
    import numpy as np
    from triton.runtime import interpreter

    native = interpreter._interpreter
    if getattr(native, "_nha_bool_masks", False):
        return

    class BoolMasks:
        _nha_bool_masks = True

        def __getattr__(self, name):
            return getattr(native, name)

        @staticmethod
        def load(ptrs, mask, other, dtype):
            return native.load(ptrs, mask.astype(np.bool_, copy=False), other, dtype)

        @staticmethod
        def store(ptrs, value, mask):
            return native.store(ptrs, value, mask.astype(np.bool_, copy=False))

    interpreter._interpreter = BoolMasks()


_PREVIOUS = _fresh_interpreted_triton()
_bool_masks_for_the_interpreter()

from nha_convert.ops import nha_chunk, nha_recurrent  # noqa: E402
from nha_convert.ops.recurrent import NHAState  # noqa: E402
from nha_convert.backend import triton_chunk as nha_chunk_triton  # noqa: E402
from tests.helpers.env import set_nha_env  # noqa: E402
from nha_kernels.decode import nha_decode_step  # noqa: E402


def _restore_env() -> None:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on():
    """Triton also reads the switch lazily at launch: keep it on while this module's tests run, then restore it
    so that the rest of the suite sees the environment it started with."""
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_env()


_restore_env()

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # fp16: 3-pass tf32 slot products


def make(b, hq, h, t, d, m, *, pad, dtype, seed, gate_scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = [r(b, hq, t, d), r(b, hq, t, d), r(b, h, t, d), r(b, h, t, d), r(b, h, t, d)]
    xs = [x.to(dtype).requires_grad_(requires_grad) for x in xs]
    la = (F.logsigmoid(2 * r(b, h, t, m)) / 2 * gate_scale).requires_grad_(requires_grad)
    valid = torch.ones(b, t, dtype=torch.bool)
    if pad:  # left padding of different lengths, plus a hole in the middle
        valid[0, : min(5, t - 1)] = False
        valid[-1, t // 2] = False
    return xs + [la], valid


def rel(a, b, keep):
    a, b = a.double() * keep, b.double() * keep
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# (window, m, sinks, pad, hq, h, T, dtype): windows {0, 1, 63, 64, 65, >= T, None}, m {16, 64}, GQA 1/3/8.
FWD_CASES = [
    (0, 16, 0, False, 4, 2, 37, torch.float32),
    (1, 16, 2, True, 4, 2, 37, torch.float32),
    (63, 16, 0, False, 2, 2, 80, torch.float32),
    (64, 64, 4, True, 3, 1, 80, torch.float32),
    (65, 16, 1, False, 8, 1, 80, torch.float32),
    (5, 64, 2, True, 6, 2, 45, torch.float32),
    (50, 16, 3, True, 4, 2, 45, torch.float32),  # w >= T
    (None, 16, 2, True, 4, 2, 45, torch.float32),
    (7, 0, 2, True, 4, 2, 37, torch.float32),  # m = 0: sliding window with sinks
    (3, 16, 2, True, 4, 2, 37, torch.bfloat16),
    (64, 64, 0, False, 8, 1, 80, torch.bfloat16),
    (0, 64, 0, True, 3, 1, 37, torch.bfloat16),
    (5, 16, 2, True, 4, 2, 37, torch.float16),  # fp16 models: no bf16 parts (chunk_fwd.split_products)
]


@pytest.mark.parametrize("window,m,sinks,pad,hq,h,t,dtype", FWD_CASES)
def test_forward_and_state_match_reference(window, m, sinks, pad, hq, h, t, dtype):
    xs, valid = make(2, hq, h, t, 16, m, pad=pad, dtype=dtype, seed=t + hq)
    kw = dict(window=window, num_sinks=sinks, scale=0.3, valid=valid, return_state=True)
    ref, st_ref = nha_chunk(*xs, **kw)
    out, st = nha_chunk_triton(*xs, **kw)
    keep = valid[:, None, :, None]  # outputs at padded query positions are unspecified
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel(out, ref, keep) <= TOL[dtype]
    assert torch.equal(st.count, st_ref.count)
    if m:
        assert (st.k - st_ref.k).abs().max() <= 1e-4 * st_ref.k.abs().max().clamp_min(1)
        assert (st.v - st_ref.v).abs().max() <= 1e-4 * st_ref.v.abs().max().clamp_min(1)


def test_hard_decaying_gates_take_the_exact_path():
    # Total log decay of a block far below -80: the factored path would overflow, the exact path must not.
    xs, valid = make(1, 4, 2, 40, 16, 16, pad=False, dtype=torch.float32, seed=3, gate_scale=300.0)
    kw = dict(window=3, num_sinks=1, scale=0.3, valid=valid)
    ref, _ = nha_chunk(*xs, **kw)
    out, _ = nha_chunk_triton(*xs, **kw)
    assert torch.isfinite(out).all() and rel(out, ref, 1.0) <= 1e-4


@pytest.mark.parametrize("window,sinks", [(4, 2), (0, 0), (25, 3)])
def test_packed_sequences_never_leak(window, sinks):
    cu = torch.tensor([0, 9, 30, 31, 50], dtype=torch.int32)
    xs, valid = make(1, 4, 2, 50, 16, 16, pad=False, dtype=torch.float32, seed=window)
    valid[0, 9:11] = False  # padding at the start of the second document
    out, st = nha_chunk_triton(*xs, window=window, num_sinks=sinks, scale=0.3, valid=valid, cu_seqlens=cu,
                               return_state=True)
    bounds = cu.tolist()
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = [x[:, :, a:b] for x in xs]
        ref, st_ref = nha_chunk(*part, window=window, num_sinks=sinks, scale=0.3, valid=valid[:, a:b],
                                return_state=True)
        keep = valid[:, None, a:b, None]
        if keep.any():
            assert rel(out[:, :, a:b], ref, keep) <= 1e-4
        assert (st.k[n] - st_ref.k[0]).abs().max() <= 1e-4 and st.count[n] == st_ref.count[0]


GRAD_CASES = [
    # window, m, sinks, pad, hq, h, T, d, dtype, gate_scale
    (5, 16, 2, True, 6, 2, 30, 16, torch.float32, 1.0),  # GQA 3
    (0, 16, 0, False, 4, 2, 30, 16, torch.float32, 1.0),  # pure slot RNN
    (64, 64, 1, True, 8, 1, 70, 16, torch.float32, 1.0),  # GQA 8, band over several blocks
    (None, 16, 2, True, 4, 2, 30, 16, torch.float32, 1.0),  # full attention: no slot gradients
    (4, 16, 2, True, 4, 2, 40, 32, torch.bfloat16, 1.0),
    (3, 16, 0, False, 4, 2, 40, 16, torch.float32, 300.0),  # hard gates: the exact paths
    (4, 16, 2, True, 4, 2, 40, 32, torch.float16, 1.0),
]


@pytest.mark.parametrize("window,m,sinks,pad,hq,h,t,d,dtype,gate_scale", GRAD_CASES)
def test_gradients_match_reference(window, m, sinks, pad, hq, h, t, d, dtype, gate_scale):
    xs, valid = make(2, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t + d, gate_scale=gate_scale, requires_grad=True)
    kw = dict(window=window, num_sinks=sinks, scale=0.3, valid=valid)
    do = (torch.randn(2, hq, t, d, generator=torch.Generator().manual_seed(9)) * valid[:, None, :, None]).to(dtype)
    ref_in = [x.detach().float().requires_grad_(True) for x in xs]
    g_ref = torch.autograd.grad(nha_chunk(*ref_in, **kw)[0], ref_in, do.float(), allow_unused=True)
    g = torch.autograd.grad(nha_chunk_triton(*xs, **kw)[0], xs, do, allow_unused=True)
    for name, a, b in zip(["q", "q_rot", "k", "k_rot", "v", "log_alpha"], g, g_ref):
        assert a is not None and a.dtype == (torch.float32 if name == "log_alpha" else dtype), name
        if b is None:  # unused by the reference (full attention): exactly zero here
            assert a.abs().max() == 0, name
            continue
        # Gates decaying by e^-150 per token make dlog_alpha a sum of nearly cancelling fp32 terms (both sides).
        tol = 1e-3 if gate_scale > 1 and name == "log_alpha" else TOL[dtype]
        assert rel(a, b, 1.0) <= tol, name


def test_packed_sequence_gradients():
    cu = torch.tensor([0, 9, 30, 31, 50], dtype=torch.int32)
    xs, valid = make(1, 4, 2, 50, 16, 16, pad=False, dtype=torch.float32, seed=2, requires_grad=True)
    valid[0, 9:11] = False
    do = torch.randn(1, 4, 50, 16, generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad(nha_chunk_triton(*xs, window=4, num_sinks=2, scale=0.3, valid=valid, cu_seqlens=cu)[0],
                            xs, do)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        part = [x.detach()[:, :, a:b].requires_grad_(True) for x in xs]
        ref = nha_chunk(*part, window=4, num_sinks=2, scale=0.3, valid=valid[:, a:b])[0]
        g_ref = torch.autograd.grad(ref, part, do[:, :, a:b], allow_unused=True)
        for gg, gr in zip(g, g_ref):
            if gr is None:  # a one-token document never reaches its slots
                assert gg[:, :, a:b].abs().max() == 0
            elif gr.abs().max() == 0:  # attending to itself alone: dq_rot = dk_rot = 0 up to rounding
                assert gg[:, :, a:b].abs().max() <= 1e-5
            else:
                assert rel(gg[:, :, a:b], gr, 1.0) <= 1e-4


def _clone(st: NHAState) -> NHAState:
    return NHAState(**{f: getattr(st, f).clone() if torch.is_tensor(getattr(st, f)) else getattr(st, f)
                       for f in st.__dataclass_fields__})


def _decode_both(st: NHAState, xs, valid, positions) -> NHAState:
    """Step a copy of `st` with the decode kernel and `st` itself with the torch step over `positions`; every
    output must agree. Returns the kernel's state (`st` holds the reference's)."""
    st_k = _clone(st)
    for i in positions:
        args = [x[:, :, i] for x in xs] + [valid[:, i]]
        ref = st.step(*args, scale=0.3)
        out = nha_decode_step(st_k, *args, scale=0.3)
        assert (out - ref).abs().max() <= 1e-5
    return st_k


@pytest.mark.parametrize("window,sinks,hq,h", [(4, 2, 4, 2), (0, 1, 3, 1), (20, 0, 8, 1), (1, 3, 4, 4)])
def test_decode_step_equals_reference_step(window, sinks, hq, h):
    b, pre, steps, d, m = 3, 9, 5, 16, 16
    xs, valid = make(b, hq, h, pre + steps, d, m, pad=True, dtype=torch.float32, seed=window)
    valid[1, pre + 1] = False  # a padding token during decode
    _, st = nha_recurrent(*[x[:, :, :pre] for x in xs], window=window, num_sinks=sinks, scale=0.3,
                          valid=valid[:, :pre])
    st_k = _decode_both(st, xs, valid, range(pre, pre + steps))
    for f in st.__dataclass_fields__:
        a, b_ = getattr(st, f), getattr(st_k, f)
        if torch.is_tensor(a):
            assert a.dtype == b_.dtype and torch.allclose(a.float(), b_.float(), atol=1e-5), f
        else:
            assert a == b_, f


@pytest.mark.parametrize("window,sinks,dtype", [(4, 2, torch.bfloat16), (0, 1, torch.bfloat16), (4, 2, torch.float16)])
def test_half_precision_decode_step_follows_the_reference_step(window, sinks, dtype):
    """bf16 inputs take the kernel's split products (fp32 slot states and probabilities as bf16 hi + lo parts on
    the tensor cores), fp16 inputs 3-pass tf32 ones: the outputs follow the reference step to the dtype's rounding,
    the fp32 slot states to ~1e-5."""
    b, hq, h, pre, steps, d, m = 3, 4, 2, 9, 4, 16, 16
    xs, valid = make(b, hq, h, pre + steps, d, m, pad=True, dtype=dtype, seed=11)
    _, st = nha_recurrent(*[x[:, :, :pre] for x in xs], window=window, num_sinks=sinks, scale=0.3,
                          valid=valid[:, :pre])
    st_k = _clone(st)
    for i in range(pre, pre + steps):
        args = [x[:, :, i] for x in xs] + [valid[:, i]]
        ref = st.step(*args, scale=0.3)
        out = nha_decode_step(st_k, *args, scale=0.3)
        assert out.dtype == dtype and rel(out, ref, 1.0) <= TOL[dtype]
    assert torch.allclose(st_k.slot_k, st.slot_k, atol=1e-5) and torch.allclose(st_k.slot_v, st.slot_v, atol=1e-5)


def test_prefill_state_continues_exactly():
    # Prefill with the kernel (return_state), then decode: equals running the reference recurrence throughout.
    b, hq, h, t, pre, d, m = 2, 4, 2, 30, 22, 16, 16
    xs, valid = make(b, hq, h, t, d, m, pad=True, dtype=torch.float32, seed=5)
    kw = dict(window=6, num_sinks=2, scale=0.3)
    full, _ = nha_recurrent(*xs, valid=valid, **kw)
    head = [x[:, :, :pre] for x in xs]
    _, slots = nha_chunk_triton(*head, valid=valid[:, :pre], return_state=True, **kw)
    st = NHAState.from_prefill(head[2], head[3], head[4], head[5], valid[:, :pre], slots, window=6, num_sinks=2)
    for i in range(pre, t):
        out = nha_decode_step(st, *[x[:, :, i] for x in xs], valid[:, i], scale=0.3)
        keep = valid[:, i][:, None, None]
        assert ((out - full[:, :, i]) * keep).abs().max() <= 1e-5


def test_autograd_frees_activations_without_the_cycle_collector():
    """The autograd Function keeps no reference cycle: once the loss is backpropagated and dropped, the output
    and everything saved for backward are freed by reference counting alone (a cycle through ctx made a GPU
    training run grow until it ran out of memory)."""
    import gc
    import weakref

    xs, valid = make(1, 4, 2, 40, 16, 16, pad=False, dtype=torch.float32, seed=5, requires_grad=True)
    gc.disable()
    try:
        o = nha_chunk_triton(*xs, window=4, num_sinks=1, scale=0.3, valid=valid)[0]
        ref = weakref.ref(o)
        o.sum().backward()
        del o
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("reserve,hq,h", [(0, 4, 2), (700, 8, 1), (90, 3, 3)])
def test_full_layer_decode_kernel_equals_reference_step(reserve, hq, h):
    """Full layers: torch writes the fixed-capacity buffer, the split flash-decoding kernel attends over all of it
    (several splits when reserved, strided prefill views when not)."""
    b, pre, steps, d, m = 3, 21, 4, 16, 4
    xs, valid = make(b, hq, h, pre + steps, d, m, pad=True, dtype=torch.float32, seed=hq)
    _, st = nha_recurrent(*[x[:, :, :pre] for x in xs], window=None, num_sinks=2, scale=0.3, valid=valid[:, :pre])
    st.reserve(reserve)
    _decode_both(st, xs, valid, range(pre, pre + steps))


# The default forward is the chunk-parallel one with chunk states walked from span states (here: spans of two
# chunks, chunks of two query blocks, so blocks read their chunk's earlier tokens as well as its start state). The
# two other forms stay selectable and tested: the serial span walk (NHA_FWD=serial) and chunk states from one scan
# over all chunks (NHA_FWD_STATE_SPAN=0).
OTHER_FORWARDS = [("serial", None), ("parallel", "0")]


@pytest.mark.parametrize("mode,state_span", OTHER_FORWARDS)
@pytest.mark.parametrize("case", [FWD_CASES[i] for i in (3, 5, 10, 11, 8, 12)])
def test_other_forwards_match_reference(case, mode, state_span, monkeypatch):
    set_nha_env(monkeypatch, "NHA_FWD", mode)
    if state_span is not None:
        set_nha_env(monkeypatch, "NHA_FWD_STATE_SPAN", state_span)
    test_forward_and_state_match_reference(*case)


@pytest.mark.parametrize("mode,state_span", OTHER_FORWARDS)
def test_other_forwards_exact_path_packing_and_gradients(mode, state_span, monkeypatch):
    set_nha_env(monkeypatch, "NHA_FWD", mode)
    if state_span is not None:
        set_nha_env(monkeypatch, "NHA_FWD_STATE_SPAN", state_span)
    test_hard_decaying_gates_take_the_exact_path()
    test_packed_sequences_never_leak(25, 3)
    test_gradients_match_reference(*GRAD_CASES[2])
    test_gradients_match_reference(*GRAD_CASES[5])


def test_slot_kv_backward_as_two_launches_matches_reference(monkeypatch):
    """The slot K/V gradients as two launches, one per side (NHA_BWD_KV=split2); the default (one launch, the side on
    a grid axis) is what every other gradient test runs."""
    set_nha_env(monkeypatch, "NHA_BWD_KV", "split2")
    test_gradients_match_reference(*GRAD_CASES[2])
    test_gradients_match_reference(*GRAD_CASES[5])


# The optional slot-logit bias b_h (NHA.md): added to every slot logit of query head h, in the forward (both forms),
# the backward (d b = the sum of the slot logits' gradients) and the decode kernel.
def _bias(hq: int, requires_grad: bool = False) -> torch.Tensor:
    b = torch.randn(hq, generator=torch.Generator().manual_seed(hq)) * 2
    return b.requires_grad_(requires_grad)


BIAS_FWD_CASES = [FWD_CASES[1], FWD_CASES[3], FWD_CASES[5], FWD_CASES[9]]


@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("window,m,sinks,pad,hq,h,t,dtype", BIAS_FWD_CASES)
def test_slot_bias_forward_and_state_match_reference(window, m, sinks, pad, hq, h, t, dtype, mode, monkeypatch):
    set_nha_env(monkeypatch, "NHA_FWD", mode)
    xs, valid = make(2, hq, h, t, 16, m, pad=pad, dtype=dtype, seed=t + hq)
    kw = dict(window=window, num_sinks=sinks, scale=0.3, valid=valid, return_state=True)
    ref, st_ref = nha_chunk(*xs, **kw, slot_bias=_bias(hq))
    out, st = nha_chunk_triton(*xs, **kw, slot_bias=_bias(hq))
    keep = valid[:, None, :, None]
    assert rel(out, ref, keep) <= TOL[dtype]
    assert rel(out, nha_chunk(*xs, **kw)[0], keep) > 10 * TOL[dtype]  # the bias matters here
    assert torch.equal(st.count, st_ref.count) and (st.k - st_ref.k).abs().max() <= 1e-4 * st_ref.k.abs().max()
    # b = 0 is no bias, bit for bit.
    assert torch.equal(nha_chunk_triton(*xs, **kw, slot_bias=torch.zeros(hq))[0], nha_chunk_triton(*xs, **kw)[0])


def test_very_negative_slot_bias_is_sliding_window_attention_on_the_kernels():
    xs, valid = make(2, 4, 2, 45, 16, 16, pad=True, dtype=torch.float32, seed=4)
    kw = dict(window=5, num_sinks=2, scale=0.3, valid=valid)
    swa, _ = nha_chunk(*xs[:5], xs[5][..., :0], **kw)
    out, _ = nha_chunk_triton(*xs, **kw, slot_bias=torch.full((4,), -1e4))
    assert rel(out, swa, valid[:, None, :, None]) <= 1e-6


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[4], GRAD_CASES[5]])
def test_slot_bias_gradients_match_reference(case):
    window, m, sinks, pad, hq, h, t, d, dtype, gate_scale = case
    xs, valid = make(2, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t + d, gate_scale=gate_scale, requires_grad=True)
    bias = _bias(hq, requires_grad=True)
    kw = dict(window=window, num_sinks=sinks, scale=0.3, valid=valid)
    do = (torch.randn(2, hq, t, d, generator=torch.Generator().manual_seed(9)) * valid[:, None, :, None]).to(dtype)
    ref_in = [x.detach().float().requires_grad_(True) for x in xs] + [bias.detach().clone().requires_grad_(True)]
    g_ref = torch.autograd.grad(nha_chunk(*ref_in[:6], **kw, slot_bias=ref_in[6])[0], ref_in, do.float())
    g = torch.autograd.grad(nha_chunk_triton(*xs, **kw, slot_bias=bias)[0], xs + [bias], do)
    assert g[6].dtype == torch.float32 and g_ref[6].abs().min() > 1e-3
    for name, a, b in zip(["q", "q_rot", "k", "k_rot", "v", "log_alpha", "slot_bias"], g, g_ref):
        tol = 1e-3 if gate_scale > 1 and name == "log_alpha" else TOL[dtype]
        assert rel(a, b, 1.0) <= tol, name


def test_slot_bias_gradient_through_the_reference_backward(monkeypatch):
    """NHA_TRITON_BWD=reference (the debug path) differentiates the torch reference: d b included."""
    set_nha_env(monkeypatch, "NHA_TRITON_BWD", "reference")
    test_slot_bias_gradients_match_reference(GRAD_CASES[0])


@pytest.mark.parametrize("window,sinks,hq,h", [(4, 2, 4, 2), (0, 1, 3, 1)])
def test_slot_bias_decode_step_equals_reference_step(window, sinks, hq, h):
    b, pre, steps, d, m = 3, 9, 5, 16, 16
    xs, valid = make(b, hq, h, pre + steps, d, m, pad=True, dtype=torch.float32, seed=window)
    valid[1, pre + 1] = False
    bias = _bias(hq)
    _, st = nha_recurrent(*[x[:, :, :pre] for x in xs], window=window, num_sinks=sinks, scale=0.3,
                          valid=valid[:, :pre], slot_bias=bias)
    st_k, plain = _clone(st), _clone(st)
    first = [x[:, :, pre] for x in xs] + [valid[:, pre]]
    assert (nha_decode_step(plain, *first, scale=0.3) - st_k.step(*first, scale=0.3, slot_bias=bias)).abs().max() > 1e-3
    st_k = _clone(st)
    for i in range(pre, pre + steps):
        args = [x[:, :, i] for x in xs] + [valid[:, i]]
        ref = st.step(*args, scale=0.3, slot_bias=bias)
        out = nha_decode_step(st_k, *args, scale=0.3, slot_bias=bias)
        assert (out - ref).abs().max() <= 1e-5


def test_slot_bias_packed_sequences():
    cu = torch.tensor([0, 9, 30, 31, 50], dtype=torch.int32)
    xs, valid = make(1, 4, 2, 50, 16, 16, pad=False, dtype=torch.float32, seed=4)
    bias = _bias(4)
    out, _ = nha_chunk_triton(*xs, window=4, num_sinks=2, scale=0.3, valid=valid, cu_seqlens=cu, slot_bias=bias)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        ref, _ = nha_chunk(*[x[:, :, a:b] for x in xs], window=4, num_sinks=2, scale=0.3, valid=valid[:, a:b],
                           slot_bias=bias)
        assert rel(out[:, :, a:b], ref, 1.0) <= 1e-4


# The gate gradient as two Triton passes (gate_grad.py, the default) against its torch form, directly on layouts
# whose sequences start and end inside and across chunks; the other gradient tests run it through the whole backward,
# and the last test runs the torch form (NHA_GATE_GRAD=torch) through it too.
@pytest.mark.parametrize("packed,w,sinks,m", [(True, 3, 2, 16), (True, 0, 0, 5), (False, 4, 1, 16), (False, 7, 0, 20)])
def test_gate_gradient_kernel_equals_its_torch_form(packed, w, sinks, m):
    from nha_kernels.chunk_bwd import gate_grad_torch
    from nha_kernels.gate_grad import gate_grad_triton
    from nha_kernels.prep import make_layout

    g = torch.Generator().manual_seed(m + w)
    if packed:  # sequences ending inside a chunk, exactly at a chunk edge, and spanning three chunks of 16
        cu, b, t_len, valid = torch.tensor([0, 5, 16, 17, 60, 70], dtype=torch.int32), 1, 70, None
    else:
        cu, b, t_len = None, 2, 45
        valid = torch.ones(b, t_len, dtype=torch.bool)
        valid[1, :6] = False  # left padding: those positions never write
    lay = make_layout(valid, cu, b, t_len, num_sinks=sinks, span=16, device=torch.device("cpu"))
    h = 2
    xg, la = (torch.randn(b, h, t_len, m, generator=g) for _ in range(2))
    la = -F.softplus(la)  # log decays are <= 0
    dss = torch.randn(2, b, h, t_len, m, generator=g)
    ref = gate_grad_torch(xg, dss, la, lay, w, sinks)
    for chunk in (16, 32):
        out = gate_grad_triton(xg, dss, la, lay, w, sinks, chunk=chunk)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), chunk


@pytest.mark.parametrize("tile", ["16", "32", "64"])
def test_gradients_with_each_backward_slot_tile_match_reference(monkeypatch, tile):
    # NHA_BWD_SLOT_TILE (default 64 at these head dims, 16 above 64): m = 64 runs in 4, 2 or 1 tiles, m = 16 in one.
    set_nha_env(monkeypatch, "NHA_BWD_SLOT_TILE", tile)
    test_gradients_match_reference(*GRAD_CASES[2])
    test_gradients_match_reference(*GRAD_CASES[0])


def test_gradients_with_the_torch_gate_gradient_match_reference(monkeypatch):
    set_nha_env(monkeypatch, "NHA_GATE_GRAD", "torch")
    for case in (GRAD_CASES[0], GRAD_CASES[1], GRAD_CASES[2], GRAD_CASES[5]):
        test_gradients_match_reference(*case)
    test_packed_sequence_gradients()


def test_layer_with_exact_heads_on_the_kernels_matches_the_torch_reference(monkeypatch):
    """A model whose NHA layers keep some KV heads at full attention (--full-heads): the full group runs the kernels
    with window None and no slots, the NHA group the NHA kernels; prefill (left padding) and the kernel decode
    steps equal the torch reference."""
    import nha_kernels

    import nha_convert.layer as layer
    from nha_convert import NHACache, NHASettings, convert
    from tests.helpers.models import batch, max_diff, tiny

    model = convert(tiny(), NHASettings(window=4, slots=8, sinks=2, slot_bias=-1.0, full_heads="0:1,1:0,1:1,2:0"))
    ids, mask = batch(t=16, pad=(0, 3, 5))
    calls = []
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        monkeypatch.setattr(layer, "triton_kernels", lambda x: calls.append(1) or nha_kernels)
        out = model(ids, attention_mask=mask, use_cache=False).logits
        cache = NHACache(model.config, capacity=16)
        steps = [model(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache).logits]
        steps += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits
                  for t in range(9, 16)]
    assert len(calls) == (1 + 1 + 7) * 5  # every forward and decode step of the 5 head groups went to the kernels
    assert max_diff(ref, out, mask) <= 1e-4 * ref.abs().max()
    assert max_diff(ref, torch.cat(steps, 1), mask) <= 1e-4 * ref.abs().max()
