"""Shared pytest fixtures. Keep each one small and say what it costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nha_convert import assets, backend


def pytest_report_header(config) -> list[str]:
    """The stack under test, first thing in every run's output (CI logs and GPU records name their versions)."""
    import importlib.metadata as md

    import torch

    versions = []
    for dist in ("torch", "transformers", "triton", "peft", "accelerate"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(f"{dist} -")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return [f"nha-convert stack: {', '.join(versions)}; device: {device}"]


def pytest_make_parametrize_id(config, val, argname):
    """torch dtypes by name in test ids (`-k "float16 and not bfloat16"` picks the fp16 cases), not as `dtype12`."""
    import torch

    return str(val).removeprefix("torch.") if isinstance(val, torch.dtype) else None


@pytest.fixture(autouse=True)
def _reread_nha_environment():
    """After each test (and its monkeypatch undo), the NHA_* variables as they are again (backend.py reads them
    once; tests that set one call backend.resolve() themselves)."""
    yield
    backend.resolve()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct HF folder (built once into the cache: ~45 s the first time, then free)."""
    return assets.smollm2_folder()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm2_path) -> Path:
    """A tiny random Llama (4 layers, hidden 64) saved with the real SmolLM2 tokenizer: a local model folder for the
    command-line tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024)
                     ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path).save_pretrained(folder)
    return folder


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Call a console-script `main(prog, *args)` in-process: returns (exit code, stdout, stderr)."""
    import sys

    def run(main, *argv):
        monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width: keep messages on one line
        monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run

