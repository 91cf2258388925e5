"""The optional slot-logit bias b_h at model level (NHA.md, "Slot-logit bias"): settings, conversion, training flag,
decode, save/load and `nha-convert --slot-bias`. The op-level properties are in test_ops.py / test_kernels.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.helpers.cli import run_convert as run
from tests.helpers.models import batch, max_diff, tiny

import nha_convert
from nha_convert import NHACache, NHAError, NHASettings, convert


def biases(model) -> list[torch.Tensor | None]:
    return [layer.self_attn.slot_bias for layer in model.model.layers]


def test_no_setting_means_no_bias_and_an_unchanged_config():
    model = convert(tiny(), NHASettings(window=4, slots=8))
    assert biases(model) == [None, None, None]
    assert not any("slot_bias" in name for name, _ in model.named_parameters())
    assert model.config.nha["slot_bias"] is None and model.config.nha["slot_bias_trainable"] is True


def test_conversion_creates_one_bias_per_query_head_on_windowed_layers():
    model = convert(tiny(), NHASettings(window=4, slots=8, full_layers=[1], slot_bias=-10.0))
    b0, b1, b2 = biases(model)
    assert b1 is None  # a full-attention layer has no slots to bias
    for b in (b0, b2):
        assert isinstance(b, torch.nn.Parameter) and b.requires_grad
        assert b.shape == (6,) and torch.equal(b, torch.full((6,), -10.0))
    assert model.config.nha["slot_bias"] == -10.0


def test_frozen_bias_is_a_saved_buffer():
    model = convert(tiny(), NHASettings(window=4, slots=8, slot_bias=-3.0, slot_bias_trainable=False))
    assert not any("slot_bias" in name for name, _ in model.named_parameters())
    assert "model.layers.0.self_attn.slot_bias" in model.state_dict()
    assert torch.equal(biases(model)[0], torch.full((6,), -3.0))


def test_zero_bias_is_the_paper_layer_exactly():
    base = tiny()
    ids, mask = batch(t=30)
    plain = convert(copy.deepcopy(base), NHASettings(window=4, slots=8, sinks=2))
    zero = convert(copy.deepcopy(base), NHASettings(window=4, slots=8, sinks=2, slot_bias=0.0))
    with torch.no_grad():
        assert torch.equal(plain(ids, attention_mask=mask).logits, zero(ids, attention_mask=mask).logits)


def test_very_negative_bias_starts_as_sliding_window_attention():
    base = tiny()
    ids, mask = batch(t=30)
    swa = convert(copy.deepcopy(base), NHASettings(window=4, slots=0, sinks=2))
    nha = convert(copy.deepcopy(base), NHASettings(window=4, slots=8, sinks=2, slot_bias=-1e4))
    with torch.no_grad():
        assert max_diff(swa(ids, attention_mask=mask).logits, nha(ids, attention_mask=mask).logits, mask) <= 1e-5


def test_bias_trains_and_decode_equals_the_parallel_forward():
    model = convert(tiny(), NHASettings(window=4, slots=8, sinks=2, slot_bias=-1.0))
    ids, mask = batch(t=30)
    model(ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
    assert all(b.grad is not None and b.grad.abs().min() > 0 for b in biases(model))
    with torch.no_grad():
        for b in biases(model):  # different values per head, so the decode path must index them right
            b.copy_(torch.linspace(-2, 2, 6))
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = NHACache(model.config)
        steps = [model(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache).logits]
        for t in range(9, 30):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    assert max_diff(full, torch.cat(steps, 1), mask) <= 1e-4


def test_packed_rows_keep_the_bias():
    model = convert(tiny(), NHASettings(window=4, slots=8, sinks=2, slot_bias=-1.0))
    with torch.no_grad():
        for b in biases(model):
            b.copy_(torch.linspace(-2, 2, 6))
        ids, _ = batch(t=30, b=1, pad=(0,))
        pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
        packed = model(ids, position_ids=pos, use_cache=False).logits
        parts = [model(ids[:, a:b], use_cache=False).logits for a, b in ((0, 12), (12, 30))]
    assert (packed - torch.cat(parts, 1)).abs().max() <= 1e-4


@pytest.mark.parametrize("trainable", [True, False])
def test_save_load_keeps_the_bias_and_its_settings(tmp_path, trainable):
    model = convert(tiny("qwen3"), NHASettings(window=4, slots=8, sinks=2, slot_bias=-8.0,
                                               slot_bias_trainable=trainable))
    with torch.no_grad():
        biases(model)[1].copy_(torch.linspace(-9, -1, 6))  # a "trained" value, not the initial one
    nha_convert.save(model, None, tmp_path / "m")
    loaded = nha_convert.load(tmp_path / "m")
    assert loaded.config.nha["slot_bias"] == -8.0 and loaded.config.nha["slot_bias_trainable"] is trainable
    for a, b in zip(biases(model), biases(loaded)):
        assert torch.equal(a, b) and isinstance(b, torch.nn.Parameter) == trainable
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_the_gates_stage_trains_the_bias():
    from nha_convert.finetune.recipe import LoraSpec
    from nha_convert.finetune.trainables import select_trainables

    model = select_trainables(convert(tiny(), NHASettings(window=4, slots=8, slot_bias=-5.0)), "gates", LoraSpec())
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {f"model.layers.{i}.self_attn.slot_bias" for i in range(3)} <= trained
    assert all(".g_proj." in name or name.endswith(".slot_bias") for name in trained)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_bias_is_a_one_line_error(value):
    with pytest.raises(NHAError, match="slot_bias must be a finite number"):
        convert(tiny(), NHASettings(window=4, slots=8, slot_bias=value))


def test_cli_slot_bias(tiny_folder, tmp_path, run_cli):  # noqa: F811
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--window", "16", "--slots", "8",
                     "--slot-bias", "-10")
    assert code == 0, text
    assert "slot bias -10" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["nha"]["slot_bias"] == -10.0 and cfg["nha"]["slot_bias_trainable"] is True
    model = nha_convert.load(out)
    assert torch.equal(biases(model)[0], torch.full((4,), -10.0))
