"""Stage objectives: one class per stage kind, in a registry keyed by the kind string.

An objective owns everything that differs between kinds: what the teacher must produce for a batch, the loss of a
batch and its detached statistics, the denominators that turn those summed statistics into per-token values, the
loss reported per step and the held-out record. The trainer looks the objective up once per stage and never
branches on the kind.

Statistics: attention_transfer -> per-layer MSE sums (L,); distill / finetune -> [KL sum, CE sum, positions].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import NHAError
from .attention_hooks import attention_modules, capture_attention, substitute_attention_inputs
from ..losses import attention_mse, lm_objective, next_token_targets
from .trainables import causal_lm

if TYPE_CHECKING:  # schema derives its stage kinds from OBJECTIVES, so it imports this module
    from .schema import StageSpec

TeacherOutputs = dict[str, Any]  # keyword arguments of Objective.forward, from Objective.teacher_pass


class Objective:
    """The protocol: one instance per stage (it reads the stage's loss settings)."""

    kind: ClassVar[str]
    needs_teacher: ClassVar[bool] = True

    def __init__(self, stage: StageSpec):
        self.stage = stage

    def teacher_pass(self, teacher: nn.Module, input_ids: Tensor, position_ids: Tensor,
                     autocast: Callable) -> TeacherOutputs:
        """What the teacher contributes to the loss of these packed rows (implementations run under no_grad)."""
        raise NotImplementedError

    def forward(self, student: nn.Module, teacher: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor, **teacher_out: Any) -> tuple[Tensor, Tensor]:
        """(loss sum, detached statistics) of one micro-batch."""
        raise NotImplementedError

    def denominator(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> float:
        """What the held-out statistics are divided by (positions that count)."""
        raise NotImplementedError

    def step_denominator(self, student: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         position_ids: Tensor) -> float:
        """What a training step's loss sum is divided by (the whole global batch; see trainer.py)."""
        return self.denominator(input_ids, attention_mask, position_ids)

    def stage_loss_value(self, stats: Tensor, denom: float) -> float:
        """The stage objective per token from summed statistics (the `loss` of metrics.jsonl)."""
        raise NotImplementedError

    def held_out_record(self, stats: Tensor, denom: float) -> dict[str, Any]:
        """The fields of an `eval` line of metrics.jsonl (order kept: it is the line's order)."""
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.kind] = cls
    return cls


def objective_class(kind: str) -> type[Objective]:
    try:
        return OBJECTIVES[kind]
    except KeyError:
        raise NHAError(f"unknown stage kind {kind!r}; known kinds: {', '.join(OBJECTIVES)}") from None


def objective_for(stage: StageSpec) -> Objective:
    return objective_class(stage.kind)(stage)


def _targets_count(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> float:
    return float((next_token_targets(input_ids, attention_mask, position_ids) != -100).sum())


@register
class AttentionTransfer(Objective):
    """MSE of each NHA layer's attention output to the teacher's, on the teacher's hidden states."""

    kind = "attention_transfer"

    @torch.no_grad()
    def teacher_pass(self, teacher: nn.Module, input_ids: Tensor, position_ids: Tensor,
                     autocast: Callable) -> TeacherOutputs:
        with autocast(), capture_attention(attention_modules(teacher)) as (ins, outs):
            teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return {"teacher_inputs": ins, "teacher_outputs": outs}

    def forward(self, student: nn.Module, teacher: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor, teacher_inputs: list[Tensor] | None = None,
                teacher_outputs: list[Tensor] | None = None, **_: Any) -> tuple[Tensor, Tensor]:
        self._substituted = (attention_modules(student), teacher_inputs)  # for checkpoint_contexts
        with substitute_attention_inputs(*self._substituted) as outs:
            causal_lm(student).model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        per_layer = attention_mse(outs, teacher_outputs, attention_mask)
        return per_layer.sum(), per_layer.detach()

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's context_fn under gradient checkpointing: a decoder layer recomputed in the
        backward (after forward's hooks are gone) must run its attention on the teacher's inputs again."""
        import contextlib

        return contextlib.nullcontext(), substitute_attention_inputs(*self._substituted)

    def denominator(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> float:
        return float(attention_mask.sum())

    def step_denominator(self, student: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         position_ids: Tensor) -> float:
        # the loss sums every layer: per token and layer
        return float(int(attention_mask.sum()) * len(attention_modules(student)))

    def stage_loss_value(self, stats: Tensor, denom: float) -> float:
        return float(stats.sum() / denom)

    def held_out_record(self, stats: Tensor, denom: float) -> dict[str, Any]:
        per_layer = (stats / denom).tolist()
        return {"val_loss": sum(per_layer) / len(per_layer), "val_mse_per_layer": per_layer}


class _LanguageModel(Objective):
    """Next-token losses through the chunked LM head; CE is always computed (held-out perplexity)."""

    want_kl: ClassVar[bool] = False

    @torch.no_grad()
    def teacher_pass(self, teacher: nn.Module, input_ids: Tensor, position_ids: Tensor,
                     autocast: Callable) -> TeacherOutputs:
        if not self.want_kl:
            return {}
        with autocast():
            hidden = teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return {"teacher_hidden": hidden}

    def forward(self, student: nn.Module, teacher: nn.Module | None, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor, teacher_hidden: Tensor | None = None, loss_weight: Tensor | None = None,
                **_: Any) -> tuple[Tensor, Tensor]:
        """`loss_weight` (B, T): the weight of predicting each token (data.Rows), None for all 1."""
        lm, s, kl_on = causal_lm(student), self.stage, self.want_kl
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        targets = next_token_targets(input_ids, attention_mask, position_ids)
        target_weight = None
        if loss_weight is not None:  # position t predicts token t + 1
            target_weight = torch.ones_like(loss_weight)
            target_weight[:, :-1] = loss_weight[:, 1:]
        loss, kl, ce, n = lm_objective(hidden, targets, lm.get_output_embeddings(), teacher_hidden=teacher_hidden,
                                       teacher_head=teacher.get_output_embeddings() if kl_on else None,
                                       temperature=s.temperature, ce_weight=s.ce_weight if kl_on else 1.0,
                                       want_kl=kl_on, chunk=s.loss_chunk, target_weight=target_weight)
        return loss, torch.stack([kl, ce, kl.new_tensor(float(n))])

    def denominator(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> float:
        return _targets_count(input_ids, attention_mask, position_ids)

    def stage_loss_value(self, stats: Tensor, denom: float) -> float:
        return float(stats[1] / denom)

    def held_out_record(self, stats: Tensor, denom: float) -> dict[str, Any]:
        ce = float(stats[1] / denom)
        return {"val_loss": self.stage_loss_value(stats, denom), "val_ce": ce, "val_ppl": math.exp(min(ce, 50.0))}


@register
class Finetune(_LanguageModel):
    """Cross-entropy on the data; no teacher."""

    kind = "finetune"
    needs_teacher = False


@register
class Distill(_LanguageModel):
    """KL to the teacher's next-token distribution, mixed with CE by ce_weight."""

    kind = "distill"
    want_kl = True

    def stage_loss_value(self, stats: Tensor, denom: float) -> float:
        w = self.stage.ce_weight
        return float(((1 - w) * stats[0] + w * stats[1]) / denom)

    def held_out_record(self, stats: Tensor, denom: float) -> dict[str, Any]:
        return {**super().held_out_record(stats, denom), "val_kl": float(stats[0] / denom)}


# --- the module accelerate wraps -------------------------------------------------------------------


class StageLoss(nn.Module):
    """Student + the stage objective; returns (loss sum, detached statistics).

    The loss is computed inside forward so that DDP / FSDP see one forward per micro-step and the LM head's
    parameters are available (FSDP) while the chunked losses run.
    """

    def __init__(self, student: nn.Module, stage: StageSpec, teacher: nn.Module | None,
                 objective: Objective | None = None):
        super().__init__()
        self.student = student
        self.stage = stage
        self.objective = objective or objective_for(stage)
        self._teacher = [teacher]  # a list: the teacher must not become a submodule (not trained, not sharded)
        # FSDP's auto-wrap policy shards per decoder layer, read from here.
        self._no_split_modules = list(getattr(causal_lm(student), "_no_split_modules", None) or [])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                **teacher_out: Any) -> tuple[Tensor, Tensor]:
        """Packed rows (data.py): the model sees the position ids only (they keep the pieces apart); the
        attention mask marks real tokens for the loss."""
        return self.objective.forward(self.student, self._teacher[0], input_ids, attention_mask, position_ids,
                                      **teacher_out)


@torch.no_grad()
def teacher_pass(teacher: nn.Module, stage: StageSpec, input_ids: Tensor, position_ids: Tensor,
                 autocast: Callable, objective: Objective | None = None) -> TeacherOutputs:
    """The teacher on the same packed rows: with no attention mask, transformers derives the block-diagonal causal
    mask of its full-attention layers from the position ids (masking_utils.find_packed_sequence_indices)."""
    return (objective or objective_for(stage)).teacher_pass(teacher, input_ids, position_ids, autocast)
