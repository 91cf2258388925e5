"""What the three CLIs share: one-line errors, dtype parsing, the rich console."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import typer
from rich.console import Console

from ..errors import NHAError

console = Console(stderr=True)

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> Any:
    try:
        return DTYPES[name]
    except KeyError:
        raise NHAError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def run_app(app: typer.Typer) -> Callable[[], None]:
    """Console-script entry: NHAError becomes `error: <message>` and exit code 1, never a traceback."""

    def main() -> None:
        try:
            app(standalone_mode=False)
        except NHAError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except typer.Abort:
            console.print("aborted")
            sys.exit(130)
        except Exception as e:  # click usage errors keep their own formatting and exit code
            import click

            if isinstance(e, click.exceptions.ClickException):
                e.show()
                sys.exit(e.exit_code)
            raise

    return main
