"""Turn a pretrained CausalLM into its NHA counterpart, in place.

q/k/v/o (and biases, q_norm / k_norm) are adopted unchanged; the only new weights are the gate projections
W_g: hidden -> (num_kv_heads * slots), initialised as NHA.md describes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .errors import NHAError
from .layer import NHAAttention
from .modeling import ARCHITECTURES, ATTN_IMPLEMENTATION
from .settings import NHASettings, ResolvedNHA


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture_for(model_type: str):
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        if model_type.startswith("nha_"):
            raise NHAError(f"this model is already an NHA model ({model_type}); load it with nha_convert.load")
        raise NHAError(
            f"unsupported model type {model_type!r}; nha-convert supports {', '.join(supported_model_types())}"
        )
    return arch


def nha_config_for(base_config, settings: NHASettings):
    """The NHA config: the base config's fields plus the resolved `nha` dict."""
    arch = architecture_for(base_config.model_type)
    n = base_config.num_hidden_layers
    kv_heads = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    settings.validate(n, getattr(base_config, "max_position_embeddings", None), kv_heads)
    fields = base_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config"):
        fields.pop(key, None)
    cfg = arch.config_class(**fields, nha=settings.to_config(n))
    cfg.architectures = [arch.model_class.__name__]
    return cfg


# gate_init "multiscale": the memory horizons 1 / (1 - decay) of a head's slots at W_g x = 0, log-uniform over this
# range. pooled-k's zero bias gives every slot a mean decay of 0.5 ** (1 / tau) (0.917 at tau = 8: a horizon of
# ~12 tokens), so at the start nothing stays in the slots for the thousands of tokens a retrieval needs.
MULTISCALE_HORIZONS = (16.0, 16384.0)


def multiscale_gate_bias(m: int, tau: float) -> torch.Tensor:
    """(m,) biases b_j with exp(logsigmoid(b_j) / tau) = 1 - 1 / H_j, H_j log-uniform over MULTISCALE_HORIZONS."""
    lo, hi = (torch.tensor(h, dtype=torch.float64).log() for h in MULTISCALE_HORIZONS)
    horizons = torch.exp(torch.linspace(float(lo), float(hi), m, dtype=torch.float64)) if m > 1 else lo.exp()[None]
    return torch.logit((1 - 1 / horizons) ** tau)


@torch.no_grad()
def init_gate(g_proj: nn.Linear, k_proj: nn.Linear, num_kv_heads: int, head_dim: int, nha: ResolvedNHA) -> None:
    """W_g per KV head: the head's key rows average-pooled down to m rows (tiled where m > d_k), or constant;
    multiscale adds per-slot biases of long and short memory horizons to the pooled rows."""
    m = nha.slots
    if m == 0:
        return
    if nha.gate_init == "constant":
        # logsigmoid(b) / tau = log(decay)  =>  sigmoid(b) = decay ** tau
        target = torch.tensor(nha.gate_decay ** nha.gate_temperature, dtype=torch.float64)
        g_proj.weight.zero_()
        g_proj.bias.fill_(float(torch.logit(target)))
        return
    w = k_proj.weight.float().view(num_kv_heads, head_dim, -1)
    pooled = F.adaptive_avg_pool1d(w.transpose(1, 2), m).transpose(1, 2) if m <= head_dim else \
        w.repeat(1, -(-m // head_dim), 1)[:, :m]
    g_proj.weight.copy_(pooled.reshape(num_kv_heads * m, -1))
    if k_proj.bias is not None:
        b = k_proj.bias.float().view(num_kv_heads, 1, head_dim)
        pooled_b = F.adaptive_avg_pool1d(b, m) if m <= head_dim else b.repeat(1, 1, -(-m // head_dim))[..., :m]
        g_proj.bias.copy_(pooled_b.reshape(-1))
    else:
        g_proj.bias.zero_()
    if nha.gate_init == "multiscale":
        g_proj.bias.add_(multiscale_gate_bias(m, nha.gate_temperature).to(g_proj.bias).repeat(num_kv_heads))


def convert(model: PreTrainedModel, settings: NHASettings | None = None, tokenizer: Any = None,
            **selection: Any) -> PreTrainedModel:
    """Convert `model` (llama / qwen2 / qwen3 / mistral CausalLM) to NHA in place and return it.

    full_layers / full_heads "auto:K" score layers / heads on calibration data, which needs `tokenizer`;
    `selection` passes options to layer_selection.select_full_layers and head_selection.select_full_heads (seq_len,
    text_seqs, retrieval_docs, batch_size)."""
    settings = settings or NHASettings()
    arch = architecture_for(model.config.model_type)
    old, cfg = model.config, nha_config_for(model.config, settings)  # validates the settings
    for name, k in (("full_layers", settings.auto_full_layers()), ("full_heads", settings.auto_full_heads())):
        if k is not None and tokenizer is None:  # checked before the model is touched
            raise NHAError(f"{name} auto:K scores on calibration text and needs the tokenizer; "
                           "call convert(model, settings, tokenizer=tokenizer)")
    cfg._attn_implementation = ATTN_IMPLEMENTATION
    for module in model.modules():  # every submodule that shared the base config now shares the NHA one
        if getattr(module, "config", None) is old:
            module.config = cfg
    resolved = ResolvedNHA.from_config(cfg)
    for i, layer in enumerate(model.model.layers):
        nha = NHAAttention(layer.self_attn, cfg, i, resolved)
        init_gate(nha.g_proj, nha.k_proj, nha.num_kv_heads, nha.head_dim, resolved)
        layer.self_attn = nha
    model.__class__ = arch.model_class  # same weights and modules; NHA generation / cache behaviour
    k = settings.auto_full_layers()
    if k is not None:
        from .layer_selection import select_full_layers

        select_full_layers(model, tokenizer, k, **selection)
    k = settings.auto_full_heads()
    if k is not None:  # after the layers: heads are chosen among the layers that stay NHA
        from .head_selection import select_full_heads

        select_full_heads(model, tokenizer, k, **selection)
    return model
