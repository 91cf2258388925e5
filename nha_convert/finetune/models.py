"""Student and teacher models of a recipe.

The student is the base model converted to NHA (or an already converted folder); the teacher is by default a
frozen copy of the base model taken BEFORE conversion, so it is exactly the model the student started from.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..errors import NHAError
from .recipe import Recipe

log = logging.getLogger("nha_convert.finetune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_base(name: str | None, dtype: torch.dtype, device: torch.device | str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) through nha_convert.hub when present, else transformers directly."""
    try:
        from ..hub import load_base_model
    except ImportError:
        load_base_model = None
    if load_base_model is not None:
        return load_base_model(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name is None:
        from .. import assets

        name = str(assets.smollm2_folder())
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise NHAError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    return model.to(device), tok


def teacher_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec]


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_models(recipe: Recipe, device: torch.device) -> tuple[nn.Module, nn.Module | None, Any]:
    """(student, teacher or None, tokenizer), the student in the recipe's dtype, both on `device`."""
    import nha_convert

    m, t = recipe.model, recipe.teacher
    dtype = DTYPES[m.dtype]
    t_dtype = teacher_dtype(t.dtype, device)
    teacher = None
    if m.converted is not None:
        from transformers import AutoTokenizer

        student = nha_convert.load(m.converted, dtype=dtype, device=str(device))
        tokenizer = AutoTokenizer.from_pretrained(m.converted)
        if t.model == "base":
            raise NHAError("teacher.model: base needs model.base; with model.converted, name the teacher model "
                           "(the base the folder was converted from)")
    else:
        torch.manual_seed(recipe.seed)  # any random init in the conversion is reproducible (resume needs it)
        student, tokenizer = load_base(m.base, dtype, device)
        if t.model == "base":
            teacher = copy.deepcopy(student).to(t_dtype)
        if m.nha is not None:
            settings = recipe.nha_settings()
            student = nha_convert.convert(student, settings, tokenizer=tokenizer, **(m.calibration or {}))
    if t.model not in (None, "base"):
        teacher, _ = load_base(t.model, t_dtype, device)
    if teacher is not None:
        freeze(teacher)
        if teacher.config.vocab_size != student.config.vocab_size:
            raise NHAError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                           f"({student.config.vocab_size}); use a teacher of the same model family")
    student.train()
    return student, teacher, tokenizer
