"""Objectives: the chunked KL / CE equal the direct full-logit computation (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nha_convert.losses import attention_mse, chunked_lm_loss, direct_kl, next_token_targets


def _batch(seed=0, b=3, t=11, h=16, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0  # a right-padded row
    mask[2, 2:] = 0
    head = torch.nn.Linear(h, v, bias=False).double()
    t_head = torch.nn.Linear(h, v, bias=False).double()
    return hidden, t_hidden, ids, mask, head, t_head


def test_next_token_targets_stop_at_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, 8, -100], [2, -100, -100, -100]]


def test_chunked_kl_equals_direct_kl_and_gradients():
    hidden, t_hidden, ids, mask, head, t_head = _batch()
    targets = next_token_targets(ids, mask)
    for temperature in (1.0, 2.5):
        for chunk in (1, 4, 7, 1000):
            h1 = hidden.clone().requires_grad_(True)
            kl, ce, n = chunked_lm_loss(h1, targets, head, teacher_hidden=t_hidden, teacher_head=t_head,
                                        temperature=temperature, want_kl=True, want_ce=True, chunk=chunk)
            h2 = hidden.clone().requires_grad_(True)
            ref = direct_kl(head(h2), t_head(t_hidden), targets, temperature)
            assert n == int((targets != -100).sum()) == 10 + 6 + 1
            torch.testing.assert_close(kl, ref.float(), rtol=1e-6, atol=1e-6)
            ref_ce = F.cross_entropy(head(hidden)[targets != -100], targets[targets != -100], reduction="sum")
            torch.testing.assert_close(ce, ref_ce.float(), rtol=1e-6, atol=1e-6)
            kl.backward()
            ref.backward()
            torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    hidden, _, ids, mask, head, t_head = _batch(1)
    targets = next_token_targets(ids, mask)
    same, _, _ = chunked_lm_loss(hidden, targets, head, teacher_hidden=hidden, teacher_head=head, want_kl=True)
    other, _, _ = chunked_lm_loss(hidden, targets, head, teacher_hidden=hidden, teacher_head=t_head, want_kl=True)
    assert abs(float(same.detach())) < 1e-6 and float(other.detach()) > 0.1


def test_chunked_loss_keeps_only_one_chunk_of_logits_for_backward():
    # With checkpointed chunks, autograd saves hidden-state slices, never (positions x vocab) logits.
    b, t, h, v = 2, 64, 8, 5000
    hidden = torch.randn(b, t, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    targets = torch.randint(0, v, (b, t))
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked_lm_loss(hidden, targets, head, chunk=16, want_ce=True)
    assert max(saved) < 16 * v  # the largest saved tensor is smaller than one chunk's logits


def test_attention_mse_counts_real_tokens_only():
    s = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]
    t = [torch.ones(2, 3, 4), torch.ones(2, 3, 4)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert attention_mse(s, t, mask).tolist() == [3.0, 0.0]


def test_attention_mse_ignores_whatever_padding_holds():
    """Padded positions never reach the loss or its gradient, even as NaN (the mask selects before the square)."""
    s = torch.zeros(1, 3, 4, requires_grad=True)
    t = torch.ones(1, 3, 4)
    t[0, 2] = float("nan")
    mask = torch.tensor([[1, 1, 0]])
    loss = attention_mse([s], [t], mask)
    loss.sum().backward()
    assert loss.tolist() == [2.0]
    assert torch.isfinite(s.grad).all() and s.grad[0, 2].abs().sum() == 0


def test_weighted_lm_loss_is_the_weighted_sum_of_per_position_terms():
    hidden, t_hidden, ids, mask, head, t_head = _batch()
    targets = next_token_targets(ids, mask)
    keep = targets != -100
    weight = torch.rand(targets.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 9 + 1
    kw = dict(teacher_hidden=t_hidden, teacher_head=t_head, temperature=2.0, want_kl=True, want_ce=True, chunk=4)
    plain = chunked_lm_loss(hidden, targets, head, **kw)
    ones = chunked_lm_loss(hidden, targets, head, target_weight=torch.ones_like(weight), **kw)
    torch.testing.assert_close(torch.stack(ones[:2]), torch.stack(plain[:2]))
    kl, ce, n = chunked_lm_loss(hidden, targets, head, target_weight=weight, **kw)
    t = F.log_softmax(t_head(t_hidden)[keep] / 2.0, -1)
    s = F.log_softmax(head(hidden)[keep] / 2.0, -1)
    ref_kl = ((t.exp() * (t - s)).sum(-1) * weight[keep]).sum() * 4.0
    ref_ce = (F.cross_entropy(head(hidden)[keep], targets[keep], reduction="none") * weight[keep]).sum()
    assert n == int(keep.sum())
    torch.testing.assert_close(kl, ref_kl.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.float(), rtol=1e-6, atol=1e-6)


def test_fused_loss_pads_rows_to_whole_chunks_without_changing_the_sums():
    """liger's chunked JSD (eager, on the CPU): the rows padded to a multiple of the chunk give the chunked torch
    loss's sums and gradients for counts of valid positions that are and are not multiples of the chunk."""
    pytest.importorskip("liger_kernel")
    from nha_convert.losses import fused_lm_objective, import_liger

    lib = import_liger()
    for t in (9, 10, 11):  # t + 6 positions with a target: 15, 16 (two whole chunks), 17
        hidden, t_hidden, ids, mask, head, t_head = _batch(seed=t, t=t, v=40)
        hidden, t_hidden, head, t_head = hidden.float(), t_hidden.float(), head.float(), t_head.float()
        targets = next_token_targets(ids, mask)
        h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
        loss, kl, ce, n = fused_lm_objective(lib, h1, targets, head.weight, teacher_hidden=t_hidden,
                                             teacher_weight=t_head.weight, temperature=2.0, ce_weight=0.3,
                                             want_kl=True, chunk=8, compiled=False)
        ref_kl, ref_ce, ref_n = chunked_lm_loss(h2, targets, head, teacher_hidden=t_hidden, teacher_head=t_head,
                                                temperature=2.0, want_kl=True, want_ce=True, chunk=8)
        assert n == ref_n
        torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
        loss.backward()
        (0.7 * ref_kl + 0.3 * ref_ce).backward()
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_fused_loss_hands_liger_the_same_shapes_at_every_step():
    """liger compiles its chunk step over the whole target tensor: packed steps with different numbers of valid
    positions must reach it with one shape (a new length each step recompiled, and crashed torch 2.11's guards)."""
    from nha_convert.losses import LigerLosses, fused_lm_objective

    seen = []

    def jsd(h, w, th, tw, tgt, *rest):
        seen.append((tuple(h.shape), tuple(th.shape), tuple(tgt.shape), int((tgt != -100).sum())))
        z = h.sum() * 0
        return z, z.detach(), z.detach()

    lib = LigerLosses(jsd=jsd, cross_entropy=None)
    hidden, t_hidden, ids, mask, head, t_head = _batch(seed=0, t=12, v=40)
    for cut in (12, 9, 5):  # fewer and fewer valid positions
        m = mask.clone()
        m[:, cut:] = 0
        targets = next_token_targets(ids, m)
        _, _, _, n = fused_lm_objective(lib, hidden.float(), targets, head.weight.float(), teacher_hidden=t_hidden,
                                        teacher_weight=t_head.weight, temperature=1.0, ce_weight=0.5, want_kl=True,
                                        chunk=8, compiled=False)
        assert n == seen[-1][3] == int((targets != -100).sum())
    assert len({s[:3] for s in seen}) == 1 and seen[0][0][0] % 8 == 0
    assert len({s[3] for s in seen}) == 3


@pytest.mark.parametrize("want_kl", [True, False], ids=["distill", "finetune"])
def test_weighted_batches_run_fused_plus_the_weight_excess(monkeypatch, want_kl):
    """liger's losses take no per-position weights, so `lm_objective` runs them unweighted and adds the torch sum of
    (w - 1) f over the positions whose weight is not 1 (the answer tokens). With a stand-in for liger that computes
    the unweighted sums by the torch form, the result equals the weighted torch loss: values, statistics and
    gradients (fp64 inputs, but the chunked form computes its logits in fp32, so both sides agree to fp32 rounding:
    the weighted terms alone are ~20x larger than that). The GPU suite checks the same against liger itself."""
    from nha_convert import losses as L

    hidden, t_hidden, ids, mask, head, t_head = _batch(seed=3)
    targets = next_token_targets(ids, mask)
    weight = torch.ones(targets.shape, dtype=torch.float32)
    weight[0, 3] = weight[0, 5] = 20.0  # answer tokens
    weight[1, 2] = 0.5
    weight[2, 5] = 20.0  # a padded position: no target, so no term
    temperature, ce_weight = 2.0, 0.3
    calls = []

    def jsd(h, w, th, tw, tgt, _w_tgt, _bias, w_hard, w_soft, beta, ignore, temp, compiled, chunk, ret):
        calls.append("jsd")
        kl, ce, n = chunked_lm_loss(h[None], tgt[None], head, teacher_hidden=th[None], teacher_head=t_head,
                                    temperature=temp, want_kl=True)
        raw_kl = kl / temp**2  # liger's soft term is the KL without T^2; fused_lm_objective puts T^2 in its weight
        return (w_hard * ce + w_soft * raw_kl) / n, raw_kl / n, ce / n

    def cross_entropy(h, w, tgt, reduction):
        calls.append("ce")
        return chunked_lm_loss(h[None], tgt[None], head)[1]

    monkeypatch.setattr(L, "liger_losses", lambda x: L.LigerLosses(jsd=jsd, cross_entropy=cross_entropy))
    kw = dict(teacher_hidden=t_hidden, teacher_head=t_head if want_kl else None, temperature=temperature,
              ce_weight=ce_weight, want_kl=want_kl, chunk=4)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    loss, kl, ce, n = L.lm_objective(h1, targets, head, target_weight=weight, **kw)
    assert calls == ["jsd" if want_kl else "ce"]  # the fused path ran
    ref_kl, ref_ce, ref_n = chunked_lm_loss(h2, targets, head, teacher_hidden=t_hidden, teacher_head=t_head,
                                            temperature=temperature, want_kl=want_kl, want_ce=True, chunk=4,
                                            target_weight=weight)
    ref = (1 - ce_weight) * ref_kl + ce_weight * ref_ce if want_kl else ref_ce
    assert n == ref_n
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6 * float(h2.grad.abs().max()))
