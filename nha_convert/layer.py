"""NHAAttention: a drop-in replacement for the transformers attention modules of Llama / Qwen2 / Qwen3 / Mistral.

Same forward contract as the module it replaces (hidden states, position embeddings, attention mask, cache), same
parameter names (q_proj, k_proj, v_proj, o_proj, q_norm / k_norm where the base has them) plus one new projection
g_proj: hidden -> (num_kv_heads * slots) gate logits. The attention mask it receives is the 2D padding mask
(see modeling.py: the "nha" mask interface), never a T x T matrix. Without a cache, position ids that restart
inside a row mark packed sequences (ops/packed.py, transformers' own rule), which are computed apart.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .backend import log_backend, triton_kernels
from .cache import HeadGroupsState
from .compat import pop_cache
from .errors import NHAError
from .ops import NHAState, gate_log_alpha, nha_chunk
from .ops.packed import cu_seqlens_of, flatten_rows, nha_chunk_varlen, unflatten_rows
from .settings import ResolvedNHA


class NHAAttention(nn.Module):
    """NHA layer built around a base attention module whose projections (and q_norm / k_norm) it adopts."""

    ADOPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    slots_masked = False  # eval/ablation.py: run as the same layer with m = 0 (exactly its sliding window)

    def __init__(self, base: nn.Module, config: Any, layer_idx: int, nha: ResolvedNHA | None = None):
        """`nha`: the config's settings when the caller resolved them once for all layers."""
        super().__init__()
        nha = nha or ResolvedNHA.from_config(config)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = base.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = base.scaling
        self.window: int | None = nha.windows[layer_idx]
        self.num_slots = nha.slots
        self.num_sinks = nha.sinks
        self.gate_temperature = nha.gate_temperature
        self.chunk_size = nha.chunk_size
        self.full_heads: tuple[int, ...] = nha.full_heads.get(layer_idx, ())  # exact heads (docs/design.md)
        self._head_index: dict[torch.device, Any] = {}  # _groups' index tensors per device
        self.is_causal = True
        for name in self.ADOPTED:
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        w = self.k_proj.weight
        self.g_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.num_slots, bias=True,
                                device=w.device, dtype=w.dtype)
        # The optional slot-logit bias b_h per query head (NHA.md); absent from older configs = no bias. Only layers
        # with slots get one. A frozen bias is a buffer: saved with the weights, never handed to an optimizer.
        init = None
        if (nha.slot_bias is not None and self.window is not None and self.num_slots > 0
                and len(self.full_heads) < self.num_kv_heads):  # every head exact: nothing reads the slots
            init = torch.full((config.num_attention_heads,), float(nha.slot_bias), device=w.device, dtype=w.dtype)
        if init is not None and not nha.slot_bias_trainable:
            self.register_buffer("slot_bias", init)
        else:
            self.slot_bias = None if init is None else nn.Parameter(init)

    def extra_repr(self) -> str:
        w = "full" if self.window is None else self.window
        bias = "" if self.slot_bias is None else ", slot_bias"
        heads = f", full_heads={list(self.full_heads)}" if self.full_heads else ""
        return (f"window={w}, slots={self.num_slots}, sinks={self.num_sinks}, tau={self.gate_temperature}"
                f"{bias}{heads}")

    def _layer_cache(self, cache: Any, use_cache: bool | None, kwargs: dict[str, Any]) -> Any:
        """This layer's NHALayerCache, or None when decoding state is not wanted; never silently lost.

        transformers has renamed the cache argument before (compat.py): a cache handed over under a name this
        package does not know, or `use_cache` on with no cache at all, would mean decoding without context.
        """
        stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
        if stray:
            raise NHAError(
                f"NHA layer {self.layer_idx} was handed its cache as `{stray[0]}=`, a name this nha-convert does not "
                f"know (transformers {transformers.__version__}); install a transformers version in the range that "
                "pyproject.toml declares, or add the name to nha_convert/compat.py"
            )
        if cache is None:
            if use_cache:
                raise NHAError(
                    f"use_cache=True but no cache reached NHA layer {self.layer_idx}: the decode state would be "
                    "lost; call the model through its CausalLM class, which creates an NHACache"
                )
            return None
        layers = getattr(cache, "nha_layers", None)
        if layers is None:
            raise NHAError(
                f"NHA layers need an NHACache, got {type(cache).__name__}; "
                "pass cache=NHACache(model.config) (past_key_values= before transformers 5.24) or let the model "
                "create one"
            )
        return layers[self.layer_idx]

    def project(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]):
        """q, k (unrotated, after q_norm/k_norm), their RoPE'd copies, v and log-decays, head-first."""
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        gates = self.g_proj(hidden_states).view(b, t, self.num_kv_heads, self.num_slots).transpose(1, 2)
        return q, q_rot, k, k_rot, v, gate_log_alpha(gates, self.gate_temperature)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        b, t, _ = hidden_states.shape
        cache = self._layer_cache(pop_cache(kwargs), use_cache, kwargs)
        parts = self.project(hidden_states, position_embeddings)
        valid = padding_mask(attention_mask, b, t, hidden_states.device)
        state = None if cache is None else cache.state
        ctx = dict(valid=valid, want_state=cache is not None, attention_mask=attention_mask,
                   position_ids=kwargs.get("position_ids"))
        if self.full_heads and self.window is not None:
            out, new = self._attend_head_groups(parts, state, **ctx)
        else:
            out, new = self._attend(parts, state, window=self.window, num_sinks=self.num_sinks,
                                    slot_bias=self.slot_bias, **ctx)
        if new is not None:
            cache.set_state(new)
        out = out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)
        return self.o_proj(out), None

    def _attend(self, parts: tuple[Tensor, ...], state: Any, *, window: int | None, num_sinks: int,
                slot_bias: Tensor | None, valid: Tensor, want_state: bool, attention_mask: Tensor | None,
                position_ids: Tensor | None) -> tuple[Tensor, NHAState | None]:
        """The op on head-first (q, q_rot, k, k_rot, v, log_alpha): (B, Hq, T, Dv) output, and the state a prefill
        builds when `want_state` (None after a decode step, which updates `state` in place)."""
        if self.slots_masked:  # --ablate slots: the op with m = 0 is this model's own sliding window (eval/ablation.py)
            parts, slot_bias = (*parts[:5], parts[5][..., :0]), None
        q, q_rot, k, k_rot, v, log_alpha = parts
        b, t = valid.shape
        bias = {} if slot_bias is None else {"slot_bias": slot_bias}  # none: the calls of before
        common = dict(window=window, num_sinks=num_sinks, scale=self.scaling, **bias)
        if state is not None:
            # Continue from the cache one token at a time: exact, and the usual decode case is t == 1.
            step = nha_decode_fn(q)
            return torch.stack(
                [step(state, q[:, :, i], q_rot[:, :, i], k[:, :, i], k_rot[:, :, i], v[:, :, i],
                      log_alpha[:, :, i], valid[:, i], scale=self.scaling, **bias) for i in range(t)],
                dim=2,
            ), None
        if not want_state and (cu := cu_seqlens_of(position_ids, b)) is not None:
            # Packed rows (training): the sequences that the position ids delimit never see each other.
            flat = [flatten_rows(x) for x in parts]
            # No attention mask: every position is real, and valid=None lets the kernels share one layout across
            # the layers of this forward (prep.make_layout) instead of rebuilding it in each.
            packed_valid = None if attention_mask is None else valid.reshape(1, -1)
            out, _ = nha_forward(*flat, valid=packed_valid, chunk_size=self.chunk_size, cu_seqlens=cu, **common)
            return unflatten_rows(out, b), None
        out, slots = nha_forward(q, q_rot, k, k_rot, v, log_alpha, valid=valid, chunk_size=self.chunk_size,
                                 return_state=want_state, **common)
        if not want_state:
            return out, None
        return out, NHAState.from_prefill(k, k_rot, v, log_alpha, valid, slots, window=window, num_sinks=num_sinks)

    def _attend_head_groups(self, parts: tuple[Tensor, ...], state: HeadGroupsState | None,
                            **ctx: Any) -> tuple[Tensor, HeadGroupsState | None]:
        """Exact heads: the full KV heads (with their query heads) run the op as a full layer does (window None, no
        slots, sinks or slot bias), the other heads as this NHA layer; outputs go back into head order."""
        q, q_rot, k, k_rot, v, log_alpha = parts
        groups, order = self._groups(q.device)
        outs, states = [], []
        for g, (kv, qh) in enumerate(groups):
            full = g == 0
            la = log_alpha.index_select(1, kv)
            group = (q.index_select(1, qh), q_rot.index_select(1, qh), k.index_select(1, kv),
                     k_rot.index_select(1, kv), v.index_select(1, kv), la[..., :0] if full else la)
            bias = None if full or self.slot_bias is None else self.slot_bias.index_select(0, qh)
            out, new = self._attend(group, None if state is None else state.states[g],
                                    window=None if full else self.window, num_sinks=0 if full else self.num_sinks,
                                    slot_bias=bias, **ctx)
            outs.append(out)
            states.append(new)
        out = outs[0] if order is None else torch.cat(outs, dim=1).index_select(1, order)
        return out, (HeadGroupsState(tuple(states)) if states[0] is not None else None)

    def _groups(self, device: torch.device) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """(KV heads, their query heads) of the full group, then of the NHA group (left out when empty), and where
        each query head sits in the groups' concatenated outputs (None: one group, already in order). Index
        tensors made once per device, outside any graph capture (the prefill builds them)."""
        if device not in self._head_index:
            g = self.config.num_attention_heads // self.num_kv_heads
            rest = [h for h in range(self.num_kv_heads) if h not in self.full_heads]
            groups = [(torch.tensor(kv, device=device),
                       torch.tensor([h * g + i for h in kv for i in range(g)], device=device))
                      for kv in ([list(self.full_heads)] + ([rest] if rest else []))]
            order = torch.cat([qh for _, qh in groups]).argsort() if rest else None
            self._head_index[device] = (groups, order)
        return self._head_index[device]


def padding_mask(attention_mask: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    """(B, t) bool validity of the current tokens from whatever mask transformers handed over."""
    if attention_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if attention_mask.dim() == 4:  # a prepared 4D mask: a key is real iff the last query may see it
        last = attention_mask[:, 0, -1, -t:]
        return last if last.dtype == torch.bool else last == 0
    return attention_mask[:, -t:].bool()


def nha_forward(q, q_rot, k, k_rot, v, log_alpha, cu_seqlens: Tensor | None = None, **kwargs):
    """The parallel NHA op (training, prefill): fused Triton kernels on CUDA, the torch reference elsewhere (the
    choice: backend.py); with `cu_seqlens` (B == 1), packed sequences, each on its own."""
    kernels = triton_kernels(q)
    log_backend("prefill: triton" if kernels else "prefill: torch")
    if kernels:
        return kernels.nha_chunk_triton(q, q_rot, k, k_rot, v, log_alpha, cu_seqlens=cu_seqlens, **kwargs)
    if cu_seqlens is not None:
        return nha_chunk_varlen(q, q_rot, k, k_rot, v, log_alpha, cu_seqlens=cu_seqlens, **kwargs)
    return nha_chunk(q, q_rot, k, k_rot, v, log_alpha, **kwargs)


def nha_decode_fn(q: Tensor):
    """The decode step: nha_kernels.nha_decode_step on CUDA (same contract as NHAState.step, updates the state in
    place), else NHAState.step."""
    kernels = triton_kernels(q)
    log_backend("decode: triton" if kernels else "decode: torch")
    if kernels:
        return kernels.nha_decode_step
    return lambda state, *args, **kw: state.step(*args, **kw)

