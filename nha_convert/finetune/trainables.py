"""What a stage trains.

- gates:       the new NHA parameters only: gate projections (g_proj) and trainable slot-logit biases;
- lora:        LoRA adapters (peft) on the attention projections named in `lora.targets`, plus the gates;
- attention:   every attention parameter (q/k/v/o, q_norm/k_norm, biases, gates);
- all_but_mlp: everything except the MLP blocks (embeddings, norms, attention, LM head).

Everything else is frozen. LoRA adapters are merged into the weights at the end of their stage, so later stages and
the saved model see plain weights.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

from ..errors import NHAError

if TYPE_CHECKING:  # schema imports objectives, which imports this module
    from .schema import LoraSpec


def is_gate(name: str) -> bool:
    """The new NHA parameters (gate projections, slot-logit biases): trained by `trains: gates`, at `gate_lr`."""
    return ".g_proj." in name or name.endswith(".g_proj") or name.endswith(".slot_bias")


def _is_attention(name: str) -> bool:
    return ".self_attn." in name


def _is_mlp(name: str) -> bool:
    return ".mlp." in name


def select_trainables(model: nn.Module, trains: str, lora: LoraSpec, *, fp32_trainables: bool = False) -> nn.Module:
    """Freeze / unfreeze in place (LoRA wraps the model with peft); returns the model to train."""
    for p in model.parameters():
        p.requires_grad_(False)
    if trains == "lora":
        model = add_lora(model, lora)
        for name, p in model.named_parameters():
            if "lora_" in name or is_gate(name):
                p.requires_grad_(True)
    else:
        pick = {"gates": is_gate, "attention": _is_attention, "all_but_mlp": lambda n: not _is_mlp(n)}[trains]
        for name, p in model.named_parameters():
            if pick(name):
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        why = " (this model has no NHA gates: convert it, or train lora / attention)" if trains == "gates" else ""
        raise NHAError(f"trains: {trains} selects no parameters{why}")
    if fp32_trainables:  # bf16 frozen weights, fp32 trainable ones (autocast handles the mixed matmuls)
        for p in params:
            p.data = p.data.float()
    return model


def add_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules()]
    pattern = rf".*\.self_attn\.({'|'.join(map(re.escape, lora.targets))})"
    if not any(re.fullmatch(pattern, n) for n in names):
        raise NHAError(f"no attention module matches the LoRA targets {lora.targets}; "
                       "use names like q_proj, k_proj, v_proj, o_proj")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern, bias="none")
    return get_peft_model(model, cfg)


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and drop the adapters (a no-op for a model without LoRA)."""
    if not is_peft(model):
        return model
    merged = model.merge_and_unload(safe_merge=True)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a (possibly peft-wrapped) model."""
    return model.get_base_model() if is_peft(model) else model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
