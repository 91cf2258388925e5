"""What one process needs to know of the others: its share of a batch, reductions, and FSDP's full weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..loading import DTYPES
from .schema import StageSpec
from .trainables import causal_lm


def micro_batches(rows: list[int], batch_size: int, grad_accum: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: micro-step m, rank r takes slice m*world + r."""
    return [rows[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size] for m in range(grad_accum)]


def reduce(accelerator: Any, x: Tensor, op: str) -> Tensor:
    """`op` ("sum" / "max") over processes; a single process skips the collective."""
    return accelerator.reduce(x, op) if accelerator.num_processes > 1 else x


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def unshard(module: nn.Module, student: nn.Module, stage: StageSpec, dtype: str, device: torch.device) -> nn.Module:
    """FSDP shards the student in place; gather its full weights on every process into a fresh, unsharded copy
    (same structure, LoRA included, so merge_lora works as without FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    full = {k.removeprefix("student."): v for k, v in full.items()}
    lm = causal_lm(student)
    fresh = AutoModelForCausalLM.from_config(lm.config, dtype=DTYPES[dtype])
    if stage.trains == "lora":
        from .trainables import add_lora

        fresh = add_lora(fresh, stage.lora)
    missing, unexpected = fresh.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"FSDP gather: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(lm.config, "tie_word_embeddings", False):
        causal_lm(fresh).tie_weights()
    return fresh.to(device)
