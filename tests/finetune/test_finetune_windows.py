"""Windows drawn at random during training: the layers use the drawn window inside a step and their own after it;
the draw is a function of the step; a stage with the model's own window trains exactly as one without `windows`."""

from __future__ import annotations

import json

import pytest

from nha_convert.convert import convert
from nha_convert.errors import NHAError
from nha_convert.finetune.recipe import parse_recipe
from nha_convert.finetune.trainer import Trainer
from types import SimpleNamespace

from nha_convert.finetune.windows import (check_windows, draw_layer_windows, draw_window, training_window,
                                           windowed_layers)
from nha_convert.settings import NHASettings
from tests.helpers.finetune import recipe_text, save_tiny_base, tiny_llama, write_corpus


def _converted(full_layers=()):
    return convert(tiny_llama(layers=3), NHASettings(window=8, slots=4, full_layers=list(full_layers)))


def test_drawn_window_holds_inside_the_block_only():
    model = _converted(full_layers=[1])
    layers = windowed_layers(model)
    assert len(layers) == 2 and all(layer.window == 8 for layer in layers)
    with training_window(layers, 3):
        assert [layer.window for layer in layers] == [3, 3]
    assert [layer.window for layer in layers] == [8, 8]
    with pytest.raises(RuntimeError), training_window(layers, 5):
        raise RuntimeError("a failing step")
    assert [layer.window for layer in layers] == [8, 8]


def test_draw_is_a_function_of_the_step():
    draws = [draw_window([16, 32, 64], seed=3, global_step=s) for s in range(200)]
    assert draws == [draw_window([16, 32, 64], seed=3, global_step=s) for s in range(200)]
    assert set(draws) == {16, 32, 64}


def test_window_dropout_shortens_a_share_of_the_layers_each_step():
    model = _converted()
    layers = windowed_layers(model)
    stage = SimpleNamespace(windows=None, window_dropout=SimpleNamespace(share=0.25, window=0))
    draws = [draw_layer_windows(stage, layers, seed=1, global_step=s) for s in range(400)]
    assert draws == [draw_layer_windows(stage, layers, seed=1, global_step=s) for s in range(400)]
    flat = [w for d in draws for w in d]
    assert set(flat) == {0, 8} and 0.2 < flat.count(0) / len(flat) < 0.3
    assert len({tuple(d) for d in draws}) > 4  # layers drop apart, not all together
    with training_window(layers, [0, 8, 2]):
        assert [layer.window for layer in layers] == [0, 8, 2]
    assert [layer.window for layer in layers] == [8, 8, 8]
    assert draw_layer_windows(SimpleNamespace(windows=None, window_dropout=None), layers, 1, 0) is None


def test_windows_need_windowed_layers():
    with pytest.raises(NHAError, match="remove them"):
        check_windows(tiny_llama(), "distill", [32])
    check_windows(tiny_llama(), "distill", None)


def _losses(tmp_path, name, windows):
    base = save_tiny_base(tmp_path / "base")
    data = write_corpus(tmp_path / "data")
    stages = f"""
    stages:
      - kind: finetune
        trains: gates
        steps: 3
        batch_size: 2
        seq_len: 48
        eval_rows: 2{windows}
    """
    out = tmp_path / name
    Trainer(parse_recipe(recipe_text(base, data, out, stages), "t.yaml")).run()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "model" / "config.json").read_text())
    return [x["loss"] for x in lines if "loss" in x and "event" not in x], config


def test_a_stage_trains_with_the_drawn_windows_and_saves_its_own(tmp_path):
    plain, config = _losses(tmp_path, "plain", "")
    same, _ = _losses(tmp_path, "same", "\n        windows: [8]")
    short, short_config = _losses(tmp_path, "short", "\n        windows: [2]")
    assert same == plain  # the converted window drawn every step: nothing changes
    assert short[0] != plain[0]  # the first step already sees the shorter window
    assert short_config["nha"]["window"] == config["nha"]["window"] == 8
    dropped, drop_config = _losses(tmp_path, "dropped", "\n        window_dropout: {share: 1.0, window: 0}")
    assert dropped[0] != plain[0] and drop_config["nha"]["window"] == 8
