"""Setting an NHA_* variable inside a test: backend.py reads the environment once, so it is read again here (the
conftest fixture reads it again after the test, once monkeypatch has restored it)."""

from __future__ import annotations

from nha_convert import backend


def set_nha_env(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    backend.resolve()
