"""ResolvedNHA: the saved `config.nha` dict read back typed and validated."""

from __future__ import annotations

import pytest

from nha_convert import NHAError, NHASettings
from nha_convert.settings import ResolvedNHA


def test_round_trip_of_the_saved_dict():
    saved = NHASettings(window=8, slots=4, sinks=2, full_layers=[0, 2], slot_bias=-10.0,
                        slot_bias_trainable=False).to_config(3)
    r = ResolvedNHA.from_dict(saved, num_layers=3)
    assert r.windows == (None, 8, None) and r.full_layers == (0, 2)
    assert (r.window, r.slots, r.sinks, r.slot_bias, r.slot_bias_trainable) == (8, 4, 2, -10.0, False)
    cfg = type("C", (), {"nha": saved, "num_hidden_layers": 3})()
    assert NHASettings.from_config(cfg) == r


def test_older_configs_take_the_defaults():
    r = ResolvedNHA.from_dict({"windows": [16, 16], "window": 16, "slots": 8, "sinks": 0})
    assert r.slot_bias is None and r.slot_bias_trainable and r.chunk_size == NHASettings().chunk_size


@pytest.mark.parametrize("nha, match", [
    ({"window": 4}, "no per-layer 'windows'"),
    ({"windows": [4, 4, 4]}, "3 layer windows for a model of 2"),
    ({"windows": [4, 4], "slots": -1}, "slots must be >= 0"),
    ({"windows": [4, 4], "gate_temperature": 0}, "gate_temperature must be > 0"),
])
def test_invalid_dicts_are_one_line_errors(nha, match):
    with pytest.raises(NHAError, match=match):
        ResolvedNHA.from_dict(nha, num_layers=2)


def test_a_config_without_nha_settings():
    with pytest.raises(NHAError, match="has no NHA settings"):
        ResolvedNHA.from_config(type("C", (), {})())

