"""Shared pytest fixtures. Keep each one small and say what it costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nha_convert import assets


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct HF folder (built once into the cache: ~45 s the first time, then free)."""
    return assets.smollm2_folder()
