"""NHA model classes, one per supported architecture, registered with transformers' Auto classes.

`nha_<arch>` configs are the base config plus one field, `nha` (the resolved NHASettings dict). Models are the base
CausalLM classes whose attention modules are NHAAttention; their weights keep the base names plus `g_proj`, so a
converted checkpoint is a standard HF folder that `AutoModelForCausalLM.from_pretrained` loads once this package is
imported (no trust_remote_code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import NHACache
from .layer import NHAAttention

ATTN_IMPLEMENTATION = "nha"


def _padding_mask_only(batch_size: int, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Mask interface of NHA layers: the 2D padding mask itself (None when nothing is padded)."""
    if attention_mask is not None and bool(attention_mask.all()):
        return None
    return attention_mask


def _never_called(*args: Any, **kwargs: Any):
    raise RuntimeError("NHA layers compute attention themselves; the 'nha' attention function is never called")


ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _padding_mask_only)
ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _never_called)


class NHAModelMixin:
    """Swaps every decoder layer's attention for NHAAttention and drives generation with an NHACache."""

    _is_stateful = True  # no assisted generation / cache cropping

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = NHAAttention(layer.self_attn, config, i)
        self.config._attn_implementation = ATTN_IMPLEMENTATION

    def _check_and_adjust_attn_implementation(self, *args: Any, **kwargs: Any) -> str:
        return ATTN_IMPLEMENTATION

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            # Full-attention buffers sized once for prompt + new tokens (max_length is set by then).
            model_kwargs["past_key_values"] = NHACache(self.config, capacity=generation_config.max_length or 0)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, *args: Any, past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            if self.training:
                use_cache = False  # training never decodes; skip building the decode state
            else:
                past_key_values = NHACache(self.config)
        return super().forward(*args, past_key_values=past_key_values, use_cache=use_cache, **kwargs)


@dataclass(frozen=True)
class Architecture:
    base_model_type: str
    config_class: type
    model_class: type


def _make(base_type: str, base_config: type, base_model: type, name: str) -> Architecture:
    # One small config + model class per architecture; `strict` keeps the dataclass semantics of HF configs.
    cfg = strict(type(f"NHA{name}Config", (base_config,), {
        "model_type": f"nha_{base_type}",
        "__annotations__": {"nha": dict | None},
        "nha": None,
    }))
    model = type(f"NHA{name}ForCausalLM", (NHAModelMixin, base_model), {"config_class": cfg})
    AutoConfig.register(cfg.model_type, cfg)
    AutoModelForCausalLM.register(cfg, model)
    return Architecture(base_type, cfg, model)


ARCHITECTURES: dict[str, Architecture] = {
    a.base_model_type: a
    for a in (
        _make("llama", LlamaConfig, LlamaForCausalLM, "Llama"),
        _make("qwen2", Qwen2Config, Qwen2ForCausalLM, "Qwen2"),
        _make("qwen3", Qwen3Config, Qwen3ForCausalLM, "Qwen3"),
        _make("mistral", MistralConfig, MistralForCausalLM, "Mistral"),
    )
}

NHALlamaConfig = ARCHITECTURES["llama"].config_class
NHALlamaForCausalLM = ARCHITECTURES["llama"].model_class
