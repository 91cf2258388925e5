"""Checkpoint / resume: a run stopped by Ctrl-C and resumed ends with bit-identical fp32 weights."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from nha_convert.finetune.recipe import parse_recipe
from nha_convert.finetune.checkpoints import checkpoint_dirs
from nha_convert.finetune.trainer import Interrupted, Trainer
from tests.helpers.finetune import recipe_text, save_tiny_base, write_corpus

STAGES = """
stages:
  - kind: distill
    name: lora
    trains: lora
    lora: {r: 4, dropout: 0.1}
    steps: 4
    batch_size: 2
    grad_accum: 2
    seq_len: 48
    lr: 5e-3
    ce_weight: 0.3
    temperature: 2.0
    loss_chunk: 32
    warmup_steps: 1
    eval_rows: 4
  - kind: finetune
    trains: attention
    steps: 3
    batch_size: 3
    seq_len: 32
    lr: 1e-3
    schedule: linear
    eval_rows: 4
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return save_tiny_base(root / "base", tie=True), write_corpus(root / "data"), root


def _recipe(setup, name):
    base, data, root = setup
    return parse_recipe(recipe_text(base, data, root / name, STAGES), f"{name}.yaml")


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _interrupt_at(step, sig=signal.SIGINT):
    def callback(global_step):
        if global_step == step:
            os.kill(os.getpid(), sig)  # the real path: the trainer's handler of Ctrl-C (SIGINT) or SIGTERM
    return callback


@pytest.fixture(scope="module")
def straight(setup):
    recipe = _recipe(setup, "straight")
    Trainer(recipe).run()
    return _weights(setup[2] / "straight")


# Mid LoRA stage (between checkpoints) by Ctrl-C, and in the second stage by SIGTERM (`timeout`, `kill`, preemption).
@pytest.mark.parametrize("stop_at,sig", [(3, signal.SIGINT), (5, signal.SIGTERM)])
def test_resume_is_bit_identical(setup, straight, stop_at, sig):
    name = f"stopped{stop_at}"
    run = setup[2] / name
    with pytest.raises(Interrupted) as info:
        Trainer(_recipe(setup, name), step_callback=_interrupt_at(stop_at, sig)).run()
    assert info.value.global_step == stop_at and info.value.signum == sig
    assert not (run / "model").exists()
    latest = checkpoint_dirs(run)[-1]
    assert json.loads((latest / "trainer_state.json").read_text())["global_step"] == stop_at

    Trainer(_recipe(setup, name), resume=True).run()
    resumed = _weights(run)
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert resumed[k].dtype == torch.float32
        assert torch.equal(resumed[k], straight[k]), k
    # The metrics log reads like one run: every step once.
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["global_step"] for r in steps if "loss" in r and "event" not in r]
    assert train_steps == list(range(1, 8))


def test_weights_changed_and_keep_checkpoints(setup, straight):
    base = load_file(str(setup[0] / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], straight[q])  # LoRA was merged and attention fine-tuned
    assert "model.layers.0.self_attn.g_proj.weight" in straight
    assert len(checkpoint_dirs(setup[2] / "straight")) == 2  # keep_checkpoints


def test_refuses_to_clobber_or_resume_nothing(setup, straight):
    from nha_convert.errors import NHAError

    with pytest.raises(NHAError, match="--resume"):
        Trainer(_recipe(setup, "straight")).run()
    with pytest.raises(NHAError, match="finished run"):
        Trainer(_recipe(setup, "straight"), resume=True).run()
    with pytest.raises(NHAError, match="no checkpoint"):
        Trainer(_recipe(setup, "empty"), resume=True).run()
