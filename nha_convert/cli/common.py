"""What the three CLIs share: the runner (exit codes, one-line errors), --version, dtype parsing, progress output,
the rich console, and the filter of library warnings the user can do nothing about.

Exit codes: 0 success, 1 an error in the user's input or environment (`error: ...`), 2 a usage error (bad option,
missing argument), 130 interrupted (Ctrl-C). Never a traceback for any of these.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import NHAError
from ..io import is_no_space

console = Console(stderr=True)

DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def parse_dtype(name: str) -> Any:
    try:
        canonical = DTYPE_NAMES[name]
    except KeyError:
        raise NHAError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None
    if canonical == "auto":
        return "auto"
    import torch

    return getattr(torch, canonical)


# --- version --------------------------------------------------------------------------------------------


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("nha-convert")
    except PackageNotFoundError:  # run from a source tree that was never installed
        import re
        from pathlib import Path

        text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def _show_version(ctx: typer.Context, value: bool) -> None:
    if value:
        typer.echo(f"{ctx.find_root().info_name} {version()}")  # the prog_name run() passes
        raise typer.Exit(0)


# `version: VersionOption = False` in a command's signature: prints `<prog> <version>`, exits 0 before anything runs.
VersionOption = Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                             help="Print the version and exit.")]


# --- progress -------------------------------------------------------------------------------------------


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """`with progress_bars() as bar: tick = bar("passkey @ 1024 tokens", 20); tick(1)`.

    A rich bar on a terminal; in a log (not a terminal) one plain line per task start and per tenth done, so
    CI logs and `2> log` show the run is alive. total None: an unknown amount (a spinner, lines per step).
    """
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as prog:
            def bar(desc: str, total: int | None) -> Callable[[int], None]:
                tid = prog.add_task(desc, total=total)
                return lambda n: prog.advance(tid, n)

            yield bar
        return

    def lines(desc: str, total: int | None) -> Callable[[int], None]:
        done = [0]
        every = max(1, (total or 10) // 10)
        console.print(f"{desc}: 0/{total if total is not None else '?'}", highlight=False)

        def tick(n: int) -> None:
            before, done[0] = done[0], done[0] + n
            if done[0] // every != before // every or done[0] == total:
                console.print(f"{desc}: {done[0]}/{total if total is not None else '?'}", highlight=False)
        return tick

    yield lines


class Steps:
    """The phases of a command (`steps.start("loading base model")`): a spinner on a terminal, a line in a log."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "Steps":
        if console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=console, transient=True)
            self._progress.start()
        return self

    def start(self, description: str) -> None:
        if self._progress is None:
            console.print(f"{description} ...", highlight=False)
        elif self._task is None:
            self._task = self._progress.add_task(description)
        else:
            self._progress.update(self._task, description=description)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


# --- library noise --------------------------------------------------------------------------------------

# (message regex, category): warnings that say nothing the user can act on.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Initializing zero-element tensors is a no-op", UserWarning),  # gates of m = 0 layers
    (r"`past_key_values` is deprecated", FutureWarning),  # transformers >= 5.24 renamed it `cache`
    (r".*is_gradient_checkpointing.*", FutureWarning),
)
# logger name -> message prefixes it logs that are expected here.
HARMLESS_LOGS: dict[str, tuple[str, ...]] = {
    # nha-eval hands lm-eval a loaded model on purpose (one model in memory, NHA classes registered)
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Filter the known-harmless warnings and log lines of torch, transformers and lm-eval (idempotent)."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in HARMLESS_LOGS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(prefixes))


def quiet_lm_eval() -> None:
    """lm-eval records the git commit of the working folder by running `git describe`, whose stderr ("fatal: not
    a git repository") reaches the user outside a repository; ask git the same with its stderr silenced."""
    import os
    import subprocess

    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_commit_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"],  # noqa: S607
                                           stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = git_commit_hash


# --- the runner -----------------------------------------------------------------------------------------


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """typer >= 0.20 raises the click copy it bundles (typer._click); older typer raises click's own."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a scheduler's preemption) where the command has no handler of its own: it unwinds
    like Ctrl-C, so partial outputs are removed on the way, and the command exits 143. nha-finetune's training loop
    has its own (it saves a checkpoint); before and after it, this one applies."""


_terminated: list[bool] = []  # set by the handler: typer and click turn the exception into Exit(130) or Abort


def _terminate(signum: int, frame: Any) -> None:
    _terminated.append(True)
    raise Terminated


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    try:
        old = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a test runner): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(app: typer.Typer, prog: str, args: list[str] | None = None) -> int:
    """Run a typer app and return its exit code; every failure the user can cause is one line on stderr."""
    from . import restore_default_handlers

    quiet_libraries()
    caught = {name: _exception_classes(name) for name in ("ClickException", "NoArgsIsHelpError", "Exit", "Abort")}
    _terminated.clear()
    restore_default_handlers()  # the start-up handlers of cli/__init__ end here: from now on the except clauses
    with _sigterm_unwinds():
        code = _run(app, prog, args, caught)
    if _terminated and code in (1, 130):
        console.print("terminated", highlight=False)
        return 143
    if code == 130:
        console.print("interrupted", highlight=False)
    return code


def _run(app: typer.Typer, prog: str, args: list[str] | None, caught: dict[str, tuple[type, ...]]) -> int:
    click_exception, no_args = caught["ClickException"], caught["NoArgsIsHelpError"]
    exits = (typer.Exit, *caught["Exit"])
    aborts = (typer.Abort, *caught["Abort"])
    try:
        code = app(args=args, prog_name=prog, standalone_mode=False)
    except NHAError as e:
        console.print(f"[bold red]error:[/] {_one_line(str(e))}", highlight=False, soft_wrap=True)
        return 1
    except no_args as e:  # the command run bare: its help is the answer
        e.show()
        return 2
    except click_exception as e:  # a usage error (bad value, unknown option, missing argument): exit 2
        console.print(f"[bold red]error:[/] {_one_line(e.format_message())} (see {prog} --help)",
                      highlight=False, soft_wrap=True)
        return int(getattr(e, "exit_code", 2))
    except exits as e:  # raised outside the command body (older typer) or by a callback
        code = int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except (KeyboardInterrupt, *aborts):  # typer turns Ctrl-C into Exit(130) only inside the command
        code = 130
    except BrokenPipeError:  # `nha-eval ... | head`
        return 1
    except Exception as e:
        if _raised_while_interrupted(e):
            code = 130
        elif is_no_space(e):  # a full disk where no size was known beforehand: still one line
            where = getattr(e, "filename", None)
            console.print(f"[bold red]error:[/] out of disk space{f' writing {where}' if where else ''}; free some "
                          "space or choose another folder", highlight=False, soft_wrap=True)
            return 1
        else:
            raise
    return code if isinstance(code, int) else 0


def _raised_while_interrupted(error: BaseException) -> bool:
    """True when `error` was raised while a Ctrl-C (or SIGTERM) unwound: a context manager's exit can fail on the
    half-built state it finds (torch's device mode during model construction: "trying to pop from empty mode stack"),
    and its error replaces the KeyboardInterrupt. The user interrupted; the exit says so, not a traceback."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run_app(app: typer.Typer, prog: str) -> Callable[[], None]:
    """Console-script entry point of a typer app: `sys.exit(run(app, prog))`."""

    def main() -> None:
        code = run(app, prog)
        if code in (130, 143):  # a further signal while Python exits would land in an atexit hook as a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            # Python marks a KeyboardInterrupt raised inside an import it ran for `python -m` as unhandled even
            # though the runner caught it, and then kills itself with SIGINT at exit (status -2, not 130): leave
            # now, with the output flushed (cleanup already ran as the interrupt unwound).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)

    return main
