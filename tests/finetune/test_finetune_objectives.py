"""Stage objectives: one per stage kind of the recipe schema, and the numbers each reports from summed statistics."""

from __future__ import annotations

import math

import pytest
import torch

from nha_convert.errors import NHAError
from nha_convert.finetune.budget import PROVISIONAL, StepBudget, lr_factor
from nha_convert.finetune.objectives import OBJECTIVES, Objective, objective_class, objective_for
from nha_convert.finetune.schema import STAGE_KINDS, StageSpec


def test_one_objective_per_stage_kind():
    assert sorted(OBJECTIVES) == sorted(STAGE_KINDS)
    for kind in STAGE_KINDS:
        objective = objective_for(StageSpec(kind=kind))
        assert isinstance(objective, Objective) and objective.kind == kind
    assert [k for k in STAGE_KINDS if not objective_class(k).needs_teacher] == ["finetune"]


def test_unknown_kind_is_a_one_line_error():
    with pytest.raises(NHAError) as info:
        objective_for(StageSpec.model_construct(kind="pretrain"))
    message = str(info.value)
    assert "\n" not in message and "'pretrain'" in message
    assert all(k in message for k in STAGE_KINDS)


# The formulas trainer.stage_loss_value had, on statistics whose quotients are exact in float32.
def test_attention_transfer_values():
    objective = objective_for(StageSpec(kind="attention_transfer"))
    stats = torch.tensor([1.0, 2.0, 5.0])  # per-layer MSE sums
    assert objective.stage_loss_value(stats, 4.0) == 2.0  # stats.sum() / denom
    assert objective.held_out_record(stats, 4.0) == {"val_loss": 2.0 / 3, "val_mse_per_layer": [0.25, 0.5, 1.25]}
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids, pos = torch.zeros_like(mask), torch.arange(4).expand(2, 4)
    assert objective.denominator(ids, mask, pos) == 5.0  # real tokens


def test_distill_values():
    objective = objective_for(StageSpec(kind="distill", ce_weight=0.25))
    stats = torch.tensor([3.0, 5.0, 8.0])  # KL sum, CE sum, positions
    assert objective.stage_loss_value(stats, 4.0) == 0.875  # ((1 - w) * KL + w * CE) / denom
    record = objective.held_out_record(stats, 4.0)
    assert list(record) == ["val_loss", "val_ce", "val_ppl", "val_kl"]  # the order of metrics.jsonl's eval line
    assert record == {"val_loss": 0.875, "val_ce": 1.25, "val_ppl": math.exp(1.25), "val_kl": 0.75}


def test_finetune_values():
    objective = objective_for(StageSpec(kind="finetune"))
    stats = torch.tensor([0.0, 5.0, 8.0])
    assert objective.stage_loss_value(stats, 4.0) == 1.25  # CE / denom
    assert objective.held_out_record(stats, 4.0) == {"val_loss": 1.25, "val_ce": 1.25, "val_ppl": math.exp(1.25)}
    assert objective.held_out_record(torch.tensor([0.0, 400.0, 8.0]), 4.0)["val_ppl"] == math.exp(50.0)  # capped
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids, pos = torch.zeros_like(mask), torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])  # row 2 packs two pieces
    assert objective.denominator(ids, mask, pos) == 4.0  # next-token targets inside each piece: 2 + 1 + 1


def test_step_budget_feeds_the_lr_schedule():
    stage = StageSpec(kind="finetune", minutes=1.0, schedule="linear", min_lr_ratio=0.0)
    budget = StepBudget(stage, world=1)
    assert budget.planned is None and budget.steps == PROVISIONAL and budget.left(10) == PROVISIONAL - 10
    f = lr_factor(stage, budget)
    budget.fix(10)  # a time budget fixed after timing: the schedule decays over the fixed count at once
    assert (f(5), budget.left(10)) == (0.5, 0)
    tokens = StepBudget(StageSpec(kind="finetune", tokens=1000, batch_size=2, grad_accum=2, seq_len=100), world=2)
    assert tokens.planned == tokens.steps == 2  # ceil(1000 / (2 * 2 * 2 * 100))
    assert not tokens.past_deadline()  # no max_minutes


def test_loss_weight_of_a_token_scales_the_term_that_predicts_it():
    """Rows.loss_weight[t] weighs the prediction OF token t, made at position t - 1 (and within its own piece)."""
    from tests.helpers.finetune import tiny_llama

    model = tiny_llama(layers=1).double()
    objective = objective_for(StageSpec(kind="finetune"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)  # two packed pieces per row
    plain, _ = objective.forward(model, None, ids, mask, pos)
    weight = torch.ones(2, 12, dtype=torch.float64)
    ones, _ = objective.forward(model, None, ids, mask, pos, loss_weight=weight)
    torch.testing.assert_close(ones, plain)
    weight[1, 3] = 4.0  # token 3 of row 1: predicted at position 2
    weight[0, 5] = 9.0  # the first token of a piece: nothing predicts it, no change
    weighted, _ = objective.forward(model, None, ids, mask, pos, loss_weight=weight)
    logits = model(input_ids=ids, position_ids=pos).logits
    ce = torch.nn.functional.cross_entropy(logits[1, 2], ids[1, 3])
    torch.testing.assert_close(weighted - plain, 3.0 * ce.float())
