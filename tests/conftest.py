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
