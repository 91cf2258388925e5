"""Running the console scripts in-process from tests (with the conftest fixture `run_cli`)."""

from __future__ import annotations

from nha_convert.cli.convert import main as convert_main


def run_convert(run_cli, *args) -> tuple[int, str]:
    """`nha-convert ARGS`: (exit code, stdout + stderr)."""
    code, out, err = run_cli(convert_main, "nha-convert", *args)
    return code, out + err
