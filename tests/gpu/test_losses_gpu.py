"""The fused distillation / cross-entropy loss (liger-kernel) equals the chunked torch loss, values and gradients.

Run on a CUDA machine with liger-kernel installed (offline: `pip install --no-deps .whl-loss/liger_kernel-*.whl`):
`PYTHONPATH=$PWD:$PWD/kernels python -m pytest tests/gpu/test_losses_gpu.py -q`.
Also: the packed-row path (varlen Triton kernels) equals the pieces run one per row, on the GPU.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("liger_kernel")

from nha_convert import backend  # noqa: E402
from nha_convert.losses import chunked_lm_loss, liger_losses, lm_objective  # noqa: E402

pytestmark = pytest.mark.gpu


def _case(seed: int, dtype: torch.dtype, n: int = 3000, h: int = 576, v: int = 49152):
    """SmolLM2's hidden size and vocabulary, a few masked positions."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(2, n // 2, h, device="cuda", generator=g, dtype=dtype)
    t_hidden = hidden + 0.3 * torch.randn(hidden.shape, device="cuda", generator=g, dtype=dtype)
    head = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=dtype)
    t_head = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        t_head.weight.copy_(head.weight + 0.01 * torch.randn(head.weight.shape, device="cuda", generator=g,
                                                              dtype=dtype))
    targets = torch.randint(0, v, (2, n // 2), device="cuda", generator=g)
    targets[0, :7] = -100
    targets[1, -1] = -100
    return hidden, t_hidden, head, t_head, targets


def _objective(env: str, monkeypatch, hidden, t_hidden, head, t_head, targets, *, want_kl, temperature, ce_weight,
               target_weight=None):
    monkeypatch.setenv("NHA_LOSS", env)
    backend.resolve()
    h = hidden.detach().clone().requires_grad_(True)
    head.weight.grad = None
    loss, kl, ce, n = lm_objective(h, targets, head, teacher_hidden=t_hidden, teacher_head=t_head if want_kl else None,
                                   temperature=temperature, ce_weight=ce_weight, want_kl=want_kl, chunk=1024,
                                   target_weight=target_weight)
    loss.backward()
    return loss.detach().float(), kl, ce, n, h.grad.float(), head.weight.grad.float()


@pytest.mark.parametrize("want_kl,temperature,ce_weight", [(True, 1.0, 0.5), (True, 2.0, 0.0), (False, 1.0, 1.0)],
                         ids=["distill", "distill-T2-kl-only", "finetune"])
def test_fused_loss_equals_chunked_torch_fp32(monkeypatch, want_kl, temperature, ce_weight):
    case = _case(0, torch.float32)
    monkeypatch.setenv("NHA_LOSS", "auto")
    backend.resolve()
    assert liger_losses(case[0]) is not None  # auto picks liger on CUDA when it is installed
    ref = _objective("torch", monkeypatch, *case, want_kl=want_kl, temperature=temperature, ce_weight=ce_weight)
    fused = _objective("liger", monkeypatch, *case, want_kl=want_kl, temperature=temperature, ce_weight=ce_weight)
    assert ref[3] == fused[3] == 3000 - 8
    for a, b in zip(ref[:3], fused[:3]):  # loss, KL sum, CE sum
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
    for a, b in zip(ref[4:], fused[4:]):  # d hidden, d head weight
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("want_kl", [True, False], ids=["distill", "finetune"])
def test_weighted_fused_loss_equals_weighted_chunked_torch(monkeypatch, want_kl):
    """Answer tokens weighted x20 (the retrieval documents): liger unweighted + the torch excess over those positions
    equals the weighted torch loss, values and gradients."""
    case = _case(4, torch.float32)
    weight = torch.ones(case[4].shape, device="cuda")
    weight.view(-1)[torch.arange(11, 3000, 97, device="cuda")] = 20.0
    kw = dict(want_kl=want_kl, temperature=1.0, ce_weight=0.5 if want_kl else 1.0, target_weight=weight)
    ref = _objective("torch", monkeypatch, *case, **kw)
    fused = _objective("liger", monkeypatch, *case, **kw)
    assert ref[3] == fused[3]
    for a, b in zip(ref[:3], fused[:3]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)
    for a, b in zip(ref[4:], fused[4:]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_fused_loss_equals_chunked_torch_bf16_autocast(monkeypatch):
    """The recipes' setting: bf16 autocast over fp32 weights. Both forms round the logits to bf16 matmuls, so they
    agree to bf16 precision, not bit for bit."""
    case = _case(1, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _objective("torch", monkeypatch, *case, want_kl=True, temperature=1.0, ce_weight=0.5)
        fused = _objective("liger", monkeypatch, *case, want_kl=True, temperature=1.0, ce_weight=0.5)
    for a, b in zip(ref[:3], fused[:3]):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-1)
    for a, b in zip(ref[4:], fused[4:]):
        assert float((a - b).norm() / a.norm()) < 2e-2


def test_fused_loss_over_packed_steps_of_changing_length(monkeypatch):
    """Packed steps change the number of valid positions every step. Under torch 2.11 liger's compiled chunk crashed
    in torch.compile's guards at the third recompile (2026-11-29); rows padded to whole chunks keep one shape."""
    case = _case(3, torch.float32, n=6000)
    for step, masked in enumerate((0, 17, 1500, 2999, 4100)):
        hidden, t_hidden, head, t_head, targets = case
        targets = targets.clone()
        targets.view(-1)[:masked] = -100
        step_case = (hidden, t_hidden, head, t_head, targets)
        ref = _objective("torch", monkeypatch, *step_case, want_kl=True, temperature=1.0, ce_weight=0.5)
        fused = _objective("liger", monkeypatch, *step_case, want_kl=True, temperature=1.0, ce_weight=0.5)
        assert ref[3] == fused[3], step
        for a, b in zip(ref[:3], fused[:3]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-3)


def test_no_grad_uses_the_torch_form(monkeypatch):
    """Evaluation (no gradient) takes the cheaper chunked torch form whatever NHA_LOSS says."""
    hidden, t_hidden, head, t_head, targets = _case(2, torch.float32, n=200)
    monkeypatch.setenv("NHA_LOSS", "liger")
    backend.resolve()
    with torch.no_grad():
        loss, kl, ce, n = lm_objective(hidden, targets, head, teacher_hidden=t_hidden, teacher_head=t_head,
                                       temperature=1.0, ce_weight=0.5, want_kl=True)
        rkl, rce, rn = chunked_lm_loss(hidden, targets, head, teacher_hidden=t_hidden, teacher_head=t_head,
                                       want_kl=True)
    assert n == rn and torch.equal(kl, rkl) and torch.equal(ce, rce)


def test_packed_rows_equal_the_pieces_on_the_gpu_kernels():
    """The CPU acceptance test's batch through the Triton varlen path (fp32, tf32x3 products in the kernels)."""
    import importlib

    pytest.importorskip("nha_kernels")
    packing = importlib.import_module("tests.finetune.test_finetune_packing")
    from nha_convert.finetune.recipe import StageSpec
    from nha_convert.finetune.trainer import StageLoss

    for student_kind in ("nha", "nha+full"):
        student, teacher = packing._models(student_kind)
        student, teacher = student.cuda(), teacher.cuda()
        stage = StageSpec(kind="distill", ce_weight=0.3, temperature=2.0, loss_chunk=16)
        module = StageLoss(student, stage, teacher)
        rows, pieces = packing._packed_batch()
        loss, stats, grads = packing._loss_and_grads(module, teacher, stage, rows.input_ids.cuda(),
                                                     rows.attention_mask.cuda(), rows.position_ids.cuda())
        ref_loss = 0.0
        ref_grads = [torch.zeros_like(g) for g in grads]
        for p in pieces:
            one = p[None].cuda()
            l, _, gr = packing._loss_and_grads(module, teacher, stage, one, torch.ones_like(one),
                                               torch.arange(len(p), device="cuda")[None])
            ref_loss = ref_loss + l
            ref_grads = [a + b for a, b in zip(ref_grads, gr)]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)
