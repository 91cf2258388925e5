"""Saving and loading NHA checkpoints as standard Hugging Face folders, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .errors import NHAError


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise NHAError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise NHAError(f"output path {out} exists and is not a folder")
    return out


def save(model: PreTrainedModel, tokenizer: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `out_dir`.

    Everything goes to a temporary folder beside `out_dir`, which is renamed into place only once complete:
    an interrupted save never leaves a folder that looks like a checkpoint.
    """
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | None = None,
         **kwargs: Any) -> PreTrainedModel:
    """Load a converted NHA checkpoint (local folder or hub id); same model as AutoModelForCausalLM gives."""
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype or "auto", **kwargs)
    if not model.config.model_type.startswith("nha_"):
        raise NHAError(f"{path_or_id} is a {model.config.model_type!r} model, not a converted NHA model; "
                       "run nha-convert on it first")
    if device is not None:
        model = model.to(device)
    return model.eval()
