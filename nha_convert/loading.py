"""Loading models: the one dtype table, converted NHA checkpoints, and "whatever this name is" with its tokenizer.

Base models (the embedded default, aliases, folders, hub ids, offline use) are resolved by hub.py; converted
checkpoints are standard Hugging Face folders that transformers' Auto classes load once modeling.py has registered
the `nha_*` types. Fine-tuning, evaluation and the experiment scripts load converted checkpoints through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import NHAError

# Names a user or a recipe may give a dtype; "auto" is decided by the device (resolve_dtype).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """A dtype or its name; auto: bf16 on a GPU, fp32 on a CPU (bf16 matmuls are slow on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise NHAError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def folder_config(spec: str | os.PathLike) -> dict[str, Any]:
    """config.json of a local model folder as a dict ({} when spec is no such folder)."""
    cfg = Path(spec).expanduser() / "config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text())
    except ValueError:
        return {}


def is_nha_folder(spec: str | os.PathLike) -> bool:
    return str(folder_config(spec).get("model_type", "")).startswith("nha_")


def padded(tokenizer: Any) -> Any:
    """The tokenizer with its eos token as pad when it has no pad token (batching needs one)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_converted(path_or_id: str | os.PathLike, dtype: torch.dtype | str | None,
                   device: str | torch.device) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of a converted NHA checkpoint, the model in eval mode on `device`."""
    model = load(path_or_id, dtype=dtype, device=str(device))
    return model, padded(AutoTokenizer.from_pretrained(str(path_or_id)))
