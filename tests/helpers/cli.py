"""Running the console scripts from tests: in-process (with the conftest fixture `run_cli`) or as a subprocess
(`Proc`), and the assertions the CLI tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nha_convert.cli.convert import main as convert_main

ROOT = Path(__file__).resolve().parents[2]


def run_convert(run_cli, *args) -> tuple[int, str]:
    """`nha-convert ARGS`: (exit code, stdout + stderr)."""
    code, out, err = run_cli(convert_main, "nha-convert", *args)
    return code, out + err


def one_line_error(code: int, err: str, want: str, exit_code: int = 1) -> None:
    """The command failed with exit `exit_code` and exactly one line `error: ...` holding `want`."""
    assert code == exit_code, err
    assert want in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err


def final_error(code: int, err: str, want: str, exit_code: int = 1) -> str:
    """After the work started (progress lines above it): exit `exit_code`, the last line the only `error: ...` line,
    holding `want`, and no traceback. Returns that line."""
    assert code == exit_code and "Traceback" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert want in errors[0], err
    return errors[0]


def no_model_loads(monkeypatch) -> None:
    """Any model load fails the test: the checks under test must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input checks")

    from nha_convert import hub
    from nha_convert.eval import models
    from nha_convert.finetune import models as ft_models

    monkeypatch.setattr(hub, "load_base_model", boom)
    monkeypatch.setattr(models, "load", boom)
    monkeypatch.setattr(ft_models, "build_models", boom)


def default_signals() -> None:
    """In the child, before it runs: a suite started with SIGINT ignored (`nohup`, `&` in a script) would otherwise
    hand the ignored signal down, and the child would never see the Ctrl-C under test."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Proc:
    """A CLI in a subprocess whose stderr is read line by line (so a marker can be waited for)."""

    def __init__(self, module: str, *args: object):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "COLUMNS": "200"}
        self.p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_signals)
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(self.p.stderr), daemon=True)
        self._t.start()

    def wait_for(self, marker: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in line for line in self.lines):
            assert self.p.poll() is None, f"exited {self.p.returncode} before {marker!r}: {''.join(self.lines)}"
            assert time.monotonic() < deadline, f"no {marker!r} in {''.join(self.lines)}"
            time.sleep(0.02)

    def interrupt(self, times: int = 1, sig: int = signal.SIGINT) -> tuple[int, str]:
        for _ in range(times):
            self.p.send_signal(sig)
            time.sleep(0.05)
        self.p.wait(timeout=60)
        self._t.join(timeout=10)
        return self.p.returncode, "".join(self.lines)
