"""`--full-layers auto:K`: K full layers chosen by score and written to the config; every bad K is one line."""

from __future__ import annotations

import json
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nha_convert import NHASettings, convert
from nha_convert.errors import NHAError
from nha_convert.finetune.recipe import parse_recipe
from nha_convert.layer_selection import layer_score
from tests.helpers.cli import one_line_error, run_convert as run

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024)  # the conftest tiny_folder's shape

def test_auto_k_through_the_cli_writes_k_full_layers_and_scores(tiny_folder, tmp_path, run_cli):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--window", "16", "--slots", "8", "--sinks", "4",
                     "--full-layers", "auto:2", "--calibration-len", "256", "--calibration-seqs", "3")
    assert code == 0, text
    nha = json.loads((out / "config.json").read_text())["nha"]
    full = [i for i, w in enumerate(nha["windows"]) if w is None]
    assert len(full) == 2 and nha["full_layers"] == full and nha["full_layers_auto"] == 2
    scores = nha["full_layer_scores"]
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    # the chosen layers are the two best scores, and each score follows from the recorded losses
    assert set(full) == set(sorted(range(4), key=lambda i: -scores[i])[:2])
    sel = nha["full_layer_selection"]
    for i in range(4):
        assert scores[i] == pytest.approx(layer_score(sel["kl_all_nha"], sel["kl"][i], sel["answer_ce_all_nha"],
                                                      sel["answer_ce"][i], sel["answer_ce_base"]), abs=1e-5)
    assert sel["seq_len"] == 256 and sel["text_seqs"] == 3 and sel["retrieval_docs"] == 3
    assert "full layers auto:2" in text and f"layers {full[0]}, {full[1]}; best scores" in text

    import nha_convert

    model = nha_convert.load(out)
    assert [layer.self_attn.window for layer in model.model.layers] == nha["windows"]


@pytest.mark.parametrize("value,message", [
    ("auto:0", "auto:K with a whole number K >= 1"),
    ("auto:5", "auto:5 asks for more full layers than the model's 4; use auto:1 to auto:4"),
    ("auto:two", "auto:K with a whole number K >= 1"),
    ("auto:1.5", "auto:K with a whole number K >= 1"),
])
def test_bad_k_is_one_error_line(tiny_folder, tmp_path, run_cli, value, message):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--full-layers", value)
    one_line_error(code, text.strip(), message)
    assert not out.exists()


def test_auto_k_with_full_every_is_refused(tiny_folder, tmp_path, run_cli):
    code, text = run(run_cli, str(tiny_folder), "-o", str(tmp_path / "nha"), "--full-layers", "auto:1",
                     "--full-every", "2")
    assert code == 1 and "drop full_every" in text and len(text.strip().splitlines()) == 1


def test_convert_without_tokenizer_leaves_the_model_alone():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with pytest.raises(NHAError, match="needs the tokenizer"):
        convert(model, NHASettings(window=16, slots=8, full_layers="auto:1"))
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"


def test_recipe_accepts_auto_and_rejects_bad_k():
    text = "model:\n  nha: {window: 64, slots: 64, full_layers: %s}\nstages:\n  - {kind: finetune, steps: 1}\n"
    assert parse_recipe(text % "auto:2", "r.yaml", budget=None).nha_settings().auto_full_layers() == 2
    with pytest.raises(NHAError) as e:
        parse_recipe(text % "auto:0", "r.yaml", budget=None)
    assert str(e.value).startswith("r.yaml:2: model.nha:") and "\n" not in str(e.value)


def test_layer_score_is_the_mean_gap_opened_by_converting_the_layer_alone():
    # all-NHA: KL 0.4, answer CE 5 (base 1). Converting the layer alone: KL 0.1 opens 1/4 of the KL gap, CE 3 opens
    # 2/4 of the answer-loss gap.
    assert layer_score(0.4, 0.1, 5.0, 3.0, 1.0) == pytest.approx(0.375)
    assert layer_score(0.4, 0.4, 5.0, 5.0, 1.0) == pytest.approx(1.0)  # as bad as converting every layer
    assert layer_score(0.4, 0.0, 5.0, 1.0, 1.0) == 0.0  # the model does not miss the layer
    assert layer_score(0.0, 0.0, 1.0, 1.0, 1.0) == 0.0  # no gap at all: no division by zero


def test_auto_k_drops_the_slot_bias_of_the_layers_it_makes_full(tiny_folder, tmp_path, run_cli):
    from safetensors import safe_open

    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--window", "16", "--slots", "8", "--slot-bias", "-8",
                     "--full-layers", "auto:2", "--calibration-len", "256", "--calibration-seqs", "2")
    assert code == 0, text
    full = json.loads((out / "config.json").read_text())["nha"]["full_layers"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        biased = {int(k.split(".")[2]) for k in f.keys() if k.endswith("self_attn.slot_bias")}
    assert biased == set(range(4)) - set(full)  # the windowed layers keep theirs; a full layer has no slots to bias

    import nha_convert

    model = nha_convert.load(out)
    assert [layer.self_attn.slot_bias is None for layer in model.model.layers] == [i in full for i in range(4)]
