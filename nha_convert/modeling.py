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
from .compat import CACHE_KWARG, pop_cache
from .errors import NHAError
from .layer import NHAAttention
from .settings import ResolvedNHA

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
        nha = ResolvedNHA.from_config(config)  # read and validated once for all layers
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = NHAAttention(layer.self_attn, config, i, nha)
        self.config._attn_implementation = ATTN_IMPLEMENTATION

    def _check_and_adjust_attn_implementation(self, *args: Any, **kwargs: Any) -> str:
        return ATTN_IMPLEMENTATION

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        cache = pop_cache(model_kwargs)  # a user's cache under either name goes on under this version's name
        if cache is None and generation_config.use_cache is not False:
            # Full-attention buffers sized once for prompt + new tokens (max_length is set by then).
            cache = NHACache(self.config, capacity=generation_config.max_length or 0)
        if cache is not None:
            model_kwargs[CACHE_KWARG] = cache
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(self, *args: Any, use_cache: bool | None = None, **kwargs: Any):
        cache = pop_cache(kwargs)  # either name from the caller; passed on under this version's name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            if self.training:
                use_cache = False  # training never decodes; skip building the decode state
            else:
                cache = NHACache(self.config)
        out = super().forward(*args, use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)
        if cache is not None and any(layer.state is None for layer in cache.nha_layers):
            # A layer that never filled its state ran without the cache: its output has no past context.
            raise NHAError("an NHA layer computed without its cache (the cache argument was lost on the way); "
                           "install a transformers version in the range that pyproject.toml declares")
        return out


# One config + model class per architecture, each under an importable module-level name (pickle, DataLoader
# workers and deepcopy find classes by name). `strict` keeps the dataclass semantics of HF configs.
@strict
class NHALlamaConfig(LlamaConfig):
    model_type = "nha_llama"
    nha: dict | None = None


@strict
class NHAQwen2Config(Qwen2Config):
    model_type = "nha_qwen2"
    nha: dict | None = None


@strict
class NHAQwen3Config(Qwen3Config):
    model_type = "nha_qwen3"
    nha: dict | None = None


@strict
class NHAMistralConfig(MistralConfig):
    model_type = "nha_mistral"
    nha: dict | None = None


class NHALlamaForCausalLM(NHAModelMixin, LlamaForCausalLM):
    config_class = NHALlamaConfig


class NHAQwen2ForCausalLM(NHAModelMixin, Qwen2ForCausalLM):
    config_class = NHAQwen2Config


class NHAQwen3ForCausalLM(NHAModelMixin, Qwen3ForCausalLM):
    config_class = NHAQwen3Config


class NHAMistralForCausalLM(NHAModelMixin, MistralForCausalLM):
    config_class = NHAMistralConfig


@dataclass(frozen=True)
class Architecture:
    base_model_type: str
    config_class: type
    model_class: type


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", NHALlamaConfig, NHALlamaForCausalLM),
    "qwen2": Architecture("qwen2", NHAQwen2Config, NHAQwen2ForCausalLM),
    "qwen3": Architecture("qwen3", NHAQwen3Config, NHAQwen3ForCausalLM),
    "mistral": Architecture("mistral", NHAMistralConfig, NHAMistralForCausalLM),
}
for _arch in ARCHITECTURES.values():
    AutoConfig.register(_arch.config_class.model_type, _arch.config_class)
    AutoModelForCausalLM.register(_arch.config_class, _arch.model_class)
