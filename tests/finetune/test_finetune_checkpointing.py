"""Gradient checkpointing (the 8B recipes turn it on) gives the gradients of a run without it.

Attention transfer runs each student attention on the teacher's hidden states through forward hooks; a checkpointed
decoder layer is recomputed in the backward, after those hooks are gone, so the objective hands torch's checkpoint
a context that installs them again for the recompute (objectives.AttentionTransfer.checkpoint_contexts; before it,
the recompute ran on the student's own states and torch refused the mismatch)."""

from __future__ import annotations

import contextlib

import torch

from nha_convert import NHASettings, convert
from nha_convert.finetune.objectives import objective_class
from tests.helpers.finetune import tiny_llama


def _grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    objective = objective_class("attention_transfer")(None)
    student = convert(tiny_llama(seed=0, layers=3), NHASettings(window=4, slots=4, sinks=1)).train()
    teacher = tiny_llama(seed=0, layers=3)
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": objective.checkpoint_contexts})
    torch.manual_seed(1)
    ids = torch.randint(0, 250, (2, 24))
    pos = torch.arange(24).repeat(2, 1)
    mask = torch.ones_like(ids)
    out = objective.teacher_pass(teacher, ids, pos, contextlib.nullcontext)
    loss, _ = objective.forward(student, teacher, ids, mask, pos, **out)
    loss.backward()
    return {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


def test_attention_transfer_gradients_are_the_same_with_checkpointing():
    plain, checkpointed = _grads(False), _grads(True)
    assert plain.keys() == checkpointed.keys() and any("g_proj" in n for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)
