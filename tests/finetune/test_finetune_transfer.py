"""Attention transfer: training the gates lowers every NHA layer's MSE to the teacher's attention output."""

from __future__ import annotations

import json

import torch

from nha_convert.finetune.recipe import parse_recipe
from nha_convert.finetune.attention_hooks import attention_modules, capture_attention, substitute_attention_inputs
from nha_convert.finetune.trainer import Trainer
from tests.helpers.finetune import byte_tokenizer, recipe_text, tiny_llama, write_corpus

STAGES = """
stages:
  - kind: attention_transfer
    trains: gates
    steps: 8
    batch_size: 4
    seq_len: 64
    lr: 3e-2
    schedule: constant
    eval_rows: 8
"""


def _peaky_base(folder):
    """A tiny Llama whose attention is sharp (scaled q/k), so a w=4 window misses what full attention sees."""
    model = tiny_llama(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_attention_transfer_lowers_every_layer_mse(tmp_path):
    base = _peaky_base(tmp_path / "base")
    data = write_corpus(tmp_path / "data")
    recipe = parse_recipe(recipe_text(base, data, tmp_path / "run", STAGES, nha="{window: 4, slots: 4}"), "t.yaml")
    trainer = Trainer(recipe)
    trainer.run()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    before, after = evals[0]["val_mse_per_layer"], evals[-1]["val_mse_per_layer"]
    assert len(before) == len(after) == 2
    for b, a in zip(before, after):
        assert a < 0.9 * b, (before, after)


def test_hooks_feed_the_student_the_teacher_hidden_states():
    # With identical weights and the teacher's inputs substituted, the student's attention outputs equal the
    # teacher's exactly, even where the student's own residual stream would differ (a perturbed MLP).
    teacher = tiny_llama(0)
    student = tiny_llama(0)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(3)
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture_attention(attention_modules(teacher)) as (ins, outs):
        teacher.model(input_ids=ids, attention_mask=mask, use_cache=False)
        with substitute_attention_inputs(attention_modules(student), ins) as s_outs:
            student.model(input_ids=ids, attention_mask=mask, use_cache=False)
    for s, t in zip(s_outs, outs):
        torch.testing.assert_close(s, t)
    with torch.no_grad(), capture_attention(attention_modules(student)) as (_, own):
        student.model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert not torch.allclose(own[1], outs[1])  # without substitution layer 1 sees a different input
