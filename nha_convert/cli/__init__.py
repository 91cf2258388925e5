"""Command-line entry points: nha-convert, nha-finetune, nha-eval.

Ctrl-C or SIGTERM while a command is still starting (importing its modules) exits 130 / 143 with one line, as it
does later: until the runner (common.run) takes over, these handlers stand in for Python's traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _stop_while_starting(signum: int, frame: Any) -> None:
    # Nothing is written yet, so nothing to clean up; an exception raised here could land in one of importlib's
    # callbacks, which Python prints and drops, and the command would go on.
    sys.stderr.write("interrupted\n" if signum == signal.SIGINT else "terminated\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _install_start_up_handlers() -> None:
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        try:
            if signal.getsignal(sig) is default:  # an ignored signal (nohup, `&` in a script) stays ignored
                signal.signal(sig, _stop_while_starting)
        except ValueError:  # not the main thread
            pass


def restore_default_handlers() -> None:
    """What the runner calls first: Ctrl-C raises KeyboardInterrupt again (its own handling), SIGTERM is default."""
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        try:
            if signal.getsignal(sig) is _stop_while_starting:
                signal.signal(sig, default)
        except ValueError:
            pass


# Only when a command is what this process runs (a console script, or `python -m nha_convert.cli.X`, for which
# argv[0] is still "-m" while the package imports); a program that imports the package keeps its own handlers.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) in ("nha-convert", "nha-eval", "nha-finetune")):
    _install_start_up_handlers()
