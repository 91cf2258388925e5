"""Decode-state size per sequence, computed from a config: what `nha-convert` and `nha-eval` report.

tests/model/test_model.py checks these formulas against the bytes an NHACache really holds.
"""

from __future__ import annotations

from typing import Any

import torch

from .settings import ResolvedNHA

FP32 = 4


def _dims(config: Any) -> tuple[int, int, int]:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, d


def kv_cache_bytes(config: Any, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """A standard full-attention KV cache: keys and values of every token, every layer."""
    n, h, d = _dims(config)
    return n * seq_len * h * 2 * d * torch.finfo(dtype).bits // 8


def nha_layer_state_bytes(window: int | None, slots: int, sinks: int, num_kv_heads: int, head_dim: int,
                          seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one layer's NHAState for one sequence after `seq_len` tokens (flags and counters included)."""
    e, h, d = torch.finfo(dtype).bits // 8, num_kv_heads, head_dim
    if window is None:  # growing buffer of RoPE'd keys, values and validity flags
        return seq_len * (h * 2 * d * e + 1) + sinks * (h * 2 * d * e + 8 + 1) + h * slots * 2 * d * FP32 + 16
    ring = window * (h * (3 * d * e + slots * FP32) + 2)  # k_rot, k, v, log-decays, valid + sink flags
    sink = sinks * (h * 2 * d * e + 8 + 1)  # k_rot, v, position, present
    slot = h * slots * 2 * d * FP32 + 8  # K~, V~ in fp32, fold count
    return ring + sink + slot + 8  # + real-token counter


def nha_state_bytes(config: Any, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Decode state of a whole NHA model for one sequence."""
    nha = ResolvedNHA.from_config(config)
    _, h, d = _dims(config)
    total = 0
    for i, w in enumerate(nha.windows):
        full = len(nha.full_heads.get(i, ()))  # exact heads: a KV buffer of their own, no slots or sinks
        if full:
            total += nha_layer_state_bytes(None, 0, 0, full, d, seq_len, dtype)
        if h > full:
            total += nha_layer_state_bytes(w, nha.slots, nha.sinks, h - full, d, seq_len, dtype)
    return total
