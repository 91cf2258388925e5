"""GPU suite for the Triton NHA kernels: compiled kernels at real sizes against the torch reference.

Run on a CUDA machine: `python -m pytest tests/gpu -q` (kernels/tools/gpu_check.py runs it and then times the kernels).
Covers what the CPU interpreter tests cannot: compiled layouts and pipelining, real tiles (64-128 query rows,
64-key blocks, spans of 128-1024 tokens), bf16 tensor-core products, d = 128 with m = 64, T = 4K, the SDPA route,
and the in-place decode kernel's barrier.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from nha_convert import backend as nha_backend  # noqa: E402
from nha_convert.ops import nha_chunk, nha_recurrent  # noqa: E402
from nha_convert.ops.recurrent import NHAState  # noqa: E402
from nha_convert.backend import triton_chunk as nha_chunk_triton  # noqa: E402
from tests.helpers.env import set_nha_env  # noqa: E402
from nha_kernels.decode import nha_decode_step  # noqa: E402


pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def make(b, hq, h, t, d, m, *, pad, dtype, seed, gate_scale=1.0, requires_grad=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    xs = [r(b, hq, t, d), r(b, hq, t, d), r(b, h, t, d), r(b, h, t, d), r(b, h, t, d)]
    xs = [x.to(dtype).requires_grad_(requires_grad) for x in xs]
    # Gates spread like a converted model's: mean decay per token around 0.9, some near 1, some near 0.5.
    la = (F.logsigmoid(2 + 2 * r(b, h, t, m)) / 2 * gate_scale).requires_grad_(requires_grad)
    valid = torch.ones(b, t, dtype=torch.bool, device=DEV)
    if pad:
        valid[0, : min(37, t - 1)] = False
        valid[-1, t // 2 : t // 2 + 5] = False
    return xs + [la], valid


def rel(a, b, keep):
    a, b = a.double() * keep, b.double() * keep
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def reference(xs, **kw):
    """The torch reference in fp32 (inputs rounded to the kernel's dtype first, so both see the same numbers)."""
    return nha_chunk(*[x.float() for x in xs[:5]], xs[5], **kw)


CASES = [
    # window, m, sinks, pad, hq, h, T, d, dtype
    (64, 64, 4, True, 32, 8, 4096, 128, torch.bfloat16),
    (512, 64, 0, False, 32, 8, 2048, 128, torch.bfloat16),
    (2048, 64, 4, False, 8, 8, 3000, 64, torch.bfloat16),
    (63, 16, 1, True, 24, 8, 1000, 128, torch.bfloat16),  # GQA 3
    (65, 64, 0, False, 8, 1, 1000, 128, torch.bfloat16),  # GQA 8
    (0, 64, 0, True, 8, 2, 777, 128, torch.bfloat16),
    (1, 16, 2, True, 8, 2, 777, 128, torch.float32),
    (64, 64, 4, True, 12, 4, 1000, 128, torch.float32),
    (5000, 64, 4, True, 8, 2, 1000, 128, torch.bfloat16),  # w >= T with padding: kernel, not SDPA
    (None, 64, 0, False, 8, 2, 1000, 128, torch.bfloat16),  # SDPA route
    (100, 0, 4, True, 8, 2, 1000, 128, torch.bfloat16),  # m = 0
    (64, 64, 4, True, 32, 8, 2048, 128, torch.float16),  # fp16: fp32-sized tiles, 3-pass tf32 slot products
]


@pytest.mark.parametrize("window,m,sinks,pad,hq,h,t,d,dtype", CASES)
def test_forward_matches_reference(window, m, sinks, pad, hq, h, t, d, dtype):
    xs, valid = make(2 if t <= 2048 else 1, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t + hq)
    kw = dict(window=window, num_sinks=sinks, scale=d**-0.5, valid=valid, return_state=True)
    ref, st_ref = reference(xs, **kw)
    out, st = nha_chunk_triton(*xs, **kw)
    keep = valid[:, None, :, None]
    assert out.dtype == dtype and torch.isfinite(out).all()
    print("fwd rel error", window, m, dtype, rel(out, ref, keep))
    assert rel(out, ref, keep) <= TOL[dtype]
    assert torch.equal(st.count, st_ref.count)
    if m:
        assert rel(st.k, st_ref.k, 1.0) <= 1e-3 and rel(st.v, st_ref.v, 1.0) <= 1e-3


def test_hard_gates_exact_path():
    xs, valid = make(1, 8, 2, 600, 128, 64, pad=False, dtype=torch.float32, seed=1, gate_scale=200.0)
    kw = dict(window=64, num_sinks=0, scale=128**-0.5, valid=valid)
    ref, _ = reference(xs, **kw)
    out, _ = nha_chunk_triton(*xs, **kw)
    assert torch.isfinite(out).all() and rel(out, ref, 1.0) <= 1e-4


def test_packed_sequences():
    cu = torch.tensor([0, 100, 1300, 1301, 2500, 4000], dtype=torch.int32, device=DEV)
    xs, valid = make(1, 32, 8, 4000, 128, 64, pad=False, dtype=torch.bfloat16, seed=2)
    out, st = nha_chunk_triton(*xs, window=64, num_sinks=4, scale=128**-0.5, valid=valid, cu_seqlens=cu,
                               return_state=True)
    bounds = cu.tolist()
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ref, st_ref = reference([x[:, :, a:b] for x in xs], window=64, num_sinks=4, scale=128**-0.5,
                                valid=valid[:, a:b], return_state=True)
        assert rel(out[:, :, a:b], ref, 1.0) <= 1e-2
        assert st.count[n] == st_ref.count[0]


GRAD_CASES = [
    # window, m, sinks, pad, hq, h, T, d, dtype
    (40, 16, 2, True, 8, 2, 300, 64, torch.float32),
    (64, 64, 4, True, 32, 8, 1500, 128, torch.bfloat16),
    (0, 64, 0, False, 24, 8, 700, 128, torch.bfloat16),  # GQA 3, pure slot RNN
    (512, 64, 4, True, 8, 1, 1200, 128, torch.bfloat16),  # GQA 8
    (None, 16, 0, True, 8, 2, 500, 64, torch.bfloat16),  # full attention with padding: kernel path
    (64, 64, 4, True, 9, 3, 1000, 64, torch.float16),  # fp16, SmolLM2's heads
]


@pytest.mark.parametrize("window,m,sinks,pad,hq,h,t,d,dtype", GRAD_CASES)
def test_gradients_match_reference(window, m, sinks, pad, hq, h, t, d, dtype):
    xs, valid = make(2, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t, requires_grad=True)
    kw = dict(window=window, num_sinks=sinks, scale=d**-0.5, valid=valid)
    do = (torch.randn(2, hq, t, d, device=DEV) * valid[:, None, :, None]).to(dtype)
    ref_in = [x.detach().float().requires_grad_(True) for x in xs]
    g_ref = torch.autograd.grad(nha_chunk(*ref_in, **kw)[0], ref_in, do.float(), allow_unused=True)
    g = torch.autograd.grad(nha_chunk_triton(*xs, **kw)[0], xs, do, allow_unused=True)
    errs = {}
    for name, a, b in zip(["q", "q_rot", "k", "k_rot", "v", "log_alpha"], g, g_ref):
        b = torch.zeros_like(a, dtype=torch.float32) if b is None else b
        errs[name] = rel(a, b, 1.0) if b.abs().max() > 0 else float(a.abs().max())
    print("grad rel errors", window, m, dtype, errs)
    assert all(e <= TOL[dtype] for e in errs.values()), errs


def test_packed_sequence_gradients():
    cu = torch.tensor([0, 300, 310, 1000], dtype=torch.int32, device=DEV)
    xs, valid = make(1, 8, 2, 1000, 64, 16, pad=False, dtype=torch.float32, seed=11, requires_grad=True)
    do = torch.randn(1, 8, 1000, 64, device=DEV)
    g = torch.autograd.grad(nha_chunk_triton(*xs, window=50, num_sinks=2, scale=0.125, valid=valid,
                                             cu_seqlens=cu)[0], xs, do)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        part = [x.detach()[:, :, a:b].requires_grad_(True) for x in xs]
        g_ref = torch.autograd.grad(nha_chunk(*part, window=50, num_sinks=2, scale=0.125, valid=valid[:, a:b])[0],
                                    part, do[:, :, a:b], allow_unused=True)
        for gg, gr in zip(g, g_ref):
            if gr is None:  # a document shorter than the window never uses its slots
                assert gg[:, :, a:b].abs().max() == 0
            else:
                assert rel(gg[:, :, a:b], gr, 1.0) <= 1e-4


def _bias(hq: int, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(hq)
    return (torch.randn(hq, generator=g, device=DEV) * 2).requires_grad_(requires_grad)


@pytest.mark.parametrize("window,sinks,dtype,biased", [
    (64, 4, torch.bfloat16, False), (0, 0, torch.float32, False), (1, 2, torch.float32, False),
    (512, 0, torch.bfloat16, False), (64, 4, torch.bfloat16, True), (0, 0, torch.float32, True),
    (64, 4, torch.float16, False)])
def test_decode_matches_reference_step(window, sinks, dtype, biased):
    b, hq, h, pre, steps, d, m = 5, 32, 8, 700, 6, 128, 64
    xs, valid = make(b, hq, h, pre + steps, d, m, pad=True, dtype=dtype, seed=window)
    bias = _bias(hq) if biased else None
    head = [x[:, :, :pre] for x in xs]
    _, slots = nha_chunk_triton(*head, window=window, num_sinks=sinks, scale=d**-0.5, valid=valid[:, :pre],
                                return_state=True, slot_bias=bias)
    st = NHAState.from_prefill(head[2], head[3], head[4], head[5], valid[:, :pre], slots, window=window,
                               num_sinks=sinks)
    st_k = NHAState(**{f: getattr(st, f).clone() if torch.is_tensor(getattr(st, f)) else getattr(st, f)
                       for f in st.__dataclass_fields__})
    for i in range(pre, pre + steps):
        args = [x[:, :, i] for x in xs] + [valid[:, i]]
        ref = st.step(*args, scale=d**-0.5, slot_bias=bias)
        out = nha_decode_step(st_k, *args, scale=d**-0.5, slot_bias=bias)
        assert rel(out, ref, 1.0) <= TOL[dtype]
    for f in st.__dataclass_fields__:
        a, b_ = getattr(st, f), getattr(st_k, f)
        if torch.is_tensor(a):
            assert torch.allclose(a.float(), b_.float(), rtol=1e-4, atol=1e-4), f


def test_prefill_then_decode_equals_recurrence():
    b, hq, h, t, pre, d, m = 2, 8, 2, 300, 280, 64, 16
    xs, valid = make(b, hq, h, t, d, m, pad=True, dtype=torch.float32, seed=7)
    kw = dict(window=32, num_sinks=2, scale=0.125)
    full, _ = nha_recurrent(*xs, valid=valid, **kw)
    head = [x[:, :, :pre] for x in xs]
    _, slots = nha_chunk_triton(*head, valid=valid[:, :pre], return_state=True, **kw)
    st = NHAState.from_prefill(head[2], head[3], head[4], head[5], valid[:, :pre], slots, window=32, num_sinks=2)
    for i in range(pre, t):
        out = nha_decode_step(st, *[x[:, :, i] for x in xs], valid[:, i], scale=0.125)
        keep = valid[:, i][:, None, None]
        assert ((out - full[:, :, i]) * keep).abs().max() <= 1e-4


def test_model_backends_agree(monkeypatch):
    """A converted model on CUDA: Triton prefill + Triton decode give the torch backend's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nha_convert import NHACache, NHASettings, convert

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    model = convert(LlamaForCausalLM(cfg).eval(), NHASettings(window=8, slots=16, sinks=2, full_layers=[0])).to(DEV)
    ids = torch.randint(0, 256, (2, 60), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NHA_BACKEND", backend)
        nha_backend.resolve()
        with torch.no_grad():
            full = model(ids, attention_mask=mask).logits
            cache = NHACache(model.config)
            out = model(ids[:, :50], attention_mask=mask[:, :50], past_key_values=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for i in range(50, 60):
                out = model(ids[:, i : i + 1], attention_mask=mask[:, : i + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits[:, -1])
        outs[backend] = (full, torch.stack(steps, 1))
    keep = mask.bool()[..., None]
    assert rel(outs["triton"][0], outs["torch"][0], keep) <= 1e-4
    assert rel(outs["triton"][1], outs["torch"][1], 1.0) <= 1e-4


# The optional slot-logit bias b_h (NHA.md): compiled HAS_SLOT_BIAS variants of the forward (both forms), the
# slot backward (d b) and the decode kernel, against the torch reference.
@pytest.mark.parametrize("mode", ["parallel", "serial"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[7]])
def test_slot_bias_forward_matches_reference(case, mode, monkeypatch):
    window, m, sinks, pad, hq, h, t, d, dtype = case
    set_nha_env(monkeypatch, "NHA_FWD", mode)
    xs, valid = make(2 if t <= 2048 else 1, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t + hq)
    kw = dict(window=window, num_sinks=sinks, scale=d**-0.5, valid=valid)
    ref, _ = reference(xs, **kw, slot_bias=_bias(hq))
    out, _ = nha_chunk_triton(*xs, **kw, slot_bias=_bias(hq))
    keep = valid[:, None, :, None]
    print("fwd+bias rel error", window, m, dtype, mode, rel(out, ref, keep))
    assert rel(out, ref, keep) <= TOL[dtype]
    assert torch.equal(nha_chunk_triton(*xs, **kw, slot_bias=torch.zeros(hq, device=DEV))[0],
                       nha_chunk_triton(*xs, **kw)[0])  # b = 0 is no bias, bit for bit
    swa, _ = reference([*xs[:5], xs[5][..., :0]], **kw)
    assert rel(nha_chunk_triton(*xs, **kw, slot_bias=torch.full((hq,), -1e4, device=DEV))[0], swa, keep) \
        <= TOL[dtype]  # b = -1e4: sliding-window attention


@pytest.mark.parametrize("case", GRAD_CASES[:4])
def test_slot_bias_gradients_match_reference(case):
    window, m, sinks, pad, hq, h, t, d, dtype = case
    xs, valid = make(2, hq, h, t, d, m, pad=pad, dtype=dtype, seed=t, requires_grad=True)
    bias = _bias(hq, requires_grad=True)
    kw = dict(window=window, num_sinks=sinks, scale=d**-0.5, valid=valid)
    do = (torch.randn(2, hq, t, d, device=DEV) * valid[:, None, :, None]).to(dtype)
    ref_in = [x.detach().float().requires_grad_(True) for x in xs] + [bias.detach().clone().requires_grad_(True)]
    g_ref = torch.autograd.grad(nha_chunk(*ref_in[:6], **kw, slot_bias=ref_in[6])[0], ref_in, do.float())
    g = torch.autograd.grad(nha_chunk_triton(*xs, **kw, slot_bias=bias)[0], xs + [bias], do)
    errs = {name: rel(a, b, 1.0) for name, a, b in
            zip(["q", "q_rot", "k", "k_rot", "v", "log_alpha", "slot_bias"], g, g_ref)}
    print("grad+bias rel errors", window, m, dtype, errs)
    assert all(e <= TOL[dtype] for e in errs.values()), errs




@pytest.mark.parametrize("packed", [True, False])
def test_gate_gradient_kernel_equals_its_torch_form(packed):
    """gate_grad.py (the default) against the torch form at the recipe's training size: 64K positions in
    one packed row of uneven documents (or 16 dense rows of 4096), 3 KV heads, m = 64, w = 64, 4 sinks."""
    from nha_kernels.chunk_bwd import gate_grad_torch
    from nha_kernels.gate_grad import gate_grad_triton
    from nha_kernels.prep import make_layout

    g = torch.Generator(device=DEV).manual_seed(7)
    if packed:
        lens = [700, 1500, 33, 1024, 4096, 3] * 8  # 58,848 positions, then one document of 6,688
        lens.append(65536 - sum(lens))
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        b, t_len = 1, 65536
    else:
        cu, b, t_len = None, 16, 4096
    lay = make_layout(None, cu, b, t_len, num_sinks=4, span=1024, device=torch.device(DEV))
    xg = torch.randn(b, 3, t_len, 64, generator=g, device=DEV)
    la = F.logsigmoid(2 + 2 * torch.randn(b, 3, t_len, 64, generator=g, device=DEV)) / 8
    dss = torch.randn(2, b, 3, t_len, 64, generator=g, device=DEV)
    ref = gate_grad_torch(xg, dss, la, lay, 64, 4)
    out = gate_grad_triton(xg, dss, la, lay, 64, 4)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_gradients_with_the_torch_gate_gradient(monkeypatch):
    set_nha_env(monkeypatch, "NHA_GATE_GRAD", "torch")
    test_packed_sequence_gradients()
    test_gradients_match_reference(*GRAD_CASES[0])


def test_training_call_never_waits_for_the_gpu():
    """Forward + backward at the training shapes (8 packed rows of 1024, 9 / 3 heads, d = 64, w = 64, m = 64,
    4 sinks, valid None, cu_seqlens on the host as the layer hands them) under torch.cuda.set_sync_debug_mode("error"):
    a host sync raises, including the first call of a step, which builds the layouts (pinned, asynchronous copies).
    The launch list itself is held by tests/kernels/test_launches.py."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels" / "tools"))
    from bench_kernels import packed_cu_seqlens

    xs, _ = make(1, 9, 3, 8 * 1024, 64, 64, pad=False, dtype=torch.bfloat16, seed=11, requires_grad=True)
    do = torch.randn(1, 9, 8 * 1024, 64, device=DEV, dtype=torch.bfloat16)
    kw = dict(window=64, num_sinks=4, scale=0.125, valid=None)

    def step(cu):
        o = nha_chunk_triton(*xs, cu_seqlens=cu, **kw)[0]
        return torch.autograd.grad(o, xs, do)

    step(torch.tensor(packed_cu_seqlens(8, 1024, 4), dtype=torch.int32))  # compiles the kernels
    cu = torch.tensor(packed_cu_seqlens(8, 1024, 3), dtype=torch.int32)  # new boundaries: new layouts inside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            grads = step(cu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)
