"""Tiny random models of every supported architecture and a left-padded batch, shared by the model tests."""

from __future__ import annotations

import torch
import transformers as tf

SMALL = dict(hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
ARCHS = {  # the base architectures nha-convert supports: (config class, CausalLM class)
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
}


def tiny(arch="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    return model_cls(config_cls(**{**SMALL, **overrides})).eval()


def batch(t=40, b=3, pad=(0, 7, 13), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (b, t), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        mask[row, :n] = 0  # left padding
    return ids, mask


def max_diff(a, b, mask):
    return ((a - b) * mask.bool()[..., None]).abs().max().item()


def prefill_then_decode(model, ids, mask, prefill):
    """(logits of one full forward, logits of a prefill of `prefill` tokens then one token at a time, the cache)."""
    from nha_convert import NHACache

    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = NHACache(model.config)
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    return full, torch.cat(steps, 1), cache
