"""`nha-convert` end to end on a tiny local model: success, summary, and every bad input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from tests.helpers.cli import run_convert as run


def test_converts_a_local_folder(tiny_folder, tmp_path, run_cli):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--window", "16", "--slots", "8",
                     "--sinks", "4", "--full-layers", "0,3")
    assert code == 0, text
    assert "0: full, 1-2: w=16, 3: full" in text and "decode state @ 128K" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nha_llama" and cfg["nha"]["windows"] == [None, 16, 16, None]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    import nha_convert  # noqa: F401  (registers the nha_* types)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "NHALlamaForCausalLM"


@pytest.mark.parametrize("args,message", [
    (["--window", "-3"], "window must be >= 0"),
    (["--slots", "-1"], "slots must be >= 0"),
    (["--full-layers", "0,9"], "full layer index 9 is out of range"),
    (["--full-layers", "a,b"], "comma-separated layer indices"),
    (["--window", "5000"], "exceeds the model's context length 1024"),
    (["--gate-init", "random"], "unknown gate init"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_bad_options(tiny_folder, tmp_path, run_cli, args, message):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), *args)
    assert code == 1 and message in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_needs_overwrite(tiny_folder, tmp_path, run_cli):
    out = tmp_path / "nha"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = run(run_cli, str(tiny_folder), "-o", str(out))
    assert code == 1 and "--overwrite" in text and (out / "keep.txt").read_text() == "mine"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--overwrite", "--window", "8")
    assert code == 0, text
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_bad_model_inputs(tiny_folder, tmp_path, run_cli):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tmp_path / "missing"), "-o", str(out))
    assert code == 1 and "no such folder" in text

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    code, text = run(run_cli, str(corrupt), "-o", str(out))
    assert code == 1 and "not valid JSON" in text

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, text = run(run_cli, str(gpt2), "-o", str(out))
    assert code == 1 and "unsupported model type 'gpt2'" in text and "llama, mistral, qwen2, qwen3" in text
    assert not out.exists()


def test_offline_hub_id_fails_in_one_line(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run(run_cli, "nha-test/does-not-exist", "-o", str(tmp_path / "nha"))
    assert code == 1 and "offline and not in the local Hugging Face cache" in text
    assert len(text.strip().splitlines()) == 1
