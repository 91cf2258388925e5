"""Student and teacher models of a recipe.

The student is the base model converted to NHA (or an already converted folder); the teacher is by default a
frozen copy of the base model taken BEFORE conversion, so it is exactly the model the student started from.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .. import hub
from ..errors import NHAError
from ..loading import load_converted, resolve_dtype
from .recipe import Recipe


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_models(recipe: Recipe, device: torch.device) -> tuple[nn.Module, nn.Module | None, Any]:
    """(student, teacher or None, tokenizer), the student in the recipe's dtype, both on `device`."""
    from ..convert import convert

    m, t = recipe.model, recipe.teacher
    dtype = resolve_dtype(m.dtype, device)
    t_dtype = resolve_dtype(t.dtype, device)
    teacher = None
    if m.converted is not None:
        student, tokenizer = load_converted(m.converted, dtype, device)
        if t.model == "base":
            raise NHAError("teacher.model: base needs model.base; with model.converted, name the teacher model "
                           "(the base the folder was converted from)")
    else:
        torch.manual_seed(recipe.seed)  # any random init in the conversion is reproducible (resume needs it)
        student, tokenizer = hub.load_base_model(m.base, dtype=dtype, device=device)
        if t.model == "base":
            teacher = copy.deepcopy(student).to(t_dtype)
        if m.nha is not None:
            settings = recipe.nha_settings()
            student = convert(student, settings, tokenizer=tokenizer, **(m.calibration or {}))
    if t.model not in (None, "base"):
        teacher, _ = hub.load_base_model(t.model, dtype=t_dtype, device=device)
    if teacher is not None:
        freeze(teacher)
        if teacher.config.vocab_size != student.config.vocab_size:
            raise NHAError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                           f"({student.config.vocab_size}); use a teacher of the same model family")
    student.train()
    return student, teacher, tokenizer
