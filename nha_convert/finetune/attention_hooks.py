"""Forward hooks on the decoder's attention modules, for attention transfer.

The teacher's hooks record each attention module's input hidden states and output; the student's replace each
module's input with the teacher's, so both compute attention on the same hidden states layer by layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from ..errors import NHAError
from .trainables import causal_lm


def attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(causal_lm(model).model, "layers", None)
    if layers is None:
        raise NHAError(f"{type(causal_lm(model)).__name__} has no decoder layers at .model.layers; "
                       "attention transfer supports Llama / Qwen2 / Qwen3 / Mistral models")
    return [layer.self_attn for layer in layers]


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _hooked(modules: list[nn.Module], pre) -> Iterator[list[Tensor | None]]:
    """Install `pre(i)` (a forward pre-hook factory) and a hook that records each module's output."""
    outputs: list[Tensor | None] = [None] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def post(mod, args, kwargs, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out

        handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_attention(modules: list[nn.Module]) -> Iterator[tuple[list[Tensor | None], list[Tensor | None]]]:
    """Record each attention module's input hidden states and output (teacher side)."""
    inputs: list[Tensor | None] = [None] * len(modules)

    def pre(i: int):
        def hook(mod, args, kwargs):
            inputs[i] = _hidden_of(args, kwargs)
        return hook

    with _hooked(modules, pre) as outputs:
        yield inputs, outputs


@contextlib.contextmanager
def substitute_attention_inputs(modules: list[nn.Module], inputs: list[Tensor]) -> Iterator[list[Tensor | None]]:
    """Run each attention module on the given inputs instead of its own, recording the outputs (student side).

    The student then computes its attention on exactly the teacher's hidden states, layer by layer, inside an
    ordinary forward pass (which keeps DDP / FSDP / gradient checkpointing in charge of the parameters).
    """
    def pre(i: int):
        def hook(mod, args, kwargs):
            x = inputs[i].to(_hidden_of(args, kwargs).dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return hook

    with _hooked(modules, pre) as outputs:
        yield outputs


def freeze_unused_gates(model: nn.Module) -> None:
    """Gates of full-attention layers (window None) never reach the output, and empty ones (0 slots) hold
    nothing: training them would only leave DDP waiting for gradients that never come."""
    for attn in attention_modules(model):
        g = getattr(attn, "g_proj", None)
        if g is None:
            continue
        if (getattr(attn, "window", 0) is None or getattr(attn, "num_slots", 1) == 0
                or len(getattr(attn, "full_heads", ())) == getattr(attn, "num_kv_heads", -1)):  # every head exact
            for p in g.parameters():
                p.requires_grad_(False)
